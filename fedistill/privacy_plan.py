"""The privacy plan of an experiment: which releases its private work makes, calibrated for the whole run.

It joins two floors that must not know each other: the private distillers
(``fedistill.distill``, which say how many releases a round of theirs makes)
and the privacy accounting (``fedistill.privacy.plan``, which calibrates the
noise for a planned history). ``fedistill.distill`` uses the privacy
mechanisms, so this step lives above both rather than inside the privacy
package.
"""

from __future__ import annotations

from fedistill.config import ExperimentConfig
from fedistill.distill import get_distiller
from fedistill.privacy.plan import DP_SGD, PrivacyPlan, calibrated_plan, dp_sgd_steps_per_epoch


def releases_per_round(config: ExperimentConfig) -> tuple[str, int]:
    """(mechanism name, releases per round) of the experiment's private work on a client."""
    if config.federation.protocol == "fedavg":
        return DP_SGD, config.federation.local_epochs * dp_sgd_steps_per_epoch(config.privacy.sample_rate)
    method = get_distiller(config.distill.method)
    if not method.private:
        raise ValueError(f"distill.method: {config.distill.method!r} is not a private method")
    return config.distill.method, method.releases(config.distill.settings(config.data.name))


def plan_privacy(config: ExperimentConfig) -> PrivacyPlan:
    """The plan of ``config`` (which must have ``privacy.enabled``); calibration is cached per configuration."""
    if not config.privacy.enabled:
        raise ValueError("plan_privacy: privacy.enabled is false")
    mechanism, steps = releases_per_round(config)
    return calibrated_plan(config.privacy.model_dump_json(), mechanism, steps, config.federation.rounds)
