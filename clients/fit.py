"""Local training for the FedAvg and FedProx baselines: one node's round of SGD from the global weights.

The baselines share everything else with the distillation protocols (model,
partitions, test split, per-round metrics), so what differs is only what the
node does with its data: here it trains the global model for a few local
epochs and sends the weights back, instead of sending a synthetic set.
FedProx adds ``(mu / 2) * ||w - w_global||^2`` to the loss (Li et al., 2020),
which keeps a node's weights near the global ones when partitions are skewed.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.config import ExperimentConfig
from fedistill.data import ImageData
from fedistill.models import build_model

MOMENTUM = 0.9
"""SGD momentum of local training, as in the evaluation protocol (the FedAvg and FedProx papers used plain SGD)."""


def fit_partition(
    config: ExperimentConfig,
    data: ImageData,
    global_state: dict[str, torch.Tensor],
    device: torch.device,
    proximal_mu: float,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the global model on one node's partition; returns its new weights and the reply's metrics.

    Parameters
    ----------
    config
        The experiment; ``federation.local_lr``, ``local_batch`` and
        ``local_epochs`` set the SGD run, ``model`` the architecture.
    data
        This node's partition of the training split.
    global_state
        The global model's ``state_dict`` as received (host tensors).
    device
        Where to train.
    proximal_mu
        FedProx's ``mu``; 0 trains plain FedAvg (no proximal term is computed).
    seed
        Seeds the shuffling generator, so a node's round repeats exactly.

    Returns
    -------
    The trained ``state_dict`` on the host, and ``{"num-examples", "seconds",
    "train-loss"}``: the partition size (FedAvg's averaging weight), the
    wall time of local training, and the mean cross-entropy of the last local
    epoch (without the proximal term, so FedAvg and FedProx compare).
    """
    if len(data) == 0:
        raise ValueError("fit: the partition is empty; there is nothing to train on")
    if proximal_mu < 0:
        raise ValueError(f"fit: proximal_mu must be >= 0, got {proximal_mu}")
    federation = config.federation
    started = time.perf_counter()
    images = data.normalized(device)
    labels = torch.from_numpy(data.labels).to(device)
    model = build_model(config.model.spec(), tuple(images.shape[1:]), data.info.num_classes)
    model.load_state_dict(global_state)
    model.to(device)
    anchor = [param.detach().clone() for param in model.parameters()] if proximal_mu > 0 else None
    optimizer = torch.optim.SGD(model.parameters(), lr=federation.local_lr, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    count = len(data)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(federation.local_epochs):
        # Summed on the device and read once at the end: a per-step .item() would stall an accelerator.
        loss_sum.zero_()
        order = torch.randperm(count, generator=generator).to(device)
        for start in range(0, count, federation.local_batch):
            batch = order[start : start + federation.local_batch]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss_sum += loss.detach().double() * len(batch)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * proximal_term(model, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    train_loss = loss_sum.item() / count
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    metrics = {"num-examples": count, "seconds": time.perf_counter() - started, "train-loss": train_loss}
    return state, metrics


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w_global||^2`` over the trainable parameters (buffers are not optimised, so not pulled)."""
    squares = [((param - ref) ** 2).sum() for param, ref in zip(model.parameters(), anchor, strict=True)]
    return torch.stack(squares).sum()
