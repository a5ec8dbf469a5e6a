"""One-run canary audit of a client's release: the empirical epsilon beside the ledger's (issue 18).

Client 0 of the DP benchmark's federation (``benchmarks.bench_dp_fed``:
Fashion-MNIST, 10 clients, Dirichlet 0.5 over the first 55,000 training
images) gets ``--canaries`` test images, each with probability 1/2; its
round-1 release runs once (``clients.app.canary_release``: the node's own
path) and the canaries' nearest-neighbour distances to the released set give
the guesses (``attacks.canary``). Rows: the non-private DM set from real
images, and DP-DM from the public split at epsilon 10 and 1 with the tuned
image learning rates of BENCHMARKS.md. Writes
``benchmarks/results/canary/<row>.json`` and the record
``canary-eps-lower-bound-dp-eps1``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from attacks.canary import canary_audit
from benchmarks.bench_dp_fed import PRIVATE_TRAIN_IMAGES
from benchmarks.bench_dp_fed import experiment as dp_experiment
from benchmarks.common import RESULTS, command, hardware, write_result
from clients.app import canary_release
from fedistill.config import ExperimentConfig, parse_config
from fedistill.data import load_dataset

ROWS: dict[str, dict[str, Any]] = {
    "nondp": {"method": "dm", "epsilon": None, "lr": None},
    "dp-eps10": {"method": "dp-dm", "epsilon": 10.0, "lr": 0.1},
    "dp-eps1": {"method": "dp-dm", "epsilon": 1.0, "lr": 0.03},
}
"""Each row's release; the DP rows use the tuned image learning rates of the DP table."""


def row_config(name: str, args: argparse.Namespace) -> ExperimentConfig:
    """The DP benchmark's experiment for a DP row; the same federation without privacy (DM from real images) else."""
    row = ROWS[name]
    dp_args = argparse.Namespace(
        method="dp-dm", epsilon=row["epsilon"] or 1.0, iterations=args.iterations, init="public", lr=row["lr"],
        outer_loop=5, inner_loop=10, sample_rate=0.1, clip=1.0, presence_sigmas=3.0, public="rest", public_size=None,
        aggregation="union", eval_epochs=300, eval_dsa=True, num_nets=1, train_images=PRIVATE_TRAIN_IMAGES,
        output=args.output, rounds=1, local_epochs=1,
    )
    config = dp_experiment(dp_args)
    if row["epsilon"] is not None:
        return config
    values = config.model_dump(mode="json", exclude_none=True)
    values["privacy"] = {"enabled": False}
    values["data"].pop("public", None)
    values["distill"].update(method="dm", init="real")
    values["distill"].pop("lr_images", None)
    return parse_config(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--output", default="runs/bench-canary")
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = load_dataset("fashion-mnist", "test")
    for name in args.rows:
        config = row_config(name, args)
        started = time.perf_counter()
        data, release = canary_release(config, args.client, device)
        audit = canary_audit(data, test, release, args.canaries, config.seed, device)
        row = {
            "row": name,
            "method": config.distill.method,
            "iterations": config.distill.iterations,
            "client": args.client,
            "client_images": len(data),
            **audit,
            "seconds": round(time.perf_counter() - started, 1),
            "command": command(),
            "hardware": hardware(),
        }
        claimed = "not private" if audit["claimed_epsilon"] is None else f"ledger epsilon {audit['claimed_epsilon']:.4g}"
        print(f"{name}: empirical epsilon >= {audit['epsilon_lower_bound']:.3f} (95 %), {claimed}; "
              f"{audit['trials']}", flush=True)
        out = RESULTS / "canary" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(row, indent=2) + "\n")
        if name == "dp-eps1":
            write_result(
                "canary-eps-lower-bound-dp-eps1",
                round(audit["epsilon_lower_bound"], 4),
                "epsilon (95 % lower bound from one run), DP-DM at ledger epsilon 1",
                f"{args.canaries} Fashion-MNIST test images as canaries, each put into client {args.client}'s data "
                f"({len(data)} images with them) with probability 1/2; one DP-DM release (public start, "
                f"{args.iterations} iterations, image lr 0.03, q 0.1, C 1); nearest-neighbour guesses; "
                f"ledger epsilon {audit['claimed_epsilon']:.4g} at delta {audit['claimed_delta']:g} (RDP, "
                f"add/remove one record); violated: {audit['violated']}; trials {audit['trials']}",
            )


if __name__ == "__main__":
    main()
