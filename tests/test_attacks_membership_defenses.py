"""Membership inference, the DP bound check and the set defences, on small real data and planted outliers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.defenses import DEFENSES, robust_z
from attacks.membership import (
    ConfidenceAttack,
    LossAttack,
    NearestNeighbour,
    OfflineLiRA,
    dp_bound_check,
    read_privacy,
    roc_report,
    tpr_at_fpr,
    tpr_bound,
)
from attacks.pixels import PixelModel, to_pixels
from fedistill.data import ImageData, load_dataset
from fedistill.models import ModelSpec, build_model
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, train_model

MLP = ModelSpec(arch="mlp", hidden=128)


def overfit(data: ImageData, seed: int) -> PixelModel:
    """An MLP fit to ``data`` far past the point of generalising (no weight decay, 150 epochs on 100 images)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(MLP, data.info.shape, 10)
    train_model(model, data.normalized(), torch.from_numpy(data.labels),
                TrainSettings(epochs=150, lr=0.05, weight_decay=0.0, batch_size=32), torch.Generator().manual_seed(seed))
    return PixelModel(model.eval(), data.info)


N = 100


@pytest.fixture(scope="module")
def split() -> dict[str, ImageData]:
    """Fashion-MNIST: 100 members, 100 training images never trained on, a shadow pool, 100 test images."""
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    order = np.random.default_rng(0).permutation(len(train))
    return {
        "members": train.subset(order[:N]),
        "outside": train.subset(order[N : 2 * N]),  # same distribution, never trained on
        "pool": train.subset(order[2 * N : 8 * N]),
        "test": test.subset(np.random.default_rng(1).choice(len(test), N, replace=False)),
    }


def candidates(data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    return to_pixels(data), torch.from_numpy(data.labels)


def test_loss_attack_separates_members_of_an_overfit_model_and_not_independent_data(split: dict) -> None:
    model = overfit(split["members"], seed=0)
    attack = LossAttack(model)
    report = attack(candidates(split["members"]), candidates(split["test"]), bootstrap=100)
    assert report["auc"] > 0.75 and report["auc_ci"][0] > 0.65
    assert 0 <= report["tpr_at_fpr"]["0.01"]["fpr"] <= 0.01
    # "Members" the model never saw: no separation (the interval covers chance).
    null = attack(candidates(split["outside"]), candidates(split["test"]), bootstrap=100)
    assert 0.35 < null["auc"] < 0.65 and null["auc_ci"][0] < 0.5 < null["auc_ci"][1]
    confidence = ConfidenceAttack(model)(candidates(split["members"]), candidates(split["test"]), bootstrap=0)
    assert confidence["auc"] > 0.6 and confidence["auc_ci"] is None


class TableModel(torch.nn.Module):
    """A "model" whose logits for candidate ``i`` (pixel [0, 0, 0] holds ``i``) come from a table."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.table[pixels[:, 0, 0, 0].long()]


def test_offline_lira_calibrates_each_example_against_the_shadows() -> None:
    """Per-example difficulty varies far more than the membership signal: the raw confidence barely separates
    members, LiRA's per-example standardisation against shadows (all non-members there) does."""
    rng = np.random.default_rng(0)
    n, classes = 400, 10
    labels = torch.from_numpy(rng.integers(0, classes, 2 * n))
    difficulty = rng.normal(0.0, 6.0, 2 * n)
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]

    def model(shift: np.ndarray, seed: int) -> TableModel:
        noise = np.random.default_rng(seed).normal(0.0, 1.0, 2 * n)
        logits = torch.zeros(2 * n, classes, dtype=torch.float64)
        logits[torch.arange(2 * n), labels] = torch.from_numpy(difficulty + noise + shift)
        return TableModel(logits.float())

    target = model(2.5 * member, seed=1)
    shadows = [model(np.zeros(2 * n), seed=10 + k) for k in range(4)]
    pixels = torch.zeros(2 * n, 1, 2, 2)
    pixels[:, 0, 0, 0] = torch.arange(2 * n, dtype=torch.float32)
    members, non_members = (pixels[:n], labels[:n]), (pixels[n:], labels[n:])
    lira = OfflineLiRA(target, shadows)(members, non_members, bootstrap=50)
    raw = ConfidenceAttack(target)(members, non_members, bootstrap=0)
    assert lira["auc"] > 0.9 and lira["auc_ci"][0] > 0.85 and raw["auc"] < 0.75
    null = OfflineLiRA(model(np.zeros(2 * n), seed=99), shadows)(members, non_members, bootstrap=0)
    assert 0.4 < null["auc"] < 0.6
    with pytest.raises(ValueError, match="at least 2 shadow models"):
        OfflineLiRA(target, shadows[:1])


