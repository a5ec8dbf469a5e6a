"""DP-SGD local training for DP-FedAvg, with Opacus doing the work.

Opacus' ``DPDataLoader`` Poisson-samples the records (``int(1 / q)`` batches
per epoch whatever the data size), ``GradSampleModule`` computes per-record
gradients, ``DPOptimizer`` clips them (flat over all parameters), adds the
noise once per step and averages by the expected batch size, and an Opacus
accountant attached to the optimizer counts the steps that actually ran;
those steps go into the client's ledger. The expected batch size is
``q * released record count`` (the noisy count), so the true data size is
not used anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from fedistill.models import has_batch_statistics
from fedistill.privacy.ledger import Access
from fedistill.privacy.plan import DP_SGD
from fedistill.privacy.session import PrivateData


def dp_sgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    privacy: PrivateData,
    epochs: int,
    lr: float,
    momentum: float,
) -> int:
    """Train ``model`` (on its device) in place with DP-SGD for ``epochs`` Poisson epochs; returns the steps taken.

    ``images`` and ``labels`` stay on the host; each sampled batch moves to the
    model's device. Every step is recorded in ``privacy.ledger`` as
    ``dp-sgd`` releases at ``(noise_multiplier, sample_rate)``.
    """
    if has_batch_statistics(model):
        raise ValueError(
            "model.norm: batchnorm mixes records, DP-SGD needs per-record gradients; allowed: instancenorm, groupnorm"
        )
    device = next(model.parameters()).device
    loader = DPDataLoader(
        TensorDataset(images.cpu(), labels.cpu()), sample_rate=privacy.sample_rate, generator=privacy.generator
    )
    per_record = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    noise = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=privacy.generator)))
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.clip_norm,
        expected_batch_size=max(1, round(privacy.sample_rate * float(privacy.counts.sum()))),
        loss_reduction="mean",
        generator=noise,
    )
    accountant = create_accountant(mechanism=privacy.ledger.accountant)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate))
    model.train()
    for _ in range(epochs):
        for batch_images, batch_labels in loader:
            optimizer.zero_grad(set_to_none=True)
            inputs, targets = batch_images.to(device), batch_labels.to(device)
            F.cross_entropy(per_record(inputs), targets, reduction="sum").backward()
            optimizer.step()
    per_record.remove_hooks()
    steps = 0
    for noise_multiplier, sample_rate, count in accountant.history:
        access = Access(DP_SGD, float(noise_multiplier), float(sample_rate), int(count), privacy.server_round)
        privacy.ledger.record(access)
        steps += int(count)
    return steps
