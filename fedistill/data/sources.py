"""Finding dataset files on disk and turning them into ImageData.

Every failure becomes a DataError that names the file or dataset, so a user
sees one readable line instead of a numpy/gzip/pickle traceback.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedistill.data.catalog import DataError, DatasetInfo, ImageData, builtin_info, canonical_name

ENV_VAR = "FEDISTILL_DATA"
# Where Debian's dataset-* packages install (dataset-fashion-mnist puts its
# four IDX .gz files in /usr/share/datasets/fashion-mnist/).
DEBIAN_DIR = Path("/usr/share/datasets")
TEST_FRACTION = 0.25
SPLIT_SEED = 0

Split = Literal["train", "test"]

_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_BATCHES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


def user_cache_dir(name: str) -> Path:
    """Per-user download location, honouring XDG_CACHE_HOME like other Linux tools."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedistill" / canonical_name(name)


def dataset_info(name: str, npz_path: Path | None = None) -> DatasetInfo:
    """Metadata of a dataset; for "npz" it is derived from the user's file (its train split)."""
    if canonical_name(name) == "npz":
        if npz_path is None:
            raise DataError("dataset 'npz' needs the path of the .npz file")
        return load_dataset("npz", "train", path=npz_path).info
    return builtin_info(name)


def candidate_dirs(name: str, root: Path | None = None) -> list[Path]:
    """Directories searched for a dataset, most specific first.

    Order: `root` and root/<name>, $FEDISTILL_DATA and $FEDISTILL_DATA/<name>,
    the user cache, then the Debian package location.
    """
    canon = canonical_name(name)
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / canon]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env), Path(env) / canon]
    dirs += [user_cache_dir(canon), DEBIAN_DIR / canon]
    unique: list[Path] = []
    for d in dirs:
        d = d.expanduser()
        if d not in unique:
            unique.append(d)
    return unique


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train_idx, test_idx), both sorted and disjoint.

    Used where a dataset has no official split, so every client, server and
    evaluation run sees the same partition. Per class floor(f * n_c) go to test,
    then the leftover of round(f * N) goes to the classes with the largest
    remainders; a class always keeps at least one training image.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    exact = test_fraction * counts
    n_test = np.floor(exact).astype(np.int64)
    target = int(round(test_fraction * labels.shape[0]))
    order = np.argsort(-(exact - n_test), kind="stable")
    for i in order:
        if n_test.sum() >= target:
            break
        if n_test[i] + 1 < counts[i]:
            n_test[i] += 1
    test_parts = []
    for c, k in zip(classes, n_test, strict=True):
        members = np.flatnonzero(labels == c)
        test_parts.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, np.int64)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx.astype(np.int64)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 NCHW images in [0, 1] units.

    Chunked so a large user file does not need a float64 copy of itself; a
    constant channel gets std 1.0 so normalisation never divides by zero.
    """
    n, c = images.shape[:2]
    total = np.zeros(c, dtype=np.float64)
    total_sq = np.zeros(c, dtype=np.float64)
    for start in range(0, n, 4096):
        chunk = images[start : start + 4096].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = max(n * images.shape[2] * images.shape[3], 1)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ---------------------------------------------------------------- IDX (MNIST)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    """Whole file, gunzipped when it ends in .gz; gzip/IO errors become DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc or type(exc).__name__})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Parse an IDX ubyte file (MNIST format) after checking magic, dims and exact length."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated IDX file, expected at least 4 header bytes, got {len(data)}"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expect_magic:
        kind = "images" if expect_magic == _IDX_IMAGES_MAGIC else "labels"
        raise DataError(f"{path}: bad IDX magic {magic}, expected {expect_magic} for {kind}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header, expected {header} bytes, got {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise DataError(f"{path}: IDX dimensions {dims} contain a zero")
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}, expected {expected} bytes for dims {dims}, got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_idx(directory: Path, split: Split, info: DatasetInfo) -> ImageData:
    images_stem, labels_stem = _IDX_FILES[split]
    images_path = _idx_path(directory, images_stem)
    labels_path = _idx_path(directory, labels_stem)
    if images_path is None or labels_path is None:
        missing = images_stem if images_path is None else labels_stem
        raise DataError(f"{directory}: {info.name} {split} file {missing}[.gz] is missing")
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (info.height, info.width):
        raise DataError(
            f"{images_path}: expected images of {info.height}x{info.width}, got dims {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1-D labels, got dims {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images "
            f"but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.max() >= info.num_classes:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} out of range 0..{info.num_classes - 1}"
        )
    return ImageData(images[:, None, :, :], labels.astype(np.int64), info)


