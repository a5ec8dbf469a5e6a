"""Config errors name the key and the allowed values, before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedistill.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_run_config,
    load_config,
    parse_config,
    to_run_config,
)


def test_defaults_are_the_protocol() -> None:
    config = ExperimentConfig()
    assert (config.eval.epochs, config.eval.lr, config.eval.momentum, config.eval.weight_decay) == (300, 0.01, 0.9, 5e-4)
    assert config.eval.batch_size == 256 and config.model.width == 128 and config.model.depth == 3
    assert config.distill.settings("mnist").dsa_strategy == "color_crop_cutout_scale_rotate"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"distill": {"method": "dmm"}}, "distill.method: unknown method 'dmm'; allowed: dc, dm, dp-dm, dp-gm, dsa"),
        ({"distill": {"ipc": 0}}, "distill.ipc:"),
        ({"distill": {"ipcs": 10}}, "distill.ipcs: unknown key"),
        ({"model": {"norm": "layernorm"}}, "model.norm: invalid value 'layernorm'; allowed: 'instancenorm'"),
        ({"data": {"name": "imagenet"}}, "data.name: invalid value 'imagenet'; allowed: 'fashion-mnist'"),
        ({"data": {"name": "npz"}}, "data.path is required"),
        ({"device": "tpu"}, "device: invalid value 'tpu'; allowed: 'auto', 'cpu' or 'cuda'"),
        ({"distill": {"dsa_strategy": "color_warp"}}, "unknown op 'warp'"),
        ({"surprise": 1}, "surprise: unknown key"),
    ],
)
def test_errors_name_key_and_allowed_values(values: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(values)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_load_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text('seed = 3\n[distill]\nmethod = "herding"\nipc = 5\n')
    config = load_config(path, {"distill.ipc": 7, "eval.num_nets": 2})
    assert (config.seed, config.distill.method, config.distill.ipc, config.eval.num_nets) == (3, "herding", 7, 2)


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[distill\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")


def test_overrides_do_not_mutate_input() -> None:
    values = {"distill": {"ipc": 1}}
    merged = apply_overrides(values, {"distill.ipc": 2})
    assert values["distill"]["ipc"] == 1 and merged["distill"]["ipc"] == 2


def test_run_config_round_trip() -> None:
    config = parse_config({"seed": 4, "distill": {"ipc": 3}, "federation": {"aggregation": "class-weighted"}})
    flat = to_run_config(config)
    assert flat["distill.ipc"] == 3 and flat["federation.aggregation"] == "class-weighted"
    assert all(isinstance(value, (str, int, float, bool)) for value in flat.values())
    assert from_run_config(flat) == config


def test_federation_consistency_errors() -> None:
    with pytest.raises(ConfigError, match="federation.protocol: invalid value 'gossip'; allowed: 'one-shot'"):
        parse_config({"federation": {"protocol": "gossip"}})
    with pytest.raises(ConfigError, match="rounds must be >= 2 for protocol 'multi-round'"):
        parse_config({"federation": {"protocol": "multi-round"}})
    with pytest.raises(ConfigError, match="rounds must be 1 for protocol 'one-shot', got 5"):
        parse_config({"federation": {"rounds": 5}})
    with pytest.raises(ConfigError, match="soft_labels needs protocol 'multi-round'"):
        parse_config({"federation": {"protocol": "fedavg", "soft_labels": True}})
    with pytest.raises(ConfigError, match="aggregate_window > 1 needs protocol 'multi-round'"):
        parse_config({"federation": {"aggregate_window": 3}})
    with pytest.raises(ConfigError, match="federation.aggregate_window: Input should be greater than or equal to 1"):
        parse_config({"federation": {"protocol": "multi-round", "rounds": 2, "aggregate_window": 0}})
    with pytest.raises(ConfigError, match="client_start = 'fresh' needs protocol 'multi-round'"):
        parse_config({"federation": {"client_start": "fresh"}})
    with pytest.raises(ConfigError, match="federation.client_start: invalid value 'new'; allowed: 'previous' or 'fresh'"):
        parse_config({"federation": {"protocol": "multi-round", "rounds": 2, "client_start": "new"}})
    with pytest.raises(ConfigError, match="federation.fraction_train: Input should be less than or equal to 1"):
        parse_config({"federation": {"protocol": "fedavg", "fraction_train": 1.5}})
    with pytest.raises(ConfigError, match="federation.server_ipc is required"):
        parse_config({"federation": {"aggregation": "redistill"}})
    with pytest.raises(ConfigError, match="federation.aggregation: invalid value 'mean'"):
        parse_config({"federation": {"aggregation": "mean"}})


def test_config_accepts_every_registered_aggregation_rule() -> None:
    from fedistill.aggregation import available_aggregators

    for rule in available_aggregators():
        parse_config({"federation": {"aggregation": rule, "server_ipc": 1}})
