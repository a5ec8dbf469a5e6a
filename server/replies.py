"""What a distillation round sends and how it reads what comes back.

``train_messages`` builds one ``distill`` message per node (the experiment,
the round, the global model, any state to restore). Every reply is
untrusted: ``read_reply`` checks sizes and structure on what Flower received
before any array is converted, then values and declared metrics
(``server.validation``), and ``ReplyCollector`` sorts a round's replies, as
they arrive, into accepted sets, logged rejections, refusals and missing
nodes (``RoundOutcome``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from fedistill.aggregation import ClientSet
from fedistill.config import ExperimentConfig
from fedistill.data import ImageData
from fedistill.privacy import PrivacyPlan
from fedistill.synthetic import SyntheticSet
from server.privacy import ClientPrivacy, read_privacy, refusal_reason
from server.rounds import UNAVAILABLE, partition_label
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
from wire.messages import INIT_ROWS, PARTITION_ID, RESTORE_PREFIX, STATE_PREFIX, experiment_record

log = logging.getLogger("fedistill.server")

CONTENT_OVERHEAD_BYTES = CLIENT_STATE_MAX_RECORDS * CLIENT_STATE_LIMIT_BYTES + 2**20
"""What a reply may carry beside its set (metrics, kept state), before its arrays are read."""


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
    if INIT_ROWS in metrics:
        if len(metrics[INIT_ROWS]) > len(syn) * syn.factor**2:
            raise InvalidReply(f"init-rows: {len(metrics[INIT_ROWS])} rows for a set of {len(syn) * syn.factor**2} images")
        syn.provenance["init_rows"] = metrics[INIT_ROWS]  # kept with the set in the run directory for the audit
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
        factor=config.distill.factor,
    )
