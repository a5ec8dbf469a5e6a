"""Aggregation rules: how the clients' synthetic sets of a round become one set.

Each rule is a pure function ``rule(clients, context) -> AggregateResult``
registered under its name with ``@register_aggregator``, so adding one is one
function here (or in a module imported here) plus that decorator line; the
config accepts every registered name. The rules live in the library, without
Flower, so the server, the audit and the tests call the same code. They
assume validated sets (``server.validation`` checks each reply) but recheck
what they rely on across clients: one class count, one image shape, unique
client ids. Clients are ordered by id before anything is concatenated, so the
aggregate does not depend on the order in which replies happened to arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedistill.errors import InvalidReply
from fedistill.synthetic import SyntheticSet


@dataclass(frozen=True)
class ClientSet:
    """One client's validated set for this round, tagged with who sent it."""

    client_id: str
    set: SyntheticSet


@dataclass
class AggregationContext:
    """What a rule may use besides the client sets.

    ``redistill(images, labels, ipc)`` distils a labelled set down to ``ipc``
    images per class (the server-side distiller, already bound to its model,
    settings, device and seed); only the ``redistill`` rule needs it and
    ``server_ipc``.
    """

    num_classes: int
    device: torch.device
    seed: int
    server_ipc: int | None = None
    redistill: Callable[[torch.Tensor, torch.Tensor, int], SyntheticSet] | None = None


@dataclass(frozen=True)
class AggregateResult:
    """The aggregate set and optional per-image training weights.

    ``weights`` (float32, one per image, on the set's device) is ``None`` when
    every image counts the same. Where given, the training loop should sample
    images with probability proportional to ``weights`` (e.g.
    ``torch.multinomial(weights, batch, replacement=True)``) or scale each
    image's loss by it, so that its class-balancing takes effect.
    """

    set: SyntheticSet
    weights: torch.Tensor | None = None


Aggregator = Callable[[Sequence[ClientSet], AggregationContext], AggregateResult]

_REGISTRY: dict[str, Aggregator] = {}


def register_aggregator(name: str) -> Callable[[Aggregator], Aggregator]:
    """Function decorator adding an aggregation rule to the registry under ``name``."""

    def wrap(rule: Aggregator) -> Aggregator:
        if name in _REGISTRY:
            raise ValueError(f"aggregation rule {name!r} registered twice")
        _REGISTRY[name] = rule
        return rule

    return wrap


def available_aggregators() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_aggregator(name: str) -> Aggregator:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"federation.aggregation: unknown rule {name!r}; allowed: {', '.join(available_aggregators())}"
        ) from None


def _ordered(clients: Sequence[ClientSet], context: AggregationContext) -> list[ClientSet]:
    """Check the sets can be combined and return them sorted by client id."""
    if not clients:
        raise ValueError("no valid client sets this round")
    ordered = sorted(clients, key=lambda c: c.client_id)
    shape = tuple(ordered[0].set.images.shape[1:])
    seen: set[str] = set()
    for client in ordered:
        if client.client_id in seen:
            raise ValueError(f"client {client.client_id}: sent more than one set this round")
        seen.add(client.client_id)
        if client.set.num_classes != context.num_classes:
            raise InvalidReply(
                f"client {client.client_id}: set has {client.set.num_classes} classes, expected {context.num_classes}"
            )
        if tuple(client.set.images.shape[1:]) != shape:
            raise InvalidReply(
                f"client {client.client_id}: image shape {tuple(client.set.images.shape[1:])} differs from {shape}"
            )
    return ordered


def _union(clients: list[ClientSet], context: AggregationContext, rule: str) -> SyntheticSet:
    """Concatenate ordered, compatible sets on ``context.device``.

    When only some sets carry soft labels, the hard-labelled images get one-hot
    rows: cross-entropy against a one-hot row equals the hard-label loss, so
    nothing changes for them and the teachers' distributions are kept.
    """
    device = context.device
    images = torch.cat([c.set.images.to(device) for c in clients])
    labels = torch.cat([c.set.labels.to(device=device, dtype=torch.int64) for c in clients])
    soft_labels = None
    if any(c.set.soft_labels is not None for c in clients):
        soft_labels = torch.cat(
            [
                c.set.soft_labels.to(device=device, dtype=torch.float32)
                if c.set.soft_labels is not None
                else F.one_hot(c.set.labels.to(device=device, dtype=torch.int64), context.num_classes).float()
                for c in clients
            ]
        )
    source_counts = np.sum([np.asarray(c.set.source_counts, dtype=np.int64) for c in clients], axis=0, dtype=np.int64)
    provenance = {
        "aggregation": rule,
        "clients": [c.client_id for c in clients],
        "client_images": {c.client_id: len(c.set) for c in clients},
    }
    return SyntheticSet(images, labels, context.num_classes, source_counts, soft_labels, provenance)


