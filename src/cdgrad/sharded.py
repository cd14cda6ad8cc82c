"""Channel-directed gradients of a tensor sharded along its smoothing axis over a process group, without gathering.

Rank r holds rows [start_r, start_r + n_r) of the (O, ...) gradient (`torch.chunk` semantics: ceil(O/W) rows per rank
in rank order, trailing ranks possibly empty):

* H0:      one all-reduce of the column sums, then `g = fbar + (f - fbar) / lam` locally;
* Sobolev: one all-gather of three column moments per shard (sum_j f, sum_j j f, sum_j j^2 f). They give every rank
  the global mean, the exclusive-scan offsets of both cumulative sums of the linear-time solve (docs/math.md 1.2) and
  the re-centring constant. Locally, the shard is solved alone with the single-process kernel and corrected by a
  polynomial of degree 2 in the row index (one rank-3 update).

Both collectives carry float64 statistics of size I*H*W per shard instead of the O*I*H*W gradient; the update is
written into the local shard in place. `cdgrad.distributed` applies these to DTensor gradients (FSDP2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _kernels as K
from .validation import check_grad, check_int, check_positive

__all__ = ["sharded_h0_", "sharded_reweighted_h0", "sharded_sobolev", "sharded_sobolev_"]

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
    sharded_h0_(out, lam, 0.0, group, world)
    return out


def sharded_h0_(x: Tensor, lam: float, beta: float, group: Any, world: int) -> None:
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
    sharded_sobolev_(out, lam, 0.0, O, group, world, rank)
    return out


def sharded_sobolev_(x: Tensor, lam: float, beta: float, n_total: int, group: Any, world: int, position: int) -> None:
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
