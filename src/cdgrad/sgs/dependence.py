"""Spatial dependence `S` of a conv layer's input maps: how strongly a pixel depends on each kernel neighbour.

`S[i, j]` = mean over channels of `D(x[:, c, a, b], x[:, c, a + di, b + dj])`, `D` the normalised mutual
information (`cdgrad.sgs.nmi`) or the absolute Pearson correlation, pooled over the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..validation import check_choice, check_memory, check_pair, check_tensor
from .nmi import bin_codes, check_bins, fold_last_bin, index_dtype, nmi_from_joint, sturges, workspace_buffer

__all__ = ["authors_channel_dependence", "spatial_dependence"]

_METHODS = ("mi", "autocorr")


def check_dependence_method(method: Any) -> str:
    return str(check_choice(method, "method", _METHODS))


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
    check_tensor(features, "features")
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
        nb = sturges(n * (rows.stop - rows.start) * (cols.stop - cols.start)) if bins is None else bins
        tasks_by_bins.setdefault(nb, []).append(t)
    step = max(1, _CHUNK // (c * h * w)) if x.device.type == "cpu" else n
    for nb, tasks in tasks_by_bins.items():
        stride = nb + 1  # codes run over 0..nb, see `bin_codes`
        size = c * stride * stride
        dtype = index_dtype(size)
        offset = (torch.arange(c, device=x.device, dtype=dtype) * (stride * stride)).view(view)
        # codes on each channel's whole-map range, right for every crop that keeps the map's min and max;
        # the batch goes through in chunks so that the codes stay in cache across displacements
        counts = torch.zeros(len(tasks), size, dtype=torch.int64, device=x.device)
        for start in range(0, n, step):
            xb = x[start : start + step]
            second = bin_codes(xb, lo.view(view), hi.view(view), nb, dtype, workspace, "second")
            first = workspace_buffer(workspace, "first", xb.shape, x, dtype)
            torch.add(offset, second, alpha=stride, out=first)
            for row, t in enumerate(tasks):  # joint code: channel * stride^2 + code(a) * stride + code(a + d)
                (rp, cp), (rq, cq) = regions[2 * t + 1], regions[2 * t + 2]
                shape = (xb.shape[0], c, rp.stop - rp.start, cp.stop - cp.start)
                joint_index = workspace_buffer(workspace, "joint", shape, x, dtype)
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
                code_p = bin_codes(sub[:, :, rp, cp], lo_p[idx].view(view), hi_p[idx].view(view), nb, dtype)
                code_q = bin_codes(sub[:, :, rq, cq], lo_q[idx].view(view), hi_q[idx].view(view), nb, dtype)
                joint_index = torch.add(offset[:, : len(idx)], code_p, alpha=stride).add_(code_q)
                joint[idx] = torch.bincount(joint_index.view(-1), minlength=len(idx) * stride * stride).view(
                    len(idx), stride, stride
                )
            nmi = nmi_from_joint(fold_last_bin(joint))
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


def dependence_matrices(
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
    Returned in the dtype of `features`. A `bins` whose joint histograms cannot fit in the available memory is
    refused (`cdgrad.validation.MemoryRequestError`) before any is allocated.
    """
    _check_features(features)
    ks = check_pair(kernel_size, "kernel_size")
    bins = check_bins(bins)
    method = check_dependence_method(method)
    dil = check_pair(dilation, "dilation")
    if method == "mi" and bins is not None:
        _check_histogram_memory(features, ks, bins, dil)
    return dependence_matrices(features, ks, bins, method, dil).to(features.dtype)


def _check_histogram_memory(
    features: Tensor, kernel_size: tuple[int, int], bins: int, dilation: tuple[int, int]
) -> None:
    """Refuse a `bins` whose joint histograms do not fit: `T` displacements (one of each pair d, -d) of `C`
    channels with `(bins + 1)^2` cells each, held at once as int64 counts (8 bytes a cell), and one displacement's
    folded counts and entropy terms (about 40 bytes a cell)."""
    tasks = (len(_displacements(*kernel_size, dilation)) + 1) // 2
    cells = features.shape[1] * (bins + 1) ** 2
    what = f"{tasks} x {features.shape[1]} joint histograms of {bins + 1} x {bins + 1} cells"
    check_memory((8 * tasks + 40) * cells, "bins", bins, device=features.device, what=what)


