"""The class-count release on neighbouring datasets: how much more often a lone record makes its class appear.

A client holds 500, 300 and 70 records of three classes and none of a fourth;
its neighbour holds the same plus one record of the fourth. Each release is
run ``--trials`` times on both (the project's defaults: noise std 20 records,
presence at 3 stds, delta 1e-5) and the record is
``P[released count > 0 | one record] - P[released count > 0 | none]``, beside
the gap that the release's own (epsilon, delta) allows,
``(e^eps - 1) * P[count > 0 | none] + delta``, and the epsilon the measured
rates prove (Clopper-Pearson at 95 %). The release before the fix (class
presence taken from the true counts) is measured the same way for comparison:
its gap (about 0.51) allows no (epsilon, delta) with delta below it.

``--dp-fed-partitions`` lists, for the DP benchmark's ten Fashion-MNIST
clients (``benchmarks.bench_dp_fed``: the same partition and, with
``privacy.reproducible``, the same noise), the classes whose released count
the fix changes: the classes with few records that the old release kept.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from benchmarks.common import write_result
from fedistill.privacy import PrivacyLedger, compute_epsilon, release_class_counts
from fedistill.privacy.empirical import clopper_pearson, epsilon_lower_bound

RECORD_ID = "dp-count-release-presence-gap"
COUNT_NOISE = 20.0
PRESENCE_SIGMAS = 3.0
DELTA = 1e-5
CLASSES = np.repeat(np.arange(4), [500, 300, 70, 0])
LONE = 3


def presence_rate(labels: np.ndarray, trials: int, first_seed: int, present_from_true_counts: bool) -> int:
    """How many of ``trials`` releases report class ``LONE`` as present (count > 0)."""
    present = 0
    true_absent = np.bincount(labels, minlength=4)[LONE] == 0
    for trial in range(trials):
        counts = release_class_counts(labels, 4, PrivacyLedger(delta=DELTA), COUNT_NOISE,
                                      torch.Generator().manual_seed(first_seed + trial), 1,
                                      0.0 if present_from_true_counts else PRESENCE_SIGMAS)
        shown = counts[LONE] > 0 and not (present_from_true_counts and true_absent)
        present += int(shown)
    return present


def measure(trials: int, present_from_true_counts: bool) -> dict[str, float]:
    with_record = presence_rate(np.append(CLASSES, LONE), trials, 0, present_from_true_counts)
    without = presence_rate(CLASSES, trials, 10 * trials, present_from_true_counts)
    epsilon = compute_epsilon([(COUNT_NOISE, 1.0, 1)], DELTA).value
    _, without_high = clopper_pearson(without, trials)
    return {
        "p_present_with_record": with_record / trials,
        "p_present_without": without / trials,
        "gap": (with_record - without) / trials,
        "allowed_gap": (math.exp(epsilon) - 1) * without_high + DELTA,
        "claimed_epsilon": epsilon,
        "proven_epsilon": epsilon_lower_bound(with_record, trials, without, trials, DELTA),
    }


def dp_fed_changes() -> list[dict[str, int]]:
    """Per client of the DP benchmark, the classes whose released count differs between the old and the new rule."""
    from benchmarks.bench_dp_fed import PRIVATE_TRAIN_IMAGES
    from fedistill.config import parse_config
    from fedistill.data import load_dataset, partition_dataset
    from fedistill.privacy import secret_generator

    config = parse_config({
        "data": {"name": "fashion-mnist", "train_subset": PRIVATE_TRAIN_IMAGES},
        "partition": {"scheme": "dirichlet", "num_clients": 10, "alpha": 0.5, "min_partition_size": 100},
        "distill": {"method": "dp-dm", "init": "public"},
        "privacy": {"enabled": True, "reproducible": True},
    })
    train = config.data.private_train(load_dataset("fashion-mnist", "train"))
    part = config.partition
    partitioning = partition_dataset(train.labels, 10, part.scheme, part.num_clients, alpha=part.alpha,
                                     min_partition_size=part.min_partition_size, seed=config.seed)
    changes = []
    for client, rows in enumerate(partitioning.indices):
        labels = train.labels[rows]
        true = np.bincount(labels, minlength=10)
        seed = config.seed * 1_000_003 + client * 1009 + 1  # the node's seed in round 1 (clients.app)
        releases = [release_class_counts(labels, 10, PrivacyLedger(delta=DELTA), COUNT_NOISE,
                                         secret_generator(config.privacy, seed), 1, sigmas)
                    for sigmas in (PRESENCE_SIGMAS, 0.0)]
        new, old = releases[0], np.where(true == 0, 0, releases[1])
        changes += [{"client": client, "class": int(c), "records": int(true[c]), "old": int(old[c]), "new": int(new[c])}
                    for c in np.flatnonzero(new != old)]
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--record", action="store_true", help=f"write benchmarks/results/{RECORD_ID}.json")
    parser.add_argument("--dp-fed-partitions", action="store_true",
                        help="list the DP benchmark's client classes whose released count the fix changes")
    args = parser.parse_args()
    if args.dp_fed_partitions:
        changes = dp_fed_changes()
        for change in changes:
            print(json.dumps(change))
        images = sum(min(10, change["old"]) for change in changes)
        print(f"{len(changes)} client classes now released as absent; the union loses {images} of their images")
        return
    now = measure(args.trials, present_from_true_counts=False)
    before = measure(args.trials, present_from_true_counts=True)
    print(json.dumps({"release": now, "before_the_fix": before}, indent=2))
    if args.record:
        write_result(
            RECORD_ID,
            round(now["gap"], 5),
            "P[count > 0 | one record] - P[count > 0 | none]",
            f"{args.trials} releases per side; noise std {COUNT_NOISE:g} records, presence at {PRESENCE_SIGMAS:g} stds, "
            f"delta {DELTA:g}: P {now['p_present_with_record']:.5f} vs {now['p_present_without']:.5f}; the "
            f"release's (epsilon {now['claimed_epsilon']:.3f}, delta {DELTA:g}) allows a gap up to "
            f"{now['allowed_gap']:.5f} (with the 95 % upper bound of P[none]); the rates prove epsilon >= "
            f"{now['proven_epsilon']:.3f}. Before the fix (presence from the true counts): gap {before['gap']:.4f} "
            f"(P {before['p_present_with_record']:.4f} vs {before['p_present_without']:.4f}), proven epsilon >= "
            f"{before['proven_epsilon']:.2f}.",
        )


if __name__ == "__main__":
    main()
