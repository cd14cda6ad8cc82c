"""Gradient transforms: hyper-parameters plus calls into `cdgrad.functional`, which decides how each tensor
(plain, DTensor, other) is computed.

Use them with `cdgrad.attach(optimizer, transform)`, or call `transform(grad)` on a single tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from . import functional as F
from .transforms_base import Commit, ConfiguredTransform, GradientTransform, plain_floating, state_fields
from .validation import check_choice, check_nonnegative, check_positive, check_real

__all__ = [
    "ChannelDirected",
    "LaplacianSmoothing",
    "Centralize",
    "Scaled",
    "Chain",
    "Masked",
    "masked",
    "OnUpdate",
    "on_update",
    "paper_convention",
    "Directional",
    "Wrapper",
    "DIRECTIONS",
    "SCOPES",
]

DIRECTIONS = F.DIRECTIONS
SCOPES = ("conv", "all")


def _in_scope(param: Tensor, scope: str, direction: str) -> bool:
    """scope "conv": 3+ dims; "all": every tensor with an axis to smooth (1+ dims; 2+ for "input")."""
    if param.dim() == 0 or (scope == "conv" and param.dim() < 3):
        return False
    return not (direction == "input" and param.dim() < 2)


def _check_direction_dims(grads: Sequence[Tensor], direction: str) -> None:
    dim = DIRECTIONS[direction]
    need = 1 if dim is None else dim + 1
    if need == 1 and all(g.dim() for g in grads):
        return
    for i, g in enumerate(grads):
        if g.dim() < need:
            raise ValueError(
                f"grads[{i}] of shape {tuple(g.shape)} has no axis for direction={direction!r} (it needs {need}+ "
                f"dims); scalars are never selected, and 1-D tensors accept the directions ('output', 'flat')"
            )


class Directional(ConfiguredTransform):
    """Base of the transforms that smooth along `direction` ("output", "input", "flat") within `scope` ("conv",
    "all"): the selection, the dimension check and the validation of those two keys, written once."""

    direction: str
    scope: str

    @staticmethod
    def validate_direction(config: Mapping[str, Any]) -> dict[str, Any]:
        """`{"direction", "scope"}` of `config`, checked."""
        return {
            "direction": check_choice(config["direction"], "direction", tuple(DIRECTIONS)),
            "scope": check_choice(config["scope"], "scope", SCOPES),
        }

    def select(self, param: Tensor) -> bool:
        return _in_scope(param, self.scope, self.direction)

    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        dim = DIRECTIONS[self.direction]
        if len(grads) == len(params) and plain_floating(grads, 1 if dim is None else dim + 1):
            return  # the common case, in one pass
        super().check(grads, params)
        _check_direction_dims(grads, self.direction)


class ChannelDirected(Directional):
    """Channel-directed gradient (Lao et al.): the metric gradient plus `beta` times the ordinary gradient.

        update = g_metric(f) + beta * f,   g_metric = reweighted_h0(f, lam) or sobolev(f, lam)

    smoothed along `direction`: "output" (dim 0), "input" (dim 1) or "flat" (the tensor rasterised in C
    order).  `scope` "conv" acts on tensors with 3+ dims (Conv1d/2d/3d weights), "all" on every parameter
    with an axis (1-D tensors along their only axis; "input" skips 1-D tensors; scalars are never selected).
    `lam` is the metric's own lambda as in docs/math.md; `paper_convention` converts the paper's settings.
    """

    config_keys = ("metric", "lam", "beta", "direction", "scope")
    metric: str
    lam: float
    beta: float
    direction: str
    scope: str
    homogeneous = True  # linear in the gradient

    def __init__(
        self,
        metric: str = "sobolev",
        lam: float = 1.0,
        beta: float = 0.0,
        direction: str = "output",
        scope: str = "conv",
    ) -> None:
        super().__init__(metric=metric, lam=lam, beta=beta, direction=direction, scope=scope)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "metric": F.check_metric(config["metric"]),
            "lam": check_positive(config["lam"], "lam"),
            "beta": check_real(config["beta"], "beta"),
            **cls.validate_direction(config),
        }

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        F.channel_directed_(grads, self.metric, self.lam, self.beta, DIRECTIONS[self.direction])

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        self.check([grad], [grad if param is None else param])
        return F.channel_directed_checked(grad, self.metric, self.lam, self.beta, DIRECTIONS[self.direction])


class LaplacianSmoothing(Directional):
    """Laplacian smoothing (Osher et al.): `(I - sigma L)^-1 f` along `direction`.

    "flat" with scope "all" is the published method (every parameter rasterised); "output" is
    LS-ChanDir, the classic H1 Sobolev gradient along the output channels.  Scalars are never selected.
    """

    config_keys = ("sigma", "direction", "scope")
    sigma: float
    direction: str
    scope: str
    homogeneous = True  # linear in the gradient

    def __init__(self, sigma: float = 1.0, direction: str = "flat", scope: str = "all") -> None:
        super().__init__(sigma=sigma, direction=direction, scope=scope)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"sigma": check_nonnegative(config["sigma"], "sigma"), **cls.validate_direction(config)}

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        F.laplacian_smooth_(grads, self.sigma, DIRECTIONS[self.direction])

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        self.check([grad], [grad if param is None else param])
        return F.laplacian_smooth_checked(grad, self.sigma, DIRECTIONS[self.direction])


class Centralize(ConfiguredTransform):
    """Gradient centralisation (Yong et al.): subtract each output channel's mean over (I, kh, kw).

    scope "conv": tensors with 3+ dims; "all": every tensor with 2+ dims (conv and linear weights).
    """

    config_keys = ("scope",)
    scope: str
    homogeneous = True  # linear in the gradient

    def __init__(self, scope: str = "conv") -> None:
        super().__init__(scope=scope)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"scope": check_choice(config["scope"], "scope", SCOPES)}

    def select(self, param: Tensor) -> bool:
        return param.dim() >= (3 if self.scope == "conv" else 2)

    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        super().check(grads, params)
        for i, g in enumerate(grads):
            F.check_centralizable(g, f"grads[{i}]")

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        F.centralize_(grads)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        self.check([grad], [grad if param is None else param])
        return F.centralize_checked(grad)


def check_transform(transform: Any, name: str) -> GradientTransform:
    if not isinstance(transform, GradientTransform):
        raise TypeError(
            f"{name} must be a cdgrad GradientTransform (e.g. cdgrad.ChannelDirected(...)), got "
            f"{type(transform).__name__}"
        )
    return transform


class Wrapper(GradientTransform):
    """Base of the transforms that wrap one other transform: by default everything is the wrapped one's."""

    transform: GradientTransform

    @property
    def state_version(self) -> int:
        return self._version + self.transform.state_version

    @property
    def homogeneous(self) -> bool:  # type: ignore[override]
        return self.transform.homogeneous

    def select(self, param: Tensor) -> bool:
        return self.transform.select(param)

    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        self.transform.check(grads, params)

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        self.transform.apply_(grads, params)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        return self.transform(grad, param)

    def begin_epoch(self, epoch: int, batches: Iterable[Tensor] | None = None) -> None:
        self.transform.begin_epoch(epoch, batches)

    def after_step(self) -> None:
        self.transform.after_step()


