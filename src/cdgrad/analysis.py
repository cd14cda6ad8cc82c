"""Statistics of trained conv weights: correlation along the output and input channel axes.

Lao et al. report that weights trained with channel-directed gradients are more correlated along
the output-channel axis than along the input-channel axis (their Figs. 1, 11, 13, 14). These pure
functions measure that for a conv weight ``w`` of shape ``(O, I, kh, kw)``; every statistic is
computed in float64 and returned as Python floats or float64 tensors on the weight's device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._conv_spectrum import check_finite, check_weight, checked_input_size
from .spectral import conv_operator_norm, conv_singular_values
from .validation import check_int, check_tensor

__all__ = [
    "kernel_magnitude",
    "axis_correlation",
    "channel_correlation_histogram",
    "channel_correlation_matrix",
    "channel_mean_std",
    "correlation_profile",
    "output_input_ratio",
    "singular_value_ratios",
    "singular_value_spectrum",
    "summarize_state_dict",
]

_AXES = {0: "output", 1: "input"}


def _check_dim(dim: Any) -> int:
    return check_int(dim, "dim (0: output channels, 1: input channels)", minimum=0, maximum=1)


def check_distance(distance: Any, name: str = "distance") -> int:
    return check_int(distance, name, minimum=1)


def check_bins(bins: Any) -> int:
    return check_int(bins, "bins", minimum=1)


def _pearson(x: Tensor, y: Tensor) -> float:
    """``r = sum (x - xbar)(y - ybar) / sqrt(sum (x - xbar)^2 sum (y - ybar)^2)``; nan if undefined."""
    if x.numel() < 2:
        return math.nan
    x = x - x.mean()
    y = y - y.mean()
    den = torch.sqrt((x * x).sum() * (y * y).sum())
    if den == 0:
        return math.nan
    return float((x * y).sum() / den)


def axis_correlation(weight: Tensor, distance: int, dim: int) -> float:
    """Pearson correlation of weight entries ``distance`` apart along the output (dim 0) or input (dim 1) axis.

    For ``dim = 0`` the pairs are ``(w[o, i, h, w], w[o + d, i, h, w])`` for every
    ``0 <= o < O - d`` and every ``(i, h, w)`` (no wrap-around): ``(O - d) * I * kh * kw`` pairs, pooled
    into one sample, and ``r = cov(x, y) / (std(x) std(y))`` with each coordinate centred on its
    own mean. ``dim = 1`` is the same along ``i``. Returns ``nan`` when fewer than two pairs exist
    (e.g. ``distance >=`` the axis length) or either coordinate is constant.
    """
    check_weight(weight)
    dim = _check_dim(dim)
    d = check_distance(distance)
    n = weight.shape[dim]
    if d >= n:
        return math.nan
    w = weight.detach().to(torch.float64)
    return _pearson(w.narrow(dim, 0, n - d).reshape(-1), w.narrow(dim, d, n - d).reshape(-1))


def correlation_profile(weight: Tensor, max_distance: int) -> dict[str, list[Any]]:
    """``axis_correlation`` at distances ``1 .. max_distance`` along both axes.

    Returns ``{"distance": [1, ..., D], "output": [r_out(d)], "input": [r_in(d)]}``; entries with no
    pairs (``d >=`` the axis length) are ``nan``.
    """
    check_weight(weight)
    dmax = check_distance(max_distance, "max_distance")
    ds = list(range(1, dmax + 1))
    return {
        "distance": ds,
        "output": [axis_correlation(weight, d, 0) for d in ds],
        "input": [axis_correlation(weight, d, 1) for d in ds],
    }


def output_input_ratio(weight: Tensor, distance: int = 1) -> float:
    """``r_out(d) / r_in(d)``: > 1 when neighbouring output channels are more alike than input channels.

    ``nan`` if either correlation is undefined; ``+-inf`` if ``r_in(d) == 0`` exactly.
    """
    r_out = axis_correlation(weight, distance, 0)
    r_in = axis_correlation(weight, distance, 1)
    if math.isnan(r_out) or math.isnan(r_in):
        return math.nan
    if r_in == 0:
        return math.copysign(math.inf, r_out) if r_out != 0 else math.nan
    return r_out / r_in


def _channels(weight: Tensor, dim: int) -> Tensor:
    """One row per channel along ``dim``: the flattened filter ``w[o]`` (dim 0) or ``w[:, i]`` (dim 1)."""
    w = weight.detach().to(torch.float64)
    return w.movedim(dim, 0).reshape(w.shape[dim], -1)


def channel_correlation_matrix(weight: Tensor, dim: int = 0) -> Tensor:
    """Pearson correlation between whole channels along ``dim``: ``C[a, b] = corr(rows[a], rows[b])``.

    Rows are the flattened filters ``w[o, :, :, :]`` (dim 0, an O x O matrix) or ``w[:, i, :, :]``
    (dim 1, I x I). A constant row has ``nan`` correlations.
    """
    check_weight(weight)
    rows = _channels(weight, _check_dim(dim))
    rows = rows - rows.mean(dim=1, keepdim=True)
    norms = rows.norm(dim=1)
    out: Tensor = (rows @ rows.T) / (norms[:, None] * norms[None, :])
    return out


def channel_correlation_histogram(weight: Tensor, dim: int = 0, bins: int = 20) -> tuple[Tensor, Tensor]:
    """Histogram over ``[-1, 1]`` of the off-diagonal channel correlations (each pair ``a < b`` once).

    Returns ``(counts, edges)`` with ``bins`` counts and ``bins + 1`` equally spaced edges; bins are
    half-open ``[e_k, e_{k+1})`` except the last, which includes 1. ``nan`` entries are left out.
    """
    bins = check_bins(bins)
    c = channel_correlation_matrix(weight, dim)
    iu = torch.triu_indices(c.shape[0], c.shape[0], offset=1, device=c.device)
    vals = c[iu[0], iu[1]]
    vals = vals[~torch.isnan(vals)].clamp(-1.0, 1.0)
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64, device=c.device)
    idx = (torch.bucketize(vals, edges, right=True) - 1).clamp(0, bins - 1)  # edges[k] <= v < edges[k+1]
    return torch.bincount(idx, minlength=bins), edges


def channel_mean_std(weight: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population standard deviation (``correction = 0``) of the entries along ``dim``."""
    check_weight(weight)
    rows = _channels(weight, _check_dim(dim))
    return rows.mean(dim=1), rows.std(dim=1, correction=0)


