"""The privacy plan of a run: every release a client will make, and the noise calibrated for all of them.

A client's planned history is the per-class count release (once, noise
``count_noise_multiplier``, no subsampling) plus, in each of ``rounds``
rounds, ``steps_per_round`` releases at ``(noise_multiplier, sample_rate)``:
distillation steps of a private method (``Distiller.releases``) or DP-SGD
steps of DP-FedAvg. Unless ``privacy.noise_multiplier`` is given, the noise
is calibrated so that the whole planned run ends at (just under)
``privacy.target_epsilon``; a client that took part in every round then
ends there too, and one asked for more rounds than planned refuses. A plan
with no releases (a private distiller at zero iterations: the set is its
public start) spends only the count release and needs no noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fedistill.privacy.accounting import BudgetTooSmall, Epsilon, calibrate_noise_multiplier, compute_epsilon
from fedistill.privacy.config import PrivacyConfig
from fedistill.privacy.ledger import Access
from fedistill.privacy.mechanisms import CLASS_COUNTS

DP_SGD = "dp-sgd"


@dataclass(frozen=True)
class PrivacyPlan:
    """The planned releases of one client over a run and the noise they use."""

    mechanism: str
    target_epsilon: float
    delta: float
    accountant: str
    sample_rate: float
    clip_norm: float
    count_noise_multiplier: float
    presence_sigmas: float
    noise_multiplier: float
    steps_per_round: int
    rounds: int

    def count_access(self, server_round: int) -> Access:
        return Access(CLASS_COUNTS, self.count_noise_multiplier, 1.0, 1, server_round)

    def round_accesses(self, server_round: int, counts_released: bool) -> list[Access]:
        """The releases of one round (with the count release if it has not happened yet)."""
        counts = [] if counts_released else [self.count_access(server_round)]
        if self.steps_per_round == 0:
            return counts
        return [*counts, Access(self.mechanism, self.noise_multiplier, self.sample_rate, self.steps_per_round, server_round)]

    def history(self) -> list[tuple[float, float, int]]:
        """The whole planned run as an accountant history."""
        counts = (self.count_noise_multiplier, 1.0, 1)
        steps = self.steps_per_round * self.rounds
        return [counts, (self.noise_multiplier, self.sample_rate, steps)] if steps else [counts]

    def planned_epsilon(self) -> Epsilon:
        return compute_epsilon(self.history(), self.delta, self.accountant)


def dp_sgd_steps_per_epoch(sample_rate: float) -> int:
    """DP-SGD steps per epoch, ``int(1 / q)`` as Opacus' Poisson sampler counts them (independent of the data size)."""
    return max(1, int(1 / sample_rate))


@functools.lru_cache(maxsize=64)
def calibrated_plan(privacy_json: str, mechanism: str, steps: int, rounds: int) -> PrivacyPlan:
    """The plan of ``rounds`` rounds of ``steps`` releases each under the privacy section (given as JSON, to cache)."""
    privacy = PrivacyConfig.model_validate_json(privacy_json)
    sigma = privacy.noise_multiplier
    if steps * rounds == 0:
        sigma = 0.0  # nothing is released beyond the counts, so nothing needs noise
    elif sigma is None:
        counts = [(privacy.count_noise_multiplier, 1.0, 1)]
        try:
            sigma = calibrate_noise_multiplier(
                privacy.target_epsilon, privacy.delta, privacy.sample_rate, steps * rounds, privacy.accountant,
                prior=counts,
            )
        except BudgetTooSmall:
            floor = compute_epsilon(counts, privacy.delta, privacy.accountant).value
            raise BudgetTooSmall(
                f"privacy.target_epsilon = {privacy.target_epsilon:g} cannot be met: the class-count release alone "
                f"spends {floor:.3g} (privacy.count_noise_multiplier = {privacy.count_noise_multiplier:g}), so the "
                f"smallest target that works is just above {floor:.3g}; raise privacy.target_epsilon or "
                "privacy.count_noise_multiplier"
            ) from None
    return PrivacyPlan(
        mechanism=mechanism,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
        sample_rate=privacy.sample_rate,
        clip_norm=privacy.clip_norm,
        count_noise_multiplier=privacy.count_noise_multiplier,
        presence_sigmas=privacy.presence_sigmas,
        noise_multiplier=float(sigma),
        steps_per_round=steps,
        rounds=rounds,
    )
