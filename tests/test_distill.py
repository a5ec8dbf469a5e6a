"""Every distiller: shape, labels, provenance, non-IID classes, and that it does its job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedistill.data import ImageData
from fedistill.distill import DistillSettings, available_methods, get_distiller
from fedistill.distill.embedding import perturbed_copies
from fedistill.distill.gm import gradient_distance, loop_lengths
from fedistill.models import ModelSpec, build_model
from fedistill.training import TrainSettings, evaluate_set

SMALL = ModelSpec(width=16, depth=2)
CPU = torch.device("cpu")
FAST = {"iterations": 2, "batch_real": 16, "outer_loop": 2, "inner_loop": 1}


def tensors(data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    return data.normalized(), torch.from_numpy(data.labels)


def test_registry_lists_all_methods() -> None:
    assert set(available_methods()) >= {"random", "herding", "kcenter", "dm", "dc", "dsa"}
    with pytest.raises(ValueError, match="allowed: .*dm"):
        get_distiller("nope")


@pytest.mark.parametrize("method", ["random", "herding", "kcenter", "dm", "dc", "dsa"])
def test_set_has_shape_labels_and_provenance(method: str, fmnist_small: ImageData) -> None:
    images, labels = tensors(fmnist_small)
    distiller = get_distiller(method)(SMALL, DistillSettings(ipc=3, **FAST), CPU)
    result = distiller(images, labels, 10, seed=1)
    assert result.images.shape == (30, 1, 28, 28)
    assert result.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert result.source_counts.tolist() == [20] * 10
    assert result.provenance["method"] == method and result.provenance["ipc"] == 3
    assert torch.isfinite(result.images).all()


@pytest.mark.parametrize("method", ["random", "herding", "kcenter", "dm", "dc", "dsa"])
def test_non_iid_client_with_missing_and_scarce_classes(method: str, fmnist_small: ImageData) -> None:
    """A client with 2 images of class 0, 20 of class 1 and none of the others gets 2 + 5 images."""
    rows = np.concatenate([(fmnist_small.labels == 0).nonzero()[0][:2], (fmnist_small.labels == 1).nonzero()[0]])
    images, labels = tensors(fmnist_small.subset(rows))
    result = get_distiller(method)(SMALL, DistillSettings(ipc=5, **FAST), CPU)(images, labels, 10, seed=0)
    assert result.labels.tolist() == [0, 0] + [1] * 5
    assert result.source_counts.tolist() == [2, 20] + [0] * 8
    assert result.images_per_class().tolist() == [2, 5] + [0] * 8


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_coresets_pick_distinct_real_images_of_the_class(method: str, fmnist_small: ImageData) -> None:
    images, labels = tensors(fmnist_small)
    result = get_distiller(method)(SMALL, DistillSettings(ipc=4), CPU)(images, labels, 10, seed=3)
    flat = images.flatten(1)
    for image, label in zip(result.images, result.labels):
        matches = (flat == image.flatten()).all(dim=1).nonzero().flatten()
        assert len(matches) >= 1 and int(labels[matches[0]]) == int(label)
    assert len({tuple(img.flatten().tolist()) for img in result.images}) == len(result)


def test_kcenter_and_herding_are_deterministic_given_seed(fmnist_small: ImageData) -> None:
    images, labels = tensors(fmnist_small)
    for method in ("herding", "kcenter"):
        first = get_distiller(method)(SMALL, DistillSettings(ipc=3), CPU)(images, labels, 10, seed=7)
        again = get_distiller(method)(SMALL, DistillSettings(ipc=3), CPU)(images, labels, 10, seed=7)
        assert torch.equal(first.images, again.images)


def test_dm_loss_falls(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    losses: list[float] = []
    settings = DistillSettings(ipc=2, iterations=60, batch_real=64, dsa=False, real_precision="fp32", init="noise")
    get_distiller("dm")(SMALL, settings, CPU)(images, labels, 10, seed=0, progress=lambda i, n, loss: losses.append(loss))
    assert len(losses) >= 5
    assert np.mean(losses[-2:]) < 0.5 * losses[0]


def test_dm_noise_init_never_contains_real_images(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    settings = DistillSettings(ipc=2, iterations=0, init="noise")
    result = get_distiller("dm")(SMALL, settings, CPU)(images, labels, 10, seed=0)
    distances = torch.cdist(result.images.flatten(1), images.flatten(1))
    assert distances.min() > 1.0


def test_dm_precisions_agree(digits_train: ImageData) -> None:
    """The bf16 real pass is an implementation detail: the set must be close to the fp32 one."""
    images, labels = tensors(digits_train)
    sets = {
        precision: get_distiller("dm")(
            SMALL, DistillSettings(ipc=2, iterations=5, batch_real=32, dsa=True, real_precision=precision), CPU
        )(images, labels, 10, seed=0)
        for precision in ("fp32", "bf16")
    }
    difference = (sets["fp32"].images - sets["bf16"].images).abs().mean()
    moved = (sets["fp32"].images - get_distiller("dm")(SMALL, DistillSettings(ipc=2, iterations=0), CPU)(
        images, labels, 10, seed=0).images).abs().mean()
    assert difference < 0.2 * moved


def test_dm_beats_random_on_digits(digits_train: ImageData, digits_test: ImageData) -> None:
    """The point of distillation: at IPC 1, a DM set trains a better model than one random image per class."""
    images, labels = tensors(digits_train)
    test_images, test_labels = tensors(digits_test)
    model = ModelSpec(width=32, depth=2)
    train = TrainSettings(epochs=100, batch_size=256)
    dm = get_distiller("dm")(
        model, DistillSettings(ipc=1, iterations=300, batch_real=128, dsa=False, init="noise"), CPU
    )(images, labels, 10, seed=0)
    dm_acc = evaluate_set(dm, test_images, test_labels, model, train, CPU, seed=0, num_nets=2).mean
    random_accs = [
        evaluate_set(
            get_distiller("random")(model, DistillSettings(ipc=1), CPU)(images, labels, 10, seed=s),
            test_images, test_labels, model, train, CPU, seed=0, num_nets=1,
        ).mean
        for s in range(3)
    ]
    assert dm_acc > np.mean(random_accs) + 0.05, (dm_acc, random_accs)


def test_gradient_distance_counts_biases() -> None:
    weight = torch.randn(4, 3)
    bias = torch.randn(4)
    same = gradient_distance([weight, bias], [weight, bias])
    flipped_bias = gradient_distance([weight, bias], [weight, -bias])
    assert same.abs() < 1e-5
    assert flipped_bias > 1.9


def test_loop_lengths_follow_paper_and_accept_any_ipc() -> None:
    assert loop_lengths(1) == (1, 1)
    assert loop_lengths(10) == (10, 50)
    assert loop_lengths(50) == (50, 10)
    outer, inner = loop_lengths(15)
    assert 10 <= outer <= 20 and 25 <= inner <= 50
    assert loop_lengths(200) == (50, 10)


def test_compiled_dm_matches_eager(digits_train: ImageData) -> None:
    """The compiled fast path is the same maths: same seed, same set up to float rounding."""
    images, labels = tensors(digits_train)
    sets = [
        get_distiller("dm")(
            SMALL,
            DistillSettings(ipc=2, iterations=3, batch_real=40, dsa=True, real_precision="fp32", compile=mode),
            CPU,
        )(images, labels, 10, seed=0)
        for mode in ("off", "on")
    ]
    assert sets[1].provenance["compiled"] and not sets[0].provenance["compiled"]
    torch.testing.assert_close(sets[1].images, sets[0].images, atol=1e-4, rtol=1e-4)


def test_dm_refuses_batchnorm_before_any_work(fmnist_small: ImageData) -> None:
    images, labels = tensors(fmnist_small)
    with pytest.raises(ValueError, match="batchnorm"):
        get_distiller("dm")(ModelSpec(width=8, depth=1, norm="batchnorm"), DistillSettings(ipc=1), CPU)(
            images, labels, 10
        )


def test_network_source_replaces_random_networks_and_start_set_is_continued(digits_train: ImageData) -> None:
    data = tensors(digits_train)
    spec = ModelSpec(arch="convnet", width=16, depth=2)
    settings = DistillSettings(ipc=2, iterations=3, batch_real=16, dsa=False, compile="off")
    global_model = build_model(spec, tuple(data[0].shape[1:]), 10)
    source = perturbed_copies(global_model, 0.05, torch.device("cpu"))
    drawn: list[torch.nn.Module] = []

    def recording(generator: torch.Generator, trainable: bool) -> torch.nn.Module:
        drawn.append(source(generator, trainable))
        return drawn[-1]

    first = get_distiller("dm")(spec, settings, torch.device("cpu"))(*data, 10, seed=0)
    second = get_distiller("dm")(spec, settings, torch.device("cpu"), networks=recording, start=first)(*data, 10, seed=1)
    assert len(drawn) == settings.iterations
    reference = dict(global_model.named_parameters())
    for name, parameter in drawn[0].named_parameters():
        assert not parameter.requires_grad
        if parameter.ndim >= 2:
            gap = float((parameter - reference[name]).std() / reference[name].std())
            assert 0.03 < gap < 0.07, name
    assert torch.equal(second.labels, first.labels)
    step = (second.images - first.images).abs().mean() / first.images.abs().mean()
    assert 0 < step < 0.5
    with pytest.raises(ValueError, match="cannot continue from a set"):
        get_distiller("herding")(spec, settings, torch.device("cpu"), start=first)
