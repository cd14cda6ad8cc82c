"""Normalised mutual information of paired samples, from a joint histogram (the SGS dependence measure).

`NMI(P, Q) = (H(P) + H(Q) - H(P, Q)) / H(P, Q)`, entropies from a `bins x bins` joint histogram (Sturges'
rule bins by default); the histogram machinery here is shared with `cdgrad.sgs.dependence`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..validation import check_int, check_memory, check_tensor

__all__ = ["normalized_mutual_information"]


def check_bins(bins: Any) -> int | None:
    return None if bins is None else check_int(bins, "bins", minimum=1)


def sturges(n: int) -> int:
    """Sturges' rule, `ceil(log2(n)) + 1`, in exact integer arithmetic."""
    return (n - 1).bit_length() + 1


# ------------------------------------------------------------------------------------ histogram machinery
def index_dtype(upper: int) -> torch.dtype:
    """Smallest integer dtype (int16 or int32 or int64) holding values in `[0, upper)`."""
    if upper <= 2**15:
        return torch.int16
    if upper <= 2**31:
        return torch.int32
    return torch.int64


def workspace_buffer(
    workspace: dict[str, Tensor] | None, key: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype
) -> Tensor:
    """An uninitialised tensor of `shape`, carved from a reusable flat buffer when a workspace is given."""
    numel = math.prod(shape)
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    buf = workspace.get(key)
    if buf is None or buf.dtype != dtype or buf.device != like.device or buf.numel() < numel:
        buf = workspace[key] = torch.empty(numel, dtype=dtype, device=like.device)
    return buf[:numel].view(shape)


def bin_codes(
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    bins: int,
    dtype: torch.dtype,
    workspace: dict[str, Tensor] | None = None,
    key: str = "codes",
) -> Tensor:
    """Bin codes `trunc((x - lo) * (bins / (hi - lo)))` in `[0, bins]`; all 0 where `hi == lo`.

    `lo`, `hi` (broadcasting against `x`) are the sample's own min and max, so `x - lo >= 0` and the
    truncation is a floor. Code `bins` is reached only by the maximum (up to rounding); `fold_last_bin` merges it
    into bin `bins - 1`, so that bin is closed `[e_{B-1}, max]` as in `numpy.histogram2d`.
    """
    width = hi - lo
    scale = torch.where(width > 0, bins / torch.where(width > 0, width, torch.ones_like(width)), 0.0)
    scaled = workspace_buffer(workspace, "float", x.shape, x, x.dtype)
    if bool((lo == 0).all()):  # x - 0 == x exactly: skip a pass (inputs after a ReLU)
        torch.mul(x, scale, out=scaled)
    else:
        torch.sub(x, lo, out=scaled).mul_(scale)
    out = workspace_buffer(workspace, key, x.shape, x, dtype)
    return out.copy_(scaled)


def fold_last_bin(counts: Tensor) -> Tensor:
    """Joint counts `(..., B+1, B+1)` over codes `0..B` -> `(..., B, B)`, code `B` merged into bin `B - 1`."""
    counts = counts.clone()
    counts[..., -2, :] += counts[..., -1, :]
    counts[..., :, -2] += counts[..., :, -1]
    return counts[..., :-1, :-1]


def _entropy(counts: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Shannon entropy (nats) `-sum p log p`, `p = counts / sum(counts)`, over `dims`, in float64."""
    c = counts.to(torch.float64)
    p = c / c.sum(dim=dims, keepdim=True)
    out: Tensor = -torch.special.xlogy(p, p).sum(dim=dims)
    return out


def nmi_from_joint(joint: Tensor) -> Tensor:
    """NMI from joint histograms `(..., B, B)`; 1 where `H(P, Q) = 0` (both samples constant)."""
    h_pq = _entropy(joint, (-2, -1))
    h_p = _entropy(joint.sum(-1), (-1,))
    h_q = _entropy(joint.sum(-2), (-1,))
    nmi = (h_p + h_q - h_pq) / torch.where(h_pq > 0, h_pq, 1.0)
    return torch.where(h_pq > 0, nmi, 1.0).clamp_(0.0, 1.0)


def normalized_mutual_information(p: Tensor, q: Tensor, bins: int | None = None) -> Tensor:
    """Normalised mutual information `NMI = (H(P) + H(Q) - H(P,Q)) / H(P,Q)` of paired samples.

    `p` and `q` have equal shapes `(..., n)`; the last dim holds the `n` paired observations, leading dims
    are a batch and the result has shape `(...)`. The entropies come from a `bins x bins` joint histogram:
    `bins` defaults to Sturges' rule `ceil(log2(n)) + 1`; each sample is binned over its own range
    `[min, max]` into equal-width bins, the maximum falling in the last bin (the same assignment as
    `numpy.histogram2d` with edges `linspace(min, max, bins + 1)`, up to rounding exactly at an edge).
    Degenerate cases: a constant sample puts all its mass in one bin; if exactly one sample is constant
    the NMI is 0 (it carries no information about the other); if both are constant, `H(P,Q) = 0` and the
    NMI is defined as 1. The result lies in `[0, 1]` (clamped against rounding), is symmetric in `p, q`,
    and `NMI(p, p) = 1`. Computed in float64, returned in the inputs' dtype. A `bins` whose histograms cannot
    fit in the available memory (about 40 bytes per joint cell, `batch * (bins + 1)^2` cells) is refused.
    """
    check_tensor(p, "p")
    check_tensor(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape (..., n), got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.dim() < 1 or p.shape[-1] < 1:
        raise ValueError(f"p and q must have shape (..., n) with n >= 1, got {tuple(p.shape)}")
    bins = check_bins(bins)
    n = p.shape[-1]
    nbins = sturges(n) if bins is None else bins
    batch = p.shape[:-1]
    m = math.prod(batch)
    pf, qf = p.reshape(m, n), q.reshape(m, n)
    if m == 0:
        return torch.empty(batch, dtype=p.dtype, device=p.device)
    # the joint counts (int64), their folded copy and three float64 arrays of the entropy; the codes of both samples
    cells = m * (nbins + 1) ** 2
    what = f"{m} joint histogram{'s' if m != 1 else ''} of {nbins + 1} x {nbins + 1} cells"
    check_memory(40 * cells + 16 * m * n, "bins", nbins if bins is not None else None, device=p.device, what=what)
    lo_p, hi_p = pf.aminmax(dim=1, keepdim=True)
    lo_q, hi_q = qf.aminmax(dim=1, keepdim=True)
    for name, lo, hi in (("p", lo_p, hi_p), ("q", lo_q, hi_q)):
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(f"{name} must contain only finite values")
    stride = nbins + 1  # codes run over 0..nbins, see `bin_codes`
    dtype = index_dtype(m * stride * stride)
    offset = torch.arange(m, device=p.device, dtype=dtype).unsqueeze(1) * (stride * stride)
    joint_index = torch.add(offset, bin_codes(pf, lo_p, hi_p, nbins, dtype), alpha=stride)
    joint_index += bin_codes(qf, lo_q, hi_q, nbins, dtype)
    joint = torch.bincount(joint_index.reshape(-1), minlength=m * stride * stride).view(m, stride, stride)
    return nmi_from_joint(fold_last_bin(joint)).to(p.dtype).reshape(batch)
