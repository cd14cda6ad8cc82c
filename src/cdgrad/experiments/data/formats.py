"""The official file formats, from bytes to arrays: IDX (MNIST, Fashion-MNIST), CIFAR-10 pickles and tar, gzip.

Nothing here touches the file system: every reader takes the bytes of a file and a ``source`` (the file's
name, used in messages). Errors are `DatasetFormatError` naming the source.

* IDX: 2 zero bytes, a dtype code, ``ndim``, ``ndim`` big-endian uint32 sizes, then the data; the header fixes
  the file's exact size, ``4 + 4 ndim + prod(sizes) * itemsize`` bytes (`idx_size`).
* gzip: decompressed incrementally and never beyond a cap known in advance. A gzipped IDX file is capped at the
  size its own header declares (`gunzip_idx`): a stream that inflates further is refused after one byte
  more, so a gzip bomb cannot exhaust memory.
* CIFAR-10 batches are Python pickles, read with a restricted unpickler that admits only numpy's array
  reconstruction, so a malicious file cannot run code. The ``.tar.gz`` archive is read as a stream, member by
  member, in memory; a batch whose tar header declares more than `CIFAR_BATCH_LIMIT` bytes is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterable

import numpy as np

__all__ = [
    "CIFAR_BATCH_LIMIT",
    "DatasetFormatError",
    "UnsafePickleError",
    "gunzip",
    "gunzip_idx",
    "idx_size",
    "parse_idx",
    "read_cifar_archive",
    "read_cifar_batch",
]

CIFAR_CLASSES = 10
# An official batch is 10,000 rows of 3,072 bytes plus labels and file names (31 MB); twice that is refused.
CIFAR_BATCH_LIMIT = 2 * 10_000 * 3_072
GZIP_MAGIC = b"\x1f\x8b"
_READ_BLOCK = 1 << 26  # the most a single decompression call produces


class DatasetFormatError(ValueError):
    """A data file is corrupt, truncated or not in the official format; the message names the file."""


class UnsafePickleError(DatasetFormatError, pickle.UnpicklingError):
    """A pickle refers to a global outside the few that the CIFAR-10 format needs."""


# ----------------------------------------------------------------------------------------------------------
# gzip
# ----------------------------------------------------------------------------------------------------------


class GzipStream:
    """An in-memory gzip file (one member or several, as `gzip.decompress` reads them) decompressed on demand.

    `read(n)` returns the next ``n`` bytes of the content (fewer only at its end) and never decompresses more
    than it returns. A stream that ends before its end-of-stream marker, fails its CRC or length check, or is
    followed by anything but zero padding or another member raises `DatasetFormatError`.
    """

    def __init__(self, raw: bytes, source: str | os.PathLike[str]) -> None:
        self._source = str(source)
        self._input = bytes(raw)
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._done = False

    def _corrupt(self, why: str) -> DatasetFormatError:
        return DatasetFormatError(f"{self._source}: corrupt or truncated gzip file ({why})")

    def read(self, n: int) -> bytes:
        out = bytearray()
        try:
            while len(out) < n and not self._done:
                data, self._input = (self._input, b"") if self._input else (self._inflater.unconsumed_tail, b"")
                chunk = self._inflater.decompress(data, min(n - len(out), _READ_BLOCK))
                out += chunk
                if self._inflater.eof:
                    rest = self._inflater.unused_data.lstrip(b"\x00")
                    if not rest:
                        self._done = True
                    elif rest[:2] == GZIP_MAGIC:
                        self._inflater, self._input = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
                    else:
                        raise self._corrupt("trailing bytes after the compressed data")
                elif not chunk and not data:
                    raise self._corrupt("it ends before the end-of-stream marker")
        except zlib.error as e:
            raise self._corrupt(str(e)) from None
        return bytes(out)


def gunzip(raw: bytes, source: str | os.PathLike[str], limit: int) -> bytes:
    """The content of gzip file ``raw``; `DatasetFormatError` if it inflates to more than ``limit`` bytes."""
    stream = GzipStream(raw, source)
    content = stream.read(limit)
    if len(content) == limit and stream.read(1):
        raise DatasetFormatError(f"{source}: gzip content exceeds {limit} bytes, more than the format allows")
    return content


def gunzip_idx(raw: bytes, source: str | os.PathLike[str]) -> bytes:
    """The content of a gzipped IDX file, decompressed no further than the size its header declares.

    A content longer than the header declares is refused after one byte more (`DatasetFormatError`, "size
    mismatch"); a header that is not valid is returned as read, for `parse_idx` to say what is wrong with it.
    A declared size beyond deflate's largest ratio (1032:1) is refused before anything is decompressed.
    """
    stream = GzipStream(raw, source)
    head = stream.read(4)
    if len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in _IDX_DTYPES and head[3] > 0:
        head += stream.read(4 * head[3])
    size = idx_size(head)
    if size is None:
        return head
    if size > 1032 * len(raw) + len(head):
        raise DatasetFormatError(
            f"{source}: IDX size mismatch: the header declares {size} bytes, more than {len(raw)} gzipped "
            "bytes can hold"
        )
    content = head + stream.read(size - len(head))
    if len(content) == size and stream.read(1):
        raise DatasetFormatError(
            f"{source}: IDX size mismatch: the gzip stream inflates beyond the {size} bytes its IDX header "
            "declares (refused without decompressing further)"
        )
    return content


# ----------------------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_size(header: bytes) -> int | None:
    """Total file size declared by an IDX header, ``4 + 4 ndim + prod(dims) * itemsize``; None if ``header``
    does not start with a complete, valid header."""
    if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES or header[3] == 0:
        return None
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        return None
    dims = np.frombuffer(header, dtype=">u4", count=ndim, offset=4)
    count = 1
    for d in dims:
        count *= int(d)
    return 4 + 4 * ndim + count * np.dtype(_IDX_DTYPES[header[2]]).itemsize


def parse_idx(buf: bytes, source: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
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
    expected = idx_size(buf[:header])
    if len(buf) != expected:
        raise DatasetFormatError(
            f"{source}: IDX size mismatch: header declares shape {dims} of {dtype.name} "
            f"({expected} bytes in all) but the file has {len(buf)} bytes"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def check_labels(y: np.ndarray, num_classes: int, source: str | os.PathLike[str]) -> None:
    """`DatasetFormatError` unless every label lies in ``[0, num_classes)``."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetFormatError(
            f"{source}: labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------------------


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles; only latin-1 is admitted."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode("latin1", errors)


def _numpy_reconstruct() -> Callable[..., object]:
    import importlib

    try:
        module = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        module = importlib.import_module("numpy.core.multiarray")
    reconstruct: Callable[..., object] = module._reconstruct
    return reconstruct


_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Bytes inside protocol-2 pickles written by Python 3 (the official files, written by Python 2, do
    # not need it); restricted to latin-1.
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `_PICKLE_ALLOWED`; any other raises `UnsafePickleError`."""

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


def _get(d: dict[object, object], key: str) -> object:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_batch(
    buf: bytes, source: str | os.PathLike[str] = "<bytes>", labels: str = "labels", classes: int = CIFAR_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR python batch: a pickled dict with ``data`` uint8 ``(n, 3072)`` and the label list ``labels``
    (CIFAR-10: ``labels``; CIFAR-100: ``fine_labels`` (100 classes) or ``coarse_labels`` (20)).

    Returns images uint8 ``(n, 3, 32, 32)`` (rows are channel-major: 1024 red, 1024 green, 1024 blue)
    and labels int64 ``(n,)`` in ``[0, classes)``. Unpickling admits only numpy's array reconstruction.
    """
    label_key = labels
    source = str(source)
    try:
        obj = RestrictedUnpickler(io.BytesIO(buf), source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # any parse failure of a corrupt or truncated pickle
        raise DatasetFormatError(f"{source}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{source}: a CIFAR-10 batch must be a dict, got {type(obj).__name__}")
    data, labels_list = _get(obj, "data"), _get(obj, label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFormatError(f"{source}: 'data' must be a uint8 array of shape (n, 3072), got {desc}")
    if not isinstance(labels_list, list | tuple | np.ndarray):
        raise DatasetFormatError(f"{source}: {label_key!r} must be a list of ints, got {type(labels_list).__name__}")
    try:
        y = np.asarray(labels_list, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetFormatError(f"{source}: {label_key!r} must be a list of ints") from None
    if y.shape != (data.shape[0],):
        raise DatasetFormatError(f"{source}: {data.shape[0]} images but labels of shape {y.shape}")
    check_labels(y, classes, source)
    return data.reshape(-1, 3, 32, 32), y


def read_cifar_archive(
    raw: bytes, source: str | os.PathLike[str], members: Iterable[str], limit: int = CIFAR_BATCH_LIMIT
) -> dict[str, bytes]:
    """The named members of a (gzipped or plain) tar archive, read as a stream in memory.

    Nothing is extracted to disk; other members are skipped. A wanted member larger than `limit` bytes (by its
    tar header; default `CIFAR_BATCH_LIMIT`, twice a CIFAR-10 batch) is refused before it is read. Missing
    members are simply absent from the result.
    """
    wanted = set(members)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
            for member in tar:
                if member.name not in wanted or not member.isfile():
                    continue
                if member.size > limit:
                    raise DatasetFormatError(
                        f"{source}:{member.name}: {member.size} bytes, more than a CIFAR batch can hold ({limit})"
                    )
                f = tar.extractfile(member)
                if f is None:  # pragma: no cover - regular files always have a reader
                    continue
                out[member.name] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetFormatError(f"{source}: corrupt or truncated tar archive ({e})") from None
    return out
