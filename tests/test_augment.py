"""Differentiable siamese augmentation: shared params transform any batch identically, and gradients reach the pixels."""

from __future__ import annotations

import pytest
import torch

from fedistill.augment import OPS, AugmentParams, SiameseAugment, default_strategy, parse_strategy

CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=gen(seed))


def siamese(op: str, **values: torch.Tensor) -> AugmentParams:
    """Forced siamese params for one op (values given as plain per-op values, batch dim added here)."""
    return AugmentParams(ops=(op,), siamese=True, **{k: v.unsqueeze(0).float() for k, v in values.items()})


def test_parse_strategy_accepts_known_ops() -> None:
    assert parse_strategy("color_crop_cutout_flip_scale_rotate") == OPS
    assert parse_strategy("Rotate") == ("rotate",)


def test_parse_strategy_names_unknown_op() -> None:
    with pytest.raises(ValueError, match=r"unknown op 'blur'; allowed: color, crop, cutout, flip, scale, rotate"):
        parse_strategy("color_blur")
    with pytest.raises(ValueError):
        SiameseAugment("crop_zoom")
    with pytest.raises(ValueError, match="repeated"):
        parse_strategy("flip_flip")
    with pytest.raises(ValueError, match="no ops"):
        parse_strategy("")


def test_default_strategy_has_no_flip_for_digits() -> None:
    assert "flip" not in parse_strategy(default_strategy("mnist"))
    assert "flip" not in parse_strategy(default_strategy("digits"))
    assert "flip" not in parse_strategy(default_strategy("MNIST"))
    assert parse_strategy(default_strategy("fashion-mnist")) == OPS
    assert parse_strategy(default_strategy("cifar10")) == OPS


@pytest.mark.parametrize("single_op", [True, False])
@pytest.mark.parametrize("strategy", [*OPS, "color_crop_cutout_flip_scale_rotate"])
def test_siamese_params_transform_batches_of_any_size_identically(strategy: str, single_op: bool) -> None:
    aug = SiameseAugment(strategy, single_op=single_op)
    real, syn = images(5, seed=1), images(3, seed=2)
    for seed in range(4):
        params = aug.sample(5, gen(seed), CPU, siamese=True)
        together = aug.apply(torch.cat([real, syn]), params)
        apart = torch.cat([aug.apply(real, params), aug.apply(syn, params)])
        torch.testing.assert_close(together, apart, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", OPS)
def test_siamese_draw_transforms_every_image_the_same(strategy: str) -> None:
    aug = SiameseAugment(strategy)
    same = images(1, seed=3).repeat(6, 1, 1, 1)
    out = aug(same, gen(4), siamese=True)
    for i in range(1, 6):
        torch.testing.assert_close(out[i], out[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "scale", "rotate"])
def test_per_sample_draw_differs_between_images(strategy: str) -> None:
    aug = SiameseAugment(strategy)
    same = images(1, seed=3).repeat(6, 1, 1, 1)
    out = aug(same, gen(5), siamese=False)
    assert any(not torch.allclose(out[i], out[0]) for i in range(1, 6))


def test_per_sample_params_reject_other_batch_size() -> None:
    aug = SiameseAugment()
    params = aug.sample(4, gen(0), CPU, siamese=False)
    assert params.batch_size == 4
    assert aug.apply(images(4), params).shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="drawn for 4 images but the batch has 3"):
        aug.apply(images(3), params)
    shared = aug.sample(4, gen(0), CPU, siamese=True)
    assert shared.batch_size is None
    assert aug.apply(images(7), shared).shape == (7, 3, 16, 16)


