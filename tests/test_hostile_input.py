"""Hostile input: replies and configs built to break the server are refused, never crash it, never get accepted.

Property-based (hypothesis): random and adversarial Flower messages go
through the server's reply collector exactly as a round receives them, random
``.npy`` payloads (lying headers, truncated or padded data, object dtypes)
through the array reader, and random configs through the config validator and
the memory check. Whatever comes in, the server either accepts a set that
satisfies every invariant it relies on, or records a one-line reason.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np
import pytest
from fedgrid import fake_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedistill.budget import check_memory, estimate_memory
from fedistill.config import ConfigError, parse_config
from fedistill.data import dataset_info
from server.replies import ReplyCollector
from server.validation import IMAGE_ABS_LIMIT, InvalidReply, ReplyLimits, array_to_numpy

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 2, 2)
IPC = 2
NUM_PARTITIONS = 4
LIMITS = ReplyLimits(NUM_CLASSES, IMAGE_SHAPE, max_images=IPC * NUM_CLASSES, max_bytes=4096, max_per_class=IPC)
NODE = 7


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_task_identity(monkeypatch)


def npy(header: dict[str, Any] | str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy file with the given header (a dict, or raw header text) and data, whatever they claim."""
    text = header if isinstance(header, str) else repr(header)
    text = text + " " * ((64 - (len(text) + 11) % 64) % 64) + "\n"
    length = len(text).to_bytes(2 if version == (1, 0) else 4, "little")
    return b"\x93NUMPY" + bytes(version) + length + text.encode("latin1") + data


def raw_array(payload: bytes, dtype: str = "float32", shape: tuple[int, ...] = (0,)) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=payload)


# --- the .npy reader --------------------------------------------------------------------------------------


def test_a_tiny_payload_declaring_a_huge_array_is_refused_before_anything_is_allocated() -> None:
    huge = npy({"descr": "<f4", "fortran_order": False, "shape": (2**40,)}, b"\x00" * 16)
    with pytest.raises(InvalidReply, match=r"^images: declares 4398046511104 bytes, over the limit of 4096"):
        array_to_numpy(raw_array(huge, shape=(2**40,)), "images", LIMITS.max_bytes)


