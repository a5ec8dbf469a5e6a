"""Print the differential-privacy table of BENCHMARKS.md from benchmarks/results/dp-fed/*.json."""

from __future__ import annotations

import json

from benchmarks.common import RESULTS

METHODS = (
    ("dp-dm", "noise", "DP-DM (one-shot)"),
    ("dp-dm", "public", "DP-DM (one-shot, public init)"),
    ("dp-gm", "public", "DP gradient matching (one-shot, public init)"),
    ("dp-fedavg", None, "DP-FedAvg (DP-SGD)"),
)
"""Table rows: method, starting images of the distillers (rows written before ``--init`` existed started from noise)."""
EPSILONS = (1.0, 2.0, 5.0, 10.0)


def main() -> None:
    rows, start_only = {}, []
    for path in sorted((RESULTS / "dp-fed").glob("*.json")):
        row = json.loads(path.read_text())
        if row["releases_per_client"] == 0:
            start_only.append(row)
            continue
        init = row.get("init", None if row["method"] == "dp-fedavg" else "noise")
        rows[(row["method"], init, float(row["target_epsilon"]))] = row
    print("| method | " + " | ".join(f"eps {e:g}" for e in EPSILONS) + " |")
    print("|---|" + "---|" * len(EPSILONS))
    for method, init, name in METHODS:
        cells = []
        for epsilon in EPSILONS:
            row = rows.get((method, init, epsilon))
            cells.append("not run" if row is None else f"{100 * row['accuracy']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| row | worst client epsilon | sigma | releases per client | budget | upload MB | wall min |")
    print("|---|---|---|---|---|---|---|")
    for (method, init, epsilon), row in sorted(
        rows.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2])
    ):
        label = f"{method}{' public init' if init == 'public' else ''} eps {epsilon:g}"
        print(
            f"| {label} | {row['worst_client_epsilon']:.3f} | {row['noise_multiplier']:.3g} "
            f"| {row['releases_per_client']} | {row['budget']} | {row['upload_bytes'] / 2**20:.1f} "
            f"| {row['wall_seconds'] / 60:.0f} |"
        )
    for row in start_only:
        print(
            f"| {row['method']} {row['init']} start alone (no releases but the counts) "
            f"| {row['worst_client_epsilon']:.3f} | – | 0 | {row['budget']} | {row['upload_bytes'] / 2**20:.1f} "
            f"| {row['wall_seconds'] / 60:.0f} |"
        )


if __name__ == "__main__":
    main()
