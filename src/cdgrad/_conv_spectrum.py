"""Shared checks and the Fourier block-diagonalisation of stride-1 circular convolutions.

Used by `cdgrad.spectral` (exact singular values and projections) and `cdgrad.norm_bounds` (fast bounds).
A conv weight has shape ``(O, I, kh, kw)``; ``P[u, v] = FFT2(weight zero-padded to n_h x n_w)[:, :, u, v]`` is the
``O x I`` block of the layer's linear map at frequency ``(u, v)`` (docs/spectral.md).

An input smaller than the kernel (``n < k`` in a dimension) is allowed: on an ``n``-periodic grid taps whose offsets
agree modulo ``n`` hit the same input pixel, so the convolution is exactly the one by the kernel folded modulo ``n``,
``fold(K)[..., a mod n_h, b mod n_w] = sum K[..., a, b]``, whose FFT is the spectrum (``fold`` is the identity when
``n >= k``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .validation import check_memory, check_positive, check_tensor

# ----------------------------------------------------------------------------- validation


def check_weight(weight: Any, name: str = "weight") -> None:
    """A non-empty 4-D floating conv weight (O, I, kh, kw) with finite entries."""
    check_tensor(weight, name)
    if weight.dim() != 4:
        raise ValueError(f"{name} must be a 4-D conv weight of shape (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(weight.shape)}")
    check_finite(weight, name)


def check_finite(weight: Tensor, name: str) -> None:
    """NaN or infinite entries (a diverged model) have no singular values: a clear error instead of LinAlgError."""
    if not bool(torch.isfinite(weight.detach()).all()):
        bad = int((~torch.isfinite(weight.detach())).sum())
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN or inf; has training diverged?); accepted: finite weights"
        )


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def checked_input_size(input_size: Any, weight: Tensor, name: str = "input_size") -> tuple[int, int]:
    """Normalise ``input_size`` (int or (n_h, n_w)) and check it is positive (smaller than the kernel: folded)."""
    if is_int(input_size):
        size = (int(input_size), int(input_size))
    elif (
        isinstance(input_size, Sequence)
        and not isinstance(input_size, str)
        and len(input_size) == 2
        and all(is_int(s) for s in input_size)
    ):
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (n_h, n_w), got {input_size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"{name} must be positive in each dimension, got {size}")
    return size


# Memory a computation holds at its peak, in half spectra (O x I x n_h x (n_w // 2 + 1) complex numbers): the
# spectrum and its zero-padded input, the copy LAPACK works on and the factors, the correction or the Gram products.
# Peak resident memory measured below these for 1 x 1 to 16 x 16 convs at 512 x 512 and 2048 x 2048 (test_spectral).
SPECTRA_HELD = {"singular_values": 3.0, "operator_norm": 2.5, "clip": 7.0, "gram": 3.5, "power": 3.5}


def spectrum_bytes(shape: Sequence[int], size: tuple[int, int], dtype: torch.dtype, copies: float) -> int:
    """Bytes of `copies` half spectra of a conv weight of `shape` (O, I, kh, kw) and `dtype` at `size`, with the
    per-frequency vectors (singular values, norms, factors' edges): ``n_h (n_w // 2 + 1) (copies O I + 2 (O + I +
    min(O, I)))`` complex numbers (complex128 for float64 weights, else complex64). Memory grows with ``n_h n_w``:
    one complex64 spectrum of a 64 x 64 conv at 8,000 x 8,000 is 64 * 64 * 8,000 * 4,001 * 8 = 1.05e12 bytes."""
    o, i = int(shape[0]), int(shape[1])
    n_h, n_w = size
    item = 16 if dtype == torch.float64 else 8
    return math.ceil(n_h * (n_w // 2 + 1) * (copies * o * i + 2 * (o + i + min(o, i))) * item)


def check_spectrum_memory(
    weight: Tensor, size: tuple[int, int], copies: float, name: str = "input_size", value: Any = None
) -> None:
    """Refuse (`check_memory`, naming `name`) a call whose peak holds about `copies` half spectra of `weight` at
    `size` (`spectrum_bytes`)."""
    o, i = weight.shape[:2]
    check_memory(
        spectrum_bytes(weight.shape, size, weight.dtype, copies),
        name,
        size if value is None else value,
        device=weight.device,
        what=f"the spectrum of a {o} x {i} conv at {size[0]} x {size[1]}",
    )


def check_reshaped_memory(weight: Tensor) -> None:
    """Refuse an SVD of the reshaped kernel ``O x (I kh kw)`` that cannot fit: its copy, U and V^H."""
    o = weight.shape[0]
    n = weight[0].numel()
    item = 8 if work_dtype(weight) == torch.float64 else 4
    check_memory(
        (2 * o * n + min(o, n) * (o + n)) * item,
        "weight.shape",
        tuple(weight.shape),
        device=weight.device,
        what="an SVD of the reshaped kernel",
    )


def checked_max_norm(max_norm: Any) -> float:
    return check_positive(max_norm, "max_norm")


def work_dtype(weight: Tensor) -> torch.dtype:
    """float64 for float64 weights (complex128 spectra), float32 otherwise (complex64)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- spectra


def needs_fold(shape: Sequence[int], size: tuple[int, int]) -> bool:
    """Whether a kernel of spatial ``shape[-2:]`` exceeds ``size`` in a dimension (its taps then fold)."""
    return size[0] < shape[-2] or size[1] < shape[-1]


def fold_kernel(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``fold(K)[..., a mod n_h, b mod n_w] = sum K[..., a, b]``, spatial shape ``min(k, n)`` per dimension."""
    for dim, n in ((-2, size[0]), (-1, size[1])):
        k = weight.shape[dim]
        if k > n:
            m = -(-k // n)  # taps a = q n + r: pad to m n, then sum over q
            pad = [0, 0] * (-1 - dim) + [0, m * n - k]
            padded = torch.nn.functional.pad(weight, pad)
            weight = padded.reshape(*padded.shape[:dim], m, n, *padded.shape[dim:][1:]).sum(dim=dim - 1)
    return weight


def unfold_correction(delta: Tensor, kernel: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The minimum-norm kernel change whose fold is ``delta`` (spatial shape ``min(k, n)``): every tap ``a`` gets
    ``delta[a mod n] / #{a' : a' = a mod n}``, the change of its folded tap split equally among the taps folding
    onto it (the orthogonal projection onto kernels with a given fold)."""
    for dim, k, n in ((-2, kernel[0], size[0]), (-1, kernel[1], size[1])):
        if k > n:
            taps = torch.arange(k, device=delta.device) % n
            count = torch.bincount(taps, minlength=n).to(delta.dtype)
            delta = (delta / count.view([-1] + [1] * (-1 - dim))).index_select(dim, taps)
    return delta


def half_spectrum(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``P[u, v]`` for ``v = 0 .. n_w // 2`` as a batch of O x I matrices, shape (n_h, n_w//2+1, O, I)."""
    w = weight.to(work_dtype(weight))
    if needs_fold(w.shape, size):
        w = fold_kernel(w, size)
    out: Tensor = torch.fft.rfft2(w, s=size).permute(2, 3, 0, 1)
    return out
