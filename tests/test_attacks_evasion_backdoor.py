"""Evasion (torchattacks in pixel space) and backdoor pieces on small real data (sklearn digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from attacks.backdoor import (
    BACKDOORS,
    TRIGGERS,
    BlendedTrigger,
    Doorping,
    NaiveAttack,
    PatchTrigger,
    Trigger,
    attack_success_rate,
    backdoor_metrics,
    poison,
)
from attacks.defenses import DEFENSES
from attacks.evasion import EVASION, robust_accuracy
from attacks.pixels import PixelModel, normalize, to_pixels
from fedistill.attack_config import BACKDOOR_METHODS, EVASION_ATTACKS, SET_DEFENSES
from fedistill.attack_config import TRIGGERS as TRIGGER_NAMES
from fedistill.data import ImageData
from fedistill.distill import DistillSettings, get_distiller
from fedistill.models import ModelSpec, build_model
from fedistill.training import TrainSettings, train_model

SPEC = ModelSpec(width=16, depth=2)


@pytest.fixture(scope="module")
def digits_model(digits_train: ImageData) -> PixelModel:
    """A small ConvNet trained on digits (about 95% test accuracy), behind a normalisation layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(SPEC, (1, 8, 8), 10)
    train_model(model, digits_train.normalized(), torch.from_numpy(digits_train.labels),
                TrainSettings(epochs=30, lr=0.05, batch_size=64), torch.Generator().manual_seed(0))
    return PixelModel(model.eval(), digits_train.info)


def test_registries_match_the_config_names() -> None:
    assert EVASION.names() == EVASION_ATTACKS
    assert TRIGGERS.names() == TRIGGER_NAMES
    assert ("none", *BACKDOORS.names()) == BACKDOOR_METHODS
    assert ("none", *DEFENSES.names()) == SET_DEFENSES


def test_pgd_lowers_accuracy_and_stays_in_the_ball(digits_model: PixelModel, digits_test: ImageData) -> None:
    pixels, labels = to_pixels(digits_test), torch.from_numpy(digits_test.labels)
    pgd = robust_accuracy(digits_model, pixels, labels, "pgd", [0.05, 0.1, 0.2], seed=3, steps=10)
    fgsm = robust_accuracy(digits_model, pixels, labels, "fgsm", [0.1], seed=3)
    assert pgd["clean_accuracy"] > 0.85
    assert pgd["accuracy"][1] < pgd["clean_accuracy"] - 0.3 and pgd["accuracy"][2] < 0.1
    assert pgd["accuracy"] == sorted(pgd["accuracy"], reverse=True)
    assert pgd["accuracy"][1] <= fgsm["accuracy"][0]  # the iterated attack is at least as strong
    attack = EVASION.get("pgd")(digits_model, 0.1, seed=3, steps=10)
    adversarial = attack(pixels[:64], labels[:64])
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - pixels[:64]).abs().max() <= 0.1 + 1e-6


def test_attacks_are_seeded_and_leave_the_global_rng_alone(digits_model: PixelModel, digits_test: ImageData) -> None:
    pixels, labels = to_pixels(digits_test)[:64], torch.from_numpy(digits_test.labels[:64])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = EVASION.get("pgd")(digits_model, 0.1, seed=5, steps=5)(pixels, labels)
    assert torch.equal(torch.rand(3), expected_next)
    again = EVASION.get("pgd")(digits_model, 0.1, seed=5, steps=5)(pixels, labels)
    other = EVASION.get("pgd")(digits_model, 0.1, seed=6, steps=5)(pixels, labels)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_in_model_normalisation_matches_torchattacks_own(digits_model: PixelModel, digits_test: ImageData) -> None:
    """Our pixel-space route equals torchattacks' set_normalization_used route on the bare model."""
    pixels, labels = to_pixels(digits_test)[:64], torch.from_numpy(digits_test.labels[:64])
    ours = EVASION.get("pgd")(digits_model, 0.1, seed=2, steps=5)(pixels, labels)
    bare = digits_model.model
    theirs = torchattacks.PGD(bare, eps=0.1, alpha=2.5 * 0.1 / 5, steps=5, random_start=True)
    info = digits_test.info
    theirs.set_normalization_used(mean=list(info.mean), std=list(info.std))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        normalised_adv = theirs(normalize(pixels, info), labels)
    back = normalised_adv * info.std[0] + info.mean[0]
    assert torch.allclose(ours, back, atol=1e-5)
    with pytest.raises(ValueError, match="pixel space"):
        EVASION.get("fgsm")(digits_model, 0.1)(normalize(pixels, info), labels)


