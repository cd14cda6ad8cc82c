"""Attach a gradient transform to any torch optimizer, without subclassing it.

    handle = cdgrad.attach(optimizer, cdgrad.ChannelDirected("sobolev", lam=1.0, beta=0.1))
    ...                       # every optimizer.step() now consumes the transformed gradients
    handle.remove()

The transform runs in a step pre-hook, i.e. inside `optimizer.step()` and before the optimizer's own
weight decay, momentum or adaptive moments.  A step given a closure (`optimizer.step(closure)`: LBFGS,
Lightning's automatic optimisation) computes its gradients inside the step: the transform then runs right
after every evaluation of the closure.  `torch.amp.GradScaler.step` unscales the gradients before it
calls `optimizer.step()` and skips that call on overflow, so the transform sees unscaled gradients and a
skipped step skips it.  Fused optimizers (`SGD/Adam/AdamW(fused=True)`) are instead stepped with scaled
gradients and `grad_scale`/`found_inf` set on them: the hook then skips on overflow too, runs homogeneous
(linear) transforms on the scaled gradients (they commute with the scale) and unscales around any other.
Gradients are replaced in place.  After every step that ran, a step post-hook calls the transform's
`after_step()` (a step GradScaler skips, or a fused step with `found_inf` set, does not call it).

`attach(optimizer, cdgrad.OnUpdate(transform))` (or `cdgrad.on_update(transform)`) makes the transform act on
the step's update instead of the gradient: it is `attach_update(optimizer, transform)`.

Optimizer wrappers are unwrapped: the transform attaches to the optimizer that updates the weights, found by
following `base_optimizer` (SAM), `optimizer` (Lookahead, accelerate's `AcceleratedOptimizer`) and
`_optimizer` (Lightning's `LightningOptimizer`).  So Lookahead's fast steps, and SAM's descent step (its
`second_step`, or `step(closure)`), take the transformed gradient; SAM's ascent (`first_step`) perturbs the
weights along the untransformed one, as SAM defines it; and a GradScaler that unscales the inner optimizer
unscales before the transform.

One transform is applied once per step: attaching a transform to an optimizer it is already attached to (by
`attach` or `attach_update`, until that handle's `remove()`), an optimizer that lists a parameter twice, or
`params=` that names one twice, is a ValueError.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, overload

import torch
from torch import Tensor

from . import functional as F
from .transforms import Masked, OnUpdate, check_transform
from .transforms_base import GradientTransform
from .validation import FLOAT_DTYPES

__all__ = ["attach", "attach_update", "AttachHandle", "UpdateHandle", "weight_updating_optimizer"]

_FLOATING = frozenset(FLOAT_DTYPES)
_WRAPPED = ("base_optimizer", "optimizer", "_optimizer")  # SAM; Lookahead, accelerate; Lightning
# the handles attached to each optimizer (weakly: a handle lives as long as its hooks, an optimizer as its owner)
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[weakref.ref[Any]]] = weakref.WeakKeyDictionary()


def _check_once(optimizer: torch.optim.Optimizer, transform: GradientTransform) -> None:
    """ValueError if `transform` is attached to `optimizer` already, or `optimizer` lists a parameter twice:
    either would apply the transform twice per step."""
    live = [h for ref in _ATTACHED.get(optimizer, []) if (h := ref()) is not None and not h.removed]
    if any(h.transform is transform for h in live):
        raise ValueError(
            f"transform ({type(transform).__name__}) is already attached to this optimizer and would apply twice "
            "per step; remove() the first handle first (to act on more parameters, attach once with all of them)"
        )
    seen: dict[int, str] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            where = f"param_groups[{g}]['params'][{i}]"
            if id(p) in seen:
                raise ValueError(
                    f"optimizer lists the parameter of shape {tuple(p.shape)} twice ({seen[id(p)]} and {where}): "
                    "the transform would apply twice to it; list every parameter once"
                )
            seen[id(p)] = where


def _register(optimizer: torch.optim.Optimizer, handle: Any) -> None:
    refs = [r for r in _ATTACHED.get(optimizer, []) if (h := r()) is not None and not h.removed]
    _ATTACHED[optimizer] = [*refs, weakref.ref(handle)]


def weight_updating_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside any wrappers around `optimizer` (itself when it wraps none): see the module docstring."""
    seen = {id(optimizer)}
    while True:
        inner = next(
            (w for w in (getattr(optimizer, a, None) for a in _WRAPPED) if isinstance(w, torch.optim.Optimizer)), None
        )
        if inner is None or id(inner) in seen:
            return optimizer
        seen.add(id(inner))
        optimizer = inner


