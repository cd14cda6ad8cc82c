"""Spatial gradient scaling (SGS): a per-layer, data-driven scaling of convolution gradients.

Each selected `k_h x k_w` convolution gets a positive scaling matrix `G` of shape `(k_h, k_w)`, mean 1,
and its weight gradient `f` (layout `(O, I, k_h, k_w)`) becomes `G * f`, broadcast over `O` and `I`.
`G` is computed from the layer's *input* feature maps:

    S[i, j] = spatial dependence between a pixel and its neighbour displaced by
              (i - k_h // 2, j - k_w // 2)                      (centre entry exactly 1)
    G = k * S / ((k - 1) * S + 1),   then   G <- G / mean(G)

The dependence is the normalised mutual information
`NMI(P, Q) = (H(P) + H(Q) - H(P, Q)) / H(P, Q)` of the two pixel populations (histogram
estimate, Sturges' rule bins), pooled over the batch and averaged over channels, or, with
`method="autocorr"`, the absolute Pearson correlation of the two populations.

By Lemma 1 of the method, training the single conv with `G = sum_n M_n` is exactly training an
N-branch re-parameterisation with binary receptive-field masks `M_n`, for any optimizer linear in
its gradient (SGD, momentum, coupled weight decay); SGS replaces the hand-picked masks by `G`.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cdgrad.transforms_base import GradientTransform, _check_grad

__all__ = [
    "SpatialGradientScaling",
    "normalized_mutual_information",
    "sgs_scaling",
    "spatial_dependence",
]

_METHODS = ("mi", "autocorr")


# --------------------------------------------------------------------------------------------- validation
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_bins(bins: Any) -> int | None:
    return None if bins is None else _check_int(bins, "bins", 1)


def _check_method(method: Any) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method


def _check_k(k: Any) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a positive finite real number, got {type(k).__name__}")
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be a positive finite real number, got {k}")
    return float(k)


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An int >= 1 or a pair of them, as a pair."""
    items = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value, value)
    message = f"{name} must be an int >= 1 or a pair of ints >= 1, got {value!r}"
    if len(items) != 2:
        raise ValueError(message)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(message)
        if v < 1:
            raise ValueError(message)
    return int(items[0]), int(items[1])


