"""A real Flower Deployment Engine on loopback for tests: a SuperLink, SuperNodes and the `flwr` CLI as processes.

Shared by the engine, fault and admission tests. ``Deployment`` starts each
process in its own session with its output in ``logs/<name>.log``, can kill
and restart a SuperNode, and stops everything (descendants included) at the
end. Everything is local: free ports on 127.0.0.1, a private ``FLWR_HOME``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmarks.memory import descendants
from fedistill.config import ExperimentConfig, parse_config, to_run_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "loopback"
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 240.0


def tiny_config(output_dir: Path, num_nodes: int = 3, **federation: Any) -> ExperimentConfig:
    """``num_nodes`` clients, DM at IPC 2 for a few iterations, a width-16 depth-2 ConvNet, 20 evaluation epochs."""
    return parse_config(
        {
            "seed": 1,
            "output_dir": str(output_dir),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": num_nodes, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "distill": {"method": "dm", "ipc": 2, "iterations": 5, "batch_real": 32, "compile": "off"},
            "eval": {"epochs": 20, "num_nets": 1},
            "federation": {"min_clients": num_nodes, "round_timeout_s": 120.0, **federation},
        }
    )


def run_config_arg(config: ExperimentConfig) -> str:
    """The whole experiment as ``flwr run --run-config`` key=value pairs (TOML values)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in to_run_config(config).items())


def the_run_dir(output_dir: Path) -> Path:
    run_dirs = sorted(output_dir.glob("fed-*"))
    assert len(run_dirs) == 1, f"expected one run directory under {output_dir}, found {run_dirs}"
    return run_dirs[0]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


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


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a started process, its process group and every descendant (as a crash or `kill -9` would)."""
    targets = [proc.pid, *descendants(proc.pid)]
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        proc.wait(timeout=10)


def stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each started process, its process group and its descendants; SIGKILL what is left after 10 s."""
    targets = {proc.pid: descendants(proc.pid) for proc in processes if proc.poll() is None}
    for proc in processes:
        if proc.poll() is None:
            for pid in [proc.pid, *targets[proc.pid]]:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for pid in [proc.pid, *targets[proc.pid]]:
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


class Deployment:
    """A SuperLink and its SuperNodes on 127.0.0.1, each a process of its own, plus the `flwr` CLI to reach them.

    ``tls`` is ``(ca_cert, server_cert, server_key)``: the SuperLink serves
    HTTPS and nodes and the CLI verify it against the CA; ``supernode_auth``
    starts the SuperLink with ``--enable-supernode-auth`` (only registered
    public keys may connect).
    """

    def __init__(self, root: Path, tls: tuple[Path, Path, Path] | None = None, supernode_auth: bool = False) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.supernode_auth = supernode_auth
        (self.link_port,) = free_ports(1)
        security = f'root-certificates = "{tls[0]}"' if tls else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.link_port}"\n{security}\n'
        )
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in sorted(self.logs.glob("*.log"))
        )

    def start(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen(
                command,
                cwd=self.root,
                env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(proc)
        return proc

    def wait_for_port(self, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}\n{self.log_tails()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"{what} did not listen on port {port} within {START_TIMEOUT_S:.0f} s\n{self.log_tails()}")

    def start_link(self) -> None:
        command = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.link_port)]
        if self.tls:
            ca, cert, key = self.tls
            command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        else:
            command.append("--insecure")
        if self.supernode_auth:
            command.append("--enable-supernode-auth")
        link = self.start("superlink", command)
        self.wait_for_port(self.link_port, link, "flower-superlink")

    def start_node(
        self,
        name: str,
        partition: int,
        num_partitions: int,
        key: Path | None = None,
        wait: bool = True,
        max_retries: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """A SuperNode holding ``partition``; ``key`` is its SSH-format private key for SuperNode authentication.

        ``max_retries`` makes a node that cannot connect give up (by default it keeps trying).
        """
        (port,) = free_ports(1)
        command = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.link_port}",
            "--port",
            str(port),
            "--node-config",
            f"partition-id={partition} num-partitions={num_partitions}",
        ]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        command += ["--root-certificates", str(self.tls[0])] if self.tls else ["--insecure"]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        # the ClientApps and the ServerApp share two cores: one torch thread each
        node = self.start(name, command, {"OMP_NUM_THREADS": "1"})
        self.nodes[name] = node
        if wait:
            self.wait_for_port(port, node, f"flower-supernode {name}")
        return node

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def online_nodes(self) -> list[dict[str, Any]]:
        listed = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return [node for node in json.loads(listed.stdout)["nodes"] if node.get("status") == "online"]

    def wait_for_online(self, count: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while len(self.online_nodes()) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {count} SuperNodes online after {timeout:.0f} s\n{self.log_tails()}")
            time.sleep(0.5)

    def submit(self, config: ExperimentConfig, *extra: str, stream: bool = True) -> subprocess.CompletedProcess[str]:
        args = ["run", ".", CONNECTION, "--run-config", run_config_arg(config), *extra]
        return self.flwr(*args, *(["--stream"] if stream else []), timeout=RUN_TIMEOUT_S)

    def run_statuses(self) -> list[str]:
        listed = self.flwr("list", CONNECTION, "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return [run["status"] for run in json.loads(listed.stdout)["runs"]]

    def wait_until_finished(self, timeout: float = 60.0) -> list[str]:
        """The runs' statuses once none is still running: the ServerApp writes its last metrics before
        its process exits and the SuperLink marks the run finished."""
        deadline = time.monotonic() + timeout
        statuses = self.run_statuses()
        while any(not status.startswith("finished") for status in statuses) and time.monotonic() < deadline:
            time.sleep(0.5)
            statuses = self.run_statuses()
        return statuses

    def stop(self) -> None:
        stop_all(self.processes)
