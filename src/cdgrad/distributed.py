"""Channel-directed gradients under torch.distributed: DDP, FSDP2 (DTensor) and plain process groups.

DDP needs nothing from this module: `cdgrad.attach` runs the transform in an optimizer step pre-hook, i.e. after
`backward()` has returned, and DDP's gradient all-reduce has completed by then, so every rank transforms the same
averaged gradient and takes the same step.

FSDP2 (`torch.distributed.fsdp.fully_shard`) leaves each gradient as a DTensor sharded along dim 0 (the
output-channel axis) with `torch.chunk` semantics: ceil(O/W) rows per rank in rank order, trailing ranks possibly
empty. `channel_directed_dtensor_` smooths such gradients without gathering them:

* output-direction H0:      one all-reduce of the column sums, then `g = fbar + (f - fbar) / lam` locally;
* output-direction Sobolev: one all-gather of three column moments per shard (sum_j f, sum_j j f, sum_j j^2 f).
  They give every rank the global mean, the exclusive-scan offsets of both cumulative sums of the linear-time
  solve (docs/math.md 1.2) and the re-centring constant. Locally, the shard is solved alone with the single-process
  kernel and corrected by a polynomial of degree 2 in the row index (one rank-3 update).

Both collectives carry float64 statistics of size I*H*W per shard instead of the O*I*H*W gradient; the update is
written into the gradient's local shard in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _kernels as K
from ._kernels import DIRECTIONS, METRICS
from .validation import check_bool, check_choice, check_grad, check_int, check_positive, check_real

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
_ACC = torch.float64  # dtype of the shard statistics and of everything computed from them


# --------------------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------------------


def _all_reduce_sum(payload: Tensor, group: Any) -> None:
    """In-place sum of `payload` over `group` (the only all-reduce this module issues)."""
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)


def _all_gather(payload: Tensor, group: Any, world: int) -> Tensor:
    """(world, numel) tensor of every rank's 1-D `payload`, in rank order (the only all-gather issued here)."""
    out = payload.new_empty(world * payload.numel())  # flat: gloo splits the output along dim 0
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, payload, group=group)
    return out.view(world, -1)


def _group_size_rank(group: Any) -> tuple[int, int]:
    """(world size, rank) of `group`; a process without any process group is a world of one."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def _check_local(local: Tensor) -> None:
    check_grad(local, "local")
    if local.dim() < 1:
        raise ValueError("local must have at least one dimension (the sharded rows along dim 0), got a scalar")


# --------------------------------------------------------------------------------------------------------------
# Sharded re-weighted H0:  g = fbar + (f - fbar) / lam
# --------------------------------------------------------------------------------------------------------------


def sharded_reweighted_h0(local: Tensor, lam: float, group: Any = None) -> Tensor:
    """Re-weighted H0 gradient `g = fbar + (f - fbar) / lam` along dim 0 of a tensor sharded by rows.

    `local` holds this rank's rows (`O_local` may be 0); the trailing shape must agree on every rank of `group`
    (default: the default group; no process group = a single shard). The global mean `fbar` over dim 0 comes from
    one all-reduce of the float64 column sums and the row count (so `O` need not be given). Returns a new tensor
    with `local`'s shape and dtype.
    """
    _check_local(local)
    lam = check_positive(lam, "lam")
    world, _ = _group_size_rank(group)
    out = local.clone()
    _sharded_h0_(out, lam, 0.0, group, world)
    return out


def _sharded_h0_(x: Tensor, lam: float, beta: float, group: Any, world: int) -> None:
    """In place: `x <- fbar + (x - fbar)/lam + beta*x` along dim 0 of the sharded tensor whose rows `x` holds."""
    payload = _h0_stats(x)
    if world > 1:
        _all_reduce_sum(payload, group)
    _h0_finish_(x, payload, lam, beta)


def _rows(x: Tensor) -> Tensor:
    """`x` as a (rows, columns) matrix (a view when `x` is contiguous); also for zero rows."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _h0_stats(x: Tensor) -> Tensor:
    """[column sums of `x` over dim 0 (float64, flattened), row count]."""
    sums = _rows(x).sum(dim=0, dtype=_ACC)
    return torch.cat([sums, sums.new_tensor([float(x.shape[0])])])


