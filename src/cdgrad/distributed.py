"""Channel-directed gradients under torch.distributed: DDP, FSDP2 (DTensor) and plain process groups.

DDP needs nothing from this module: `cdgrad.attach` runs the transform in an optimizer step pre-hook, i.e. after
`backward()` has returned, and DDP's gradient all-reduce has completed by then, so every rank transforms the same
averaged gradient and takes the same step.

FSDP2 (`torch.distributed.fsdp.fully_shard`) leaves each gradient as a DTensor sharded along dim 0 (the
output-channel axis) with `torch.chunk` semantics: ceil(O/W) rows per rank in rank order, trailing ranks possibly
empty. `channel_directed_dtensor_` smooths such gradients without gathering them, with the sharded algorithms of
`cdgrad.sharded` (one all-reduce of column sums for H0, one all-gather of three column moments for Sobolev, float64
statistics of size I*H*W per shard instead of the gradient), written into the local shard in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _kernels as K
from ._kernels import DIRECTIONS, METRICS
from .sharded import sharded_h0_, sharded_reweighted_h0, sharded_sobolev, sharded_sobolev_
from .validation import check_bool, check_choice, check_grad, check_positive, check_real

__all__ = [
    "centralize_dtensor_",
    "channel_directed_dtensor_",
    "laplacian_smooth_dtensor_",
    "multiply_dtensor_",
    "scale_dtensor_",
    "sharded_reweighted_h0",
    "sharded_sobolev",
]

_PARTIAL_OPS = ("sum", "avg", "min", "max")  # reductions whose Partial share of a value is known


def channel_directed_dtensor_(
    grad: Any, metric: str, lam: float, beta: float, direction: str, *, gather: bool | None = None
) -> None:
    """Replace the local shard of the DTensor gradient `grad` by the channel-directed update `g + beta * f`.

    `g` is the H0 (`g = fbar + (f - fbar)/lam`) or Sobolev gradient of `f = grad` along `direction`
    ("output" = dim 0, "input" = dim 1, "flat" = the tensor rasterised in C order), exactly as on one process.
    Communication by placement (mesh dims with `Replicate()` are ignored; they compute identical results):

    * the smoothing dim is not sharded (e.g. "input" on FSDP2's `Shard(0)`): local, no communication;
    * the smoothing dim is sharded on one mesh dim (e.g. "output" on `Shard(0)`): the sharded algorithm on that
      mesh dim's group (one all-reduce for H0, one all-gather of moments for Sobolev);
    * "flat" with only dim 0 sharded: the C-order rasterisation of a `Shard(0)` tensor is the concatenation of
      the shards in order, so the same sharded algorithm applies along the rasterised vector;
    * anything else (`Partial`, strided shards, a dim sharded on several mesh dims, "flat" with a dim other than 0
      sharded): gather the full tensor, transform it with `cdgrad.functional`, keep the local part.

    `gather=None` (default) uses the sharded algorithm where it applies unless gathering moves fewer bytes, which
    happens only for tiny shards (Sobolev: fewer than 7 float32 or 4 float64 rows per rank); `gather=False` forces the
    sharded algorithm where it applies, `gather=True` always gathers.
    """
    dim = _check_dtensor_args(grad, metric, lam, beta, direction, gather)
    _channel_directed_dtensor_(grad, metric, float(lam), float(beta), dim, gather)


def _check_dtensor_args(grad: Any, metric: Any, lam: Any, beta: Any, direction: Any, gather: Any) -> int | None:
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor):
        raise TypeError(f"grad must be a torch.distributed.tensor.DTensor, got {type(grad).__name__}")
    check_choice(metric, "metric", METRICS)
    check_choice(direction, "direction", tuple(DIRECTIONS))
    check_positive(lam, "lam")
    check_real(beta, "beta")
    if gather is not None:
        check_bool(gather, "gather (None: choose by bytes, True or False)")
    check_grad(grad.to_local(), "grad")
    _check_placements(grad)
    dim = DIRECTIONS[direction]
    if dim is not None and grad.dim() <= dim:
        accepted = ("output", "flat") if grad.dim() == 1 else ("flat",)
        raise ValueError(
            f"direction={direction!r} needs a gradient with {dim + 1}+ dims, got shape {tuple(grad.shape)}; "
            f"accepted for it: {accepted}"
        )
    return dim


def _channel_directed_dtensor_(
    grad: Any, metric: str, lam: float, beta: float, dim: int | None, gather: bool | None
) -> None:
    """`channel_directed_dtensor_` on validated arguments, `dim` a non-negative axis or None (rasterised)."""
    _check_placements(grad)
    if grad.numel() == 0:
        return
    local = grad.to_local()
    plan = ("gather",) if gather else _plan(grad, dim)
    if plan[0] == "sharded" and gather is None and not _sharded_is_cheaper(grad, metric, plan[1], plan[2]):
        plan = ("gather",)

    if plan[0] == "local":
        K.channel_directed_plain_([local], metric, lam, beta, plan[1])  # in place, no communication
    elif plan[0] == "sharded":
        dim, mesh_dim = plan[1], plan[2]
        mesh = grad.device_mesh
        group, world, position = mesh.get_group(mesh_dim), mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        # x: the shard's rows along the smoothing axis, a view of `local` unless `local` cannot be flattened
        if dim is not None:
            x, n_total = local.movedim(dim, 0), grad.shape[dim]
        elif local.is_contiguous():  # rasterised: a Shard(0) shard is a consecutive piece of the flat vector
            x, n_total = local.view(-1, 1), grad.numel()
        else:
            x, n_total = local.reshape(-1, 1).clone(), grad.numel()
        if metric == "h0":
            sharded_h0_(x, lam, beta, group, world)
        else:
            sharded_sobolev_(x, lam, beta, n_total, group, world, position)
        if dim is None and not local.is_contiguous():
            local.copy_(x.view(local.shape))
    else:
        local.copy_(_gathered(grad, lambda full: K.channel_directed_plain(full, metric, lam, beta, dim)))


def _sharded_dims(grad: Any) -> dict[int, list[int]] | None:
    """{tensor dim: [mesh dims sharding it]} for plain `Shard` placements; None if any placement is other than
    `Shard` or `Replicate` (`Partial`, strided shards, ...)."""
    from torch.distributed.tensor import Replicate, Shard

    sharded: dict[int, list[int]] = {}
    for mesh_dim, p in enumerate(grad.placements):
        if type(p) is Shard:  # exact type: strided shards are not contiguous row blocks
            sharded.setdefault(p.dim, []).append(mesh_dim)
        elif not isinstance(p, Replicate):
            return None
    return sharded


def _plan(grad: Any, dim: int | None) -> tuple[Any, ...]:
    """("local", dim) | ("sharded", dim, mesh_dim) | ("gather",); dim None = rasterised."""
    sharded = _sharded_dims(grad)
    if sharded is None or any(len(v) > 1 for v in sharded.values()):
        return ("gather",)
    if dim is None:
        if not sharded:
            return ("local", None)
        if list(sharded) == [0]:
            return ("sharded", None, sharded[0][0])
        return ("gather",)
    if dim in sharded:
        return ("sharded", dim, sharded[dim][0])
    return ("local", dim)


def _is_local(grad: Any, coupled: set[int] | None) -> bool:
    """Whether a transform that couples the entries along the tensor dims `coupled` (None: every dim) and acts
    independently along the others can run on each local shard alone: no dim it couples is sharded and no
    placement is `Partial` (a non-linear map of a partial sum is not the partial sum of the map)."""
    sharded = _sharded_dims(grad)
    if sharded is None:
        return False
    if coupled is None:
        return not sharded
    return not (set(sharded) & coupled)


def laplacian_smooth_dtensor_(grad: Any, sigma: float, dim: int | None) -> None:
    """In place `g <- (I - sigma L)^-1 g` along `dim` (None: rasterised) of the DTensor `grad` (validated).

    Local when the smoothed axis is not sharded (e.g. "input" on FSDP2's `Shard(0)`); otherwise the full tensor
    is gathered, smoothed, and this rank keeps its part."""
    if sigma == 0 or grad.numel() == 0:
        return
    local = grad.to_local()
    if dim is not None and _is_local(grad, {dim}):
        if local.numel():
            local.copy_(K.laplacian_reference(local, sigma, dim))
    elif dim is None and _is_local(grad, None):
        local.copy_(K.laplacian_reference(local, sigma, None))
    else:
        local.copy_(_gathered(grad, lambda full: K.laplacian_reference(full, sigma, dim)))


def centralize_dtensor_(grad: Any) -> None:
    """In place `g <- g - mean over dims 1.. of g` per output row of the DTensor `grad` (2+ dims, validated).

    Rows are independent: local when only dim 0 is sharded (FSDP2's `Shard(0)`); otherwise gathered."""
    if grad.numel() == 0:
        return
    local = grad.to_local()
    if _is_local(grad, set(range(1, grad.dim()))):
        K.centralize_inplace_(local)
    else:
        local.copy_(_gathered(grad, K.centralize_reference))


def _commutes(grad: Any, nonnegative: bool) -> bool:
    """Whether multiplying each rank's share commutes with the `Partial` reductions of `grad` (always for
    "sum" and "avg"; for "min" and "max" only with non-negative factors)."""
    from torch.distributed.tensor import Partial

    return nonnegative or all(not isinstance(p, Partial) or p.reduce_op in ("sum", "avg") for p in grad.placements)


def scale_dtensor_(grad: Any, factor: float) -> None:
    """In place `g <- factor * g` of the DTensor `grad`: on the local shard (linear), gathered only for a
    negative factor on a `Partial` min/max placement."""
    if _commutes(grad, factor >= 0):
        grad.to_local().mul_(factor)
    else:
        grad.to_local().copy_(_gathered(grad, lambda full: full * factor))


def multiply_dtensor_(grad: Any, factor: Tensor) -> None:
    """In place `g <- factor * g`, `factor` a plain tensor broadcast over the trailing dims of `grad`'s global shape.

    Local when none of the trailing `factor.dim()` dims is sharded; otherwise gathered."""
    from torch.distributed.tensor import Shard

    if grad.numel() == 0:
        return
    trailing = set(range(grad.dim() - factor.dim(), grad.dim()))
    sharded = {p.dim for p in grad.placements if isinstance(p, Shard)}
    local = grad.to_local()
    if not (sharded & trailing) and _commutes(grad, bool((factor >= 0).all())):
        local.mul_(factor.to(device=local.device, dtype=local.dtype))
    else:
        local.copy_(_gathered(grad, lambda full: full * factor.to(device=full.device, dtype=full.dtype)))


def _sharded_is_cheaper(grad: Any, metric: str, dim: int | None, mesh_dim: int) -> bool:
    """Bytes received per rank (ring algorithms): the sharded statistics vs `full_tensor`'s all-gather of the
    padded shards (a lower bound when other dims are sharded too)."""
    world = grad.device_mesh.size(mesh_dim)
    local = grad.to_local()
    n = grad.numel() if dim is None else grad.shape[dim]
    cols = 1 if dim is None else math.prod(size for i, size in enumerate(local.shape) if i != dim)
    acc = torch.finfo(torch.float64).bits // 8  # the sharded statistics are float64
    all_reduce_h0 = 2 * (world - 1) / world * (cols + 1) * acc
    all_gather_sobolev = (world - 1) * (3 * cols + 2) * acc
    sharded = all_reduce_h0 if metric == "h0" else all_gather_sobolev
    gathered = (world - 1) * -(-n // world) * cols * local.element_size()
    return bool(sharded <= gathered)


def _check_placements(grad: Any) -> None:
    from torch.distributed.tensor import Partial

    for p in grad.placements:
        if isinstance(p, Partial) and p.reduce_op not in _PARTIAL_OPS:
            raise ValueError(
                f"grad has a Partial({p.reduce_op!r}) placement; accepted Partial reductions: {_PARTIAL_OPS}"
            )


def _gathered(grad: Any, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Gather-then-transform: `fn` of the full tensor on every rank, then this rank's part of it. Nothing beyond
    `full_tensor` is communicated: cutting a replicated tensor into shards is local, and a `Partial` mesh dim
    gets the share that reduces back to the result (1/n of it for "sum", all of it for "avg", "min", "max")."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    full = fn(grad.full_tensor())
    mesh = grad.device_mesh
    target = [Replicate() if isinstance(p, Partial) else p for p in grad.placements]
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    local: Tensor = replicated.redistribute(mesh, target).to_local()
    for mesh_dim, p in enumerate(grad.placements):
        if isinstance(p, Partial) and p.reduce_op == "sum":
            local = local / mesh.size(mesh_dim)
    return local