class Scaled(Wrapper):
    """`factor` times another transform's update, on the parameters that transform selects.

    factor = 1 skips the multiplication (the wrapped transform's numbers, bit for bit).
    """

    def __init__(self, transform: GradientTransform, factor: float) -> None:
        self.transform = check_transform(transform, "transform")
        self.factor = check_real(factor, "factor")

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        self.transform.apply_(grads, params)
        F.scale_(grads, self.factor)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        out = self.transform(grad, param)
        if self.factor != 1.0:
            F.scale_([out], self.factor)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Scaled", "factor": self.factor, "transform": self.transform.state_dict()}

    def prepare_load(self, state: Any) -> Commit:
        """A `Scaled` state; also the bare state of the wrapped transform's type (loaded with factor 1)."""
        if (
            isinstance(state, Mapping)
            and state.get("type") != "Scaled"
            and state.get("type") == type(self.transform).__name__
        ):
            inner = self.transform.prepare_load(state)
            factor = 1.0
        else:
            fields = state_fields(state, "Scaled", ("factor", "transform"))
            factor = check_real(fields["factor"], "factor")
            inner = self.transform.prepare_load(fields["transform"])

        def commit() -> None:
            inner()
            self.factor = factor

        return commit

    def __repr__(self) -> str:
        return f"Scaled({self.transform!r}, factor={self.factor!r})"