def test_params_validate_their_tensors() -> None:
    with pytest.raises(ValueError, match="needs 'rotate'"):
        AugmentParams(ops=("rotate",), siamese=True)
    with pytest.raises(ValueError, match="batch dimension 1"):
        AugmentParams(ops=("rotate",), siamese=True, rotate=torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        AugmentParams(ops=("scale",), siamese=True, scale=torch.ones(1))
    with pytest.raises(ValueError, match="unknown op"):
        AugmentParams(ops=("blur",), siamese=True)


@pytest.mark.parametrize("single_op", [True, False])
def test_seeds_reproduce_and_differ(single_op: bool) -> None:
    aug = SiameseAugment(single_op=single_op)
    x = images(4)
    a = aug(x, gen(11))
    b = aug(x, gen(11))
    c = aug(x, gen(12))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_single_op_mode_picks_each_op() -> None:
    aug = SiameseAugment()
    picked = {aug.sample(1, gen(seed), CPU).ops for seed in range(200)}
    assert picked == {(op,) for op in OPS}
    assert SiameseAugment(single_op=False).sample(1, gen(0), CPU).ops == OPS


@pytest.mark.parametrize("strategy", [*OPS, "color_crop_cutout_flip_scale_rotate"])
def test_gradient_reaches_input(strategy: str) -> None:
    aug = SiameseAugment(strategy, single_op=False)
    x = images(3, seed=6).requires_grad_(True)
    before = x.detach().clone()
    for params in (aug.sample(3, gen(7), CPU, siamese=True), aug.sample(3, gen(7), CPU, siamese=False)):
        x.grad = None
        weights = torch.randn(3, 3, 16, 16, generator=gen(8))
        (aug.apply(x, params) * weights).sum().backward()
        assert x.grad is not None
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.detach(), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        siamese("color", brightness=torch.tensor(0.2), saturation=torch.tensor(1.5), contrast=torch.tensor(0.7)),
        siamese("crop", translate=torch.tensor([0.25, -0.125])),
        siamese("cutout", cutout_center=torch.tensor([0.4, 0.6])),
        siamese("flip", flip=torch.tensor(1.0)),
        siamese("scale", scale=torch.tensor([1.1, 0.85])),
        siamese("rotate", rotate=torch.tensor(12.0)),
    ],
    ids=lambda p: p.ops[0],
)
def test_gradcheck(params: AugmentParams) -> None:
    aug = SiameseAugment()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=gen(9), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, params), (x,))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("single_op", [True, False])
def test_shapes_and_channels(channels: int, size: int, single_op: bool) -> None:
    aug = SiameseAugment(single_op=single_op)
    x = images(4, channels=channels, size=size)
    for seed in range(3):
        for shared in (True, False):
            out = aug(x, gen(seed), siamese=shared)
            assert out.shape == x.shape
            assert out.dtype == x.dtype
            assert torch.isfinite(out).all()


def test_non_square_images() -> None:
    aug = SiameseAugment(single_op=False)
    x = torch.rand(2, 3, 12, 20, generator=gen(0))
    assert aug(x, gen(1)).shape == x.shape


