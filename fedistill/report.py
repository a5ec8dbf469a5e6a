"""Plots of synthetic sets and training curves, written as PNG files.

Figures are built with matplotlib's object API on an Agg canvas rather than
``pyplot``: no global figure state, no GUI backend, nothing ever shown, and a
library import does not switch the backend of a user's notebook. Images are
tiled into one mosaic per figure (one ``imshow``) instead of one axes per
image, which keeps IPC 50 grids fast to draw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedistill.atomic import save_figure
from fedistill.data import DatasetInfo, denormalize
from fedistill.synthetic import SyntheticSet

GRID_COLUMNS = 10
CELL_INCHES = 0.6
PAD_PIXELS = 1
DPI = 100


def _mosaic(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] row-major into one (rows*H, columns*W[, C]) array, white gaps between."""
    count, channels, height, width = images.shape
    cell_h, cell_w = height + PAD_PIXELS, width + PAD_PIXELS
    canvas = np.ones((rows * cell_h - PAD_PIXELS, columns * cell_w - PAD_PIXELS, channels), dtype=np.float32)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * cell_h, column * cell_w
        canvas[top : top + height, left : left + width] = images[index].transpose(1, 2, 0)
    return canvas[..., 0] if channels == 1 else canvas


def _save_mosaic(
    canvas: np.ndarray, rows: int, columns: int, title: str, path: Path, row_labels: Sequence[str] = ()
) -> Path:
    """Draw a mosaic with a title and, when given, one label per row of cells on the left; returns ``path``."""
    margin = 1.2 if row_labels else 0.0
    fig = Figure(figsize=(max(3.0, columns * CELL_INCHES) + margin, max(1.5, rows * CELL_INCHES) + 0.5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels:
        cell = (canvas.shape[0] + PAD_PIXELS) / rows
        ax.set_yticks([row * cell + (cell - PAD_PIXELS - 1) / 2 for row in range(rows)])
        ax.set_yticklabels(list(row_labels))
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)


def _slug(text: str) -> str:
    """File-name-safe form of a class name (e.g. ``T-shirt/top`` -> ``t-shirt-top``)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def save_class_grids(syn: SyntheticSet, info: DatasetInfo, out_dir: Path) -> list[Path]:
    """One PNG per class present in ``syn`` plus ``grid_all.png`` (one row per class), in pixel space.

    Images are mapped back from the normalised space with the dataset's
    statistics, so what is drawn is what the set would look like as pixels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(syn) == 0:
        return []
    pixels = denormalize(syn.images.detach().to("cpu", torch.float32), info).numpy()
    labels = syn.labels.detach().cpu().numpy()
    digits = len(str(max(syn.num_classes - 1, 0)))
    paths: list[Path] = []
    per_class: list[np.ndarray] = []
    names: list[str] = []
    for cls in (int(c) for c in np.unique(labels)):
        images = pixels[labels == cls]
        name = info.class_names[cls] if cls < len(info.class_names) else str(cls)
        per_class.append(images)
        names.append(name)
        columns = min(len(images), GRID_COLUMNS)
        rows = math.ceil(len(images) / columns)
        slug = _slug(name)
        stem = f"class_{cls:0{digits}d}" if slug == str(cls) else f"class_{cls:0{digits}d}_{slug}"
        path = out_dir / f"{stem}.png"
        title = f"class {cls}: {name} ({len(images)} images)"
        paths.append(_save_mosaic(_mosaic(images, rows, columns), rows, columns, title, path))
    paths.append(_save_all(per_class, names, info, out_dir / "grid_all.png"))
    return paths


def _save_all(per_class: list[np.ndarray], names: list[str], info: DatasetInfo, path: Path) -> Path:
    """All classes in one figure, a row each, labelled with the class name on the left."""
    columns = max(len(images) for images in per_class)
    rows = len(per_class)
    padded = np.ones((rows * columns, *per_class[0].shape[1:]), dtype=np.float32)
    for row, images in enumerate(per_class):
        padded[row * columns : row * columns + len(images)] = images
    title = f"{info.name}: synthetic set, {sum(len(images) for images in per_class)} images"
    return _save_mosaic(_mosaic(padded, rows, columns), rows, columns, title, path, row_labels=names)


def plot_curve(xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, path: Path, title: str) -> Path:
    """Line plot of one curve (e.g. a distillation loss per iteration) saved to ``path``."""
    if len(xs) != len(ys):
        raise ValueError(f"plot_curve: {len(xs)} x values but {len(ys)} y values")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.0, 4.0), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(list(xs), list(ys), linewidth=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
