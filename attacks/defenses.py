"""Defences for synthetic sets: find and remove suspicious images or client contributions before the union.

Each defence looks at the union of the clients' sets in the feature space of a
reference model (``reference_features``: a fresh network trained on the
round's union, whose penultimate features separate what it learned as a
shortcut, e.g. a trigger, from the class's real content) and flags images per
class with a robust z-score (median and MAD, so a minority of poisoned images
cannot hide by inflating the spread):

- ``spectral``: spectral signatures (Tran et al. 2018): per class, each image's
  projection on the top singular vector of the centred features; poisoned
  images sit at one end of it.
- ``class-outliers``: per class, each image's distance to the class's median feature.
- ``client-outliers``: per class, each client's mean feature against the other
  clients' (their median); under label skew honest clients' images of a class
  still match one class-conditional distribution, a poisoned client's do not.
  All of a flagged client's images of that class go.

Filtering costs clean accuracy where honest images are flagged; the audit and
the benchmarks measure that price next to the drop in attack success.

``aggregate_round`` is the server's whole aggregation step (the configured
defence, then the aggregation rule); it lives here so that the server and the
audit, which re-aggregates a finished run without the defence, share it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from attacks.registry import Registry
from fedistill.aggregation import AggregateResult, AggregationContext, ClientSet, get_aggregator
from fedistill.distill import get_distiller
from fedistill.models import ModelSpec, build_model
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, train_model

if TYPE_CHECKING:
    from fedistill.config import ExperimentConfig
    from fedistill.data import ImageData

log = logging.getLogger("fedistill.server")

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
"""Normalised images (N, C, H, W) -> features (N, D)."""

DEFENSES = Registry["type[SetDefense]"]("attack.defense.method")

MIN_CLASS_IMAGES = 5
"""Classes with fewer images (or, for client-outliers, fewer than 3 clients) are left alone: no robust statistics."""
MAD_SCALE = 1.4826
"""MAD times this estimates the std of a normal distribution."""
DISTANCE_FLOOR = 0.25
"""Distance tests flag nothing within 1 + threshold * 0.25 of the median distance (see ``robust_z``)."""
REFERENCE_SEED_OFFSET = 7_919
"""The reference network's seed is the experiment's plus this (apart from the evaluation networks' seeds)."""


@dataclass
class DefenseResult:
    """The sets with flagged images removed; per set, which images went (True = removed) and how many per class."""

    kept: list[SyntheticSet]
    flags: list[torch.Tensor]
    removed_per_class: list[list[int]]


def robust_z(values: torch.Tensor, relative_floor: float = 0.0) -> torch.Tensor:
    """``(x - median) / (1.4826 * MAD)``; zeros where the values do not spread (MAD and mean deviation 0).

    ``relative_floor`` keeps the scale at least that share of ``|median|``: distances
    in many dimensions concentrate (their MAD is a sliver of their size), so
    without a floor a client barely farther than the rest would score high.
    """
    median = values.median()
    deviation = (values - median).abs()
    scale = max(MAD_SCALE * deviation.median(), relative_floor * median.abs())
    if scale <= 0:
        scale = deviation.mean()
    if scale <= 0:
        return torch.zeros_like(values)
    return (values - median) / scale


class SetDefense(ABC):
    """``defense(sets, features) -> DefenseResult``; subclasses say which images of the union are suspicious."""

    name: ClassVar[str]

    def __init__(self, threshold: float = 3.5) -> None:
        if not threshold > 0:
            raise ValueError(f"attack.defense.threshold: must be > 0, got {threshold}")
        self.threshold = threshold

    @abstractmethod
    def suspicious(self, features: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Boolean per image of the union: remove it."""

    def __call__(self, sets: Sequence[SyntheticSet], features: FeatureFn) -> DefenseResult:
        if not sets:
            raise ValueError("defense: no sets to filter")
        images = torch.cat([s.images for s in sets])
        labels = torch.cat([s.labels.to(images.device) for s in sets])
        owners = torch.cat([torch.full((len(s),), k, device=images.device) for k, s in enumerate(sets)])
        if len(images):
            flags = self.suspicious(features(images).float(), labels, owners).cpu()
        else:
            flags = torch.zeros(0, dtype=torch.bool)
        kept, per_set, per_class = [], [], []
        for k, syn in enumerate(sets):
            mine = flags[(owners == k).cpu()]
            per_class.append(np.bincount(syn.labels.cpu().numpy()[mine.numpy()], minlength=syn.num_classes).tolist())
            keep = ~mine
            rows = keep.nonzero().flatten().to(syn.images.device)
            kept.append(
                SyntheticSet(
                    syn.images[rows],
                    syn.labels[rows],
                    syn.num_classes,
                    np.array(syn.source_counts, copy=True),
                    None if syn.soft_labels is None else syn.soft_labels[rows],
                    {**syn.provenance, "defense": self.name, "removed": int(mine.sum())},
                )
            )
            per_set.append(mine)
        return DefenseResult(kept, per_set, per_class)


def _classes(labels: torch.Tensor) -> list[torch.Tensor]:
    return [(labels == c).nonzero().flatten() for c in labels.unique().tolist()]


class PerImageDefense(SetDefense):
    """Defences that score each image against the rest of its class; classes with too few images are left alone."""

    @abstractmethod
    def class_scores(self, features: torch.Tensor) -> torch.Tensor:
        """One class's images' features -> a robust z per image; above the threshold is suspicious."""

    def suspicious(self, features: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        flags = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        for rows in _classes(labels):
            if len(rows) >= MIN_CLASS_IMAGES:
                flags[rows] = self.class_scores(features[rows]) > self.threshold
        return flags


@DEFENSES.register("spectral")
class SpectralSignature(PerImageDefense):
    """Per class: robust z of the projection on the top singular vector of the centred features (two-sided)."""

    def class_scores(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - features.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return robust_z(centred @ vh[0]).abs()


@DEFENSES.register("class-outliers")
class ClassOutliers(PerImageDefense):
    """Per class: robust z of each image's distance to the class's median feature (one-sided)."""

    def class_scores(self, features: torch.Tensor) -> torch.Tensor:
        distance = (features - features.median(0).values).norm(dim=1)
        return robust_z(distance, DISTANCE_FLOOR)


@DEFENSES.register("client-outliers")
class ClientOutliers(SetDefense):
    """Per class: robust z of each client's mean feature's distance to the clients' median (one-sided)."""

    def suspicious(self, features: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        flags = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        for rows in _classes(labels):
            clients = owners[rows].unique()
            if len(clients) < 3:
                continue
            means = torch.stack([features[rows[owners[rows] == k]].mean(0) for k in clients])
            distance = (means - means.median(0).values).norm(dim=1)
            flagged = clients[robust_z(distance, DISTANCE_FLOOR) > self.threshold]
            flags[rows] = torch.isin(owners[rows], flagged)
        return flags


def reference_features(
    sets: Sequence[SyntheticSet],
    model_spec: ModelSpec,
    settings: TrainSettings,
    device: torch.device,
    seed: int,
) -> tuple[FeatureFn, nn.Module]:
    """Train a fresh network on the union of ``sets`` (seeded) and return its penultimate features (eval mode)."""
    union = [s.to(device) for s in sets if len(s)]
    if not union:
        raise ValueError("defense: every set is empty")
    images = torch.cat([s.images for s in union])
    labels = torch.cat([s.labels for s in union])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_spec, tuple(images.shape[1:]), union[0].num_classes)  # type: ignore[arg-type]
    model.to(device)
    train_model(model, images, labels, settings, torch.Generator().manual_seed(seed))
    model.eval()

    def features(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            embed = model.embed  # type: ignore[operator]
            parts = [embed(batch[i : i + 1024].to(device)) for i in range(0, len(batch), 1024)]
            return torch.cat(parts)

    return features, model


def defend_sets(
    sets: Sequence[SyntheticSet], config: ExperimentConfig, device: torch.device, method: str | None = None
) -> tuple[DefenseResult, dict[str, Any]]:
    """Apply ``method`` (default ``attack.defense.method``) to the clients' sets, as the server does before the union.

    The reference network is trained with the evaluation protocol's settings
    for ``attack.defense.reference_epochs`` epochs, seeded by the experiment.
    Returns the result and a JSON-able summary (images removed per set and class).
    """
    defense_cfg = config.attack.defense
    name = method or defense_cfg.method
    defense = DEFENSES.get(name)(defense_cfg.threshold)
    base = config.eval.train_settings(config.data.name)
    settings = TrainSettings(
        epochs=defense_cfg.reference_epochs, lr=base.lr, momentum=base.momentum,
        weight_decay=base.weight_decay, batch_size=base.batch_size, dsa_strategy=base.dsa_strategy,
    )
    features, _ = reference_features(sets, config.model.spec(), settings, device, config.seed + REFERENCE_SEED_OFFSET)
    result = defense(sets, features)
    summary = {
        "method": name,
        "threshold": defense_cfg.threshold,
        "reference_epochs": defense_cfg.reference_epochs,
        "removed": [int(flags.sum()) for flags in result.flags],
        "removed_per_class": result.removed_per_class,
    }
    return result, summary


def aggregate_round(
    clients: list[ClientSet], config: ExperimentConfig, test: ImageData, device: torch.device,
    defense: str | None = None,
) -> tuple[AggregateResult, dict[str, Any] | None]:
    """The round's aggregate: the defence (``defense``, default ``attack.defense.method``) filters the
    client sets, then the aggregation rule combines what is left. Also returns the defence's report."""
    method = config.attack.defense.method if defense is None else defense
    clients = sorted(clients, key=lambda client: client.client_id)  # partition order, whatever the arrival order
    report = None
    if method != "none":
        result, report = defend_sets([client.set for client in clients], config, device, method)
        report["clients"] = [client.client_id for client in clients]
        clients = [ClientSet(client.client_id, kept) for client, kept in zip(clients, result.kept) if len(kept)]
        log.info("defense %s removed %s images", method, report["removed"])
    return get_aggregator(config.federation.aggregation)(clients, _aggregation_context(config, test, device)), report


def _aggregation_context(config: ExperimentConfig, test: ImageData, device: torch.device) -> AggregationContext:
    num_classes = test.info.num_classes

    def redistill(images: torch.Tensor, labels: torch.Tensor, ipc: int) -> SyntheticSet:
        settings = replace(config.distill.settings(config.data.name), ipc=ipc)
        method = get_distiller(config.distill.method)
        if method.private:  # the client sets are already public: re-distilling them needs no privacy
            method = get_distiller(method.public_counterpart(settings))  # type: ignore[attr-defined]
        distiller = method(config.model.spec(), settings, device)
        return distiller(images, labels, num_classes, seed=config.seed)

    return AggregationContext(
        num_classes=num_classes,
        device=device,
        seed=config.seed,
        server_ipc=config.federation.server_ipc,
        redistill=redistill,
    )
