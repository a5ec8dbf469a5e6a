"""Atomic file replacement: a reader, or a run resumed after a crash, sees the old file or the new one, never half.

Every writer fills a temp file in the target's own directory (so the final
``os.replace`` is a rename within one file system, which POSIX makes atomic),
flushes and fsyncs it, gives it the usual umask permissions, renames it over
the target and fsyncs the directory so the rename itself survives a power cut.
A writer that fails (or a process killed mid-write) leaves at most a hidden
``.NAME.*.tmp`` file behind, never a truncated ``NAME``.

Libraries that only write to a path (safetensors' ``save_file``, matplotlib's
``savefig``) write through :func:`atomic_path`; text and bytes go through
:func:`write_bytes` / :func:`write_text`. This module imports nothing from the
project, so any module (data, report, runs) can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

TEMP_SUFFIX = ".tmp"
"""Temp files end in ``.tmp`` (not the target's suffix) so globs such as ``*.safetensors`` never pick one up."""


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block ends without error, make it durable and swap it in.

    The block must write the file completely to the yielded path (and close
    it). On any exception, ``KeyboardInterrupt`` included, the temp file is
    removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        yield temp
        _fsync_file(temp)
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        handle.write(data)
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"))


def save_tensors(path: Path | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write torch tensors as safetensors (host copies, contiguous), with optional string metadata."""
    from safetensors.torch import save_file

    host = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    path = Path(path)
    with atomic_path(path) as temp:
        save_file(host, str(temp), metadata=dict(metadata) if metadata else None)
    return path


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Atomically write a matplotlib figure; the format comes from ``path``'s suffix (``.png`` by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".") or "png"
    with atomic_path(path) as temp:
        fig.savefig(temp, format=fmt)
    return path


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    """mkstemp creates files 0600; run files should get the usual permissions instead.

    Read from /proc where it exists: ``os.umask`` can only be read by setting
    it, which would briefly change it for every other thread (the simulated
    ServerApp writes from its own thread).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; only POSIX can open a directory for fsync."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