class AttachHandle:
    """Returned by `attach`; `remove()` detaches the transform (also usable as a context manager).

    The selection is decided once and kept until the transform's `state_version` changes (a `load_state_dict`, a
    hyper-parameter assignment) or the optimizer's parameters change (a group added, a parameter replaced), then
    decided afresh.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, transform: GradientTransform, params: list[Tensor] | None
    ) -> None:
        self.optimizer = optimizer
        self.transform = transform
        # attach(..., params=) is `masked(transform, params)`: one selection mechanism
        self._effective: GradientTransform = transform if params is None else Masked(transform, params)
        # the parameters the transform selects, decided once per (state version, parameters of the optimizer)
        self._chosen: list[Tensor] = []
        self._chosen_for: tuple[int, tuple[int, ...]] | None = None
        self._known: list[Tensor] = []  # holds every parameter seen, so that no id in the key is reused
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        self.removed = False
        self._post_hook = optimizer.register_step_post_hook(self._post_step)

    def selected(self) -> list[Tensor]:
        """The parameters the transform acts on at the next step (those with a gradient)."""
        return self._selection()[0]

    def _selection(self) -> tuple[list[Tensor], list[Tensor]]:
        groups = self.optimizer.param_groups
        key = (self._effective.state_version, tuple(id(p) for group in groups for p in group["params"]))
        if key != self._chosen_for:  # new state or other parameters: decide afresh
            select = self._effective.select
            self._known = [p for group in groups for p in group["params"]]
            self._chosen = [p for p in self._known if select(p)]
            self._chosen_for = key
        params, grads = [], []
        for p in self._chosen:
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided or g.dtype not in _FLOATING:
                raise TypeError(
                    f"cdgrad.attach: the gradient of a parameter of shape {tuple(p.shape)} is "
                    f"{'sparse' if g.layout is not torch.strided else g.dtype}; accepted: dense "
                    "floating-point gradients (float16, bfloat16, float32, float64)"
                )
            params.append(p)
            grads.append(g)
        return params, grads

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        # `step(closure)` (LBFGS; Lightning's automatic optimisation) computes the gradients inside the step, after
        # this hook: the transform then runs right after each evaluation of the closure, on its fresh gradients.
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._transform_gradients(optimizer)
            return None

        def closure_then_transform() -> Any:
            loss = closure()
            self._transform_gradients(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_transform}
        return (args[0], closure_then_transform, *args[2:]), kwargs

    def _transform_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # Fused optimizers under GradScaler (`_step_supports_amp_scaling`) are stepped with the gradients still
        # scaled, `grad_scale` and `found_inf` set on the optimizer: skip with the step on overflow (no transform
        # state advances), and unscale around a transform that does not commute with the scale.
        if _skipped(optimizer):
            return
        params, grads = self._selection()  # validates every gradient before any is touched
        if not params:
            return
        scale = getattr(optimizer, "grad_scale", None)
        with torch.no_grad():
            if not isinstance(scale, Tensor) or self._effective.homogeneous:
                self._effective.transform_(grads, params)  # checks all, then transforms
                return
            self._effective.check(grads, params)
            factor = float(scale.item())
            F.scale_(grads, 1.0 / factor)
            self._effective.apply_(grads, params)
            F.scale_(grads, factor)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not _skipped(optimizer):
            self._effective.after_step()

    def remove(self) -> None:
        self._hook.remove()
        self._post_hook.remove()
        self.removed = True

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _skipped(optimizer: torch.optim.Optimizer) -> bool:
    """A fused optimizer stepped by GradScaler with `found_inf` set skips its update (an overflow)."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, Tensor) and bool(found_inf.any())


def _nested_on_update(transform: GradientTransform) -> bool:
    children = [getattr(transform, "transform", None), *getattr(transform, "transforms", ())]
    return any(isinstance(c, OnUpdate) or (isinstance(c, GradientTransform) and _nested_on_update(c)) for c in children)


@overload
def attach(  # type: ignore[overload-overlap]  # an OnUpdate gives the update's handle
    optimizer: torch.optim.Optimizer, transform: OnUpdate, params: Iterable[Tensor] | None = None
) -> UpdateHandle: ...


@overload
def attach(
    optimizer: torch.optim.Optimizer, transform: GradientTransform, params: Iterable[Tensor] | None = None
) -> AttachHandle: ...