# ------------------------------------------------------------------- CIFAR-10


def _numpy_global(module: str, name: str) -> Any:
    """Resolve a numpy reconstruction helper under numpy 2 (numpy._core) or 1 (numpy.core)."""
    import importlib

    new = module.replace("numpy.core", "numpy._core")
    for mod in dict.fromkeys((new, new.replace("numpy._core", "numpy.core"))):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"numpy has no {module}.{name}")


_SAFE_BUILTINS = {"bytes", "bytearray", "list", "dict", "tuple", "set", "frozenset"}
_SAFE_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild containers, bytes and plain numpy arrays.

    CIFAR-10 ships as pickles, and pickle.load runs arbitrary code; a file
    from a cache or a mirror must not be able to do that.
    """

    def __init__(self, file: io.BufferedIOBase, origin: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        if (module, name) in _SAFE_NUMPY:
            return _numpy_global(module, name)
        raise DataError(f"{self.origin}: refusing to unpickle {module}.{name} (not plain data)")


def safe_unpickle(path: Path) -> Any:
    """Load a data-only pickle with the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:
        raise DataError(f"{path}: not a valid CIFAR pickle ({type(exc).__name__}: {exc})") from None


def _extract_cifar(archive: Path) -> Path:
    """Unpack the official archive next to itself, atomically, data files only."""
    target = archive.parent / CIFAR_DIR
    try:
        staging = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=archive.parent))
    except OSError as exc:
        raise DataError(
            f"{archive}: cannot extract into {archive.parent} ({exc.strerror or exc})"
        ) from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            wanted = set(_CIFAR_BATCHES["train"] + _CIFAR_BATCHES["test"] + ("batches.meta",))
            members = [
                m
                for m in tar.getmembers()
                if m.isfile()
                and m.name.startswith(f"{CIFAR_DIR}/")
                and m.name.split("/", 1)[1] in wanted
            ]
            if not members:
                raise DataError(f"{archive}: no {CIFAR_DIR}/ batches inside")
            tar.extractall(staging, members=members, filter="data")
        try:
            os.replace(staging / CIFAR_DIR, target)
        except OSError:
            if not target.is_dir():
                raise
    except DataError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{archive}: corrupt archive ({exc})") from None
    except OSError as exc:
        raise DataError(f"{archive}: cannot extract ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _cifar_batches_dir(directory: Path) -> Path | None:
    """The batches folder for `directory`, extracting the archive there if that is all it has."""
    if (directory / CIFAR_DIR).is_dir():
        return directory / CIFAR_DIR
    if directory.name == CIFAR_DIR or (directory / "test_batch").is_file():
        return directory
    if (directory / CIFAR_ARCHIVE).is_file():
        return _extract_cifar(directory / CIFAR_ARCHIVE)
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: CIFAR-10 batch file is missing")
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing key {'data' if data is None else 'labels'}")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072), got {dtype} {shape}")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: labels are not integers") from None
    if labels_arr.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels_arr.size} labels")
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise DataError(f"{path}: labels out of range 0..9")
    return data.reshape(-1, 3, 32, 32), labels_arr


