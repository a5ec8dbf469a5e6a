"""Decoupled distillation by selecting and composing real patches (RDED, Sun et al. 2024).

Squeeze, recover, relabel, with no image optimisation at all:

1. squeeze: train a teacher on the real images (``Distiller.teacher_for``);
2. recover: per class, cut ``CANDIDATES_PER_TILE`` random resized crops for
   every tile the set needs, shrink each to a tile (``1 / factor`` of the image
   side), score it by the teacher's cross-entropy on the tile as a network will
   see it (decoded to full size), keep the most typical (lowest loss) tiles and
   lay them out ``factor x factor`` per stored image;
3. relabel: with ``distill.labels = "teacher"`` the teacher soft-labels every
   tile (done for all methods by ``Distiller.__call__``).

It costs a teacher and one inference pass over the candidates, so it suits
clients with little compute. The images are real patches: the set is exactly
as private as the real images it shows (see docs/privacy.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fedistill.distill.base import Distiller, ProgressFn, class_indices, per_class_budget, register, source_counts
from fedistill.synthetic import SyntheticSet, check_factor, tile

CANDIDATES_PER_TILE = 5
"""Random crops scored for each tile kept (RDED's pool is a few crops per kept patch)."""
CROP_SCALE = (0.8, 1.0)
"""Area of a crop as a share of the image: small images lose their class in smaller crops (measured on digits)."""
CROP_RATIO = (3 / 4, 4 / 3)


@register("rded")
class RealPatchComposition(Distiller):
    """RDED: the teacher's most typical real crops of each class, ``factor**2`` per stored image."""

    refines = False
    factorised = True
    uses_teacher = True

    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        settings = self.settings
        factor = settings.factor
        check_factor(factor, tuple(images.shape[2:]))
        counts = source_counts(labels, num_classes)
        budgets = per_class_budget(counts, settings.ipc)
        rows_per_class = class_indices(labels, num_classes)
        teacher_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        teacher = self.teacher_for(images, labels, num_classes, teacher_seed)
        tiles_per_image = factor * factor
        height, width = (int(side) for side in images.shape[2:])
        parts, part_labels, scores = [], [], []
        present = [c for c in range(num_classes) if budgets[c] > 0]
        for done, cls in enumerate(present, start=1):
            wanted = int(budgets[cls]) * tiles_per_image
            sources = rows_per_class[cls][
                torch.randint(len(rows_per_class[cls]), (wanted * CANDIDATES_PER_TILE,), generator=generator).to(
                    images.device
                )
            ]
            candidates = random_resized_crops(images[sources], (height // factor, width // factor), generator)
            loss = tile_losses(teacher, candidates, cls, (height, width))
            best = torch.argsort(loss, stable=True)[:wanted]
            kept = best[torch.randperm(wanted, generator=generator).to(best.device)]
            parts.append(tile(candidates[kept], factor))
            part_labels.append(torch.full((int(budgets[cls]),), cls, dtype=torch.int64, device=images.device))
            scores.append(float(loss[best].mean()))
            if progress is not None:
                progress(done, len(present), scores[-1])
        syn = torch.cat(parts) if parts else images.new_zeros((0, *images.shape[1:]))
        syn_labels = torch.cat(part_labels) if part_labels else labels.new_zeros(0)
        return SyntheticSet(
            syn.detach(),
            syn_labels,
            num_classes,
            counts,
            provenance={
                "candidates_per_tile": CANDIDATES_PER_TILE,
                "teacher_epochs": settings.teacher_epochs,
                "mean_selected_teacher_loss": float(np.mean(scores)) if scores else None,
            },
            factor=factor,
        )


def random_resized_crops(
    images: torch.Tensor, size: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """One random crop of each image (area share in ``CROP_SCALE``, aspect in ``CROP_RATIO``), resized to ``size``."""
    height, width = (int(side) for side in images.shape[2:])
    count = len(images)
    scale = torch.empty(count).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(count).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    ratio = torch.exp(log_ratio)
    crop_h = torch.clamp(torch.round(torch.sqrt(scale / ratio) * height), 1, height).long()
    crop_w = torch.clamp(torch.round(torch.sqrt(scale * ratio) * width), 1, width).long()
    top = (torch.rand(count, generator=generator) * (height - crop_h + 1)).long()
    left = (torch.rand(count, generator=generator) * (width - crop_w + 1)).long()
    crops = [
        F.interpolate(
            images[i : i + 1, :, int(top[i]) : int(top[i] + crop_h[i]), int(left[i]) : int(left[i] + crop_w[i])],
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        for i in range(count)
    ]
    return torch.cat(crops)


def tile_losses(
    teacher: torch.nn.Module, tiles: torch.Tensor, cls: int, full_size: tuple[int, int], batch: int = 512
) -> torch.Tensor:
    """The teacher's cross-entropy for class ``cls`` on each tile decoded to ``full_size`` (as training sees it)."""
    losses = []
    with torch.inference_mode():
        for start in range(0, len(tiles), batch):
            full = F.interpolate(tiles[start : start + batch], size=full_size, mode="bilinear", align_corners=False)
            logits = teacher(full).float()
            target = torch.full((len(full),), cls, dtype=torch.int64, device=logits.device)
            losses.append(F.cross_entropy(logits, target, reduction="none"))
    return torch.cat(losses)
