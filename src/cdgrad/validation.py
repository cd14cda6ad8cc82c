"""Argument checks shared by every module of cdgrad, the experiment toolkit included.

One rule everywhere: a value of the wrong type raises `TypeError`, a value of the right type outside the
accepted set raises `ValueError`, and every message names the parameter and what it accepts. Numbers may be
Python or NumPy scalars (`numbers.Real` / `numbers.Integral`); `bool` is never a number. Each check returns the
value normalised to a plain Python type.

Sizes and bin counts have no fixed upper bound, but what they ask for must fit: `check_memory` compares the
memory a call estimates it needs with what is available on its device (`available_memory`) before anything is
allocated, and refuses with `MemoryRequestError` (a `ValueError`) naming the parameter.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "check_real",
    "check_positive",
    "check_nonnegative",
    "check_int",
    "check_bool",
    "check_choice",
    "check_pair",
    "check_tensor",
    "check_grad",
    "available_memory",
    "check_memory",
    "MemoryRequestError",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32, float64"
_FLOAT_SET = frozenset(FLOAT_DTYPES)

T = TypeVar("T")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_real(value: Any) -> bool:
    t = type(value)
    if t is float or t is int:  # the common case, without the ABC check
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    if type(value) is int:
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bounds(
    minimum: float | None,
    maximum: float | None,
    fmt: Callable[[Any], str],
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> str:
    """The accepted range as message text: " in [0, 1)", " > 0", " <= 5" or "" (no bound)."""
    if minimum is not None and maximum is not None:
        low, high = "(" if exclusive_minimum else "[", ")" if exclusive_maximum else "]"
        return f" in {low}{fmt(minimum)}, {fmt(maximum)}{high}"
    if minimum is not None:
        return f" {'>' if exclusive_minimum else '>='} {fmt(minimum)}"
    if maximum is not None:
        return f" {'<' if exclusive_maximum else '<='} {fmt(maximum)}"
    return ""


def check_real(value: Any, name: str, *, minimum: float | None = None, strict: bool = False) -> float:
    """A finite real number (>= `minimum`, or > it when `strict`), as a Python float (`check_interval`)."""
    if (
        type(value) is float
        and math.isfinite(value)
        and (minimum is None or (value > minimum if strict else value >= minimum))
    ):
        return value  # the common case, without building a message
    return check_interval(value, name, minimum=minimum, exclusive_minimum=strict)


def check_positive(value: Any, name: str) -> float:
    """A finite real number > 0."""
    return check_real(value, name, minimum=0.0, strict=True)


def check_nonnegative(value: Any, name: str) -> float:
    """A finite real number >= 0."""
    return check_real(value, name, minimum=0.0)


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer in [`minimum`, `maximum`] (either bound optional), as a Python int."""
    integral = _is_integral(value)
    if integral:
        out = int(value)
        if (minimum is None or out >= minimum) and (maximum is None or out <= maximum):
            return out
    accepted = "an int" + _bounds(minimum, maximum, str)
    if not integral:
        raise TypeError(f"{name} must be {accepted}, got {_type_name(value)} {value!r}")
    raise ValueError(f"{name} must be {accepted}, got {int(value)}")


