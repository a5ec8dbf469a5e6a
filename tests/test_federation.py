"""The ClientApp and the distillation protocols, driven in-process through a Grid test double (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedgrid import LocalGrid, fake_task_identity
from flwr.app import Array, ArrayRecord, Message
from rich.console import Console

from clients.app import load_partition
from fedistill.checkpoint import load_checkpoint
from fedistill.config import ExperimentConfig, parse_config
from fedistill.synthetic import SyntheticSet
from server.distillation import run_distillation
from server.replies import train_messages
from server.rounds import NotEnoughClients, reporting_arrivals, reporting_epochs


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_task_identity(monkeypatch)


def small_config(tmp_path: Path, protocol_of_eval: str = "hard-label", **federation: Any) -> ExperimentConfig:
    return parse_config(
        {
            "seed": 1,
            "output_dir": str(tmp_path),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": 3, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "distill": {"method": "dm", "ipc": 2, "iterations": 5, "batch_real": 32},
            "eval": {"epochs": 30, "num_nets": 1, "protocol": protocol_of_eval},
            "federation": {"min_clients": 2, **federation},
        }
    )


def test_client_reply_carries_a_valid_set_and_metrics(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    grid = LocalGrid(config, 3)
    (reply,) = grid.send_and_receive(train_messages([102], config, 1))
    arrays = {key: array.numpy() for key, array in reply.content.array_records["set"].items()}
    metrics = reply.content.metric_records["metrics"]
    assert arrays["images"].shape[1:] == (1, 8, 8) and arrays["images"].dtype == np.float32
    assert metrics["num-images"] == len(arrays["labels"]) and metrics["bytes"] > 0
    assert metrics["partition-id"] == 1 and sum(metrics["source-counts"]) == metrics["num-examples"]


def test_one_shot_round_end_to_end(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    run_dir = run_distillation(LocalGrid(config, 3), config)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (record,) = metrics["rounds"]
    assert metrics["status"] == "completed" and metrics["accepted"] == 3 and record["rejected"] == {}
    assert len(list((run_dir / "clients").glob("*.safetensors"))) == 3
    assert (run_dir / "aggregate.safetensors").exists() and (run_dir / "grids" / "grid_all.png").exists()
    assert (run_dir / "global_model.safetensors").exists() and (run_dir / "accuracy_vs_bytes.png").exists()
    assert 0.3 < metrics["eval"]["mean"] <= 1.0 and record["accuracy"] == metrics["eval"]["mean"]
    sizes = [path.stat().st_size for path in (run_dir / "clients").glob("*.safetensors")]
    assert record["upload_bytes"] == metrics["upload_bytes"] and 0 < record["upload_bytes"] < sum(sizes)
    assert record["download_bytes"] == 0 and len(record["client_seconds"]) == 3


def test_multi_round_sends_the_global_model_and_clients_continue_their_sets(tmp_path: Path) -> None:
    config = small_config(tmp_path, "soft-label-kd", protocol="multi-round", rounds=3, soft_labels=True)
    grid = LocalGrid(config, 3)
    run_dir = run_distillation(grid, config)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and metrics["status"] == "completed"
    globals_sent = ["global" in m.content.array_records for m in grid.sent]
    assert globals_sent == [False] * 3 + [True] * 6
    assert metrics["rounds"][0]["download_bytes"] == 0 and metrics["rounds"][1]["download_bytes"] > 0
    assert all(0.2 < r["accuracy"] <= 1.0 for r in metrics["rounds"])
    assert [r["cumulative_upload_bytes"] for r in metrics["rounds"]][-1] == metrics["upload_bytes"]
    first = SyntheticSet.load(run_dir / "round-001" / "partition-0000.safetensors")
    third = SyntheticSet.load(run_dir / "round-003" / "partition-0000.safetensors")
    assert torch.equal(first.labels, third.labels) and not torch.equal(first.images, third.images)
    aggregate = SyntheticSet.load(run_dir / "aggregate.safetensors")
    assert aggregate.soft_labels is not None and torch.allclose(aggregate.soft_labels.sum(1), torch.ones(len(aggregate)))


def test_aggregate_window_trains_the_global_model_on_earlier_rounds_sets_too(tmp_path: Path) -> None:
    config = small_config(tmp_path, protocol="multi-round", rounds=3, aggregate_window=2)
    run_dir = run_distillation(LocalGrid(config, 3), config)
    aggregate = SyntheticSet.load(run_dir / "aggregate.safetensors")
    second = [SyntheticSet.load(path) for path in sorted((run_dir / "round-002").glob("*.safetensors"))]
    third = [SyntheticSet.load(path) for path in sorted((run_dir / "round-003").glob("*.safetensors"))]
    assert aggregate.provenance["rounds"] == 2
    assert torch.equal(aggregate.images, torch.cat([s.images for s in second + third]))
    assert torch.equal(aggregate.labels, torch.cat([s.labels for s in second + third]))


@pytest.mark.parametrize("client_start", ["previous", "fresh"])
def test_client_start_fresh_gives_each_round_other_real_images(tmp_path: Path, client_start: str) -> None:
    """At zero iterations a set is its starting images: refining keeps round 2's images (the first made under
    a global model, from which nodes continue), fresh draws other real images every round."""
    config = small_config(tmp_path, protocol="multi-round", rounds=3, aggregate_window=3, client_start=client_start)
    config.distill.iterations = 0
    continued: list[int] = []

    def spy(reply: Message) -> Message:
        continued.append(int(reply.content.metric_records["metrics"]["continued"]))
        return reply

    grid = LocalGrid(config, 3, {101: spy})
    run_dir = run_distillation(grid, config)
    sets = [SyntheticSet.load(run_dir / f"round-00{r}" / "partition-0000.safetensors") for r in (1, 2, 3)]
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None
    kept_continuable = checkpoint.state["kept_continuable"]
    if client_start == "previous":
        assert continued == [0, 0, 1] and kept_continuable == [0, 1, 2]
        assert torch.equal(sets[2].images, sets[1].images)
        return
    assert continued == [0, 0, 0] and kept_continuable == []
    assert not torch.equal(sets[1].images, sets[0].images) and not torch.equal(sets[2].images, sets[1].images)
    real = load_partition(config, 0, 3).normalized(torch.device("cpu")).flatten(1)
    for later in sets:
        nearest = torch.cdist(later.images.flatten(1), real, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        assert nearest.values.max() < 1e-5  # each image is one of the partition's real images


def nan_images(reply: Message) -> Message:
    record = reply.content.array_records["set"]
    images = record["images"].numpy().copy()
    images[0, 0, 0, 0] = np.nan
    reply.content.array_records["set"] = ArrayRecord({**dict(record), "images": Array(images)})
    return reply


def labels_out_of_range(reply: Message) -> Message:
    record = reply.content.array_records["set"]
    labels = record["labels"].numpy().copy()
    labels[0] = 99
    reply.content.array_records["set"] = ArrayRecord({**dict(record), "labels": Array(labels)})
    return reply


def missing_set(reply: Message) -> Message:
    del reply.content.array_records["set"]
    return reply


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [(nan_images, "finite"), (labels_out_of_range, "labels"), (missing_set, "lacks"), (lambda reply: None, None)],
)
def test_bad_or_missing_reply_is_left_out_and_the_round_completes(tmp_path: Path, tamper: Any, reason: str) -> None:
    # straggler_timeout_s = 0: once two valid sets are in, a silent node is not waited for.
    config = small_config(tmp_path, aggregation="class-weighted", straggler_timeout_s=0.0)
    console = Console(file=io.StringIO(), width=200)
    run_dir = run_distillation(LocalGrid(config, 3, {103: tamper}), config, console)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (record,) = metrics["rounds"]
    assert metrics["status"] == "completed" and metrics["accepted"] == 2
    printed = console.file.getvalue()
    assert f"round 1: training 1 net(s) for {config.eval.epochs} epochs on the aggregate's" in printed
    if reason is None:
        assert record["missing"] == ["103"]
        assert "round 1: 2/3 replies in (2 valid)" in printed and "3/3 replies" not in printed
    else:
        assert reason in record["rejected"]["103"]
        assert "round 1: 3/3 replies in (2 valid)" in printed


def test_arrivals_are_reported_about_ten_times_a_round_whatever_the_number_of_nodes() -> None:
    for asked, expected_lines in [(3, 3), (20, 20), (95, 10)]:
        lines: list[str] = []
        on_reply = reporting_arrivals(lambda node, reply: node % 2 == 0, asked, lines.append, "round 4")
        assert [on_reply(node, None) for node in range(asked)] == [node % 2 == 0 for node in range(asked)]
        assert len(lines) == expected_lines
        assert lines[-1].startswith(f"round 4: {asked}/{asked} replies in ({(asked + 1) // 2} valid) after ")


def test_server_training_says_how_far_it_is_at_most_once_a_minute() -> None:
    ticks = iter([0.0, 10.0, 59.0, 61.0, 90.0, 125.0])
    lines: list[str] = []
    on_epoch = reporting_epochs(lines.append, "round 2", epochs=300, num_nets=2, clock=lambda: next(ticks))
    for net, done in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5)]:
        on_epoch(net, done)
    assert lines == ["round 2: training on the aggregate, net 1/2, epoch 3/300 after 61 s",
                     "round 2: training on the aggregate, net 2/2, epoch 5/300 after 125 s"]


def test_too_few_valid_sets_stop_the_run_with_a_clear_error(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    grid = LocalGrid(config, 2, {101: nan_images})
    with pytest.raises(NotEnoughClients, match="min_clients = 2"):
        run_distillation(grid, config)
