"""Per-round records of a federated run, and how they are written to its run directory.

Every protocol (one-shot, multi-round, FedAvg, FedProx) reports the same
fields per round, so runs compare like for like: global test accuracy and
loss, bytes up and down (payloads as sent, counted per accepted reply and per
message sent), cumulative upload, wall time, and seconds per client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedistill.atomic import save_figure
from fedistill.runs import write_json


@dataclass
class RoundRecord:
    """One server round. ``accuracy`` is in [0, 1], on the held-out test split.

    ``rejected`` (node -> reason) and ``missing`` (nodes asked that never
    answered, or that the SuperLink reported unavailable) name node ids, as
    the operator sees them in ``flwr supernode list``; ``partitions`` are the
    partitions whose replies were accepted, which stay the same across node
    restarts and resumed runs; ``asked`` counts the nodes asked.
    """

    round: int
    accuracy: float
    loss: float
    upload_bytes: int
    download_bytes: int
    seconds: float
    accepted: int
    rejected: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    client_seconds: dict[str, float] = field(default_factory=dict)
    asked: int = 0
    partitions: list[int] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    """Nodes that declined the round because it would exceed their privacy budget (not malformed replies)."""


@dataclass
class RunHistory:
    """All rounds of one run, with the protocol that produced them."""

    protocol: str
    rounds: list[RoundRecord] = field(default_factory=list)

    def add(self, record: RoundRecord) -> None:
        if self.rounds and record.round <= self.rounds[-1].round:
            raise ValueError(f"round {record.round} recorded after round {self.rounds[-1].round}")
        self.rounds.append(record)

    def cumulative_upload(self) -> list[int]:
        total, out = 0, []
        for record in self.rounds:
            total += record.upload_bytes
            out.append(total)
        return out

    def final_accuracy(self) -> float:
        if not self.rounds:
            raise ValueError("no rounds recorded")
        return self.rounds[-1].accuracy

    def to_dict(self) -> dict[str, Any]:
        rounds = []
        for record, cumulative in zip(self.rounds, self.cumulative_upload()):
            rounds.append({**asdict(record), "cumulative_upload_bytes": cumulative})
        return {"protocol": self.protocol, "rounds": rounds}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunHistory:
        """The inverse of ``to_dict`` (a checkpoint's copy); derived fields are recomputed, not read."""
        names = {item.name for item in fields(RoundRecord)}
        history = cls(values["protocol"])
        for record in values["rounds"]:
            history.add(RoundRecord(**{key: value for key, value in record.items() if key in names}))
        return history


def write_history(run_dir: Path, history: RunHistory, summary: dict[str, Any]) -> Path:
    """``metrics.json`` (summary plus per-round records) and the two plots; returns the JSON path."""
    if history.rounds:
        plot_history(history, run_dir / "accuracy_vs_round.png", by="round")
        plot_history(history, run_dir / "accuracy_vs_bytes.png", by="bytes")
    return write_json(run_dir / "metrics.json", {**summary, **history.to_dict()})


def plot_history(history: RunHistory, path: Path, by: str) -> Path:
    """Global test accuracy against the round (``by="round"``) or the cumulative upload in MB (``"bytes"``)."""
    if by not in ("round", "bytes"):
        raise ValueError(f"plot_history: by must be 'round' or 'bytes', got {by!r}")
    xs = (
        [record.round for record in history.rounds]
        if by == "round"
        else [value / 2**20 for value in history.cumulative_upload()]
    )
    ys = [100 * record.accuracy for record in history.rounds]
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", linewidth=1.2)
    ax.set_xlabel("server round" if by == "round" else "cumulative upload (MiB)")
    ax.set_ylabel("global test accuracy (%)")
    ax.set_title(f"{history.protocol}: accuracy vs {'round' if by == 'round' else 'upload'}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