@register_aggregator("union")
def union(clients: Sequence[ClientSet], context: AggregationContext) -> AggregateResult:
    """All clients' images together, every image counting once; source counts summed."""
    return AggregateResult(_union(_ordered(clients, context), context, "union"))


@register_aggregator("class-weighted")
def class_weighted(clients: Sequence[ClientSet], context: AggregationContext) -> AggregateResult:
    """The union, with each class's weight split among clients by the real images they stand for.

    An image of class ``c`` from client ``k`` weighs ``source(k, c) / images(k, c)``,
    normalised so that each present class's weights sum to 1: a client that
    distilled its class from 5000 real images then counts ten times as much as
    one that had 500, however many synthetic images each sent, and every class
    counts the same whatever its number of images.
    """
    ordered = _ordered(clients, context)
    merged = _union(ordered, context, "class-weighted")
    per_image = []
    for client in ordered:
        counts = np.asarray(client.set.source_counts, dtype=np.float64)
        present = client.set.images_per_class()
        hollow = np.flatnonzero((present > 0) & (counts <= 0))
        if hollow.size:
            raise InvalidReply(f"client {client.client_id}: class {int(hollow[0])} has images but no source data")
        ratio = np.divide(counts, present, out=np.zeros_like(counts), where=present > 0)
        per_image.append(ratio[client.set.labels.cpu().numpy()])
    raw = np.concatenate(per_image)
    labels = merged.labels.cpu().numpy()
    class_totals = np.bincount(labels, weights=raw, minlength=context.num_classes)
    weights = torch.from_numpy((raw / class_totals[labels]).astype(np.float32)).to(context.device)
    return AggregateResult(merged, weights)


@register_aggregator("redistill")
def redistill(clients: Sequence[ClientSet], context: AggregationContext) -> AggregateResult:
    """The union, distilled again on the server down to ``server_ipc`` images per class.

    The server-side set stands for all the real data behind the clients' sets,
    so its ``source_counts`` are the union's (not the union's image counts, which
    the distiller would record). Soft labels of the union are not passed on.
    """
    if context.server_ipc is None or context.server_ipc < 1:
        raise ValueError(f"federation.server_ipc: the redistill rule needs a positive value, got {context.server_ipc}")
    if context.redistill is None:
        raise ValueError("federation.aggregation: the redistill rule needs a server-side distiller")
    merged = _union(_ordered(clients, context), context, "redistill")
    result = context.redistill(merged.images, merged.labels, context.server_ipc)
    if not isinstance(result, SyntheticSet) or result.num_classes != context.num_classes:
        raise ValueError("federation.aggregation: the server-side distiller returned no set of the right classes")
    provenance = dict(merged.provenance)
    provenance["server_ipc"] = context.server_ipc
    provenance["server_distill"] = dict(result.provenance)
    return AggregateResult(
        SyntheticSet(
            result.images,
            result.labels,
            context.num_classes,
            merged.source_counts.copy(),
            result.soft_labels,
            provenance,
            result.factor,
        )
    )


def merge_rounds(rounds: Sequence[AggregateResult], context: AggregationContext) -> AggregateResult:
    """Several rounds' aggregates (oldest first) as one training set, every round's classes weighing the same.

    Multi-round runs with ``federation.aggregate_window`` > 1 train the global
    model on the last rounds' sets together: more synthetic images for no
    extra upload. Where any round carries weights, a round without them gets
    uniform ones normalised per class, so that a class weighs as much in each
    round as in any other (the ``class-weighted`` rule's normalisation).
    """
    if not rounds:
        raise ValueError("merge_rounds: no aggregates to merge")
    labelled = [ClientSet(f"round-{index:04d}", result.set) for index, result in enumerate(rounds)]
    _ordered(labelled, context)
    merged = _union(labelled, context, "rounds")
    merged.provenance = {"rounds": len(rounds), "per_round": [dict(result.set.provenance) for result in rounds]}
    if all(result.weights is None for result in rounds):
        return AggregateResult(merged)
    parts = []
    for result in rounds:
        if result.weights is not None:
            parts.append(result.weights.to(device=context.device, dtype=torch.float32))
            continue
        labels = result.set.labels.to(device=context.device, dtype=torch.int64)
        per_class = torch.bincount(labels, minlength=context.num_classes).float()
        parts.append(1.0 / per_class[labels])
    return AggregateResult(merged, torch.cat(parts))
