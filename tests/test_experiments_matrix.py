"""Every registered method under every task: a short run trains, or the configuration is refused before training
with an error that names the method; and a run interrupted after its first epoch resumes to the same numbers (the
method's state travels in the checkpoint)."""

from __future__ import annotations

import math

import pytest

from cdgrad.experiments.checks import validate
from cdgrad.experiments.config import from_dict
from cdgrad.experiments.methods import METHODS
from cdgrad.experiments.tasks import TASKS
from cdgrad.experiments.train import train
from helpers import Interrupt, interrupt_after, register_fixtures

register_fixtures()

TASK_BASE = {
    "classification": {"dataset": "synthetic", "model": "tiny", "batch_size": 64, "lr": 0.1},
    "segmentation": {"task": "segmentation", "dataset": "synthetic-dense", "model": "unet-small", "batch_size": 8},
    "synthesis": {"task": "synthesis", "dataset": "synthetic-dense", "model": "spade-small", "batch_size": 8},
}
# arguments that make each method act within two short epochs (every parameter left unset takes its default)
ACTIVE = {"sgs": {"sgs_every": 1, "sgs_batches": 1}, "opnorm": {"clip_every": 2}, "h0": {"lam": 3.0}}
VARIANTS = [(m, ACTIVE.get(m, {})) for m in METHODS.names()] + [
    ("sgs", {"sgs_every": 1, "sgs_batches": 1, "sgs_pipeline": "authors"}),
    ("sgs", {"sgs_every": 1, "sgs_batches": 1, "sgs_on": "update"}),
    ("opnorm", {"clip_every": 1, "clip_projection": "gram"}),
]


def _stable(result: dict) -> dict:
    curves = {k: v for k, v in result["curves"].items() if k != "epoch_time"}
    return {"curves": curves, "final": result["final"], "status": result["status"]}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("method, args", VARIANTS, ids=[f"{m}-{'-'.join(map(str, a.values()))}" for m, a in VARIANTS])
def test_every_method_trains_under_every_task_or_is_refused_by_name(task, method, args, tmp_path):
    config = from_dict({**TASK_BASE[task], "method": method, **args, "epochs": 2, "threads": 1})
    try:
        validate(config)
    except ValueError as exc:  # a method that cannot change this task's networks says so before anything runs
        assert METHODS[method].check_config is not None, f"{method} x {task} refused without a declared reason"
        assert repr(method) in str(exc) and "accepted models" in str(exc)
        return
    full = train(config, 0)
    assert full["status"] == "completed"
    primary = TASKS[task].primary.name
    assert math.isfinite(full["final"][primary])
    path = str(tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        train(config, 0, checkpoint=path, callback=interrupt_after(1))
    assert _stable(train(config, 0, checkpoint=path)) == _stable(full)
