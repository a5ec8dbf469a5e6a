"""FedAvg/FedProx baselines: local training on a node, and Flower's strategies driven through an in-process grid."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedgrid import LocalGrid, fake_task_identity
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from rich.console import Console
from safetensors.torch import load_file

import clients.app
from clients.app import load_partition
from clients.fit import fit_partition
from fedistill.config import ExperimentConfig, parse_config
from fedistill.data import load_dataset
from fedistill.models import build_model
from fedistill.training import evaluate_model
from server.baselines import by_partition, run_baseline
from server.rounds import NotEnoughClients
from server.state import fresh_model
from wire.messages import PROXIMAL_MU, ROUND, TASK, state_to_record


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_task_identity(monkeypatch)


def small_config(tmp_path: Path, **federation: Any) -> ExperimentConfig:
    return parse_config(
        {
            "seed": 1,
            "device": "cpu",
            "output_dir": str(tmp_path),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": 3, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "federation": {
                "protocol": "fedavg",
                "rounds": 2,
                "local_epochs": 2,
                "local_lr": 0.05,
                "local_batch": 32,
                "min_clients": 2,
                **federation,
            },
        }
    )


def initial_state(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    test = load_dataset("digits", "test")
    return fresh_model(config, test, torch.device("cpu"), config.seed).state_dict()


def model_bytes(config: ExperimentConfig) -> int:
    return state_to_record(initial_state(config)).count_bytes()


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


# --- local training -------------------------------------------------------------------------------------------


def test_fit_partition_lowers_the_local_loss_and_repeats_from_its_seed(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    data = load_partition(config, 0, 3)
    start = initial_state(config)
    cpu = torch.device("cpu")
    state, metrics = fit_partition(config, data, start, cpu, proximal_mu=0.0, seed=7)
    again, _ = fit_partition(config, data, start, cpu, proximal_mu=0.0, seed=7)

    def local_loss(weights: dict[str, torch.Tensor]) -> float:
        model = build_model(config.model.spec(), (1, 8, 8), 10)
        model.load_state_dict(weights)
        return evaluate_model(model, data.normalized(), torch.from_numpy(data.labels))[1]

    assert local_loss(state) < 0.5 * local_loss(start)
    assert metrics["num-examples"] == len(data) and metrics["seconds"] > 0
    assert 0 < metrics["train-loss"] < local_loss(start)
    assert set(state) == set(start) and all(state[k].shape == start[k].shape for k in start)
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_proximal_term_keeps_weights_closer_to_the_global_model(tmp_path: Path) -> None:
    config = small_config(tmp_path, local_epochs=3)
    data = load_partition(config, 1, 3)
    start = initial_state(config)

    def distance(mu: float) -> float:
        state, _ = fit_partition(config, data, start, torch.device("cpu"), proximal_mu=mu, seed=3)
        return float(sum(((state[k] - start[k]) ** 2).sum() for k in start)) ** 0.5

    plain, proximal = distance(0.0), distance(1.0)
    assert proximal < 0.8 * plain


# --- FedAvg / FedProx through Flower's strategies -------------------------------------------------------------


def test_fedavg_two_rounds_end_to_end(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    grid = LocalGrid(config, 3)
    out = io.StringIO()
    run_dir = run_baseline(grid, config, Console(file=out, width=200))
    for server_round in (1, 2):
        assert f"round {server_round} train: 3/3 replies in (3 valid) after " in out.getvalue()
    metrics = read_metrics(run_dir)
    size = model_bytes(config)
    assert metrics["status"] == "completed" and metrics["protocol"] == "fedavg" and metrics["nodes"] == 3
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert 0.3 < record["accuracy"] <= 1.0  # chance is 0.1
        assert record["accepted"] == 3 and record["rejected"] == {} and record["missing"] == []
        assert record["upload_bytes"] == record["accepted"] * size and record["download_bytes"] == 3 * size
        assert set(record["client_seconds"]) == {"101", "102", "103"} and record["seconds"] > 0
    assert metrics["rounds"][1]["accuracy"] > metrics["initial"]["accuracy"]
    assert metrics["model_bytes"] == size and metrics["upload_bytes"] == 6 * size
    assert metrics["rounds"][-1]["cumulative_upload_bytes"] == metrics["upload_bytes"]
    assert (run_dir / "accuracy_vs_round.png").exists() and (run_dir / "accuracy_vs_bytes.png").exists()
    assert (run_dir / "config.toml").exists()
    # The saved global model is the one that scored the last round's accuracy.
    model = build_model(config.model.spec(), (1, 8, 8), 10)
    model.load_state_dict(load_file(str(run_dir / "global_model.safetensors")))
    test = load_dataset("digits", "test")
    accuracy, _ = evaluate_model(model, test.normalized(), torch.from_numpy(test.labels))
    assert accuracy == pytest.approx(metrics["final_accuracy"]) == metrics["rounds"][-1]["accuracy"]
    # Every node got the experiment, the 'fit' task and its round; round 2 starts from new weights.
    assert [c[ROUND] for c in grid.sent_config] == [1, 1, 1, 2, 2, 2]
    assert all(c[TASK] == "fit" and PROXIMAL_MU not in c and c["model.width"] == 16 for c in grid.sent_config)
    first, second = (grid.sent[i].content.array_records["arrays"] for i in (0, 3))
    assert any(not np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def four_clients_half_sampled(out: Path, rounds: int) -> ExperimentConfig:
    """FedAvg over 4 clients, 2 of them asked per round: the sampling tests' setting."""
    values = small_config(out, rounds=rounds, fraction_train=0.5).model_dump(mode="json", exclude_none=True)
    return parse_config({**values, "partition": {**values["partition"], "num_clients": 4}})


