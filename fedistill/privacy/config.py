"""The ``[privacy]`` section: record-level differential privacy for each client.

Kept beside the code that reads it (``fedistill.privacy.plan`` and
``session``) and free of imports from the rest of the library, so the privacy
package needs nothing above it; ``ExperimentConfig.privacy`` is a
``PrivacyConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PrivacyConfig(BaseModel):
    """Record-level differential privacy for each client (add/remove one record of that client's data).

    With ``enabled``, clients distil with a private method (``dp-dm``,
    ``dp-gm``) or, under ``fedavg``, train with DP-SGD; every record is
    Poisson-sampled at ``sample_rate`` per release and clipped to
    ``clip_norm``. The per-class counts are released once with noise
    ``count_noise_multiplier`` (std in records). Unless ``noise_multiplier``
    is set, it is calibrated so that the planned run (count release plus all
    rounds' releases) ends at ``target_epsilon`` under ``accountant``.
    A class counts as present (gets images and a count) only if its noisy
    count is at least ``presence_sigmas`` noise stds, so that which classes a
    client has is decided from the release, never from the true counts.
    ``reproducible`` seeds sampling and noise from ``seed`` (tests and
    benchmarks only: whoever knows the seed can remove the noise). Private
    work samples with ``sample_rate``, so ``distill.batch_real`` and
    ``federation.local_batch`` are not used. See docs/privacy.md.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    target_epsilon: float = Field(default=10.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    clip_norm: float = Field(default=1.0, gt=0)
    sample_rate: float = Field(default=0.05, gt=0, le=1)
    noise_multiplier: float | None = Field(default=None, gt=0, description="default: calibrated to target_epsilon")
    count_noise_multiplier: float = Field(default=20.0, gt=0)
    presence_sigmas: float = Field(default=3.0, ge=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    reproducible: bool = False
