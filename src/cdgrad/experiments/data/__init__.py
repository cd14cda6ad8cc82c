"""Data sets of the experiments: MNIST, Fashion-MNIST and CIFAR-10 from their official files, and any registered.

    formats   bytes -> arrays: IDX, CIFAR-10 pickles (restricted unpickler) and tar, gzip with a size cap
    sources   files, checksums, the directories searched, download; `load_dataset`
    dataset   the `Dataset` container, `normalize`, the registry (`register_dataset`)
    augment   random crop and flip of whole batches

`load_dataset(name, root, download)` loads an official data set or calls the loader registered under
``name`` with `register_dataset(name, loader)`, ``loader(root, download) -> Dataset``.
"""

from cdgrad.experiments.data.augment import augment_crop_flip, crop_flip, crop_flip_params
from cdgrad.experiments.data.dataset import (
    DATASET_REGISTRY,
    Dataset,
    channel_stats,
    dataset_names,
    normalize,
    register_dataset,
)
from cdgrad.experiments.data.formats import DatasetFormatError, UnsafePickleError, parse_idx, read_cifar_batch
from cdgrad.experiments.data.sources import (
    DATASETS,
    ChecksumError,
    DatasetNotFoundError,
    download_dataset,
    fetch_url,
    find_dataset_dir,
    load_dataset,
    read_idx,
)

__all__ = [
    "DATASETS",
    "DATASET_REGISTRY",
    "ChecksumError",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "UnsafePickleError",
    "augment_crop_flip",
    "channel_stats",
    "crop_flip",
    "crop_flip_params",
    "dataset_names",
    "download_dataset",
    "fetch_url",
    "find_dataset_dir",
    "load_dataset",
    "normalize",
    "parse_idx",
    "read_cifar_batch",
    "read_idx",
    "register_dataset",
]
