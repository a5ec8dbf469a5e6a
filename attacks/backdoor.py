"""Backdoors: triggers, poisoning a client's data, NAIVEATTACK and DOORPING, and CTA / ASR.

A trigger stamps [0, 1] pixels as ``x * (1 - mask) + pattern * mask``: a patch
has mask 1 on a small square (pattern white), a blended trigger mask ``alpha``
everywhere over a seeded noise pattern. A backdoor attack poisons a share
(``rate``) of a client's images: non-target images are stamped and relabelled
to the target class, the way a malicious client would before distilling.

- ``NaiveAttack`` (NAIVEATTACK, Liu et al. 2023): poison, then distil as usual.
- ``Doorping`` (DOORPING, same paper): the trigger is optimised while the
  client distils, starting from random pixels in the configured region (the
  authors' code does the same; a white patch would leave little to
  optimise). Every ``period`` iterations a surrogate network (the run's
  architecture, trained a few steps on the client's current poisoned data)
  names the penultimate unit most connected to the target class; a few signed
  gradient steps on the trigger pattern push that unit's activation up on
  stamped images, and the poisoned rows are re-stamped in place through the
  distiller's ``on_iteration`` hook.

ASR counts only test images whose true class is not the target (BackdoorBench),
so a model that predicts the target class for its own images scores no success.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from attacks.pixels import PixelModel, normalize, predict, quantize, to_pixels
from attacks.registry import Registry
from fedistill.data import DatasetInfo, ImageData
from fedistill.distill import IterationHook
from fedistill.models import ModelSpec, build_model

if TYPE_CHECKING:
    from fedistill.attack_config import BackdoorConfig
    from fedistill.config import ExperimentConfig

TRIGGERS = Registry["type[Trigger]"]("attack.backdoor.trigger")
BACKDOORS = Registry["type[BackdoorAttack]"]("attack.backdoor.method")

SURROGATE_STEPS = 10
"""SGD steps of DOORPING's surrogate per trigger update (batches of ``SURROGATE_BATCH`` poisoned real images)."""
SURROGATE_BATCH = 128
TRIGGER_BATCH = 128
"""Poisoned images per DOORPING trigger step."""


class Trigger:
    """``trigger(pixels)`` stamps [0, 1] images (N, C, H, W): ``x * (1 - mask) + pattern * mask``."""

    name: ClassVar[str] = "custom"

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor, kind: str | None = None) -> None:
        if pattern.ndim != 3 or mask.ndim != 3 or mask.shape[1:] != pattern.shape[1:]:
            raise ValueError(
                f"trigger: pattern (C, H, W) and mask (1 or C, H, W), got {tuple(pattern.shape)}, {tuple(mask.shape)}"
            )
        self.pattern = pattern.float().clamp(0, 1)
        self.mask = mask.float().clamp(0, 1)
        self.kind = kind or self.name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.pattern.to(pixels.device), self.mask.to(pixels.device)
        return (pixels * (1 - mask) + pattern * mask).clamp(0, 1)

    def to(self, device: torch.device | str) -> Trigger:
        self.pattern, self.mask = self.pattern.to(device), self.mask.to(device)
        return self

    def region(self) -> torch.Tensor:
        """Boolean (H, W) map of the pixels the trigger touches."""
        return self.mask.amax(0) > 0

    def save(self, path: Path | str, **metadata: Any) -> Path:
        """safetensors file (no pickle: the audit reads what a client wrote)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"pattern": self.pattern.detach().cpu().contiguous(), "mask": self.mask.detach().cpu().contiguous()}
        save_file(tensors, str(path), metadata={"kind": self.kind, **{k: json.dumps(v) for k, v in metadata.items()}})
        return path

    @classmethod
    def load(cls, path: Path | str) -> Trigger:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get("kind", "custom")
        tensors = load_file(str(path))
        return Trigger(tensors["pattern"], tensors["mask"], kind)


@TRIGGERS.register("patch")
class PatchTrigger(Trigger):
    """A ``size`` x ``size`` square of ``value`` (white) at ``position``: the classic BadNets patch."""

    def __init__(
        self, shape: tuple[int, int, int], size: int = 3, position: str = "bottom-right", value: float = 1.0
    ) -> None:
        channels, height, width = shape
        if not 1 <= size <= min(height, width):
            raise ValueError(f"attack.backdoor.patch_size: {size} does not fit {height}x{width} images")
        rows = {"top": 0, "bottom": height - size, "center": (height - size) // 2}
        cols = {"left": 0, "right": width - size, "center": (width - size) // 2}
        vertical, _, horizontal = position.partition("-")
        if vertical not in rows or (horizontal or "center") not in cols:
            raise ValueError(f"attack.backdoor.position: unknown value {position!r}")
        top, left = rows[vertical], cols[horizontal or "center"]
        mask = torch.zeros(1, height, width)
        mask[:, top : top + size, left : left + size] = 1.0
        super().__init__(torch.full((channels, height, width), float(value)), mask)


@TRIGGERS.register("blended")
class BlendedTrigger(Trigger):
    """Uniform noise (seeded) blended over the whole image at ``alpha`` (Chen et al. 2017)."""

    def __init__(self, shape: tuple[int, int, int], alpha: float = 0.2, seed: int = 0) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"attack.backdoor.blend_alpha: must be in (0, 1], got {alpha}")
        generator = torch.Generator().manual_seed(seed)
        pattern = torch.rand(shape, generator=generator)
        super().__init__(pattern, torch.full((1, *shape[1:]), float(alpha)))


@dataclass
class Poisoned:
    """A client's data after poisoning: ``rows`` were stamped and relabelled; ``clean`` holds their originals."""

    data: ImageData
    rows: np.ndarray
    clean: np.ndarray
    original_labels: np.ndarray


