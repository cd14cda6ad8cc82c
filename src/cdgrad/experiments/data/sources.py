"""Where the official data sets come from: their files and checksums, the directories searched, download.

The readers parse the published files directly (no torchvision):

* MNIST / Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or not.
* CIFAR-10: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/`` folder.
* CIFAR-100: ``cifar-100-python.tar.gz`` or its extracted ``cifar-100-python/`` folder (``train``, ``test``);
  ``cifar100`` reads the 100 fine labels, ``cifar100-coarse`` the 20 coarse ones, from the same files (looked
  up under the name ``cifar100``).

Where the files are looked up (`find_dataset_dir`): a ``root`` that is given, and nothing else; without one, the
``CDGRAD_DATA`` environment variable (one directory or several joined by ``os.pathsep``), then
``~/.cache/cdgrad/data/<name>`` and ``/usr/share/datasets/<name>``. For each base directory ``B`` both ``B`` and
``B/<name>`` are tried; a directory counts when it holds every required file. A given ``root`` is used or refused,
never replaced by another copy: one that does not exist, or lacks files, is an error naming it (and the missing
files), and nothing is downloaded for it.

Every official file is checked against its published md5. A ``.gz`` file is accepted when either the md5 of
the compressed file or the md5 of its decompressed content matches, since repackaged copies (Debian's
``dataset-fashion-mnist``, for one) recompress the same content.
"""

from __future__ import annotations

import functools
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cdgrad.experiments.data.dataset import DATASET_REGISTRY, Dataset, channel_stats, load_registered
from cdgrad.experiments.data.formats import (
    GZIP_MAGIC,
    DatasetFormatError,
    check_labels,
    gunzip_idx,
    parse_idx,
    read_cifar_archive,
    read_cifar_batch,
)
from cdgrad.experiments.data.official import (
    CIFAR_FILES,
    IDX_FILES,
    MD5,
    MIRRORS,
    NUM_CLASSES,
    ChecksumError,
    CifarFiles,
    DatasetNotFoundError,
    gunzip_batch,
    md5_hex,
    read_bytes,
    read_checked,
    read_idx,
    verify_md5,
)

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "cache_root",
    "candidate_dirs",
    "not_found_message",
    "ChecksumError",
    "DatasetNotFoundError",
    "download_dataset",
    "fetch_url",
    "find_dataset_dir",
    "load_dataset",
    "read_idx",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "cifar100-coarse")

ENV_VAR = "CDGRAD_DATA"
_SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")
_DOWNLOAD_TIMEOUT_S = 20.0

# ----------------------------------------------------------------------------------------------------------
# Lookup
# ----------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return name


def cache_root() -> Path:
    return Path.home() / ".cache" / "cdgrad" / "data"


def _idx_path(d: Path, base: str) -> Path | None:
    """``d/base`` if it is a file, else ``d/base.gz`` if it is one, else None (raw preferred: no gunzip)."""
    for p in (d / base, d / f"{base}.gz"):
        if p.is_file():
            return p
    return None


def _cifar_batches_dir(d: Path, spec: CifarFiles) -> Path | None:
    for folder in (d / spec.folder, d):
        if all((folder / b).is_file() for b in spec.batches):
            return folder
    return None


def _files_of(name: str) -> str:
    """The data set whose files `name` reads (cifar100-coarse reads cifar100's)."""
    return CIFAR_FILES[name].files if name in CIFAR_FILES else name


def _missing(name: str, d: Path) -> list[str]:
    """Required files absent from directory ``d``; empty when ``d`` holds the data set."""
    if name in CIFAR_FILES:
        spec = CIFAR_FILES[name]
        if (d / spec.archive).is_file() or _cifar_batches_dir(d, spec) is not None:
            return []
        return [spec.archive]
    return [f"{b}.gz" for b in IDX_FILES if _idx_path(d, b) is None]


def check_root(name: str, root: str | os.PathLike[str] | None) -> Path | None:
    """``root`` as a Path: TypeError unless a path or None, `DatasetNotFoundError` naming it unless a directory."""
    if root is None:
        return None
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a directory path (str or os.PathLike) or None, got {root!r}")
    r = Path(root).expanduser()
    if not r.is_dir():
        what = "is not a directory" if r.exists() else "does not exist"
        raise DatasetNotFoundError(
            f"data root {str(root)!r} for data set {name!r} {what}; give the folder that holds the data set's "
            f"files, or leave the root unset to search ${ENV_VAR} and the standard locations"
        )
    return r


def candidate_dirs(name: str, root: str | os.PathLike[str] | None) -> list[Path]:
    """Directories searched, in order: a given root (``root`` and ``root/<name>``, nothing else); without one,
    $CDGRAD_DATA and the standard locations."""
    out: list[Path] = []
    folder = _files_of(name)
    r = check_root(name, root)
    if r is not None:
        return [r, r / folder]
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry:
            e = Path(entry).expanduser()
            out += [e, e / folder]
    out += [cache_root() / folder, _SYSTEM_DATASETS_DIR / folder]
    return out