@pytest.mark.parametrize(
    ("payload", "declared", "message"),
    [
        (npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x00" * 8), ("object", (1,)), "not a plain number"),
        (npy({"descr": ">f4", "fortran_order": False, "shape": (1,)}, b"\x00" * 4), (">f4", (1,)), "big-endian"),
        (npy({"descr": "<c8", "fortran_order": False, "shape": (1,)}, b"\x00" * 8), ("complex64", (1,)), "not a plain"),
        (npy({"descr": "<f4", "fortran_order": False, "shape": (4,)}, b"\x00" * 8), ("float32", (4,)), "16 bytes of data but 8"),
        (npy({"descr": "<f4", "fortran_order": False, "shape": (1,)}, b"\x00" * 12), ("float32", (1,)), "4 bytes of data but 12"),
        (npy({"descr": "<f4", "fortran_order": False, "shape": (2,)}, b"\x00" * 8), ("float32", (3,)), "holds float32[2]"),
        (npy("__import__('os').system('true')", b""), ("float32", (0,)), "not a readable .npy"),
        (b"\x93NUMPY\x09\x00", ("float32", (0,)), ".npy format version (9, 0) is not accepted"),
        (b"not numpy at all", ("float32", (0,)), "not a readable .npy"),
    ],
)
def test_lying_or_unsafe_npy_payloads_are_refused(payload: bytes, declared: tuple[str, tuple[int, ...]], message: str) -> None:
    with pytest.raises(InvalidReply, match=re.escape(message)):
        array_to_numpy(raw_array(payload, *declared), "images", LIMITS.max_bytes)


@st.composite
def npy_payloads(draw: st.DrawFn) -> tuple[bytes, str, tuple[int, ...]]:
    """A real .npy array, or one whose header, data, version or declared metadata lies."""
    dtype = draw(st.sampled_from(["<f4", "<i8", "<f8", "|u1", "|b1", ">f4", "|O", "<U2", "<c8", "<M8[s]"]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    header_shape = draw(st.one_of(st.just(shape), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=2**20)))
    itemsize = np.dtype(dtype).itemsize if dtype != "|O" else 8
    size = math.prod(shape) * itemsize + draw(st.sampled_from([0, 0, 0, -1, 1, 7]))
    data = draw(st.binary(min_size=max(0, min(size, 2048)), max_size=max(0, min(size, 2048))))
    header: dict[str, Any] = {"descr": dtype, "fortran_order": draw(st.booleans()), "shape": header_shape}
    payload = npy(header, data, draw(st.sampled_from([(1, 0), (2, 0), (3, 0)])))
    if draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, len(payload)))
        payload = payload[:cut] + draw(st.binary(max_size=16))
    declared_dtype = draw(st.sampled_from([str(np.dtype(dtype)) if dtype != "|O" else "object", "float32", "int64"]))
    declared_shape = draw(st.one_of(st.just(tuple(header_shape)), st.just(shape)))
    return payload, declared_dtype, declared_shape


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=npy_payloads(), limit=st.sampled_from([0, 64, 4096]))
def test_random_npy_payloads_are_read_exactly_or_refused(case: tuple[bytes, str, tuple[int, ...]], limit: int) -> None:
    payload, dtype, shape = case
    try:
        value = array_to_numpy(raw_array(payload, dtype, shape), "images", limit)
    except InvalidReply as error:
        assert str(error).startswith("images: ") and "\n" not in str(error)
        return
    assert value.nbytes <= limit and value.dtype.kind in "biuf" and value.dtype.byteorder != ">"
    assert tuple(value.shape) == tuple(shape) and str(value.dtype) == dtype
    expected = np.load(io.BytesIO(payload), allow_pickle=False)
    assert np.array_equal(value, expected, equal_nan=value.dtype.kind == "f")


# --- whole replies through the round's collector ----------------------------------------------------------


def request(node: int = NODE) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"task": "distill"})}), dst_node_id=node, message_type=MessageType.TRAIN)


def valid_set() -> dict[str, np.ndarray]:
    return {
        "images": np.linspace(-2, 2, 4 * 4, dtype=np.float32).reshape(4, *IMAGE_SHAPE),
        "labels": np.array([0, 0, 2, 2], dtype=np.int64),
        "source_counts": np.array([5, 0, 3], dtype=np.int64),
    }


def valid_metrics(arrays: dict[str, np.ndarray], partition: int = 1) -> dict[str, Any]:
    counts = arrays["source_counts"]
    return {
        "num-images": int(arrays["images"].shape[0]),
        "num-examples": int(counts.sum()),
        "bytes": int(sum(value.nbytes for value in arrays.values())),
        "seconds": 0.5,
        "source-counts": [int(c) for c in counts],
        "partition-id": partition,
        "continued": 0,
    }


def reply_with(content: RecordDict, node: int = NODE) -> Message:
    return Message(content, reply_to=request(node))


def collect_one(reply: Message, node: int = NODE, expected_partition: int | None = None) -> ReplyCollector:
    collector = ReplyCollector({node: expected_partition}, LIMITS, NUM_PARTITIONS)
    collector.add(node, reply)
    return collector


def assert_sound(collector: ReplyCollector) -> None:
    """Every invariant the server relies on after accepting a set."""
    for client in collector.outcome.accepted:
        syn = client.set
        images, labels, counts = syn.images.numpy(), syn.labels.numpy(), syn.source_counts
        assert images.dtype == np.float32 and images.shape[1:] == IMAGE_SHAPE and len(syn) <= LIMITS.max_images
        assert np.isfinite(images).all() and (np.abs(images) <= IMAGE_ABS_LIMIT).all()
        assert ((labels >= 0) & (labels < NUM_CLASSES)).all() and counts.shape == (NUM_CLASSES,)
        per_class = syn.images_per_class()
        assert (per_class <= counts).all() and (per_class <= IPC).all() and (counts >= 0).all()
        assert images.flags.writeable  # a copy the sender cannot change
    for node, metrics in collector.outcome.client_metrics.items():
        assert 0 <= metrics["partition-id"] < NUM_PARTITIONS
        assert math.isfinite(metrics.get("seconds", 0.0)) and metrics.get("seconds", 0.0) >= 0
    partitions = list(collector.outcome.partitions.values())
    assert len(partitions) == len(set(partitions))


