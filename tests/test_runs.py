"""Run directories: atomic writes, unique names, and a saved config that loads back unchanged."""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedistill.config import ExperimentConfig, load_config, parse_config
from fedistill.runs import create_run_dir, save_config, to_toml, write_json, write_text


def test_failed_json_write_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(TypeError, match="cannot serialise"):
        write_json(target, {"big": list(range(50_000)), "bad": object()})
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_json_encodes_numpy_and_paths(tmp_path: Path) -> None:
    target = write_json(tmp_path / "m.json", {"a": np.float32(0.25), "b": np.arange(3), "c": Path("x/y")})
    assert json.loads(target.read_text()) == {"a": 0.25, "b": [0, 1, 2], "c": "x/y"}


def test_write_text_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "note.txt"
    write_text(target, "first")
    write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["note.txt"]


def test_run_dirs_are_unique_and_named(tmp_path: Path) -> None:
    dirs = [create_run_dir(tmp_path / "runs", "central-digits") for _ in range(3)]
    assert len(set(dirs)) == 3
    assert all(d.is_dir() and d.parent == tmp_path / "runs" for d in dirs)
    for d in dirs:
        assert re.fullmatch(r"central-digits-\d{8}-\d{6}(-\d+)?", d.name)
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="plain file name"):
            create_run_dir(tmp_path, bad)


def test_saved_config_loads_back_equal(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "seed": 7,
            "device": "cpu",
            "output_dir": str(tmp_path / "out"),
            "data": {"name": "digits", "root": "/data/sets", "train_subset": 500},
            "model": {"width": 32, "depth": 2, "norm": "batchnorm"},
            "distill": {"ipc": 3, "iterations": 5, "lr_images": 0.25, "dsa_strategy": "crop_rotate"},
            "eval": {"epochs": 9, "weight_decay": 1e-5, "dsa": True, "num_nets": 2},
        }
    )
    toml_path, json_path = save_config(tmp_path, cfg)
    assert toml_path == tmp_path / "config.toml"
    loaded = load_config(toml_path)
    assert loaded == cfg
    assert ExperimentConfig.model_validate(json.loads(json_path.read_text())) == cfg
    assert load_config(save_config(tmp_path, ExperimentConfig())[0]) == ExperimentConfig()


def test_to_toml_round_trips_awkward_values() -> None:
    values = {
        "text": 'quote " back \\ slash\ttab\nnewline é \x7f',
        "flag": False,
        "count": -3,
        "ratio": 1e-12,
        "big": float("inf"),
        "items": [1, 2, 3],
        "odd key": "x",
        "outer": {"inner": {"deep": 1}, "empty": {}},
    }
    assert tomllib.loads(to_toml(values)) == values
    with pytest.raises(TypeError, match=r"outer\.when"):
        to_toml({"outer": {"when": object()}})


def test_written_files_get_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
