"""Membership inference: threshold attacks, offline LiRA and nearest-neighbour distance; ROC with intervals; DP bound.

Every attack scores candidate images, higher meaning "more likely a member",
with the same call: ``attack.scores(pixels, labels)`` (images in [0, 1]); and
``attack(members, non_members)`` gives the ROC report. Model attacks take a
pixel-space model (``attacks.pixels.PixelModel``):

- ``loss``: minus the cross-entropy (Yeom et al. 2018), the threshold baseline
  of Carlini et al.; ``confidence``: the highest softmax probability, which
  needs no label (Salem et al. 2019).
- ``lira``: offline LiRA (Carlini et al. 2022): shadow models trained without
  any candidate give, per candidate, the distribution of the logit-scaled
  confidence ``log(p / (1 - p))`` of non-members; the score is the target
  model's value in standard units of it (one-sided). With fewer than
  ``PER_EXAMPLE_VARIANCE_MIN`` shadows the spread is pooled over candidates
  (the paper's fixed-variance variant), the mean stays per candidate.
- ``nn-distance``: against a released set itself: minus the L2 distance (pixel
  space) from a candidate to its nearest image in the set.

``roc_report`` gives ROC AUC and TPR at fixed FPRs with percentile-bootstrap
95% intervals (members and non-members resampled separately, the threshold
re-chosen in each resample). ``dp_bound_check`` is the audit of an
(eps, delta)-DP release: any test must satisfy TPR <= e^eps FPR + delta (and
its mirror, 1 - FPR <= e^eps (1 - TPR) + delta); it reports the largest
epsilon the attacks' counts prove (``fedistill.privacy.empirical``) and calls
the claim violated only when that exceeds it.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from attacks.registry import Registry
from fedistill.privacy.empirical import CONFIDENCE, epsilon_lower_bound

log = logging.getLogger("fedistill.attacks")

MEMBERSHIP = Registry["type[MembershipAttack]"]("attack.membership")

REPORTED_FPRS = (0.001, 0.01)
PER_EXAMPLE_VARIANCE_MIN = 16
CURVE_POINTS = 200
"""ROC points kept in a report (log-spaced in FPR), enough to draw it on log-log axes."""

Candidates = tuple[torch.Tensor, torch.Tensor]
"""(pixels in [0, 1], labels) of candidate images."""


class MembershipAttack(ABC):
    """``attack.scores(pixels, labels)``: one membership score per image, higher for likelier members."""

    name: ClassVar[str]

    @abstractmethod
    def scores(self, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Scores of candidate images (float64)."""

    def __call__(
        self, members: Candidates, non_members: Candidates, bootstrap: int = 200, seed: int = 0
    ) -> dict[str, Any]:
        """The ROC report (``roc_report``) of this attack on known members and non-members."""
        report = roc_report(self.scores(*members), self.scores(*non_members), bootstrap=bootstrap, seed=seed)
        return {"attack": self.name, **report}


