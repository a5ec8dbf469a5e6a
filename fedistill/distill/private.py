"""The base of differentially private distillers: what they are given and what they may not do.

A private distiller is a ``Distiller`` (same registry, same call) constructed
with a ``privacy`` bundle (``fedistill.privacy.PrivateData``). It reads the
private images only through Gaussian mechanisms on Poisson samples; per-class
budgets, expected sample sizes and the set's ``source_counts`` come from the
released noisy counts, never from the true counts. Its starting images are
Gaussian noise, or a ``start`` set that is already public: the client's
previous private set, or public images (``public_start``, for
``distill.init = "public"``). ``initial_set`` has no access to the private
images at all, and ``distill.init = "real"`` is refused.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, NamedTuple

import numpy as np
import torch

from fedistill.augment import AugmentParams, SiameseAugment
from fedistill.data import ImageData
from fedistill.distill.base import Distiller, DistillSettings, IterationHook, NetworkSource
from fedistill.models import ModelSpec
from fedistill.privacy import PrivateData
from fedistill.synthetic import SyntheticSet, check_factor, encode


class PrivateDistiller(Distiller):
    """A distiller whose every access to real images is a noisy, accounted release."""

    private = True

    def __init__(
        self,
        model_spec: ModelSpec,
        settings: DistillSettings,
        device: torch.device,
        networks: NetworkSource | None = None,
        start: SyntheticSet | None = None,
        on_iteration: IterationHook | None = None,
        *,
        privacy: PrivateData,
    ) -> None:
        super().__init__(model_spec, settings, device, networks, start, on_iteration)
        if settings.init not in ("noise", "public"):
            raise ValueError(
                f"distill.init: {self.name} starts from noise or public images, never from private images; "
                "allowed: noise, public"
            )
        if settings.init == "public" and start is None:
            raise ValueError(f"distill.init 'public': {self.name} needs the public start set (see public_start)")
        if model_spec.arch == "convnet" and model_spec.norm == "batchnorm":
            raise ValueError(
                f"model.norm: batchnorm mixes records of a batch, so per-record clipping bounds nothing ({self.name}); "
                "allowed: instancenorm, groupnorm, none"
            )
        self.privacy = privacy

    @classmethod
    @abstractmethod
    def releases(cls, settings: DistillSettings) -> int:
        """How many noisy releases (accountant steps) one call makes with these settings."""

    @classmethod
    @abstractmethod
    def public_counterpart(cls, settings: DistillSettings) -> str:
        """The non-private method that re-distils sets that are already public (server-side ``redistill``)."""

    def initial_set(
        self, image_shape: torch.Size | tuple[int, ...], budgets: np.ndarray, generator: torch.Generator
    ) -> torch.Tensor:
        """Starting images by class: the previous (already private) set, else N(0, 1) noise; never private images.

        Shapes are the stored images' (a factorised set's noise is tiled by ``decode`` later).
        """
        if self.start is not None:
            return self.start_images(image_shape, budgets)
        noise = torch.randn((int(budgets.sum()), *image_shape), generator=generator)
        return noise.to(self.device)

    def check_releases(self, made: int) -> None:
        """A call must make exactly the planned number of releases, or the plan's epsilon would be wrong."""
        planned = self.releases(self.settings)
        if made != planned:
            raise RuntimeError(f"{self.name}: made {made} noisy releases, {planned} were planned and accounted for")

    def origin(self) -> dict[str, Any]:
        """Where the images started: noise, the previous (private) set, or public images (and how many)."""
        if self.start is None:
            return {"init": "noise"}
        public = {key: self.start.provenance[key] for key in ("init", "public_images") if key in self.start.provenance}
        return {"init": "previous set", **public}

    def private_set(self, syn: torch.Tensor, budgets: np.ndarray, num_classes: int, provenance: dict) -> SyntheticSet:
        """The result, labelled by class, with the released (noisy) counts as ``source_counts``."""
        labels = torch.repeat_interleave(torch.arange(num_classes), torch.from_numpy(budgets)).to(syn.device)
        return SyntheticSet(
            syn.detach(),
            labels,
            num_classes,
            np.asarray(self.privacy.counts, dtype=np.int64),
            provenance={
                **self.origin(),
                "private": True,
                "clip_norm": self.privacy.clip_norm,
                "noise_multiplier": self.privacy.noise_multiplier,
                "sample_rate": self.privacy.sample_rate,
                **provenance,
            },
            factor=self.settings.factor,
        )


