"""The run configuration: one dataclass, the single source of every experiment option.

Each field carries an `Option` (help text, and the accepted choices or numeric range); the accepted data sets,
models, tasks and methods are read from their registries when a config is checked, so an entry registered later is
accepted. The gradient method's own arguments are one mapping, `method_args` (`{"lam": 2.0}`), whose keys are the
method's declared parameters (`cdgrad.experiments.methods`); unset arguments take the method's defaults. The saved
results store the config as JSON (`to_dict`) and rebuild it with `from_dict`, which also reads the flat form of
earlier versions (`{"method": "h0", "lam": 2.0}`). A run is identified by `run_key(config, seed)`, a hash of the
fields that change the numbers and differ from their defaults, method arguments included (paths, device and thread
count are left out). The command line is generated from these fields (`config_cli`); the checks across fields
live in `checks`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdgrad.experiments.data import DATASET_REGISTRY
from cdgrad.experiments.methods import METHODS, PARAMS
from cdgrad.experiments.models import MODEL_REGISTRY
from cdgrad.experiments.registry import Option
from cdgrad.experiments.tasks import TASKS

__all__ = [
    "FIELDS",
    "FIELD_TYPES",
    "MethodArgs",
    "RunConfig",
    "config_hash",
    "from_dict",
    "identity_dict",
    "parse_overrides",
    "parse_value",
    "run_key",
    "to_dict",
]


def _task_names() -> tuple[str, ...]:
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
    task: str | None = None,
) -> Any:
    """A config field: its default and its `Option` (help, choices or range); `identity`: part of the run key;
    `task`: the one task the field applies to (left at its default by any other)."""
    option = Option(
        help=help,
        choices=choices,
        minimum=minimum,
        maximum=maximum,
        exclusive_minimum=exclusive_minimum,
        exclusive_maximum=exclusive_maximum,
    )
    return field(default=default, metadata={"option": option, "help": help, "identity": identity, "task": task})


class MethodArgs(Mapping[str, Any]):
    """The method's arguments: an immutable, hashable mapping from parameter name to value (None values dropped;
    ints given for float parameters, and NumPy scalars, stored as Python numbers)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        if items is not None and not isinstance(items, Mapping):
            raise TypeError(f"method_args must be a mapping of parameter names to values, got {type(items).__name__}")
        clean = {}
        for name, value in (items or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"method_args keys must be parameter names (str), got {name!r}")
            if value is not None:
                param = PARAMS.get(name)
                clean[name] = normalise(value, param.type) if param is not None else value
        self._items = tuple(sorted(clean.items()))

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return repr(dict(self._items))


