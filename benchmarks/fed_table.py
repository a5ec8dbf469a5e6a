"""Print the federated tables of BENCHMARKS.md from benchmarks/results/fed/*.json (rows of bench_fed.py)."""

from __future__ import annotations

import json
import shlex

from benchmarks.common import RESULTS
from fedistill.config import FederationConfig

ORDER = {"one-shot": 0, "multi-round": 1, "fedavg": 2, "fedprox": 3}


def seed(row: dict) -> int:
    """The experiment seed (partitions, starting images, networks); older rows name it only in their command."""
    if "seed" in row:
        return int(row["seed"])
    words = shlex.split(row["command"])
    return int(words[words.index("--seed") + 1]) if "--seed" in words else 0


def budget(row: dict) -> str:
    seeded = f"; seed {seed(row)}" if seed(row) else ""
    if row["protocol"] in ("one-shot", "multi-round"):
        augment = " +DSA" if row["eval_dsa"] else ""
        window = row.get("aggregate_window", 1)
        trained_on = f" on the last {window} rounds' sets" if window > 1 else ""
        fresh = "; a fresh set each round" if row.get("client_start") == "fresh" else ""
        method = (row.get("method") or "dm").upper() + (f" factor {row['factor']}" if row.get("factor", 1) > 1 else "")
        references = "".join(f"; {name} {100 * value:.2f} %" for name, value in row.get("references", {}).items())
        return (f"{method} IPC {row['ipc']}, {row['iterations']} it/round{fresh}; "
                f"server {row['eval_epochs']} epochs/round{trained_on}{augment}{seeded}{references}")
    if row["protocol"] == "fedprox":
        # Rows written before bench_fed recorded the mu ran with the config's default.
        mu = row.get("proximal_mu", FederationConfig.model_fields["proximal_mu"].default)
        return f"{row['local_epochs']} local epoch/round, proximal mu {mu:g}{seeded}"
    return f"{row['local_epochs']} local epoch/round{seeded}"


def machine(row: dict) -> str:
    """The CPU model and run date of a row: wall times only compare within one machine."""
    cpu = row["hardware"].split(",")[0].replace("(R)", "").replace(" Processor", "")
    stamp = row["run_dir"].rsplit("-", 2)[-2]
    return f"{cpu}, {stamp[:4]}-{stamp[4:6]}-{stamp[6:]}"


def main() -> None:
    rows = [json.loads(path.read_text()) for path in sorted((RESULTS / "fed").glob("*.json"))]
    scaling = sorted((row for row in rows if "--tag scaling" in row["command"]), key=lambda row: row["clients"])
    accuracy_rows = sorted(
        (row for row in rows if "--tag scaling" not in row["command"]),
        key=lambda row: (-row["alpha"], ORDER[row["protocol"]]),
    )
    print("| Dirichlet α | protocol | rounds | final accuracy (%) | upload (MB) | wall time (s) | machine | budget |")
    print("|---|---|---|---|---|---|---|---|")
    for row in accuracy_rows:
        print(
            f"| {row['alpha']:g} | {row['protocol']} | {row['rounds']} | {100 * row['accuracy']:.2f} "
            f"| {row['upload_bytes'] / 1e6:.2f} | {row['wall_seconds']:.0f} | {machine(row)} | {budget(row)} |"
        )
    if scaling:
        print()
        print("| clients | round wall time (s) | mean client distill time (s) | peak memory, all processes (GiB) "
              "| upload (MB) | accuracy (%) |")
        print("|---|---|---|---|---|---|")
        for row in scaling:
            print(
                f"| {row['clients']} | {row['round_seconds'][0]:.0f} | {row['client_seconds_mean'][0]:.1f} "
                f"| {row['peak_tree_rss_bytes'] / 2**30:.2f} | {row['upload_bytes'] / 1e6:.2f} "
                f"| {100 * row['accuracy']:.2f} |"
            )


if __name__ == "__main__":
    main()
