"""Reliability benchmark: faulty nodes on a real loopback deployment, fuzzed replies, and an exact resume.

Three parts, each writing one record to ``benchmarks/results/``:

``faults``  A 10-client, 5-round multi-round run on the Deployment Engine
            (SuperLink and ten SuperNodes as processes on 127.0.0.1, sklearn
            digits), once without faults and once with two SuperNodes killed
            (SIGKILL) during round 2, one hung (SIGSTOP) from round 3 and
            resumed (SIGCONT) for round 5, and one of the killed nodes
            restarted for round 3. Record ``faults-nodes-killed-survived``: the
            killed plus hung nodes of a run that completed every round; the
            notes give both final accuracies.
``fuzz``    Hostile replies through the server's reply collector, exactly as a
            round receives them: valid sets mutated at random (values, dtypes,
            shapes, lying ``.npy`` headers and Array metadata, metrics,
            kept-state records, sizes), and every accepted set re-checked by
            an independent oracle. Then a whole 10-client, 5-round protocol
            run in-process with three nodes that fuzz every reply. Record
            ``fuzz-invalid-replies-accepted``: sets that passed the collector
            but fail the oracle (must be 0).
``resume``  ``fedistill run`` (Flower simulation) of the same experiment
            uninterrupted, and killed with SIGKILL (the whole process group)
            once round 2 is checkpointed, then ``fedistill run --resume``.
            Record ``resume-metric-abs-diff``: the largest absolute difference
            of any round's accuracy or loss between the two (must be 0 on CPU).

Budgets are reduced for a 2-core CPU (digits, IPC 5, 40 DM iterations, a
width-32 ConvNet-2, 40 evaluation epochs). The deployment helpers are the
tests' own (``tests/deploy.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_result
from fedistill.config import ExperimentConfig, parse_config
from fedistill.runs import to_toml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from deploy import Deployment, kill_tree, read_metrics

NUM_CLIENTS = 10
ROUNDS = 5


def experiment(output_dir: Path) -> ExperimentConfig:
    return parse_config(
        {
            "seed": 0,
            "device": "cpu",
            "output_dir": str(output_dir),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": NUM_CLIENTS, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 32, "depth": 2},
            "distill": {"method": "dm", "ipc": 5, "iterations": 40, "batch_real": 64, "compile": "off"},
            "eval": {"epochs": 40, "num_nets": 1},
            "federation": {
                "protocol": "multi-round",
                "rounds": ROUNDS,
                "min_clients": 5,
                "round_timeout_s": 300.0,
                "straggler_timeout_s": 15.0,
            },
        }
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- faults on the Deployment Engine --------------------------------------------------------------------------


def completed_rounds(output_dir: Path) -> int:
    runs = sorted(output_dir.glob("fed-*"))
    if not runs or not (runs[0] / "metrics.json").exists():
        return 0
    metrics = read_metrics(runs[0])
    if metrics["status"] not in ("running", "completed"):
        raise RuntimeError(f"run ended with status {metrics['status']}: {metrics.get('reason')}")
    return ROUNDS + 1 if metrics["status"] == "completed" else int(metrics["completed_rounds"])


def deployment_run(root: Path, faults: bool) -> dict[str, Any]:
    """One run on a fresh loopback deployment; with ``faults``, the schedule of the module docstring."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    deployment = Deployment(root)
    output_dir = root / "runs"
    events: list[str] = []
    try:
        deployment.start_link()
        for index in range(NUM_CLIENTS):
            deployment.start_node(f"node-{index}", index, NUM_CLIENTS)
        deployment.wait_for_online(NUM_CLIENTS, timeout=120)
        started = time.monotonic()
        submitted = deployment.submit(experiment(output_dir), stream=False)
        if submitted.returncode != 0:
            raise RuntimeError(submitted.stdout + submitted.stderr)
        schedule: dict[int, Callable[[], None]] = {}
        if faults:

            def kill_two() -> None:
                for name in ("node-3", "node-7"):
                    kill_tree(deployment.nodes[name])
                events.append("round 2: node-3 and node-7 killed (SIGKILL)")

            def hang_one_restart_one() -> None:
                kill_tree(deployment.nodes["node-5"], signal.SIGSTOP)
                deployment.start_node("node-3-restarted", 3, NUM_CLIENTS, wait=False)
                events.append("round 3: node-5 hung (SIGSTOP); node-3 restarted (new process, partition 3)")

            def resume_hung() -> None:
                kill_tree(deployment.nodes["node-5"], signal.SIGCONT)
                events.append("round 5: node-5 resumed (SIGCONT)")

            schedule = {2: kill_two, 3: hang_one_restart_one, 5: resume_hung}
        fired: set[int] = set()
        while (done := completed_rounds(output_dir)) <= ROUNDS:
            current = done + 1
            if current in schedule and current not in fired:
                time.sleep(3.0)  # let the round's messages reach the nodes: the faults hit a round in flight
                schedule[current]()
                fired.add(current)
                log(events[-1])
            if time.monotonic() - started > 3600:
                raise RuntimeError("deployment run took over an hour")
            time.sleep(0.5)
        metrics = read_metrics(sorted(output_dir.glob("fed-*"))[0])
        return {"metrics": metrics, "events": events, "seconds": time.monotonic() - started,
                "statuses": deployment.wait_until_finished()}
    finally:
        deployment.stop()


