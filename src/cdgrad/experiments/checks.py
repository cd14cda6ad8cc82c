"""The checks of a run configuration across its fields: every value against its declared option, the method's
arguments against the method, the model against the task and the device against this machine.

`validate(config)` raises TypeError / ValueError naming the field and its accepted values; it changes nothing.
Besides each field's own range: `threads` at most `THREADS_PER_CORE` times this machine's cores (torch crashes on
tens of thousands), the rates `FLOAT32_FIELDS` at most the largest float32 (the dtype the networks train in; torch
cannot convert a larger step size), and `device` a CPU or CUDA device that exists here.
"""

from __future__ import annotations

import os

import torch

from cdgrad.experiments.config import FIELD_TYPES, FIELDS, RunConfig
from cdgrad.experiments.methods import validate_method
from cdgrad.experiments.models import models_taking
from cdgrad.experiments.registry import Option
from cdgrad.experiments.tasks import get_task, task_models

__all__ = ["FLOAT32_FIELDS", "THREADS_PER_CORE", "check_device", "check_threads", "check_types", "validate"]

THREADS_PER_CORE = 4  # `threads` may be at most this many times os.cpu_count()
FLOAT32_FIELDS = ("lr", "lr_d", "weight_decay")  # multiply float32 tensors inside torch.optim
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_types(config: RunConfig) -> None:
    """Raise TypeError / ValueError when a field has the wrong type or a value outside its choices or range.

    Every field is checked against its `Option`: numbers must be finite and within range, strings among the choices
    (data sets, models, tasks and methods as registered now).
    """
    for name, f in FIELDS.items():
        value = getattr(config, name)
        kind = FIELD_TYPES[name]
        if value is None:
            if f.default is not None:
                raise TypeError(f"{name} must be a {kind.__name__}, got None")
            continue
        option: Option = f.metadata["option"]
        option.check(value, name, kind)


def validate(config: RunConfig) -> None:
    """Raise TypeError / ValueError (naming the field and its accepted values) for an unusable config."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    check_types(config)
    validate_method(config)
    with_option = models_taking("batchnorm")
    if not config.batchnorm and config.model not in with_option:
        raise ValueError(
            f"batchnorm=False: model {config.model!r} has no batch-norm option; accepted models: "
            f"{', '.join(with_option)}"
        )
    task = get_task(config.task)
    accepted = task_models(task)
    if config.model not in accepted:
        raise ValueError(f"task {task.name!r}: model must be one of {', '.join(accepted)}, got {config.model!r}")
    for name, f in FIELDS.items():
        if f.metadata["task"] not in (None, task.name) and getattr(config, name) != f.default:
            only = f.metadata["task"]
            raise ValueError(f"{name} applies to task {only!r} only; leave it unset for task {task.name!r}")
    task.check_config(config)
    check_threads(config.threads)
    for name in FLOAT32_FIELDS:
        value = getattr(config, name)
        if value is not None and value > _FLOAT32_MAX:
            raise ValueError(
                f"{name}={value!r} is larger than {_FLOAT32_MAX:.6g}, the largest float32 (the dtype the networks "
                f"train in); accepted: a finite value of {name} up to {_FLOAT32_MAX:.6g}"
            )
    check_device(config.device)


def check_threads(threads: int) -> None:
    """ValueError unless `threads` (a config's, already an int >= 0) is at most `THREADS_PER_CORE` x the cores."""
    cores = os.cpu_count() or 1
    limit = THREADS_PER_CORE * cores
    if threads > limit:
        raise ValueError(
            f"threads={threads} is more than {THREADS_PER_CORE} x the {cores} cores of this machine; accepted: "
            f"0 (torch's default) to {limit}"
        )


def check_device(name: str) -> None:
    """ValueError unless `name` is a CPU or CUDA device that exists on this machine."""
    accepted = "cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as {accepted}; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: runs train on a CPU or CUDA device only; accepted: {accepted}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); accepted: cpu, cuda or "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
