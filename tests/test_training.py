"""The evaluation protocol: schedule, determinism, soft labels, and that it actually learns on real data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedistill import training
from fedistill.config import EvalConfig
from fedistill.data import load_dataset
from fedistill.models import ModelSpec, build_model
from fedistill.synthetic import SyntheticSet
from fedistill.training import EvalResult, TrainSettings, evaluate_model, evaluate_set, train_model

CPU = torch.device("cpu")
SMALL_CONV = ModelSpec(arch="convnet", width=16, depth=2)
SHAPE = (1, 8, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_data(n: int, num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(n, *SHAPE, generator=gen(seed))
    labels = torch.arange(n) % num_classes
    return images, labels


def tiny_set(per_class: int = 2, num_classes: int = 3) -> SyntheticSet:
    images, labels = random_data(per_class * num_classes, num_classes)
    return SyntheticSet(images, labels, num_classes, np.full(num_classes, 100, dtype=np.int64))


def mlp(seed: int = 0, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch="mlp", hidden=16), SHAPE, num_classes)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    return {
        "train_x": train.normalized(),
        "train_y": torch.from_numpy(train.labels),
        "test_x": test.normalized(),
        "test_y": torch.from_numpy(test.labels),
    }


@pytest.mark.parametrize(("epochs", "decay_epoch"), [(4, 2), (5, 2), (2, 1), (1, 1)])
def test_lr_drops_tenfold_at_half(monkeypatch: pytest.MonkeyPatch, epochs: int, decay_epoch: int) -> None:
    seen: list[float] = []

    class SpySGD(torch.optim.SGD):
        def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    images, labels = random_data(10)
    settings = TrainSettings(epochs=epochs, lr=0.05, batch_size=5)
    train_model(mlp(), images, labels, settings, gen(0))
    steps_per_epoch = 2
    expected = [0.05] * (decay_epoch * steps_per_epoch) + [0.005] * ((epochs - decay_epoch) * steps_per_epoch)
    assert seen == pytest.approx(expected)


def test_settings_from_config_follow_eval_section() -> None:
    plain = EvalConfig(epochs=7, lr=0.1, batch_size=32).train_settings("digits")
    assert (plain.epochs, plain.lr, plain.batch_size, plain.dsa_strategy) == (7, 0.1, 32, None)
    assert EvalConfig(dsa=True).train_settings("digits").dsa_strategy == "color_crop_cutout_scale_rotate"
    assert "flip" in (EvalConfig(dsa=True).train_settings("fashion-mnist").dsa_strategy or "")
    chosen = EvalConfig(dsa=True, dsa_strategy="crop_rotate").train_settings("digits")
    assert chosen.dsa_strategy == "crop_rotate"
    with pytest.raises(ValueError, match="unknown op"):
        TrainSettings(dsa_strategy="crop_blur")


def test_trains_to_high_accuracy_on_real_digits(digits: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(SMALL_CONV, SHAPE, 10)
    settings = TrainSettings(epochs=12, lr=0.02, batch_size=64)
    train_model(model, digits["train_x"][:600], digits["train_y"][:600], settings, gen(0))
    accuracy, loss = evaluate_model(model, digits["test_x"], digits["test_y"], batch_size=128)
    assert accuracy > 0.8
    assert 0.0 < loss < 1.0


def test_evaluate_model_restores_mode_and_batches_consistently(digits: dict[str, torch.Tensor]) -> None:
    model = build_model(SMALL_CONV, SHAPE, 10)
    model.train()
    whole = evaluate_model(model, digits["test_x"], digits["test_y"], batch_size=10_000)
    batched = evaluate_model(model, digits["test_x"], digits["test_y"], batch_size=7)
    assert model.training
    assert whole[0] == batched[0]
    assert whole[1] == pytest.approx(batched[1], rel=1e-5)
    with pytest.raises(ValueError, match="no images"):
        evaluate_model(model, digits["test_x"][:0], digits["test_y"][:0])


def test_evaluate_set_reports_each_net(monkeypatch: pytest.MonkeyPatch, digits: dict[str, torch.Tensor]) -> None:
    initial: list[torch.Tensor] = []
    real_train = training.train_model

    def recording_train(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        initial.append(next(model.parameters()).detach().clone())
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(training, "train_model", recording_train)
    syn = SyntheticSet(digits["train_x"][:40], digits["train_y"][:40], 10, np.full(10, 4, dtype=np.int64))
    settings = TrainSettings(epochs=3, batch_size=16)
    rng_before = torch.get_rng_state()
    result = evaluate_set(syn, digits["test_x"], digits["test_y"], SMALL_CONV, settings, CPU, seed=3, num_nets=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert isinstance(result, EvalResult)
    assert len(result.accuracies) == result.num_nets == 3
    assert all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert result.mean == pytest.approx(np.mean(result.accuracies))
    assert result.std == pytest.approx(np.std(result.accuracies))
    assert result.epochs == 3 and result.seconds > 0
    assert not torch.equal(initial[0], initial[1]) and not torch.equal(initial[1], initial[2])
    assert set(result.to_dict()) == {"accuracies", "mean", "std", "num_nets", "epochs", "seconds", "protocol"}
    assert result.protocol == "hard-label"

    epochs: list[tuple[int, int]] = []
    again = evaluate_set(syn, digits["test_x"], digits["test_y"], SMALL_CONV, settings, CPU, seed=3, num_nets=3,
                         on_epoch=lambda net, done: epochs.append((net, done)))
    assert again.accuracies == result.accuracies
    assert epochs == [(net, done) for net in range(3) for done in (1, 2, 3)]
    assert torch.equal(initial[3], initial[0])


def test_soft_one_hot_labels_train_like_hard_labels() -> None:
    images, labels = random_data(12)
    settings = TrainSettings(epochs=3, batch_size=5)
    hard = train_model(mlp(seed=1), images, labels, settings, gen(7))
    one_hot = nn.functional.one_hot(labels, 3).float()
    soft = train_model(mlp(seed=1), images, labels, settings, gen(7), soft_labels=one_hot)
    for a, b in zip(hard.parameters(), soft.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_distillation_loss_is_tempered_kl() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    temperature = 3.0
    student = torch.softmax(logits / temperature, dim=1)
    expected = temperature**2 * (soft * (soft.log() - student.log())).sum(dim=1)
    torch.testing.assert_close(training.distillation_loss(logits, soft, temperature), expected)
    matched = torch.softmax(logits / temperature, dim=1)
    assert training.distillation_loss(logits, matched, temperature).abs().max() < 1e-5


def test_soft_labels_of_a_set_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[torch.Tensor | None] = []
    real_train = training.train_model

    def recording_train(*args: Any, **kwargs: Any) -> nn.Module:
        received.append(args[5] if len(args) > 5 else kwargs.get("soft_labels"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train_model", recording_train)
    images, labels = random_data(6)
    soft = torch.full((6, 3), 1.0 / 3)
    syn = SyntheticSet(images, labels, 3, np.full(3, 2, dtype=np.int64), soft_labels=soft)
    test_x, test_y = random_data(9, seed=1)
    kd = TrainSettings(epochs=2, batch_size=4, kd_temperature=2.0)
    result = evaluate_set(syn, test_x, test_y, SMALL_CONV, kd, CPU, 0, 1)
    assert len(result.accuracies) == 1 and result.protocol == "soft-label-kd"
    assert received[0] is not None and torch.equal(received[0], soft)
    hard = evaluate_set(syn, test_x, test_y, SMALL_CONV, TrainSettings(epochs=2, batch_size=4), CPU, 0, 1)
    assert received[1] is None and hard.protocol == "hard-label"  # the hard-label protocol never sees soft labels
    plain = SyntheticSet(images, labels, 3, np.full(3, 2, dtype=np.int64))
    with pytest.raises(ValueError, match="soft-label-kd.*no soft labels"):
        evaluate_set(plain, test_x, test_y, SMALL_CONV, kd, CPU, 0, 1)


def test_augmented_training_is_repeatable() -> None:
    images, labels = random_data(12)
    settings = TrainSettings(epochs=2, batch_size=5, dsa_strategy="color_crop_cutout_scale_rotate")
    first = train_model(mlp(seed=2), images, labels, settings, gen(5))
    second = train_model(mlp(seed=2), images, labels, settings, gen(5))
    plain = train_model(mlp(seed=2), images, labels, TrainSettings(epochs=2, batch_size=5), gen(5))
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), plain.parameters(), strict=True))


def test_empty_set_is_rejected() -> None:
    empty = SyntheticSet(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long), 3, np.zeros(3, dtype=np.int64))
    test_x, test_y = random_data(6)
    with pytest.raises(ValueError, match="empty"):
        evaluate_set(empty, test_x, test_y, SMALL_CONV, TrainSettings(epochs=1), CPU, seed=0, num_nets=1)
    with pytest.raises(ValueError, match="no images"):
        train_model(mlp(), test_x[:0], test_y[:0], TrainSettings(epochs=1), gen(0))


def test_sample_weights_change_training_and_uniform_weights_do_not() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    spec = ModelSpec(width=8, depth=1)
    settings = TrainSettings(epochs=3, batch_size=5)

    def trained(weights: torch.Tensor | None) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model = build_model(spec, (1, 8, 8), 3)
        train_model(model, images, labels, settings, torch.Generator().manual_seed(2), sample_weights=weights)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = trained(None)
    torch.testing.assert_close(trained(torch.full((12,), 7.0)), plain)
    skewed = torch.ones(12)
    skewed[:4] = 10.0
    assert not torch.allclose(trained(skewed), plain)
    with pytest.raises(ValueError, match="sample_weights"):
        trained(torch.full((12,), float("nan")))
