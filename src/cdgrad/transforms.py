"""Gradient transforms: hyper-parameters plus a call into the pure kernels of `cdgrad.functional`.

Use them with `cdgrad.attach(optimizer, transform)`, or call `transform(grad)` on a single tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .transforms_base import GradientTransform

__all__ = [
    "ChannelDirected",
    "LaplacianSmoothing",
    "Centralize",
    "Scaled",
    "Chain",
    "paper_convention",
    "DIRECTIONS",
    "SCOPES",
]

DIRECTIONS = {"output": 0, "input": 1, "flat": None}
SCOPES = ("conv", "all")


def _check_choice(value: str, name: str, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {tuple(accepted)}, got {value!r}")
    return value


def _in_scope(param: Tensor, scope: str, direction: str) -> bool:
    if scope == "conv" and param.dim() < 3:
        return False
    return not (direction == "input" and param.dim() < 2)


class ChannelDirected(GradientTransform):
    """Channel-directed gradient (Lao et al.): the metric gradient plus `beta` times the ordinary gradient.

        update = g_metric(f) + beta * f,   g_metric = reweighted_h0(f, lam) or sobolev(f, lam)

    smoothed along `direction`: "output" (dim 0), "input" (dim 1) or "flat" (the tensor rasterised in C
    order).  `scope` "conv" acts on tensors with 3+ dims (Conv1d/2d/3d weights), "all" on every parameter
    (1-D tensors along their only axis; "input" skips 1-D tensors).  `lam` is the metric's own lambda as in
    method.md; `paper_convention` converts the paper's settings.
    """

    def __init__(
        self,
        metric: str = "sobolev",
        lam: float = 1.0,
        beta: float = 0.0,
        direction: str = "output",
        scope: str = "conv",
    ) -> None:
        self.metric = F._check_metric(metric)
        self.lam = F._check_positive(lam, "lam")
        self.beta = F._check_real(beta, "beta")
        self.direction = _check_choice(direction, "direction", tuple(DIRECTIONS))
        self.scope = _check_choice(scope, "scope", SCOPES)

    def config(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "lam": self.lam,
            "beta": self.beta,
            "direction": self.direction,
            "scope": self.scope,
        }

    def select(self, param: Tensor) -> bool:
        return _in_scope(param, self.scope, self.direction)

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        local = [g for g in grads if type(g) is Tensor or not _is_dtensor(g)]
        if len(local) != len(grads):  # FSDP2: sharded gradients, see cdgrad.distributed
            from .distributed import channel_directed_dtensor_

            for g in grads:
                if _is_dtensor(g):
                    channel_directed_dtensor_(g, self.metric, self.lam, self.beta, self.direction)
        F.channel_directed_(local, self.metric, self.lam, self.beta, DIRECTIONS[self.direction])

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        return F.channel_directed(grad, self.metric, self.lam, self.beta, DIRECTIONS[self.direction])


class LaplacianSmoothing(GradientTransform):
    """Laplacian smoothing (Osher et al.): `(I - sigma L)^-1 f` along `direction`.

    "flat" with scope "all" is the published method (every parameter rasterised); "output" is
    LS-ChanDir, the classic H1 Sobolev gradient along the output channels.
    """

    def __init__(self, sigma: float = 1.0, direction: str = "flat", scope: str = "all") -> None:
        self.sigma = F._check_nonnegative(sigma, "sigma")
        self.direction = _check_choice(direction, "direction", tuple(DIRECTIONS))
        self.scope = _check_choice(scope, "scope", SCOPES)

    def config(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "direction": self.direction, "scope": self.scope}

    def select(self, param: Tensor) -> bool:
        return _in_scope(param, self.scope, self.direction)

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        for g in grads:
            g.copy_(F.laplacian_smooth(g, self.sigma, DIRECTIONS[self.direction]))

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        return F.laplacian_smooth(grad, self.sigma, DIRECTIONS[self.direction])


class Centralize(GradientTransform):
    """Gradient centralisation (Yong et al.): subtract each output channel's mean over (I, kh, kw).

    scope "conv": tensors with 3+ dims; "all": every tensor with 2+ dims (conv and linear weights).
    """

    def __init__(self, scope: str = "conv") -> None:
        self.scope = _check_choice(scope, "scope", SCOPES)

    def config(self) -> dict[str, Any]:
        return {"scope": self.scope}

    def select(self, param: Tensor) -> bool:
        return param.dim() >= (3 if self.scope == "conv" else 2)

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        for g in grads:
            g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True, dtype=F._compute_dtype(g.dtype)))

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        return F.centralize(grad)


class Scaled(GradientTransform):
    """`factor` times another transform's update, on the parameters that transform selects."""

    def __init__(self, transform: GradientTransform, factor: float) -> None:
        if not isinstance(transform, GradientTransform):
            raise TypeError(f"transform must be a cdgrad GradientTransform, got {type(transform).__name__}")
        self.transform = transform
        self.factor = F._check_real(factor, "factor")

    def select(self, param: Tensor) -> bool:
        return self.transform.select(param)

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        self.transform.transform_(grads, params)
        if grads and self.factor != 1.0:
            torch._foreach_mul_(list(grads), self.factor)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        return self.transform(grad, param) * self.factor

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Scaled", "factor": self.factor, "transform": self.transform.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != "Scaled":
            raise ValueError(f"state_dict is for {state.get('type')!r}, cannot load it into Scaled")
        self.factor = F._check_real(state["factor"], "factor")
        self.transform.load_state_dict(state["transform"])

    def __repr__(self) -> str:
        return f"Scaled({self.transform!r}, factor={self.factor!r})"


