"""Pixel space: attacks perturb and stamp images in [0, 1]; fedistill's models read normalised images.

Attacks bounded in pixel units (L-inf 8/255, a white patch) are only meaningful
in pixel space, so every attack here takes images in [0, 1] and a model that
normalises internally (``PixelModel``), instead of perturbing normalised tensors
(REFERENCE.md §5: torchattacks on normalised inputs reports meaningless numbers).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedistill.data import DatasetInfo, ImageData


class PixelModel(nn.Module):
    """``model`` behind an in-model normalisation layer: takes [0, 1] pixels, gives the model's logits.

    ``embed`` (penultimate features) is forwarded the same way, for attacks and
    defences that look at features.
    """

    def __init__(self, model: nn.Module, info: DatasetInfo) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1))
        parameter = next(model.parameters(), None)
        if parameter is not None:
            self.to(parameter.device)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(pixels))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self.normalize(pixels))  # type: ignore[operator]


def to_pixels(data: ImageData, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images as float32 in [0, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(data.images)).to(device).float().div_(255.0)


def normalize(pixels: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """[0, 1] pixels -> the normalised space fedistill's models and synthetic sets live in."""
    mean = torch.tensor(info.mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean) / std


def quantize(pixels: torch.Tensor) -> np.ndarray:
    """[0, 1] floats back to uint8 (rounded), as a client's stored images are."""
    return (pixels.clamp(0, 1) * 255.0).round_().to(torch.uint8).cpu().numpy()


def predict(model: nn.Module, pixels: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes of a pixel-space model, in eval mode, batch by batch (the model's mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = [model(pixels[i : i + batch_size].to(device)).argmax(1).cpu()
                   for i in range(0, len(pixels), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
