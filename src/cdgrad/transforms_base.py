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
  A subclass with state provides `prepare_load(state)`: validate `state` completely and return the function that
  commits it (and cannot fail); `load_state_dict` is `prepare_load(state)()`, and wrappers compose the commits.
* `begin_epoch(epoch, batches=None)`: called at the start of every epoch (epoch 0 first), a no-op unless a
  transform needs it.  `batches` is what a method may measure on: an iterable (typically a lazy iterator) of
  normalised training input batches, of which the transform consumes only what it needs (SGS with the authors'
  pipeline measures on its first `num_batches`); a transform that needs them raises `ValueError` when it is None.
* `after_step()`: called by `attach` after every `optimizer.step()` the handle is attached to (a step
  post-hook), not after a skipped step (GradScaler's overflow); a no-op unless a transform needs it (the
  operator-norm projection of `cdgrad.spectral.OperatorNormClipper`).
* `state_version`: a counter that grows whenever the state changes (a load, a hyper-parameter assignment);
  callers that cache `select` decisions re-decide when it changed.
* `homogeneous`: True when `T(s g) = s T(g)` for every `s > 0` (every linear transform), so that the transform
  may run on gradients still multiplied by an AMP loss scale; False (the default) makes `attach` unscale first.

`ConfiguredTransform` is the base of the transforms whose whole state is their validated hyper-parameters: a
subclass declares `config_keys` and `validate_config(config) -> {key: checked value}` and gets construction
(`super().__init__(**config)`), `config()`, `state_dict()` and the all-or-nothing load.  Write your own:
docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .validation import FLOAT_DTYPES, check_grad, check_int

__all__ = ["Commit", "ConfiguredTransform", "GradientTransform", "config_fields", "state_fields", "trained_weight"]

Commit = Callable[[], None]
_STRIDED = torch.strided
_FLOATING = frozenset(FLOAT_DTYPES)


def plain_floating(grads: Sequence[Tensor], min_dims: int = 0) -> bool:
    """Whether every tensor of `grads` is a plain dense floating `torch.Tensor` with `min_dims` or more dims: the
    common case, which needs no further checks (one pass, no per-tensor calls)."""
    for g in grads:
        if type(g) is not Tensor or g.layout is not _STRIDED or g.dtype not in _FLOATING or g.dim() < min_dims:
            return False
    return True


def trained_weight(module: torch.nn.Module) -> Tensor:
    """The parameter that holds `module`'s weight and receives its gradient: `module.weight`, or, for a module whose
    weight is parametrized (`torch.nn.utils.parametrize`, e.g. spectral norm), the parametrization's `original`.

    Reading `module.weight` of a parametrized module computes it anew, and spectral norm then also advances its
    power iteration in training mode: a transform that only needs to know the weight tensor reads this instead.
    """
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        original: Tensor = parametrizations["weight"].original
        return original
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight


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
    """Base class. Subclasses implement `apply_` (and `check`, `select`, `state_dict`, `prepare_load`, `config`,
    `begin_epoch`, `after_step` as needed); none of the names a subclass overrides starts with an underscore."""

    _version: int = 0
    homogeneous: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):  # a public attribute is a hyper-parameter: its change is a state change
            object.__setattr__(self, "_version", self._version + 1)
        object.__setattr__(self, name, value)

    def mark_changed(self) -> None:
        """Record a state change not made by assigning a public attribute (selection caches re-decide)."""
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
        if plain_floating(grads):
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
    def begin_epoch(self, epoch: int, batches: Iterable[Tensor] | None = None) -> None:
        """Called at the start of every epoch (epoch 0 first) with an iterable of normalised training input
        `batches` to measure on (consumed only as far as needed; None when the caller has none); a no-op unless
        the transform needs it."""
        check_int(epoch, "epoch", minimum=0)

    def after_step(self) -> None:
        """Called by `cdgrad.attach` after every optimizer step it is attached to (not after a skipped step); a
        no-op unless the transform needs it."""

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and state, enough to make an equal transform with `load_state_dict`."""
        return {"type": type(self).__name__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load `state` (from `state_dict()` of a transform of the same type); all-or-nothing."""
        self.prepare_load(state)()

    def prepare_load(self, state: Any) -> Commit:
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


class ConfiguredTransform(GradientTransform):
    """Base of the transforms whose whole state is their validated hyper-parameters `config_keys`.

    A subclass declares `config_keys` (the constructor's arguments, in order) and the classmethod
    `validate_config(config) -> {key: checked value}` (raising `TypeError`/`ValueError` naming the key), and calls
    `super().__init__(**arguments)` from its constructor.  This base stores each key as an attribute and gives
    `config()`, `state_dict()` (`{"type": <class name>, "config": config()}`) and the all-or-nothing load.
    """

    config_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **config: Any) -> None:
        if set(config) != set(self.config_keys):
            raise TypeError(
                f"{type(self).__name__} takes exactly the arguments {list(self.config_keys)}, got {sorted(config)}"
            )
        self._assign(self.validate_config(config))

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` (a mapping with exactly `config_keys`) with every value checked; raise for a bad one."""
        raise NotImplementedError(f"{cls.__name__} must implement validate_config")

    def _assign(self, config: Mapping[str, Any]) -> None:
        for k in self.config_keys:
            setattr(self, k, config[k])

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.config_keys}

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "config": self.config()}

    def prepare_load(self, state: Any) -> Commit:
        name = type(self).__name__
        fields = state_fields(state, name, ("config",))
        config = self.validate_config(config_fields(fields["config"], name, self.config_keys))
        return lambda: self._assign(config)
