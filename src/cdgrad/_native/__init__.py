"""Loader for the small C kernels in `kernels.c` (the CPU fast path).

On first use the kernel is compiled with the system C compiler (`$CC`, else `cc`) into a per-user cache
(`$CDGRAD_CACHE`, else `~/.cache/cdgrad`) keyed by the source, the compiler and this CPU, and loaded with
ctypes.  No compiler, a failed build, or `CDGRAD_NATIVE=0` leaves `library()` returning None, and every
caller falls back to the plain-PyTorch reference path, which computes the same result.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from array import array
from pathlib import Path

_SOURCE = Path(__file__).with_name("kernels.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(compiler: str, target: Path) -> None:
    base = [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-std=c99", str(_SOURCE)]
    errors = []
    for extra in (["-fopenmp"], []):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run(base + extra + ["-o", str(out)], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders never see a half-written library
                return
            errors.append(proc.stderr.strip()[-500:])
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when the native path is unavailable or disabled."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("CDGRAD_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            return None
        try:
            source = _SOURCE.read_bytes()
            key = hashlib.sha256(
                source + compiler.encode() + _cpu_signature().encode() + platform.platform().encode()
            ).hexdigest()[:20]
            cache = Path(os.environ.get("CDGRAD_CACHE", Path.home() / ".cache" / "cdgrad")) / "native"
            cache.mkdir(parents=True, exist_ok=True)
            target = cache / f"kernels-{key}.so"
            if not target.exists():
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
            lib.cdg_run.restype = ctypes.c_int
            lib.cdg_run.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int32]
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means: use the reference path
            warnings.warn(f"cdgrad: native CPU kernels unavailable ({exc}); using the PyTorch path", stacklevel=2)
            _lib = None
        return _lib


H0, SOBOLEV = 0, 1
_LONG_AXIS = 1024  # float32 data along longer axes is accumulated in double


class Jobs:
    """A batch of kernel jobs, each on C-ordered (B, N, M) memory, run by one call of the compiled kernel."""

    __slots__ = ("src", "dst", "dims", "params", "kinds")

    def __init__(self) -> None:
        self.src: list[int] = []
        self.dst: list[int] = []
        self.dims: list[int] = []
        self.params: list[float] = []
        self.kinds: list[int] = []

    def add(
        self, src: int, dst: int, b: int, n: int, m: int, inv: float, beta: float, metric: int, is_double: bool
    ) -> None:
        """out = metric gradient (coefficient `inv`) + beta * f along N; dst may equal src."""
        self.src.append(src)
        self.dst.append(dst)
        self.dims += (b, n, m)
        self.params += (inv, beta)
        self.kinds.append(3 * metric + (2 if is_double else (1 if n > _LONG_AXIS else 0)))

    def __len__(self) -> int:
        return len(self.src)

    def run(self, num_threads: int) -> None:
        lib = library()
        assert lib is not None
        arrays = (
            array("q", self.src),
            array("q", self.dst),
            array("q", self.dims),
            array("d", self.params),
            array("i", self.kinds),
        )
        status = lib.cdg_run(len(self.src), *(a.buffer_info()[0] for a in arrays), num_threads)
        if status != 0:
            raise MemoryError("cdgrad native kernel could not allocate its work list")
