"""Flower's FedAvg-family strategies with what the baselines' harness needs and Flower leaves out.

A thin mixin (``Harness``) goes before Flower's strategy class; it overrides
only ``configure_train`` and ``aggregate_train``, and both call the
strategy's own method, so Flower's sampling, messages, weighted averaging
and logging stay as they are. It adds:

- bookkeeping: download bytes and the nodes asked (``configure_train``),
  upload bytes, accepted/rejected/missing nodes and client seconds
  (``aggregate_train``), in a ``RoundLedger`` the central evaluation closes;
- validation: Flower's ``aggregate_train`` trusts reply contents. A reply
  whose arrays differ in shape silently broadcasts or raises, a NaN poisons
  the average, a zero or negative ``num-examples`` divides by zero or flips
  the average, and replies whose records differ in keys raise
  ``InconsistentMessageReplies``, which ends ``Strategy.start``. So every
  reply is checked against the global model first (``check_fit_reply``); bad
  ones are logged with their node and reason and left out, as in
  ``server.replies``. Replies carrying an error go on to Flower, which logs
  them itself. Accepted replies are averaged in partition order, so the sum
  does not depend on arrival order or node ids;
- sampling: with ``federation.fraction_train`` < 1, Flower's
  ``random.sample``, seeded from (seed, round) just before it draws
  (``python_random``), picks from the node ids in partition order, so a seed
  asks the same partitions in every launch and after a resume although the
  node ids are new each time.

``robust_strategy`` swaps FedAvg for Flower's robust aggregators (the model
defences of ``attack.defense.method``).
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from fedistill.config import ExperimentConfig
from server.privacy import PrivacyRecorder, read_privacy, refusal_reason
from server.rounds import UNAVAILABLE, BudgetExhausted, NotEnoughClients, WaitPolicy, partition_label, wait_for_nodes
from server.validation import InvalidReply, array_to_numpy, check_client_metrics, client_error
from wire.messages import PARTITION_ID

log = logging.getLogger("fedistill.server")

NOT_AVERAGED = ("partition-id",)
"""Reply metrics that identify a node rather than measure it; Flower would average them too."""


@dataclass
class RoundLedger:
    """What one baseline round sent and received; filled by the strategy, closed by the evaluation."""

    started: float = 0.0
    asked: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    download_bytes: int = 0
    upload_bytes: int = 0
    accepted: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    client_seconds: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


class ArraySpec(dict[str, tuple[tuple[int, ...], np.dtype]]):
    """Key -> (shape, dtype) of the global model's arrays: what every reply must match."""

    @classmethod
    def of(cls, record: ArrayRecord) -> ArraySpec:
        spec = cls()
        for key, array in record.items():
            value = array.numpy()
            spec[key] = (tuple(value.shape), value.dtype)
        return spec


def check_fit_reply(
    reply: Message, spec: ArraySpec, arrays_key: str, max_bytes: int, num_partitions: int
) -> dict[str, Any]:
    """The reply's metrics if its content can be averaged into the global model; InvalidReply says why not.

    Structure and size are checked before any array is deserialised, so an
    oversized reply costs no memory; each array's ``.npy`` header is read
    before its data (``array_to_numpy``).
    """
    content = reply.content
    if list(content.array_records) != [arrays_key] or len(content.metric_records) != 1:
        raise InvalidReply(
            f"reply must hold exactly the '{arrays_key}' arrays and one metrics record; "
            f"got arrays {sorted(content.array_records)} and metrics {sorted(content.metric_records)}"
        )
    metrics = check_client_metrics(next(iter(content.metric_records.values())), num_partitions)
    examples = metrics.get("num-examples")
    if not _is_number(examples) or examples <= 0:
        raise InvalidReply(f"num-examples: must be a positive finite number, got {examples!r}")
    record = content.array_records[arrays_key]
    size = record.count_bytes()
    if size > max_bytes:
        raise InvalidReply(f"{arrays_key}: {size} bytes exceeds the limit of {max_bytes}")
    if set(record) != set(spec):
        missing, extra = sorted(set(spec) - set(record)), sorted(set(record) - set(spec))
        raise InvalidReply(f"{arrays_key}: keys differ from the global model (missing {missing}, unexpected {extra})")
    for key, array in record.items():
        shape, dtype = spec[key]
        if tuple(array.shape) != shape or array.dtype != str(dtype):
            raise InvalidReply(
                f"{key}: declared {array.dtype}{list(array.shape)}, the global model has {dtype}{list(shape)}"
            )
        value = array_to_numpy(array, key, max_bytes)
        if value.shape != shape or value.dtype != dtype:
            raise InvalidReply(
                f"{key}: holds {value.dtype}{list(value.shape)}, the global model has {dtype}{list(shape)}"
            )
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise InvalidReply(f"{key}: weights must be finite (found NaN or inf)")
    return metrics


