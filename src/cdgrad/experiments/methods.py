"""The gradient methods, each declared once: its parameters and its builder (arguments, model -> one transform).

Every parameter is declared once in `PARAMS` (type, help, accepted range or choices, default); a method lists the
ones it takes, narrowing choices or changing the default where it differs (`Param.but`). A run's configuration
carries the method's own arguments as one mapping (`RunConfig.method_args`), validated here against the method's
declared parameters (`validate_method`); the command line, `describe` labels, the report order and the method table
(`method_table`, `cdgrad list --methods`) are generated from this registry.

A method's builder returns one object, a `cdgrad.GradientTransform` (or None: the ordinary gradient), which the
training loop attaches with `cdgrad.attach` and checkpoints with its `state_dict`: what the method measures at the
start of an epoch (SGS), does after each step (operator-norm projection) or applies to the optimizer's update
(`cdgrad.OnUpdate`) is the transform's own work. A method that rebuilds the network (structural
re-parameterisation) does so in `reshape`, before the optimizer exists; `check_config` rejects settings the method
cannot run under, naming them.

Adding a method is one `register_method(Method(...))` call (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import cdgrad
from cdgrad.experiments.method_params import PARAMS
from cdgrad.experiments.models import models_taking
from cdgrad.experiments.registry import Param, Registry

if TYPE_CHECKING:
    from cdgrad.transforms_base import GradientTransform

__all__ = [
    "METHODS",
    "PARAMS",
    "Method",
    "build_method",
    "describe",
    "method_listing",
    "method_table",
    "method_values",
    "register_method",
    "unregister_method",
    "reshape_model",
    "validate_method",
]

# ---------------------------------------------------------------------------------------------------- methods

# build(values, model, sample) -> the transform the optimizer is attached to (None: the ordinary gradient).
# `values` maps each of the method's parameters to its resolved value (the run's argument, or the declared
# default). `sample` is a small input batch of `model` (the transform may record input sizes from it) or None.
Builder = Callable[[dict[str, Any], nn.Module, "torch.Tensor | None"], "GradientTransform | None"]


@dataclass(frozen=True)
class Method:
    """A gradient method: its name, a one-line summary, the update in words, its parameters and its builder.

    `order`: the parameters whose values order a method's rows in reports (after the method itself); the declared
    parameters by default. `check`: extra validation of the resolved values (the library's own argument checks).
    `check_config`: raises ValueError for a run configuration the method cannot train (a model it cannot change).
    `reshape`: rebuilds the network in place before the optimizer is created (structural re-parameterisation).
    """

    name: str
    summary: str
    update: str
    params: tuple[Param, ...]
    build: Builder
    order: tuple[str, ...] | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    check_config: Callable[[Any], None] | None = None
    reshape: Callable[[nn.Module], None] | None = None
    param_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_names", tuple(p.name for p in self.params))
        for p in self.params:
            shared = PARAMS.get(p.name)
            if shared is not None and shared.type is not p.type:
                raise ValueError(
                    f"method {self.name!r}: parameter {p.name!r} must have the type declared in PARAMS "
                    f"({shared.type.__name__}), got {p.type.__name__}"
                )
        if self.order is not None and not set(self.order) <= set(self.param_names):
            raise ValueError(f"method {self.name!r}: order {self.order} names parameters it does not take")

    @property
    def sort_params(self) -> tuple[str, ...]:
        return self.order if self.order is not None else self.param_names

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method, *, builtin: bool = False) -> Method:
    """Declare a gradient method; `RunConfig(method=method.name)` accepts it from then on, and its parameters are
    command-line options (`--name`) and `method_args` keys. A parameter new to `PARAMS` is declared with it."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method, got {type(method).__name__}")
    entry = METHODS.register(method.name, method, builtin=builtin)
    for p in method.params:
        PARAMS.setdefault(p.name, p)
    return entry


