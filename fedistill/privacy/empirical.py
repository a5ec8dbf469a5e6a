"""Empirical lower bounds on epsilon: what a distinguisher's hits and false alarms prove. Pure functions.

An (epsilon, delta)-DP mechanism lets no test tell two neighbouring datasets
apart better than ``TPR <= e^eps * FPR + delta`` (and the mirror
``1 - FPR <= e^eps * (1 - TPR) + delta``). Turning measured rates into a
bound on epsilon needs confidence intervals, not point estimates: with no
false alarm in 200 trials the FPR is not 0, only "below 1.8 % at 95 %".
``epsilon_lower_bound`` uses Clopper-Pearson bounds on both rates (the
confidence split between them), so the epsilon it returns holds at the
stated confidence; a bound above the claimed epsilon proves the claim wrong.

``distinguish`` is the generic test of the suite's neighbouring-dataset
checks: many runs of a mechanism on each of two neighbouring datasets, a
threshold test picked on one half of the runs (over every output coordinate
and the projection on the mean difference), its bound measured on the other
half, so that picking the best test does not bias the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

CONFIDENCE = 0.95
MAX_COORDINATES = 256
"""Outputs up to this width are also tested coordinate by coordinate (counts, labels); wider ones by projection only."""


def _clopper_pearson(successes: np.ndarray, trials: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = 1 - confidence
    with np.errstate(invalid="ignore"):
        low = np.where(successes == 0, 0.0, beta.ppf(alpha / 2, successes, trials - successes + 1))
        high = np.where(successes == trials, 1.0, beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial rate (each tail ``(1 - confidence) / 2``)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"clopper_pearson: need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    low, high = _clopper_pearson(np.asarray(successes), trials, confidence)
    return float(low), float(high)


def _lower_bounds(hits: np.ndarray, positives: int, alarms: np.ndarray, negatives: int, delta: float,
                  confidence: float) -> np.ndarray:
    """``epsilon_lower_bound`` over arrays of hit and false-alarm counts."""
    rate_confidence = 1 - (1 - confidence) / 2
    tpr_low, _ = _clopper_pearson(hits, positives, rate_confidence)
    _, fpr_high = _clopper_pearson(alarms, negatives, rate_confidence)
    tiny = 1e-300
    with np.errstate(divide="ignore", invalid="ignore"):
        grow = np.where(tpr_low - delta > 0, np.log(np.maximum(tpr_low - delta, tiny) / fpr_high), 0.0)
        mirror = np.where(1 - fpr_high - delta > 0,
                          np.log(np.maximum(1 - fpr_high - delta, tiny) / (1 - tpr_low)), 0.0)
    return np.maximum(0.0, np.maximum(grow, mirror))


def epsilon_lower_bound(
    true_positives: int, positives: int, false_positives: int, negatives: int, delta: float,
    confidence: float = CONFIDENCE,
) -> float:
    """The largest epsilon that ``true_positives``/``positives`` and ``false_positives``/``negatives`` prove.

    Holds with probability at least ``confidence``: both inequalities are
    read with the TPR at its lower and the FPR at its upper Clopper-Pearson
    bound, each rate's interval at ``1 - (1 - confidence) / 2`` so that both
    hold together.
    """
    for name, count, total in (("true", true_positives, positives), ("false", false_positives, negatives)):
        if total < 1 or not 0 <= count <= total:
            raise ValueError(f"epsilon_lower_bound: {name} positives {count} of {total}")
    bound = _lower_bounds(np.asarray(true_positives), positives, np.asarray(false_positives), negatives, delta,
                          confidence)
    return float(bound)


@dataclass(frozen=True)
class Distinction:
    """The best threshold test found on neighbouring outputs and the epsilon it proves on held-out runs."""

    epsilon: float
    rule: str
    tpr: float
    fpr: float
    runs: int


def _statistics(first: np.ndarray, second: np.ndarray, direction: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """Candidate scalar statistics of each run: the projection on ``direction`` and, for small outputs, each value."""
    stats = {"projection": (first @ direction, second @ direction)}
    if first.shape[1] <= MAX_COORDINATES:
        stats.update({f"value {i}": (first[:, i], second[:, i]) for i in range(first.shape[1])})
    return stats


def _best_test(first: np.ndarray, second: np.ndarray, delta: float) -> tuple[float, float, float]:
    """(bound, threshold, sign) of the rule ``sign * x > sign * threshold`` that best tells ``second`` from ``first``."""
    thresholds = np.unique(np.quantile(np.concatenate([first, second]), np.linspace(0, 1, 101)))
    best = (-1.0, float(thresholds[0]), 1.0)
    for sign in (1.0, -1.0):
        hits = (sign * second[:, None] > sign * thresholds[None, :]).sum(0)
        alarms = (sign * first[:, None] > sign * thresholds[None, :]).sum(0)
        bounds = _lower_bounds(hits, len(second), alarms, len(first), delta, CONFIDENCE)
        at = int(np.argmax(bounds))
        if bounds[at] > best[0]:
            best = (float(bounds[at]), float(thresholds[at]), sign)
    return best


def distinguish(first: np.ndarray, second: np.ndarray, delta: float, confidence: float = CONFIDENCE) -> Distinction:
    """An epsilon lower bound from runs of a mechanism on two neighbouring datasets (rows: runs; columns: outputs).

    The first half of each side's runs picks the statistic, threshold and
    direction; the second half measures that one test, so the bound holds at
    ``confidence`` whatever was tried on the first half.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise ValueError(f"distinguish: need two (runs, values) arrays of one width, got {first.shape}, {second.shape}")
    if min(len(first), len(second)) < 4:
        raise ValueError("distinguish: need at least 4 runs on each side")
    half_first, half_second = len(first) // 2, len(second) // 2
    direction = second[:half_second].mean(0) - first[:half_first].mean(0)
    picking = _statistics(first[:half_first], second[:half_second], direction)
    testing = _statistics(first[half_first:], second[half_second:], direction)
    best = (-1.0, "projection", 0.0, 1.0)
    for name, (a, b) in picking.items():
        score, threshold, sign = _best_test(a, b, delta)
        if score > best[0]:
            best = (score, name, threshold, sign)
    _, name, threshold, sign = best
    a, b = testing[name]
    hits, alarms = int((sign * b > sign * threshold).sum()), int((sign * a > sign * threshold).sum())
    epsilon = epsilon_lower_bound(hits, len(b), alarms, len(a), delta, confidence)
    rule = f"{name} {'>' if sign > 0 else '<'} {threshold:.4g}"
    return Distinction(epsilon, rule, hits / len(b), alarms / len(a), len(a) + len(b))
