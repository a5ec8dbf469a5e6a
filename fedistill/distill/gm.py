"""Gradient matching: DC (Zhao et al. 2021) and, with siamese augmentation, DSA (Zhao & Bilen 2021).

Per class, the gradient of the classification loss on a real batch and on the
class's synthetic images are matched layer-wise with the paper's distance
(sum over output units of 1 - cosine similarity). Unlike the reference code,
1-D parameters (biases, norm scales) are matched too, as one vector each, and
any images-per-class works: the outer/inner loop lengths follow the paper's
table (IPC 1: 1/1, 10: 10/50, 20: 20/25, 30: 30/20, 40: 40/15, 50: 50/10) and
are interpolated for other values instead of refusing them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedistill.augment import SiameseAugment
from fedistill.distill.base import (
    Distiller,
    DistillSettings,
    ProgressFn,
    class_indices,
    per_class_budget,
    register,
    sample_rows,
    source_counts,
)
from fedistill.synthetic import SyntheticSet, decode

GM_LR_IMAGES = 0.1
GM_MOMENTUM = 0.5
_LOOP_TABLE = ((1, 1, 1), (10, 10, 50), (20, 20, 25), (30, 30, 20), (40, 40, 15), (50, 50, 10))


def loop_lengths(ipc: int) -> tuple[int, int]:
    """(outer, inner) loop lengths of the DC paper, linearly interpolated between its IPC table rows."""
    ipcs = [row[0] for row in _LOOP_TABLE]
    outer = int(round(np.interp(ipc, ipcs, [row[1] for row in _LOOP_TABLE])))
    inner = int(round(np.interp(ipc, ipcs, [row[2] for row in _LOOP_TABLE])))
    return max(outer, 1), max(inner, 1)


def gradient_distance(syn_grads: list[torch.Tensor], real_grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers and output units of ``1 - cos(g_syn, g_real)``; 1-D tensors count as one unit."""
    total = syn_grads[0].new_zeros(())
    for syn, real in zip(syn_grads, real_grads):
        rows_syn = syn.reshape(syn.shape[0], -1) if syn.ndim > 1 else syn.reshape(1, -1)
        rows_real = real.reshape(real.shape[0], -1) if real.ndim > 1 else real.reshape(1, -1)
        total = total + (1 - F.cosine_similarity(rows_syn, rows_real, dim=1, eps=1e-6)).sum()
    return total


class _GradientMatching(Distiller):
    """Shared DC/DSA loop; subclasses only fix whether augmentation is used.

    With ``settings.factor`` > 1 the stored images are decoded before every use
    (matching and the inner loop), IDC's multi-formation.
    """

    use_dsa: bool
    factorised = True

    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        settings: DistillSettings = self.settings
        counts = source_counts(labels, num_classes)
        budgets = per_class_budget(counts, settings.ipc)
        rows_per_class = class_indices(labels, num_classes)
        present = [c for c in range(num_classes) if budgets[c] > 0]
        default_outer, default_inner = loop_lengths(settings.ipc)
        outer_loop = settings.outer_loop or default_outer
        inner_loop = default_inner if settings.inner_loop is None else settings.inner_loop
        syn = self.starting_images(images, rows_per_class, budgets, generator).requires_grad_(True)
        syn_labels = torch.repeat_interleave(
            torch.arange(num_classes, device=images.device), torch.from_numpy(budgets).to(images.device)
        )
        tiles = settings.factor**2
        decoded_labels = torch.repeat_interleave(syn_labels, tiles)
        offsets = np.concatenate([[0], np.cumsum(budgets)]) * tiles
        optimizer = torch.optim.SGD([syn], lr=settings.lr_images or GM_LR_IMAGES, momentum=GM_MOMENTUM)
        augment = SiameseAugment(settings.dsa_strategy) if self.use_dsa else None
        for iteration in range(settings.iterations):
            self.before_iteration(iteration, images, labels, syn)
            net = self.network(images.shape[1:], num_classes, generator, trainable=True)
            parameters = list(net.parameters())
            net_optimizer = torch.optim.SGD(parameters, lr=settings.lr_net)
            loss_value = 0.0
            for outer in range(outer_loop):
                loss = syn.new_zeros(())
                decoded = decode(syn, settings.factor)
                for cls in present:
                    real = images[sample_rows(rows_per_class[cls], settings.batch_real, generator)]
                    mine = decoded[offsets[cls] : offsets[cls + 1]]
                    if augment is not None:
                        params = augment.sample(1, generator, self.device, siamese=True)
                        real, mine = augment.apply(real, params), augment.apply(mine, params)
                    target_real = torch.full((len(real),), cls, device=self.device)
                    target_syn = torch.full((len(mine),), cls, device=self.device)
                    real_grads = torch.autograd.grad(F.cross_entropy(net(real), target_real), parameters)
                    real_grads = [grad.detach() for grad in real_grads]
                    syn_grads = torch.autograd.grad(
                        F.cross_entropy(net(mine), target_syn), parameters, create_graph=True
                    )
                    loss = loss + gradient_distance(list(syn_grads), real_grads)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value += loss.item()
                if outer == outer_loop - 1:
                    break
                inner_images = decode(syn.detach(), settings.factor)
                train_on_set(
                    net, net_optimizer, inner_images, decoded_labels, inner_loop, augment, generator, settings.batch_train
                )
            if progress is not None:
                progress(iteration + 1, settings.iterations, loss_value / outer_loop)
        return SyntheticSet(
            syn.detach(),
            syn_labels,
            num_classes,
            counts,
            provenance={"init": settings.init, "iterations": settings.iterations, "dsa": self.use_dsa},
            factor=settings.factor,
        )


def train_on_set(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    augment: SiameseAugment | None,
    generator: torch.Generator,
    batch: int,
) -> None:
    """Gradient matching's inner loop: a few epochs of the network on the current synthetic set only
    (so under DP it is post-processing)."""
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for start in range(0, len(images), batch):
            rows = order[start : start + batch]
            inputs = images[rows]
            if augment is not None:
                inputs = augment(inputs, generator)
            loss = F.cross_entropy(net(inputs), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@register("dc")
class DatasetCondensation(_GradientMatching):
    """DC: gradient matching without augmentation."""

    use_dsa = False


@register("dsa")
class DifferentiableSiameseAugmentation(_GradientMatching):
    """DSA: gradient matching with the same augmentation on real and synthetic batches."""

    use_dsa = True
