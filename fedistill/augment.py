"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

Distillation matches statistics of real and synthetic batches after
augmenting both. The matching signal is only meaningful if both batches see
the *same* transform, and the synthetic images only learn from it if the
transform is differentiable w.r.t. the pixels. So randomness is split from
application: :meth:`SiameseAugment.sample` draws an :class:`AugmentParams`
once, and :meth:`SiameseAugment.apply` replays it on any batch.

Siamese params hold one value per op (batch dimension 1) and broadcast over a
batch of any size; per-sample params (used when training an evaluation network
on a set) hold one value per image and only fit a batch of that size.

All geometric ops (crop, flip, scale, rotate) are affine maps in the
normalised coordinates of ``F.affine_grid``; consecutive ones are composed into
one matrix and resampled with a single ``grid_sample`` call, which is both
faster and loses less content to zero padding than resampling after each op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
GEOMETRIC_OPS: frozenset[str] = frozenset({"crop", "flip", "scale", "rotate"})
FULL_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DIGIT_STRATEGY = "color_crop_cutout_scale_rotate"
DIGIT_DATASETS: frozenset[str] = frozenset({"mnist", "digits", "emnist", "kmnist", "usps", "svhn"})

_REQUIRED: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("translate",),
    "cutout": ("cutout_center",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
_SHAPES: dict[str, tuple[int, ...]] = {
    "brightness": (),
    "saturation": (),
    "contrast": (),
    "translate": (2,),
    "cutout_center": (2,),
    "flip": (),
    "scale": (2,),
    "rotate": (),
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split an underscore-separated strategy into op names, rejecting typos early rather than silently skipping them."""
    ops = tuple(part.strip().lower() for part in strategy.split("_") if part.strip())
    if not ops:
        raise ValueError(f"augment strategy: no ops in {strategy!r}; allowed: {', '.join(OPS)}")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"augment strategy: unknown op {op!r}; allowed: {', '.join(OPS)}")
    repeated = sorted({op for op in ops if ops.count(op) > 1})
    if repeated:
        raise ValueError(f"augment strategy: op(s) {', '.join(repeated)} repeated in {strategy!r}")
    return ops


def default_strategy(dataset_name: str) -> str:
    """DSA's strategy for a dataset: mirroring changes a digit's meaning, so digit datasets get no flip."""
    key = dataset_name.strip().lower().replace("-", "").replace("_", "")
    return DIGIT_STRATEGY if key in DIGIT_DATASETS else FULL_STRATEGY


@dataclass(frozen=True)
class AugmentParams:
    """All random draws for one application, so the exact transform can be replayed on another batch.

    ``ops`` are applied in order. Each tensor has leading dimension 1 when
    ``siamese`` (shared by every image) or the batch size otherwise; a field is
    ``None`` when its op is not in ``ops``. Sizes are stored as fractions of the
    image so one draw fits images of any resolution.

    - ``brightness``: additive shift; ``saturation``: factor on the deviation
      from the per-pixel channel mean; ``contrast``: factor on the deviation
      from the per-image mean.
    - ``translate``: (x, y) shift as a fraction of (width, height), rounded to
      whole pixels; positive moves content right/down, vacated pixels are 0.
    - ``cutout_center``: (x, y) centre of the zeroed box as a fraction in [0, 1).
    - ``flip``: 1.0 mirrors horizontally, 0.0 keeps.
    - ``scale``: (x, y) factors applied to the sampling grid (>1 shrinks content).
    - ``rotate``: angle in degrees, counter-clockwise as displayed (row 0 on top).
    """

    ops: tuple[str, ...]
    siamese: bool
    brightness: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    translate: torch.Tensor | None = None
    cutout_center: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    rotate: torch.Tensor | None = None

    def __post_init__(self) -> None:
        parse_strategy("_".join(self.ops))
        sizes = set()
        for op in self.ops:
            for name in _REQUIRED[op]:
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"augment params: op {op!r} needs {name!r}")
                expected = _SHAPES[name]
                if value.ndim != 1 + len(expected) or tuple(value.shape[1:]) != expected:
                    want = "(n,)" if not expected else f"(n, {expected[0]})"
                    raise ValueError(f"augment params: {name!r} must have shape {want}, got {tuple(value.shape)}")
                sizes.add(int(value.shape[0]))
        if len(sizes) > 1:
            raise ValueError(f"augment params: tensors disagree on batch size {sorted(sizes)}")
        if self.siamese and sizes and sizes != {1}:
            raise ValueError("augment params: siamese params must have batch dimension 1")

    @property
    def batch_size(self) -> int | None:
        """Images these params were drawn for; ``None`` when they broadcast to any batch (siamese)."""
        if self.siamese:
            return None
        first = getattr(self, _REQUIRED[self.ops[0]][0])
        return int(first.shape[0])


class SiameseAugment:
    """Differentiable augmentation whose random parameters can be shared between a real and a synthetic batch."""

    def __init__(
        self,
        strategy: str = FULL_STRATEGY,
        *,
        scale: float = 1.2,
        rotate_deg: float = 15.0,
        crop_pad: float = 0.125,
        cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        single_op: bool = True,
    ) -> None:
        self.ops = parse_strategy(strategy)
        if scale < 1.0:
            raise ValueError(f"augment: scale must be >= 1 (range is [1/scale, scale]), got {scale}")
        if rotate_deg < 0:
            raise ValueError(f"augment: rotate_deg must be >= 0, got {rotate_deg}")
        if not 0.0 <= crop_pad < 1.0:
            raise ValueError(f"augment: crop_pad must be in [0, 1), got {crop_pad}")
        if not 0.0 <= cutout <= 1.0:
            raise ValueError(f"augment: cutout must be in [0, 1], got {cutout}")
        if brightness < 0 or saturation < 0 or contrast < 0:
            raise ValueError("augment: brightness, saturation and contrast must be >= 0")
        self.strategy = "_".join(self.ops)
        self.scale = float(scale)
        self.rotate_deg = float(rotate_deg)
        self.crop_pad = float(crop_pad)
        self.cutout = float(cutout)
        self.brightness = float(brightness)
        self.saturation = float(saturation)
        self.contrast = float(contrast)
        self.single_op = bool(single_op)

    def __repr__(self) -> str:
        return f"SiameseAugment({self.strategy!r}, single_op={self.single_op})"

    def sample(
        self, batch_size: int, generator: torch.Generator, device: torch.device, siamese: bool = True
    ) -> AugmentParams:
        """Draw one application's parameters from ``generator`` (one value per op if siamese, else one per image).

        With ``single_op`` one op of the strategy is picked for the whole
        batch, as in DSA's default mode; otherwise every op is drawn.
        """
        if batch_size < 1:
            raise ValueError(f"augment: batch_size must be >= 1, got {batch_size}")
        n = 1 if siamese else int(batch_size)
        gen_device = generator.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=gen_device)

        if self.single_op:
            index = int(torch.randint(len(self.ops), (1,), generator=generator, device=gen_device).item())
            ops: tuple[str, ...] = (self.ops[index],)
        else:
            ops = self.ops
        draws: dict[str, torch.Tensor] = {}
        for op in ops:
            if op == "color":
                draws["brightness"] = (uniform(n) - 0.5) * self.brightness
                draws["saturation"] = uniform(n) * self.saturation
                draws["contrast"] = uniform(n) + self.contrast
            elif op == "crop":
                draws["translate"] = (uniform(n, 2) * 2.0 - 1.0) * self.crop_pad
            elif op == "cutout":
                draws["cutout_center"] = uniform(n, 2)
            elif op == "flip":
                draws["flip"] = (uniform(n) < 0.5).float()
            elif op == "scale":
                low = 1.0 / self.scale
                draws["scale"] = uniform(n, 2) * (self.scale - low) + low
            elif op == "rotate":
                draws["rotate"] = (uniform(n) * 2.0 - 1.0) * self.rotate_deg
        moved = {name: value.to(device) for name, value in draws.items()}
        return AugmentParams(ops=ops, siamese=siamese, **moved)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Replay ``params`` on an NCHW batch; differentiable w.r.t. ``x`` and never modifies it."""
        if x.ndim != 4:
            raise ValueError(f"augment: expected NCHW images, got shape {tuple(x.shape)}")
        expected = params.batch_size
        if expected is not None and expected != x.shape[0]:
            raise ValueError(
                f"augment: per-sample params were drawn for {expected} images but the batch has {x.shape[0]}; "
                "draw siamese params to share one transform across batches of different size"
            )
        out = x
        pending: list[torch.Tensor] = []
        for op in params.ops:
            if op in GEOMETRIC_OPS:
                pending.append(self._matrix(op, params, x))
                continue
            if pending:
                out = _resample(out, pending)
                pending = []
            if op == "color":
                out = self._color(out, params)
            elif op == "cutout":
                out = self._cutout(out, params)
        if pending:
            out = _resample(out, pending)
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator, siamese: bool = False) -> torch.Tensor:
        """Sample and apply in one go; per-sample by default, as when training an evaluation network on a set."""
        return self.apply(x, self.sample(x.shape[0], generator, x.device, siamese=siamese))

    def _color(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """DSA colour jitter: brightness shift, then saturation, then contrast."""
        brightness = _as(params.brightness, x).view(-1, 1, 1, 1)
        saturation = _as(params.saturation, x).view(-1, 1, 1, 1)
        contrast = _as(params.contrast, x).view(-1, 1, 1, 1)
        x = x + brightness
        channel_mean = x.mean(dim=1, keepdim=True)
        x = (x - channel_mean) * saturation + channel_mean
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - image_mean) * contrast + image_mean

    def _cutout(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Zero a box of ``cutout`` times the image size by multiplying with a mask (keeps autograd intact)."""
        height, width = x.shape[-2:]
        center = params.cutout_center.to(x.device)
        box_w = int(self.cutout * width + 0.5)
        box_h = int(self.cutout * height + 0.5)
        start_x = torch.floor(center[:, 0] * width).long() - box_w // 2
        start_y = torch.floor(center[:, 1] * height).long() - box_h // 2
        cols = torch.arange(width, device=x.device)
        rows = torch.arange(height, device=x.device)
        in_cols = (cols[None, :] >= start_x[:, None]) & (cols[None, :] < start_x[:, None] + box_w)
        in_rows = (rows[None, :] >= start_y[:, None]) & (rows[None, :] < start_y[:, None] + box_h)
        hole = in_rows[:, :, None] & in_cols[:, None, :]
        keep = (~hole).to(x.dtype).unsqueeze(1)
        return x * keep

    def _matrix(self, op: str, params: AugmentParams, x: torch.Tensor) -> torch.Tensor:
        """Homogeneous (n, 3, 3) map from output to input coordinates in affine_grid's normalised space."""
        height, width = x.shape[-2:]
        if op == "crop":
            value = _as(params.translate, x)
            n = value.shape[0]
            shift = torch.round(value * value.new_tensor([width, height]))
            matrix = _eye(n, x)
            matrix[:, 0, 2] = -2.0 * shift[:, 0] / width
            matrix[:, 1, 2] = -2.0 * shift[:, 1] / height
        elif op == "flip":
            value = _as(params.flip, x)
            matrix = _eye(value.shape[0], x)
            matrix[:, 0, 0] = 1.0 - 2.0 * value
        elif op == "scale":
            value = _as(params.scale, x)
            matrix = _eye(value.shape[0], x)
            matrix[:, 0, 0] = value[:, 0]
            matrix[:, 1, 1] = value[:, 1]
        elif op == "rotate":
            angle = _as(params.rotate, x) * (math.pi / 180.0)
            cos, sin = torch.cos(angle), torch.sin(angle)
            matrix = _eye(angle.shape[0], x)
            matrix[:, 0, 0] = cos
            matrix[:, 0, 1] = -sin * (height / width)
            matrix[:, 1, 0] = sin * (width / height)
            matrix[:, 1, 1] = cos
        else:
            raise ValueError(f"augment: {op!r} is not a geometric op")
        return matrix


def _as(value: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Move a drawn parameter to the image's device and dtype."""
    if value is None:
        raise ValueError("augment params: missing tensor for a requested op")
    return value.to(device=x.device, dtype=x.dtype)


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    """A fresh batch of identity matrices; written in place, which is safe as it never touches ``x``."""
    return torch.eye(3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)


def _resample(x: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """Compose geometric ops applied in order and resample once with zero padding.

    Applying A then B samples ``x`` at ``M_A @ M_B @ p``, so matrices multiply in application order.
    """
    composed = matrices[0]
    for matrix in matrices[1:]:
        composed = composed @ matrix
    n = composed.shape[0]
    batch, channels, height, width = x.shape
    grid = F.affine_grid(composed[:, :2, :], [n, channels, height, width], align_corners=False)
    if n != batch:
        grid = grid.expand(batch, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
