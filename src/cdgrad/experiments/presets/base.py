"""The preset type: a named sweep of (setting, method) configurations, each with a number of seeds (0, 1, ...).

`*-reduced` presets are sized for a 2-core CPU; their `cuts` say what differs from the published protocol.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cdgrad import validation as V
from cdgrad.experiments.config import FIELDS, RunConfig, from_dict

__all__ = ["Preset", "describe_preset", "grid"]


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    base: dict[str, Any]
    variants: tuple[tuple[dict[str, Any], int], ...]  # (changes to base, number of seeds)
    plots: tuple[str, ...] = ("curves", "hist")
    cuts: str = ""  # for reduced presets: what is cut and why
    published: str = ""  # the paper's numbers that the report sets ours beside

    def runs(
        self, overrides: dict[str, Any] | None = None, where: dict[str, Any] | None = None, max_seeds: int | None = None
    ) -> list[tuple[RunConfig, int]]:
        """Every (config, seed) of the sweep; `overrides` change every config, `where` keeps matching ones,
        `max_seeds` (an int >= 1; None: all) caps the seeds of each."""
        if max_seeds is not None:
            V.check_int(max_seeds, "max_seeds", 1)
        out = []
        for changes, seeds in self.variants:
            config = from_dict({**self.base, **changes, **(overrides or {})})
            if any(config.value(k) != v for k, v in (where or {}).items()):
                continue
            out += [(config, s) for s in range(min(seeds, max_seeds) if max_seeds is not None else seeds)]
        return out


def grid(
    settings: Iterable[dict[str, Any]],
    methods: Iterable[dict[str, Any]],
    seeds: int | Callable[[dict[str, Any]], int],
) -> tuple[tuple[dict[str, Any], int], ...]:
    """All (setting, method) combinations; `seeds` may depend on the setting."""
    return tuple(
        ({**s, **m}, seeds(s) if callable(seeds) else seeds)
        for s, m in itertools.product(list(settings), list(methods))
    )


def describe_preset(preset: Preset, verbose: bool = False) -> str:
    runs = preset.runs()
    lines = [f"{preset.name:18s} {len(runs):5d} runs  {preset.title}"]
    if preset.cuts:
        lines.append(f"{'':18s} {'':10s} reduced: {preset.cuts}")
    if verbose:
        config = from_dict(preset.base)
        base = {k: getattr(config, k) for k in FIELDS if getattr(config, k) != FIELDS[k].default}
        base.update(config.method_args)
        lines.append(f"{'':29s} base: " + ", ".join(f"{k}={v}" for k, v in base.items()))
        for changes, seeds in preset.variants:
            lines.append(f"{'':29s} {seeds:3d} seeds x " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return "\n".join(lines)
