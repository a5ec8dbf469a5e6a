"""Trajectory matching: the memory-flat gradient is the unrolled one, experts are cached, and the set is worth it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import fedistill.experts
from fedistill.augment import SiameseAugment
from fedistill.cache import CACHE_DIR
from fedistill.central import run_central
from fedistill.config import ConfigError, from_run_config, parse_config, to_run_config
from fedistill.data import ImageData
from fedistill.distill import DistillSettings, get_distiller
from fedistill.distill.mtt import (
    FlatNetwork,
    Student,
    expert_train_epochs,
    memory_flat_gradients,
    plan_steps,
    unrolled_gradients,
)
from fedistill.experts import flat_parameters, train_experts
from fedistill.models import ModelSpec, build_model
from tests.worth import accuracy_and_random_real

SMALL = ModelSpec(width=16, depth=2)
CPU = torch.device("cpu")
QUICK = {"num_experts": 1, "max_start_epoch": 2, "syn_steps": 5}


def tensors(data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    return data.normalized(), torch.from_numpy(data.labels)


@pytest.mark.parametrize("dsa", [False, True])
def test_memory_flat_gradient_is_the_unrolled_gradient(dsa: bool) -> None:
    """In float64 the reverse pass over recomputed steps gives autograd's gradients (images and learning rate)."""
    torch.manual_seed(0)
    net = build_model(ModelSpec(width=8, depth=2), (1, 8, 8), 10).double()
    start = flat_parameters(net)
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    augment = SiameseAugment("color_crop_cutout_scale_rotate") if dsa else None
    student = Student(FlatNetwork(net), torch.arange(10).repeat(2), augment)
    steps = plan_steps(20, 6, 8, augment, torch.Generator().manual_seed(1), CPU)  # minibatches: 8, 8, 4, 8, 8, 4
    assert [len(step.rows) for step in steps if step.rows is not None] == [8, 8, 4, 8, 8, 4]
    lr = torch.tensor(0.05, dtype=torch.float64)
    flat = memory_flat_gradients(student, images, lr, start, target, steps)
    unrolled = unrolled_gradients(student, images, lr, start, target, steps)
    assert flat.loss == pytest.approx(unrolled.loss, rel=1e-12)
    relative = (flat.images_grad - unrolled.images_grad).norm() / unrolled.images_grad.norm()
    assert relative < 1e-8 and unrolled.images_grad.norm() > 0
    assert float(flat.lr_grad) == pytest.approx(float(unrolled.lr_grad), rel=1e-8)


