"""Factorised sets, teachers and soft labels, the soft-label protocol, and RDED's real-patch composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedistill.teacher
from fedistill.aggregation import AggregationContext, ClientSet, get_aggregator
from fedistill.config import ConfigError, parse_config
from fedistill.data import ImageData
from fedistill.distill import DistillSettings, get_distiller
from fedistill.distill.rded import random_resized_crops, tile_losses
from fedistill.models import ModelSpec
from fedistill.references import random_real_like
from fedistill.synthetic import SyntheticSet, decode, encode
from fedistill.teacher import one_hot_labelled, soft_label, teacher_and_cost, train_teacher
from fedistill.training import TrainSettings, evaluate_set
from server.validation import InvalidReply, ReplyLimits, validate_set_arrays
from tests.worth import accuracy_and_random_real

SMALL = ModelSpec(width=16, depth=2)
CPU = torch.device("cpu")


def tensors(data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    return data.normalized(), torch.from_numpy(data.labels)


def test_decode_reads_back_the_tiles_encode_lays_out() -> None:
    """Four constant images become the four quadrants of one stored image, in row order, and decode back."""
    constant = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(8)])
    stored = encode(constant, 2)
    assert stored.shape == (2, 1, 8, 8)
    assert stored[0, 0, 0, 0] == 0 and stored[0, 0, 0, 7] == 1 and stored[0, 0, 7, 0] == 2 and stored[1, 0, 7, 7] == 7
    torch.testing.assert_close(decode(stored, 2), constant)
    images = torch.randn(3, 1, 8, 8, requires_grad=True)
    decode(images, 2).sum().backward()  # differentiable, so distillers optimise the stored pixels
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_factorised_set_decodes_saves_and_checks_soft_label_rows(tmp_path: Path) -> None:
    images = torch.randn(2, 1, 8, 8)
    counts = np.array([5, 5, 0])
    soft = torch.full((8, 3), 1 / 3)
    syn = SyntheticSet(images, torch.tensor([0, 1]), 3, counts, soft, factor=2)
    decoded = syn.decoded()
    assert decoded.images.shape == (8, 1, 8, 8) and decoded.labels.tolist() == [0] * 4 + [1] * 4
    assert decoded.factor == 1 and decoded.soft_labels is soft
    syn.save(tmp_path / "set.safetensors")
    loaded = SyntheticSet.load(tmp_path / "set.safetensors")
    assert loaded.factor == 2 and torch.equal(loaded.images, images)
    with pytest.raises(ValueError, match=r"soft_labels must be \(8, 3\)"):
        SyntheticSet(images, torch.tensor([0, 1]), 3, counts, torch.full((2, 3), 1 / 3), factor=2)
    with pytest.raises(ValueError, match="distill.factor: 3"):
        SyntheticSet(images, torch.tensor([0, 1]), 3, counts, factor=3)


@pytest.mark.parametrize("method", ["dm", "dsa"])
def test_factorised_matching_stores_four_tiles_per_image(method: str, fmnist_small: ImageData) -> None:
    images, labels = tensors(fmnist_small)
    settings = DistillSettings(ipc=2, iterations=3, batch_real=16, outer_loop=2, inner_loop=1, factor=2)
    start = get_distiller(method)(SMALL, DistillSettings(ipc=2, iterations=0, factor=2), CPU)(images, labels, 10, 4)
    losses: list[float] = []
    result = get_distiller(method)(SMALL, settings, CPU)(
        images, labels, 10, seed=4, progress=lambda _i, _n, loss: losses.append(loss)
    )
    assert result.factor == 2 and result.images.shape == (20, 1, 28, 28)
    assert result.decoded().images.shape == (80, 1, 28, 28)
    assert result.provenance["factor"] == 2
    assert not torch.equal(result.images, start.images)  # the stored pixels moved through the decoding
    shrunk = torch.nn.functional.interpolate(images[labels == 0], size=(14, 14), mode="area").flatten(1)
    quadrant = start.images[0, :, :14, :14].flatten()
    assert torch.isclose(shrunk, quadrant, atol=1e-5).all(dim=1).any()  # the start tiles shrunk real images


def test_factorised_dm_loss_falls(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    losses: list[float] = []
    settings = DistillSettings(ipc=2, iterations=60, batch_real=64, dsa=False, init="noise", factor=2)
    get_distiller("dm")(SMALL, settings, CPU)(images, labels, 10, seed=0, progress=lambda _i, _n, x: losses.append(x))
    assert losses[-1] < 0.5 * losses[0], losses


def test_methods_that_store_whole_images_refuse_a_factor(fmnist_small: ImageData) -> None:
    with pytest.raises(ValueError, match="distill.factor: method random"):
        get_distiller("random")(SMALL, DistillSettings(ipc=2, factor=2), CPU)
    with pytest.raises(ConfigError, match="distill.factor: method 'herding' stores whole images; allowed .*dm"):
        parse_config({"distill": {"method": "herding", "factor": 2}})
    with pytest.raises(ConfigError, match="distill.factor: 3 does not divide fashion-mnist's 28x28"):
        parse_config({"distill": {"factor": 3}})


def test_teacher_labels_every_tile_and_rows_are_distributions(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    settings = DistillSettings(ipc=2, iterations=2, batch_real=32, factor=2, labels="teacher", teacher_epochs=2)
    result = get_distiller("dm")(SMALL, settings, CPU)(images, labels, 10, seed=0)
    assert result.soft_labels is not None and result.soft_labels.shape == (80, 10)
    torch.testing.assert_close(result.soft_labels.sum(1), torch.ones(80))
    assert result.provenance["labels"] == "teacher" and result.provenance["soft_label_temperature"] == 4.0
    agree = (result.soft_labels.argmax(1) == result.decoded().labels).float().mean()
    assert agree > 0.5  # a trained teacher mostly agrees with the class a tile was made for


def test_soft_labels_survive_validation_and_union(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    settings = DistillSettings(ipc=1, iterations=1, batch_real=16, factor=2, labels="teacher", teacher_epochs=1)
    sets = [get_distiller("dm")(SMALL, settings, CPU)(images, labels, 10, seed=s) for s in (0, 1)]
    limits = ReplyLimits(num_classes=10, image_shape=(1, 8, 8), max_images=10, max_bytes=10**6, max_per_class=1,
                         factor=2)
    received = [ClientSet(f"c{i}", validate_set_arrays(s.to_arrays(), limits).decoded()) for i, s in enumerate(sets)]
    merged = get_aggregator("union")(received, AggregationContext(10, CPU, 0)).set
    assert merged.images.shape == (80, 1, 8, 8) and merged.soft_labels is not None
    torch.testing.assert_close(merged.soft_labels, torch.cat([s.soft_labels for s in sets]))
    whole = ReplyLimits(num_classes=10, image_shape=(1, 8, 8), max_images=10, max_bytes=10**6)
    with pytest.raises(InvalidReply, match=r"soft_labels: expected shape \(10, 10\)"):
        validate_set_arrays(sets[0].to_arrays(), whole)  # per-tile labels of a factor-2 set do not fit factor 1
    bad = sets[0].to_arrays()
    bad["soft_labels"] = bad["soft_labels"] * 2
    with pytest.raises(InvalidReply, match="soft_labels: a row does not sum to 1"):
        validate_set_arrays(bad, limits)


def test_soft_label_protocol_adds_what_the_teacher_knows(digits_train: ImageData, digits_test: ImageData) -> None:
    """One random real image per class, labelled by a teacher and distilled from, beats the same images' hard labels."""
    images, labels = tensors(digits_train)
    test_x, test_y = tensors(digits_test)
    teacher = train_teacher(images, labels, 10, SMALL, epochs=5, seed=0)
    gains = []
    for seed in range(3):
        subset = random_real_like(
            SyntheticSet(images[:10], torch.arange(10), 10, np.ones(10, dtype=np.int64)), images, labels,
            torch.Generator().manual_seed(seed),
        )
        hard = evaluate_set(subset, test_x, test_y, SMALL, TrainSettings(epochs=300), CPU, seed=0, num_nets=1)
        kd = evaluate_set(soft_label(subset, teacher, 4.0), test_x, test_y, SMALL,
                          TrainSettings(epochs=300, kd_temperature=4.0), CPU, seed=0, num_nets=1)
        gains.append(kd.mean - hard.mean)
    assert np.mean(gains) > 0.03, gains