def _logits(model: nn.Module, pixels: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = [model(pixels[i : i + batch_size].to(device)).float().cpu()
                   for i in range(0, len(pixels), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def logit_confidence(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``log(p_y / (1 - p_y))`` computed stably as ``z_y - logsumexp(z_others)``."""
    logits = _logits(model, pixels).double()
    labels = labels.cpu()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return (true - others).numpy()


@MEMBERSHIP.register("loss")
class LossAttack(MembershipAttack):
    """Minus the cross-entropy of the true label: members were fit, so their loss is lower."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def scores(self, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        logits = _logits(self.model, pixels)
        return (-F.cross_entropy(logits, labels.cpu(), reduction="none")).double().numpy()


@MEMBERSHIP.register("confidence")
class ConfidenceAttack(MembershipAttack):
    """The highest softmax probability, label-free (Salem et al. 2019); the true label's probability would
    rank candidates exactly as the loss does."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def scores(self, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        logits = _logits(self.model, pixels)
        return torch.softmax(logits.double(), 1).amax(1).numpy()


@MEMBERSHIP.register("lira")
class OfflineLiRA(MembershipAttack):
    """Offline LiRA: the target's logit-scaled confidence against shadow models trained without the candidates."""

    def __init__(self, model: nn.Module, shadow_models: Sequence[nn.Module]) -> None:
        if len(shadow_models) < 2:
            raise ValueError(
                f"attack.membership.shadow_models: LiRA needs at least 2 shadow models, got {len(shadow_models)}"
            )
        self.model = model
        self.shadow_models = list(shadow_models)

    def scores(self, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        target = logit_confidence(self.model, pixels, labels)
        shadows = np.stack([logit_confidence(shadow, pixels, labels) for shadow in self.shadow_models])
        mean = shadows.mean(0)
        if len(self.shadow_models) >= PER_EXAMPLE_VARIANCE_MIN:
            std = shadows.std(0, ddof=1)
        else:
            std = np.full_like(mean, (shadows - mean).std(ddof=1))
        return (target - mean) / np.maximum(std, 1e-6)


@MEMBERSHIP.register("nn-distance")
class NearestNeighbour(MembershipAttack):
    """Minus the L2 distance from a candidate to the nearest image of a released set (both in pixel space)."""

    def __init__(self, released: torch.Tensor, batch_size: int = 512) -> None:
        if len(released) == 0:
            raise ValueError("nn-distance: the released set is empty")
        self.released = released.flatten(1).double().cpu()
        self.batch_size = batch_size

    def scores(self, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        flat = pixels.flatten(1).double().cpu()
        nearest = [torch.cdist(flat[i : i + self.batch_size], self.released).amin(1)
                   for i in range(0, len(flat), self.batch_size)]
        return (-torch.cat(nearest)).numpy()


def tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """Highest TPR at an empirical FPR <= ``fpr`` (threshold chosen on the non-members), and that FPR."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    fprs, tprs, _ = roc_curve(labels, np.r_[member_scores, non_member_scores], drop_intermediate=False)
    ok = np.flatnonzero(fprs <= fpr)
    return float(tprs[ok[-1]]), float(fprs[ok[-1]])


def roc_report(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    fprs: Sequence[float] = REPORTED_FPRS,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """ROC AUC and TPR at each FPR, with percentile-bootstrap 95% intervals, and a thinned ROC curve.

    With ``n`` non-members, an FPR below ``1 / n`` can only be met at 0
    false positives; the report keeps ``non_members`` so a reader can see that.
    """
    member_scores, non_member_scores = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    if len(member_scores) < 2 or len(non_member_scores) < 2:
        raise ValueError("roc: need at least two members and two non-members")
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    auc = float(roc_auc_score(labels, scores))
    at = {fpr: tpr_at_fpr(member_scores, non_member_scores, fpr) for fpr in fprs}
    rng = np.random.default_rng(seed)
    aucs, tprs = [], {fpr: [] for fpr in fprs}
    for _ in range(bootstrap):
        members = rng.choice(member_scores, len(member_scores))
        others = rng.choice(non_member_scores, len(non_member_scores))
        aucs.append(roc_auc_score(labels, np.r_[members, others]))
        for fpr in fprs:
            tprs[fpr].append(tpr_at_fpr(members, others, fpr)[0])
    curve_fpr, curve_tpr, _ = roc_curve(labels, scores)
    keep = _thin(curve_fpr)

    def interval(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    return {
        "auc": auc,
        "auc_ci": interval(aucs),
        "tpr_at_fpr": {
            f"{fpr:g}": {"tpr": at[fpr][0], "fpr": at[fpr][1], "ci": interval(tprs[fpr])} for fpr in fprs
        },
        "members": len(member_scores),
        "non_members": len(non_member_scores),
        "ci_method": f"percentile bootstrap, {bootstrap} resamples, 95%",
        "curve": {"fpr": curve_fpr[keep].tolist(), "tpr": curve_tpr[keep].tolist()},
    }


def _thin(fpr: np.ndarray) -> np.ndarray:
    """Indices of at most ``CURVE_POINTS`` ROC points, log-spaced in FPR, always keeping both ends."""
    if len(fpr) <= CURVE_POINTS:
        return np.arange(len(fpr))
    grid = np.logspace(np.log10(max(fpr[fpr > 0].min(), 1e-6)), 0, CURVE_POINTS)
    picked = np.searchsorted(fpr, grid, side="right") - 1
    return np.unique(np.r_[0, np.clip(picked, 0, len(fpr) - 1), len(fpr) - 1])


def tpr_bound(eps: float, delta: float, fpr: float) -> float:
    """The highest TPR an (eps, delta)-DP mechanism allows at ``fpr`` (Kairouz et al. 2015's region)."""
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"dp bound: need eps >= 0 and delta in [0, 1], got eps={eps}, delta={delta}")
    grow = math.exp(eps) * fpr + delta if eps < 700 else math.inf
    mirror = 1 - math.exp(-eps) * (1 - delta - fpr)
    return float(min(1.0, grow, mirror))


@dataclass
class BoundPoint:
    """One (FPR, TPR) point of an attack, the DP bound at its FPR, and the epsilon its counts prove.

    ``proven_epsilon`` is a lower bound on epsilon from the point's member and
    non-member counts (Clopper-Pearson on both rates); ``bound`` is the
    highest TPR the claimed (eps, delta) allows at the measured FPR, for tables.
    """

    source: str
    fpr: float
    tpr: float
    members: int
    non_members: int
    bound: float
    proven_epsilon: float


@dataclass
class BoundCheck:
    """Attack points against a claimed (eps, delta): violated only when the data prove a larger epsilon."""

    eps: float
    delta: float
    confidence: float
    points: list[BoundPoint]

    @property
    def proven_epsilon(self) -> float:
        return max((point.proven_epsilon for point in self.points), default=0.0)

    @property
    def violated(self) -> bool:
        return self.proven_epsilon > self.eps + BOUND_SLACK

    def to_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "delta": self.delta, "confidence": self.confidence,
                "proven_epsilon": self.proven_epsilon, "violated": self.violated,
                "points": [asdict(point) for point in self.points]}


BOUND_SLACK = 1e-9


def dp_bound_check(
    eps: float, delta: float, points: Sequence[tuple[str, float, float, int, int]], confidence: float = CONFIDENCE
) -> BoundCheck:
    """Check attack points ``(source, fpr, tpr, members, non_members)`` against (eps, delta)-DP.

    Pure: no state, no I/O. A measured TPR above ``tpr_bound`` alone proves
    nothing (with no false alarm among 200 non-members the FPR is only known
    to be below 1.8 %): each point's rates are turned into the epsilon they
    prove at ``confidence`` (Bonferroni over the points, so the largest of
    them holds at ``confidence`` too), and the check is violated when that
    exceeds ``eps``.
    """
    each = 1 - (1 - confidence) / max(1, len(points))
    checked = []
    for source, fpr, tpr, members, non_members in points:
        hits, alarms = round(tpr * members), round(fpr * non_members)
        proven = epsilon_lower_bound(hits, members, alarms, non_members, delta, each)
        checked.append(BoundPoint(source, float(fpr), float(tpr), int(members), int(non_members),
                                  tpr_bound(eps, delta, fpr), proven))
    return BoundCheck(float(eps), float(delta), confidence, checked)


def read_privacy(run_dir: Path) -> tuple[float, float, str] | None:
    """``(eps, delta, where)`` of a run's DP guarantee, or None when the run has no privacy ledger.

    Reads ``privacy.json`` (``server.privacy.PrivacyRecorder.write``): the
    worst-case epsilon over the clients, recomputed by the server from each
    client's ledger, and the run's delta. Anything unreadable is logged and
    treated as no ledger.
    """
    path = Path(run_dir) / "privacy.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("%s: unreadable (%s); no privacy ledger taken from it", path, error)
        return None
    eps, delta = (data.get("worst_epsilon"), data.get("delta")) if isinstance(data, dict) else (None, None)
    if isinstance(eps, int | float) and isinstance(delta, int | float) and not isinstance(eps, bool):
        return float(eps), float(delta), path.name
    log.warning("%s: no worst_epsilon/delta; no privacy ledger taken from it", path)
    return None
