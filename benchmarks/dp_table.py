"""Print the differential-privacy table of BENCHMARKS.md from benchmarks/results/dp-fed/*.json."""

from __future__ import annotations

import json
import shlex
from typing import Any

from benchmarks.bench_dp_fed import DP_FEDAVG_LR
from benchmarks.common import RESULTS

METHODS = (
    ("dp-dm", "noise", False, "DP-DM from noise (image lr 1)"),
    ("dp-dm", "public", False, "DP-DM from public images (image lr 1)"),
    ("dp-dm", "public", True, "DP-DM from public images (image lr tuned on the public split)"),
    ("dp-gm", "public", False, "DP gradient matching from public images (image lr 0.1)"),
    ("dp-fedavg", None, False, f"DP-FedAvg (DP-SGD, lr {DP_FEDAVG_LR:g})"),
    ("dp-fedavg", None, True, "DP-FedAvg (DP-SGD, lr tuned on the public split)"),
)
"""Table rows: method, starting images of the distillers (rows written before ``--init`` existed started from
noise), whether the learning rate was set by ``--lr`` (tuned) rather than left at the method's default."""
EPSILONS = (1.0, 2.0, 5.0, 10.0)
COUNT_RELEASE_FIX = "2026-12-06"
"""Rows run before this date released class presence from the true counts (issue 21); the table marks them."""
OLD_RELEASE_MARK = "†"


def run_date(row: dict[str, Any]) -> str:
    """The row's ISO date; rows written before the ``date`` field carry it in their run directory's name."""
    if "date" in row:
        return row["date"]
    stamp = row["run_dir"].rsplit("-", 2)[-2]
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}"


def old_release(row: dict[str, Any]) -> str:
    """A mark for a row measured with the class-count release that leaked presence, else empty."""
    return OLD_RELEASE_MARK if run_date(row) < COUNT_RELEASE_FIX else ""


def row_lr(row: dict[str, Any]) -> float | None:
    """The row's ``--lr`` (None: the method's default); rows written before the ``lr`` field name it in their command."""
    if "lr" in row:
        lr = row["lr"]
    else:
        words = shlex.split(row["command"])
        lr = float(words[words.index("--lr") + 1]) if "--lr" in words else None
    if row["method"] == "dp-fedavg":
        return None if lr in (None, DP_FEDAVG_LR) else lr
    return lr


def main() -> None:
    rows, start_only = {}, []
    for path in sorted((RESULTS / "dp-fed").glob("*.json")):
        row = json.loads(path.read_text())
        if row["releases_per_client"] == 0:
            start_only.append(row)
            continue
        init = row.get("init", None if row["method"] == "dp-fedavg" else "noise")
        rows[(row["method"], init, row_lr(row) is not None, float(row["target_epsilon"]))] = row
    print("| method | " + " | ".join(f"eps {e:g}" for e in EPSILONS) + " |")
    print("|---|" + "---|" * len(EPSILONS))
    for method, init, tuned, name in METHODS:
        cells = []
        for epsilon in EPSILONS:
            row = rows.get((method, init, tuned, epsilon))
            lr = "" if row is None or not tuned else f" (lr {row_lr(row):g})"
            cells.append("not run" if row is None else f"{100 * row['accuracy']:.2f}{old_release(row)}{lr}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if any(old_release(row) for row in rows.values()):
        print()
        print(
            f"{OLD_RELEASE_MARK} run before {COUNT_RELEASE_FIX} with the class-count release that decided class presence "
            "from the true counts (issue 21); not re-run yet."
        )
    print()
    print("| row | worst client epsilon | sigma | releases per client | budget | upload MB | wall min | date |")
    print("|---|---|---|---|---|---|---|---|")
    for (method, init, tuned, epsilon), row in sorted(rows.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2], item[0][3])):
        label = f"{method}{' public init' if init == 'public' else ''}{' tuned lr' if tuned else ''} eps {epsilon:g}"
        print(
            f"| {label} | {row['worst_client_epsilon']:.3f} | {row['noise_multiplier']:.3g} "
            f"| {row['releases_per_client']} | {row['budget']} | {row['upload_bytes'] / 2**20:.1f} "
            f"| {row['wall_seconds'] / 60:.0f} | {run_date(row)}{old_release(row)} |"
        )
    for row in start_only:
        print(
            f"| {row['method']} {row['init']} start alone (no releases but the counts) "
            f"| {row['worst_client_epsilon']:.3f} | – | 0 | {row['budget']} | {row['upload_bytes'] / 2**20:.1f} "
            f"| {row['wall_seconds'] / 60:.0f} | {run_date(row)}{old_release(row)} |"
        )


if __name__ == "__main__":
    main()
