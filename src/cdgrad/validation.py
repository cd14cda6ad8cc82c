"""Argument checks shared by every module of cdgrad, the experiment toolkit included.

One rule everywhere: a value of the wrong type raises `TypeError`, a value of the right type outside the
accepted set raises `ValueError`, and every message names the parameter and what it accepts. Numbers may be
Python or NumPy scalars (`numbers.Real` / `numbers.Integral`); `bool` is never a number. Each check returns the
value normalised to a plain Python type.
"""

from __future__ import annotations

import math
import numbers
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
