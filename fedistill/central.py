"""Centralised distillation: one distiller on the whole training split, then the evaluation protocol.

This is the non-federated baseline every federated result is compared with,
and the smallest end-to-end run of the library (``fedistill distill``). A run
directory receives the resolved config, the set (``synthetic.safetensors``),
class grids, the distillation loss curve and ``metrics.json``. With
``eval.references`` (the default) the set's start alone and a random real
subset of its size are evaluated with the same protocol and seed, and the
gain in points over each is printed and recorded.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedistill.cache import CACHE_DIR
from fedistill.config import ConfigError, ExperimentConfig
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.distill import get_distiller
from fedistill.distill.private import public_start
from fedistill.privacy import ADJACENCY, PrivacyLedger, PrivateData, new_ledger, open_round, secret_generator
from fedistill.privacy_plan import plan_privacy
from fedistill.references import Gains, random_real_like, start_alone
from fedistill.report import plot_curve, save_class_grids
from fedistill.runs import create_run_dir, save_config, write_json
from fedistill.synthetic import SyntheticSet
from fedistill.teacher import soft_label
from fedistill.training import EVAL_SEED_OFFSET, EvalResult, evaluate_set


def _progress_bar(console: Console, with_loss: bool) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if with_loss:
        columns.append(TextColumn("loss {task.fields[loss]:.4g}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process; Linux reports kilobytes, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_central(cfg: ExperimentConfig, console: Console | None = None) -> Path:
    """Distil the training split with ``cfg.distill``, evaluate the set with ``cfg.eval``; return the run directory."""
    console = console or Console()
    try:
        device = pick_device(cfg.device)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if cfg.privacy.enabled:
        plan_privacy(cfg)  # a target no noise can meet is refused before anything is loaded or written
    full_train = load_dataset(cfg.data.name, "train", root=cfg.data.root, path=cfg.data.path)
    test = load_dataset(cfg.data.name, "test", root=cfg.data.root, path=cfg.data.path)
    train = cfg.data.private_train(full_train)
    info = train.info

    run_dir = create_run_dir(cfg.output_dir, f"central-{info.name}-{cfg.distill.method}-ipc{cfg.distill.ipc}")
    save_config(run_dir, cfg)
    console.print(f"run directory: {run_dir}", markup=False, highlight=False)

    images = train.normalized(device)
    labels = torch.from_numpy(train.labels).to(device)
    ledger, privacy = _private_round(cfg, train.labels, info.num_classes)
    private: dict[str, Any] = {} if privacy is None else {"privacy": privacy}
    if privacy is not None and cfg.distill.init == "public":
        budgets = privacy.budgets(cfg.distill.ipc)
        generator = torch.Generator().manual_seed(cfg.seed)
        private["start"] = public_start(cfg.data.public_train(full_train), budgets, generator, device,
                                        cfg.distill.factor)
    del full_train
    distill_settings = cfg.distill.settings(cfg.data.name, cache_dir=Path(cfg.output_dir) / CACHE_DIR)
    distiller = get_distiller(cfg.distill.method)(cfg.model.spec(), distill_settings, device, **private)
    if distiller.needs_teacher():
        console.print(f"teacher: {cfg.distill.teacher_epochs} epochs on {len(train)} images, read from "
                      f"{distill_settings.cache_dir} when an earlier run trained it", markup=False, highlight=False)
    iterations: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    with _progress_bar(console, with_loss=True) as bar:
        task = bar.add_task(f"distill {cfg.distill.method}", total=None, loss=math.nan)

        def on_step(iteration: int, total: int, loss: float) -> None:
            iterations.append(iteration)
            losses.append(float(loss))
            bar.update(task, completed=iteration, total=total, loss=float(loss))

        syn = distiller(images, labels, info.num_classes, seed=cfg.seed, progress=on_step)
    distill_seconds = time.perf_counter() - started
    syn.provenance.setdefault("dataset", info.name)
    syn.save(run_dir / "synthetic.safetensors")
    save_class_grids(syn, info, run_dir / "grids")
    finite = [(x, y) for x, y in zip(iterations, losses, strict=True) if math.isfinite(y)]
    if finite:
        xs, ys = zip(*finite, strict=True)
        plot_curve(xs, ys, "iteration", "distillation loss", run_dir / "distill_loss.png", f"{cfg.distill.method} loss")
    references: dict[str, SyntheticSet | None] = {}
    if cfg.eval.references:
        teacher = {} if distiller.teacher is None else {"teacher": distiller.teacher}
        references["start"] = start_alone(type(distiller), cfg.model.spec(), distill_settings, device, images, labels,
                                          info.num_classes, seed=cfg.seed, **private, **teacher)
        random_real = random_real_like(syn, images, labels, torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET))
        if distiller.teacher is not None and syn.soft_labels is not None:
            random_real = soft_label(random_real, distiller.teacher, distill_settings.temperature)
        references["random_real"] = random_real
    del images, labels  # the evaluation never sees the training split; free its device memory

    settings = cfg.eval.train_settings(cfg.data.name)
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    to_evaluate = {"set": syn, **{name: ref for name, ref in references.items() if ref is not None}}
    results: dict[str, EvalResult] = {}
    with _progress_bar(console, with_loss=False) as bar:
        for name, candidate in to_evaluate.items():
            task = bar.add_task(f"evaluate {name.replace('_', ' ')} ({settings.epochs} epochs per net)",
                                total=cfg.eval.num_nets)
            results[name] = evaluate_set(
                candidate,
                test.normalized(device),
                torch.from_numpy(test.labels),
                cfg.model.spec(),
                settings,
                device,
                seed=eval_seed,
                num_nets=cfg.eval.num_nets,
                progress=lambda done, _total, task=task: bar.update(task, completed=done),
            )
    result = results["set"]
    gains = Gains.of(result, results.get("start"), results.get("random_real")) if references else None

    metrics: dict[str, Any] = {
        "method": cfg.distill.method,
        "ipc": cfg.distill.ipc,
        "dataset": info.name,
        "train_images": len(train),
        "images": len(syn),
        "images_per_class": syn.images_per_class().tolist(),
        "bytes": syn.nbytes(),
        "distill_seconds": distill_seconds,
        "final_distill_loss": losses[-1] if losses else None,
        "eval_seed": eval_seed,
        "eval_dsa_strategy": settings.dsa_strategy,
        "eval_protocol": settings.protocol,
        "factor": syn.factor,
        "decoded_images": len(syn) * syn.factor**2,
        "eval": result.to_dict(),
        "references": {name: results[name].to_dict() if name in results else None for name in references},
        "gains": None if gains is None else gains.to_dict(),
        "device": str(device),
        "torch": torch.__version__,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if device.type == "cuda":
        metrics["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    if ledger is not None:
        spent = ledger.epsilon()
        metrics["privacy"] = {"epsilon": spent.value, "delta": spent.delta, "accountant": spent.accountant,
                              "adjacency": ADJACENCY, "ledger": ledger.to_dict()}
        write_json(run_dir / "privacy.json", metrics["privacy"])
    write_json(run_dir / "metrics.json", metrics)
    console.print(_summary(metrics, results, run_dir, private=privacy is not None))
    if gains is not None:
        console.print(gains.describe(), markup=False, highlight=False)
    if ledger is not None:
        console.print(f"privacy: {ledger.epsilon().describe()} (upper bound)", markup=False, highlight=False)
    return run_dir


def _private_round(
    cfg: ExperimentConfig, labels: np.ndarray, num_classes: int
) -> tuple[PrivacyLedger | None, PrivateData | None]:
    """With ``privacy.enabled``: a fresh ledger and the one round's private inputs (noisy counts released here)."""
    if not cfg.privacy.enabled:
        return None, None
    if cfg.federation.protocol == "fedavg":
        raise ConfigError("federation.protocol 'fedavg' is federated; `fedistill distill` needs a distillation method")
    plan = plan_privacy(cfg)
    ledger = new_ledger(plan)
    generator = secret_generator(cfg.privacy, cfg.seed)
    return ledger, open_round(plan, ledger, labels, num_classes, 1, generator)


