"""A client's reply is checked before the server uses it: good sets pass, every malformed one is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.validation import (
    IMAGE_ABS_LIMIT,
    SOFT_LABEL_TOLERANCE,
    InvalidReply,
    ReplyLimits,
    validate_set_arrays,
)

LIMITS = ReplyLimits(num_classes=3, image_shape=(1, 4, 4), max_images=8, max_bytes=10_000)


def valid_arrays(soft: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.standard_normal((4, 1, 4, 4)).astype(np.float32),
        "labels": np.array([0, 0, 2, 2], dtype=np.int64),
        "source_counts": np.array([10, 0, 2], dtype=np.int64),
    }
    if soft:
        logits = rng.standard_normal((4, 3))
        arrays["soft_labels"] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    return arrays


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


@pytest.mark.parametrize("soft", [False, True])
def test_valid_set_passes_and_round_trips(soft: bool) -> None:
    arrays = valid_arrays(soft)
    declared = {"num-images": 4, "bytes": payload_bytes(arrays), "epsilon": 3.5}
    result = validate_set_arrays(arrays, LIMITS, declared)
    assert len(result) == 4 and result.num_classes == 3
    assert result.images_per_class().tolist() == [2, 0, 2]
    again = result.to_arrays()
    assert set(again) == set(arrays)
    for key, value in arrays.items():
        assert again[key].dtype == value.dtype and np.array_equal(again[key], value)
    assert result.nbytes() == payload_bytes(arrays)


def test_result_owns_its_arrays() -> None:
    arrays = valid_arrays(soft=True)
    result = validate_set_arrays(arrays, LIMITS)
    before = result.to_arrays()
    for value in arrays.values():
        value[...] = 0
    for key, value in result.to_arrays().items():
        assert np.array_equal(value, before[key]), key


def test_empty_set_is_accepted() -> None:
    arrays = {
        "images": np.zeros((0, 1, 4, 4), dtype=np.float32),
        "labels": np.zeros(0, dtype=np.int64),
        "source_counts": np.zeros(3, dtype=np.int64),
    }
    assert len(validate_set_arrays(arrays, LIMITS)) == 0


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(arrays: dict[str, Any]) -> None:
        arrays[key] = value

    return mutate


def _poke(key: str, index: tuple[int, ...], value: float) -> Callable[[dict[str, Any]], None]:
    def mutate(arrays: dict[str, Any]) -> None:
        arrays[key][index] = value

    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda arrays: arrays.pop(key)


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "missing images": (_drop("images"), "images: missing"),
    "missing labels": (_drop("labels"), "labels: missing"),
    "missing source_counts": (_drop("source_counts"), "source_counts: missing"),
    "unknown key": (_set("weights", np.zeros(4, dtype=np.float32)), "'weights': unknown key"),
    "images float64": (_set("images", np.zeros((4, 1, 4, 4))), "images: expected dtype float32"),
    "images big-endian": (_set("images", np.zeros((4, 1, 4, 4), dtype=">f4")), "images: expected dtype"),
    "labels int32": (_set("labels", np.zeros(4, dtype=np.int32)), "labels: expected dtype int64"),
    "source_counts float": (_set("source_counts", np.ones(3, dtype=np.float32)), "source_counts: expected dtype"),
    "soft_labels float64": (_set("soft_labels", np.full((4, 3), 1 / 3)), "soft_labels: expected dtype"),
    "images a list": (_set("images", [[0.0]]), "images: expected a plain numpy array"),
    "labels masked": (_set("labels", np.ma.masked_array(np.zeros(4, dtype=np.int64))), "labels: expected a plain"),
    "images 3-d": (_set("images", np.zeros((4, 4, 4), dtype=np.float32)), "images: expected shape"),
    "images wrong size": (_set("images", np.zeros((4, 1, 5, 4), dtype=np.float32)), "images: expected shape"),
    "labels too few": (_set("labels", np.zeros(3, dtype=np.int64)), "labels: expected shape"),
    "labels 2-d": (_set("labels", np.zeros((4, 1), dtype=np.int64)), "labels: expected shape"),
    "source_counts too few": (_set("source_counts", np.ones(2, dtype=np.int64)), "source_counts: expected shape"),
    "soft_labels wrong width": (_set("soft_labels", np.full((4, 2), 0.5, np.float32)), "soft_labels: expected shape"),
    "images NaN": (_poke("images", (1, 0, 2, 2), np.nan), "images: contains NaN"),
    "images inf": (_poke("images", (0, 0, 0, 0), -np.inf), "images: contains NaN or infinite"),
    "images huge": (_poke("images", (3, 0, 1, 1), 3e38), "images: values beyond"),
    "label negative": (_poke("labels", (0,), -1), "labels: values outside"),
    "label too large": (_poke("labels", (3,), 3), "labels: values outside"),
    "negative source count": (_poke("source_counts", (1,), -5), "source_counts: negative"),
    "absurd source count": (_poke("source_counts", (0,), 2**62), "source_counts: count above"),
    "images without source": (_poke("source_counts", (2,), 0), "source_counts: class 2 has images but no source"),
    "more images than source": (_poke("source_counts", (2,), 1), "source_counts: class 2 has 2 images from only 1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_reply_is_refused_naming_the_key(case: str) -> None:
    mutate, message = MALFORMED[case]
    arrays: dict[str, Any] = valid_arrays(soft=True)
    mutate(arrays)
    with pytest.raises(InvalidReply, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        validate_set_arrays(arrays, LIMITS)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([0.5, 0.5, 0.5], "soft_labels: a row does not sum to 1"),
        ([0.5, 0.4, 0.0], "soft_labels: a row does not sum to 1"),
        ([1.5, -0.5, 0.0], "soft_labels: negative probability"),
        ([np.nan, 0.5, 0.5], "soft_labels: contains NaN"),
        ([np.inf, 0.0, 0.0], "soft_labels: contains NaN"),
        ([3e38, 3e38, 3e38], "soft_labels: a row does not sum to 1"),
    ],
)
def test_bad_soft_labels_are_refused(row: list[float], message: str) -> None:
    arrays = valid_arrays(soft=True)
    arrays["soft_labels"][2] = np.array(row, dtype=np.float32)
    with pytest.raises(InvalidReply, match="^" + message):
        validate_set_arrays(arrays, LIMITS)


def test_soft_labels_within_tolerance_pass() -> None:
    arrays = valid_arrays(soft=True)
    arrays["soft_labels"][1] = np.array([0.5, 0.5 + SOFT_LABEL_TOLERANCE / 2, 0.0], dtype=np.float32)
    validate_set_arrays(arrays, LIMITS)


def test_oversized_reply_is_refused_before_values() -> None:
    arrays = valid_arrays()
    arrays["images"][0, 0, 0, 0] = np.nan
    small = ReplyLimits(3, (1, 4, 4), max_images=8, max_bytes=payload_bytes(arrays) - 1)
    with pytest.raises(InvalidReply, match=r"^reply: \d+ bytes exceeds"):
        validate_set_arrays(arrays, small)
    validate_set_arrays(valid_arrays(), ReplyLimits(3, (1, 4, 4), 8, payload_bytes(valid_arrays())))


def test_too_many_images_is_refused() -> None:
    with pytest.raises(InvalidReply, match="^images: 4 images exceeds the limit of 3"):
        validate_set_arrays(valid_arrays(), ReplyLimits(3, (1, 4, 4), max_images=3, max_bytes=10_000))


def test_checks_run_in_order_structure_before_values() -> None:
    arrays: dict[str, Any] = valid_arrays()
    arrays["images"][0, 0, 0, 0] = np.nan
    arrays["labels"] = np.zeros(4, dtype=np.int32)
    with pytest.raises(InvalidReply, match="^labels: expected dtype"):
        validate_set_arrays(arrays, LIMITS)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"num-images": 5}, "num-images: declared 5 but the arrays hold 4"),
        ({"bytes": 1}, "bytes: declared 1 but the arrays hold"),
        ({"num-images": 4.5}, "num-images: declared 4.5"),
        ({"num-images": float("nan")}, "num-images: declared nan"),
        ({"num-images": "4"}, "num-images: declared value must be a number"),
        ({"num-images": True}, "num-images: declared value must be a number"),
        ({"bytes": np.array([1, 2])}, "bytes: declared value must be a number"),
    ],
)
def test_declared_metrics_must_match(declared: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidReply, match="^" + message):
        validate_set_arrays(valid_arrays(), LIMITS, declared)


def test_declared_numpy_numbers_are_accepted() -> None:
    arrays = valid_arrays()
    validate_set_arrays(arrays, LIMITS, {"num-images": np.int64(4), "bytes": float(payload_bytes(arrays))})


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(InvalidReply, match="^reply: expected a mapping"):
        validate_set_arrays([np.zeros(3)], LIMITS)  # type: ignore[arg-type]
    with pytest.raises(InvalidReply, match="^declared metrics: expected a mapping"):
        validate_set_arrays(valid_arrays(), LIMITS, [4])  # type: ignore[arg-type]


def test_bad_limits_are_a_server_error_not_a_reply_error() -> None:
    with pytest.raises(ValueError, match="image_shape") as info:
        ReplyLimits(3, (4, 4), 8, 100)  # type: ignore[arg-type]
    assert not isinstance(info.value, InvalidReply)


# --- property: random, adversarial replies either validate to a sound set or raise InvalidReply ---

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 2, 2)

DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.int64),
    np.dtype(np.float64),
    np.dtype(np.float16),
    np.dtype(np.int32),
    np.dtype(np.uint64),
    np.dtype(np.uint8),
    np.dtype(np.bool_),
    np.dtype(np.complex64),
    np.dtype(">f4"),
    np.dtype(">i8"),
    np.dtype("M8[s]"),
    np.dtype("U2"),
    np.dtype([("a", np.float32)]),
]
REPLY_KEYS = ["images", "labels", "source_counts", "soft_labels"]
ADVERSARIAL_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([-0.0, IMAGE_ABS_LIMIT, float(np.nextafter(np.float32(IMAGE_ABS_LIMIT), np.float32(np.inf)))]),
)
PROBABILITIES = st.floats(0, 1, width=32)
ADVERSARIAL_INTS = st.sampled_from([0, -1, 3, -(2**63), 2**63 - 1, 2**40, 2**40 + 1])


def values(
    draw: st.DrawFn,
    dtype: Any,
    shape: tuple[int, ...],
    typical: st.SearchStrategy[Any],
    hostile: st.SearchStrategy[Any],
) -> np.ndarray:
    """An array of plausible values, or (one time in three) one with hostile values mixed in.

    Deciding per array rather than per element keeps most arrays clean, so the
    later checks get reached too.
    """
    elements = st.one_of(typical, hostile) if draw(st.integers(0, 2)) == 0 else typical
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def random_array(draw: st.DrawFn) -> Any:
    """A small array of any dtype and shape, a masked array, or something that is not an array at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from([None, 3, "images", [1.0, 2.0], {"a": 1}, np.float32(1.0)]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))
    dtype = draw(st.sampled_from(DTYPES))
    if kind == 1:
        return np.ma.masked_array(np.zeros(shape, dtype=np.float32), mask=True)
    return draw(hnp.arrays(dtype, shape))


