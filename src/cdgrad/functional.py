"""Pure gradient transforms and their in-place list forms; the one place that decides how a tensor is computed.

Axis convention: a convolution weight has PyTorch layout (O, I, kh, kw).  `dim` is the axis smoothed:
0 = output channels, 1 = input channels, None = the whole tensor rasterised to 1-D in C order (the
rasterised length then plays the role of O).  Half types (float16, bfloat16) are computed in float32 and
returned in the input dtype.

Dispatch (`route`): a `torch.distributed.tensor.DTensor` goes to the sharded code of `cdgrad.distributed`;
an exact `torch.Tensor` (never a subclass) on the CPU goes to the compiled linear-time kernel
(`cdgrad._native`) when one is available; anything else to the plain-PyTorch reference (`*_reference`),
which runs on any device.  Tests check that all routes agree.  The pure forms (`sobolev`, ...) return a new
tensor and never modify their input; the in-place forms (`channel_directed_`, `laplacian_smooth_`,
`centralize_`, `scale_`) rewrite a list of tensors and assume validated arguments (`check_*` validate).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from . import _kernels as K
from . import distributed as D
from .validation import check_choice, check_grad, check_nonnegative, check_positive, check_real

__all__ = [
    "reweighted_h0",
    "sobolev",
    "laplacian_smooth",
    "centralize",
    "channel_directed",
    "channel_directed_",
    "laplacian_smooth_",
    "centralize_",
    "scale_",
    "multiply_",
    "reweighted_h0_reference",
    "sobolev_reference",
    "METRICS",
    "DIRECTIONS",
]

METRICS = K.METRICS
DIRECTIONS = K.DIRECTIONS
reweighted_h0_reference = K.reweighted_h0_reference
sobolev_reference = K.sobolev_reference

Route = Literal["dtensor", "native", "reference"]


# ------------------------------------------------------------------------------------------- dispatch
def is_dtensor(t: object) -> bool:
    """Whether `t` is a `torch.distributed.tensor.DTensor` (without importing that module when unused)."""
    if type(t) is Tensor:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def route(grad: Tensor) -> Route:
    """How `grad` is computed: "dtensor" (sharded code), "native" (compiled kernel) or "reference" (PyTorch).

    "native" needs an exact `torch.Tensor` (a subclass may hold memory of another shape) on the CPU and the
    compiled kernel; it applies to the channel-directed metrics, Laplacian smoothing and centralisation.
    """
    if type(grad) is Tensor:
        return plain_route(grad.device)
    return "dtensor" if is_dtensor(grad) else "reference"


def plain_route(device: torch.device | str) -> Literal["native", "reference"]:
    """The route of a plain `torch.Tensor` on `device`: the compiled kernel on the CPU when it is available."""
    return "native" if torch.device(device).type == "cpu" and K.native_usable() else "reference"


# ----------------------------------------------------------------------------------------- validation
def _plain(value: object) -> bool:
    """A plain `int` or `float` (not a bool, not a numpy or tensor scalar): such arguments equal to validated ones
    are valid themselves, so the pure functions may replay a validated call's decision for them."""
    return type(value) is float or type(value) is int


def check_metric(metric: Any) -> str:
    """One of `METRICS`."""
    return str(check_choice(metric, "metric", METRICS))


def check_dim(dim: Any, grad: Tensor) -> int | None:
    """`dim` normalised to a non-negative axis of `grad`, or None (flattened)."""
    if dim is None:
        return None
    accepted = "0 (output channels), 1 (input channels, tensors with 2+ dims) or None (flattened)"
    if isinstance(dim, bool) or not isinstance(dim, int):
        if type(dim).__module__ != "numpy" or not hasattr(dim, "__index__") or type(dim).__name__ == "bool_":
            raise TypeError(f"dim must be {accepted}, got {type(dim).__name__} {dim!r}")
        dim = int(dim)
    if grad.dim() == 0 or not -grad.dim() <= dim < grad.dim():
        raise ValueError(f"dim={dim} is out of range for a gradient of shape {tuple(grad.shape)}; accepted: {accepted}")
    return int(dim) % grad.dim()


