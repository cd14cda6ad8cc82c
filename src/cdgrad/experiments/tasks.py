"""What a run learns and how it is scored: one `Task` per kind of problem, declared once in `TASKS`.

A task gives the training loop its loss (`loss(output, target, reduction)`), the per-batch score summed into
the running training metric (`score(output, target)`, e.g. the number of correct predictions), and the
evaluation on a held-out split (`evaluate(model, x, y, mean, std, batch_size) -> (loss sum, score sum)`).
`metrics` names the final metrics a run reports, the primary one first, each with whether higher is better.
Only classification exists today; other tasks plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TASKS", "Metric", "Task", "get_task"]


@dataclass(frozen=True)
class Metric:
    """One final metric of a run: its key in `metrics["final"]`, a label, and whether higher is better."""

    name: str
    label: str
    higher_is_better: bool


@dataclass(frozen=True)
class Task:
    """A kind of problem: its loss, its per-batch score and its evaluation; `metrics[0]` is the primary metric."""

    name: str
    summary: str
    metrics: tuple[Metric, ...]
    loss: Callable[..., Tensor]  # (output, target, reduction="mean") -> loss
    score: Callable[[Tensor, Tensor], Tensor]  # (output, target) -> summed score of the batch (0-d tensor)
    evaluate: Callable[[nn.Module, Tensor, Tensor, Sequence[float], Sequence[float], int], tuple[float, float]]

    @property
    def primary(self) -> Metric:
        return self.metrics[0]


# ----------------------------------------------------------------------------------------- classification
def classification_loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the logits `output` against the class indices `target`."""
    return F.cross_entropy(output, target, reduction=reduction)


def classification_score(output: Tensor, target: Tensor) -> Tensor:
    """Number of correct predictions (argmax of the logits) in the batch."""
    return (output.argmax(1) == target).sum()


@torch.no_grad()
def classification_evaluate(
    model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int
) -> tuple[float, float]:
    """Summed cross-entropy and number of correct predictions of `model` on (x, y), in no-grad batches."""
    from cdgrad.experiments.data import normalize

    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(normalize(x[i : i + batch_size], mean, std))
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss_sum, correct


CLASSIFICATION = Task(
    name="classification",
    summary="image classification: cross-entropy loss, accuracy in percent",
    metrics=(
        Metric("test_acc", "test accuracy (%)", True),
        Metric("test_loss", "test cross-entropy", False),
        Metric("train_acc", "training accuracy (%)", True),
        Metric("train_loss", "training cross-entropy", False),
    ),
    loss=classification_loss,
    score=classification_score,
    evaluate=classification_evaluate,
)

TASKS: dict[str, Task] = {CLASSIFICATION.name: CLASSIFICATION}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the accepted ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]
