"""Splitting a training set among federated clients, and the statistics of a split.

The splitting itself is delegated to flwr-datasets' partitioners, the reference
implementations of the schemes used in the federated-learning literature, so
a partition here is the partition other Flower projects get. They run on a
small in-memory ``datasets.Dataset`` of (label, row index) pairs, never on the
images and never through the hub, and the row indices are read back from it.
Their errors are rephrased into one line naming the ``partition.<key>`` to
change, since a user reaches this code through the experiment config.

Rows are shuffled with the seed before any partitioner sees them: the order
of a source file (digits is grouped by writer, for instance) then never
decides which client gets which image, and ``IidPartitioner``, which has no
seed and cuts contiguous blocks, becomes a seeded random split.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedistill.data.catalog import ImageData

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "shard")

# Beyond this many cells a heatmap's numbers are unreadable and slow to draw.
_ANNOTATE_MAX_CELLS = 2000


class PartitionError(ValueError):
    """An impossible partition request, phrased as ``partition.<key>: problem; allowed: ...``."""


@dataclass(frozen=True, eq=False)
class Partitioning:
    """Which training rows each client holds.

    Frozen with read-only arrays, so a partition shared by clients cannot be
    changed under them; ``eq=False`` because arrays have no single truth
    value under ``==`` (compare ``indices`` explicitly).

    Attributes
    ----------
    indices
        One read-only int64 array of row indices into the training
        ``ImageData`` per client; from ``partition_dataset`` they are sorted
        and pairwise disjoint, and their union is the whole set except where the scheme leaves rows out
        (``shard``: the ``n mod (clients * shards)`` rows that do not fill a
        shard; ``pathological``: classes no client was dealt).
    num_classes
        Number of classes of the dataset, the width of ``counts``.
    """

    indices: tuple[np.ndarray, ...]
    num_classes: int

    def __post_init__(self) -> None:
        arrays = []
        for rows in self.indices:
            array = np.array(rows, dtype=np.int64).reshape(-1)
            array.setflags(write=False)
            arrays.append(array)
        object.__setattr__(self, "indices", tuple(arrays))

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    def sizes(self) -> np.ndarray:
        """Number of rows per client, shape (num_clients,)."""
        return np.array([len(rows) for rows in self.indices], dtype=np.int64)

    def counts(self, labels: np.ndarray) -> np.ndarray:
        """Images per client and class, shape (num_clients, num_classes).

        ``labels`` are the labels of the whole training set the partition was
        made from (the indices point into it).
        """
        labels = np.asarray(labels, dtype=np.int64)
        owner = np.repeat(np.arange(self.num_clients, dtype=np.int64), self.sizes())
        rows = np.concatenate(self.indices) if self.indices else np.zeros(0, dtype=np.int64)
        if rows.size and rows.max() >= labels.shape[0]:
            raise ValueError(
                f"partition indices reach row {int(rows.max())} but only {labels.shape[0]} labels were given"
            )
        flat = owner * self.num_classes + labels[rows]
        return np.bincount(flat, minlength=self.num_clients * self.num_classes).reshape(
            self.num_clients, self.num_classes
        )


def _check_int(value: Any, key: str, low: int, high: int | None, why: str = "") -> int:
    """``value`` as an int in [low, high], else a PartitionError naming ``partition.<key>``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise PartitionError(f"{key}: expected an integer, got {value!r}") from None
    if number < low or (high is not None and number > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise PartitionError(f"{key}: {number} is out of range; allowed: {allowed}{why}")
    return number


def _validate(
    labels: np.ndarray,
    num_classes: int,
    scheme: str,
    num_clients: int,
    alpha: float,
    classes_per_client: int,
    shards_per_client: int,
    min_partition_size: int,
    seed: int,
) -> tuple[np.ndarray, int]:
    """Reject every request flwr-datasets would fail on late or with a deep traceback; return (labels, n)."""
    if scheme not in PARTITION_SCHEMES:
        raise PartitionError(f"partition.scheme: unknown scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"labels must be a 1-D integer array, got shape {labels.shape} of {labels.dtype}")
    num_classes = _check_int(num_classes, "num_classes", 1, None)
    n = int(labels.shape[0])
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if n == 0:
        raise PartitionError("cannot partition an empty training set")
    _check_int(seed, "seed", 0, None)
    _check_int(num_clients, "partition.num_clients", 1, n, f" (the number of training images is {n})")
    if scheme == "dirichlet":
        try:
            value = float(alpha)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(alpha, bool) or not (math.isfinite(value) and value > 0):
            raise PartitionError(f"partition.alpha: {alpha!r} is not allowed; allowed: a finite number > 0")
        per_client = n // num_clients
        _check_int(
            min_partition_size,
            "partition.min_partition_size",
            0,
            per_client,
            f" ({n} images over {num_clients} clients give at most {per_client} to the smallest)",
        )
    elif scheme == "pathological":
        present = int(np.unique(labels).size)
        _check_int(
            classes_per_client,
            "partition.classes_per_client",
            1,
            present,
            f" (the training set holds {present} of {num_classes} classes)",
        )
    elif scheme == "shard":
        most = n // num_clients
        _check_int(
            shards_per_client,
            "partition.shards_per_client",
            1,
            most,
            f" (every shard needs an image: {n} images over {num_clients} clients)",
        )
    return labels.astype(np.int64, copy=False), n


def _make_partitioner(
    scheme: str,
    num_clients: int,
    alpha: float,
    classes_per_client: int,
    shards_per_client: int,
    min_partition_size: int,
    seed: int,
) -> Any:
    """The flwr-datasets partitioner for ``scheme`` (imported here: ``datasets`` takes seconds to import)."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            seed=seed,
        )
    if scheme == "pathological":
        # "first-deterministic" (the mode of the NIID-Bench paper the scheme comes
        # from) deals client i the class i mod C first, so with at least as many
        # clients as classes every class is used; the default "random" mode
        # often leaves a class, and all its images, with no client.
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    return ShardPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_shards_per_partition=shards_per_client,
        seed=seed,
    )


def _rephrase(scheme: str, error: Exception, num_clients: int, alpha: float, min_partition_size: int) -> PartitionError:
    """A flwr-datasets failure as one line naming the config key to change."""
    text = str(error)
    if scheme == "dirichlet" and "max number of attempts" in text:
        return PartitionError(
            f"partition.min_partition_size: no Dirichlet draw (alpha={alpha}) gave all {num_clients} clients "
            f"at least {min_partition_size} images in 11 tries; allowed: a smaller partition.min_partition_size, "
            "a larger partition.alpha or fewer partition.num_clients"
        )
    if scheme == "pathological" and "needed to be assigned to more partitions" in text:
        return PartitionError(
            "partition.num_clients: a class has fewer images than clients dealt it; "
            "allowed: fewer partition.num_clients or a smaller partition.classes_per_client"
        )
    return PartitionError(f"partition.scheme: {scheme} partitioning failed: {text.splitlines()[0] if text else error!r}")


def partition_dataset(
    labels: np.ndarray,
    num_classes: int,
    scheme: str,
    num_clients: int,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    shards_per_client: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> Partitioning:
    """Split the rows of a training set among ``num_clients`` clients with a flwr-datasets partitioner.

    Parameters
    ----------
    labels
        Labels of the whole training set, in its row order.
    num_classes
        Number of classes of the dataset (classes may be absent from ``labels``).
    scheme
        ``iid`` (equal random split), ``dirichlet`` (per class, proportions
        drawn from Dir(``alpha``); smaller alpha, more skew; redrawn until
        every client has ``min_partition_size`` images), ``pathological``
        (each client holds exactly ``classes_per_client`` classes) or
        ``shard`` (label-sorted rows cut into ``num_clients *
        shards_per_client`` equal shards, ``shards_per_client`` per client, as
        in McMahan et al.).
    seed
        Seeds both the row shuffle and the partitioner: the same arguments
        always give the same partition.

    Returns
    -------
    Partitioning
        Disjoint, sorted row indices per client.

    Raises
    ------
    PartitionError
        (a ValueError) for an unknown scheme, an out-of-range argument or a
        request the partitioner cannot meet; the message names the
        ``partition.<key>`` and what is allowed.
    """
    labels, n = _validate(
        labels, num_classes, scheme, num_clients, alpha, classes_per_client, shards_per_client, min_partition_size, seed
    )
    import datasets

    order = np.random.default_rng(seed).permutation(n)
    table = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    partitioner = _make_partitioner(
        scheme, num_clients, alpha, classes_per_client, shards_per_client, min_partition_size, seed
    )
    partitioner.dataset = table
    clients: list[np.ndarray] = []
    with warnings.catch_warnings():
        # Dirichlet warns on every redraw and pathological on unused classes;
        # the outcome is reported by the error or visible in the counts.
        warnings.simplefilter("ignore")
        for client in range(num_clients):
            try:
                part = partitioner.load_partition(client)
            except (ValueError, TypeError, ZeroDivisionError) as error:
                raise _rephrase(scheme, error, num_clients, alpha, min_partition_size) from None
            # Reading the column through Arrow: np.asarray on a datasets 4
            # Column iterates row by row and is about 20x slower.
            rows = part.with_format("arrow")[:]["idx"].to_numpy()
            clients.append(np.sort(rows.astype(np.int64, copy=False)))
    return Partitioning(tuple(clients), int(num_classes))


def client_data(train: ImageData, partitioning: Partitioning, client: int) -> ImageData:
    """The rows of ``train`` held by ``client``, as their own ImageData (a copy).

    ``train`` must be the training set the partition was made from.
    """
    client = _check_int(client, "client", 0, partitioning.num_clients - 1)
    rows = partitioning.indices[client]
    if rows.size and rows.max() >= len(train):
        raise PartitionError(
            f"client {client}: row {int(rows.max())} is beyond the {len(train)} training images; "
            "the partition was made from another training set"
        )
    return train.subset(rows)


def plot_partition_counts(counts: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Heatmap of images per client (rows) and class (columns), each cell numbered; returns ``path``.

    Drawn with matplotlib's Figure API on an Agg canvas (as in ``fedistill.report``),
    so no global pyplot state or GUI backend is touched. Numbers are left out
    when there are too many cells to read them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fedistill.atomic import save_figure

    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(class_names):
        raise ValueError(f"counts must be (clients, {len(class_names)}), got shape {counts.shape}")
    clients, classes = counts.shape
    width = 1.5 + 0.75 * classes
    height = min(40.0, 1.8 + 0.28 * clients)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    peak = max(int(counts.max()) if counts.size else 0, 1)
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=peak, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="images")
    ax.set_xticks(range(classes))
    ax.set_xticklabels(list(class_names), rotation=45, ha="right")
    step = max(1, math.ceil(clients / 50))
    ax.set_yticks(range(0, clients, step))
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(f"{clients} clients, {int(counts.sum())} images")
    if counts.size <= _ANNOTATE_MAX_CELLS:
        fontsize = 7 if classes > 10 or clients > 30 else 8
        for (row, column), value in np.ndenumerate(counts):
            colour = "white" if value > peak / 2 else "black"
            ax.text(column, row, str(int(value)), ha="center", va="center", color=colour, fontsize=fontsize)
    fig.tight_layout()
    return save_figure(fig, Path(path))
