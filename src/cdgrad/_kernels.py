"""The kernel layer: reference mathematics and the native CPU path, for plain (non-distributed) tensors.

Nothing here validates its arguments or looks at tensor types: `cdgrad.functional` validates, decides the
route of every tensor (see `functional.route`) and calls in.  Axis convention as in `cdgrad.functional`:
`dim` 0 = output channels, 1 = input channels, None = the tensor rasterised to 1-D in C order.  Half types
(float16, bfloat16) are computed in float32 and written back in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _native

__all__ = [
    "DIRECTIONS",
    "METRICS",
    "centralize_reference",
    "centralize_inplace_",
    "channel_directed_plain",
    "channel_directed_plain_",
    "compute_dtype",
    "native_usable",
    "laplacian_reference",
    "reweighted_h0_reference",
    "sobolev_reference",
]

METRICS = ("h0", "sobolev")
DIRECTIONS: dict[str, int | None] = {"output": 0, "input": 1, "flat": None}
_HALF = (torch.float16, torch.bfloat16)


def native_usable() -> bool:
    """Whether the native kernel can run now: it is built, and no `torch.compile` trace is in progress (a traced
    function cannot call into C through raw pointers; it traces the reference, which compiles like any PyTorch)."""
    return not torch.compiler.is_compiling() and _native.library() is not None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the half types, the dtype itself otherwise."""
    return torch.float32 if dtype in _HALF else dtype


# ------------------------------------------------------------------------------------- reference math
def reweighted_h0_reference(grad: Tensor, lam: float, dim: int | None = 0, beta: float = 0.0) -> Tensor:
    """Plain-PyTorch H0_lambda gradient plus beta*f: `fbar + (f - fbar)/lam + beta*f` (docs/math.md 1.1, eq. 8)."""
    f = grad.to(compute_dtype(grad.dtype))
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    if f.shape[axis] == 0:
        return grad.clone()
    fbar = f.mean(axis, keepdim=True)
    g = fbar + (f - fbar) / lam
    if beta:
        g = g + beta * f
    return g.reshape(grad.shape).to(grad.dtype)


def sobolev_reference(grad: Tensor, lam: float, dim: int | None = 0, beta: float = 0.0) -> Tensor:
    """Plain-PyTorch channel-directed Sobolev gradient plus beta*f (docs/math.md 1.2).

    Solves `f[o] = mean(g) - lam*O^2*(g[o+1] - 2g[o] + g[o-1])` (periodic) along `dim` with two cumulative
    sums: `d = f - fbar`, `C = cumsum(d)/(lam O^2)`, `v[o] = mean(C) - C[o-1]` (C[-1] = 0),
    `U = cumsum(v)`, `g = fbar + U - mean(U)`.  A zero-length axis gives an empty result.
    """
    f = grad.to(compute_dtype(grad.dtype))
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    n = f.shape[axis]
    if n == 0:
        return grad.clone()
    fbar = f.mean(axis, keepdim=True)
    c = torch.cumsum(f - fbar, axis) / (lam * n * n)
    shifted = torch.cat([torch.zeros_like(c.narrow(axis, 0, 1)), c.narrow(axis, 0, n - 1)], axis)
    u = torch.cumsum(c.mean(axis, keepdim=True) - shifted, axis)
    g = fbar + (u - u.mean(axis, keepdim=True))
    if beta:
        g = g + beta * f
    return g.reshape(grad.shape).to(grad.dtype)


REFERENCE: dict[str, Callable[[Tensor, float, int | None, float], Tensor]] = {
    "h0": reweighted_h0_reference,
    "sobolev": sobolev_reference,
}