class Chain(GradientTransform):
    """Apply transforms in order; each acts on the parameters it selects."""

    def __init__(self, *transforms: GradientTransform) -> None:
        for i, t in enumerate(transforms):
            if not isinstance(t, GradientTransform):
                raise TypeError(f"transforms[{i}] must be a cdgrad GradientTransform, got {type(t).__name__}")
        self.transforms = tuple(transforms)

    def select(self, param: Tensor) -> bool:
        return any(t.select(param) for t in self.transforms)

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        for t in self.transforms:
            chosen = [(g, p) for g, p in zip(grads, params, strict=True) if t.select(p)]
            if chosen:
                t.transform_([g for g, _ in chosen], [p for _, p in chosen])

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Chain", "transforms": [t.state_dict() for t in self.transforms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        children = state.get("transforms") if state.get("type") == "Chain" else None
        if children is None or len(children) != len(self.transforms):
            raise ValueError(f"state_dict does not match this Chain of {len(self.transforms)} transforms")
        for t, s in zip(self.transforms, children, strict=True):
            t.load_state_dict(s)

    def __repr__(self) -> str:
        return "Chain(" + ", ".join(repr(t) for t in self.transforms) + ")"


def paper_convention(
    metric: str, lam: float, beta: float = 0.0, direction: str = "output", scope: str = "conv"
) -> GradientTransform:
    """The transform that reproduces the paper's published convention for `lam` (docs/guide.md table).

    - "h0": the paper's code (its Figure 3) uses `f + lam * fbar`, lam >= 0 (lam = 0 is SGD), which is
      `(1 + lam) * reweighted_h0(f, 1 + lam)`; `beta` adds `beta * f`.
    - "sobolev": the published code multiplies the Sobolev gradient by lam, and the training adds
      `beta * f`: `lam * sobolev(f, lam) + beta * f`, lam > 0.  (The published code's per-fiber constant
      offset, method.md 1.2, is a bug and is not reproduced.)  At the paper's lam = 1 both conventions agree.
    """
    F._check_metric(metric)
    beta = F._check_real(beta, "beta")
    if metric == "h0":
        lam = F._check_nonnegative(lam, "lam")
        factor = 1.0 + lam
    else:
        lam = F._check_positive(lam, "lam")
        factor = lam
    metric_lam = factor if metric == "h0" else lam
    core = ChannelDirected(metric, lam=metric_lam, beta=beta / factor, direction=direction, scope=scope)
    return core if factor == 1.0 else Scaled(core, factor)


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"
