"""The federated distillation protocols (one-shot and multi-round), driven through a Flower ``Grid``.

The loop is plain code over the Grid's calls (``get_node_ids``,
``push_messages``, ``pull_messages``), so tests drive it with an in-process
grid. ``run_distillation`` sets a run up (or resumes one from its checkpoint),
then calls ``DistillationRun.run_round`` once per round and checkpoints after
each; the round itself asks the nodes connected at its start, validates their
replies as they arrive, aggregates and trains the global model.

Faults: each reply is untrusted; a failed, oversized or malformed reply is
logged with its node and the reason, counted, and left out. A node that dies
or hangs is left out once the round stops waiting (``exchange``: everyone
answered, ``round_timeout_s``, or ``straggler_timeout_s`` after the quorum),
and the next round asks whoever is connected then. A node the server has not
seen before (restarted, or every node after a resume) first tells the server
its partition (an ``identify`` query) and gets back the state the server kept
for that partition (``restore.*`` records). Too few valid replies end the run
with ``NotEnoughClients``, and the run directory stays resumable.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from rich.console import Console
from rich.table import Table

from attacks.defenses import defend_sets
from fedistill.atomic import save_tensors
from fedistill.checkpoint import Checkpoint, CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from fedistill.config import ExperimentConfig, experiment_fingerprint
from fedistill.data import ImageData, load_dataset
from fedistill.device import pick_device
from fedistill.distill import get_distiller
from fedistill.messages import (
    NUM_PARTITIONS,
    PARTITION_ID,
    PREVIOUS_SET,
    RESTORE_PREFIX,
    STATE_PREFIX,
    experiment_record,
    identify_record,
    state_to_record,
)
from fedistill.models import build_model
from fedistill.privacy import PrivacyPlan
from fedistill.report import save_class_grids
from fedistill.runs import create_run_dir, save_config
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, evaluate_model, evaluate_set, train_model
from server.aggregation import AggregateResult, AggregationContext, ClientSet, get_aggregator, merge_rounds, soft_label
from server.history import RoundRecord, RunHistory, write_history
from server.privacy import ClientPrivacy, PrivacyRecorder, read_privacy, refusal_reason
from server.validation import (
    CLIENT_STATE_LIMIT_BYTES,
    CLIENT_STATE_MAX_RECORDS,
    OPTIONAL_KEYS,
    REQUIRED_KEYS,
    InvalidReply,
    ReplyLimits,
    array_to_numpy,
    check_client_metrics,
    check_client_state,
    client_error,
    validate_set_arrays,
)

log = logging.getLogger("fedistill.server")

EVAL_SEED_OFFSET = 1_000_003
POLL_S = 0.5
"""How often a waiting round asks the SuperLink for replies (Flower's own ``send_and_receive`` polls every 3 s)."""
EARLIER_WEIGHTS = "weights"
"""Key of a kept earlier aggregate's per-image training weights in the checkpoint."""

UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
"""Error codes the SuperLink itself sends for a node that stopped heartbeating or a message that expired:
the node is missing, not faulty."""

CONTENT_OVERHEAD_BYTES = CLIENT_STATE_MAX_RECORDS * CLIENT_STATE_LIMIT_BYTES + 2**20
"""What a reply may carry beside its set (metrics, kept state), before its arrays are read."""


class GridLike(Protocol):
    """The part of ``flwr.serverapp.Grid`` the protocols use (Flower's strategies use ``send_and_receive``)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


class NotEnoughClients(RuntimeError):
    """Fewer valid replies (or connected nodes) than the round's quorum."""


class BudgetExhausted(NotEnoughClients):
    """Too few replies because nodes refused for their privacy budget: the run ends with the last global model."""


class RunInterrupted(RuntimeError):
    """The caller asked the run to stop (Ctrl-C); the run directory holds the last complete round."""


@dataclass
class RunControl:
    """How a caller steers a server run.

    ``resume``: an existing run directory to continue from its checkpoint.
    ``stop``: set it to make the run stop at its next wait (raises RunInterrupted).
    ``on_start``: told the run directory as soon as it exists.
    """

    resume: Path | None = None
    stop: threading.Event | None = None
    on_start: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class WaitPolicy:
    """When a round stops waiting, and how many valid replies it needs (``federation.*``)."""

    min_clients: int
    quorum: float
    round_timeout_s: float
    straggler_timeout_s: float

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> WaitPolicy:
        federation = config.federation
        return cls(federation.min_clients, federation.quorum, federation.round_timeout_s, federation.straggler_timeout_s)

    def needed(self, asked: int) -> int:
        """Valid replies a round with ``asked`` nodes needs: ``min_clients`` and the ``quorum`` share."""
        return max(self.min_clients, math.ceil(self.quorum * asked - 1e-9))


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunInterrupted("stopped on request")


def wait_for_nodes(
    grid: GridLike, minimum: int, timeout_s: float, poll_s: float = 1.0, stop: threading.Event | None = None
) -> list[int]:
    """Node ids once at least ``minimum`` are connected; NotEnoughClients after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_stop(stop)
        nodes = sorted(int(node) for node in grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughClients(f"{len(nodes)} nodes connected after {timeout_s:g} s; need {minimum}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def exchange(
    grid: GridLike,
    messages: list[Message],
    policy: WaitPolicy,
    on_reply: Callable[[int, Message], bool],
    needed: int,
    stop: threading.Event | None = None,
) -> list[int]:
    """Send ``messages`` and hand each reply to ``on_reply(node, reply)`` as it arrives; return the silent nodes.

    ``on_reply`` returns True when the reply counts toward the quorum (it was
    valid). Waiting ends when every node has answered, ``round_timeout_s``
    after sending, or ``straggler_timeout_s`` after the ``needed``-th valid
    reply. The node of a reply is the destination of the message it answers
    (the SuperLink, not the node, signs "node unavailable" errors). Messages
    carry a TTL of ``round_timeout_s``, so a node that hung and recovers does
    not work on a round that is over.
    """
    destinations: dict[str, int] = {}
    for message in messages:
        message.metadata.ttl = max(1.0, policy.round_timeout_s)
    pushed = set(grid.push_messages(messages))
    silent = []
    for message in messages:
        message_id = message.metadata.message_id
        if message_id and message_id in pushed:
            destinations[message_id] = message.metadata.dst_node_id
        else:
            log.warning("could not send to node %s", message.metadata.dst_node_id)
            silent.append(message.metadata.dst_node_id)
    pending = set(destinations)
    counted = 0
    started = time.monotonic()
    quorum_at: float | None = None
    while pending:
        check_stop(stop)
        for reply in grid.pull_messages(set(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            pending.discard(message_id)
            if on_reply(destinations[message_id], reply):
                counted += 1
        now = time.monotonic()
        if quorum_at is None and counted >= needed:
            quorum_at = now
        if not pending:
            break
        deadlines = [started + policy.round_timeout_s]
        if quorum_at is not None:
            deadlines.append(quorum_at + policy.straggler_timeout_s)
        if now >= min(deadlines):
            break
        time.sleep(min(POLL_S, min(deadlines) - now))
    return sorted(silent + [destinations[message_id] for message_id in pending])


def train_messages(
    node_ids: list[int],
    config: ExperimentConfig,
    server_round: int,
    global_record: ArrayRecord | None = None,
    restore: dict[int, dict[str, Any]] | None = None,
) -> list[Message]:
    """One ``distill`` message per node: the experiment, the round, the global model when there is one,
    and the ``restore.*`` records of nodes that start without their state."""
    messages = []
    for node in node_ids:
        content = RecordDict({"config": experiment_record(config, "distill", server_round)})
        if global_record is not None:
            content["global"] = global_record
        for key, record in (restore or {}).get(node, {}).items():
            content[RESTORE_PREFIX + key] = record
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    return messages


def partition_label(partition: int) -> str:
    """Client id of a partition's set: sorts in partition order, so aggregates do not depend on node ids."""
    return f"partition-{partition:04d}"


@dataclass
class ClientReply:
    """One validated reply: the set, its checked metrics, the partition it claims, the state it asks to keep."""

    set: SyntheticSet
    metrics: dict[str, Any]
    partition: int
    state: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_reply(reply: Message, limits: ReplyLimits, num_partitions: int) -> ClientReply:
    """Validate one reply; InvalidReply says why it cannot be used.

    Sizes and structure are checked on what Flower has received before any
    array is converted: the whole content against the set limit plus a small
    overhead, each array's ``.npy`` header against the limit
    (``array_to_numpy``), then values (``validate_set_arrays``) and the
    declared metrics against the arrays.
    """
    if reply.has_error():
        raise InvalidReply(client_error(reply.error))
    content = reply.content
    if "set" not in content.array_records or "metrics" not in content.metric_records:
        raise InvalidReply("reply lacks the 'set' arrays or the 'metrics' record")
    total = 0
    for name, value in content.items():
        try:
            total += value.count_bytes()
        except Exception:  # Flower's size count itself fails on some malformed records (e.g. an empty list)
            raise InvalidReply(f"{name}: malformed record") from None
    if total > limits.max_bytes + CONTENT_OVERHEAD_BYTES:
        raise InvalidReply(f"reply: {total} bytes exceeds the limit of {limits.max_bytes + CONTENT_OVERHEAD_BYTES}")
    record = content.array_records["set"]
    size = record.count_bytes()
    if size > limits.max_bytes:
        raise InvalidReply(f"set: {size} bytes exceeds the limit of {limits.max_bytes}")
    for key in record:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            raise InvalidReply(f"{key!r}: unknown key in the reply; allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    arrays = {key: array_to_numpy(array, key, limits.max_bytes) for key, array in record.items()}
    metrics = check_client_metrics(content.metric_records["metrics"], num_partitions)
    declared = {key: metrics[key] for key in ("num-images", "bytes") if key in metrics}
    syn = validate_set_arrays(arrays, limits, declared)
    counts = [int(count) for count in syn.source_counts]
    if "source-counts" in metrics and list(metrics["source-counts"]) != counts:
        raise InvalidReply(f"source-counts: declared {list(metrics['source-counts'])} but the set says {counts}")
    if "num-examples" in metrics and metrics["num-examples"] != sum(counts):
        raise InvalidReply(f"num-examples: declared {metrics['num-examples']} but source_counts sum to {sum(counts)}")
    state = {}
    for name, value in content.items():
        if name.startswith(STATE_PREFIX):
            state[name[len(STATE_PREFIX) :]] = check_client_state(name, value)
    if len(state) > CLIENT_STATE_MAX_RECORDS:
        raise InvalidReply(f"state: {len(state)} kept-state records exceeds the limit of {CLIENT_STATE_MAX_RECORDS}")
    return ClientReply(syn, metrics, metrics[PARTITION_ID], state)


@dataclass
class RoundOutcome:
    """Accepted client sets, why the others were left out (node id -> reason), refusals and privacy records."""

    accepted: list[ClientSet] = field(default_factory=list)
    client_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    partitions: dict[str, int] = field(default_factory=dict)
    state: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, ClientPrivacy] = field(default_factory=dict)


class ReplyCollector:
    """Sorts one round's replies, as they arrive, into accepted sets, logged rejections and missing nodes.

    ``asked`` maps each node asked to the partition the server knows it holds
    (None if unknown): a known node claiming another partition is rejected,
    as is a second reply for a partition already answered this round.
    """

    def __init__(
        self,
        asked: dict[int, int | None],
        limits: ReplyLimits,
        num_partitions: int,
        plan: PrivacyPlan | None = None,
    ) -> None:
        self.asked = asked
        self.plan = plan
        self.limits = limits
        self.num_partitions = num_partitions
        self.outcome = RoundOutcome()
        self._answered: set[int] = set()
        self._by_partition: dict[int, str] = {}

    def add(self, node: int, reply: Message) -> bool:
        """Take one reply to the message sent to ``node``; True if it was accepted."""
        key = str(node)
        if node not in self.asked or node in self._answered:
            log.warning("ignored an unexpected or repeated reply for node %s", node)
            return False
        self._answered.add(node)
        if reply.has_error() and reply.error.code in UNAVAILABLE:
            log.warning("node %s is unavailable: %s", node, reply.error.reason)
            self.outcome.missing.append(key)
            return False
        try:
            if not reply.has_error() and reply.metadata.src_node_id != node:
                raise InvalidReply(f"reply signed by node {reply.metadata.src_node_id}, not by the node asked")
            if self.plan is not None and not reply.has_error():
                self.outcome.privacy[self._privacy_key(node, reply)] = read_privacy(reply, self.plan)
            refusal = refusal_reason(reply)
            if refusal is not None:
                log.info("node %s refused the round: %s", node, refusal)
                self.outcome.refused[key] = refusal
                return False
            client = read_reply(reply, self.limits, self.num_partitions)
            expected = self.asked[node]
            if expected is not None and client.partition != expected:
                raise InvalidReply(f"partition-id: node holds partition {expected} but claims {client.partition}")
            if client.partition in self._by_partition:
                raise InvalidReply(
                    f"partition-id: partition {client.partition} already answered by node {self._by_partition[client.partition]}"
                )
        except InvalidReply as reason:
            log.warning("rejected reply from node %s: %s", node, reason)
            self.outcome.rejected[key] = str(reason)
            return False
        self._by_partition[client.partition] = key
        self.outcome.accepted.append(ClientSet(partition_label(client.partition), client.set))
        self.outcome.client_metrics[key] = client.metrics
        self.outcome.partitions[key] = client.partition
        self.outcome.state[client.partition] = client.state
        return True

    def _privacy_key(self, node: int, reply: Message) -> str:
        """The partition's label for the privacy record (node ids change across restarts), else the node id."""
        partition = self.asked[node]
        if partition is None:
            metrics = reply.content.metric_records.get("metrics", {})
            claimed = metrics.get(PARTITION_ID)
            partition = claimed if isinstance(claimed, int) and 0 <= claimed < self.num_partitions else None
        label = str(node) if partition is None else partition_label(partition)
        return str(node) if label in self.outcome.privacy else label

    def close(self, silent: list[int]) -> RoundOutcome:
        """The outcome, with the nodes that never answered added to ``missing``."""
        for node in silent:
            log.warning("no reply from node %s", node)
            self.outcome.missing.append(str(node))
        self.outcome.missing.sort()
        return self.outcome


def reply_limits(config: ExperimentConfig, test: ImageData) -> ReplyLimits:
    info = test.info
    return ReplyLimits(
        num_classes=info.num_classes,
        image_shape=(info.channels, info.height, info.width),
        max_images=config.distill.ipc * info.num_classes,
        max_bytes=int(config.federation.max_reply_mb * 2**20),
        max_per_class=config.distill.ipc,
    )


def identify(
    grid: GridLike,
    nodes: list[int],
    policy: WaitPolicy,
    num_partitions: int,
    stop: threading.Event | None,
    needed: int | None = None,
) -> dict[int, int]:
    """Ask ``nodes`` which partition each holds (one ``identify`` query each); nodes that do not say are left out.

    The wait ends when all have answered, or ``needed`` (default: all) valid
    answers and the straggler timeout later, or ``round_timeout_s`` after asking.
    """
    found: dict[int, int] = {}

    def on_reply(node: int, reply: Message) -> bool:
        try:
            if reply.has_error():
                raise InvalidReply(f"error {reply.error.code}: {reply.error.reason}")
            if reply.metadata.src_node_id != node or "metrics" not in reply.content.metric_records:
                raise InvalidReply("not an identify reply from the node asked")
            metrics = check_client_metrics(reply.content.metric_records["metrics"], num_partitions)
            if metrics.get(NUM_PARTITIONS) != num_partitions:
                raise InvalidReply(f"num-partitions: node says {metrics.get(NUM_PARTITIONS)!r}, run has {num_partitions}")
        except InvalidReply as reason:
            log.warning("node %s did not identify itself: %s", node, reason)
            return False
        found[node] = metrics[PARTITION_ID]
        return True

    messages = [
        Message(RecordDict({"config": identify_record()}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    exchange(grid, messages, policy, on_reply, needed=len(nodes) if needed is None else needed, stop=stop)
    return found


@dataclass
class KeptState:
    """What the server keeps for one partition so that a node holding it can continue after a restart.

    ``arrays`` is the partition's last accepted set; ``continuable`` says
    whether the node keeps that set to continue from (it does for sets made
    under a global model, i.e. from the second multi-round round on, unless
    ``federation.client_start`` is ``fresh``), which is when the set is given
    back. ``records`` are the ``state.*`` records of its last accepted reply.
    """

    arrays: dict[str, np.ndarray] | None = None
    continuable: bool = False
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def restore_records(self) -> dict[str, Any]:
        """The ``restore.*`` records (names without the prefix) of a train message."""
        out: dict[str, Any] = {}
        if self.arrays is not None and self.continuable:
            out[PREVIOUS_SET] = ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in self.arrays.items()})
        for key, record in self.records.items():
            kind = ConfigRecord if record["kind"] == "config" else MetricRecord
            out[key] = kind(dict(record["values"]))
        return out


@dataclass
class ServerState:
    """Everything that carries from one round to the next: what a checkpoint holds."""

    history: RunHistory
    completed: int = 0
    global_model: torch.nn.Module | None = None
    aggregate: SyntheticSet | None = None
    evaluation: dict[str, Any] | None = None
    kept: dict[int, KeptState] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    """The server's privacy record (``PrivacyRecorder.to_state``); empty in a run without privacy."""
    defense: list[dict[str, Any]] = field(default_factory=list)
    """Per round, what the set defence (``attack.defense.method``) removed."""
    earlier: list[AggregateResult] = field(default_factory=list)
    """The aggregates (before soft labels) of the rounds before the last that the next round still trains on
    (``federation.aggregate_window`` - 1 of them at most), oldest first, on the CPU."""

    def to_checkpoint(self, config: ExperimentConfig) -> Checkpoint:
        checkpoint = Checkpoint(self.completed)
        if self.global_model is not None:
            checkpoint.put("global", dict(self.global_model.state_dict()))
        if self.aggregate is not None:
            checkpoint.put("aggregate", {k: torch.from_numpy(v) for k, v in self.aggregate.to_arrays().items()})
        for index, result in enumerate(self.earlier):
            arrays = {k: torch.from_numpy(np.array(v)) for k, v in result.set.to_arrays().items()}  # copies: may share the aggregate's memory
            if result.weights is not None:
                arrays[EARLIER_WEIGHTS] = result.weights.cpu().clone()
            checkpoint.put(f"earlier/{index}", arrays)
        for partition, kept in self.kept.items():
            if kept.arrays is not None:
                checkpoint.put(f"kept/{partition}", {k: torch.from_numpy(np.array(v)) for k, v in kept.arrays.items()})
        checkpoint.state = {
            "protocol": self.history.protocol,
            "experiment": experiment_fingerprint(config),
            "history": self.history.to_dict(),
            "evaluation": self.evaluation,
            "kept_records": {str(p): kept.records for p, kept in self.kept.items() if kept.records},
            "kept_continuable": sorted(p for p, kept in self.kept.items() if kept.continuable),
            "privacy": self.privacy,
            "defense": self.defense,
        }
        return checkpoint

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, config: ExperimentConfig, model: Callable[[], torch.nn.Module], num_classes: int
    ) -> ServerState:
        document = checkpoint.state
        state = cls(
            RunHistory.from_dict(document["history"]),
            checkpoint.round,
            evaluation=document.get("evaluation"),
            privacy=document.get("privacy") or {},
            defense=document.get("defense") or [],
        )
        weights = checkpoint.section("global")
        if weights:
            state.global_model = model()
            device = next(state.global_model.parameters()).device
            state.global_model.load_state_dict({key: value.to(device) for key, value in weights.items()})
        aggregate = checkpoint.section("aggregate")
        if aggregate:
            state.aggregate = SyntheticSet.from_arrays({k: v.numpy() for k, v in aggregate.items()}, num_classes)
        earlier = sorted({int(key.split("/")[1]) for key in checkpoint.tensors if key.startswith("earlier/")})
        for index in earlier:
            arrays = {k: v.numpy() for k, v in checkpoint.section(f"earlier/{index}").items()}
            weights = arrays.pop(EARLIER_WEIGHTS, None)
            state.earlier.append(AggregateResult(
                SyntheticSet.from_arrays(arrays, num_classes), None if weights is None else torch.from_numpy(weights)
            ))
        partitions = {int(key.split("/")[1]) for key in checkpoint.tensors if key.startswith("kept/")}
        for partition in partitions:
            arrays = {k: v.numpy() for k, v in checkpoint.section(f"kept/{partition}").items()}
            state.kept[partition] = KeptState(arrays, partition in document.get("kept_continuable", []))
        for partition, records in document.get("kept_records", {}).items():
            state.kept.setdefault(int(partition), KeptState()).records = records
        return state


def resume_hint(run_dir: Path) -> str:
    return (
        f"the run directory {run_dir} holds every complete round; continue it with "
        f"`fedistill run --resume {run_dir}` (or `flwr run` with --run-config \"resume='{run_dir}'\")"
    )


def check_resumable(checkpoint: Checkpoint, config: ExperimentConfig, path: Path) -> None:
    """Refuse to continue a checkpoint with an experiment other than the one that wrote it."""
    saved = checkpoint.state.get("experiment", {})
    current = experiment_fingerprint(config)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{path}: {key} was {saved.get(key)!r} when the run started but is {current.get(key)!r} now; "
                "only operational keys (timeouts, quorum, min_clients, device) may change on resume"
            )