def check_centralizable(grad: Tensor, name: str = "grad") -> Tensor:
    """A gradient with 2 or more dims (conv and linear weights)."""
    check_grad(grad, name)
    if grad.dim() < 2:
        raise ValueError(
            f"centralize needs a gradient with 2 or more dims (conv or linear weight), got {name} of shape "
            f"{tuple(grad.shape)}"
        )
    return grad


# ------------------------------------------------------------------------------------ in-place forms
def channel_directed_(grads: Sequence[Tensor], metric: str, lam: float, beta: float = 0.0, dim: int | None = 0) -> None:
    """In place `g <- metric_gradient(g) + beta*g` for every tensor of `grads` (arguments assumed validated).

    Native-route tensors are rewritten by one call of the compiled kernel for the whole list; DTensors by the
    sharded code; other tensors through the reference.
    """
    plain: list[Tensor] = []
    for g in grads:
        if type(g) is Tensor:
            plain.append(g)
        elif is_dtensor(g):
            D._channel_directed_dtensor_(g, metric, lam, beta, None if dim is None else dim % g.dim(), None)
        elif g.numel():
            g.copy_(K.REFERENCE[metric](g, lam, None if dim is None else dim % g.dim(), beta))
    if plain:
        K.channel_directed_plain_(plain, metric, lam, beta, dim)


def laplacian_smooth_(grads: Sequence[Tensor], sigma: float, dim: int | None = None) -> None:
    """In place `g <- (I - sigma L)^-1 g` along `dim` for every tensor of `grads` (arguments assumed validated).

    Native-route tensors are rewritten by one call of the compiled kernel for the whole list; DTensors by the
    sharded code; other tensors through the reference.
    """
    plain: list[Tensor] = []
    for g in grads:
        if type(g) is Tensor:
            plain.append(g)
        elif is_dtensor(g):
            D.laplacian_smooth_dtensor_(g, sigma, None if dim is None else dim % g.dim())
        elif sigma != 0 and g.numel():
            g.copy_(K.laplacian_reference(g, sigma, None if dim is None else dim % g.dim()))
    if plain:
        K.laplacian_plain_(plain, sigma, dim)


def centralize_(grads: Sequence[Tensor]) -> None:
    """In place `g <- g - mean over dims 1.. of g` for every tensor of `grads` (2+ dims, assumed validated);
    plain tensors by one call of the compiled kernel."""
    plain: list[Tensor] = []
    for g in grads:
        if type(g) is Tensor:
            plain.append(g)
        elif is_dtensor(g):
            D.centralize_dtensor_(g)
        else:
            K.centralize_inplace_(g)
    if plain:
        K.centralize_plain_(plain)


def scale_(grads: Sequence[Tensor], factor: float) -> None:
    """In place `g <- factor * g`; factor 1 leaves every tensor untouched (bit for bit)."""
    if factor == 1.0 or not grads:
        return
    plain = [g for g in grads if not is_dtensor(g)]
    if plain:
        torch._foreach_mul_(plain, factor)
    for g in grads:
        if is_dtensor(g):
            D.scale_dtensor_(g, factor)


def multiply_(grad: Tensor, factor: Tensor) -> None:
    """In place `grad <- factor * grad`, `factor` a plain tensor broadcast over the trailing dims of `grad`."""
    if is_dtensor(grad):
        D.multiply_dtensor_(grad, factor)
    else:
        grad.mul_(factor)


# -------------------------------------------------------------------------------------- public API
def channel_directed(grad: Tensor, metric: str, lam: float, beta: float = 0.0, dim: int | None = 0) -> Tensor:
    """Metric gradient plus `beta` times the ordinary gradient, out of place, validated."""
    if type(metric) is str and _plain(lam) and _plain(beta) and (dim is None or type(dim) is int):
        out = K.replay_out_of_place(grad, K.channel_family(metric, lam, beta, dim))  # a call validated before
        if out is not None:
            return out
    check_grad(grad)
    metric = check_metric(metric)
    lam = check_positive(lam, "lam")
    beta = check_real(beta, "beta")
    return channel_directed_checked(grad, metric, lam, beta, check_dim(dim, grad))


