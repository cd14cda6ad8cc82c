"""PNG figures of a preset's results (matplotlib, Agg backend), one panel per setting.

curves   test accuracy per epoch, mean over seeds with a +-1 std band            (paper Fig. 4)
hist     histogram of final test accuracies per method                        (paper Fig. 5 left)
lambda   final test accuracy vs lambda for every method with a `lam`, SGD as a band  (paper Fig. 6)
walltime test error against cumulative wall time, mean over seeds       (Sedghi et al. Fig. 4)
samples  dense tasks: the first test images with their label maps beside each method's prediction (segmentation)
         or rendering (synthesis), from the stored final models (runs with `save_model`)

The metric is the task's primary one (classification: test accuracy; segmentation: mean IoU; synthesis: FID).

Line labels are the method registry's (`cdgrad.experiments.methods.describe`); diverged runs are left out.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cdgrad.experiments.methods import METHODS, describe
from cdgrad.experiments.report import Row, Setting, completed, setting_title
from cdgrad.experiments.tasks import get_task

KINDS = ("curves", "hist", "lambda", "walltime")  # and "samples": dense tasks with stored models only


def _metric_label(settings: Sequence[Setting]) -> str:
    """The axis label of the settings' primary metric, e.g. `test accuracy (%)`."""
    return (
        get_task(settings[0].rows[0].config.task).primary.label
        if settings and settings[0].rows
        else "test accuracy (%)"
    )


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg (file-only) backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(n: int, width: float = 5.5, height: float = 4.0) -> tuple[Any, Any, list[Any]]:
    plt = _pyplot()
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _title(ax: Any, st: Setting) -> None:
    ax.set_title(setting_title(st.setting), fontsize=8, wrap=True)


def _aligned_runs(st: Setting, row: Row) -> tuple[list[int], list[Any]]:
    """The evaluated epochs of the row's first completed run, and its completed runs evaluated at those."""
    runs = completed(st.runs[row.label])
    if not runs:
        return [], []
    epochs = runs[0].curves["test_epoch"]
    return epochs, [r for r in runs if r.curves["test_epoch"] == epochs]