def find_dataset_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The first directory holding every file of data set ``name``.

    Searched in order: a given ``root`` and ``root/<name>``, and nothing else; without a root, each directory
    ``D`` in ``$CDGRAD_DATA`` and ``D/<name>``, ``~/.cache/cdgrad/data/<name>``, ``/usr/share/datasets/<name>``.
    MNIST-style sets need the four IDX files (``.gz`` or not); CIFAR-10 needs ``cifar-10-python.tar.gz`` or
    ``cifar-10-batches-py/`` (or the batches themselves). Raises `DatasetNotFoundError` when none qualifies
    (naming the files missing from the searched directory that holds the most of them), or when ``root`` is
    given and does not exist. MNIST and Fashion-MNIST share file names, so a directory is told apart only by
    its name and, when loading, by the checksums.
    """
    _check_name(name)
    candidates = candidate_dirs(name, root)
    for d in candidates:
        if d.is_dir() and not _missing(name, d):
            return d
    raise DatasetNotFoundError(_missing_files_message(name, candidates, _fewest_missing(name, candidates), root))


def _fewest_missing(name: str, searched: Sequence[Path]) -> list[str]:
    """The files missing from the searched directory that holds the most of them (all when none exists)."""
    lists = [_missing(name, d) for d in searched if d.is_dir()]
    return min(lists, key=len) if lists else _official_files(name)


def not_found_message(
    name: str,
    searched: Sequence[Path],
    what: str,
    folder: str,
    root: str | os.PathLike[str] | None,
    how: str = "",
    downloadable: bool = False,
) -> str:
    """The message of a data set that was not found: `what` is missing (after "not found"), the directories
    searched, `how` to get it, and where to put it (`folder`: its folder name under a base directory)."""
    where = "\n".join(f"  {d}" for d in dict.fromkeys(searched))
    if root is not None:
        advice = (
            f"Put the missing files in the data root {str(root)!r} (or its '{folder}' subdirectory), or leave the "
            f"root unset to search the environment variable {ENV_VAR} and the standard locations"
            + (" (and download)." if downloadable else ".")
        )
    else:
        advice = (
            f"Put the files in {cache_root() / folder}, or in a directory given as root=... or in the "
            f"environment variable {ENV_VAR}=/path/to/dir (the directory itself or its '{folder}' subdirectory)."
        )
    return f"data set {name!r} not found{what}.\nSearched:\n{where}\n{how}{advice}"


def _missing_files_message(
    name: str, searched: Sequence[Path], missing: Sequence[str], root: str | os.PathLike[str] | None, note: str = ""
) -> str:
    alt = f" (or the extracted {CIFAR_FILES[name].folder}/ folder)" if name in CIFAR_FILES else " (gzipped or not)"
    what = f". Missing files: {', '.join(missing)}{alt}"
    text = not_found_message(name, searched, what, _files_of(name), root, downloadable=True)
    return text + (f"\n{note}" if note else "")


# ----------------------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------------------

Fetch = Callable[[str, Path, float], None]


def fetch_url(url: str, dest: Path, timeout: float) -> None:
    """Write the body of ``url`` to ``dest`` (urllib, ``timeout`` seconds per blocking operation)."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def _official_files(name: str) -> list[str]:
    return [CIFAR_FILES[name].archive] if name in CIFAR_FILES else [f"{b}.gz" for b in IDX_FILES]


def _download_one(name: str, fname: str, md5: str, target: Path, fetch: Fetch) -> list[str] | None:
    """Fetch ``fname`` into ``target`` from the first mirror that serves it intact; the errors otherwise."""
    errors: list[str] = []
    for base in MIRRORS[_files_of(name)]:
        url = base + fname
        try:
            target.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{fname}.", suffix=".part")
            os.close(fd)
        except OSError as e:
            return [f"cannot write to {target}: {e}"]
        tmp = Path(tmp_name)
        try:
            fetch(url, tmp, _DOWNLOAD_TIMEOUT_S)
            got = md5_hex(tmp.read_bytes())
            if got != md5:
                raise ChecksumError(f"md5 {got}, expected {md5}")
            os.replace(tmp, target / fname)
            return None
        except Exception as e:  # network or checksum failure: try the next mirror
            errors.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    return errors


