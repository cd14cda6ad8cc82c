"""The gradient methods, each declared once: its parameters and its builder (config -> what the optimizer uses).

    method      parameters (config fields)                   what the optimizer receives
    none        -                                            f (plain SGD / Adam)
    h0          lam, beta, direction, scope, convention      fbar + (f - fbar)/lam  (+ beta f)      (eq. 8)
    sobolev     lam, beta, direction, scope, convention      periodic H1~ solve along the axis (+ beta f)
    ls          sigma, direction, scope                      (I - sigma L)^-1 f                  (Osher et al.)
    centralize  scope                                        f - mean over (I, H, W)               (Yong et al.)
    sgs         sgs_k, sgs_batches, sgs_every, sgs_warmup,   G * f, G from input-feature MI       (SGS)
                sgs_dependence, sgs_pipeline, sgs_on         (sgs_on=update: G * the optimizer's update)
    sgs-fixed   sgs_edge, sgs_corner, sgs_on                 G * f, G fixed by two ratios (the paper's grid)
    acb, repvgg, dbb   -                                     f, on a network whose conv + BN pairs are
                                                             multi-branch blocks (cdgrad.reparam)
    opnorm      clip_norm, clip_every, clip_projection       f; every clip_every steps each conv is projected
                                                             to ||conv|| <= clip_norm at its input size

Every parameter is declared once in `PARAMS` (type, help, accepted range or choices, default); a method lists
the ones it takes, narrowing choices or changing the default where it differs (`Param.but`). `RunConfig` has
one field per parameter (None = the method's default), and its help, validation, `describe` labels and the
report order all read this registry. `convention='paper'` builds h0 / sobolev through
`cdgrad.paper_convention`, the published code's lambda. A parameter given to a method that does not take it
is an error (`validate_method`).

Adding a method is one `register_method(Method(...))` call, plus one `RunConfig` field line per new parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cdgrad.experiments.registry import Param, Registry
from cdgrad.spectral import PROJECTIONS

if TYPE_CHECKING:
    from cdgrad.experiments.config import RunConfig
    from cdgrad.spectral import OperatorNormClipper
    from cdgrad.transforms_base import GradientTransform

__all__ = [
    "METHODS",
    "PARAMS",
    "AttachedMethod",
    "Built",
    "Method",
    "attach_method",
    "build_method",
    "build_transform",
    "describe",
    "method_listing",
    "method_values",
    "register_method",
    "validate_method",
]

# ------------------------------------------------------------------------------------------------ parameters

PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            name="lam",
            type=float,
            default=1.0,
            minimum=0.0,
            help="lambda of h0 / sobolev (> 0 in the exact convention)",
        ),
        Param(name="beta", type=float, default=0.0, help="h0 / sobolev: add beta times the ordinary gradient"),
        Param(name="sigma", type=float, default=1.0, minimum=0.0, help="sigma of Laplacian smoothing (ls)"),
        Param(
            name="direction",
            type=str,
            choices=("output", "input", "flat"),
            help="axis to smooth along: output, input or flat (h0/sobolev); flat or output (ls)",
        ),
        Param(name="scope", type=str, choices=("conv", "all"), help="which weights: conv (3+ dims) or all"),
        Param(
            name="convention",
            type=str,
            default="exact",
            choices=("exact", "paper"),
            help="lambda convention of h0 / sobolev: 'exact' (docs/math.md 1.1-1.2, the default) "
            "or 'paper' (the published code, via cdgrad.paper_convention)",
        ),
        Param(
            name="sgs_k",
            type=float,
            default=5.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="spatial gradient scaling: strength k",
        ),
        Param(
            name="sgs_batches", type=int, default=2, minimum=1, help="spatial gradient scaling: batches per estimate"
        ),
        Param(
            name="sgs_every", type=int, default=5, minimum=1, help="spatial gradient scaling: epochs between estimates"
        ),
        Param(
            name="sgs_pipeline",
            type=str,
            default="cdgrad",
            choices=("cdgrad", "authors"),
            help="spatial gradient scaling: 'cdgrad' (training-mode capture, channel mean then k-transform) or "
            "'authors' (the authors' code: eval-mode capture of padded inputs, k-transform per channel)",
        ),
        Param(
            name="sgs_dependence",
            type=str,
            default="mi",
            choices=("mi", "autocorr"),
            help="spatial gradient scaling: dependence measure, normalised mutual information or autocorrelation",
        ),
        Param(
            name="sgs_warmup",
            type=int,
            default=0,
            minimum=0,
            help="spatial gradient scaling: epochs of plain gradients before the first estimate",
        ),
        Param(
            name="sgs_on",
            type=str,
            default="gradient",
            choices=("gradient", "update"),
            help="spatial gradient scaling: scale the gradient (before the optimizer) or the optimizer's update "
            "(after it: the paper's post-optimizer variant, 'Adagrad*')",
        ),
        Param(
            name="sgs_edge",
            type=float,
            default=2.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="fixed spatial scaling: ratio of the centre tap to the other taps of the centre row and column",
        ),
        Param(
            name="sgs_corner",
            type=float,
            default=4.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="fixed spatial scaling: ratio of the centre tap to the corner taps",
        ),
        Param(
            name="clip_norm",
            type=float,
            default=1.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="opnorm: operator-norm bound of each conv layer",
        ),
        Param(name="clip_every", type=int, default=100, minimum=1, help="opnorm: optimizer steps between projections"),
        Param(
            name="clip_projection",
            type=str,
            default="exact",
            choices=tuple(PROJECTIONS),
            help="opnorm: 'exact' (clip every frequency's singular values, Sedghi et al.), 'reshaped' (clip the "
            "O x (I kh kw) reshaped kernel, Yoshida & Miyato) or 'gram' (rescale under the Gram-iteration bound)",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Built:
    """What a method puts into training: a gradient transform (`cdgrad.attach`ed to the optimizer) and/or a
    clipper (attached with its own `attach(optimizer)`), either may be None."""

    transform: GradientTransform | None = None
    clipper: OperatorNormClipper | None = None
    on_update: bool = False  # the transform acts on the optimizer's update (cdgrad.attach_update), not the gradient


# build(values, model, sample) -> Built; `values` maps each of the method's parameters to its resolved value
# (the config's, or the declared default when unset). `sample` is a small normalised input batch or None.
Builder = Callable[[dict[str, Any], nn.Module, "torch.Tensor | None"], Built]


@dataclass(frozen=True)
class Method:
    """A gradient method: its name, a one-line summary, the update in words, its parameters and its builder.

    `order`: the parameters whose values order a method's rows in reports (after the method itself); the
    declared parameters by default. `check`: extra validation of the resolved values (the library's own
    argument checks), run by `validate_method`.
    """

    name: str
    summary: str
    update: str
    params: tuple[Param, ...]
    build: Builder
    order: tuple[str, ...] | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    # a method that changes the network (structural re-parameterisation) rebuilds it here, in place, before
    # the optimizer is created
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
    """Declare a gradient method; `RunConfig(method=method.name)` accepts it from then on.

    A parameter not yet in `PARAMS` is declared by the method that brings it, and needs its own `RunConfig`
    field (`lam: float | None = method_param("lam")`); the toolkit's own methods are registered before
    `RunConfig` is defined, a later method must only use parameters that have a field.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method, got {type(method).__name__}")
    if not builtin:
        from cdgrad.experiments.config import FIELDS

        missing = [p.name for p in method.params if p.name not in FIELDS or not FIELDS[p.name].metadata["method"]]
        if missing:
            raise ValueError(f"method {method.name!r}: parameter(s) {missing} have no RunConfig field")
    for p in method.params:
        PARAMS.setdefault(p.name, p)
    return METHODS.register(method.name, method, builtin=builtin)


