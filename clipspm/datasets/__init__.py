"""Datasets: the benchmark registry built from the shipped split files, layout resolution on disk,
the custom dataset and the synthetic generator (`clipspm.datasets.synthetic`, imported on demand)."""

from clipspm.datasets.registry import list_datasets, load_dataset
from clipspm.datasets.types import SPLITS, ClassEntry, Dataset, DatasetInfo, VideoEntry

__all__ = ["SPLITS", "ClassEntry", "Dataset", "DatasetInfo", "VideoEntry", "list_datasets", "load_dataset"]