def poison(data: ImageData, trigger: Trigger, rate: float, target: int, seed: int = 0) -> Poisoned:
    """Stamp ``round(rate * len(data))`` random non-target images (at most all of them) and relabel them ``target``.

    Returns a copy; ``data`` is left as it was.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"attack.backdoor.rate: must be in (0, 1], got {rate}")
    if not 0 <= target < data.info.num_classes:
        raise ValueError(f"attack.backdoor.target: {target} is not a class of {data.info.name}")
    candidates = np.flatnonzero(data.labels != target)
    count = min(len(candidates), round(rate * len(data)))
    rows = np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))
    images, labels = data.images.copy(), data.labels.copy()
    if count:
        images[rows] = quantize(trigger(to_pixels(data.subset(rows))))
        labels[rows] = target
    return Poisoned(ImageData(images, labels, data.info), rows, data.images[rows].copy(), data.labels[rows].copy())


class BackdoorAttack(ABC):
    """``attack(data) -> Poisoned``; ``distill_hook`` gives the distiller's hook (None: nothing during distillation)."""

    name: ClassVar[str]

    def __init__(self, trigger: Trigger, target: int, rate: float, seed: int = 0) -> None:
        self.trigger = trigger
        self.target = target
        self.rate = rate
        self.seed = seed

    def __call__(self, data: ImageData) -> Poisoned:
        return poison(data, self.trigger, self.rate, self.target, self.seed)

    @abstractmethod
    def distill_hook(self, poisoned: Poisoned, model_spec: ModelSpec, device: torch.device) -> IterationHook | None:
        """What the attack does while the client distils (see ``fedistill.distill.IterationHook``)."""


@BACKDOORS.register("naive")
class NaiveAttack(BackdoorAttack):
    """NAIVEATTACK: the poisoned data is distilled like any other."""

    def distill_hook(self, poisoned: Poisoned, model_spec: ModelSpec, device: torch.device) -> IterationHook | None:
        return None


