"""Ablation behind dp-dm's design: clip deviations from the synthetic class centres (shipped) or raw embeddings.

Both variants make the same releases (same sigma, rate and count) on the same data; only the
per-record function that is clipped differs. Centralised on scikit-learn's digits (1,347
training images), ConvNet-2 width 16, IPC 10, 200 iterations at sample rate 0.2, scored on the
digits test split with 100 training epochs. Prints one JSON line per (variant, epsilon).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.common import command, hardware
from fedistill.data import load_dataset
from fedistill.distill import DistillSettings
from fedistill.distill.dp_dm import PrivateDistributionMatching
from fedistill.models import ModelSpec
from fedistill.privacy import PrivacyLedger, PrivateData, calibrate_noise_multiplier, clip_rows, clipped_class_sums
from fedistill.training import TrainSettings, evaluate_set


class RawEmbeddings(PrivateDistributionMatching):
    """The alternative: clip each raw embedding (and, identically, the synthetic ones) and match class means."""

    def matching_loss(  # type: ignore[no-untyped-def]
        self, syn_features, syn_sizes, features, slot_of_row, mechanism, expected
    ):
        clip = self.privacy.clip_norm
        sums = clipped_class_sums(features, slot_of_row, len(syn_sizes), clip)
        real_means = (mechanism.release(sums, self.privacy.sample_rate) / expected).float()
        return self.replay_loss(syn_features, syn_sizes, real_means), real_means

    def replay_loss(self, syn_features, syn_sizes, targets):  # type: ignore[no-untyped-def]
        clip = self.privacy.clip_norm
        syn_means = torch.stack([part.mean(0) for part in clip_rows(syn_features, clip).split(syn_sizes)])
        return syn_features.shape[1] / (4 * clip**2) * ((targets - syn_means) ** 2).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 5.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    spec = ModelSpec(width=16, depth=2)
    settings = DistillSettings(ipc=10, iterations=200, init="noise", dsa=True,
                               dsa_strategy="color_crop_cutout_scale_rotate", compile="off")
    for epsilon in args.epsilons:
        sigma = calibrate_noise_multiplier(epsilon, 1e-5, 0.2, 200)
        for variant in (PrivateDistributionMatching, RawEmbeddings):
            ledger = PrivacyLedger(delta=1e-5)
            counts = np.bincount(train.labels, minlength=10)  # true counts: identical for both variants
            privacy = PrivateData(counts, 0.2, 1.0, sigma, ledger, torch.Generator().manual_seed(0), 1)
            syn = variant(spec, settings, torch.device("cpu"), privacy=privacy)(
                train.normalized(), torch.from_numpy(train.labels), 10, seed=0)
            result = evaluate_set(syn, test.normalized(), torch.from_numpy(test.labels), spec,
                                  TrainSettings(epochs=100), torch.device("cpu"), seed=5, num_nets=1)
            print(json.dumps({"variant": variant.__name__, "epsilon": epsilon, "spent": ledger.epsilon().value,
                              "accuracy": result.mean, "command": command(), "hardware": hardware()}))


if __name__ == "__main__":
    main()
