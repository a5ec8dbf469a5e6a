"""Attack-suite benchmark: Fashion-MNIST, 10 clients, Dirichlet(0.5), IPC 10, one-shot DM, reduced CPU budgets.

Each row is one federated run through Flower's simulation engine (``launch.simulation.simulate_run``,
the path ``fedistill run`` takes) followed by ``fedistill audit`` on its run directory:

- ``clean``: no attack; audit: evasion (PGD-20 and AutoAttack at L-inf 0.1 and 0.2 for the global model, a
  model trained on as many random real images and one trained on all real images) and membership (loss,
  confidence, offline LiRA with shadow runs, nearest neighbour; vs a random real subset of the set's size);
- ``clean-defended``: the same with the server's defence, the price of the defence in clean accuracy;
- ``{naive,doorping}-{1,2}mal``: 1 or 2 malicious clients, defended on the server; the audit gives CTA and ASR
  with the defence (the run) and without it (the same client sets aggregated without the filter);
- ``{fedavg,krum,fedmedian}-{1,2}mal``: the FedAvg baseline under the same malicious clients (poisoning their
  data as NAIVEATTACK does), with Flower's FedAvg, Krum and FedMedian;
- ``dp-eps{1,10}``: the ``clean`` row's run with DP-DM at that epsilon (delta 1e-5) per client; the audit
  runs membership inference and checks its points against the run's e^eps bound.

``python -m benchmarks.bench_attacks run ROW [--record]`` runs one row, writes
``benchmarks/results/attacks/ROW.json`` and (with ``--record``) the issue's headline records that row
yields; ``python -m benchmarks.bench_attacks table`` prints the Markdown tables from the row files.
Budgets are flags; ``--toy`` shrinks them all so the whole pipeline runs in minutes (rows tagged ``-toy``).
"""

from __future__ import annotations

import os

# Under a shared 2-core CPU, OpenMP's default spinning wait made 2-thread training 5x slower than 1 thread;
# a passive wait keeps 2 threads useful. Set before torch loads OpenMP (Ray workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.common import RESULTS, command, hardware, write_result

ROWS_DIR = RESULTS / "attacks"
MALICIOUS = {1: [0], 2: [0, 1]}
"""Partition ids of the malicious clients: client 0 (and client 1); both hold images of the target class."""
TARGET = 0
DEFENSE = "client-outliers"
INITIAL_TARGETS = "initial-image targets"
"""Suffix of the audit's reports whose members are the sets' starting images (``attacks.audit``)."""

DP_ROWS = {
    "dp-eps1": {"epsilon": 1.0},
    "dp-eps10": {"epsilon": 10.0},
}
"""Rows for DP sets: the ``clean`` run with ``dp-dm`` from noise at the epsilon (delta 1e-5) per client; the
audit reads the run's ``privacy.json`` and checks TPR <= e^eps FPR + delta at the reported points."""


def budgets(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "iterations": args.iterations, "eval_epochs": args.eval_epochs, "reference_epochs": args.reference_epochs,
        "fedavg_rounds": args.fedavg_rounds, "num_images": args.num_images, "num_targets": args.num_targets,
        "shadows": args.shadows, "full_real_epochs": args.full_real_epochs, "square_queries": args.square_queries,
        "bootstrap": args.bootstrap, "rate": args.rate,
    }


