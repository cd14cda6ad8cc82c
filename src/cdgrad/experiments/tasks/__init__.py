"""What a run learns and how it is scored: one `Task` per kind of problem, declared once in `TASKS`.

classification and segmentation are supervised (`tasks.supervised`); synthesis trains SPADE's generator and
discriminator (`tasks.synthesis`). `tasks.base` says what a task gives the one training loop.
"""

from __future__ import annotations

from cdgrad.experiments.models import model_names
from cdgrad.experiments.tasks.base import Context, Metric, Network, Task, Unit, check_dataset
from cdgrad.experiments.tasks.supervised import CLASSIFICATION, SEGMENTATION
from cdgrad.experiments.tasks.synthesis import SYNTHESIS

__all__ = [
    "TASKS",
    "Context",
    "Metric",
    "Network",
    "Task",
    "Unit",
    "check_dataset",
    "get_task",
    "task_models",
]

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
    claimed = {m for t in TASKS.values() for m in (t.models or ())}
    return tuple(m for m in model_names() if m not in claimed)
