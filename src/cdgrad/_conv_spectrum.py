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


_DFT_MAX_TAPS = 32  # kernels with more taps than this take the FFT (its cost grows with log(n_h n_w), not taps)
_BASES: dict[tuple[object, ...], Tensor] = {}


def _roots(taps: tuple[int, int], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` (float64) of the phase ``-2 pi (u a / n_h + v b / n_w)`` for the half-spectrum
    frequencies ``(u, v)`` (rows, ``v`` fastest) and the taps ``(a, b)`` (columns, ``b`` fastest).

    The turn is taken from exact integer products reduced modulo n; at multiples of a quarter turn the values are
    exactly 0 and +-1, as in the FFT (``sin(pi)`` rounds to 1e-16, and such residues, squared in a Gram
    iteration, fall into the float32 denormals and slow every product down)."""
    (kh, kw), (n_h, n_w) = taps, size
    u = torch.arange(n_h, dtype=torch.int64)[:, None, None, None]
    v = torch.arange(n_w // 2 + 1, dtype=torch.int64)[None, :, None, None]
    a = torch.arange(kh, dtype=torch.int64)[None, None, :, None]
    b = torch.arange(kw, dtype=torch.int64)[None, None, None, :]
    turn = (((u * a) % n_h) * n_w + ((v * b) % n_w) * n_h).reshape(-1, kh * kw)  # in units of 1 / (n_h n_w)
    phase = -2.0 * math.pi * (turn.double() / (n_h * n_w))
    cos, sin = torch.cos(phase), torch.sin(phase)
    quarter = (4 * turn) % (n_h * n_w) == 0
    k = ((4 * turn) // (n_h * n_w)) % 4  # e^{-i k pi / 2}: 1, -i, -1, i
    exact_cos = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[k]
    exact_sin = torch.tensor([0.0, -1.0, 0.0, 1.0], dtype=torch.float64)[k]
    return torch.where(quarter, exact_cos, cos), torch.where(quarter, exact_sin, sin)


def _cached(key: tuple[object, ...], make: Any) -> Tensor:
    basis = _BASES.get(key)
    if basis is None:
        basis = make()
        if len(_BASES) >= 64:
            _BASES.clear()
        _BASES[key] = basis
    return basis


def _dft_basis(taps: tuple[int, int], size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``E[(u, v), (a, b)] = exp(-2 pi i (u a / n_h + v b / n_w))``, shape ``(n_h (n_w // 2 + 1), kh kw)``; cached."""

    def make() -> Tensor:
        cos, sin = _roots(taps, size)
        return torch.complex(cos, sin).to(dtype=dtype, device=device)

    return _cached(("complex", taps, size, dtype, device), make)


def planar_dft_basis(taps: tuple[int, int], size: tuple[int, int], dtype: torch.dtype, width: int) -> Tensor:
    """The DFT basis as real planes, shape ``(kh kw, 2, F_pad)``: ``[t, 0, f] = cos``, ``[t, 1, f] = -sin`` of the
    phase ``2 pi (u a / n_h + v b / n_w)`` of tap ``t = (a, b)`` at frequency ``f = (u, v)``, zero for
    ``f >= F = n_h (n_w // 2 + 1)`` up to the next multiple of ``width``; on the CPU, cached."""

    def make() -> Tensor:
        cos, sin = _roots(taps, size)
        count = cos.shape[0]
        out = torch.zeros(cos.shape[1], 2, -(-count // width) * width, dtype=torch.float64)
        out[:, 0, :count], out[:, 1, :count] = cos.T, sin.T
        return out.to(dtype)

    return _cached(("planar", taps, size, dtype, width), make)


def half_spectrum(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``P[u, v]`` for ``v = 0 .. n_w // 2`` as a batch of O x I matrices, shape (n_h, n_w//2+1, O, I).

    Small kernels (up to 32 taps) by one matrix product with the DFT basis,
    ``P[u, v] = sum_{a, b} K[:, :, a, b] exp(-2 pi i (u a / n_h + v b / n_w))``, which is contiguous in the
    frequency-major layout the batched products want; larger ones by `torch.fft.rfft2` (the two are tested equal).
    """
    w = weight.to(work_dtype(weight))
    if needs_fold(w.shape, size):
        w = fold_kernel(w, size)
    o, i, kh, kw = w.shape
    if kh * kw <= _DFT_MAX_TAPS:
        complex_dtype = torch.complex128 if w.dtype == torch.float64 else torch.complex64
        basis = _dft_basis((kh, kw), size, complex_dtype, w.device)
        spectrum = basis @ w.reshape(o * i, kh * kw).T.to(complex_dtype)
        return spectrum.reshape(size[0], size[1] // 2 + 1, o, i)
    return half_spectrum_fft(w, size)


def half_spectrum_fft(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """`half_spectrum` by `torch.fft.rfft2` of the zero-padded (folded) kernel, a permuted view."""
    w = weight.to(work_dtype(weight))
    if needs_fold(w.shape, size):
        w = fold_kernel(w, size)
    out: Tensor = torch.fft.rfft2(w, s=size).permute(2, 3, 0, 1)
    return out
