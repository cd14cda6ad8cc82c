"""Fast estimates of a conv layer's operator norm, and the reshaped-kernel baseline.

The exact operator norm of the stride-1 circular convolution by ``K`` (shape ``(O, I, kh, kw)``) on ``n_h x n_w``
inputs is ``max_{u,v} sigma_max(P[u, v])`` (`cdgrad.spectral`). Three cheaper quantities (docs/spectral.md):

- **Reshaped kernel** (Yoshida & Miyato 2017; what ``torch.nn.utils.parametrizations.spectral_norm`` estimates): the
  ``O x (I kh kw)`` matrix ``R = K.reshape(O, -1)``. Because ``sum_{u,v} P[u,v] P[u,v]^H = n_h n_w R R^T``,

      ||R||_2 <= ||conv_K||_2 <= sqrt(kh kw) ||R||_2,

  so ``||R||`` is a lower bound of the true norm, off by up to ``sqrt(kh kw)``, and does not depend on the input size.
- **Power iteration** on ``A^T A`` of the circular conv ``A`` (applied per frequency as ``P^H P``), with a persistent
  vector that a caller warm-starts across training steps: ``sqrt(x^T A^T A x)`` for a unit ``x`` never exceeds the
  norm and converges to it. Per frequency (``per_frequency=True``): one vector per frequency, iterated on
  ``P[u, v]^H P[u, v]`` after a single transform of the weight, ``max_uv ||P[u, v] x_uv||`` (each frequency converges
  at its own gap).
- **Gram iteration** (Delattre, Barthelemy, Araujo and Allauzen, ICML 2023): ``G_0 = P[u, v]``,
  ``G_{t+1} = G_t^H G_t``; ``sigma_max(P) <= ||G_t||_F^(1 / 2^t)`` for every ``t``, the gap shrinking like
  ``rank^(1 / 2^(t+1))``. A certified upper bound (up to float round-off), computed with Frobenius rescaling kept in
  log space so that nothing overflows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _native
from ._conv_spectrum import (
    SPECTRA_HELD,
    check_reshaped_memory,
    check_spectrum_memory,
    check_weight,
    checked_input_size,
    checked_max_norm,
    fold_kernel,
    half_spectrum,
    needs_fold,
    planar_dft_basis,
    work_dtype,
)
from ._kernels import native_usable
from .validation import check_int, check_tensor

__all__ = [
    "clip_reshaped_norm",
    "conv_norm_gram",
    "conv_norm_power",
    "reshaped_norm",
    "reshaped_norm_power",
]

Size = int | tuple[int, int]


def _reshaped(weight: Tensor) -> Tensor:
    """``R = K.reshape(O, I kh kw)`` in the work dtype (float64 for float64 weights, float32 otherwise)."""
    return weight.detach().to(work_dtype(weight)).reshape(weight.shape[0], -1)


def _start_vector(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A fixed pseudo-random unit vector (its own generator: torch's global random state is left alone)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.complex128 if like.is_complex() else torch.float64
    v = torch.randn(shape, generator=gen, dtype=dtype).to(dtype=like.dtype, device=like.device)
    out: Tensor = v / v.norm()
    return out


def _check_vector(vector: Any, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``vector`` as a unit vector of ``shape`` in the work dtype; a fresh start vector for None or a zero vector."""
    if vector is None:
        return _start_vector(shape, like)
    check_tensor(vector, "vector")
    if tuple(vector.shape) != shape:
        raise ValueError(f"vector must have shape {shape} for this weight and input size, got {tuple(vector.shape)}")
    v = vector.detach().to(dtype=like.dtype, device=like.device)
    norm = v.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return _start_vector(shape, like)
    out: Tensor = v / norm
    return out


def _iters(iters: Any, minimum: int) -> int:
    return check_int(iters, "iters", minimum=minimum)


# ----------------------------------------------------------------------------- reshaped kernel


