"""Public data for private runs: a small in-distribution pool or an out-of-distribution dataset, never chosen by private data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from fedistill.central import run_central
from fedistill.config import ConfigError, DataConfig, parse_config
from fedistill.data import ImageData, load_dataset
from fedistill.synthetic import SyntheticSet


def test_a_small_pool_is_fixed_public_images_whatever_the_private_data(digits_train: ImageData) -> None:
    config = DataConfig(name="digits", train_subset=1000, public_size=100)
    pool = config.public_train(digits_train)
    assert len(pool) == 100 and pool.info == digits_train.info
    rest = digits_train.images[1000:].reshape(len(digits_train) - 1000, -1)
    for image in pool.images.reshape(100, -1):
        assert (rest == image).all(axis=1).any()  # every pool image is a public (rest) image
    changed = ImageData(digits_train.images.copy(), digits_train.labels, digits_train.info)
    changed.images[:1000] = 255 - changed.images[:1000]  # other private data: the same pool
    assert np.array_equal(config.public_train(changed).images, pool.images)
    assert len(DataConfig(name="digits", train_subset=1000).public_train(digits_train)) == len(digits_train) - 1000


def test_digits_are_an_out_of_distribution_pool_shaped_like_fashion_mnist(fmnist_small: ImageData) -> None:
    pool = DataConfig(name="fashion-mnist", public="digits", public_size=50).public_train(fmnist_small)
    assert pool.images.shape == (50, 1, 28, 28) and pool.info == fmnist_small.info
    assert set(pool.labels.tolist()) <= set(range(10)) and pool.images.max() > 100
    digits = load_dataset("digits", "train")
    order = np.random.default_rng(0).permutation(len(digits))
    first = np.sort(order[:50])[0]
    resized = F.interpolate(torch.from_numpy(digits.images[first : first + 1]).float(), size=(28, 28),
                            mode="bilinear", antialias=True, align_corners=False)
    assert np.array_equal(pool.images[0], resized.round().clamp(0, 255).to(torch.uint8).numpy()[0])
    assert pool.labels[0] == digits.labels[first]


def test_public_data_configs_name_the_key() -> None:
    private = {"privacy": {"enabled": True}, "distill": {"method": "dp-dm", "init": "public"}}
    with pytest.raises(ConfigError, match="data.public 'digits' is the private dataset itself"):
        parse_config({**private, "data": {"name": "digits", "public": "digits"}})
    with pytest.raises(ConfigError, match=r"data.public_size is read only with distill.init = 'public'"):
        parse_config({"data": {"public_size": 100}})
    with pytest.raises(ConfigError, match="set data.train_subset"):
        parse_config({**private, "data": {"name": "fashion-mnist"}})
    ood = parse_config({**private, "data": {"name": "fashion-mnist", "public": "digits", "public_size": 100}})
    assert ood.data.public == "digits" and ood.data.train_subset is None  # no private split is given up


def test_a_central_private_run_starts_from_the_small_pool_only(tmp_path: Path, digits_train: ImageData) -> None:
    config = parse_config({
        "output_dir": str(tmp_path),
        "data": {"name": "digits", "train_subset": 1000, "public_size": 20},
        "model": {"width": 16, "depth": 2},
        "distill": {"method": "dp-dm", "ipc": 2, "iterations": 0, "init": "public", "compile": "off"},
        "eval": {"epochs": 2, "num_nets": 1, "references": False},
        "privacy": {"enabled": True, "target_epsilon": 5.0},
    })
    syn = SyntheticSet.load(run_central(config, Console(quiet=True)) / "synthetic.safetensors")
    pool = config.data.public_train(digits_train).normalized().flatten(1)
    public = [image for image in syn.images.flatten(1) if torch.cdist(image[None], pool).min() < 1e-5]
    assert 0 < len(public) == syn.provenance["public_images"] <= 20  # the rest of the start is noise
