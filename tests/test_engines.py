"""Both Flower engines end to end on a tiny digits experiment.

The Deployment Engine test starts a real SuperLink and three SuperNodes on
loopback and submits the app with ``flwr run`` as a user would; the simulation
test runs ``fedistill.simulation.simulate`` (Ray) in this process. Both read the
run directory the ServerApp wrote, because ``flwr run`` exits 0 even when the
run fails. Everything is local: sklearn's bundled digits, no downloads, CPU is enough.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import flatten_dict

from fedistill.config import ExperimentConfig, from_run_config, parse_config, to_run_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "loopback"
NUM_NODES = 3
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 240.0


def tiny_config(output_dir: Path, **federation: Any) -> ExperimentConfig:
    """3 clients, DM at IPC 2 for a few iterations, a width-16 depth-2 ConvNet, 20 evaluation epochs."""
    return parse_config(
        {
            "seed": 1,
            "output_dir": str(output_dir),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": NUM_NODES, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "distill": {"method": "dm", "ipc": 2, "iterations": 5, "batch_real": 32, "compile": "off"},
            "eval": {"epochs": 20, "num_nets": 1},
            "federation": {"min_clients": NUM_NODES, "round_timeout_s": 120.0, **federation},
        }
    )


def run_config_arg(config: ExperimentConfig) -> str:
    """The whole experiment as ``flwr run --run-config`` key=value pairs (TOML values)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in to_run_config(config).items())


def the_run_dir(output_dir: Path) -> Path:
    run_dirs = sorted(output_dir.glob("fed-*"))
    assert len(run_dirs) == 1, f"expected one run directory under {output_dir}, found {run_dirs}"
    return run_dirs[0]


def assert_completed(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
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


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; all held open together so they differ."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc): SuperExec and app processes, some in their own session."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each started process, its process group and its descendants; SIGKILL what is left after 10 s."""
    targets = {proc.pid: descendants(proc.pid) for proc in processes if proc.poll() is None}
    for proc in processes:
        if proc.poll() is None:
            with_group = [proc.pid, *targets[proc.pid]]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for pid in with_group:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + 10
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in [p for pids in targets.values() for p in pids] + [proc.pid for proc in processes]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in processes:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Loopback:
    """A running SuperLink with ``NUM_NODES`` SuperNodes, and the environment in which `flwr` reaches it."""

    env: dict[str, str]
    logs: Path

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in sorted(self.logs.glob("*.log"))
        )


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, loopback: Loopback) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}\n{loopback.log_tails()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{what} did not listen on port {port} within {START_TIMEOUT_S:.0f} s\n{loopback.log_tails()}")


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Loopback]:
    """SuperLink and SuperNodes as separate processes on 127.0.0.1, a private FLWR_HOME; all stopped afterwards."""
    home = tmp_path / "flwr-home"
    logs = tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    link_port, *node_ports = free_ports(1 + NUM_NODES)
    (home / "config.toml").write_text(
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    loop = Loopback(env, logs)
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log_file:
            proc = subprocess.Popen(
                command,
                cwd=tmp_path,
                env={**env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(proc)
        return proc

    try:
        link = start(
            "superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)]
        )
        wait_for_port(link_port, link, "flower-superlink", loop)
        for index, port in enumerate(node_ports):
            node = start(
                f"supernode-{index}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={index} num-partitions={NUM_NODES}",
                ],
                # three ClientApps and the ServerApp share the CPU: one torch thread each
                {"OMP_NUM_THREADS": "1"},
            )
            wait_for_port(port, node, f"flower-supernode {index}", loop)
        yield loop
    finally:
        stop_all(processes)


def flwr(loop: Loopback, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args], cwd=REPO, env=loop.env, capture_output=True, text=True, timeout=timeout
    )


def test_deployment_engine_on_loopback(loopback: Loopback, tmp_path: Path) -> None:
    """`flwr run . <connection>`: the FAB goes to the SuperLink, the ServerApp waits for all three nodes."""
    output_dir = tmp_path / "runs"
    config = tiny_config(output_dir)
    started = flwr(loopback, "run", ".", CONNECTION, "--run-config", run_config_arg(config), "--stream",
                   timeout=RUN_TIMEOUT_S)
    context = f"flwr run output:\n{started.stdout}\n{started.stderr}\n{loopback.log_tails()}"
    assert started.returncode == 0, context
    listed = flwr(loopback, "list", CONNECTION, "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert [run["status"] for run in runs] == ["finished:completed"], context
    assert_completed(the_run_dir(output_dir))


# ------------------------------------------------------------------ simulation engine, in-process


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``configure_offline_env`` sets, registered with monkeypatch so it is undone after the test."""
    from fedistill.simulation import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, os.environ.get(key, value))


def test_simulation_engine_end_to_end(tmp_path: Path, offline_env: None) -> None:
    """``simulate`` with the factory-built ServerApp: Ray actors run the ClientApp, the run directory is complete."""
    from fedistill.simulation import simulate
    from server.app import make_server_app

    config = tiny_config(tmp_path / "runs")
    finished: list[Path] = []
    simulate(config, server_app=make_server_app(config, on_done=finished.append))
    assert finished == [the_run_dir(tmp_path / "runs")]
    assert_completed(finished[0])


def test_simulation_raises_when_the_server_fails(tmp_path: Path, offline_env: None) -> None:
    """A ServerApp failure (here: four clients required, three simulated) surfaces as the exception itself."""
    from fedistill.simulation import simulate_run
    from server.federation import NotEnoughClients

    config = tiny_config(tmp_path / "runs", min_clients=NUM_NODES + 1, round_timeout_s=1.0)
    with pytest.raises(NotEnoughClients):
        simulate_run(config)


def test_simulate_refuses_a_node_count_other_than_the_partition_count(tmp_path: Path) -> None:
    from fedistill.simulation import simulate

    with pytest.raises(ValueError, match="partition.num_clients"):
        simulate(tiny_config(tmp_path), num_supernodes=NUM_NODES + 1)
