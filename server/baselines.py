"""The FedAvg and FedProx baselines, run by Flower's own strategies in the distillation protocols' harness.

Same model, same partitions, same test split and the same per-round records
(``server.history``) as ``server.federation``, so the comparison is like for
like. Flower's ``FedAvg``/``FedProx`` drive the rounds; a thin subclass adds
what the harness needs and Flower leaves out:

- bookkeeping: download bytes and the nodes asked (``configure_train``),
  upload bytes, accepted/rejected/missing nodes and client seconds
  (``aggregate_train``); the round closes in the central ``evaluate_fn``;
- validation: Flower's ``aggregate_train`` trusts reply contents. A reply
  whose arrays differ in shape silently broadcasts or raises, a NaN poisons
  the average, a zero or negative ``num-examples`` divides by zero or flips
  the average, and replies whose records differ in keys raise
  ``InconsistentMessageReplies``, which ends ``Strategy.start``. So every
  reply is checked against the global model first; bad ones are logged with
  their node and reason and left out, as in ``server.federation``. Replies
  carrying an error go on to Flower, which logs them itself. Accepted replies
  are averaged in partition order, so the sum does not depend on arrival order
  or node ids;
- faults: Flower's node sampling waits forever for ``min_available_nodes``;
  ``configure_train`` first waits (bounded) for ``federation.min_clients``
  nodes. The strategy talks to the nodes through ``QuorumGrid``, which gives
  its ``send_and_receive`` the protocols' quorum and straggler timeout;
- sampling: with ``federation.fraction_train`` < 1, Flower's
  ``random.sample``, seeded from (seed, round) just before it draws, picks
  from the node ids in partition order (each node is asked once with an
  ``identify`` query), so a seed asks the same partitions in every launch and
  after a resume although the node ids are new each time;
- checkpoints: the central evaluation that closes each round also writes the
  checkpoint (global arrays, history, RNG states), and a resumed run starts
  Flower's strategy again from the checkpointed arrays with its rounds
  shifted (``round_offset``), so the
  round numbers the nodes see, and the seeds they derive, are those of the
  uninterrupted run.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum
from rich.console import Console
from rich.table import Table

from fedistill.atomic import save_tensors
from fedistill.checkpoint import Checkpoint, save_checkpoint
from fedistill.config import ExperimentConfig, experiment_fingerprint
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.messages import PARTITION_ID, experiment_record, record_to_state, state_to_record
from fedistill.runs import create_run_dir, save_config
from fedistill.training import evaluate_model
from server.federation import (
    UNAVAILABLE,
    BudgetExhausted,
    GridLike,
    NotEnoughClients,
    RunControl,
    RunInterrupted,
    WaitPolicy,
    check_stop,
    discard_unfinished_rounds,
    exchange,
    fresh_model,
    identify,
    load_resumable,
    partition_label,
    resume_hint,
    wait_for_nodes,
)
from server.history import RoundRecord, RunHistory, write_history
from server.privacy import PrivacyRecorder, read_privacy, refusal_reason
from server.validation import InvalidReply, array_to_numpy, check_client_metrics, client_error

log = logging.getLogger("fedistill.server")

BASELINES = ("fedavg", "fedprox")

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


class _Harness:
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
        with _python_random(self.sampling_seed * 1_000_003 + run_round):
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


class HarnessFedAvg(_Harness, FedAvg):
    """Flower's FedAvg with the harness's bookkeeping and reply validation."""


class HarnessFedProx(_Harness, FedProx):
    """Flower's FedProx (sends ``proximal-mu`` to the nodes) with the harness's bookkeeping and validation."""


class HarnessKrum(_Harness, Krum):
    """Flower's Krum (keeps the one reply closest to its neighbours) with the harness's bookkeeping and validation."""


class HarnessFedMedian(_Harness, FedMedian):
    """Flower's FedMedian (coordinate-wise median) with the harness's bookkeeping and validation."""


class HarnessFedTrimmedAvg(_Harness, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean) with the harness's bookkeeping and validation."""