class DistillationRun:
    """One distillation run: its fixed context (config, test split, limits) and the state that rounds advance."""

    def __init__(
        self,
        grid: GridLike,
        config: ExperimentConfig,
        console: Console,
        run_dir: Path,
        test: ImageData,
        device: torch.device,
        state: ServerState,
        stop: threading.Event | None,
    ) -> None:
        self.grid = grid
        self.config = config
        self.console = console
        self.run_dir = run_dir
        self.test = test
        self.device = device
        self.state = state
        self.stop = stop
        self.test_x = test.normalized(device)
        self.test_y = torch.from_numpy(test.labels).to(device)
        self.limits = reply_limits(config, test)
        self.settings = TrainSettings.from_config(config.eval, config.data.name)
        self.policy = WaitPolicy.from_config(config)
        self.num_partitions = config.partition.num_clients
        self.node_partition: dict[int, int] = {}
        """Node id -> partition, learnt from accepted replies and identify queries; node ids are per process."""
        self.seen: set[int] = set()
        """Nodes asked before: only never-seen nodes are identified (a seen node that failed is not asked again)."""
        self.went_missing: set[int] = set()
        """Nodes that did not answer the last round they were asked: they may come back restarted, state lost."""
        self.nodes_seen = 0
        self.privacy = PrivacyRecorder.start(config, console)
        if self.privacy is not None and state.privacy:
            self.privacy.load_state(state.privacy)
        self.stopped_early: str | None = None

    def write_privacy(self) -> None:
        if self.privacy is not None:
            self.privacy.write(self.run_dir)

    def round_dir(self, server_round: int) -> Path:
        return self.run_dir / ("clients" if self.config.federation.rounds == 1 else f"round-{server_round:03d}")

    def restore_for(self, nodes: list[int]) -> dict[int, dict[str, Any]]:
        """``restore.*`` records for the nodes that start without their state; identifies never-seen nodes first.

        A node of known partition that went missing in the last round it was
        asked gets its state again too: it may have been restarted under the
        same node id (SuperNode authentication ties the id to the key); one
        that kept its state keeps it (``restore_into`` never overwrites). A
        restart between two rounds under the same id goes unnoticed until the
        node reports ``continued`` = 0, which is logged.
        """
        unknown = [node for node in nodes if node not in self.seen]
        self.seen.update(nodes)
        if not any(kept.continuable or kept.records for kept in self.state.kept.values()):
            return {}
        if unknown:
            self.console.print(f"asking {len(unknown)} new nodes which partition they hold")
            self.node_partition.update(identify(self.grid, unknown, self.policy, self.num_partitions, self.stop))
            claimed: dict[int, list[int]] = {}
            for node in unknown:
                if node in self.node_partition:
                    claimed.setdefault(self.node_partition[node], []).append(node)
            for partition, claimants in claimed.items():
                if len(claimants) > 1:
                    log.warning("nodes %s all claim partition %d; none gets its state back", claimants, partition)
                    for node in claimants:
                        del self.node_partition[node]
        returning = [node for node in nodes if node in self.went_missing and node not in unknown]
        targets = [node for node in unknown + returning if node in self.node_partition]
        restore = {}
        for node in targets:
            kept = self.state.kept.get(self.node_partition[node])
            records = {} if kept is None else kept.restore_records()
            if records:
                restore[node] = records
        return restore

    def run_round(self, server_round: int) -> RoundRecord:
        """Ask every connected node for a set, keep the valid ones, aggregate, train and test the global model."""
        config, federation, state = self.config, self.config.federation, self.state
        started = time.perf_counter()
        nodes = wait_for_nodes(self.grid, federation.min_clients, federation.round_timeout_s, stop=self.stop)
        self.nodes_seen = max(self.nodes_seen, len(nodes))
        restore = self.restore_for(nodes)
        asked = {node: self.node_partition.get(node) for node in nodes}
        global_record = None if state.global_model is None else state_to_record(state.global_model.state_dict())
        self.console.print(
            f"round {server_round}/{federation.rounds}: asking {len(nodes)} nodes for "
            f"IPC-{config.distill.ipc} {config.distill.method} sets"
            + ("" if global_record is None else " under the global model")
            + (f" ({len(restore)} get their kept state back)" if restore else "")
        )
        messages = train_messages(nodes, config, server_round, global_record, restore)
        download = sum(
            record.count_bytes() for message in messages for name, record in message.content.items() if name != "config"
        )
        needed = self.policy.needed(len(nodes))
        collector = ReplyCollector(asked, self.limits, self.num_partitions,
                                   None if self.privacy is None else self.privacy.plan)
        silent = exchange(self.grid, messages, self.policy, collector.add, needed, self.stop)
        outcome = collector.close(silent)
        self.went_missing = (self.went_missing - set(nodes)) | {int(node) for node in outcome.missing}
        if self.privacy is not None:
            for client_key, client in outcome.privacy.items():
                self.privacy.observe(server_round, client_key, client)
        if len(outcome.accepted) < needed and outcome.refused:
            raise BudgetExhausted(
                f"round {server_round}: {len(outcome.refused)} node(s) refused (privacy budget spent), "
                f"{len(outcome.accepted)} valid sets, need {needed}"
            )
        if len(outcome.accepted) < needed:
            raise NotEnoughClients(
                f"round {server_round}: {len(outcome.accepted)} valid sets from {len(nodes)} nodes asked, need {needed} "
                f"(federation.min_clients = {federation.min_clients}, federation.quorum = {federation.quorum}); "
                f"missing: {', '.join(outcome.missing) or 'none'}; rejected: {', '.join(outcome.rejected) or 'none'}"
            )
        check_stop(self.stop)
        for node, partition in outcome.partitions.items():
            self.node_partition[int(node)] = partition
            metrics = outcome.client_metrics[node]
            kept = state.kept.get(partition)
            if metrics.get("continued") == 0 and kept is not None and kept.continuable:
                log.warning("node %s (partition %d) lost its previous set and started afresh", node, partition)
        round_dir = self.round_dir(server_round)
        round_dir.mkdir(exist_ok=True)
        for client in outcome.accepted:
            client.set.save(round_dir / f"{client.client_id}.safetensors")
        aggregate, defense = aggregate_round(outcome.accepted, config, self.test, self.device)
        if defense is not None:
            state.defense.append({"round": server_round, **defense})
        window = [*state.earlier, aggregate]
        training = merge_rounds(window, AggregationContext(self.test.info.num_classes, self.device, config.seed)) \
            if len(window) > 1 else aggregate
        aggregate_set = training.set
        if federation.soft_labels and state.global_model is not None:
            aggregate_set = soft_label(aggregate_set, state.global_model)
        aggregate_set.save(self.run_dir / "aggregate.safetensors")
        seed = config.seed + EVAL_SEED_OFFSET
        if federation.protocol == "one-shot":
            kept_models: list[torch.nn.Module] = []
            result = evaluate_set(
                aggregate_set, self.test_x, self.test_y, config.model.spec(), self.settings, self.device, seed=seed,
                num_nets=config.eval.num_nets, sample_weights=training.weights,
                on_model=lambda index, model: kept_models.append(model) if index == 0 else None,
            )
            state.global_model = kept_models[0]
            state.evaluation = result.to_dict()
            accuracy = result.mean
            _, loss = evaluate_model(state.global_model, self.test_x, self.test_y)
        else:
            state.global_model = state.global_model or fresh_model(config, self.test, self.device, seed)
            generator = torch.Generator().manual_seed(seed + server_round)
            weights = training.weights
            on_device = aggregate_set.to(self.device)
            train_model(state.global_model, on_device.images, on_device.labels, self.settings, generator,
                        on_device.soft_labels, None if weights is None else weights.to(self.device))
            accuracy, loss = evaluate_model(state.global_model, self.test_x, self.test_y)
        for client in outcome.accepted:
            partition = int(client.client_id.removeprefix("partition-"))
            kept = state.kept.setdefault(partition, KeptState())
            kept.arrays = client.set.to_arrays()
            kept.continuable = global_record is not None and federation.client_start == "previous"
            kept.records.update(outcome.state.get(partition, {}))
        state.aggregate = aggregate_set
        keep = federation.aggregate_window - 1
        state.earlier = [
            AggregateResult(result.set.to("cpu"), None if result.weights is None else result.weights.cpu())
            for result in window[-keep:]
        ] if keep else []
        seconds = time.perf_counter() - started
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            upload_bytes=sum(client.set.nbytes() for client in outcome.accepted),
            download_bytes=download,
            seconds=seconds,
            accepted=len(outcome.accepted),
            rejected=outcome.rejected,
            refused=outcome.refused,
            missing=outcome.missing,
            client_seconds={node: float(m.get("seconds", 0.0)) for node, m in outcome.client_metrics.items()},
            asked=len(nodes),
            partitions=sorted(outcome.partitions.values()),
        )
        self.console.print(
            f"round {server_round}: {record.accepted}/{len(nodes)} sets, {len(aggregate_set)} images"
            + (f" from the last {len(window)} rounds" if len(window) > 1 else "")
            + f", accuracy {100 * accuracy:.2f}%, {seconds:.0f} s"
            + (f"; missing nodes: {', '.join(outcome.missing)}" if outcome.missing else "")
            + (f"; rejected: {', '.join(outcome.rejected)}" if outcome.rejected else "")
        )
        line = None if self.privacy is None else self.privacy.round_line(server_round)
        if line is not None:
            self.console.print(line, markup=False, highlight=False)
        return record

    def summary(self, status: str, **extra: Any) -> dict[str, Any]:
        config, history = self.config, self.state.history
        return {
            "status": status,
            "protocol": config.federation.protocol,
            "aggregation": config.federation.aggregation,
            "method": config.distill.method,
            "ipc": config.distill.ipc,
            "nodes": history.rounds[-1].asked if history.rounds else self.nodes_seen,
            "accepted": history.rounds[-1].accepted if history.rounds else 0,
            "completed_rounds": self.state.completed,
            "upload_bytes": sum(r.upload_bytes for r in history.rounds),
            "aggregate_images": 0 if self.state.aggregate is None else len(self.state.aggregate),
            "final_accuracy": history.final_accuracy() if history.rounds else None,
            "eval": self.state.evaluation,
            "device": str(self.device),
            **({} if self.stopped_early is None else {"stopped_early": self.stopped_early}),
            **({} if self.privacy is None else {"privacy": self.privacy.summary()}),
            **({"defense": self.state.defense} if self.state.defense else {}),
            **extra,
        }

    def checkpoint(self, server_round: int, record: RoundRecord) -> None:
        """Make the round durable: checkpoint first (what a resume reads), then the human-facing metrics."""
        self.state.history.add(record)
        self.state.completed = server_round
        if self.privacy is not None:
            self.state.privacy = self.privacy.to_state()
            self.write_privacy()
        save_checkpoint(self.run_dir, self.state.to_checkpoint(self.config))
        write_history(self.run_dir, self.state.history, self.summary("running"))

    def finish(self) -> dict[str, Any]:
        """Final artefacts of a run whose every round is checkpointed."""
        state = self.state
        assert state.global_model is not None and state.aggregate is not None
        save_tensors(self.run_dir / "global_model.safetensors", dict(state.global_model.state_dict()))
        save_class_grids(state.aggregate, self.test.info, self.run_dir / "grids")
        summary = self.summary("completed")
        write_history(self.run_dir, state.history, summary)
        self.write_privacy()
        return summary


