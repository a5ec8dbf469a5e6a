"""The Flower ClientApp: one train message in, one synthetic set out.

Thin by design: the node's partition is loaded once per process (``load_partition``),
distilled with the configured method on the node's device (``distill_partition``), and
the set goes back as arrays with its metrics. Both helpers run without Flower.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedistill.config import ExperimentConfig, from_run_config
from fedistill.data import ImageData, client_data, load_dataset, partition_dataset
from fedistill.device import pick_device
from fedistill.distill import get_distiller
from fedistill.synthetic import SyntheticSet

app = ClientApp()


_PARTITIONS: dict[tuple[str, int, int], ImageData] = {}


def load_partition(config: ExperimentConfig, partition_id: int, num_partitions: int) -> ImageData:
    """This node's share of the training split, cached per process; partitioning is seeded, so nodes agree on it."""
    key = (config.model_dump_json(include={"seed", "data", "partition"}), partition_id, num_partitions)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = _partition(config, partition_id, num_partitions)
    return _PARTITIONS[key]


def _partition(config: ExperimentConfig, partition_id: int, num_partitions: int) -> ImageData:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node_config partition-id {partition_id} is outside [0, {num_partitions})")
    train = load_dataset(config.data.name, "train", root=config.data.root, path=config.data.path)
    if config.data.train_subset is not None:
        train = train.subset(np.arange(min(config.data.train_subset, len(train))))
    part = config.partition
    partitioning = partition_dataset(
        train.labels,
        train.info.num_classes,
        part.scheme,
        num_partitions,
        alpha=part.alpha,
        classes_per_client=part.classes_per_client,
        shards_per_client=part.shards_per_client,
        min_partition_size=part.min_partition_size,
        seed=config.seed,
    )
    return client_data(train, partitioning, partition_id)


def distill_partition(
    config: ExperimentConfig, data: ImageData, device: torch.device, seed: int
) -> tuple[SyntheticSet, dict[str, Any]]:
    """Distill one client's data; returns the set and the metrics its reply carries."""
    images = data.normalized(device)
    labels = torch.from_numpy(data.labels).to(device)
    distiller = get_distiller(config.distill.method)(
        config.model.spec(), config.distill.settings(config.data.name), device
    )
    started = time.perf_counter()
    syn = distiller(images, labels, data.info.num_classes, seed=seed)
    seconds = time.perf_counter() - started
    metrics = {
        "num-images": len(syn),
        "num-examples": len(data),
        "bytes": syn.nbytes(),
        "seconds": seconds,
        "source-counts": [int(c) for c in syn.source_counts],
    }
    return syn, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Distill this node's partition and reply with ``set`` (arrays) and ``metrics``."""
    config = from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"].get("server-round", 1)) if "config" in msg.content else 1
    data = load_partition(config, partition_id, num_partitions)
    seed = config.seed * 1_000_003 + partition_id * 1009 + server_round
    syn, metrics = distill_partition(config, data, pick_device(config.device), seed)
    content = RecordDict(
        {
            "set": ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in syn.to_arrays().items()}),
            "metrics": MetricRecord({**metrics, "partition-id": partition_id}),
        }
    )
    return Message(content, reply_to=msg)
