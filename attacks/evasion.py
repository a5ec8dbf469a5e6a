"""Evasion: robust accuracy under torchattacks' FGSM, PGD, CW and AutoAttack, in [0, 1] pixel space.

Every attack has the same call as torchattacks, ``attack(images, labels) ->
adversarial images``, with images in [0, 1] and a model that normalises
internally (``attacks.pixels.PixelModel``). Each call is seeded: the attack's
random draws (PGD's random start, AutoAttack's restarts) come from ``seed``
inside ``torch.random.fork_rng``, so results repeat and the caller's global
RNG is left as it was (torchattacks' APGD/FAB/Square reseed the global RNG
themselves). CW is a minimal-norm L2 attack: it ignores the radius, and
``robust_accuracy`` counts its perturbations up to each L2 radius instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torchattacks
from torch import nn

from attacks.pixels import predict
from attacks.registry import Registry

EVASION = Registry["type[EvasionAttack]"]("attack.evasion.attacks")

PGD_STEPS = 20
PGD_STEP_FACTOR = 2.5
"""PGD step size is ``2.5 * eps / steps`` (Madry et al.), so the walk can cross the ball whatever the step count."""


class EvasionAttack(ABC):
    """``Attack(model, eps, seed=0, **params)(images, labels)``: adversarial images in [0, 1].

    ``model`` takes [0, 1] pixels. ``norm`` is the threat model's norm;
    ``minimal`` attacks (CW) search for the smallest perturbation and take no radius.
    """

    name: ClassVar[str]
    norm: ClassVar[str] = "Linf"
    minimal: ClassVar[bool] = False

    def __init__(self, model: nn.Module, eps: float | None = None, seed: int = 0, **params: Any) -> None:
        if not self.minimal and (eps is None or not eps > 0):
            raise ValueError(f"attack.evasion: {self.name} needs a radius eps > 0, got {eps}")
        self.model = model
        self.eps = eps
        self.seed = seed
        self.params = params
        self.attack = self.build()

    @abstractmethod
    def build(self) -> torchattacks.Attack:
        """The torchattacks object doing the work."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("attack.evasion: images must be in [0, 1] pixel space (wrap the model in PixelModel)")
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self.attack(images.to(device), labels.to(device)).detach()


@EVASION.register("fgsm")
class FGSM(EvasionAttack):
    """One signed-gradient step of size eps (Goodfellow et al.)."""

    def build(self) -> torchattacks.Attack:
        return torchattacks.FGSM(self.model, eps=self.eps)


@EVASION.register("pgd")
class PGD(EvasionAttack):
    """L-inf PGD with a uniform random start; ``steps`` (default 20) of ``2.5 * eps / steps``."""

    def build(self) -> torchattacks.Attack:
        steps = int(self.params.get("steps", PGD_STEPS))
        assert self.eps is not None
        return torchattacks.PGD(
            self.model, eps=self.eps, alpha=PGD_STEP_FACTOR * self.eps / steps, steps=steps, random_start=True
        )


@EVASION.register("cw")
class CW(EvasionAttack):
    """Carlini-Wagner L2 (torchattacks: fixed ``c``, no binary search), a minimal-norm attack."""

    norm = "L2"
    minimal = True

    def build(self) -> torchattacks.Attack:
        return torchattacks.CW(
            self.model, c=float(self.params.get("c", 1.0)), kappa=0, steps=int(self.params.get("steps", 50)), lr=0.01
        )


SQUARE_QUERIES = 5000
"""Square's query budget in the standard AutoAttack."""


@EVASION.register("autoattack")
class AutoAttack(EvasionAttack):
    """The standard AutoAttack ensemble as torchattacks builds it: APGD-CE, APGD-T, FAB-T, Square, each on what the
    previous left correct (torchattacks' APGD runs 10 steps, the reference 100).

    Built from torchattacks' parts rather than ``torchattacks.AutoAttack`` only so that Square's query
    budget (``square_queries``, default the standard 5000) can be cut on a CPU; any cut is in the audit record.
    """

    def build(self) -> torchattacks.Attack:
        model, eps, seed = self.model, self.eps, self.seed
        classes = int(self.params["num_classes"])
        queries = int(self.params.get("square_queries", SQUARE_QUERIES))
        return torchattacks.MultiAttack([
            torchattacks.APGD(model, norm="Linf", eps=eps, seed=seed, loss="ce", n_restarts=1),
            torchattacks.APGDT(model, norm="Linf", eps=eps, seed=seed, n_classes=classes, n_restarts=1),
            torchattacks.FAB(
                model, norm="Linf", eps=eps, seed=seed, multi_targeted=True, n_classes=classes, n_restarts=1
            ),
            torchattacks.Square(model, norm="Linf", eps=eps, seed=seed, n_queries=queries, n_restarts=1),
        ])


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    radii: Sequence[float],
    seed: int = 0,
    batch_size: int = 256,
    **params: Any,
) -> dict[str, Any]:
    """Accuracy of pixel-space ``model`` on ``attack``'s adversarial images at each radius.

    A bounded attack runs once per radius (batch ``i`` seeded ``seed + i``); a
    minimal attack runs once, and an image counts as robust at radius ``r``
    when the model is right on it and the attack found no misclassified image
    within ``r``. Returns ``{"attack", "norm", "epsilons", "accuracy",
    "clean_accuracy", "images"}`` (accuracies in [0, 1]).
    """
    cls = EVASION.get(attack)
    labels = labels.cpu()
    clean = predict(model, images, batch_size) == labels
    accuracy: list[float] = []
    if cls.minimal:
        adversarial = _run(cls, model, None, images, labels, seed, batch_size, params)
        fooled = predict(model, adversarial, batch_size) != labels
        distance = (adversarial - images.cpu()).flatten(1).norm(dim=1)
        for radius in radii:
            robust = clean & ~(fooled & (distance <= radius))
            accuracy.append(float(robust.float().mean()))
    else:
        for radius in radii:
            adversarial = _run(cls, model, radius, images, labels, seed, batch_size, params)
            gap = (adversarial - images.cpu()).abs().amax()
            if gap > radius + 1e-5:
                raise RuntimeError(f"{attack}: perturbation {float(gap):.4f} exceeds the radius {radius}")
            accuracy.append(float((predict(model, adversarial, batch_size) == labels).float().mean()))
    return {
        "attack": attack,
        "norm": cls.norm,
        "epsilons": [float(r) for r in radii],
        "accuracy": accuracy,
        "clean_accuracy": float(clean.float().mean()),
        "images": len(labels),
    }


def _run(
    cls: type[EvasionAttack],
    model: nn.Module,
    radius: float | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    batch_size: int,
    params: dict[str, Any],
) -> torch.Tensor:
    parts = []
    for index, start in enumerate(range(0, len(images), batch_size)):
        attack = cls(model, radius, seed=seed + index, **params)
        parts.append(attack(images[start : start + batch_size], labels[start : start + batch_size]).cpu())
    return torch.cat(parts)
