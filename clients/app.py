"""The Flower ClientApp: one train message in, one synthetic set (or, for the baselines, weights) out.

Thin by design: the experiment arrives in the message (``wire.messages``),
the node's partition is loaded once per process (``load_partition``), distilled
with the configured method on the node's device (``distill_partition``) or
trained locally for FedAvg/FedProx (``clients.fit``), and the result goes back
as arrays with its metrics. The helpers run without Flower.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from attacks.backdoor import client_backdoor, trigger_path
from attacks.canary import Release, Releaser
from clients.fit import fit_partition
from clients.private import LEDGER_KEY, fit_private, train_private
from fedistill.cache import CACHE_DIR
from fedistill.config import ExperimentConfig
from fedistill.data import ImageData, client_data, load_dataset, partition_dataset
from fedistill.device import pick_device
from fedistill.distill import IterationHook, get_distiller
from fedistill.distill.embedding import perturbed_copies
from fedistill.distill.private import public_start
from fedistill.models import build_model
from fedistill.privacy import PrivateData, new_ledger, open_round, secret_generator
from fedistill.privacy_plan import plan_privacy
from fedistill.synthetic import SyntheticSet
from wire.messages import (
    CONTINUED,
    IDENTIFY,
    INIT_ROWS,
    NUM_PARTITIONS,
    PARTITION_ID,
    PREVIOUS_SET,
    PROXIMAL_MU,
    ROUND,
    STATE_PREFIX,
    TASK,
    read_experiment,
    record_to_state,
    restore_into,
    state_to_record,
)

app = ClientApp()


_PARTITIONS: dict[tuple[str, int, int], tuple[ImageData, np.ndarray]] = {}


def load_partition(config: ExperimentConfig, partition_id: int, num_partitions: int) -> ImageData:
    """This node's share of the training split, cached per process; partitioning is seeded, so nodes agree on it."""
    return _cached_partition(config, partition_id, num_partitions)[0]