@dataclass(frozen=True)
class RunConfig:
    """One training configuration (everything except the seed).

    Numbers given as NumPy scalars, and ints given for float fields, are stored as Python floats / ints, so one
    configuration has one run key. A method parameter may be given by name, `RunConfig(method="h0", lam=2.0)`:
    it is an entry of `method_args`. `cdgrad.experiments.checks.validate` checks the values.
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
        task="synthesis",
    )
    fid_extractor: str = _f(
        "classifier",
        "synthesis: features of the FID, 'inception' (the standard network; weights from fid_weights) or "
        "'classifier' (a small CNN trained once per data set to tell which classes a label map holds)",
        ("classifier", "inception"),
        task="synthesis",
    )
    fid_weights: str | None = _f(
        None,
        "synthesis with fid_extractor=inception: path of pt_inception-2015-12-05-6726825d.pth (see docs/dense.md)",
        identity=False,
        task="synthesis",
    )
    fid_stats: str | None = _f(
        None,
        "synthesis: an .npz file with the real test images' feature mean and covariance (keys mu, sigma, as "
        "pytorch-fid writes them) in fid_extractor's features, used instead of computing them",
        identity=False,
        task="synthesis",
    )
    # gradient method: its name and its own arguments (the method's declared parameters)
    method: str = _f("none", "gradient method (see `cdgrad list --methods`)", METHODS.names)
    method_args: Mapping[str, Any] = field(
        default_factory=MethodArgs,
        metadata={"help": "the method's arguments, e.g. {'lam': 2.0}", "identity": True, "method_args": True},
    )
    # evaluation and execution
    eval_every: int = _f(1, "evaluate on the test split every N epochs (the last epoch always is)", minimum=1)
    eval_batch_size: int = _f(250, "batch size of the (no-grad) evaluation", identity=False, minimum=1)
    device: str = _f("cpu", "torch device to train on, e.g. cpu, cuda, cuda:1", identity=False)
    threads: int = _f(
        0, "torch CPU threads (0 = leave torch's default; at most 4 x this machine's cores)", identity=False, minimum=0
    )
    save_model: bool = _f(
        False, "keep the final checkpoint as <results>/models/<run key>.pt (for `cdgrad analyze`)", identity=False
    )

    def __post_init__(self) -> None:
        for name, kind in FIELD_TYPES.items():
            value = getattr(self, name)
            normal = normalise(value, kind)
            if normal is not value:
                object.__setattr__(self, name, normal)
        if not isinstance(self.method_args, MethodArgs):
            object.__setattr__(self, "method_args", MethodArgs(self.method_args))

    def arg(self, name: str) -> Any:
        """The method argument `name` as set in this config, or None when unset (the method's default applies)."""
        return self.method_args.get(name)

    def value(self, name: str) -> Any:
        """Field `name`, or the method argument `name` (None when unset)."""
        return getattr(self, name) if name in FIELDS else self.arg(name)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `changes`; a method parameter's name (`lam=2.0`) changes that argument (None unsets it), as
        in the constructor."""
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "method_args"}
_dataclass_init = RunConfig.__init__


def _init(self: RunConfig, **values: Any) -> None:
    """`RunConfig(method="h0", lam=2.0)`: a method parameter given by name is an entry of `method_args`."""
    args = {k: values.pop(k) for k in list(values) if k in PARAMS and k not in FIELDS}
    if args:
        values["method_args"] = {**(values.get("method_args") or {}), **args}
    _dataclass_init(self, **values)


RunConfig.__init__ = _init  # type: ignore[method-assign, assignment]


def normalise(value: Any, kind: type) -> Any:
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


def value_type(name: str) -> type:
    """The type of config field or method parameter `name`."""
    if name in FIELD_TYPES:
        return FIELD_TYPES[name]
    if name in PARAMS:
        return PARAMS[name].type
    raise ValueError(f"unknown config field {name!r}; accepted: {', '.join([*FIELDS, *PARAMS])}")


def parse_value(name: str, text: str) -> Any:
    """Convert the command-line text of a field or method parameter `name` to its type (`none` gives None for
    optional fields and method parameters)."""
    kind = value_type(name)
    if text.lower() in ("none", "null") and (name not in FIELDS or FIELDS[name].default is None):
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


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain JSON-ready values: every field, and `method_args` as a dict."""
    out = {name: getattr(config, name) for name in FIELDS}
    out["method_args"] = dict(config.method_args)
    return out


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild a config from `to_dict` output, or from the flat form (method parameters as keys, None when unset)
    that earlier versions wrote; unknown keys are an error, missing keys take defaults."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a config must be a mapping, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in FIELDS and k not in PARAMS and k != "method_args")
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; accepted: {', '.join([*FIELDS, 'method_args', *PARAMS])}")
    values: dict[str, Any] = {k: v for k, v in data.items() if k in FIELDS}
    args = dict(data.get("method_args") or {})
    args.update({k: v for k, v in data.items() if k in PARAMS and k not in FIELDS and v is not None})
    return RunConfig(**values, method_args=args)


def identity_dict(config: RunConfig) -> dict[str, Any]:
    """The fields that determine a run's numbers, method arguments as keys of their own (the flat form)."""
    out = {k: getattr(config, k) for k, f in FIELDS.items() if f.metadata["identity"]}
    out.update(config.method_args)
    return out


def config_hash(config: RunConfig) -> str:
    """Hash of the identity fields that differ from their defaults (so a new field keeps old keys valid)."""
    default = identity_dict(RunConfig())
    changed = {k: v for k, v in identity_dict(config).items() if v != default.get(k)}
    text = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(config: RunConfig, seed: int) -> str:
    """The results-store key of one run: `<config hash>-s<seed>`."""
    return f"{config_hash(config)}-s{seed}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `field=value` strings (the `--set` option) into typed config changes (method parameters included)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        out[key] = parse_value(key, text.strip())
    return out