def _h0_finish_(x: Tensor, total: Tensor, lam: float, beta: float) -> None:
    """`x <- (1 - 1/lam) fbar + (1/lam + beta) x`, with fbar from the summed payloads."""
    n_total = int(round(total[-1].item()))
    if n_total == 0 or x.numel() == 0:
        return
    fbar = (total[:-1] / n_total).reshape((1, *x.shape[1:]))
    x.mul_(1.0 / lam + beta).add_((fbar * (1.0 - 1.0 / lam)).to(x.dtype))


# --------------------------------------------------------------------------------------------------------------
# Sharded Sobolev (exact discrete, periodic; docs/math.md 1.2)
# --------------------------------------------------------------------------------------------------------------


def sharded_sobolev(local: Tensor, lam: float, O: int, group: Any = None) -> Tensor:  # noqa: E741
    """Channel-directed Sobolev gradient along dim 0 of a tensor sharded by rows, without gathering it.

    Solves `f[o] = mean(g) - lam*O^2*(g[o+1] - 2 g[o] + g[o-1])` (periodic, o = 0..O-1), i.e. with
    `d = f - fbar`, `C = cumsum(d)/(lam O^2)`, `v[o] = mean(C) - C[o-1]` (`C[-1] = 0`), `U = cumsum(v)`:
    `g = fbar + U - mean(U)`. The shards are the ranks of `group` in rank order (`O_local` may be 0, sizes may be
    uneven); their trailing shapes must agree. Communication: one all-gather of the float64 column moments
    `sum_j f[j]`, `sum_j j f[j]`, `sum_j j^2 f[j]` of each shard (local row index j) and its row count; every global
    mean and exclusive-scan offset of the two cumulative sums is a closed form in those moments.
    Returns a new tensor with `local`'s shape and dtype.
    """
    _check_local(local)
    lam = check_positive(lam, "lam")
    O = check_int(O, "O (the global length of dim 0)", minimum=1)  # noqa: E741
    world, rank = _group_size_rank(group)
    out = local.clone()
    _sharded_sobolev_(out, lam, 0.0, O, group, world, rank)
    return out


def _sharded_sobolev_(x: Tensor, lam: float, beta: float, n_total: int, group: Any, world: int, position: int) -> None:
    """In place: `x <- g + beta*x` for the shard at `position` of the shard order of `group` (position = rank
    unless the shard order differs from the group's rank order, e.g. on a device mesh)."""
    payload = _sobolev_stats(x, position)
    gathered = _all_gather(payload, group, world) if world > 1 else payload.unsqueeze(0)
    _sobolev_finish_(x, gathered, position, lam, beta, n_total)


def _sobolev_stats(x: Tensor, position: int) -> Tensor:
    """Flat float64 payload `[m0, m1, m2, n, position]`, `mk = sum_j j^k x[j]` per column (j = local row)."""
    n = x.shape[0]
    j = torch.arange(n, dtype=_ACC, device=x.device)
    moments = torch.stack([torch.ones_like(j), j, j * j]) @ _rows(x).to(_ACC)  # (3, M)
    return torch.cat([moments.reshape(-1), moments.new_tensor([float(n), float(position)])])


