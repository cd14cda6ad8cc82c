"""What a run learns and how it is scored: one `Task` per kind of problem, declared once in `TASKS`.

A supervised task (classification, segmentation) gives the training loop its loss (`loss(output, target,
reduction)`), a vector of sums per batch (`stats(output, target)`: for classification the number of correct
predictions and of examples, for segmentation the confusion matrix) that adds up over batches and processes, and
`summarize(stats)`, the metrics of those sums (`{"acc": ...}`, `{"acc": ..., "miou": ...}`). `evaluate` runs any
supervised task over a split in no-grad batches. The image-synthesis task trains two networks and brings its own
loop (`fit`, see `cdgrad.experiments.synthesis`). `metrics` names the final metrics a run reports, the primary one
first, each with whether higher is better; `curves` the per-epoch curves a run records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad.experiments.data.dataset import IGNORE_INDEX

__all__ = ["TASKS", "Metric", "Task", "evaluate_split", "get_task"]


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
class Task:
    """A kind of problem: loss, batch statistics and their summary, or a loop of its own (`fit`).

    `metrics[0]` is the primary metric; `dense`: the labels are per-pixel label maps; `summary_metrics`: the keys
    `summarize` returns (each recorded as a `train_<key>` and `test_<key>` curve); `report`: secondary final
    metrics the results table shows beside the primary one.
    """

    name: str
    summary: str
    metrics: tuple[Metric, ...]
    loss: Callable[..., Tensor] | None = None  # (output, target, reduction="mean") -> loss
    stats: Callable[[Tensor, Tensor], Tensor] | None = None  # (output, target) -> 1-d vector of sums
    summarize: Callable[[Tensor], dict[str, float]] | None = None
    loss_count: Callable[[Tensor], Tensor] | None = None  # target -> number of terms the mean loss averages
    summary_metrics: tuple[str, ...] = ("acc",)
    dense: bool = False
    fit: Callable[..., dict[str, Any]] | None = None  # a loop of its own: fit(config, seed, **train's keywords)
    curves: tuple[str, ...] = BASE_CURVES
    report: tuple[str, ...] = field(default=())
    models: tuple[str, ...] | None = None  # the networks of this task (None: every model no other task claims)

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        """The declared metric called `name`."""
        return next(m for m in self.metrics if m.name == name)

    def headline(self, final: dict[str, float]) -> str:
        """The primary final metric in words, e.g. `test acc 91.23%`, `test mIoU 45.10%`, `FID 12.34`. The
        primary metric's key is also its per-evaluation curve."""
        p = self.primary
        return f"{p.short or p.name} {final[p.name]:.2f}{'%' if p.percent else ''}"

    def error(self, value: float) -> float:
        """The primary metric as an error: 100 - value for a percentage, the value itself otherwise (FID)."""
        return 100.0 - value if self.primary.percent else value


@torch.no_grad()
def evaluate_split(
    task: Task, model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int
) -> tuple[float, float, Tensor]:
    """Summed loss, number of loss terms and summed `task.stats` of `model` on (x, y), in no-grad batches."""
    from cdgrad.experiments.data import normalize

    assert task.loss is not None and task.stats is not None and task.loss_count is not None
    model.eval()
    loss_sum, count, sums = 0.0, 0.0, None
    for i in range(0, len(x), batch_size):
        output = model(normalize(x[i : i + batch_size], mean, std)).float()
        target = y[i : i + batch_size]
        loss_sum += task.loss(output, target, reduction="sum").item()
        count += float(task.loss_count(target))
        batch = task.stats(output, target)
        sums = batch if sums is None else sums + batch
    assert sums is not None
    return loss_sum, count, sums


# ----------------------------------------------------------------------------------------- classification
def classification_loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the logits `output` against the class indices `target`."""
    return F.cross_entropy(output, target, reduction=reduction)


def classification_score(output: Tensor, target: Tensor) -> Tensor:
    """Number of correct predictions (argmax of the logits) in the batch."""
    return (output.argmax(1) == target).sum()


def classification_stats(output: Tensor, target: Tensor) -> Tensor:
    """[number of correct predictions, number of examples] of the batch (int64)."""
    return torch.stack([classification_score(output, target), torch.tensor(len(target), device=target.device)])


def classification_summary(stats: Tensor) -> dict[str, float]:
    """Accuracy in percent, 100 correct / examples."""
    return {"acc": 100.0 * float(stats[0]) / float(stats[1])}


CLASSIFICATION = Task(
    name="classification",
    summary="image classification: cross-entropy loss, accuracy in percent",
    metrics=(
        Metric("test_acc", "test accuracy (%)", True, short="test acc"),
        Metric("test_loss", "test cross-entropy", False, percent=False),
        Metric("train_acc", "training accuracy (%)", True),
        Metric("train_loss", "training cross-entropy", False, percent=False),
    ),
    loss=classification_loss,
    stats=classification_stats,
    summarize=classification_summary,
    loss_count=lambda target: torch.tensor(len(target)),
)


# ------------------------------------------------------------------------------------------- segmentation
def segmentation_loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Per-pixel cross-entropy of the logits (N, C, H, W) against the label maps (N, H, W), pixels labelled
    `IGNORE_INDEX` (255) left out ('mean': over the labelled pixels)."""
    return F.cross_entropy(output, target, reduction=reduction, ignore_index=IGNORE_INDEX)


