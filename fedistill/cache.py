"""Content-addressed cache keys: what was trained on real data (experts, teachers) is named by what determines it.

A file's name is a digest of a JSON key that holds the data's fingerprint
and every setting of the training, so a file is reused only for the very
same inputs, and nodes and runs may share one cache directory.
"""

from __future__ import annotations

import hashlib
import json

import torch

CACHE_DIR = ".cache"
"""The cache's folder in ``output_dir``: every run and node writing there shares what it trained."""


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of the images' and labels' bytes, dtypes and shapes: the data part of a cache key."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        host = tensor.detach().cpu().contiguous()
        digest.update(f"{host.dtype}{tuple(host.shape)}".encode())
        digest.update(host.numpy().tobytes())
    return digest.hexdigest()


def key_digest(key: dict[str, object]) -> str:
    """A short, stable name for a cache key (sorted JSON, SHA-256, 32 hex digits)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
