"""Loader for the small C kernels in `kernels.c` (the CPU fast path).

On first use the kernel is compiled with the system C compiler (`$CC`, else `cc`, else `gcc`) into a per-user
cache (`$CDGRAD_CACHE`, else `~/.cache/cdgrad` when unset or empty; subfolder `native/`) keyed by the source, the
compiler and this CPU, and loaded with ctypes.

What is loaded is checked first.  A build writes `kernels-<key>.so`, then the manifest `kernels-<key>.json` (its
size and SHA-256); each is written to a temporary file, fsynced and renamed into place.  Before `ctypes.CDLL`
the library must match its manifest: a missing or unreadable manifest, or a library of another size or hash
(a build cut short by a power cut, a tampered file), is rebuilt once.  What is mapped is a private copy of the
checked bytes, unlinked once loaded: a later build, or anyone writing over the published file in place, cannot
reach a running process.  Builds hold a lock file, so processes
starting together build once and all load a complete library; temporary folders left by killed builds are
removed.  A cache folder that cannot be written gives a warning and a build in a private temporary folder.

No compiler, or `CDGRAD_NATIVE=0`, leaves `library()` returning None silently; a failed build returns None with a
warning naming the file.  Every caller then falls back to the plain-PyTorch reference path, which solves the
same equations (the two sum in different orders, so results agree to round-off, not bit for bit).
`status()` says which path runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

from cdgrad._files import fsync_dir, fsync_file

if sys.platform != "win32":
    import fcntl

_SOURCE = Path(__file__).with_name("kernels.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""  # why the reference path runs, when it does
_BUILD_PREFIX = ".build-"


class BuildError(RuntimeError):
    """The C compiler could not build the kernel library."""


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _disabled() -> bool:
    return os.environ.get("CDGRAD_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _cache_dir() -> Path:
    """`$CDGRAD_CACHE/native`, or `~/.cache/cdgrad/native` when the variable is unset or empty (or blank)."""
    chosen = os.environ.get("CDGRAD_CACHE", "").strip()
    return (Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "cdgrad") / "native"


_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99")
# Tried first, dropped if the compiler refuses them: -ffp-contract=fast (a * b + c as one fused multiply-add; ISO C
# modes such as -std=c99 turn it off otherwise), -mprefer-vector-width=512 (where the CPU has 512-bit vectors, a
# 64-column chunk's running sums stay in registers; an x86 option), -fopenmp (threads).
_TUNING = ("-ffp-contract=fast", "-mprefer-vector-width=512")


def _key(compiler: str) -> str:
    build = " ".join((compiler, *_FLAGS, *_TUNING, _cpu_signature(), platform.platform()))
    return hashlib.sha256(_SOURCE.read_bytes() + build.encode()).hexdigest()[:20]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------- files on disk
def _digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file."""
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _check(so: Path, manifest: Path) -> tuple[bytes | None, str | None]:
    """(the library's bytes, None) when `so` has the size and SHA-256 its manifest records, else (None, what is
    wrong).  The bytes returned are the ones checked: what is loaded is a copy of them (`_open`)."""
    try:
        raw = manifest.read_bytes()
    except FileNotFoundError:
        return None, f"no manifest {manifest}"
    except OSError as exc:
        return None, f"unreadable manifest {manifest} ({exc})"
    try:
        record = json.loads(raw)
        size, sha256, name = record["size"], record["sha256"], record["library"]
    except (ValueError, KeyError, TypeError):
        return None, f"malformed manifest {manifest}"
    if type(size) is not int or not isinstance(sha256, str) or name != so.name:
        return None, f"malformed manifest {manifest}"
    try:
        data = so.read_bytes()
    except FileNotFoundError:
        return None, f"no library {so}"
    except OSError as exc:
        return None, f"unreadable library {so} ({exc})"
    if len(data) != size:
        return None, f"{so} has {len(data)} bytes, its manifest records {size}"
    if hashlib.sha256(data).hexdigest() != sha256:
        return None, f"{so} does not match the SHA-256 in its manifest"
    return data, None