@st.composite
def near_valid(draw: st.DrawFn) -> dict[Any, Any]:
    """A well-formed reply with random (often adversarial) values, then a few random corruptions."""
    n = draw(st.integers(0, 6))
    arrays: dict[Any, Any] = {
        "images": values(draw, np.float32, (n, *IMAGE_SHAPE), st.floats(-3, 3, width=32), ADVERSARIAL_FLOATS),
        "labels": values(draw, np.int64, (n,), st.integers(0, NUM_CLASSES - 1), ADVERSARIAL_INTS),
        "source_counts": values(draw, np.int64, (NUM_CLASSES,), st.integers(3, 8), ADVERSARIAL_INTS),
    }
    if draw(st.booleans()):
        arrays["soft_labels"] = draw(
            st.one_of(
                hnp.arrays(np.float32, (n, NUM_CLASSES), elements=st.one_of(PROBABILITIES, ADVERSARIAL_FLOATS)),
                st.just(np.full((n, NUM_CLASSES), 1 / NUM_CLASSES, dtype=np.float32)),
                st.just(np.eye(NUM_CLASSES, dtype=np.float32)[np.arange(n) % NUM_CLASSES]),
            )
        )
    for _ in range(draw(st.sampled_from([0, 1, 2]))):
        action = draw(st.integers(0, 2))
        key = draw(st.sampled_from(["images", "labels", "source_counts", "soft_labels", "extra", 7]))
        if action == 0:
            arrays.pop(key, None)
        else:
            arrays[key] = draw(random_array())
    return arrays


