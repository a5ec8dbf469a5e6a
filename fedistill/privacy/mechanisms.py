"""Mechanisms: Poisson sampling, per-record clipping, per-class sums, and the Gaussian release.

The pure functions compute what is released before noise; ``GaussianMechanism``
is the only place noise is drawn (through ``gaussian_noise``), and it records
every release in the client's ledger as it draws, so a release that is not
accounted cannot happen. Why one accountant step covers all classes of one
release: each record belongs to exactly one class, so adding or removing one
record changes one class's clipped sum by at most ``clip_norm`` and leaves
the others alone; the stacked per-class sums have L2 sensitivity ``clip_norm``,
and every record was included with the same probability ``sample_rate``.
"""

from __future__ import annotations

import numpy as np
import torch

from fedistill.privacy.ledger import Access, PrivacyLedger

CLASS_COUNTS = "class-counts"
"""Ledger name of the per-class count release (and of its stored noisy value)."""


def poisson_sample(count: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices (CPU, int64) of the records kept when each of ``count`` is included with probability ``sample_rate``.

    This is the sampling the subsampled-Gaussian accountant assumes; a
    shuffled fixed-size batch is a different (weaker) guarantee.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"privacy.sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate == 1:
        return torch.arange(count)
    return torch.nonzero(torch.rand(count, generator=generator) < sample_rate, as_tuple=False).flatten()


def clip_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each row scaled down to L2 norm at most ``clip_norm`` (rows already within it are unchanged); differentiable."""
    norms = rows.flatten(1).norm(dim=1)
    factors = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return rows * factors.view(-1, *([1] * (rows.ndim - 1)))


def clipped_class_sums(rows: torch.Tensor, groups: torch.Tensor, num_groups: int, clip_norm: float) -> torch.Tensor:
    """Per group, the sum of the group's rows clipped to ``clip_norm`` (float64, shape ``(num_groups, D)``).

    ``groups[i]`` is the group (class slot) of row ``i``. Computed in float64
    so that rounding cannot push a clipped row above the clip norm by more
    than ~1e-15 of it.
    """
    flat = rows.detach().flatten(1).double()
    clipped = clip_rows(flat, clip_norm)
    sums = torch.zeros((num_groups, flat.shape[1]), dtype=torch.float64, device=flat.device)
    if len(flat):
        sums.index_add_(0, groups.to(flat.device), clipped)
    return sums


def gaussian_noise(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise (float64, CPU) drawn from ``generator``: the single source of DP noise in fedistill."""
    return torch.normal(0.0, std, size=tuple(shape), generator=generator, dtype=torch.float64)


class GaussianMechanism:
    """Adds ``N(0, (noise_multiplier * sensitivity)^2)`` to a released value and records the release.

    One mechanism serves one kind of release (``name``) in one round of one
    client; ``releases`` counts what it has released. A plan with no releases
    has no noise (multiplier 0); its mechanism exists but refuses to release.
    """

    def __init__(
        self,
        name: str,
        noise_multiplier: float,
        sensitivity: float,
        ledger: PrivacyLedger,
        generator: torch.Generator,
        server_round: int,
    ) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"{name}: noise multiplier must be >= 0, got {noise_multiplier}")
        if sensitivity <= 0:
            raise ValueError(f"{name}: sensitivity must be > 0, got {sensitivity}")
        self.name = name
        self.noise_multiplier = float(noise_multiplier)
        self.sensitivity = float(sensitivity)
        self.ledger = ledger
        self.generator = generator
        self.server_round = server_round
        self.releases = 0

    def release(self, clean: torch.Tensor, sample_rate: float) -> torch.Tensor:
        """``clean`` plus fresh noise, drawn once; records one step at ``sample_rate`` in the ledger first."""
        if self.noise_multiplier == 0:
            raise RuntimeError(f"{self.name}: no noise was planned (a plan without releases); refusing to release")
        self.ledger.record(Access(self.name, self.noise_multiplier, float(sample_rate), 1, self.server_round))
        self.releases += 1
        noise = gaussian_noise(clean.shape, self.noise_multiplier * self.sensitivity, self.generator)
        return clean.detach().double() + noise.to(clean.device)


def presence_threshold(count_noise_multiplier: float, presence_sigmas: float) -> float:
    """Released count a class needs to count as present: ``presence_sigmas`` noise stds (at least half a record).

    With 3 stds, a class the client has no record of is released as present
    with probability 0.13 %, and with a lone record 0.16 % (noise std 20):
    a ratio of 1.18, within the release's epsilon.
    """
    return max(0.5, presence_sigmas * count_noise_multiplier)


def release_class_counts(
    labels: np.ndarray,
    num_classes: int,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    generator: torch.Generator,
    server_round: int,
    presence_sigmas: float,
) -> np.ndarray:
    """The client's per-class counts, released once with Gaussian noise (L2 sensitivity 1) and reused after.

    A record is in one class, so adding or removing it changes one count by
    one. Which classes are present is decided from the noisy counts alone:
    a class whose noisy count is below ``presence_threshold`` is released as
    0 (no images, no count), the others as their rounded noisy count. Both
    are post-processing of the one release, so the class presence, the set's
    labels and size and ``num-examples`` are covered by its epsilon under
    add/remove-one-record adjacency. Later calls return the stored release
    without drawing noise again.
    """
    stored = ledger.released(CLASS_COUNTS)
    if stored is not None:
        if len(stored) != num_classes:
            raise ValueError(f"stored {CLASS_COUNTS} have {len(stored)} classes, the data {num_classes}")
        return np.asarray(stored, dtype=np.int64)
    true = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    mechanism = GaussianMechanism(CLASS_COUNTS, noise_multiplier, 1.0, ledger, generator, server_round)
    noisy = mechanism.release(torch.from_numpy(true.astype(np.float64)), sample_rate=1.0).numpy()
    present = noisy >= presence_threshold(noise_multiplier, presence_sigmas)
    counts = np.where(present, np.rint(noisy), 0).astype(np.int64)
    ledger.remember(CLASS_COUNTS, counts.tolist())
    return counts
