"""SyntheticSet round trips through arrays and safetensors, and refuses inconsistent shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedistill.synthetic import SyntheticSet


def make_set(soft: bool = False) -> SyntheticSet:
    labels = torch.tensor([0, 0, 2])
    return SyntheticSet(
        torch.randn(3, 1, 8, 8),
        labels,
        3,
        np.array([5, 0, 7]),
        soft_labels=torch.softmax(torch.randn(3, 3), 1) if soft else None,
        provenance={"method": "dm", "ipc": 2},
    )


@pytest.mark.parametrize("soft", [False, True])
def test_safetensors_round_trip(tmp_path: Path, soft: bool) -> None:
    original = make_set(soft)
    original.save(tmp_path / "set.safetensors")
    loaded = SyntheticSet.load(tmp_path / "set.safetensors")
    assert torch.equal(loaded.images, original.images) and torch.equal(loaded.labels, original.labels)
    assert loaded.source_counts.tolist() == [5, 0, 7] and loaded.provenance == original.provenance
    assert (loaded.soft_labels is None) == (not soft)
    assert loaded.images_per_class().tolist() == [2, 0, 1]


def test_nbytes_counts_payload() -> None:
    assert make_set().nbytes() == 3 * 64 * 4 + 3 * 8 + 3 * 8


def test_inconsistent_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        SyntheticSet(torch.randn(3, 1, 8, 8), torch.tensor([0, 1]), 3, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="source_counts"):
        SyntheticSet(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), 3, np.zeros(2, dtype=np.int64))


def test_loading_a_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, dtype=np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fedistill synthetic set"):
        SyntheticSet.load(tmp_path / "other.safetensors")
