"""The checks of a run configuration across its fields: every value against its declared option, the method's
arguments against the method, the model against the task and the device against this machine.

`validate(config)` raises TypeError / ValueError naming the field and its accepted values; it changes nothing.
"""

from __future__ import annotations

import torch

from cdgrad.experiments.config import FIELD_TYPES, FIELDS, RunConfig
from cdgrad.experiments.methods import validate_method
from cdgrad.experiments.models import MODEL_REGISTRY
from cdgrad.experiments.registry import Option
from cdgrad.experiments.tasks import get_task, task_models

__all__ = ["check_types", "validate"]


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
    with_option = [n for n in MODEL_REGISTRY.names() if "batchnorm" in MODEL_REGISTRY.get(n).keywords]
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
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:0; got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but CUDA is not available; use device=cpu")
