"""What a task is: its networks, its training step, its evaluation and its metrics (`Task`), and the `Unit` that
the training loop hands to a task's step (one trained network with its optimizer, schedule and method).

The one training loop (`cdgrad.experiments.train`) asks a task for

* `networks(config, ds)`: the networks to train, in creation order, each a `Network` (its name in checkpoints, the
  module, its learning rate, and `inputs(x, y)`, the network's input made from a batch of data: what a method
  samples and measures on);
* `step(units, x, y, ctx, count) -> sums`: one training step on a batch of data (`count` examples in the global
  batch; forward, backward and `optimizer.step()` of each unit), returning tensors that add up over the epoch's
  batches (and over processes);
* `epoch_curves(sums, n)`: the epoch's training curves from those sums;
* `evaluator(config, ds)`: made once before training (a task loads what its evaluation needs there, and fails
  early); called as `evaluate(units, ctx, diverged)` it returns the evaluated curves' values;
* `finish(units, ctx, curves)`: the final metrics;
* `samples(model, x, y, ds)` (optional): inputs, truths and outputs of the first network to show side by side.

`metrics` names the final metrics a run reports, the primary one first; `curves` the per-epoch curves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BASE_CURVES", "Context", "Metric", "Network", "Task", "Unit", "check_dataset", "supervised_curves"]


def supervised_curves(summary_metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The per-epoch curves of a supervised task whose `summarize` returns `summary_metrics`."""
    return (
        "epoch",
        "train_loss",
        *(f"train_{k}" for k in summary_metrics),
        "test_epoch",
        "test_loss",
        *(f"test_{k}" for k in summary_metrics),
        "epoch_time",
    )


BASE_CURVES = supervised_curves(("acc",))  # classification's


@dataclass(frozen=True)
class Metric:
    """One final metric of a run: its key in `metrics["final"]`, a label, whether higher is better, and a short
    name for one-line summaries and table columns (`test acc`, `FID`; the key when empty).

    `percent`: the metric is a percentage of correct answers, so `100 - value` is an error (the paper's error
    reduction); otherwise a lower-is-better metric is itself the error (FID)."""

    name: str
    label: str
    higher_is_better: bool
    percent: bool = True
    short: str = ""

    @property
    def column(self) -> str:
        """The metric's column heading in the results tables, e.g. `test acc %`, `FID`."""
        return (self.short or self.name) + (" %" if self.percent else "")


@dataclass(frozen=True)
class Network:
    """A network a task trains: its `name` (the checkpoint's key of its state: `model` for the first network),
    the module, its learning rate, and `inputs(x, y)`, the module's input made from a batch of data."""

    name: str
    module: nn.Module
    lr: float
    inputs: Callable[[Tensor, Tensor], Tensor]


@dataclass
class Unit:
    """A trained network in a run: the module, `net` (the module, or its DistributedDataParallel wrapper), its
    optimizer, schedule, the method's transform attached to the optimizer (None: the ordinary gradient) and
    `inputs` (from its `Network`)."""

    name: str
    module: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    method: Any
    inputs: Callable[[Tensor, Tensor], Tensor]
    handle: Any = None  # the attachment of `method` to `optimizer` (removed when the run ends)


@dataclass(frozen=True)
class Context:
    """What a step and an evaluation may need beside the units: the run's config, the data set (on the device),
    the process's rank and the world size (1: one process)."""

    config: Any
    ds: Any
    rank: int = 0
    world: int = 1


Sums = Mapping[str, Tensor]


@dataclass(frozen=True)
class Task:
    """A kind of problem: its networks, training step, evaluation and metrics (see the module docstring).

    `metrics[0]` is the primary metric; `dense`: the labels are per-pixel label maps; `report`: secondary final
    metrics the results table shows beside the primary one; `models`: the networks of this task (None: every
    model no other task claims); `distributed`: whether a run may be data-parallel under torchrun; `progress`:
    the label and the key of `step`'s sums that the progress bar shows per example.
    """

    name: str
    summary: str
    metrics: tuple[Metric, ...]
    networks: Callable[[Any, Any], list[Network]]
    step: Callable[[list[Unit], Tensor, Tensor, Context, int], Sums]
    epoch_curves: Callable[[dict[str, Tensor], int], dict[str, float]]
    evaluator: Callable[[Any, Any], Callable[..., dict[str, float]]]
    finish: Callable[..., dict[str, float]]
    curves: tuple[str, ...] = BASE_CURVES
    dense: bool = False
    report: tuple[str, ...] = field(default=())
    models: tuple[str, ...] | None = None
    distributed: bool = True
    progress: tuple[str, str] = ("loss", "loss")
    check: Callable[[Any], None] | None = None  # extra checks of a config for this task
    check_data: Callable[[Any, Any], None] | None = None  # extra checks of the data and files before training
    # (first network, x, y, data set) -> (inputs, truths, outputs) to show side by side (`plots.plot_samples`)
    samples: Callable[[nn.Module, Tensor, Tensor, Any], tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        """The declared metric called `name`."""
        return next(m for m in self.metrics if m.name == name)

    @property
    def loss_curves(self) -> tuple[str, ...]:
        """The training-loss curves (a non-finite value in any of them means the run diverged)."""
        return tuple(c for c in self.curves if c.startswith("train_") and c.endswith("loss"))

    def headline(self, final: dict[str, float]) -> str:
        """The primary final metric in words, e.g. `test acc 91.23%`, `test mIoU 45.10%`, `FID 12.34`."""
        p = self.primary
        return f"{p.short or p.name} {final[p.name]:.2f}{'%' if p.percent else ''}"

    def error(self, value: float) -> float:
        """The primary metric as an error: 100 - value for a percentage, the value itself otherwise (FID)."""
        return 100.0 - value if self.primary.percent else value

    def check_config(self, config: Any) -> None:
        """ValueError for a config this task cannot train (beyond the model, which `task_models` decides)."""
        if self.check is not None:
            self.check(config)

    def check_dataset(self, config: Any, ds: Any) -> None:
        """ValueError when the data set does not fit this task (or the task's own files are unusable)."""
        check_dataset(self, ds.dense, config.dataset)
        if self.check_data is not None:
            self.check_data(config, ds)


def check_dataset(task: Task, dense: bool, dataset: str) -> None:
    """ValueError when the data set's labels do not fit the task (label maps for a dense task, classes otherwise)."""
    if task.dense != dense:
        want = "per-pixel label maps" if task.dense else "one class per image"
        got = "label maps" if dense else "one class per image"
        raise ValueError(f"task {task.name!r} needs a data set with {want}; data set {dataset!r} has {got}")
