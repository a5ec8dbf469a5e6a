"""The one interface every distillation method implements, and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedistill.distill.embedding import random_network
from fedistill.models import ModelSpec
from fedistill.synthetic import SyntheticSet, check_factor, encode
from fedistill.teacher import soft_label, train_teacher

ProgressFn = Callable[[int, int, float], None]
"""Called as ``progress(iteration, total, loss)`` during long distillations."""

NetworkSource = Callable[[torch.Generator, bool], nn.Module]
"""``source(generator, trainable)`` gives the network to match under next (default: a fresh random one)."""

IterationHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called as ``hook(iteration, real_images, real_labels, synthetic_images)`` before each iteration.

It may update ``real_images`` in place (e.g. a backdoor re-stamping its
trigger); ``synthetic_images`` is a detached view, to read only.
"""


@dataclass
class DistillSettings:
    """Method-independent knobs; each method reads what it needs and ignores nothing silently.

    ``iterations`` is the outer budget (DM/DC iterations; unused by coresets).
    ``None`` means "the method's published default" (learning rate, DC loop lengths).
    ``real_precision`` is the dtype of the no-grad forward pass over real images:
    ``fp32``, ``bf16``, or ``auto`` (bf16 where the hardware has fast bf16 matmuls).
    ``compile`` (``auto``/``on``/``off``) compiles DM's forward passes; ``auto`` does so for long runs.
    ``factor`` > 1 stores ``factor**2`` smaller images in each image (methods with ``factorised``).
    ``labels = "teacher"`` soft-labels the result with a network trained ``teacher_epochs`` epochs on the
    real images, at softmax ``temperature``.
    ``syn_steps`` .. ``batch_syn`` are trajectory matching's (``mtt``; see ``distill.mtt``):
    ``expert_train_epochs`` ``None`` trains experts just long enough for the latest start
    (``max_start_epoch + expert_epochs - 1``), ``batch_syn`` ``None`` steps on the whole set.
    ``replay_steps`` are ``dp-dm``'s image steps against its earlier releases after each release.
    ``cache_dir`` is where expert trajectories and teachers are kept between runs (``None``: not
    kept); the runners set it, it is not a config key.
    """

    ipc: int = 10
    iterations: int = 1000
    lr_images: float | None = None
    batch_real: int = 256
    init: str = "real"
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_net: float = 0.01
    batch_train: int = 256
    real_precision: str = "auto"
    compile: str = "auto"
    factor: int = 1
    labels: str = "hard"
    teacher_epochs: int = 5
    temperature: float = 4.0
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 10
    num_experts: int = 5
    expert_train_epochs: int | None = None
    lr_teacher: float = 0.01
    lr_lr: float = 1e-5
    batch_syn: int | None = None
    replay_steps: int = 0
    cache_dir: str | None = None


