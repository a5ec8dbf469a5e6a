"""Aggregation rules combine client sets as documented; the registry refuses unknown names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedistill.aggregation import (
    AggregateResult,
    AggregationContext,
    ClientSet,
    available_aggregators,
    get_aggregator,
    merge_rounds,
    register_aggregator,
)
from fedistill.synthetic import SyntheticSet
from fedistill.teacher import soft_label
from server.validation import InvalidReply

NUM_CLASSES = 3
CPU = torch.device("cpu")


def client(client_id: str, labels: list[int], source: list[int], soft: bool = False, fill: float = 0.0) -> ClientSet:
    """A client's set whose images are all ``fill`` plus their index, so the tests can tell them apart."""
    n = len(labels)
    images = torch.full((n, 1, 2, 2), fill) + torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    soft_labels = torch.softmax(torch.randn(n, NUM_CLASSES, generator=torch.Generator().manual_seed(1)), 1)
    return ClientSet(
        client_id,
        SyntheticSet(
            images,
            torch.tensor(labels, dtype=torch.int64),
            NUM_CLASSES,
            np.array(source, dtype=np.int64),
            soft_labels if soft else None,
            {"method": "dm"},
        ),
    )


def context(**kwargs: object) -> AggregationContext:
    return AggregationContext(num_classes=NUM_CLASSES, device=CPU, seed=0, **kwargs)  # type: ignore[arg-type]


def test_registry_lists_the_rules_and_refuses_unknown_names() -> None:
    assert {"union", "class-weighted", "redistill"} <= set(available_aggregators())
    with pytest.raises(ValueError, match=r"^federation.aggregation: unknown rule 'fedavg'; allowed: .*union"):
        get_aggregator("fedavg")
    with pytest.raises(ValueError, match="registered twice"):
        register_aggregator("union")(get_aggregator("union"))


def test_union_concatenates_in_client_order_with_summed_counts() -> None:
    b = client("b", [0, 1, 1], [4, 9, 0], fill=100.0)
    a = client("a", [0, 2], [6, 0, 5])
    result = get_aggregator("union")([b, a], context())
    assert isinstance(result, AggregateResult) and result.weights is None
    merged = result.set
    assert len(merged) == 5 and merged.labels.tolist() == [0, 2, 0, 1, 1]
    assert torch.equal(merged.images[:2], a.set.images) and torch.equal(merged.images[2:], b.set.images)
    assert merged.source_counts.tolist() == [10, 9, 5] and merged.source_counts.dtype == np.int64
    assert merged.images_per_class().tolist() == [2, 2, 1]
    assert merged.soft_labels is None
    assert merged.provenance == {"aggregation": "union", "clients": ["a", "b"], "client_images": {"a": 2, "b": 3}}


def test_union_keeps_soft_labels_and_gives_hard_sets_one_hot_rows() -> None:
    a = client("a", [0, 2], [1, 0, 1], soft=True)
    b = client("b", [1], [0, 1, 0])
    merged = get_aggregator("union")([a, b], context()).set
    assert merged.soft_labels is not None and merged.soft_labels.shape == (3, NUM_CLASSES)
    assert torch.equal(merged.soft_labels[:2], a.set.soft_labels)
    assert merged.soft_labels[2].tolist() == [0.0, 1.0, 0.0]
    both = get_aggregator("union")([a, client("b", [1], [0, 1, 0], soft=True)], context()).set
    assert both.soft_labels is not None and torch.allclose(both.soft_labels.sum(1), torch.ones(3))


def test_no_client_sets_is_an_error() -> None:
    for name in ("union", "class-weighted"):
        with pytest.raises(ValueError, match="^no valid client sets this round$"):
            get_aggregator(name)([], context())


def test_mismatched_clients_are_named() -> None:
    a = client("a", [0], [1, 0, 0])
    odd_shape = ClientSet(
        "odd", SyntheticSet(torch.zeros(1, 1, 3, 3), torch.tensor([0]), NUM_CLASSES, np.array([1, 0, 0]))
    )
    with pytest.raises(InvalidReply, match="^client odd: image shape"):
        get_aggregator("union")([a, odd_shape], context())
    four = ClientSet("four", SyntheticSet(torch.zeros(1, 1, 2, 2), torch.tensor([0]), 4, np.array([1, 0, 0, 0])))
    with pytest.raises(InvalidReply, match="^client four: set has 4 classes, expected 3"):
        get_aggregator("union")([a, four], context())
    with pytest.raises(ValueError, match="^client a: sent more than one set"):
        get_aggregator("union")([a, a], context())


def test_class_weighted_balances_classes_and_follows_real_counts() -> None:
    small = client("small", [0, 0, 1], [100, 50, 0])
    large = client("large", [0, 0, 2], [900, 0, 20])
    result = get_aggregator("class-weighted")([small, large], context())
    weights = result.weights
    assert weights is not None and weights.dtype == torch.float32 and weights.shape == (6,)
    labels = result.set.labels
    for c in range(NUM_CLASSES):
        assert torch.isclose(weights[labels == c].sum(), torch.tensor(1.0)), c
    assert result.set.provenance["clients"] == ["large", "small"]
    assert labels.tolist() == [0, 0, 2, 0, 0, 1]
    assert float(weights[0:2].sum()) == pytest.approx(0.9) and float(weights[3:5].sum()) == pytest.approx(0.1)
    assert result.set.provenance["aggregation"] == "class-weighted"