_LOAD_PREFIX = ".load-"
_ORPHAN_AGE_S = 600.0  # a private copy is unlinked right after loading; an older one was left by a killed process


def _private_copy(data: bytes, folder: Path) -> Path:
    """`data` written to a new file of its own in `folder`, else in the temporary folder (a path nothing else
    writes: builds publish under other names, by rename)."""
    for where in (folder, None):
        try:
            fd, name = tempfile.mkstemp(prefix=_LOAD_PREFIX, suffix=".so", dir=where)
        except OSError:
            continue
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(name)
            continue
        return Path(name)
    raise OSError(f"no folder to write a private copy of the kernel library ({folder} or the temporary folder)")


def _remove_orphans(folder: Path) -> None:
    """Private copies older than `_ORPHAN_AGE_S`, left by processes killed between writing and loading them."""
    now = time.time()
    with contextlib.suppress(OSError):
        for path in folder.glob(f"{_LOAD_PREFIX}*.so"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _ORPHAN_AGE_S:
                    path.unlink()


def _dlopen(so: Path, data: bytes) -> ctypes.CDLL:
    """Load a private copy of the checked bytes `data` of `so`, unlinked once mapped.

    The published file is never what is mapped: a later rebuild (a rename over it) or anyone writing over or
    truncating it in place cannot reach the pages a running process executes (which would end it with SIGBUS).
    Where no private copy can be written or loaded (no writable folder, a temporary folder mounted noexec), the
    published file itself is loaded.
    """
    try:
        copy = _private_copy(data, so.parent)
    except OSError:
        return ctypes.CDLL(str(so))
    try:
        return ctypes.CDLL(str(copy))
    except OSError:
        return ctypes.CDLL(str(so))
    finally:
        with contextlib.suppress(OSError):
            copy.unlink()
        _remove_orphans(so.parent)


def _open(so: Path, manifest: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) when `so` matches its manifest and loads, else (None, what is wrong)."""
    data, problem = _check(so, manifest)
    if data is None:
        return None, problem
    try:
        lib = _dlopen(so, data)
        lib.cdg_run.restype = ctypes.c_int
        lib.cdg_run.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int32]
        lib.cdg_run_one.restype = ctypes.c_int
        lib.cdg_run_one.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int32]
        lib.cdg_power.restype = ctypes.c_int
        lib.cdg_power.argtypes = [ctypes.c_int64] * 8 + [ctypes.c_int32] * 3
    except (OSError, AttributeError) as exc:
        return None, f"{so} could not be loaded ({exc})"
    return lib, None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed); the system releases it if the process dies.

    Where the file system has no locks (some network mounts), go on unlocked: the renames alone still keep the
    library and its manifest complete, at worst built twice.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform != "win32":
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- building
def _compile(compiler: str, out: Path) -> None:
    base = [compiler, *_FLAGS, str(_SOURCE), "-lm"]
    errors = []
    for extra in (["-fopenmp", *_TUNING], ["-fopenmp"], [*_TUNING], []):
        try:
            proc = subprocess.run(base + extra + ["-o", str(out)], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        if proc.returncode == 0 and out.is_file():
            return
        errors.append(proc.stderr.strip()[-500:] or f"{compiler} exited with status {proc.returncode}")
    raise BuildError("; ".join(errors))


def _build(compiler: str, so: Path, manifest: Path) -> None:
    """Compile into a temporary folder beside `so`, then publish the library and then its manifest.

    Each file is fsynced before an atomic rename, and the folder after it, so a power cut leaves either the
    old files or complete new ones (a new library beside an old manifest fails the check and is rebuilt).
    Raises BuildError if the compiler fails, OSError if the folder cannot be written.
    """
    folder = so.parent
    for orphan in folder.glob(f"{_BUILD_PREFIX}{so.stem}-*"):  # left by killed builds; the caller holds the lock
        shutil.rmtree(orphan, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{_BUILD_PREFIX}{so.stem}-", dir=folder) as tmp:
        out, record = Path(tmp) / so.name, Path(tmp) / manifest.name
        _compile(compiler, out)
        fsync_file(out)
        size, sha256 = _digest(out)
        with open(record, "w") as fh:
            json.dump({"library": so.name, "size": size, "sha256": sha256}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(out, so)
        fsync_dir(folder)
        os.replace(record, manifest)
        fsync_dir(folder)


def _private_build(compiler: str, name: str) -> tuple[ctypes.CDLL | None, str]:
    """Build and load in a private temporary folder, removed once loaded (the loaded mapping outlives it)."""
    try:
        with tempfile.TemporaryDirectory(prefix="cdgrad-native-") as tmp:
            so = Path(tmp) / name
            manifest = so.with_suffix(".json")
            _build(compiler, so, manifest)
            lib, problem = _open(so, manifest)
    except (BuildError, OSError) as exc:
        _warn(
            f"cdgrad: native CPU kernels unavailable (the build in a temporary folder failed: {exc}); "
            "using the PyTorch path"
        )
        return None, f"build failed: {exc}"
    if lib is None:
        _warn(f"cdgrad: native CPU kernels unavailable ({problem}); using the PyTorch path")
        return None, f"{problem}"
    return lib, ""


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why the reference path runs)."""
    if _disabled():
        return None, f"disabled by CDGRAD_NATIVE={os.environ.get('CDGRAD_NATIVE', '')}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found"
    folder = _cache_dir()
    try:
        key = _key(compiler)
    except OSError as exc:
        _warn(f"cdgrad: native CPU kernels unavailable ({exc}); using the PyTorch path")
        return None, f"cannot read {_SOURCE}"
    so, manifest = folder / f"kernels-{key}.so", folder / f"kernels-{key}.json"
    lib, problem = _open(so, manifest)
    if lib is not None:
        return lib, ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / f"kernels-{key}.lock"):
            lib, problem = _open(so, manifest)  # another process may have built it meanwhile
            if lib is not None:
                return lib, ""
            damaged = manifest.exists() or problem is not None and "could not be loaded" in problem
            _build(compiler, so, manifest)
            lib, after = _open(so, manifest)
    except BuildError as exc:
        _warn(f"cdgrad: native CPU kernels unavailable (could not build {so}: {exc}); using the PyTorch path")
        return None, f"build of {so} failed"
    except OSError as exc:
        _warn(
            f"cdgrad: cannot write the native kernel cache {folder} ({exc}); building in a private temporary "
            "folder (set CDGRAD_CACHE to a writable folder to keep the build)"
        )
        return _private_build(compiler, so.name)
    if lib is None:
        _warn(f"cdgrad: native CPU kernels unavailable (rebuilt, but {after}); using the PyTorch path")
        return None, f"{after}"
    if damaged:
        _warn(f"cdgrad: the native kernel library did not pass its check ({problem}); rebuilt {so}")
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when the native path is unavailable or disabled."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            _lib, _reason = _load()
        except Exception as exc:  # noqa: BLE001 - any other failure also means: use the reference path
            _warn(f"cdgrad: native CPU kernels unavailable ({exc}); using the PyTorch path")
            _lib, _reason = None, f"{type(exc).__name__}: {exc}"
        return _lib


