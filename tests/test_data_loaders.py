"""Loading, validation and locating of datasets (no network)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedistill.data import (
    DATASETS,
    DataError,
    DatasetInfo,
    ImageData,
    candidate_dirs,
    catalog,
    dataset_info,
    denormalize,
    load_dataset,
    normalize,
    sources,
)
from fedistill.data.fetch import PAYLOAD_SHA256

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's cache and $FEDISTILL_DATA out of every test."""
    monkeypatch.delenv("FEDISTILL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# ------------------------------------------------------------------ helpers


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_split(
    directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for stem, arr, magic in (
        (f"{prefix}-images-idx3-ubyte", images, 2051),
        (f"{prefix}-labels-idx1-ubyte", labels, 2049),
    ):
        data = idx_bytes(arr, magic)
        path = directory / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        paths.append(path)
    return paths[0], paths[1]


def tiny_mnist(n: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


# --------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist() -> tuple[ImageData, ImageData]:
    assert DEBIAN_FMNIST.is_dir(), (
        f"{DEBIAN_FMNIST} is missing: run `apt-get install dataset-fashion-mnist`"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEDISTILL_DATA", raising=False)
        mp.setenv("XDG_CACHE_HOME", "/nonexistent-fedistill-cache")
        return load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")


def test_fashion_mnist_from_debian(fmnist: tuple[ImageData, ImageData]) -> None:
    train, test = fmnist
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert train.info == dataset_info("fashion-mnist")
    x = train.subset(np.arange(0, 60000, 20)).normalized()
    assert x.dtype == torch.float32 and x.shape == (3000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05


def test_debian_payload_is_the_official_data() -> None:
    for stem, digest in PAYLOAD_SHA256["fashion-mnist"].items():
        with gzip.open(DEBIAN_FMNIST / f"{stem}.gz", "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, stem


# --------------------------------------------------------------- catalog


def test_catalog_constants() -> None:
    assert DATASETS == ("fashion-mnist", "mnist", "cifar10", "digits", "npz")
    assert dataset_info("mnist").mean == (0.1307,) and dataset_info("mnist").std == (0.3081,)
    assert dataset_info("fashion-mnist").mean == (0.2861,)
    assert dataset_info("fashion-mnist").std == (0.3530,)
    cifar = dataset_info("cifar10")
    assert cifar.shape == (3, 32, 32)
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2023, 0.1994, 0.2010)
    assert dataset_info("fashion-mnist").class_names[0] == "T-shirt/top"
    assert dataset_info("fashion-mnist").class_names[9] == "Ankle boot"
    for name in ("fashion-mnist", "mnist", "cifar10", "digits"):
        assert len(dataset_info(name).class_names) == 10
    assert dataset_info("FASHION_MNIST").name == "fashion-mnist"
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        dataset_info("imagenet")
    with pytest.raises(DataError, match="npz"):
        dataset_info("npz")


def test_normalize_roundtrip() -> None:
    info = dataset_info("cifar10")
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = normalize(imgs, info)
    expected = (imgs[:, 1].float() / 255 - 0.4822) / 0.1994
    assert torch.allclose(x[:, 1], expected, atol=1e-6)
    assert torch.allclose(denormalize(x, info), imgs.float() / 255, atol=1e-6)
    assert torch.allclose(normalize(imgs[0], info), x[0])
    assert torch.allclose(normalize(imgs.float() / 255, info), x, atol=1e-6)


def test_image_data_helpers() -> None:
    info = dataset_info("mnist")
    images, labels = tiny_mnist(10)
    data = ImageData(images[:, None], labels, info)
    assert len(data) == 10 and data.labels.dtype == np.int64
    sub = data.subset([1, 3])
    assert len(sub) == 2 and sub.labels.tolist() == [1, 3]
    assert len(data.subset(data.labels < 4)) == 4
    assert data.class_counts().tolist() == [1] * 10
    with pytest.raises(DataError, match="mnist"):
        ImageData(images[:, None].astype(np.float32), labels, info)


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
def test_synthetic_idx_loads(tmp_path: Path, gz: bool) -> None:
    images, labels = tiny_mnist(20)
    write_idx_split(tmp_path, "train", images, labels, gz)
    data = load_dataset("mnist", "train", root=tmp_path)
    assert data.images.shape == (20, 1, 28, 28)
    assert np.array_equal(data.images[:, 0], images)
    assert np.array_equal(data.labels, labels.astype(np.int64))
    assert data.info.name == "mnist"


def test_idx_truncated(tmp_path: Path) -> None:
    images, labels = tiny_mnist(5)
    img_path, _ = write_idx_split(tmp_path, "test", images, labels, gz=False)
    img_path.write_bytes(img_path.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", root=tmp_path)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte" in msg and "truncated" in msg
    assert str(16 + 5 * 784) in msg and str(16 + 5 * 784 - 100) in msg


def test_idx_bad_magic(tmp_path: Path) -> None:
    images, labels = tiny_mnist(5)
    _, lbl_path = write_idx_split(tmp_path, "train", images, labels, gz=True)
    lbl_path.write_bytes(gzip.compress(idx_bytes(labels, 2051)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*magic 2051"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    images, labels = tiny_mnist(6)
    write_idx_split(tmp_path, "train", images, labels[:5], gz=False)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "train", root=tmp_path)
    assert "train-images-idx3-ubyte" in str(err.value)
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    images, labels = tiny_mnist(5)
    labels[2] = 11
    write_idx_split(tmp_path, "train", images, labels, gz=False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*label 11"):
        load_dataset("mnist", "train", root=tmp_path)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    images, labels = tiny_mnist(5)
    img_path, _ = write_idx_split(tmp_path, "train", images, labels, gz=True)
    blob = bytearray(img_path.read_bytes())
    img_path.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", "train", root=tmp_path)
    blob[20:40] = b"\xff" * 20
    img_path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", "train", root=tmp_path)
    img_path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        load_dataset("mnist", "train", root=tmp_path)


def test_idx_missing_labels_file(tmp_path: Path) -> None:
    images, labels = tiny_mnist(5)
    _, lbl = write_idx_split(tmp_path, "train", images, labels, gz=False)
    lbl.unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", "train", root=tmp_path)


# ------------------------------------------------------------------ locate


def test_locate_order_root_beats_cache_beats_debian(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = tmp_path / "debian"
    cache_home = tmp_path / "xdg"
    root = tmp_path / "root"
    env = tmp_path / "env"
    monkeypatch.setattr(sources, "DEBIAN_DIR", debian)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setenv("FEDISTILL_DATA", str(env))
    for i, d in enumerate(
        [debian / "mnist", cache_home / "fedistill" / "mnist", env / "mnist", root]
    ):
        images, labels = tiny_mnist(3 + i, seed=i)
        write_idx_split(d, "test", images, labels, gz=bool(i % 2))

    assert candidate_dirs("mnist", root) == [
        root,
        root / "mnist",
        env,
        env / "mnist",
        cache_home / "fedistill" / "mnist",
        debian / "mnist",
    ]
    assert len(load_dataset("mnist", "test", root=root)) == 6
    assert len(load_dataset("mnist", "test")) == 5
    monkeypatch.delenv("FEDISTILL_DATA")
    assert len(load_dataset("mnist", "test")) == 4
    for f in (cache_home / "fedistill" / "mnist").iterdir():
        f.unlink()
    assert len(load_dataset("mnist", "test")) == 3
    assert len(load_dataset("mnist", "test", path=root)) == 6


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path / "r")
    msg = str(err.value)
    assert str(tmp_path / "r") in msg and str(tmp_path / "debian" / "fashion-mnist") in msg
    assert "fedistill data fetch fashion-mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", root=tmp_path / "r")
    assert "fedistill data fetch cifar10" in str(err.value) and "apt-get" not in str(err.value)
    with pytest.raises(DataError, match="split"):
        load_dataset("mnist", "valid")  # type: ignore[arg-type]


# ------------------------------------------------------------------ CIFAR


def write_cifar_batches(
    directory: Path, n: int = 4, protocol: int = 2
) -> dict[str, tuple[np.ndarray, list[int]]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": b"x",
            b"labels": labels,
            b"data": data,
            b"filenames": [b"a.png"] * n,
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_load(tmp_path: Path, protocol: int) -> None:
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    data, labels = written["data_batch_2"]
    assert np.array_equal(train.images[4:8], data.reshape(4, 3, 32, 32))
    assert train.labels[4:8].tolist() == labels
    assert test.info == dataset_info("cifar10")


def test_cifar_archive_extracted_lazily(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    written = write_cifar_batches(staging / "cifar-10-batches-py")
    store = tmp_path / "store"
    store.mkdir()
    with tarfile.open(store / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    test = load_dataset("cifar10", "test", root=store)
    assert (store / "cifar-10-batches-py" / "test_batch").is_file()
    assert np.array_equal(test.images.reshape(4, -1), written["test_batch"][0])
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []


def test_cifar_bad_shape(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(d)
    (d / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)
    )
    with pytest.raises(DataError, match=r"test_batch.*\(N, 3072\)"):
        load_dataset("cifar10", "test", root=tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", "train", root=tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(d)
    marker = tmp_path / "pwned"
    (d / "test_batch").write_bytes(
        pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2)
    )
    with pytest.raises(DataError, match=r"test_batch.*refusing.*system"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_pickle_garbage(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(d)
    (d / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)


# ------------------------------------------------------------------ digits


def test_digits_split_and_constants() -> None:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert len(test) == round(0.25 * 1797)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert (train.class_counts() > 0).all() and (test.class_counts() > 0).all()
    train_idx, test_idx = sources.stratified_split(sources._digits_all()[1])
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.union1d(train_idx, test_idx).size == 1797
    again = load_dataset("digits", "test")
    assert np.array_equal(again.images, test.images)
    x = train.images.astype(np.float64) / 255.0
    assert abs(x.mean() - catalog.DIGITS_MEAN) < 1e-3
    assert abs(x.std() - catalog.DIGITS_STD) < 1e-3
    assert abs(train.normalized().mean().item()) < 1e-3


def test_stratified_split_properties() -> None:
    labels = np.repeat(np.arange(3), [10, 7, 1])
    train, test = sources.stratified_split(labels)
    assert len(test) == round(0.25 * 18)
    assert 2 in labels[train]
    assert np.intersect1d(train, test).size == 0


# ------------------------------------------------------------------ npz


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((40, 6, 5), (1, 6, 5)),
        ((40, 6, 5, 3), (3, 6, 5)),
        ((40, 3, 6, 5), (3, 6, 5)),
        ((40, 6, 5, 1), (1, 6, 5)),
    ],
)
def test_npz_layouts(
    tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = np.arange(40) % 4
    path = _npz(tmp_path / "d.npz", images=images, labels=labels)
    train = load_dataset("npz", "train", path=path)
    test = load_dataset("npz", "test", path=path)
    assert train.images.shape == (30, *expected) and test.images.shape == (10, *expected)
    assert train.info.num_classes == 4 and train.info.shape == expected
    assert train.info.class_names == ("0", "1", "2", "3")
    flat = train.images.astype(np.float64) / 255
    assert np.allclose(train.info.mean, flat.mean(axis=(0, 2, 3)))
    assert np.allclose(train.info.std, flat.std(axis=(0, 2, 3)))
    assert dataset_info("npz", path) == train.info
    if len(shape) == 4 and shape[-1] == 3:
        assert np.array_equal(
            np.concatenate([train.images, test.images]).sum(), images.astype(np.int64).sum()
        )


def test_npz_with_test_arrays(tmp_path: Path) -> None:
    images = np.zeros((8, 4, 4), np.uint8)
    images[:, 0, 0] = 255
    path = _npz(
        tmp_path / "d.npz",
        images=images,
        labels=np.array([0, 1] * 4),
        test_images=np.zeros((3, 4, 4), np.uint8),
        test_labels=np.array([0, 1, 2]),
        class_names=np.array(["cat", "dog", "cow"]),
    )
    train = load_dataset("npz", "train", path=path)
    test = load_dataset("npz", "test", path=path)
    assert len(train) == 8 and len(test) == 3
    assert train.info.num_classes == 3 and train.info.class_names == ("cat", "dog", "cow")
    assert train.info.mean == pytest.approx((1 / 16,))


def test_npz_errors(tmp_path: Path) -> None:
    no_labels = _npz(tmp_path / "a.npz", images=np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"a\.npz.*'labels'"):
        load_dataset("npz", "train", path=no_labels)
    half_test = _npz(
        tmp_path / "b.npz",
        images=np.zeros((4, 2, 2), np.uint8),
        labels=np.zeros(4, int),
        test_images=np.zeros((2, 2, 2), np.uint8),
    )
    with pytest.raises(DataError, match=r"b\.npz.*'test_labels'"):
        load_dataset("npz", "test", path=half_test)
    floats = _npz(
        tmp_path / "c.npz", images=np.zeros((4, 2, 2), np.float32), labels=np.zeros(4, int)
    )
    with pytest.raises(DataError, match=r"c\.npz.*uint8"):
        load_dataset("npz", "train", path=floats)
    mismatch = _npz(
        tmp_path / "d.npz", images=np.zeros((4, 2, 2), np.uint8), labels=np.zeros(3, int)
    )
    with pytest.raises(DataError, match=r"d\.npz.*'labels'"):
        load_dataset("npz", "train", path=mismatch)
    junk = tmp_path / "e.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"e\.npz"):
        load_dataset("npz", "train", path=junk)
    objects = tmp_path / "f.npz"
    np.savez(objects, images=np.array([{"a": 1}] * 4, dtype=object), labels=np.zeros(4, int))
    with pytest.raises(DataError, match=r"f\.npz"):
        load_dataset("npz", "train", path=objects)
    with pytest.raises(DataError, match="missing.npz"):
        load_dataset("npz", "train", path=tmp_path / "missing.npz")
    with pytest.raises(DataError, match="path"):
        load_dataset("npz", "train")


def test_dataset_info_types() -> None:
    with pytest.raises(DataError, match="mean/std"):
        DatasetInfo("x", 1, 3, 2, 2, (0.5,), (0.5,), ("a",))