def test_class_weighted_splits_a_clients_share_among_its_images() -> None:
    many = client("many", [0, 0, 0, 0], [10, 0, 0])
    one = client("one", [0], [10, 0, 0])
    weights = get_aggregator("class-weighted")([many, one], context()).weights
    assert weights is not None
    assert weights.tolist() == pytest.approx([0.125, 0.125, 0.125, 0.125, 0.5])


def test_merge_rounds_keeps_round_order_and_only_needs_weights_where_a_round_has_them() -> None:
    first = get_aggregator("union")([client("a", [0, 1], [5, 5, 0], fill=10.0)], context())
    second = get_aggregator("union")([client("a", [0, 0, 2], [5, 0, 5], fill=20.0)], context())
    plain = merge_rounds([first, second], context())
    assert plain.weights is None and plain.set.images[:, 0, 0, 0].tolist() == [10.0, 11.0, 20.0, 21.0, 22.0]
    assert plain.set.labels.tolist() == [0, 1, 0, 0, 2] and plain.set.source_counts.tolist() == [10, 5, 5]
    assert plain.set.provenance["rounds"] == 2 and plain.set.provenance["per_round"][0]["aggregation"] == "union"
    weighted = get_aggregator("class-weighted")([client("b", [0, 2], [3, 0, 1])], context())
    mixed = merge_rounds([second, weighted], context())
    assert mixed.weights is not None and mixed.weights.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0, 1.0])
    labels = mixed.set.labels
    assert float(mixed.weights[labels == 0].sum()) == pytest.approx(2.0)  # one per round that has the class
    with pytest.raises(ValueError, match="no aggregates"):
        merge_rounds([], context())


def test_class_weighted_refuses_images_without_source_data() -> None:
    with pytest.raises(InvalidReply, match="^client bad: class 1 has images but no source data"):
        get_aggregator("class-weighted")([client("bad", [1], [3, 0, 0])], context())


def first_k_per_class(images: torch.Tensor, labels: torch.Tensor, ipc: int) -> SyntheticSet:
    """Test double for a server-side distiller: keep the first ``ipc`` images of each class."""
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:ipc] for c in range(NUM_CLASSES)])
    counts = np.bincount(labels.numpy(), minlength=NUM_CLASSES)
    return SyntheticSet(images[keep], labels[keep], NUM_CLASSES, counts, provenance={"method": "first-k"})


def test_redistill_calls_the_distiller_on_the_union() -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def distiller(images: torch.Tensor, labels: torch.Tensor, ipc: int) -> SyntheticSet:
        calls.append((images, labels, ipc))
        return first_k_per_class(images, labels, ipc)

    a = client("a", [0, 0, 1, 2], [5, 5, 5])
    b = client("b", [0, 1, 1, 2], [5, 5, 5], fill=50.0)
    union = get_aggregator("union")([a, b], context()).set
    result = get_aggregator("redistill")([b, a], context(server_ipc=2, redistill=distiller))
    assert len(calls) == 1
    images, labels, ipc = calls[0]
    assert ipc == 2 and torch.equal(images, union.images) and torch.equal(labels, union.labels)
    assert result.weights is None
    assert result.set.images_per_class().tolist() == [2, 2, 2]
    assert result.set.source_counts.tolist() == [10, 10, 10]
    assert result.set.provenance["server_ipc"] == 2
    assert result.set.provenance["server_distill"] == {"method": "first-k"}
    assert result.set.provenance["clients"] == ["a", "b"]


def test_redistill_needs_server_ipc_and_a_distiller() -> None:
    a = client("a", [0], [1, 0, 0])
    with pytest.raises(ValueError, match="^federation.server_ipc"):
        get_aggregator("redistill")([a], context(redistill=first_k_per_class))
    with pytest.raises(ValueError, match="^federation.server_ipc"):
        get_aggregator("redistill")([a], context(server_ipc=0, redistill=first_k_per_class))
    with pytest.raises(ValueError, match="server-side distiller"):
        get_aggregator("redistill")([a], context(server_ipc=1))
    with pytest.raises(ValueError, match="^no valid client sets this round$"):
        get_aggregator("redistill")([], context(server_ipc=1, redistill=first_k_per_class))


def test_soft_label_gives_distributions_from_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, NUM_CLASSES))
    model.train()
    original = client("a", [0, 1, 2, 2, 0], [3, 3, 3]).set
    hot = soft_label(original, model, batch_size=2)
    cold = soft_label(original, model, temperature=0.1)
    assert model.training
    assert hot.soft_labels is not None and cold.soft_labels is not None
    assert hot.soft_labels.shape == (5, NUM_CLASSES) and (hot.soft_labels >= 0).all()
    assert torch.allclose(hot.soft_labels.sum(1), torch.ones(5), atol=1e-6)
    with torch.no_grad():
        expected = torch.softmax(model(original.images), 1)
    assert torch.allclose(hot.soft_labels, expected, atol=1e-6)
    assert (cold.soft_labels.max(1).values >= hot.soft_labels.max(1).values - 1e-6).all()
    assert original.soft_labels is None and hot.provenance["soft_label_temperature"] == 1.0
    hot.images.add_(1.0)
    assert not torch.equal(hot.images, original.images)
    logits = model(hot.images)
    F.cross_entropy(logits, hot.soft_labels).backward()


def test_soft_label_refuses_bad_temperature() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, NUM_CLASSES))
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            soft_label(client("a", [0], [1, 0, 0]).set, model, temperature)
