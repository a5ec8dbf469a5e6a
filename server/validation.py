"""Checks on a client's reply before the server trusts any of it.

A reply is a mapping of numpy arrays (``SyntheticSet.to_arrays`` on the client)
plus the metrics the client declares about it. Nothing in it is trusted: a
faulty or malicious client can send any dtype, shape, size or value. Every
check on structure and size runs before anything is converted or allocated, so
an oversized or oddly typed reply costs the server no memory; value checks run
next, on arrays already known to be small and of the right dtype. The set that
comes back owns copies of the arrays, so the sender (or a buffer it shares)
cannot change it afterwards.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedistill.synthetic import SyntheticSet

REQUIRED_KEYS = ("images", "labels", "source_counts")
OPTIONAL_KEYS = ("soft_labels",)
DTYPES = {
    "images": np.dtype(np.float32),
    "labels": np.dtype(np.int64),
    "source_counts": np.dtype(np.int64),
    "soft_labels": np.dtype(np.float32),
}

IMAGE_ABS_LIMIT = 1e4
"""Largest accepted ``|pixel|``.

Images live in the dataset's normalised space, where a real pixel is within
about 3 of zero; distillation drifts a little beyond that, never by orders of
magnitude. Values near the float32 maximum, while finite, overflow to inf in
squared distances, batch statistics and losses and would poison the global
model for every client. At 1e4 a squared pixel is 1e8 and a sum over a whole
32x32x3 image stays far below the float32 limit.
"""

SOURCE_COUNT_LIMIT = 2**40
"""Largest accepted per-class source count: no dataset is near it, and sums of
counts over many clients cannot overflow int64."""

SOFT_LABEL_TOLERANCE = 1e-3
"""How far a soft-label row may sum from 1 (float32 softmax rounding is ~1e-6)."""

DECLARED_METRICS = ("num-images", "bytes")
"""Declared metrics that are checked against the arrays; others are not about the set."""


class InvalidReply(ValueError):
    """Why a reply was rejected, one line, starting with the offending key."""


@dataclass(frozen=True)
class ReplyLimits:
    """What the server accepts from one client in one round.

    ``max_images`` and ``max_bytes`` bound what a client can make the server
    hold and train on; they come from the run's config (e.g. ``ipc *
    num_classes`` images), not from the client.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    max_images: int
    max_bytes: int

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"ReplyLimits: num_classes must be >= 1, got {self.num_classes}")
        if len(self.image_shape) != 3 or any(int(d) < 1 for d in self.image_shape):
            raise ValueError(f"ReplyLimits: image_shape must be three positive sizes (C, H, W), got {self.image_shape}")
        if self.max_images < 0 or self.max_bytes < 0:
            raise ValueError("ReplyLimits: max_images and max_bytes must be >= 0")


def validate_set_arrays(
    arrays: Mapping[str, np.ndarray], limits: ReplyLimits, declared: Mapping[str, Any] | None = None
) -> SyntheticSet:
    """Check an untrusted reply and return it as a ``SyntheticSet`` the sender cannot alter.

    Parameters
    ----------
    arrays
        ``images`` (float32, ``(n, *image_shape)``), ``labels`` (int64, ``(n,)``),
        ``source_counts`` (int64, ``(num_classes,)``) and optionally
        ``soft_labels`` (float32, ``(n, num_classes)``). Only plain ``np.ndarray``
        values are accepted: subclasses such as masked arrays can hide values
        from the checks.
    limits
        The server's bounds for this round.
    declared
        The client's metrics; ``num-images`` and ``bytes``, where present, must
        match the arrays, so accounting built on them cannot be gamed.

    Raises
    ------
    InvalidReply
        On the first failed check, naming the key and the problem.
    """
    if not isinstance(arrays, Mapping):
        raise InvalidReply(f"reply: expected a mapping of named arrays, got {type(arrays).__name__}")
    _check_keys(arrays)
    for key, value in arrays.items():
        _check_dtype(key, value)
    n = _check_shapes(arrays, limits)
    total = sum(int(value.nbytes) for value in arrays.values())
    if total > limits.max_bytes:
        raise InvalidReply(f"reply: {total} bytes exceeds the limit of {limits.max_bytes}")
    if n > limits.max_images:
        raise InvalidReply(f"images: {n} images exceeds the limit of {limits.max_images}")
    with np.errstate(all="ignore"):
        _check_values(arrays, limits.num_classes)
    if declared is not None:
        _check_declared(declared, n, total)
    soft = arrays.get("soft_labels")
    return SyntheticSet(
        images=torch.from_numpy(np.array(arrays["images"], copy=True)),
        labels=torch.from_numpy(np.array(arrays["labels"], copy=True)),
        num_classes=limits.num_classes,
        source_counts=np.array(arrays["source_counts"], copy=True),
        soft_labels=None if soft is None else torch.from_numpy(np.array(soft, copy=True)),
    )