def test_a_valid_reply_is_accepted_with_its_partition() -> None:
    arrays = valid_set()
    content = RecordDict({
        "set": ArrayRecord({key: Array(value) for key, value in arrays.items()}),
        "metrics": MetricRecord(valid_metrics(arrays)),
        "state.ledger": ConfigRecord({"epsilon": 1.5}),
    })
    collector = collect_one(reply_with(content))
    assert [c.client_id for c in collector.outcome.accepted] == ["partition-0001"] and not collector.outcome.rejected
    assert "init_rows" not in collector.outcome.accepted[0].set.provenance
    assert collector.outcome.state[1] == {"ledger": {"kind": "config", "values": {"epsilon": 1.5}}}
    assert_sound(collector)


def test_the_rows_a_set_started_from_are_kept_with_it() -> None:
    arrays = valid_set()
    content = RecordDict({
        "set": ArrayRecord({key: Array(value) for key, value in arrays.items()}),
        "metrics": MetricRecord({**valid_metrics(arrays), "init-rows": [7, 3, 11]}),
    })
    (client,) = collect_one(reply_with(content)).outcome.accepted
    assert client.set.provenance["init_rows"] == [7, 3, 11]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m, a, c: m.update({"partition-id": NUM_PARTITIONS}), "partition-id: must be an integer in [0, 4)"),
        (lambda m, a, c: m.pop("partition-id"), "partition-id: must be an integer"),
        (lambda m, a, c: m.update({"seconds": -1.0}), "seconds: must be a finite number >= 0"),
        (lambda m, a, c: m.update({"seconds": float("nan")}), "seconds: must be a finite number"),
        (lambda m, a, c: m.update({"source-counts": [5, 1, 3]}), "source-counts: declared"),
        (lambda m, a, c: m.update({"num-examples": 99}), "num-examples: declared 99"),
        (lambda m, a, c: m.update({"continued": 5}), "continued: must be 0 or 1"),
        (lambda m, a, c: m.update({"init-rows": [3, -1]}), "init-rows: must be a list of integers >= 0"),
        (lambda m, a, c: m.update({"init-rows": list(range(50))}), "init-rows: 50 rows for a set of"),
        (lambda m, a, c: a.update({"labels": np.array([0, 0, 0, 2])}), "labels: class 0 has 3 images, more than the 2"),
        (lambda m, a, c: c.__setitem__("state.x", ConfigRecord({"b": b"\x00" * 10})), "state.x.b: client state holds"),
        (lambda m, a, c: c.__setitem__("state.x", ArrayRecord({})), "state.x: client state must be"),
        (lambda m, a, c: c.__setitem__("state.x", ConfigRecord({"s": "x" * 70_000})), "state.x: 70001 bytes"),
        (lambda m, a, c: c.__setitem__("junk", ArrayRecord({"x": Array(np.zeros(2**21, np.uint8))})), "reply: "),
    ],
)
def test_malformed_replies_are_rejected_with_a_reason(edit: Any, reason: str) -> None:
    arrays = valid_set()
    metrics = valid_metrics(arrays)
    extra: dict[str, Any] = {}
    edit(metrics, arrays, extra)
    content = RecordDict({
        "set": ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()}),
        "metrics": MetricRecord(metrics),
        **extra,
    })
    collector = collect_one(reply_with(content))
    assert not collector.outcome.accepted
    assert collector.outcome.rejected[str(NODE)].startswith(reason), collector.outcome.rejected


