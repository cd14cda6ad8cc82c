"""Named registries and option declarations: what the toolkit's configuration is built from.

A `Registry` maps names to entries in declaration order (timm's registry style): the gradient methods
(`cdgrad.experiments.methods.METHODS`), the data sets (`cdgrad.experiments.data.DATASET_REGISTRY`) and the
models (`cdgrad.experiments.models.MODEL_REGISTRY`). The configuration's accepted values are read from the
registries when a config is validated, so an entry registered later (a test fixture, a user's own data set)
is accepted from then on without touching the configuration.

An `Option` declares one configuration value once: help, accepted choices or numeric range. `Option.check`
applies it with `cdgrad.validation`: a wrong type raises `TypeError`, a value outside the accepted set or
range (NaN and infinities included) raises `ValueError`, and both messages name the option and what it
accepts. A `Param` is an `Option` with a name, a type and the default that the method uses when the option
is left unset; a method's parameters are `Param`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cdgrad import validation as V

__all__ = ["Option", "Param", "Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind (`kind` names it in messages), by name, in registration order.

    Built-in entries (`builtin=True`) cannot be replaced; any other name may be registered again, which
    replaces its entry (so re-importing a module that registers something is harmless).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtin: set[str] = set()

    def register(self, name: str, entry: T, *, builtin: bool = False) -> T:
        """Add `entry` under `name` and return it."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__} {name!r}")
        if not name or name != name.strip() or any(c.isspace() or c in ",=" for c in name):
            raise ValueError(f"{self.kind} name must be a non-empty word without spaces, ',' or '=', got {name!r}")
        if name in self._builtin:
            raise ValueError(f"{self.kind} {name!r} is built in and cannot be replaced; register another name")
        self._entries[name] = entry
        if builtin:
            self._builtin.add(name)
        return entry

    def unregister(self, name: str) -> None:
        """Remove a registered (not built-in) entry; unknown names are ignored."""
        if name in self._builtin:
            raise ValueError(f"{self.kind} {name!r} is built in and cannot be removed")
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called `name`; ValueError naming the accepted names otherwise."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be one of {self.names()}, got {type(name).__name__} {name!r}")
        if name not in self._entries:
            raise ValueError(f"{self.kind} must be one of {self.names()}, got {name!r}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterable[tuple[str, T]]:
        return tuple(self._entries.items())

    def values(self) -> Iterable[T]:
        return tuple(self._entries.values())

    def index(self, name: str) -> int:
        """Position of `name` in registration order (the order of reports and listings)."""
        return self.names().index(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


Choices = tuple[str, ...] | Callable[[], Iterable[str]]


@dataclass(frozen=True, kw_only=True)
class Option:
    """How one configuration value is checked and documented.

    `choices`: the accepted strings, or a callable returning them when the value is checked (a registry's
    `names`). `minimum`/`maximum`: numeric bounds, inclusive unless `exclusive_minimum`/`exclusive_maximum`.
    Numbers must always be finite.
    """

    help: str
    choices: Choices | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def accepted_choices(self) -> tuple[str, ...] | None:
        """The accepted strings now (a registry's names are read at the moment of the call)."""
        if self.choices is None:
            return None
        return tuple(self.choices()) if callable(self.choices) else tuple(self.choices)

    def range_text(self) -> str:
        """The numeric range in words, e.g. '> 0', '>= 1', 'in [0, 1)'; '' when unbounded."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"in {'(' if self.exclusive_minimum else '['}{lo:g}, {hi:g}{')' if self.exclusive_maximum else ']'}"
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {hi:g}"
        return ""

    def check(self, value: Any, name: str, kind: type) -> Any:
        """`value` checked against `kind` (bool, int, float or str) and this option; returns it normalised."""
        if kind is bool:
            return V.check_bool(value, name)
        if kind is int:
            if self.exclusive_minimum or self.exclusive_maximum:
                raise AssertionError("int options take inclusive bounds")  # a declaration error, not user input
            lo = None if self.minimum is None else int(self.minimum)
            hi = None if self.maximum is None else int(self.maximum)
            return V.check_int(value, name, lo, hi)
        if kind is float:
            return V.check_interval(
                value,
                name,
                minimum=self.minimum,
                maximum=self.maximum,
                exclusive_minimum=self.exclusive_minimum,
                exclusive_maximum=self.exclusive_maximum,
            )
        if kind is str:
            choices = self.accepted_choices()
            if choices is not None:
                return V.check_choice(value, name, choices)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
            return value
        raise AssertionError(f"unsupported option type {kind!r}")


@dataclass(frozen=True, kw_only=True)
class Param(Option):
    """A method's hyper-parameter: a config field `name` of type `type`; `default` is used when it is unset."""

    name: str
    type: type
    default: Any = None

    def but(self, **changes: Any) -> Param:
        """This parameter as one method declares it (a narrower choice, another default); same name and type."""
        if {"name", "type"} & set(changes):
            raise ValueError("a method cannot change a parameter's name or type")
        return dataclasses.replace(self, **changes)

    def resolve(self, value: Any) -> Any:
        """`value`, or the default when it is None."""
        return self.default if value is None else value
