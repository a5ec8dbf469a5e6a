"""Run directories: one folder per run holding its resolved config, artefacts and metrics.

Every file in a run directory is written atomically (``fedistill.atomic``: temp
file in the same directory, fsync, ``os.replace``), so a crash, a kill or a
serialisation error never leaves a truncated ``metrics.json``, set or
checkpoint behind, and a reader polling a run directory (or a resumed run)
sees either the old file or the new one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedistill.atomic import atomic_path
from fedistill.config import ExperimentConfig


def create_run_dir(output_dir: Path, name: str) -> Path:
    """Create and return ``output_dir/<name>-YYYYmmdd-HHMMSS``, adding ``-1``, ``-2``... if it exists.

    ``mkdir`` without ``exist_ok`` is the uniqueness check, so two runs started
    in the same second (or in parallel processes) never share a directory.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"run name must be a plain file name, got {name!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while True:
        candidate = output_dir / (stem if suffix == 0 else f"{stem}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        return candidate


def _atomic_write(path: Path, write: Callable[[IO[str]], None]) -> Path:
    """Let ``write`` fill a temp file next to ``path`` (UTF-8 text), make it durable, then swap it in."""
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "w", encoding="utf-8") as handle:
        write(handle)
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return _atomic_write(path, lambda handle: handle.write(text))


def _json_default(value: Any) -> Any:
    """Encode what metrics naturally contain besides plain Python values: paths and numpy scalars/arrays."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"write_json: cannot serialise {type(value).__name__} value {value!r}")


def write_json(path: Path, obj: Any) -> Path:
    """Atomically replace ``path`` with ``obj`` as indented JSON; on any error the old file stays."""
    return _atomic_write(path, lambda handle: json.dump(obj, handle, indent=2, default=_json_default, allow_nan=True))


def save_config(run_dir: Path, cfg: ExperimentConfig) -> tuple[Path, Path]:
    """Write the resolved config as ``config.toml`` (loadable with ``load_config``) and ``config.json``.

    The TOML leaves out unset (``None``) values, which TOML cannot express and
    which the loader fills back in as defaults.
    """
    toml_path = write_text(Path(run_dir) / "config.toml", to_toml(cfg.model_dump(mode="json", exclude_none=True)))
    json_path = write_json(Path(run_dir) / "config.json", cfg.model_dump(mode="json"))
    return toml_path, json_path


def to_toml(values: Mapping[str, Any]) -> str:
    """TOML text of a nested mapping of scalars, lists of scalars and sub-tables.

    Written by hand because the config only needs this subset and it keeps the
    library free of a TOML-writer dependency.
    """
    lines: list[str] = []
    _emit_table(values, (), lines)
    return "\n".join(lines).strip("\n") + "\n"


def _emit_table(values: Mapping[str, Any], prefix: tuple[str, ...], lines: list[str]) -> None:
    tables = {key: value for key, value in values.items() if isinstance(value, Mapping)}
    scalars = {key: value for key, value in values.items() if not isinstance(value, Mapping)}
    if prefix and (scalars or not tables):
        lines.append("")
        lines.append(f"[{'.'.join(_toml_key(part) for part in prefix)}]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value, '.'.join((*prefix, key)))}")
    for key, table in tables.items():
        _emit_table(table, (*prefix, key), lines)


def _toml_key(key: str) -> str:
    if key and all(char.isascii() and (char.isalnum() or char in "_-") for char in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any, where: str) -> str:
    """One TOML value; strings reuse JSON escaping, which TOML basic strings share except for a raw DEL."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item, where) for item in value) + "]"
    raise TypeError(f"{where}: cannot write {type(value).__name__} value {value!r} as TOML")