def _load_cifar(batches: Path, split: Split, info: DatasetInfo) -> ImageData:
    parts = [_read_cifar_batch(batches / name) for name in _CIFAR_BATCHES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageData(images, labels, info)


# --------------------------------------------------------------------- digits


def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 (0..16 scaled by 255/16, half to even)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return images, bunch.target.astype(np.int64)


def _load_digits(split: Split) -> ImageData:
    images, labels = _digits_all()
    train_idx, test_idx = stratified_split(labels)
    idx = train_idx if split == "train" else test_idx
    return ImageData(images[idx], labels[idx], builtin_info("digits"))


# ------------------------------------------------------------------------ npz


def _npz_images(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """Bring a user image array to uint8 NCHW (NHW, NHWC and NCHW accepted)."""
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim == 4:
        if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: {key!r} must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {arr.shape}"
        )
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise DataError(f"{path}: {key!r} must be uint8 pixels 0..255, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{path}: {key!r} values outside 0..255")
        arr = arr.astype(np.uint8)
    if arr.shape[0] == 0:
        raise DataError(f"{path}: {key!r} holds no images")
    return np.ascontiguousarray(arr)


def _npz_labels(path: Path, key: str, arr: np.ndarray, n: int) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: {key!r} must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    if arr.shape != (n,):
        raise DataError(
            f"{path}: {key!r} has shape {arr.shape}, expected ({n},) to match the images"
        )
    if arr.size and arr.min() < 0:
        raise DataError(f"{path}: {key!r} contains negative labels")
    return arr.astype(np.int64)


def load_npz(path: Path | str) -> tuple[ImageData, ImageData]:
    """(train, test) from a user .npz; mean/std come from the user's own train split.

    Reads with allow_pickle=False so a hostile file cannot run code. Without
    test_images/test_labels the same stratified 25% split as digits is used.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            for key in ("images", "labels"):
                if key not in keys:
                    raise DataError(
                        f"{path}: missing key {key!r} (has: {', '.join(sorted(keys)) or 'nothing'})"
                    )
            if ("test_images" in keys) != ("test_labels" in keys):
                missing = "test_labels" if "test_images" in keys else "test_images"
                raise DataError(
                    f"{path}: missing key {missing!r} (test_images and test_labels go together)"
                )
            arrays = {
                k: npz[k]
                for k in ("images", "labels", "test_images", "test_labels", "class_names")
                if k in keys
            }
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None

    images = _npz_images(path, "images", arrays["images"])
    labels = _npz_labels(path, "labels", arrays["labels"], images.shape[0])
    if "test_images" in arrays:
        test_images = _npz_images(path, "test_images", arrays["test_images"])
        test_labels = _npz_labels(path, "test_labels", arrays["test_labels"], test_images.shape[0])
        if test_images.shape[1:] != images.shape[1:]:
            raise DataError(
                f"{path}: test_images are {test_images.shape[1:]} but images are {images.shape[1:]}"
            )
        train_images, train_labels = images, labels
    else:
        train_idx, test_idx = stratified_split(labels)
        train_images, train_labels = images[train_idx], labels[train_idx]
        test_images, test_labels = images[test_idx], labels[test_idx]

    num_classes = int(max(labels.max(), test_labels.max() if test_labels.size else 0)) + 1
    if "class_names" in arrays:
        names = tuple(str(s) for s in np.asarray(arrays["class_names"]).reshape(-1))
        if len(names) < num_classes:
            raise DataError(
                f"{path}: 'class_names' has {len(names)} names "
                f"but labels go up to {num_classes - 1}"
            )
        num_classes = len(names)
    else:
        names = tuple(str(i) for i in range(num_classes))
    mean, std = channel_stats(train_images)
    c, h, w = images.shape[1:]
    info = DatasetInfo("npz", num_classes, c, h, w, mean, std, names)
    return ImageData(train_images, train_labels, info), ImageData(test_images, test_labels, info)


# ---------------------------------------------------------------- entry point


def _has_split(canon: str, directory: Path, split: Split) -> bool:
    if not directory.is_dir():
        return False
    if canon in ("fashion-mnist", "mnist"):
        return _idx_path(directory, _IDX_FILES[split][0]) is not None
    first = _CIFAR_BATCHES[split][0]
    return (
        (directory / CIFAR_DIR / first).is_file()
        or (directory / first).is_file()
        or (directory / CIFAR_ARCHIVE).is_file()
    )


def _not_found(canon: str, split: Split, searched: list[Path]) -> DataError:
    places = ", ".join(str(d) for d in searched)
    hint = f"run `fedistill data fetch {canon}`"
    if canon == "fashion-mnist":
        hint += " or `apt-get install dataset-fashion-mnist`"
    return DataError(f"dataset {canon!r} ({split}) not found; searched: {places}; {hint}")


def load_dataset(
    name: str,
    split: Split,
    root: Path | str | None = None,
    path: Path | str | None = None,
) -> ImageData:
    """Load one split as uint8 NCHW ImageData.

    `path` is the .npz file for "npz"; for the other datasets it names the
    exact directory to read (no search). Otherwise `root`, $FEDISTILL_DATA,
    the user cache and /usr/share/datasets are searched in that order.
    """
    canon = canonical_name(name)
    if split not in ("train", "test"):
        raise DataError(f"dataset {canon!r}: split must be 'train' or 'test', got {split!r}")
    if canon == "npz":
        if path is None:
            raise DataError("dataset 'npz' needs path= pointing at the .npz file")
        train, test = load_npz(path)
        return train if split == "train" else test
    if canon == "digits":
        return _load_digits(split)

    info = builtin_info(canon)
    if path is not None:
        searched = [Path(path).expanduser()]
    else:
        searched = candidate_dirs(canon, Path(root).expanduser() if root is not None else None)
    for directory in searched:
        if not _has_split(canon, directory, split):
            continue
        if canon == "cifar10":
            batches = _cifar_batches_dir(directory)
            if batches is not None:
                return _load_cifar(batches, split, info)
            continue
        return _load_idx(directory, split, info)
    raise _not_found(canon, split, searched)
