"""Plots: which lines are drawn, with which labels (the method registry's), diverged runs left out; PNGs written."""

from __future__ import annotations

import math

import pytest

from cdgrad.experiments import plots, report
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.store import Run


class Recorder:
    """Stands in for a matplotlib Axes: records the lines drawn and their labels."""

    def __init__(self) -> None:
        self.lines: dict[str, tuple[list, list]] = {}

    def errorbar(self, x, y, yerr=None, label=None, **kw):
        self.lines[label] = (list(x), list(y))

    def plot(self, x, y, label=None, **kw):
        self.lines[label] = (list(x), list(y))
        return (type("Line", (), {"get_color": lambda self: "k"})(),)

    def __getattr__(self, name):
        return lambda *a, **k: None


def _run(seed, acc, status="completed", **kw):
    config = RunConfig(dataset="mnist", **kw)
    curves = {"test_epoch": [1, 2], "test_acc": [acc - 1.0, acc], "epoch_time": [10.0 + seed, 20.0]}
    return Run(f"{kw}{seed}", seed, config, "0", {}, curves, {"test_acc": acc}, 1.0, "", status=status)


@pytest.fixture
def recorded(monkeypatch):
    axes: list[Recorder] = []

    def figure(n, width=5.5, height=4.0):
        axes.extend(Recorder() for _ in range(n))
        return None, None, axes

    monkeypatch.setattr(plots, "_figure", figure)
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: path)
    return axes


def _runs():
    runs = [_run(s, 90.0 + s) for s in range(2)]
    for lam in (1.0, 5.0):
        runs += [_run(s, 91.0 + lam / 10 + s, method="h0", lam=lam, convention="paper") for s in range(2)]
        runs += [_run(s, 92.0 + s, method="sobolev", lam=lam, beta=1.0, convention="paper") for s in range(2)]
    runs.append(_run(2, math.nan, status="diverged", method="sobolev", lam=5.0, beta=1.0, convention="paper"))
    runs += [_run(s, 89.0, method="ls", sigma=1.0) for s in range(2)]
    return runs


def test_lambda_plot_has_one_line_per_method_setting(recorded):
    plots.plot_lambda(report.summarize(_runs()), "x.png")
    (ax,) = recorded
    assert set(ax.lines) == {"h0 (paper)", "sobolev beta=1 (paper)"}
    assert ax.lines["h0 (paper)"] == ([1.0, 5.0], [pytest.approx(91.6), pytest.approx(92.0)])
    assert ax.lines["sobolev beta=1 (paper)"] == ([1.0, 5.0], [92.5, 92.5])  # the diverged run is left out


def test_curves_leave_diverged_runs_out(recorded):
    plots.plot_curves(report.summarize(_runs()), "x.png")
    (ax,) = recorded
    assert ax.lines["sobolev lam=5 beta=1 (paper)"] == ([1, 2], [91.5, 92.5])
    assert "none" in ax.lines and "ls sigma=1" in ax.lines


def test_walltime_plots_test_error_against_cumulative_training_time(recorded):
    plots.plot_walltime(report.summarize(_runs()), "x.png")
    (ax,) = recorded
    # seeds 0 and 1: epoch times (10, 20) and (11, 20), accuracies (89, 90) and (90, 91)
    assert ax.lines["none"] == ([10.5, 30.5], [10.5, 9.5])
    assert ax.lines["sobolev lam=5 beta=1 (paper)"] == ([10.5, 30.5], [pytest.approx(8.5), pytest.approx(7.5)])


def test_pngs_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plots.make_plots(report.summarize(_runs()), str(tmp_path), "p")
    assert [p.rsplit("_", 1)[1] for p in paths] == ["curves.png", "hist.png", "lambda.png", "walltime.png"]
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
