"""The references every set stands beside: its start alone (zero iterations) and a random real subset of its size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedistill.config import parse_config
from fedistill.data import ImageData
from fedistill.distill import DistillSettings, get_distiller
from fedistill.models import ModelSpec
from fedistill.privacy import PrivacyLedger, PrivateData
from fedistill.references import Gains, random_real_like, start_alone
from fedistill.synthetic import encode
from fedistill.training import EvalResult
from server.compare import RANDOM_REAL, START_ALONE, reference_configs

CPU = torch.device("cpu")
SPEC = ModelSpec(width=8, depth=1)


def settings(**overrides) -> DistillSettings:  # type: ignore[no-untyped-def]
    return DistillSettings(**{"ipc": 3, "iterations": 5, "compile": "off", "batch_real": 32, **overrides})


def rows_of(images: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each image, the index of the identical row of ``pool`` (asserts there is one)."""
    distances = torch.cdist(images.flatten(1), pool.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    nearest = distances.min(dim=1)
    assert torch.all(nearest.values < 1e-5), "an image is not a real image of the pool"
    return nearest.indices


def test_start_alone_is_the_run_at_zero_iterations(digits_train: ImageData) -> None:
    images, labels = digits_train.normalized(), torch.from_numpy(digits_train.labels)
    method = get_distiller("dm")
    distilled = method(SPEC, settings(), CPU)(images, labels, 10, seed=4)
    start = start_alone(method, SPEC, settings(), CPU, images, labels, 10, seed=4)
    assert start is not None and torch.equal(start.labels, distilled.labels)
    picked = rows_of(start.images, images)
    assert torch.equal(labels[picked], start.labels)  # real images of their own class
    assert not torch.allclose(start.images, distilled.images)  # five iterations moved them
    assert start_alone(get_distiller("herding"), SPEC, settings(), CPU, images, labels, 10, seed=4) is None


def test_a_private_start_alone_releases_nothing(digits_train: ImageData) -> None:
    ledger = PrivacyLedger(delta=1e-5)
    privacy = PrivateData(np.bincount(digits_train.labels, minlength=10), 0.2, 1.0, 2.0, ledger,
                          torch.Generator().manual_seed(0), 1)
    start = start_alone(get_distiller("dp-dm"), SPEC, settings(init="noise"), CPU, digits_train.normalized(),
                        torch.from_numpy(digits_train.labels), 10, seed=1, privacy=privacy)
    assert start is not None and len(start) == 30 and ledger.accesses == []


def test_random_real_like_matches_the_set_class_by_class(digits_train: ImageData) -> None:
    images, labels = digits_train.normalized(), torch.from_numpy(digits_train.labels)
    syn = get_distiller("dm")(SPEC, settings(ipc=2, iterations=1), CPU)(images[labels < 4], labels[labels < 4], 10)
    first = random_real_like(syn, images, labels, torch.Generator().manual_seed(0))
    again = random_real_like(syn, images, labels, torch.Generator().manual_seed(1))
    assert first.images_per_class().tolist() == syn.images_per_class().tolist() == [2] * 4 + [0] * 6
    picked = rows_of(first.images, images)
    assert torch.equal(labels[picked], first.labels) and picked.tolist() == first.provenance["rows"]
    assert not torch.equal(first.images, again.images)


def test_gains_are_points_over_each_reference() -> None:
    def result(mean: float) -> EvalResult:
        return EvalResult([mean], mean, 0.0, 1, 10, 0.1)

    gains = Gains.of(result(0.85), result(0.80), result(0.86))
    assert gains.over_start == pytest.approx(5.0) and gains.over_random_real == pytest.approx(-1.0)
    assert gains.describe() == "gain in points: +5.00 over its start, -1.00 over random real images"
    coreset = Gains.of(result(0.80), None, result(0.78))
    assert coreset.over_start is None and coreset.to_dict()["gain_over_random_real_points"] == pytest.approx(2.0)
    assert "no start" in coreset.describe()


@pytest.mark.parametrize(
    ("distill", "start"),
    [
        ({"method": "dm", "factor": 2, "labels": "teacher"}, True),
        ({"method": "mtt", "syn_steps": 5, "num_experts": 2}, True),
        ({"method": "rded", "factor": 2}, False),
    ],
)
def test_federated_references_of_every_method_are_valid_runs(distill: dict, start: bool) -> None:
    """The random-real reference is whole real images with none of the method's own keys; a start is the run at zero."""
    protocol = "soft-label-kd" if distill.get("labels") == "teacher" else "hard-label"
    config = parse_config({"data": {"name": "digits"}, "distill": distill, "eval": {"protocol": protocol}})
    references = reference_configs(config)
    real = references[RANDOM_REAL]
    assert real.distill.method == "random" and real.distill.factor == 1 and real.distill.labels == config.distill.labels
    assert (START_ALONE in references) == start
    if start:
        assert references[START_ALONE].distill.iterations == 0
        assert references[START_ALONE].distill.factor == config.distill.factor


@pytest.mark.parametrize("factor", [1, 2])
def test_a_set_records_the_real_rows_it_started_from(digits_train: ImageData, factor: int) -> None:
    """``init_rows``: the membership audit's worst-case targets are exactly the images the start shows."""
    images, labels = digits_train.normalized(), torch.from_numpy(digits_train.labels)
    start = start_alone(get_distiller("dm"), SPEC, settings(factor=factor), CPU, images, labels, 10, seed=4)
    assert start is not None
    rows = torch.tensor(start.provenance["init_rows"])
    assert len(rows) == len(start) * factor**2 and torch.equal(labels[rows], start.decoded().labels)
    torch.testing.assert_close(start.images, encode(images[rows], factor))
    noise = start_alone(get_distiller("dm"), SPEC, settings(init="noise"), CPU, images, labels, 10, seed=4)
    assert noise is not None and "init_rows" not in noise.provenance