def laplacian_reference(grad: Tensor, sigma: float, dim: int | None) -> Tensor:
    """`(I - sigma L)^-1 f` along `dim` (L the periodic second difference) with the Fourier multiplier
    `1 / (1 + 2 sigma (1 - cos(2 pi k / n)))`; a new tensor in `grad`'s dtype."""
    f = grad.to(compute_dtype(grad.dtype))
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    n = f.shape[axis]
    if sigma == 0 or n <= 1 or f.numel() == 0:
        return grad.clone()
    k = torch.arange(n // 2 + 1, device=f.device, dtype=f.dtype)
    multiplier = 1.0 / (1.0 + 2.0 * sigma * (1.0 - torch.cos(2.0 * math.pi * k / n)))
    shape = [1] * f.dim()
    shape[axis] = n // 2 + 1
    g: Tensor = torch.fft.irfft(torch.fft.rfft(f, dim=axis) * multiplier.view(shape), n=n, dim=axis)
    return g.reshape(grad.shape).to(grad.dtype)


def centralize_reference(grad: Tensor) -> Tensor:
    """`f - mean over dims 1.. of f` per output row (dim 0), a new tensor in `grad`'s dtype."""
    f = grad.to(compute_dtype(grad.dtype))
    g = f - f.mean(dim=tuple(range(1, f.dim())), keepdim=True)
    return g.to(grad.dtype)


def centralize_inplace_(g: Tensor) -> None:
    """In place: `g <- g - mean over dims 1.. of g` per output row (the mean accumulated in float32 at least)."""
    if g.numel():
        g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True, dtype=compute_dtype(g.dtype)))


# ------------------------------------------------------------------------------------------ native path
def _native_layout(x: Tensor, dim: int | None) -> tuple[int, int, int] | None:
    """(B, N, M) such that x's memory is a C-ordered (B, N, M) array with the smoothed axis N, else None.

    Only an exact `torch.Tensor` qualifies: a subclass (e.g. a DTensor) may hold memory of another shape.
    """
    if (
        type(x) is not Tensor
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.numel() == 0
    ):
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


Plan = tuple[int | None, tuple[int, int, int] | None, bool]
_PLANS: dict[tuple[object, ...], Plan] = {}


def _plan(g: Tensor, dim: int | None) -> Plan:
    """(normalised dim, native layout or None, is float64), cached per shape, strides, dtype and device."""
    key = (g.shape, g.stride(), g.dtype, g.device, dim)
    plan = _PLANS.get(key)
    if plan is None:
        axis = None if dim is None else dim % g.dim()
        plan = (axis, _native_layout(g, axis), g.dtype == torch.float64)
        if len(_PLANS) < 4096:
            _PLANS[key] = plan
    return plan


def channel_directed_plain_(grads: Sequence[Tensor], metric: str, lam: float, beta: float, dim: int | None) -> None:
    """In place `g <- metric_gradient(g) + beta*g` for every exact `torch.Tensor` of `grads`.

    CPU float32/float64 tensors whose memory maps onto a C-ordered (B, N, M) array, N the smoothed axis,
    are rewritten in place by the native kernel, all in one call; other CPU tensors go through a contiguous
    float copy; without the kernel (or on other devices) the reference is computed and copied back.
    """
    native = native_usable()
    kernel = _native.H0 if metric == "h0" else _native.SOBOLEV
    jobs, copies = _native.Jobs(), []
    for g in grads:
        axis, layout, is_double = _plan(g, dim)
        if layout is None or not native:
            if g.numel() == 0:
                continue
            if not native or g.device.type != "cpu" or type(g) is not Tensor:
                g.copy_(REFERENCE[metric](g, lam, axis, beta))
                continue
            work = g.to(dtype=compute_dtype(g.dtype), memory_format=torch.contiguous_format, copy=True)
            copies.append((g, work))
            g, layout, is_double = work, _native_layout(work, axis), work.dtype == torch.float64
            assert layout is not None
        b, n, m = layout
        ptr = g.data_ptr()
        jobs.add(ptr, ptr, b, n, m, 1.0 / lam if metric == "h0" else 1.0 / (lam * n * n), beta, kernel, is_double)
    if len(jobs):
        jobs.run(torch.get_num_threads())
    for g, work in copies:
        g.copy_(work)


def channel_directed_plain(grad: Tensor, metric: str, lam: float, beta: float, dim: int | None) -> Tensor:
    """Out of place, for an exact `torch.Tensor`: the native kernel on a copy where it applies, else the reference."""
    if not native_usable() or grad.device.type != "cpu" or grad.numel() == 0:
        return REFERENCE[metric](grad, lam, dim, beta)
    # A sequential copy, then the in-place kernel: faster than writing a fresh buffer column-chunk-wise.
    out = grad.to(dtype=compute_dtype(grad.dtype), copy=True)
    channel_directed_plain_([out], metric, lam, beta, dim)
    return out.to(grad.dtype)