def _accuracy(result: EvalResult) -> str:
    return (f"{100 * result.mean:.2f} ± {100 * result.std:.2f} % over {result.num_nets} nets "
            f"({result.epochs} epochs, {result.protocol} protocol)")


def _summary(metrics: dict[str, Any], results: dict[str, EvalResult], run_dir: Path, private: bool) -> Table:
    """A short table of what a reader checks first: size of the set, cost, and accuracy."""
    table = Table(title="central distillation", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("dataset / method", f"{metrics['dataset']} / {metrics['method']}")
    tiles = f" holding {metrics['decoded_images']} (factor {metrics['factor']})" if metrics["factor"] > 1 else ""
    table.add_row("set", f"{metrics['images']} images{tiles} (ipc {metrics['ipc']}), {metrics['bytes']:,} bytes")
    table.add_row("distill time", f"{metrics['distill_seconds']:.1f} s on {metrics['device']}")
    table.add_row("test accuracy", _accuracy(results["set"]))
    if "start" in results:
        table.add_row("its start alone", _accuracy(results["start"]))
    if "random_real" in results:
        note = " (reads private images: not covered by epsilon)" if private else ""
        table.add_row("random real, same size", _accuracy(results["random_real"]) + note)
    table.add_row("run directory", str(run_dir))
    return table
