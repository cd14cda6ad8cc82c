"""The supervised tasks, classification and segmentation: one network trained on a loss, scored by batch statistics.

A supervised task declares its loss (`loss(output, target, reduction)`), a vector of sums per batch (`stats(output,
target)`: for classification the number of correct predictions and of examples, for segmentation the confusion
matrix) that adds up over batches and processes, and `summarize(stats)`, the metrics of those sums (`{"acc": ...}`,
`{"acc": ..., "miou": ...}`); `supervised_task` makes the `Task` (step, evaluation, final metrics) from them.

Data-parallel runs (torchrun): every rank trains on rows `r::world` of each global batch, and the loss is scaled so
that DDP's gradient average is the gradient of the global batch's mean loss; evaluation is sharded by contiguous
chunks and its sums all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad.experiments import unet as _unet  # noqa: F401  (registers unet-*)
from cdgrad.experiments.data import normalize
from cdgrad.experiments.data.dataset import IGNORE_INDEX
from cdgrad.experiments.metrics import confusion_matrix, mean_iou, pixel_accuracy
from cdgrad.experiments.models import build_model
from cdgrad.experiments.tasks.base import BASE_CURVES, Context, Metric, Network, Task, Unit, supervised_curves

__all__ = [
    "CLASSIFICATION",
    "CLASSIFICATION_SPEC",
    "SEGMENTATION",
    "SEGMENTATION_SPEC",
    "Supervised",
    "evaluate",
    "evaluate_sharded",
    "supervised_task",
]


@dataclass(frozen=True)
class Supervised:
    """A supervised task's declaration: `Task` fields plus its loss, batch statistics and their summary."""

    name: str
    summary: str
    metrics: tuple[Metric, ...]
    loss: Callable[..., Tensor]  # (output, target, reduction="mean") -> loss
    stats: Callable[[Tensor, Tensor], Tensor]  # (output, target) -> 1-d vector of sums
    summarize: Callable[[Tensor], dict[str, float]]
    loss_count: Callable[[Tensor], Tensor]  # target -> number of terms the mean loss averages
    summary_metrics: tuple[str, ...] = ("acc",)
    dense: bool = False
    curves: tuple[str, ...] = BASE_CURVES
    report: tuple[str, ...] = field(default=())
    models: tuple[str, ...] | None = None
    samples: bool = False  # the plots show inputs, truths and predictions (dense tasks)


@torch.no_grad()
def evaluate_split(
    task: Supervised, model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int
) -> tuple[float, float, Tensor]:
    """Summed loss, number of loss terms and summed `task.stats` of `model` on (x, y), in no-grad batches."""
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


def evaluate(
    spec: Supervised, model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int
) -> tuple[float, dict[str, float]]:
    """Mean loss and metrics (classification: `{"acc": accuracy in %}`) of `model` on (x, y), no-grad batches."""
    loss_sum, count, sums = evaluate_split(spec, model, x, y, mean, std, batch_size)
    return loss_sum / count, spec.summarize(sums)


def evaluate_sharded(
    spec: Supervised, model: nn.Module, ds: Any, batch_size: int, rank: int, world: int
) -> tuple[float, dict[str, float]]:
    """`evaluate` on the test split with rank r taking the r-th contiguous chunk; sums all-reduced."""
    n = len(ds.test_x)
    lo, hi = n * rank // world, n * (rank + 1) // world
    loss_sum, count, sums = evaluate_split(spec, model, ds.test_x[lo:hi], ds.test_y[lo:hi], ds.mean, ds.std, batch_size)
    device = ds.test_x.device
    total = torch.cat([torch.tensor([loss_sum, count], dtype=torch.float64, device=device), sums.to(torch.float64)])
    torch.distributed.all_reduce(total)
    return total[0].item() / total[1].item(), spec.summarize(total[2:].round().to(torch.int64))