def channel_directed_checked(grad: Tensor, metric: str, lam: float, beta: float, dim: int | None) -> Tensor:
    """`channel_directed` on validated arguments (`dim` a non-negative axis or None): dispatch only."""
    if type(grad) is Tensor:
        return K.channel_directed_plain(grad, metric, lam, beta, dim)
    if is_dtensor(grad):
        out = grad.detach().clone()
        D._channel_directed_dtensor_(out, metric, lam, beta, dim, None)
        return out
    return K.REFERENCE[metric](grad, lam, dim, beta)


def reweighted_h0(grad: Tensor, lam: float, dim: int | None = 0) -> Tensor:
    """Gradient under the re-weighted H0 metric (docs/math.md 1.1, paper eq. 8).

        g = fbar + (f - fbar) / lam,     fbar = mean of f along `dim`,   lam > 0

    lam = 1 returns f; large lam keeps only the channel mean.
    """
    return channel_directed(grad, "h0", lam, 0.0, dim)


def sobolev(grad: Tensor, lam: float, dim: int | None = 0) -> Tensor:
    """Gradient under the channel-directed Sobolev metric (docs/math.md 1.2, paper eqs. 6, 8, 22).

    The exact discrete solution along `dim` (length O, periodic) of

        f[o] = mean(g) - lam * O^2 * (g[o+1] - 2 g[o] + g[o-1]),

    computed in time linear in O with cumulative sums.  mean(g) = mean(f); O = 1 returns f; O = 0 (an empty
    axis) returns an empty tensor.  It is the Riemannian gradient: for every k,
    sum(f*k) = O*sum(mean(g)*mean(k)) + lam*O^2*sum(Dg*Dk), with D the periodic forward difference.
    """
    return channel_directed(grad, "sobolev", lam, 0.0, dim)


def laplacian_smooth(grad: Tensor, sigma: float, dim: int | None = None) -> Tensor:
    """Laplacian smoothing of Osher et al. (docs/math.md 2): `g = (I - sigma*L)^-1 f`, L periodic.

    L is the periodic second difference along `dim` (None: the tensor rasterised in C order, as the
    published code does).  Computed with the Fourier multiplier `1 / (1 + 2 sigma (1 - cos(2 pi k / n)))`.
    sigma = 0 returns f.
    """
    if _plain(sigma) and (dim is None or type(dim) is int):
        out = K.replay_out_of_place(grad, K.laplacian_family(sigma, dim))  # a call validated before
        if out is not None:
            return out
    check_grad(grad)
    sigma = check_nonnegative(sigma, "sigma")
    return laplacian_smooth_checked(grad, sigma, check_dim(dim, grad))


def laplacian_smooth_checked(grad: Tensor, sigma: float, dim: int | None) -> Tensor:
    """`laplacian_smooth` on validated arguments (`dim` a non-negative axis or None): dispatch only."""
    if is_dtensor(grad):
        out = grad.detach().clone()
        D.laplacian_smooth_dtensor_(out, sigma, dim)
        return out
    if type(grad) is Tensor:
        return K.laplacian_plain(grad, sigma, dim)
    return K.laplacian_reference(grad, sigma, dim)


def centralize(grad: Tensor) -> Tensor:
    """Gradient centralisation (Yong et al.; docs/math.md 3): `g = f - mean over (I, kh, kw) of f` per output channel.

    Needs a tensor with 2 or more dims (conv and linear weights); dim 0 is the output axis.
    """
    out = K.replay_out_of_place(grad, K.CENTRALIZE_FAMILY)  # a gradient of this layout validated before
    if out is not None:
        return out
    return centralize_checked(check_centralizable(grad))


def centralize_checked(grad: Tensor) -> Tensor:
    """`centralize` on a validated gradient: dispatch only."""
    if is_dtensor(grad):
        out = grad.detach().clone()
        D.centralize_dtensor_(out)
        return out
    if type(grad) is Tensor:
        return K.centralize_plain(grad)
    return K.centralize_reference(grad)
