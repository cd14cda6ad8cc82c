"""Evaluation of a model on a held-out split, by the run's task: one process, or sharded under torchrun.

`evaluate` returns the mean loss and the task's metrics over the split (classification: cross-entropy and
`{"acc": accuracy in percent}`; segmentation: per-pixel cross-entropy and `{"acc": pixel accuracy, "miou": mean
IoU}` from one confusion matrix), `evaluate_sharded` the same with rank r taking the r-th contiguous chunk of the
split and the sums all-reduced, so every rank gets the single-process numbers up to round-off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cdgrad.experiments import data as data_mod
from cdgrad.experiments.tasks import TASKS, Task, evaluate_split

__all__ = ["evaluate", "evaluate_sharded"]


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int, task: Task | None = None
) -> tuple[float, dict[str, float]]:
    """Mean loss and metrics (classification: `{"acc": accuracy in %}`) of `model` on (x, y), no-grad batches."""
    task = task or TASKS["classification"]
    assert task.summarize is not None
    loss_sum, count, sums = evaluate_split(task, model, x, y, mean, std, batch_size)
    return loss_sum / count, task.summarize(sums)


def evaluate_sharded(
    model: nn.Module, ds: data_mod.Dataset, batch_size: int, rank: int, world: int, task: Task | None = None
) -> tuple[float, dict[str, float]]:
    """`evaluate` on the test split with rank r taking the r-th contiguous chunk; sums all-reduced."""
    task = task or TASKS["classification"]
    assert task.summarize is not None
    n = len(ds.test_x)
    lo, hi = n * rank // world, n * (rank + 1) // world
    loss_sum, count, sums = evaluate_split(task, model, ds.test_x[lo:hi], ds.test_y[lo:hi], ds.mean, ds.std, batch_size)
    device = ds.test_x.device
    total = torch.cat([torch.tensor([loss_sum, count], dtype=torch.float64, device=device), sums.to(torch.float64)])
    torch.distributed.all_reduce(total)
    return total[0].item() / total[1].item(), task.summarize(total[2:].round().to(torch.int64))
