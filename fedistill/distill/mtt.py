"""Trajectory matching (MTT, Cazenavette et al. 2022), with gradients whose memory does not grow with the steps.

Experts are networks trained on the real images with their parameters saved
every epoch (``fedistill.experts``, cached). Each iteration picks an expert
and a start epoch ``t`` uniformly in ``[0, max_start_epoch)``; a student
starts at the expert's ``theta_t`` and takes ``syn_steps`` SGD steps on
minibatches of the synthetic images with a learnable learning rate. The loss
is MTT's ``||theta_N - theta_{t+M}||^2 / ||theta_t - theta_{t+M}||^2`` with
``M = expert_epochs``; images (SGD, momentum 0.5) and the learning rate (SGD,
``lr_lr``, momentum 0.5) follow its gradient.

Autograd through all steps keeps every step's activations, so memory grows
with ``syn_steps`` (MTT's known limit). ``memory_flat_gradients`` computes the
same gradient exactly with a reverse pass instead: the forward pass keeps only
the parameter vectors ``theta_0 .. theta_N`` and each step's minibatch and
augmentation draw; walking back, step ``i``'s gradient ``g_i`` is recomputed
with a graph, and vector-Jacobian products carry the adjoint
``a_i = a_{i+1} - lr * (dg_i/dtheta_i)^T a_{i+1}`` while adding
``-lr * (dg_i/dX)^T a_{i+1}`` to the images' gradient and ``-g_i . a_{i+1}``
to the learning rate's: reverse mode through the SGD recursion with
recomputation (TESLA, Cui et al. 2023, targets the same memory growth).
Only one step's graph is alive at a time. ``unrolled_gradients`` is
the plain autograd reference the tests and ``benchmarks/bench_mtt_speed.py``
compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedistill.augment import AugmentParams, SiameseAugment
from fedistill.distill.base import (
    Distiller,
    DistillSettings,
    IterationHook,
    NetworkSource,
    ProgressFn,
    class_indices,
    per_class_budget,
    register,
    source_counts,
)
from fedistill.experts import train_experts
from fedistill.models import ModelSpec, build_model
from fedistill.synthetic import SyntheticSet, decode

MTT_LR_IMAGES = 100.0
"""Image learning rate, measured here: MTT's code default, 1000 (its runs without ZCA), drove Fashion-MNIST pixels
to max 33 within 15 iterations (ConvNet-3, IPC 1, 1000 real images), against 5 at 100 (loss 2.7 against 0.5).
100 is also what MTT's CIFAR-10 IPC 1 runs use with ZCA (second-hand). Small networks on 8x8 digits want 10."""
MTT_MOMENTUM = 0.5


class FlatNetwork:
    """A module evaluated at any flat parameter vector (``parameters()`` order), through ``functional_call``."""

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_parameters())
        self.module = module
        self.names = [name for name, _ in named]
        self.shapes = [parameter.shape for _, parameter in named]
        self.sizes = [parameter.numel() for _, parameter in named]

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = flat.split(self.sizes)
        tensors = {name: part.view(shape) for name, part, shape in zip(self.names, parts, self.shapes, strict=True)}
        return functional_call(self.module, tensors, (x,))


@dataclass(frozen=True)
class StudentStep:
    """What one student step trains on: rows of the set (``None``: all) and their augmentation draw, if any."""

    rows: torch.Tensor | None
    augment: AugmentParams | None


@dataclass
class Student:
    """The student's loss at a parameter vector: cross-entropy on one step's (augmented) minibatch."""

    net: FlatNetwork
    labels: torch.Tensor
    augment: SiameseAugment | None

    def loss(self, theta: torch.Tensor, images: torch.Tensor, step: StudentStep) -> torch.Tensor:
        x = images if step.rows is None else images[step.rows]
        y = self.labels if step.rows is None else self.labels[step.rows]
        if step.augment is not None:
            if self.augment is None:
                raise ValueError("mtt: a step carries augmentation draws but the student has no augmentation")
            x = self.augment.apply(x, step.augment)
        return F.cross_entropy(self.net(theta, x), y)


@dataclass(frozen=True)
class Matching:
    """The matching loss and its gradients with respect to the images and the synthetic learning rate."""

    loss: float
    images_grad: torch.Tensor
    lr_grad: torch.Tensor


