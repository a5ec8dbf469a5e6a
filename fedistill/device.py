"""Choose the compute device once; everything else receives it as an argument."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; asking for CUDA without one is an error, not a silent fallback."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available; allowed here: auto, cpu")
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"device: unknown device {preference!r}; allowed: auto, cpu, cuda")
    return torch.device(preference)