def test_cw_is_counted_by_radius_and_autoattack_runs(digits_model: PixelModel, digits_test: ImageData) -> None:
    pixels, labels = to_pixels(digits_test)[:48], torch.from_numpy(digits_test.labels[:48])
    cw = robust_accuracy(digits_model, pixels, labels, "cw", [0.1, 1.0, 3.0], c=10.0, steps=30)
    assert cw["norm"] == "L2" and cw["accuracy"] == sorted(cw["accuracy"], reverse=True)
    assert cw["accuracy"][0] <= cw["clean_accuracy"] and cw["accuracy"][-1] < cw["clean_accuracy"]
    auto = robust_accuracy(digits_model, pixels, labels, "autoattack", [0.2], num_classes=10, square_queries=20)
    pgd = robust_accuracy(digits_model, pixels, labels, "pgd", [0.2], steps=10)
    assert auto["accuracy"][0] <= pgd["accuracy"][0] + 0.05 and auto["accuracy"][0] < 0.2


# ------------------------------------------------------------------ triggers and poisoning


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [("bottom-right", slice(5, 8), slice(5, 8)), ("top-left", slice(0, 3), slice(0, 3)), ("center", slice(2, 5), slice(2, 5))],
)
def test_patch_is_stamped_where_configured(position: str, rows: slice, cols: slice) -> None:
    trigger = PatchTrigger((1, 8, 8), size=3, position=position)
    stamped = trigger(torch.zeros(2, 1, 8, 8))
    expected = torch.zeros(2, 1, 8, 8)
    expected[:, :, rows, cols] = 1.0
    assert torch.equal(stamped, expected)
    assert int(trigger.region().sum()) == 9


def test_blended_trigger_mixes_the_whole_image_and_is_seeded() -> None:
    trigger = BlendedTrigger((1, 8, 8), alpha=0.25, seed=4)
    images = torch.rand(3, 1, 8, 8)
    assert torch.allclose(trigger(images), 0.75 * images + 0.25 * trigger.pattern)
    assert torch.equal(BlendedTrigger((1, 8, 8), 0.25, seed=4).pattern, trigger.pattern)
    assert not torch.equal(BlendedTrigger((1, 8, 8), 0.25, seed=5).pattern, trigger.pattern)


def test_poison_stamps_and_relabels_only_non_target_images(digits_train: ImageData, tmp_path) -> None:
    trigger = PatchTrigger(digits_train.info.shape, size=2)
    before = digits_train.images.copy()
    out = poison(digits_train, trigger, rate=0.1, target=3, seed=0)
    assert len(out.rows) == round(0.1 * len(digits_train))
    assert (out.original_labels != 3).all() and (out.data.labels[out.rows] == 3).all()
    assert (out.data.images[out.rows][:, :, 6:, 6:] == 255).all()
    untouched = np.setdiff1d(np.arange(len(digits_train)), out.rows)
    assert np.array_equal(out.data.images[untouched], before[untouched])
    assert np.array_equal(out.data.labels[untouched], digits_train.labels[untouched])
    assert np.array_equal(digits_train.images, before) and np.array_equal(out.clean, before[out.rows])
    path = trigger.save(tmp_path / "t.safetensors")
    loaded = Trigger.load(path)
    assert loaded.kind == "patch" and torch.equal(loaded.pattern, trigger.pattern) and torch.equal(loaded.mask, trigger.mask)