def test_errors_impostors_and_repeats_are_not_accepted() -> None:
    arrays = valid_set()
    good = RecordDict({"set": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(valid_metrics(arrays))})
    collector = ReplyCollector({NODE: 1, 8: None, 9: None}, LIMITS, NUM_PARTITIONS)
    assert not collector.add(8, reply_with(good, node=99))  # signed by a node that was not asked this message
    assert collector.add(NODE, reply_with(good))
    assert not collector.add(NODE, reply_with(good))  # a repeat
    assert not collector.add(9, reply_with(good, node=9))  # partition 1 already answered
    gone = Message(Error(ErrorCode.NODE_UNAVAILABLE, "no heartbeat"), reply_to=request(10))
    assert not collector.add(10, gone)  # never asked
    outcome = collector.close([])
    assert outcome.rejected["8"].startswith("reply signed by node 99")
    assert outcome.rejected["9"].startswith("partition-id: partition 1 already answered by node 7")
    claimed = ReplyCollector({NODE: 2}, LIMITS, NUM_PARTITIONS)
    assert not claimed.add(NODE, reply_with(good))  # known to hold partition 2, claims 1
    assert claimed.outcome.rejected[str(NODE)].startswith("partition-id: node holds partition 2 but claims 1")


ARRAY_VALUES = st.one_of(
    hnp.arrays(st.sampled_from([np.float32, np.int64, np.float64, np.int32, np.uint8, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)),
    st.just(np.full((4, *IMAGE_SHAPE), np.nan, np.float32)),
    st.just(np.full((4, *IMAGE_SHAPE), 3e38, np.float32)),
    st.just(np.array([0, 1, 2, 3], np.int64)),
    st.just(np.array([-1, 0, 0, 0], np.int64)),
    st.just(np.array([2**62, 0, 0], np.int64)),
)
METRIC_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 10), max_size=4), st.lists(st.floats(), max_size=3),
)
CONFIG_VALUES = st.one_of(st.text(max_size=8), st.binary(max_size=8), st.booleans(), st.integers(), st.floats(),
                          st.lists(st.integers(), max_size=3))