def bench_faults(work: Path) -> dict[str, Any]:
    log("fault-free deployment run")
    clean = deployment_run(work / "clean", faults=False)
    log(f"fault-free: accuracy {clean['metrics']['final_accuracy']:.4f} in {clean['seconds']:.0f} s")
    log("deployment run with faults")
    faulty = deployment_run(work / "faulty", faults=True)
    metrics = faulty["metrics"]
    log(f"with faults: status {metrics['status']}, accuracy {metrics['final_accuracy']:.4f} in {faulty['seconds']:.0f} s")
    survived = 3 if metrics["status"] == "completed" and len(metrics["rounds"]) == ROUNDS else 0
    per_round = [
        {key: record[key] for key in ("round", "asked", "accepted", "partitions", "missing", "accuracy", "seconds")}
        for record in metrics["rounds"]
    ]
    result = {
        "survived": survived,
        "clean_accuracy": clean["metrics"]["final_accuracy"],
        "faulty_accuracy": metrics["final_accuracy"],
        "clean_seconds": clean["seconds"],
        "faulty_seconds": faulty["seconds"],
        "events": faulty["events"],
        "rounds": per_round,
        "flwr_status": faulty["statuses"],
    }
    write_result(
        "faults-nodes-killed-survived",
        survived,
        "nodes",
        f"{NUM_CLIENTS} SuperNodes on loopback, {ROUNDS} multi-round rounds (digits, DM IPC 5); "
        + "; ".join(faulty["events"])
        + f". Run {metrics['status']} ({faulty['statuses']}); final accuracy {100 * metrics['final_accuracy']:.2f}% "
        f"vs {100 * clean['metrics']['final_accuracy']:.2f}% fault-free; per round (asked/accepted/partitions): "
        + ", ".join(f"r{r['round']} {r['asked']}/{r['accepted']}/{r['partitions']}" for r in per_round)
        + f". Wall time {faulty['seconds']:.0f} s vs {clean['seconds']:.0f} s; min_clients 5, straggler_timeout_s 15.",
    )
    return result


# --- fuzzed replies -------------------------------------------------------------------------------------------

FUZZ_CLASSES = 10
FUZZ_SHAPE = (1, 8, 8)
FUZZ_IPC = 5
FUZZ_PARTITIONS = NUM_CLIENTS
"""Digits sets as the experiment's clients make them: 10 classes of 1x8x8 images, IPC 5, 10 partitions."""


