"""Public images for private runs: where they come from and how many, chosen without looking at private data.

A private method may start from public images (``distill.init = "public"``);
they cost no privacy only if nothing about them was chosen with private
data. Two sources: ``rest``, the training images after ``data.train_subset``
(in-distribution, which few deployments have), and ``digits``, scikit-learn's
handwritten digits (bundled, out-of-distribution for every other dataset),
reshaped to the private dataset's images. ``data.public_size`` keeps a small
pool, drawn with a fixed seed, never with the run's data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedistill.data.catalog import DataError, DatasetInfo, ImageData

PUBLIC_SOURCES = ("rest", "digits")
POOL_SEED = 0
"""The pool is the first ``public_size`` images of one fixed shuffle of the public source: the same for every run."""


def reshaped_for(public: ImageData, info: DatasetInfo) -> ImageData:
    """``public``'s images resized to ``info``'s height and width and channels, labelled with ``info``.

    Bilinear resizing with antialiasing; grey images are repeated over colour
    channels and colour images averaged to grey. The result is normalised with
    the private dataset's constants, as the distiller sees its own images.
    Public class ``c`` starts private class ``c`` (an arbitrary but fixed pairing).
    """
    if public.info.num_classes < info.num_classes:
        raise DataError(
            f"public dataset {public.info.name!r} has {public.info.num_classes} classes, {info.name!r} needs {info.num_classes}"
        )
    keep = public.labels < info.num_classes
    pixels = torch.from_numpy(np.ascontiguousarray(public.images[keep])).float()
    if pixels.shape[1] != info.channels:
        pixels = pixels.mean(dim=1, keepdim=True).expand(-1, info.channels, -1, -1)
    resized = F.interpolate(pixels, size=(info.height, info.width), mode="bilinear", antialias=True,
                            align_corners=False)
    images = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return ImageData(images, public.labels[keep], info)


def public_pool(public: ImageData, size: int | None) -> ImageData:
    """All of ``public``, or ``size`` images of it drawn with ``POOL_SEED`` (not with the run's seed or data)."""
    if size is None or size >= len(public):
        return public
    if size < 1:
        raise DataError(f"data.public_size: must be >= 1, got {size}")
    order = np.random.default_rng(POOL_SEED).permutation(len(public))
    return public.subset(np.sort(order[:size]))
