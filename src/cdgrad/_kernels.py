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
    "CENTRALIZE_FAMILY",
    "DIRECTIONS",
    "METRICS",
    "channel_family",
    "laplacian_family",
    "replay_out_of_place",
    "centralize_reference",
    "centralize_inplace_",
    "centralize_plain",
    "centralize_plain_",
    "channel_directed_plain",
    "channel_directed_plain_",
    "laplacian_plain",
    "laplacian_plain_",
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


_F32_SAFE = 1e30  # coefficients beyond this overflow float32 arithmetic: such calls compute in float64


def _work(grad: Tensor, *coefficients: float) -> Tensor:
    """`grad` in the dtype the reference computes in: float64 where a coefficient is beyond float32's safe
    range (e.g. 1/(lam O^2) for a tiny lam), else `compute_dtype`."""
    dtype = compute_dtype(grad.dtype)
    if dtype == torch.float32 and any(not abs(c) < _F32_SAFE for c in coefficients):
        dtype = torch.float64
    return grad.to(dtype)


def _unit_scale(f: Tensor) -> Tensor:
    """A power of two `s` near `max |f|` (1 for `max |f| <= 1`) as a 0-d tensor, for float32 and below.

    The transforms are linear, so `T(f) = s T(f / s)`; scaling by a power of two is exact, and entries near the
    float32 maximum (1e38) then never overflow in a sum.  float64 work returns 1 (nothing to do)."""
    if f.dtype == torch.float64 or f.numel() == 0:
        return torch.ones((), dtype=f.dtype, device=f.device)
    amax = f.detach().abs().amax().clamp_min(1.0)
    return torch.exp2(torch.floor(torch.log2(amax)))


# ------------------------------------------------------------------------------------- reference math
def reweighted_h0_reference(grad: Tensor, lam: float, dim: int | None = 0, beta: float = 0.0) -> Tensor:
    """Plain-PyTorch H0_lambda gradient plus beta*f: `fbar + (f - fbar)/lam + beta*f` (docs/math.md 1.1, eq. 8)."""
    f = _work(grad, 1.0 / lam, beta)
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    if f.shape[axis] == 0:
        return grad.clone()
    scale = _unit_scale(f)
    f = f / scale
    fbar = f.mean(axis, keepdim=True)
    g = fbar + (f - fbar) / lam
    if beta:
        g = g + beta * f
    return (g * scale).reshape(grad.shape).to(grad.dtype)


def sobolev_reference(grad: Tensor, lam: float, dim: int | None = 0, beta: float = 0.0) -> Tensor:
    """Plain-PyTorch channel-directed Sobolev gradient plus beta*f (docs/math.md 1.2).

    Solves `f[o] = mean(g) - lam*O^2*(g[o+1] - 2g[o] + g[o-1])` (periodic) along `dim` with two cumulative
    sums: `d = f - fbar`, `C = cumsum(d)/(lam O^2)`, `v[o] = mean(C) - C[o-1]` (C[-1] = 0),
    `U = cumsum(v)`, `g = fbar + U - mean(U)`.  A zero-length axis gives an empty result.
    """
    n = grad.numel() if dim is None else grad.shape[dim]
    f = _work(grad, 1.0 / (lam * max(n, 1) ** 2), beta)
    if dim is None:
        f = f.reshape(-1)
    axis = 0 if dim is None else dim
    if n == 0:
        return grad.clone()
    scale = _unit_scale(f)
    f = f / scale
    fbar = f.mean(axis, keepdim=True)
    c = torch.cumsum(f - fbar, axis) / (lam * n * n)
    shifted = torch.cat([torch.zeros_like(c.narrow(axis, 0, 1)), c.narrow(axis, 0, n - 1)], axis)
    u = torch.cumsum(c.mean(axis, keepdim=True) - shifted, axis)
    g = fbar + (u - u.mean(axis, keepdim=True))
    if beta:
        g = g + beta * f
    return (g * scale).reshape(grad.shape).to(grad.dtype)


REFERENCE: dict[str, Callable[[Tensor, float, int | None, float], Tensor]] = {
    "h0": reweighted_h0_reference,
    "sobolev": sobolev_reference,
}


_MULTIPLIERS: dict[tuple[object, ...], Tensor] = {}