def reshaped_norm(weight: Tensor) -> Tensor:
    """Exact ``||R||_2``, ``R = weight.reshape(O, I kh kw)`` (a 0-d tensor in the work dtype)."""
    check_weight(weight)
    check_reshaped_memory(weight)
    out: Tensor = torch.linalg.svdvals(_reshaped(weight))[0]
    return out


def reshaped_norm_power(weight: Tensor, vector: Tensor | None = None, iters: int = 1) -> tuple[Tensor, Tensor]:
    """Power iteration for ``||R||_2``: ``v = R^T u / ||R^T u||``, ``u = R v / ||R v||``, estimate ``u^T R v``.

    ``vector`` is the left vector ``u`` (shape ``(O,)``) from the previous call (None: a fixed start vector);
    returns ``(estimate, u)``. The estimate never exceeds ``||R||_2`` and converges to it; one iteration per
    training step with a warm-started ``u`` is what ``spectral_norm`` does.
    """
    check_weight(weight)
    n = _iters(iters, 1)
    r = _reshaped(weight)
    u = _check_vector(vector, (r.shape[0],), r)
    with torch.no_grad():
        for _ in range(n):
            v = r.T @ u
            v = v / v.norm().clamp_min(torch.finfo(r.dtype).tiny)
            u = r @ v
            u = u / u.norm().clamp_min(torch.finfo(r.dtype).tiny)
        sigma = u @ (r @ v)
    return sigma, u


def clip_reshaped_norm(weight: Tensor, max_norm: float) -> Tensor:
    """Projection of ``R`` onto ``{||R||_2 <= max_norm}``: ``U min(S, c) V^T``, reshaped back to the kernel.

    Computed as ``R - U (S - min(S, c)) V^T`` so a kernel already inside is returned exactly unchanged. Unlike the
    exact projection (`cdgrad.spectral.clip_operator_norm`) this is one exact projection in its own norm, which
    bounds the true operator norm only up to ``sqrt(kh kw)``. Pure: a new tensor, same dtype, device and shape.
    """
    check_weight(weight)
    c = checked_max_norm(max_norm)
    check_reshaped_memory(weight)
    with torch.no_grad():
        r = _reshaped(weight)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        excess = s - s.clamp(max=c)
        out: Tensor = (r - (u * excess) @ vh).reshape(weight.shape).to(weight.dtype)
    return out


# ----------------------------------------------------------------------------- the circular operator


def _normal_operator(p: Tensor, x: Tensor, size: tuple[int, int]) -> Tensor:
    """``A^T A x`` for the circular conv with half spectrum ``p`` (n_h, n_w//2+1, O, I); ``x`` is (I, n_h, n_w)."""
    xf = torch.fft.rfft2(x, s=size).permute(1, 2, 0).unsqueeze(-1)  # (n_h, n_w//2+1, I, 1)
    yf = p.mH @ (p @ xf)
    out: Tensor = torch.fft.irfft2(yf.squeeze(-1).permute(2, 0, 1), s=size)
    return out