def test_rded_composes_the_teachers_most_typical_crops(digits_train: ImageData) -> None:
    images, labels = tensors(digits_train)
    settings = DistillSettings(ipc=2, factor=2, teacher_epochs=2)
    losses: list[float] = []
    distiller = get_distiller("rded")(SMALL, settings, CPU)
    result = distiller(images, labels, 10, seed=0, progress=lambda _i, _n, loss: losses.append(loss))
    assert result.images.shape == (20, 1, 8, 8) and result.factor == 2
    assert result.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert result.provenance["method"] == "rded" and result.soft_labels is None
    assert len(losses) == 10
    generator = torch.Generator().manual_seed(1)
    rows = torch.nonzero(labels == 3).flatten()
    crops = random_resized_crops(images[rows[:200]], (4, 4), generator)
    typical = tile_losses(distiller.teacher, crops, 3, (8, 8)).mean()
    assert losses[3] < typical  # the kept tiles are more typical of their class than random crops
    with pytest.raises(ValueError, match="cannot continue from a set"):
        get_distiller("rded")(SMALL, settings, CPU, start=result)


def test_rded_beats_random_real_on_digits(digits_train: ImageData, digits_test: ImageData) -> None:
    """Hard-label protocol, the same stored images: RDED's composed crops teach more than random real images."""
    images, labels = tensors(digits_train)
    rded = get_distiller("rded")(SMALL, DistillSettings(ipc=1, teacher_epochs=10), CPU)(images, labels, 10, seed=0)
    rded_acc, random_acc = accuracy_and_random_real(rded, images, labels, tensors(digits_test), SMALL)
    assert rded_acc > random_acc + 0.03, (rded_acc, random_acc)