class Distiller(ABC):
    """Base class: ``Distiller(spec, settings, device)(images, labels, num_classes, seed)``.

    ``images`` are normalised float NCHW tensors of one client's (or the central) data;
    classes may be missing or have fewer than ``ipc`` images: such classes get
    ``min(ipc, count)`` images (none when absent), and ``source_counts`` in the
    result says how many real images each class had.
    """

    name: ClassVar[str]
    refines: ClassVar[bool] = True
    """Whether the method optimises images (and so can continue from a ``start`` set); coresets select instead."""
    private: ClassVar[bool] = False
    """Whether the method reads the data only through DP mechanisms (``distill.private.PrivateDistiller``)."""
    factorised: ClassVar[bool] = False
    """Whether the method can store ``settings.factor**2`` smaller images per image."""
    uses_teacher: ClassVar[bool] = False
    """Whether the method itself trains a teacher on the real images (RDED), whatever ``settings.labels``."""

    def needs_teacher(self) -> bool:
        """Whether this run trains a teacher: for the method, or to soft-label its result."""
        return self.uses_teacher or self.settings.labels == "teacher"

    def __init__(
        self,
        model_spec: ModelSpec,
        settings: DistillSettings,
        device: torch.device,
        networks: NetworkSource | None = None,
        start: SyntheticSet | None = None,
        on_iteration: IterationHook | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        """``networks`` replaces the random matching networks (FedDM: the perturbed global model);
        ``start`` continues from an earlier set of the same per-class sizes instead of ``settings.init``;
        ``on_iteration`` is called before each iteration of methods that iterate (see ``IterationHook``);
        ``teacher`` is an already trained teacher for these images (else one is trained when needed)."""
        if start is not None and not self.refines:
            raise ValueError(f"distill.method {self.name}: selects real images and cannot continue from a set")
        if on_iteration is not None and not self.refines:
            raise ValueError(f"distill.method {self.name}: selects real images once; there are no iterations to hook")
        if settings.factor != 1 and not self.factorised:
            raise ValueError(f"distill.factor: method {self.name} stores whole images; it needs factor 1")
        if settings.labels not in ("hard", "teacher"):
            raise ValueError(f"distill.labels: unknown value {settings.labels!r}; allowed: hard, teacher")
        if settings.labels == "teacher" and self.private:
            raise ValueError(f"distill.labels 'teacher': method {self.name} is private and a teacher reads raw data")
        if start is not None and start.factor != settings.factor:
            raise ValueError(f"start set has factor {start.factor}, distill.factor is {settings.factor}")
        self.model_spec = model_spec
        self.settings = settings
        self.device = device
        self.networks = networks
        self.start = start
        self.on_iteration = on_iteration
        self.teacher = teacher
        self.initial_rows: torch.Tensor | None = None
        """Rows of the real images the set started from (``settings.init = "real"``), in stored tile order."""

    def teacher_for(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int) -> nn.Module:
        """The teacher of these real images: the one given, else trained once and kept on this distiller."""
        if self.teacher is None:
            cache = None if self.settings.cache_dir is None else Path(self.settings.cache_dir)
            self.teacher = train_teacher(
                images, labels, num_classes, self.model_spec, self.settings.teacher_epochs, seed, cache
            )
        return self.teacher

    def before_iteration(
        self, iteration: int, images: torch.Tensor, labels: torch.Tensor, syn: torch.Tensor
    ) -> None:
        """Give ``on_iteration`` its turn; iterating methods call this at the top of each iteration."""
        if self.on_iteration is not None:
            self.on_iteration(iteration, images, labels, syn.detach())

    def network(
        self, image_shape: tuple[int, ...] | torch.Size, num_classes: int, generator: torch.Generator, trainable: bool = False
    ) -> nn.Module:
        """The next network to match under: from ``networks`` when given, else freshly initialised."""
        if self.networks is not None:
            return self.networks(generator, trainable)
        return random_network(self.model_spec, image_shape, num_classes, generator, self.device, trainable)

    def starting_images(
        self,
        images: torch.Tensor,
        rows_per_class: list[torch.Tensor],
        budgets: np.ndarray,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The images optimisation starts from: the ``start`` set when given, else ``settings.init``.

        Real starting images are remembered (``initial_rows``): the set records
        them as ``init_rows``, the membership audit's worst-case targets.
        """
        if self.start is None:
            start, self.initial_rows = initial_images(
                images, rows_per_class, budgets, self.settings.init, generator, self.settings.factor
            )
            return start
        return self.start_images(images.shape[1:], budgets).to(images.dtype)

    def start_images(self, image_shape: torch.Size | tuple[int, ...], budgets: np.ndarray) -> torch.Tensor:
        """The ``start`` set's images ordered by class (a copy on the device), once it fits ``budgets`` and the shape."""
        start = self.start
        if start is None:
            raise RuntimeError(f"{self.name}: no start set to begin from")
        if not np.array_equal(start.images_per_class(), budgets):
            raise ValueError(
                f"start set has {start.images_per_class().tolist()} images per class, this data needs {budgets.tolist()}"
            )
        if tuple(start.images.shape[1:]) != tuple(image_shape):
            raise ValueError(f"start set images are {tuple(start.images.shape[1:])}, data {tuple(image_shape)}")
        order = torch.argsort(start.labels.cpu(), stable=True)
        return start.images[order].to(self.device, torch.float32).detach().clone()

    @abstractmethod
    def distill(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        """Return a synthetic set for these real images."""

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> SyntheticSet:
        generator = torch.Generator().manual_seed(seed)
        images, labels = images.to(self.device), labels.to(self.device)
        result = self.distill(images, labels, num_classes, generator, progress)
        if self.settings.labels == "teacher" and len(result):
            teacher = self.teacher_for(images, labels, num_classes, seed)
            result = soft_label(result, teacher, self.settings.temperature)
        if self.initial_rows is not None:
            result.provenance["init_rows"] = self.initial_rows.tolist()
        result.provenance.setdefault("method", self.name)
        result.provenance.setdefault("ipc", self.settings.ipc)
        result.provenance.setdefault("seed", seed)
        result.provenance.setdefault("labels", self.settings.labels)
        if self.settings.factor != 1:
            result.provenance.setdefault("factor", self.settings.factor)
        return result


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class's images (empty tensor for absent classes)."""
    return [torch.nonzero(labels == c, as_tuple=False).flatten() for c in range(num_classes)]


def per_class_budget(counts: np.ndarray, ipc: int) -> np.ndarray:
    """Synthetic images per class: ``ipc`` where a class has at least that many real images, else its count."""
    return np.minimum(counts, ipc).astype(np.int64)


def source_counts(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    return np.bincount(labels.cpu().numpy(), minlength=num_classes).astype(np.int64)


def initial_images(
    images: torch.Tensor,
    rows_per_class: list[torch.Tensor],
    budgets: np.ndarray,
    init: str,
    generator: torch.Generator,
    factor: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting synthetic images, class by class: random real images of the class, or Gaussian noise.

    With ``factor`` > 1 each starting image tiles ``factor**2`` shrunk real
    images of its class (IDC's initialisation); a class with fewer real images
    than tiles repeats some. Also returns the rows of ``images`` used, in tile
    order (None for noise).
    """
    if init not in ("real", "noise"):
        raise ValueError(f"distill.init: unknown value {init!r}; allowed: real, noise")
    check_factor(factor, tuple(images.shape[2:]))
    tiles = factor * factor
    parts, used = [], []
    for rows, budget in zip(rows_per_class, budgets):
        if budget == 0:
            continue
        if init == "real":
            wanted = int(budget) * tiles
            pool = rows.repeat(-(-wanted // len(rows))) if len(rows) < wanted else rows
            picked = pool[torch.randperm(len(pool), generator=generator)[:wanted].to(rows.device)]
            parts.append(encode(images[picked].detach().clone(), factor))
            used.append(picked.cpu())
        else:
            noise = torch.randn((int(budget), *images.shape[1:]), generator=generator)
            parts.append(noise.to(images.device, images.dtype))
    start = torch.cat(parts) if parts else images.new_zeros((0, *images.shape[1:]))
    if init != "real":
        return start, None
    return start, torch.cat(used) if used else torch.zeros(0, dtype=torch.int64)


def sample_rows(rows: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``batch`` distinct rows of one class, uniformly at random."""
    if len(rows) <= batch:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:batch].to(rows.device)]


_REGISTRY: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a method to the registry under ``name``."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _REGISTRY:
            raise ValueError(f"distiller {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_distiller(name: str) -> type[Distiller]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"distill.method: unknown method {name!r}; allowed: {', '.join(available_methods())}") from None
