"""Checks on a client's reply before the server trusts any of it.

A reply is a mapping of numpy arrays (``SyntheticSet.to_arrays`` on the client)
plus the metrics the client declares about it. Nothing in it is trusted: a
faulty or malicious client can send any dtype, shape, size or value. Every
check on structure and size runs before anything is converted or allocated, so
an oversized or oddly typed reply costs the server no memory; value checks run
next, on arrays already known to be small and of the right dtype. The set that
comes back owns copies of the arrays, so the sender (or a buffer it shares)
cannot change it afterwards.

Arrays arrive as Flower ``Array`` objects: bytes of a ``.npy`` file. Flower's
own ``Array.numpy()`` lets ``np.load`` allocate whatever shape the embedded
header declares before reading any data, so a few hundred bytes could ask for
terabytes; ``array_to_numpy`` parses the header first and returns a view of
the received bytes. ``check_client_metrics`` covers the metrics the server
reads, ``check_client_state`` the small records a client asks the server to
keep for it across restarts.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ConfigRecord, MetricRecord

from fedistill.errors import InvalidReply
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

NPY_HEADER_LIMIT = 10_000
"""Longest ``.npy`` header read (numpy's own default limit for untrusted files)."""

ARRAY_KINDS = "biuf"
"""dtype kinds an ``Array`` may hold: booleans, integers, floats. No objects, strings, records or complex."""

CLIENT_STATE_LIMIT_BYTES = 64 * 2**10
"""Largest record a client may ask the server to keep for it (``state.*`` records); ledgers and counters, not data."""

CLIENT_STATE_MAX_RECORDS = 8


def client_error(error: Any) -> str:
    """A node's error reply as one bounded log line: the reason is the node's text, so newlines are folded."""
    reason = " ".join(str(error.reason).split())[:300]
    return f"client error {error.code}: {reason or 'no reason given'}"


def array_to_numpy(array: Any, key: str, max_bytes: int) -> np.ndarray:
    """The numpy array inside a Flower ``Array``, read without trusting its header.

    The ``.npy`` header is parsed with numpy's own (size-limited, literal-only)
    parser; the dtype must be a plain number type in native or little-endian
    order, the declared size must fit ``max_bytes`` and equal the bytes that
    follow the header, and the declared ``Array.dtype``/``shape`` must agree
    with the header. The result is a read-only view of the received bytes, so
    nothing is allocated for it.
    """
    if not isinstance(array, Array):
        raise InvalidReply(f"{key}: expected a Flower Array, got {type(array).__name__}")
    if array.stype != "numpy.ndarray":
        raise InvalidReply(f"{key}: serialisation {array.stype!r} is not numpy.ndarray")
    data = array.data
    if not isinstance(data, bytes):
        raise InvalidReply(f"{key}: array data is {type(data).__name__}, not bytes")
    if len(data) > max_bytes + NPY_HEADER_LIMIT:
        raise InvalidReply(f"{key}: {len(data)} bytes exceeds the limit of {max_bytes}")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=NPY_HEADER_LIMIT)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=NPY_HEADER_LIMIT)
        else:
            raise InvalidReply(f"{key}: .npy format version {version} is not accepted")
    except InvalidReply:
        raise
    except Exception as error:  # numpy's header parser on hostile bytes raises ValueError, SyntaxError, TokenError...
        raise InvalidReply(f"{key}: not a readable .npy array ({type(error).__name__})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in ARRAY_KINDS:
        raise InvalidReply(f"{key}: dtype {dtype.str} is not a plain number type")
    if dtype.byteorder == ">":
        raise InvalidReply(f"{key}: big-endian dtype {dtype.str} is not accepted")
    if not all(isinstance(side, int) and side >= 0 for side in shape):
        raise InvalidReply(f"{key}: header shape {shape!r} is not a tuple of sizes")
    count = math.prod(shape)
    size = count * dtype.itemsize
    if size > max_bytes:
        raise InvalidReply(f"{key}: declares {size} bytes, over the limit of {max_bytes}")
    offset = stream.tell()
    if len(data) - offset != size:
        raise InvalidReply(f"{key}: header declares {size} bytes of data but {len(data) - offset} follow")
    if tuple(array.shape) != tuple(shape) or array.dtype != str(dtype):
        raise InvalidReply(f"{key}: holds {dtype}{list(shape)} but the Array declares {array.dtype}{list(array.shape)}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")


def check_client_metrics(metrics: Mapping[str, Any], num_partitions: int) -> dict[str, Any]:
    """The reply's metrics, with every key the server reads checked; InvalidReply names the first bad one.

    ``partition-id`` is required: it keys the node's sets and kept state
    (node ids change when a node restarts or a run resumes). ``seconds``
    must be a finite non-negative number, ``num-examples`` a non-negative
    integer, ``source-counts`` a list of integers, ``continued`` 0 or 1 and
    ``init-rows`` a list of non-negative integers where present. Other keys pass through
    untouched (Flower has already restricted them to numbers and lists of
    numbers).
    """
    checked = dict(metrics)
    partition = checked.get("partition-id")
    if not _is_integer(partition) or not 0 <= partition < num_partitions:
        raise InvalidReply(f"partition-id: must be an integer in [0, {num_partitions}), got {partition!r}")
    checked["partition-id"] = int(partition)
    for key in ("seconds",):
        if key in checked:
            value = checked[key]
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise InvalidReply(f"{key}: must be a finite number >= 0, got {value!r}")
            checked[key] = float(value)
    if "num-examples" in checked and (not _is_integer(checked["num-examples"]) or checked["num-examples"] < 0):
        raise InvalidReply(f"num-examples: must be an integer >= 0, got {checked['num-examples']!r}")
    if "source-counts" in checked:
        counts = checked["source-counts"]
        if not isinstance(counts, list) or not all(_is_integer(count) for count in counts):
            raise InvalidReply(f"source-counts: must be a list of integers, got {counts!r}")
        checked["source-counts"] = [int(count) for count in counts]
    if "continued" in checked and checked["continued"] not in (0, 1):
        raise InvalidReply(f"continued: must be 0 or 1, got {checked['continued']!r}")
    if "init-rows" in checked:
        rows = checked["init-rows"]
        if not isinstance(rows, list) or not all(_is_integer(row) and row >= 0 for row in rows):
            raise InvalidReply("init-rows: must be a list of integers >= 0")
        checked["init-rows"] = [int(row) for row in rows]
    return checked


def check_client_state(name: str, record: Any) -> dict[str, Any]:
    """A ``state.*`` record as JSON-ready ``{"kind", "values"}``; only small config/metric records of plain values."""
    if isinstance(record, ConfigRecord):
        kind = "config"
    elif isinstance(record, MetricRecord):
        kind = "metric"
    else:
        raise InvalidReply(f"{name}: client state must be a config or metric record, got {type(record).__name__}")
    size = record.count_bytes()
    if size > CLIENT_STATE_LIMIT_BYTES:
        raise InvalidReply(f"{name}: {size} bytes of client state exceeds the limit of {CLIENT_STATE_LIMIT_BYTES}")
    values: dict[str, Any] = {}
    for key, value in record.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str | bool | int | float) for item in items):
            raise InvalidReply(f"{name}.{key}: client state holds only strings, numbers and lists of them")
        values[str(key)] = list(value) if isinstance(value, list) else value
    return {"kind": kind, "values": values}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_integer(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value) and float(value).is_integer()


