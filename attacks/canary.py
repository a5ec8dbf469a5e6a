"""One-run canary audit of a client's release: an empirical lower bound on epsilon beside the ledger's.

``canary_audit`` draws ``count`` canary records (real images no client holds:
test images, seeded), puts each into the client's data with probability 1/2,
runs the client's release once (``Releaser``: the node's own code path, given
by the caller so that this floor stays free of Flower), scores every canary
by its nearest-neighbour distance to the released set and turns the guesses
into a lower bound on epsilon (``fedistill.privacy.one_run``). A bound above
the ledger's epsilon proves the release is not as private as printed; for a
non-private release any bound above 0 is a measured leak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacks.membership import NearestNeighbour
from attacks.pixels import to_pixels
from fedistill.config import ConfigError
from fedistill.data import ImageData, denormalize
from fedistill.privacy.one_run import SIGNIFICANCE, audit_scores
from fedistill.synthetic import SyntheticSet

log = logging.getLogger("fedistill.attacks")

CANARY_SEED_OFFSET = 90_001
NON_PRIVATE_DELTA = 0.0
"""A non-private release claims nothing; its bound is computed as for pure DP (delta 0)."""


@dataclass(frozen=True)
class Release:
    """What a client's release gives the audit: the set, and the ledger's (epsilon, delta) after it (None: not private)."""

    released: SyntheticSet
    epsilon: float | None
    delta: float | None


Releaser = Callable[[ImageData], Release]
"""Runs the client's release (round 1) on the given data, as the node would."""


def with_canaries(data: ImageData, pool: ImageData, count: int, seed: int) -> tuple[ImageData, ImageData, np.ndarray]:
    """The client's data plus the included canaries; the ``count`` canaries drawn from ``pool``; who went in."""
    if not 2 <= count <= len(pool):
        raise ConfigError(f"attack.canary.count: must be between 2 and {len(pool)} (the canary pool), got {count}")
    rng = np.random.default_rng(seed + CANARY_SEED_OFFSET)
    canaries = pool.subset(np.sort(rng.choice(len(pool), count, replace=False)))
    included = rng.random(count) < 0.5
    chosen = canaries.subset(included)
    merged = ImageData(np.concatenate([data.images, chosen.images]), np.concatenate([data.labels, chosen.labels]),
                       data.info)
    return merged, canaries, included


def canary_audit(
    data: ImageData,
    pool: ImageData,
    release: Releaser,
    count: int,
    seed: int,
    device: torch.device,
    significance: float = SIGNIFICANCE,
) -> dict[str, Any]:
    """Insert canaries, release once, guess who went in from the set; the bound beside the claimed epsilon."""
    merged, canaries, included = with_canaries(data, pool, count, seed)
    result = release(merged)
    released = denormalize(result.released.decoded().images, data.info).to(device)
    scores = NearestNeighbour(released).scores(to_pixels(canaries, device), torch.from_numpy(canaries.labels))
    delta = NON_PRIVATE_DELTA if result.delta is None else result.delta
    audit = audit_scores(scores, included, delta, significance)
    violated = result.epsilon is not None and audit.epsilon_lower_bound > result.epsilon
    if violated:
        log.error("CANARY AUDIT: the release proves epsilon >= %.3g at %.0f%% confidence, above the ledger's %.3g "
                  "(delta %.3g)", audit.epsilon_lower_bound, 100 * (1 - significance), result.epsilon, delta)
    return {
        "attack": "nn-distance (canary to its nearest released image)",
        "records": "test images, each put into the client's data with probability 1/2",
        **audit.to_dict(),
        "claimed_epsilon": result.epsilon,
        "claimed_delta": result.delta,
        "violated": violated,
    }


__all__ = ["Release", "Releaser", "canary_audit", "with_canaries"]
