"""Accuracy against distillation wall time, per method, on centralised Fashion-MNIST: the chart for choosing a method.

Each method variant (``METHOD[:fFACTOR][@MINUTES]``, e.g. ``dm:f2@20``) distils
once under a wall-clock budget (``--minutes`` unless the variant names its own). Iterating methods are snapshotted at the
checkpoint times (an ``on_iteration`` hook copies the images; the run stops
when the budget is spent), so one run gives the whole curve; a method that
does not iterate (RDED, coresets) gives one point at its own wall time.
RDED's teacher is shared by its variants and read from ``runs/bench/.cache``
when a ``bench_central`` run trained it; its point includes the teacher's
training seconds either way (recorded with the cached weights).
Every snapshot is evaluated afterwards with the hard-label protocol
(``--eval-dsa``: with DSA augmentation, as the papers evaluate; evaluation
time is not counted), beside a random real subset of as many whole
images as the sets store. Writes ``benchmarks/results/accuracy-per-hour.json``,
the plot ``benchmarks/results/accuracy-per-hour.png`` and, for IPC 10 on a CPU,
the headline ``central-fmnist-ipc10-best-2cpuh-acc``: the best point within 2
CPU-hours (wall seconds x torch threads).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.common import RESULTS, command, hardware, write_result
from fedistill.atomic import write_text
from fedistill.config import parse_config
from fedistill.data import load_dataset
from fedistill.distill import get_distiller
from fedistill.distill.base import per_class_budget, source_counts
from fedistill.synthetic import SyntheticSet
from fedistill.teacher import teacher_and_cost
from fedistill.training import EVAL_SEED_OFFSET, evaluate_set


class BudgetSpent(Exception):
    """Raised by the checkpoint hook to end a run whose wall-clock budget is spent."""


CPU_SECONDS_BUDGET = 2 * 3600  # the headline's budget: 2 CPU-hours
RANDOM_REAL = "random real"


def parse_variant(text: str, default_minutes: float) -> tuple[str, int, float]:
    """``dm:f2@20`` -> (``dm``, 2, 20.0); ``rded`` -> (``rded``, 1, ``default_minutes``)."""
    name, _, minutes = text.partition("@")
    method, _, factor = name.partition(":")
    valid_factor = not factor or (factor.startswith("f") and factor[1:].isdigit())
    valid_minutes = not minutes or minutes.replace(".", "", 1).isdigit()
    if not method or not valid_factor or not valid_minutes:
        raise SystemExit(f"--methods: {text!r} is not METHOD[:fFACTOR][@MINUTES], e.g. dm:f2@20")
    return method, int(factor[1:]) if factor else 1, float(minutes) if minutes else default_minutes


def distil_with_checkpoints(
    variant: str, args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[tuple[float, SyntheticSet]]:
    """(seconds since the start, set) at each checkpoint the budget reached, in order."""
    method, factor, minutes = parse_variant(variant, args.minutes)
    config = parse_config({
        "seed": 0,
        "data": {"name": "fashion-mnist"},
        "distill": {"method": method, "ipc": args.ipc, "iterations": 10**7, "batch_real": args.batch_real,
                    "factor": factor},
    })
    settings = config.distill.settings("fashion-mnist")
    budget = minutes * 60
    marks = sorted({m * 60 for m in args.checkpoints if m * 60 <= budget} | {0.0, budget})
    counts = source_counts(labels, num_classes)
    snapshot_labels = torch.repeat_interleave(torch.arange(num_classes), torch.from_numpy(per_class_budget(counts, args.ipc)))
    taken: list[tuple[float, SyntheticSet]] = []

    def hook(iteration: int, _real: torch.Tensor, _real_labels: torch.Tensor, syn: torch.Tensor) -> None:
        elapsed = time.perf_counter() - started
        if marks and elapsed >= marks[0]:
            while marks and elapsed >= marks[0]:  # one snapshot for every mark passed (experts may take long)
                marks.pop(0)
            taken.append((elapsed, SyntheticSet(syn.detach().cpu().clone(), snapshot_labels, num_classes, counts,
                                                provenance={"method": method, "iterations": iteration}, factor=factor)))
            print(f"{variant}: checkpoint at {elapsed:.0f} s, iteration {iteration}", flush=True)
        if not marks:
            raise BudgetSpent

    distiller_type = get_distiller(method)
    options: dict[str, object] = {"on_iteration": hook} if distiller_type.refines else {}
    teacher_seconds = 0.0
    if method == "rded":
        # RDED draws its teacher's seed first from the run's generator: the same seed as bench_central's runs.
        teacher_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(0)))
        options["teacher"], teacher_seconds = teacher_and_cost(
            images, labels, num_classes, config.model.spec(), settings.teacher_epochs, teacher_seed,
            Path(args.cache),
        )
    distiller = distiller_type(config.model.spec(), settings, images.device, **options)
    started = time.perf_counter()
    try:
        final = distiller(images, labels, num_classes, seed=0)
    except BudgetSpent:
        return taken
    taken.append((teacher_seconds + time.perf_counter() - started, final.to("cpu")))
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["rded", "rded:f2", "dm", "dm:f2"],
                        help="variants METHOD[:fFACTOR][@MINUTES], e.g. dm:f2@20")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of each iterating method")
    parser.add_argument("--checkpoints", type=float, nargs="+", default=[1, 2, 5, 10, 20, 40, 60],
                        help="minutes at which iterating methods are snapshotted (those within the budget)")
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--num-nets", type=int, default=2)
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-dsa", action="store_true",
                        help="DSA augmentation while training the evaluation networks (the papers' protocol)")
    parser.add_argument("--cache", default="runs/bench/.cache", help="teacher cache shared with bench_central")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="also write every snapshot there (VARIANT-SECONDSs.safetensors) to relabel later")
    args = parser.parse_args()
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = train.normalized(device), torch.from_numpy(train.labels).to(device)
    test_x, test_y = test.normalized(device), torch.from_numpy(test.labels)
    spec = parse_config({"data": {"name": "fashion-mnist"}}).model.spec()
    eval_settings = parse_config({"data": {"name": "fashion-mnist"},
                                  "eval": {"epochs": args.eval_epochs, "dsa": args.eval_dsa}}).eval
    settings = eval_settings.train_settings("fashion-mnist")
    series: dict[str, list[dict[str, float]]] = {}

    def point(seconds: float, syn: SyntheticSet) -> dict[str, float]:
        result = evaluate_set(syn, test_x, test_y, spec, settings, device, seed=EVAL_SEED_OFFSET,
                              num_nets=args.num_nets)
        return {"seconds": round(seconds, 1), "iterations": syn.provenance.get("iterations"),
                "accuracy": round(100 * result.mean, 2), "std": round(100 * result.std, 2)}

    for variant in args.methods:
        parse_variant(variant, args.minutes)  # a typo fails before an hour of distillation, not after
    real = random_real(args.ipc, images, labels, train.info.num_classes)
    series[RANDOM_REAL] = [point(0.0, real)]
    print(f"{RANDOM_REAL}: {series[RANDOM_REAL][0]['accuracy']:.2f} %", flush=True)
    for variant in args.methods:
        points = []
        for seconds, syn in distil_with_checkpoints(variant, args, images, labels, train.info.num_classes):
            if args.save_dir is not None:
                syn.save(args.save_dir / f"{variant.replace(':', '-').replace('@', '-')}-{seconds:.0f}s.safetensors")
            points.append(point(seconds, syn))
            print(f"{variant}: {seconds:.0f} s -> {points[-1]['accuracy']:.2f} %", flush=True)
        series[variant] = points
    distilled = {v: points for v, points in series.items() if v != RANDOM_REAL}
    best_variant, best = max(((v, p) for v, points in distilled.items() for p in points), key=lambda vp: vp[1]["accuracy"])
    record = {
        "id": "accuracy-per-hour",
        "value": best["accuracy"],
        "unit": "% test accuracy (hard-label protocol), the best point of any method within its budget",
        "notes": f"best: {best_variant} after {best['seconds']:.0f} s; every point in 'series' "
                 f"(seconds of distillation, accuracy, std over nets; '{RANDOM_REAL}': as many whole real images "
                 f"as the sets store); plot accuracy-per-hour.png",
        "series": series,
        "ipc": args.ipc,
        "eval": f"{args.eval_epochs} epochs x {args.num_nets} nets{' +DSA' if args.eval_dsa else ''}, hard-label protocol",
        "command": command(),
        "hardware": hardware(),
        "date": dt.date.today().isoformat(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "accuracy-per-hour.json", json.dumps(record, indent=2) + "\n")
    plot(series, args, RESULTS / "accuracy-per-hour.png")
    if args.ipc == 10 and device.type == "cpu":
        write_best_within_budget(distilled, series[RANDOM_REAL][0], args)


def random_real(ipc: int, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> SyntheticSet:
    """The reference every point stands beside: ``ipc`` whole random real images per class (the same bytes)."""
    config = parse_config({"seed": 0, "data": {"name": "fashion-mnist"}, "distill": {"method": "random", "ipc": ipc}})
    distiller = get_distiller("random")(config.model.spec(), config.distill.settings("fashion-mnist"), images.device)
    return distiller(images, labels, num_classes, seed=0).to("cpu")


def write_best_within_budget(
    distilled: dict[str, list[dict[str, float]]], real: dict[str, float], args: argparse.Namespace
) -> None:
    """``central-fmnist-ipc10-best-2cpuh-acc``: the best point whose wall seconds x torch threads fit 2 CPU-hours."""
    threads = torch.get_num_threads()
    within = [(v, p) for v, points in distilled.items() for p in points if p["seconds"] * threads <= CPU_SECONDS_BUDGET]
    if not within:
        return
    variant, best = max(within, key=lambda vp: vp[1]["accuracy"])
    start = distilled[variant][0]
    start_note = (f"its start alone (the 0 s snapshot) {start['accuracy']:.2f} %, gain "
                  f"{best['accuracy'] - start['accuracy']:+.2f} points; " if len(distilled[variant]) > 1 else "")
    write_result(
        "central-fmnist-ipc10-best-2cpuh-acc",
        best["accuracy"],
        "% test accuracy, Fashion-MNIST IPC 10, hard-label protocol, best method within 2 CPU-hours",
        f"{variant} after {best['seconds']:.0f} s of distillation on {threads} threads "
        f"({best['seconds'] * threads / 3600:.2f} CPU-hours; teacher time included), iteration {best['iterations']}; "
        f"{start_note}random real whole images of the same bytes {real['accuracy']:.2f} %; "
        f"eval {args.eval_epochs} epochs x {args.num_nets} nets, "
        f"{'DSA augmentation' if args.eval_dsa else 'no augmentation'}; std {best['std']:.2f}; "
        f"target 86 %",
    )


def plot(series: dict[str, list[dict[str, float]]], args: argparse.Namespace, path: Path) -> None:
    """Accuracy against log wall time, one line per method variant."""
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for variant, points in series.items():
        if variant == RANDOM_REAL:
            ax.axhline(points[0]["accuracy"], color="grey", linestyle="--", label=f"{RANDOM_REAL} (same bytes)")
            continue
        xs = [max(p["seconds"], 1.0) / 3600 for p in points]
        ax.plot(xs, [p["accuracy"] for p in points], marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("distillation wall time on this machine (hours, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST IPC {args.ipc}: accuracy against distillation time")
    fig.text(0.01, 0.01, hardware(), fontsize=6)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