def laplacian_multiplier(n: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`1 / (1 + 2 sigma (1 - cos(2 pi k / n)))` for k = 0 .. n // 2, computed in float64 (no overflow for any
    finite sigma) and cached per (n, sigma, dtype, device)."""
    key = (n, sigma, dtype, device)
    out = _MULTIPLIERS.get(key)
    if out is None:
        k = torch.arange(n // 2 + 1, dtype=torch.float64)
        out = (1.0 / (1.0 + 2.0 * sigma * (1.0 - torch.cos(2.0 * math.pi * k / n)))).to(dtype=dtype, device=device)
        if not torch.compiler.is_compiling():
            if len(_MULTIPLIERS) >= 256:
                _MULTIPLIERS.clear()
            _MULTIPLIERS[key] = out
    return out


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
    scale = _unit_scale(f)
    shape = [1] * f.dim()
    shape[axis] = n // 2 + 1
    multiplier = laplacian_multiplier(n, sigma, f.dtype, f.device).view(shape)
    g: Tensor = torch.fft.irfft(torch.fft.rfft(f / scale, dim=axis) * multiplier, n=n, dim=axis) * scale
    return g.reshape(grad.shape).to(grad.dtype)


def centralize_reference(grad: Tensor) -> Tensor:
    """`f - mean over dims 1.. of f` per output row (dim 0), a new tensor in `grad`'s dtype."""
    f = grad.to(compute_dtype(grad.dtype))
    scale = _unit_scale(f)
    f = f / scale
    g = (f - f.mean(dim=tuple(range(1, f.dim())), keepdim=True)) * scale
    return g.to(grad.dtype)


def centralize_inplace_(g: Tensor) -> None:
    """In place: `g <- g - mean over dims 1.. of g` per output row (the reference, through a new tensor)."""
    if g.numel():
        g.copy_(centralize_reference(g))


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