def attach(
    optimizer: torch.optim.Optimizer, transform: GradientTransform, params: Iterable[Tensor] | None = None
) -> AttachHandle | UpdateHandle:
    """Make every `optimizer.step()` replace the gradients by `transform`'s output first, and call
    `transform.after_step()` after it.

    params: restrict the transform to these parameters (default: every parameter of the optimizer,
    including parameter groups added later).  Parameters without a gradient are skipped.
    A wrapper (Lookahead, SAM, ...) is unwrapped: `handle.optimizer` is the one that updates the weights.
    ValueError if the transform is attached to this optimizer already, or a parameter is listed twice.
    `transform = OnUpdate(t)` acts on the step's update instead: `attach_update(optimizer, t)` (restricted to
    `params` when given), an `UpdateHandle`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    transform = check_transform(transform, "transform")
    if _nested_on_update(transform):
        raise ValueError(
            f"transform {transform!r} holds an OnUpdate inside another transform; accepted: OnUpdate(t) as the "
            "attached transform itself (it applies to the whole update)"
        )
    chosen = None if params is None else _params(optimizer, params)
    if isinstance(transform, OnUpdate):
        inner = transform.transform
        return attach_update(optimizer, inner if chosen is None else Masked(inner, chosen))
    optimizer = weight_updating_optimizer(optimizer)
    _check_once(optimizer, transform)
    handle = AttachHandle(optimizer, transform, chosen)
    _register(optimizer, handle)
    return handle


def _params(optimizer: torch.optim.Optimizer, params: Any) -> list[Tensor]:
    """`params` checked: an iterable of distinct parameters of the optimizer."""
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        what = "a single tensor (wrap it in a list)" if isinstance(params, Tensor) else type(params).__name__
        raise TypeError(f"params must be an iterable of parameters of the optimizer, or None; got {what}")
    chosen = list(params)
    known = {id(p) for group in weight_updating_optimizer(optimizer).param_groups for p in group["params"]}
    first: dict[int, int] = {}
    for i, p in enumerate(chosen):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        if id(p) not in known:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the optimizer")
        if id(p) in first:
            raise ValueError(f"params[{first[id(p)]}] and params[{i}] are the same parameter; list each once")
        first[id(p)] = i
    return chosen


class UpdateHandle:
    """Returned by `attach_update` (and `attach(optimizer, OnUpdate(t))`); `remove()` detaches (also usable as a
    context manager).  After every step that ran, the transform's `after_step()` is called."""

    def __init__(self, optimizer: torch.optim.Optimizer, transform: GradientTransform) -> None:
        self.optimizer = optimizer
        self.transform = transform
        self._before: list[tuple[Tensor, Tensor]] = []
        self._hooks = [
            optimizer.register_step_pre_hook(self._snapshot),
            optimizer.register_step_post_hook(self._rewrite),
        ]
        self.removed = False

    def _snapshot(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # every selected trainable parameter: a step given a closure computes its gradients after this hook
        select = self.transform.select
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad and select(p)]
        with_grad = [p for p in params if p.grad is not None]
        self.transform.check([p.grad for p in with_grad], with_grad)  # raises before the step changes anything
        with torch.no_grad():
            self._before = [(p, p.detach().clone()) for p in params]

    def _rewrite(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        before, self._before = [(p, old) for p, old in self._before if p.grad is not None], []
        if _skipped(optimizer):
            return
        if before:
            self._rewrite_updates(before)
        self.transform.after_step()

    def _rewrite_updates(self, before: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            params = [p for p, _ in before]
            updates = [p.detach() - old for p, old in before]
            self.transform.transform_(updates, params)
            for (p, old), update in zip(before, updates, strict=True):
                p.copy_(old + update)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._before = []
        self.removed = True

    def __enter__(self) -> UpdateHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_update(optimizer: torch.optim.Optimizer, transform: GradientTransform) -> UpdateHandle:
    """Make every `optimizer.step()` apply `transform` to the step's *update* instead of the gradient:

        w <- w_before + T(w_after - w_before)

    for each parameter the transform selects (and that has a gradient): the post-optimizer variant of a scaling
    (the SGS paper's "Adagrad*", where `G` multiplies Adagrad's update rather than its input).  For plain SGD
    without momentum or weight decay and a linear `T` this equals `attach`; with any optimizer state it differs.
    A step that GradScaler skips runs neither hook; wrappers are unwrapped as by `attach`.  After every step that
    ran, `transform.after_step()` is called.  `attach(optimizer, OnUpdate(transform))` is this function.  ValueError
    if the transform is attached to this optimizer already, or the optimizer lists a parameter twice.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    transform = check_transform(transform, "transform")
    if isinstance(transform, OnUpdate) or _nested_on_update(transform):
        raise ValueError("attach_update: transform must not hold an OnUpdate (it already acts on the update)")
    optimizer = weight_updating_optimizer(optimizer)
    _check_once(optimizer, transform)
    handle = UpdateHandle(optimizer, transform)
    _register(optimizer, handle)
    return handle