def supervised_task(spec: Supervised) -> Task:
    """The `Task` of a supervised declaration: one network, its step, evaluation and final metrics."""

    def networks(config: Any, ds: Any) -> list[Network]:
        options = {} if config.batchnorm else {"batchnorm": False}  # models without the option keep their signature
        model = build_model(
            config.model,
            num_classes=ds.num_classes,
            in_channels=ds.train_x.shape[1],
            image_size=ds.train_x.shape[-1],
            **options,
        )
        return [Network("model", model, config.lr, lambda x, y: normalize(x, ds.mean, ds.std))]

    def step(units: list[Unit], x: Tensor, y: Tensor, ctx: Context, count: int) -> dict[str, Tensor]:
        unit = units[0]
        logits = unit.net(unit.inputs(x, y))
        if ctx.world == 1:
            loss = spec.loss(logits, y)
            batch_loss = loss.detach() * count
        else:  # DDP averages over ranks: world/B * (local sum) averages to the global batch mean
            batch_loss = spec.loss(logits, y, reduction="sum")
            loss = batch_loss * (ctx.world / count)
            batch_loss = batch_loss.detach()
        unit.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # = loss.backward()
        unit.optimizer.step()
        return {"loss": batch_loss, "stats": spec.stats(logits.detach(), y)}

    def epoch_curves(sums: dict[str, Tensor], n: int) -> dict[str, float]:
        out = {"train_loss": sums["loss"].item() / n}
        out.update({f"train_{key}": value for key, value in spec.summarize(sums["stats"]).items()})
        return out

    def evaluator(config: Any, ds: Any) -> Callable[..., dict[str, float]]:
        def run(units: list[Unit], ctx: Context, diverged: bool) -> dict[str, float]:
            model = units[0].module
            if ctx.world == 1:
                loss, scores = evaluate(spec, model, ds.test_x, ds.test_y, ds.mean, ds.std, config.eval_batch_size)
            else:
                loss, scores = evaluate_sharded(spec, model, ds, config.eval_batch_size, ctx.rank, ctx.world)
            return {"test_loss": loss, **{f"test_{key}": value for key, value in scores.items()}}

        return run

    def finish(units: list[Unit], ctx: Context, curves: dict[str, list[Any]]) -> dict[str, float]:
        final = {k: curves[k][-1] for k in ("train_loss", "test_loss")}
        for key in spec.summary_metrics:
            final[f"train_{key}"], final[f"test_{key}"] = curves[f"train_{key}"][-1], curves[f"test_{key}"][-1]
        if spec.dense:  # the training metrics of a dense task: the same evaluation on the training split
            ds = ctx.ds
            bs = ctx.config.eval_batch_size
            _, scores = evaluate(spec, units[0].module, ds.train_x, ds.train_y, ds.mean, ds.std, bs)
            for key, value in scores.items():
                final[f"train_{key}"] = value
                final[f"gap_{key}"] = value - final[f"test_{key}"]
        return final

    def samples(model: nn.Module, x: Tensor, y: Tensor, ds: Any) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            return x, y, model(normalize(x, ds.mean, ds.std)).argmax(1)

    return Task(
        name=spec.name,
        summary=spec.summary,
        metrics=spec.metrics,
        networks=networks,
        step=step,
        epoch_curves=epoch_curves,
        evaluator=evaluator,
        finish=finish,
        curves=spec.curves,
        dense=spec.dense,
        report=spec.report,
        models=spec.models,
        samples=samples if spec.samples else None,
    )


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


CLASSIFICATION_SPEC = Supervised(
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
CLASSIFICATION = supervised_task(CLASSIFICATION_SPEC)


# ------------------------------------------------------------------------------------------- segmentation
def segmentation_loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Per-pixel cross-entropy of the logits (N, C, H, W) against the label maps (N, H, W), pixels labelled
    `IGNORE_INDEX` (255) left out ('mean': over the labelled pixels)."""
    return F.cross_entropy(output, target, reduction=reduction, ignore_index=IGNORE_INDEX)


def segmentation_stats(output: Tensor, target: Tensor) -> Tensor:
    """The batch's confusion matrix (true class x predicted class, ignored pixels left out), flattened."""
    return confusion_matrix(output.argmax(1), target, output.shape[1], ignore_index=IGNORE_INDEX).flatten()


def segmentation_summary(stats: Tensor) -> dict[str, float]:
    """Pixel accuracy and mean IoU (both percent) of one confusion matrix."""
    k = round(len(stats) ** 0.5)
    cm = stats.reshape(k, k)
    return {"acc": pixel_accuracy(cm), "miou": mean_iou(cm)}


SEGMENTATION_SPEC = Supervised(
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
    samples=True,
)
SEGMENTATION = supervised_task(SEGMENTATION_SPEC)
