"""Shared checks and the Fourier block-diagonalisation of stride-1 circular convolutions.

Used by `cdgrad.spectral` (exact singular values and projections) and `cdgrad.norm_bounds` (fast bounds).
A conv weight has shape ``(O, I, kh, kw)``; ``P[u, v] = FFT2(weight zero-padded to n_h x n_w)[:, :, u, v]`` is the
``O x I`` block of the layer's linear map at frequency ``(u, v)`` (docs/spectral.md).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .validation import check_positive, check_tensor

# ----------------------------------------------------------------------------- validation


def _check_weight(weight: Any, name: str = "weight") -> None:
    """A non-empty 4-D floating conv weight (O, I, kh, kw) with finite entries."""
    check_tensor(weight, name)
    if weight.dim() != 4:
        raise ValueError(f"{name} must be a 4-D conv weight of shape (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(weight.shape)}")
    _check_finite(weight, name)


def _check_finite(weight: Tensor, name: str) -> None:
    """NaN or infinite entries (a diverged model) have no singular values: a clear error instead of LinAlgError."""
    if not bool(torch.isfinite(weight.detach()).all()):
        bad = int((~torch.isfinite(weight.detach())).sum())
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN or inf; has training diverged?); accepted: finite weights"
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _input_size(input_size: Any, weight: Tensor, name: str = "input_size") -> tuple[int, int]:
    """Normalise ``input_size`` (int or (n_h, n_w)) and check it is at least the kernel size."""
    if _is_int(input_size):
        size = (int(input_size), int(input_size))
    elif (
        isinstance(input_size, Sequence)
        and not isinstance(input_size, str)
        and len(input_size) == 2
        and all(_is_int(s) for s in input_size)
    ):
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (n_h, n_w), got {input_size!r}")
    kh, kw = weight.shape[-2:]
    if size[0] < kh or size[1] < kw:
        raise ValueError(f"{name} must be at least the kernel size ({kh}, {kw}) in each dimension, got {size}")
    return size


def _max_norm(max_norm: Any) -> float:
    return check_positive(max_norm, "max_norm")


def _work_dtype(weight: Tensor) -> torch.dtype:
    """float64 for float64 weights (complex128 spectra), float32 otherwise (complex64)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- spectra


def _half_spectrum(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``P[u, v]`` for ``v = 0 .. n_w // 2`` as a batch of O x I matrices, shape (n_h, n_w//2+1, O, I)."""
    w = weight.to(_work_dtype(weight))
    out: Tensor = torch.fft.rfft2(w, s=size).permute(2, 3, 0, 1)
    return out