def unregister_method(name: str) -> None:
    """Remove a method registered with `register_method` (not a built-in), and the parameters only it declared."""
    METHODS.unregister(name)
    used = {p.name for m in METHODS.values() for p in m.params}
    for key in [k for k in PARAMS if k not in used]:
        del PARAMS[key]


def _channel_directed(metric: str) -> Builder:
    def build(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> GradientTransform:
        kw = {"beta": v["beta"], "direction": v["direction"], "scope": v["scope"]}
        if v["convention"] == "paper":
            return cdgrad.paper_convention(metric, v["lam"], **kw)
        return cdgrad.ChannelDirected(metric=metric, lam=v["lam"], **kw)

    return build


def _laplacian(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> GradientTransform:
    return cdgrad.LaplacianSmoothing(sigma=v["sigma"], direction=v["direction"], scope=v["scope"])


def _centralize(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> GradientTransform:
    return cdgrad.Centralize(scope=v["scope"])


def _on(target: str, transform: GradientTransform) -> GradientTransform:
    """`transform` applied to the gradient, or to the optimizer's update (`cdgrad.OnUpdate`)."""
    return cdgrad.OnUpdate(transform) if target == "update" else transform


def _sgs(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> GradientTransform:
    transform = cdgrad.SpatialGradientScaling(
        model,
        k=v["sgs_k"],
        num_batches=v["sgs_batches"],
        every=v["sgs_every"],
        method=v["sgs_dependence"],
        pipeline=v["sgs_pipeline"],
        warmup=v["sgs_warmup"],
    )
    return _on(v["sgs_on"], transform)


def _sgs_fixed(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> GradientTransform:
    return _on(v["sgs_on"], cdgrad.FixedSpatialScaling(v["sgs_edge"], v["sgs_corner"]))


def _opnorm(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> GradientTransform:
    from cdgrad.spectral import OperatorNormClipper, record_input_sizes

    if sample is None:
        raise ValueError("method 'opnorm' needs a sample input batch to record the conv input sizes")
    was_training = model.training
    model.eval()  # a forward pass in eval mode leaves BatchNorm statistics alone
    sizes = record_input_sizes(model, sample)
    model.train(was_training)
    return OperatorNormClipper(
        model, sizes, max_norm=v["clip_norm"], every=v["clip_every"], projection=v["clip_projection"]
    )


def _none(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> None:
    return None


def _reparameterizer(kind: str) -> Callable[[nn.Module], None]:
    def reshape(model: nn.Module) -> None:
        from cdgrad.reparam import reparameterize

        reparameterize(model, kind)

    return reshape


def _needs_batchnorm(name: str) -> Callable[[Any], None]:
    """The check of a re-parameterising method: conv + BatchNorm pairs that torch.fx can find, i.e. a network
    with the batch-norm option (and the option on)."""

    def check(config: Any) -> None:
        with_option = models_taking("batchnorm")
        if config.model not in with_option or not config.batchnorm:
            raise ValueError(
                f"method {name!r} re-parameterises conv + BatchNorm pairs: it needs batchnorm=True and a model "
                f"with batch norm; accepted models: {', '.join(with_option)}"
            )

    return check


_REPARAM = (
    ("acb", "ACNet asymmetric convolution blocks", "k x k + 1 x k + k x 1 branches with BNs, merged after training"),
    ("repvgg", "RepVGG blocks", "k x k + 1 x 1 (+ identity) branches with BNs, merged after training"),
    ("dbb", "Diverse Branch Blocks", "k x k, 1 x 1, 1 x 1 -> k x k, 1 x 1 -> avg-pool branches with BNs, merged"),
)


def _library_check(build: Builder) -> Callable[[dict[str, Any]], None]:
    """Validation by the library itself: build the transform for a parameterless model."""

    def check(v: dict[str, Any]) -> None:
        build(v, nn.Identity(), None)

    return check


_CD_PARAMS = (
    PARAMS["lam"],
    PARAMS["beta"],
    PARAMS["direction"].but(default="output"),
    PARAMS["scope"].but(default="conv"),
    PARAMS["convention"],
)
_CD_ORDER = ("direction", "convention", "beta", "lam")


def _channel_directed_method(metric: str, summary: str, formula: str) -> Method:
    """h0 and sobolev: the same parameters, order and builder, for their metric."""
    build = _channel_directed(metric)
    return Method(metric, summary, formula, _CD_PARAMS, build, order=_CD_ORDER, check=_library_check(build))


for _method in (
    Method("none", "the ordinary gradient (baseline)", "f", (), _none),
    _channel_directed_method(
        "h0",
        "re-weighted H0 channel-directed gradient",
        "fbar + (f - fbar)/lam (+ beta f); paper convention f + lam fbar",
    ),
    _channel_directed_method(
        "sobolev", "channel-directed Sobolev (H1~) gradient", "the periodic H1~ solve along the axis (+ beta f)"
    ),
    Method(
        "ls",
        "Laplacian smoothing, rasterised (flat) or along the output axis",
        "(I - sigma L)^-1 f",
        (
            PARAMS["sigma"],
            PARAMS["direction"].but(choices=("flat", "output"), default="flat"),
            PARAMS["scope"].but(default="all"),
        ),
        _laplacian,
        order=("direction", "sigma"),
        check=_library_check(_laplacian),
    ),
    Method(
        "centralize",
        "gradient centralisation",
        "f - mean over (I, kh, kw)",
        (PARAMS["scope"].but(default="conv"),),
        _centralize,
        order=(),
        check=_library_check(_centralize),
    ),
    Method(
        "sgs",
        "spatial gradient scaling",
        "G * f, G from the mutual information of input features",
        tuple(
            PARAMS[n]
            for n in ("sgs_k", "sgs_batches", "sgs_every", "sgs_warmup", "sgs_dependence", "sgs_pipeline", "sgs_on")
        ),
        _sgs,
        order=(),
    ),
    Method(
        "sgs-fixed",
        "fixed spatial gradient scaling",
        "G * f, G fixed: centre / edge = sgs_edge, centre / corner = sgs_corner, mean 1",
        (PARAMS["sgs_edge"], PARAMS["sgs_corner"], PARAMS["sgs_on"]),
        _sgs_fixed,
        order=("sgs_edge", "sgs_corner"),
    ),
    Method(
        "opnorm",
        "operator-norm clipping of conv layers",
        "f; every clip_every steps each conv is projected to operator norm <= clip_norm",
        (PARAMS["clip_norm"], PARAMS["clip_every"], PARAMS["clip_projection"]),
        _opnorm,
        order=(),
    ),
    *(
        Method(name, summary, update, (), _none, reshape=_reparameterizer(name), check_config=_needs_batchnorm(name))
        for name, summary, update in _REPARAM
    ),
):
    register_method(_method, builtin=True)


# ------------------------------------------------------------------------------------------------ validation


def method_values(config: Any) -> dict[str, Any]:
    """The method's parameters with their values: the run's `method_args`, or the declared default where unset."""
    m = METHODS.get(config.method)
    args: Mapping[str, Any] = config.method_args
    return {p.name: p.resolve(args.get(p.name)) for p in m.params}


def validate_method(config: Any) -> None:
    """Raise ValueError when an argument does not belong to the method or is outside the method's range, or when
    the method cannot train this configuration."""
    m = METHODS.get(config.method)
    for name, value in config.method_args.items():
        if name not in m.param_names:
            takes = ", ".join(m.param_names) if m.params else "no hyper-parameters"
            raise ValueError(f"{name}={value!r} is not a hyper-parameter of method {m.name!r} (it takes: {takes})")
        p = m.param(name)
        if value is not None:
            shared = PARAMS.get(name)
            label = name if shared is None or p.choices == shared.choices else f"{name} for method {m.name!r}"
            p.check(value, label, p.type)
    if m.check is not None:
        m.check(method_values(config))
    if m.check_config is not None:
        m.check_config(config)


# -------------------------------------------------------------------------------------------------- building


def reshape_model(config: Any, model: nn.Module) -> nn.Module:
    """`model`, rebuilt in place by `config.method` when the method changes the network."""
    reshape = METHODS.get(config.method).reshape
    if reshape is not None:
        reshape(model)
    return model


def build_method(config: Any, model: nn.Module, sample: torch.Tensor | None = None) -> GradientTransform | None:
    """The transform of `config.method` for `model` (not yet attached; None: the ordinary gradient)."""
    return METHODS.get(config.method).build(method_values(config), model, sample)


# ---------------------------------------------------------------------------------------------------- labels


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(config: Any, omit: tuple[str, ...] = ()) -> str:
    """A short label of the method and the arguments set in `config`, e.g. `h0 lam=2 (paper)`.

    Arguments left unset are not shown; `convention='paper'` is written `(paper)`. `omit` leaves out the named
    parameters (a plot against lambda labels its lines without `lam`).
    """
    parts = [config.method]
    args: Mapping[str, Any] = config.method_args
    for name in METHODS.get(config.method).param_names:
        value = args.get(name)
        if value is not None and name != "convention" and name not in omit:
            parts.append(f"{name}={_text(value)}")
    if args.get("convention") == "paper" and "convention" not in omit:
        parts.append("(paper)")
    return " ".join(parts)


def sort_key(config: Any) -> tuple[Any, ...]:
    """Report order: methods in registration order, then each method's `order` parameters (unset first)."""
    m = METHODS.get(config.method)
    key: list[Any] = [METHODS.index(m.name)]
    for name in m.sort_params:
        value = config.method_args.get(name)
        key.append((0, 0.0 if m.param(name).type is not str else "") if value is None else (1, value))
    return tuple(key)


def defaults_text(name: str) -> str:
    """The defaults of parameter `name` across the methods that take it, e.g. `output (h0, sobolev), flat (ls)`."""
    by_default: dict[str, list[str]] = {}
    for m in METHODS.values():
        if name in m.param_names:
            by_default.setdefault(_text(m.param(name).default), []).append(m.name)
    return ", ".join(f"{d} ({', '.join(ms)})" for d, ms in by_default.items())


def accepted_text(p: Param, sep: str = "|") -> str:
    """The values a parameter accepts, e.g. `exact|paper`, `float > 0`."""
    return sep.join(p.accepted_choices() or ()) or f"{p.type.__name__} {p.range_text()}".strip()


def param_text(p: Param) -> str:
    """A parameter in one line: type, accepted values, default and help."""
    return f"{p.name:12s} {accepted_text(p)}, default {_text(p.default)}: {p.help}"


def method_listing() -> str:
    """Every registered method with its update and parameters (`cdgrad list --methods`)."""
    lines = []
    for m in METHODS.values():
        lines.append(f"{m.name:11s} {m.summary}")
        lines.append(f"{'':11s} update: {m.update}")
        lines += [f"{'':11s} {param_text(p)}" for p in m.params]
    return "\n".join(lines)


def method_table() -> str:
    """The methods as a Markdown table (method, parameters with accepted values and defaults, what the optimizer
    receives): the table docs/experiments.md shows (`cdgrad list --methods --markdown`)."""
    lines = ["| method | parameters (accepted values, default) | update given to the optimizer |", "|---|---|---|"]
    for m in METHODS.values():
        params = "; ".join(f"`{p.name}` ({accepted_text(p, ' / ')}, {_text(p.default)})" for p in m.params) or "-"
        lines.append(f"| `{m.name}` | {params} | {m.summary}: {m.update} |")
    return "\n".join(lines)
