"""The command line of a run configuration, generated from its fields and the methods' parameters: one
`--field-name` option per config field and one per method parameter (`--lam`), with type, choices, range and help.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from cdgrad.experiments.config import FIELDS, RunConfig, from_dict, parse_value, value_type
from cdgrad.experiments.methods import PARAMS, defaults_text
from cdgrad.experiments.registry import Option

__all__ = ["add_config_arguments", "config_from_args", "config_to_argv", "option_help"]


def _option(name: str) -> Option:
    """The declared option of field or method parameter `name`."""
    return FIELDS[name].metadata["option"] if name in FIELDS else PARAMS[name]


def option_help(name: str) -> str:
    """The help of field or method parameter `name`: its text, accepted values and default, as `--help` shows it."""
    option = _option(name)
    text = option.help
    bounds = option.range_text()
    if bounds:
        text += f"; {bounds}"
    if name not in FIELDS:
        text += f"; unset: {defaults_text(name)} (default: the method's)"
    else:
        default = FIELDS[name].default
        text += f" (default: {default if default is not None else 'unset'})"
    return text


def _names() -> list[str]:
    """Every option: the config fields, then the method parameters (as registered now)."""
    return [*FIELDS, *(p for p in PARAMS if p not in FIELDS)]


def add_config_arguments(parser: argparse.ArgumentParser, defaults: RunConfig | None = None) -> None:
    """Add one `--field-name` option per config field and method parameter, with type, default, choices and help.

    Choices read from a registry (data sets, models, tasks, methods) are listed as registered when the parser is
    built and checked when the option is parsed. A method parameter's option sets that argument of the method.
    """
    defaults = defaults or RunConfig()
    group = parser.add_argument_group("run configuration")
    for name in _names():
        flag = "--" + name.replace("_", "-")
        kind = value_type(name)
        default = defaults.value(name)
        declared = FIELDS[name].default if name in FIELDS else None
        help_text = option_help(name)
        if default != declared:
            help_text = help_text.rsplit(" (default: ", 1)[0] + f" (default: {default})"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        option = _option(name)
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
    option = _option(name)
    if callable(option.choices) and value is not None:
        accepted = option.accepted_choices() or ()
        if value not in accepted:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(accepted)})")
    return value


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config whose fields and method arguments are the parsed options."""
    return from_dict({name: getattr(args, name) for name in _names() if hasattr(args, name)})


def config_to_argv(config: RunConfig) -> list[str]:
    """The command-line options that reproduce `config` (fields equal to the default are left out)."""
    argv: list[str] = []
    default = RunConfig()
    values = [(name, getattr(config, name), getattr(default, name)) for name in FIELDS]
    values += [(name, value, None) for name, value in config.method_args.items()]
    for name, value, unchanged in values:
        if value == unchanged:
            continue
        flag = "--" + name.replace("_", "-")
        if value_type(name) is bool:
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:  # `--flag=value`: argparse would take a value such as -1e-05 for an option
            argv.append(f"{flag}={'none' if value is None else value}")
    return argv
