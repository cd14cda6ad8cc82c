"""``cdgrad analyze``: correlation and spectral statistics of a trained network's conv weights.

Writes a Markdown table (one row per conv layer) and four PNG plots:

- ``correlation_vs_distance.png``: ``axis_correlation`` against distance, output vs input axis;
- ``channel_correlation_histogram.png``: off-diagonal correlations between whole channels;
- ``channel_mean_std.png``: per-channel mean against standard deviation;
- ``singular_values.png``: the sorted singular values of each layer's circular convolution (Sedghi et al.
  Fig. 5);
- ``singular_value_ratios.png``: each singular value over its layer's largest, against the normalised rank
  (Sedghi et al. Figs. 6-7).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._conv_spectrum import checked_input_size
from ..analysis import (
    channel_correlation_histogram,
    channel_mean_std,
    check_bins,
    check_distance,
    correlation_profile,
    kernel_magnitude,
    lookup_size,
    singular_value_ratios,
    singular_value_spectrum,
    summarize_state_dict,
)
from ..validation import MemoryRequestError, check_memory

__all__ = [
    "add_analyze_arguments",
    "analyze",
    "analyze_state_dict",
    "load_sgs_scalings",
    "load_state_dict",
    "run_analyze",
]

PLOTS = (
    "correlation_vs_distance.png",
    "channel_correlation_histogram.png",
    "channel_mean_std.png",
    "singular_values.png",
    "singular_value_ratios.png",
    "kernel_magnitude.png",
)
# written when the checkpoint holds spatial gradient scalings: G at the first measurement and at the end
SGS_PLOTS = ("sgs_scalings_start.png", "sgs_scalings_end.png")


def load_state_dict(source: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The model state dict in a ``torch.save`` checkpoint: ``ckpt["model"]`` if present, else ``ckpt``.

    The file is first checked against the checksums its archive records (a damaged file raises
    `cdgrad.experiments.checkpoint.CorruptCheckpointError`, a ValueError naming it)."""
    from cdgrad.experiments.checkpoint import verify_archive

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r} (source must be a file saved with torch.save)")
    verify_archive(str(path))
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for non-checkpoint or unsafe files
        raise ValueError(f"could not load {str(path)!r} as a torch checkpoint: {err}") from err
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} must hold a state_dict (name -> tensor) or a dict with a 'model' state_dict")
    return dict(state)


