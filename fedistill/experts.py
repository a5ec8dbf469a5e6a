"""Expert trajectories: networks trained on the real images, their parameters saved after every epoch.

Trajectory matching (MTT, ``fedistill.distill.mtt``) trains a student on the
synthetic set from an expert's checkpoint and pulls it toward where the expert
was a few epochs later. The experts follow MTT's ``buffer.py``: plain SGD (no
momentum, no weight decay, constant learning rate), cross-entropy on the
hard labels, batches of ``EXPERT_BATCH``, DSA augmentation when a strategy is
given. A trajectory is a ``(epochs + 1, num_params)`` tensor of flat parameter
vectors in ``model.parameters()`` order: row 0 is the initialisation, row
``e`` the parameters after epoch ``e``.

Experts cost far more than a distillation iteration, so they are cached: one
safetensors file per expert, named by a hash of everything that determines
it (the images' and labels' bytes, the model, the schedule, the seed, the
expert's index), written atomically. A second call with the same inputs
reads the files and trains nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedistill.atomic import save_tensors
from fedistill.cache import data_fingerprint, key_digest
from fedistill.models import ModelSpec, build_model
from fedistill.training import TrainSettings, train_model

EXPERT_BATCH = 256
CACHE_VERSION = 1
"""Part of every cache key: bump it when the way experts are trained changes, so old files are not read."""

ExpertProgress = Callable[[int, int], None]
"""Called as ``progress(done, num_experts)`` after each expert, trained or read from the cache."""


def train_experts(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    model_spec: ModelSpec,
    num_experts: int,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
    cache_dir: Path | None,
    dsa_strategy: str | None = None,
    progress: ExpertProgress | None = None,
) -> list[torch.Tensor]:
    """``num_experts`` trajectories of ``epochs`` epochs each, on ``device`` in float32.

    Expert ``k`` is initialised and shuffled from a seed derived from
    ``(seed, k)`` alone, so experts differ from each other and a run repeats.
    With ``cache_dir`` each trajectory is read from there when present and
    written there when trained; ``None`` caches nothing.
    """
    if num_experts < 1:
        raise ValueError(f"distill.num_experts: must be >= 1, got {num_experts}")
    if epochs < 1:
        raise ValueError(f"distill.expert_train_epochs: must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"distill.lr_teacher: must be > 0, got {lr}")
    fingerprint = data_fingerprint(images, labels) if cache_dir is not None else ""
    trajectories = []
    for index in range(num_experts):
        expert_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
        key = {
            "version": CACHE_VERSION,
            "data": fingerprint,
            "shape": list(images.shape[1:]),
            "num_classes": num_classes,
            "model": dataclasses.asdict(model_spec),
            "epochs": epochs,
            "lr": lr,
            "batch": EXPERT_BATCH,
            "dsa_strategy": dsa_strategy,
            "seed": expert_seed,
        }
        path = None if cache_dir is None else cache_dir / f"expert-{key_digest(key)}.safetensors"
        trajectory = _read(path) if path is not None and path.exists() else None
        if trajectory is None:
            trajectory = train_expert(images, labels, num_classes, model_spec, epochs, lr, expert_seed, dsa_strategy)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_tensors(path, {"trajectory": trajectory}, {"key": json.dumps(key, sort_keys=True)})
        trajectories.append(trajectory.to(device, torch.float32))
        if progress is not None:
            progress(index + 1, num_experts)
    return trajectories


def train_expert(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    model_spec: ModelSpec,
    epochs: int,
    lr: float,
    seed: int,
    dsa_strategy: str | None,
) -> torch.Tensor:
    """One trajectory: a fresh ``model_spec`` network trained ``epochs`` epochs, flattened after each."""
    channels, height, width = (int(size) for size in images.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_spec, (channels, height, width), num_classes)
    model.to(images.device)
    # One epoch per call: a one-epoch schedule never reaches the halfway decay, so the rate stays constant.
    settings = TrainSettings(
        epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=EXPERT_BATCH, dsa_strategy=dsa_strategy
    )
    generator = torch.Generator().manual_seed(seed)
    checkpoints = [flat_parameters(model)]
    for _ in range(epochs):
        train_model(model, images, labels.to(images.device), settings, generator)
        checkpoints.append(flat_parameters(model))
    return torch.stack(checkpoints)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """A detached copy of the model's parameters as one vector, in ``parameters()`` order."""
    return torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()]).clone()


def _read(path: Path) -> torch.Tensor | None:
    """A cached trajectory, or None when the file cannot be read (it is then trained and written again)."""
    try:
        return load_file(str(path))["trajectory"]
    except (SafetensorError, KeyError, OSError):
        return None
