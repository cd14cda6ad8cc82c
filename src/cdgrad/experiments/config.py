"""The run configuration: one dataclass, the single source of every experiment option.

Each field carries an `Option` (help text, and the accepted choices or numeric range). The method's
parameters are declared once in `cdgrad.experiments.methods.PARAMS` and their fields take help, choices and
range from there (`method_param`); the accepted data sets, models, tasks and methods are read from their
registries when a config is checked, so an entry registered later is accepted. The command line
(`cdgrad train --help`) is generated from these fields; the saved results store the config as JSON
(`to_dict`) and rebuild it with `from_dict`. A run is identified by `run_key(config, seed)`, a hash of the
fields that change the numbers and differ from their defaults (paths, device and thread count are left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdgrad.experiments import dense_models as _dense_models  # noqa: F401  (registers unet-* and spade*)
from cdgrad.experiments.data import DATASET_REGISTRY
from cdgrad.experiments.methods import METHODS, PARAMS, defaults_text, validate_method
from cdgrad.experiments.models import MODEL_REGISTRY
from cdgrad.experiments.registry import Option


def _task_names() -> tuple[str, ...]:
    from cdgrad.experiments.tasks import TASKS  # imported when a config is checked: tasks import the toolkit

    return tuple(TASKS)


def _f(
    default: Any,
    help: str,
    choices: Any = None,
    *,
    identity: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> Any:
    """A config field: its default and its `Option` (help, choices or range); `identity`: part of the run key."""
    option = Option(
        help=help,
        choices=choices,
        minimum=minimum,
        maximum=maximum,
        exclusive_minimum=exclusive_minimum,
        exclusive_maximum=exclusive_maximum,
    )
    return field(default=default, metadata={"option": option, "help": help, "identity": identity, "method": False})


def method_param(name: str) -> Any:
    """The config field of method parameter `name`: None (the method's default), declared in `methods.PARAMS`."""
    param = PARAMS[name]
    return field(default=None, metadata={"option": param, "help": param.help, "identity": True, "method": True})


@dataclass(frozen=True)
class RunConfig:
    """One training configuration (everything except the seed).

    Numbers given as NumPy scalars, and ints given for float fields, are stored as Python floats / ints, so
    one configuration has one run key. `validate` checks the values.
    """

    # task and data
    task: str = _f("classification", "what is learnt and how it is scored (cdgrad.experiments.tasks)", _task_names)
    dataset: str = _f("fashion-mnist", "data set", DATASET_REGISTRY.names)
    data_root: str | None = _f(
        None,
        "folder holding the data set's files; it must exist "
        "(unset: $CDGRAD_DATA, ~/.cache/cdgrad/data, /usr/share/datasets)",
        identity=False,
    )
    download: bool = _f(False, "download the official files when the data set is not found", identity=False)
    swap_train_test: bool = _f(False, "Fig. 6 protocol: train on the test split, evaluate on the training split")
    train_subset: int = _f(0, "train on the first N training images only (0 = all)", minimum=0)
    test_subset: int = _f(0, "evaluate on the first N test images only (0 = all)", minimum=0)
    augment: bool = _f(
        False,
        "random crop (pad 4) and horizontal flip on every batch (CIFAR protocol); dense tasks: random scale "
        "(0.5-2), crop (see crop) and flip of image and label map together",
    )
    crop: int = _f(0, "dense tasks with augment: side of the random training crop (0 = the image size)", minimum=0)
    # model and optimisation
    model: str = _f("cnn2", "network", MODEL_REGISTRY.names)
    batchnorm: bool = _f(
        True, "batch normalisation in the networks that have it (resnet*, vgg16); off: none, conv biases instead"
    )
    epochs: int = _f(10, "number of training epochs", minimum=1)
    batch_size: int = _f(100, "training batch size", minimum=1)
    optimizer: str = _f("sgd", "optimizer", ("sgd", "adam"))
    lr: float = _f(0.01, "initial learning rate", minimum=0.0, exclusive_minimum=True)
    momentum: float = _f(0.9, "SGD momentum (sgd only)", minimum=0.0, maximum=1.0, exclusive_maximum=True)
    weight_decay: float = _f(5e-4, "L2 weight decay (coupled, as in torch.optim)", minimum=0.0)
    schedule: str = _f(
        "step",
        "learning-rate schedule: 'step' multiplies lr by lr_decay every step_every epochs "
        "(the paper's: by 0.1 every 40), 'cosine' anneals to 0 over the run, 'constant' keeps it",
        ("step", "cosine", "constant"),
    )
    step_every: int = _f(40, "epochs between lr decays (schedule 'step')", minimum=1)
    warmup_epochs: int = _f(
        0, "epochs of linear learning-rate warm-up, lr (e+1)/(W+1), before the schedule runs over the rest", minimum=0
    )
    lr_decay: float = _f(
        0.1,
        "factor lr is multiplied by every step_every epochs (schedule 'step'; Sedghi et al. use 0.95)",
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
    )
    lr_d: float | None = _f(
        None,
        "synthesis: the discriminator's learning rate (unset: 4 x lr, the two time-scale rule of SPADE)",
        minimum=0.0,
        exclusive_minimum=True,
    )
    fid_extractor: str = _f(
        "classifier",
        "synthesis: features of the FID, 'inception' (the standard network; weights from fid_weights) or "
        "'classifier' (a small CNN trained once per data set to tell which classes a label map holds)",
        ("classifier", "inception"),
    )
    fid_weights: str | None = _f(
        None,
        "synthesis with fid_extractor=inception: path of pt_inception-2015-12-05-6726825d.pth (see docs/dense.md)",
        identity=False,
    )
    fid_stats: str | None = _f(
        None,
        "synthesis: an .npz file with the real test images' feature mean and covariance (keys mu, sigma, as "
        "pytorch-fid writes them) in fid_extractor's features, used instead of computing them",
        identity=False,
    )
    # gradient method: one field per parameter of cdgrad.experiments.methods.PARAMS
    method: str = _f("none", "gradient method (see `cdgrad list --methods`)", METHODS.names)
    lam: float | None = method_param("lam")
    beta: float | None = method_param("beta")
    sigma: float | None = method_param("sigma")
    direction: str | None = method_param("direction")
    scope: str | None = method_param("scope")
    convention: str | None = method_param("convention")
    sgs_k: float | None = method_param("sgs_k")
    sgs_batches: int | None = method_param("sgs_batches")
    sgs_every: int | None = method_param("sgs_every")
    sgs_pipeline: str | None = method_param("sgs_pipeline")
    sgs_warmup: int | None = method_param("sgs_warmup")
    sgs_dependence: str | None = method_param("sgs_dependence")
    sgs_on: str | None = method_param("sgs_on")
    sgs_edge: float | None = method_param("sgs_edge")
    sgs_corner: float | None = method_param("sgs_corner")
    clip_norm: float | None = method_param("clip_norm")
    clip_every: int | None = method_param("clip_every")
    clip_projection: str | None = method_param("clip_projection")
    # evaluation and execution
    eval_every: int = _f(1, "evaluate on the test split every N epochs (the last epoch always is)", minimum=1)
    eval_batch_size: int = _f(250, "batch size of the (no-grad) evaluation", identity=False, minimum=1)
    device: str = _f("cpu", "torch device to train on, e.g. cpu, cuda, cuda:1", identity=False)
    threads: int = _f(0, "torch CPU threads (0 = leave torch's default)", identity=False, minimum=0)
    save_model: bool = _f(
        False, "keep the final checkpoint as <results>/models/<run key>.pt (for `cdgrad analyze`)", identity=False
    )

    def __post_init__(self) -> None:
        for name, kind in FIELD_TYPES.items():
            value = getattr(self, name)
            normal = _normalise(value, kind)
            if normal is not value:
                object.__setattr__(self, name, normal)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
METHOD_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["method"])


