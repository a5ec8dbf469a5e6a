"""Both Flower engines end to end on a tiny digits experiment.

The Deployment Engine test starts a real SuperLink and three SuperNodes on
loopback and submits the app with ``flwr run`` as a user would; the simulation
test runs ``launch.simulation.simulate`` (Ray) in this process. Both read the
run directory the ServerApp wrote, because ``flwr run`` exits 0 even when the
run fails. Everything is local: sklearn's bundled digits, no downloads, CPU is enough.
"""

from __future__ import annotations

import io
import os
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy import REPO, Deployment, read_metrics, the_run_dir, tiny_config
from flwr.common.config import flatten_dict

from fedistill.config import ExperimentConfig, from_run_config, to_run_config

NUM_NODES = 3


def assert_completed(run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed", metrics
    assert metrics["nodes"] == NUM_NODES
    assert metrics["accepted"] == NUM_NODES
    assert metrics["rounds"][-1]["rejected"] == {}


# ------------------------------------------------------------------ the app's own config


def pyproject_run_config() -> dict[str, Any]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def test_pyproject_run_config_is_a_whole_experiment() -> None:
    """`flwr run` only accepts --run-config keys present in [tool.flwr.app.config], so it must list them all."""
    from server.app import APP_KEYS

    defaults = pyproject_run_config()
    experiment = {key: value for key, value in defaults.items() if key not in APP_KEYS}
    assert set(experiment) == set(to_run_config(ExperimentConfig())), "update [tool.flwr.app.config] in pyproject.toml"
    assert {key: defaults[key] for key in APP_KEYS} == APP_KEYS
    from_run_config(experiment)


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_fab_leaves_out_ignored_and_test_files() -> None:
    """What `flwr run .` uploads: the app's sources, not .venv, run outputs or tests, and under Flower's 10 MB cap."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE // 4
    assert {"pyproject.toml", "server/app.py", "clients/app.py", "fedistill/config.py"} <= set(names)
    leaked = [n for n in names if n.startswith((".venv/", "runs/")) or "/test_" in n or n.startswith("test_")]
    assert leaked == []


# ------------------------------------------------------------------ Deployment Engine on loopback


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Deployment]:
    """SuperLink and SuperNodes as separate processes on 127.0.0.1, a private FLWR_HOME; all stopped afterwards."""
    deployment = Deployment(tmp_path)
    try:
        deployment.start_link()
        for index in range(NUM_NODES):
            deployment.start_node(f"supernode-{index}", index, NUM_NODES)
        yield deployment
    finally:
        deployment.stop()


def test_deployment_engine_on_loopback(loopback: Deployment, tmp_path: Path) -> None:
    """`flwr run . <connection>`: the FAB goes to the SuperLink, the ServerApp waits for all three nodes."""
    output_dir = tmp_path / "runs"
    started = loopback.submit(tiny_config(output_dir))
    context = f"flwr run output:\n{started.stdout}\n{started.stderr}\n{loopback.log_tails()}"
    assert started.returncode == 0, context
    assert loopback.wait_until_finished() == ["finished:completed"], context
    assert_completed(the_run_dir(output_dir))


# ------------------------------------------------------------------ simulation engine, in-process


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``configure_offline_env`` sets, registered with monkeypatch so it is undone after the test."""
    from launch.simulation import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, os.environ.get(key, value))


def test_simulation_engine_end_to_end(tmp_path: Path, offline_env: None) -> None:
    """``simulate`` with the factory-built ServerApp: Ray actors run the ClientApp, the run directory is complete."""
    from launch.simulation import simulate
    from server.app import make_server_app

    config = tiny_config(tmp_path / "runs")
    finished: list[Path] = []
    simulate(config, server_app=make_server_app(config, on_done=finished.append))
    assert finished == [the_run_dir(tmp_path / "runs")]
    assert_completed(finished[0])


def test_simulation_raises_when_the_server_fails(tmp_path: Path, offline_env: None) -> None:
    """A ServerApp failure (here: four clients required, three simulated) surfaces as the exception itself."""
    from launch.simulation import simulate_run
    from server.rounds import NotEnoughClients

    config = tiny_config(tmp_path / "runs", min_clients=NUM_NODES + 1, round_timeout_s=1.0)
    with pytest.raises(NotEnoughClients):
        simulate_run(config)


def test_simulate_refuses_a_node_count_other_than_the_partition_count(tmp_path: Path) -> None:
    from launch.simulation import simulate

    with pytest.raises(ValueError, match="partition.num_clients"):
        simulate(tiny_config(tmp_path), num_supernodes=NUM_NODES + 1)