def run_distillation(
    grid: GridLike, config: ExperimentConfig, console: Console | None = None, control: RunControl | None = None
) -> Path:
    """Run the one-shot or multi-round protocol, or continue one (``control.resume``); returns the run directory.

    Each round asks every connected node for a set, keeps the valid ones,
    aggregates them, and trains the global model on the aggregate with the
    evaluation protocol, then tests it on the held-out split. In multi-round
    runs the global model goes back to the nodes, which match under perturbed
    copies of it and continue from their previous set (FedDM), and the
    server keeps training the same global model. A one-shot run also trains
    ``eval.num_nets`` fresh networks on its aggregate and reports mean ± std.

    After every round the server state goes into ``checkpoint.safetensors``;
    a resumed run starts after the checkpoint's round and, with the same
    config, ends exactly where the uninterrupted run would have (every random
    draw comes from the config's seed, the round and the partition). If the
    run stops early (too few valid replies, a stop request, an error),
    ``metrics.json`` says so and how to resume, and the error is re-raised.
    """
    from fedistill.budget import check_memory

    console = console or Console()
    control = control or RunControl()
    federation = config.federation
    if federation.protocol not in ("one-shot", "multi-round"):
        raise ValueError(f"run_distillation: protocol {federation.protocol!r} is not a distillation protocol")
    device = pick_device(config.device)
    test = load_dataset(config.data.name, "test", root=config.data.root, path=config.data.path)
    check_memory(config, test.info)
    seed = config.seed + EVAL_SEED_OFFSET
    if control.resume is None:
        run_dir = create_run_dir(
            config.output_dir, f"fed-{test.info.name}-{federation.protocol}-{config.distill.method}-ipc{config.distill.ipc}"
        )
        save_config(run_dir, config)
        state = ServerState(RunHistory(federation.protocol))
    else:
        run_dir = Path(control.resume)
        state = resumed_state(run_dir, config, lambda: fresh_model(config, test, device, seed), test.info.num_classes)
        discard_unfinished_rounds(run_dir, state.completed, federation.rounds)
        console.print(f"resuming {run_dir} after round {state.completed}/{federation.rounds}")
    if control.on_start is not None:
        control.on_start(run_dir)
    run = DistillationRun(grid, config, console, run_dir, test, device, state, control.stop)
    try:
        for server_round in range(state.completed + 1, federation.rounds + 1):
            try:
                record = run.run_round(server_round)
            except BudgetExhausted as spent:
                if state.global_model is None:
                    raise
                run.stopped_early = f"{spent}; the run ends after round {server_round - 1}"
                log.warning(run.stopped_early)
                console.print(run.stopped_early, markup=False, highlight=False)
                break
            run.checkpoint(server_round, record)
        summary = run.finish()
    except (NotEnoughClients, RunInterrupted) as error:
        status = "interrupted" if isinstance(error, RunInterrupted) else "failed"
        run.write_privacy()
        write_history(run_dir, state.history, run.summary(status, reason=str(error), resume=resume_hint(run_dir)))
        console.print(f"{status}: {error}\n{resume_hint(run_dir)}", markup=False, highlight=False)
        raise type(error)(f"{error}; {resume_hint(run_dir)}") from None
    console.print(_summary(summary, run_dir))
    if run.privacy is not None:
        console.print(run.privacy.final_line(), markup=False, highlight=False)
    return run_dir


