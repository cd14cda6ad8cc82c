"""The method registry: declarations, labels, report order, builders against the library, registration."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cdgrad
from cdgrad.experiments import methods as M
from cdgrad.experiments.checks import validate
from cdgrad.experiments.config import RunConfig, from_dict
from cdgrad.experiments.registry import Param
from cdgrad.sgs import SpatialGradientScaling
from cdgrad.spectral import OperatorNormClipper


@pytest.mark.parametrize(
    "changes, label",
    [
        ({}, "none"),
        ({"method": "h0", "lam": 2.0, "convention": "paper"}, "h0 lam=2 (paper)"),
        ({"method": "sobolev", "lam": 10.0, "beta": 1.0, "convention": "paper"}, "sobolev lam=10 beta=1 (paper)"),
        ({"method": "sobolev", "lam": 0.5, "direction": "input"}, "sobolev lam=0.5 direction=input"),
        ({"method": "h0", "convention": "exact"}, "h0"),
        ({"method": "ls", "sigma": 0.5, "direction": "flat", "scope": "all"}, "ls sigma=0.5 direction=flat scope=all"),
        ({"method": "centralize", "scope": "conv"}, "centralize scope=conv"),
        ({"method": "sgs", "sgs_k": 3.0, "sgs_every": 2}, "sgs sgs_k=3 sgs_every=2"),
        ({"method": "opnorm", "clip_norm": 0.5, "clip_every": 3}, "opnorm clip_norm=0.5 clip_every=3"),
    ],
)
def test_describe_labels(changes, label):
    assert M.describe(RunConfig(**changes)) == label


def test_describe_can_omit_parameters():
    c = RunConfig(method="sobolev", lam=5.0, beta=1.0, convention="paper")
    assert M.describe(c, omit=("lam",)) == "sobolev beta=1 (paper)"
    assert M.describe(c, omit=("lam", "convention")) == "sobolev beta=1"


LEGACY_METHODS = ["none", "h0", "sobolev", "ls", "centralize", "sgs", "opnorm"]


def legacy_order(c: RunConfig) -> tuple:
    """The report order before the registry: method, then direction, convention, beta, lam, sigma."""
    return (
        LEGACY_METHODS.index(c.method),
        c.arg("direction") or "",
        c.arg("convention") or "",
        c.arg("beta") or 0.0,
        c.arg("lam") if c.arg("lam") is not None else -1.0,
        c.arg("sigma") or 0.0,
    )


def test_report_order_is_the_legacy_one():
    from cdgrad.experiments.presets import PRESETS

    # the methods that existed before the registry (later ones have no legacy order to keep)
    configs = {M.describe(c): c for p in PRESETS.values() for c, _ in p.runs() if c.method in LEGACY_METHODS}
    configs.update(
        {
            M.describe(c): c
            for c in (
                RunConfig(method="ls", sigma=2.0),
                RunConfig(method="ls", sigma=0.5, direction="output"),
                RunConfig(method="sgs"),
                RunConfig(method="opnorm", clip_norm=2.0),
                RunConfig(method="centralize"),
                RunConfig(method="h0", lam=0.5),
            )
        }
    )
    unique = list(configs.values())
    assert len(unique) > 30
    for seed in range(5):
        random.Random(seed).shuffle(unique)
        assert [M.describe(c) for c in sorted(unique, key=M.sort_key)] == [
            M.describe(c) for c in sorted(unique, key=legacy_order)
        ]


def test_declared_defaults_are_the_librarys():
    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    cd = defaults(cdgrad.ChannelDirected)
    for name in ("h0", "sobolev"):
        m = M.METHODS[name]
        assert {p: m.param(p).default for p in ("lam", "beta", "direction", "scope")} == {
            k: cd[k] for k in ("lam", "beta", "direction", "scope")
        }
    pc = defaults(cdgrad.paper_convention)
    assert {k: pc[k] for k in ("beta", "direction", "scope")} == {
        p: M.METHODS["h0"].param(p).default for p in ("beta", "direction", "scope")
    }
    ls = defaults(cdgrad.LaplacianSmoothing)
    assert {p.name: p.default for p in M.METHODS["ls"].params} == ls
    assert {p.name: p.default for p in M.METHODS["centralize"].params} == defaults(cdgrad.Centralize)
    sgs = defaults(SpatialGradientScaling)
    declared = {p.name: p.default for p in M.METHODS["sgs"].params}
    assert (sgs["k"], sgs["num_batches"], sgs["every"], sgs["pipeline"], sgs["warmup"], sgs["method"]) == (
        declared["sgs_k"],
        declared["sgs_batches"],
        declared["sgs_every"],
        declared["sgs_pipeline"],
        declared["sgs_warmup"],
        declared["sgs_dependence"],
    )
    fixed = defaults(cdgrad.FixedSpatialScaling)
    assert (fixed["edge"], fixed["corner"]) == tuple(
        M.METHODS["sgs-fixed"].param(p).default for p in ("sgs_edge", "sgs_corner")
    )
    assert defaults(OperatorNormClipper)["every"] == M.METHODS["opnorm"].param("clip_every").default


# --------------------------------------------------------------------------------------------------- builders


def legacy_transform(c: RunConfig, model: nn.Module):
    """The transform as the toolkit built it before the registry: only the parameters set are passed."""
    kw = {n: c.arg(n) for n in ("lam", "beta", "direction", "scope", "sigma") if c.arg(n) is not None}
    if c.method in ("h0", "sobolev"):
        kw.pop("sigma", None)
        if c.arg("convention") == "paper":
            return cdgrad.paper_convention(c.method, kw.pop("lam", 1.0), **kw)
        return cdgrad.ChannelDirected(metric=c.method, **kw)
    if c.method == "ls":
        return cdgrad.LaplacianSmoothing(**{k: v for k, v in kw.items() if k in ("sigma", "direction", "scope")})
    if c.method == "centralize":
        return cdgrad.Centralize(**{k: v for k, v in kw.items() if k == "scope"})
    return None


@st.composite
def transform_configs(draw):
    method = draw(st.sampled_from(["h0", "sobolev", "ls", "centralize"]))
    values: dict = {"method": method}
    m = M.METHODS[method]
    for p in m.params:
        if not draw(st.booleans()):
            continue
        if p.choices is not None:
            values[p.name] = draw(st.sampled_from(p.accepted_choices()))
        elif p.name == "lam":
            values[p.name] = draw(st.floats(0.1, 20.0))
        else:
            values[p.name] = draw(st.floats(0.0, 3.0))
    return from_dict(values)


@settings(max_examples=60, deadline=None)
@given(transform_configs(), st.integers(0, 2**16))
def test_built_transforms_compute_what_the_library_computes(config, seed):
    validate(config)
    built = M.build_method(config, nn.Identity())
    ref = legacy_transform(config, nn.Identity())
    assert type(built) is type(ref)
    g = torch.Generator().manual_seed(seed)
    for shape in ((6, 4, 3, 3), (5, 7)):
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        param = torch.zeros(shape, dtype=torch.float64)
        if built.select(param):
            assert torch.equal(built(grad, param), ref(grad, param))
        else:
            assert not ref.select(param)


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))


def test_builders_of_sgs_and_opnorm():
    model = _conv_net()
    sgs = M.build_method(from_dict({"method": "sgs", "sgs_k": 3.0}), model)
    assert isinstance(sgs, SpatialGradientScaling)
    assert sgs.config()["k"] == 3.0 and sgs.config()["every"] == 5
    on_update = M.build_method(from_dict({"method": "sgs-fixed", "sgs_on": "update"}), model)
    assert isinstance(on_update, cdgrad.OnUpdate)
    with pytest.raises(ValueError, match="opnorm.*sample"):
        M.build_method(RunConfig(method="opnorm"), model)
    sample = torch.randn(2, 2, 6, 5)
    model.train()
    op = M.build_method(from_dict({"method": "opnorm", "clip_every": 7}), model, sample)
    assert isinstance(op, OperatorNormClipper)  # a transform like the others: its work is after the step
    assert op.max_norm == 1.0 and op.every == 7 and model.training
    assert op.projection == "exact"
    for projection in ("reshaped", "gram"):
        built = M.build_method(from_dict({"method": "opnorm", "clip_projection": projection}), model, sample)
        assert built.projection == projection
    assert M.build_method(RunConfig(), model) is None


def _one_step(transform):
    """Parameters after one SGD step of a small conv net on fixed data, with `transform` attached (or none)."""
    model = _conv_net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    handle = cdgrad.attach(opt, transform(model, x)) if transform is not None else None
    model(x).square().mean().backward()
    opt.step()
    if handle is not None:
        handle.remove()
    return [p.detach().clone() for p in model.parameters()]


def test_a_built_method_takes_the_step_of_the_library_transform():
    config = from_dict({"method": "sobolev", "lam": 2.0, "beta": 0.5})
    via_registry = _one_step(lambda model, x: M.build_method(config, model, x[:1]))
    direct = _one_step(lambda model, x: cdgrad.ChannelDirected("sobolev", lam=2.0, beta=0.5))
    plain = _one_step(None)
    for a, b in zip(via_registry, direct, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(via_registry, plain, strict=True))


@pytest.mark.parametrize("method", ["sgs", "opnorm", "h0"])
def test_built_state_round_trips(method):
    model = _conv_net()
    x = torch.randn(4, 2, 6, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    built = M.build_method(
        from_dict({"method": method, "clip_every": 2} if method == "opnorm" else {"method": method}), model, x[:1]
    )
    handle = cdgrad.attach(opt, built)
    built.begin_epoch(0, iter([x]))
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    state = built.state_dict()
    other_model = _conv_net()
    other = M.build_method(RunConfig(method=method), other_model, x[:1])
    other.load_state_dict(state)
    assert repr(other.state_dict()) == repr(state)
    handle.remove()


# ------------------------------------------------------------------------------------------------ registration


def test_register_a_method_with_existing_parameters():
    scaled = M.Method(
        "h0-twice",
        "H0 applied twice",
        "h0(h0(f))",
        (M.PARAMS["lam"],),
        lambda v, model, sample: cdgrad.Chain(
            cdgrad.ChannelDirected("h0", lam=v["lam"]), cdgrad.ChannelDirected("h0", lam=v["lam"])
        ),
    )
    M.register_method(scaled)
    try:
        config = from_dict({"method": "h0-twice", "lam": 2.0})
        validate(config)
        assert M.describe(config) == "h0-twice lam=2"
        assert M.sort_key(config)[0] == len(M.METHODS) - 1  # after the built-in methods
        with pytest.raises(ValueError, match="beta=1.0 is not a hyper-parameter of method 'h0-twice'"):
            validate(from_dict({"method": "h0-twice", "beta": 1.0}))
        g = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        once = cdgrad.ChannelDirected("h0", lam=2.0)
        assert torch.equal(M.build_method(config, nn.Identity())(g), once(once(g)))
        assert "h0-twice" in M.method_listing()
    finally:
        M.METHODS.unregister("h0-twice")
    with pytest.raises(ValueError, match="method must be one of"):
        validate(RunConfig(method="h0-twice"))


def test_a_method_brings_its_new_parameters_without_touching_the_config():
    gamma = Param(name="gamma", type=float, default=2.0, minimum=0.0, help="the scale of the gradient")
    scaled = M.Method(
        "times-gamma",
        "the gradient times gamma",
        "gamma f",
        (gamma,),
        lambda v, model, sample: cdgrad.Scaled(cdgrad.Centralize(scope="all"), v["gamma"]),
    )
    M.register_method(scaled)
    try:
        config = from_dict({"method": "times-gamma", "gamma": 3})
        validate(config)
        assert config.arg("gamma") == 3.0 and M.describe(config) == "times-gamma gamma=3"
        with pytest.raises(ValueError, match="gamma must be a finite real number >= 0"):
            validate(config.replace(gamma=-1.0))
        assert isinstance(M.build_method(config, nn.Identity()), cdgrad.Scaled)
    finally:
        M.unregister_method("times-gamma")
    assert "times-gamma" not in M.METHODS and "gamma" not in M.PARAMS


def test_registration_errors():
    with pytest.raises(ValueError, match="must have the type declared in PARAMS"):
        M.Method("x", "x", "x", (Param(name="lam", type=int, help="?"),), lambda v, m, s: None)
    with pytest.raises(ValueError, match="order"):
        M.Method("x", "x", "x", (M.PARAMS["lam"],), lambda v, m, s: None, order=("beta",))
    new = Param(name="delta", type=float, help="?")
    with pytest.raises(ValueError, match="built in"):
        M.register_method(M.Method("h0", "x", "x", (new,), lambda v, m, s: None))
    assert "delta" not in M.PARAMS  # a refused method declares nothing
    with pytest.raises(TypeError, match="Method"):
        M.register_method("h0")
    with pytest.raises(ValueError, match="name or type"):
        M.PARAMS["lam"].but(type=int)
    with pytest.raises(ValueError, match="built in"):
        M.unregister_method("h0")


def test_the_docs_method_table_is_the_registry():
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"
    assert M.method_table() in docs.read_text()
    for m in M.METHODS.values():
        assert f"| `{m.name}` |" in M.method_table()


def test_listing_and_defaults_text():
    text = M.method_listing()
    for m in M.METHODS.values():
        assert m.name in text and m.update in text
        for p in m.params:
            assert p.name in text
    assert M.defaults_text("direction") == "output (h0, sobolev), flat (ls)"
    assert M.defaults_text("scope") == "conv (h0, sobolev, centralize), all (ls)"