@pytest.mark.parametrize("partitions", [[0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]])
def test_sampled_rounds_ask_the_same_partitions_whatever_the_node_ids(tmp_path: Path, partitions: list[int]) -> None:
    """A seed decides which partitions a sampled round asks; node ids (new every launch) do not."""
    config = four_clients_half_sampled(tmp_path / "ordered", rounds=3)
    reference = read_metrics(run_baseline(LocalGrid(config, 4), config))
    config = four_clients_half_sampled(tmp_path / "shuffled", rounds=3)
    run_dir = run_baseline(LocalGrid(config, 4, first_node=301, partitions=partitions), config)
    metrics = read_metrics(run_dir)
    asked = [record["partitions"] for record in metrics["rounds"]]
    assert all(len(round_partitions) == 2 for round_partitions in asked)
    assert asked == [record["partitions"] for record in reference["rounds"]]
    assert [r["accuracy"] for r in metrics["rounds"]] == [r["accuracy"] for r in reference["rounds"]]
    (reference_dir,) = (tmp_path / "ordered").glob("fed-*")
    reference_model = load_file(str(reference_dir / "global_model.safetensors"))
    model = load_file(str(run_dir / "global_model.safetensors"))
    assert all(torch.equal(model[key], reference_model[key]) for key in reference_model)


def test_sampled_rounds_ask_the_same_partitions_whatever_else_draws_from_random(tmp_path: Path) -> None:
    """Flower's heartbeat and retry jitter draw from the global `random` a timing-dependent number of times."""
    config = four_clients_half_sampled(tmp_path / "quiet", rounds=5)
    reference = read_metrics(run_baseline(LocalGrid(config, 4), config))
    config = four_clients_half_sampled(tmp_path / "jitter", rounds=5)
    grid = LocalGrid(config, 4)
    draws = iter(range(1, 100))
    grid.before_push = lambda messages: [random.random() for _ in range(next(draws))]
    metrics = read_metrics(run_baseline(grid, config))
    asked = [record["partitions"] for record in metrics["rounds"]]
    assert asked == [record["partitions"] for record in reference["rounds"]]
    assert len({tuple(partitions) for partitions in asked}) > 1  # the rounds do sample different nodes


def test_by_partition_puts_unidentified_nodes_last_by_id() -> None:
    assert by_partition([40, 10, 30, 20], {30: 0, 10: 2}) == [30, 10, 20, 40]


def test_fedprox_sends_proximal_mu_and_clients_use_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config(tmp_path, protocol="fedprox", rounds=1, proximal_mu=0.5)
    used: list[float] = []

    def spy(*args: Any, proximal_mu: float, **kwargs: Any) -> Any:
        used.append(proximal_mu)
        return fit_partition(*args, proximal_mu=proximal_mu, **kwargs)

    monkeypatch.setattr(clients.app, "fit_partition", spy)
    grid = LocalGrid(config, 3)
    metrics = read_metrics(run_baseline(grid, config))
    assert [c[PROXIMAL_MU] for c in grid.sent_config] == [0.5] * 3 and used == [0.5] * 3
    assert metrics["status"] == "completed" and metrics["protocol"] == "fedprox" and metrics["proximal_mu"] == 0.5
    assert metrics["rounds"][0]["accepted"] == 3 and metrics["rounds"][0]["accuracy"] > 0.2


def test_run_baseline_refuses_distillation_protocols(tmp_path: Path) -> None:
    config = parse_config({"output_dir": str(tmp_path), "data": {"name": "digits"}})
    with pytest.raises(ValueError, match="'one-shot' is not a baseline; allowed: fedavg, fedprox"):
        run_baseline(LocalGrid(config, 2), config)


# --- untrusted replies ----------------------------------------------------------------------------------------


def _edit_arrays(reply: Message, edit: Any) -> Message:
    record = reply.content.array_records["arrays"]
    arrays = {key: array.numpy().copy() for key, array in record.items()}
    edit(arrays)
    reply.content.array_records["arrays"] = ArrayRecord({key: Array(value) for key, value in arrays.items()})
    return reply


def nan_weights(reply: Message) -> Message:
    return _edit_arrays(reply, lambda arrays: arrays["classifier.weight"].__setitem__((0, 0), np.nan))


