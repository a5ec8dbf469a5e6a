"""Like-for-like comparisons of a distillation run: with a weight-averaging baseline, and with its references.

A baseline runs on the same partitions, model and test split as the run it is
compared with, for as many rounds as fit in the same upload budget: a FedAvg
round uploads one model per sampled client, a distillation run uploads the
clients' sets. At least one round always runs, so when a single FedAvg round
already costs more than the whole distillation run, the table says so.

The references (``reference_configs``) are the same run at zero iterations
(every client's set is its start alone) and the same run with the ``random``
coreset (each client sends random real images, as many per class as a set
holds), both trained and evaluated by the server exactly as the run was. A
private run's random-real reference is not private: it says what the
privacy costs, and is labelled so.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from fedistill.attack_config import SET_DEFENSES
from fedistill.config import MTT_KEYS, ExperimentConfig, parse_config
from fedistill.data import dataset_info
from fedistill.distill import get_distiller
from fedistill.models import build_model
from fedistill.references import Gains

BASELINES = ("fedavg", "fedprox")
START_ALONE = "start alone"
RANDOM_REAL = "random real"
DISTILLATION_PROTOCOLS = ("one-shot", "multi-round")


def model_bytes(config: ExperimentConfig) -> int:
    """Bytes of one model's weights as sent in a message (float32 state dict)."""
    info = dataset_info(config.data.name, config.data.path)
    model = build_model(config.model.spec(), (info.channels, info.height, info.width), info.num_classes)
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def clients_per_round(config: ExperimentConfig) -> int:
    """Nodes a baseline round samples: Flower's ``int(nodes * fraction_train)``, at least ``min_clients``."""
    nodes = config.partition.num_clients
    return min(nodes, max(int(nodes * config.federation.fraction_train), config.federation.min_clients))


def equal_upload_rounds(upload_bytes: int, config: ExperimentConfig) -> int:
    """Baseline rounds whose total upload does not exceed ``upload_bytes`` (at least one)."""
    per_round = model_bytes(config) * clients_per_round(config)
    return max(1, math.floor(upload_bytes / per_round))


def baseline_config(config: ExperimentConfig, protocol: str, upload_bytes: int) -> ExperimentConfig:
    """``config`` turned into the ``protocol`` baseline at the distillation run's upload budget."""
    if protocol not in BASELINES:
        raise ValueError(f"--against: unknown baseline {protocol!r}; allowed: {', '.join(BASELINES)}")
    values = config.model_dump(mode="json")
    values["federation"].update(protocol=protocol, rounds=1, soft_labels=False)
    if values["attack"]["defense"]["method"] in SET_DEFENSES:
        values["attack"]["defense"]["method"] = "none"  # set filters have no FedAvg counterpart: plain FedAvg
    values["attack"]["canary"]["count"] = 0  # the canary audit probes the distillation run's release, not the baseline
    rounds = equal_upload_rounds(upload_bytes, parse_config(values))
    values["federation"]["rounds"] = rounds
    return parse_config(values)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def comparison_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per run: protocol, rounds, total upload and final global accuracy."""
    rows = []
    for run_dir in run_dirs:
        metrics = read_metrics(run_dir)
        rows.append(
            {
                "protocol": metrics["protocol"],
                "rounds": len(metrics["rounds"]),
                "upload_bytes": metrics["upload_bytes"],
                "accuracy": metrics["rounds"][-1]["accuracy"],
                "seconds": sum(record["seconds"] for record in metrics["rounds"]),
                "run_dir": str(run_dir),
            }
        )
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="global test accuracy at comparable upload")
    for column in ("protocol", "rounds", "upload (MiB)", "accuracy (%)", "seconds"):
        table.add_column(column, justify="left" if column == "protocol" else "right")
    for row in rows:
        table.add_row(
            row["protocol"],
            str(row["rounds"]),
            f"{row['upload_bytes'] / 2**20:.2f}",
            f"{100 * row['accuracy']:.2f}",
            f"{row['seconds']:.0f}",
        )
    return table


def reference_configs(config: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The reference runs of a distillation run: its start alone (zero iterations) and random real images.

    None for the weight-averaging protocols, no start for methods that select
    real images. The references are not audited.
    """
    if config.federation.protocol not in DISTILLATION_PROTOCOLS:
        return {}
    values = config.model_dump(mode="json")
    values["attack"]["audit"] = False
    references = {}
    if get_distiller(config.distill.method).refines:
        start = copy.deepcopy(values)
        start["distill"]["iterations"] = 0
        references[START_ALONE] = parse_config(start)
    real = copy.deepcopy(values)
    real["distill"].update(method="random", init="real", factor=1)  # as many whole images as the set stores
    for key in MTT_KEYS:
        real["distill"].pop(key, None)  # the method's own keys; the coreset refuses them
    real["privacy"]["enabled"] = False
    if real["federation"]["aggregation"] == "redistill":
        real["federation"]["aggregation"] = "union"  # re-distilling random real images would be another method
    references[RANDOM_REAL] = parse_config(real)
    return references


def final_accuracy(run_dir: Path) -> float:
    return float(read_metrics(run_dir)["rounds"][-1]["accuracy"])


def reference_rows(run_dir: Path, references: dict[str, Path], private: bool) -> dict[str, Any]:
    """The run's final accuracy beside its references' and the gain in points (``references.json``)."""
    accuracy = final_accuracy(run_dir)
    start = references.get(START_ALONE)
    real = references.get(RANDOM_REAL)
    gains = Gains(accuracy, None if start is None else final_accuracy(start), None if real is None else final_accuracy(real))
    rows = [{"run": "distilled", "accuracy": accuracy, "run_dir": str(run_dir)}]
    rows += [{"run": name, "accuracy": final_accuracy(path), "run_dir": str(path)} for name, path in references.items()]
    note = "random real images are not private: the reference says what privacy costs" if private else ""
    return {"rows": rows, "gains": gains.to_dict(), "describe": gains.describe(), "note": note}


def reference_table(summary: dict[str, Any]) -> Table:
    table = Table(title="what distillation adds (final global test accuracy)")
    for column in ("run", "accuracy (%)", "run directory"):
        table.add_column(column, justify="right" if column == "accuracy (%)" else "left")
    for row in summary["rows"]:
        table.add_row(row["run"], f"{100 * row['accuracy']:.2f}", row["run_dir"])
    if summary["note"]:
        table.caption = summary["note"]
    return table