class Harness:
    """Bookkeeping and validation around a Flower FedAvg-family strategy; mixed in before the strategy class.

    Only ``configure_train`` and ``aggregate_train`` are overridden, and both
    call the strategy's own method, so Flower's sampling, messages, weighted
    averaging and logging stay as they are.
    """

    arrayrecord_key: str

    def __init__(
        self,
        *,
        spec: ArraySpec,
        policy: WaitPolicy,
        max_reply_bytes: int,
        num_partitions: int,
        round_offset: int = 0,
        sampling_seed: int = 0,
        stop: threading.Event | None = None,
        privacy: PrivacyRecorder | None = None,
        **strategy: Any,
    ) -> None:
        """``spec`` describes the global model's arrays; ``strategy`` goes to the Flower strategy unchanged.

        ``privacy`` records DP-FedAvg ledgers and refusals.

        ``round_offset`` is the number of rounds a resumed run already has:
        Flower's loop counts from 1 again, the nodes and the records see the
        run's own round numbers. ``sampling_seed`` and the round seed Flower's
        node sampling (see ``configure_train``).
        """
        super().__init__(**strategy)
        self.privacy = privacy
        self.spec = spec
        self.policy = policy
        self.min_clients = policy.min_clients
        self.max_reply_bytes = max_reply_bytes
        self.num_partitions = num_partitions
        self.round_offset = round_offset
        self.sampling_seed = sampling_seed
        self.stop = stop
        self.ledger = RoundLedger()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.ledger = RoundLedger(started=time.perf_counter())
        # Flower's sampling would wait forever for min_available_nodes; wait here with a deadline.
        wait_for_nodes(grid, self.min_clients, self.policy.round_timeout_s, stop=self.stop)
        run_round = server_round + self.round_offset
        # Flower samples with the global `random`, which its heartbeat, retry and pull jitter also
        # draw from, a timing-dependent number of times: seed it from (seed, round) just before the
        # draw, after identifying new nodes (that exchange polls too), so every launch asks the same.
        grid.get_node_ids()
        with python_random(self.sampling_seed * 1_000_003 + run_round):
            messages = list(super().configure_train(run_round, arrays, config, grid))  # type: ignore[misc]
        self.ledger.asked = [str(message.metadata.dst_node_id) for message in messages]
        self.ledger.download_bytes = arrays.count_bytes() * len(messages)
        self.ledger.messages = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        ledger = self.ledger
        replies = list(replies)
        # The node a reply is for is the destination of the message it answers: the SuperLink,
        # not the node, signs the "node unavailable" errors.
        destination = {message.metadata.message_id: str(message.metadata.dst_node_id) for message in ledger.messages}
        kept: list[Message] = []
        accepted: list[tuple[int, Message, dict[str, Any]]] = []
        seen: set[str] = set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, str(reply.metadata.src_node_id))
            if node in seen:
                log.warning("round %d: ignored a second reply from node %s", server_round, node)
                continue
            try:
                if node not in ledger.asked:
                    raise InvalidReply("this node was not asked in this round")
                seen.add(node)
                if reply.has_error() and reply.error.code in UNAVAILABLE:
                    log.warning("round %d: node %s is unavailable: %s", server_round, node, reply.error.reason)
                    seen.discard(node)
                    continue
                if reply.has_error():
                    # Flower's aggregate_train logs these itself and leaves them out.
                    ledger.rejected[node] = client_error(reply.error)
                    kept.append(reply)
                    continue
                if str(reply.metadata.src_node_id) != node:
                    raise InvalidReply(f"reply signed by node {reply.metadata.src_node_id}, not by the node asked")
                refusal = refusal_reason(reply)
                if self.privacy is not None:
                    self.privacy.observe(server_round, _privacy_key(reply, node, self.num_partitions),
                                         read_privacy(reply, self.privacy.plan))
                if refusal is not None:
                    log.info("round %d: node %s refused: %s", server_round, node, refusal)
                    ledger.refused[node] = refusal
                    continue
                metrics = check_fit_reply(
                    reply, self.spec, self.arrayrecord_key, self.max_reply_bytes, self.num_partitions
                )
                if any(metrics[PARTITION_ID] == partition for partition, _, _ in accepted):
                    raise InvalidReply(f"partition-id: partition {metrics[PARTITION_ID]} already answered this round")
            except InvalidReply as reason:
                log.warning("round %d: rejected reply from node %s: %s", server_round, node, reason)
                ledger.rejected[node] = str(reason)
                continue
            accepted.append((metrics[PARTITION_ID], reply, metrics))
            ledger.accepted.append(node)
            ledger.partitions.append(metrics[PARTITION_ID])
            ledger.upload_bytes += reply.content.array_records[self.arrayrecord_key].count_bytes()
            seconds = metrics.get("seconds", 0.0)
            ledger.client_seconds[node] = float(seconds) if _is_number(seconds) else 0.0
        ledger.missing = sorted(set(ledger.asked) - seen)
        for node in ledger.missing:
            log.warning("round %d: no reply from node %s", server_round, node)
        if len(ledger.accepted) < self.min_clients:
            error = BudgetExhausted if ledger.refused else NotEnoughClients
            refused = f", {len(ledger.refused)} node(s) refused (privacy budget spent)" if ledger.refused else ""
            raise error(
                f"round {server_round}: {len(ledger.accepted)} valid replies{refused}, "
                f"need federation.min_clients = {self.min_clients}"
            )
        accepted.sort(key=lambda item: item[0])
        accepted_metrics = [metrics for _, _, metrics in accepted]
        _same_metric_keys([reply for _, reply, _ in accepted], accepted_metrics)
        kept = [reply for _, reply, _ in accepted] + kept
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        return (None if arrays is None else self._in_global_dtypes(arrays)), metrics

    def _in_global_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Flower's average of integer buffers comes back as float64; keep the global model's dtypes."""
        if all(array.dtype == str(self.spec[key][1]) for key, array in arrays.items()):
            return arrays
        out = {}
        for key, array in arrays.items():
            value = array.numpy()
            dtype = self.spec[key][1]
            if value.dtype != dtype:
                value = (np.rint(value) if dtype.kind in "iub" else value).astype(dtype)
            out[key] = Array(np.ascontiguousarray(value))
        return ArrayRecord(out)


class HarnessFedAvg(Harness, FedAvg):
    """Flower's FedAvg with the harness's bookkeeping and reply validation."""


class HarnessFedProx(Harness, FedProx):
    """Flower's FedProx (sends ``proximal-mu`` to the nodes) with the harness's bookkeeping and validation."""


class HarnessKrum(Harness, Krum):
    """Flower's Krum (keeps the one reply closest to its neighbours) with the harness's bookkeeping and validation."""


class HarnessFedMedian(Harness, FedMedian):
    """Flower's FedMedian (coordinate-wise median) with the harness's bookkeeping and validation."""


class HarnessFedTrimmedAvg(Harness, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean) with the harness's bookkeeping and validation."""


