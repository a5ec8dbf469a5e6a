"""fetch_dataset against a throw-away local HTTP server (never the internet)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedistill.data import DataError, fetch, fetch_dataset, load_dataset
from fedistill.data.fetch import RemoteFile


def write_idx_gz(directory: Path, prefix: str, n: int) -> None:
    """Tiny MNIST-format split (gzipped IDX) so fetched files can also be loaded."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for stem, arr, magic in (
        (f"{prefix}-images-idx3-ubyte", images, 2051),
        (f"{prefix}-labels-idx1-ubyte", labels, 2049),
    ):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        (directory / f"{stem}.gz").write_bytes(gzip.compress(header + arr.tobytes()))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base_url, directory) of a threaded HTTP server on 127.0.0.1 with an ephemeral port."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _table(directory: Path) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.iterdir())
    )


@pytest.fixture
def mnist_served(served: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    base, root = served
    for prefix in ("train", "t10k"):
        write_idx_gz(root, prefix, 12)
    monkeypatch.setitem(fetch.REMOTE_FILES, "mnist", _table(root))
    return base, root


def test_fetch_success_and_load(mnist_served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = mnist_served
    dest = tmp_path / "dest"
    seen: list[tuple[int, int]] = []
    out = fetch_dataset(
        "mnist", dest=dest, base_url=base, progress=lambda d, t: seen.append((d, t))
    )
    assert out == dest
    for remote in fetch.REMOTE_FILES["mnist"]:
        assert (dest / remote.filename).read_bytes() == (root / remote.filename).read_bytes()
    assert not list(dest.glob("*.part"))
    total = sum(r.size for r in fetch.REMOTE_FILES["mnist"])
    assert seen[-1] == (total, total)
    assert len(load_dataset("mnist", "train", root=dest)) == 12
    # A second fetch keeps the verified files and does not need the server.
    assert fetch_dataset("mnist", dest=dest, base_url="http://127.0.0.1:9/") == dest


def test_fetch_default_dest_is_user_cache(
    mnist_served: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = mnist_served
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = fetch_dataset("mnist", base_url=base)
    assert out == tmp_path / "xdg" / "fedistill" / "mnist"
    assert len(load_dataset("mnist", "test")) == 12


def test_fetch_checksum_mismatch(
    mnist_served: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = mnist_served
    files = list(fetch.REMOTE_FILES["mnist"])
    bad = RemoteFile(files[1].filename, files[1].size, "0" * 64)
    files[1] = bad
    monkeypatch.setitem(fetch.REMOTE_FILES, "mnist", tuple(files))
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as err:
        fetch_dataset("mnist", dest=dest, base_url=base)
    msg = str(err.value)
    assert bad.filename in msg and "0" * 64 in msg and "mismatch" in msg
    assert not (dest / bad.filename).exists()
    assert not list(dest.glob("*.part"))


def test_fetch_wrong_size(
    mnist_served: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = mnist_served
    first = fetch.REMOTE_FILES["mnist"][0]
    monkeypatch.setitem(
        fetch.REMOTE_FILES, "mnist", (RemoteFile(first.filename, first.size + 1, first.sha256),)
    )
    with pytest.raises(DataError, match=first.filename):
        fetch_dataset("mnist", dest=tmp_path / "dest", base_url=base)
    assert not list((tmp_path / "dest").iterdir())


def test_fetch_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as err:
        fetch_dataset("fashion-mnist", dest=dest, base_url=f"http://127.0.0.1:{port}/")
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert not list(dest.iterdir())


def test_fetch_missing_on_server(mnist_served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = mnist_served
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*404"):
        fetch_dataset("mnist", dest=tmp_path / "dest", base_url=base)


def test_nothing_to_fetch() -> None:
    with pytest.raises(DataError, match="nothing to download"):
        fetch_dataset("digits")
    with pytest.raises(DataError, match="nothing to download"):
        fetch_dataset("npz")


def test_checksum_table_is_complete() -> None:
    for name in ("fashion-mnist", "mnist", "cifar10"):
        assert fetch.MIRRORS[name]
        for remote in fetch.REMOTE_FILES[name]:
            assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0
            assert remote.size > 0
    assert {r.filename for r in fetch.REMOTE_FILES["fashion-mnist"]} == {
        f"{s}.gz" for s in fetch.PAYLOAD_SHA256["fashion-mnist"]
    }
