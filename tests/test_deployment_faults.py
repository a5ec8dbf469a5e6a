"""The Deployment Engine under faults and with admission control, on loopback with real processes.

A SuperNode killed in the middle of a round is left out once the round's
quorum and straggler timeout are met, the run goes on with whoever is
connected, and a restarted node for the same partition rejoins. With TLS
(a CA and server certificate made with ``openssl`` here) and SuperNode
authentication, only nodes whose public key was registered take part; a node
with another key is refused by the SuperLink.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from deploy import RUN_TIMEOUT_S, Deployment, command_line, descendants, kill_tree, read_metrics, tiny_config


def wait_for_status(output_dir: Path, deployment: Deployment, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """The run directory's metrics once its status is no longer ``running``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = sorted(output_dir.glob("fed-*"))
        if runs and (runs[0] / "metrics.json").exists():
            metrics = read_metrics(runs[0])
            if metrics["status"] != "running":
                return metrics
        time.sleep(0.5)
    pytest.fail(f"the run did not finish within {timeout:.0f} s\n{deployment.log_tails()}")


def wait_for_client_app(deployment: Deployment, node: str, timeout: float = RUN_TIMEOUT_S) -> None:
    """Until ``node`` runs a ClientApp process: it has received its first message and is working on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("flwr-clientapp" in command_line(pid) for pid in descendants(deployment.nodes[node].pid)):
            return
        time.sleep(0.1)
    pytest.fail(f"{node} never started a ClientApp\n{deployment.log_tails()}")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path)
    try:
        deployment.start_link()
        yield deployment
    finally:
        deployment.stop()


def test_a_supernode_killed_mid_round_is_left_out_and_a_restarted_one_rejoins(
    deployment: Deployment, tmp_path: Path
) -> None:
    for index in range(3):
        deployment.start_node(f"node-{index}", index, 3)
    output_dir = tmp_path / "runs"
    # Rounds need two valid sets; once they are in, a silent node gets 5 more seconds.
    config = tiny_config(output_dir, 3, protocol="multi-round", rounds=3, min_clients=2, straggler_timeout_s=5.0)
    submitted = deployment.submit(config, stream=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wait_for_client_app(deployment, "node-2")
    kill_tree(deployment.nodes["node-2"])
    deployment.start_node("node-2-restarted", 2, 3)
    metrics = wait_for_status(output_dir, deployment)
    context = json.dumps(metrics, indent=1) + "\n" + deployment.log_tails()
    assert metrics["status"] == "completed", context
    first, *later = metrics["rounds"]
    assert first["partitions"] == [0, 1] and first["accepted"] == 2 and len(first["missing"]) == 1, context
    # The restarted node (a new node id) is asked from round 2 on and delivers partition 2 again.
    assert any(record["partitions"] == [0, 1, 2] for record in later), context
    assert all(record["accepted"] >= 2 for record in later)
    assert deployment.wait_until_finished() == ["finished:completed"], context


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test's TLS certificates (Debian package openssl)")
    directory.mkdir()
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, request, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    commands = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedistill test CA",
         "-keyout", ca_key, "-out", ca_cert],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", request],
        ["openssl", "x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-extfile", extensions, "-out", cert],
    ]
    for command in commands:
        done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return ca_cert, cert, key


def make_node_key(path: Path) -> Path:
    """An EC (P-384) key pair in OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` reads."""
    private = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(
        private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path


def test_tls_and_supernode_authentication_admit_only_registered_nodes(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path / "certificates")
    keys = [make_node_key(tmp_path / f"node-{index}.key") for index in range(2)]
    intruder_key = make_node_key(tmp_path / "intruder.key")
    secure = Deployment(tmp_path, tls=tls, supernode_auth=True)
    try:
        secure.start_link()
        for key in keys:
            registered = secure.flwr("supernode", "register", str(key.with_suffix(".pub")), "loopback")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for index, key in enumerate(keys):
            secure.start_node(f"node-{index}", index, 2, key=key)
        # Same partition as node 0, a key nobody registered: the SuperLink must refuse it.
        intruder = secure.start_node("intruder", 0, 2, key=intruder_key, wait=False, max_retries=2)
        secure.wait_for_online(2)
        output_dir = tmp_path / "runs"
        started = secure.submit(tiny_config(output_dir, 2, min_clients=2))
        context = f"{started.stdout}\n{started.stderr}\n{secure.log_tails()}"
        assert started.returncode == 0, context
        assert secure.wait_until_finished() == ["finished:completed"], context
        metrics = read_metrics(sorted(output_dir.glob("fed-*"))[0])
        (record,) = metrics["rounds"]
        assert metrics["status"] == "completed" and record["asked"] == 2 and record["partitions"] == [0, 1], context
        assert len(secure.online_nodes()) == 2, context
        intruder.wait(timeout=120)
        assert intruder.returncode != 0, context
        assert "No SuperNode found with the given public key" in (secure.logs / "superlink.log").read_text(), context
        # Without TLS the CLI cannot even reach the SuperLink.
        plain = Deployment(tmp_path / "plain-client")
        (plain.home / "config.toml").write_text(
            f'[superlink.loopback]\naddress = "127.0.0.1:{secure.link_port}"\ninsecure = true\n'
        )
        refused = plain.flwr("list", "loopback", "--format", "json")
        assert json.loads(refused.stdout)["success"] is False, refused.stdout
    finally:
        secure.stop()
