"""Gradient methods selectable by name: from a config to a transform attached to an optimizer.

    method      hyper-parameters (config fields)             what the optimizer receives
    none        -                                            f (plain SGD / Adam)
    h0          lam, beta, direction, scope, convention      fbar + (f - fbar)/lam  (+ beta f)      (eq. 8)
    sobolev     lam, beta, direction, scope, convention      periodic H1~ solve along the axis (+ beta f)
    ls          sigma, direction, scope                      (I - sigma L)^-1 f                  (Osher et al.)
    centralize  scope                                        f - mean over (I, H, W)               (Yong et al.)
    sgs         sgs_k, sgs_batches, sgs_every                G * f, G from input-feature MI       (SGS)
    opnorm      clip_norm, clip_every                        f; every clip_every steps (default 100) each
                                                             conv is projected to ||conv|| <= clip_norm
                                                             (default 1.0) at its input size

`convention='paper'` builds h0 / sobolev through `cdgrad.paper_convention`, the published code's
lambda. A hyper-parameter left at None takes the library's default; one given to a method that does
not use it is an error (`validate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cdgrad.experiments.config import RunConfig
    from cdgrad.transforms_base import GradientTransform


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    params: tuple[str, ...]
    directions: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "the ordinary gradient (baseline)", ()),
        Method(
            "h0",
            "re-weighted H0 channel-directed gradient",
            ("lam", "beta", "direction", "scope", "convention"),
            ("output", "input", "flat"),
        ),
        Method(
            "sobolev",
            "channel-directed Sobolev (H1~) gradient",
            ("lam", "beta", "direction", "scope", "convention"),
            ("output", "input", "flat"),
        ),
        Method(
            "ls",
            "Laplacian smoothing, rasterised (flat) or along the output axis",
            ("sigma", "direction", "scope"),
            ("flat", "output"),
        ),
        Method("centralize", "gradient centralisation", ("scope",)),
        Method("sgs", "spatial gradient scaling", ("sgs_k", "sgs_batches", "sgs_every")),
        Method("opnorm", "operator-norm clipping of conv layers", ("clip_norm", "clip_every")),
    )
}


def validate_method(config: RunConfig) -> None:
    """Raise ValueError when a hyper-parameter does not belong to the method or is out of range."""
    from cdgrad.experiments.config import METHOD_FIELDS

    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {config.method!r}")
    m = METHODS[config.method]
    for name in METHOD_FIELDS:
        if getattr(config, name) is not None and name not in m.params:
            takes = ", ".join(m.params) if m.params else "no hyper-parameters"
            raise ValueError(
                f"{name}={getattr(config, name)!r} is not a hyper-parameter of method {m.name!r} (it takes: {takes})"
            )
    if config.direction is not None and config.direction not in m.directions:
        raise ValueError(
            f"direction for method {m.name!r} must be one of {', '.join(m.directions)}; got {config.direction!r}"
        )
    positive = {
        "sigma": False,
        "sgs_k": True,
        "sgs_batches": True,
        "sgs_every": True,
        "clip_norm": True,
        "clip_every": True,
    }
    for name, strict in positive.items():
        value = getattr(config, name)
        if value is not None and (value <= 0 if strict else value < 0):
            raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}; got {value!r}")
    if config.method in ("h0", "sobolev", "ls", "centralize"):
        build_transform(config, nn.Identity())  # the library's own checks (lam, beta, sigma ranges)


def _kwargs(config: RunConfig, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(config, n) for n in names if getattr(config, n) is not None}


def build_transform(config: RunConfig, model: nn.Module) -> GradientTransform | None:
    """The gradient transform of `config.method` (None for methods that leave gradients alone)."""
    m = config.method
    if m in ("h0", "sobolev"):
        import cdgrad

        kw = _kwargs(config, ("lam", "beta", "direction", "scope"))
        if config.convention == "paper":
            return cdgrad.paper_convention(m, kw.pop("lam", 1.0), **kw)
        return cdgrad.ChannelDirected(metric=m, **kw)
    if m == "ls":
        import cdgrad

        return cdgrad.LaplacianSmoothing(**_kwargs(config, ("sigma", "direction", "scope")))
    if m == "centralize":
        import cdgrad

        return cdgrad.Centralize(**_kwargs(config, ("scope",)))
    if m == "sgs":
        from cdgrad.sgs import SpatialGradientScaling

        names = {"sgs_k": "k", "sgs_batches": "num_batches", "sgs_every": "every"}
        return SpatialGradientScaling(model, **{names[k]: v for k, v in _kwargs(config, tuple(names)).items()})
    return None


@dataclass
class AttachedMethod:
    """A method wired into an optimizer: per-epoch hook, checkpointable state, and removal."""

    transform: Any = None
    clipper: Any = None
    handles: list = dataclasses.field(default_factory=list)

    def begin_epoch(self, epoch: int) -> None:
        for obj in (self.transform, self.clipper):
            hook: Callable[[int], None] | None = getattr(obj, "begin_epoch", None)
            if hook is not None:
                hook(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: obj.state_dict()
            for name, obj in (("transform", self.transform), ("clipper", self.clipper))
            if obj is not None and hasattr(obj, "state_dict")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, obj in (("transform", self.transform), ("clipper", self.clipper)):
            if name in state:
                obj.load_state_dict(state[name])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach_method(
    config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, sample: torch.Tensor | None = None
) -> AttachedMethod:
    """Build `config.method` and hook it into `optimizer.step()`.

    `sample` is a small input batch: opnorm records each conv layer's input size from it.
    """
    transform = build_transform(config, model)
    out = AttachedMethod(transform=transform)
    if transform is not None:
        import cdgrad

        out.handles.append(cdgrad.attach(optimizer, transform))
    if config.method == "opnorm":
        from cdgrad.spectral import OperatorNormClipper, record_input_sizes

        if sample is None:
            raise ValueError("method 'opnorm' needs a sample input batch to record the conv input sizes")
        was_training = model.training
        model.eval()  # a forward pass in eval mode leaves BatchNorm statistics alone
        sizes = record_input_sizes(model, sample)
        model.train(was_training)
        out.clipper = OperatorNormClipper(
            model, sizes, max_norm=config.clip_norm or 1.0, every=config.clip_every or 100
        )
        out.handles.append(out.clipper.attach(optimizer))
    return out


def describe(config: RunConfig) -> str:
    """A short label of the method and its hyper-parameters, e.g. `h0 lam=2 (paper)`."""
    parts = [config.method]
    for name in METHODS[config.method].params:
        value = getattr(config, name)
        if value is not None and name != "convention":
            parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    if config.convention == "paper":
        parts.append("(paper)")
    return " ".join(parts)
