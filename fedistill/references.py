"""What a set's accuracy stands beside: its start alone and a random real subset of the same size.

A distilled set is worth what it adds over the images it started from and
over real images that cost nothing to pick. ``start_alone`` is the same run
at zero iterations (the same seed draws the same starting images; a private
method makes no release); ``random_real_like`` draws, class by class, as many
random real images as the set has. Both are evaluated with the set's own
protocol and seed, so the three accuracies differ only in the images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedistill.distill import Distiller, DistillSettings
from fedistill.models import ModelSpec
from fedistill.synthetic import SyntheticSet
from fedistill.training import EvalResult


def start_alone(method: type[Distiller], model_spec: ModelSpec, settings: DistillSettings, device: torch.device,
                images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                **options: Any) -> SyntheticSet | None:
    """``method`` run with ``settings`` at zero iterations, or None for a method that selects real images (no start).

    ``options`` are the run's other constructor arguments (a private method's
    ``privacy``, a ``start`` set); at zero iterations nothing is released.
    """
    if not method.refines:
        return None
    distiller = method(model_spec, dataclasses.replace(settings, iterations=0), device, **options)
    return distiller(images, labels, num_classes, seed=seed)


def random_real_like(syn: SyntheticSet, images: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator) -> SyntheticSet:
    """As many random real images of each class as ``syn`` has (fewer where the class has fewer), hard labels."""
    per_class = syn.images_per_class()
    labels_cpu = labels.cpu()
    rows = []
    for cls, wanted in enumerate(per_class.tolist()):
        if wanted == 0:
            continue
        candidates = torch.nonzero(labels_cpu == cls, as_tuple=False).flatten()
        rows.append(candidates[torch.randperm(len(candidates), generator=generator)[:wanted]])
    picked = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    counts = np.bincount(labels_cpu.numpy(), minlength=syn.num_classes).astype(np.int64)
    return SyntheticSet(images[picked.to(images.device)].detach().clone(), labels[picked.to(labels.device)].clone(),
                        syn.num_classes, counts, provenance={"method": "random-real", "rows": picked.tolist()})


@dataclass(frozen=True)
class Gains:
    """A set's accuracy beside its references, and the difference in points (None where a reference is missing)."""

    accuracy: float
    start: float | None
    random_real: float | None

    @staticmethod
    def of(result: EvalResult, start: EvalResult | None, random_real: EvalResult | None) -> Gains:
        return Gains(result.mean, None if start is None else start.mean,
                     None if random_real is None else random_real.mean)

    @property
    def over_start(self) -> float | None:
        return None if self.start is None else 100 * (self.accuracy - self.start)

    @property
    def over_random_real(self) -> float | None:
        return None if self.random_real is None else 100 * (self.accuracy - self.random_real)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "start": self.start, "random_real": self.random_real,
                "gain_over_start_points": self.over_start, "gain_over_random_real_points": self.over_random_real}

    def describe(self) -> str:
        """One line: the gain in points over each reference, or why a reference is missing."""
        start = "no start (selects real images)" if self.over_start is None else f"{self.over_start:+.2f} over its start"
        real = "" if self.over_random_real is None else f", {self.over_random_real:+.2f} over random real images"
        return f"gain in points: {start}{real}"
