"""The gradient-transform protocol shared by every method in cdgrad.

A transform holds hyper-parameters (and, for some methods, state such as SGS scalings).
`cdgrad.attach(optimizer, transform)` calls it inside `optimizer.step()`:

    params = [p for p in optimizer's params if p.grad is not None and transform.select(p)]
    transform.transform_([p.grad for p in params], params)      # rewrites the gradients in place

The protocol, method by method:

* `select(param)`: whether the transform acts on `param`'s gradient (its default choice; override it per
  use with `cdgrad.masked(transform, mask)` or `attach(..., params=...)`).
* `check(grads, params)`: raise `TypeError`/`ValueError` for anything `apply_` cannot transform; never
  modifies anything.
* `apply_(grads, params)`: the in-place mathematics on checked arguments.
* `transform_(grads, params)` = `check` then `apply_`: every gradient is validated before any is touched.
* `transform(grad, param)` (`__call__`): the pure, out-of-place form for one tensor.
* `state_dict()` / `load_state_dict(state)`: each transform's own; a failed load leaves it exactly as it was.
* `begin_epoch(epoch)`: an optional epoch hook, a no-op unless a transform needs one (SGS).
* `state_version`: a counter that grows whenever the state changes (a load, a hyper-parameter assignment);
  callers that cache `select` decisions re-decide when it changed.
* `homogeneous`: True when `T(s g) = s T(g)` for every `s > 0` (every linear transform), so that the transform
  may run on gradients still multiplied by an AMP loss scale; False (the default) makes `attach` unscale first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .validation import FLOAT_DTYPES, check_grad, check_int

__all__ = ["GradientTransform", "state_fields"]

Commit = Callable[[], None]
_STRIDED = torch.strided
_FLOATING = frozenset(FLOAT_DTYPES)


def state_fields(state: Any, type_name: str, keys: Sequence[str]) -> Mapping[str, Any]:
    """`state` checked to be a mapping for `type_name` with exactly the keys `"type"` and `keys`."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict must be a dict (from {type_name}.state_dict()), got {type(state).__name__}")
    if state.get("type") != type_name:
        raise ValueError(f"state_dict is for {state.get('type')!r}, cannot load it into {type_name}")
    expected = {"type", *keys}
    if set(state) != expected:
        raise ValueError(
            f"state_dict of {type_name} must have exactly the keys {sorted(expected)}, got {sorted(state)}"
        )
    return state


def config_fields(config: Any, type_name: str, keys: Sequence[str]) -> Mapping[str, Any]:
    """`config` checked to be a mapping with exactly the keys `keys`."""
    if not isinstance(config, Mapping):
        raise TypeError(f"state_dict['config'] of {type_name} must be a dict, got {type(config).__name__}")
    if set(config) != set(keys):
        raise ValueError(
            f"state_dict['config'] of {type_name} must have exactly the keys {sorted(keys)}, got {sorted(config)}"
        )
    return config


class GradientTransform:
    """Base class. Subclasses implement `apply_` (and `check`, `select`, `state_dict`, `_loader` as needed)."""

    _version: int = 0
    homogeneous: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):  # a public attribute is a hyper-parameter: its change is a state change
            object.__setattr__(self, "_version", self._version + 1)
        object.__setattr__(self, name, value)

    def _changed(self) -> None:
        """Record a state change (selection caches re-decide)."""
        object.__setattr__(self, "_version", self._version + 1)

    @property
    def state_version(self) -> int:
        """Grows with every state change of this transform (or of the transforms it wraps)."""
        return self._version

    # ------------------------------------------------------------------------------------------ selection
    def select(self, param: Tensor) -> bool:
        """Whether this transform acts on `param`'s gradient."""
        return True

    # ------------------------------------------------------------------------------------------ transform
    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Raise `TypeError`/`ValueError` if any gradient cannot be transformed; modifies nothing."""
        if len(grads) != len(params):
            raise ValueError(f"grads and params must have equal lengths, got {len(grads)} and {len(params)}")
        for g in grads:
            if type(g) is not Tensor or g.layout is not _STRIDED or g.dtype not in _FLOATING:
                break
        else:
            return  # the common case: plain dense floating tensors
        for i, g in enumerate(grads):
            check_grad(g, f"grads[{i}]")

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Replace each `grads[i]` (already checked) in place."""
        if type(self).transform_ is not GradientTransform.transform_:  # a subclass with its own transform_
            self.transform_(grads, params)
            return
        raise NotImplementedError(f"{type(self).__name__} must implement apply_")

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Replace each `grads[i]` (the gradient of `params[i]`, already selected) in place; all are checked first."""
        self.check(grads, params)
        self.apply_(grads, params)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        """Pure form: return the transformed gradient of one tensor; `grad` is not modified."""
        p = param if param is not None else grad
        self.check([grad], [p])
        out = grad.clone()
        self.apply_([out], [p if param is not None else out])
        return out

    # -------------------------------------------------------------------------------------------- hooks
    def begin_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch (epoch 0 first); a no-op unless the transform needs it."""
        check_int(epoch, "epoch", minimum=0)

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and state, enough to make an equal transform with `load_state_dict`."""
        return {"type": type(self).__name__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load `state` (from `state_dict()` of a transform of the same type); all-or-nothing."""
        self._loader(state)()

    def _loader(self, state: Any) -> Commit:
        """Validate `state` completely, then return the function that commits it (and cannot fail)."""
        if type(self).load_state_dict is not GradientTransform.load_state_dict:  # a subclass with its own load
            return lambda: self.load_state_dict(state)
        state_fields(state, type(self).__name__, ())
        return lambda: None

    def config(self) -> dict[str, Any]:
        """The hyper-parameters of this transform (its constructor arguments)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
