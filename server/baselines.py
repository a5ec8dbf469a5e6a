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
  carrying an error go on to Flower, which logs them itself.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
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
from safetensors.torch import save_file

from fedistill.config import ExperimentConfig
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.messages import experiment_record, record_to_state, state_to_record
from fedistill.runs import create_run_dir, save_config
from fedistill.training import evaluate_model
from server.federation import GridLike, NotEnoughClients, fresh_model, wait_for_nodes
from server.history import RoundRecord, RunHistory, write_history
from server.validation import InvalidReply

log = logging.getLogger("fedistill.server")

BASELINES = ("fedavg", "fedprox")

NOT_AVERAGED = ("partition-id",)
"""Reply metrics that identify a node rather than measure it; Flower would average them too."""


@dataclass
class RoundLedger:
    """What one baseline round sent and received; filled by the strategy, closed by the evaluation."""

    started: float = 0.0
    asked: list[str] = field(default_factory=list)
    download_bytes: int = 0
    upload_bytes: int = 0
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    client_seconds: dict[str, float] = field(default_factory=dict)


class ArraySpec(dict[str, tuple[tuple[int, ...], np.dtype]]):
    """Key -> (shape, dtype) of the global model's arrays: what every reply must match."""

    @classmethod
    def of(cls, record: ArrayRecord) -> ArraySpec:
        spec = cls()
        for key, array in record.items():
            value = array.numpy()
            spec[key] = (tuple(value.shape), value.dtype)
        return spec