DECLARED = st.one_of(
    st.none(),
    st.just({"epsilon": 1.0}),
    st.dictionaries(
        st.sampled_from(["num-images", "bytes", "epsilon"]),
        st.one_of(st.integers(-2, 10_000), st.floats(), st.text(max_size=2), st.booleans(), st.none()),
    ),
    st.sampled_from([[1], "num-images=3"]),
)


def assert_sound(result: Any, arrays: dict[Any, Any], limits: ReplyLimits) -> None:
    """Every invariant the server relies on after validation."""
    images = result.images.numpy()
    labels = result.labels.numpy()
    counts = result.source_counts
    n = len(result)
    assert images.dtype == np.float32 and images.shape == (n, *limits.image_shape)
    assert labels.dtype == np.int64 and counts.dtype == np.int64 and counts.shape == (limits.num_classes,)
    assert n <= limits.max_images and result.nbytes() <= limits.max_bytes
    assert np.isfinite(images).all() and (np.abs(images) <= IMAGE_ABS_LIMIT).all()
    assert ((labels >= 0) & (labels < limits.num_classes)).all()
    assert (counts >= 0).all()
    assert (result.images_per_class() <= counts).all()
    if result.soft_labels is not None:
        soft = result.soft_labels.numpy()
        assert soft.dtype == np.float32 and np.isfinite(soft).all() and (soft >= 0).all()
        assert np.allclose(soft.sum(1), 1.0, atol=SOFT_LABEL_TOLERANCE, rtol=0)
    for key, value in result.to_arrays().items():
        assert not np.shares_memory(value, arrays[key]), key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays=st.one_of(
        near_valid(), st.dictionaries(st.sampled_from([*REPLY_KEYS, "x"]), random_array())
    ),
    declared=DECLARED,
    max_images=st.sampled_from([8, 3, 0]),
    max_bytes=st.sampled_from([10_000, 64, 0]),
)
def test_random_replies_validate_soundly_or_raise_invalid_reply(
    arrays: dict[Any, Any], declared: Any, max_images: int, max_bytes: int
) -> None:
    limits = ReplyLimits(NUM_CLASSES, IMAGE_SHAPE, max_images, max_bytes)
    try:
        result = validate_set_arrays(arrays, limits, declared)
    except InvalidReply as error:
        message = str(error)
        assert message and "\n" not in message
        return
    assert_sound(result, arrays, limits)