def check_bool(value: Any, name: str) -> bool:
    """True or False (NumPy booleans included)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_type_name(value)} {value!r}")


def check_choice(value: T, name: str, accepted: Iterable[T]) -> T:
    """One of `accepted` (compared with ==; a string is never matched by a non-string)."""
    options = accepted if isinstance(accepted, tuple) else tuple(accepted)
    if type(value) is str and value in options:  # the common case
        return value
    if isinstance(value, str) != any(isinstance(o, str) for o in options) and options:
        raise TypeError(f"{name} must be one of {options}, got {_type_name(value)} {value!r}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_pair(value: Any, name: str, minimum: int = 1) -> tuple[int, int]:
    """An int >= `minimum`, or a pair of them, as a pair."""
    message = f"{name} must be an int >= {minimum} or a pair of ints >= {minimum}, got {value!r}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != 2:
            raise ValueError(message)
    else:
        items = (value, value)
    for v in items:
        if not _is_integral(v):
            raise TypeError(message)
        if int(v) < minimum:
            raise ValueError(message)
    return int(items[0]), int(items[1])


def check_tensor(value: Any, name: str, *, floating: bool = True, dims: Sequence[int] | None = None) -> Tensor:
    """A dense (strided) tensor, of a floating dtype when `floating`, with a dimension count in `dims`."""
    if (
        type(value) is Tensor
        and value.layout is torch.strided
        and (not floating or value.dtype in _FLOAT_SET)
        and (dims is None or value.dim() in dims)
    ):
        return value  # the common case, checked in one go
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(value)}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}; sparse is not supported")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype ({_FLOAT_NAMES}), got {value.dtype}")
    if dims is not None and value.dim() not in dims:
        accepted = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {accepted} dims, got shape {tuple(value.shape)}")
    return value


def check_grad(value: Any, name: str = "grad") -> Tensor:
    """A dense floating-point gradient tensor (any number of dims)."""
    return check_tensor(value, name)


def check_interval(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """A finite real number in the interval from `minimum` to `maximum` (either optional), as a Python float.

    Each bound is inclusive unless its `exclusive_*` flag is set; the message writes the interval as
    `> 0`, `>= 0`, `in [0, 1)` and so on.
    """
    bound = _bounds(minimum, maximum, "{:g}".format, exclusive_minimum, exclusive_maximum)
    if not _is_real(value):
        raise TypeError(f"{name} must be a finite real number{bound}, got {_type_name(value)} {value!r}")
    try:
        out = float(value)
    except OverflowError:  # an int too large for a float
        out = math.inf
    below = minimum is not None and (out <= minimum if exclusive_minimum else out < minimum)
    above = maximum is not None and (out >= maximum if exclusive_maximum else out > maximum)
    if not math.isfinite(out) or below or above:
        raise ValueError(f"{name} must be a finite real number{bound}, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------ memory requests
ALWAYS_FITS = 256 * 2**20  # requests up to this many bytes are not checked (no file is read on the fast path)


class MemoryRequestError(ValueError, MemoryError):
    """A parameter asks for more memory than its device has available: a `ValueError` (the value is refused)
    that is also a `MemoryError` (what an allocation that cannot be served raises)."""


def _meminfo_available() -> int | None:
    """`MemAvailable` of /proc/meminfo in bytes (Linux), else the free physical pages (`os.sysconf`)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return int(text)
    except (OSError, ValueError):  # absent, unreadable, or "max" (no limit)
        return None


def _cgroup_headroom() -> int | None:
    """The memory this process's control group may still use (limit - usage, cgroup v2 or v1); None if unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
            return max(limit - usage, 0)
    return None


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on `device` (default the CPU); None where that is unknown.

    CPU: `MemAvailable` from /proc/meminfo (else `os.sysconf`'s free pages), bounded by the control group's
    headroom; CUDA: the driver's free memory plus what torch's caching allocator holds unused; the meta device
    (no storage) and other devices: None.
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        found = [m for m in (_meminfo_available(), _cgroup_headroom()) if m is not None]
        return min(found) if found else None
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free) + int(torch.cuda.memory_reserved(dev)) - int(torch.cuda.memory_allocated(dev))
    return None


def _bytes(n: float) -> str:
    """`n` bytes in words: `512 MiB`, `3.6 TiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover - the loop always returns


def check_memory(
    nbytes: float, name: str, value: Any, *, device: torch.device | str | None = None, what: str = ""
) -> None:
    """Refuse a call that needs about `nbytes` bytes on `device` when fewer are available (`available_memory`).

    Raises `MemoryRequestError` naming the parameter `name` and its `value`, the estimate and what is available;
    requests up to `ALWAYS_FITS` bytes, and devices whose free memory is unknown, are not checked.
    """
    if nbytes <= ALWAYS_FITS:
        return
    free = available_memory(device)
    if free is None or nbytes <= free:
        return
    where = torch.device("cpu" if device is None else device)
    raise MemoryRequestError(
        f"{name}={value!r} needs about {_bytes(nbytes)} of memory{f' ({what})' if what else ''}, more than the "
        f"{_bytes(free)} available on {where}; accepted: a value of {name} whose needs fit in that memory"
    )
