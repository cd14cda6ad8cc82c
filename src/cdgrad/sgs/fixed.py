"""A fixed spatial gradient scaling: the same `G` for every conv, from two ratios (the SGS paper's grid search).

    G[i, j] ~ 1 at the centre, 1 / edge at the other taps of the centre row and column, 1 / corner elsewhere,
    normalised to mean 1;   grad <- G * grad   for every conv weight (O, I, k_h, k_w) with k_h k_w >= 2.

`edge` and `corner` are the centre-to-edge and centre-to-corner ratios of `G` (the paper's appendix searches a
grid of both for 3x3 kernels; any kernel size follows the same rule).  Stateless apart from the two ratios.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..transforms_base import ConfiguredTransform
from ..validation import check_positive

__all__ = ["FixedSpatialScaling", "fixed_scaling"]


def fixed_scaling(kernel_size: tuple[int, int], edge: float, corner: float) -> Tensor:
    """`G` (float64, `kernel_size`) with centre / edge = `edge` and centre / corner = `corner`, mean 1."""
    kh, kw = kernel_size
    rows = torch.arange(kh).view(-1, 1) == kh // 2
    cols = torch.arange(kw).view(1, -1) == kw // 2
    on_axes = torch.full((kh, kw), 1.0 / edge, dtype=torch.float64)
    g = torch.where(rows | cols, on_axes, torch.full_like(on_axes, 1.0 / corner))
    g[kh // 2, kw // 2] = 1.0
    return g / g.mean()


class FixedSpatialScaling(ConfiguredTransform):
    """`grad <- G * grad` with the fixed `G = fixed_scaling(kernel_size, edge, corner)` of each conv's kernel."""

    config_keys = ("edge", "corner")
    edge: float
    corner: float
    homogeneous = True  # linear in the gradient

    def __init__(self, edge: float = 2.0, corner: float = 4.0) -> None:
        super().__init__(edge=edge, corner=corner)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"edge": check_positive(config["edge"], "edge"), "corner": check_positive(config["corner"], "corner")}

    def select(self, param: Tensor) -> bool:
        return param.dim() == 4 and param.shape[2] * param.shape[3] >= 2

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for g in grads:
                scale = fixed_scaling((g.shape[2], g.shape[3]), self.edge, self.corner)
                F.multiply_(g, scale.to(device=g.device, dtype=g.dtype))

    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        super().check(grads, params)
        for i, g in enumerate(grads):
            if g.dim() != 4:
                raise ValueError(
                    f"grads[{i}] has shape {tuple(g.shape)}; FixedSpatialScaling accepts conv weight gradients "
                    "(O, I, k_h, k_w)"
                )