def load_sgs_scalings(source: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """The spatial gradient scalings a toolkit checkpoint holds, `(at the first measurement, at the end)`, each
    layer -> `G` `(k_h, k_w)`; None when it holds none."""
    ckpt = torch.load(Path(source), weights_only=True, map_location="cpu")
    transform = ckpt.get("method", {}).get("transform", {}) if isinstance(ckpt, Mapping) else {}
    out = []
    for key in ("first_scalings", "scalings"):
        scalings = transform.get(key, {}) if isinstance(transform, Mapping) else {}
        if not isinstance(scalings, Mapping) or not all(isinstance(g, Tensor) for g in scalings.values()):
            return None
        out.append({str(k): g.to(torch.float64) for k, g in scalings.items()})
    return (out[0], out[1]) if out[1] else None


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _size_label(input_size: Any) -> str:
    if isinstance(input_size, Mapping):
        return "at each layer's input size"
    n_h, n_w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    return f"@ {n_h}x{n_w}"


def _figure(**kw: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the analysis plots need matplotlib: pip install 'cdgrad[experiments]'") from err
    return Figure(**kw)


def analyze_state_dict(
    state_dict: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    input_size: int | tuple[int, int] | Mapping[str, Any] = 32,
    *,
    max_distance: int = 8,
    bins: int = 40,
) -> str:
    """Tabulate and plot the conv weights (4-D, ``kh * kw > 1``) of ``state_dict``; return the table.

    ``input_size`` is the spatial size used for the singular values: one size for every layer (the
    network's input size, an upper size for layers behind strides or pooling), or a mapping from
    state-dict key or module name to size (``cdgrad.spectral.record_input_sizes``). The Markdown
    table is also written to ``out_dir/summary.md``; the plots are ``out_dir/<name>.png``. A size whose spectra,
    or a ``max_distance`` or ``bins`` whose plot data, cannot fit in the available memory is refused
    (`cdgrad.validation.MemoryRequestError`) before anything is written.
    """
    if not isinstance(input_size, Mapping):
        checked_input_size(input_size, torch.empty(1, 1, 1, 1))  # validate before any work
    check_distance(max_distance, "max_distance")
    check_bins(bins)
    rows = summarize_state_dict(state_dict, None)
    if not rows:
        raise ValueError("state_dict has no conv weights (4-D floating tensors with kh * kw > 1) to analyze")
    _check_plot_memory(len(rows), max_distance, bins)
    weights = {r["name"]: state_dict[r["name"]].detach().to("cpu", torch.float64) for r in rows}
    spectra: dict[str, Tensor | None] = {}
    for r in rows:
        w, size = weights[r["name"]], lookup_size(input_size, r["name"])
        try:
            spectra[r["name"]] = singular_value_spectrum(w, size) if size is not None else None
        except MemoryRequestError:  # a size whose spectrum cannot fit: refused, before anything is written
            raise
        except ValueError:  # input smaller than the kernel
            spectra[r["name"]] = None
        s = spectra[r["name"]]
        r["op_norm"] = float(s[0]) if s is not None else None

    label = _size_label(input_size)
    lines = [
        f"| layer | shape | corr out (d=1) | corr in (d=1) | out/in | op norm {label} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"| {r['name']} | {shape} | {_fmt(r['corr_out'])} | {_fmt(r['corr_in'])} | {_fmt(r['ratio'], 2)} "
            f"| {_fmt(r['op_norm'])} |"
        )
    note = "Operator norm: largest singular value of the stride-1 convolution with wrap-around " + (
        "at each layer's recorded input size."
        if isinstance(input_size, Mapping)
        else f"on {label[2:]} inputs for every layer; layers behind strides or pooling see smaller "
        "maps, so this is the norm at an upper input size, not the layer's exact norm."
    )
    table = "\n".join(lines) + "\n\n" + note + "\n"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table)
    _plot_correlation(weights, max_distance, out / PLOTS[0])
    _plot_histogram(weights, bins, out / PLOTS[1])
    _plot_mean_std(weights, out / PLOTS[2])
    _plot_spectra(spectra, label, out / PLOTS[3])
    _plot_ratios(spectra, label, out / PLOTS[4])
    _plot_kernel_magnitude(weights, out / PLOTS[5])
    return table


def _check_plot_memory(layers: int, max_distance: int, bins: int) -> None:
    """Refuse a `max_distance` or `bins` whose plot data cannot fit: per distance, each layer's two correlations as
    Python floats and in the plot's arrays (about 128 bytes a layer) and the distance itself; per bin, the layers'
    counts (8 bytes each) and the edges and densities as tensors, lists and plot arrays (about 160 bytes)."""
    check_memory((128 * layers + 64) * max_distance, "max_distance", max_distance, what=f"profiles of {layers} layers")
    check_memory((8 * layers + 160) * bins, "bins", bins, what=f"histograms of {layers} layers")


def _heatmaps(ax_grid: Any, mats: list[tuple[str, Tensor]], vmax: float) -> Any:
    image = None
    for ax, (title, m) in zip(ax_grid, mats, strict=False):
        image = ax.imshow(m.tolist(), cmap="viridis", vmin=0.0, vmax=vmax)
        for (i, j), v in zip(
            itertools.product(range(m.shape[0]), range(m.shape[1])), m.flatten().tolist(), strict=True
        ):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 * vmax else "black", fontsize=7
            )
        ax.set(title=title, xticks=[], yticks=[])
    for ax in list(ax_grid)[len(mats) :]:
        ax.axis("off")
    return image


