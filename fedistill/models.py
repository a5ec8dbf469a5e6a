"""Networks used for distillation and evaluation.

The ConvNet is the one of the DC/DSA/DM papers: ``depth`` blocks of
conv 3x3 -> norm -> ReLU -> pool, then a linear classifier. Inputs of 28x28 are
padded by 3 in the first convolution so that feature maps are 32x32, as in the
reference code. Instance norm is GroupNorm(C, C) with affine parameters, which
keeps per-sample statistics (no running buffers, so Opacus accepts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Norm = Literal["instancenorm", "batchnorm", "groupnorm", "none"]
Pooling = Literal["avgpool", "maxpool", "none"]


@dataclass(frozen=True)
class ModelSpec:
    """What to build; mirrors ``fedistill.config.ModelConfig`` without pydantic."""

    arch: Literal["convnet", "mlp"] = "convnet"
    width: int = 128
    depth: int = 3
    norm: Norm = "instancenorm"
    pooling: Pooling = "avgpool"
    hidden: int = 128


def _norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(min(4, channels), channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-D of the distillation literature, split into ``embed`` and ``classifier``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        depth: int = 3,
        norm: Norm = "instancenorm",
        pooling: Pooling = "avgpool",
    ) -> None:
        super().__init__()
        height, width_px = image_size
        padding = 3 if (height, width_px) == (28, 28) else 1
        if padding == 3:
            height, width_px = 32, 32
        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(depth):
            layers.append(nn.Conv2d(channels, width, 3, padding=padding if block == 0 else 1))
            layers.append(_norm_layer(norm, width))
            layers.append(nn.ReLU())
            if pooling != "none" and min(height, width_px) >= 2:
                layers.append(nn.AvgPool2d(2) if pooling == "avgpool" else nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels * height * width_px
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, flattened: what distribution matching compares."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    """Two hidden layers; a cheap model for small images and quick tests."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def has_batch_statistics(net: nn.Module) -> bool:
    """Whether a batch's images mix through batch norm: then per-record gradients and chunked forwards are not
    those of the records alone, so DP-SGD, DP gradient matching and chunked matching refuse or fall back."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in net.modules())


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the network described by ``spec`` for images of shape (C, H, W)."""
    channels, height, width = input_shape
    if spec.arch == "convnet":
        return ConvNet(channels, num_classes, (height, width), spec.width, spec.depth, spec.norm, spec.pooling)
    if spec.arch == "mlp":
        return MLP(channels * height * width, num_classes, spec.hidden)
    raise ValueError(f"model.arch: unknown architecture {spec.arch!r}; allowed: convnet, mlp")
