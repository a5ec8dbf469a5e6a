"""Print the differential-privacy table of BENCHMARKS.md from benchmarks/results/dp-fed/*.json."""

from __future__ import annotations

import json
import shlex
from typing import Any

from benchmarks.bench_dp_fed import DP_FEDAVG_LR
from benchmarks.common import RESULTS

METHODS = (
    ("dp-dm", "noise", False, "DP-DM from noise (image lr 1)"),
    ("dp-dm+replay", "noise", False, "DP-DM from noise, replaying its releases (image lr 1)"),
    ("dp-dm", "public", False, "DP-DM from public images (image lr 1)"),
    ("dp-dm", "public", True, "DP-DM from public images (image lr tuned on the public split{caveat})"),
    ("dp-gm", "public", False, "DP gradient matching from public images (image lr 0.1)"),
    ("dp-fedavg", None, False, f"DP-FedAvg (DP-SGD, lr {DP_FEDAVG_LR:g})"),
    ("dp-fedavg", None, True, "DP-FedAvg (DP-SGD, lr tuned on the public split{caveat})"),
)
"""Table rows: method, starting images of the distillers (rows written before ``--init`` existed started from
noise), whether the learning rate was set by ``--lr`` (tuned) rather than left at the method's default, and the name
(``{caveat}``: what a tuned row assumed beyond its setting)."""
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


def public_setting(row: dict[str, Any]) -> tuple[str, int | None] | None:
    """The row's public images as ``(source, pool size)``; None for rows that use none (from noise, DP-FedAvg).

    Rows written before the ``public`` field started from the whole in-distribution rest.
    """
    if row["method"] == "dp-fedavg" or row.get("init", "noise") != "public":
        return None
    return row.get("public", "rest"), row.get("public_size")


def setting_name(setting: tuple[str, int | None] | None) -> str:
    """A table heading for a public-data setting."""
    if setting is None:
        return "No public data (distillers from noise)"
    source, size = setting
    images = "scikit-learn's digits, out of distribution" if source == "digits" else (
        "the training images no client holds, in distribution")
    return f"Public images: {images}, " + ("all of them" if size is None else f"a pool of {size}")


def setting_tag(setting: tuple[str, int | None] | None) -> str:
    """`` public init``, `` public init (digits, pool 100)``: a detail row's public setting in a few words."""
    if setting is None:
        return ""
    source, size = setting
    details = [part for part in ("digits" if source == "digits" else "", "" if size is None else f"pool {size}") if part]
    return " public init" + (f" ({', '.join(details)})" if details else "")


def tuning_caveat(setting: tuple[str, int | None] | None) -> str:
    """What a tuned row assumed beyond its setting: its lr was chosen on the whole in-distribution public split."""
    return "" if setting == ("rest", None) else ": 5,000 in-distribution images this setting lacks"


def accuracy_cells(rows: dict[float, dict[str, Any]], tuned: bool) -> list[str]:
    """One cell per epsilon: the accuracy, the old-release mark, and the lr of a tuned row."""
    cells = []
    for epsilon in EPSILONS:
        row = rows.get(epsilon)
        lr = "" if row is None or not tuned else f" (lr {row_lr(row):g})"
        cells.append("not run" if row is None else f"{100 * row['accuracy']:.2f}{old_release(row)}{lr}")
    return cells


def setting_table(
    setting: tuple[str, int | None] | None,
    rows: dict[tuple[Any, ...], dict[str, Any]],
    start_alone: dict[tuple[str, int | None], dict[str, Any]],
) -> list[str]:
    """The accuracy table of one public setting: its distillers, its start alone and DP-FedAvg beside them."""
    lines = [f"**{setting_name(setting)}**", "", "| method | " + " | ".join(f"eps {e:g}" for e in EPSILONS) + " |",
             "|---|" + "---|" * len(EPSILONS)]
    for method, init, tuned, name in METHODS:
        if (init == "public") != (setting is not None) and method != "dp-fedavg":
            continue
        own = None if method == "dp-fedavg" else setting  # DP-FedAvg uses no public images: the same rows in every table
        by_epsilon = {key[-1]: row for key, row in rows.items() if key[:4] == (method, init, own, tuned)}
        if by_epsilon or setting is None or setting == ("rest", None):
            label = name.format(caveat=tuning_caveat(setting))
            lines.append(f"| {label} | " + " | ".join(accuracy_cells(by_epsilon, tuned)) + " |")
    if setting is not None and setting in start_alone:
        row = start_alone[setting]
        cell = f"{100 * row['accuracy']:.2f}{old_release(row)}"
        lines.append("| start alone (the same public images, no release but the counts) | "
                     + " | ".join([cell] * len(EPSILONS)) + " |")
    return lines


def collect(
    stored: list[dict[str, Any]],
) -> tuple[dict[tuple[Any, ...], dict[str, Any]], dict[tuple[str, int | None] | None, dict[str, Any]]]:
    """Rows keyed by ``(method, init, public setting, tuned, epsilon)``, and the start-alone rows by public setting."""
    rows, start_alone = {}, {}
    for row in stored:
        setting = public_setting(row)
        if row["releases_per_client"] == 0:
            start_alone[setting] = row
            continue
        init = row.get("init", None if row["method"] == "dp-fedavg" else "noise")
        method = row["method"] + ("+replay" if row.get("replay_steps") else "")
        rows[(method, init, setting, row_lr(row) is not None, float(row["target_epsilon"]))] = row
    return rows, start_alone


def main() -> None:
    rows, start_alone = collect([json.loads(path.read_text()) for path in sorted((RESULTS / "dp-fed").glob("*.json"))])
    settings = sorted({key[2] for key in rows} | set(start_alone), key=lambda s: (s is not None, str(s)))
    for setting in settings:
        print("\n".join(setting_table(setting, rows, start_alone)))
        print()
    if any(old_release(row) for row in [*rows.values(), *start_alone.values()]):
        print(
            f"{OLD_RELEASE_MARK} run before {COUNT_RELEASE_FIX} with the class-count release that decided class presence "
            "from the true counts (issue 21); not re-run yet."
        )
        print()
    print("| row | worst client epsilon | sigma | releases per client | budget | upload MB | wall min | date |")
    print("|---|---|---|---|---|---|---|---|")
    for key, row in sorted(rows.items(), key=lambda item: tuple(str(part) for part in item[0][:4]) + (item[0][4],)):
        method, init, setting, tuned, epsilon = key
        label = f"{method}{setting_tag(setting)}{' tuned lr' if tuned else ''} eps {epsilon:g}"
        print(
            f"| {label} | {row['worst_client_epsilon']:.3f} | {row['noise_multiplier']:.3g} "
            f"| {row['releases_per_client']} | {row['budget']} | {row['upload_bytes'] / 2**20:.1f} "
            f"| {row['wall_seconds'] / 60:.0f} | {run_date(row)}{old_release(row)} |"
        )
    for setting, row in start_alone.items():
        print(
            f"| {row['method']}{setting_tag(setting)} start alone (no releases but the counts) "
            f"| {row['worst_client_epsilon']:.3f} | – | 0 | {row['budget']} | {row['upload_bytes'] / 2**20:.1f} "
            f"| {row['wall_seconds'] / 60:.0f} | {run_date(row)}{old_release(row)} |"
        )


if __name__ == "__main__":
    main()
