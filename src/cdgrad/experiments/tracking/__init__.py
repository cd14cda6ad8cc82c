"""Live logging of training runs to the tools researchers watch: a small protocol, one class per sink.

The training loop talks to one `Tracker`, which fans every call out to its sinks (`TensorBoardSink`,
`MlflowSink`, or any `Sink` subclass):

    start(run)                      a run begins or resumes: config, key, seed, steps per epoch, the epoch and
                                    curves restored from the checkpoint and the sinks' state saved in it
    log_step(step, metrics)         after optimizer step `step` (1-based, counted over the whole run)
    log_epoch(step, curves, ...)    after an epoch ending at step `step`: that epoch's entries of every curve
                                    (train_*, test_* where it was evaluated, epoch_time) and the method's diagnostics
    state_dict()                    just before a checkpoint is written: each sink makes everything logged so far
                                    durable and returns what a resume needs (kept in the checkpoint's "tracking")
    end(final, status)              the run finished: final metrics and status ("completed" or "diverged")
    abort()                         the run stopped with an exception (a resume may follow)
    close()                         after a failure of the sink: release local resources, contact nothing
    log_artifacts(name, paths)      files of a whole sweep (the report's tables and plots)

Every scalar a sink receives is a Python float; the x-axis of every scalar is the optimizer step, so an epoch's
metrics sit at the step that ended it (epoch e of a run with s steps per epoch: step e s). A sink that fails
(a tracking server down, a full disk) is reported by ONE `TrackingWarning` and left out for the rest of the run;
the run, its checkpoint and its record go on. With no tracker (the default) the loop does nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdgrad.experiments.config import RunConfig, run_key

__all__ = [
    "SINKS",
    "RunInfo",
    "Sink",
    "Tracker",
    "TrackingWarning",
    "add_tracking_arguments",
    "diagnostics",
    "epoch_metrics",
    "make_tracker",
    "parse_log",
    "tracker_from_args",
]

SINKS = ("tensorboard", "mlflow")


class TrackingWarning(UserWarning):
    """A sink failed; the run goes on without it."""


@dataclass(frozen=True)
class RunInfo:
    """What a sink learns when a run starts: the run, where it resumes (`epoch` 0: from scratch) and its curves."""

    config: RunConfig
    seed: int
    steps_per_epoch: int
    epoch: int = 0
    curves: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    preset: str | None = None

    @property
    def key(self) -> str:
        return run_key(self.config, self.seed)

    @property
    def step(self) -> int:
        """The last optimizer step already done (0 for a fresh run)."""
        return self.epoch * self.steps_per_epoch


class Sink:
    """One destination of the metrics. Subclasses override what they support; the defaults do nothing."""

    name = "sink"

    def start(self, run: RunInfo, state: Mapping[str, Any] | None) -> None:
        """Open (or, with `state` from the checkpoint, reopen) the run's record."""

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars of optimizer step `step`."""

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars of the epoch (and evaluation) that ended at step `step`."""

    def state_dict(self) -> dict[str, Any]:
        """Flush; what a resume from the checkpoint written now needs."""
        return {}

    def end(self, final: Mapping[str, float], status: str) -> None:
        """The run finished with `final` metrics and `status`; close its record."""

    def abort(self) -> None:
        """The run stopped early (an exception; a resume may follow): mark it so, then `close()`."""
        self.close()

    def close(self) -> None:
        """Release what the sink holds here (files, buffers) without contacting anything: after a failure."""

    def log_artifacts(self, name: str, paths: Sequence[str]) -> None:
        """Files of a whole sweep (`name`: the preset), e.g. the report's tables and plots."""


# ------------------------------------------------------------------------------------------ what is logged
def epoch_metrics(curves: Mapping[str, Sequence[Any]], index: int) -> dict[str, float]:
    """Entry `index` of every per-epoch curve, and of every test curve when that epoch was evaluated."""
    epoch = curves["epoch"][index]
    tests = list(curves.get("test_epoch", ()))
    j = tests.index(epoch) if epoch in tests else None
    out: dict[str, float] = {}
    for name, values in curves.items():
        if name in ("epoch", "test_epoch"):
            continue
        if name.startswith("test_"):
            if j is not None and j < len(values):
                out[name] = float(values[j])
        elif index < len(values):
            out[name] = float(values[index])
    return out


def diagnostics(method: Any, prefix: str = "diagnostics/") -> dict[str, float]:
    """The scalars a method's transform offers through an optional `diagnostics() -> {name: float}`, on itself or
    on the transform it wraps (`OnUpdate`, `Scaled`: e.g. SGS's G statistics, the clipped layers' operator norms),
    each under `prefix`."""
    out: dict[str, float] = {}
    for part in (method, getattr(method, "transform", None)):
        hook = getattr(part, "diagnostics", None)
        if callable(hook):
            for name, value in hook().items():
                out[f"{prefix}{name}"] = float(value)
    return out