def _normalise(value: Any, kind: type) -> Any:
    """NumPy scalars as Python numbers, ints of float fields as floats; anything else unchanged."""
    if isinstance(value, bool) or value is None:
        return value
    if kind is bool and isinstance(value, np.bool_):
        return bool(value)
    if kind is float and isinstance(value, numbers.Real) and not _exactly(value, float):
        try:
            return float(value)
        except OverflowError:
            return value
    if kind is int and isinstance(value, numbers.Integral) and not _exactly(value, int):
        return int(value)
    return value


def _exactly(value: object, kind: type) -> bool:
    return type(value) is kind


def _field_type(name: str) -> type:
    """The base type (int, float, str, bool) of a field, Optional unwrapped."""
    hint = typing.get_type_hints(RunConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.cast(type, hint)


FIELD_TYPES = {name: _field_type(name) for name in FIELDS}


def parse_value(name: str, text: str) -> Any:
    """Convert the command-line text of field `name` to its type (`none` gives None for optional fields)."""
    if name not in FIELDS:
        raise ValueError(f"unknown config field {name!r}; accepted: {', '.join(FIELDS)}")
    kind = FIELD_TYPES[name]
    if text.lower() in ("none", "null") and FIELDS[name].default is None:
        return None
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be a boolean (true/false), got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be of type {kind.__name__}, got {text!r}") from None


def check_types(config: RunConfig) -> None:
    """Raise TypeError / ValueError when a field has the wrong type or a value outside its choices or range.

    Every field is checked against its `Option`: numbers must be finite and within range, strings among the
    choices (data sets, models, tasks and methods as registered now).
    """
    for name, f in FIELDS.items():
        value = getattr(config, name)
        kind = FIELD_TYPES[name]
        if value is None:
            if f.default is not None:
                raise TypeError(f"{name} must be a {kind.__name__}, got None")
            continue
        f.metadata["option"].check(value, name, kind)


def validate(config: RunConfig) -> None:
    """Raise TypeError / ValueError (naming the field and its accepted values) for an unusable config."""
    import torch

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
    if METHODS.get(config.method).reshape is not None and (config.model not in with_option or not config.batchnorm):
        raise ValueError(
            f"method {config.method!r} re-parameterises conv + BatchNorm pairs: it needs batchnorm=True and a model "
            f"with batch norm; accepted models: {', '.join(with_option)}"
        )
    _validate_task(config)
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:0; got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but CUDA is not available; use device=cpu")


def _validate_task(config: RunConfig) -> None:
    """The model must be one of the task's networks; the synthesis options must fit the task (the Inception
    weights file is checked with the data, before training: `cdgrad.experiments.synthesis.check_fid_source`)."""
    from cdgrad.experiments.tasks import get_task, task_models

    task = get_task(config.task)
    accepted = task_models(task)
    if config.model not in accepted:
        raise ValueError(f"task {task.name!r}: model must be one of {', '.join(accepted)}, got {config.model!r}")
    if task.name != "synthesis" and any(v is not None for v in (config.lr_d, config.fid_weights, config.fid_stats)):
        raise ValueError("lr_d, fid_weights and fid_stats apply to task 'synthesis' only; leave them unset")


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config from `to_dict` output; unknown keys are an error, missing keys take defaults."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; accepted: {', '.join(FIELDS)}")
    values: dict[str, Any] = {
        k: (float(v) if FIELD_TYPES[k] is float and isinstance(v, int) and not isinstance(v, bool) else v)
        for k, v in data.items()
    }
    return RunConfig(**values)


