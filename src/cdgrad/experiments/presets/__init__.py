"""Named sweeps, one per published table or figure (`PRESETS`); the runner that executes them is
`cdgrad.experiments.runner`."""

from __future__ import annotations

from cdgrad.experiments.presets import dense, paper, sgs, spectral
from cdgrad.experiments.presets.base import Preset, describe_preset, grid
from cdgrad.experiments.registry import Registry

__all__ = ["PRESETS", "Preset", "describe_preset", "get_preset", "grid"]

PRESETS: Registry[Preset] = Registry("preset")
for _preset in paper.PRESETS + spectral.PRESETS + sgs.PRESETS + dense.PRESETS:
    PRESETS.register(_preset.name, _preset, builtin=True)


def get_preset(name: str) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS.get(name)
