"""Runs survive crashes and faulty nodes: checkpoints, exact resume, quorum and straggler timeout, atomic files.

Protocol runs go through the in-process grid (``tests/fedgrid.py``): a crash
is an exception raised when round k is about to be sent (the process "dies"
after round k-1 was checkpointed), a resumed run gets a grid with new node ids
for the same partitions, as after a restart. Atomic writes are also checked
against a process killed with SIGKILL in the middle of writing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedgrid import LocalGrid, fake_task_identity
from flwr.app import ConfigRecord, Message, RecordDict
from safetensors.torch import load_file

import clients.app
from fedistill.atomic import atomic_path, save_figure, save_tensors, write_bytes
from fedistill.checkpoint import CheckpointError, load_checkpoint
from fedistill.config import ExperimentConfig, parse_config
from fedistill.synthetic import SyntheticSet
from server.baselines import run_baseline
from server.distillation import run_distillation
from server.rounds import NotEnoughClients, RunControl
from wire.messages import RESTORE_PREFIX

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_task_identity(monkeypatch)


def small_config(output_dir: Path, **federation: Any) -> ExperimentConfig:
    """3 digits clients, DM at IPC 2 for 2 iterations, a width-16 depth-2 ConvNet, 4 evaluation epochs: fast, not good."""
    return parse_config(
        {
            "seed": 3,
            "device": "cpu",
            "output_dir": str(output_dir),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": 3, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "distill": {"method": "dm", "ipc": 2, "iterations": 2, "batch_real": 16, "compile": "off"},
            "eval": {"epochs": 4, "num_nets": 1},
            "federation": {"min_clients": 2, "round_timeout_s": 60.0, **federation},
        }
    )


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way handles it."""


def crash_at_round(grid: LocalGrid, k: int) -> None:
    """Make ``grid`` kill the server when the first train message of round ``k`` is about to be sent."""

    def before_push(messages: list[Message]) -> None:
        config = messages[0].content.config_records.get("config", {})
        if config.get("server-round") == k:
            raise Killed(f"killed at round {k}")

    grid.before_push = before_push


def metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


COMPARED = ("round", "accuracy", "loss", "upload_bytes", "accepted", "partitions", "asked")