def plan_steps(
    count: int,
    steps: int,
    batch: int | None,
    augment: SiameseAugment | None,
    generator: torch.Generator,
    device: torch.device,
) -> list[StudentStep]:
    """MTT's minibatches (shuffled passes over the set, ``batch`` rows at a time) and one draw per step.

    The draws are per image, one op per step, as MTT's DiffAugment; keeping
    them lets the reverse pass replay exactly the forward pass's transforms.
    """
    plan: list[StudentStep] = []
    pending: list[torch.Tensor] = []
    for _ in range(steps):
        rows = None
        if batch is not None and batch < count:
            if not pending:
                pending = list(torch.randperm(count, generator=generator).split(batch))
            rows = pending.pop(0).to(device)
        size = count if rows is None else len(rows)
        draw = None if augment is None else augment.sample(size, generator, device, siamese=False)
        plan.append(StudentStep(rows, draw))
    return plan


def _distance(theta: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """MTT's normalised distance ``||theta - target||^2 / ||start - target||^2``."""
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()


def memory_flat_gradients(
    student: Student,
    images: torch.Tensor,
    lr: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    steps: list[StudentStep],
) -> Matching:
    """The matching loss's exact gradients by a reverse pass over recomputed steps (see the module docstring).

    Memory: ``len(steps) + 1`` parameter vectors plus one step's graph,
    whatever the number of steps; time: about one more forward and backward
    pass per step than ``unrolled_gradients``.
    """
    rate = lr.detach()
    x = images.detach()
    thetas = [start.detach()]
    for step in steps:
        theta = thetas[-1].requires_grad_(True)
        (grad,) = torch.autograd.grad(student.loss(theta, x, step), theta)
        thetas.append((theta - rate * grad).detach())
    final = thetas[-1]
    denominator = ((start - target) ** 2).sum()
    loss = float(_distance(final, target, start))
    adjoint = 2 * (final - target) / denominator
    leaf = x.requires_grad_(True)
    images_grad = torch.zeros_like(x)
    lr_grad = torch.zeros_like(rate)
    for index in reversed(range(len(steps))):
        theta = thetas[index].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(student.loss(theta, leaf, steps[index]), theta, create_graph=True)
        lr_grad -= (grad.detach() * adjoint).sum()
        # theta_0 is the expert's checkpoint, a constant: its adjoint is not needed.
        inputs = (leaf, theta) if index > 0 else (leaf,)
        products = torch.autograd.grad((grad * adjoint).sum(), inputs)
        images_grad -= rate * products[0]
        if index > 0:
            adjoint = adjoint - rate * products[1]
    return Matching(loss, images_grad, lr_grad)


def unrolled_gradients(
    student: Student,
    images: torch.Tensor,
    lr: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    steps: list[StudentStep],
) -> Matching:
    """The same gradients by plain autograd through every step (MTT's implementation): memory grows with steps."""
    x = images.detach().requires_grad_(True)
    rate = lr.detach().requires_grad_(True)
    theta = start.detach().requires_grad_(True)
    for step in steps:
        (grad,) = torch.autograd.grad(student.loss(theta, x, step), theta, create_graph=True)
        theta = theta - rate * grad
    loss = _distance(theta, target, start)
    images_grad, lr_grad = torch.autograd.grad(loss, (x, rate))
    return Matching(float(loss.detach()), images_grad, lr_grad)


def expert_train_epochs(settings: DistillSettings) -> int:
    """Epochs each expert trains: ``settings.expert_train_epochs``, by default just enough for the latest start."""
    needed = settings.max_start_epoch + settings.expert_epochs - 1
    epochs = needed if settings.expert_train_epochs is None else settings.expert_train_epochs
    if epochs < needed:
        raise ValueError(
            f"distill.expert_train_epochs: {epochs} is too short to start at epoch {settings.max_start_epoch - 1} "
            f"and match {settings.expert_epochs} epochs ahead; needs >= {needed}"
        )
    return epochs


def check_settings(settings: DistillSettings) -> None:
    """Refuse MTT settings that cannot run, naming the key (the config's bounds, for callers of the library)."""
    for key in ("syn_steps", "expert_epochs", "max_start_epoch", "num_experts"):
        if getattr(settings, key) < 1:
            raise ValueError(f"distill.{key}: must be >= 1, got {getattr(settings, key)}")
    if settings.batch_syn is not None and settings.batch_syn < 1:
        raise ValueError(f"distill.batch_syn: must be >= 1 (or unset for the whole set), got {settings.batch_syn}")
    for key in ("lr_teacher", "lr_lr"):
        if not getattr(settings, key) > 0:
            raise ValueError(f"distill.{key}: must be > 0, got {getattr(settings, key)}")
    expert_train_epochs(settings)


@register("mtt")
class TrajectoryMatching(Distiller):
    """MTT on cached expert trajectories, with the memory-flat gradient.

    Experts are trained on the images given (a client's own data in a
    federation), cached under ``settings.cache_dir`` (none: kept for the call
    only). With ``settings.factor`` > 1 the stored images are decoded before
    the student sees them and the gradient flows back into the stored pixels.
    """

    factorised = True

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
        if networks is not None:
            raise ValueError("distill.method mtt: matches expert trajectories and cannot match under given networks")
        if model_spec.arch == "convnet" and model_spec.norm == "batchnorm":
            raise ValueError("distill.method mtt: model.norm must not be batchnorm (the student has no running stats)")
        check_settings(settings)
        super().__init__(model_spec, settings, device, start=start, on_iteration=on_iteration, teacher=teacher)

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
        syn = self.starting_images(images, rows_per_class, budgets, generator).requires_grad_(True)
        syn_labels = torch.repeat_interleave(
            torch.arange(num_classes, device=images.device), torch.from_numpy(budgets).to(images.device)
        )
        syn_lr = torch.tensor(settings.lr_teacher, device=images.device, requires_grad=True)
        epochs = expert_train_epochs(settings)
        provenance: dict[str, object] = {
            "init": settings.init,
            "iterations": settings.iterations,
            "dsa": settings.dsa,
            "syn_steps": settings.syn_steps,
            "expert_epochs": settings.expert_epochs,
            "max_start_epoch": settings.max_start_epoch,
            "num_experts": settings.num_experts,
            "expert_train_epochs": epochs,
            "lr_teacher": settings.lr_teacher,
        }
        if settings.iterations == 0 or len(syn) == 0:
            return SyntheticSet(
                syn.detach(), syn_labels, num_classes, counts, provenance=provenance, factor=settings.factor
            )
        expert_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        augment = SiameseAugment(settings.dsa_strategy) if settings.dsa else None
        experts = train_experts(
            images, labels, num_classes, self.model_spec, settings.num_experts, epochs, settings.lr_teacher,
            expert_seed, self.device, None if settings.cache_dir is None else Path(settings.cache_dir),
            dsa_strategy=None if augment is None else augment.strategy,
        )
        with torch.random.fork_rng(devices=[]):  # its values are never used: the student runs at given vectors
            template = build_model(self.model_spec, _shape(images), num_classes).to(self.device)
        tiles = settings.factor**2
        student = Student(FlatNetwork(template), torch.repeat_interleave(syn_labels, tiles), augment)
        image_optimizer = torch.optim.SGD([syn], lr=settings.lr_images or MTT_LR_IMAGES, momentum=MTT_MOMENTUM)
        lr_optimizer = torch.optim.SGD([syn_lr], lr=settings.lr_lr, momentum=MTT_MOMENTUM)
        for iteration in range(settings.iterations):
            self.before_iteration(iteration, images, labels, syn)
            trajectory = experts[int(torch.randint(len(experts), (1,), generator=generator))]
            start = int(torch.randint(settings.max_start_epoch, (1,), generator=generator))
            decoded = decode(syn, settings.factor)
            steps = plan_steps(len(decoded), settings.syn_steps, settings.batch_syn, augment, generator, self.device)
            matching = memory_flat_gradients(
                student, decoded, syn_lr, trajectory[start], trajectory[start + settings.expert_epochs], steps
            )
            image_optimizer.zero_grad(set_to_none=True)
            lr_optimizer.zero_grad(set_to_none=True)
            decoded.backward(matching.images_grad)
            syn_lr.grad = matching.lr_grad
            image_optimizer.step()
            lr_optimizer.step()
            if progress is not None and (iteration % 10 == 0 or iteration == settings.iterations - 1):
                progress(iteration + 1, settings.iterations, matching.loss)
        provenance["expert_seed"] = expert_seed
        provenance["synthetic_lr"] = float(syn_lr.detach())
        return SyntheticSet(
            syn.detach(), syn_labels, num_classes, counts, provenance=provenance, factor=settings.factor
        )


def _shape(images: torch.Tensor) -> tuple[int, int, int]:
    channels, height, width = (int(size) for size in images.shape[1:])
    return channels, height, width