@pytest.mark.parametrize("factor", [1, 2])
def test_mtt_set_has_shape_labels_and_provenance(factor: int, digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    settings = DistillSettings(ipc=2, iterations=2, factor=factor, **QUICK)
    start = get_distiller("mtt")(SMALL, DistillSettings(ipc=2, iterations=0, factor=factor), CPU)(images, labels, 10)
    result = get_distiller("mtt")(SMALL, settings, CPU)(images, labels, 10, seed=0)
    assert result.images.shape == (20, 1, 8, 8) and result.factor == factor
    assert result.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert result.source_counts.tolist() == np.bincount(digits_train.labels, minlength=10).tolist()
    provenance = result.provenance
    assert provenance["method"] == "mtt" and provenance["ipc"] == 2 and provenance["syn_steps"] == 5
    assert provenance["expert_train_epochs"] == 3 and 0 < provenance["synthetic_lr"] != 0.01
    assert torch.isfinite(result.images).all() and not torch.equal(result.images, start.images)


def test_mtt_client_with_missing_and_scarce_classes(digits_train: ImageData) -> None:
    rows = np.concatenate([(digits_train.labels == 0).nonzero()[0][:2], (digits_train.labels == 1).nonzero()[0]])
    images, labels = tensors(digits_train.subset(rows))
    result = get_distiller("mtt")(SMALL, DistillSettings(ipc=5, iterations=1, **QUICK), CPU)(images, labels, 10)
    assert result.labels.tolist() == [0, 0] + [1] * 5
    assert result.images_per_class().tolist() == [2, 5] + [0] * 8


def test_mtt_loss_falls(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    losses: list[float] = []
    settings = DistillSettings(ipc=1, iterations=40, dsa=False, lr_images=10.0, num_experts=2)
    get_distiller("mtt")(SMALL, settings, CPU)(images, labels, 10, seed=0, progress=lambda _i, _n, x: losses.append(x))
    assert len(losses) == 5
    assert np.mean(losses[-2:]) < 0.5 * losses[0], losses


def test_experts_are_read_from_the_cache(digits_train: ImageData, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call with the same inputs trains nothing and returns the same tensors; other inputs train anew."""
    images, labels = tensors(digits_train.subset(np.arange(300)))
    calls: list[int] = []
    trainer = fedistill.experts.train_model

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return trainer(*args, **kwargs)

    monkeypatch.setattr(fedistill.experts, "train_model", counting)
    first = train_experts(images, labels, 10, SMALL, 2, 3, 0.01, 7, CPU, tmp_path)
    assert len(calls) == 6 and len(list(tmp_path.glob("expert-*.safetensors"))) == 2
    assert first[0].shape == (4, sum(p.numel() for p in build_model(SMALL, (1, 8, 8), 10).parameters()))
    again = train_experts(images, labels, 10, SMALL, 2, 3, 0.01, 7, CPU, tmp_path)
    assert len(calls) == 6
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not list(tmp_path.glob(".*.tmp"))
    train_experts(images, labels.roll(1), 10, SMALL, 1, 3, 0.01, 7, CPU, tmp_path)  # other data: another file
    assert len(calls) == 9 and len(list(tmp_path.glob("expert-*.safetensors"))) == 3
    uncached = train_experts(images, labels, 10, SMALL, 1, 3, 0.01, 7, CPU, None)
    assert torch.equal(uncached[0], first[0])  # the cache changes nothing but the time


def test_central_runs_share_their_experts_through_the_output_cache(tmp_path: Path) -> None:
    config = parse_config({
        "output_dir": str(tmp_path),
        "data": {"name": "digits"},
        "model": {"width": 8, "depth": 1},
        "distill": {"method": "mtt", "ipc": 1, "iterations": 2, "num_experts": 2, "max_start_epoch": 1,
                    "expert_epochs": 1, "syn_steps": 2},
        "eval": {"epochs": 2, "num_nets": 1, "references": False},
    })
    run_central(config, Console(quiet=True))
    experts = sorted((tmp_path / CACHE_DIR).glob("expert-*.safetensors"))
    assert len(experts) == 2
    written = [path.stat().st_mtime_ns for path in experts]
    run_central(config, Console(quiet=True))  # a second run reads them: nothing is written again
    assert [path.stat().st_mtime_ns for path in sorted((tmp_path / CACHE_DIR).glob("expert-*"))] == written


def test_mtt_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^distill.syn_steps is read only by method 'mtt', not 'dm'"):
        parse_config({"distill": {"syn_steps": 30}})
    with pytest.raises(ConfigError, match="distill.batch_syn is read only by method 'mtt', not 'rded'"):
        parse_config({"distill": {"method": "rded", "batch_syn": 4}})
    with pytest.raises(ConfigError, match="distill.method 'mtt' is not differentially private"):
        parse_config({"privacy": {"enabled": True}, "distill": {"method": "mtt", "init": "noise"}})
    with pytest.raises(ConfigError, match="distill.method 'mtt' matches its experts' trajectories.*multi-round"):
        parse_config({"distill": {"method": "mtt"}, "federation": {"protocol": "multi-round", "rounds": 2}})
    with pytest.raises(ConfigError, match="distill.expert_train_epochs: 5 is too short .* needs >= 11"):
        parse_config({"distill": {"method": "mtt", "expert_train_epochs": 5}})
    with pytest.raises(ConfigError, match="distill.syn_steps: Input should be greater than or equal to 1"):
        parse_config({"distill": {"method": "mtt", "syn_steps": 0}})
    with pytest.raises(ValueError, match="distill.lr_lr: must be > 0"):
        get_distiller("mtt")(SMALL, DistillSettings(lr_lr=0.0), CPU)
    with pytest.raises(ValueError, match="distill.method mtt: model.norm must not be batchnorm"):
        get_distiller("mtt")(ModelSpec(norm="batchnorm"), DistillSettings(), CPU)
    config = parse_config({"distill": {"method": "mtt", "syn_steps": 30, "batch_syn": 8, "max_start_epoch": 4}})
    settings = config.distill.settings("digits")
    assert (settings.syn_steps, settings.batch_syn, expert_train_epochs(settings)) == (30, 8, 5)
    assert from_run_config(to_run_config(config)) == config  # the flat Flower keys carry them


def test_mtt_beats_random_real_on_digits(digits_train: ImageData, digits_test: ImageData) -> None:
    """Hard-label protocol, one image per class: trajectory-matched images teach more than random real ones."""
    images, labels = tensors(digits_train)
    settings = DistillSettings(ipc=1, iterations=100, dsa=False, lr_images=10.0)  # 8x8 images: see MTT_LR_IMAGES
    mtt = get_distiller("mtt")(SMALL, settings, CPU)(images, labels, 10, seed=0)
    mtt_acc, random_acc = accuracy_and_random_real(mtt, images, labels, tensors(digits_test), SMALL)
    assert mtt_acc > random_acc + 0.05, (mtt_acc, random_acc)
