"""Distillation methods behind one interface; importing this package registers them all."""

from fedistill.distill import coresets, dm, gm  # noqa: F401  (registration side effect)
from fedistill.distill.base import (
    Distiller,
    DistillSettings,
    IterationHook,
    ProgressFn,
    available_methods,
    get_distiller,
    register,
)

__all__ = [
    "DistillSettings",
    "Distiller",
    "IterationHook",
    "ProgressFn",
    "available_methods",
    "get_distiller",
    "register",
]
