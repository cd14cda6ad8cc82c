"""The run configuration: one dataclass, the single source of every experiment option.

Each field carries its help text and, where the values are a closed set, its choices. The command
line (`cdgrad train --help`) is generated from these fields; the saved results store the config as
JSON (`to_dict`) and rebuild it with `from_dict`. A run is identified by `run_key(config, seed)`, a
hash of the fields that change the numbers (paths, device and thread count are left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cdgrad.experiments.data import DATASETS
from cdgrad.experiments.methods import METHODS, validate_method
from cdgrad.experiments.models import MODELS

DATASET_CHOICES = (*DATASETS, "synthetic")
MODEL_CHOICES = (*MODELS, "tiny")


def _f(default: Any, help: str, choices: tuple | None = None, identity: bool = True, method: bool = False):
    meta = {"help": help, "choices": choices, "identity": identity, "method": method}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """One training configuration (everything except the seed)."""

    # data
    dataset: str = _f("fashion-mnist", "data set ('synthetic' is a tiny generated set for tests only)", DATASET_CHOICES)
    data_root: str | None = _f(
        None,
        "folder holding the data set's files (unset: $CDGRAD_DATA, ~/.cache/cdgrad/data, /usr/share/datasets)",
        identity=False,
    )
    download: bool = _f(False, "download the official files when the data set is not found", identity=False)
    swap_train_test: bool = _f(False, "Fig. 6 protocol: train on the test split, evaluate on the training split")
    train_subset: int = _f(0, "train on the first N training images only (0 = all)")
    test_subset: int = _f(0, "evaluate on the first N test images only (0 = all)")
    augment: bool = _f(False, "random crop (pad 4) and horizontal flip on every batch (CIFAR protocol)")
    # model and optimisation
    model: str = _f("cnn2", "network ('tiny' is a small test network)", MODEL_CHOICES)
    epochs: int = _f(10, "number of training epochs")
    batch_size: int = _f(100, "training batch size")
    optimizer: str = _f("sgd", "optimizer", ("sgd", "adam"))
    lr: float = _f(0.01, "initial learning rate")
    momentum: float = _f(0.9, "SGD momentum (sgd only)")
    weight_decay: float = _f(5e-4, "L2 weight decay (coupled, as in torch.optim)")
    schedule: str = _f(
        "step",
        "learning-rate schedule: 'step' divides lr by 10 every step_every epochs "
        "(the paper's), 'cosine' anneals to 0 over the run, 'constant' keeps it",
        ("step", "cosine", "constant"),
    )
    step_every: int = _f(40, "epochs between lr divisions by 10 (schedule 'step')")
    # gradient method
    method: str = _f("none", "gradient method (see `cdgrad list --methods`)", tuple(METHODS))
    lam: float | None = _f(None, "lambda of h0 / sobolev", method=True)
    beta: float | None = _f(None, "h0 / sobolev: add beta times the ordinary gradient", method=True)
    sigma: float | None = _f(None, "sigma of Laplacian smoothing (ls)", method=True)
    direction: str | None = _f(
        None,
        "axis to smooth along: output, input or flat (h0/sobolev); flat or output (ls)",
        ("output", "input", "flat"),
        method=True,
    )
    scope: str | None = _f(None, "which weights: conv (3+ dims) or all", ("conv", "all"), method=True)
    convention: str | None = _f(
        None,
        "lambda convention of h0 / sobolev: 'exact' (method.md eq. 8, the default) "
        "or 'paper' (the published code, via cdgrad.paper_convention)",
        ("exact", "paper"),
        method=True,
    )
    sgs_k: float | None = _f(None, "spatial gradient scaling: strength k (default 5)", method=True)
    sgs_batches: int | None = _f(None, "spatial gradient scaling: batches per estimate (default 2)", method=True)
    sgs_every: int | None = _f(None, "spatial gradient scaling: epochs between estimates (default 5)", method=True)
    clip_norm: float | None = _f(None, "opnorm: operator-norm bound of each conv layer", method=True)
    clip_every: int | None = _f(None, "opnorm: optimizer steps between projections", method=True)
    # evaluation and execution
    eval_every: int = _f(1, "evaluate on the test split every N epochs (the last epoch always is)")
    eval_batch_size: int = _f(250, "batch size of the (no-grad) evaluation", identity=False)
    device: str = _f("cpu", "torch device to train on, e.g. cpu, cuda, cuda:1", identity=False)
    threads: int = _f(0, "torch CPU threads (0 = leave torch's default)", identity=False)
    save_model: bool = _f(
        False, "keep the final checkpoint as <results>/models/<run key>.pt (for `cdgrad analyze`)", identity=False
    )

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
METHOD_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["method"])


def _field_type(name: str) -> type:
    """The base type (int, float, str, bool) of a field, Optional unwrapped."""
    hint = typing.get_type_hints(RunConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


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
    """Raise TypeError / ValueError when a field has the wrong type or a value outside its choices."""
    for name, f in FIELDS.items():
        value = getattr(config, name)
        kind = FIELD_TYPES[name]
        if value is None:
            if f.default is not None:
                raise TypeError(f"{name} must be a {kind.__name__}, got None")
            continue
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__} {value!r}")
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def validate(config: RunConfig) -> None:
    """Raise TypeError / ValueError (naming the field and its accepted values) for an unusable config."""
    import torch

    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    check_types(config)
    for name in ("epochs", "batch_size", "step_every", "eval_every", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(config, name)!r}")
    for name in ("train_subset", "test_subset", "threads", "weight_decay"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0; got {getattr(config, name)!r}")
    if not (config.lr > 0 and config.lr < float("inf")):
        raise ValueError(f"lr must be a finite number > 0; got {config.lr!r}")
    if not 0 <= config.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {config.momentum!r}")
    validate_method(config)
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:0; got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but CUDA is not available; use device=cpu")


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config from `to_dict` output; unknown keys are an error, missing keys take defaults."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; accepted: {', '.join(FIELDS)}")
    values = {
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


def add_config_arguments(parser: argparse.ArgumentParser, defaults: RunConfig | None = None) -> None:
    """Add one `--field-name` option per config field, with the field's type, default, choices and help."""
    defaults = defaults or RunConfig()
    group = parser.add_argument_group("run configuration")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = FIELD_TYPES[name]
        default = getattr(defaults, name)
        shown = default if default is not None else ("the method's" if f.metadata["method"] else "unset")
        help_text = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        group.add_argument(
            flag,
            dest=name,
            type=lambda s, n=name: _argparse_value(n, s),
            default=default,
            choices=f.metadata["choices"],
            metavar=kind.__name__.upper() if f.metadata["choices"] is None else None,
            help=help_text,
        )


def _argparse_value(name: str, text: str) -> Any:
    try:
        return parse_value(name, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        else:
            argv += [flag, "none" if value is None else str(value)]
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
