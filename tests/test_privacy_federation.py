"""Private federated runs end to end (in-process grid, and once through Flower's simulation engine).

Budgets are enforced across rounds by the nodes themselves (their ledger lives
in the node's Flower context), refusals are recorded as refusals, the server
writes every client's ledger per round, and DP-FedAvg shares all of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from clients.app import load_partition
from clients.private import LEDGER_KEY
from fedistill.config import ExperimentConfig, parse_config
from fedistill.privacy import (
    Access,
    PrivacyLedger,
    calibrate_noise_multiplier,
    charge_unrecorded_rounds,
    compute_epsilon,
)
from fedistill.privacy_plan import plan_privacy
from fedistill.synthetic import SyntheticSet
from server.baselines import run_baseline
from server.distillation import run_distillation
from server.rounds import RunControl
from tests.fedgrid import LocalGrid, fake_task_identity

TARGET = 4.0
RATE = 0.2
ITERATIONS = 6
PARTITIONS = ["partition-0000", "partition-0001", "partition-0002"]
"""Privacy records and client sets are keyed by partition: LocalGrid gives node 101 partition 0, and so on."""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_task_identity(monkeypatch)


def private_config(tmp_path: Path, protocol: str = "one-shot", rounds: int = 1, **privacy: Any) -> ExperimentConfig:
    return parse_config(
        {
            "seed": 2,
            "output_dir": str(tmp_path),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": 3, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "distill": {"method": "dp-dm", "ipc": 3, "iterations": ITERATIONS, "init": "noise", "compile": "off"},
            "eval": {"epochs": 20, "num_nets": 1},
            "federation": {"protocol": protocol, "rounds": rounds, "min_clients": 2, "local_lr": 0.05},
            "privacy": {"enabled": True, "target_epsilon": TARGET, "sample_rate": RATE, "reproducible": True,
                        **privacy},
        }
    )


def read(run_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((run_dir / name).read_text())


def test_one_shot_private_run_reports_epsilon_and_writes_every_ledger(tmp_path: Path) -> None:
    config = private_config(tmp_path)
    grid = LocalGrid(config, 3)
    run_dir = run_distillation(grid, config)
    metrics, privacy = read(run_dir, "metrics.json"), read(run_dir, "privacy.json")
    planned = plan_privacy(config).planned_epsilon().value
    assert metrics["status"] == "completed" and metrics["accepted"] == 3
    assert metrics["privacy"]["worst_epsilon"] == pytest.approx(planned, rel=1e-12) and planned <= TARGET
    assert privacy["adjacency"] == "add/remove one record of this client's data" and privacy["accountant"] == "rdp"
    (record,) = privacy["rounds"]
    assert set(record["clients"]) == set(PARTITIONS)
    for label, client in record["clients"].items():
        assert client["epsilon"] == client["claimed_epsilon"] == pytest.approx(planned, rel=1e-12)
        assert client["refused"] is None
        steps = {a["mechanism"]: a["steps"] for a in client["ledger"]["accesses"]}
        assert steps == {"class-counts": 1, "dp-dm": ITERATIONS}
        # The set reports the released noisy counts, which the ledger keeps; the true counts appear nowhere.
        syn = SyntheticSet.load(run_dir / "clients" / f"{label}.safetensors")
        assert syn.source_counts.tolist() == client["ledger"]["released_values"]["class-counts"]
        partition = load_partition(config, PARTITIONS.index(label), 3)
        assert not np.array_equal(syn.source_counts, np.bincount(partition.labels, minlength=10))
    ledgers = [PrivacyLedger.from_json(str(grid.contexts[n].state.config_records[LEDGER_KEY]["json"]))
               for n in grid.nodes]
    assert all(ledger.epsilon().value == pytest.approx(planned, rel=1e-12) for ledger in ledgers)


def test_budget_is_enforced_across_rounds_and_the_counts_are_not_released_again(tmp_path: Path) -> None:
    """Noise sized for two rounds, three asked: every node refuses round 3 and the run ends after round 2."""
    sigma = calibrate_noise_multiplier(TARGET, 1e-5, RATE, 2 * ITERATIONS, prior=[(20.0, 1.0, 1)])
    config = private_config(tmp_path, "multi-round", 3, noise_multiplier=sigma)
    grid = LocalGrid(config, 3)
    run_dir = run_distillation(grid, config)
    metrics, privacy = read(run_dir, "metrics.json"), read(run_dir, "privacy.json")
    assert metrics["status"] == "completed" and "round 3" in metrics["stopped_early"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and metrics["rounds"][1]["refused"] == {}
    third = privacy["rounds"][2]
    assert third["round"] == 3 and set(third["clients"]) == set(PARTITIONS)
    assert all("above privacy.target_epsilon" in c["refused"] for c in third["clients"].values())
    assert all(c["epsilon"] <= TARGET for r in privacy["rounds"] for c in r["clients"].values())
    assert privacy["worst_epsilon"] <= TARGET
    for node in grid.nodes:
        ledger = PrivacyLedger.from_json(str(grid.contexts[node].state.config_records[LEDGER_KEY]["json"]))
        assert ledger.rounds() == [1, 2] and ledger.steps("class-counts") == 1
        assert ledger.steps("dp-dm") == 2 * ITERATIONS and ledger.epsilon().value <= TARGET
        label = PARTITIONS[grid.nodes.index(node)]
        first = SyntheticSet.load(run_dir / "round-001" / f"{label}.safetensors")
        second = SyntheticSet.load(run_dir / "round-002" / f"{label}.safetensors")
        assert np.array_equal(first.source_counts, second.source_counts)
        assert not np.array_equal(first.images.numpy(), second.images.numpy())


def test_a_node_whose_budget_is_spent_refuses_and_the_round_goes_on(tmp_path: Path) -> None:
    config = private_config(tmp_path)
    grid = LocalGrid(config, 3)
    spent = PrivacyLedger(delta=1e-5)
    spent.record(Access("dp-dm", 0.8, 0.5, 50, 0))  # e.g. an earlier run on the same data
    grid.contexts[101].state[LEDGER_KEY] = ConfigRecord({"json": spent.to_json()})
    run_dir = run_distillation(grid, config)
    metrics, privacy = read(run_dir, "metrics.json"), read(run_dir, "privacy.json")
    (record,) = metrics["rounds"]
    assert record["accepted"] == 2 and record["rejected"] == {} and set(record["refused"]) == {"101"}
    assert "above privacy.target_epsilon" in record["refused"]["101"]
    refused = privacy["rounds"][0]["clients"][PARTITIONS[0]]
    assert refused["refused"] and refused["epsilon"] == pytest.approx(spent.epsilon().value)
    assert len(list((run_dir / "clients").glob("*.safetensors"))) == 2


def test_a_private_reply_without_its_privacy_record_is_rejected(tmp_path: Path) -> None:
    config = private_config(tmp_path)

    def strip(reply: Message) -> Message:
        content = RecordDict({key: value for key, value in reply.content.items() if key != "privacy"})
        return Message(content, reply_to=grid.sent[-1])

    grid = LocalGrid(config, 3, tamper={103: strip})
    run_dir = run_distillation(grid, config)
    (record,) = read(run_dir, "metrics.json")["rounds"]
    assert record["accepted"] == 2 and "privacy record" in record["rejected"]["103"]


def test_dp_fedavg_composes_across_rounds_and_ends_when_budgets_are_spent(tmp_path: Path) -> None:
    local_steps = 1 * int(1 / RATE)
    sigma = calibrate_noise_multiplier(TARGET, 1e-5, RATE, 2 * local_steps, prior=[(20.0, 1.0, 1)])
    config = private_config(tmp_path, "fedavg", 3, noise_multiplier=sigma)
    grid = LocalGrid(config, 3)
    run_dir = run_baseline(grid, config)
    metrics, privacy = read(run_dir, "metrics.json"), read(run_dir, "privacy.json")
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert "refused" in metrics["stopped_early"] and privacy["mechanism"] == "dp-sgd"
    first, second = (privacy["rounds"][i]["clients"][PARTITIONS[0]] for i in (0, 1))
    assert first["epsilon"] < second["epsilon"] <= TARGET
    steps = {(a["mechanism"], a["round"]): a["steps"] for a in second["ledger"]["accesses"]}
    assert steps == {("class-counts", 1): 1, ("dp-sgd", 1): local_steps, ("dp-sgd", 2): local_steps}
    assert all(c["refused"] for c in privacy["rounds"][2]["clients"].values())
    assert metrics["rounds"][-1]["accuracy"] > 0.2  # chance is 0.1


def test_private_multi_round_through_the_simulation_engine_keeps_ledgers_in_node_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedistill run`'s engine (Ray actors): each node's ledger persists in its Flower context between rounds."""
    from launch.simulation import OFFLINE_ENV, simulate_run

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    config = private_config(tmp_path, "multi-round", 2)
    run_dir = simulate_run(config)
    privacy = read(run_dir, "privacy.json")
    planned = plan_privacy(config).planned_epsilon().value
    assert [r["round"] for r in privacy["rounds"]] == [1, 2]
    for client in privacy["rounds"][1]["clients"].values():
        rounds = {(a["mechanism"], a["round"]) for a in client["ledger"]["accesses"]}
        assert rounds == {("class-counts", 1), ("dp-dm", 1), ("dp-dm", 2)}
        assert client["epsilon"] == pytest.approx(planned, rel=1e-12) and planned <= TARGET


