"""Teachers and soft labels: a network trained on real data labels synthetic images with its beliefs.

The decoupled methods (SRe2L, RDED) and the soft-label protocol rest on this:
a teacher, trained once on the data a set stands for (the client's own data
in a federation), gives each synthetic image a tempered class distribution,
which carries far more than its hard label. Teachers read real data without
noise, so private runs refuse them (``ExperimentConfig``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from fedistill.atomic import save_tensors
from fedistill.cache import data_fingerprint, key_digest
from fedistill.models import ModelSpec, build_model
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, train_model

TEACHER_LR = 0.05
TEACHER_BATCH = 64
CACHE_VERSION = 1
"""Part of every cache key: bump it when the way teachers are trained changes, so old files are not read."""


def train_teacher(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    model_spec: ModelSpec,
    epochs: int,
    seed: int,
    cache_dir: Path | None = None,
) -> nn.Module:
    """A ``model_spec`` network trained ``epochs`` epochs on the real images (see ``teacher_and_cost``)."""
    return teacher_and_cost(images, labels, num_classes, model_spec, epochs, seed, cache_dir)[0]


def teacher_and_cost(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    model_spec: ModelSpec,
    epochs: int,
    seed: int,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, float]:
    """The teacher and the seconds its training took (recorded with it in the cache, so a read still reports them).

    The network is trained with the evaluation protocol's SGD.

    Seeded from ``seed`` alone (initialisation and shuffling), left in eval mode
    on the images' device. A teacher costs many epochs over all the real data
    (half an hour for Fashion-MNIST on two CPU cores), so with ``cache_dir`` its
    weights are kept there under a digest of the data and every setting, and a
    second call with the same inputs reads them instead of training.
    """
    if epochs < 1:
        raise ValueError(f"distill.teacher_epochs: must be >= 1, got {epochs}")
    channels, height, width = (int(size) for size in images.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_spec, (channels, height, width), num_classes)
    model.to(images.device)
    path = None
    if cache_dir is not None:
        key = {"version": CACHE_VERSION, "data": data_fingerprint(images, labels), "num_classes": num_classes,
               "model": dataclasses.asdict(model_spec), "epochs": epochs, "lr": TEACHER_LR,
               "batch": TEACHER_BATCH, "seed": seed}
        path = Path(cache_dir) / f"teacher-{key_digest(key)}.safetensors"
        cached = _read_weights(path)
        if cached is not None and _load_into(model, cached[0]):
            return model.eval(), cached[1]
    started = time.perf_counter()
    settings = TrainSettings(epochs=epochs, lr=TEACHER_LR, batch_size=TEACHER_BATCH)
    train_model(model, images, labels.to(images.device), settings, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, model.state_dict(), {"key": json.dumps(key, sort_keys=True), "seconds": f"{seconds:.3f}"})
    return model.eval(), seconds


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], float] | None:
    """A cached teacher's state dict and training seconds, or None when absent or unreadable (then it is retrained)."""
    try:
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as handle:
            seconds = float((handle.metadata() or {})["seconds"])
        return load_file(str(path)), seconds
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Load ``state`` into ``model`` on its device; False (model untouched) when the keys or shapes differ."""
    own = model.state_dict()
    if own.keys() != state.keys() or any(own[name].shape != state[name].shape for name in own):
        return False
    device = next(iter(own.values())).device if own else torch.device("cpu")
    model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()})
    return True


def soft_label(
    set: SyntheticSet, model: nn.Module, temperature: float = 1.0, batch_size: int = 256
) -> SyntheticSet:
    """A copy of ``set`` whose soft labels are ``softmax(model(images) / temperature)``, one row per decoded image.

    A factorised set is labelled tile by tile (what a network trains on).
    Runs in batches under inference mode with the model in eval mode, and puts
    the model back in the mode it was in.
    """
    if not (temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"soft_label: temperature must be positive and finite, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"soft_label: batch_size must be >= 1, got {batch_size}")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else set.images.device
    images = set.decoded().images
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            rows = [
                torch.softmax(model(images[start : start + batch_size].to(device)).float() / temperature, dim=1)
                for start in range(0, len(images), batch_size)
            ]
    finally:
        model.train(was_training)
    soft = torch.cat(rows).to(set.images.device) if rows else torch.zeros(0, set.num_classes, device=set.images.device)
    if soft.shape != (len(images), set.num_classes):
        raise ValueError(f"soft_label: model gives {tuple(soft.shape[1:])} outputs for {set.num_classes} classes")
    provenance = dict(set.provenance)
    provenance["soft_label_temperature"] = temperature
    return SyntheticSet(
        set.images.clone(),
        set.labels.clone(),
        set.num_classes,
        np.array(set.source_counts, copy=True),
        soft.clone(),
        provenance,
        set.factor,
    )


def one_hot_labelled(set: SyntheticSet) -> SyntheticSet:
    """A copy of ``set`` whose soft labels are its hard labels, one-hot, one row per decoded image.

    For a set that must be trained under the soft-label protocol before any
    teacher exists (round 1 of ``federation.soft_labels``): distillation from a
    one-hot row is the cross-entropy at the student's temperature.
    """
    decoded_labels = set.decoded().labels
    soft = torch.nn.functional.one_hot(decoded_labels.long(), set.num_classes).float()
    provenance = dict(set.provenance)
    provenance["soft_labels"] = "one-hot"
    return SyntheticSet(set.images.clone(), set.labels.clone(), set.num_classes,
                        np.array(set.source_counts, copy=True), soft, provenance, set.factor)
