"""One-run privacy auditing (Steinke, Nasr and Jagielski, NeurIPS 2023): an epsilon lower bound from one release.

``m`` canary records are each put into the private data with probability 1/2,
independently; the mechanism runs once; an auditor scores every canary,
guesses "in" for the highest scores and "out" for the lowest (abstaining on the
rest) and counts its correct guesses. Under (epsilon, delta)-DP, ``v`` or more
correct out of ``r`` guesses is at most as likely as ``Binomial(r, e^eps /
(1 + e^eps)) >= v`` plus a delta term (the paper's Theorem 3 / Appendix D):

    p(eps) = P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Bin(r, q) < v] / i,  q = e^eps / (1 + e^eps).

Every epsilon with ``p(eps) < significance`` is rejected, so the largest such
epsilon is a lower bound at confidence ``1 - significance``. Trying several
guess counts is paid for by a Bonferroni split of the significance, so the
maximum over them is still a valid bound. Pure functions; written from the
paper's statement (no maintained library ships it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

SIGNIFICANCE = 0.05
GUESS_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
"""Shares of the canaries guessed on (half "in", half "out"); the significance is split over them."""
EPSILON_CEILING = 50.0


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The largest probability an (epsilon, delta)-DP mechanism allows of ``correct`` or more right guesses."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"one-run audit: need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"one-run audit: need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)  # P[Bin = v - i] for i = 1..v
    slack = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * canaries * delta * slack)


def one_run_epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float, significance: float = SIGNIFICANCE
) -> float:
    """The largest epsilon the guesses reject at ``significance`` (0 when they reject none), by bisection."""
    if not 0 < significance < 1:
        raise ValueError(f"one-run audit: significance must be in (0, 1), got {significance}")
    if one_run_p_value(canaries, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(canaries, guesses, correct, high, delta) < significance:
        if high >= EPSILON_CEILING:
            return EPSILON_CEILING
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        if one_run_p_value(canaries, guesses, correct, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class OneRunAudit:
    """The guesses at each tried count and the bound they prove together."""

    canaries: int
    included: int
    delta: float
    significance: float
    trials: list[dict[str, float]]
    epsilon_lower_bound: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    significance: float = SIGNIFICANCE,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> OneRunAudit:
    """Guess "in" for the top and "out" for the bottom scores at each fraction; the Bonferroni-corrected bound."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"one-run audit: need one score per canary (>= 2), got {scores.shape} and {included.shape}")
    canaries = len(scores)
    order = np.argsort(-scores, kind="stable")
    each = significance / len(fractions)
    trials = []
    for fraction in fractions:
        side = max(1, int(fraction * canaries) // 2)
        correct = int(included[order[:side]].sum() + (~included[order[canaries - side:]]).sum())
        bound = one_run_epsilon_lower_bound(canaries, 2 * side, correct, delta, each)
        trials.append({"guesses": 2 * side, "correct": correct, "epsilon_lower_bound": bound})
    best = max(trial["epsilon_lower_bound"] for trial in trials)
    return OneRunAudit(canaries, int(included.sum()), delta, significance, trials, best)


__all__ = ["GUESS_FRACTIONS", "SIGNIFICANCE", "OneRunAudit", "audit_scores", "one_run_epsilon_lower_bound",
           "one_run_p_value"]
