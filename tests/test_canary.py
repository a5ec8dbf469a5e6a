"""The one-run canary audit: its bound is valid for a DP mechanism and finds a leaky release (the audit's
`fedistill audit` path is tested with the shared finished run in test_attacks_federated.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import binom

from attacks.canary import Release, canary_audit, with_canaries
from clients.app import canary_release
from fedistill.config import ConfigError, ExperimentConfig, parse_config
from fedistill.data import load_dataset
from fedistill.privacy.one_run import audit_scores, one_run_epsilon_lower_bound, one_run_p_value

CPU = torch.device("cpu")
CANARIES = 200


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_it() -> None:
    q = 1 / (1 + math.exp(-1.5))
    assert one_run_p_value(300, 100, 70, 1.5, 0.0) == pytest.approx(binom.sf(69, 100, q), rel=1e-12)
    assert one_run_p_value(300, 100, 70, 1.5, 1e-4) > one_run_p_value(300, 100, 70, 1.5, 0.0)
    assert one_run_p_value(300, 100, 0, 1.5, 0.0) == 1.0


def test_bound_of_perfect_guesses_has_its_closed_form() -> None:
    # All r guesses right: P[Bin(r, q) >= r] = q^r, so the bound is logit(significance^(1/r)).
    q = 0.05 ** (1 / 100)
    assert one_run_epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert one_run_epsilon_lower_bound(1000, 100, 50, 0.0, 0.05) == 0.0


def test_bound_holds_for_randomised_response_and_has_power() -> None:
    """Scores that are each canary's bit through eps-randomised response (exactly eps-DP): the bound rarely exceeds
    eps (at most the 5% significance allows), and it is far from zero, so the audit can see a leak of that size."""
    epsilon, trials = 1.0, 60
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(trials):
        included = rng.random(400) < 0.5
        flip = rng.random(400) < 1 / (1 + math.exp(epsilon))
        scores = (included ^ flip) + 1e-3 * rng.random(400)  # ties broken at random
        bounds.append(audit_scores(scores, included, delta=0.0).epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds > epsilon).mean() <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)
    assert bounds.mean() > 0.4


def test_independent_scores_prove_nothing() -> None:
    rng = np.random.default_rng(1)
    results = [audit_scores(rng.random(CANARIES), rng.random(CANARIES) < 0.5, delta=1e-5).epsilon_lower_bound
               for _ in range(20)]
    assert sum(bound > 0 for bound in results) <= 2


def digits_config(tmp_path: Path, distill: dict[str, Any], privacy: dict[str, Any] | None = None) -> ExperimentConfig:
    return parse_config({
        "seed": 3,
        "device": "cpu",
        "output_dir": str(tmp_path),
        "data": {"name": "digits"},
        "partition": {"scheme": "dirichlet", "num_clients": 3, "alpha": 1.0, "min_partition_size": 50},
        "model": {"width": 16, "depth": 2},
        "distill": {"compile": "off", **distill},
        "privacy": privacy or {"enabled": False},
    })


def test_canaries_go_in_with_probability_one_half_and_keep_the_clients_data() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    data = train.subset(np.arange(100))
    merged, canaries, included = with_canaries(data, test, CANARIES, seed=0)
    assert len(canaries) == CANARIES and 70 < included.sum() < 130
    assert len(merged) == 100 + included.sum() and np.array_equal(merged.images[:100], data.images)
    assert np.array_equal(merged.images[100:], canaries.images[included])
    with pytest.raises(ConfigError, match="attack.canary.count"):
        with_canaries(data, test, len(test) + 1, seed=0)


def test_a_set_of_the_clients_real_images_is_caught(tmp_path: Path) -> None:
    """A coreset of every real image (the extreme of a set that is its real start) leaks every canary."""
    config = digits_config(tmp_path, {"method": "random", "ipc": 500})
    data, release = canary_release(config, 0, CPU)
    result = canary_audit(data, load_dataset("digits", "test"), release, CANARIES, seed=0, device=CPU)
    assert result["claimed_epsilon"] is None and not result["violated"]
    assert max(t["correct"] / t["guesses"] for t in result["trials"]) == 1.0
    assert result["epsilon_lower_bound"] > 3.0


def test_a_set_built_from_independent_data_proves_nothing(tmp_path: Path) -> None:
    config = digits_config(tmp_path, {"method": "random", "ipc": 500})
    other, other_release = canary_release(config, 1, CPU)
    data, _ = canary_release(config, 0, CPU)
    result = canary_audit(data, load_dataset("digits", "test"), lambda _records: other_release(other),
                          CANARIES, seed=0, device=CPU)
    assert result["epsilon_lower_bound"] < 0.5


def test_a_correctly_noised_release_stays_below_its_ledger(tmp_path: Path) -> None:
    config = digits_config(
        tmp_path, {"method": "dp-dm", "ipc": 3, "iterations": 6, "init": "noise"},
        {"enabled": True, "target_epsilon": 1.0, "sample_rate": 0.2, "reproducible": True},
    )
    data, release = canary_release(config, 0, CPU)
    result = canary_audit(data, load_dataset("digits", "test"), release, CANARIES, seed=0, device=CPU)
    assert 0 < result["claimed_epsilon"] <= 1.0 and result["claimed_delta"] == config.privacy.delta
    assert result["epsilon_lower_bound"] <= result["claimed_epsilon"] and not result["violated"]


def test_a_release_that_lies_about_its_epsilon_is_flagged(tmp_path: Path) -> None:
    config = digits_config(tmp_path, {"method": "random", "ipc": 500})
    data, release = canary_release(config, 0, CPU)

    def claims_dp(records: Any) -> Release:
        return Release(release(records).released, 0.5, 1e-5)

    result = canary_audit(data, load_dataset("digits", "test"), claims_dp, CANARIES, seed=0, device=CPU)
    assert result["violated"] and result["epsilon_lower_bound"] > 0.5


def test_bad_canary_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="attack.canary"):
        parse_config({"data": {"name": "digits"}, "attack": {"canary": {"count": 1}}})
    with pytest.raises(ConfigError, match="attack.canary"):
        parse_config({"data": {"name": "digits"}, "partition": {"num_clients": 3},
                      "attack": {"canary": {"count": 50, "client": 3}}})
    with pytest.raises(ConfigError, match="attack.canary"):
        parse_config({"data": {"name": "digits"}, "federation": {"protocol": "fedavg"},
                      "attack": {"canary": {"count": 50}}})