def kernel_magnitude(weight: Tensor) -> Tensor:
    """The average kernel magnitude `M[i, j] = mean over (o, c) of |W[o, c, i, j]|`, normalised to mean 1 (float64,
    `(k_h, k_w)`): where in its receptive field a conv layer puts its weight (the SGS paper's Fig. 6)."""
    check_tensor(weight, "weight")
    if weight.dim() != 4 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty conv weight (O, I, k_h, k_w), got shape {tuple(weight.shape)}")
    check_finite(weight, "weight")
    m = weight.detach().to(torch.float64).abs().mean(dim=(0, 1))
    mean = m.mean()
    return m / mean if mean > 0 else torch.ones_like(m)


def singular_value_spectrum(weight: Tensor, input_size: int | tuple[int, int]) -> Tensor:
    """All singular values (descending) of the stride-1 circular conv; see ``cdgrad.spectral``."""
    return conv_singular_values(weight.detach(), input_size)


def singular_value_ratios(spectrum: Tensor) -> tuple[Tensor, Tensor]:
    """``(i / N, sigma_i / sigma_1)`` for ``i = 1 .. N`` of a descending spectrum (Sedghi et al. Figs. 6-7).

    The normalised rank puts layers with different numbers of singular values on one axis; a zero spectrum
    has ratios 0.
    """
    if not isinstance(spectrum, Tensor) or spectrum.dim() != 1 or spectrum.numel() == 0:
        raise ValueError("spectrum must be a non-empty 1-D tensor of singular values in descending order")
    n = spectrum.numel()
    rank = torch.arange(1, n + 1, dtype=torch.float64) / n
    top = float(spectrum[0])
    ratio = spectrum.double() / top if top > 0 else torch.zeros(n, dtype=torch.float64)
    return rank, ratio


def lookup_size(sizes: Any, key: str) -> Any:
    """A per-layer size for state-dict key ``key`` (``"a.b.weight"`` or its module name ``"a.b"``)."""
    if sizes is None or not isinstance(sizes, Mapping):
        return sizes
    if key in sizes:
        return sizes[key]
    module = key[: -len(".weight")] if key.endswith(".weight") else key
    return sizes.get(module)


def summarize_state_dict(
    state_dict: Mapping[str, Any],
    input_sizes: int | tuple[int, int] | Mapping[str, Any] | None = None,
    *,
    include_pointwise: bool = False,
    distance: int = 1,
) -> list[dict[str, Any]]:
    """One row per conv weight in ``state_dict``: the correlation statistics and the operator norm.

    Conv weights are the 4-D floating tensors with ``kh * kw > 1`` (every 4-D tensor if
    ``include_pointwise``). Each row has ``name``, ``shape``, ``corr_out`` and ``corr_in``
    (``axis_correlation`` at ``distance``), ``ratio`` (``output_input_ratio``) and ``op_norm``:
    ``conv_operator_norm`` at the layer's input size, or ``None`` where the size is unknown.
    ``input_sizes`` is one size for every layer, or a mapping keyed by state-dict key or module name
    (as ``cdgrad.spectral.record_input_sizes`` returns); an input smaller than the kernel is the folded kernel's map.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from names to tensors, got {type(state_dict).__name__}")
    d = check_distance(distance)
    rows: list[dict[str, Any]] = []
    for name, w in state_dict.items():
        if not (isinstance(w, Tensor) and w.dim() == 4 and w.is_floating_point() and w.numel() > 0):
            continue
        if not include_pointwise and w.shape[-2] * w.shape[-1] == 1:
            continue
        check_finite(w, f"state_dict[{name!r}]")
        size = lookup_size(input_sizes, name)
        op_norm = None
        if size is not None:
            n = checked_input_size(size, w, f"input_sizes[{name!r}]")
            op_norm = float(conv_operator_norm(w.detach(), n))
        rows.append(
            {
                "name": name,
                "shape": tuple(w.shape),
                "corr_out": axis_correlation(w, d, 0),
                "corr_in": axis_correlation(w, d, 1),
                "ratio": output_input_ratio(w, d),
                "op_norm": op_norm,
            }
        )
    return rows