def robust_strategy(config: ExperimentConfig, common: dict[str, Any]) -> _Harness:
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
def _python_random(seed: int | None) -> Iterator[None]:
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


class QuorumGrid:
    """A Grid whose ``send_and_receive`` waits like the distillation rounds do (``server.federation.exchange``).

    Flower's strategies call ``grid.send_and_receive(messages, timeout)``,
    which waits for every reply or the timeout; through this wrapper a round
    also ends ``straggler_timeout_s`` after the quorum of replies without an
    error, and a stop request ends the wait. With ``num_partitions`` set,
    ``get_node_ids`` lists the nodes by the partition each holds (see
    ``by_partition``). Everything else goes to the wrapped grid.
    """

    def __init__(
        self,
        grid: GridLike,
        policy: WaitPolicy,
        stop: threading.Event | None = None,
        num_partitions: int | None = None,
    ) -> None:
        self.grid = grid
        self.policy = policy
        self.stop = stop
        self.num_partitions = num_partitions
        self.node_partition: dict[int, int] = {}
        self.asked: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_node_ids(self) -> Iterable[int]:
        nodes = [int(node) for node in self.grid.get_node_ids()]
        if self.num_partitions is None:
            return nodes
        unknown = [node for node in sorted(nodes) if node not in self.asked]
        if unknown:
            self.asked.update(unknown)
            self.node_partition.update(identify(
                self.grid, unknown, self.policy, self.num_partitions, self.stop, self.policy.needed(len(unknown))
            ))
        return by_partition(nodes, self.node_partition)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        replies: list[Message] = []

        def on_reply(node: int, reply: Message) -> bool:
            replies.append(reply)
            return not reply.has_error()

        exchange(self.grid, messages, self.policy, on_reply, self.policy.needed(len(messages)), self.stop)
        return replies


def by_partition(nodes: Iterable[int], node_partition: dict[int, int]) -> list[int]:
    """Node ids ordered by the partition each holds; nodes of unknown partition last, by id.

    Flower samples a round's nodes with ``random.sample(grid.get_node_ids(), k)``:
    seeded, it repeats the positions it draws, not the nodes. Node ids are new
    in every launch of the simulation engine and every SuperNode restart, so
    only a list in partition order makes the same seed ask the same partitions.
    """
    return sorted(nodes, key=lambda node: (0, node_partition[node], node) if node in node_partition else (1, 0, node))


