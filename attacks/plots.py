"""The audit's figures, drawn with matplotlib's object API on an Agg canvas (no pyplot state), as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_robust_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Robust accuracy (%) against the radius, one line per model and attack; one panel per norm."""
    norms = sorted({row["norm"] for row in rows})
    fig = _figure(5.5 * len(norms), 4.0)
    for index, norm in enumerate(norms):
        ax = fig.add_subplot(1, len(norms), index + 1)
        for row in (r for r in rows if r["norm"] == norm):
            xs = [0.0, *row["epsilons"]]
            ys = [100 * row["clean_accuracy"], *(100 * a for a in row["accuracy"])]
            ax.plot(xs, ys, marker="o", linewidth=1.2, label=f"{row['model']}: {row['attack']}")
        ax.set_xlabel(f"{norm} radius (pixel units)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"robust accuracy ({norm})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_backdoor(arms: Sequence[dict[str, Any]], path: Path) -> Path:
    """CTA and ASR (%) bars per arm (e.g. with / without the defence) and trigger."""
    labels = [f"{arm['arm']}\n{arm['trigger']}" for arm in arms]
    x = np.arange(len(arms))
    fig = _figure(max(4.0, 1.6 * len(arms) + 1), 4.0)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [100 * arm["cta"] for arm in arms], 0.4, label="clean test accuracy")
    ax.bar(x + 0.2, [100 * arm["asr"] for arm in arms], 0.4, label="attack success rate")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title("backdoor: CTA and ASR (non-target test images)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_roc(reports: Sequence[dict[str, Any]], path: Path) -> Path:
    """ROC curves on log-log axes (where low-FPR behaviour is visible), with the chance diagonal."""
    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot()
    floor = 1e-4
    for report in reports:
        fpr = np.maximum(np.asarray(report["curve"]["fpr"]), floor)
        tpr = np.maximum(np.asarray(report["curve"]["tpr"]), floor)
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{report['target']}: {report['attack']} (AUC {report['auc']:.3f})")
    ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference ROC")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_triggered(clean: torch.Tensor, stamped: Sequence[tuple[str, torch.Tensor]], path: Path) -> Path:
    """Clean test images (first row) and the same images stamped with each trigger (one row per trigger)."""
    rows = [("clean", clean), *stamped]
    count = len(clean)
    fig = _figure(max(3.0, 0.9 * count + 1.5), 1.0 * len(rows) + 0.6)
    for r, (name, images) in enumerate(rows):
        for c in range(count):
            ax = fig.add_subplot(len(rows), count, r * count + c + 1)
            image = images[c].detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("triggered examples")
    return _save(fig, path)
