"""Federated Fashion-MNIST benchmark: one protocol on Dirichlet-partitioned clients, through Flower's simulation.

Each call runs one experiment with ``launch.simulation.simulate_run`` (the
engine behind ``fedistill run``: Ray actors run the ClientApp, the ServerApp
runs the protocol), then writes ``benchmarks/results/fed/<protocol>-dir<alpha>-c<clients>[-tag].json``
with the final global accuracy, rounds, upload bytes, wall time and the peak
memory of the whole process tree (Ray workers included). ``--record ID=FIELD``
also writes a headline record. ``benchmarks/fed_table.py`` prints the table of
BENCHMARKS.md from the rows. Budgets are sized for a 2-core CPU; every one is in the row.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console

from benchmarks.common import RESULTS, command, hardware, write_result
from benchmarks.memory import PeakTreeMemory
from fedistill.config import ExperimentConfig, parse_config
from launch.simulation import simulate_run
from server.compare import START_ALONE, final_accuracy, reference_configs

FIELDS = {
    "accuracy": ("% global test accuracy after the last round", lambda row: round(100 * row["accuracy"], 2)),
    "upload_bytes": ("bytes uploaded by all clients over the run", lambda row: row["upload_bytes"]),
    "round_upload_bytes": ("bytes uploaded by all clients in one round", lambda row: row["round_upload_bytes"]),
    "round_seconds": ("s wall time of the first round (server side)", lambda row: round(row["round_seconds"][0], 1)),
    "gain_over_start": ("points of global test accuracy over the same run's start alone (zero iterations)",
                        lambda row: round(100 * (row["accuracy"] - row["references"][START_ALONE]), 2)),
}


def experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The benchmark's experiment: Fashion-MNIST, Dirichlet(alpha) over ``clients``, ConvNet-3 of ``width``."""
    federation: dict[str, Any] = {
        "protocol": args.protocol,
        "rounds": args.rounds,
        "min_clients": max(1, int(0.8 * args.clients)),
        "fraction_train": 1.0,
        "local_epochs": args.local_epochs,
        "round_timeout_s": 7200.0,
    }
    if args.aggregate_window > 1:
        federation["aggregate_window"] = args.aggregate_window
    if args.client_start != "previous":
        federation["client_start"] = args.client_start
    return parse_config(
        {
            "seed": args.seed,
            "output_dir": args.output,
            "data": {"name": "fashion-mnist"},
            "partition": {
                "scheme": "dirichlet",
                "num_clients": args.clients,
                "alpha": args.alpha,
                "min_partition_size": args.min_partition_size,
            },
            "model": {"width": args.width},
            "distill": {
                "method": args.method,
                "ipc": args.ipc,
                "iterations": args.iterations,
                "batch_real": args.batch_real,
                "dsa": True,
                "factor": args.factor,
                "labels": args.labels,
                "teacher_epochs": args.teacher_epochs,
                "temperature": args.kd_temperature,
            },
            "eval": {"epochs": args.eval_epochs, "num_nets": 1, "dsa": args.eval_dsa, "protocol": args.eval_protocol,
                     "kd_temperature": args.kd_temperature},
            "federation": federation,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--protocol", required=True, choices=["one-shot", "multi-round", "fedavg", "fedprox"])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--method", default="dm")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=300, help="DM iterations per client per round")
    parser.add_argument("--batch-real", type=int, default=64)
    parser.add_argument("--factor", type=int, default=1, help="distill.factor (IDC-style tiles per image side)")
    parser.add_argument("--labels", default="hard", choices=["hard", "teacher"], help="distill.labels")
    parser.add_argument("--teacher-epochs", type=int, default=5, help="distill.teacher_epochs")
    parser.add_argument("--eval-protocol", default="hard-label", choices=["hard-label", "soft-label-kd"])
    parser.add_argument("--kd-temperature", type=float, default=4.0, help="distill.temperature and eval.kd_temperature")
    parser.add_argument("--references", action="store_true",
                        help="also run the start alone and random real references (server.compare.reference_configs)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--eval-epochs", type=int, default=300, help="server training epochs per round")
    parser.add_argument("--eval-dsa", action="store_true", help="siamese augmentation while training the global model")
    parser.add_argument("--local-epochs", type=int, default=1, help="FedAvg/FedProx local epochs per round")
    parser.add_argument("--aggregate-window", type=int, default=1,
                        help="multi-round: train the global model on the last N rounds' aggregates")
    parser.add_argument("--client-start", default="previous", choices=["previous", "fresh"],
                        help="multi-round: each round's set refines the node's last one, or starts afresh")
    parser.add_argument("--min-partition-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the row file, for variants of one setting")
    parser.add_argument("--record", action="append", default=[], metavar="ID=FIELD",
                        help=f"also write benchmarks/results/ID.json; FIELD one of {', '.join(FIELDS)}")
    parser.add_argument("--output", default="runs/bench")
    args = parser.parse_args()
    records = [entry.partition("=")[::2] for entry in args.record]
    for result_id, field in records:
        if not result_id or field not in FIELDS:
            parser.error(f"--record {result_id}={field}: expected ID=FIELD with FIELD one of {', '.join(FIELDS)}")
        if field == "gain_over_start" and not args.references:
            parser.error(f"--record {result_id}=gain_over_start needs --references")

    config = experiment(args)
    started = time.perf_counter()
    with PeakTreeMemory() as memory:
        run_dir = simulate_run(config, Console(stderr=True))
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    references = {}
    if args.references:
        for name, reference in reference_configs(config).items():
            reference_dir = simulate_run(reference, Console(stderr=True))
            references[name] = final_accuracy(reference_dir)
    rounds = metrics["rounds"]
    row = {
        "protocol": args.protocol,
        "alpha": args.alpha,
        "clients": args.clients,
        "rounds": len(rounds),
        "method": args.method if args.protocol in ("one-shot", "multi-round") else None,
        "factor": args.factor,
        "labels": args.labels,
        "eval_protocol": args.eval_protocol,
        "references": references,
        "ipc": args.ipc,
        "iterations": args.iterations,
        "batch_real": args.batch_real,
        "width": args.width,
        "eval_epochs": args.eval_epochs,
        "eval_dsa": args.eval_dsa,
        "local_epochs": args.local_epochs,
        "proximal_mu": config.federation.proximal_mu if args.protocol == "fedprox" else None,
        "aggregate_window": args.aggregate_window,
        "client_start": args.client_start,
        "seed": args.seed,
        "accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "upload_bytes": metrics["upload_bytes"],
        "round_upload_bytes": rounds[0]["upload_bytes"],
        "download_bytes": sum(r["download_bytes"] for r in rounds),
        "round_seconds": [r["seconds"] for r in rounds],
        "client_seconds_mean": [
            sum(r["client_seconds"].values()) / max(1, len(r["client_seconds"])) for r in rounds
        ],
        "accepted_last_round": rounds[-1]["accepted"],
        "wall_seconds": wall,
        "peak_tree_rss_bytes": memory.peak_bytes,
        "command": command(),
        "hardware": hardware(),
        "run_dir": str(run_dir),
    }
    name = (f"{args.protocol}-dir{args.alpha:g}-c{args.clients}"
            + (f"-window{args.aggregate_window}" if args.aggregate_window > 1 else "")
            + ("-fresh" if args.client_start == "fresh" else "")
            + (f"-{args.method}" if args.method != "dm" else "")
            + (f"-f{args.factor}" if args.factor != 1 else "")
            + ("-soft" if args.eval_protocol == "soft-label-kd" else "")
            + (f"-{args.tag}" if args.tag else ""))
    out = RESULTS / "fed" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    for result_id, field in records:
        unit, value = FIELDS[field]
        write_result(
            result_id,
            value(row),
            unit,
            f"Fashion-MNIST, {args.clients} clients, Dirichlet {args.alpha:g}, {args.protocol}, {len(rounds)} rounds, "
            f"ConvNet-3 width {args.width}; "
            + (f"{args.method} IPC {args.ipc} factor {args.factor} labels {args.labels}, {args.iterations} it/round, "
               f"{args.batch_real} real/class; {args.eval_protocol} protocol; "
               if args.protocol in ("one-shot", "multi-round") else f"{args.local_epochs} local epoch(s)/round; ")
            + f"server training {args.eval_epochs} epochs{' +DSA' if args.eval_dsa else ''}"
            + (f" on the last {args.aggregate_window} rounds' aggregates" if args.aggregate_window > 1 else "")
            + ("; clients start a fresh set each round" if args.client_start == "fresh" else "") + "; "
            f"accuracy {100 * row['accuracy']:.2f}%, upload {row['upload_bytes']:,} B, wall {wall:.0f} s, "
            f"peak tree RSS {memory.peak_bytes / 2**20:.0f} MiB"
            + "".join(f"; {name} {100 * value:.2f}%" for name, value in references.items()),
        )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
