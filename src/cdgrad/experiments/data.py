"""Readers for MNIST, Fashion-MNIST and CIFAR-10 in their official file formats, plus batch utilities.

No torchvision. The readers parse the published files directly:

* MNIST / Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or not.
* CIFAR-10: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/`` folder. The batches are
  Python pickles; they are read with a restricted unpickler that admits only numpy's array reconstruction,
  so a malicious file cannot run code. Tar members are read in memory, nothing is extracted to disk.

Where the files are looked up (`find_dataset_dir`): the ``root`` argument, then the ``CDGRAD_DATA``
environment variable (one directory or several joined by ``os.pathsep``), then ``~/.cache/cdgrad/data/<name>``
and ``/usr/share/datasets/<name>``. For each base directory ``B`` both ``B`` and ``B/<name>`` are tried; a
directory counts when it holds every required file.

Every official file is checked against its published md5. A ``.gz`` file is accepted when either the md5 of
the compressed file or the md5 of its decompressed content matches, since repackaged copies (Debian's
``dataset-fashion-mnist``, for one) recompress the same content.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "ChecksumError",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "UnsafePickleError",
    "augment_crop_flip",
    "channel_stats",
    "crop_flip",
    "crop_flip_params",
    "download_dataset",
    "find_dataset_dir",
    "load_dataset",
    "normalize",
    "parse_idx",
    "read_cifar_batch",
    "read_idx",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10")

ENV_VAR = "CDGRAD_DATA"
_SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")
_DOWNLOAD_TIMEOUT_S = 20.0

# ----------------------------------------------------------------------------------------------------------
# Official files and checksums
# ----------------------------------------------------------------------------------------------------------

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# md5 of the official gzipped file ("gz") and of its decompressed content ("raw").
_MD5: dict[str, dict[str, dict[str, str]]] = {
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
}

_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_BATCHES = (*_CIFAR_TRAIN, _CIFAR_TEST)

_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are in none of the searched directories (and could not be downloaded)."""


class DatasetFormatError(ValueError):
    """A data file is corrupt, truncated or not in the official format; the message names the file."""


class ChecksumError(DatasetFormatError):
    """A data file's md5 differs from the official one."""


class UnsafePickleError(DatasetFormatError, pickle.UnpicklingError):
    """A pickle refers to a global outside the few that the CIFAR-10 format needs."""


# ----------------------------------------------------------------------------------------------------------
# The Dataset container
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Images and labels of one data set, kept whole in memory.

    ``train_x``/``test_x``: uint8 ``(N, C, H, W)``; ``train_y``/``test_y``: int64 ``(N,)`` in
    ``[0, num_classes)``. ``mean``/``std``: per-channel mean and (population) standard deviation of
    ``train_x / 255``, the constants `normalize` expects. ``swapped`` is True after `swap_train_test`.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    swapped: bool = False

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise TypeError(f"{split}_x must be a uint8 tensor of shape (N, C, H, W)")
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise TypeError(f"{split}_y must be an int64 tensor of shape ({x.shape[0]},)")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train_x and test_x must have the same image shape, got {tuple(self.train_x.shape[1:])} "
                f"and {tuple(self.test_x.shape[1:])}"
            )
        channels = self.train_x.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std must have one value per channel ({channels})")

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with all four tensors on ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def swap_train_test(self) -> Dataset:
        """Train on the test split and evaluate on the training split (Lao et al., Fig. 6).

        ``mean``/``std`` are recomputed from the new training split (the old test images), so no
        statistic of the evaluation images enters training. Swapping twice gives back the original splits.
        """
        mean, std = channel_stats(self.test_x)
        return dataclasses.replace(
            self,
            train_x=self.test_x,
            train_y=self.test_y,
            test_x=self.train_x,
            test_y=self.train_y,
            mean=mean,
            std=std,
            swapped=not self.swapped,
        )


