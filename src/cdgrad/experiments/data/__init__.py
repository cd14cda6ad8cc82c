"""Data sets of the experiments: MNIST, Fashion-MNIST and CIFAR-10 from their official files, and any registered.

    formats   bytes -> arrays: IDX, CIFAR-10 pickles (restricted unpickler) and tar, gzip with a size cap
    sources   files, checksums, the directories searched, download; `load_dataset`
    dataset   the `Dataset` container, `normalize`, the registry (`register_dataset`)
    augment   random crop and flip of whole batches

`load_dataset(name, root, download)` loads an official data set or calls the loader registered under
``name`` with `register_dataset(name, loader)`, ``loader(root, download) -> Dataset``.
"""

from cdgrad.experiments.data.augment import augment_crop_flip, crop_flip, crop_flip_params, scale_crop_flip
from cdgrad.experiments.data.dataset import (
    DATASET_REGISTRY,
    IGNORE_INDEX,
    Dataset,
    channel_stats,
    dataset_names,
    normalize,
    register_dataset,
)
from cdgrad.experiments.data.dense import CITYSCAPES_TRAIN_IDS, read_cityscapes, read_voc
from cdgrad.experiments.data.formats import DatasetFormatError, UnsafePickleError, parse_idx, read_cifar_batch
from cdgrad.experiments.data.scenes import (
    SCENE_DATASETS,
    SceneLayout,
    compose_scenes,
    render_scenes,
    scene_layouts,
    scenes_dataset,
)
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
    "CITYSCAPES_TRAIN_IDS",
    "DATASETS",
    "DATASET_REGISTRY",
    "IGNORE_INDEX",
    "SCENE_DATASETS",
    "ChecksumError",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "SceneLayout",
    "UnsafePickleError",
    "augment_crop_flip",
    "channel_stats",
    "compose_scenes",
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
    "read_cityscapes",
    "read_idx",
    "read_voc",
    "register_dataset",
    "render_scenes",
    "scale_crop_flip",
    "scene_layouts",
    "scenes_dataset",
]