def status() -> str:
    """Which path CPU tensors take: "native" (the compiled kernel) or "reference (<why>)" (plain PyTorch).

    Builds or loads the kernel on first call, as `library()` does.
    """
    if library() is not None:
        return "native"
    return f"reference ({_reason or 'native kernels unavailable'})"


H0, SOBOLEV, LAPLACIAN, CENTRALIZE = 0, 1, 2, 3
_LONG_AXIS = 1024  # float32 data along longer axes is accumulated in double


Static = bytes  # a job's layout, coefficients and kernel code, packed as kernels.c's job_t (`Jobs.static`)
_JOB = struct.Struct("=3q3d2i")  # job_t: B, N, M, p0, p1, p2, kind, unused


class Jobs:
    """A batch of kernel jobs, each on C-ordered (B, N, M) memory, run by one call of the compiled kernel.

    A job is its source and destination addresses plus its static part (shape, coefficients, kernel code), packed
    once as the C code reads it (`Jobs.static`), so that a caller can keep the static part of a tensor layout it
    has seen before and a step costs one address per tensor."""

    __slots__ = ("src", "dst", "statics")

    def __init__(self, in_place: bool = False) -> None:
        """`in_place`: every job writes where it reads (`dst` is `src`, one list)."""
        self.src: list[int] = []
        self.dst: list[int] = self.src if in_place else []
        self.statics: list[Static] = []

    @staticmethod
    def static(b: int, n: int, m: int, p0: float, p1: float, metric: int, is_double: bool, p2: float = 0.0) -> Static:
        """The packed static part of a job.  H0 / Sobolev: `out = metric gradient (p0 = inv) + p1 * f` along N;
        Laplacian: `(I - sigma L)^-1 f` along N with (p0, p1, p2) = (r, 1 - r, r / sigma) (kernels.c);
        centralisation: each of the b rows of length n (m = 1) minus its mean."""
        return _JOB.pack(b, n, m, p0, p1, p2, Jobs.kind(metric, n, is_double), 0)

    def add(
        self,
        src: int,
        dst: int,
        b: int,
        n: int,
        m: int,
        p0: float,
        p1: float,
        metric: int,
        is_double: bool,
        p2: float = 0.0,
    ) -> None:
        """One job (`Jobs.static` describes the arguments); dst may equal src."""
        self.add_static(src, dst, self.static(b, n, m, p0, p1, metric, is_double, p2))

    def add_static(self, src: int, dst: int, static: Static) -> None:
        """One job from a packed static part (`Jobs.static`)."""
        self.src.append(src)
        if self.dst is not self.src:
            self.dst.append(dst)
        elif dst != src:
            raise ValueError("an in-place job list takes jobs whose destination is their source")
        self.statics.append(static)

    def __len__(self) -> int:
        return len(self.src)

    @staticmethod
    def kind(metric: int, n: int, is_double: bool) -> int:
        """The kernel's code for `metric` on an axis of length n (kernels.c: 3 * metric + variant)."""
        return 3 * metric + (2 if is_double else (1 if n > _LONG_AXIS else 0))

    def run(self, num_threads: int) -> None:
        lib = library()
        assert lib is not None
        src = array("q", self.src)
        dst = src if self.dst is self.src else array("q", self.dst)
        status = lib.cdg_run(len(src), src.buffer_info()[0], dst.buffer_info()[0], b"".join(self.statics), num_threads)
        if status != 0:
            raise MemoryError("cdgrad native kernel could not allocate its work list")


