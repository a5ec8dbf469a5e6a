"""What a distillation run carries from one round to the next, and how a stopped run is resumed.

``ServerState`` is everything a checkpoint holds (history, global model,
aggregate, the earlier aggregates still in the window, the state kept per
partition, the privacy record, the defence's removals); ``KeptState`` is what
the server keeps for one partition so that a restarted node can continue.
``load_resumable`` refuses a checkpoint written by another experiment and
restores the random number generators, so a resumed run ends exactly where
the uninterrupted one would have. ``fresh_model`` builds the global model
before any training, for both protocols.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedistill.aggregation import AggregateResult
from fedistill.checkpoint import Checkpoint, CheckpointError, load_checkpoint, restore_rng
from fedistill.config import ExperimentConfig, experiment_fingerprint
from fedistill.data import ImageData
from fedistill.models import build_model
from fedistill.synthetic import SyntheticSet
from server.history import RunHistory
from wire.messages import PREVIOUS_SET

EARLIER_WEIGHTS = "weights"
"""Key of a kept earlier aggregate's per-image training weights in the checkpoint."""


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


def fresh_model(config: ExperimentConfig, test: ImageData, device: torch.device, seed: int) -> torch.nn.Module:
    """The global model before any training, initialised from ``seed`` without touching the global RNG."""
    info = test.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model.spec(), (info.channels, info.height, info.width), info.num_classes)
    return model.to(device)
