"""The evaluation protocol: train a fresh network on a (synthetic) set, test it on held-out data.

Every accuracy fedistill reports goes through :func:`evaluate_set`, so central,
federated and attacked runs stay comparable with each other and with the
DC/DSA/DM papers (REFERENCE.md §3): SGD with momentum and weight decay, the
learning rate divided by 10 halfway, optional per-sample DSA augmentation, and
a mean +- std over several independently initialised networks. The test split
only produces the reported number; nothing (epoch, network, set) is selected
on it.

Two protocols, never mixed in one table: ``hard-label`` (the papers' DC/DSA/DM
protocol: cross-entropy on the set's class labels; soft labels a set carries
are ignored) and ``soft-label-kd`` (the decoupled methods' protocol: knowledge
distillation from the set's stored soft labels at temperature ``T``, loss
``T**2 * KL(soft || softmax(logits / T))``). Every result names its protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import SiameseAugment, parse_strategy
from fedistill.models import ModelSpec, build_model
from fedistill.synthetic import SyntheticSet

LR_DECAY = 0.1

HARD_LABEL = "hard-label"
SOFT_LABEL_KD = "soft-label-kd"
PROTOCOLS = (HARD_LABEL, SOFT_LABEL_KD)

EVAL_SEED_OFFSET = 1_000_003
"""Evaluation networks are seeded from ``seed + EVAL_SEED_OFFSET``: a distiller that seeds its own
networks from ``seed + i`` must not hand the evaluation the very initialisation it distilled against."""


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run; the defaults are the published protocol.

    ``dsa_strategy`` names the augmentation ops applied per sample to every
    batch (``None``: no augmentation). The protocol pairs augmentation with
    1000 epochs instead of 300; that choice belongs to the config.
    ``kd_temperature`` selects the soft-label protocol (``None``: hard labels).
    """

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str | None = None
    kd_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.kd_temperature is not None and not self.kd_temperature > 0:
            raise ValueError(f"eval.kd_temperature: must be > 0, got {self.kd_temperature}")
        if self.epochs < 1:
            raise ValueError(f"train: epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train: batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"train: lr must be > 0, got {self.lr}")
        if self.dsa_strategy is not None:
            parse_strategy(self.dsa_strategy)

    @property
    def protocol(self) -> str:
        return HARD_LABEL if self.kd_temperature is None else SOFT_LABEL_KD

    def targets(self, syn: SyntheticSet) -> torch.Tensor | None:
        """The soft labels this protocol trains ``syn`` on: none under hard labels; required under KD."""
        if self.kd_temperature is None:
            return None
        if syn.soft_labels is None:
            raise ValueError(
                "eval.protocol 'soft-label-kd': the set has no soft labels (distill.labels = 'teacher' gives them)"
            )
        return syn.soft_labels

    @property
    def decay_epoch(self) -> int:
        """First epoch (0-based) trained at ``lr * 0.1``: half of the budget, but never the very first epoch."""
        return max(1, self.epochs // 2)


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    soft_labels: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``images`` (normalised NCHW, on the model's device) and return it.

    Shuffling and augmentation draws come from ``generator`` only, so a run is
    repeatable from its seed. With ``soft_labels`` (one distribution per image)
    the loss is knowledge distillation from them at ``settings.kd_temperature``
    (1 when unset; at 1 its gradient is the cross-entropy's) and ``labels`` are
    not used for the loss. The loop never reads values back to the host, which would stall
    an accelerator once per step. ``on_epoch(epochs_done)`` is called after each epoch.
    """
    count = int(images.shape[0])
    if count == 0:
        raise ValueError("train: no images to train on")
    if labels.shape != (count,):
        raise ValueError(f"train: labels shape {tuple(labels.shape)} does not match {count} images")
    if soft_labels is not None and soft_labels.shape[0] != count:
        raise ValueError(f"train: soft_labels has {soft_labels.shape[0]} rows for {count} images")
    targets = labels if soft_labels is None else soft_labels
    temperature = settings.kd_temperature or 1.0
    if sample_weights is not None:
        if sample_weights.shape != (count,) or not torch.isfinite(sample_weights).all() or (sample_weights < 0).any():
            raise ValueError("train: sample_weights must be one finite, non-negative weight per image")
        sample_weights = sample_weights * (count / sample_weights.sum())
    augment = SiameseAugment(settings.dsa_strategy) if settings.dsa_strategy is not None else None
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    model.train()
    for epoch in range(settings.epochs):
        if epoch == settings.decay_epoch:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * LR_DECAY
        order = torch.randperm(count, generator=generator, device=generator.device).to(images.device)
        for start in range(0, count, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            inputs = images[batch]
            if augment is not None:
                inputs = augment(inputs, generator, siamese=False)
            if soft_labels is None:
                per_image = F.cross_entropy(model(inputs), targets[batch], reduction="none")
            else:
                per_image = distillation_loss(model(inputs), targets[batch], temperature)
            loss = per_image.mean() if sample_weights is None else (per_image * sample_weights[batch]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return model


def distillation_loss(logits: torch.Tensor, soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image ``T**2 * KL(soft || softmax(logits / T))`` (Hinton et al.): the KD loss of the soft-label protocol."""
    log_student = F.log_softmax(logits / temperature, dim=1)
    return temperature**2 * F.kl_div(log_student, soft, reduction="none").sum(dim=1)


def evaluate_model(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Accuracy in [0, 1] and mean cross-entropy of ``model`` on a labelled split.

    Runs in eval mode under ``torch.inference_mode`` and restores the model's
    previous mode, so it can be called in the middle of training. Batches are
    moved to the model's device, so a large split may stay on the host.
    """
    count = int(images.shape[0])
    if count == 0:
        raise ValueError("evaluate: no images to evaluate on")
    if labels.shape != (count,):
        raise ValueError(f"evaluate: labels shape {tuple(labels.shape)} does not match {count} images")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            correct = torch.zeros((), dtype=torch.int64, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, count, batch_size):
                inputs = images[start : start + batch_size].to(device, non_blocking=True)
                targets = labels[start : start + batch_size].to(device, non_blocking=True)
                logits = model(inputs)
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
                correct += (logits.argmax(dim=1) == targets).sum()
            accuracy, mean_loss = correct.item() / count, loss_sum.item() / count
    finally:
        model.train(was_training)
    return accuracy, mean_loss


@dataclass
class EvalResult:
    """Test accuracies of ``num_nets`` networks trained on one set; ``std`` is the population std."""

    accuracies: list[float]
    mean: float
    std: float
    num_nets: int
    epochs: int
    seconds: float
    protocol: str = HARD_LABEL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_set(
    syn: SyntheticSet,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    model_spec: ModelSpec,
    settings: TrainSettings,
    device: torch.device,
    seed: int,
    num_nets: int,
    progress: Callable[[int, int], None] | None = None,
    sample_weights: torch.Tensor | None = None,
    on_model: Callable[[int, nn.Module], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Train ``num_nets`` fresh networks on ``syn`` and report their test accuracies.

    Network ``i`` is initialised and trained from seed ``seed + i`` (its own
    generator; the global RNG state is left as it was), so networks differ from
    each other but a run repeats exactly. Soft labels of the set are used when
    present and the protocol is ``soft-label-kd``; a factorised set trains on its
    decoded images. ``sample_weights`` (one per image, e.g. from class-weighted
    aggregation) scale each image's loss; they are rescaled to mean 1.
    ``progress(done, num_nets)`` is called after each network, ``on_model(index, model)``
    with each trained network (the federation keeps network 0 as its global model), and
    ``on_epoch(index, epochs_done)`` after each epoch of network ``index``.
    """
    if len(syn) == 0:
        raise ValueError("evaluate: the synthetic set is empty; there is nothing to train on")
    syn = syn.decoded()
    if num_nets < 1:
        raise ValueError(f"evaluate: num_nets must be >= 1, got {num_nets}")
    if tuple(test_images.shape[1:]) != tuple(syn.images.shape[1:]):
        raise ValueError(
            f"evaluate: test images have shape {tuple(test_images.shape[1:])}, the set {tuple(syn.images.shape[1:])}"
        )
    started = time.perf_counter()
    on_device = syn.to(device)
    test_x = test_images.to(device)
    test_y = test_labels.to(device)
    channels, height, width = (int(size) for size in on_device.images.shape[1:])
    accuracies: list[float] = []
    for index in range(num_nets):
        net_seed = seed + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(net_seed)
            model = build_model(model_spec, (channels, height, width), syn.num_classes)
        model.to(device)
        generator = torch.Generator().manual_seed(net_seed)
        weights = None if sample_weights is None else sample_weights.to(device)
        per_epoch = None if on_epoch is None else (lambda done, index=index: on_epoch(index, done))
        train_model(model, on_device.images, on_device.labels, settings, generator, settings.targets(on_device),
                    weights, on_epoch=per_epoch)
        accuracy, _ = evaluate_model(model, test_x, test_y)
        accuracies.append(accuracy)
        if on_model is not None:
            on_model(index, model)
        if progress is not None:
            progress(index + 1, num_nets)
    values = np.asarray(accuracies, dtype=np.float64)
    return EvalResult(
        accuracies=accuracies,
        mean=float(values.mean()),
        std=float(values.std()),
        num_nets=num_nets,
        epochs=settings.epochs,
        seconds=time.perf_counter() - started,
        protocol=settings.protocol,
    )
