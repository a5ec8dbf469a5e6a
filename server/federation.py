"""The federated distillation protocols (one-shot and multi-round), driven through a Flower ``Grid``.

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
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from rich.console import Console
from rich.table import Table

from safetensors.torch import save_file

from attacks.defenses import defend_sets
from fedistill.config import ExperimentConfig
from fedistill.data import ImageData, load_dataset
from fedistill.device import pick_device
from fedistill.distill import get_distiller
from fedistill.messages import experiment_record, state_to_record
from fedistill.models import build_model
from fedistill.report import save_class_grids
from fedistill.runs import create_run_dir, save_config
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, evaluate_model, evaluate_set, train_model
from server.aggregation import AggregateResult, AggregationContext, ClientSet, get_aggregator
from server.history import RoundRecord, RunHistory, write_history
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


def train_messages(
    node_ids: list[int], config: ExperimentConfig, server_round: int, global_record: ArrayRecord | None = None
) -> list[Message]:
    """One ``distill`` message per node: the experiment, the round, and the global model when there is one."""
    messages = []
    for node in node_ids:
        content = RecordDict({"config": experiment_record(config, "distill", server_round)})
        if global_record is not None:
            content["global"] = global_record
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    return messages


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


def run_distillation(grid: GridLike, config: ExperimentConfig, console: Console | None = None) -> Path:
    """Run the one-shot or multi-round protocol; returns the run directory.

    Each round asks every connected node for a set, keeps the valid ones,
    aggregates them, and trains the global model on the aggregate with the
    evaluation protocol, then tests it on the held-out split. In multi-round
    runs the global model goes back to the nodes, which match under perturbed
    copies of it and continue from their previous set (FedDM), and the
    server keeps training the same global model. A one-shot run also trains
    ``eval.num_nets`` fresh networks on its aggregate and reports mean ± std.
    """
    console = console or Console()
    federation = config.federation
    if federation.protocol not in ("one-shot", "multi-round"):
        raise ValueError(f"run_distillation: protocol {federation.protocol!r} is not a distillation protocol")
    device = pick_device(config.device)
    test = load_dataset(config.data.name, "test", root=config.data.root, path=config.data.path)
    test_x, test_y = test.normalized(device), torch.from_numpy(test.labels).to(device)
    run_dir = create_run_dir(
        config.output_dir, f"fed-{test.info.name}-{federation.protocol}-{config.distill.method}-ipc{config.distill.ipc}"
    )
    save_config(run_dir, config)
    limits = reply_limits(config, test)
    settings = TrainSettings.from_config(config.eval, config.data.name)
    history = RunHistory(federation.protocol)
    nodes = wait_for_nodes(grid, federation.min_clients, federation.round_timeout_s)
    global_model: torch.nn.Module | None = None
    evaluation: dict[str, Any] | None = None
    defense_reports: list[dict[str, Any]] = []
    for server_round in range(1, federation.rounds + 1):
        global_record = None if global_model is None else state_to_record(global_model.state_dict())
        console.print(
            f"round {server_round}/{federation.rounds}: asking {len(nodes)} nodes for "
            f"IPC-{config.distill.ipc} {config.distill.method} sets"
            + ("" if global_record is None else " under the global model")
        )
        started = time.perf_counter()
        messages = train_messages(nodes, config, server_round, global_record)
        replies = list(grid.send_and_receive(messages, timeout=federation.round_timeout_s))
        outcome = collect(replies, limits)
        missing = sorted(set(map(str, nodes)) - {str(r.metadata.src_node_id) for r in replies})
        for node in missing:
            log.warning("no reply from node %s within %.0f s", node, federation.round_timeout_s)
        if len(outcome.accepted) < federation.min_clients:
            write_history(run_dir, history, {"status": "failed", "failed_round": server_round,
                                             "rejected": outcome.rejected, "missing": missing})
            raise NotEnoughClients(
                f"round {server_round}: {len(outcome.accepted)} valid sets, "
                f"need federation.min_clients = {federation.min_clients}"
            )
        round_dir = run_dir / ("clients" if federation.rounds == 1 else f"round-{server_round:03d}")
        round_dir.mkdir()
        for client in outcome.accepted:
            client.set.save(round_dir / f"node-{client.client_id}.safetensors")
        aggregate, defense = aggregate_round(outcome.accepted, config, test, device)
        if defense is not None:
            defense_reports.append({"round": server_round, **defense})
        aggregate_set = aggregate.set
        if federation.soft_labels and global_model is not None:
            aggregate_set = with_soft_labels(aggregate_set, global_model)
        aggregate_set.save(run_dir / "aggregate.safetensors")
        seed = config.seed + EVAL_SEED_OFFSET
        if federation.protocol == "one-shot":
            kept: list[torch.nn.Module] = []
            result = evaluate_set(
                aggregate_set, test_x, test_y, config.model.spec(), settings, device, seed=seed,
                num_nets=config.eval.num_nets, sample_weights=aggregate.weights,
                on_model=lambda index, model: kept.append(model) if index == 0 else None,
            )
            global_model = kept[0]
            evaluation = result.to_dict()
            accuracy = result.mean
            _, loss = evaluate_model(global_model, test_x, test_y)
        else:
            global_model = global_model or fresh_model(config, test, device, seed)
            generator = torch.Generator().manual_seed(seed + server_round)
            weights = aggregate.weights
            on_device = aggregate_set.to(device)
            train_model(global_model, on_device.images, on_device.labels, settings, generator,
                        on_device.soft_labels, None if weights is None else weights.to(device))
            accuracy, loss = evaluate_model(global_model, test_x, test_y)
        seconds = time.perf_counter() - started
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            upload_bytes=sum(client.set.nbytes() for client in outcome.accepted),
            download_bytes=0 if global_record is None else global_record.count_bytes() * len(nodes),
            seconds=seconds,
            accepted=len(outcome.accepted),
            rejected=outcome.rejected,
            missing=missing,
            client_seconds={node: float(m.get("seconds", 0.0)) for node, m in outcome.client_metrics.items()},
        )
        history.add(record)
        console.print(
            f"round {server_round}: {record.accepted}/{len(nodes)} sets, {len(aggregate_set)} images, "
            f"accuracy {100 * accuracy:.2f}%, {seconds:.0f} s"
        )
    assert global_model is not None
    save_file({k: v.detach().cpu().contiguous() for k, v in global_model.state_dict().items()},
              str(run_dir / "global_model.safetensors"))
    save_class_grids(aggregate_set, test.info, run_dir / "grids")
    summary = {
        "status": "completed",
        "protocol": federation.protocol,
        "aggregation": federation.aggregation,
        "method": config.distill.method,
        "ipc": config.distill.ipc,
        "nodes": len(nodes),
        "accepted": history.rounds[-1].accepted,
        "upload_bytes": sum(r.upload_bytes for r in history.rounds),
        "aggregate_images": len(aggregate_set),
        "final_accuracy": history.final_accuracy(),
        "eval": evaluation,
        "device": str(device),
    }
    if defense_reports:
        summary["defense"] = defense_reports
    write_history(run_dir, history, summary)
    console.print(_summary(summary, run_dir))
    return run_dir


def aggregate_round(
    clients: list[ClientSet], config: ExperimentConfig, test: ImageData, device: torch.device,
    defense: str | None = None,
) -> tuple[AggregateResult, dict[str, Any] | None]:
    """The round's aggregate: the defence (``defense``, default ``attack.defense.method``) filters the
    client sets, then the aggregation rule combines what is left. Also returns the defence's report."""
    method = config.attack.defense.method if defense is None else defense
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


def with_soft_labels(syn: SyntheticSet, teacher: torch.nn.Module) -> SyntheticSet:
    """The set labelled by ``teacher``'s softmax (the previous global model), hard labels kept beside them."""
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    with torch.inference_mode():
        soft = torch.softmax(teacher(syn.images.to(device)), dim=1).float()
    teacher.train(was_training)
    return SyntheticSet(syn.images, syn.labels, syn.num_classes, syn.source_counts, soft.to(syn.images.device),
                        {**syn.provenance, "soft_labels": "global model"})


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