def wrong_shape(reply: Message) -> Message:
    # (10,) -> (1,): Flower's averaging would broadcast this silently instead of failing.
    return _edit_arrays(reply, lambda arrays: arrays.__setitem__("classifier.bias", arrays["classifier.bias"][:1]))


def lying_shape(reply: Message) -> Message:
    record = reply.content.array_records["arrays"]
    bias = record["classifier.bias"]
    small = Array(np.zeros(3, np.float32))
    record["classifier.bias"] = Array(dtype=bias.dtype, shape=bias.shape, stype=bias.stype, data=small.data)
    return reply


def zero_examples(reply: Message) -> Message:
    metrics = reply.content.metric_records["metrics"]
    reply.content.metric_records["metrics"] = MetricRecord({**metrics, "num-examples": 0})
    return reply


def missing_key(reply: Message) -> Message:
    return _edit_arrays(reply, lambda arrays: arrays.pop("classifier.bias"))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (nan_weights, "classifier.weight: weights must be finite"),
        (wrong_shape, "classifier.bias: declared float32[1], the global model has float32[10]"),
        (lying_shape, "classifier.bias: holds float32[3]"),
        (zero_examples, "num-examples: must be a positive finite number"),
        (missing_key, "arrays: keys differ from the global model (missing ['classifier.bias']"),
    ],
)
def test_a_bad_reply_is_dropped_and_logged_and_the_run_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tamper: Any, reason: str
) -> None:
    config = small_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedistill.server"):
        run_dir = run_baseline(LocalGrid(config, 3, {103: tamper}), config)
    metrics = read_metrics(run_dir)
    size = model_bytes(config)
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        assert record["accepted"] == 2 and record["rejected"]["103"].startswith(reason)
        assert record["upload_bytes"] == 2 * size and record["download_bytes"] == 3 * size
        assert set(record["client_seconds"]) == {"101", "102"} and 0.3 < record["accuracy"] <= 1.0
    assert f"round 1: rejected reply from node 103: {reason}" in caplog.text
    final = load_file(str(run_dir / "global_model.safetensors"))
    assert all(torch.isfinite(value).all() for value in final.values())
    assert final["classifier.bias"].shape == (10,)


def test_crashed_and_silent_nodes_are_recorded_and_mismatched_metrics_do_not_end_the_run(tmp_path: Path) -> None:
    def extra_metrics(reply: Message) -> Message:
        # Flower raises InconsistentMessageReplies (ending Strategy.start) when metric keys differ.
        metrics = reply.content.metric_records["metrics"]
        reply.content.metric_records["metrics"] = MetricRecord({**metrics, "extra": [1.0, 2.0]})
        return reply

    # straggler_timeout_s = 0: once the quorum is in, the silent node is not waited for.
    values = small_config(tmp_path, rounds=1, min_clients=2, straggler_timeout_s=0.0).model_dump(
        mode="json", exclude_none=True
    )
    config = parse_config({**values, "partition": {**values["partition"], "num_clients": 5}})
    grid = LocalGrid(config, 5, {101: extra_metrics, 102: lambda reply: None}, crash=[103])
    metrics = read_metrics(run_baseline(grid, config))
    (record,) = metrics["rounds"]
    assert metrics["status"] == "completed"
    assert record["accepted"] == 3 and record["missing"] == ["102"]
    assert record["rejected"] == {"103": "client error 2: node crashed"}
    assert record["upload_bytes"] == 3 * model_bytes(config) and record["download_bytes"] == 5 * model_bytes(config)


def test_too_few_valid_replies_stop_the_run_with_a_clear_error(tmp_path: Path) -> None:
    config = small_config(tmp_path, rounds=2)
    grid = LocalGrid(config, 2, {101: nan_weights})
    with pytest.raises(NotEnoughClients, match="round 1: 1 valid replies, need federation.min_clients = 2"):
        run_baseline(grid, config)
    (run_dir,) = tmp_path.glob("fed-digits-fedavg-*")
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "failed" and metrics["failed_round"] == 1 and metrics["rounds"] == []
    assert "finite" in metrics["rejected"]["101"]


def test_integer_buffers_keep_their_dtype_through_averaging(tmp_path: Path) -> None:
    values = small_config(tmp_path).model_dump(mode="json", exclude_none=True)
    config = parse_config({**values, "model": {**values["model"], "norm": "batchnorm"}})
    grid = LocalGrid(config, 3)
    run_dir = run_baseline(grid, config)
    final = load_file(str(run_dir / "global_model.safetensors"))
    tracked = [key for key in final if key.endswith("num_batches_tracked")]
    assert tracked and all(final[key].dtype == torch.int64 for key in tracked)
    sent = grid.sent[-1].content.array_records["arrays"]
    assert all(sent[key].dtype == "int64" for key in tracked)
    assert read_metrics(run_dir)["rounds"][1]["accepted"] == 3