def row_config(row: str, args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """The experiment of one row (a plain dict for ``fedistill.config.parse_config``)."""
    values: dict[str, Any] = {
        "seed": 0,
        "device": "auto",
        "output_dir": str(output),
        "data": {"name": "fashion-mnist"},
        "partition": {"scheme": "dirichlet", "num_clients": 10, "alpha": 0.5, "min_partition_size": 100},
        "model": {"width": args.width},
        "distill": {"method": "dm", "ipc": 10, "iterations": args.iterations, "batch_real": 64, "dsa": True},
        "eval": {"epochs": args.eval_epochs, "num_nets": 1},
        "federation": {"protocol": "one-shot", "aggregation": "union", "min_clients": 8},
        "attack": {
            "evasion": {"enabled": False},
            "membership": {"enabled": False},
            "defense": {"reference_epochs": args.reference_epochs},
        },
    }
    attack = values["attack"]
    if row == "clean":
        attack["evasion"] = {"attacks": ["pgd", "autoattack"], "epsilons": [0.1, 0.2], "num_images": args.num_images,
                             "pgd_steps": 20, "random_real": True, "full_real": True,
                             "full_real_epochs": args.full_real_epochs, "square_queries": args.square_queries}
        attack["membership"] = {"num_targets": args.num_targets, "shadow_models": args.shadows, "random_real": True,
                                "bootstrap": args.bootstrap}
        return values
    if row in DP_ROWS:
        values["distill"].update(method="dp-dm", init="noise")
        values["privacy"] = {"enabled": True, "target_epsilon": DP_ROWS[row]["epsilon"], "delta": 1e-5,
                             "sample_rate": 0.1, "clip_norm": 1.0, "accountant": "rdp"}
        attack["membership"] = {"num_targets": args.num_targets, "shadow_models": 0, "random_real": True,
                                "bootstrap": args.bootstrap}
        return values
    if row == "clean-defended":
        attack["defense"]["method"] = DEFENSE
        return values
    kind, count = row.rsplit("-", 1)
    malicious = MALICIOUS[int(count.removesuffix("mal"))]
    if kind in ("naive", "doorping"):
        attack["backdoor"] = {"method": kind, "malicious_clients": malicious, "target": TARGET, "rate": args.rate,
                              "trigger": "patch", "patch_size": 3, "position": "bottom-right",
                              "doorping_period": max(1, args.iterations // 10)}
        attack["defense"]["method"] = DEFENSE
        return values
    if kind in ("fedavg", "krum", "fedmedian"):
        values["federation"].update(protocol="fedavg", rounds=args.fedavg_rounds, local_epochs=1, local_lr=0.01,
                                    local_batch=64, fraction_train=1.0)
        attack["backdoor"] = {"method": "naive", "malicious_clients": malicious, "target": TARGET, "rate": args.rate,
                              "trigger": "patch", "patch_size": 3, "position": "bottom-right"}
        if kind != "fedavg":
            attack["defense"] = {"method": kind, "assumed_malicious": len(malicious)}
        return values
    raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")


ROWS = ("clean", "clean-defended", "doorping-2mal", "naive-2mal", "doorping-1mal", "naive-1mal",
        "fedavg-2mal", "krum-2mal", "fedmedian-2mal", "fedavg-1mal", "krum-1mal", "fedmedian-1mal", *DP_ROWS)


def run_row(row: str, args: argparse.Namespace) -> Path:
    from attacks.audit import run_audit
    from fedistill.config import parse_config
    from launch.simulation import simulate_run

    console = Console(stderr=True)
    output = Path(args.output) / row
    config = parse_config(row_config(row, args, output))
    started = time.perf_counter()
    run_dir = simulate_run(config, console)
    run_seconds = time.perf_counter() - started
    audit = run_audit(run_dir, console=console)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    others = other_defenses(run_dir, console) if args.all_defenses and "backdoor" in audit else None
    record = {
        "row": row,
        "budgets": budgets(args),
        "width": args.width,
        "final_accuracy": metrics["final_accuracy"],
        "defense": metrics.get("defense"),
        "run_seconds": run_seconds,
        "audit_seconds": audit["seconds"],
        "audit": {key: audit[key] for key in ("evasion", "backdoor", "membership", "dp_check", "references")
                  if key in audit},
        "other_defenses": others,
        "run_dir": str(run_dir),
        "command": command(),
        "hardware": hardware(),
    }
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    path = ROWS_DIR / f"{row}{args.tag}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    console.print(f"wrote {path}")
    if args.record:
        if args.toy:
            raise SystemExit("--record: headline records come from full-budget rows, not --toy ones")
        record_headlines({row: record})
    return path


def other_defenses(run_dir: Path, console: Console) -> dict[str, Any]:
    """CTA and ASR of the run's client sets under each set defence the server did not run (same seeds)."""
    from attacks.audit import client_sets, malicious_triggers, open_run, train_on
    from attacks.backdoor import backdoor_metrics
    from attacks.defenses import DEFENSES
    from attacks.pixels import PixelModel, to_pixels
    from attacks.defenses import aggregate_round

    run = open_run(run_dir, console=console)
    pixels = to_pixels(run.test, run.device)
    labels = torch.from_numpy(run.test.labels)
    triggers = malicious_triggers(run)
    out = {}
    for name in DEFENSES.names():
        if name == run.config.attack.defense.method:
            continue
        aggregate, report = aggregate_round(client_sets(run), run.config, run.test, run.device, defense=name)
        syn = aggregate.set.to(run.device)
        model = PixelModel(train_on(run, syn.images, syn.labels, run.settings(), aggregate.weights)[0], run.test.info)
        rows = [backdoor_metrics(model, pixels, labels, e["trigger"], run.config.attack.backdoor.target)
                for e in triggers]
        out[name] = {"cta": rows[0]["cta"], "asr_max": max(r["asr"] for r in rows),
                     "removed": report["removed"] if report else None}
        console.print(f"{name}: CTA {100 * out[name]['cta']:.2f}%, ASR {100 * out[name]['asr_max']:.2f}%")
    return out


def load_rows(tag: str) -> dict[str, dict[str, Any]]:
    rows = {}
    for row in ROWS:
        path = ROWS_DIR / f"{row}{tag}.json"
        if path.exists():
            rows[row] = json.loads(path.read_text())
    return rows


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def tables(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown tables for BENCHMARKS.md from the row files."""
    from attacks.audit import membership_points
    from attacks.membership import dp_bound_check

    out: list[str] = []
    clean = rows.get("clean")
    if clean and "evasion" in clean["audit"]:
        names = {"global": "distilled (global model)", "random-real": "random real, same size",
                 "full-real": "all real images"}
        out += ["| model | clean acc (%) | PGD-20 0.1 | PGD-20 0.2 | AutoAttack 0.1 | AutoAttack 0.2 |",
                "|---|---|---|---|---|---|"]
        for model, name in names.items():
            mine = {r["attack"]: r for r in clean["audit"]["evasion"]["rows"] if r["model"] == model}
            if "pgd" not in mine:
                continue
            pgd, auto = mine["pgd"], mine.get("autoattack")
            cells = [pct(pgd["clean_accuracy"]), pct(pgd["accuracy"][0]), pct(pgd["accuracy"][1]),
                     pct(auto["accuracy"][0]) if auto else "–", pct(auto["accuracy"][1]) if auto else "–"]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    backdoor_rows = [(name, r) for name, r in rows.items() if "backdoor" in r["audit"]]
    if backdoor_rows:
        out += ["| row | server | CTA (%) | ASR (%) | CTA without defence | ASR without defence |",
                "|---|---|---|---|---|---|"]
        for name, r in backdoor_rows:
            backdoor = r["audit"]["backdoor"]
            arms = list(backdoor["summary"].values())
            bare = backdoor["summary"].get("without defence")
            server = backdoor["defense"]
            if name.split("-")[0] in ("fedavg", "krum", "fedmedian"):
                server = "FedAvg" if server == "none" else server
            cells = [pct(arms[0]["cta"]), pct(arms[0]["asr_max"]), pct(bare["cta"]) if bare else "–",
                     pct(bare["asr_max"]) if bare else "–"]
            out.append(f"| {name} | {server} | " + " | ".join(cells) + " |")
            for other, values in (r.get("other_defenses") or {}).items():
                out.append(f"| {name} | {other} (same client sets) | {pct(values['cta'])} | "
                           f"{pct(values['asr_max'])} | | |")
        for name in ("clean", "clean-defended"):
            if name in rows:
                server = DEFENSE if name == "clean-defended" else "none"
                out.append(f"| {name} | {server} | {pct(rows[name]['final_accuracy'])} | – | | |")
        out.append("")
    audited = [(name, rows[name]) for name in ("clean", *DP_ROWS) if name in rows and "membership" in rows[name]["audit"]]
    if audited:
        out += ["| row | release | attack | AUC [95% CI] | TPR at 1% FPR [95% CI] | TPR at 0.1% FPR | DP bound at 1% FPR (audit) |",
                "|---|---|---|---|---|---|---|"]
        for name, row in audited:
            bounds = {point["source"]: point["bound"] for point in row["audit"].get("dp_check", {}).get("points", [])}
            for report in row["audit"]["membership"]["reports"]:
                bound = bounds.get(f"{report['target']} {report['attack']} @ FPR 0.01")
                one, tenth = report["tpr_at_fpr"]["0.01"], report["tpr_at_fpr"]["0.001"]
                auc_low, auc_high = report["auc_ci"] or [float("nan")] * 2
                low, high = one["ci"] or [None, None]
                out.append(f"| {name} | {report['target']} | {report['attack']} | {report['auc']:.3f} [{auc_low:.3f}, "
                           f"{auc_high:.3f}] | {pct(one['tpr'])} [{pct(low)}, {pct(high)}] | {pct(tenth['tpr'])} "
                           f"| {pct(bound)} |")
        out.append("")
        for name, row in audited:
            check = row["audit"].get("dp_check", {})
            if "eps" in check:
                recheck = dp_bound_check(check["eps"], check["delta"], membership_points(row["audit"]["membership"]))
                out.append(f"- {name}: the attacks' counts prove epsilon >= {recheck.proven_epsilon:.3g} "
                           f"({100 * recheck.confidence:.0f} % confidence, every point above); ledger epsilon "
                           f"{check['eps']:.4g}: {'VIOLATED' if recheck.violated else 'holds'}")
        out.append("")
    return "\n".join(out)


def record_headlines(rows: dict[str, dict[str, Any]]) -> None:
    """The issue's result ids that ``rows`` (just run, so the records carry their command) yield."""
    note = ("Fashion-MNIST, 10 clients, Dirichlet 0.5, one-shot DM IPC 10 (reduced CPU budgets: {b}); "
            "width-{w} ConvNet-3")
    door = rows.get("doorping-2mal")
    if door:
        summary = door["audit"]["backdoor"]["summary"]
        defended = next(v for k, v in summary.items() if k.startswith("as run"))
        bare = summary["without defence"]
        base = note.format(b=door["budgets"], w=door["width"]) + f"; malicious clients {MALICIOUS[2]}, target {TARGET}"
        write_result("backdoor-doorping-2mal-asr", round(100 * bare["asr_max"], 2), "% ASR (max over the 2 triggers)",
                     base + "; union without defence; ASR on non-target test images")
        write_result("backdoor-doorping-2mal-asr-defended", round(100 * defended["asr_max"], 2),
                     "% ASR (max over the 2 triggers)", base + f"; server defence {DEFENSE}")
        write_result("backdoor-doorping-2mal-cta-drop-defended", round(100 * (bare["cta"] - defended["cta"]), 2),
                     "percentage points of clean test accuracy lost to the defence",
                     base + f"; CTA {100 * bare['cta']:.2f} -> {100 * defended['cta']:.2f} with {DEFENSE}")
    clean = rows.get("clean")
    if clean and "evasion" in clean["audit"]:
        pgd = next(r for r in clean["audit"]["evasion"]["rows"] if r["model"] == "global" and r["attack"] == "pgd")
        write_result("evasion-fmnist-pgd-0.1-distilled-acc", round(100 * pgd["accuracy"][0], 2),
                     "% robust accuracy (PGD-20, L-inf 0.1, pixel space)",
                     note.format(b=clean["budgets"], w=clean["width"])
                     + f"; global model on {pgd['images']} test images, clean {100 * pgd['clean_accuracy']:.2f}%")
    if clean and "membership" in clean["audit"]:
        reports = clean["audit"]["membership"]["reports"]
        initial = [r for r in reports if r["target"].endswith(INITIAL_TARGETS)]
        if initial:
            best = max(initial, key=lambda r: r["tpr_at_fpr"]["0.01"]["tpr"])
            one = best["tpr_at_fpr"]["0.01"]
            write_result("mia-nondp-init-targets-tpr-at-1pct-fpr", round(100 * one["tpr"], 2),
                         "% TPR at 1% FPR (strongest attack; members: the images the sets started from)",
                         note.format(b=clean["budgets"], w=clean["width"])
                         + f"; {best['target']} {best['attack']} (AUC {best['auc']:.3f}; TPR 95% CI {one['ci']}, "
                         f"{best['members']} members vs {best['non_members']} test non-members)")
        synthetic = [r for r in reports if r["target"].startswith("synthetic") and not r["target"].endswith(INITIAL_TARGETS)]
        best = max(synthetic, key=lambda r: r["tpr_at_fpr"]["0.01"]["tpr"])
        one = best["tpr_at_fpr"]["0.01"]
        write_result("mia-nondp-tpr-at-1pct-fpr", round(100 * one["tpr"], 2), "% TPR at 1% FPR (strongest attack)",
                     note.format(b=clean["budgets"], w=clean["width"])
                     + f"; {best['target']} {best['attack']} (AUC {best['auc']:.3f}; TPR 95% CI {one['ci']}, "
                     f"{best['members']} members vs {best['non_members']} test non-members)")
    dp = rows.get("dp-eps1")
    if dp and "membership" in dp["audit"]:
        synthetic = [r for r in dp["audit"]["membership"]["reports"]
                     if r["target"].startswith("synthetic") and not r["target"].endswith(INITIAL_TARGETS)]
        best = max(synthetic, key=lambda r: r["tpr_at_fpr"]["0.01"]["tpr"])
        one = best["tpr_at_fpr"]["0.01"]
        check = dp["audit"].get("dp_check", {})
        write_result("mia-dp-eps1-tpr-at-1pct-fpr", round(100 * one["tpr"], 2), "% TPR at 1% FPR (strongest attack)",
                     note.format(b=dp["budgets"], w=dp["width"]).replace("one-shot DM", "one-shot DP-DM (eps 1, "
                                                                          "delta 1e-5 per client)")
                     + f"; {best['target']} {best['attack']} (AUC {best['auc']:.3f}; TPR 95% CI {one['ci']}); "
                     f"DP bound check: {check.get('status')}, violated: {check.get('violated')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("rows", nargs="*", help=f"rows to run: {', '.join(ROWS)}")
    parser.add_argument("--iterations", type=int, default=100, help="DM iterations per client")
    parser.add_argument("--eval-epochs", type=int, default=50, help="server training epochs on the aggregate")
    parser.add_argument("--reference-epochs", type=int, default=30, help="the defence's reference network")
    parser.add_argument("--fedavg-rounds", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=500, help="test images attacked (evasion)")
    parser.add_argument("--num-targets", type=int, default=2000, help="members and non-members (membership)")
    parser.add_argument("--shadows", type=int, default=4, help="LiRA shadow models")
    parser.add_argument("--full-real-epochs", type=int, default=3)
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0.1, help="share of a malicious client's images poisoned")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--output", default="runs/bench-attacks")
    parser.add_argument("--all-defenses", action="store_true",
                        help="attacked rows: also retrain under every other set defence (same client sets)")
    parser.add_argument("--tag", default="", help="suffix of the row files")
    parser.add_argument("--toy", action="store_true", help="tiny budgets to check the pipeline (tag -toy)")
    parser.add_argument("--record", action="store_true", help="run: also write the headline result records")
    args = parser.parse_args()
    if args.toy:
        args.__dict__.update(iterations=10, eval_epochs=10, reference_epochs=5, fedavg_rounds=1, num_images=100,
                             num_targets=200, shadows=2, full_real_epochs=1, square_queries=50, bootstrap=20,
                             tag=args.tag or "-toy")
    if args.action == "run":
        for row in args.rows or ROWS:
            run_row(row, args)
        return
    print(tables(load_rows(args.tag)))


if __name__ == "__main__":
    main()
