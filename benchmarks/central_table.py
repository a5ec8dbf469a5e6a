"""Print the centralised Fashion-MNIST tables of BENCHMARKS.md from benchmarks/results/central/*.json.

Hard-label rows and soft-label (knowledge distillation) rows are printed as
two tables, never one: their numbers are not comparable.
"""

from __future__ import annotations

import json

from benchmarks.common import RESULTS

PUBLISHED = {
    "random": ("51.4", "73.8", "82.5"),
    "dc": ("70.5", "82.3", "83.6"),
    "dsa": ("70.6", "84.6", "88.7"),
    "dm": ("–", "84.6", "88.7"),
    "mtt": ("–", "87.2 (issue 17)", "–"),
    "rded": ("–", "–", "–"),
    "herding": ("–", "–", "–"),
    "kcenter": ("–", "–", "–"),
}
METHODS = ("random", "herding", "kcenter", "dm", "dc", "dsa", "mtt", "rded")
IPCS = (1, 10, 50)
HEADER = ("| method | IPC | factor | ours (mean ± std, %) | start alone | random real | nets x epochs | budget "
          "| distill s | published |")


def budget(row: dict) -> str:
    if row["method"] == "rded":
        return f"teacher {row.get('teacher_epochs')} epochs, selection"
    if row["iterations"] == 0:
        return "selection only"
    dsa = " +DSA" if row["dsa"] and row["method"] == "dm" else ""
    return f"{row['iterations']} it, {row['batch_real']} real/class{dsa}"


def reference(row: dict, name: str) -> str:
    value = (row.get("references") or {}).get(name)
    return "–" if value is None else f"{100 * value['mean']:.2f}"


def table(rows: dict[tuple[str, int], list[dict]], protocol: str) -> None:
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        for column, ipc in enumerate(IPCS):
            published = PUBLISHED[method][column] if protocol == "hard-label" else "–"
            mine = [row for row in rows.get((method, ipc), []) if row.get("protocol", "hard-label") == protocol]
            if not mine:
                if protocol == "hard-label":
                    print(f"| {method} | {ipc} | – | not run (CPU budget) | – | – | – | – | – | {published} |")
                continue
            for row in mine:
                accuracy = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
                epochs = f"{row['eval_epochs']}{' +DSA' if row.get('eval_dsa') else ''}"
                print(
                    f"| {method} | {ipc} | {row.get('factor', 1)} | {accuracy} | {reference(row, 'start')} "
                    f"| {reference(row, 'random_real')} | {row['num_nets']} x {epochs} | {budget(row)} "
                    f"| {row['distill_seconds']:.0f} | {published} |"
                )


def main() -> None:
    rows: dict[tuple[str, int], list[dict]] = {}
    for path in sorted((RESULTS / "central").glob("*.json")):
        row = json.loads(path.read_text())
        rows.setdefault((row["method"], row["ipc"]), []).append(row)
    print("Hard-label protocol\n")
    table(rows, "hard-label")
    print("\nSoft-label protocol (knowledge distillation from the set's stored soft labels)\n")
    table(rows, "soft-label-kd")


if __name__ == "__main__":
    main()
