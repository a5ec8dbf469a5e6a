"""One client's private round: the budget check before it, and what a private method is handed for it.

``check_round`` says whether the round's planned releases fit the client's
remaining budget (a client that would exceed it refuses the round);
``open_round`` releases (or reuses) the noisy per-class counts and bundles
everything a private method needs: counts, sampling rate, clip norm, noise,
the ledger and the secret generator.

The secret generator drives Poisson sampling and noise. Unless
``privacy.reproducible`` is set it is seeded from the operating system's
entropy: anyone who knows the seed (the server does: it sends the
experiment) could otherwise regenerate and subtract the noise.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from fedistill.privacy.config import PrivacyConfig
from fedistill.privacy.ledger import Access, PrivacyLedger
from fedistill.privacy.mechanisms import CLASS_COUNTS, GaussianMechanism, poisson_sample, release_class_counts
from fedistill.privacy.plan import PrivacyPlan


def secret_generator(privacy: PrivacyConfig, seed: int) -> torch.Generator:
    """The generator of Poisson sampling and noise: OS entropy, or ``seed`` when ``privacy.reproducible``."""
    value = seed if privacy.reproducible else secrets.randbits(63)
    return torch.Generator().manual_seed(value)


def new_ledger(plan: PrivacyPlan) -> PrivacyLedger:
    return PrivacyLedger(delta=plan.delta, accountant=plan.accountant)


UNRECORDED = "unrecorded-"
"""Prefix of the mechanism name of releases charged for rounds the node cannot account for."""


def charge_unrecorded_rounds(plan: PrivacyPlan, ledger: PrivacyLedger, server_round: int) -> list[int]:
    """Charge every round between the ledger's last and ``server_round`` as if the node had spent it in full.

    For a ledger the node did not keep itself (one the server gave back
    after a restart, or none at all): the node may have made releases in
    those rounds that never reached the copy it holds (it crashed after
    releasing, or its reply was rejected), and may have started afresh in
    each, releasing its class counts again. Charging the planned releases
    plus a count release per round keeps the epsilon an upper bound; a node
    that simply was not asked pays for rounds it did not use. Returns the
    rounds charged.
    """
    last = max(ledger.rounds(), default=0)
    charged = list(range(last + 1, server_round))
    for unrecorded in charged:
        for access in plan.round_accesses(unrecorded, counts_released=False):
            ledger.record(Access(UNRECORDED + access.mechanism, access.noise_multiplier, access.sample_rate,
                                 access.steps, access.round))
    return charged


def check_round(plan: PrivacyPlan, ledger: PrivacyLedger, server_round: int) -> str | None:
    """None if this round's planned releases keep the ledger within ``target_epsilon``; else why the client refuses."""
    planned = plan.round_accesses(server_round, counts_released=ledger.released(CLASS_COUNTS) is not None)
    after = ledger.epsilon(planned)
    if after.value > plan.target_epsilon:
        spent = ledger.epsilon()
        return (
            f"round {server_round} would bring epsilon from {spent.value:.4g} to {after.value:.4g}, "
            f"above privacy.target_epsilon = {plan.target_epsilon:g} ({after.accountant.upper()}, delta {plan.delta:g})"
        )
    return None


@dataclass
class PrivateData:
    """What a differentially private method gets besides the images, for one round of one client.

    ``counts`` are the released (noisy) per-class counts: they set the
    per-class image budgets, the expected sample sizes that normalise noisy
    sums, and the set's ``source_counts``; the true counts are never used.
    """

    counts: np.ndarray
    sample_rate: float
    clip_norm: float
    noise_multiplier: float
    ledger: PrivacyLedger
    generator: torch.Generator
    server_round: int

    def mechanism(self, name: str) -> GaussianMechanism:
        """A Gaussian mechanism of sensitivity ``clip_norm`` recording into this client's ledger."""
        return GaussianMechanism(name, self.noise_multiplier, self.clip_norm, self.ledger, self.generator,
                                 self.server_round)

    def budgets(self, ipc: int) -> np.ndarray:
        """Synthetic images per class: ``min(ipc, released count)``; none for classes released as absent (count 0)."""
        return np.minimum(np.maximum(self.counts, 0), ipc).astype(np.int64)

    def expected_counts(self) -> np.ndarray:
        """Expected records per class in one Poisson sample: ``sample_rate * released count`` (at least one record)."""
        return self.sample_rate * np.maximum(self.counts, 1).astype(np.float64)

    def sample(self, count: int) -> torch.Tensor:
        """Poisson-sampled record indices (secret randomness)."""
        return poisson_sample(count, self.sample_rate, self.generator)


def open_round(
    plan: PrivacyPlan,
    ledger: PrivacyLedger,
    labels: np.ndarray,
    num_classes: int,
    server_round: int,
    generator: torch.Generator,
) -> PrivateData:
    """Release the noisy class counts (first round only; later rounds reuse them) and bundle the round's inputs."""
    counts = release_class_counts(labels, num_classes, ledger, plan.count_noise_multiplier, generator, server_round,
                                  plan.presence_sigmas)
    return PrivateData(
        counts=counts,
        sample_rate=plan.sample_rate,
        clip_norm=plan.clip_norm,
        noise_multiplier=plan.noise_multiplier,
        ledger=ledger,
        generator=generator,
        server_round=server_round,
    )