# ------------------------------------------------------------------------------ the authors' pipeline
def _nmi_without_diagonal(p: Tensor, q: Tensor) -> float:
    """NMI of paired float64 samples as the authors' code computes it with diagonal removal: pairs with a zero on
    either side dropped, Sturges bins over `[min, max + 1e-12)` (values at or above the upper edge are not
    counted, as in fast_histogram), the joint histogram's diagonal zeroed; 0 where undefined."""
    keep = (p != 0) & (q != 0)
    if not bool(keep.any()):
        return 0.0
    p, q = p[keep], q[keep]
    bins = sturges(p.numel())
    codes = []
    inside = torch.ones_like(p, dtype=torch.bool)
    for v in (p, q):
        lo, hi = v.min(), v.max() + 1e-12
        code = torch.floor((v - lo) * (bins / (hi - lo)))
        inside &= (v < hi) & (code < bins)
        codes.append(code)
    joint_index = (codes[0][inside] * bins + codes[1][inside]).long()
    joint = torch.bincount(joint_index, minlength=bins * bins).view(bins, bins)
    joint.fill_diagonal_(0)
    if int(joint.sum()) == 0:
        return 0.0
    value = float(_nmi_from_joint_or_nan(joint))
    return 0.0 if value != value else value


def _nmi_from_joint_or_nan(joint: Tensor) -> Tensor:
    """(H(P) + H(Q) - H(P,Q)) / H(P,Q) from one joint histogram, NaN where H(P,Q) = 0 (the authors' 0/0)."""
    c = joint.to(torch.float64)
    total = c.sum()

    def entropy(counts: Tensor) -> Tensor:
        pr = counts / total
        h: Tensor = -torch.special.xlogy(pr, pr).sum()
        return h

    h_pq = entropy(c)
    out: Tensor = (entropy(c.sum(1)) + entropy(c.sum(0)) - h_pq) / h_pq
    return out


def authors_channel_dependence(
    features: Tensor,
    kernel_size: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
    diagonal_removal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-channel NMI maps `(C, k_h, k_w)` (float64) as the authors' code measures them, and the (C,) mask of the
    channels that enter its channel average.

    The input maps are zero-padded by the layer's `padding` first (the authors' forward hook pads before it
    measures). Without `diagonal_removal` the maps are `spatial_dependence`'s per-channel maps of the padded input
    (a channel constant over the whole padded batch is left out: the authors' NaN, skipped by their nanmean).
    With it (the authors' ImageNet setting): `_nmi_without_diagonal` per channel and displacement (every channel
    enters the average; undefined values count as 0, as there). The centre entry is 1.
    """
    _check_features(features)
    kh, kw = check_pair(kernel_size, "kernel_size")
    ph, pw = check_pair(padding, "padding", minimum=0)
    x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    with torch.no_grad():
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
        if not diagonal_removal:
            return _per_channel_mi(x, kh, kw, None, (1, 1))
        x = x.to(torch.float64)
        lo, hi = x.amin(), x.amax()
        _check_finite_range(lo.reshape(1), hi.reshape(1))
        n, c, h, w = x.shape
        dep = torch.zeros(c, kh, kw, dtype=torch.float64, device=x.device)
        dep[:, kh // 2, kw // 2] = 1.0
        done: dict[tuple[int, int], tuple[int, int]] = {}
        for i, j, di, dj in _displacements(kh, kw, (1, 1)):
            if (-di, -dj) in done:  # the mirrored displacement sees the same pixel pairs, swapped
                dep[:, i, j] = dep[:, done[(-di, -dj)][0], done[(-di, -dj)][1]]
                continue
            done[(di, dj)] = (i, j)
            if abs(di) >= h or abs(dj) >= w:
                continue
            rows, cols = _region(di, dj, h, w)
            centre = x[:, :, rows, cols]
            neighbour = x[:, :, rows.start + di : rows.stop + di, cols.start + dj : cols.stop + dj]
            for ch in range(c):
                dep[ch, i, j] = _nmi_without_diagonal(centre[:, ch].reshape(-1), neighbour[:, ch].reshape(-1))
        return dep, torch.ones(c, dtype=torch.bool, device=x.device)
