"""Exact singular values of convolutional layers, projection onto an operator-norm ball, the dense reference.

A stride-1 convolution with wrap-around (``nn.Conv2d`` with circular padding) of a weight
``K`` of shape ``(O, I, kh, kw)`` on ``I x n_h x n_w`` inputs is a linear map
``R^(I n_h n_w) -> R^(O n_h n_w)``. It is block-circulant, so the 2-D DFT block-diagonalises it
(Sedghi, Gupta and Long, 2019):

    singular values of the layer = union over (u, v) of svd(P[u, v]),
    P[u, v] = FFT2(K zero-padded to n_h x n_w)[:, :, u, v]            (an O x I complex matrix).

Cross-correlation versus convolution and the placement of the padding only conjugate ``P`` or
multiply it by a unit phase, which leaves the singular values unchanged. For a real kernel
``P[-u, -v] = conj(P[u, v])``, so only the half spectrum ``v = 0 .. n_w // 2`` is decomposed
(``torch.fft.rfft2``) and the other half is mirrored.

An input smaller than the kernel (``n < k``) is exact too: the convolution on the ``n``-torus is the one by the
kernel folded modulo ``n`` (taps whose offsets agree modulo ``n`` summed), whose spectrum is decomposed.

The characterisation is exact only for stride 1 and wrap-around; see ``docs/spectral.md`` for
zero padding, stride and the dependence on the input size.

Memory grows with ``O I n_h n_w``: every function here (and in `cdgrad.norm_bounds`) first estimates what it will
hold at its peak (`memory_needed`) and refuses an input size that cannot fit in the available memory of the
weight's device (`cdgrad.validation.MemoryRequestError`, a ValueError naming the size) before allocating.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._conv_spectrum import (
    SPECTRA_HELD,
    check_spectrum_memory,
    check_weight,
    checked_input_size,
    checked_max_norm,
    half_spectrum,
    is_int,
    needs_fold,
    spectrum_bytes,
    unfold_correction,
    work_dtype,
)
from ..norm_bounds import clip_reshaped_norm, conv_norm_gram
from ..validation import check_choice, check_memory

__all__ = [
    "NORM_ESTIMATES",
    "PROJECTIONS",
    "Projection",
    "Size",
    "clip_operator_norm",
    "conv_dense_matrix",
    "conv_operator_norm",
    "conv_singular_values",
    "memory_needed",
]

Size = int | tuple[int, int]


def _mirror(half: Tensor, n_w: int) -> Tensor:
    """Full (n_h, n_w, ...) from the half spectrum, using ``X[u, v] = X[-u, -v]`` for ``v > n_w // 2``."""
    n_h = half.shape[0]
    if n_w // 2 + 1 == n_w:  # n_w in (1, 2): the half spectrum is the full spectrum
        return half
    u = (-torch.arange(n_h, device=half.device)) % n_h
    v = n_w - torch.arange(n_w // 2 + 1, n_w, device=half.device)
    return torch.cat([half, half[u][:, v]], dim=1)


def memory_needed(
    computation: str, weight_shape: Sequence[int], input_size: Size, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes that `computation` holds at its peak for a conv weight of `weight_shape` (O, I, kh, kw) and `dtype`
    at `input_size`: ``n_h (n_w // 2 + 1) (c O I + 2 (O + I + min(O, I)))`` complex numbers (complex128 for float64
    weights, else complex64), ``c`` the half spectra it holds at once (`SPECTRA_HELD`).

    computation: "singular_values" (`conv_singular_values`), "operator_norm" (`conv_operator_norm`), "clip"
    (`clip_operator_norm`), "power" (`cdgrad.norm_bounds.conv_norm_power`) or "gram" (`conv_norm_gram`).
    """
    copies = SPECTRA_HELD[check_choice(computation, "computation", tuple(SPECTRA_HELD))]
    if not (isinstance(weight_shape, Sequence) and len(weight_shape) == 4 and all(is_int(d) for d in weight_shape)):
        raise TypeError(f"weight_shape must be a sequence of 4 ints (O, I, kh, kw), got {weight_shape!r}")
    size = checked_input_size(input_size, torch.empty(0, 0, int(weight_shape[2]), int(weight_shape[3])))
    return spectrum_bytes(weight_shape, size, dtype, copies)


def conv_singular_values(weight: Tensor, input_size: Size, *, per_frequency: bool = False) -> Tensor:
    """All singular values of the stride-1 circular convolution by ``weight`` on ``input_size`` inputs.

    ``sigma = union_{u, v} svd(P[u, v])``, ``P[u, v] = FFT2(weight zero-padded to n_h x n_w)[:, :, u, v]``.

    Args:
        weight: conv weight (O, I, kh, kw), as ``nn.Conv2d`` stores it.
        input_size: ``n`` or ``(n_h, n_w)``, positive (smaller than ``(kh, kw)``: the folded kernel's map).
        per_frequency: if False (default) return the ``n_h * n_w * min(O, I)`` singular values as a
            1-D tensor sorted in descending order; if True return shape ``(n_h, n_w, min(O, I))``,
            entry ``[u, v]`` holding the singular values of ``P[u, v]`` in descending order.

    Computed in float64 (complex128) for float64 weights and in float32 otherwise, on the weight's
    device; the result has that real dtype. Differentiable through ``torch.linalg.svdvals``. An ``input_size``
    whose spectra cannot fit in the device's available memory is refused (`MemoryRequestError`).
    """
    check_weight(weight)
    size = checked_input_size(input_size, weight)
    check_spectrum_memory(weight, size, SPECTRA_HELD["singular_values"], value=input_size)
    half = torch.linalg.svdvals(half_spectrum(weight, size))
    full = _mirror(half, size[1])
    if per_frequency:
        return full
    return torch.sort(full.reshape(-1), descending=True).values


def conv_operator_norm(weight: Tensor, input_size: Size) -> Tensor:
    """Largest singular value ``max_{u, v} sigma_max(P[u, v])`` of the circular conv (a 0-d tensor).

    Needs only the half spectrum ``v <= n_w // 2``; no dense matrix is formed.
    """
    check_weight(weight)
    size = checked_input_size(input_size, weight)
    check_spectrum_memory(weight, size, SPECTRA_HELD["operator_norm"], value=input_size)
    out: Tensor = torch.linalg.svdvals(half_spectrum(weight, size)).amax()
    return out


def clip_operator_norm(weight: Tensor, input_size: Size, max_norm: float) -> Tensor:
    """One alternating-projection step towards the ball ``{K : ||conv_K|| <= max_norm}``.

    ``P[u, v] = U S V^H`` -> ``U min(S, max_norm) V^H`` at every frequency, inverse FFT2, real part,
    cut back to the kernel support ``kh x kw``. Implemented as
    ``weight - crop(IFFT2(U (S - min(S, c)) V^H))``, so a layer already inside the ball is returned
    exactly unchanged. The cut-back can push the norm above ``max_norm`` again; repeated application
    converges to a kernel inside the ball.  An input smaller than the kernel (``n < k``) projects the folded
    kernel (support ``min(k, n)``) and gives each tap the change of its folded tap divided by the number of taps
    folding onto it: the minimum-norm kernel change with that fold.

    Pure: returns a new tensor (same dtype, device and shape, not attached to autograd).
    """
    check_weight(weight)
    size = checked_input_size(input_size, weight)
    c = checked_max_norm(max_norm)
    check_spectrum_memory(weight, size, SPECTRA_HELD["clip"], value=input_size)
    kh, kw = weight.shape[-2:]
    with torch.no_grad():
        w = weight.detach().to(work_dtype(weight))
        p = half_spectrum(w, size)
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        excess = (s - s.clamp(max=c)).to(p.dtype)
        d = (u * excess.unsqueeze(-2)) @ vh  # (n_h, n_w//2+1, O, I), Hermitian-symmetric as a full spectrum
        fh, fw = min(kh, size[0]), min(kw, size[1])  # the (folded) kernel support
        delta = torch.fft.irfft2(d.permute(2, 3, 0, 1), s=size)[..., :fh, :fw]
        if needs_fold(weight.shape, size):
            delta = unfold_correction(delta, (kh, kw), size)
        out: Tensor = (w - delta).to(weight.dtype)
        return out


@dataclass(frozen=True)
class Projection:
    """A way to pull a conv weight towards an operator-norm ball: ``apply(weight, input_size, max_norm) -> weight``."""

    name: str
    summary: str
    apply: Callable[[Tensor, tuple[int, int], float], Tensor]


def _gram_rescale(weight: Tensor, input_size: tuple[int, int], max_norm: float) -> Tensor:
    """``weight * min(1, c / gram_bound)``: certified to end with operator norm <= c (unchanged when inside)."""
    bound = float(conv_norm_gram(weight, input_size))
    return weight.detach().clone() if bound <= max_norm else weight.detach() * (max_norm / bound)


def _reshaped_clip(weight: Tensor, input_size: tuple[int, int], max_norm: float) -> Tensor:
    return clip_reshaped_norm(weight, max_norm)


PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        Projection(
            "exact",
            "clip the singular values of every P[u, v] to max_norm, cut back to the kernel support (Sedghi et al.)",
            clip_operator_norm,
        ),
        Projection(
            "reshaped",
            "clip the singular values of the O x (I kh kw) reshaped kernel (Yoshida & Miyato; bounds the true "
            "norm only up to sqrt(kh kw))",
            _reshaped_clip,
        ),
        Projection(
            "gram",
            "rescale the kernel by min(1, max_norm / Gram-iteration bound): certified inside the ball, no SVD",
            _gram_rescale,
        ),
    )
}
NORM_ESTIMATES = ("exact", "power", "gram", "reshaped")


def conv_dense_matrix(weight: Tensor, input_size: Size) -> Tensor:
    """The dense ``(O n_h n_w) x (I n_h n_w)`` matrix of ``nn.Conv2d(padding_mode="circular")``, stride 1.

    Column ``j`` is the layer's output (flattened in C order over (O, n_h, n_w)) for the ``j``-th
    basis vector of the input space (C order over (I, n_h, n_w)); padding ``(k - 1) // 2`` before and
    ``k - 1 - (k - 1) // 2`` after in each spatial dimension, so outputs are ``n_h x n_w``; the padding wraps
    around as many times as needed (an input smaller than the kernel).
    O((n_h n_w)^2 O I) memory and time: a reference for small layers, not for production use; a size whose
    matrices cannot fit in the available memory is refused (`MemoryRequestError`).
    """
    check_weight(weight)
    n_h, n_w = checked_input_size(input_size, weight)
    o, i, kh, kw = weight.shape
    n = n_h * n_w  # the identity basis, its padded copy and the output: (I n) x ((2 I + O) n) entries
    what = f"the dense matrix of a {o} x {i} conv at {n_h} x {n_w}"
    check_memory(
        i * n * (2 * i + o) * n * weight.element_size(), "input_size", input_size, device=weight.device, what=what
    )
    basis = torch.eye(i * n_h * n_w, dtype=weight.dtype, device=weight.device).reshape(-1, i, n_h, n_w)
    rows = torch.arange(-((kh - 1) // 2), n_h + kh - 1 - (kh - 1) // 2, device=weight.device) % n_h
    cols = torch.arange(-((kw - 1) // 2), n_w + kw - 1 - (kw - 1) // 2, device=weight.device) % n_w
    out = torch.nn.functional.conv2d(basis[:, :, rows][:, :, :, cols], weight)
    return out.reshape(i * n_h * n_w, o * n_h * n_w).T