@BACKDOORS.register("doorping")
class Doorping(BackdoorAttack):
    """DOORPING: the trigger is re-optimised every ``period`` distillation iterations and re-stamped."""

    def __init__(
        self,
        trigger: Trigger,
        target: int,
        rate: float,
        seed: int = 0,
        period: int = 10,
        steps: int = 10,
        lr: float = 0.05,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(trigger.pattern.shape, generator=generator).to(trigger.pattern.device)
        # Random pixels inside the trigger's region, as the DOORPING authors' code starts: from a saturated
        # (white) patch, signed ascent clamped to [0, 1] often has nothing to change and DOORPING stays NAIVEATTACK.
        trigger.pattern = torch.where(trigger.mask > 0, noise, trigger.pattern)
        super().__init__(trigger, target, rate, seed)
        self.period, self.steps, self.lr = period, steps, lr

    def distill_hook(self, poisoned: Poisoned, model_spec: ModelSpec, device: torch.device) -> IterationHook | None:
        return DoorpingHook(self, poisoned, model_spec, device)


class DoorpingHook:
    """The distiller's ``on_iteration`` hook for DOORPING (see the module docstring); updates ``attack.trigger``."""

    def __init__(self, attack: Doorping, poisoned: Poisoned, model_spec: ModelSpec, device: torch.device) -> None:
        info = poisoned.data.info
        self.attack = attack
        self.info = info
        self.rows = torch.as_tensor(poisoned.rows, device=device)
        self.clean = to_pixels(ImageData(poisoned.clean, poisoned.original_labels, info), device)
        self.generator = torch.Generator().manual_seed(attack.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(attack.seed)
            network = build_model(model_spec, info.shape, info.num_classes)
        self.surrogate = PixelModel(network.to(device), info)
        self.optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
        attack.trigger.to(device)
        self.updates = 0

    def __call__(self, iteration: int, images: torch.Tensor, labels: torch.Tensor, syn: torch.Tensor) -> None:
        if iteration % self.attack.period or len(self.rows) == 0:
            return
        self._train_surrogate(images, labels)
        neuron = int(self.surrogate.model.classifier.weight[self.attack.target].argmax())  # type: ignore[index]
        self._raise_activation(neuron)
        with torch.no_grad():
            images[self.rows] = normalize(self.attack.trigger(self.clean), self.info).to(images.dtype)
        self.updates += 1

    def _train_surrogate(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        network = self.surrogate.model
        network.train()
        for _ in range(SURROGATE_STEPS):
            batch = torch.randint(0, len(images), (min(SURROGATE_BATCH, len(images)),), generator=self.generator)
            batch = batch.to(images.device)
            loss = F.cross_entropy(network(images[batch]), labels[batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def _raise_activation(self, neuron: int) -> None:
        """Signed gradient ascent of the unit's mean activation on stamped images, on the pattern (kept in [0, 1])."""
        trigger = self.attack.trigger
        network = self.surrogate
        network.eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        pattern = trigger.pattern.clone().requires_grad_(True)
        for _ in range(self.attack.steps):
            batch = torch.randint(0, len(self.clean), (min(TRIGGER_BATCH, len(self.clean)),), generator=self.generator)
            clean = self.clean[batch.to(self.clean.device)]
            stamped = (clean * (1 - trigger.mask) + pattern * trigger.mask).clamp(0, 1)
            activation = network.embed(stamped)[:, neuron].mean()
            (grad,) = torch.autograd.grad(activation, pattern)
            with torch.no_grad():
                pattern.add_(self.attack.lr * grad.sign()).clamp_(0, 1)
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        trigger.pattern = pattern.detach()


def configured_trigger(backdoor: BackdoorConfig, info: DatasetInfo, seed: int) -> Trigger:
    """The trigger the config describes (DOORPING randomises its pixels); blended noise is seeded by the experiment seed."""
    cls = TRIGGERS.get(backdoor.trigger)
    if cls is PatchTrigger:
        return PatchTrigger(info.shape, backdoor.patch_size, backdoor.position)
    return BlendedTrigger(info.shape, backdoor.blend_alpha, seed)


def build_attack(backdoor: BackdoorConfig, info: DatasetInfo, seed: int) -> BackdoorAttack:
    """The configured attack with the configured trigger; ``seed`` picks the poisoned rows (and DOORPING's draws)."""
    cls = BACKDOORS.get(backdoor.method)
    trigger = configured_trigger(backdoor, info, seed)
    if cls is Doorping:
        return Doorping(trigger, backdoor.target, backdoor.rate, seed, backdoor.doorping_period,
                        backdoor.doorping_steps, backdoor.doorping_lr)
    return cls(trigger, backdoor.target, backdoor.rate, seed)


def client_backdoor(config: ExperimentConfig, partition_id: int, info: DatasetInfo, seed: int) -> BackdoorAttack | None:
    """The attack a node runs when its partition is in ``attack.backdoor.malicious_clients``; None for honest nodes."""
    if partition_id not in config.attack.backdoor.malicious():
        return None
    return build_attack(config.attack.backdoor, info, seed)


ARTEFACTS = ".attack-artefacts"


def config_digest(config: ExperimentConfig) -> str:
    """Short digest of the whole experiment: names where a run's malicious clients leave their triggers."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def trigger_path(config: ExperimentConfig, partition_id: int) -> Path:
    """Where a malicious node records the trigger it used (the experimenter's record, never sent to the server).

    ``output_dir/.attack-artefacts/<experiment digest>/trigger-<partition id>.safetensors``:
    the audit of a run finds it from the run's config. Nodes on other machines
    write to their own disk; the audit then falls back to the configured trigger.
    """
    return Path(config.output_dir) / ARTEFACTS / config_digest(config) / f"trigger-{partition_id}.safetensors"


def attack_success_rate(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, trigger: Trigger, target: int, batch_size: int = 1024
) -> tuple[float, int]:
    """Share of stamped non-target test images that pixel-space ``model`` classifies as ``target``, and their count."""
    keep = labels.cpu() != target
    if not keep.any():
        raise ValueError("ASR: every test image is of the target class; there is nothing to attack")
    stamped = trigger(pixels[keep.to(pixels.device)])
    hits = predict(model, stamped, batch_size) == target
    return float(hits.float().mean()), int(keep.sum())


def backdoor_metrics(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, trigger: Trigger, target: int
) -> dict[str, float]:
    """Clean test accuracy (all test images) and ASR (non-target images, stamped) of pixel-space ``model``."""
    cta = float((predict(model, pixels) == labels.cpu()).float().mean())
    asr, count = attack_success_rate(model, pixels, labels, trigger, target)
    return {"cta": cta, "asr": asr, "asr_images": count}