class _LabelInPixel(nn.Module):
    """Predicts the class written in the top-left pixel (label / 10), or ``target`` when the bottom-right is white."""

    def __init__(self, target: int | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.target = target

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        classes = (pixels[:, 0, 0, 0] * 10).round().long().clamp(0, 9)
        if self.target is not None:
            triggered = pixels[:, 0, -1, -1] > 0.99
            classes = torch.where(triggered, torch.full_like(classes, self.target), classes)
        return nn.functional.one_hot(classes, 10).float() + 0 * self.weight


def test_asr_counts_only_images_whose_class_is_not_the_target() -> None:
    labels = torch.arange(10).repeat(5)
    pixels = torch.zeros(50, 1, 8, 8)
    pixels[:, 0, 0, 0] = labels / 10
    trigger = PatchTrigger((1, 8, 8), size=1)
    # Ignores the trigger: target-class images are "classified as the target" but must not count as successes.
    asr, count = attack_success_rate(_LabelInPixel(None), pixels, labels, trigger, target=2)
    assert asr == 0.0 and count == 45
    metrics = backdoor_metrics(_LabelInPixel(2), pixels, labels, trigger, target=2)
    assert metrics == {"cta": 1.0, "asr": 1.0, "asr_images": 45}


def test_doorping_starts_from_random_pixels_inside_the_configured_region() -> None:
    """A white patch is saturated: signed ascent clamped to [0, 1] could not change it, so DOORPING starts random."""
    configured = PatchTrigger((1, 8, 8), size=3)
    region = configured.region()
    first = Doorping(PatchTrigger((1, 8, 8), size=3), target=0, rate=0.2, seed=1).trigger
    again = Doorping(PatchTrigger((1, 8, 8), size=3), target=0, rate=0.2, seed=1).trigger
    assert torch.equal(first.pattern, again.pattern) and torch.equal(first.mask, configured.mask)
    assert torch.equal(first.pattern[:, ~region], configured.pattern[:, ~region])
    inside = first.pattern[:, region]
    assert inside.min() >= 0 and inside.max() < 1 and inside.unique().numel() == inside.numel()


def test_doorping_hook_optimises_the_trigger_and_restamps_in_place(digits_train: ImageData) -> None:
    trigger = PatchTrigger(digits_train.info.shape, size=3)
    attack = Doorping(trigger, target=0, rate=0.2, seed=1, period=2, steps=5, lr=0.1)
    poisoned = attack(digits_train)
    hook = attack.distill_hook(poisoned, SPEC, torch.device("cpu"))
    images = poisoned.data.normalized()
    labels = torch.from_numpy(poisoned.data.labels)
    start_pattern = trigger.pattern.clone()
    clean_rows = np.setdiff1d(np.arange(len(images)), poisoned.rows)
    untouched = images[clean_rows].clone()
    distiller = get_distiller("dm")(SPEC, DistillSettings(ipc=2, iterations=4, batch_real=16, dsa=False, compile="off"),
                                     torch.device("cpu"), on_iteration=hook)
    syn = distiller(images, labels, 10, seed=0)
    assert len(syn) == 20 and hook.updates == 2  # iterations 0 and 2
    region = trigger.region()
    assert not torch.equal(trigger.pattern[:, region], start_pattern[:, region])
    assert torch.equal(trigger.pattern[:, ~region], start_pattern[:, ~region])
    assert torch.equal(images[clean_rows], untouched)
    restamped = normalize(trigger(to_pixels(ImageData(poisoned.clean, poisoned.original_labels, digits_train.info))),
                          digits_train.info)
    assert torch.allclose(images[torch.from_numpy(poisoned.rows)], restamped, atol=1e-6)
    # The update raised the chosen unit's activation over the starting trigger.
    neuron = int(hook.surrogate.model.classifier.weight[0].argmax())
    clean = hook.clean
    with torch.no_grad():
        after = hook.surrogate.embed(trigger(clean))[:, neuron].mean()
        before = hook.surrogate.embed(PatchTrigger(digits_train.info.shape, size=3)(clean))[:, neuron].mean()
    assert after > before


def test_naive_attack_has_no_distillation_hook_and_coresets_refuse_one(digits_train: ImageData) -> None:
    attack = NaiveAttack(PatchTrigger(digits_train.info.shape, 2), target=1, rate=0.1)
    poisoned = attack(digits_train)
    assert attack.distill_hook(poisoned, SPEC, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="no iterations to hook"):
        get_distiller("random")(SPEC, DistillSettings(ipc=2), torch.device("cpu"), on_iteration=lambda *a: None)