def _plot_matrices(mats: list[tuple[str, Tensor]], title: str, path: Path) -> None:
    """Heat maps of `(k_h, k_w)` matrices: the mean over all of them first, then up to 15 of them."""
    counts = collections.Counter(tuple(m.shape) for _, m in mats)
    commonest = counts.most_common(1)[0][0]  # the mean is over the layers of the commonest kernel shape
    mean = torch.stack([m for _, m in mats if tuple(m.shape) == commonest]).mean(0)
    shown = [(f"mean of {counts[commonest]} layers", mean), *mats[:15]]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(figsize=(2.4 * cols, 2.4 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    vmax = max(float(m.max()) for _, m in shown)
    _heatmaps(axes, shown, vmax)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def _plot_kernel_magnitude(weights: dict[str, Tensor], path: Path) -> None:
    mats = [(name, kernel_magnitude(w)) for name, w in weights.items()]
    _plot_matrices(mats, "Average kernel magnitude mean |W| over (O, I), each layer normalised to mean 1", path)


def _plot_correlation(weights: dict[str, Tensor], max_distance: int, path: Path) -> None:
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    curves: dict[str, list[list[float]]] = {"output": [], "input": []}
    for w in weights.values():
        prof = correlation_profile(w, max_distance)
        for axis, color in (("output", "C0"), ("input", "C1")):
            ax.plot(prof["distance"], prof[axis], color=color, alpha=0.15, lw=0.8)
            curves[axis].append(prof[axis])
    ds = list(range(1, max_distance + 1))
    for axis, color in (("output", "C0"), ("input", "C1")):
        mean = torch.tensor(curves[axis], dtype=torch.float64).nanmean(dim=0)
        ax.plot(ds, mean.tolist(), color=color, lw=2.5, marker="o", label=f"along {axis} channels (mean)")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set(xlabel="channel distance d", ylabel="Pearson correlation", title="Weight correlation vs distance")
    ax.legend()
    fig.savefig(path, dpi=100)


def _plot_histogram(weights: dict[str, Tensor], bins: int, path: Path) -> None:
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for dim, axis, color in ((0, "output", "C0"), (1, "input", "C1")):
        total, edges = torch.zeros(bins, dtype=torch.long), torch.zeros(bins + 1, dtype=torch.float64)
        for w in weights.values():  # never empty: analyze_state_dict refuses a state dict without conv weights
            counts, edges = channel_correlation_histogram(w, dim, bins)
            total += counts
        density = total.double() / max(int(total.sum()), 1)
        ax.stairs(density.tolist(), edges.tolist(), color=color, label=f"between {axis} channels")
    ax.set(
        xlabel="correlation between channels",
        ylabel="fraction of channel pairs",
        title="Channel correlation histogram (all layers)",
    )
    ax.legend()
    fig.savefig(path, dpi=100)


def _plot_mean_std(weights: dict[str, Tensor], path: Path) -> None:
    fig = _figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (dim, axis) in zip(axes, ((0, "output"), (1, "input")), strict=True):
        for k, w in enumerate(weights.values()):
            mean, std = channel_mean_std(w, dim)
            ax.scatter(mean.tolist(), std.tolist(), s=6, alpha=0.6, color=f"C{k % 10}")
        ax.set(xlabel="channel mean", ylabel="channel std", title=f"Per {axis} channel")
    fig.savefig(path, dpi=100)


def _plot_spectra(spectra: dict[str, Tensor | None], label: str, path: Path) -> None:
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    shown = [(name, s) for name, s in spectra.items() if s is not None]
    for k, (name, s) in enumerate(shown):
        x = torch.linspace(0.0, 1.0, s.numel(), dtype=torch.float64)
        ax.plot(
            x.tolist(), s.clamp(min=1e-12).tolist(), lw=1, label=name if len(shown) <= 10 else None, color=f"C{k % 10}"
        )
    ax.set_yscale("log")
    ax.set(xlabel="rank / number of singular values", ylabel="singular value", title=f"Conv singular values {label}")
    if 0 < len(shown) <= 10:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def _plot_ratios(spectra: dict[str, Tensor | None], label: str, path: Path) -> None:
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    shown = [(name, s) for name, s in spectra.items() if s is not None]
    for k, (name, s) in enumerate(shown):
        rank, ratio = singular_value_ratios(s)
        ax.plot(rank.tolist(), ratio.tolist(), lw=1, label=name if len(shown) <= 10 else None, color=f"C{k % 10}")
    ax.set(
        xlabel="normalised rank i / N",
        ylabel="singular value / largest",
        ylim=(0.0, 1.02),
        title=f"Conv singular values relative to each layer's largest {label}",
    )
    if 0 < len(shown) <= 10:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def analyze(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    input_size: int | tuple[int, int] | Mapping[str, Any] = 32,
    **kw: Any,
) -> str:
    """``analyze_state_dict`` of the checkpoint at ``source`` (loaded with ``weights_only=True`` on CPU); a toolkit
    checkpoint of an SGS run also gets `SGS_PLOTS`: every layer's `G` at its first measurement and at the end."""
    table = analyze_state_dict(load_state_dict(source), out_dir, input_size, **kw)
    scalings = load_sgs_scalings(source)
    if scalings is not None:
        for when, found, name in zip(("first measurement", "end of training"), scalings, SGS_PLOTS, strict=True):
            if found:
                _plot_matrices(list(found.items()), f"Spatial gradient scalings G at the {when}", Path(out_dir) / name)
    return table


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cdgrad analyze``."""
    parser.add_argument(
        "source",
        help="checkpoint saved with torch.save (a state_dict or {'model': state_dict}), "
        "or the key of a run in the results store trained with --save-model",
    )
    parser.add_argument(
        "--results", default="results", help="results folder where a run key is looked up (default: results)"
    )
    parser.add_argument("--out-dir", default="analysis", help="folder for summary.md and the PNG plots")
    parser.add_argument(
        "--input-size", type=int, default=32, help="spatial input size n for the singular values of every layer (n x n)"
    )
    parser.add_argument("--max-distance", type=int, default=8, help="largest channel distance plotted")
    parser.add_argument("--bins", type=int, default=40, help="bins of the channel-correlation histogram")


def _set_aside_if_damaged(path: str, what: str) -> None:
    """Set aside (`<path>.corrupt-<timestamp>`) the kept model `path` when it fails its checksums, and raise
    CorruptCheckpointError saying so."""
    from cdgrad.experiments.checkpoint import CorruptCheckpointError, set_aside, verify_archive

    try:
        verify_archive(path)
    except CorruptCheckpointError as exc:
        target = set_aside(path, str(exc), then="not analyzing it")
        raise CorruptCheckpointError(f"{what} is damaged and was moved to {target}") from None


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``cdgrad analyze`` from parsed arguments: print the table, return the exit status."""
    source = args.source
    if not os.path.exists(source):
        from cdgrad.experiments.store import ResultStore

        stored = ResultStore(args.results).model_path(source)
        if os.path.exists(stored):
            source = stored
            _set_aside_if_damaged(stored, f"the kept model of run {args.source}")
    table = analyze(source, args.out_dir, args.input_size, max_distance=args.max_distance, bins=args.bins)
    print(table)
    print(f"plots and summary.md written to {args.out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="cdgrad analyze", description=__doc__.splitlines()[0])
    add_analyze_arguments(p)
    raise SystemExit(run_analyze(p.parse_args()))