def _polynomial(
    m0: Tensor,
    d1: Tensor,
    d2: Tensor,
    n: int,
    kappa: float,
    s: float = 0.0,
    d0_pre: Tensor | float = 0.0,
    d1_pre: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients (a, b, c) with `g[s+j] = a + j b + j(j+1)/2 c - kappa E[j]`, `E[j] = sum_{i<j} (j-i) f[s+i]`.

    Inputs: the global column sum `m0` and centred moments `D_k = sum_p p^k d[p]` (k = 1, 2) of a problem of
    length `n`, and the centred sums `D_k(<s)` over the rows before the shard. The closed forms:
    `sum_p C[p] = -kappa D_1`, `sum_{p<s} C[p] = kappa (s D_0(<s) - D_1(<s))`, `C[s-1] = kappa D_0(<s)`,
    `sum_p (n-p) C[p-1] = kappa/2 (D_2 - (2n-1) D_1)` and `sum_p U[p] = sum_p (n-p) v[p]`.
    """
    fbar = m0 / n
    mean_c = -kappa * d1 / n
    mean_u = (mean_c * (n * (n + 1) / 2) - 0.5 * kappa * (d2 - (2 * n - 1) * d1)) / n
    c_prev = kappa * d0_pre  # C[s-1]; 0 on the first shard
    v_pre = s * mean_c - (kappa * (s * d0_pre - d1_pre) - c_prev)  # sum_{p<s} v[p]
    b = mean_c - c_prev
    return fbar + v_pre - mean_u + b, b, kappa * fbar


def _centred(m0: Tensor, m1: Tensor, m2: Tensor, n: int, fbar: Tensor) -> tuple[Tensor, Tensor]:
    """`D_1, D_2` of `d = f - fbar` over rows 0..n-1 from the moments `m_k = sum_p p^k f[p]`."""
    return m1 - fbar * (n * (n - 1) / 2), m2 - fbar * ((n - 1) * n * (2 * n - 1) / 6)


def _sobolev_finish_(x: Tensor, gathered: Tensor, position: int, lam: float, beta: float, n_total: int) -> None:
    """Finish the solve in place on one shard, given the payloads of all shards (one row each).

    The exact solve of the shard alone (length n, periodic) with `lam_n = lam O^2 / n^2` has the same
    `kappa = 1/(lam O^2)`, hence the same `-kappa E[j]` term as the sharded solution; the two differ by the
    polynomial `(a - a') + j (b - b') + j(j+1)/2 (c - c')` per column. So the shard is solved locally with
    `cdgrad.functional` (the single-process kernel) and corrected with one rank-3 update.
    """
    n = x.shape[0]
    M = (gathered.shape[1] - 2) // 3
    counts = gathered[:, -2].round().to(torch.int64).tolist()
    positions = gathered[:, -1].round().to(torch.int64).tolist()
    if sorted(positions) != list(range(len(positions))):
        raise ValueError(f"shard positions must be a permutation of 0..{len(positions) - 1}, got {positions}")
    if sum(counts) != n_total:
        raise ValueError(f"O must equal the total number of rows over all shards ({sum(counts)}), got {n_total}")
    if n == 0 or M == 0:
        return
    order = sorted(range(len(positions)), key=positions.__getitem__)  # shards in row order
    starts = [0] * len(order)
    for before_q, q in zip(order[:-1], order[1:], strict=True):
        starts[q] = starts[before_q] + counts[before_q]
    me = positions.index(position)
    s = float(starts[me])

    m = gathered[:, : 3 * M].reshape(-1, 3, M)  # per shard: moments about its own first row
    s_q = gathered.new_tensor(starts).unsqueeze(-1)
    g0 = m[:, 0]  # moments about the global row index p = s_q + j
    g1 = s_q * m[:, 0] + m[:, 1]
    g2 = s_q * s_q * m[:, 0] + 2 * s_q * m[:, 1] + m[:, 2]
    before = gathered.new_tensor(positions) < position  # shards holding the rows p < s

    kappa = 1.0 / (lam * n_total * n_total)
    fbar = g0.sum(0) / n_total
    d1, d2 = _centred(g0.sum(0), g1.sum(0), g2.sum(0), n_total, fbar)
    d0_pre = g0[before].sum(0) - s * fbar
    d1_pre = g1[before].sum(0) - fbar * (s * (s - 1) / 2)
    glob = _polynomial(g0.sum(0), d1, d2, n_total, kappa, s, d0_pre, d1_pre)
    own = m[me]
    own_d1, own_d2 = _centred(own[0], own[1], own[2], n, own[0] / n)
    alone = _polynomial(own[0], own_d1, own_d2, n, kappa)
    delta = torch.stack([p - q for p, q in zip(glob, alone, strict=True)]).to(x.dtype)  # (3, M)

    K.channel_directed_plain_([x], "sobolev", lam * n_total * n_total / (n * n), beta, 0)  # x <- g_alone + beta x
    j = torch.arange(n, dtype=x.dtype, device=x.device)
    basis = torch.stack([torch.ones_like(j), j, j * (j + 1) / 2], dim=1)  # (n, 3)
    if x.is_contiguous():
        _rows(x).addmm_(basis, delta)  # a view: updates x
    else:
        x.add_((basis @ delta).reshape(x.shape))


# --------------------------------------------------------------------------------------------------------------
# DTensor entry point
# --------------------------------------------------------------------------------------------------------------


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
            _sharded_h0_(x, lam, beta, group, world)
        else:
            _sharded_sobolev_(x, lam, beta, n_total, group, world, position)
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
    acc = torch.finfo(_ACC).bits // 8
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