def _check_float_tensor(x: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")


def _sturges(n: int) -> int:
    """Sturges' rule, `ceil(log2(n)) + 1`, in exact integer arithmetic."""
    return (n - 1).bit_length() + 1


# ------------------------------------------------------------------------------------ histogram machinery
def _index_dtype(upper: int) -> torch.dtype:
    """Smallest integer dtype (int16 or int32 or int64) holding values in `[0, upper)`."""
    if upper <= 2**15:
        return torch.int16
    if upper <= 2**31:
        return torch.int32
    return torch.int64


def _buffer(
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


def _codes(
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
    truncation is a floor. Code `bins` is reached only by the maximum (up to rounding); `_fold` merges it
    into bin `bins - 1`, so that bin is closed `[e_{B-1}, max]` as in `numpy.histogram2d`.
    """
    width = hi - lo
    scale = torch.where(width > 0, bins / torch.where(width > 0, width, torch.ones_like(width)), 0.0)
    scaled = _buffer(workspace, "float", x.shape, x, x.dtype)
    if bool((lo == 0).all()):  # x - 0 == x exactly: skip a pass (inputs after a ReLU)
        torch.mul(x, scale, out=scaled)
    else:
        torch.sub(x, lo, out=scaled).mul_(scale)
    out = _buffer(workspace, key, x.shape, x, dtype)
    return out.copy_(scaled)


def _fold(counts: Tensor) -> Tensor:
    """Joint counts `(..., B+1, B+1)` over codes `0..B` -> `(..., B, B)`, code `B` merged into bin `B - 1`."""
    counts = counts.clone()
    counts[..., -2, :] += counts[..., -1, :]
    counts[..., :, -2] += counts[..., :, -1]
    return counts[..., :-1, :-1]


def _entropy(counts: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Shannon entropy (nats) `-sum p log p`, `p = counts / sum(counts)`, over `dims`, in float64."""
    c = counts.to(torch.float64)
    p = c / c.sum(dim=dims, keepdim=True)
    return -torch.special.xlogy(p, p).sum(dim=dims)


def _nmi_from_joint(joint: Tensor) -> Tensor:
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
    and `NMI(p, p) = 1`. Computed in float64, returned in the inputs' dtype.
    """
    _check_float_tensor(p, "p")
    _check_float_tensor(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape (..., n), got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.dim() < 1 or p.shape[-1] < 1:
        raise ValueError(f"p and q must have shape (..., n) with n >= 1, got {tuple(p.shape)}")
    bins = _check_bins(bins)
    n = p.shape[-1]
    nbins = _sturges(n) if bins is None else bins
    batch = p.shape[:-1]
    m = math.prod(batch)
    pf, qf = p.reshape(m, n), q.reshape(m, n)
    if m == 0:
        return torch.empty(batch, dtype=p.dtype, device=p.device)
    lo_p, hi_p = pf.aminmax(dim=1, keepdim=True)
    lo_q, hi_q = qf.aminmax(dim=1, keepdim=True)
    for name, lo, hi in (("p", lo_p, hi_p), ("q", lo_q, hi_q)):
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(f"{name} must contain only finite values")
    stride = nbins + 1  # codes run over 0..nbins, see `_codes`
    dtype = _index_dtype(m * stride * stride)
    offset = torch.arange(m, device=p.device, dtype=dtype).unsqueeze(1) * (stride * stride)
    joint_index = torch.add(offset, _codes(pf, lo_p, hi_p, nbins, dtype), alpha=stride)
    joint_index += _codes(qf, lo_q, hi_q, nbins, dtype)
    joint = torch.bincount(joint_index.reshape(-1), minlength=m * stride * stride).view(m, stride, stride)
    return _nmi_from_joint(_fold(joint)).to(p.dtype).reshape(batch)


# ------------------------------------------------------------------------------------- spatial dependence
def _displacements(kh: int, kw: int, dilation: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """`(i, j, di, dj)` for every off-centre kernel entry, `d = dilation * (index - k // 2)`."""
    out = []
    for i in range(kh):
        for j in range(kw):
            if (i, j) != (kh // 2, kw // 2):
                out.append((i, j, dilation[0] * (i - kh // 2), dilation[1] * (j - kw // 2)))
    return out


def _region(di: int, dj: int, h: int, w: int) -> tuple[slice, slice]:
    """Rows/cols of the pixels `a` whose neighbour `a + d` is inside an `h x w` map."""
    return slice(max(0, -di), h - max(0, di)), slice(max(0, -dj), w - max(0, dj))


def _extrema(x: Tensor, regions: list[tuple[slice, slice]]) -> list[tuple[Tensor, Tensor]]:
    """Per-channel (min, max) of `x[:, :, rows, cols]` for each region, pooled over the batch.

    One pass over `x` (the per-pixel extrema over the batch), then each region reduces a `(C, H, W)` map.
    """
    lo, hi = x.amin(dim=0), x.amax(dim=0)  # two reductions beat one aminmax(dim=0) on CPU
    return [(lo[:, r, cc].amin(dim=(1, 2)), hi[:, r, cc].amax(dim=(1, 2))) for r, cc in regions]


def _check_features(features: Any) -> None:
    _check_float_tensor(features, "features")
    if features.dim() != 4:
        raise ValueError(f"features must have shape (N, C, H, W), got {tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")


def _check_finite_range(lo: Tensor, hi: Tensor) -> None:
    """NaN and infinities propagate into the extrema, so finite extrema mean finite features."""
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("features must contain only finite values")


_CHUNK = 1 << 20  # CPU: values per chunk of the batch in `_per_channel_mi`, so the codes stay in cache


def _per_channel_mi(
    x: Tensor,
    kh: int,
    kw: int,
    bins: int | None,
    dilation: tuple[int, int],
    workspace: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel NMI maps `(C, kh, kw)` (float64) and the (C,) mask of non-constant channels."""
    n, c, h, w = x.shape
    dep = torch.zeros(c, kh, kw, dtype=torch.float64, device=x.device)
    dep[:, kh // 2, kw // 2] = 1.0
    # symmetric pairs d, -d see the same pixel pairs (swapped): compute one, mirror the other
    todo: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j, di, dj in _displacements(kh, kw, dilation):
        if abs(di) >= h or abs(dj) >= w:
            continue  # no pixel pairs: dependence 0
        key = (-di, -dj) if (-di, -dj) in todo else (di, dj)
        todo.setdefault(key, []).append((i, j))
    regions = [(slice(0, h), slice(0, w))]
    for di, dj in todo:
        rows, cols = _region(di, dj, h, w)
        regions += [
            (rows, cols),
            (slice(rows.start + di, rows.stop + di), slice(cols.start + dj, cols.stop + dj)),
        ]
    extrema = _extrema(x, regions)
    lo, hi = extrema[0]
    _check_finite_range(lo, hi)
    alive = lo != hi
    view = (1, -1, 1, 1)
    keys = list(todo)
    tasks_by_bins: dict[int, list[int]] = {}
    for t in range(len(keys)):
        rows, cols = regions[2 * t + 1]
        nb = _sturges(n * (rows.stop - rows.start) * (cols.stop - cols.start)) if bins is None else bins
        tasks_by_bins.setdefault(nb, []).append(t)
    step = max(1, _CHUNK // (c * h * w)) if x.device.type == "cpu" else n
    for nb, tasks in tasks_by_bins.items():
        stride = nb + 1  # codes run over 0..nb, see `_codes`
        size = c * stride * stride
        dtype = _index_dtype(size)
        offset = (torch.arange(c, device=x.device, dtype=dtype) * (stride * stride)).view(view)
        # codes on each channel's whole-map range, right for every crop that keeps the map's min and max;
        # the batch goes through in chunks so that the codes stay in cache across displacements
        counts = torch.zeros(len(tasks), size, dtype=torch.int64, device=x.device)
        for start in range(0, n, step):
            xb = x[start : start + step]
            second = _codes(xb, lo.view(view), hi.view(view), nb, dtype, workspace, "second")
            first = _buffer(workspace, "first", xb.shape, x, dtype)
            torch.add(offset, second, alpha=stride, out=first)
            for row, t in enumerate(tasks):  # joint code: channel * stride^2 + code(a) * stride + code(a + d)
                (rp, cp), (rq, cq) = regions[2 * t + 1], regions[2 * t + 2]
                shape = (xb.shape[0], c, rp.stop - rp.start, cp.stop - cp.start)
                joint_index = _buffer(workspace, "joint", shape, x, dtype)
                torch.add(first[:, :, rp, cp], second[:, :, rq, cq], out=joint_index)
                counts[row] += torch.bincount(joint_index.view(-1), minlength=size)
        # channels whose crop lost the map's min or max are re-coded on the crop's own range; one gather
        # of all of them serves every displacement (re-coding a channel that kept its range changes nothing)
        redo = [
            (extrema[2 * t + 1][0] != lo)
            | (extrema[2 * t + 1][1] != hi)
            | (extrema[2 * t + 2][0] != lo)
            | (extrema[2 * t + 2][1] != hi)
            for t in tasks
        ]
        idx = torch.stack(redo).any(dim=0).nonzero().squeeze(1)
        sub = x.index_select(1, idx) if len(idx) else None
        for row, t in enumerate(tasks):
            joint = counts[row].view(c, stride, stride)
            if sub is not None and bool(redo[row].any()):
                (rp, cp), (rq, cq) = regions[2 * t + 1], regions[2 * t + 2]
                (lo_p, hi_p), (lo_q, hi_q) = extrema[2 * t + 1], extrema[2 * t + 2]
                code_p = _codes(sub[:, :, rp, cp], lo_p[idx].view(view), hi_p[idx].view(view), nb, dtype)
                code_q = _codes(sub[:, :, rq, cq], lo_q[idx].view(view), hi_q[idx].view(view), nb, dtype)
                joint_index = torch.add(offset[:, : len(idx)], code_p, alpha=stride).add_(code_q)
                joint[idx] = torch.bincount(joint_index.view(-1), minlength=len(idx) * stride * stride).view(
                    len(idx), stride, stride
                )
            nmi = _nmi_from_joint(_fold(joint))
            for i, j in todo[keys[t]]:
                dep[:, i, j] = nmi
    return dep, alive


def _per_channel_autocorr(x: Tensor, kh: int, kw: int, dilation: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-channel |Pearson correlation| maps `(C, kh, kw)` (float64) and the non-constant channel mask.

    `x` is centred by its channel means first (limits cancellation in the moments); the crops' first and
    second moments come from per-pixel sums over the batch, the cross moment from one product per
    displacement. Sums run in the dtype of `x` per (image, channel) or per pixel, then in float64.
    """
    n, c, h, w = x.shape
    dep = torch.zeros(c, kh, kw, dtype=torch.float64, device=x.device)
    dep[:, kh // 2, kw // 2] = 1.0
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    _check_finite_range(lo, hi)
    alive = lo.amin(dim=(1, 2)) != hi.amax(dim=(1, 2))
    mean = x.sum(dim=0).double().sum(dim=(1, 2)) / (n * h * w)
    xc = x - mean.to(x.dtype).view(1, c, 1, 1)
    s1 = xc.sum(dim=0).double()  # (c, h, w) per-pixel sums over the batch
    scratch = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's layout
    s2 = torch.mul(xc, xc, out=scratch).sum(dim=0).double()
    done: dict[tuple[int, int], Tensor] = {}
    for i, j, di, dj in _displacements(kh, kw, dilation):
        if abs(di) >= h or abs(dj) >= w:
            continue
        if (-di, -dj) in done:
            dep[:, i, j] = done[(-di, -dj)]
            continue
        rp, cp = _region(di, dj, h, w)
        rq, cq = slice(rp.start + di, rp.stop + di), slice(cp.start + dj, cp.stop + dj)
        hp, wp = rp.stop - rp.start, cp.stop - cp.start
        count = n * hp * wp
        prod = scratch.view(-1)[: n * c * hp * wp].view(n, c, hp, wp)
        torch.mul(xc[:, :, rp, cp], xc[:, :, rq, cq], out=prod)
        spq = prod.view(n, c, -1).sum(dim=2).double().sum(dim=0)
        mp, mq = s1[:, rp, cp].sum(dim=(1, 2)) / count, s1[:, rq, cq].sum(dim=(1, 2)) / count
        vp = (s2[:, rp, cp].sum(dim=(1, 2)) / count - mp * mp).clamp_(min=0.0)
        vq = (s2[:, rq, cq].sum(dim=(1, 2)) / count - mq * mq).clamp_(min=0.0)
        cov = spq / count - mp * mq
        flat_p = lo[:, rp, cp].amin(dim=(1, 2)) == hi[:, rp, cp].amax(dim=(1, 2))  # constant crops, exactly
        flat_q = lo[:, rq, cq].amin(dim=(1, 2)) == hi[:, rq, cq].amax(dim=(1, 2))
        vp, vq = vp.masked_fill_(flat_p, 0.0), vq.masked_fill_(flat_q, 0.0)
        denom = (vp * vq).sqrt()
        r = torch.where(denom > 0, cov.abs() / torch.where(denom > 0, denom, 1.0), 0.0)
        r = torch.where(flat_p & flat_q, 1.0, r).clamp_(0.0, 1.0)
        done[(di, dj)] = r
        dep[:, i, j] = r
    return dep, alive


def _dependence(
    features: Tensor,
    kernel_size: tuple[int, int],
    bins: int | None,
    method: str,
    dilation: tuple[int, int],
    workspace: dict[str, Tensor] | None = None,
) -> Tensor:
    """`spatial_dependence` on validated arguments; float64 result. `workspace` recycles scratch buffers."""
    kh, kw = kernel_size
    if features.dtype in (torch.float16, torch.bfloat16):  # bin and sum in float32
        features = features.float()
    with torch.no_grad():
        if method == "mi":
            dep, alive = _per_channel_mi(features, kh, kw, bins, dilation, workspace)
        else:
            dep, alive = _per_channel_autocorr(features, kh, kw, dilation)
        if not alive.any():
            return torch.ones(kh, kw, dtype=torch.float64, device=features.device)
        out = dep[alive].mean(dim=0)
        out[kh // 2, kw // 2] = 1.0
        return out


def spatial_dependence(
    features: Tensor,
    kernel_size: int | tuple[int, int],
    bins: int | None = None,
    method: str = "mi",
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Spatial dependence matrix `S` of shape `(k_h, k_w)` from a conv layer's input maps `(N, C, H, W)`.

    `S[i, j]` = mean over channels c of `D(x[:, c, a, b], x[:, c, a + di, b + dj])`, with
    `(di, dj) = dilation * (i - k_h // 2, j - k_w // 2)`, the pixel pairs taken over the valid overlap
    `0 <= a, a + di < H`, `0 <= b, b + dj < W` and pooled over the batch. `D` is
    `normalized_mutual_information` (`method="mi"`, default Sturges bins of the pooled sample size, each
    crop binned over its own range) or the absolute Pearson correlation (`method="autocorr"`).
    Conventions: the centre entry is exactly 1; channels constant over the whole batch (e.g. dead ReLUs)
    carry no spatial information and are left out of the channel average (all constant: `S` = ones);
    a displacement with no pixel pairs (`|di| >= H` or `|dj| >= W`) has `S = 0`. Entries lie in
    `[0, 1]`, and `S[i, j] == S[k_h - 1 - i, k_w - 1 - j]` whenever both displacements exist.
    Returned in the dtype of `features`.
    """
    _check_features(features)
    ks = _pair(kernel_size, "kernel_size")
    bins = _check_bins(bins)
    method = _check_method(method)
    dil = _pair(dilation, "dilation")
    return _dependence(features, ks, bins, method, dil).to(features.dtype)


def sgs_scaling(S: Tensor, k: float = 5.0) -> Tensor:
    """The SGS k-transform `G = k*S / ((k-1)*S + 1)`, normalised to mean 1 over the last two dims.

    `S` has shape `(..., k_h, k_w)` with finite entries `>= 0` (and at least one `> 0` per matrix); `k > 0`.
    `G` is increasing in `S` (`dG/dS = k / ((k-1) S + 1)^2 > 0`); `k = 1` gives `G = S / mean(S)`, and a
    larger `k` flattens `G` towards uniform on the entries with `S > 0`.
    """
    _check_float_tensor(S, "S")
    k = _check_k(k)
    if S.dim() < 2:
        raise ValueError(f"S must have shape (..., k_h, k_w), got {tuple(S.shape)}")
    if S.numel() == 0:
        raise ValueError(f"S must be non-empty, got shape {tuple(S.shape)}")
    if not torch.isfinite(S).all() or (S < 0).any():
        raise ValueError("S must contain only finite values >= 0")
    g = k * S / ((k - 1.0) * S + 1.0)
    mean = g.mean(dim=(-2, -1), keepdim=True)
    if (mean <= 0).any():
        raise ValueError("S must have at least one entry > 0 in every (k_h, k_w) matrix")
    return g / mean


# -------------------------------------------------------------------------------------------- transform
class SpatialGradientScaling(GradientTransform):
    """Spatial gradient scaling: `grad <- G * grad` for each conv weight `(O, I, k_h, k_w)`, `G` `(k_h, k_w)`.

    `G = sgs_scaling(spatial_dependence(inputs), k)` per layer, from the inputs of `num_batches`
    training-mode forward passes captured after `begin_epoch(epoch)` with `epoch % every == 0`. Layers:
    every `nn.Conv2d` of `model` whose kernel has at least `min_kernel` elements (default 2: all but
    1x1). Before the first capture `G` is all ones (plain gradients).
    """

    def __init__(
        self,
        model: nn.Module,
        k: float = 5.0,
        num_batches: int = 2,
        every: int = 5,
        bins: int | None = None,
        method: str = "mi",
        min_kernel: int = 2,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._hyper = self._validate(
            dict(k=k, num_batches=num_batches, every=every, bins=bins, method=method, min_kernel=min_kernel)
        )
        self.model = model
        self._hooks: list[Any] = []
        self._armed = False
        self._seen = 0
        self._captured: dict[str, list[tuple[Tensor, int]]] = {}
        self._setup_layers()

    # ----------------------------------------------------------------------------------------- config
    @staticmethod
    def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
        expected = {"k", "num_batches", "every", "bins", "method", "min_kernel"}
        if set(cfg) != expected:
            raise ValueError(f"config must have exactly the keys {sorted(expected)}, got {sorted(cfg)}")
        return dict(
            k=_check_k(cfg["k"]),
            num_batches=_check_int(cfg["num_batches"], "num_batches", 1),
            every=_check_int(cfg["every"], "every", 1),
            bins=_check_bins(cfg["bins"]),
            method=_check_method(cfg["method"]),
            min_kernel=_check_int(cfg["min_kernel"], "min_kernel", 1),
        )

    def config(self) -> dict[str, Any]:
        """Hyper-parameters (the constructor arguments other than `model`)."""
        return dict(self._hyper)

    @property
    def layers(self) -> dict[str, nn.Conv2d]:
        """The scaled layers, by qualified module name."""
        return dict(self._layers)

    @property
    def scalings(self) -> dict[str, Tensor]:
        """Current `G` of each layer (float64 copies), by qualified module name."""
        return {name: g.clone() for name, g in self._scalings.items()}

    @property
    def armed(self) -> bool:
        """Whether the next training-mode forward passes are being captured."""
        return self._armed

    # ------------------------------------------------------------------------------------------ hooks
    def _select_layers(self, min_kernel: int) -> dict[str, nn.Conv2d]:
        return {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size[0] * m.kernel_size[1] >= min_kernel
        }

    def _setup_layers(self) -> None:
        self.remove()
        self._layers = self._select_layers(self._hyper["min_kernel"])
        self._scalings = {
            name: torch.ones(m.kernel_size, dtype=torch.float64, device=m.weight.device)
            for name, m in self._layers.items()
        }
        self._cast: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._by_id: dict[int, str] = {}
        for name, m in self._layers.items():
            self._hooks.append(m.register_forward_pre_hook(self._make_capture(name)))
        self._hooks.append(self.model.register_forward_hook(self._after_forward))

    def _make_capture(self, name: str):
        def capture(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if self._armed and self.model.training:
                x = inputs[0].detach()  # held by reference: autograd already forbids in-place edits
                self._captured.setdefault(name, []).append((x if x.dim() == 4 else x.unsqueeze(0), x._version))

        return capture

    def _after_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._armed and self.model.training:
            self._seen += 1
            if self._seen >= self._hyper["num_batches"]:
                self.update()

    def remove(self) -> None:
        """Remove the forward hooks and drop any captured inputs; the scalings are kept."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        self._armed = False
        self._seen = 0
        self._captured = {}

    def begin_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: arms capture when `epoch % every == 0` (epoch 0 included)."""
        epoch = _check_int(epoch, "epoch", 0)
        if not self._hooks:
            raise RuntimeError("the hooks of this SpatialGradientScaling were removed; build a new one")
        if epoch % self._hyper["every"] == 0:
            self._armed = True
            self._seen = 0
            self._captured = {}

    # ------------------------------------------------------------------------------------ computation
    def update(self) -> None:
        """Compute `G` of every layer that has captured inputs, then disarm and free the captures.

        Runs by itself after the `num_batches`-th captured forward pass; call it directly to use fewer.
        Inputs are held by reference, not copied (autograd already forbids editing them in place while
        they are needed for the backward pass); an in-place edit is detected and raises `RuntimeError`.
        """
        captured, self._captured = self._captured, {}
        self._armed = False
        self._seen = 0
        for name, entries in captured.items():  # check everything before changing any scaling
            if any(x._version != version for x, version in entries):
                raise RuntimeError(f"an input of layer {name!r} was modified in place after it was captured")
        hp = self._hyper
        workspace: dict[str, Tensor] = {}
        scalings = dict(self._scalings)
        with torch.no_grad():
            for name, entries in captured.items():
                module = self._layers[name]
                xs = [x for x, _ in entries]
                groups: dict[tuple[int, ...], list[Tensor]] = {}
                for x in xs:
                    groups.setdefault(tuple(x.shape[1:]), []).append(x)
                total = sum(x.shape[0] for x in xs)
                s = torch.zeros(module.kernel_size, dtype=torch.float64, device=module.weight.device)
                for group in groups.values():
                    feats = group[0] if len(group) == 1 else torch.cat(group)
                    dep = _dependence(feats, module.kernel_size, hp["bins"], hp["method"], module.dilation, workspace)
                    s += dep.to(s.device) * (feats.shape[0] / total)
                scalings[name] = sgs_scaling(s, hp["k"])
        self._scalings = scalings
        self._cast = {}

    # -------------------------------------------------------------------------------------- transform
    def _name_of(self, param: Tensor) -> str | None:
        name = self._by_id.get(id(param))
        if name is None or self._layers[name].weight is not param:
            self._by_id = {id(m.weight): n for n, m in self._layers.items()}
            name = self._by_id.get(id(param))
        return name

    def select(self, param: Tensor) -> bool:
        """True exactly for the weight tensors of the scaled conv layers (by identity)."""
        return self._name_of(param) is not None

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """`grads[i] *= G` of the layer whose weight is `params[i]`, broadcast over `(O, I)`."""
        if len(grads) != len(params):
            raise ValueError(f"grads and params must have equal lengths, got {len(grads)} and {len(params)}")
        names = []
        for g, p in zip(grads, params, strict=True):
            _check_grad(g)
            name = self._name_of(p)
            if name is None:
                raise ValueError("params must be weights of the conv layers this SpatialGradientScaling scales")
            if g.shape != p.shape:
                raise ValueError(f"grad of layer {name!r} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")
            names.append(name)
        with torch.no_grad():
            for g, name in zip(grads, names, strict=True):
                key = (name, g.dtype, g.device)
                scale = self._cast.get(key)
                if scale is None:
                    scale = self._cast[key] = self._scalings[name].to(device=g.device, dtype=g.dtype)
                g.mul_(scale)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        """Pure form: `G * grad` for the layer whose weight is `param` (required)."""
        if param is None:
            raise ValueError("param is required: the scaling depends on which conv layer's weight it is")
        return super().__call__(grad, param)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """`{"type", "config", "scalings": {layer name: G (float64, CPU)}}`; captured inputs are not saved."""
        return {
            "type": type(self).__name__,
            "config": copy.deepcopy(self.config()),
            "scalings": {name: g.detach().cpu().clone() for name, g in self._scalings.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore hyper-parameters and scalings saved from the same architecture; all-or-nothing."""
        if not isinstance(state, dict) or state.get("type") != type(self).__name__:
            found = state.get("type") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state_dict is for {found!r}, cannot load it into {type(self).__name__}")
        if not isinstance(state.get("config"), dict) or not isinstance(state.get("scalings"), dict):
            raise ValueError("state_dict must have a 'config' dict and a 'scalings' dict")
        hyper = self._validate(dict(state["config"]))
        layers = self._select_layers(hyper["min_kernel"])
        scalings = state["scalings"]
        if set(scalings) != set(layers):
            raise ValueError(f"state_dict scalings are for layers {sorted(scalings)}, this model has {sorted(layers)}")
        loaded = {}
        for name, m in layers.items():
            g = scalings[name]
            if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                raise TypeError(f"scaling of layer {name!r} must be a floating torch.Tensor")
            if tuple(g.shape) != tuple(m.kernel_size):
                raise ValueError(f"scaling of layer {name!r} has shape {tuple(g.shape)}, expected {m.kernel_size}")
            if not torch.isfinite(g).all() or (g < 0).any():
                raise ValueError(f"scaling of layer {name!r} must contain only finite values >= 0")
            loaded[name] = g.detach().to(device=m.weight.device, dtype=torch.float64).clone()
        self._hyper = hyper
        self._setup_layers()
        self._scalings = loaded