def _finish(ax: Any, st: Setting, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _title(ax, st)


def _per_epoch_panels(
    settings: Sequence[Setting], path: str, draw: Callable[[Any, Row, list[int], list[Any]], None], x: str, y: str
) -> str:
    """One panel per setting; `draw(ax, row, epochs, runs)` for each row with completed runs."""
    plt, fig, axes = _figure(len(settings))
    for ax, st in zip(axes, settings, strict=True):
        for row in st.rows:
            epochs, runs = _aligned_runs(st, row)
            if runs:
                draw(ax, row, epochs, runs)
        _finish(ax, st, x, y)
    return _save(plt, fig, path)


def _draw_accuracy(ax: Any, row: Row, epochs: list[int], runs: list[Any]) -> None:
    accs = np.array([r.curves[get_task(row.config.task).primary.name] for r in runs])
    m = accs.mean(0)
    (line,) = ax.plot(epochs, m, marker="." if len(epochs) < 30 else None, label=row.label)
    if len(accs) > 1:
        s = accs.std(0, ddof=1)
        ax.fill_between(epochs, m - s, m + s, color=line.get_color(), alpha=0.15)


def plot_curves(settings: Sequence[Setting], path: str) -> str:
    """The primary metric (test accuracy, mean IoU, FID) per evaluated epoch, mean over seeds with a +-1 std band."""
    return _per_epoch_panels(settings, path, _draw_accuracy, "epoch", _metric_label(settings))


def plot_hist(settings: Sequence[Setting], path: str) -> str:
    plt, fig, axes = _figure(len(settings))
    for ax, st in zip(axes, settings, strict=True):
        everything = np.concatenate([r.accs for r in st.rows])
        lo, hi = everything.min(), everything.max()
        bins = np.linspace(lo - 0.05, hi + 0.05, 16) if hi > lo else 10
        for row in st.rows:
            ax.hist(
                row.accs,
                bins=bins,
                histtype="stepfilled",
                alpha=0.35,
                edgecolor="k",
                linewidth=0.8,
                label=f"{row.label} (n={len(row.accs)})",
            )
        ax.set_xlabel(f"final {_metric_label(settings)}")
        ax.set_ylabel("runs")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        _title(ax, st)
    return _save(plt, fig, path)


def plot_lambda(settings: Sequence[Setting], path: str) -> str:
    plt, fig, axes = _figure(len(settings))
    for ax, st in zip(axes, settings, strict=True):
        base = st.baseline
        lines: dict[str, list[Row]] = {}
        for r in st.rows:
            if "lam" in METHODS.get(r.config.method).param_names and r.config.arg("lam") is not None and r.accs:
                lines.setdefault(describe(r.config, omit=("lam",)), []).append(r)
        for label, rows in lines.items():
            rows.sort(key=lambda r: r.config.arg("lam") or 0.0)
            ax.errorbar(
                [r.config.arg("lam") for r in rows],
                [r.mean for r in rows],
                yerr=[0.0 if np.isnan(r.std) else r.std for r in rows],
                marker="o",
                capsize=3,
                label=label,
            )
        if base is not None:
            ax.axhline(base.mean, color="k", linestyle="--", label=f"SGD (n={len(base.accs)})")
            if len(base.accs) > 1:
                ax.axhspan(base.mean - base.std, base.mean + base.std, color="k", alpha=0.08)
        _finish(ax, st, "lambda", "final test accuracy (%)")
    return _save(plt, fig, path)


def _draw_error_vs_time(ax: Any, row: Row, epochs: list[int], runs: list[Any]) -> None:
    elapsed = np.array([np.cumsum(r.curves["epoch_time"])[np.array(epochs) - 1] for r in runs])
    task = get_task(row.config.task)
    errors = np.array([[task.error(v) for v in r.curves[task.primary.name]] for r in runs])
    ax.plot(elapsed.mean(0), errors.mean(0), marker="." if len(epochs) < 30 else None, label=row.label)


def plot_walltime(settings: Sequence[Setting], path: str) -> str:
    """Test error (100 - accuracy) at each evaluation against the wall time spent up to it (s).

    Times are each run's own per-epoch wall times (training and that epoch's evaluation), averaged over seeds.
    """
    return _per_epoch_panels(settings, path, _draw_error_vs_time, "wall time (s)", "test error (%)")


def _save(plt: Any, fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label_colours(num_classes: int) -> Any:
    """A colour map for label maps: class 0 black, the others tab10/tab20 colours, 255 (ignored) white."""
    from matplotlib.colors import ListedColormap

    base = _pyplot().get_cmap("tab10" if num_classes <= 11 else "tab20")
    colours = [(0.0, 0.0, 0.0, 1.0)] + [base((c - 1) % base.N) for c in range(1, num_classes)]
    return ListedColormap(colours + [(1.0, 1.0, 1.0, 1.0)])


def sample_panels(config: Any, state: dict[str, Any], ds: Any, count: int) -> tuple[Any, Any, Any]:
    """(inputs, truths, outputs) of the first `count` test examples of `ds` for a run of `config` whose task draws
    samples (`Task.samples`: segmentation, synthesis); `state` is the run's final checkpoint."""
    task = get_task(config.task)
    if task.samples is None:
        raise ValueError(f"plot 'samples' shows dense tasks' outputs; task {task.name!r} has none")
    model = task.networks(config, ds)[0].module
    model.load_state_dict(state["model"])
    model.eval()
    return task.samples(model, ds.test_x[:count], ds.test_y[:count], ds)


def _intact(path: str) -> bool:
    """Whether the kept model `path` passes its checksums; a damaged one is set aside (said on stderr)."""
    from cdgrad.experiments.checkpoint import CorruptCheckpointError, set_aside, verify_archive

    try:
        verify_archive(path)
    except CorruptCheckpointError as exc:
        set_aside(path, str(exc), then="leaving it out of the samples plot")
        return False
    return True


def plot_samples(
    settings: Sequence[Setting], path: str, model_path: Callable[[str], str] | None = None, count: int = 6
) -> str:
    """The first `count` test examples of the first setting: segmentation, image / true mask / each method's
    predicted mask; synthesis, label map / real image / each method's rendering (each method's lowest seed
    with a stored model that passes its checksums, a damaged one being set aside; rows without one are left
    out)."""
    import torch

    setting = settings[0]
    shown = []
    for row in setting.rows:
        for run in sorted(completed(setting.runs[row.label]), key=lambda r: r.seed):
            if model_path is not None and os.path.exists(model_path(run.key)) and _intact(model_path(run.key)):
                shown.append((row.label, run, torch.load(model_path(run.key), map_location="cpu", weights_only=True)))
                break
    if not shown:
        raise ValueError("plot 'samples' needs stored models: run the preset with save_model=true")
    from cdgrad.experiments.setup import load_data

    ds = load_data(shown[0][1].config)  # one setting: the same data for every method
    panels = [(label, sample_panels(run.config, state, ds, count)) for label, run, state in shown]
    first, truth, _ = panels[0][1]
    classes = ds.num_classes
    names = ("label map", "real image") if shown[0][1].config.task == "synthesis" else ("image", "true mask")
    rows = [(names[0], first), (names[1], truth)] + [(label, out) for label, (_, _, out) in panels]
    plt, fig, axes = _grid(len(rows), count)
    cmap = _label_colours(classes)
    for r, (label, data) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            item = data[c]
            if item.dim() == 2:  # a label map
                ax.imshow(item.clamp(max=classes).numpy(), cmap=cmap, vmin=0, vmax=classes, interpolation="nearest")
            else:
                image = item.permute(1, 2, 0).numpy()
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(textwrap.fill(label, 16), fontsize=7)
    fig.suptitle(setting_title(setting.setting), fontsize=8)
    return _save(plt, fig, path)


def _grid(rows: int, cols: int) -> tuple[Any, Any, Any]:
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.6, 1.3 * rows + 0.4), squeeze=False)
    return plt, fig, axes


PLOTTERS = {"curves": plot_curves, "hist": plot_hist, "lambda": plot_lambda, "walltime": plot_walltime}


def make_plots(
    settings: Sequence[Setting],
    out_dir: str,
    prefix: str,
    kinds: Sequence[str] = KINDS,
    model_path: Callable[[str], str] | None = None,
) -> list[str]:
    """Write `<out_dir>/<prefix>_<kind>.png` for each kind; returns the paths written. `model_path(key)`: where
    the stored final model of run `key` lives (for 'samples')."""
    if not settings:
        return []
    return [
        plot_samples(settings, os.path.join(out_dir, f"{prefix}_{k}.png"), model_path)
        if k == "samples"
        else PLOTTERS[k](settings, os.path.join(out_dir, f"{prefix}_{k}.png"))
        for k in kinds
    ]