# ----------------------------------------------------------------------------------------------------------
# Batch utilities
# ----------------------------------------------------------------------------------------------------------


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``x / 255`` for uint8 ``x`` of shape ``(N, C, H, W)``.

    Exact in float64 from the 256-bin histogram of each channel:
    ``mean_c = sum_v n_c(v) v / n``, ``std_c = sqrt(sum_v n_c(v) (v - mean_c)^2 / n)``, ``v = k / 255``.
    """
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError("x must be a uint8 tensor of shape (N, C, H, W)")
    if x.numel() == 0:
        raise ValueError("x must hold at least one image")
    x = x.detach().cpu()
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = counts.sum()
        mean = float(counts @ values / n)
        means.append(mean)
        stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / n)))
    return tuple(means), tuple(stds)


def _per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {channels} floats, got {values!r}") from None
    if len(out) != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {len(out)}")
    return out


def normalize(x_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Float32 ``(x / 255 - mean[c]) / std[c]`` per channel; ``x_uint8`` is ``(N, C, H, W)`` or ``(C, H, W)``.

    The result is on ``x_uint8``'s device.
    """
    if not isinstance(x_uint8, Tensor) or x_uint8.dtype != torch.uint8:
        raise TypeError("x_uint8 must be a uint8 tensor")
    if x_uint8.dim() not in (3, 4):
        raise ValueError(f"x_uint8 must have shape (N, C, H, W) or (C, H, W), got {tuple(x_uint8.shape)}")
    channels = x_uint8.shape[-3]
    m = _per_channel(mean, channels, "mean")
    s = _per_channel(std, channels, "std")
    if not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"std must be positive and finite, got {s}")
    s64 = torch.tensor(s, dtype=torch.float64)
    m64 = torch.tensor(m, dtype=torch.float64)
    scale = (1.0 / (255.0 * s64)).to(x_uint8.device, torch.float32).view(channels, 1, 1)
    shift = (m64 / s64).to(x_uint8.device, torch.float32).view(channels, 1, 1)
    return x_uint8.to(torch.float32) * scale - shift