def test_offline_lira_finds_nothing_on_a_model_trained_on_neither_group(split: dict) -> None:
    rng = np.random.default_rng(1)
    shadows = [overfit(split["pool"].subset(rng.choice(len(split["pool"]), N, replace=False)), seed=10 + k)
               for k in range(3)]
    unseen = overfit(split["pool"].subset(np.arange(N)), seed=5)  # trained on neither candidate group
    null = OfflineLiRA(unseen, shadows)(candidates(split["outside"]), candidates(split["test"]), bootstrap=0)
    assert 0.3 < null["auc"] < 0.7


def test_nearest_neighbour_finds_released_images_and_not_others(split: dict) -> None:
    released = to_pixels(split["members"])
    exact = NearestNeighbour(released)(candidates(split["members"]), candidates(split["test"]), bootstrap=0)
    assert exact["auc"] == 1.0 and exact["tpr_at_fpr"]["0.001"]["tpr"] == 1.0
    unrelated = NearestNeighbour(to_pixels(split["pool"]))(candidates(split["outside"]), candidates(split["test"]),
                                                           bootstrap=0)
    assert 0.35 < unrelated["auc"] < 0.65


def test_roc_report_fields_and_tpr_at_fpr() -> None:
    members = np.r_[np.full(10, 5.0), np.zeros(90)]
    others = np.r_[np.full(1, 6.0), np.zeros(99)]
    # The highest non-member outranks every member: no TPR without that one false positive (FPR 1/100).
    assert tpr_at_fpr(members, others, 0.001) == (0.0, 0.0)
    assert tpr_at_fpr(members, others, 0.01) == (0.1, 0.01)
    report = roc_report(np.arange(100.0) + 50, np.arange(100.0), bootstrap=20)
    assert report["tpr_at_fpr"]["0.01"]["tpr"] == pytest.approx(0.51) and report["members"] == 100
    assert report["ci_method"].startswith("percentile bootstrap") and len(report["curve"]["fpr"]) >= 2


def test_dp_bound_check_flags_a_violation_and_passes_a_compliant_result() -> None:
    assert tpr_bound(1.0, 1e-5, 0.01) == pytest.approx(np.e * 0.01 + 1e-5)
    assert tpr_bound(0.0, 0.0, 0.3) == pytest.approx(0.3)
    assert tpr_bound(10.0, 1e-5, 0.5) == pytest.approx(1 - np.exp(-10) * (1 - 1e-5 - 0.5))  # the mirror binds
    # 200 of 1000 members found at 10 of 1000 false alarms proves far more than epsilon 1.
    bad = dp_bound_check(1.0, 1e-5, [("lira @ 1%", 0.01, 0.20, 1000, 1000), ("loss @ 0.1%", 0.001, 0.002, 1000, 1000)])
    assert bad.violated and bad.proven_epsilon > 2.0 and bad.to_dict()["violated"] is True
    assert bad.points[0].proven_epsilon == bad.proven_epsilon and bad.points[1].proven_epsilon == 0.0
    good = dp_bound_check(1.0, 1e-5, [("lira @ 1%", 0.01, 0.02, 1000, 1000), ("loss @ 0.1%", 0.001, 0.0027, 1000, 1000)])
    assert not good.violated
    mirror = dp_bound_check(0.1, 0.0, [("high fpr", 0.5, 1.0, 2000, 2000)])  # 1 - TPR must stay >= e^-eps (1 - FPR)
    assert mirror.violated


