"""The synthetic set: what a distiller produces and a client sends.

Images live in the dataset's normalised space (float32, NCHW). Labels are hard
class indices; ``soft_labels`` is the slot for per-image class distributions
(e.g. from a teacher) and stays ``None`` for hard-label sets. ``source_counts``
records how many real images of each class the set was distilled from: a class
with zero count has no images in the set, which is how non-IID clients show up.

A factorised set (``factor`` > 1, IDC's multi-formation) stores ``factor**2``
smaller images in each stored image, tiled in a grid: the same bytes carry
more training images. ``decoded()`` gives the images a network trains on
(each tile upsampled to the full size); labels and counts describe the stored
images, soft labels the decoded ones (a teacher labels each tile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from fedistill.atomic import atomic_path


@dataclass
class SyntheticSet:
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    source_counts: np.ndarray
    soft_labels: torch.Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    factor: int = 1

    def __post_init__(self) -> None:
        check_factor(self.factor, tuple(self.images.shape[2:]))
        if self.images.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")
        if self.source_counts.shape != (self.num_classes,):
            raise ValueError(f"source_counts must have {self.num_classes} entries")
        decoded_rows = self.images.shape[0] * self.factor**2
        if self.soft_labels is not None and self.soft_labels.shape != (decoded_rows, self.num_classes):
            raise ValueError(f"soft_labels must be ({decoded_rows}, {self.num_classes}): one row per decoded image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def images_per_class(self) -> np.ndarray:
        """How many synthetic images each class has."""
        return np.bincount(self.labels.cpu().numpy(), minlength=self.num_classes)

    def decoded(self) -> SyntheticSet:
        """The set a network trains on: every tile of a factorised set as a full-size image (itself if factor 1)."""
        if self.factor == 1:
            return self
        images = decode(self.images, self.factor)
        labels = torch.repeat_interleave(self.labels, self.factor**2)
        provenance = {**self.provenance, "decoded_from_factor": self.factor}
        return SyntheticSet(images, labels, self.num_classes, self.source_counts, self.soft_labels, provenance)

    def nbytes(self) -> int:
        """Payload size as sent over the wire (images, labels, counts; soft labels if any)."""
        arrays = self.to_arrays()
        return int(sum(a.nbytes for a in arrays.values()))

    def to(self, device: torch.device | str) -> SyntheticSet:
        return SyntheticSet(
            self.images.to(device),
            self.labels.to(device),
            self.num_classes,
            self.source_counts,
            None if self.soft_labels is None else self.soft_labels.to(device),
            dict(self.provenance),
            self.factor,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays: the form used in Flower messages and safetensors files."""
        arrays = {
            "images": self.images.detach().cpu().float().numpy(),
            "labels": self.labels.detach().cpu().long().numpy(),
            "source_counts": np.asarray(self.source_counts, dtype=np.int64),
        }
        if self.soft_labels is not None:
            arrays["soft_labels"] = self.soft_labels.detach().cpu().float().numpy()
        return arrays

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        num_classes: int,
        provenance: dict[str, Any] | None = None,
        factor: int = 1,
    ) -> SyntheticSet:
        soft = arrays.get("soft_labels")
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(arrays["images"], dtype=np.float32)),
            labels=torch.from_numpy(np.ascontiguousarray(arrays["labels"], dtype=np.int64)),
            num_classes=num_classes,
            source_counts=np.asarray(arrays["source_counts"], dtype=np.int64),
            soft_labels=None if soft is None else torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32)),
            provenance=provenance or {},
            factor=factor,
        )

    def save(self, path: Path | str) -> None:
        """Write as safetensors (no pickle), atomically, with class count and provenance as metadata."""
        metadata = {"num_classes": str(self.num_classes), "factor": str(self.factor), "provenance": json.dumps(self.provenance, default=str)}
        with atomic_path(path) as temp:
            save_file(self.to_arrays(), str(temp), metadata=metadata)

    @classmethod
    def load(cls, path: Path | str) -> SyntheticSet:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if "num_classes" not in metadata:
            raise ValueError(f"{path}: not a fedistill synthetic set (no num_classes metadata)")
        return cls.from_arrays(
            load_file(str(path)),
            int(metadata["num_classes"]),
            json.loads(metadata.get("provenance", "{}")),
            int(metadata.get("factor", "1")),
        )


def check_factor(factor: int, size: tuple[int, ...]) -> None:
    """Refuse a factor that does not tile images of ``size`` (H, W) into equal squares."""
    if factor < 1 or any(int(side) % factor for side in size):
        raise ValueError(f"distill.factor: {factor} must be >= 1 and divide the image size {tuple(size)}")


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Each stored image's ``factor x factor`` tiles, row by row, upsampled (bilinear) to the full size.

    Differentiable, so distillers optimise the stored images through it.
    Image ``i``'s tiles are rows ``i * factor**2`` to ``(i + 1) * factor**2 - 1``.
    """
    if factor == 1:
        return images
    n, channels, height, width = images.shape
    tile_h, tile_w = height // factor, width // factor
    tiles = images.reshape(n, channels, factor, tile_h, factor, tile_w).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n * factor * factor, channels, tile_h, tile_w)
    return F.interpolate(tiles, size=(height, width), mode="bilinear", align_corners=False)


def encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Tile groups of ``factor**2`` full-size images, each shrunk by area averaging, into one stored image each.

    The inverse direction of ``decode`` (up to resampling): rows ``i * factor**2``
    onwards become stored image ``i``. Used to start a factorised set from real images.
    """
    if factor == 1:
        return images
    height, width = images.shape[2:]
    return tile(F.interpolate(images, size=(height // factor, width // factor), mode="area"), factor)


def tile(tiles: torch.Tensor, factor: int) -> torch.Tensor:
    """Lay out groups of ``factor**2`` small images row by row as one image each (``decode`` reads them back)."""
    count, channels, tile_h, tile_w = tiles.shape
    if count % (factor * factor):
        raise ValueError(f"tile: {count} tiles do not fill whole groups of {factor * factor}")
    n = count // (factor * factor)
    grid = tiles.reshape(n, factor, factor, channels, tile_h, tile_w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, channels, factor * tile_h, factor * tile_w)