def crop_flip_params(
    n: int, pad: int = 4, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Random draws of `augment_crop_flip` for ``n`` images: ``(dy, dx, flip)``.

    ``dy``, ``dx``: int64 offsets uniform in ``[0, 2 pad]``; ``flip``: bool, True with probability 1/2.
    Drawn in that order from ``generator`` (on the generator's device; the global generator of
    ``device`` when None) and returned on ``device``.
    """
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    draw_device = generator.device if generator is not None else device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=draw_device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=draw_device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=draw_device).bool()
    return dy.to(device), dx.to(device), flip.to(device)


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Deterministic part of `augment_crop_flip`.

    With ``P`` = ``x`` zero-padded by ``pad`` on each spatial side,
    ``out[n, :, i, j] = P[n, :, dy[n] + i, dx[n] + j']`` where ``j' = W - 1 - j`` if ``flip[n]`` else ``j``.
    One gather for the whole batch, no loop over images.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', x)!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    n, _, h, w = x.shape
    for name, t in (("dy", dy), ("dx", dx), ("flip", flip)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if n and (int(dy.min()) < 0 or int(dy.max()) > 2 * pad or int(dx.min()) < 0 or int(dx.max()) > 2 * pad):
        raise ValueError(f"dy and dx must lie in [0, {2 * pad}] for pad={pad}")
    return _crop_flip(x, dy, dx, flip, pad)


def _crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int) -> Tensor:
    n, _, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev, torch.bool)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (N, W)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded[idx_n, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C): advanced dims come first
    return out.permute(0, 3, 1, 2).contiguous()


def augment_crop_flip(x: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Standard CIFAR augmentation for a whole batch ``(N, C, H, W)`` on its own device.

    Zero-pad by ``pad``, take a random ``H x W`` crop per image, flip it horizontally with probability
    1/2: ``crop_flip(x, *crop_flip_params(N, pad, generator, x.device), pad)``. Zero padding of uint8
    images (before `normalize`) matches torchvision's ``RandomCrop(padding=pad)``; after `normalize` the
    border is the channel mean instead.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', x)!r}")
    dy, dx, flip = crop_flip_params(x.shape[0], pad, generator, x.device)
    return _crop_flip(x, dy, dx, flip, pad)  # offsets in range by construction: no device sync


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip file ({e})") from None


def parse_idx(buf: bytes, source: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Parse an IDX buffer: 2 zero bytes, a dtype code, ``ndim``, ``ndim`` big-endian uint32 sizes, data.

    Returns the array in native byte order; the header must describe exactly ``len(buf)`` bytes.
    """
    if len(buf) < 4:
        raise DatasetFormatError(f"{source}: too short for an IDX header ({len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0:
        raise DatasetFormatError(f"{source}: bad IDX magic number 0x{buf[:4].hex()} (must start with 0x0000)")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        accepted = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DatasetFormatError(f"{source}: bad IDX dtype code 0x{code:02x} (accepted: {accepted})")
    if ndim == 0:
        raise DatasetFormatError(f"{source}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetFormatError(f"{source}: truncated IDX header ({len(buf)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise DatasetFormatError(
            f"{source}: IDX size mismatch: header declares shape {dims} of {dtype.name} "
            f"({expected} bytes in all) but the file has {len(buf)} bytes"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_checked(path: Path, dataset: str | None, key: str, verify: bool) -> bytes:
    """Contents of ``path`` (decompressed when gzipped), md5-checked against the official values."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetNotFoundError(f"{path}: cannot read ({e})") from None
    content = _gunzip(raw, path) if raw[:2] == b"\x1f\x8b" else raw
    if verify and dataset is not None:
        known = _MD5[dataset][key]
        ok = (content is not raw and _md5(raw) == known.get("gz")) or _md5(content) == known.get("raw")
        if not ok:
            expected = " or ".join(f"{v} ({k})" for k, v in known.items())
            raise ChecksumError(
                f"{path}: md5 {_md5(raw)} does not match the official {expected}; the file is corrupt, "
                "truncated or not the official one (pass verify=False to read it anyway)"
            )
    return content


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from the content), into a numpy array."""
    path = Path(path)
    return parse_idx(_read_checked(path, None, "", verify=False), path)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------------------


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles; only latin-1 is admitted."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode("latin1", errors)


def _numpy_reconstruct() -> Callable:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Bytes inside protocol-2 pickles written by Python 3 (the official files, written by Python 2, do
    # not need it); restricted to latin-1.
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        factory = _PICKLE_ALLOWED.get((module, name))
        if factory is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _PICKLE_ALLOWED)
            raise UnsafePickleError(
                f"{self._source}: refusing to load global {module}.{name} from a pickle "
                f"(a CIFAR-10 batch needs only {allowed}); the file is not an official CIFAR-10 batch"
            )
        return factory()


def _get(d: dict, key: str) -> object:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_batch(buf: bytes, source: str | os.PathLike = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch: a pickled dict with ``data`` uint8 ``(n, 3072)`` and ``labels``.

    Returns images uint8 ``(n, 3, 32, 32)`` (rows are channel-major: 1024 red, 1024 green, 1024 blue)
    and labels int64 ``(n,)``. Unpickling admits only numpy's array reconstruction.
    """
    source = str(source)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(buf), source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # any parse failure of a corrupt or truncated pickle
        raise DatasetFormatError(f"{source}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{source}: a CIFAR-10 batch must be a dict, got {type(obj).__name__}")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFormatError(f"{source}: 'data' must be a uint8 array of shape (n, 3072), got {desc}")
    if not isinstance(labels, list | tuple | np.ndarray):
        raise DatasetFormatError(f"{source}: 'labels' must be a list of ints, got {type(labels).__name__}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetFormatError(f"{source}: 'labels' must be a list of ints") from None
    if y.shape != (data.shape[0],):
        raise DatasetFormatError(f"{source}: {data.shape[0]} images but labels of shape {y.shape}")
    _check_labels(y, _NUM_CLASSES["cifar10"], source)
    return data.reshape(-1, 3, 32, 32), y


def _check_labels(y: np.ndarray, num_classes: int, source: str | os.PathLike) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetFormatError(
            f"{source}: labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )


# ----------------------------------------------------------------------------------------------------------
# Lookup
# ----------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return name


def _cache_root() -> Path:
    return Path.home() / ".cache" / "cdgrad" / "data"


def _idx_path(d: Path, base: str) -> Path | None:
    """``d/base`` if it is a file, else ``d/base.gz`` if it is one, else None (raw preferred: no gunzip)."""
    for p in (d / base, d / f"{base}.gz"):
        if p.is_file():
            return p
    return None


def _cifar_batches_dir(d: Path) -> Path | None:
    for folder in (d / _CIFAR_FOLDER, d):
        if all((folder / b).is_file() for b in _CIFAR_BATCHES):
            return folder
    return None


def _missing(name: str, d: Path) -> list[str]:
    """Required files absent from directory ``d``; empty when ``d`` holds the data set."""
    if name == "cifar10":
        if (d / _CIFAR_ARCHIVE).is_file() or _cifar_batches_dir(d) is not None:
            return []
        return [_CIFAR_ARCHIVE]
    return [f"{b}.gz" for b in _IDX_FILES if _idx_path(d, b) is None]


def _candidates(name: str, root: str | os.PathLike | None) -> list[Path]:
    """Directories searched, in order: root, $CDGRAD_DATA, the standard locations."""
    out: list[Path] = []
    if root is not None:
        if not isinstance(root, str | os.PathLike):
            raise TypeError(f"root must be a directory path (str or os.PathLike) or None, got {root!r}")
        r = Path(root).expanduser()
        out += [r, r / name]
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry:
            e = Path(entry).expanduser()
            out += [e, e / name]
    out += [_cache_root() / name, _SYSTEM_DATASETS_DIR / name]
    return out


def find_dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The first directory holding every file of data set ``name``.

    Searched in order: ``root`` and ``root/<name>``; each directory ``D`` in ``$CDGRAD_DATA`` and
    ``D/<name>``; ``~/.cache/cdgrad/data/<name>``; ``/usr/share/datasets/<name>``. MNIST-style sets need the
    four IDX files (``.gz`` or not); CIFAR-10 needs ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``
    (or the batches themselves). Raises `DatasetNotFoundError` when none qualifies. MNIST and Fashion-MNIST
    share file names, so a directory is told apart only by its name and, when loading, by the checksums.
    """
    _check_name(name)
    candidates = _candidates(name, root)
    for d in candidates:
        if d.is_dir() and not _missing(name, d):
            return d
    raise DatasetNotFoundError(_not_found_message(name, candidates, _missing(name, _cache_root() / name)))


def _not_found_message(name: str, searched: Sequence[Path], missing: Sequence[str], note: str = "") -> str:
    where = "\n".join(f"  {d}" for d in dict.fromkeys(searched))
    alt = " (or the extracted cifar-10-batches-py/ folder)" if name == "cifar10" else " (gzipped or not)"
    return (
        f"data set {name!r} not found. Missing files: {', '.join(missing)}{alt}.\n"
        f"Searched:\n{where}\n"
        f"Put the files in {_cache_root() / name}, or in a directory given as root=... or in the "
        f"environment variable {ENV_VAR}=/path/to/dir (the directory itself or its '{name}' subdirectory)."
        + (f"\n{note}" if note else "")
    )


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
    return [_CIFAR_ARCHIVE] if name == "cifar10" else [f"{b}.gz" for b in _IDX_FILES]


def _download_one(name: str, fname: str, md5: str, target: Path, fetch: Fetch) -> list[str] | None:
    """Fetch ``fname`` into ``target`` from the first mirror that serves it intact; the errors otherwise."""
    errors: list[str] = []
    for base in _MIRRORS[name]:
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
            got = _md5(tmp.read_bytes())
            if got != md5:
                raise ChecksumError(f"md5 {got}, expected {md5}")
            os.replace(tmp, target / fname)
            return None
        except Exception as e:  # network or checksum failure: try the next mirror
            errors.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    return errors


def download_dataset(name: str, dest: str | os.PathLike | None = None, fetch: Fetch | None = None) -> Path:
    """Download the official files of ``name`` missing from ``dest`` (``~/.cache/cdgrad/data/<name>``).

    Each file goes to a temporary file in ``dest``, is checked against its official md5 and only then
    renamed atomically into place; official mirrors are tried in turn. ``fetch(url, path, timeout)``
    replaces the network access (default `fetch_url`). Returns ``dest``; raises `DatasetNotFoundError`
    naming the files that could not be obtained.
    """
    _check_name(name)
    fetch = fetch if fetch is not None else fetch_url
    target = Path(dest) if dest is not None else _cache_root() / name
    missing = _missing(name, target) if target.is_dir() else _official_files(name)
    failures: list[str] = []
    for fname in missing:
        key = fname if name == "cifar10" else fname.removesuffix(".gz")
        errors = _download_one(name, fname, _MD5[name][key]["gz"], target, fetch)
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
    for base in _IDX_FILES:
        path = _idx_path(d, base)
        assert path is not None  # guaranteed by find_dataset_dir
        arr = parse_idx(_read_checked(path, name, base, verify), path)
        is_images = "images" in base
        if arr.dtype != np.uint8 or arr.ndim != (3 if is_images else 1):
            want = "uint8 (N, H, W)" if is_images else "uint8 (N,)"
            raise DatasetFormatError(f"{path}: expected {want}, got {arr.dtype} {arr.shape}")
        if not is_images:
            _check_labels(arr, _NUM_CLASSES[name], path)
        arrays[base] = (arr, path)
    out = []
    for split in ("train", "t10k"):
        (x, xp), (y, yp) = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if x.shape[0] != y.shape[0]:
            raise DatasetFormatError(f"{xp} holds {x.shape[0]} images but {yp} holds {y.shape[0]} labels")
        out += [x[:, None], y.astype(np.int64)]
    return tuple(out)


def _load_cifar(d: Path, verify: bool) -> tuple[np.ndarray, ...]:
    folder = _cifar_batches_dir(d)
    blobs: dict[str, tuple[bytes, str]] = {}
    if folder is not None:
        for b in _CIFAR_BATCHES:
            path = folder / b
            blobs[b] = (_read_checked(path, "cifar10", b, verify), str(path))
    else:
        archive = d / _CIFAR_ARCHIVE
        raw = _read_checked(archive, "cifar10", _CIFAR_ARCHIVE, verify)
        wanted = {f"{_CIFAR_FOLDER}/{b}": b for b in _CIFAR_BATCHES}
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
                for member in tar:
                    b = wanted.get(member.name)
                    if b is not None and member.isfile():
                        f = tar.extractfile(member)
                        assert f is not None
                        blobs[b] = (f.read(), f"{archive}:{member.name}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DatasetFormatError(f"{archive}: corrupt or truncated tar archive ({e})") from None
        absent = [f"{_CIFAR_FOLDER}/{b}" for b in _CIFAR_BATCHES if b not in blobs]
        if absent:
            raise DatasetFormatError(f"{archive}: archive lacks the members {', '.join(absent)}")
    parts = {b: read_cifar_batch(buf, src) for b, (buf, src) in blobs.items()}
    train_x = np.concatenate([parts[b][0] for b in _CIFAR_TRAIN])
    train_y = np.concatenate([parts[b][1] for b in _CIFAR_TRAIN])
    return train_x, train_y, parts[_CIFAR_TEST][0], parts[_CIFAR_TEST][1]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    *,
    verify: bool = True,
) -> Dataset:
    """Load data set ``name`` (one of `DATASETS`) from its official files as a `Dataset` on the CPU.

    The directory is found with `find_dataset_dir`. When it is not found and ``download`` is True the
    official files are downloaded into ``~/.cache/cdgrad/data/<name>`` (`download_dataset`); when that fails
    too, `DatasetNotFoundError` lists the missing files and the directories searched. With ``verify`` every
    file is checked against its official md5 (`ChecksumError` names a file that differs).
    """
    _check_name(name)
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {download!r}")
    try:
        d = find_dataset_dir(name, root)
    except DatasetNotFoundError:
        if not download:
            raise
        try:
            d = download_dataset(name)
        except DatasetNotFoundError as e:
            raise DatasetNotFoundError(
                _not_found_message(name, _candidates(name, root), _missing_or_all(name), note=f"Download failed: {e}")
            ) from None
    arrays = _load_cifar(d, verify) if name == "cifar10" else _load_idx_set(name, d, verify)
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    mean, std = channel_stats(train_x)
    return Dataset(name, train_x, train_y, test_x, test_y, _NUM_CLASSES[name], mean, std)


def _missing_or_all(name: str) -> list[str]:
    target = _cache_root() / name
    return _missing(name, target) if target.is_dir() else _official_files(name)