@st.composite
def hostile_replies(draw: st.DrawFn) -> Message:
    """A reply that starts valid and is then corrupted in its records, arrays, metrics or size; or an error reply."""
    if draw(st.integers(0, 15)) == 0:
        code = draw(st.sampled_from([ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.NODE_UNAVAILABLE, ErrorCode.UNKNOWN]))
        return Message(Error(code, draw(st.text(max_size=20))), reply_to=request())
    arrays: dict[str, Any] = valid_set()
    metrics: dict[str, Any] = valid_metrics(arrays, draw(st.integers(-1, NUM_PARTITIONS)))
    for _ in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from(["array", "drop-array", "metric", "drop-metric"]))
        if target == "array":
            arrays[draw(st.sampled_from(["images", "labels", "source_counts", "soft_labels", "extra"]))] = draw(ARRAY_VALUES)
        elif target == "drop-array":
            arrays.pop(draw(st.sampled_from(sorted(arrays))), None)
        elif target == "metric":
            key = draw(st.sampled_from(["num-images", "num-examples", "bytes", "seconds", "source-counts",
                                        "partition-id", "continued", "epsilon"]))
            metrics[key] = draw(METRIC_VALUES)
        else:
            metrics.pop(draw(st.sampled_from(sorted(metrics))), None)
    content = RecordDict()
    if draw(st.integers(0, 9)) > 0:
        content["set"] = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
    if draw(st.integers(0, 9)) > 0:
        content["metrics"] = MetricRecord(metrics)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["state.a", "state.b", "other", "metrics2"]))
        if draw(st.booleans()):
            content[name] = ConfigRecord(draw(st.dictionaries(st.text(min_size=1, max_size=4), CONFIG_VALUES, max_size=3)))
        else:
            content[name] = MetricRecord({"x": draw(st.floats(allow_nan=True))})
    if "set" in content and len(content["set"]) and draw(st.integers(0, 4)) == 0:
        record = content["set"]
        key = draw(st.sampled_from(sorted(record)))
        real = record[key]
        lie = draw(st.sampled_from(["shape", "dtype", "data"]))
        if lie == "shape":
            record[key] = Array(dtype=real.dtype, shape=(draw(st.integers(0, 2**40)),), stype=real.stype, data=real.data)
        elif lie == "dtype":
            record[key] = Array(dtype="float64", shape=real.shape, stype=real.stype, data=real.data)
        else:
            record[key] = Array(dtype=real.dtype, shape=real.shape, stype=real.stype, data=real.data[: len(real.data) // 2])
    return reply_with(content)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(reply=hostile_replies())
def test_random_hostile_replies_never_crash_the_collector_nor_get_an_invalid_set_accepted(reply: Message) -> None:
    collector = collect_one(reply)
    outcome = collector.close([])
    assert len(outcome.accepted) + len(outcome.rejected) + len(outcome.missing) == 1
    for reason in outcome.rejected.values():
        assert reason and "\n" not in reason
    assert_sound(collector)


# --- configs ------------------------------------------------------------------------------------------------

CONFIG_KEYS = {
    "distill": {"ipc": st.one_of(st.integers(-5, 20_000), st.floats(), st.text(max_size=3)),
                "iterations": st.integers(-2, 5), "batch_real": st.integers(-1, 10**6)},
    "partition": {"num_clients": st.one_of(st.integers(-1, 20_000), st.none()), "alpha": st.floats()},
    "model": {"width": st.integers(-1, 10_000), "depth": st.integers(-1, 10), "arch": st.sampled_from(["convnet", "mlp", "vit"])},
    "federation": {"protocol": st.sampled_from(["one-shot", "multi-round", "fedavg", "gossip"]),
                   "rounds": st.integers(-1, 5), "quorum": st.floats(), "min_clients": st.integers(-1, 50),
                   "round_timeout_s": st.floats(), "straggler_timeout_s": st.floats(), "max_reply_mb": st.floats()},
    "eval": {"batch_size": st.integers(-1, 10**6)},
    "data": {"name": st.sampled_from(["digits", "cifar10", "fashion-mnist", "imagenet"])},
}


@st.composite
def hostile_configs(draw: st.DrawFn) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for section, keys in CONFIG_KEYS.items():
        chosen = draw(st.lists(st.sampled_from(sorted(keys)), unique=True, max_size=len(keys)))
        if chosen:
            values[section] = {key: draw(keys[key]) for key in chosen}
    if draw(st.integers(0, 9)) == 0:
        values[draw(st.sampled_from(["distill", "typo"]))] = {"ipcc": 3}
    return values


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=hostile_configs(), available=st.sampled_from([2**30, 64 * 2**30, 2**40]))
def test_random_configs_are_validated_or_refused_with_one_line_naming_the_key(values: dict[str, Any], available: int) -> None:
    try:
        config = parse_config(values)
        info = dataset_info(config.data.name)
        estimate = check_memory(config, info, clients_here=2, available=available)
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message
        assert message.split(":")[0].strip() != ""
        return
    assert estimate.server_bytes + 2 * estimate.client_bytes <= available
    assert estimate_memory(config, info) == estimate


def test_a_config_that_cannot_fit_is_refused_with_the_estimate() -> None:
    config = parse_config({"data": {"name": "cifar10"}, "distill": {"ipc": 500}, "partition": {"num_clients": 1000},
                           "federation": {"max_reply_mb": 1024}})
    with pytest.raises(ConfigError, match=r"^memory: this run needs about 230\.8 GiB .*16\.0 GiB.*1000 clients x 61,680,080 bytes"):
        check_memory(config, dataset_info("cifar10"), available=16 * 2**30)
    too_deep = parse_config({"data": {"name": "digits"}, "model": {"depth": 6}})
    with pytest.raises(ConfigError, match=r"^model: a convnet of depth 6 cannot run on 1x8x8 images"):
        check_memory(too_deep, dataset_info("digits"), available=2**40)
    too_big_a_set = parse_config({"data": {"name": "cifar10"}, "distill": {"ipc": 10_000}})
    with pytest.raises(ConfigError, match=r"^distill.ipc: one client's set would be 1\.1 GiB .*max_reply_mb = 256"):
        check_memory(too_big_a_set, dataset_info("cifar10"), available=2**50)
