"""Shared helpers for benchmark scripts: hardware description and result records."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from fedistill.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def hardware() -> str:
    """CPU model and core count, or the GPU name, as the record's ``hardware`` field."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def command() -> str:
    """The command line as typed from the repository root (``python -m benchmarks.NAME ...``)."""
    module = f"benchmarks.{Path(sys.argv[0]).stem}"
    return " ".join(["python", "-m", module, *(shlex.quote(arg) for arg in sys.argv[1:])])


def write_result(result_id: str, value: float, unit: str, notes: str) -> Path:
    """Write ``benchmarks/results/<id>.json`` in the project's record format."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "id": result_id,
        "value": value,
        "unit": unit,
        "command": command(),
        "hardware": hardware(),
        "date": dt.date.today().isoformat(),
        "notes": notes,
    }
    path = RESULTS / f"{result_id}.json"
    write_text(path, json.dumps(record, indent=2) + "\n")
    return path
