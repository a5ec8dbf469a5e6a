"""Server checkpoints: everything a federated run needs to continue after its last complete round, in one file.

A checkpoint is one safetensors file, ``checkpoint.safetensors`` in the run
directory: tensors (global model, aggregate, the sets kept per partition, RNG
states) plus one JSON document in the file's string metadata (round, history,
kept client state, the experiment it belongs to). One file replaced atomically
(``fedistill.atomic``) means a crash at any moment leaves either the previous
round's checkpoint or the new one, never a mix of two rounds. Loading never
unpickles anything: safetensors holds raw tensors and the metadata is JSON, so
a checkpoint copied from another machine cannot run code.

The library knows nothing about the protocol inside (``server.state`` and
``server.baselines`` decide what goes in); it only writes, reads and checks
the envelope, and captures and restores the process's random number
generators.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedistill.atomic import save_tensors

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedistill-checkpoint"
VERSION = 1
RNG_PREFIX = "rng/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, phrased as ``path: what is wrong``."""


@dataclass
class Checkpoint:
    """State after ``round`` complete rounds: named tensors and a JSON-ready document."""

    round: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix/`` (e.g. ``"global"``), with the prefix stripped."""
        start = f"{prefix}/"
        return {key[len(start) :]: value for key, value in self.tensors.items() if key.startswith(start)}

    def put(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``prefix/``."""
        for key, value in tensors.items():
            self.tensors[f"{prefix}/{key}"] = value


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Atomically replace the run's checkpoint with ``checkpoint`` (the process's RNG states included)."""
    tensors, rng = capture_rng()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "round": str(checkpoint.round),
        "state": json.dumps({**checkpoint.state, "rng": rng}, allow_nan=True),
    }
    return save_tensors(checkpoint_path(run_dir), {**checkpoint.tensors, **tensors}, metadata)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's checkpoint, or None if it has none yet (killed before its first round completed).

    Raises CheckpointError if the file is not a fedistill checkpoint of this
    version or cannot be read. The RNG states are left in the returned
    checkpoint; ``restore_rng`` applies them.
    """
    from safetensors import SafetensorError, safe_open

    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a fedistill checkpoint")
            if metadata.get("version") != str(VERSION):
                raise CheckpointError(f"{path}: checkpoint version {metadata.get('version')!r}; this fedistill reads {VERSION}")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        state = json.loads(metadata["state"])
        completed = int(metadata["round"])
    except CheckpointError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or completed < 0:
        raise CheckpointError(f"{path}: malformed checkpoint document")
    return Checkpoint(completed, tensors, state)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process's torch (CPU and initialised CUDA devices), numpy and Python RNG states.

    The protocols draw every random number from generators seeded by the
    config, so a resumed run does not depend on these; they are kept so that
    code which does use the global generators (a library, a future method)
    also continues where it stopped.
    """
    tensors = {f"{RNG_PREFIX}torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{RNG_PREFIX}cuda/{index}"] = state
    name, keys, position, has_gauss, cached = np.random.get_state()
    tensors[f"{RNG_PREFIX}numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    document = {"numpy": [name, int(position), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, document


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put back the RNG states ``save_checkpoint`` captured (CUDA only where the same devices exist)."""
    rng = checkpoint.state.get("rng")
    if not rng:
        return
    torch.set_rng_state(checkpoint.tensors[f"{RNG_PREFIX}torch"])
    cuda = [checkpoint.tensors[key] for key in sorted(checkpoint.tensors) if key.startswith(f"{RNG_PREFIX}cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, position, has_gauss, cached = rng["numpy"]
    keys = checkpoint.tensors[f"{RNG_PREFIX}numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, int(position), int(has_gauss), float(cached)))
    version, internal, gauss = rng["python"]
    random.setstate((int(version), tuple(int(value) for value in internal), gauss))
