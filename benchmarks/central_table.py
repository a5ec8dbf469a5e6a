"""Print the centralised Fashion-MNIST table of BENCHMARKS.md from benchmarks/results/central/*.json."""

from __future__ import annotations

import json

from benchmarks.common import RESULTS

PUBLISHED = {
    "random": ("51.4", "73.8", "82.5"),
    "dc": ("70.5", "82.3", "83.6"),
    "dsa": ("70.6", "84.6", "88.7"),
    "dm": ("–", "84.6", "88.7"),
    "herding": ("–", "–", "–"),
    "kcenter": ("–", "–", "–"),
}
METHODS = ("random", "herding", "kcenter", "dm", "dc", "dsa")
IPCS = (1, 10, 50)


def budget(row: dict) -> str:
    if row["iterations"] == 0:
        return "selection only"
    dsa = " +DSA" if row["dsa"] and row["method"] == "dm" else ""
    return f"{row['iterations']} it, {row['batch_real']} real/class{dsa}"


def main() -> None:
    rows: dict[tuple[str, int], list[dict]] = {}
    for path in sorted((RESULTS / "central").glob("*.json")):
        row = json.loads(path.read_text())
        rows.setdefault((row["method"], row["ipc"]), []).append(row)
    print("| method | IPC | ours (mean ± std, %) | nets x epochs | budget | distill s | published |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        for column, ipc in enumerate(IPCS):
            published = PUBLISHED[method][column]
            if (method, ipc) not in rows:
                print(f"| {method} | {ipc} | not run (CPU budget) | – | – | – | {published} |")
                continue
            for row in rows[(method, ipc)]:
                accuracy = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
                epochs = f"{row['eval_epochs']}{' +DSA' if row.get('eval_dsa') else ''}"
                print(
                    f"| {method} | {ipc} | {accuracy} | {row['num_nets']} x {epochs} | {budget(row)} "
                    f"| {row['distill_seconds']:.0f} | {published} |"
                )


if __name__ == "__main__":
    main()
