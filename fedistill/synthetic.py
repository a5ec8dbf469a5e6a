"""The synthetic set: what a distiller produces and a client sends.

Images live in the dataset's normalised space (float32, NCHW). Labels are hard
class indices; ``soft_labels`` is the slot for per-image class distributions
(e.g. from a teacher) and stays ``None`` for hard-label sets. ``source_counts``
records how many real images of each class the set was distilled from: a class
with zero count has no images in the set, which is how non-IID clients show up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")
        if self.source_counts.shape != (self.num_classes,):
            raise ValueError(f"source_counts must have {self.num_classes} entries")
        if self.soft_labels is not None and self.soft_labels.shape != (self.images.shape[0], self.num_classes):
            raise ValueError("soft_labels must be (num_images, num_classes)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def images_per_class(self) -> np.ndarray:
        """How many synthetic images each class has."""
        return np.bincount(self.labels.cpu().numpy(), minlength=self.num_classes)

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
        cls, arrays: dict[str, np.ndarray], num_classes: int, provenance: dict[str, Any] | None = None
    ) -> SyntheticSet:
        soft = arrays.get("soft_labels")
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(arrays["images"], dtype=np.float32)),
            labels=torch.from_numpy(np.ascontiguousarray(arrays["labels"], dtype=np.int64)),
            num_classes=num_classes,
            source_counts=np.asarray(arrays["source_counts"], dtype=np.int64),
            soft_labels=None if soft is None else torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32)),
            provenance=provenance or {},
        )

    def save(self, path: Path | str) -> None:
        """Write as safetensors (no pickle), atomically, with class count and provenance as metadata."""
        metadata = {"num_classes": str(self.num_classes), "provenance": json.dumps(self.provenance, default=str)}
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
            load_file(str(path)), int(metadata["num_classes"]), json.loads(metadata.get("provenance", "{}"))
        )