def test_flip_mirrors() -> None:
    aug = SiameseAugment("flip")
    x = images(3, size=9)
    torch.testing.assert_close(aug.apply(x, siamese("flip", flip=torch.tensor(1.0))), x.flip(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(aug.apply(x, siamese("flip", flip=torch.tensor(0.0))), x, atol=1e-5, rtol=0)
    mixed = AugmentParams(ops=("flip",), siamese=False, flip=torch.tensor([1.0, 0.0, 1.0]))
    expected = torch.stack([x[0].flip(2), x[1], x[2].flip(2)])
    torch.testing.assert_close(aug.apply(x, mixed), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("size", "channels", "side"), [(32, 3, 16), (28, 1, 14), (8, 1, 4)])
def test_cutout_zeroes_expected_square(size: int, channels: int, side: int) -> None:
    aug = SiameseAugment("cutout", cutout=0.5)
    x = torch.ones(2, channels, size, size)
    out = aug.apply(x, siamese("cutout", cutout_center=torch.tensor([0.5, 0.5])))
    zeros = out[0, 0] == 0
    assert int(zeros.sum()) == side * side
    start = size // 2 - side // 2
    assert zeros[start : start + side, start : start + side].all()
    torch.testing.assert_close(out[1], out[0])


def test_cutout_box_is_clipped_at_the_border() -> None:
    aug = SiameseAugment("cutout", cutout=0.5)
    out = aug.apply(torch.ones(1, 1, 16, 16), siamese("cutout", cutout_center=torch.tensor([0.0, 0.0])))
    assert int((out == 0).sum()) == 4 * 4


def test_crop_shifts_content_with_zero_padding() -> None:
    aug = SiameseAugment("crop")
    x = images(2, size=16) + 0.1
    out = aug.apply(x, siamese("crop", translate=torch.tensor([2 / 16, -3 / 16])))
    torch.testing.assert_close(out[..., :13, 2:], x[..., 3:, :14], atol=1e-5, rtol=0)
    assert out[..., :, :2].abs().max() < 1e-5
    assert out[..., 13:, :].abs().max() < 1e-5


def test_crop_rounds_to_whole_pixels() -> None:
    aug = SiameseAugment("crop")
    x = images(1, size=8)
    out = aug.apply(x, siamese("crop", translate=torch.tensor([0.9 / 8, 0.0])))
    torch.testing.assert_close(out[..., 1:], x[..., :7], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_rotate_right_angle_matches_rot90(angle: float, k: int) -> None:
    aug = SiameseAugment("rotate")
    x = images(2, size=12)
    out = aug.apply(x, siamese("rotate", rotate=torch.tensor(angle)))
    torch.testing.assert_close(out, torch.rot90(x, k, dims=(2, 3)), atol=1e-4, rtol=0)


def test_identity_geometry_is_identity() -> None:
    aug = SiameseAugment()
    x = images(2, size=10)
    params = AugmentParams(
        ops=("crop", "flip", "scale", "rotate"),
        siamese=True,
        translate=torch.zeros(1, 2),
        flip=torch.zeros(1),
        scale=torch.ones(1, 2),
        rotate=torch.zeros(1),
    )
    torch.testing.assert_close(aug.apply(x, params), x, atol=1e-5, rtol=0)


def test_scale_up_grid_shrinks_content() -> None:
    aug = SiameseAugment("scale")
    out = aug.apply(torch.ones(1, 1, 16, 16), siamese("scale", scale=torch.tensor([2.0, 2.0])))
    assert out[0, 0, 0, 0] < 1e-5
    torch.testing.assert_close(out[0, 0, 4:12, 4:12], torch.ones(8, 8), atol=1e-5, rtol=0)


def test_color_values() -> None:
    aug = SiameseAugment("color")
    x = images(2)
    neutral = siamese("color", brightness=torch.tensor(0.0), saturation=torch.tensor(1.0), contrast=torch.tensor(1.0))
    torch.testing.assert_close(aug.apply(x, neutral), x, atol=1e-6, rtol=0)
    brighter = siamese("color", brightness=torch.tensor(0.3), saturation=torch.tensor(1.0), contrast=torch.tensor(1.0))
    torch.testing.assert_close(aug.apply(x, brighter), x + 0.3, atol=1e-6, rtol=0)
    grey = siamese("color", brightness=torch.tensor(0.0), saturation=torch.tensor(0.0), contrast=torch.tensor(1.0))
    out = aug.apply(x, grey)
    torch.testing.assert_close(out, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6, rtol=0)
    flat = siamese("color", brightness=torch.tensor(0.0), saturation=torch.tensor(1.0), contrast=torch.tensor(0.0))
    out = aug.apply(x, flat)
    torch.testing.assert_close(out, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), atol=1e-6, rtol=0)


def test_draws_stay_in_configured_ranges() -> None:
    aug = SiameseAugment(single_op=False, scale=1.2, rotate_deg=15.0, crop_pad=0.125, contrast=0.5, saturation=2.0)
    p = aug.sample(2000, gen(0), CPU, siamese=False)
    assert p.rotate.abs().max() <= 15.0
    assert p.scale.min() >= 1 / 1.2 - 1e-6 and p.scale.max() <= 1.2
    assert p.translate.abs().max() <= 0.125
    assert p.contrast.min() >= 0.5 and p.contrast.max() <= 1.5
    assert p.saturation.min() >= 0.0 and p.saturation.max() <= 2.0
    assert p.brightness.abs().max() <= 0.5
    assert 0.4 < float(p.flip.mean()) < 0.6


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError, match="scale"):
        SiameseAugment(scale=0.5)
    with pytest.raises(ValueError, match="crop_pad"):
        SiameseAugment(crop_pad=1.5)
    with pytest.raises(ValueError, match="NCHW"):
        SiameseAugment()(torch.rand(3, 8, 8), gen(0))
