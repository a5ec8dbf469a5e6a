"""The ``fedistill`` command: an end-to-end smoke run, one-line user errors, and dataset info."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedistill.config import load_config
from fedistill.synthetic import SyntheticSet
from launch.cli import app, parse_value

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke-digits.toml"
CONFIGS = sorted((REPO / "configs").glob("*.toml"))

runner = CliRunner()


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in stderr


def test_distill_smoke_config_end_to_end(tmp_path: Path) -> None:
    result = runner.invoke(app, ["distill", str(SMOKE), "--output", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("central-digits-dm-ipc2-")
    syn = SyntheticSet.load(run_dir / "synthetic.safetensors")
    assert len(syn) == 20 and syn.images.shape[1:] == (1, 8, 8)
    grids = sorted(p.name for p in (run_dir / "grids").glob("*.png"))
    assert "grid_all.png" in grids and len(grids) == 11
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["method"], metrics["ipc"], metrics["dataset"], metrics["images"]) == ("dm", 2, "digits", 20)
    assert len(metrics["eval"]["accuracies"]) == 1 and 0.0 <= metrics["eval"]["mean"] <= 1.0
    gains = metrics["gains"]
    assert set(metrics["references"]) == {"start", "random_real"}
    assert gains["accuracy"] == metrics["eval"]["mean"] and gains["start"] == metrics["references"]["start"]["mean"]
    assert gains["gain_over_start_points"] == pytest.approx(100 * (gains["accuracy"] - gains["start"]))
    assert "gain in points:" in result.output and "over its start" in result.output
    assert metrics["bytes"] == syn.nbytes()
    saved = load_config(run_dir / "config.toml")
    assert saved.output_dir == tmp_path and saved.device == "cpu" and saved.distill.ipc == 2


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "distill.ipcc=3"], ("distill.ipcc", "unknown key")),
        (["--set", "distill.ipc=0"], ("distill.ipc",)),
        (["--set", "eval.dsa_strategy=crop_blur"], ("eval.dsa_strategy", "blur")),
        (["--set", "justakey"], ("--set", "key.path=value")),
        (["--method", "nosuch"], ("distill.method", "nosuch")),
        (["--dataset", "svhn"], ("data.name", "svhn")),
        ([str(REPO / "configs" / "missing.toml")], ("missing.toml", "not found")),
    ],
)
def test_bad_settings_print_one_error_line(args: list[str], needles: tuple[str, ...], tmp_path: Path) -> None:
    result = runner.invoke(app, ["distill", *args, "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, *needles)
    assert not any(tmp_path.iterdir())


def test_run_stands_the_set_beside_its_start_alone_and_random_real_images(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedistill run` on 3 digits clients, then its two references; references.json.

    The runs go through the real ServerApp protocol and ClientApp handlers on
    the in-process grid of the protocol tests rather than Ray (three Ray
    launches would take minutes on CI's two cores).
    """
    import launch.simulation
    from server.app import run_protocol
    from tests.fedgrid import LocalGrid, fake_task_identity

    fake_task_identity(monkeypatch)
    monkeypatch.setattr(launch.simulation, "simulate_run", lambda cfg, console, **_: run_protocol(
        LocalGrid(cfg, cfg.partition.num_clients), cfg, console))
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(
        f'output_dir = "{tmp_path}"\ndevice = "cpu"\n[data]\nname = "digits"\n'
        '[partition]\nnum_clients = 3\nalpha = 1.0\nmin_partition_size = 50\n[model]\nwidth = 16\ndepth = 2\n'
        '[distill]\nipc = 2\niterations = 5\ncompile = "off"\n[eval]\nepochs = 5\nnum_nets = 1\n'
        '[federation]\nmin_clients = 3\n'
    )
    result = runner.invoke(app, ["run", str(experiment)])
    assert result.exit_code == 0, result.output
    (run_dir,) = [path for path in tmp_path.glob("fed-*") if (path / "references.json").exists()]
    summary = json.loads((run_dir / "references.json").read_text())
    assert [row["run"] for row in summary["rows"]] == ["distilled", "start alone", "random real"]
    accuracy, start, real = (row["accuracy"] for row in summary["rows"])
    assert summary["gains"]["gain_over_start_points"] == pytest.approx(100 * (accuracy - start))
    assert summary["gains"]["gain_over_random_real_points"] == pytest.approx(100 * (accuracy - real))
    start_config = load_config(Path(summary["rows"][1]["run_dir"]) / "config.toml")
    real_config = load_config(Path(summary["rows"][2]["run_dir"]) / "config.toml")
    assert start_config.distill.iterations == 0 and start_config.distill.method == "dm"
    assert real_config.distill.method == "random" and not real_config.attack.audit
    assert "gain in points:" in result.output and "over its start" in result.output


@pytest.mark.parametrize("command", ["run", "distill"])
def test_a_privacy_target_no_noise_can_meet_is_refused_in_one_line(command: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Target 0.1 is below what the count release alone spends: one line, the key and the floor, nothing run."""
    import launch.simulation

    def no_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the simulation started")

    monkeypatch.setattr(launch.simulation, "simulate_run", no_run)
    args = [command, str(REPO / "configs" / "fed-dp-dm.toml"), "--set", "data.name=digits",
            "--set", "privacy.target_epsilon=0.1", "--set", f"output_dir={tmp_path}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "privacy.target_epsilon = 0.1", "smallest target that works is just above 0.182",
                          "privacy.count_noise_multiplier = 20")
    assert not any(tmp_path.iterdir())


def test_bad_value_in_config_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[eval]\nepochs = "many"\n')
    result = runner.invoke(app, ["distill", str(config)])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "eval.epochs")


def test_data_info_digits() -> None:
    result = runner.invoke(app, ["data", "info", "digits"])
    assert result.exit_code == 0, result.output
    assert "1348 train" in result.stdout and "449 test" in result.stdout


def test_data_errors_are_one_line() -> None:
    result = runner.invoke(app, ["data", "info", "nosuchset"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "nosuchset")
    fetched = runner.invoke(app, ["data", "fetch", "digits"])
    assert fetched.exit_code == 2
    assert_one_error_line(fetched.stderr, "digits")


def test_set_values_parse_as_toml_scalars() -> None:
    assert parse_value("3") == 3
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True
    assert parse_value('"quoted"') == "quoted"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("mnist") == "mnist"
    assert parse_value("/data/sets") == "/data/sets"
    assert parse_value("2024-01-01") == "2024-01-01"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_are_valid(path: Path) -> None:
    load_config(path)


def test_help_works_as_script_and_module() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "distill" in result.stdout and "data" in result.stdout
    module = subprocess.run(
        [sys.executable, "-m", "launch", "distill", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert module.returncode == 0, module.stderr
    assert "--set" in module.stdout and "--eval-epochs" in module.stdout