def robust_strategy(config: ExperimentConfig, common: dict[str, Any]) -> Harness:
    """FedAvg replaced by the robust aggregator ``attack.defense.method`` names (krum, fedmedian, fedtrimmedavg)."""
    defense = config.attack.defense
    if defense.method == "krum":
        return HarnessKrum(**common, num_malicious_nodes=defense.assumed_malicious)
    if defense.method == "fedmedian":
        return HarnessFedMedian(**common)
    if defense.method == "fedtrimmedavg":
        return HarnessFedTrimmedAvg(**common, beta=defense.trim_beta)
    raise ValueError(
        f"attack.defense.method: {defense.method!r} is not a robust aggregator; allowed: krum, fedmedian, fedtrimmedavg"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _same_metric_keys(replies: list[Message], metrics: list[dict[str, Any]]) -> None:
    """Keep, in every accepted reply, only the finite scalar metrics that all of them report.

    Flower refuses (raises, ending the run) replies whose metrics differ in
    keys, and averages every key, identifiers included; the harness reads the
    metrics it records before this trims them.
    """
    common = set.intersection(*(set(m) for m in metrics)) - set(NOT_AVERAGED)
    keep = sorted(key for key in common if all(_is_number(m[key]) for m in metrics))
    for reply, values in zip(replies, metrics, strict=True):
        name = next(iter(reply.content.metric_records))
        reply.content.metric_records[name] = MetricRecord({key: values[key] for key in keep})


@contextmanager
def python_random(seed: int | None) -> Iterator[None]:
    """Seed Python's ``random`` (Flower samples nodes with ``random.sample``) and restore it afterwards.

    ``seed=None`` keeps the current state: a resumed run has just restored the
    checkpointed one.
    """
    state = random.getstate()
    if seed is not None:
        random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _privacy_key(reply: Message, node: str, num_partitions: int) -> str:
    """The partition's label for a node's privacy record (node ids change across restarts), else the node id."""
    claimed = reply.content.metric_records.get("metrics", {}).get(PARTITION_ID)
    return partition_label(claimed) if isinstance(claimed, int) and 0 <= claimed < num_partitions else node