def _centralize_layout(x: Tensor) -> tuple[int, int, int] | None:
    """(O, K, 1) when x's memory holds O contiguous rows of K = numel / O entries (dim 0 outermost), else None."""
    if (
        type(x) is not Tensor
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.numel() == 0
        or x.dim() < 2
    ):
        return None
    if x.is_contiguous() or (
        (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))
    ):
        return (x.shape[0], x.numel() // x.shape[0], 1)
    return None


Statics = dict[tuple[object, ...], _native.Static]
# Packed jobs per family (kernel, coefficients, dim) and tensor layout: of the in-place path, and, apart, of the
# pure functions, whose families are only ever filled after their arguments passed validation
_STATICS: dict[tuple[object, ...], Statics] = {}
_PURE_STATICS: dict[tuple[object, ...], Statics] = {}


def _statics(family: tuple[object, ...], registry: dict[tuple[object, ...], Statics] = _STATICS) -> Statics:
    """The packed static parts of the jobs of one transform family (kernel, coefficients, dim), per tensor
    (shape, strides, dtype); empty where a tensor has no native layout."""
    found = registry.get(family)
    if found is None:
        if len(registry) >= 64:
            registry.clear()
        found = registry[family] = {}
    elif len(found) >= 4096:
        found.clear()
    return found


def channel_family(metric: str, lam: float, beta: float, dim: int | None) -> tuple[object, ...]:
    """The key of the kept jobs of `channel_directed` with these arguments (in place and pure)."""
    return ("channel", metric, lam, beta, dim)


def laplacian_family(sigma: float, dim: int | None) -> tuple[object, ...]:
    """The key of the kept jobs of `laplacian_smooth` with these arguments (in place and pure)."""
    return ("laplacian", sigma, dim)


CENTRALIZE_FAMILY: tuple[object, ...] = ("centralize",)


def _layout_key(g: Tensor) -> tuple[object, ...]:
    return (g.shape, g.dtype) if g.is_contiguous() else (g.shape, g.stride(), g.dtype)


def replay_out_of_place(grad: object, family: tuple[object, ...]) -> Tensor | None:
    """A pure function's result by the job kept for `grad`'s layout in `family`, if a call of that function with
    equal arguments and a gradient of this type, dtype and layout has been validated and routed to the kernel
    before (its decision, replayed without the checks); else None.  Arguments that compare equal to validated
    ones are valid: callers pass only plain `str`, `int`, `float` and None in `family`."""
    statics = _PURE_STATICS.get(family)
    if statics is None or type(grad) is not Tensor or grad.layout is not torch.strided or not grad.is_cpu:
        return None
    static = statics.get(_layout_key(grad))
    if not static or not native_usable():
        return None
    return _into_fresh(grad, static)


def _into_fresh(grad: Tensor, static: _native.Static) -> Tensor:
    """The job `static` from `grad` into a fresh tensor of the same layout."""
    out = torch.empty_like(grad)
    _native.run_one(grad.data_ptr(), out.data_ptr(), static, torch.get_num_threads())
    return out


def _run_(
    grads: Sequence[Tensor],
    metric: int,
    params: Callable[[int], tuple[float, float, float]],
    reference: Callable[[Tensor, int | None], Tensor],
    dim: int | None,
    family: tuple[object, ...],
) -> None:
    """In place, every exact `torch.Tensor` of `grads` by one call of the compiled kernel (`metric` one of
    `_native.H0`, ... with `params(n)` its coefficients for an axis of length n, `family` a key naming `metric`,
    the coefficients and `dim`); CPU tensors in other layouts or half types through a contiguous float copy;
    without the kernel (or on other devices), `reference`.

    A tensor's job (layout, coefficients, kernel code) is computed once per shape, strides and dtype and kept
    packed: a step costs a dictionary lookup and an address per tensor."""
    native = native_usable()
    central = metric == _native.CENTRALIZE
    statics = _statics(family) if native else {}
    jobs, copies = _native.Jobs(in_place=True), []
    address, packed = jobs.src.append, jobs.statics.append  # the per-tensor loop, kept lean
    for g in grads:
        if native and type(g) is Tensor and g.is_cpu:
            key = (g.shape, g.dtype) if g.is_contiguous() else (g.shape, g.stride(), g.dtype)  # _layout_key, inline
            static = statics.get(key)
            if static is None:
                static = statics[key] = _static(g, metric, params, dim)
            if static:
                address(g.data_ptr())
                packed(static)
                continue
        if g.numel() == 0:
            continue
        axis = 0 if central else _plan(g, dim)[0]
        if not native or g.device.type != "cpu" or type(g) is not Tensor:
            g.copy_(reference(g, axis))
            continue
        work = g.to(dtype=compute_dtype(g.dtype), memory_format=torch.contiguous_format, copy=True)
        copies.append((g, work))
        static = _static(work, metric, params, dim)
        assert static
        jobs.add_static(work.data_ptr(), work.data_ptr(), static)
    if len(jobs):
        jobs.run(torch.get_num_threads())
    for g, work in copies:
        g.copy_(work)


def _static(
    g: Tensor, metric: int, params: Callable[[int], tuple[float, float, float]], dim: int | None
) -> _native.Static:
    """The packed static part of `g`'s job, or empty bytes when its memory has no native layout."""
    if metric == _native.CENTRALIZE:
        layout, is_double = _centralize_layout(g), g.dtype == torch.float64
    else:
        _, layout, is_double = _plan(g, dim)
    if layout is None:
        return b""
    b, n, m = layout
    p0, p1, p2 = params(n)
    return _native.Jobs.static(b, n, m, p0, p1, metric, is_double, p2)


def channel_directed_plain_(grads: Sequence[Tensor], metric: str, lam: float, beta: float, dim: int | None) -> None:
    """In place `g <- metric_gradient(g) + beta*g` for every exact `torch.Tensor` of `grads`.

    CPU float32/float64 tensors whose memory maps onto a C-ordered (B, N, M) array, N the smoothed axis,
    are rewritten in place by the native kernel, all in one call; other CPU tensors go through a contiguous
    float copy; without the kernel (or on other devices) the reference is computed and copied back.
    """
    kernel, params = _channel_params(metric, lam, beta)
    family = channel_family(metric, lam, beta, dim)
    _run_(grads, kernel, params, lambda g, axis: REFERENCE[metric](g, lam, axis, beta), dim, family)


_NATIVE_SIGMA = 1e6  # the kernel's recursions lose digits like sqrt(sigma) eps beyond; larger sigma: the FFT path


def laplacian_coefficients(sigma: float) -> tuple[float, float, float]:
    """(r, 1 - r, r / sigma) of kernels.c's factorisation `I - sigma L = (sigma/r)(I - r S)(I - r S^T)`,
    `r = 2 sigma / (1 + 2 sigma + sqrt(1 + 4 sigma))`, each computed without cancellation."""
    root = math.sqrt(1.0 + 4.0 * sigma)
    denominator = 1.0 + 2.0 * sigma + root
    return 2.0 * sigma / denominator, (1.0 + root) / denominator, 2.0 / denominator


def laplacian_plain_(grads: Sequence[Tensor], sigma: float, dim: int | None) -> None:
    """In place `g <- (I - sigma L)^-1 g` along `dim` for every exact `torch.Tensor` of `grads`: one call of the
    compiled kernel (a linear-time periodic solve) for sigma up to 1e6, the FFT reference otherwise."""
    if sigma == 0:
        return
    if sigma > _NATIVE_SIGMA:
        for g in grads:
            if g.numel():
                g.copy_(laplacian_reference(g, sigma, None if dim is None else dim % g.dim()))
        return
    coefficients = laplacian_coefficients(sigma)
    _run_(
        grads,
        _native.LAPLACIAN,
        lambda n: coefficients,
        lambda g, axis: laplacian_reference(g, sigma, axis),
        dim,
        laplacian_family(sigma, dim),
    )


def centralize_plain_(grads: Sequence[Tensor]) -> None:
    """In place `g <- g - mean over dims 1.. of g` for every exact `torch.Tensor` of `grads` (2+ dims): one call
    of the compiled kernel for all of them."""
    _run_(
        grads,
        _native.CENTRALIZE,
        lambda n: (0.0, 0.0, 0.0),
        lambda g, axis: centralize_reference(g),
        0,
        CENTRALIZE_FAMILY,
    )


def _out_of_place(
    grad: Tensor,
    metric: int,
    params: Callable[[int], tuple[float, float, float]],
    dim: int | None,
    family: tuple[object, ...],
    in_place: Callable[[list[Tensor]], None],
    reference: Callable[[], Tensor],
) -> Tensor:
    """A new tensor: native-layout tensors by one kernel call from `grad` into a fresh tensor of the same layout
    (the job packed once per layout, as `_run_` keeps them); other layouts and half types by a contiguous float
    copy and the in-place kernel; the reference without the kernel or off the CPU."""
    if not grad.is_cpu or not native_usable() or grad.numel() == 0:
        return reference()
    statics = _statics(family, _PURE_STATICS)
    key = _layout_key(grad)
    static = statics.get(key)
    if static is None:
        static = statics[key] = _static(grad, metric, params, dim)
    if static:
        return _into_fresh(grad, static)
    out = grad.to(dtype=compute_dtype(grad.dtype), copy=True)
    in_place([out])
    return out if out.dtype == grad.dtype else out.to(grad.dtype)


def _channel_params(metric: str, lam: float, beta: float) -> tuple[int, Callable[[int], tuple[float, float, float]]]:
    if metric == "h0":
        inv = 1.0 / lam
        return _native.H0, lambda n: (inv, beta, 0.0)
    return _native.SOBOLEV, lambda n: (1.0 / (lam * n * n), beta, 0.0)


def channel_directed_plain(grad: Tensor, metric: str, lam: float, beta: float, dim: int | None) -> Tensor:
    """Out of place, for an exact `torch.Tensor`: the native kernel where it applies, else the reference."""
    kernel, params = _channel_params(metric, lam, beta)
    return _out_of_place(
        grad,
        kernel,
        params,
        dim,
        channel_family(metric, lam, beta, dim),
        lambda out: channel_directed_plain_(out, metric, lam, beta, dim),
        lambda: REFERENCE[metric](grad, lam, dim, beta),
    )


def laplacian_plain(grad: Tensor, sigma: float, dim: int | None) -> Tensor:
    """Out of place `laplacian_smooth` for an exact `torch.Tensor` (as `laplacian_plain_` computes it)."""
    if sigma == 0 or sigma > _NATIVE_SIGMA:
        return laplacian_reference(grad, sigma, dim)
    coefficients = laplacian_coefficients(sigma)
    return _out_of_place(
        grad,
        _native.LAPLACIAN,
        lambda n: coefficients,
        dim,
        laplacian_family(sigma, dim),
        lambda out: laplacian_plain_(out, sigma, dim),
        lambda: laplacian_reference(grad, sigma, dim),
    )


def centralize_plain(grad: Tensor) -> Tensor:
    """Out of place centralisation for an exact `torch.Tensor` (as `centralize_plain_` computes it)."""
    return _out_of_place(
        grad,
        _native.CENTRALIZE,
        lambda n: (0.0, 0.0, 0.0),
        0,
        CENTRALIZE_FAMILY,
        centralize_plain_,
        lambda: centralize_reference(grad),
    )
