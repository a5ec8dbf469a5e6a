"""Differential privacy for fedistill: mechanisms, Opacus accounting, the per-client ledger and the run's plan.

Record-level DP for each client under add/remove-one-record adjacency on that
client's data (see docs/privacy.md). No Flower import here: the client and
server glue lives in ``clients.private`` and ``server.privacy``.
"""

from fedistill.privacy.accounting import (
    ACCOUNTANTS,
    ADJACENCY,
    BudgetTooSmall,
    Epsilon,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from fedistill.privacy.config import PrivacyConfig
from fedistill.privacy.ledger import Access, PrivacyLedger
from fedistill.privacy.mechanisms import (
    CLASS_COUNTS,
    GaussianMechanism,
    clip_rows,
    clipped_class_sums,
    gaussian_noise,
    poisson_sample,
    release_class_counts,
)
from fedistill.privacy.per_record import per_record_gradients
from fedistill.privacy.plan import DP_SGD, PrivacyPlan
from fedistill.privacy.session import (
    PrivateData,
    charge_unrecorded_rounds,
    check_round,
    new_ledger,
    open_round,
    secret_generator,
)

__all__ = [
    "ACCOUNTANTS",
    "ADJACENCY",
    "CLASS_COUNTS",
    "DP_SGD",
    "Access",
    "BudgetTooSmall",
    "Epsilon",
    "GaussianMechanism",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivacyPlan",
    "PrivateData",
    "calibrate_noise_multiplier",
    "charge_unrecorded_rounds",
    "check_round",
    "clip_rows",
    "clipped_class_sums",
    "compute_epsilon",
    "gaussian_noise",
    "new_ledger",
    "open_round",
    "per_record_gradients",
    "poisson_sample",
    "release_class_counts",
    "secret_generator",
]
