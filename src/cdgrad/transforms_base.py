"""The gradient-transform protocol shared by every method in cdgrad.

A transform holds hyper-parameters (and, for some methods, state such as SGS scalings).
`cdgrad.attach(optimizer, transform)` calls it inside `optimizer.step()`:

    params = [p for p in optimizer's params if p.grad is not None and transform.select(p)]
    transform.transform_([p.grad for p in params], params)      # rewrites the gradients in place

`transform(grad, param)` is the pure, out-of-place form for a single tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class GradientTransform:
    """Base class. Subclasses override `select` and `transform_`; stateful ones extend the state dict."""

    def select(self, param: Tensor) -> bool:
        """Whether this transform acts on `param`'s gradient."""
        return True

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Replace each `grads[i]` (the gradient of `params[i]`, already selected) in place."""
        raise NotImplementedError

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        """Pure form: return the transformed gradient of one tensor; `grad` is not modified."""
        out = grad.clone()
        self.transform_([out], [param if param is not None else out])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and state, enough to rebuild an equal transform with `load_state_dict`."""
        return {"type": type(self).__name__, "config": copy.deepcopy(self.config())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is for {state.get('type')!r}, cannot load it into {type(self).__name__}")
        self.__init__(**state["config"])  # re-validates every hyper-parameter

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this transform."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def _check_grad(grad: Tensor, name: str = "grad") -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(grad).__name__}")
    if grad.is_sparse or grad.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; sparse gradients are not supported")
    if not grad.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {grad.dtype}")