def run_one(src: int, dst: int, static: Static, num_threads: int) -> None:
    """One job (`Jobs.static`) by one call without a job list: the pure functions' path."""
    lib = library()
    assert lib is not None
    if lib.cdg_run_one(src, dst, static, num_threads) != 0:
        raise MemoryError("cdgrad native kernel could not allocate its work list")


POWER_WIDTH = {False: 16, True: 8}  # frequencies per vector (float32, float64): the basis is padded to a multiple


def power_iteration(
    f: int,
    o: int,
    i: int,
    taps: int,
    kernel: int,
    basis: int,
    x: int,
    ratio: int,
    iters: int,
    is_double: bool,
    num_threads: int,
) -> None:
    """`iters` per-frequency power iterations from the kernel's taps (addresses of C-ordered memory; kernels.c,
    `cdg_power`): kernel (O, I, taps), basis (taps, 2, F padded to `POWER_WIDTH`), x (F, I) complex, updated in
    place, ratio (F,) float64 receiving ``||P^H P x||^2 / ||P x||^2``."""
    lib = library()
    assert lib is not None
    if lib.cdg_power(f, o, i, taps, kernel, basis, x, ratio, iters, int(is_double), num_threads) != 0:
        raise MemoryError("cdgrad native kernel could not allocate its work buffers")
