"""Privacy accounting: epsilon of a history of Gaussian releases, and noise calibration. Pure functions.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the
form Opacus accountants keep: ``steps`` releases of the Poisson-subsampled
Gaussian mechanism with noise ``noise_multiplier * sensitivity`` on records
each included with probability ``sample_rate`` (``1.0``: no subsampling).
Epsilon comes from Opacus (RDP by default, PRV on request). It is an upper
bound for add/remove-one-record adjacency on the data that was sampled.

PRV can fail or return nonsense at large epsilon (opacus issues 591/601/604);
then the RDP bound is used and the report says so.

Opacus' ``get_noise_multiplier`` calibrates a history of one ``(sigma, q,
steps)`` entry only. Our plans also hold the release of the per-class counts
(another sigma, ``q = 1``), so ``calibrate_noise_multiplier`` bisects over
sigma with the accountant on the whole planned history; it defers to Opacus
where the plan is homogeneous.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
ADJACENCY = "add/remove one record of this client's data"

History = list[tuple[float, float, int]]

CALIBRATION_TOLERANCE = 0.005
"""Calibration stops when the planned epsilon is within this fraction below the target."""

MAX_NOISE_MULTIPLIER = 1e6


class BudgetTooSmall(ValueError):
    """No noise multiplier makes the planned run fit the target epsilon."""


@dataclass(frozen=True)
class Epsilon:
    """An epsilon upper bound with what it is relative to.

    ``accountant`` is the accountant that produced ``value`` (``rdp`` where PRV
    was asked for and failed; ``note`` then says why).
    """

    value: float
    delta: float
    accountant: str
    note: str = ""

    def describe(self) -> str:
        """The one way an epsilon is printed: bound, delta, accountant and adjacency."""
        fallback = f"; {self.note}" if self.note else ""
        return (
            f"epsilon <= {self.value:.4g} at delta = {self.delta:g} "
            f"({self.accountant.upper()} accountant{fallback}; adjacency: {ADJACENCY})"
        )


def merge_history(entries: Iterable[tuple[float, float, int]]) -> History:
    """Entries with the same ``(sigma, q)`` summed into one, in order of first appearance.

    Composition is order-free, and merging makes the ledger's history of many
    rounds and the plan's one-entry history the same input to the accountant,
    so both give bit-identical epsilons.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in entries:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps:
            merged[(float(sigma), float(rate))] = merged.get((float(sigma), float(rate)), 0) + int(steps)
    return [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]


def _check(history: History, delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant: unknown value {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
    for sigma, rate, _ in history:
        if not 0 < rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {rate}")
        if sigma < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {sigma}")


def _opacus_epsilon(history: History, delta: float, accountant: str) -> float:
    acct = create_accountant(mechanism=accountant)
    acct.history = list(history)
    with warnings.catch_warnings():
        # RDP warns when the best order is the largest it tries: the bound is then looser, still valid.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acct.get_epsilon(delta=delta))


def compute_epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> Epsilon:
    """Epsilon spent by ``history`` at ``delta``: Opacus' RDP bound, or PRV's upper bound with RDP as fallback.

    Memoised on the merged history: Opacus' RDP of a subsampled release takes
    a quarter of a second, and a node asks for the same history several
    times a round (budget check, reply), as does the server for each reply.
    """
    merged = merge_history(history)
    _check(merged, delta, accountant)
    return _compute_epsilon(tuple(merged), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _compute_epsilon(merged: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> Epsilon:
    if not merged:
        return Epsilon(0.0, delta, accountant)
    if any(sigma == 0 for sigma, _, _ in merged):
        return Epsilon(math.inf, delta, accountant, "a release without noise")
    if accountant == "prv":
        try:
            value = _opacus_epsilon(merged, delta, "prv")
        except Exception as error:  # noqa: BLE001  (any PRV failure falls back; the reason is kept)
            reason = f"PRV failed ({type(error).__name__}: {error}); RDP bound used"
        else:
            if math.isfinite(value) and value >= 0:
                return Epsilon(value, delta, "prv")
            reason = f"PRV returned {value}; RDP bound used"
        return Epsilon(_opacus_epsilon(merged, delta, "rdp"), delta, "rdp", reason)
    return Epsilon(_opacus_epsilon(merged, delta, "rdp"), delta, "rdp")


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Iterable[tuple[float, float, int]] = (),
) -> float:
    """The smallest noise multiplier (within ``CALIBRATION_TOLERANCE``) for ``steps`` releases at ``sample_rate``
    such that ``prior`` plus those releases spend at most ``target_epsilon``.

    Raises BudgetTooSmall when ``prior`` alone (or any noise up to 1e6) exceeds the target.
    """
    if target_epsilon <= 0:
        raise ValueError(f"privacy.target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    prior_history = merge_history(prior)
    tolerance = CALIBRATION_TOLERANCE * target_epsilon
    if not prior_history and accountant == "rdp":
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    epsilon_tolerance=tolerance,
                )
            )
        except ValueError as error:
            raise BudgetTooSmall(f"privacy.target_epsilon = {target_epsilon}: {error}") from None

    def spent(sigma: float) -> Epsilon:
        return compute_epsilon([*prior_history, (sigma, sample_rate, steps)], delta, accountant)

    floor = compute_epsilon(prior_history, delta, accountant).value
    if floor >= target_epsilon:
        raise BudgetTooSmall(
            f"privacy.target_epsilon = {target_epsilon}: the other releases alone spend epsilon {floor:.4g}"
        )
    low, high = 0.0, 1.0
    high_eps = spent(high).value
    while high_eps > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetTooSmall(
                f"privacy.target_epsilon = {target_epsilon} needs noise beyond {MAX_NOISE_MULTIPLIER:g}"
            )
        high_eps = spent(high).value
    while target_epsilon - high_eps > tolerance:
        middle = (low + high) / 2
        value = spent(middle).value
        if value <= target_epsilon:
            high, high_eps = middle, value
        else:
            low = middle
        if high - low < 1e-9 * high:
            break
    return high