def partition_rows(config: ExperimentConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """The rows of the (private) training split this node holds, in the order of ``load_partition``'s images."""
    return _cached_partition(config, partition_id, num_partitions)[1]


def _cached_partition(config: ExperimentConfig, partition_id: int, num_partitions: int) -> tuple[ImageData, np.ndarray]:
    key = (config.model_dump_json(include={"seed", "data", "partition"}), partition_id, num_partitions)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = _partition(config, partition_id, num_partitions)
    return _PARTITIONS[key]


_PUBLIC: dict[str, ImageData] = {}


def load_public(config: ExperimentConfig) -> ImageData:
    """The public pool (``data.public``, ``data.public_size``; no client holds it), cached per process."""
    key = config.model_dump_json(include={"data"})
    if key not in _PUBLIC:
        data = config.data
        _PUBLIC[key] = data.public_train(load_dataset(data.name, "train", root=data.root, path=data.path))
    return _PUBLIC[key]


def _partition(config: ExperimentConfig, partition_id: int, num_partitions: int) -> tuple[ImageData, np.ndarray]:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node_config partition-id {partition_id} is outside [0, {num_partitions})")
    train = config.data.private_train(
        load_dataset(config.data.name, "train", root=config.data.root, path=config.data.path)
    )
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
    return client_data(train, partitioning, partition_id), np.asarray(partitioning.indices[partition_id])


def expert_cache(config: ExperimentConfig) -> Path:
    """Where a node keeps expert trajectories (``mtt``) and teachers: ``output_dir/.cache``, on its own disk.

    The server owns the run directory; a node only knows ``output_dir``. File
    names hash the node's data and settings, so nodes and runs can share it.
    """
    return Path(config.output_dir) / CACHE_DIR


def distill_partition(
    config: ExperimentConfig,
    data: ImageData,
    device: torch.device,
    seed: int,
    global_state: dict[str, torch.Tensor] | None = None,
    start: SyntheticSet | None = None,
    privacy: PrivateData | None = None,
    on_iteration: IterationHook | None = None,
) -> tuple[SyntheticSet, dict[str, Any]]:
    """Distill one client's data; returns the set and the metrics its reply carries.

    With ``global_state`` the matching networks are perturbed copies of the
    global model (FedDM) instead of random ones; with ``start`` the images
    continue from the node's previous set; ``on_iteration`` goes to the
    distiller (a malicious node's DOORPING hook). A private method gets
    ``privacy``; its set's ``source_counts`` (and so ``num-examples``) are the
    released noisy counts; with ``distill.init = "public"`` its first set
    starts from public images.
    """
    images = data.normalized(device)
    labels = torch.from_numpy(data.labels).to(device)
    networks = None
    if global_state is not None:
        model = build_model(config.model.spec(), tuple(images.shape[1:]), data.info.num_classes)
        model.load_state_dict(global_state)
        networks = perturbed_copies(model, config.federation.perturbation, device)
    if start is None and privacy is not None and config.distill.init == "public":
        budgets = privacy.budgets(config.distill.ipc)
        start = public_start(load_public(config), budgets, torch.Generator().manual_seed(seed), device,
                             config.distill.factor)
    method = get_distiller(config.distill.method)
    distiller = method(
        config.model.spec(),
        config.distill.settings(config.data.name, cache_dir=expert_cache(config)),
        device,
        networks=networks,
        start=start if method.refines else None,
        on_iteration=on_iteration,
        **({} if privacy is None else {"privacy": privacy}),
    )
    started = time.perf_counter()
    syn = distiller(images, labels, data.info.num_classes, seed=seed)
    seconds = time.perf_counter() - started
    metrics = {
        "num-images": len(syn),
        "num-examples": int(syn.source_counts.sum()),
        "bytes": syn.nbytes(),
        "seconds": seconds,
        "source-counts": [int(c) for c in syn.source_counts],
    }
    if privacy is None and "init_rows" in syn.provenance:
        metrics[INIT_ROWS] = syn.provenance["init_rows"]  # rows of ``data``; the node maps them to its split's
    return syn, metrics


def release_seed(config: ExperimentConfig, partition_id: int, server_round: int) -> int:
    """The seed of a node's work in a round: its distiller's draws and, with ``privacy.reproducible``, its noise."""
    return config.seed * 1_000_003 + partition_id * 1009 + server_round


def canary_release(config: ExperimentConfig, partition_id: int, device: torch.device) -> tuple[ImageData, Releaser]:
    """A node's data and its round-1 release as a function of the data, for the canary audit (``attacks.canary``).

    The release is the node's own path: a fresh ledger, the round's noisy
    counts and the private distiller when ``privacy.enabled``, else the plain
    distiller; the ledger's epsilon after it is what the audit compares with.
    """
    data = load_partition(config, partition_id, config.partition.num_clients)
    seed = release_seed(config, partition_id, 1)

    def release(records: ImageData) -> Release:
        if not config.privacy.enabled:
            return Release(distill_partition(config, records, device, seed)[0], None, None)
        plan = plan_privacy(config)
        ledger = new_ledger(plan)
        privacy = open_round(plan, ledger, records.labels, records.info.num_classes, 1,
                             secret_generator(config.privacy, seed))
        syn, _ = distill_partition(config, records, device, seed, privacy=privacy)
        return Release(syn, float(ledger.epsilon().value), plan.delta)

    return data, release


KEPT_BY_SERVER: tuple[str, ...] = (LEDGER_KEY,)
"""``context.state`` keys (config or metric records) the server keeps for this node and gives back after a restart.

Each reply carries them as ``state.<key>`` records; the server stores the
latest accepted copy per partition in its checkpoint and returns it as
``restore.<key>`` to a node that starts without it (``wire.messages``).
The previous set is not listed: the server rebuilds it from the accepted set.
The privacy ledger is listed: a node restarted, or every node of a resumed
run, continues from the ledger of its last accepted reply, and charges the
rounds after it in full (``clients.private.train_private``). Records are
limited to small plain values (``server.validation.check_client_state``).
"""


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``identify``: which partition this node holds, so the server can give back the state it kept for it."""
    task = msg.content.config_records.get("config", {}).get(TASK)
    if task != IDENTIFY:
        raise ValueError(f"query task: unknown value {task!r}; allowed: {IDENTIFY}")
    identity = {
        PARTITION_ID: int(context.node_config["partition-id"]),
        NUM_PARTITIONS: int(context.node_config["num-partitions"]),
    }
    return Message(RecordDict({"metrics": MetricRecord(identity)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the task the server asked for (see ``wire.messages``) on this node's partition."""
    own_ledger = LEDGER_KEY in context.state
    restore_into(msg.content, context.state)
    config, control = read_experiment(msg.content["config"])
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(control.get(ROUND, 1))
    data = load_partition(config, partition_id, num_partitions)
    seed = release_seed(config, partition_id, server_round)
    device = pick_device(config.device)
    # A malicious node (attack.backdoor.malicious_clients) poisons its own data, the same rows every round.
    backdoor = client_backdoor(config, partition_id, data.info, seed=config.seed * 1_000_003 + partition_id * 1009)
    poisoned = None if backdoor is None else backdoor(data)
    if poisoned is not None:
        data = poisoned.data
    distilling = control[TASK] != "fit"
    hook = backdoor.distill_hook(poisoned, config.model.spec(), device) if poisoned is not None and distilling else None
    if config.privacy.enabled:
        reply = _train_private(msg, context, config, control, data, server_round, seed, device, own_ledger, hook)
        return _with_kept_state(reply, context)
    if not distilling:
        global_state = record_to_state(msg.content.array_records["arrays"])
        state, metrics = fit_partition(
            config, data, global_state, device, proximal_mu=float(control.get(PROXIMAL_MU, 0.0)), seed=seed
        )
        content = RecordDict(
            {"arrays": state_to_record(state), "metrics": MetricRecord({**metrics, PARTITION_ID: partition_id})}
        )
        return Message(content, reply_to=msg)
    arrays, metrics = _distill_round(msg, context, config, data, device, seed, None, hook)
    if backdoor is not None:
        backdoor.trigger.save(trigger_path(config, partition_id), round=server_round)
    local_rows = metrics.pop(INIT_ROWS, None)
    if local_rows is not None and poisoned is None:  # a poisoned partition's rows are not the split's
        metrics[INIT_ROWS] = partition_rows(config, partition_id, num_partitions)[local_rows].tolist()
    metrics = {**metrics, PARTITION_ID: partition_id}
    content = RecordDict({"set": arrays, "metrics": MetricRecord(metrics)})
    return _with_kept_state(Message(content, reply_to=msg), context)


def _distill_round(
    msg: Message,
    context: Context,
    config: ExperimentConfig,
    data: ImageData,
    device: torch.device,
    seed: int,
    privacy: PrivateData | None,
    on_iteration: IterationHook | None,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """This round's set as arrays, and its metrics.

    With a global model in the message (multi-round) the node matches under it;
    with ``federation.client_start = "previous"`` it also continues from its
    previous set and keeps the new one for the next round.
    """
    global_record = msg.content.array_records.get("global")
    refining = global_record is not None and config.federation.client_start == "previous"
    previous = context.state.array_records.get(PREVIOUS_SET) if refining else None
    syn, metrics = distill_partition(
        config,
        data,
        device,
        seed,
        global_state=None if global_record is None else record_to_state(global_record),
        start=None if previous is None else SyntheticSet.from_arrays(
            _numpy(previous), data.info.num_classes, factor=config.distill.factor
        ),
        privacy=privacy,
        on_iteration=on_iteration,
    )
    arrays = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in syn.to_arrays().items()})
    if refining:
        context.state[PREVIOUS_SET] = arrays
    return arrays, {**metrics, CONTINUED: int(previous is not None)}


