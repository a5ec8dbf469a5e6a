"""Client partitions: flwr-datasets schemes on real labels, one-line errors, client data, the CLI command."""

from __future__ import annotations

import functools
import json
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedistill.config import ConfigError, ExperimentConfig, PartitionConfig, parse_config
from fedistill.data import (
    PARTITION_SCHEMES,
    ImageData,
    PartitionError,
    Partitioning,
    client_data,
    load_dataset,
    partition_dataset,
    plot_partition_counts,
)
from launch.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENTS = 10
DATASETS = ("fashion-mnist", "digits")
CASES = [(name, scheme) for name in DATASETS for scheme in PARTITION_SCHEMES]

runner = CliRunner()


@functools.cache
def train_labels(name: str) -> np.ndarray:
    return load_dataset(name, "train").labels


@functools.cache
def cached_partition(name: str, scheme: str, seed: int = 0) -> Partitioning:
    return partition_dataset(train_labels(name), 10, scheme, CLIENTS, seed=seed)


def label_entropy(counts: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution; 0 means one class each."""
    p = counts / counts.sum(axis=1, keepdims=True)
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(terms.sum(axis=1).mean())


@pytest.mark.parametrize(("name", "scheme"), CASES)
def test_partitions_are_disjoint_and_cover_the_set(name: str, scheme: str) -> None:
    labels = train_labels(name)
    n = len(labels)
    parts = cached_partition(name, scheme)
    counts = parts.counts(labels)
    assert parts.num_clients == CLIENTS and counts.shape == (CLIENTS, 10)
    rows = np.concatenate(parts.indices)
    assert np.unique(rows).size == rows.size, "a row is held by two clients"
    assert rows.min() >= 0 and rows.max() < n
    for index in parts.indices:
        assert index.dtype == np.int64 and np.all(np.diff(index) > 0)
        assert not index.flags.writeable
    np.testing.assert_array_equal(counts.sum(axis=1), parts.sizes())
    # Shard cuts n // (clients * shards) rows per shard and leaves the remainder out;
    # the other schemes (pathological with >= as many clients as classes) use every row.
    expected = n - n % (CLIENTS * 2) if scheme == "shard" else n
    assert counts.sum() == expected
    if scheme != "shard":
        np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels, minlength=10))


@pytest.mark.parametrize("name", DATASETS)
def test_scheme_specific_shapes(name: str) -> None:
    labels = train_labels(name)
    n = len(labels)
    dirichlet = cached_partition(name, "dirichlet").sizes()
    assert dirichlet.min() >= 10
    pathological = cached_partition(name, "pathological").counts(labels)
    assert ((pathological > 0).sum(axis=1) == 2).all()
    shard = cached_partition(name, "shard").counts(labels)
    assert ((shard > 0).sum(axis=1) <= 4).all()
    iid = cached_partition(name, "iid").counts(labels)
    sizes = iid.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    share = iid / sizes[:, None]
    overall = np.bincount(labels, minlength=10) / n
    assert np.abs(share - overall).max() < (0.03 if name == "fashion-mnist" else 0.15)


def test_fashion_mnist_shards_hold_one_class_each() -> None:
    """60,000 sorted labels in 20 shards of 3,000: every shard lies inside one class of 6,000."""
    counts = cached_partition("fashion-mnist", "shard").counts(train_labels("fashion-mnist"))
    assert set(np.unique(counts)) <= {0, 3000, 6000}


@pytest.mark.parametrize(("name", "scheme"), CASES)
def test_seed_decides_the_partition(name: str, scheme: str) -> None:
    first = cached_partition(name, scheme)
    again = partition_dataset(train_labels(name), 10, scheme, CLIENTS, seed=0)
    other = cached_partition(name, scheme, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first.indices, again.indices, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first.indices, other.indices, strict=True))


def test_small_alpha_is_more_skewed() -> None:
    labels = train_labels("fashion-mnist")
    skewed = partition_dataset(labels, 10, "dirichlet", CLIENTS, alpha=0.1, seed=0).counts(labels)
    even = partition_dataset(labels, 10, "dirichlet", CLIENTS, alpha=100.0, seed=0).counts(labels)
    assert label_entropy(skewed) < 1.5 < 2.2 < label_entropy(even) <= np.log(10)


def test_hundred_clients_on_fashion_mnist_is_cheap() -> None:
    labels = train_labels("fashion-mnist")
    started = time.perf_counter()
    parts = partition_dataset(labels, 10, "dirichlet", 100, seed=0)
    seconds = time.perf_counter() - started
    assert parts.counts(labels).sum() == len(labels) and parts.sizes().min() >= 10
    assert seconds < 30, f"100-client Dirichlet took {seconds:.1f} s"


DIGITS_N = 1348


@pytest.mark.parametrize(
    ("scheme", "kwargs", "needles"),
    [
        ("nope", {}, ("partition.scheme", "'nope'", "iid, dirichlet, pathological, shard")),
        ("iid", {"num_clients": 0}, ("partition.num_clients", "1..1348")),
        ("dirichlet", {"num_clients": DIGITS_N + 1}, ("partition.num_clients", "1..1348")),
        ("iid", {"num_clients": 2.5}, ("partition.num_clients", "integer")),
        ("dirichlet", {"alpha": 0.0}, ("partition.alpha", "> 0")),
        ("dirichlet", {"alpha": -1.0}, ("partition.alpha", "> 0")),
        ("dirichlet", {"alpha": float("nan")}, ("partition.alpha", "> 0")),
        ("dirichlet", {"min_partition_size": -1}, ("partition.min_partition_size", "0..134")),
        ("dirichlet", {"min_partition_size": 135}, ("partition.min_partition_size", "0..134")),
        ("dirichlet", {"alpha": 0.05, "min_partition_size": 120}, ("partition.min_partition_size", "partition.alpha")),
        ("pathological", {"classes_per_client": 11}, ("partition.classes_per_client", "1..10")),
        ("pathological", {"classes_per_client": 0}, ("partition.classes_per_client", "1..10")),
        ("shard", {"shards_per_client": 0}, ("partition.shards_per_client", "1..134")),
        ("shard", {"shards_per_client": 135}, ("partition.shards_per_client", "1..134")),
        ("iid", {"seed": -1}, ("seed", ">= 0")),
    ],
)
def test_bad_arguments_name_the_key(scheme: str, kwargs: dict, needles: tuple[str, ...]) -> None:
    args = {"num_clients": CLIENTS, **kwargs}
    num_clients = args.pop("num_clients")
    with pytest.raises(ValueError) as error:
        partition_dataset(train_labels("digits"), 10, scheme, num_clients, **args)
    assert isinstance(error.value, PartitionError)
    message = str(error.value)
    assert "\n" not in message
    assert all(needle in message for needle in needles), message
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_class_with_too_few_images_for_its_clients() -> None:
    """Three clients each dealt both classes, but class 0 has one image: flwr-datasets' error, rephrased."""
    labels = np.array([0, 1, 1, 1, 1, 1])
    with pytest.raises(PartitionError, match=r"^partition\.num_clients: .*partition\.classes_per_client"):
        partition_dataset(labels, 2, "pathological", 3, classes_per_client=2)


def test_pathological_with_fewer_clients_than_classes_leaves_classes_out() -> None:
    labels = train_labels("digits")
    parts = partition_dataset(labels, 10, "pathological", 3, classes_per_client=2, seed=0)
    counts = parts.counts(labels)
    assert ((counts > 0).sum(axis=1) == 2).all()
    assert (counts.sum(axis=0) > 0).sum() <= 6 and counts.sum() < len(labels)


def test_client_data_returns_the_clients_rows(digits_train: ImageData) -> None:
    parts = cached_partition("digits", "dirichlet")
    for client in (0, CLIENTS - 1):
        data = client_data(digits_train, parts, client)
        rows = parts.indices[client]
        assert len(data) == len(rows) and data.info == digits_train.info
        np.testing.assert_array_equal(data.images, digits_train.images[rows])
        np.testing.assert_array_equal(data.labels, digits_train.labels[rows])
    total = sum(len(client_data(digits_train, parts, c)) for c in range(CLIENTS))
    assert total == len(digits_train)
    with pytest.raises(ValueError, match="client"):
        client_data(digits_train, parts, CLIENTS)
    with pytest.raises(ValueError, match="another training set"):
        client_data(digits_train.subset(np.arange(100)), parts, 0)


def test_partitioning_is_immutable_and_counts_check_labels() -> None:
    parts = Partitioning((np.array([2, 0]), [1]), num_classes=3)
    np.testing.assert_array_equal(parts.counts(np.array([0, 2, 1])), [[1, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError):
        parts.indices[0][0] = 5
    with pytest.raises(ValueError, match="labels"):
        parts.counts(np.array([0]))


def test_config_section_matches_the_schemes() -> None:
    assert typing.get_args(PartitionConfig.model_fields["scheme"].annotation) == PARTITION_SCHEMES
    cfg = ExperimentConfig()
    assert (cfg.partition.scheme, cfg.partition.num_clients, cfg.partition.alpha) == ("dirichlet", 10, 0.5)
    assert list(ExperimentConfig.model_fields).index("partition") == list(ExperimentConfig.model_fields).index("data") + 1
    for values, key in [
        ({"partition": {"alpha": 0}}, "partition.alpha"),
        ({"partition": {"scheme": "label-skew"}}, "partition.scheme"),
        ({"partition": {"num_clients": 10001}}, "partition.num_clients"),
        ({"partition": {"clients": 3}}, "partition.clients: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_config(values)


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_heatmap_is_a_png(tmp_path: Path) -> None:
    names = [str(c) for c in range(10)]
    small = plot_partition_counts(np.arange(30).reshape(3, 10), names, tmp_path / "small.png")
    assert_png(small)
    many = plot_partition_counts(np.ones((500, 10), dtype=np.int64), names, tmp_path / "many.png")
    assert_png(many)
    with pytest.raises(ValueError, match="counts"):
        plot_partition_counts(np.ones((3, 4)), names, tmp_path / "bad.png")


def test_cli_prints_table_and_writes_files(tmp_path: Path) -> None:
    args = ["data", "partitions", "--set", "data.name=digits", "--set", "partition.scheme=pathological"]
    result = runner.invoke(app, [*args, "--set", "seed=3", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "digits: 1348 training images over 10 clients (pathological)" in result.stdout
    assert "total" in result.stdout and "1348" in result.stdout and "…" not in result.stdout
    record = json.loads((tmp_path / "out" / "partition_counts.json").read_text())
    assert record["partition"]["scheme"] == "pathological" and record["seed"] == 3
    counts = np.array(record["counts"])
    labels = train_labels("digits")
    expected = partition_dataset(labels, 10, "pathological", CLIENTS, seed=3).counts(labels)
    np.testing.assert_array_equal(counts, expected)
    assert_png(tmp_path / "out" / "partition_counts.png")


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(needle in lines[0] for needle in needles), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["partition.scheme=skew"], ("partition.scheme", "skew")),
        (["partition.num_clients=5000"], ("partition.num_clients", "1..1348")),
        (["partition.scheme=pathological", "partition.classes_per_client=12"], ("partition.classes_per_client",)),
    ],
)
def test_cli_errors_are_one_line(sets: list[str], needles: tuple[str, ...], tmp_path: Path) -> None:
    args = ["data", "partitions", "--set", "data.name=digits"]
    for entry in sets:
        args += ["--set", entry]
    result = runner.invoke(app, [*args, "--output", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, *needles)
    assert not any(tmp_path.iterdir())