def identity_dict(config: RunConfig) -> dict[str, Any]:
    """The fields that determine a run's numbers."""
    return {k: v for k, v in to_dict(config).items() if FIELDS[k].metadata["identity"]}


def config_hash(config: RunConfig) -> str:
    """Hash of the identity fields that differ from their defaults (so a new field keeps old keys valid)."""
    default = to_dict(RunConfig())
    changed = {k: v for k, v in identity_dict(config).items() if v != default[k]}
    text = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(config: RunConfig, seed: int) -> str:
    """The results-store key of one run: `<config hash>-s<seed>`."""
    return f"{config_hash(config)}-s{seed}"


def option_help(name: str) -> str:
    """The help of field `name`: its text, accepted values and default, as `cdgrad train --help` shows it."""
    f = FIELDS[name]
    option: Option = f.metadata["option"]
    text = option.help
    bounds = option.range_text()
    if bounds:
        text += f"; {bounds}"
    if f.metadata["method"]:
        text += f"; unset: {defaults_text(name)} (default: the method's)"
    else:
        text += f" (default: {f.default if f.default is not None else 'unset'})"
    return text


def add_config_arguments(parser: argparse.ArgumentParser, defaults: RunConfig | None = None) -> None:
    """Add one `--field-name` option per config field, with the field's type, default, choices and help.

    Choices read from a registry (data sets, models, tasks, methods) are listed as registered when the parser
    is built and checked when the option is parsed.
    """
    defaults = defaults or RunConfig()
    group = parser.add_argument_group("run configuration")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = FIELD_TYPES[name]
        default = getattr(defaults, name)
        help_text = option_help(name)
        if default != f.default:
            help_text = help_text.rsplit(" (default: ", 1)[0] + f" (default: {default})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        option: Option = f.metadata["option"]
        choices = option.accepted_choices()
        dynamic = callable(option.choices)
        group.add_argument(
            flag,
            dest=name,
            type=functools.partial(_argparse_value, name),
            default=default,
            choices=None if dynamic else choices,
            metavar=kind.__name__.upper() if choices is None else ("{" + ",".join(choices) + "}" if dynamic else None),
            help=help_text,
        )


def _argparse_value(name: str, text: str) -> Any:
    try:
        value = parse_value(name, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    option: Option = FIELDS[name].metadata["option"]
    if callable(option.choices) and value is not None:
        accepted = option.accepted_choices() or ()
        if value not in accepted:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(accepted)})")
    return value


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config whose fields are the parsed `--field-name` options."""
    return from_dict({name: getattr(args, name) for name in FIELDS})


def config_to_argv(config: RunConfig) -> list[str]:
    """The command-line options that reproduce `config` (fields equal to the default are left out)."""
    argv: list[str] = []
    default = RunConfig()
    for name in FIELDS:
        value = getattr(config, name)
        if value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if FIELD_TYPES[name] is bool:
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:  # `--flag=value`: argparse would take a value such as -1e-05 for an option
            argv.append(f"{flag}={'none' if value is None else value}")
    return argv


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `field=value` strings (the `--set` option) into typed config changes."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        out[key] = parse_value(key, text.strip())
    return out
