"""The FedAvg and FedProx baselines, run by Flower's own strategies in the distillation protocols' harness.

Same model, same partitions, same test split and the same per-round records
(``server.history``) as ``server.distillation``, so the comparison is like for
like. Flower's ``FedAvg``/``FedProx`` drive the rounds, wrapped by
``server.harness`` (bookkeeping, reply validation, seeded sampling). This
module runs them:

- faults: Flower's node sampling waits forever for ``min_available_nodes``;
  ``configure_train`` first waits (bounded) for ``federation.min_clients``
  nodes. The strategy talks to the nodes through ``QuorumGrid``, which gives
  its ``send_and_receive`` the protocols' quorum and straggler timeout, and
  lists the nodes in partition order (each node is asked once with an
  ``identify`` query) for the seeded sampling;
- checkpoints: the central evaluation that closes each round also writes the
  checkpoint (global arrays, history, RNG states), and a resumed run starts
  Flower's strategy again from the checkpointed arrays with its rounds
  shifted (``round_offset``), so the
  round numbers the nodes see, and the seeds they derive, are those of the
  uninterrupted run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from rich.console import Console
from rich.table import Table

from fedistill.atomic import save_tensors
from fedistill.checkpoint import Checkpoint, save_checkpoint
from fedistill.config import ExperimentConfig, experiment_fingerprint
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.runs import create_run_dir, save_config
from fedistill.training import evaluate_model
from server.harness import (
    ArraySpec,
    Harness,
    HarnessFedAvg,
    HarnessFedProx,
    python_random,
    robust_strategy,
)
from server.history import RoundRecord, RunHistory, write_history
from server.privacy import PrivacyRecorder
from server.rounds import (
    BudgetExhausted,
    GridLike,
    NotEnoughClients,
    ProgressLine,
    RunControl,
    RunInterrupted,
    WaitPolicy,
    check_stop,
    exchange,
    identify,
    reporting_arrivals,
    wait_for_nodes,
)
from server.state import discard_unfinished_rounds, fresh_model, load_resumable, resume_hint
from wire.messages import experiment_record, record_to_state, state_to_record

log = logging.getLogger("fedistill.server")

BASELINES = ("fedavg", "fedprox")


class QuorumGrid:
    """A Grid whose ``send_and_receive`` waits like the distillation rounds do (``server.rounds.exchange``).

    Flower's strategies call ``grid.send_and_receive(messages, timeout)``,
    which waits for every reply or the timeout; through this wrapper a round
    also ends ``straggler_timeout_s`` after the quorum of replies without an
    error, and a stop request ends the wait. With ``num_partitions`` set,
    ``get_node_ids`` lists the nodes by the partition each holds (see
    ``by_partition``). With ``say`` set, each exchange reports its replies
    as they arrive (``reporting_arrivals``). Everything else goes to the
    wrapped grid.
    """

    def __init__(
        self,
        grid: GridLike,
        policy: WaitPolicy,
        stop: threading.Event | None = None,
        num_partitions: int | None = None,
        say: ProgressLine | None = None,
    ) -> None:
        self.grid = grid
        self.say = say
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

        if self.say is not None:
            first = messages[0]
            server_round = first.content["config"]["server-round"] if "config" in first.content else "?"
            on_reply = reporting_arrivals(on_reply, len(messages), self.say,
                                          f"round {server_round} {first.metadata.message_type}")
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
    strategy: Harness
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
            with python_random(config.seed if completed == 0 else None):
                strategy.start(
                    grid=QuorumGrid(  # type: ignore[arg-type]
                        grid, policy, control.stop,
                        # Sampling a share of the nodes: draw from them in partition order (by_partition).
                        config.partition.num_clients if federation.fraction_train < 1 else None,
                        console.print,
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