def outside_a_flower_run() -> None:
    """Messages built outside a Flower run need the run identity the ServerApp runtime would set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1


def fuzz_limits() -> Any:
    from server.validation import ReplyLimits

    return ReplyLimits(FUZZ_CLASSES, FUZZ_SHAPE, FUZZ_IPC * FUZZ_CLASSES, 2**20, FUZZ_IPC)


def valid_reply_parts(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    counts = rng.integers(0, 40, FUZZ_CLASSES)
    labels = np.concatenate([np.full(min(FUZZ_IPC, int(c)), k) for k, c in enumerate(counts)]).astype(np.int64)
    arrays = {
        "images": rng.standard_normal((len(labels), *FUZZ_SHAPE)).astype(np.float32),
        "labels": labels,
        "source_counts": counts.astype(np.int64),
    }
    metrics = {
        "num-images": len(labels),
        "num-examples": int(counts.sum()),
        "bytes": int(sum(a.nbytes for a in arrays.values())),
        "seconds": float(rng.uniform(0, 5)),
        "source-counts": [int(c) for c in counts],
        "partition-id": int(rng.integers(0, FUZZ_PARTITIONS)),
        "continued": int(rng.integers(0, 2)),
    }
    return arrays, metrics


HOSTILE_FLOATS = [np.nan, np.inf, -np.inf, 3e38, 1e5, -0.0]


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    """One of ``options`` (of any types; ``rng.choice`` would try to make them one numpy array)."""
    return options[int(rng.integers(len(options)))]
HOSTILE_INTS = [-1, 10, 2**40 + 1, -(2**63), 2**63 - 1, 5]


def mutate(rng: np.random.Generator, arrays: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any]) -> str:
    """Apply one random corruption; returns its name."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    kind = int(rng.integers(0, 16))
    keys = sorted(arrays)
    needs = {0: "images", 1: "labels", 2: "source_counts", 5: "labels"}
    if kind in needs and needs[kind] not in arrays or kind in (3, 4, 6) and not keys:
        return "none"
    if kind == 0 and arrays["images"].size:
        arrays["images"] = arrays["images"].copy()
        arrays["images"].flat[int(rng.integers(arrays["images"].size))] = pick(rng, HOSTILE_FLOATS)
    elif kind == 1 and arrays["labels"].size:
        arrays["labels"] = arrays["labels"].copy()
        arrays["labels"][int(rng.integers(arrays["labels"].size))] = pick(rng, HOSTILE_INTS)
    elif kind == 2:
        arrays["source_counts"] = arrays["source_counts"].copy()
        arrays["source_counts"][int(rng.integers(FUZZ_CLASSES))] = pick(rng, HOSTILE_INTS + [0])
    elif kind == 3:
        key = keys[int(rng.integers(len(keys)))]
        arrays[key] = arrays[key].astype(pick(rng, [np.float64, np.float16, np.int32, np.uint8, ">f4", ">i8"]))
    elif kind == 4:
        key = keys[int(rng.integers(len(keys)))]
        arrays[key] = arrays[key].reshape(-1) if arrays[key].ndim > 1 else arrays[key][: max(0, arrays[key].size - 1)]
    elif kind == 5:
        arrays["soft_labels"] = rng.uniform(-0.5, 1.5, (len(arrays["labels"]), FUZZ_CLASSES)).astype(np.float32)
    elif kind == 6:
        arrays.pop(keys[int(rng.integers(len(keys)))])
    elif kind == 7:
        extra["array-lie"] = pick(rng, ["shape", "dtype", "truncate", "huge-header", "object-header"])
    elif kind == 8:
        key = pick(rng, ["num-images", "bytes", "num-examples", "seconds", "partition-id", "continued", "source-counts"])
        metrics[key] = pick(rng, [-1, 0, 10**12, float("nan"), float("inf"), 1.5, [1, 2], [], 99])
    elif kind == 9:
        metrics.pop(pick(rng, sorted(metrics)))
    elif kind == 10:
        extra["state.ledger"] = pick(rng, [
            ConfigRecord({"blob": b"\x00" * 100}), ConfigRecord({"s": "x" * 70_000}), ArrayRecord({}),
            MetricRecord({"eps": 1.0}), ConfigRecord({"eps": 2.0, "log": [1, 2]}),
        ])
    elif kind == 11:
        extra["padding"] = ArrayRecord({"x": Array(np.zeros(pick(rng, [2**10, 2**22]), np.uint8))})
    elif kind == 12:
        extra["no-set"] = True
    elif kind == 13:
        extra["no-metrics"] = True
    elif kind == 14:
        big = int(rng.integers(FUZZ_IPC * FUZZ_CLASSES + 1, 4 * FUZZ_IPC * FUZZ_CLASSES))
        arrays["images"] = rng.standard_normal((big, *FUZZ_SHAPE)).astype(np.float32)
        arrays["labels"] = (np.arange(big) % FUZZ_CLASSES).astype(np.int64)
        arrays["source_counts"] = np.full(FUZZ_CLASSES, 10**6, np.int64)
    else:
        extra["error"] = True
    return ["value", "label", "count", "dtype", "shape", "soft", "drop", "lie", "metric", "drop-metric", "state",
            "padding", "no-set", "no-metrics", "too-many", "error"][kind]


def mutate_safely(rng: np.random.Generator, arrays: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any]) -> str:
    """``mutate``, skipping a corruption that cannot apply to what earlier ones left (e.g. NaN into an int array)."""
    try:
        return mutate(rng, arrays, metrics, extra)
    except (ValueError, TypeError, OverflowError, IndexError, KeyError):
        return "none"