def _check_keys(arrays: Mapping[Any, Any]) -> None:
    keys = list(arrays)
    for key in REQUIRED_KEYS:
        if key not in keys:
            raise InvalidReply(f"{key}: missing from the reply")
    unknown = [key for key in keys if key not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        allowed = ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS)
        raise InvalidReply(f"{unknown[0]!r}: unknown key in the reply; allowed: {allowed}")


def _check_dtype(key: str, value: Any) -> None:
    if type(value) is not np.ndarray:
        raise InvalidReply(f"{key}: expected a plain numpy array, got {type(value).__name__}")
    if value.dtype != DTYPES[key]:
        raise InvalidReply(f"{key}: expected dtype {DTYPES[key]}, got {value.dtype.str}")


def _check_shapes(arrays: Mapping[str, np.ndarray], limits: ReplyLimits) -> int:
    """Check every array's shape against the limits and each other; return the image count."""
    images = arrays["images"]
    expected_image = tuple(int(d) for d in limits.image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected_image:
        raise InvalidReply(f"images: expected shape (n, {', '.join(map(str, expected_image))}), got {images.shape}")
    n = int(images.shape[0])
    expected = {
        "labels": (n,),
        "source_counts": (limits.num_classes,),
        "soft_labels": (n, limits.num_classes),
    }
    for key, shape in expected.items():
        if key in arrays and tuple(arrays[key].shape) != shape:
            raise InvalidReply(f"{key}: expected shape {shape}, got {arrays[key].shape}")
    return n


def _check_values(arrays: Mapping[str, np.ndarray], num_classes: int) -> None:
    images, labels, counts = arrays["images"], arrays["labels"], arrays["source_counts"]
    if not np.isfinite(images).all():
        raise InvalidReply("images: contains NaN or infinite values")
    if (np.abs(images) > IMAGE_ABS_LIMIT).any():
        raise InvalidReply(f"images: values beyond +-{IMAGE_ABS_LIMIT:g} (normalised images stay near zero)")
    if ((labels < 0) | (labels >= num_classes)).any():
        raise InvalidReply(f"labels: values outside [0, {num_classes})")
    if (counts < 0).any():
        raise InvalidReply("source_counts: negative count")
    if (counts > SOURCE_COUNT_LIMIT).any():
        raise InvalidReply(f"source_counts: count above {SOURCE_COUNT_LIMIT}")
    per_class = np.bincount(labels, minlength=num_classes)
    without_data = np.flatnonzero((per_class > 0) & (counts == 0))
    if without_data.size:
        raise InvalidReply(f"source_counts: class {int(without_data[0])} has images but no source data")
    excess = np.flatnonzero(per_class > counts)
    if excess.size:
        c = int(excess[0])
        raise InvalidReply(f"source_counts: class {c} has {int(per_class[c])} images from only {int(counts[c])} real")
    soft = arrays.get("soft_labels")
    if soft is not None:
        if not np.isfinite(soft).all():
            raise InvalidReply("soft_labels: contains NaN or infinite values")
        if (soft < 0).any():
            raise InvalidReply("soft_labels: negative probability")
        if (np.abs(soft.sum(axis=1, dtype=np.float64) - 1.0) > SOFT_LABEL_TOLERANCE).any():
            raise InvalidReply(f"soft_labels: a row does not sum to 1 (tolerance {SOFT_LABEL_TOLERANCE:g})")


def _check_declared(declared: Mapping[str, Any], n: int, total: int) -> None:
    if not isinstance(declared, Mapping):
        raise InvalidReply(f"declared metrics: expected a mapping, got {type(declared).__name__}")
    actual = {"num-images": n, "bytes": total}
    for key in DECLARED_METRICS:
        if key not in declared:
            continue
        value = declared[key]
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise InvalidReply(f"{key}: declared value must be a number, got {type(value).__name__}")
        if value != actual[key]:
            raise InvalidReply(f"{key}: declared {value!r} but the arrays hold {actual[key]}")