def load_resumable(run_dir: Path, config: ExperimentConfig) -> Checkpoint | None:
    """The run's checkpoint after checking it belongs to ``config`` (None: no round completed yet); RNGs restored."""
    if not (Path(run_dir) / "config.toml").is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.toml)")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        return None
    check_resumable(checkpoint, config, run_dir)
    if checkpoint.state.get("protocol") != config.federation.protocol:
        raise CheckpointError(f"{run_dir}: checkpoint of protocol {checkpoint.state.get('protocol')!r}")
    if checkpoint.round > config.federation.rounds:
        raise CheckpointError(f"{run_dir}: checkpoint after round {checkpoint.round} of {config.federation.rounds}")
    restore_rng(checkpoint)
    return checkpoint


def resumed_state(
    run_dir: Path, config: ExperimentConfig, model: Callable[[], torch.nn.Module], num_classes: int
) -> ServerState:
    """The state after the run's last complete round (a fresh one if it has no checkpoint yet)."""
    checkpoint = load_resumable(run_dir, config)
    if checkpoint is None:
        return ServerState(RunHistory(config.federation.protocol))
    return ServerState.from_checkpoint(checkpoint, config, model, num_classes)


def discard_unfinished_rounds(run_dir: Path, completed: int, rounds: int) -> None:
    """Remove the client sets of rounds after the checkpoint: written by the attempt that was stopped."""
    names = ["clients"] if rounds == 1 and completed == 0 else []
    names += [f"round-{r:03d}" for r in range(completed + 1, rounds + 1)]
    for name in names:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)


