"""Distillation methods behind one interface; importing this package registers them all."""

from fedistill.distill import coresets, dm, dp_dm, dp_gm, gm, mtt, rded  # noqa: F401  (registration side effect)
from fedistill.distill.base import (
    Distiller,
    DistillSettings,
    IterationHook,
    ProgressFn,
    available_methods,
    get_distiller,
    register,
)
from fedistill.distill.private import PrivateDistiller

__all__ = [
    "DistillSettings",
    "Distiller",
    "IterationHook",
    "PrivateDistiller",
    "ProgressFn",
    "available_methods",
    "get_distiller",
    "register",
]
