"""Distribution matching (DM, Zhao & Bilen 2023).

Each iteration samples a fresh random network and, per class, matches the mean
embedding of a batch of real images to the mean embedding of that class's
synthetic images (both augmented with the same siamese parameters, drawn per
class). The loss is the paper's: sum over classes of the squared L2 distance
between the two means; images are updated by SGD (lr 1.0, momentum 0.5).

Same maths as the paper's per-class loop, computed faster: augmentation stays
per class (it is cheap), but the networks run once over all classes together,
the real pass without autograd (see ``embedding.Embedder``), and per-class
means come from one reshape of the batched output.
"""

from __future__ import annotations

import numpy as np
import torch

from fedistill.augment import SiameseAugment
from fedistill.distill.base import (
    Distiller,
    ProgressFn,
    class_indices,
    per_class_budget,
    register,
    sample_rows,
    source_counts,
)
from fedistill.distill.embedding import Embedder, resolve_compile
from fedistill.synthetic import SyntheticSet, decode

DM_LR_IMAGES = 1.0
DM_MOMENTUM = 0.5


@register("dm")
class DistributionMatching(Distiller):
    """DM with optional DSA; ``settings.real_precision`` sets the real pass's dtype.

    With ``settings.factor`` > 1 the stored images are decoded (``synthetic.decode``)
    before each embedding, so every tile is matched as an image of its class
    and the gradient flows back into the stored pixels (IDC's multi-formation).
    """

    factorised = True

    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        settings = self.settings
        counts = source_counts(labels, num_classes)
        budgets = per_class_budget(counts, settings.ipc)
        rows_per_class = class_indices(labels, num_classes)
        present = [c for c in range(num_classes) if budgets[c] > 0]
        syn = self.starting_images(images, rows_per_class, budgets, generator).requires_grad_(True)
        syn_labels = torch.repeat_interleave(
            torch.arange(num_classes, device=images.device), torch.from_numpy(budgets).to(images.device)
        )
        optimizer = torch.optim.SGD([syn], lr=settings.lr_images or DM_LR_IMAGES, momentum=DM_MOMENTUM)
        augment = SiameseAugment(settings.dsa_strategy) if settings.dsa else None
        tiles = settings.factor**2
        syn_offsets = np.concatenate([[0], np.cumsum(budgets)]) * tiles
        compiled = resolve_compile(settings.compile, settings.iterations, self.device)
        if self.model_spec.arch == "convnet" and self.model_spec.norm == "batchnorm":
            raise ValueError("distill.method dm: model.norm must not be batchnorm (DM needs per-image features)")
        for iteration in range(settings.iterations):
            self.before_iteration(iteration, images, labels, syn)
            net = self.network(images.shape[1:], num_classes, generator)
            decoded = decode(syn, settings.factor)
            real_parts, syn_parts, real_sizes = [], [], []
            for cls in present:
                real = images[sample_rows(rows_per_class[cls], settings.batch_real, generator)]
                mine = decoded[syn_offsets[cls] : syn_offsets[cls + 1]]
                if augment is not None:
                    params = augment.sample(1, generator, self.device, siamese=True)
                    real, mine = augment.apply(real, params), augment.apply(mine, params)
                real_parts.append(real)
                syn_parts.append(mine)
                real_sizes.append(len(real))
            embedder = Embedder(net, settings.real_precision, compiled)
            real_features = embedder.real(torch.cat(real_parts))
            real_means = torch.stack([part.mean(0) for part in real_features.split(real_sizes)])
            syn_features = embedder.synthetic(torch.cat(syn_parts))
            syn_means = torch.stack([part.mean(0) for part in syn_features.split([len(p) for p in syn_parts])])
            loss = ((real_means - syn_means) ** 2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None and (iteration % 10 == 0 or iteration == settings.iterations - 1):
                progress(iteration + 1, settings.iterations, loss.item())
        return SyntheticSet(
            syn.detach(),
            syn_labels,
            num_classes,
            counts,
            provenance={
                "init": settings.init,
                "iterations": settings.iterations,
                "dsa": settings.dsa,
                "compiled": compiled,
            },
            factor=settings.factor,
        )
