"""The federated distillation protocols, one-shot and multi-round: one run, round by round.

``run_distillation`` sets a run up (or resumes one from its checkpoint), then
calls ``DistillationRun.run_round`` once per round and checkpoints after
each. A round asks the nodes connected at its start for a set
(``server.rounds``), validates their replies as they arrive
(``server.replies``), filters and aggregates the accepted sets
(``attacks.defenses.aggregate_round``), trains and tests the global model
(the evaluation protocol, ``fedistill.training``), and hands the state on
(``server.state``).

Faults: a failed, oversized or malformed reply is logged with its node and
the reason, counted, and left out. A node the server has not seen before
(restarted, or every node after a resume) first tells the server its
partition (an ``identify`` query) and gets back the state the server kept
for that partition (``restore.*`` records). Too few valid replies end the run
with ``NotEnoughClients``, and the run directory stays resumable.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from attacks.defenses import aggregate_round
from fedistill.aggregation import AggregateResult, AggregationContext, ClientSet, merge_rounds
from fedistill.atomic import save_tensors
from fedistill.checkpoint import save_checkpoint
from fedistill.config import ExperimentConfig
from fedistill.data import ImageData, load_dataset
from fedistill.device import pick_device
from fedistill.report import save_class_grids
from fedistill.runs import create_run_dir, save_config
from fedistill.teacher import one_hot_labelled, soft_label
from fedistill.training import EVAL_SEED_OFFSET, evaluate_model, evaluate_set, train_model
from server.history import RoundRecord, RunHistory, write_history
from server.privacy import PrivacyRecorder
from server.replies import ReplyCollector, reply_limits, train_messages
from server.rounds import (
    BudgetExhausted,
    GridLike,
    NotEnoughClients,
    RunControl,
    RunInterrupted,
    WaitPolicy,
    check_stop,
    exchange,
    identify,
    reporting_arrivals,
    reporting_epochs,
    wait_for_nodes,
)
from server.state import KeptState, ServerState, discard_unfinished_rounds, fresh_model, resume_hint, resumed_state
from wire.messages import state_to_record

log = logging.getLogger("fedistill.server")

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
        self.settings = config.eval.train_settings(config.data.name)
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
        on_reply = reporting_arrivals(collector.add, len(nodes), self.console.print, f"round {server_round}")
        silent = exchange(self.grid, messages, self.policy, on_reply, needed, self.stop)
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
        decoded = [ClientSet(client.client_id, client.set.decoded()) for client in outcome.accepted]
        aggregate, defense = aggregate_round(decoded, config, self.test, self.device)
        if aggregate.set.factor != 1:  # a server-side redistillation made a factorised set
            aggregate = AggregateResult(aggregate.set.decoded(), aggregate.weights)
        if defense is not None:
            state.defense.append({"round": server_round, **defense})
        window = [*state.earlier, aggregate]
        training = merge_rounds(window, AggregationContext(self.test.info.num_classes, self.device, config.seed)) \
            if len(window) > 1 else aggregate
        aggregate_set = training.set
        if federation.soft_labels and state.global_model is not None:
            aggregate_set = soft_label(aggregate_set, state.global_model, config.distill.temperature)
        elif self.settings.kd_temperature is not None and aggregate_set.soft_labels is None:
            aggregate_set = one_hot_labelled(aggregate_set)  # round 1 of federation.soft_labels: no global model yet
        aggregate_set.save(self.run_dir / "aggregate.safetensors")
        seed = config.seed + EVAL_SEED_OFFSET
        nets = config.eval.num_nets if federation.protocol == "one-shot" else 1
        self.console.print(f"round {server_round}: training {nets} net(s) for {self.settings.epochs} epochs "
                           f"on the aggregate's {len(aggregate_set)} images")
        on_epoch = reporting_epochs(self.console.print, f"round {server_round}", self.settings.epochs, nets)
        if federation.protocol == "one-shot":
            kept_models: list[torch.nn.Module] = []
            result = evaluate_set(
                aggregate_set, self.test_x, self.test_y, config.model.spec(), self.settings, self.device, seed=seed,
                num_nets=config.eval.num_nets, sample_weights=training.weights,
                on_model=lambda index, model: kept_models.append(model) if index == 0 else None, on_epoch=on_epoch,
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
                        self.settings.targets(on_device), None if weights is None else weights.to(self.device),
                        on_epoch=lambda done: on_epoch(0, done))
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