def build_reply(rng: np.random.Generator, request: Any, rounds_of_mutation: int) -> tuple[Any, list[str]]:
    from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
    from flwr.common.constant import ErrorCode

    arrays, metrics = valid_reply_parts(rng)
    extra: dict[str, Any] = {}
    names = [mutate_safely(rng, arrays, metrics, extra) for _ in range(rounds_of_mutation)]
    if extra.pop("error", False):
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "fuzzed"), reply_to=request), names
    content = RecordDict()
    if not extra.pop("no-set", False):
        record = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
        if "array-lie" in extra and len(record):
            lie(record, str(extra.pop("array-lie")), rng)
        content["set"] = record
    extra.pop("array-lie", None)
    if not extra.pop("no-metrics", False):
        try:
            content["metrics"] = MetricRecord(metrics)
        except (TypeError, ValueError):
            names.append("unsendable-metric")
    for name, record in extra.items():
        content[name] = record
    return Message(content, reply_to=request), names


def lie(record: Any, how: str, rng: np.random.Generator) -> None:
    """Make one Array of ``record`` lie about itself: metadata, data length, or an .npy header that allocates."""
    from flwr.app import Array

    keys = sorted(record)
    key = keys[int(rng.integers(len(keys)))]
    real = record[key]
    if how == "shape":
        record[key] = Array(dtype=real.dtype, shape=(10**9,), stype=real.stype, data=real.data)
    elif how == "dtype":
        record[key] = Array(dtype="float64", shape=real.shape, stype=real.stype, data=real.data)
    elif how == "truncate":
        record[key] = Array(dtype=real.dtype, shape=real.shape, stype=real.stype, data=real.data[: len(real.data) // 2])
    else:
        descr = "<f4" if how == "huge-header" else "|O"
        header = repr({"descr": descr, "fortran_order": False, "shape": (2**40,)})
        header += " " * ((64 - (len(header) + 11) % 64) % 64) + "\n"
        data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 64
        record[key] = Array(dtype="float32", shape=(2**40,), stype="numpy.ndarray", data=data)


def oracle(client_set: Any, metrics: dict[str, Any]) -> list[str]:
    """Independent re-check of an accepted set (no code shared with ``server.validation``): what is wrong with it."""
    problems = []
    images = client_set.images.numpy()
    labels = client_set.labels.numpy()
    counts = np.asarray(client_set.source_counts)
    if images.dtype != np.float32 or images.shape[1:] != FUZZ_SHAPE:
        problems.append("image dtype/shape")
    if len(images) > FUZZ_IPC * FUZZ_CLASSES or labels.shape != (len(images),):
        problems.append("image count")
    if not np.all(np.isfinite(images)) or np.abs(images).max(initial=0) > 1e4:
        problems.append("image values")
    if labels.dtype != np.int64 or labels.min(initial=0) < 0 or labels.max(initial=0) >= FUZZ_CLASSES:
        problems.append("labels")
    if counts.shape != (FUZZ_CLASSES,) or counts.min() < 0 or counts.max() > 2**40:
        problems.append("counts")
    else:
        per_class = np.bincount(labels, minlength=FUZZ_CLASSES) if labels.size else np.zeros(FUZZ_CLASSES, int)
        if (per_class > FUZZ_IPC).any() or (per_class > counts).any():
            problems.append("per-class counts")
    if client_set.soft_labels is not None:
        soft = client_set.soft_labels.numpy()
        if not np.all(np.isfinite(soft)) or soft.min(initial=0) < 0 or np.abs(soft.sum(1) - 1).max(initial=0) > 1e-3:
            problems.append("soft labels")
    partition = metrics.get("partition-id")
    if not isinstance(partition, int) or not 0 <= partition < FUZZ_PARTITIONS:
        problems.append("partition")
    if "num-images" in metrics and metrics["num-images"] != len(images):
        problems.append("declared num-images")
    if "source-counts" in metrics and list(metrics["source-counts"]) != counts.tolist():
        problems.append("declared source-counts")
    if "num-examples" in metrics and metrics["num-examples"] != int(counts.sum()):
        problems.append("declared num-examples")
    seconds = metrics.get("seconds", 0.0)
    if not (isinstance(seconds, float) and math.isfinite(seconds) and seconds >= 0):
        problems.append("seconds")
    return problems


def fuzz_collector(count: int, seed: int) -> dict[str, Any]:
    """``count`` hostile replies, one per fresh collector; counts rejections and oracle failures of accepted sets."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from server.replies import ReplyCollector

    outside_a_flower_run()
    rng = np.random.default_rng(seed)
    limits = fuzz_limits()
    accepted = rejected = missing = invalid_accepted = 0
    reasons: dict[str, int] = {}
    crashes = 0
    for index in range(count):
        node = 1000 + index
        request = Message(RecordDict({"config": ConfigRecord({"task": "distill"})}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
        reply, _ = build_reply(rng, request, int(rng.integers(0, 4)))
        collector = ReplyCollector({node: None}, limits, FUZZ_PARTITIONS)
        try:
            collector.add(node, reply)
        except Exception as error:  # a crash of the server is what this benchmark looks for
            crashes += 1
            reasons[f"CRASH {type(error).__name__}"] = reasons.get(f"CRASH {type(error).__name__}", 0) + 1
            continue
        outcome = collector.close([])
        if outcome.accepted:
            accepted += 1
            problems = oracle(outcome.accepted[0].set, outcome.client_metrics[str(node)])
            if problems:
                invalid_accepted += 1
                reasons["INVALID ACCEPTED " + ",".join(problems)] = reasons.get("INVALID ACCEPTED", 0) + 1
        elif outcome.rejected:
            rejected += 1
            reason = outcome.rejected[str(node)].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        else:
            missing += 1
    return {"replies": count, "accepted": accepted, "rejected": rejected, "missing": missing,
            "invalid_accepted": invalid_accepted, "crashes": crashes,
            "top_reasons": dict(sorted(reasons.items(), key=lambda item: -item[1])[:12])}


def fuzz_protocol(work: Path, seed: int) -> dict[str, Any]:
    """A whole in-process run (10 clients, 5 rounds) where three nodes fuzz every reply; checks every accepted set."""
    from fedgrid import LocalGrid

    from server import federation

    outside_a_flower_run()
    rng = np.random.default_rng(seed)
    config = experiment(work / "fuzz-runs")
    checked: list[list[str]] = []
    real_add = federation.ReplyCollector.add

    def checking_add(self: Any, node: int, reply: Any) -> bool:
        ok = real_add(self, node, reply)
        if ok:
            checked.append(oracle(self.outcome.accepted[-1].set, self.outcome.client_metrics[str(node)]))
        return ok

    def fuzzing(reply: Any) -> Any:
        arrays = {k: v.numpy().copy() for k, v in reply.content.array_records["set"].items()}
        metrics = dict(reply.content.metric_records["metrics"])
        extra: dict[str, Any] = {}
        mutate_safely(rng, arrays, metrics, extra)
        from flwr.app import Array, ArrayRecord, MetricRecord

        reply.content.array_records["set"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        try:
            reply.content.metric_records["metrics"] = MetricRecord(metrics)
        except (TypeError, ValueError):
            pass
        for name, record in extra.items():
            if not isinstance(record, bool | str):
                reply.content[name] = record
        return reply

    federation.ReplyCollector.add = checking_add  # type: ignore[method-assign]
    try:
        grid = LocalGrid(config, NUM_CLIENTS, {101: fuzzing, 105: fuzzing, 109: fuzzing})
        run_dir = federation.run_distillation(grid, config)
    finally:
        federation.ReplyCollector.add = real_add  # type: ignore[method-assign]
    metrics = read_metrics(run_dir)
    return {
        "status": metrics["status"],
        "final_accuracy": metrics["final_accuracy"],
        "accepted": sum(r["accepted"] for r in metrics["rounds"]),
        "rejected": sum(len(r["rejected"]) for r in metrics["rounds"]),
        "invalid_accepted": sum(1 for problems in checked if problems),
        "rejections": [r["rejected"] for r in metrics["rounds"]],
    }


def bench_fuzz(work: Path, count: int, seed: int) -> dict[str, Any]:
    import logging

    logging.getLogger("fedistill.server").setLevel(logging.ERROR)  # one warning per rejected reply otherwise
    log(f"fuzzing the reply collector with {count} hostile replies")
    bulk = fuzz_collector(count, seed)
    log(f"collector: {bulk}")
    log("in-process protocol run with three fuzzing nodes")
    protocol = fuzz_protocol(work, seed)
    log(f"protocol: {protocol['status']}, accepted {protocol['accepted']}, rejected {protocol['rejected']}, "
        f"invalid accepted {protocol['invalid_accepted']}")
    invalid = bulk["invalid_accepted"] + protocol["invalid_accepted"] + bulk["crashes"]
    write_result(
        "fuzz-invalid-replies-accepted",
        invalid,
        "replies",
        f"{count} hostile replies (random corruptions of valid digits sets: values, labels, counts, dtypes, shapes, "
        f"lying .npy headers and Array metadata, metrics, kept-state records, padding, errors) through the server's "
        f"reply collector: {bulk['rejected']} rejected, {bulk['accepted']} accepted (mutations that left the set "
        f"valid), {bulk['invalid_accepted']} accepted sets failed the independent oracle, {bulk['crashes']} crashes. "
        f"Plus a 10-client, 5-round in-process run with 3 nodes fuzzing every reply: {protocol['status']}, "
        f"{protocol['rejected']} replies rejected, {protocol['accepted']} accepted, "
        f"{protocol['invalid_accepted']} invalid accepted. Value counts crashes too.",
    )
    return {"bulk": bulk, "protocol": protocol}


# --- exact resume after a kill --------------------------------------------------------------------------------


def fedistill_run(args: list[str], env: dict[str, str], kill_after_round: int | None = None,
                  output_dir: Path | None = None) -> int:
    """``python -m launch run ARGS`` in its own session; optionally SIGKILL the whole group after a round."""
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", *args], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after_round is None:
        return proc.wait()
    assert output_dir is not None
    while proc.poll() is None:
        if completed_rounds(output_dir) >= kill_after_round:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9
        time.sleep(0.2)
    raise RuntimeError("the run finished before it could be killed")


def bench_resume(work: Path, kill_after: int) -> dict[str, Any]:
    from launch.simulation import OFFLINE_ENV

    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    outcomes = {}
    for name in ("uninterrupted", "killed"):
        output_dir = work / f"resume-{name}"
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        path = output_dir / "experiment.toml"
        path.write_text(to_toml(experiment(output_dir).model_dump(mode="json", exclude_none=True)))
        log(f"fedistill run ({name})")
        if name == "uninterrupted":
            if fedistill_run([str(path)], env) != 0:
                raise RuntimeError("uninterrupted run failed")
        else:
            fedistill_run([str(path)], env, kill_after_round=kill_after, output_dir=output_dir)
            (run_dir,) = output_dir.glob("fed-*")
            log(f"killed after round {kill_after}; fedistill run --resume {run_dir}")
            if fedistill_run(["--resume", str(run_dir)], env) != 0:
                raise RuntimeError("resumed run failed")
        (run_dir,) = output_dir.glob("fed-*")
        outcomes[name] = read_metrics(run_dir)
    straight, resumed = outcomes["uninterrupted"], outcomes["killed"]
    diffs = [
        abs(a[key] - b[key])
        for a, b in zip(straight["rounds"], resumed["rounds"], strict=True)
        for key in ("accuracy", "loss")
    ]
    diff = max(diffs)
    write_result(
        "resume-metric-abs-diff",
        diff,
        "accuracy/loss (absolute)",
        f"fedistill run (Flower simulation, CPU) of a {NUM_CLIENTS}-client, {ROUNDS}-round multi-round digits run, "
        f"uninterrupted vs killed with SIGKILL after round {kill_after} was checkpointed and resumed with "
        f"fedistill run --resume: largest |difference| over every round's accuracy and loss = {diff:g}; final "
        f"accuracy {100 * straight['final_accuracy']:.4f}% vs {100 * resumed['final_accuracy']:.4f}%; "
        f"upload bytes {straight['upload_bytes']} vs {resumed['upload_bytes']}.",
    )
    log(f"resume: max |diff| {diff:g}")
    return {"diff": diff, "final": [straight["final_accuracy"], resumed["final_accuracy"]]}


PARTS = ("faults", "fuzz", "resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--work", default="runs/bench-faults", help="scratch directory (deleted per part)")
    parser.add_argument("--fuzz-replies", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-after", type=int, default=2, help="resume: SIGKILL once this round is checkpointed")
    args = parser.parse_args()
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"parts: unknown {unknown[0]!r}; allowed: {', '.join(PARTS)}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    summary = {}
    args.parts = args.parts or list(PARTS)
    if "fuzz" in args.parts:
        summary["fuzz"] = bench_fuzz(work, args.fuzz_replies, args.seed)
    if "resume" in args.parts:
        summary["resume"] = bench_resume(work, args.kill_after)
    if "faults" in args.parts:
        summary["faults"] = bench_faults(work)
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"summary in {work / 'summary.json'}")


if __name__ == "__main__":
    main()
