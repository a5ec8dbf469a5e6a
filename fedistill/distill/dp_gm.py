"""Differentially private gradient matching (``dp-gm``): DC, or DSA with ``distill.dsa``, under DP-SGD-style releases.

Each outer step of DC/DSA (``gm.py``) needs the per-class gradient of the
loss on real images. Here it is one Gaussian release: Poisson-sample every
record at rate ``q``, take each record's gradient (``torch.func``,
``fedistill.privacy.per_record_gradients``), clip it to L2 norm ``C`` (flattened over all
parameters), sum per class, add ``N(0, (sigma * C)^2)`` once to the stacked
class sums and divide by the expected class sample size ``q * released
count``. The synthetic gradients are matched against that (layer-wise cosine
distance, as in DC), and the network is trained on the synthetic set
between outer steps: post-processing, no further access. One release per
outer step: ``iterations * outer_loop`` accountant steps per call.

Networks must give per-record gradients: instance or group norm, no batch
norm (a record's output would depend on the others in its batch).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedistill.augment import SiameseAugment
from fedistill.distill.base import DistillSettings, ProgressFn, register
from fedistill.distill.gm import GM_LR_IMAGES, GM_MOMENTUM, gradient_distance, loop_lengths, train_on_set
from fedistill.distill.private import PrivateDistiller, class_slots, poisson_by_slot, sample_class_batches
from fedistill.privacy import clipped_class_sums, per_record_gradients
from fedistill.synthetic import SyntheticSet


def _loops(settings: DistillSettings) -> tuple[int, int]:
    outer, inner = loop_lengths(settings.ipc)
    return settings.outer_loop or outer, inner if settings.inner_loop is None else settings.inner_loop


@register("dp-gm")
class PrivateGradientMatching(PrivateDistiller):
    """DC/DSA whose real per-class gradients are clipped per record, noised and normalised releases."""

    @classmethod
    def releases(cls, settings: DistillSettings) -> int:
        return settings.iterations * _loops(settings)[0]

    @classmethod
    def public_counterpart(cls, settings: DistillSettings) -> str:
        return "dsa" if settings.dsa else "dc"

    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        settings, privacy = self.settings, self.privacy
        outer_loop, inner_loop = _loops(settings)
        budgets = privacy.budgets(settings.ipc)
        present, slots = class_slots(budgets)
        syn = self.initial_set(images.shape[1:], budgets, generator).requires_grad_(True)
        syn_labels = torch.repeat_interleave(torch.arange(num_classes), torch.from_numpy(budgets)).to(self.device)
        offsets = np.concatenate([[0], np.cumsum(budgets)])
        optimizer = torch.optim.SGD([syn], lr=settings.lr_images or GM_LR_IMAGES, momentum=GM_MOMENTUM)
        augment = SiameseAugment(settings.dsa_strategy) if settings.dsa else None
        expected = torch.from_numpy(privacy.expected_counts()[present]).to(self.device).unsqueeze(1)
        mechanism = privacy.mechanism(self.name)
        labels_cpu = labels.cpu()
        for iteration in range(settings.iterations if present else 0):
            self.before_iteration(iteration, images, labels, syn)
            net = self.network(images.shape[1:], num_classes, generator, trainable=True)
            parameters = [p for p in net.parameters() if p.requires_grad]
            shapes = [p.shape for p in parameters]
            net_optimizer = torch.optim.SGD(parameters, lr=settings.lr_net)
            loss_value = 0.0
            for outer in range(outer_loop):
                samples = poisson_by_slot(privacy, labels_cpu, slots)
                batch = sample_class_batches(images, syn, samples, present, offsets, augment, generator)
                targets = torch.tensor(present, device=self.device)[batch.slot_of_row.to(self.device)]
                grads = per_record_gradients(net, parameters, batch.real, targets)
                sums = clipped_class_sums(grads, batch.slot_of_row, len(present), privacy.clip_norm)
                real_grads = (mechanism.release(sums, privacy.sample_rate) / expected).float()
                loss = syn.new_zeros(())
                for slot, cls in enumerate(present):
                    own = batch.synthetic[slot]
                    syn_loss = F.cross_entropy(net(own), torch.full((len(own),), cls, device=self.device))
                    syn_grads = torch.autograd.grad(syn_loss, parameters, create_graph=True)
                    loss = loss + gradient_distance(list(syn_grads), _unflatten(real_grads[slot], shapes))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value += loss.item()
                if outer == outer_loop - 1:
                    break
                train_on_set(
                    net, net_optimizer, syn.detach(), syn_labels, inner_loop, augment, generator, settings.batch_train
                )
            if progress is not None:
                progress(iteration + 1, settings.iterations, loss_value / outer_loop)
        if present:
            self.check_releases(mechanism.releases)
        provenance = {"iterations": settings.iterations, "dsa": settings.dsa, "outer_loop": outer_loop}
        return self.private_set(syn, budgets, num_classes, provenance)


def _unflatten(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    sizes = [int(np.prod(shape)) for shape in shapes]
    return [part.reshape(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]