def run_baseline(
    grid: GridLike, config: ExperimentConfig, console: Console | None = None, control: RunControl | None = None
) -> Path:
    """Run FedAvg or FedProx through Flower's strategy, or continue one (``control.resume``); returns the run directory.

    Each round the sampled nodes train the global model locally
    (``clients.fit``), the valid replies are averaged by the number of
    examples, and the server tests the new global model on the held-out split
    (``evaluate_fn``; nodes do no evaluation), then checkpoints. A round with
    fewer valid replies than its quorum ends the run with NotEnoughClients
    after writing what was recorded so far; the run directory stays resumable.
    """
    from fedistill.budget import check_memory
    console = console or Console()
    control = control or RunControl()
    federation = config.federation
    if federation.protocol not in BASELINES:
        raise ValueError(
            f"run_baseline: protocol {federation.protocol!r} is not a baseline; allowed: {', '.join(BASELINES)}"
        )
    device = pick_device(config.device)
    test = load_dataset(config.data.name, "test", root=config.data.root, path=config.data.path)
    check_memory(config, test.info)
    test_x, test_y = test.normalized(device), torch.from_numpy(test.labels).to(device)
    model = fresh_model(config, test, device, config.seed)
    initial = state_to_record(model.state_dict())
    model_bytes = initial.count_bytes()
    history = RunHistory(federation.protocol)
    state: dict[str, Any] = {"arrays": initial, "initial": None}
    completed = 0
    checkpoint_privacy: dict[str, Any] = {}
    if control.resume is None:
        run_dir = create_run_dir(config.output_dir, f"fed-{test.info.name}-{federation.protocol}")
        save_config(run_dir, config)
    else:
        run_dir = Path(control.resume)
        checkpoint = load_resumable(run_dir, config)
        if checkpoint is not None:
            completed = checkpoint.round
            history = RunHistory.from_dict(checkpoint.state["history"])
            state["initial"] = checkpoint.state.get("initial")
            state["arrays"] = state_to_record(checkpoint.section("global"))
            checkpoint_privacy = checkpoint.state.get("privacy") or {}
        discard_unfinished_rounds(run_dir, completed, federation.rounds)
        console.print(f"resuming {run_dir} after round {completed}/{federation.rounds}")
    if control.on_start is not None:
        control.on_start(run_dir)
    policy = WaitPolicy.from_config(config)
    common: dict[str, Any] = {
        "spec": ArraySpec.of(initial),
        "policy": policy,
        "max_reply_bytes": int(federation.max_reply_mb * 2**20),
        "num_partitions": config.partition.num_clients,
        "round_offset": completed,
        "sampling_seed": config.seed,
        "stop": control.stop,
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": federation.min_clients,
        "min_available_nodes": federation.min_clients,
    }
    privacy = PrivacyRecorder.start(config, console)
    if privacy is not None and checkpoint_privacy:
        privacy.load_state(checkpoint_privacy)
    common["privacy"] = privacy
    strategy: _Harness
    if federation.protocol == "fedprox":
        strategy = HarnessFedProx(**common, proximal_mu=federation.proximal_mu)
    elif config.attack.defense.method != "none":
        strategy = robust_strategy(config, common)
    else:
        strategy = HarnessFedAvg(**common)
    nodes_seen = [0]

    def checkpoint(server_round: int) -> None:
        saved = Checkpoint(server_round)
        saved.put("global", record_to_state(state["arrays"]))
        saved.state = {
            "protocol": federation.protocol,
            "experiment": experiment_fingerprint(config),
            "history": history.to_dict(),
            "initial": state["initial"],
            "privacy": {} if privacy is None else privacy.to_state(),
        }
        save_checkpoint(run_dir, saved)
        write_history(run_dir, history, summary("running"))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test the global model centrally; after a training round, close that round's record and checkpoint."""
        model.load_state_dict({key: value.to(device) for key, value in record_to_state(arrays).items()})
        accuracy, loss = evaluate_model(model, test_x, test_y)
        state["arrays"] = arrays
        if server_round == 0:
            if state["initial"] is None:
                state["initial"] = {"accuracy": accuracy, "loss": loss}
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        server_round += completed
        ledger = strategy.ledger
        nodes_seen[0] = len(ledger.asked)
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            upload_bytes=ledger.upload_bytes,
            download_bytes=ledger.download_bytes,
            seconds=time.perf_counter() - ledger.started,
            accepted=len(ledger.accepted),
            rejected=dict(ledger.rejected),
            refused=dict(ledger.refused),
            missing=list(ledger.missing),
            client_seconds=dict(ledger.client_seconds),
            asked=len(ledger.asked),
            partitions=sorted(ledger.partitions),
        )
        history.add(record)
        checkpoint(server_round)
        console.print(
            f"round {server_round}/{federation.rounds}: {record.accepted}/{len(ledger.asked)} replies averaged, "
            f"accuracy {100 * accuracy:.2f}%, {record.seconds:.1f} s"
            + (f"; missing nodes: {', '.join(record.missing)}" if record.missing else "")
            + (f"; rejected: {', '.join(record.rejected)}" if record.rejected else "")
        )
        line = None if privacy is None else privacy.round_line(server_round)
        if line is not None:
            console.print(line, markup=False, highlight=False)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def summary(status: str, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "protocol": federation.protocol,
            "nodes": history.rounds[-1].asked if history.rounds else nodes_seen[0],
            "accepted": history.rounds[-1].accepted if history.rounds else 0,
            "completed_rounds": len(history.rounds),
            "upload_bytes": sum(r.upload_bytes for r in history.rounds),
            "download_bytes": sum(r.download_bytes for r in history.rounds),
            "model_bytes": model_bytes,
            "proximal_mu": federation.proximal_mu if federation.protocol == "fedprox" else 0.0,
            "defense": config.attack.defense.method,
            "initial": state["initial"],
            "final_accuracy": history.final_accuracy() if history.rounds else None,
            "device": str(device),
            **({} if privacy is None else {"privacy": privacy.summary()}),
            **extra,
        }

    remaining = federation.rounds - completed
    console.print(
        f"{federation.protocol}: {remaining} of {federation.rounds} rounds to run, "
        f"{federation.local_epochs} local epochs each, {model_bytes:,} bytes per model"
    )
    stopped: dict[str, str] = {}
    try:
        if remaining > 0:
            nodes = wait_for_nodes(grid, federation.min_clients, federation.round_timeout_s, stop=control.stop)
            nodes_seen[0] = len(nodes)
            with _python_random(config.seed if completed == 0 else None):
                strategy.start(
                    grid=QuorumGrid(  # type: ignore[arg-type]
                        grid, policy, control.stop,
                        # Sampling a share of the nodes: draw from them in partition order (by_partition).
                        config.partition.num_clients if federation.fraction_train < 1 else None,
                    ),
                    initial_arrays=state["arrays"],
                    num_rounds=remaining,
                    timeout=federation.round_timeout_s,
                    train_config=experiment_record(config, "fit"),
                    evaluate_fn=evaluate_fn,
                )
        check_stop(control.stop)
    except BudgetExhausted as error:
        if not history.rounds:
            _write_privacy(privacy, run_dir, console)
            write_history(run_dir, history, summary("failed", failed_round=1, reason=str(error),
                                                    refused=strategy.ledger.refused))
            raise
        stopped["stopped_early"] = f"{error}; the run ends after round {len(history.rounds)}"
        log.warning(stopped["stopped_early"])
        console.print(stopped["stopped_early"], markup=False, highlight=False)
    except (NotEnoughClients, RunInterrupted) as error:
        status = "interrupted" if isinstance(error, RunInterrupted) else "failed"
        _write_privacy(privacy, run_dir, console)
        failed_round = len(history.rounds) + 1
        write_history(run_dir, history, summary(status, failed_round=failed_round, reason=str(error),
                                                rejected=strategy.ledger.rejected, missing=strategy.ledger.missing,
                                                resume=resume_hint(run_dir)))
        console.print(f"{status}: {error}\n{resume_hint(run_dir)}", markup=False, highlight=False)
        raise type(error)(f"{error}; {resume_hint(run_dir)}") from None
    final = record_to_state(state["arrays"])
    save_tensors(run_dir / "global_model.safetensors", final)
    result = summary("completed", **stopped)
    write_history(run_dir, history, result)
    console.print(_summary_table(result, run_dir))
    _write_privacy(privacy, run_dir, console)
    return run_dir


def _privacy_key(reply: Message, node: str, num_partitions: int) -> str:
    """The partition's label for a node's privacy record (node ids change across restarts), else the node id."""
    claimed = reply.content.metric_records.get("metrics", {}).get(PARTITION_ID)
    return partition_label(claimed) if isinstance(claimed, int) and 0 <= claimed < num_partitions else node


def _write_privacy(privacy: PrivacyRecorder | None, run_dir: Path, console: Console) -> None:
    if privacy is not None:
        privacy.write(run_dir)
        console.print(privacy.final_line(), markup=False, highlight=False)


def _summary_table(summary: dict[str, Any], run_dir: Path) -> Table:
    table = Table(title=f"{summary['protocol']} baseline", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("clients", f"{summary['accepted']} of {summary['nodes']} averaged in the last round")
    table.add_row("upload", f"{summary['upload_bytes']:,} bytes in all ({summary['model_bytes']:,} per model)")
    table.add_row("download", f"{summary['download_bytes']:,} bytes in all")
    table.add_row("global accuracy", f"{100 * summary['final_accuracy']:.2f} % after the last round")
    table.add_row("run directory", str(run_dir))
    return table
