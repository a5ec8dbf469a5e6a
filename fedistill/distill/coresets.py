"""Coreset baselines: pick real images instead of synthesising them.

Herding and k-center select in the embedding space of a freshly initialised
network of the configured architecture (random ConvNet features already
separate classes well, which is also why DM works); random picks uniformly.
"""

from __future__ import annotations

import torch

from fedistill.distill.base import (
    Distiller,
    ProgressFn,
    class_indices,
    per_class_budget,
    register,
    source_counts,
)
from fedistill.distill.embedding import Embedder
from fedistill.synthetic import SyntheticSet


class _Coreset(Distiller):
    """Shared shape of the coreset methods: choose ``budget`` rows of each class."""

    needs_features = True
    refines = False

    def select(self, features: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        counts = source_counts(labels, num_classes)
        budgets = per_class_budget(counts, self.settings.ipc)
        net = self.network(images.shape[1:], num_classes, generator)
        embedder = Embedder(net, self.settings.real_precision, compiled=False)
        chosen: list[torch.Tensor] = []
        for cls, rows in enumerate(class_indices(labels, num_classes)):
            if budgets[cls] == 0:
                continue
            features = embedder.real(images[rows]) if self.needs_features else rows
            chosen.append(rows[self.select(features, int(budgets[cls]), generator).to(rows.device)])
            if progress is not None:
                progress(cls + 1, num_classes, 0.0)
        picked = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long, device=images.device)
        return SyntheticSet(
            images[picked].detach().clone(), labels[picked].clone(), num_classes, counts, provenance={"init": "real"}
        )


@register("random")
class RandomCoreset(_Coreset):
    """Uniformly random real images per class: the baseline every method must beat."""

    needs_features = False

    def select(self, features: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(len(features), generator=generator)[:budget]


@register("herding")
class HerdingCoreset(_Coreset):
    """Greedy herding (Welling 2009): each pick brings the running mean closest to the class mean."""

    def select(self, features: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
        target = features.mean(0)
        running = torch.zeros_like(target)
        available = torch.ones(len(features), dtype=torch.bool, device=features.device)
        picks: list[int] = []
        for step in range(1, budget + 1):
            candidate_means = (running * (step - 1) + features) / step
            distance = (candidate_means - target).norm(dim=1)
            distance[~available] = float("inf")
            best = int(distance.argmin())
            picks.append(best)
            available[best] = False
            running = candidate_means[best]
        return torch.tensor(picks, dtype=torch.long)


@register("kcenter")
class KCenterCoreset(_Coreset):
    """Greedy k-center (Sener & Savarese 2018): start at the point nearest the mean, then the farthest each time."""

    def select(self, features: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
        first = int((features - features.mean(0)).norm(dim=1).argmin())
        picks = [first]
        nearest = (features - features[first]).norm(dim=1)
        nearest[first] = -1.0
        for _ in range(budget - 1):
            farthest = int(nearest.argmax())
            picks.append(farthest)
            nearest = torch.minimum(nearest, (features - features[farthest]).norm(dim=1))
            nearest[picks] = -1.0
        return torch.tensor(picks, dtype=torch.long)