def _channel_directed(metric: str) -> Builder:
    def build(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
        import cdgrad

        kw = {"beta": v["beta"], "direction": v["direction"], "scope": v["scope"]}
        if v["convention"] == "paper":
            return Built(transform=cdgrad.paper_convention(metric, v["lam"], **kw))
        return Built(transform=cdgrad.ChannelDirected(metric=metric, lam=v["lam"], **kw))

    return build


def _laplacian(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
    import cdgrad

    return Built(transform=cdgrad.LaplacianSmoothing(sigma=v["sigma"], direction=v["direction"], scope=v["scope"]))


def _centralize(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
    import cdgrad

    return Built(transform=cdgrad.Centralize(scope=v["scope"]))


def _sgs(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
    from cdgrad.sgs import SpatialGradientScaling

    return Built(
        transform=SpatialGradientScaling(
            model,
            k=v["sgs_k"],
            num_batches=v["sgs_batches"],
            every=v["sgs_every"],
            method=v["sgs_dependence"],
            pipeline=v["sgs_pipeline"],
            warmup=v["sgs_warmup"],
        ),
        on_update=v["sgs_on"] == "update",
    )


def _sgs_fixed(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
    from cdgrad.sgs import FixedSpatialScaling

    return Built(transform=FixedSpatialScaling(v["sgs_edge"], v["sgs_corner"]), on_update=v["sgs_on"] == "update")


def _opnorm(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
    from cdgrad.spectral import OperatorNormClipper, record_input_sizes

    if sample is None:
        raise ValueError("method 'opnorm' needs a sample input batch to record the conv input sizes")
    was_training = model.training
    model.eval()  # a forward pass in eval mode leaves BatchNorm statistics alone
    sizes = record_input_sizes(model, sample)
    model.train(was_training)
    clipper = OperatorNormClipper(
        model, sizes, max_norm=v["clip_norm"], every=v["clip_every"], projection=v["clip_projection"]
    )
    return Built(clipper=clipper)


def _none(v: dict[str, Any], model: nn.Module, sample: torch.Tensor | None) -> Built:
    return Built()


def _reparameterizer(kind: str) -> Callable[[nn.Module], None]:
    def reshape(model: nn.Module) -> None:
        from cdgrad.reparam import reparameterize

        reparameterize(model, kind)

    return reshape


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
    *(Method(name, summary, update, (), _none, reshape=_reparameterizer(name)) for name, summary, update in _REPARAM),
):
    register_method(_method, builtin=True)


# ------------------------------------------------------------------------------------------------ validation


def method_values(config: RunConfig) -> dict[str, Any]:
    """The method's parameters with their values: the config's, or the declared default where unset."""
    m = METHODS.get(config.method)
    return {p.name: p.resolve(getattr(config, p.name)) for p in m.params}


def validate_method(config: RunConfig) -> None:
    """Raise ValueError when a parameter does not belong to the method or is outside the method's range."""
    m = METHODS.get(config.method)
    for name in PARAMS:
        if getattr(config, name) is not None and name not in m.param_names:
            takes = ", ".join(m.param_names) if m.params else "no hyper-parameters"
            raise ValueError(
                f"{name}={getattr(config, name)!r} is not a hyper-parameter of method {m.name!r} (it takes: {takes})"
            )
    for p in m.params:
        value = getattr(config, p.name)
        if value is not None:
            p.check(value, p.name if p.choices == PARAMS[p.name].choices else f"{p.name} for method {m.name!r}", p.type)
    if m.check is not None:
        m.check(method_values(config))


# -------------------------------------------------------------------------------------------------- building


def reshape_model(config: RunConfig, model: nn.Module) -> nn.Module:
    """`model` rebuilt in place by `config.method` when the method changes the network (acb, repvgg, dbb)."""
    reshape = METHODS.get(config.method).reshape
    if reshape is not None:
        reshape(model)
    return model


def build_method(config: RunConfig, model: nn.Module, sample: torch.Tensor | None = None) -> Built:
    """The transform and/or clipper of `config.method` for `model` (not yet attached)."""
    return METHODS.get(config.method).build(method_values(config), model, sample)


def build_transform(config: RunConfig, model: nn.Module) -> GradientTransform | None:
    """The gradient transform of `config.method` (None for methods that leave gradients alone)."""
    m = METHODS.get(config.method)
    if m.name == "opnorm":
        return None
    return m.build(method_values(config), model, None).transform


@dataclass
class AttachedMethod:
    """A method wired into an optimizer: per-epoch hook, checkpointable state, and removal."""

    transform: GradientTransform | None = None
    clipper: OperatorNormClipper | None = None
    handles: list[Any] = field(default_factory=list)

    def begin_epoch(self, epoch: int, batches: Callable[[int], list[torch.Tensor]] | None = None) -> None:
        """The transform's epoch hook; a transform that measures in eval mode (SGS with the authors' pipeline)
        measures now on `batches(n)`, n input batches drawn for it, when it is due."""
        if self.transform is None:
            return
        self.transform.begin_epoch(epoch)
        from cdgrad.sgs import SpatialGradientScaling

        sgs = self.transform
        if isinstance(sgs, SpatialGradientScaling) and sgs.config()["pipeline"] == "authors" and sgs.due(epoch):
            if batches is None:
                raise ValueError("this method measures in eval mode at the start of an epoch: pass batches=")
            sgs.measure(batches(sgs.config()["num_batches"]))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.transform is not None:
            out["transform"] = self.transform.state_dict()
        if self.clipper is not None:
            out["clipper"] = self.clipper.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "transform" in state and self.transform is not None:
            self.transform.load_state_dict(state["transform"])
        if "clipper" in state and self.clipper is not None:
            self.clipper.load_state_dict(state["clipper"])

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
    built = build_method(config, model, sample)
    out = AttachedMethod(transform=built.transform, clipper=built.clipper)
    if built.transform is not None:
        import cdgrad

        attach = cdgrad.attach_update if built.on_update else cdgrad.attach
        out.handles.append(attach(optimizer, built.transform))
    if built.clipper is not None:
        out.handles.append(built.clipper.attach(optimizer))
    return out


# ---------------------------------------------------------------------------------------------------- labels


def describe(config: RunConfig, omit: tuple[str, ...] = ()) -> str:
    """A short label of the method and the parameters set in `config`, e.g. `h0 lam=2 (paper)`.

    Parameters left unset are not shown; `convention='paper'` is written `(paper)`. `omit` leaves out the
    named parameters (a plot against lambda labels its lines without `lam`).
    """
    parts = [config.method]
    for name in METHODS.get(config.method).param_names:
        value = getattr(config, name)
        if value is not None and name != "convention" and name not in omit:
            parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    if getattr(config, "convention", None) == "paper" and "convention" not in omit:
        parts.append("(paper)")
    return " ".join(parts)


def sort_key(config: RunConfig) -> tuple[Any, ...]:
    """Report order: methods in registration order, then each method's `order` parameters (unset first)."""
    m = METHODS.get(config.method)
    key: list[Any] = [METHODS.index(m.name)]
    for name in m.sort_params:
        value = getattr(config, name)
        key.append((0, 0.0 if m.param(name).type is not str else "") if value is None else (1, value))
    return tuple(key)


def defaults_text(name: str) -> str:
    """The defaults of parameter `name` across the methods that take it, e.g. `output (h0, sobolev), flat (ls)`."""
    by_default: dict[str, list[str]] = {}
    for m in METHODS.values():
        if name in m.param_names:
            d = m.param(name).default
            by_default.setdefault(f"{d:g}" if isinstance(d, float) else str(d), []).append(m.name)
    return ", ".join(f"{d} ({', '.join(ms)})" for d, ms in by_default.items())


def param_text(p: Param) -> str:
    """A parameter in one line: type, accepted values, default and help."""
    accepted = "|".join(p.accepted_choices() or ()) or f"{p.type.__name__} {p.range_text()}".strip()
    default = f"{p.default:g}" if isinstance(p.default, float) else str(p.default)
    return f"{p.name:12s} {accepted}, default {default}: {p.help}"


def method_listing() -> str:
    """Every registered method with its update and parameters (`cdgrad list --methods`)."""
    lines = []
    for m in METHODS.values():
        lines.append(f"{m.name:11s} {m.summary}")
        lines.append(f"{'':11s} update: {m.update}")
        lines += [f"{'':11s} {param_text(p)}" for p in m.params]
    return "\n".join(lines)
