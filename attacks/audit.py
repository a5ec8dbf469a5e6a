"""``fedistill audit RUN_DIR``: the configured attacks on a finished run, written as ``audit.json`` and plots.

The audit reads the run directory (resolved config, global model, aggregate
and client sets, metrics, a DP ledger when there is one) and runs, as the
run's ``[attack]`` section (plus ``--set attack.*`` overrides) asks:

- evasion: robust accuracy of the global model and of reference models trained
  with the same protocol on as many random real images (class-matched) and on
  all the clients' real data;
- backdoor: CTA and ASR of the global model for each malicious client's
  trigger, and, when the server ran a set defence, of the same run without it
  (the clients' sets aggregated again without the filter, the global network
  retrained with the server's seed);
- membership: loss, confidence and (with shadow models) offline LiRA against
  the global model, nearest-neighbour distance against the set, the same
  against a random real subset of the set's size; members are the clients'
  images, non-members test images;
- the DP bound at the reported points when the run carries a privacy ledger;
- with ``attack.canary.count``, the one-run canary audit of one client's
  release (``attacks.canary``): an empirical epsilon beside the ledger's.

Randomness comes from the run's seed, so an audit repeats.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch import nn

from attacks.backdoor import Trigger, backdoor_metrics, configured_trigger, trigger_path
from attacks.canary import Releaser, canary_audit
from attacks.defenses import aggregate_round
from attacks.evasion import EVASION, robust_accuracy
from attacks.membership import (
    REPORTED_FPRS,
    ConfidenceAttack,
    LossAttack,
    MembershipAttack,
    NearestNeighbour,
    OfflineLiRA,
    dp_bound_check,
    read_privacy,
)
from attacks.pixels import PixelModel, to_pixels
from attacks.plots import plot_backdoor, plot_robust_accuracy, plot_roc, plot_triggered
from fedistill.aggregation import ClientSet
from fedistill.config import ConfigError, ExperimentConfig, load_config
from fedistill.data import ImageData, denormalize, load_dataset, partition_dataset
from fedistill.device import pick_device
from fedistill.distill import get_distiller
from fedistill.models import build_model
from fedistill.runs import write_json
from fedistill.synthetic import SyntheticSet
from fedistill.training import EVAL_SEED_OFFSET, TrainSettings, evaluate_set

log = logging.getLogger("fedistill.attacks")

AUDIT_DIR = "audit"
DISTILLATION = ("one-shot", "multi-round")
SHADOW_SEED_OFFSET = 50_021
TARGET_SEED_OFFSET = 17


class AuditError(ConfigError):
    """A run directory the audit cannot use, or an audit setting it cannot honour; one line."""


@dataclass
class AuditRun:
    """What the audit reads from a run directory, plus reference models trained on demand (cached)."""

    run_dir: Path
    config: ExperimentConfig
    recorded: ExperimentConfig
    metrics: dict[str, Any]
    device: torch.device
    train: ImageData
    test: ImageData
    aggregate: SyntheticSet | None
    global_model: nn.Module
    console: Console
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return self.config.federation.protocol

    @property
    def seed(self) -> int:
        return self.config.seed

    def settings(self, epochs: int | None = None) -> TrainSettings:
        base = self.config.eval.train_settings(self.config.data.name)
        if epochs is None:
            return base
        return TrainSettings(epochs, base.lr, base.momentum, base.weight_decay, base.batch_size, base.dsa_strategy)


def open_run(run_dir: Path, overrides: dict[str, Any] | None = None, console: Console | None = None) -> AuditRun:
    """Load a finished run for auditing; ``overrides`` may only set ``attack.*`` keys."""
    run_dir = Path(run_dir)
    for name in ("config.toml", "metrics.json", "global_model.safetensors"):
        if not (run_dir / name).exists():
            raise AuditError(f"{run_dir}: not a finished federated run directory (no {name})")
    foreign = [key for key in overrides or {} if not key.startswith("attack.")]
    if foreign:
        raise AuditError(f"--set {foreign[0]}: the audit takes attack.* keys only; the rest is the run's own config")
    recorded = load_config(run_dir / "config.toml")
    config = load_config(run_dir / "config.toml", overrides or {})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("status") != "completed":
        raise AuditError(f"{run_dir}: the run did not complete (status {metrics.get('status')!r})")
    try:
        device = pick_device(config.device)
    except (RuntimeError, ValueError) as error:
        raise AuditError(str(error)) from None
    data = config.data
    train = data.private_train(load_dataset(data.name, "train", root=data.root, path=data.path))
    test = load_dataset(data.name, "test", root=data.root, path=data.path)
    info = test.info
    part = config.partition
    partitioning = partition_dataset(
        train.labels, info.num_classes, part.scheme, part.num_clients, alpha=part.alpha,
        classes_per_client=part.classes_per_client, shards_per_client=part.shards_per_client,
        min_partition_size=part.min_partition_size, seed=config.seed,
    )
    held = np.unique(np.concatenate([rows for rows in partitioning.indices if rows.size]))
    model = build_model(config.model.spec(), info.shape, info.num_classes)
    model.load_state_dict(load_file(str(run_dir / "global_model.safetensors")))
    aggregate_path = run_dir / "aggregate.safetensors"
    aggregate = SyntheticSet.load(aggregate_path) if aggregate_path.exists() else None
    return AuditRun(run_dir, config, recorded, metrics, device, train.subset(held), test, aggregate,
                    model.to(device).eval(), console or Console())


# ------------------------------------------------------------------ reference models


def train_on(run: AuditRun, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings,
             weights: torch.Tensor | None = None) -> tuple[nn.Module, float]:
    """A fresh network trained with the evaluation protocol on normalised images (the server's seed); test accuracy."""
    info = run.test.info
    syn = SyntheticSet(images, labels, info.num_classes, np.bincount(labels.cpu().numpy(), minlength=info.num_classes))
    kept: list[nn.Module] = []
    result = evaluate_set(
        syn, run.test.normalized(run.device), torch.from_numpy(run.test.labels), run.config.model.spec(), settings,
        run.device, seed=run.seed + EVAL_SEED_OFFSET, num_nets=1, sample_weights=weights,
        on_model=lambda _, model: kept.append(model),
    )
    return kept[0].eval(), result.mean


def class_matched_rows(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                       exclude: np.ndarray | None = None) -> np.ndarray:
    """Random rows with ``counts[c]`` images of each class c (fewer where the pool lacks them), none from
    ``exclude``."""
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[exclude] = False
    rows = [rng.choice(np.flatnonzero(allowed & (labels == c)), min(int(n), int((allowed & (labels == c)).sum())),
                       replace=False) for c, n in enumerate(counts) if n > 0]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def random_real(run: AuditRun) -> tuple[nn.Module, np.ndarray, float]:
    """The model trained on as many random real client images as the aggregate has, per class; its rows; accuracy."""
    if "random-real" not in run.cache:
        assert run.aggregate is not None
        rng = np.random.default_rng(run.seed + TARGET_SEED_OFFSET)
        rows = class_matched_rows(run.train.labels, run.aggregate.images_per_class(), rng)
        run.console.print(f"audit: training the random-real reference on {len(rows)} real images")
        data = run.train.subset(rows)
        model, accuracy = train_on(run, data.normalized(run.device), torch.from_numpy(data.labels).to(run.device),
                                   run.settings())
        run.cache["random-real"] = (model, rows, accuracy)
    return run.cache["random-real"]


def full_real(run: AuditRun) -> tuple[nn.Module, float]:
    """The model trained on all the clients' real data for ``attack.evasion.full_real_epochs`` epochs."""
    if "full-real" not in run.cache:
        epochs = run.config.attack.evasion.full_real_epochs
        run.console.print(f"audit: training the full-real reference on {len(run.train)} images for {epochs} epochs")
        model, accuracy = train_on(run, run.train.normalized(run.device),
                                   torch.from_numpy(run.train.labels).to(run.device), run.settings(epochs))
        run.cache["full-real"] = (model, accuracy)
    return run.cache["full-real"]


# ------------------------------------------------------------------ evasion


def audit_evasion(run: AuditRun) -> dict[str, Any]:
    """Robust accuracy of the global model and the references over the configured attacks and radii."""
    cfg = run.config.attack.evasion
    name = run.config.data.name
    order = np.random.default_rng(run.seed + TARGET_SEED_OFFSET).permutation(len(run.test))[: cfg.num_images]
    subset = run.test.subset(order)
    pixels, labels = to_pixels(subset, run.device), torch.from_numpy(subset.labels)
    models: list[tuple[str, nn.Module]] = [("global", run.global_model)]
    if cfg.random_real and run.aggregate is not None:
        models.append(("random-real", random_real(run)[0]))
    if cfg.full_real:
        models.append(("full-real", full_real(run)[0]))
    params = {
        "pgd": {"steps": cfg.pgd_steps},
        "cw": {"c": cfg.cw_c, "steps": cfg.cw_steps},
        "autoattack": {"num_classes": run.test.info.num_classes, "square_queries": cfg.square_queries},
        "fgsm": {},
    }
    rows = []
    for model_name, model in models:
        wrapped = PixelModel(model, run.test.info)
        for attack in cfg.attack_names():
            radii = cfg.l2_radii(name) if EVASION.get(attack).norm == "L2" else cfg.linf_radii(name)
            started = time.perf_counter()
            row = robust_accuracy(wrapped, pixels, labels, attack, radii, seed=run.seed, batch_size=cfg.batch_size,
                                  **params[attack])
            row.update(model=model_name, params=params[attack], seconds=time.perf_counter() - started)
            rows.append(row)
            run.console.print(
                f"audit: evasion {model_name} {attack}: "
                + ", ".join(f"{eps:g} -> {100 * acc:.1f}%" for eps, acc in zip(row["epsilons"], row["accuracy"]))
            )
    plot = plot_robust_accuracy(rows, run.run_dir / AUDIT_DIR / "robust_accuracy.png")
    return {"images": len(order), "pixel_space": True, "rows": rows, "plot": str(plot.relative_to(run.run_dir))}


# ------------------------------------------------------------------ backdoor


def malicious_triggers(run: AuditRun) -> list[dict[str, Any]]:
    """Each malicious client's trigger: the one it recorded (DOORPING's optimised one), else the configured one."""
    backdoor = run.config.attack.backdoor
    out = []
    for pid in backdoor.malicious():
        path = trigger_path(run.recorded, pid)
        if path.exists():
            out.append({"client": pid, "trigger": Trigger.load(path), "source": str(path)})
        else:
            source = "configured trigger"
            if backdoor.method == "doorping" and run.protocol in DISTILLATION:
                source += f" (no record of the optimised one at {path})"
                log.warning("audit: client %d's DOORPING trigger not found at %s; using the configured one", pid, path)
            trigger = configured_trigger(backdoor, run.test.info, run.seed)
            out.append({"client": pid, "trigger": trigger, "source": source})
    return out


def client_sets(run: AuditRun) -> list[ClientSet]:
    """The last round's accepted client sets, as the server saved them before any defence."""
    rounds = sorted(run.run_dir.glob("round-*"))
    directory = run.run_dir / "clients" if (run.run_dir / "clients").is_dir() else (rounds[-1] if rounds else None)
    if directory is None:
        raise AuditError(f"{run.run_dir}: no client sets saved (clients/ or round-*/)")
    sets = [ClientSet(path.stem, SyntheticSet.load(path).decoded()) for path in sorted(directory.glob("partition-*.safetensors"))]
    if not sets:
        raise AuditError(f"{directory}: no client sets (partition-*.safetensors)")
    return sets


def initial_rows(run: AuditRun) -> np.ndarray:
    """Training rows the clients' sets started from, as their replies recorded them (``init_rows``), every round."""
    paths = sorted(run.run_dir.glob("clients/partition-*.safetensors")) + sorted(
        run.run_dir.glob("round-*/partition-*.safetensors"))
    rows = [np.asarray(SyntheticSet.load(path).provenance.get("init_rows", []), dtype=np.int64) for path in paths]
    found = np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
    return found[(found >= 0) & (found < len(run.train))]


def undefended_model(run: AuditRun) -> tuple[nn.Module, float]:
    """The global network the server would have trained on the last round without the defence (same seed)."""
    aggregate, _ = aggregate_round(client_sets(run), run.config, run.test, run.device, defense="none")
    syn = aggregate.set.to(run.device)
    return train_on(run, syn.images, syn.labels, run.settings(), aggregate.weights)


def audit_backdoor(run: AuditRun) -> dict[str, Any]:
    """CTA and ASR per trigger, for the run as it ran and (with a set defence) without the defence."""
    backdoor = run.config.attack.backdoor
    defense = run.config.attack.defense.method
    triggers = malicious_triggers(run)
    pixels, labels = to_pixels(run.test, run.device), torch.from_numpy(run.test.labels)
    arms: list[tuple[str, nn.Module]] = [(f"as run (defence: {defense})", run.global_model)]
    if defense != "none" and run.protocol in DISTILLATION:
        run.console.print("audit: retraining the global network without the defence")
        arms.append(("without defence", undefended_model(run)[0]))
    rows = []
    for arm, model in arms:
        wrapped = PixelModel(model, run.test.info)
        for entry in triggers:
            metrics = backdoor_metrics(wrapped, pixels, labels, entry["trigger"], backdoor.target)
            rows.append({"arm": arm, "trigger": f"client {entry['client']}", **metrics})
            run.console.print(f"audit: backdoor {arm}, client {entry['client']}'s trigger: "
                              f"CTA {100 * metrics['cta']:.2f}%, ASR {100 * metrics['asr']:.2f}%")
    directory = run.run_dir / AUDIT_DIR
    plots = [plot_backdoor(rows, directory / "backdoor.png")]
    examples = np.flatnonzero(run.test.labels != backdoor.target)[:8]
    clean = to_pixels(run.test.subset(examples))
    plots.append(plot_triggered(clean, [(f"client {e['client']}", e["trigger"](clean)) for e in triggers],
                                directory / "triggered_examples.png"))
    for entry in triggers:
        entry["trigger"].save(directory / f"trigger-client-{entry['client']}.safetensors")
    summary = {}
    for arm, _ in arms:
        mine = [row for row in rows if row["arm"] == arm]
        summary[arm] = {"cta": mine[0]["cta"], "asr_max": max(r["asr"] for r in mine),
                        "asr_mean": float(np.mean([r["asr"] for r in mine]))}
    return {
        "method": backdoor.method,
        "malicious_clients": list(backdoor.malicious()),
        "target": backdoor.target,
        "rate": backdoor.rate,
        "trigger": backdoor.trigger,
        "triggers": [{"client": e["client"], "source": e["source"]} for e in triggers],
        "defense": defense,
        "rows": rows,
        "summary": summary,
        "asr_counts": "test images whose true class is not the target (BackdoorBench)",
        "plots": [str(p.relative_to(run.run_dir)) for p in plots],
    }


# ------------------------------------------------------------------ membership


def shadow_distilled(run: AuditRun, pool: np.ndarray, index: int) -> nn.Module:
    """A shadow of the run: half of ``pool`` split among the run's number of clients, each part distilled as the
    clients did, aggregated by the server's rule (no defence), the network trained with the evaluation protocol."""
    config, info = run.config, run.test.info
    seed = run.seed + SHADOW_SEED_OFFSET + index
    rng = np.random.default_rng(seed)
    data = run.train.subset(np.sort(rng.choice(pool, len(pool) // 2, replace=False)))
    part = config.partition
    try:
        partitioning = partition_dataset(
            data.labels, info.num_classes, part.scheme, part.num_clients, alpha=part.alpha,
            classes_per_client=part.classes_per_client, shards_per_client=part.shards_per_client,
            min_partition_size=min(part.min_partition_size, len(data) // (2 * part.num_clients)), seed=seed,
        )
    except ValueError as error:
        raise AuditError(f"attack.membership.shadow_models: cannot partition a shadow's data ({error})") from None
    distiller = get_distiller(config.distill.method)(config.model.spec(), config.distill.settings(config.data.name),
                                                     run.device)
    clients = []
    for client, rows in enumerate(partitioning.indices):
        if rows.size == 0:
            continue
        mine = data.subset(rows)
        syn = distiller(mine.normalized(run.device), torch.from_numpy(mine.labels), info.num_classes,
                        seed=seed * 1009 + client)
        clients.append(ClientSet(f"{client:04d}", syn))
    aggregate, _ = aggregate_round(clients, config, run.test, run.device, defense="none")
    syn = aggregate.set.to(run.device)
    return train_on(run, syn.images, syn.labels, run.settings(), aggregate.weights)[0]


def shadow_random_real(run: AuditRun, pool: np.ndarray, counts: np.ndarray, index: int) -> nn.Module:
    """A shadow of the random-real reference: a fresh class-matched random subset of ``pool``, same protocol."""
    rng = np.random.default_rng(run.seed + SHADOW_SEED_OFFSET + index)
    exclude = np.setdiff1d(np.arange(len(run.train)), pool)
    data = run.train.subset(class_matched_rows(run.train.labels, counts, rng, exclude))
    return train_on(run, data.normalized(run.device), torch.from_numpy(data.labels).to(run.device), run.settings())[0]


def _candidates(run: AuditRun, data: ImageData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    subset = data.subset(rows)
    return to_pixels(subset, run.device), torch.from_numpy(subset.labels)


def _attack_all(run: AuditRun, target: str, attacks: list[MembershipAttack], members: tuple, non_members: tuple
                ) -> list[dict[str, Any]]:
    cfg = run.config.attack.membership
    reports = []
    for attack in attacks:
        report = {"target": target, **attack(members, non_members, bootstrap=cfg.bootstrap, seed=run.seed)}
        reports.append(report)
        one = report["tpr_at_fpr"]["0.01"]
        run.console.print(f"audit: membership {target} {attack.name}: AUC {report['auc']:.3f}, "
                          f"TPR {100 * one['tpr']:.2f}% at FPR {100 * one['fpr']:.2f}%")
    return reports


def audit_membership(run: AuditRun) -> dict[str, Any]:
    """Membership attacks on the released set (and its global model) and on a random real subset of its size."""
    cfg = run.config.attack.membership
    info = run.test.info
    rng = np.random.default_rng(run.seed + TARGET_SEED_OFFSET + 1)
    count = min(cfg.num_targets, len(run.train), len(run.test))
    member_rows = rng.choice(len(run.train), count, replace=False)
    non_member_rows = rng.choice(len(run.test), count, replace=False)
    members, non_members = _candidates(run, run.train, member_rows), _candidates(run, run.test, non_member_rows)
    notes = []
    label = "synthetic" if run.protocol in DISTILLATION else run.protocol
    attacks: list[MembershipAttack] = [LossAttack(PixelModel(run.global_model, info)),
                                       ConfidenceAttack(PixelModel(run.global_model, info))]
    if cfg.shadow_models >= 2 and run.protocol in DISTILLATION:
        pool = np.setdiff1d(np.arange(len(run.train)), member_rows)
        shadows = []
        for index in range(cfg.shadow_models):
            run.console.print(f"audit: shadow {index + 1}/{cfg.shadow_models} of the run (distil and train)")
            shadows.append(PixelModel(shadow_distilled(run, pool, index), info))
        attacks.append(OfflineLiRA(PixelModel(run.global_model, info), shadows))
    elif cfg.shadow_models >= 2:
        notes.append(f"LiRA skipped: shadows of protocol {run.protocol!r} are not implemented")
    elif cfg.shadow_models == 1:
        notes.append("LiRA skipped: needs at least 2 shadow models")
    reports = _attack_all(run, f"{label} (global model)", attacks, members, non_members)
    if run.aggregate is not None:
        released = denormalize(run.aggregate.images, info).to(run.device)
        reports += _attack_all(run, f"{label} (set)", [NearestNeighbour(released)], members, non_members)
    if cfg.random_real and run.aggregate is not None:
        model, rows, _ = random_real(run)
        picked = rng.choice(rows, min(count, len(rows)), replace=False)
        real_members = _candidates(run, run.train, picked)
        real_non_members = _candidates(run, run.test, rng.choice(len(run.test), len(picked), replace=False))
        real_attacks: list[MembershipAttack] = [LossAttack(PixelModel(model, info)),
                                                ConfidenceAttack(PixelModel(model, info))]
        if cfg.shadow_models >= 2:
            pool = np.setdiff1d(np.arange(len(run.train)), rows)
            counts = np.bincount(run.train.labels[rows], minlength=info.num_classes)
            shadows = [PixelModel(shadow_random_real(run, pool, counts, index), info)
                       for index in range(cfg.shadow_models)]
            real_attacks.append(OfflineLiRA(PixelModel(model, info), shadows))
        reports += _attack_all(run, "random-real (model)", real_attacks, real_members, real_non_members)
        subset = to_pixels(run.train.subset(rows), run.device)
        reports += _attack_all(run, "random-real (set)", [NearestNeighbour(subset)], real_members, real_non_members)
    reports += _initial_image_targets(run, attacks[:2], label, count, notes)
    plot = plot_roc(reports, run.run_dir / AUDIT_DIR / "roc.png")
    return {"members": "clients' training images", "non_members": "test images", "reports": reports,
            "notes": notes, "plot": str(plot.relative_to(run.run_dir))}


def _initial_image_targets(run: AuditRun, model_attacks: list[MembershipAttack], label: str, count: int,
                           notes: list[str]) -> list[dict[str, Any]]:
    """The worst case: members are the images the sets started from (random members rarely are), reported apart."""
    rows = initial_rows(run)
    if rows.size == 0 or run.aggregate is None:
        notes.append("no initial-image targets: no set recorded real starting images (noise or public starts)")
        return []
    rng = np.random.default_rng(run.seed + TARGET_SEED_OFFSET + 2)
    picked = rng.choice(rows, min(count, len(rows)), replace=False)
    members = _candidates(run, run.train, picked)
    non_members = _candidates(run, run.test, rng.choice(len(run.test), len(picked), replace=False))
    released = denormalize(run.aggregate.decoded().images, run.test.info).to(run.device)
    return (_attack_all(run, f"{label} (global model), initial-image targets", model_attacks, members, non_members)
            + _attack_all(run, f"{label} (set), initial-image targets", [NearestNeighbour(released)], members,
                          non_members))


def membership_points(membership: dict[str, Any]) -> list[tuple[str, float, float, int, int]]:
    """Every reported (FPR, TPR) point of the attacks on the released set, with its member counts, for the DP check."""
    points = []
    for report in membership["reports"]:
        if report["target"].startswith("random-real"):
            continue
        for key, value in report["tpr_at_fpr"].items():
            points.append((f"{report['target']} {report['attack']} @ FPR {key}", value["fpr"], value["tpr"],
                           report["members"], report["non_members"]))
    return points


def audit_dp(run: AuditRun, membership: dict[str, Any] | None) -> dict[str, Any]:
    """The (eps, delta) bound at every reported point of the attacks on the released set; loud when violated."""
    ledger = read_privacy(run.run_dir)
    if ledger is None:
        return {"status": "no privacy ledger in the run directory (no privacy.json: the run was not private)"}
    eps, delta, source = ledger
    if membership is None:
        return {"status": "membership audit disabled; nothing to check", "eps": eps, "delta": delta}
    check = dp_bound_check(eps, delta, membership_points(membership))
    result = {"status": "checked", "ledger": source, **check.to_dict()}
    for point in check.points:
        if point.proven_epsilon > eps:
            log.error("DP BOUND VIOLATED: %s: TPR %.4f at FPR %.4f (%d members, %d non-members) proves epsilon >= "
                      "%.3g at %.0f%% confidence, above the claimed %.3g (delta %.3g)", point.source, point.tpr,
                      point.fpr, point.members, point.non_members, point.proven_epsilon, 100 * check.confidence,
                      eps, delta)
    return result


def audit_canary(run: AuditRun, release_for: CanaryRelease | None) -> dict[str, Any]:
    """The one-run canary audit of ``attack.canary.client``'s round-1 release, canaries drawn from the test split."""
    cfg = run.config.attack.canary
    if release_for is None:
        raise AuditError("attack.canary.count: the canary audit re-runs a client's release; use `fedistill audit`")
    run.console.print(f"audit: canary audit, {cfg.count} canaries into client {cfg.client}'s release (one run)")
    data, release = release_for(run.config, cfg.client, run.device)
    return {"client": cfg.client, **canary_audit(data, run.test, release, cfg.count, run.seed, run.device,
                                                 cfg.significance)}


# ------------------------------------------------------------------ the command

CanaryRelease = Callable[[ExperimentConfig, int, torch.device], tuple[ImageData, Releaser]]
"""A client's data and its release (``clients.app.canary_release``), given by the caller: this floor has no Flower."""


def run_audit(run_dir: Path, overrides: dict[str, Any] | None = None, console: Console | None = None,
              canary_release: CanaryRelease | None = None) -> dict[str, Any]:
    """Audit a run directory; writes ``audit.json`` and ``audit/*.png`` there and returns the audit."""
    console = console or Console()
    started = time.perf_counter()
    run = open_run(run_dir, overrides, console)
    attack = run.config.attack
    console.print(f"audit of {run.run_dir} ({run.protocol}, {run.config.data.name}) on {run.device}")
    audit: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "protocol": run.protocol,
        "dataset": run.config.data.name,
        "seed": run.seed,
        "device": str(run.device),
        "attack_config": attack.model_dump(mode="json"),
        "global_accuracy": run.metrics.get("final_accuracy"),
    }
    if attack.evasion.enabled:
        audit["evasion"] = audit_evasion(run)
    if attack.backdoor.method != "none":
        audit["backdoor"] = audit_backdoor(run)
    if attack.membership.enabled:
        audit["membership"] = audit_membership(run)
    audit["dp_check"] = audit_dp(run, audit.get("membership"))
    if attack.canary.count:
        audit["canary"] = audit_canary(run, canary_release)
    if "random-real" in run.cache:
        audit["references"] = {"random-real": {"images": len(run.cache["random-real"][1]),
                                               "accuracy": run.cache["random-real"][2]}}
    if "full-real" in run.cache:
        audit.setdefault("references", {})["full-real"] = {"images": len(run.train),
                                                           "accuracy": run.cache["full-real"][1]}
    audit["seconds"] = time.perf_counter() - started
    write_json(run.run_dir / "audit.json", audit)
    console.print(audit_table(audit))
    if dp_violated(audit):
        console.print("DP BOUND VIOLATED: an attack proves a larger epsilon than the ledger's; see dp_check and "
                      "canary in audit.json", style="bold red", markup=False)
    return audit


def audit_table(audit: dict[str, Any]) -> Table:
    """The short table printed after an audit (and at the end of `make demo`)."""
    table = Table(title=f"audit: {Path(audit['run_dir']).name}")
    for column in ("part", "what", "result"):
        table.add_column(column)
    for row in audit.get("evasion", {}).get("rows", []):
        values = ", ".join(f"{eps:g}: {100 * acc:.1f}%" for eps, acc in zip(row["epsilons"], row["accuracy"]))
        table.add_row("evasion", f"{row['model']} {row['attack']} ({row['norm']})",
                      f"clean {100 * row['clean_accuracy']:.1f}%; {values}")
    backdoor = audit.get("backdoor")
    if backdoor:
        for arm, values in backdoor["summary"].items():
            table.add_row("backdoor", f"{backdoor['method']}, {arm}",
                          f"CTA {100 * values['cta']:.2f}%, ASR {100 * values['asr_max']:.2f}% (max over triggers)")
    for report in audit.get("membership", {}).get("reports", []):
        one = report["tpr_at_fpr"]["0.01"]
        table.add_row("membership", f"{report['target']} {report['attack']}",
                      f"AUC {report['auc']:.3f}, TPR@1%FPR {100 * one['tpr']:.2f}%")
    dp = audit["dp_check"]
    if "violated" not in dp:
        verdict = dp["status"]
    else:
        proven = (f"attacks prove epsilon >= {dp['proven_epsilon']:.3g} ({100 * dp['confidence']:.0f}% confidence); "
                  f"claimed {dp['eps']:.4g} at delta {dp['delta']:g}")
        verdict = ("VIOLATED: " if dp["violated"] else "holds: ") + proven
    table.add_row("dp bound", "TPR <= e^eps FPR + delta", verdict)
    canary = audit.get("canary")
    if canary:
        claimed = "not private" if canary["claimed_epsilon"] is None else f"ledger eps {canary['claimed_epsilon']:.4g}"
        table.add_row("dp canary", f"one run, {canary['canaries']} canaries into client {canary['client']}",
                      ("VIOLATED: " if canary["violated"] else "") + f"empirical eps >= "
                      f"{canary['epsilon_lower_bound']:.3g} ({100 * (1 - canary['significance']):.0f}%); {claimed}")
    return table


def dp_violated(audit: dict[str, Any]) -> bool:
    """Whether the membership check or the canary audit proves more epsilon than the ledger claims."""
    return bool(audit["dp_check"].get("violated") or audit.get("canary", {}).get("violated"))


__all__ = ["REPORTED_FPRS", "AuditError", "AuditRun", "CanaryRelease", "audit_table", "dp_violated", "membership_points",
           "open_run", "run_audit"]