def outcome(run_dir: Path) -> list[dict[str, Any]]:
    """What must be identical between two runs of one seed: per-round results (not node ids or seconds)."""
    return [{key: record[key] for key in COMPARED} for record in metrics(run_dir)["rounds"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = small_config(tmp_path_factory.mktemp("uninterrupted"), protocol="multi-round", rounds=3)
    with pytest.MonkeyPatch.context() as patch:
        fake_task_identity(patch)
        return run_distillation(LocalGrid(config, 3), config)


@pytest.mark.parametrize("k", [2, 3])
def test_resume_after_a_kill_at_round_k_ends_exactly_like_the_uninterrupted_run(
    uninterrupted: Path, tmp_path: Path, k: int
) -> None:
    config = small_config(tmp_path, protocol="multi-round", rounds=3)
    grid = LocalGrid(config, 3)
    crash_at_round(grid, k)
    with pytest.raises(Killed):
        run_distillation(grid, config)
    (run_dir,) = tmp_path.glob("fed-*")
    assert load_checkpoint(run_dir).round == k - 1
    (run_dir / f"round-{k:03d}").mkdir()  # the dead attempt's partial round is discarded on resume
    (run_dir / f"round-{k:03d}" / "partition-0000.safetensors").write_bytes(b"half a file")
    # The restarted federation: same partitions, new node ids, empty node state.
    restarted = LocalGrid(config, 3, first_node=201)
    assert run_distillation(restarted, config, control=RunControl(resume=run_dir)) == run_dir
    assert outcome(run_dir) == outcome(uninterrupted)
    assert metrics(run_dir)["status"] == "completed"
    for name in ("global_model.safetensors", "aggregate.safetensors"):
        resumed, original = load_file(str(run_dir / name)), load_file(str(uninterrupted / name))
        assert resumed.keys() == original.keys() and all(torch.equal(resumed[key], original[key]) for key in resumed)
    assert not (run_dir / f"round-{k:03d}" / "partition-0000.safetensors").read_bytes() == b"half a file"
    # Nodes that kept a set to continue from (sets made under the global model: round 2 on) got it back.
    first = restarted.sent[0]
    assert (RESTORE_PREFIX + "previous-set" in first.content) == (k == 3)


def test_resume_keeps_the_earlier_rounds_an_aggregate_window_trains_on(tmp_path: Path) -> None:
    config = small_config(tmp_path / "whole", protocol="multi-round", rounds=3, aggregate_window=2)
    whole = run_distillation(LocalGrid(config, 3), config)
    config = small_config(tmp_path / "killed", protocol="multi-round", rounds=3, aggregate_window=2)
    grid = LocalGrid(config, 3)
    crash_at_round(grid, 3)
    with pytest.raises(Killed):
        run_distillation(grid, config)
    (run_dir,) = (tmp_path / "killed").glob("fed-*")
    assert "earlier/0/images" in load_checkpoint(run_dir).tensors
    run_distillation(LocalGrid(config, 3, first_node=201), config, control=RunControl(resume=run_dir))
    assert outcome(run_dir) == outcome(whole)
    resumed, original = load_file(str(run_dir / "aggregate.safetensors")), load_file(str(whole / "aggregate.safetensors"))
    assert all(torch.equal(resumed[key], original[key]) for key in original)


def test_interrupted_run_records_its_state_and_a_stop_request_ends_it(tmp_path: Path) -> None:
    """A stop request (Ctrl-C in ``fedistill run``) ends the run at its next wait with a resumable directory."""
    import threading

    config = small_config(tmp_path, protocol="multi-round", rounds=2)
    stop = threading.Event()
    grid = LocalGrid(config, 3)

    def before_push(messages: list[Message]) -> None:
        if messages[0].content.config_records["config"].get("server-round") == 2:
            stop.set()

    grid.before_push = before_push
    started: list[Path] = []
    with pytest.raises(Exception, match="stopped on request") as raised:
        run_distillation(grid, config, control=RunControl(stop=stop, on_start=started.append))
    assert type(raised.value).__name__ == "RunInterrupted"
    (run_dir,) = started
    saved = metrics(run_dir)
    assert saved["status"] == "interrupted" and saved["completed_rounds"] == 1
    assert "fedistill run --resume" in saved["resume"] and load_checkpoint(run_dir).round == 1
    run_distillation(LocalGrid(config, 3, first_node=301), config, control=RunControl(resume=run_dir))
    assert metrics(run_dir)["status"] == "completed" and [r["round"] for r in metrics(run_dir)["rounds"]] == [1, 2]


def test_kept_client_state_is_given_back_to_a_restarted_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``state.<key>`` records (e.g. a privacy ledger) are checkpointed per partition and restored by key."""
    monkeypatch.setattr(clients.app, "KEPT_BY_SERVER", ("ledger",))
    config = small_config(tmp_path, protocol="multi-round", rounds=2)
    grid = LocalGrid(config, 3)
    for index, context in enumerate(grid.contexts.values()):
        context.state["ledger"] = ConfigRecord({"epsilon": 0.5 + index, "releases": [1, 2]})
    crash_at_round(grid, 2)
    with pytest.raises(Killed):
        run_distillation(grid, config)
    (run_dir,) = tmp_path.glob("fed-*")
    assert load_checkpoint(run_dir).state["kept_records"]["2"]["ledger"]["values"]["epsilon"] == 2.5
    restarted = LocalGrid(config, 3, first_node=401)
    run_distillation(restarted, config, control=RunControl(resume=run_dir))
    for index, context in enumerate(restarted.contexts.values()):
        assert dict(context.state["ledger"]) == {"epsilon": 0.5 + index, "releases": [1, 2]}


def test_flwr_run_resumes_through_the_resume_app_key_and_only_the_same_experiment(tmp_path: Path) -> None:
    """``flwr run ... --run-config "resume='RUN_DIR'"``: the ServerApp reads the experiment from the run directory.

    A checkpoint refuses a different experiment, naming the key; operational keys may differ.
    """
    from flwr.app import Context

    from fedistill.config import to_run_config
    from server.app import APP_KEYS, main
    from server.state import check_resumable

    config = small_config(tmp_path, protocol="multi-round", rounds=2)

    def context(**app_keys: str) -> Context:
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                       run_config={**to_run_config(config), **APP_KEYS, **app_keys})

    grid = LocalGrid(config, 3)
    crash_at_round(grid, 2)
    with pytest.raises(Killed):
        main(grid, context())
    (run_dir,) = tmp_path.glob("fed-*")
    changed = small_config(tmp_path, protocol="multi-round", rounds=2, perturbation=0.5)
    with pytest.raises(CheckpointError, match="federation.perturbation was 0.01 when the run started but is 0.5"):
        run_distillation(LocalGrid(changed, 3), changed, control=RunControl(resume=run_dir))
    operational = small_config(tmp_path, protocol="multi-round", rounds=2, round_timeout_s=5.0, min_clients=3)
    check_resumable(load_checkpoint(run_dir), operational, run_dir)
    main(LocalGrid(config, 3, first_node=801), context(resume=str(run_dir)))
    assert [r["round"] for r in metrics(run_dir)["rounds"]] == [1, 2] and metrics(run_dir)["status"] == "completed"
    assert list(tmp_path.glob("fed-*")) == [run_dir]


@pytest.mark.parametrize("fraction_train", [1.0, 0.67])
def test_fedavg_resume_after_a_kill_ends_exactly_like_the_uninterrupted_run(
    tmp_path: Path, fraction_train: float
) -> None:
    """Also when each round samples 2 of the 3 nodes and the restarted nodes' ids come in another partition order."""
    baseline = {"protocol": "fedavg", "rounds": 2, "local_epochs": 1, "local_lr": 0.05, "local_batch": 32,
                "fraction_train": fraction_train}
    straight = run_baseline(LocalGrid(config := small_config(tmp_path / "a", **baseline), 3), config)
    grid = LocalGrid(config := small_config(tmp_path / "b", **baseline), 3)
    crash_at_round(grid, 2)
    with pytest.raises(Killed):
        run_baseline(grid, config)
    (run_dir,) = (tmp_path / "b").glob("fed-*")
    restarted = LocalGrid(config, 3, first_node=501, partitions=[2, 0, 1])
    run_baseline(restarted, config, control=RunControl(resume=run_dir))
    assert outcome(run_dir) == outcome(straight)
    assert [r["asked"] for r in metrics(run_dir)["rounds"]] == [3 if fraction_train == 1.0 else 2] * 2
    assert metrics(run_dir)["initial"] == metrics(straight)["initial"]
    resumed, original = load_file(str(run_dir / "global_model.safetensors")), load_file(str(straight / "global_model.safetensors"))
    assert all(torch.equal(resumed[key], original[key]) for key in original)
    # The resumed strategy numbers its rounds as the run does: the nodes derive their seeds from it.
    assert {message.content.config_records["config"]["server-round"] for message in restarted.sent} == {2}


# --- faults within a round ----------------------------------------------------------------------------------


def test_hung_and_unavailable_nodes_are_missing_and_the_round_completes_after_the_straggler_timeout(
    tmp_path: Path,
) -> None:
    config = small_config(tmp_path, straggler_timeout_s=1.0, round_timeout_s=60.0)
    values = config.model_dump(mode="json", exclude_none=True)
    config = parse_config({**values, "partition": {**values["partition"], "num_clients": 5}})
    grid = LocalGrid(config, 5, hang=[104], unavailable=[105], crash=[103])
    started = time.monotonic()
    run_dir = run_distillation(grid, config)
    elapsed = time.monotonic() - started
    (record,) = metrics(run_dir)["rounds"]
    assert record["accepted"] == 2 and record["partitions"] == [0, 1] and record["asked"] == 5
    assert record["missing"] == ["104", "105"] and list(record["rejected"]) == ["103"]
    assert elapsed < 30.0  # the hung node cost the 1 s straggler timeout, not the 60 s round timeout


def test_each_round_asks_the_nodes_connected_then_and_restarted_nodes_get_their_sets_back(tmp_path: Path) -> None:
    """Round 3: node 103 is gone, 903 (a restart under a new id, same partition) is there, 102 hangs.
    Round 4: 102 is back, restarted under the same id with its state lost. Both continue their sets."""
    config = small_config(tmp_path, protocol="multi-round", rounds=4, straggler_timeout_s=0.0)
    grid = LocalGrid(config, 3)
    replacement = LocalGrid(config, 3, first_node=901)
    continued: dict[int, list[int]] = {102: [], 903: []}

    def spy(node: int) -> Any:
        def record(reply: Message) -> Message:
            continued[node].append(int(reply.content.metric_records["metrics"]["continued"]))
            return reply

        return record

    def before_push(messages: list[Message]) -> None:
        server_round = messages[0].content.config_records["config"].get("server-round")
        if server_round == 2 and 103 in grid.nodes:  # listed from round 3 on
            grid.nodes[grid.nodes.index(103)] = 903
            grid.contexts[903] = replacement.contexts[903]
            grid.tamper[903] = spy(903)
        if server_round == 3:
            grid.hang.add(102)
        if server_round == 4 and 102 in grid.hang:
            grid.hang.discard(102)
            grid.contexts[102].state = RecordDict()  # the process restarted: Flower's node state is gone
            grid.tamper[102] = spy(102)

    grid.before_push = before_push
    run_dir = run_distillation(grid, config)
    rounds = metrics(run_dir)["rounds"]
    assert [r["partitions"] for r in rounds] == [[0, 1, 2], [0, 1, 2], [0, 2], [0, 1, 2]]
    assert rounds[2]["missing"] == ["102"] and [r["asked"] for r in rounds] == [3, 3, 3, 3]

    def restored(server_round: int) -> set[int]:
        sent = [m for m in grid.sent if m.content.config_records["config"]["server-round"] == server_round]
        return {m.metadata.dst_node_id for m in sent if RESTORE_PREFIX + "previous-set" in m.content}

    assert restored(3) == {903} and restored(4) == {102}
    assert continued == {903: [1, 1], 102: [1]}  # from the sets of their partitions, not afresh


def test_too_few_nodes_stop_the_run_quickly_with_a_resumable_directory(tmp_path: Path) -> None:
    config = small_config(tmp_path, min_clients=3, round_timeout_s=1.0)
    grid = LocalGrid(config, 3)

    def before_push(messages: list[Message]) -> None:
        if messages[0].content.config_records["config"].get("server-round") == 1:
            grid.hang.add(103)

    grid.before_push = before_push
    started = time.monotonic()
    with pytest.raises(NotEnoughClients, match=r"round 1: 2 valid sets from 3 nodes asked, need 3.*--resume"):
        run_distillation(grid, config)
    assert time.monotonic() - started < 30.0
    (run_dir,) = tmp_path.glob("fed-*")
    saved = metrics(run_dir)
    assert saved["status"] == "failed" and saved["completed_rounds"] == 0 and "--resume" in saved["resume"]
    grid.hang.clear()
    run_distillation(LocalGrid(config, 3, first_node=601), config, control=RunControl(resume=run_dir))
    assert metrics(run_dir)["status"] == "completed"


def test_a_node_claiming_a_partition_already_answered_is_rejected(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    grid = LocalGrid(config, 3)
    grid.contexts[103].node_config["partition-id"] = 0
    (record,) = metrics(run_distillation(grid, config))["rounds"]
    assert record["accepted"] == 2 and record["partitions"] == [0, 1]
    (reason,) = record["rejected"].values()
    assert reason.startswith("partition-id: partition 0 already answered by node")


# --- atomic files -------------------------------------------------------------------------------------------


def test_a_failing_writer_leaves_the_previous_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "global_model.safetensors"
    save_tensors(target, {"w": torch.ones(3)})
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory, after opening the file
        save_tensors(target, {"a": shared, "b": shared})
    assert torch.equal(load_file(str(target))["w"], torch.ones(3))
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as temp:
        temp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert torch.equal(load_file(str(target))["w"], torch.ones(3))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["global_model.safetensors"]


def test_a_process_killed_mid_write_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "aggregate.safetensors"
    previous = SyntheticSet(torch.ones(2, 1, 4, 4), torch.tensor([0, 1]), 2, np.array([3, 4]))
    previous.save(target)
    before = target.read_bytes()
    writer = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from fedistill.atomic import atomic_path
with atomic_path({str(target)!r}) as temp, open(temp, "wb") as handle:
    handle.write(b"x" * 1_000_000)
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    assert SyntheticSet.load(target).labels.tolist() == [0, 1]
    leftovers = [path.name for path in tmp_path.iterdir() if path != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".aggregate.safetensors.") and leftovers[0].endswith(".tmp")


def test_atomic_files_get_umask_permissions_and_figures_their_format(tmp_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    path = save_figure(fig, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mask = os.umask(0o022)
    os.umask(mask)
    written = write_bytes(tmp_path / "blob", b"abc")
    assert written.stat().st_mode & 0o777 == 0o666 & ~mask


def test_checkpoints_from_elsewhere_are_checked_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)
    save_tensors(tmp_path / "checkpoint.safetensors", {"x": torch.zeros(1)}, {"format": "something else"})
    with pytest.raises(CheckpointError, match="not a fedistill checkpoint"):
        load_checkpoint(tmp_path)
    save_tensors(tmp_path / "checkpoint.safetensors", {"x": torch.zeros(1)}, {"format": "fedistill-checkpoint", "version": "99"})
    with pytest.raises(CheckpointError, match="version '99'"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "nowhere") is None


def test_rng_states_survive_a_checkpoint(tmp_path: Path) -> None:
    import random

    from fedistill.checkpoint import Checkpoint, restore_rng, save_checkpoint

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path, Checkpoint(1))
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    restore_rng(load_checkpoint(tmp_path))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


# --- the command line ---------------------------------------------------------------------------------------


def write_experiment(path: Path, config: ExperimentConfig) -> Path:
    from fedistill.runs import to_toml

    path.write_text(to_toml(config.model_dump(mode="json", exclude_none=True)))
    return path


def test_cli_resume_refuses_what_would_change_the_run_and_configs_that_cannot_fit(tmp_path: Path) -> None:
    from test_cli import assert_one_error_line, runner

    from launch.cli import app

    experiment = write_experiment(tmp_path / "exp.toml", small_config(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "fed-x"
    run_dir.mkdir(parents=True)
    write_experiment(run_dir / "config.toml", small_config(tmp_path / "runs"))
    cases = [
        (["run", "--resume", str(run_dir), "--set", "distill.ipc=3"], ("--set distill.ipc: cannot change when resuming",
                                                                       "federation.round_timeout_s")),
        (["run", str(experiment), "--resume", str(run_dir)], ("either an experiment file",)),
        (["run", "--resume", str(tmp_path)], ("not a run directory",)),
        (["run", str(experiment), "--set", "data.name=cifar10", "--set", "distill.ipc=5000"],
         ("distill.ipc: one client's set would be 588.2 MiB", "max_reply_mb = 256")),
    ]
    for args, needles in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert_one_error_line(result.stderr, *needles)


def test_ctrl_c_during_fedistill_run_leaves_a_resumable_directory(tmp_path: Path) -> None:
    """SIGINT to a real ``fedistill run`` (Flower simulation, Ray): exit 130, status interrupted, then resumable."""
    from launch.simulation import OFFLINE_ENV

    # Ray's actors can take minutes to start on a loaded 2-core machine; the round must not time out first.
    config = small_config(tmp_path / "runs", protocol="multi-round", rounds=3, round_timeout_s=300.0)
    experiment = write_experiment(tmp_path / "exp.toml", config)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "run", str(experiment)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 420
        while not list((tmp_path / "runs").glob("fed-*/checkpoint.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = (tmp_path / "runs").glob("fed-*")
    assert proc.returncode == 130, out + err
    assert f"fedistill run --resume {run_dir}" in err
    saved = metrics(run_dir)
    checkpoint = load_checkpoint(run_dir)
    assert saved["status"] in ("interrupted", "completed") and checkpoint.round == saved["completed_rounds"] >= 1
    run_distillation(LocalGrid(config, 3, first_node=701), config, control=RunControl(resume=run_dir))
    assert metrics(run_dir)["status"] == "completed" and [r["round"] for r in metrics(run_dir)["rounds"]] == [1, 2, 3]
