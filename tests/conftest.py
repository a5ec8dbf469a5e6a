"""Shared fixtures: the small real datasets the project installs (sklearn digits, Debian Fashion-MNIST)."""

from __future__ import annotations

import pytest
import torch

from fedistill.data import ImageData, load_dataset

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def digits_train() -> ImageData:
    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test() -> ImageData:
    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def fmnist_small() -> ImageData:
    """200 Fashion-MNIST training images (20 per class) from the Debian package files."""
    train = load_dataset("fashion-mnist", "train")
    rows = [i for c in range(10) for i in (train.labels == c).nonzero()[0][:20]]
    return train.subset(rows)