class Chain(GradientTransform):
    """Apply transforms in order; each acts on the parameters it selects.  Every gradient is checked by every
    transform before any is modified."""

    def __init__(self, *transforms: GradientTransform) -> None:
        self.transforms = tuple(check_transform(t, f"transforms[{i}]") for i, t in enumerate(transforms))

    @property
    def state_version(self) -> int:
        return self._version + sum(t.state_version for t in self.transforms)

    @property
    def homogeneous(self) -> bool:  # type: ignore[override]
        return all(t.homogeneous for t in self.transforms)

    def select(self, param: Tensor) -> bool:
        return any(t.select(param) for t in self.transforms)

    def _parts(
        self, grads: Sequence[Tensor], params: Sequence[Tensor]
    ) -> list[tuple[GradientTransform, list[Tensor], list[Tensor]]]:
        if len(grads) != len(params):
            raise ValueError(f"grads and params must have equal lengths, got {len(grads)} and {len(params)}")
        parts = []
        for t in self.transforms:
            chosen = [(g, p) for g, p in zip(grads, params, strict=True) if t.select(p)]
            if chosen:
                parts.append((t, [g for g, _ in chosen], [p for _, p in chosen]))
        return parts

    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        for t, g, p in self._parts(grads, params):
            t.check(g, p)

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        for t, g, p in self._parts(grads, params):
            t.apply_(g, p)

    def transform_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        parts = self._parts(grads, params)
        for t, g, p in parts:
            t.check(g, p)
        for t, g, p in parts:
            t.apply_(g, p)

    def begin_epoch(self, epoch: int, batches: Iterable[Tensor] | None = None) -> None:
        """Each transform's epoch hook in order; they share `batches` (each consumes what it needs)."""
        super().begin_epoch(epoch)
        for t in self.transforms:
            t.begin_epoch(epoch, batches)

    def after_step(self) -> None:
        for t in self.transforms:
            t.after_step()

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Chain", "transforms": [t.state_dict() for t in self.transforms]}

    def prepare_load(self, state: Any) -> Commit:
        children = state_fields(state, "Chain", ("transforms",))["transforms"]
        if not isinstance(children, Sequence) or len(children) != len(self.transforms):
            got = len(children) if isinstance(children, Sequence) else type(children).__name__
            raise ValueError(f"state_dict['transforms'] must hold {len(self.transforms)} states, got {got}")
        commits = [t.prepare_load(s) for t, s in zip(self.transforms, children, strict=True)]

        def commit() -> None:
            for c in commits:
                c()

        return commit

    def __repr__(self) -> str:
        return "Chain(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Masked(Wrapper):
    """Another transform restricted to the parameters `mask` accepts (and the transform itself selects).

    `mask`: a predicate `param -> bool`, or an iterable of parameters (matched by identity).  The state is the
    wrapped transform's; the mask is part of the set-up, not of the state.
    """

    def __init__(self, transform: GradientTransform, mask: Callable[[Tensor], bool] | Iterable[Tensor]) -> None:
        self.transform = check_transform(transform, "transform")
        if callable(mask) and not isinstance(mask, Tensor):
            self._predicate: Callable[[Tensor], bool] | None = mask
            self._params: tuple[Tensor, ...] = ()
        elif isinstance(mask, Iterable) and not isinstance(mask, (str, Tensor)):
            params = tuple(mask)
            for i, p in enumerate(params):
                if not isinstance(p, Tensor):
                    raise TypeError(f"mask[{i}] must be a tensor (a parameter), got {type(p).__name__}")
            self._predicate, self._params = None, params
        else:
            raise TypeError(
                f"mask must be a predicate param -> bool or an iterable of parameters, got {type(mask).__name__}"
            )
        self._ids = frozenset(id(p) for p in self._params)

    @property
    def mask_params(self) -> tuple[Tensor, ...]:
        """The parameters of an iterable mask (empty for a predicate)."""
        return self._params

    def select(self, param: Tensor) -> bool:
        keep = bool(self._predicate(param)) if self._predicate is not None else id(param) in self._ids
        return keep and self.transform.select(param)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "Masked", "transform": self.transform.state_dict()}

    def prepare_load(self, state: Any) -> Commit:
        return self.transform.prepare_load(state_fields(state, "Masked", ("transform",))["transform"])

    def __repr__(self) -> str:
        mask = getattr(self._predicate, "__name__", "predicate") if self._predicate else f"{len(self._params)} params"
        return f"Masked({self.transform!r}, mask={mask})"


