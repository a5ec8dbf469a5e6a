"""Downloading the public datasets, checked byte for byte with SHA-256.

Checksum sources (all for the files as served by the upstream hosts):
- Fashion-MNIST: tensorflow/datasets url_checksums/fashion_mnist.txt (same
  values in zalandoresearch's README-derived tables and many loaders).
- MNIST: tensorflow/datasets url_checksums/mnist.txt (cvdf mirror); the
  PyTorch ossci mirror serves the same bytes (same sizes and digests).
- CIFAR-10: keras/datasets/cifar10.py (`file_hash` of cifar-10-python.tar.gz).

Debian's dataset-fashion-mnist package re-wrote the gzip headers (no stored
file name, new mtime), so its .gz files have other digests than the download;
their decompressed payloads are identical, see PAYLOAD_SHA256.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedistill.data.catalog import DataError, canonical_name
from fedistill.data.sources import user_cache_dir

USER_AGENT = "fedistill-data-fetch"
TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: its name on the server, size in bytes and SHA-256."""

    filename: str
    size: int
    sha256: str


# Tried in order when a host cannot be reached; a checksum mismatch is never
# retried elsewhere, it is reported.
MIRRORS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            26_421_880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            29_515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            4_422_102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            5_148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    ),
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            9_912_422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            28_881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            1_648_877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            4_542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            170_498_071,
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),
    ),
}

# SHA-256 of the decompressed IDX files. Computed from Debian's
# dataset-fashion-mnist 0.0~git20200523.55506a9-1 and equal to the values
# public loaders record for the official archives, which shows the Debian
# copy holds the official data despite its different .gz bytes.
PAYLOAD_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
}

_NOTHING_TO_FETCH = {
    "digits": "digits ships inside scikit-learn (sklearn.datasets.load_digits), "
    "nothing to download",
    "npz": "npz is your own file (pass its path), there is nothing to download",
}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_valid(path: Path, remote: RemoteFile) -> bool:
    try:
        return path.stat().st_size == remote.size and sha256_file(path) == remote.sha256
    except OSError:
        return False


def _download(url: str, target: Path, remote: RemoteFile, on_bytes: Callable[[int], None]) -> None:
    """Stream `url` into target.part, check size and digest, then rename into place."""
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with (
            urllib.request.urlopen(request, timeout=TIMEOUT_S) as response,
            open(part, "wb") as out,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                on_bytes(len(chunk))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if size != remote.size or actual != remote.sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{target.name} from {url}: checksum mismatch (expected {remote.size} bytes "
            f"sha256 {remote.sha256}, got {size} bytes sha256 {actual}); download removed"
        )
    os.replace(part, target)


def fetch_dataset(
    name: str,
    dest: Path | None = None,
    base_url: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Download a dataset's files into `dest` (default: the user cache) and return that directory.

    Files already present with the right digest are kept. `base_url` replaces
    the upstream hosts (mirrors, tests). `progress(done, total)` gets byte
    counts over all files of the dataset.
    """
    canon = canonical_name(name)
    if canon in _NOTHING_TO_FETCH:
        raise DataError(f"dataset {canon!r}: {_NOTHING_TO_FETCH[canon]}")
    files = REMOTE_FILES[canon]
    bases = (base_url,) if base_url else MIRRORS[canon]
    directory = Path(dest).expanduser() if dest is not None else user_cache_dir(canon)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{directory}: cannot create download directory ({exc.strerror or exc})"
        ) from None

    total = sum(f.size for f in files)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for remote in files:
        target = directory / remote.filename
        if _is_valid(target, remote):
            on_bytes(remote.size)
            continue
        start = done
        errors: list[str] = []
        for base in bases:
            url = base.rstrip("/") + "/" + remote.filename
            try:
                _download(url, target, remote, on_bytes)
                break
            except DataError:
                raise
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    reason: object = f"HTTP {exc.code} {exc.reason}"
                else:
                    reason = getattr(exc, "reason", None) or exc
                errors.append(f"{url} ({reason})")
                done = start
        else:
            raise DataError(f"{remote.filename}: download failed from {'; '.join(errors)}")
    return directory