def segmentation_stats(output: Tensor, target: Tensor) -> Tensor:
    """The batch's confusion matrix (true class x predicted class, ignored pixels left out), flattened."""
    from cdgrad.experiments.metrics import confusion_matrix

    return confusion_matrix(output.argmax(1), target, output.shape[1], ignore_index=IGNORE_INDEX).flatten()


def segmentation_summary(stats: Tensor) -> dict[str, float]:
    """Pixel accuracy and mean IoU (both percent) of one confusion matrix."""
    from cdgrad.experiments.metrics import mean_iou, pixel_accuracy

    k = round(len(stats) ** 0.5)
    cm = stats.reshape(k, k)
    return {"acc": pixel_accuracy(cm), "miou": mean_iou(cm)}


SEGMENTATION = Task(
    name="segmentation",
    summary="semantic segmentation: per-pixel cross-entropy (label 255 ignored), mean IoU and pixel accuracy; "
    "the final training metrics come from the same evaluation on the (unaugmented) training split",
    metrics=(
        Metric("test_miou", "test mean IoU (%)", True, short="test mIoU"),
        Metric("test_acc", "test pixel accuracy (%)", True, short="test acc"),
        Metric(
            "gap_miou", "generalisation gap, train - test mean IoU (points)", False, False, "mIoU gap, train - test"
        ),
        Metric("gap_acc", "generalisation gap, train - test pixel accuracy (points)", False, percent=False),
        Metric("train_miou", "training mean IoU (%)", True),
        Metric("train_acc", "training pixel accuracy (%)", True),
        Metric("test_loss", "test cross-entropy", False, percent=False),
        Metric("train_loss", "training cross-entropy", False, percent=False),
    ),
    loss=segmentation_loss,
    stats=segmentation_stats,
    summarize=segmentation_summary,
    loss_count=lambda target: (target != IGNORE_INDEX).sum(),
    summary_metrics=("acc", "miou"),
    dense=True,
    curves=supervised_curves(("acc", "miou")),
    report=("test_acc", "gap_miou"),
    models=("unet-small", "unet-resnet50"),
)


# ---------------------------------------------------------------------------------------------- synthesis
def _fit_synthesis(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from cdgrad.experiments.synthesis import train_synthesis

    return train_synthesis(*args, **kwargs)


SYNTHESIS = Task(
    name="synthesis",
    summary="image synthesis from label maps (SPADE): hinge GAN loss with feature matching, FID of the test "
    "split's label maps rendered by the generator against the real test images",
    metrics=(
        Metric("test_fid", "FID (test split)", False, percent=False, short="FID"),
        Metric("train_loss", "generator loss (last epoch's mean)", False, percent=False),
        Metric("train_d_loss", "discriminator loss (last epoch's mean)", False, percent=False),
    ),
    dense=True,
    fit=_fit_synthesis,
    curves=("epoch", "train_loss", "train_d_loss", "test_epoch", "test_fid", "epoch_time"),
    models=("spade-small", "spade"),
)

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, SEGMENTATION, SYNTHESIS)}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the accepted ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def task_models(task: Task) -> tuple[str, ...]:
    """The model names a run of `task` accepts (a task without its own list: every registered model that no
    other task claims)."""
    if task.models is not None:
        return task.models
    from cdgrad.experiments.models import model_names

    claimed = {m for t in TASKS.values() for m in (t.models or ())}
    return tuple(m for m in model_names() if m not in claimed)


def check_dataset(task: Task, dense: bool, dataset: str) -> None:
    """ValueError when the data set's labels do not fit the task (label maps for a dense task, classes otherwise)."""
    if task.dense != dense:
        want = "per-pixel label maps" if task.dense else "one class per image"
        got = "label maps" if dense else "one class per image"
        raise ValueError(f"task {task.name!r} needs a data set with {want}; data set {dataset!r} has {got}")
