"""Pure gradient transforms: each returns a new tensor and never modifies its input.

Axis convention: a convolution weight has PyTorch layout (O, I, kh, kw).  `dim` is the axis smoothed:
0 = output channels, 1 = input channels, None = the whole tensor rasterised to 1-D in C order (the
rasterised length then plays the role of O).  Half types (float16, bfloat16) are computed in float32 and
returned in the input dtype.

Every function has a plain-PyTorch reference (`*_reference`), which runs on any device.  On the CPU the
channel-directed transforms use a compiled linear-time kernel (`cdgrad._native`) when one is available;
tests check that both paths agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native
from .transforms_base import _check_grad

__all__ = [
    "reweighted_h0",
    "sobolev",
    "laplacian_smooth",
    "centralize",
    "channel_directed",
    "channel_directed_",
    "reweighted_h0_reference",
    "sobolev_reference",
]

METRICS = ("h0", "sobolev")
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------- validation
def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_real(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_dim(dim: int | None, grad: Tensor) -> int | None:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be 0 (output channels), 1 (input channels) or None (flattened), got {dim!r}")
    if grad.dim() == 0 or not -grad.dim() <= dim < grad.dim():
        raise ValueError(
            f"dim={dim} is out of range for a gradient of shape {tuple(grad.shape)}; accepted: 0 (output "
            f"channels), 1 (input channels, tensors with 2+ dims) or None (flattened)"
        )
    return dim % grad.dim()


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


# ------------------------------------------------------------------------------------- reference path
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def reweighted_h0_reference(grad: Tensor, lam: float, dim: int | None = 0, beta: float = 0.0) -> Tensor:
    """Plain-PyTorch H0_lambda gradient plus beta*f: `fbar + (f - fbar)/lam + beta*f` (method.md 1.1, eq. 8)."""
    f = grad.to(_compute_dtype(grad.dtype))
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    fbar = f.mean(axis, keepdim=True)
    g = fbar + (f - fbar) / lam
    if beta:
        g = g + beta * f
    return g.reshape(grad.shape).to(grad.dtype)


def sobolev_reference(grad: Tensor, lam: float, dim: int | None = 0, beta: float = 0.0) -> Tensor:
    """Plain-PyTorch channel-directed Sobolev gradient plus beta*f (method.md 1.2).

    Solves `f[o] = mean(g) - lam*O^2*(g[o+1] - 2g[o] + g[o-1])` (periodic) along `dim` with two cumulative
    sums: `d = f - fbar`, `C = cumsum(d)/(lam O^2)`, `v[o] = mean(C) - C[o-1]` (C[-1] = 0),
    `U = cumsum(v)`, `g = fbar + U - mean(U)`.
    """
    f = grad.to(_compute_dtype(grad.dtype))
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    n = f.shape[axis]
    fbar = f.mean(axis, keepdim=True)
    c = torch.cumsum(f - fbar, axis) / (lam * n * n)
    shifted = torch.cat([torch.zeros_like(c.narrow(axis, 0, 1)), c.narrow(axis, 0, n - 1)], axis)
    u = torch.cumsum(c.mean(axis, keepdim=True) - shifted, axis)
    g = fbar + (u - u.mean(axis, keepdim=True))
    if beta:
        g = g + beta * f
    return g.reshape(grad.shape).to(grad.dtype)


_REFERENCE = {"h0": reweighted_h0_reference, "sobolev": sobolev_reference}


# ------------------------------------------------------------------------------------------ fast path
def _native_layout(x: Tensor, dim: int | None) -> tuple[int, int, int] | None:
    """(B, N, M) such that x's memory is a C-ordered (B, N, M) array with the smoothed axis N, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return None
    if dim is None:
        return (1, x.numel(), 1) if x.is_contiguous() else None
    n = x.shape[dim]
    if x.is_contiguous():
        return (math.prod(x.shape[:dim]), n, math.prod(x.shape[dim + 1 :]))
    if dim == 0 and (
        (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    ):
        # Output channels stay outermost in channels_last; the order of the other axes is irrelevant
        # because every column is transformed independently.
        return (1, n, x.numel() // n)
    return None


_PLANS: dict[tuple, tuple[int | None, tuple[int, int, int] | None, bool]] = {}


def _plan(g: Tensor, dim: int | None) -> tuple[int | None, tuple[int, int, int] | None, bool]:
    """(normalised dim, native layout or None, is float64), cached per shape, strides, dtype and device."""
    key = (g.shape, g.stride(), g.dtype, g.device, dim)
    plan = _PLANS.get(key)
    if plan is None:
        axis = None if dim is None else dim % g.dim()
        plan = (axis, _native_layout(g, axis), g.dtype == torch.float64)
        if len(_PLANS) < 4096:
            _PLANS[key] = plan
    return plan


def channel_directed_(grads: Sequence[Tensor], metric: str, lam: float, beta: float = 0.0, dim: int | None = 0) -> None:
    """In-place `g <- metric_gradient(g) + beta*g` for every tensor of `grads` (the fast path).

    CPU float32/float64 tensors whose memory maps onto a C-ordered (B, N, M) array, N the smoothed axis,
    are rewritten in place by the native kernel, all in one call; other CPU tensors go through a
    contiguous float copy; without the kernel (or on other devices) the reference is computed and copied
    back.  Inputs are assumed validated.
    """
    native = _native.library() is not None
    kernel = _native.H0 if metric == "h0" else _native.SOBOLEV
    jobs, copies = _native.Jobs(), []
    for g in grads:
        axis, layout, is_double = _plan(g, dim)
        if layout is None or not native:
            if g.numel() == 0:
                continue
            if not native or g.device.type != "cpu":
                g.copy_(_REFERENCE[metric](g, lam, axis, beta))
                continue
            work = g.to(dtype=_compute_dtype(g.dtype), memory_format=torch.contiguous_format, copy=True)
            copies.append((g, work))
            g, layout, is_double = work, _native_layout(work, axis), work.dtype == torch.float64
        b, n, m = layout
        ptr = g.data_ptr()
        jobs.add(ptr, ptr, b, n, m, 1.0 / lam if metric == "h0" else 1.0 / (lam * n * n), beta, kernel, is_double)
    if len(jobs):
        jobs.run(torch.get_num_threads())
    for g, work in copies:
        g.copy_(work)


def channel_directed(grad: Tensor, metric: str, lam: float, beta: float = 0.0, dim: int | None = 0) -> Tensor:
    """Metric gradient plus `beta` times the ordinary gradient, out of place, validated."""
    _check_grad(grad)
    _check_metric(metric)
    lam = _check_positive(lam, "lam")
    beta = _check_real(beta, "beta")
    dim = _check_dim(dim, grad)
    if _native.library() is None or grad.device.type != "cpu" or grad.numel() == 0:
        return _REFERENCE[metric](grad, lam, dim, beta)
    # A sequential copy, then the in-place kernel: faster than writing a fresh buffer column-chunk-wise.
    out = grad.to(dtype=_compute_dtype(grad.dtype), copy=True)
    channel_directed_([out], metric, lam, beta, dim)
    return out.to(grad.dtype)


# ---------------------------------------------------------------------------------------- public API
def reweighted_h0(grad: Tensor, lam: float, dim: int | None = 0) -> Tensor:
    """Gradient under the re-weighted H0 metric (method.md 1.1, paper eq. 8).

        g = fbar + (f - fbar) / lam,     fbar = mean of f along `dim`,   lam > 0

    lam = 1 returns f; large lam keeps only the channel mean.
    """
    return channel_directed(grad, "h0", lam, 0.0, dim)


def sobolev(grad: Tensor, lam: float, dim: int | None = 0) -> Tensor:
    """Gradient under the channel-directed Sobolev metric (method.md 1.2, paper eqs. 6, 8, 22).

    The exact discrete solution along `dim` (length O, periodic) of

        f[o] = mean(g) - lam * O^2 * (g[o+1] - 2 g[o] + g[o-1]),

    computed in time linear in O with cumulative sums.  mean(g) = mean(f); O = 1 returns f.  It is the
    Riemannian gradient: for every k,
    sum(f*k) = O*sum(mean(g)*mean(k)) + lam*O^2*sum(Dg*Dk), with D the periodic forward difference.
    """
    return channel_directed(grad, "sobolev", lam, 0.0, dim)


def laplacian_smooth(grad: Tensor, sigma: float, dim: int | None = None) -> Tensor:
    """Laplacian smoothing of Osher et al. (method.md 2): `g = (I - sigma*L)^-1 f`, L periodic.

    L is the periodic second difference along `dim` (None: the tensor rasterised in C order, as the
    published code does).  Computed with the Fourier multiplier `1 / (1 + 2 sigma (1 - cos(2 pi k / n)))`.
    sigma = 0 returns f.
    """
    _check_grad(grad)
    sigma = _check_nonnegative(sigma, "sigma")
    dim = _check_dim(dim, grad)
    f = grad.to(_compute_dtype(grad.dtype))
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    n = f.shape[axis]
    if sigma == 0 or n <= 1:
        return grad.clone()
    k = torch.arange(n // 2 + 1, device=f.device, dtype=f.dtype)
    multiplier = 1.0 / (1.0 + 2.0 * sigma * (1.0 - torch.cos(2.0 * math.pi * k / n)))
    shape = [1] * f.dim()
    shape[axis] = n // 2 + 1
    g = torch.fft.irfft(torch.fft.rfft(f, dim=axis) * multiplier.view(shape), n=n, dim=axis)
    return g.reshape(grad.shape).to(grad.dtype)


def centralize(grad: Tensor) -> Tensor:
    """Gradient centralisation (Yong et al.; method.md 3): `g = f - mean over (I, kh, kw) of f` per output channel.

    Needs a tensor with 2 or more dims (conv and linear weights); dim 0 is the output axis.
    """
    _check_grad(grad)
    if grad.dim() < 2:
        raise ValueError(
            f"centralize needs a gradient with 2 or more dims (conv or linear weight), got shape {tuple(grad.shape)}"
        )
    f = grad.to(_compute_dtype(grad.dtype))
    g = f - f.mean(dim=tuple(range(1, f.dim())), keepdim=True)
    return g.to(grad.dtype)