def aggregate_round(
    clients: list[ClientSet], config: ExperimentConfig, test: ImageData, device: torch.device,
    defense: str | None = None,
) -> tuple[AggregateResult, dict[str, Any] | None]:
    """The round's aggregate: the defence (``defense``, default ``attack.defense.method``) filters the
    client sets, then the aggregation rule combines what is left. Also returns the defence's report."""
    method = config.attack.defense.method if defense is None else defense
    clients = sorted(clients, key=lambda client: client.client_id)  # partition order, whatever the arrival order
    report = None
    if method != "none":
        result, report = defend_sets([client.set for client in clients], config, device, method)
        report["clients"] = [client.client_id for client in clients]
        clients = [ClientSet(client.client_id, kept) for client, kept in zip(clients, result.kept) if len(kept)]
        log.info("defense %s removed %s images", method, report["removed"])
    return get_aggregator(config.federation.aggregation)(clients, _aggregation_context(config, test, device)), report


def fresh_model(config: ExperimentConfig, test: ImageData, device: torch.device, seed: int) -> torch.nn.Module:
    """The global model before any training, initialised from ``seed`` without touching the global RNG."""
    info = test.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model.spec(), (info.channels, info.height, info.width), info.num_classes)
    return model.to(device)


def _aggregation_context(config: ExperimentConfig, test: ImageData, device: torch.device) -> AggregationContext:
    num_classes = test.info.num_classes

    def redistill(images: torch.Tensor, labels: torch.Tensor, ipc: int) -> SyntheticSet:
        settings = replace(config.distill.settings(config.data.name), ipc=ipc)
        method = get_distiller(config.distill.method)
        if method.private:  # the client sets are already public: re-distilling them needs no privacy
            method = get_distiller(method.public_counterpart(settings))  # type: ignore[attr-defined]
        distiller = method(config.model.spec(), settings, device)
        return distiller(images, labels, num_classes, seed=config.seed)

    return AggregationContext(
        num_classes=num_classes,
        device=device,
        seed=config.seed,
        server_ipc=config.federation.server_ipc,
        redistill=redistill,
    )


def _summary(summary: dict[str, Any], run_dir: Path) -> Table:
    table = Table(title=f"{summary['protocol']} federated distillation", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("clients", f"{summary['accepted']} of {summary['nodes']} accepted in the last round")
    table.add_row("upload", f"{summary['upload_bytes']:,} bytes in all; {summary['aggregate_images']} images aggregated")
    evaluation = summary.get("eval")
    if evaluation is not None:
        accuracy = f"{100 * evaluation['mean']:.2f} ± {100 * evaluation['std']:.2f} % over {evaluation['num_nets']} nets"
    else:
        accuracy = f"{100 * summary['final_accuracy']:.2f} % (global model)"
    table.add_row("global accuracy", accuracy)
    table.add_row("run directory", str(run_dir))
    return table
