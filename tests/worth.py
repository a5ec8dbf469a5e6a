"""What a set is worth on digits: its accuracy beside random real subsets of its size (hard-label protocol)."""

from __future__ import annotations

import numpy as np
import torch

from fedistill.models import ModelSpec
from fedistill.references import random_real_like
from fedistill.synthetic import SyntheticSet
from fedistill.training import TrainSettings, evaluate_set

CPU = torch.device("cpu")


def accuracy_and_random_real(
    syn: SyntheticSet,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    spec: ModelSpec,
    seeds: int = 3,
) -> tuple[float, float]:
    """The set's accuracy (one net, 300 epochs) and the mean over ``seeds`` random real subsets of its size."""
    train = TrainSettings(epochs=300)
    accuracy = evaluate_set(syn, *test, spec, train, CPU, seed=0, num_nets=1).mean
    random_accs = [
        evaluate_set(random_real_like(syn, images, labels, torch.Generator().manual_seed(s)), *test, spec, train, CPU,
                     seed=0, num_nets=1).mean
        for s in range(seeds)
    ]
    return accuracy, float(np.mean(random_accs))