def download_dataset(name: str, dest: str | os.PathLike[str] | None = None, fetch: Fetch | None = None) -> Path:
    """Download the official files of ``name`` missing from ``dest`` (``~/.cache/cdgrad/data/<name>``).

    Each file goes to a temporary file in ``dest``, is checked against its official md5 and only then
    renamed atomically into place; official mirrors are tried in turn. ``fetch(url, path, timeout)``
    replaces the network access (default `fetch_url`). Returns ``dest``; raises `DatasetNotFoundError`
    naming the files that could not be obtained.
    """
    _check_name(name)
    fetch = fetch if fetch is not None else fetch_url
    target = Path(dest) if dest is not None else cache_root() / _files_of(name)
    missing = _missing(name, target) if target.is_dir() else _official_files(name)
    failures: list[str] = []
    for fname in missing:
        key = fname if name in CIFAR_FILES else fname.removesuffix(".gz")
        errors = _download_one(name, fname, MD5[_files_of(name)][key]["gz"], target, fetch)
        if errors is not None:
            failures.append(f"{fname} ({'; '.join(errors)})")
    if failures:
        raise DatasetNotFoundError(f"could not download {name!r} into {target}: " + "; ".join(failures))
    return target


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _load_idx_set(name: str, d: Path, verify: bool) -> tuple[np.ndarray, ...]:
    arrays = {}
    for base in IDX_FILES:
        path = _idx_path(d, base)
        assert path is not None  # guaranteed by find_dataset_dir
        arr = parse_idx(read_checked(path, name, base, verify, gunzip_idx), path)
        is_images = "images" in base
        if arr.dtype != np.uint8 or arr.ndim != (3 if is_images else 1):
            want = "uint8 (N, H, W)" if is_images else "uint8 (N,)"
            raise DatasetFormatError(f"{path}: expected {want}, got {arr.dtype} {arr.shape}")
        if not is_images:
            check_labels(arr, NUM_CLASSES[name], path)
        arrays[base] = (arr, path)
    out = []
    for split in ("train", "t10k"):
        (x, xp), (y, yp) = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if x.shape[0] != y.shape[0]:
            raise DatasetFormatError(f"{xp} holds {x.shape[0]} images but {yp} holds {y.shape[0]} labels")
        out += [x[:, None], y.astype(np.int64)]
    return tuple(out)


def _load_cifar(d: Path, verify: bool, spec: CifarFiles) -> tuple[np.ndarray, ...]:
    folder = _cifar_batches_dir(d, spec)
    blobs: dict[str, tuple[bytes, str]] = {}
    if folder is not None:
        for b in spec.batches:
            path = folder / b
            blobs[b] = (read_checked(path, spec.files, b, verify, gunzip_batch(spec.limit)), str(path))
    else:
        archive = d / spec.archive
        raw = read_bytes(archive)
        if verify:  # before anything is decompressed
            verify_md5(archive, raw, raw if raw[:2] != GZIP_MAGIC else None, MD5[spec.files][spec.archive])
        names = {f"{spec.folder}/{b}": b for b in spec.batches}
        members = read_cifar_archive(raw, archive, names, spec.limit)
        blobs = {names[m]: (buf, f"{archive}:{m}") for m, buf in members.items()}
        absent = [f"{spec.folder}/{b}" for b in spec.batches if b not in blobs]
        if absent:
            raise DatasetFormatError(f"{archive}: archive lacks the members {', '.join(absent)}")
    parts = {b: read_cifar_batch(buf, src, spec.labels, spec.classes) for b, (buf, src) in blobs.items()}
    train_x = np.concatenate([parts[b][0] for b in spec.train])
    train_y = np.concatenate([parts[b][1] for b in spec.train])
    return train_x, train_y, parts[spec.test][0], parts[spec.test][1]


def load_official(
    name: str, root: str | os.PathLike[str] | None = None, download: bool = True, *, verify: bool = True
) -> Dataset:
    """Load official data set ``name`` (one of `DATASETS`) from its files as a `Dataset` on the CPU.

    The directory is found with `find_dataset_dir`. When it is not found, no ``root`` was given and ``download``
    is True, the official files are downloaded into ``~/.cache/cdgrad/data/<name>`` (`download_dataset`); when
    that fails too, `DatasetNotFoundError` lists the missing files and the directories searched. A given ``root``
    is used or refused, never replaced by another copy. With ``verify`` every file is checked against its
    official md5 (`ChecksumError` names a file that differs).
    """
    _check_name(name)
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {download!r}")
    try:
        d = find_dataset_dir(name, root)
    except DatasetNotFoundError:
        if not download or root is not None:
            raise
        try:
            d = download_dataset(name)
        except DatasetNotFoundError as e:
            searched = candidate_dirs(name, root)
            raise DatasetNotFoundError(
                _missing_files_message(
                    name, searched, _fewest_missing(name, searched), root, note=f"Download failed: {e}"
                )
            ) from None
    arrays = _load_cifar(d, verify, CIFAR_FILES[name]) if name in CIFAR_FILES else _load_idx_set(name, d, verify)
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    mean, std = channel_stats(train_x)
    return Dataset(name, train_x, train_y, test_x, test_y, NUM_CLASSES[name], mean, std)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    verify: bool = True,
) -> Dataset:
    """Load data set ``name``: an official one (`DATASETS`, see `load_official`) or one registered with
    `register_dataset` (its loader is called as ``loader(root, download)``; ``verify`` applies to official
    files only).

    A ``root`` that is given must be an existing directory: `DatasetNotFoundError` names it otherwise.
    """
    if not isinstance(name, str) or name not in DATASET_REGISTRY:
        raise ValueError(f"name must be one of {DATASET_REGISTRY.names()}, got {name!r}")
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {download!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {verify!r}")
    check_root(name, root)
    if name in DATASETS:
        return load_official(name, root, download, verify=verify)
    return load_registered(name, root, download)


for _name in DATASETS:
    DATASET_REGISTRY.register(_name, functools.partial(load_official, _name), builtin=True)