def test_soft_label_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match="eval.protocol 'soft-label-kd' needs soft labels"):
        parse_config({"eval": {"protocol": "soft-label-kd"}})
    with pytest.raises(ConfigError, match="distill.labels 'teacher' makes soft labels.*eval.protocol"):
        parse_config({"distill": {"labels": "teacher"}})
    with pytest.raises(ConfigError, match="distill.labels: invalid value 'teachers'; allowed: 'hard' or 'teacher'"):
        parse_config({"distill": {"labels": "teachers"}})
    with pytest.raises(ConfigError, match="eval.protocol: invalid value 'kd'"):
        parse_config({"eval": {"protocol": "kd"}})
    private = {"privacy": {"enabled": True}, "distill": {"method": "dp-dm", "init": "noise", "labels": "teacher"},
               "eval": {"protocol": "soft-label-kd"}}
    with pytest.raises(ConfigError, match="distill.labels 'teacher' trains a teacher on private data"):
        parse_config(private)
    ok = parse_config({"distill": {"method": "rded", "labels": "teacher", "factor": 2},
                       "eval": {"protocol": "soft-label-kd"}})
    assert ok.eval.train_settings("fashion-mnist").protocol == "soft-label-kd"


def test_one_hot_labels_follow_the_decoded_tiles() -> None:
    """Round 1 of federation.soft_labels has no global model: each tile is distilled from its own class, one-hot."""
    syn = SyntheticSet(torch.randn(2, 1, 8, 8), torch.tensor([2, 0]), 3, np.array([4, 0, 4]), factor=2)
    soft = one_hot_labelled(syn).soft_labels
    assert soft is not None and soft.shape == (8, 3)
    assert soft.argmax(1).tolist() == [2] * 4 + [0] * 4 and torch.equal(soft.sum(1), torch.ones(8))


def test_a_teacher_is_read_from_the_cache_for_the_same_data_only(digits_train: ImageData, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = tensors(digits_train)
    calls = []
    trainer = fedistill.teacher.train_model
    monkeypatch.setattr(fedistill.teacher, "train_model", lambda *args, **kw: calls.append(1) or trainer(*args, **kw))
    first = train_teacher(images, labels, 10, SMALL, epochs=1, seed=3, cache_dir=tmp_path)
    again = train_teacher(images, labels, 10, SMALL, epochs=1, seed=3, cache_dir=tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("teacher-*.safetensors"))) == 1
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    train_teacher(images, labels.roll(1), 10, SMALL, epochs=1, seed=3, cache_dir=tmp_path)  # other data: trained
    train_teacher(images, labels, 10, SMALL, epochs=2, seed=3, cache_dir=tmp_path)  # other schedule: trained
    assert len(calls) == 3 and len(list(tmp_path.glob("teacher-*.safetensors"))) == 3
    _, cost = teacher_and_cost(images, labels, 10, SMALL, epochs=1, seed=3, cache_dir=tmp_path)
    assert len(calls) == 3 and cost > 0  # read from the cache, with the seconds its training took


def test_runs_that_train_a_teacher_say_so() -> None:
    """RDED always trains one; other methods only to soft-label their result (the runner announces it)."""
    assert get_distiller("rded")(SMALL, DistillSettings(), CPU).needs_teacher()
    assert not get_distiller("dm")(SMALL, DistillSettings(), CPU).needs_teacher()
    assert get_distiller("dm")(SMALL, DistillSettings(labels="teacher"), CPU).needs_teacher()
