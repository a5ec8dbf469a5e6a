"""The DP table keeps each public-data setting apart and puts its start alone and DP-FedAvg beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_dp_fed, dp_table


def _row(method: str, epsilon: float, accuracy: float, **extra: Any) -> dict[str, Any]:
    return {"method": method, "target_epsilon": epsilon, "accuracy": accuracy, "releases_per_client": 150,
            "date": "2026-12-07", "command": f"python -m benchmarks.bench_dp_fed --method {method}", **extra}


def _tables(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    keyed, start_alone = dp_table.collect(rows)
    return {dp_table.setting_name(s): dp_table.setting_table(s, keyed, start_alone)
            for s in [None, ("rest", None), ("rest", 100)]}


def test_each_public_setting_gets_its_own_rows_start_alone_and_the_dp_fedavg_rows() -> None:
    rows = [
        _row("dp-dm", 1.0, 0.8358, init="public", lr=0.03),  # written before the public field: the whole rest
        _row("dp-dm", 1.0, 0.7512, init="public", lr=0.03, public="rest", public_size=100),
        {**_row("dp-dm", 1.0, 0.7011, init="public", public="rest", public_size=100), "releases_per_client": 0},
        {**_row("dp-dm", 1.0, 0.8414, init="public"), "releases_per_client": 0},
        _row("dp-fedavg", 1.0, 0.7297, init=None, lr=0.2),
    ]
    tables = _tables(rows)
    rest, pool = tables[dp_table.setting_name(("rest", None))], tables[dp_table.setting_name(("rest", 100))]
    tuned = "DP-DM from public images (image lr tuned on the public split)"
    assert any(line.startswith(f"| {tuned} | 83.58 (lr 0.03) |") for line in rest)
    caveat = ": 5,000 in-distribution images this setting lacks"
    assert any(line.startswith(f"| {tuned[:-1]}{caveat}) | 75.12 (lr 0.03) |") for line in pool)
    assert any("start alone" in line and "| 84.14 |" in line for line in rest)
    assert any("start alone" in line and "| 70.11 |" in line for line in pool)
    tuned_fedavg = "DP-FedAvg (DP-SGD, lr tuned on the public split)"
    for setting in [None, ("rest", None), ("rest", 100)]:
        label = tuned_fedavg if setting == ("rest", None) else f"{tuned_fedavg[:-1]}{caveat})"
        assert any(line.startswith(f"| {label} | 72.97 (lr 0.2) |") for line in tables[dp_table.setting_name(setting)])
    assert not any("start alone" in line for line in tables[dp_table.setting_name(None)])


def test_gain_over_start_refuses_a_missing_or_differently_evaluated_start(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_dp_fed, "RESULTS", tmp_path)
    args = argparse.Namespace(method="dp-dm", init="public", public="rest", public_size=100, iterations=150,
                              replay_steps=0, outer_loop=5, inner_loop=10, lr=0.03, sample_rate=0.1, clip=1.0, aggregation="union",
                              eval_epochs=300, num_nets=1, eval_dsa=True, rounds=5, local_epochs=1)
    with pytest.raises(SystemExit, match="dp-dm-public-pool100-start-only.json"):
        bench_dp_fed.start_alone_row(args)
    start = tmp_path / "dp-fed" / "dp-dm-public-pool100-start-only.json"
    start.parent.mkdir()
    start.write_text(json.dumps({"budget": "IPC 10 from public images, 0 iterations, eval 100 epochs x 1 net(s)"}))
    with pytest.raises(SystemExit, match="evaluated differently"):
        bench_dp_fed.start_alone_row(args)
    start.write_text(json.dumps({"budget": "IPC 10 ..., union, eval 300 epochs x 1 net(s) +DSA", "accuracy": 0.7}))
    assert bench_dp_fed.start_alone_row(args)["accuracy"] == 0.7


def test_an_ablation_row_lands_beside_the_table_not_over_its_row(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_dp_fed, "RESULTS", tmp_path)
    args = argparse.Namespace(method="dp-dm", init="public", public="rest", public_size=None, iterations=300,
                              replay_steps=0, epsilon=10.0, lr=None, ablation=None)
    table_row = bench_dp_fed.row_path(args)
    args.ablation = "more-releases"
    ablation_row = bench_dp_fed.row_path(args)
    assert table_row == tmp_path / "dp-fed" / "dp-dm-public-eps10.json"
    assert ablation_row == tmp_path / "dp-fed" / "more-releases" / "dp-dm-public-eps10.json"


def test_a_replay_row_gets_its_own_line_and_leaves_the_plain_row_alone() -> None:
    rows = [
        _row("dp-dm", 10.0, 0.7646, init="noise", lr=None),
        _row("dp-dm", 10.0, 0.7801, init="noise", lr=None, replay_steps=20),
    ]
    noise = _tables(rows)[dp_table.setting_name(None)]
    assert any(line.startswith("| DP-DM from noise (image lr 1) | not run | not run | not run | 76.46 |")
               for line in noise)
    assert any(line.startswith("| DP-DM from noise, replaying its releases (image lr 1) | not run | not run | not run "
                               "| 78.01 |") for line in noise)