@dataclass(frozen=True)
class ReplyLimits:
    """What the server accepts from one client in one round.

    ``max_images`` and ``max_bytes`` bound what a client can make the server
    hold and train on; they come from the run's config (e.g. ``ipc *
    num_classes`` images), not from the client. ``max_per_class`` (the IPC),
    where set, bounds each class, so one class cannot take the whole budget.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    max_images: int
    max_bytes: int
    max_per_class: int | None = None
    factor: int = 1

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"ReplyLimits: num_classes must be >= 1, got {self.num_classes}")
        if len(self.image_shape) != 3 or any(int(d) < 1 for d in self.image_shape):
            raise ValueError(f"ReplyLimits: image_shape must be three positive sizes (C, H, W), got {self.image_shape}")
        if self.max_images < 0 or self.max_bytes < 0:
            raise ValueError("ReplyLimits: max_images and max_bytes must be >= 0")
        if self.max_per_class is not None and self.max_per_class < 0:
            raise ValueError("ReplyLimits: max_per_class must be >= 0")
        if self.factor < 1 or any(int(side) % self.factor for side in self.image_shape[1:]):
            raise ValueError(f"ReplyLimits: factor {self.factor} must be >= 1 and divide the image size")


def validate_set_arrays(
    arrays: Mapping[str, np.ndarray], limits: ReplyLimits, declared: Mapping[str, Any] | None = None
) -> SyntheticSet:
    """Check an untrusted reply and return it as a ``SyntheticSet`` the sender cannot alter.

    Parameters
    ----------
    arrays
        ``images`` (float32, ``(n, *image_shape)``), ``labels`` (int64, ``(n,)``),
        ``source_counts`` (int64, ``(num_classes,)``) and optionally
        ``soft_labels`` (float32, ``(n * factor**2, num_classes)``: one row per
        decoded image of a factorised set). Only plain ``np.ndarray``
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
        _check_values(arrays, limits.num_classes, limits.max_per_class)
    if declared is not None:
        _check_declared(declared, n, total)
    soft = arrays.get("soft_labels")
    return SyntheticSet(
        images=torch.from_numpy(np.array(arrays["images"], copy=True)),
        labels=torch.from_numpy(np.array(arrays["labels"], copy=True)),
        num_classes=limits.num_classes,
        source_counts=np.array(arrays["source_counts"], copy=True),
        soft_labels=None if soft is None else torch.from_numpy(np.array(soft, copy=True)),
        factor=limits.factor,
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
        "soft_labels": (n * limits.factor**2, limits.num_classes),
    }
    for key, shape in expected.items():
        if key in arrays and tuple(arrays[key].shape) != shape:
            raise InvalidReply(f"{key}: expected shape {shape}, got {arrays[key].shape}")
    return n


def _check_values(arrays: Mapping[str, np.ndarray], num_classes: int, max_per_class: int | None) -> None:
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
    if max_per_class is not None and (per_class > max_per_class).any():
        c = int(np.argmax(per_class))
        raise InvalidReply(f"labels: class {c} has {int(per_class[c])} images, more than the {max_per_class} per class allowed")
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