# ------------------------------------------------------------------------------------------------ fan-out
class Tracker:
    """Fans the protocol out to `sinks`; a sink that raises gets one `TrackingWarning` and is dropped for the run.

    One tracker serves the runs of a sweep one after another (`start` ... `end`); a sink that failed in one run is
    tried again when the next starts, and warned about once per tracker.
    """

    def __init__(self, sinks: Iterable[Sink], preset: str | None = None) -> None:
        self.sinks = list(sinks)
        self.preset = preset
        self._live: list[Sink] = []
        self._warned: set[str] = set()

    def _call(self, sink: Sink, what: str, *args: Any) -> Any:
        try:
            return getattr(sink, what)(*args)
        except Exception as exc:  # a sink never stops training
            if sink in self._live:
                self._live.remove(sink)
            if sink.name not in self._warned:
                self._warned.add(sink.name)
                warnings.warn(
                    f"cdgrad: {sink.name} logging failed ({type(exc).__name__}: {exc}); the run goes on without it",
                    TrackingWarning,
                    stacklevel=3,
                )
            with contextlib.suppress(Exception):
                sink.close()
            return None

    def start(self, run: RunInfo, state: Mapping[str, Any] | None = None) -> None:
        """Start (or resume) `run` in every sink; `state` is the checkpoint's "tracking" entry. A sink with no state
        of its own in a resumed run (logging turned on half-way) first receives the restored epochs' metrics."""
        if self.preset is not None and run.preset is None:
            run = RunInfo(run.config, run.seed, run.steps_per_epoch, run.epoch, run.curves, self.preset)
        self._live = []
        for sink in self.sinks:
            own = (state or {}).get(sink.name)
            self._live.append(sink)
            self._call(sink, "start", run, own)
            if own is None and run.epoch > 0 and sink in self._live:
                for i in range(min(run.epoch, len(run.curves.get("epoch", ())))):
                    self._call(sink, "log_eval", (i + 1) * run.steps_per_epoch, epoch_metrics(run.curves, i))

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in list(self._live):
            self._call(sink, "log_step", step, metrics)

    def log_epoch(self, step: int, curves: Mapping[str, Sequence[Any]], *methods: tuple[str, Any]) -> None:
        """The last epoch's entries of `curves` and the diagnostics of each (prefix, method), at step `step`."""
        if not self._live:
            return
        metrics = epoch_metrics(curves, len(curves["epoch"]) - 1)
        for prefix, method in methods:
            try:
                metrics.update(diagnostics(method, prefix))
            except Exception as exc:
                warnings.warn(f"cdgrad: diagnostics() failed ({exc}); not logged", TrackingWarning, stacklevel=2)
        for sink in list(self._live):
            self._call(sink, "log_eval", step, metrics)

    def state_dict(self) -> dict[str, Any]:
        """{sink name: its state} of the sinks still logging this run."""
        out = {}
        for sink in list(self._live):
            state = self._call(sink, "state_dict")
            if sink in self._live:
                out[sink.name] = state
        return out

    def end(self, final: Mapping[str, float], status: str) -> None:
        finals = {k: float(v) for k, v in final.items()}
        for sink in list(self._live):
            self._call(sink, "end", finals, status)
        self._live = []

    def abort(self) -> None:
        for sink in self._live:
            with contextlib.suppress(Exception):
                sink.abort()
        self._live = []

    def log_artifacts(self, name: str, paths: Sequence[str]) -> None:
        for sink in self.sinks:
            self._live.append(sink)
            self._call(sink, "log_artifacts", name, list(paths))
        self._live = []


# ---------------------------------------------------------------------------------------- building trackers
def parse_log(values: Iterable[str] | None) -> list[str]:
    """The sinks named by `--log` values (each one name or a comma list), in order, once each."""
    names: list[str] = []
    for value in values or ():
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in SINKS:
                raise ValueError(f"--log {name!r} is not a sink; accepted values: {', '.join(SINKS)}")
            if name not in names:
                names.append(name)
    return names


def make_tracker(
    names: Sequence[str], results: str, preset: str | None = None, mlflow_uri: str | None = None
) -> Tracker | None:
    """A tracker with the sinks `names` for the results folder `results`, or None when `names` is empty.

    TensorBoard writes under `<results>/tensorboard/`; MLflow logs to `mlflow_uri`, else `MLFLOW_TRACKING_URI`,
    else `sqlite:///<results>/mlflow.db`, in the experiment named after the preset ("cdgrad" for single runs).
    ValueError naming the extra to install when a sink's package is missing.
    """
    import importlib.util

    sinks: list[Sink] = []
    for name in parse_log(names):
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--log {name} needs the {module} package: pip install 'cdgrad[{name}]'")
        if name == "tensorboard":
            from cdgrad.experiments.tracking.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(os.path.join(results, "tensorboard")))
        else:
            from cdgrad.experiments.tracking.mlflow import MlflowSink, default_uri

            uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(results)
            sinks.append(MlflowSink(uri, preset or "cdgrad"))
    return Tracker(sinks, preset) if sinks else None


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """`--log` and `--mlflow-uri`, for `cdgrad train` and `cdgrad run`."""
    parser.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="SINK",
        help="log the runs live to tensorboard (<results>/tensorboard/) and/or mlflow; repeatable or a comma list, "
        "e.g. --log tensorboard,mlflow (default: no logging)",
    )
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI for --log mlflow, e.g. http://host:5000 or sqlite:///runs.db "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///<results>/mlflow.db)",
    )


def tracker_from_args(args: argparse.Namespace, preset: str | None = None) -> Tracker | None:
    """The tracker `--log` / `--mlflow-uri` ask for (None without --log)."""
    return make_tracker(parse_log(args.log), args.results, preset, args.mlflow_uri)