def test_a_resumed_private_run_gives_every_node_its_ledger_back(tmp_path: Path) -> None:
    """Server killed before round 2, resumed with fresh nodes: the ledgers go on from round 1, nothing is lost."""
    from tests.test_reliability import Killed, crash_at_round

    config = private_config(tmp_path, "multi-round", 2)
    grid = LocalGrid(config, 3)
    crash_at_round(grid, 2)
    with pytest.raises(Killed):
        run_distillation(grid, config)
    (run_dir,) = tmp_path.glob("fed-*")
    restarted = LocalGrid(config, 3, first_node=201)
    run_distillation(restarted, config, control=RunControl(resume=run_dir))
    privacy = read(run_dir, "privacy.json")
    planned = plan_privacy(config).planned_epsilon().value
    assert [r["round"] for r in privacy["rounds"]] == [1, 2]
    for label, client in privacy["rounds"][1]["clients"].items():
        steps = {(a["mechanism"], a["round"]): a["steps"] for a in client["ledger"]["accesses"]}
        assert steps == {("class-counts", 1): 1, ("dp-dm", 1): ITERATIONS, ("dp-dm", 2): ITERATIONS}, label
        assert client["epsilon"] == pytest.approx(planned, rel=1e-12)
    assert privacy["worst_epsilon"] == pytest.approx(planned, rel=1e-12)


def test_a_node_that_lost_its_ledger_charges_the_rounds_it_cannot_account_for() -> None:
    config = private_config(Path("."), "multi-round", 4)
    plan = plan_privacy(config)
    ledger = PrivacyLedger(delta=plan.delta)
    for access in plan.round_accesses(1, counts_released=False):
        ledger.record(access)
    charged = charge_unrecorded_rounds(plan, ledger, 4)
    assert charged == [2, 3] and ledger.rounds() == [1, 2, 3]
    # Rounds 2 and 3 each pay a count release and the round's steps: more than the plan allows for them.
    history = [plan.count_access(1).entry(), *(a.entry() for a in plan.round_accesses(1, True))]
    for unrecorded in (2, 3):
        history += [a.entry() for a in plan.round_accesses(unrecorded, counts_released=False)]
    assert ledger.epsilon().value == pytest.approx(compute_epsilon(history, plan.delta, plan.accountant).value)
    assert all(a.mechanism.startswith("unrecorded-") for a in ledger.accesses if a.round > 1)
    assert charge_unrecorded_rounds(plan, ledger, 4) == []  # nothing is charged twice
    assert charge_unrecorded_rounds(plan, PrivacyLedger(delta=plan.delta), 1) == []
