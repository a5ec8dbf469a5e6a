"""The one interface every distillation method implements, and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedistill.models import ModelSpec
from fedistill.synthetic import SyntheticSet

ProgressFn = Callable[[int, int, float], None]
"""Called as ``progress(iteration, total, loss)`` during long distillations."""


@dataclass
class DistillSettings:
    """Method-independent knobs; each method reads what it needs and ignores nothing silently.

    ``iterations`` is the outer budget (DM/DC iterations; unused by coresets).
    ``None`` means "the method's published default" (learning rate, DC loop lengths).
    ``real_precision`` is the dtype of the no-grad forward pass over real images:
    ``fp32``, ``bf16``, or ``auto`` (bf16 where the hardware has fast bf16 matmuls).
    ``compile`` (``auto``/``on``/``off``) compiles DM's forward passes; ``auto`` does so for long runs.
    """

    ipc: int = 10
    iterations: int = 1000
    lr_images: float | None = None
    batch_real: int = 256
    init: str = "real"
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_net: float = 0.01
    batch_train: int = 256
    real_precision: str = "auto"
    compile: str = "auto"


class Distiller(ABC):
    """Base class: ``Distiller(spec, settings, device)(images, labels, num_classes, seed)``.

    ``images`` are normalised float NCHW tensors of one client's (or the central) data;
    classes may be missing or have fewer than ``ipc`` images: such classes get
    ``min(ipc, count)`` images (none when absent), and ``source_counts`` in the
    result says how many real images each class had.
    """

    name: ClassVar[str]

    def __init__(self, model_spec: ModelSpec, settings: DistillSettings, device: torch.device) -> None:
        self.model_spec = model_spec
        self.settings = settings
        self.device = device

    @abstractmethod
    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        """Return a synthetic set for these real images."""

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        generator = torch.Generator().manual_seed(seed)
        result = self.distill(images.to(self.device), labels.to(self.device), num_classes, generator, progress)
        result.provenance.setdefault("method", self.name)
        result.provenance.setdefault("ipc", self.settings.ipc)
        result.provenance.setdefault("seed", seed)
        return result


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class's images (empty tensor for absent classes)."""
    return [torch.nonzero(labels == c, as_tuple=False).flatten() for c in range(num_classes)]


def per_class_budget(counts: np.ndarray, ipc: int) -> np.ndarray:
    """Synthetic images per class: ``ipc`` where a class has at least that many real images, else its count."""
    return np.minimum(counts, ipc).astype(np.int64)


def source_counts(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    return np.bincount(labels.cpu().numpy(), minlength=num_classes).astype(np.int64)


_REGISTRY: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a method to the registry under ``name``."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _REGISTRY:
            raise ValueError(f"distiller {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_distiller(name: str) -> type[Distiller]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"distill.method: unknown method {name!r}; allowed: {', '.join(available_methods())}") from None
