"""The one-shot federated distillation round, driven through a Flower ``Grid``.

The loop is plain code over the Grid's two calls (``get_node_ids`` and
``send_and_receive``), so tests drive it with an in-process grid. Each reply is
untrusted: a failed, oversized or malformed reply is logged with its node and
the reason, counted, and left out; the round goes on with the rest, as long as
``federation.min_clients`` valid sets arrived.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from rich.console import Console
from rich.table import Table

from fedistill.config import ExperimentConfig
from fedistill.data import ImageData, load_dataset
from fedistill.device import pick_device
from fedistill.distill import get_distiller
from fedistill.report import save_class_grids
from fedistill.runs import create_run_dir, save_config, write_json
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, evaluate_set
from server.aggregation import AggregationContext, ClientSet, get_aggregator
from server.validation import InvalidReply, ReplyLimits, validate_set_arrays

log = logging.getLogger("fedistill.server")

EVAL_SEED_OFFSET = 1_000_003


class GridLike(Protocol):
    """The part of ``flwr.serverapp.Grid`` the round uses."""

    def get_node_ids(self) -> Any: ...

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any: ...


@dataclass
class RoundOutcome:
    """Accepted client sets, and why the others were left out (node id -> reason)."""

    accepted: list[ClientSet] = field(default_factory=list)
    client_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


class NotEnoughClients(RuntimeError):
    """Fewer valid replies (or connected nodes) than ``federation.min_clients``."""


def wait_for_nodes(grid: GridLike, minimum: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected; NotEnoughClients after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(int(node) for node in grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughClients(f"{len(nodes)} nodes connected after {timeout_s:.0f} s; need {minimum}")
        time.sleep(poll_s)


def train_messages(node_ids: list[int], server_round: int) -> list[Message]:
    return [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": server_round})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node in node_ids
    ]


def read_reply(reply: Message, limits: ReplyLimits) -> tuple[SyntheticSet, dict[str, Any]]:
    """Validate one reply; InvalidReply says why it cannot be used."""
    if reply.has_error():
        raise InvalidReply(f"client error {reply.error.code}: {reply.error.reason}")
    content = reply.content
    if "set" not in content.array_records or "metrics" not in content.metric_records:
        raise InvalidReply("reply lacks the 'set' arrays or the 'metrics' record")
    record = content.array_records["set"]
    size = record.count_bytes()
    if size > limits.max_bytes:
        raise InvalidReply(f"set: {size} bytes exceeds the limit of {limits.max_bytes}")
    metrics = dict(content.metric_records["metrics"])
    arrays = {key: array.numpy() for key, array in record.items()}
    declared = {key: metrics[key] for key in ("num-images", "bytes") if key in metrics}
    return validate_set_arrays(arrays, limits, declared), metrics


def collect(replies: list[Message], limits: ReplyLimits) -> RoundOutcome:
    """Sort replies into accepted sets and logged rejections."""
    outcome = RoundOutcome()
    for reply in replies:
        node = str(reply.metadata.src_node_id)
        try:
            syn, metrics = read_reply(reply, limits)
        except InvalidReply as reason:
            log.warning("rejected reply from node %s: %s", node, reason)
            outcome.rejected[node] = str(reason)
            continue
        outcome.accepted.append(ClientSet(node, syn))
        outcome.client_metrics[node] = metrics
    return outcome


def reply_limits(config: ExperimentConfig, test: ImageData) -> ReplyLimits:
    info = test.info
    return ReplyLimits(
        num_classes=info.num_classes,
        image_shape=(info.channels, info.height, info.width),
        max_images=config.distill.ipc * info.num_classes,
        max_bytes=int(config.federation.max_reply_mb * 2**20),
    )


def run_one_shot(grid: GridLike, config: ExperimentConfig, console: Console | None = None) -> Path:
    """Ask every connected node for a set, aggregate the valid ones, train and test the global model."""
    console = console or Console()
    device = pick_device(config.device)
    test = load_dataset(config.data.name, "test", root=config.data.root, path=config.data.path)
    run_dir = create_run_dir(config.output_dir, f"fed-{test.info.name}-{config.distill.method}-ipc{config.distill.ipc}")
    save_config(run_dir, config)
    federation = config.federation
    nodes = wait_for_nodes(grid, federation.min_clients, federation.round_timeout_s)
    console.print(f"round 1: asking {len(nodes)} nodes for IPC-{config.distill.ipc} {config.distill.method} sets")
    started = time.perf_counter()
    replies = list(grid.send_and_receive(train_messages(nodes, 1), timeout=federation.round_timeout_s))
    round_seconds = time.perf_counter() - started
    outcome = collect(replies, reply_limits(config, test))
    missing = sorted(set(map(str, nodes)) - {str(r.metadata.src_node_id) for r in replies})
    for node in missing:
        log.warning("no reply from node %s within %.0f s", node, federation.round_timeout_s)
    if len(outcome.accepted) < federation.min_clients:
        write_json(run_dir / "metrics.json", {"status": "failed", "rejected": outcome.rejected, "missing": missing})
        raise NotEnoughClients(
            f"{len(outcome.accepted)} valid sets, need federation.min_clients = {federation.min_clients}"
        )
    clients_dir = run_dir / "clients"
    clients_dir.mkdir()
    for client in outcome.accepted:
        client.set.save(clients_dir / f"node-{client.client_id}.safetensors")
    aggregate = get_aggregator(federation.aggregation)(
        outcome.accepted, _aggregation_context(config, test, device)
    )
    aggregate.set.save(run_dir / "aggregate.safetensors")
    save_class_grids(aggregate.set, test.info, run_dir / "grids")
    result = evaluate_set(
        aggregate.set,
        test.normalized(device),
        torch.from_numpy(test.labels),
        config.model.spec(),
        TrainSettings.from_config(config.eval, config.data.name),
        device,
        seed=config.seed + EVAL_SEED_OFFSET,
        num_nets=config.eval.num_nets,
        sample_weights=aggregate.weights,
    )
    upload = sum(client.set.nbytes() for client in outcome.accepted)
    metrics = {
        "status": "completed",
        "protocol": federation.protocol,
        "aggregation": federation.aggregation,
        "nodes": len(nodes),
        "accepted": len(outcome.accepted),
        "rejected": outcome.rejected,
        "missing": missing,
        "upload_bytes": upload,
        "aggregate_images": len(aggregate.set),
        "round_seconds": round_seconds,
        "client_seconds": {node: m.get("seconds") for node, m in outcome.client_metrics.items()},
        "eval": result.to_dict(),
        "device": str(device),
    }
    write_json(run_dir / "metrics.json", metrics)
    console.print(_summary(metrics, run_dir))
    return run_dir


def _aggregation_context(config: ExperimentConfig, test: ImageData, device: torch.device) -> AggregationContext:
    num_classes = test.info.num_classes

    def redistill(images: torch.Tensor, labels: torch.Tensor, ipc: int) -> SyntheticSet:
        settings = replace(config.distill.settings(config.data.name), ipc=ipc)
        distiller = get_distiller(config.distill.method)(config.model.spec(), settings, device)
        return distiller(images, labels, num_classes, seed=config.seed)

    return AggregationContext(
        num_classes=num_classes,
        device=device,
        seed=config.seed,
        server_ipc=config.federation.server_ipc,
        redistill=redistill,
    )


def _summary(metrics: dict[str, Any], run_dir: Path) -> Table:
    evaluation = metrics["eval"]
    table = Table(title="one-shot federated distillation", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("clients", f"{metrics['accepted']} accepted of {metrics['nodes']} ({len(metrics['rejected'])} rejected)")
    table.add_row("upload", f"{metrics['upload_bytes']:,} bytes, {metrics['aggregate_images']} images aggregated")
    table.add_row(
        "global accuracy",
        f"{100 * evaluation['mean']:.2f} ± {100 * evaluation['std']:.2f} % "
        f"over {evaluation['num_nets']} nets",
    )
    table.add_row("run directory", str(run_dir))
    return table
