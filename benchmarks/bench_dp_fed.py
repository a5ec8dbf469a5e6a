"""Differentially private federated Fashion-MNIST: DP-DM, DP gradient matching and DP-FedAvg at one epsilon.

10 clients, Dirichlet(0.5) label skew over the first 55,000 training images
(the last 5,000 are the public tuning split of ``benchmarks/tune_dp.py``),
ConvNet-3 (width 64, instance norm), record-level (epsilon, 1e-5)-DP per
client under add/remove-one adjacency, RDP accountant. DP-DM and DP-GM start
from noise or, with ``--init public``, from the public split's images (no
client holds them, so they cost no privacy); they are one-shot (IPC 10 per client, union at the server, the evaluation protocol on
the union); DP-FedAvg runs DP-SGD on every client for ``--rounds`` rounds.
Each call runs one row through Flower's simulation engine (what ``fedistill
run`` uses) and writes ``benchmarks/results/dp-fed/<method>-eps<eps>.json``;
``--id`` also writes the headline record; ``--ablation NAME`` writes the row to
``dp-fed/NAME/`` instead, outside the table. Budgets are reduced for a 2-core
CPU; every record states the budget it used. ``--toy`` checks the pipeline
in a minute and writes nothing under ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.common import RESULTS, command, hardware, write_result
from fedistill.config import ExperimentConfig, parse_config
from launch.simulation import simulate_run

PRIVATE_TRAIN_IMAGES = 55_000
"""Clients hold the first 55,000 training images; the rest is the public tuning split."""

METHODS = ("dp-dm", "dp-gm", "dp-fedavg")

DP_FEDAVG_LR = 0.05
"""DP-FedAvg's local learning rate unless ``--lr`` is given (untuned; the tuned rates are in BENCHMARKS.md)."""


def experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The row's experiment; the defaults are those chosen on the public tuning split (BENCHMARKS.md)."""
    values: dict[str, Any] = {
        "seed": 0,
        "device": "cpu",
        "output_dir": args.output,
        "data": {"name": "fashion-mnist", "train_subset": args.train_images, **public_data(args)},
        "partition": {"scheme": "dirichlet", "num_clients": 10, "alpha": 0.5, "min_partition_size": 100},
        "model": {"width": 64},
        "eval": {"epochs": args.eval_epochs, "num_nets": args.num_nets, "dsa": args.eval_dsa},
        "privacy": {
            "enabled": True,
            "target_epsilon": args.epsilon,
            "delta": 1e-5,
            "clip_norm": args.clip,
            "sample_rate": args.sample_rate,
            "presence_sigmas": args.presence_sigmas,
            "accountant": "rdp",
            "reproducible": True,
        },
    }
    if args.method == "dp-fedavg":
        values["federation"] = {
            "protocol": "fedavg",
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "min_clients": 8,
            "round_timeout_s": 7200.0,
            **({} if args.lr is None else {"local_lr": args.lr}),
        }
    else:
        distill: dict[str, Any] = {
            "method": args.method,
            "ipc": 10,
            "iterations": args.iterations,
            "init": args.init,
            "dsa": True,
        }
        if args.lr is not None:
            distill["lr_images"] = args.lr
        if args.method == "dp-gm":
            distill.update(outer_loop=args.outer_loop, inner_loop=args.inner_loop)
        if args.replay_steps:
            distill["replay_steps"] = args.replay_steps
        values["distill"] = distill
        values["federation"] = {
            "protocol": "one-shot",
            "aggregation": args.aggregation,
            "min_clients": 8,
            "round_timeout_s": 7200.0,
        }
    return parse_config(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--iterations", type=int, default=400, help="distillation iterations per client")
    parser.add_argument("--outer-loop", type=int, default=5, help="dp-gm releases per iteration")
    parser.add_argument("--inner-loop", type=int, default=10, help="dp-gm network steps on the set between releases")
    parser.add_argument("--rounds", type=int, default=10, help="dp-fedavg rounds")
    parser.add_argument("--local-epochs", type=int, default=1, help="dp-fedavg Poisson epochs per round")
    parser.add_argument("--lr", type=float, default=None, help="image lr (distillers) or local lr (dp-fedavg)")
    parser.add_argument("--replay-steps", type=int, default=0,
                        help="dp-dm: image steps against kept releases after each release (post-processing)")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--presence-sigmas", type=float, default=3.0)
    parser.add_argument(
        "--init",
        choices=["noise", "public"],
        default="noise",
        help="distillers' starting images: noise, or the public split's images (no privacy cost)",
    )
    parser.add_argument("--public", default="rest", choices=["rest", "digits"],
                        help="with --init public: the training images no client holds, or scikit-learn's digits (OOD)")
    parser.add_argument("--public-size", type=int, default=None, help="with --init public: a pool of this many images")
    parser.add_argument("--aggregation", default="union", choices=["union", "class-weighted"])
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-dsa", action="store_true")
    parser.add_argument("--num-nets", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=PRIVATE_TRAIN_IMAGES)
    parser.add_argument("--id", help="also write benchmarks/results/<id>.json with the accuracy")
    parser.add_argument(
        "--gain-id",
        help="with --init public: also write benchmarks/results/<id>.json with the points over the start alone "
        "(the dp-dm --iterations 0 row of the same public setting and evaluation, run first)",
    )
    parser.add_argument(
        "--ablation", metavar="NAME",
        help="write the row under benchmarks/results/dp-fed/NAME/ (outside the table) instead of over the table's row",
    )
    parser.add_argument("--toy", action="store_true", help="tiny budgets to check the pipeline; writes no results")
    parser.add_argument("--output", default="runs/bench-dp")
    args = parser.parse_args()
    if args.method == "dp-fedavg" and args.lr is None:
        args.lr = DP_FEDAVG_LR
    if args.toy:
        args.train_images, args.iterations, args.rounds, args.eval_epochs = 3000, 4, 2, 3
        args.outer_loop, args.inner_loop = 2, 1
    start_alone = start_alone_row(args) if args.gain_id else None
    torch.set_num_threads(2)
    config = experiment(args)
    started = time.perf_counter()
    run_dir = simulate_run(config, Console(stderr=True))
    seconds = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    accuracy = metrics["eval"]["mean"] if metrics.get("eval") else metrics["final_accuracy"]
    row = {
        "method": args.method,
        "init": None if args.method == "dp-fedavg" else args.init,
        **public_data(args),
        "target_epsilon": args.epsilon,
        "delta": 1e-5,
        "worst_client_epsilon": privacy["worst_epsilon"],
        "accountant": privacy["accountant"],
        "adjacency": privacy["adjacency"],
        "noise_multiplier": privacy["noise_multiplier"],
        "sample_rate": args.sample_rate,
        "clip_norm": args.clip,
        "releases_per_client": privacy["steps_per_round"] * (args.rounds if args.method == "dp-fedavg" else 1),
        "budget": budget(args),
        "lr": args.lr,
        "replay_steps": args.replay_steps,
        "accuracy": accuracy,
        "accuracy_std": metrics["eval"]["std"] if metrics.get("eval") else None,
        "accepted": metrics["accepted"],
        "upload_bytes": metrics["upload_bytes"],
        "wall_seconds": seconds,
        "command": command(),
        "hardware": hardware(),
        "date": dt.date.today().isoformat(),
        "run_dir": str(run_dir),
    }
    print(json.dumps(row))
    if args.toy:
        return
    out = row_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    if args.id:
        write_result(
            args.id,
            round(100 * accuracy, 2),
            "% global test accuracy",
            f"Fashion-MNIST, 10 clients Dirichlet(0.5), {args.method} at epsilon {args.epsilon:g} per client "
            f"(worst client {privacy['worst_epsilon']:.3f}, delta 1e-5, RDP, add/remove one record of a client); "
            f"{budget(args)}; {seconds / 60:.0f} min on the CPU machine",
        )
    if start_alone is not None:
        write_result(
            args.gain_id,
            round(100 * (accuracy - start_alone["accuracy"]), 2),
            "points of global test accuracy over the start alone (the same public images, zero iterations)",
            f"Fashion-MNIST, 10 clients Dirichlet(0.5), {args.method} at epsilon {args.epsilon:g} per client "
            f"(worst client {privacy['worst_epsilon']:.3f}, delta 1e-5, RDP): {100 * accuracy:.2f} %; start alone "
            f"{100 * start_alone['accuracy']:.2f} % ({start_alone['command']}, {start_alone['date']}); {budget(args)}",
        )


def start_alone_row(args: argparse.Namespace) -> dict[str, Any]:
    """The stored start-alone row the gain is measured against; refuses before the run if it is missing or unlike."""
    if args.init != "public" or args.method == "dp-fedavg" or args.iterations == 0:
        raise SystemExit("--gain-id: only for a distiller with --init public and iterations > 0")
    path = RESULTS / "dp-fed" / f"dp-dm-public{public_tag(args)}-start-only.json"
    if not path.exists():
        raise SystemExit(f"--gain-id: no start-alone row {path.name}; run this command with --method dp-dm "
                         "--iterations 0 first")
    row = json.loads(path.read_text())
    evaluation = budget(args).rsplit(", ", 1)[-1]
    if not row["budget"].endswith(evaluation):
        raise SystemExit(f"--gain-id: {path.name} was evaluated differently ({row['budget']}); need {evaluation}")
    return row


def public_data(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[data]`` keys of the public pool; none unless the row starts from public images."""
    if args.init != "public" or args.method == "dp-fedavg":
        return {}
    return {"public": args.public, **({"public_size": args.public_size} if args.public_size else {})}


def public_tag(args: argparse.Namespace) -> str:
    """``-digits``, ``-pool100``: the public setting in a row's name (empty for the whole in-distribution rest)."""
    tag = "" if args.public == "rest" else f"-{args.public}"
    return tag + (f"-pool{args.public_size}" if args.public_size else "")


def row_path(args: argparse.Namespace) -> Path:
    """Where the row is written: the table's file, or a subfolder for an ablation the table must not show."""
    folder = RESULTS / "dp-fed"
    return (folder / args.ablation if args.ablation else folder) / f"{row_name(args)}.json"


def row_name(args: argparse.Namespace) -> str:
    """The row file's stem; a distiller at zero iterations is its starting set alone (epsilon: the counts only)."""
    if args.method == "dp-fedavg":
        return f"dp-fedavg-eps{args.epsilon:g}" + ("" if args.lr == DP_FEDAVG_LR else f"-lr{args.lr:g}")
    if args.iterations == 0:
        return f"{args.method}-{args.init}{public_tag(args)}-start-only"
    variant = f"-public{public_tag(args)}" if args.init == "public" else ""
    replay = f"-replay{args.replay_steps}" if args.replay_steps else ""
    return f"{args.method}{variant}-eps{args.epsilon:g}" + ("" if args.lr is None else f"-lr{args.lr:g}") + replay


def budget(args: argparse.Namespace) -> str:
    common = f"q {args.sample_rate:g}, C {args.clip:g}"
    if args.method == "dp-fedavg":
        return f"{args.rounds} rounds x {args.local_epochs} Poisson epoch(s), lr {args.lr:g}, {common}"
    extra = f" x {args.outer_loop} releases (inner {args.inner_loop})" if args.method == "dp-gm" else ""
    evaluation = f"eval {args.eval_epochs} epochs x {args.num_nets} net(s){' +DSA' if args.eval_dsa else ''}"
    pool = ("digits (OOD)" if args.public == "digits" else "public") + (
        f" images, a pool of {args.public_size}" if args.public_size else " images")
    start = f"from {pool}" if args.init == "public" else "from noise"
    lr = "" if args.lr is None else f", image lr {args.lr:g}"
    replay = f", {args.replay_steps} replay steps per release" if args.replay_steps else ""
    steps = f"{args.iterations} iterations{extra}{lr}{replay}"
    return f"IPC 10 {start}, {steps}, {common}, {args.aggregation}, {evaluation}"


if __name__ == "__main__":
    main()