def masked(transform: GradientTransform, mask: Callable[[Tensor], bool] | Iterable[Tensor]) -> Masked:
    """`transform` restricted to the parameters `mask` accepts (a predicate, or an iterable of parameters),
    optax-style: `cdgrad.attach(opt, cdgrad.masked(cdgrad.ChannelDirected(), lambda p: p.dim() == 4))`."""
    return Masked(transform, mask)


class OnUpdate(Wrapper):
    """Marks `transform` to act on the optimizer's update instead of the gradient: `cdgrad.attach(optimizer,
    OnUpdate(t))` is `cdgrad.attach_update(optimizer, t)`,

        w <- w_before + T(w_after - w_before)     for each parameter T selects.

    Applied to a tensor directly (`transform_`, `__call__`) it is the wrapped transform.  Its state is
    `{"type": "OnUpdate", "transform": <the wrapped state>}`; the wrapped transform's bare state loads too.
    """

    def __init__(self, transform: GradientTransform) -> None:
        if isinstance(transform, OnUpdate):
            raise ValueError("transform is already an OnUpdate; wrap the transform itself once")
        self.transform = check_transform(transform, "transform")

    def state_dict(self) -> dict[str, Any]:
        return {"type": "OnUpdate", "transform": self.transform.state_dict()}

    def prepare_load(self, state: Any) -> Commit:
        if isinstance(state, Mapping) and state.get("type") == type(self.transform).__name__ != "OnUpdate":
            return self.transform.prepare_load(state)  # the wrapped transform's own state
        return self.transform.prepare_load(state_fields(state, "OnUpdate", ("transform",))["transform"])

    def __repr__(self) -> str:
        return f"OnUpdate({self.transform!r})"


def on_update(transform: GradientTransform) -> OnUpdate:
    """`transform` acting on the optimizer's update instead of the gradient, once attached:
    `cdgrad.attach(opt, cdgrad.on_update(cdgrad.FixedSpatialScaling()))` (the SGS paper's "Adagrad*")."""
    return OnUpdate(transform)


def paper_convention(
    metric: str, lam: float, beta: float = 0.0, direction: str = "output", scope: str = "conv"
) -> Scaled:
    """The transform that reproduces the paper's published convention for `lam` (docs/guide.md table).

    - "h0": the paper's code (its Figure 3) uses `f + lam * fbar`, lam >= 0 (lam = 0 is SGD), which is
      `(1 + lam) * reweighted_h0(f, 1 + lam)`; `beta` adds `beta * f`.
    - "sobolev": the published code multiplies the Sobolev gradient by lam, and the training adds
      `beta * f`: `lam * sobolev(f, lam) + beta * f`, lam > 0.  (The published code's per-fiber constant
      offset, docs/guide.md 'Conventions', is a bug and is not reproduced.)  At the paper's lam = 1 both
      conventions agree.

    Always a `Scaled(ChannelDirected(...), factor)` (factor 1 multiplies nothing), so the states of any two
    settings load into each other.
    """
    metric = F.check_metric(metric)
    beta = check_real(beta, "beta")
    if metric == "h0":
        lam = check_nonnegative(lam, "lam")
        factor = 1.0 + lam
    else:
        lam = check_positive(lam, "lam")
        factor = lam
    metric_lam = factor if metric == "h0" else lam
    core = ChannelDirected(metric, lam=metric_lam, beta=beta / factor, direction=direction, scope=scope)
    return Scaled(core, factor)
