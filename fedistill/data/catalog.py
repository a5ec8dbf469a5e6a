"""Dataset metadata and the in-memory image container.

The statistics here are the ones used by the dataset-distillation literature
(DC/DSA/DM), so numbers produced by fedistill stay comparable with published
results. Everything is in [0, 1] pixel units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "digits", "npz")

# Spellings people actually type, mapped to the canonical name.
_ALIASES: dict[str, str] = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "digits": "digits",
    "npz": "npz",
}


class DataError(Exception):
    """One-line, human-readable error that always names the offending file or dataset."""


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, class names and normalisation statistics of one dataset."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(
                f"dataset {self.name!r}: mean/std need {self.channels} values, "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"dataset {self.name!r}: {self.num_classes} classes but "
                f"{len(self.class_names)} class names"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"dataset {self.name!r}: std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.height, self.width)


_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Digits (scikit-learn's 8x8 set) has no published statistics. These were
# computed once, in [0, 1] units (uint8 / 255, population std), from the
# deterministic train split that fedistill.data.sources.load_dataset("digits",
# "train") returns (stratified, seed 0, 25% test); tests/test_data_loaders.py
# recomputes them.
DIGITS_MEAN = 0.305760
DIGITS_STD = 0.376065

_BUILTIN: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, 28, (0.2861,), (0.3530,), _FASHION_CLASSES
    ),
    "mnist": DatasetInfo("mnist", 10, 1, 28, 28, (0.1307,), (0.3081,), _DIGIT_CLASSES),
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        3,
        32,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
        _CIFAR10_CLASSES,
    ),
    "digits": DatasetInfo("digits", 10, 1, 8, 8, (DIGITS_MEAN,), (DIGITS_STD,), _DIGIT_CLASSES),
}


def canonical_name(name: str) -> str:
    """Map a user-typed dataset name to one of DATASETS, or raise DataError."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return _ALIASES[key]


def builtin_info(name: str) -> DatasetInfo:
    """Metadata of a built-in dataset; "npz" has none here, its metadata comes from the file (``dataset_info``)."""
    canon = canonical_name(name)
    if canon not in _BUILTIN:
        raise DataError("dataset 'npz' needs the path of the .npz file")
    return _BUILTIN[canon]


@dataclass
class ImageData:
    """Images kept as uint8 NCHW (4x smaller than float) plus int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        labels = np.asarray(self.labels)
        if images.dtype != np.uint8:
            raise DataError(f"dataset {self.info.name!r}: images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.info.shape:
            raise DataError(
                f"dataset {self.info.name!r}: images must have shape "
                f"(N, {', '.join(map(str, self.info.shape))}), got {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"dataset {self.info.name!r}: {images.shape[0]} images "
                f"but labels of shape {labels.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: ArrayLike) -> ImageData:
        """A copy holding only the given rows (integer indices or a boolean mask)."""
        idx = np.asarray(indices)
        if idx.dtype != np.bool_:
            idx = idx.astype(np.int64, copy=False)
        return ImageData(self.images[idx], self.labels[idx], self.info)

    def normalized(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float32 NCHW tensor (x/255 - mean)/std on `device`, ready for a model."""
        return normalize(torch.from_numpy(np.ascontiguousarray(self.images)).to(device), self.info)

    def class_counts(self) -> np.ndarray:
        """Number of images per class, length num_classes."""
        return np.bincount(self.labels, minlength=self.info.num_classes)[: self.info.num_classes]


def _stats(info: DatasetInfo, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (-1, 1, 1)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(info.std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """(x/255 - mean)/std for uint8 images; floating inputs are taken as already in [0, 1].

    Works on NCHW batches and single CHW images. The result has row-major
    strides: a one-channel array can carry strides torch reads as
    channels-last (scikit-learn's digits do), which makes convolutions return
    channels-last activations, and on those Opacus' per-sample gradients of
    every later convolution come out as zeros (opacus 1.6).
    """
    if images_uint8.dtype == torch.uint8:
        x = images_uint8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    elif images_uint8.is_floating_point():
        x = images_uint8.to(torch.float32)
    else:
        raise DataError(
            f"dataset {info.name!r}: normalize expects uint8 or float images, "
            f"got {images_uint8.dtype}"
        )
    mean, std = _stats(info, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Invert normalize() back to [0, 1] floats (clamped), for plotting and saving images."""
    mean, std = _stats(info, x)
    return (x.to(torch.float32) * std + mean).clamp_(0.0, 1.0)
