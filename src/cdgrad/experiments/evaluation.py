"""Evaluation of a model on a held-out split, by the run's task: one process, or sharded under torchrun.

`evaluate` returns the mean loss and the mean score over the split (for classification: cross-entropy and
accuracy in percent), `evaluate_sharded` the same with rank r taking the r-th contiguous chunk of the split and
the sums all-reduced, so every rank gets the single-process numbers up to round-off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cdgrad.experiments import data as data_mod
from cdgrad.experiments.tasks import TASKS, Task

__all__ = ["evaluate", "evaluate_sharded"]


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int, task: Task | None = None
) -> tuple[float, float]:
    """Mean loss and score (classification: cross-entropy, accuracy in %) of `model` on (x, y), no-grad batches."""
    task = task or TASKS["classification"]
    loss_sum, score = task.evaluate(model, x, y, mean, std, batch_size)
    return loss_sum / len(x), 100.0 * score / len(x)


def evaluate_sharded(
    model: nn.Module, ds: data_mod.Dataset, batch_size: int, rank: int, world: int, task: Task | None = None
) -> tuple[float, float]:
    """`evaluate` on the test split with rank r taking the r-th contiguous chunk; sums all-reduced."""
    task = task or TASKS["classification"]
    n = len(ds.test_x)
    lo, hi = n * rank // world, n * (rank + 1) // world
    loss_sum, score = task.evaluate(model, ds.test_x[lo:hi], ds.test_y[lo:hi], ds.mean, ds.std, batch_size)
    sums = torch.tensor([loss_sum, float(score)], dtype=torch.float64, device=ds.test_x.device)
    torch.distributed.all_reduce(sums)
    return sums[0].item() / n, 100.0 * round(sums[1].item()) / n