def check_fit_reply(reply: Message, spec: ArraySpec, arrays_key: str, max_bytes: int) -> dict[str, Any]:
    """The reply's metrics if its content can be averaged into the global model; InvalidReply says why not.

    Structure and size are checked before any array is deserialised, so an
    oversized reply costs no memory.
    """
    content = reply.content
    if list(content.array_records) != [arrays_key] or len(content.metric_records) != 1:
        raise InvalidReply(
            f"reply must hold exactly the '{arrays_key}' arrays and one metrics record; "
            f"got arrays {sorted(content.array_records)} and metrics {sorted(content.metric_records)}"
        )
    metrics = dict(next(iter(content.metric_records.values())))
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
        try:
            value = array.numpy()
        except (TypeError, ValueError, OSError) as error:
            raise InvalidReply(f"{key}: cannot be read as a numpy array ({error})") from None
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

    def __init__(self, *, spec: ArraySpec, min_clients: int, max_reply_bytes: int, **strategy: Any) -> None:
        """``spec`` describes the global model's arrays; ``strategy`` goes to the Flower strategy unchanged."""
        super().__init__(**strategy)
        self.spec = spec
        self.min_clients = min_clients
        self.max_reply_bytes = max_reply_bytes
        self.ledger = RoundLedger()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.ledger = RoundLedger(started=time.perf_counter())
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.ledger.asked = [str(message.metadata.dst_node_id) for message in messages]
        self.ledger.download_bytes = arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ledger = self.ledger
        replies = list(replies)
        kept: list[Message] = []
        accepted_metrics: list[dict[str, Any]] = []
        seen: set[str] = set()
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if node in seen:
                log.warning("round %d: ignored a second reply from node %s", server_round, node)
                continue
            try:
                if node not in ledger.asked:
                    raise InvalidReply("this node was not asked in this round")
                seen.add(node)
                if reply.has_error():
                    # Flower's aggregate_train logs these itself and leaves them out.
                    ledger.rejected[node] = f"client error {reply.error.code}: {reply.error.reason}"
                    kept.append(reply)
                    continue
                metrics = check_fit_reply(reply, self.spec, self.arrayrecord_key, self.max_reply_bytes)
            except InvalidReply as reason:
                log.warning("round %d: rejected reply from node %s: %s", server_round, node, reason)
                ledger.rejected[node] = str(reason)
                continue
            kept.append(reply)
            accepted_metrics.append(metrics)
            ledger.accepted.append(node)
            ledger.upload_bytes += reply.content.array_records[self.arrayrecord_key].count_bytes()
            seconds = metrics.get("seconds", 0.0)
            ledger.client_seconds[node] = float(seconds) if _is_number(seconds) else 0.0
        ledger.missing = sorted(set(ledger.asked) - seen)
        for node in ledger.missing:
            log.warning("round %d: no reply from node %s", server_round, node)
        if len(ledger.accepted) < self.min_clients:
            raise NotEnoughClients(
                f"round {server_round}: {len(ledger.accepted)} valid replies, "
                f"need federation.min_clients = {self.min_clients}"
            )
        _same_metric_keys([reply for reply in kept if not reply.has_error()], accepted_metrics)
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
def _python_random(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` (Flower samples nodes with ``random.sample``) and restore it afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def run_baseline(grid: GridLike, config: ExperimentConfig, console: Console | None = None) -> Path:
    """Run FedAvg or FedProx through Flower's strategy; returns the run directory.

    Each round the sampled nodes train the global model locally
    (``clients.fit``), the valid replies are averaged by the number of
    examples, and the server tests the new global model on the held-out split
    (``evaluate_fn``; nodes do no evaluation). A round with fewer than
    ``federation.min_clients`` valid replies ends the run with
    NotEnoughClients after writing what was recorded so far.
    """
    console = console or Console()
    federation = config.federation
    if federation.protocol not in BASELINES:
        raise ValueError(
            f"run_baseline: protocol {federation.protocol!r} is not a baseline; allowed: {', '.join(BASELINES)}"
        )
    device = pick_device(config.device)
    test = load_dataset(config.data.name, "test", root=config.data.root, path=config.data.path)
    test_x, test_y = test.normalized(device), torch.from_numpy(test.labels).to(device)
    run_dir = create_run_dir(config.output_dir, f"fed-{test.info.name}-{federation.protocol}")
    save_config(run_dir, config)
    model = fresh_model(config, test, device, config.seed)
    initial = state_to_record(model.state_dict())
    model_bytes = initial.count_bytes()
    history = RunHistory(federation.protocol)
    common: dict[str, Any] = {
        "spec": ArraySpec.of(initial),
        "min_clients": federation.min_clients,
        "max_reply_bytes": int(federation.max_reply_mb * 2**20),
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": federation.min_clients,
        "min_available_nodes": federation.min_clients,
    }
    strategy: _Harness
    if federation.protocol == "fedprox":
        strategy = HarnessFedProx(**common, proximal_mu=federation.proximal_mu)
    elif config.attack.defense.method != "none":
        strategy = robust_strategy(config, common)
    else:
        strategy = HarnessFedAvg(**common)
    state: dict[str, Any] = {"arrays": initial, "initial": None}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test the global model centrally; after a training round, close that round's record."""
        model.load_state_dict({key: value.to(device) for key, value in record_to_state(arrays).items()})
        accuracy, loss = evaluate_model(model, test_x, test_y)
        state["arrays"] = arrays
        if server_round == 0:
            state["initial"] = {"accuracy": accuracy, "loss": loss}
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        ledger = strategy.ledger
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            upload_bytes=ledger.upload_bytes,
            download_bytes=ledger.download_bytes,
            seconds=time.perf_counter() - ledger.started,
            accepted=len(ledger.accepted),
            rejected=dict(ledger.rejected),
            missing=list(ledger.missing),
            client_seconds=dict(ledger.client_seconds),
        )
        history.add(record)
        console.print(
            f"round {server_round}/{federation.rounds}: {record.accepted}/{len(ledger.asked)} replies averaged, "
            f"accuracy {100 * accuracy:.2f}%, {record.seconds:.1f} s"
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def summary(status: str, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "protocol": federation.protocol,
            "nodes": len(nodes),
            "accepted": history.rounds[-1].accepted if history.rounds else 0,
            "upload_bytes": sum(r.upload_bytes for r in history.rounds),
            "download_bytes": sum(r.download_bytes for r in history.rounds),
            "model_bytes": model_bytes,
            "proximal_mu": federation.proximal_mu if federation.protocol == "fedprox" else 0.0,
            "defense": config.attack.defense.method,
            "initial": state["initial"],
            "final_accuracy": history.final_accuracy() if history.rounds else None,
            "device": str(device),
            **extra,
        }

    nodes = wait_for_nodes(grid, federation.min_clients, federation.round_timeout_s)
    console.print(
        f"{federation.protocol}: {federation.rounds} rounds over {len(nodes)} nodes, "
        f"{federation.local_epochs} local epochs each, {model_bytes:,} bytes per model"
    )
    try:
        with _python_random(config.seed):
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=federation.rounds,
                timeout=federation.round_timeout_s,
                train_config=experiment_record(config, "fit"),
                evaluate_fn=evaluate_fn,
            )
    except NotEnoughClients as error:
        failed_round = len(history.rounds) + 1
        write_history(run_dir, history, summary("failed", failed_round=failed_round, reason=str(error),
                                                rejected=strategy.ledger.rejected, missing=strategy.ledger.missing))
        raise
    final = record_to_state(state["arrays"])
    save_file({key: value.contiguous() for key, value in final.items()}, str(run_dir / "global_model.safetensors"))
    result = summary("completed")
    write_history(run_dir, history, result)
    console.print(_summary_table(result, run_dir))
    return run_dir


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