def conv_norm_power(
    weight: Tensor,
    input_size: Size,
    vector: Tensor | None = None,
    iters: int = 10,
    *,
    per_frequency: bool = False,
) -> tuple[Tensor, Tensor]:
    """Power iteration on ``A^T A`` of the stride-1 circular conv: a lower bound of its operator norm.

    Global (``per_frequency=False``): ``x <- A^T A x / ||A^T A x||`` ``iters`` times, estimate
    ``sqrt(x^T A^T A x)`` for the final unit ``x`` (``<= ||A||_2``, converging at the rate
    ``(sigma_2 / sigma_1)^2`` per iteration, sigma_2 the second singular value over all frequencies); ``vector``
    has shape ``(I, n_h, n_w)``. Two FFTs and two batched matrix-vector products per iteration.

    Per frequency (``per_frequency=True``): the weight is transformed once; at every frequency ``(u, v)`` of the
    half spectrum, ``x_uv <- P^H P x_uv / ||P^H P x_uv||`` (batched matrix-vector products, no FFT per
    iteration), estimate ``max_uv ||P[u, v] x_uv||``: each term is at most ``sigma_max(P[u, v]) <= ||A||_2``, and
    converges at that frequency's own gap ``(sigma_2(P[u, v]) / sigma_1(P[u, v]))^2``. ``vector`` has shape
    ``(n_h, n_w // 2 + 1, I)`` (complex).

    ``vector`` is the ``x`` of a previous call with the same mode, so that one or two iterations per training
    step track the norm; None (or a zero vector) starts from a fixed vector. Returns ``(estimate, x)``.
    """
    check_weight(weight)
    size = checked_input_size(input_size, weight)
    check_spectrum_memory(weight, size, SPECTRA_HELD["power"], value=input_size)
    n = _iters(iters, 1)
    if per_frequency:
        return _power_per_frequency(weight, size, vector, n)
    with torch.no_grad():
        p = half_spectrum(weight.detach(), size)
        real = work_dtype(weight)
        x = _check_vector(vector, (weight.shape[1], *size), torch.empty(0, dtype=real, device=weight.device))
        for _ in range(n):
            y = _normal_operator(p, x, size)
            x = y / y.norm().clamp_min(torch.finfo(real).tiny)
        estimate = torch.sqrt((x * _normal_operator(p, x, size)).sum().clamp_min(0.0))
    return estimate, x


def _squared_norms(x: Tensor) -> Tensor:
    """``||x[..., :, j]||^2`` of a complex ``x`` over its second-to-last axis, real (summing squares of the real
    view is several times faster than a complex `vector_norm` on the CPU)."""
    return torch.view_as_real(x).square().sum(dim=(-3, -1))