def _with_kept_state(reply: Message, context: Context) -> Message:
    """Attach the ``state.<key>`` records of ``KEPT_BY_SERVER`` the node holds."""
    for key in KEPT_BY_SERVER:
        if key in context.state:
            reply.content[STATE_PREFIX + key] = context.state[key]
    return reply


def _train_private(
    msg: Message,
    context: Context,
    config: ExperimentConfig,
    control: dict[str, Any],
    data: ImageData,
    server_round: int,
    seed: int,
    device: torch.device,
    own_ledger: bool,
    on_iteration: IterationHook | None,
) -> Message:
    """The same two tasks under the node's privacy budget (``clients.private``); refusals reply without a result."""
    if control[TASK] == "fit":
        global_state = record_to_state(msg.content.array_records["arrays"])

        def fit(privacy: PrivateData) -> tuple[dict[str, ArrayRecord], dict[str, Any]]:
            state, metrics = fit_private(config, data, global_state, device, privacy)
            return {"arrays": state_to_record(state)}, metrics

        return train_private(msg, context, config, data, server_round, seed, fit, own_ledger)

    def distill(privacy: PrivateData) -> tuple[dict[str, ArrayRecord], dict[str, Any]]:
        arrays, metrics = _distill_round(msg, context, config, data, device, seed, privacy, on_iteration)
        return {"set": arrays}, metrics

    return train_private(msg, context, config, data, server_round, seed, distill, own_ledger)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