def test_dp_bound_check_does_not_call_a_lucky_zero_fpr_a_violation() -> None:
    """The false alarm found by an independent check: FPR 0/200 and TPR 2/200 at a correctly noised eps-2 release."""
    check = dp_bound_check(2.0, 1e-5, [("nn-distance @ FPR 0.01", 0.0, 0.01, 200, 200)])
    assert tpr_bound(2.0, 1e-5, 0.0) < 0.01  # the point estimate is above the bound...
    assert not check.violated and check.proven_epsilon == 0.0  # ...but the counts prove nothing
    assert check.to_dict()["confidence"] == 0.95


def test_dp_bound_check_splits_its_confidence_over_the_points() -> None:
    """Many points tried at once: each is judged at a stricter level, so the largest bound still holds at 95 %."""
    point = ("attack", 0.0, 0.05, 400, 400)
    alone = dp_bound_check(1.0, 1e-5, [point]).proven_epsilon
    among_many = dp_bound_check(1.0, 1e-5, [point] * 20).proven_epsilon
    assert 0 < among_many < alone


def test_read_privacy_takes_the_worst_case_from_privacy_json(tmp_path: Path) -> None:
    assert read_privacy(tmp_path) is None
    (tmp_path / "privacy.json").write_text(json.dumps({"worst_epsilon": 1.5, "delta": 1e-6, "accountant": "rdp"}))
    assert read_privacy(tmp_path) == (1.5, 1e-6, "privacy.json")
    (tmp_path / "privacy.json").write_text("{not json")
    assert read_privacy(tmp_path) is None
    (tmp_path / "privacy.json").write_text(json.dumps({"worst_epsilon": None, "delta": 1e-5}))  # nobody answered
    assert read_privacy(tmp_path) is None


# ------------------------------------------------------------------ defences


def planted_sets(seed: int = 0, clients: int = 8, per_class: int = 5, dim: int = 16, plant: bool = True
                 ) -> list[SyntheticSet]:
    """Client sets whose images of class c sit around a class centre; client 3's class-0 images sit elsewhere."""
    rng = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=rng) * 4
    sets = []
    for k in range(clients):
        images, labels = [], []
        for c in range(3):
            centre = centres[c] + (torch.full((dim,), 6.0) if plant and (k, c) == (3, 0) else 0)
            images.append(centre + torch.randn(per_class, dim, generator=rng))
            labels.append(torch.full((per_class,), c))
        flat = torch.cat(images)
        sets.append(SyntheticSet(flat.view(-1, 1, 4, 4), torch.cat(labels), 3, np.full(3, 50)))
    return sets


def identity(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)


@pytest.mark.parametrize("name", ["spectral", "class-outliers", "client-outliers"])
def test_defences_remove_planted_outliers(name: str) -> None:
    sets = planted_sets()
    result = DEFENSES.get(name)(threshold=3.5)(sets, identity)
    planted = result.flags[3][sets[3].labels == 0]
    assert planted.all(), f"{name} missed planted images"
    honest = sum(int(f.sum()) for k, f in enumerate(result.flags) if k != 3) + int(result.flags[3][sets[3].labels != 0].sum())
    assert honest <= 2, f"{name} removed {honest} honest images"
    assert result.removed_per_class[3][0] == 5
    assert len(result.kept[3]) == len(sets[3]) - int(result.flags[3].sum())
    assert (result.kept[3].labels == 0).sum() == 0 and result.kept[3].provenance["defense"] == name


def test_defences_leave_clean_sets_nearly_alone_and_robust_z_handles_constants() -> None:
    sets = planted_sets(seed=1, plant=False)
    for name in ("spectral", "class-outliers", "client-outliers"):
        result = DEFENSES.get(name)(threshold=3.5)(sets, identity)
        assert sum(int(f.sum()) for f in result.flags) <= 2, name
    assert torch.equal(robust_z(torch.ones(5)), torch.zeros(5))
    assert robust_z(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))[-1] > 3.5