def class_slots(budgets: np.ndarray) -> tuple[list[int], torch.Tensor]:
    """Classes that get images, and a lookup class -> slot in that list (-1 for the others)."""
    present = [int(c) for c in np.flatnonzero(budgets > 0)]
    slots = torch.full((len(budgets),), -1, dtype=torch.int64)
    slots[present] = torch.arange(len(present))
    return present, slots


def poisson_by_slot(
    privacy: PrivateData, labels_cpu: torch.Tensor, slots: torch.Tensor
) -> list[torch.Tensor]:
    """One Poisson sample of all records (rate ``privacy.sample_rate``), split by class slot; CPU indices.

    Every record is sampled at the same rate, whatever its class; records of
    classes without images are dropped after sampling (their sums would not
    be used, and dropping them changes nothing for the others).
    """
    sampled = privacy.sample(len(labels_cpu))
    slot_of = slots[labels_cpu[sampled]]
    return [sampled[slot_of == slot] for slot in range(int(slots.max().item()) + 1)]


class ClassBatches(NamedTuple):
    """One Poisson sample split by class slot, each slot beside its synthetic images under the same augmentation."""

    real: torch.Tensor
    """The sampled real images of every slot, slot by slot."""
    slot_of_row: torch.Tensor
    """The class slot of each row of ``real`` (CPU)."""
    synthetic: list[torch.Tensor]
    """Per slot, that class's synthetic images."""
    draws: list[AugmentParams | None]
    """Per slot, the siamese augmentation draw both sides took (``None`` without augmentation): public, replayable."""


def sample_class_batches(
    images: torch.Tensor,
    syn: torch.Tensor,
    samples: list[torch.Tensor],
    present: list[int],
    offsets: np.ndarray,
    augment: SiameseAugment | None,
    generator: torch.Generator,
) -> ClassBatches:
    """Per class slot, the sampled real images and the class's synthetic images under one siamese draw.

    The augmentation parameters are drawn whatever the sample size, so the
    public randomness never depends on the private data.
    """
    reals, slot_ids, synthetic, draws = [], [], [], []
    for slot, cls in enumerate(present):
        real = images[samples[slot].to(images.device)]
        mine = syn[offsets[cls] : offsets[cls + 1]]
        params = None
        if augment is not None:
            params = augment.sample(1, generator, syn.device, siamese=True)
            mine = augment.apply(mine, params)
            real = augment.apply(real, params) if len(real) else real
        reals.append(real)
        slot_ids.append(torch.full((len(real),), slot, dtype=torch.int64))
        synthetic.append(mine)
        draws.append(params)
    return ClassBatches(torch.cat(reals), torch.cat(slot_ids), synthetic, draws)


def public_start(
    public: ImageData, budgets: np.ndarray, generator: torch.Generator, device: torch.device, factor: int = 1
) -> SyntheticSet:
    """A private method's starting set from public images: ``budgets[c]`` random public images of class ``c``.

    Classes the public pool has too few images of are topped up with N(0, 1)
    noise. Only public images and public randomness are read, so the start
    costs no privacy; ``budgets`` come from the released (noisy) counts. With
    ``factor`` > 1 each stored image tiles ``factor**2`` shrunk public images.
    """
    images = public.normalized(device)
    check_factor(factor, tuple(images.shape[2:]))
    tiles = factor * factor
    parts, labels = [], []
    for cls, budget in enumerate(budgets.tolist()):
        rows = np.flatnonzero(public.labels == cls)
        chosen = torch.from_numpy(rows)[torch.randperm(len(rows), generator=generator)[: budget * tiles]]
        noise = torch.randn((budget * tiles - len(chosen), *images.shape[1:]), generator=generator).to(device)
        parts += [images[chosen.to(device)], noise]
        labels.append(torch.full((budget,), cls, dtype=torch.int64))
    whole = [encode(torch.cat(parts[index : index + 2]), factor) for index in range(0, len(parts), 2)]
    return SyntheticSet(
        torch.cat(whole),
        torch.cat(labels).to(device),
        len(budgets),
        np.zeros(len(budgets), dtype=np.int64),
        provenance={"init": "public", "public_images": int(sum(len(p) for p in parts[::2]))},
        factor=factor,
    )
