"""Centralised Fashion-MNIST benchmark: one method at one IPC, distilled and evaluated with the protocol.

Each call runs one row (so that peak memory is the row's own) through
``fedistill.central.run_central`` and writes ``benchmarks/results/central/<method>-ipc<k>.json``;
``--id`` also writes a headline record. ``benchmarks/central_table.py`` collects the rows.
CPU budgets are reduced from the papers' (see BENCHMARKS.md); the budget used is in every record.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from benchmarks.common import RESULTS, command, hardware, write_result
from fedistill.central import run_central
from fedistill.config import parse_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True)
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=0)
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--num-nets", type=int, default=2)
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--no-dsa", action="store_true", help="DM without siamese augmentation")
    parser.add_argument("--eval-dsa", action="store_true",
                        help="DSA augmentation while training the evaluation nets (the papers' DM/DSA numbers)")
    parser.add_argument("--factor", type=int, default=1, help="distill.factor: tiles per image side (IDC-style)")
    parser.add_argument("--labels", default="hard", choices=["hard", "teacher"], help="distill.labels")
    parser.add_argument("--teacher-epochs", type=int, default=5, help="distill.teacher_epochs")
    parser.add_argument("--protocol", default="hard-label", choices=["hard-label", "soft-label-kd"],
                        help="eval.protocol; soft-label rows go to their own table")
    parser.add_argument("--kd-temperature", type=float, default=4.0, help="eval.kd_temperature and distill.temperature")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--tag", default="", help="suffix of the row file, e.g. --tag=-paper for paper-budget rows")
    parser.add_argument("--id", help="also write benchmarks/results/<id>.json with the mean accuracy")
    parser.add_argument("--output", default="runs/bench")
    args = parser.parse_args()

    config = parse_config(
        {
            "seed": 0,
            "output_dir": args.output,
            "device": args.device,
            "data": {"name": "fashion-mnist"},
            "distill": {
                "method": args.method,
                "ipc": args.ipc,
                "iterations": args.iterations,
                "batch_real": args.batch_real,
                "dsa": not args.no_dsa,
                "factor": args.factor,
                "labels": args.labels,
                "teacher_epochs": args.teacher_epochs,
                "temperature": args.kd_temperature,
            },
            "eval": {"epochs": args.eval_epochs, "num_nets": args.num_nets, "dsa": args.eval_dsa,
                     "protocol": args.protocol, "kd_temperature": args.kd_temperature},
        }
    )
    run_dir = run_central(config, Console(stderr=True))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {
        "method": args.method,
        "ipc": args.ipc,
        "iterations": args.iterations,
        "batch_real": args.batch_real,
        "dsa": not args.no_dsa,
        "eval_epochs": args.eval_epochs,
        "eval_dsa": args.eval_dsa,
        "num_nets": args.num_nets,
        "factor": args.factor,
        "labels": args.labels,
        "teacher_epochs": args.teacher_epochs if args.labels == "teacher" or args.method == "rded" else None,
        "protocol": metrics["eval_protocol"],
        "bytes": metrics["bytes"],
        "accuracy_mean": metrics["eval"]["mean"],
        "accuracy_std": metrics["eval"]["std"],
        "accuracies": metrics["eval"]["accuracies"],
        "distill_seconds": metrics["distill_seconds"],
        "eval_seconds": metrics["eval"]["seconds"],
        "references": {
            name: None if ref is None else {"mean": ref["mean"], "std": ref["std"], "accuracies": ref["accuracies"]}
            for name, ref in metrics["references"].items()
        },
        "gains": metrics["gains"],
        "peak_rss_bytes": metrics["peak_rss_bytes"],
        "command": command(),
        "hardware": hardware(),
        "run_dir": str(run_dir),
    }
    variant = (f"-f{args.factor}" if args.factor != 1 else "") + ("-soft" if args.protocol == "soft-label-kd" else "")
    out = RESULTS / "central" / f"{args.method}-ipc{args.ipc}{variant}{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    if args.id:
        budget = f"{args.iterations} iterations, {args.batch_real} real/class" if args.iterations else "no iterations"
        write_result(
            args.id,
            round(100 * metrics["eval"]["mean"], 2),
            "% test accuracy (mean over nets)",
            f"Fashion-MNIST ConvNet-3, {args.method} IPC {args.ipc} factor {args.factor} labels {args.labels}, {budget}, "
            f"dsa={not args.no_dsa}; {metrics['eval_protocol']} protocol, "
            f"eval {args.eval_epochs} epochs{' +DSA' if args.eval_dsa else ''} x {args.num_nets} nets, std {100 * metrics['eval']['std']:.2f}; "
            f"distill {metrics['distill_seconds']:.0f} s, peak RSS {metrics['peak_rss_bytes'] / 2**20:.0f} MiB",
        )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
