"""Datasets for fedistill: metadata, locating/loading local files, checked downloads and client partitions."""

from fedistill.data.catalog import (
    DATASETS,
    DataError,
    DatasetInfo,
    ImageData,
    denormalize,
    normalize,
)
from fedistill.data.fetch import fetch_dataset
from fedistill.data.partition import (
    PARTITION_SCHEMES,
    PartitionError,
    Partitioning,
    client_data,
    partition_dataset,
    plot_partition_counts,
)
from fedistill.data.sources import candidate_dirs, dataset_info, load_dataset

__all__ = [
    "DATASETS",
    "PARTITION_SCHEMES",
    "DataError",
    "DatasetInfo",
    "ImageData",
    "PartitionError",
    "Partitioning",
    "candidate_dirs",
    "client_data",
    "dataset_info",
    "denormalize",
    "fetch_dataset",
    "load_dataset",
    "normalize",
    "partition_dataset",
    "plot_partition_counts",
]