def _power_per_frequency(weight: Tensor, size: tuple[int, int], vector: Any, n: int) -> tuple[Tensor, Tensor]:
    """`conv_norm_power(..., per_frequency=True)` on checked arguments.

    Each iteration: ``z = P x``, ``y = P^H z``, ``x <- y / ||y||``; the estimate is the last iteration's
    ``max_uv ||y_uv|| / ||z_uv||``. For a unit ``x``, ``||P^H z|| / ||z|| <= sigma_max(P)`` (``z = P x``); after
    ``t`` iterations from ``x_0`` it is ``sqrt(m_{2t} / m_{2t-1})`` with the moments ``m_k = sum_j c_j sigma_j^k``
    (``c_j = |<x_0, v_j>|^2``, ``v_j`` the right singular vectors): non-decreasing in ``t`` (moments are
    log-convex) and at least the Rayleigh value ``||P x||`` of the unit iterate it started from.

    On the CPU with the native kernel, one call computes the spectrum chunk by chunk from the taps and iterates
    with vector operations across frequencies (kernels.c, `cdg_power`); elsewhere batched matrix products.
    """
    with torch.no_grad():
        w = weight.detach().to(work_dtype(weight))
        if needs_fold(w.shape, size):
            w = fold_kernel(w, size)
        o, i, kh, kw = w.shape
        shape = (size[0], size[1] // 2 + 1, i)
        complex_dtype = torch.complex128 if w.dtype == torch.float64 else torch.complex64
        x = _per_frequency_start(vector, shape, complex_dtype, w.device)
        if native_usable() and w.device.type == "cpu" and type(w) is Tensor:
            is_double = w.dtype == torch.float64
            basis = planar_dft_basis((kh, kw), size, w.dtype, _native.POWER_WIDTH[is_double])
            kernel, x = w.contiguous(), x.contiguous().clone()
            ratios = torch.empty(shape[:2], dtype=torch.float64)
            _native.power_iteration(
                ratios.numel(), o, i, kh * kw, kernel.data_ptr(), basis.data_ptr(), x.data_ptr(),
                ratios.data_ptr(), n, is_double, torch.get_num_threads(),
            )  # fmt: skip
            return torch.sqrt(ratios.amax()).to(w.dtype), x
        return _power_batched(half_spectrum(w, size), x, n)


def _per_frequency_start(vector: Any, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The checked ``vector`` scaled to a unit vector at every frequency (a frequency whose vector is zero or not
    finite restarts from the fixed start vector), or the fixed start vector for None."""
    start = None
    if vector is None:
        x = start = _start_vector(shape, torch.empty(0, dtype=dtype, device=device))
    else:
        check_tensor(vector, "vector", floating=False)
        if tuple(vector.shape) != shape or not vector.is_complex():
            raise ValueError(
                f"vector must be a complex tensor of shape {shape} (per frequency, for this weight and input "
                f"size), got {vector.dtype} of shape {tuple(vector.shape)}"
            )
        x = vector.detach().to(dtype=dtype, device=device)
    lengths = _squared_norms(x.unsqueeze(-1))
    if start is None:
        dead = ~(torch.isfinite(lengths) & (lengths > 0))
        if bool(dead.any()):
            x = torch.where(dead, _start_vector(shape, torch.empty(0, dtype=dtype, device=device)), x)
            lengths = _squared_norms(x.unsqueeze(-1))
    return x * torch.rsqrt(lengths)  # unit at every frequency: no overflow in the first product


def _power_batched(p: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The per-frequency iteration by batched matrix products on the half spectrum ``p`` (n_h, n_w//2+1, O, I)."""
    tiny = torch.finfo(p.real.dtype).tiny
    x = x.unsqueeze(-1)
    ph = p.transpose(-2, -1)  # P^H y = conj(P^T conj(y)): a transposed view, no conjugated copy of P
    for _ in range(n):
        z = p @ x
        y = torch.conj_physical(ph @ z.conj_physical())
        y_norms, z_norms = _squared_norms(y), _squared_norms(z)
        x = y * torch.rsqrt(y_norms.clamp_min(tiny)).unsqueeze(-1)
    estimate = torch.sqrt((y_norms / z_norms.clamp_min(tiny)).amax())
    return estimate, x.squeeze(-1)


def conv_norm_gram(weight: Tensor, input_size: Size, iters: int = 6) -> Tensor:
    """Gram-iteration upper bound of the stride-1 circular conv's operator norm (Delattre et al. 2023).

    At every frequency, ``G_0 = P[u, v]`` (the smaller of ``P`` and ``P^H`` is used), ``G_{t+1} = G_t^H G_t``; with
    ``G_t`` kept as ``exp(r_t) * H_t``, ``||H_t||_F = 1`` before each product, the bound is
    ``max_{u,v} exp((r_T + log ||H_T||_F) / 2^T)`` and satisfies
    ``||conv|| <= bound <= min(O, I)^(1 / 2^(T+1)) * ||conv||``. ``iters = 0`` gives the largest Frobenius norm
    of the ``P[u, v]``. Only the half spectrum is used (mirrored frequencies have the same singular values).
    """
    check_weight(weight)
    size = checked_input_size(input_size, weight)
    check_spectrum_memory(weight, size, SPECTRA_HELD["gram"], value=input_size)
    n = _iters(iters, 0)
    with torch.no_grad():
        g = half_spectrum(weight.detach(), size)
        if g.shape[-2] < g.shape[-1]:  # P^H has the same singular values; its Gram matrix is the smaller one
            g = g.mH
        log_scale = torch.zeros(g.shape[:-2], dtype=work_dtype(weight), device=weight.device)
        for _ in range(n):
            f = torch.linalg.matrix_norm(g).clamp_min(torch.finfo(log_scale.dtype).tiny)
            log_scale = 2.0 * (log_scale + torch.log(f))
            g = g / f[..., None, None].to(g.dtype)
            g = g.mH @ g
        log_bound = (log_scale + torch.log(torch.linalg.matrix_norm(g))) / math.ldexp(1.0, n)
        out: Tensor = torch.exp(log_bound.amax())
    return out
