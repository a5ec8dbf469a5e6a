"""Datasets for fedistill: metadata, locating/loading local files, and checked downloads."""

from fedistill.data.catalog import (
    DATASETS,
    DataError,
    DatasetInfo,
    ImageData,
    dataset_info,
    denormalize,
    normalize,
)
from fedistill.data.fetch import fetch_dataset
from fedistill.data.sources import candidate_dirs, load_dataset

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "ImageData",
    "candidate_dirs",
    "dataset_info",
    "denormalize",
    "fetch_dataset",
    "load_dataset",
    "normalize",
]
