"""The official files of the data sets: names, published md5 checksums, download mirrors, and their checked reading.

Every official file is checked against its published md5. A ``.gz`` file is accepted when either the md5 of the
compressed file or the md5 of its decompressed content matches, since repackaged copies (Debian's
``dataset-fashion-mnist``, for one) recompress the same content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cdgrad.experiments.data.formats import (
    CIFAR_BATCH_LIMIT,
    CIFAR_CLASSES,
    GZIP_MAGIC,
    DatasetFormatError,
    gunzip,
    gunzip_idx,
    parse_idx,
)

__all__ = [
    "CIFAR_FILES",
    "IDX_FILES",
    "MD5",
    "MIRRORS",
    "NUM_CLASSES",
    "ChecksumError",
    "CIFAR10_FILES",
    "CIFAR100_FILES",
    "CifarFiles",
    "DatasetNotFoundError",
    "gunzip_batch",
    "md5_hex",
    "read_bytes",
    "read_checked",
    "read_idx",
    "verify_md5",
]

# ----------------------------------------------------------------------------------------------------------
# Official files and checksums
# ----------------------------------------------------------------------------------------------------------

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# md5 of the official gzipped file ("gz") and of its decompressed content ("raw").
MD5: dict[str, dict[str, dict[str, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte": {
            "gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "raw": "6bbc9ace898e44ae57da46a324031adb",
        },
        "train-labels-idx1-ubyte": {
            "gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "raw": "a25bea736e30d166cdddb491f175f624",
        },
        "t10k-images-idx3-ubyte": {
            "gz": "9fb629c4189551a2d022fa330f9573f3",
            "raw": "2646ac647ad5339dbf082846283269ea",
        },
        "t10k-labels-idx1-ubyte": {
            "gz": "ec29112dd5afa0611ce80d1b7f02629c",
            "raw": "27ae3e4e09519cfbb04c329615203637",
        },
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": {
            "gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "raw": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        },
        "train-labels-idx1-ubyte": {
            "gz": "25c81989df183df01b3e8a0aad5dffbe",
            "raw": "9018921c3c673c538a1fc5bad174d6f9",
        },
        "t10k-images-idx3-ubyte": {
            "gz": "bef4ecab320f06d8554ea6380940ec79",
            "raw": "8181f5470baa50b63fa0f6fddb340f0a",
        },
        "t10k-labels-idx1-ubyte": {
            "gz": "bb300cfdad3c16e7a12a480ee83cd310",
            "raw": "15d484375f8d13e6eb1aabb0c3f46965",
        },
    },
    "cifar10": {
        "cifar-10-python.tar.gz": {"gz": "c58f30108f718f92721af3b95e74349a"},
        "data_batch_1": {"raw": "c99cafc152244af753f735de768cd75f"},
        "data_batch_2": {"raw": "d4bba439e000b95fd0a9bffe97cbabec"},
        "data_batch_3": {"raw": "54ebc095f3ab1f0389bbae665268c751"},
        "data_batch_4": {"raw": "634d18415352ddfa80567beed471001a"},
        "data_batch_5": {"raw": "482c414d41f54cd18b22e5b47cb7c3cb"},
        "test_batch": {"raw": "40351d587109b95175f43aff81a1287e"},
    },
    "cifar100": {
        "cifar-100-python.tar.gz": {"gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        "train": {"raw": "16019d7e3df5f24257cddd939b257f8d"},
        "test": {"raw": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    },
}

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/",),
}


@dataclass(frozen=True)
class CifarFiles:
    """The files of a CIFAR variant: the archive, its folder, the batches and which labels to read."""

    files: str  # the data set whose files these are (its checksums, download and cache folder)
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    labels: str
    classes: int
    limit: int  # the most bytes one batch may hold (twice the official size)

    @property
    def batches(self) -> tuple[str, ...]:
        return (*self.train, self.test)


CIFAR10_FILES = CifarFiles(
    "cifar10",
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "labels",
    CIFAR_CLASSES,
    CIFAR_BATCH_LIMIT,
)
CIFAR100_FILES = CifarFiles(
    "cifar100",
    "cifar-100-python.tar.gz",
    "cifar-100-python",
    ("train",),
    "test",
    "fine_labels",
    100,
    2 * 50_000 * 3_072,
)
CIFAR_FILES: dict[str, CifarFiles] = {
    "cifar10": CIFAR10_FILES,
    "cifar100": CIFAR100_FILES,
    # the same files, the 20 superclasses
    "cifar100-coarse": replace(CIFAR100_FILES, labels="coarse_labels", classes=20),
}

NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, **{name: spec.classes for name, spec in CIFAR_FILES.items()}}


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are in none of the searched directories (and could not be downloaded), or the
    given root does not exist."""


class ChecksumError(DatasetFormatError):
    """A data file's md5 differs from the official one."""


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetNotFoundError(f"{path}: cannot read ({e})") from None


def read_checked(
    path: Path, dataset: str | None, key: str, verify: bool, inflate: Callable[[bytes, Path], bytes]
) -> bytes:
    """Contents of ``path`` (decompressed by ``inflate`` when gzipped), md5-checked against the official values."""
    raw = read_bytes(path)
    content = inflate(raw, path) if raw[:2] == GZIP_MAGIC else raw
    if verify and dataset is not None:
        verify_md5(path, raw, content, MD5[dataset][key])
    return content


def verify_md5(path: Path, raw: bytes, content: bytes | None, known: dict[str, str]) -> None:
    """ChecksumError unless the md5 of the gzipped file or of its ``content`` is the official one."""
    ok = (content is not raw and md5_hex(raw) == known.get("gz")) or (
        content is not None and md5_hex(content) == known.get("raw")
    )
    if not ok:
        expected = " or ".join(f"{v} ({k})" for k, v in known.items())
        raise ChecksumError(
            f"{path}: md5 {md5_hex(raw)} does not match the official {expected}; the file is corrupt, "
            "truncated or not the official one: replace it with the official file"
        )


def gunzip_batch(limit: int) -> Callable[[bytes, Path], bytes]:
    return lambda raw, path: gunzip(raw, path, limit)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from the content), into a numpy array."""
    path = Path(path)
    return parse_idx(read_checked(path, None, "", False, gunzip_idx), path)
