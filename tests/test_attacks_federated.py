"""Attacks inside federated runs (malicious clients, server defences, robust aggregators) and `fedistill audit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from safetensors.torch import load_file
from typer.testing import CliRunner

import clients.app
from attacks.audit import AuditError, run_audit
from attacks.backdoor import trigger_path
from clients.app import load_partition, partition_rows
from fedistill.config import ConfigError, ExperimentConfig, from_run_config, load_config, parse_config, to_run_config
from fedistill.data import load_dataset
from fedistill.runs import save_config
from fedistill.synthetic import SyntheticSet
from launch.cli import app
from server.baselines import run_baseline
from server.compare import baseline_config
from server.distillation import run_distillation
from tests.fedgrid import LocalGrid, fake_task_identity

runner = CliRunner()


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_task_identity(monkeypatch)


def attacked_config(output: Path, **attack: Any) -> ExperimentConfig:
    """3 digits clients, client 1 malicious (NAIVEATTACK, 30% of its images), cheap audit settings."""
    return parse_config(
        {
            "seed": 1,
            "device": "cpu",
            "output_dir": str(output),
            "data": {"name": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": 3, "alpha": 1.0, "min_partition_size": 50},
            "model": {"width": 16, "depth": 2},
            "distill": {"method": "dm", "ipc": 3, "iterations": 5, "batch_real": 32, "compile": "off"},
            "eval": {"epochs": 20, "num_nets": 1},
            "federation": {"min_clients": 2},
            "attack": {
                "backdoor": {"method": "naive", "malicious_clients": [1], "target": 0, "rate": 0.3, "patch_size": 2},
                "evasion": {"attacks": ["fgsm", "pgd"], "num_images": 64, "pgd_steps": 5},
                "membership": {"num_targets": 100, "bootstrap": 20},
                **attack,
            },
        }
    )


def spy_on(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    original = getattr(clients.app, name)

    def spy(config: ExperimentConfig, data: Any, *args: Any, **kwargs: Any) -> Any:
        seed = kwargs.get("seed", args[1] if len(args) > 1 else None)
        # The node's seed is seed * 1_000_003 + partition * 1009 + round (clients.app.train); round 1 here.
        calls.append({"data": data, "partition": (seed - config.seed * 1_000_003 - 1) // 1009, **kwargs})
        return original(config, data, *args, **kwargs)

    monkeypatch.setattr(clients.app, name, spy)
    return calls


def assert_only_client_1_poisoned(config: ExperimentConfig, calls: list[dict[str, Any]]) -> None:
    assert sorted(call["partition"] for call in calls) == [0, 1, 2]
    for call in calls:
        pid, data = call["partition"], call["data"]
        clean = load_partition(config, pid, 3)
        changed = np.flatnonzero((data.images != clean.images).any(axis=(1, 2, 3)) | (data.labels != clean.labels))
        if pid == 1:
            assert len(changed) == round(0.3 * len(clean)) and (data.labels[changed] == 0).all()
            outside = np.ones((8, 8), dtype=bool)
            outside[6:, 6:] = False
            assert (data.images[changed][:, :, outside] == clean.images[changed][:, :, outside]).all()
            if config.attack.backdoor.method == "naive":  # DOORPING's patch starts from random pixels
                assert (data.images[changed][:, :, 6:, 6:] == 255).all()
        else:
            assert len(changed) == 0, f"honest client {pid} got poisoned data"


def test_malicious_clients_poison_only_their_own_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = attacked_config(tmp_path, backdoor={"method": "doorping", "malicious_clients": [1], "rate": 0.3,
                                                 "patch_size": 2, "doorping_period": 2, "doorping_steps": 2})
    calls = spy_on(monkeypatch, "distill_partition")
    run_distillation(LocalGrid(config, 3), config)
    assert_only_client_1_poisoned(config, calls)
    assert [call["on_iteration"] is not None for call in calls] == [False, True, False]
    assert trigger_path(config, 1).exists() and not trigger_path(config, 0).exists()
    fit_config = attacked_config(tmp_path, backdoor={"method": "naive", "malicious_clients": [1], "rate": 0.3,
                                                     "patch_size": 2})
    values = fit_config.model_dump(mode="json", exclude_none=True)
    values["federation"].update(protocol="fedavg", rounds=1, local_batch=32)
    fit_config = parse_config(values)
    fits = spy_on(monkeypatch, "fit_partition")
    run_baseline(LocalGrid(fit_config, 3), fit_config)
    assert_only_client_1_poisoned(fit_config, fits)


def test_krum_and_fedmedian_aggregate_like_their_definitions(tmp_path: Path) -> None:
    replies: list[dict[str, np.ndarray]] = []

    def record(reply: Message) -> Message:
        replies.append({k: a.numpy().copy() for k, a in reply.content.array_records["arrays"].items()})
        return reply

    for method in ("krum", "fedmedian"):
        replies.clear()
        values = attacked_config(tmp_path).model_dump(mode="json", exclude_none=True)
        values["federation"].update(protocol="fedavg", rounds=1, local_batch=32)
        values["attack"]["defense"] = {"method": method, "assumed_malicious": 1}
        values["partition"]["num_clients"] = 4  # one partition per node: a reply claiming a fourth is rejected
        config = parse_config(values)
        run_dir = run_baseline(LocalGrid(config, 4, {node: record for node in range(101, 105)}), config)
        final = {k: v.numpy() for k, v in load_file(str(run_dir / "global_model.safetensors")).items()}
        assert json.loads((run_dir / "metrics.json").read_text())["defense"] == method and len(replies) == 4
        if method == "krum":
            assert sum(all(np.array_equal(r[k], final[k]) for k in final) for r in replies) == 1
        else:
            key = "classifier.weight"
            assert np.allclose(final[key], np.median(np.stack([r[key] for r in replies]), axis=0), atol=1e-6)


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One-shot digits run with a malicious client, filtered by the class-outliers defence on the server."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = 1
    try:
        config = attacked_config(tmp_path_factory.mktemp("attacked"),
                                 defense={"method": "class-outliers", "reference_epochs": 10})
        return run_distillation(LocalGrid(config, 3), config)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_server_defence_is_applied_and_reported(attacked_run: Path) -> None:
    metrics = json.loads((attacked_run / "metrics.json").read_text())
    (report,) = metrics["defense"]
    assert report["method"] == "class-outliers" and report["clients"] == ["partition-0000", "partition-0001", "partition-0002"]
    uploaded = sum(len(load_file(str(p))["labels"]) for p in (attacked_run / "clients").glob("*.safetensors"))
    assert metrics["aggregate_images"] == uploaded - sum(report["removed"])
    assert [sum(row) for row in report["removed_per_class"]] == report["removed"]


def test_audit_end_to_end(attacked_run: Path) -> None:
    result = runner.invoke(app, ["audit", str(attacked_run), "--set", "attack.membership.random_real=true"])
    assert result.exit_code == 0, result.output
    audit = json.loads((attacked_run / "audit.json").read_text())
    evasion = {(row["model"], row["attack"]): row for row in audit["evasion"]["rows"]}
    assert set(evasion) == {("global", "fgsm"), ("global", "pgd"), ("random-real", "fgsm"), ("random-real", "pgd")}
    pgd = evasion[("global", "pgd")]
    assert pgd["epsilons"] == [0.1, 0.2, 0.3] and pgd["accuracy"][-1] <= pgd["accuracy"][0] <= pgd["clean_accuracy"]
    backdoor = audit["backdoor"]
    assert [row["arm"] for row in backdoor["rows"]] == ["as run (defence: class-outliers)", "without defence"]
    non_target = int((load_dataset("digits", "test").labels != 0).sum())
    assert non_target < 450 and all(row["asr_images"] == non_target for row in backdoor["rows"])
    assert all(0 <= row["asr"] <= 1 and 0.2 < row["cta"] <= 1 for row in backdoor["rows"])
    # The malicious client's own record of its trigger is found from the run's config.toml.
    recorded = trigger_path(load_config(attacked_run / "config.toml"), 1)
    assert backdoor["triggers"] == [{"client": 1, "source": str(recorded)}] and recorded.exists()
    targets = {(r["target"], r["attack"]) for r in audit["membership"]["reports"]}
    assert {("synthetic (global model)", "loss"), ("synthetic (set)", "nn-distance"),
            ("random-real (set)", "nn-distance")} <= targets
    real_set = next(r for r in audit["membership"]["reports"] if r["target"] == "random-real (set)")
    assert real_set["auc"] == 1.0  # released real images are found exactly
    assert audit["dp_check"]["status"].startswith("no privacy ledger")
    # Worst-case targets: the rows the honest clients' sets recorded as their starting images.
    config = load_config(attacked_run / "config.toml")
    sets = {path.stem: SyntheticSet.load(path) for path in sorted((attacked_run / "clients").glob("*.safetensors"))}
    assert "init_rows" not in sets["partition-0001"].provenance  # the poisoned client's rows are not the split's
    for partition in (0, 2):
        syn = sets[f"partition-{partition:04d}"]
        rows = syn.provenance["init_rows"]
        assert len(rows) == len(syn) and set(rows) <= set(partition_rows(config, partition, 3).tolist())
    by_target = {(r["target"], r["attack"]): r for r in audit["membership"]["reports"]}
    initial = by_target[("synthetic (set), initial-image targets", "nn-distance")]
    honest = len(sets["partition-0000"]) + len(sets["partition-0002"])
    assert initial["members"] == honest and initial["auc"] > 0.9  # 5 iterations leave the starting images findable
    assert initial["auc"] > by_target[("synthetic (set)", "nn-distance")]["auc"]
    assert ("synthetic (global model), initial-image targets", "loss") in by_target
    for name in ("robust_accuracy.png", "backdoor.png", "roc.png", "triggered_examples.png"):
        assert (attacked_run / "audit" / name).stat().st_size > 0
    assert "audit: " in result.output and "membership" in result.output


def test_audit_flags_a_dp_violation_loudly(attacked_run: Path) -> None:
    (attacked_run / "privacy.json").write_text(json.dumps({"worst_epsilon": 0.0, "delta": 0.0}))
    try:
        result = runner.invoke(app, ["audit", str(attacked_run), "--set", "attack.evasion.enabled=false",
                                     "--set", "attack.backdoor.method=none", "--set", "attack.membership.random_real=false",
                                     "--set", "attack.membership.num_targets=350"])
    finally:
        (attacked_run / "privacy.json").unlink()
    audit = json.loads((attacked_run / "audit.json").read_text())
    check = audit["dp_check"]
    # Synthetic images start from real ones: their nearest members are found far above TPR = FPR.
    assert check["status"] == "checked" and check["violated"] and result.exit_code == 3
    assert any(p["proven_epsilon"] > 0.5 and "nn-distance" in p["source"] for p in check["points"])
    assert check["proven_epsilon"] > 0.5 and check["confidence"] == 0.95
    assert "DP BOUND VIOLATED" in result.output and "evasion" not in audit


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "attack.evasion.attacks=[\"pgdd\"]"], ("attack.evasion.attacks.0", "pgdd", "'autoattack'")),
        (["--set", "attack.evasion.epsilons=[8]"], ("attack.evasion.epsilons", "pixel units")),
        (["--set", "attack.backdoor.target=12"], ("attack.backdoor.target", "not a class of digits")),
        (["--set", "attack.membership.num_targets=0"], ("attack.membership.num_targets",)),
        (["--set", "attack.defense.method=krum"], ("attack.defense.method", "allowed: none, spectral")),
        (["--set", "data.name=mnist"], ("--set data.name", "attack.* keys only")),
    ],
)
def test_bad_audit_settings_give_one_clear_line(attacked_run: Path, args: list[str], needles: tuple[str, ...]) -> None:
    result = runner.invoke(app, ["audit", str(attacked_run), *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_audit_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished federated run directory (no config.toml)" in result.stderr


def test_run_audits_at_the_end_when_the_config_asks(attacked_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import launch.simulation

    config = attacked_config(tmp_path, audit=True, evasion={"enabled": False}, membership={"enabled": False})
    save_config(tmp_path, config)
    monkeypatch.setattr(launch.simulation, "simulate_run", lambda cfg, console, **_: attacked_run)
    (attacked_run / "audit.json").unlink(missing_ok=True)
    result = runner.invoke(app, ["run", str(tmp_path / "config.toml")])
    assert result.exit_code == 0, result.output
    assert "backdoor" in json.loads((attacked_run / "audit.json").read_text())


def test_attack_config_round_trips_through_flowers_run_config() -> None:
    config = parse_config({"attack": {"backdoor": {"method": "naive", "malicious_clients": [0, 3]},
                                      "evasion": {"epsilons": [0.1, 0.2]}}})
    flat = to_run_config(config)
    assert flat["attack.backdoor.malicious_clients"] == [0, 3] and flat["attack.evasion.pgd_steps"] == 20
    assert from_run_config(flat) == config
    # Under `flwr run --run-config` lists travel as comma-separated strings.
    from_string = from_run_config({**flat, "attack.backdoor.malicious_clients": "0, 3"})
    assert from_string.attack.backdoor.malicious_clients == [0, 3]
    with pytest.raises(ConfigError, match="attack.backdoor.malicious_clients: needs at least one partition id"):
        parse_config({"attack": {"backdoor": {"method": "doorping"}}})
    with pytest.raises(ConfigError, match=r"attack.backdoor.malicious_clients: \[10\] outside the partition ids 0..9"):
        parse_config({"attack": {"backdoor": {"method": "naive", "malicious_clients": [10]}}})
    with pytest.raises(ConfigError, match="doorping optimises its trigger"):
        parse_config({"distill": {"method": "herding"},
                      "attack": {"backdoor": {"method": "doorping", "malicious_clients": [0]}}})
    with pytest.raises(ConfigError, match="'spectral' filters synthetic sets; for protocol 'fedavg'"):
        parse_config({"federation": {"protocol": "fedavg"}, "attack": {"defense": {"method": "spectral"}}})
    # `fedistill run --against fedavg` keeps the malicious clients and drops a set filter FedAvg cannot apply.
    defended = parse_config({"attack": {"defense": {"method": "spectral"},
                                        "backdoor": {"method": "naive", "malicious_clients": [0]}}})
    baseline = baseline_config(defended, "fedavg", 10**7)
    assert baseline.attack.defense.method == "none" and baseline.attack.backdoor.malicious() == (0,)
    # ... and the canary audit, which only the distillation run's release can answer (make demo plants canaries).
    audited = parse_config({"attack": {"canary": {"count": 500, "client": 0}}})
    assert baseline_config(audited, "fedavg", 10**7).attack.canary.count == 0
    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml")
    assert demo.attack.canary.count > 0
    assert baseline_config(demo, "fedavg", 10**7).federation.protocol == "fedavg"


def test_fedistill_audit_reports_the_canary_bound(attacked_run: Path) -> None:
    result = runner.invoke(app, ["audit", str(attacked_run), "--set", "attack.canary.count=100",
                                      "--set", "attack.evasion.enabled=false", "--set", "attack.backdoor.method=none",
                                      "--set", "attack.membership.enabled=false"])
    assert result.exit_code == 0, result.output
    canary = json.loads((attacked_run / "audit.json").read_text())["canary"]
    assert canary["canaries"] == 100 and canary["client"] == 0 and canary["claimed_epsilon"] is None
    assert "dp canary" in result.output and "not private" in result.output
    with pytest.raises(AuditError, match="attack.canary.count"):
        run_audit(attacked_run, {"attack.canary.count": 100, "attack.evasion.enabled": False,
                                 "attack.backdoor.method": "none", "attack.membership.enabled": False})
