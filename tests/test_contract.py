"""The transform contract, checked once for every transform (in the style of torch's OptimizerInfo).

Each `TransformInfo` declares two differently configured sample constructions, bad states, and the properties the
battery must not assume (linear, homogeneous, stateful, bound to a model, ...). One battery runs every entry
through: plain gradients and DTensor gradients sharded unevenly over two gloo processes, pure vs in-place forms,
state_dict round trips between the two instances (also through torch.save), selection after a load, bad input
leaving parameters, gradients and optimizer state untouched, a failed load leaving the object exactly as it was,
`attach(opt, OnUpdate(t))` against `attach_update`, and the `after_step` and `begin_epoch(epoch, batches)` hooks
(the legs that train or hook, the DTensor and the torch.compile legs are in `test_contract_steps.py`).
Every concrete `GradientTransform` subclass in cdgrad's modules needs an entry (found by walking the subclasses).
"""

from __future__ import annotations

import copy
import importlib
import io
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import cdgrad
from cdgrad.spectral import OperatorNormClipper
from cdgrad.transforms import Directional, Wrapper
from cdgrad.transforms_base import ConfiguredTransform, GradientTransform
from contract_battery import Net, TransformInfo, loss, outputs, sample_grads, snapshot
from helpers import rel_err, run_docs_page

pytestmark = pytest.mark.usefixtures("float64_default")

# the docs' example transform (its first two blocks: the third registers a toolkit method)
EXAMPLE = run_docs_page("extending.md", first=2)["ChannelRMSNormalize"]


def _sgs(model: nn.Module, **kwargs: Any) -> cdgrad.SpatialGradientScaling:
    sgs = cdgrad.SpatialGradientScaling(model, **kwargs)
    state = sgs.state_dict()
    g = torch.Generator().manual_seed(len(state["scalings"]))
    state["scalings"] = {n: torch.rand(v.shape, generator=g) + 0.5 for n, v in state["scalings"].items()}
    sgs.load_state_dict(state)
    return sgs


def _set(state: dict, path: tuple, value: Any) -> dict:
    state = copy.deepcopy(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


def _drop(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


GENERIC_BAD_STATES: list[tuple[Callable[[dict], Any], type[Exception]]] = [
    (lambda s: [s], TypeError),
    (lambda s: {**s, "type": "Nothing"}, ValueError),
    (lambda s: {**s, "extra": 1}, ValueError),
]

INFOS = [
    TransformInfo(
        "ChannelDirected-sobolev-output",
        lambda m: cdgrad.ChannelDirected("sobolev", 0.5, 0.1),
        lambda m: cdgrad.ChannelDirected("h0", 3.0, -0.2, "flat", "all"),
        [
            (lambda s: _set(s, ("config", "lam"), 0.0), ValueError),
            (lambda s: _set(s, ("config", "metric"), "h1"), ValueError),
            (lambda s: _set(s, ("config", "beta"), "x"), TypeError),
            (lambda s: _drop(s, "config"), ValueError),
        ],
    ),
    TransformInfo(
        "ChannelDirected-h0-input",
        lambda m: cdgrad.ChannelDirected("h0", 2.0, 0.0, "input", "all"),
        lambda m: cdgrad.ChannelDirected("sobolev", 1.5, 0.3, "output", "all"),
        [(lambda s: _set(s, ("config", "direction"), "spatial"), ValueError)],
        compile=False,  # the compile leg of ChannelDirected / LaplacianSmoothing / Chain covers its code
    ),
    TransformInfo(
        "ChannelDirected-flat",
        lambda m: cdgrad.ChannelDirected("sobolev", 0.7, 0.0, "flat", "conv"),
        lambda m: cdgrad.ChannelDirected("sobolev", 0.2, 0.5, "input", "conv"),
        [(lambda s: _set(s, ("config", "scope"), "linear"), ValueError)],
        compile=False,  # the compile leg of ChannelDirected / LaplacianSmoothing / Chain covers its code
    ),
    TransformInfo(
        "LaplacianSmoothing",
        lambda m: cdgrad.LaplacianSmoothing(1.0),
        lambda m: cdgrad.LaplacianSmoothing(0.4, "output", "conv"),
        [(lambda s: _set(s, ("config", "sigma"), -1.0), ValueError)],
    ),
    TransformInfo(
        "LaplacianSmoothing-input",
        lambda m: cdgrad.LaplacianSmoothing(2.0, "input", "all"),
        lambda m: cdgrad.LaplacianSmoothing(0.5, "flat", "all"),
        [(lambda s: _set(s, ("config", "sigma"), float("nan")), ValueError)],
        compile=False,  # the compile leg of ChannelDirected / LaplacianSmoothing / Chain covers its code
    ),
    TransformInfo(
        "Centralize",
        lambda m: cdgrad.Centralize(),
        lambda m: cdgrad.Centralize("all"),
        [(lambda s: _set(s, ("config", "scope"), "bias"), ValueError)],
        compile=False,  # the compile leg of Chain covers its code
    ),
    TransformInfo(
        "Scaled",
        lambda m: cdgrad.Scaled(cdgrad.LaplacianSmoothing(1.0, "output", "all"), 0.5),
        lambda m: cdgrad.Scaled(cdgrad.LaplacianSmoothing(3.0, "input", "conv"), -2.0),
        [
            (lambda s: _set(s, ("factor",), float("inf")), ValueError),
            (lambda s: _set(s, ("transform", "config", "sigma"), -1.0), ValueError),
        ],
        compile=False,  # the compile leg of ChannelDirected / LaplacianSmoothing / Chain covers its code
    ),
    TransformInfo(
        "Chain",
        lambda m: cdgrad.Chain(cdgrad.Centralize(), cdgrad.ChannelDirected("sobolev", 0.5)),
        lambda m: cdgrad.Chain(cdgrad.Centralize("all"), cdgrad.ChannelDirected("h0", 3.0, 0.2, scope="all")),
        [
            (lambda s: _set(s, ("transforms",), s["transforms"][:1]), ValueError),
            # the first child's state is valid, the second's is not: nothing may be loaded
            (lambda s: _set(s, ("transforms", 1, "config", "lam"), -1.0), ValueError),
        ],
    ),
    TransformInfo(
        "masked",
        lambda m: cdgrad.masked(cdgrad.ChannelDirected("h0", 2.0, scope="all"), lambda p: p.dim() == 2),
        lambda m: cdgrad.masked(cdgrad.ChannelDirected("sobolev", 0.3, 0.1, scope="all"), lambda p: p.dim() == 2),
        [(lambda s: _set(s, ("transform", "config", "lam"), 0.0), ValueError)],
        compile=False,  # the compile leg of Chain covers its code
    ),
    TransformInfo(
        "OnUpdate",
        lambda m: cdgrad.on_update(cdgrad.ChannelDirected("sobolev", 0.5, 0.1)),
        lambda m: cdgrad.OnUpdate(cdgrad.ChannelDirected("h0", 2.0, 0.3, "input", "all")),
        [(lambda s: _set(s, ("transform", "config", "lam"), -1.0), ValueError)],
        on_update=True,
    ),
    TransformInfo(
        "SpatialGradientScaling",
        lambda m: _sgs(m),
        lambda m: _sgs(m, k=2.0, min_kernel=1, pipeline="authors"),
        [
            (lambda s: _set(s, ("config", "k"), 0.0), ValueError),
            (lambda s: _set(s, ("scalings",), {}), ValueError),
            (lambda s: _set(s, ("scalings", "conv"), torch.ones(2, 2)), ValueError),
            (lambda s: _set(s, ("scalings", "conv"), torch.full((3, 3), float("nan"))), ValueError),
        ],
        needs_model=True,
        stateful=True,
    ),
    TransformInfo(
        "SpatialGradientScaling-authors",
        lambda m: _sgs(m, pipeline="authors", num_batches=3),
        lambda m: _sgs(m, k=3.0, every=2),
        needs_model=True,
        stateful=True,
        measures=3,
    ),
    TransformInfo(
        "FixedSpatialScaling",
        lambda m: cdgrad.FixedSpatialScaling(2.0, 4.0),
        lambda m: cdgrad.FixedSpatialScaling(0.5, 3.0),
        [
            (lambda s: _set(s, ("config", "edge"), 0.0), ValueError),
            (lambda s: _set(s, ("config", "corner"), "4"), TypeError),
        ],
    ),
    TransformInfo(
        "paper_convention-sobolev",
        lambda m: cdgrad.paper_convention("sobolev", 1.0),
        lambda m: cdgrad.paper_convention("sobolev", 2.0, beta=0.1, direction="input", scope="all"),
        [(lambda s: _set(s, ("factor",), "2"), TypeError)],
        compile=False,  # the compile leg of ChannelDirected / LaplacianSmoothing / Chain covers its code
    ),
    TransformInfo(
        "paper_convention-h0",
        lambda m: cdgrad.paper_convention("h0", 0.0),
        lambda m: cdgrad.paper_convention("h0", 4.0, beta=0.5, scope="all"),
        identity=True,
        compile=False,  # the compile leg of ChannelDirected / LaplacianSmoothing / Chain covers its code
    ),
    TransformInfo(
        "OperatorNormClipper",
        lambda m: OperatorNormClipper(m, 6, max_norm=0.5, every=2),
        lambda m: OperatorNormClipper(m, {"conv": 5, "point": 4}, max_norm=2.0, every=3, projection="gram"),
        [
            (lambda s: _set(s, ("every",), 0), ValueError),
            (lambda s: _set(s, ("input_sizes", "conv"), [0, 6]), ValueError),
            (lambda s: _drop(s, "step_count"), ValueError),
        ],
        identity=True,
        selects=False,
        needs_model=True,
        stateful=True,
        after_step=True,
        compile=False,  # its projection (complex SVDs) runs after the step, outside what the battery compiles
    ),
    TransformInfo(
        "Chain-with-clipper",
        lambda m: cdgrad.Chain(cdgrad.Centralize(), OperatorNormClipper(m, 6, max_norm=0.5, every=2)),
        lambda m: cdgrad.Chain(cdgrad.Centralize("all"), OperatorNormClipper(m, 6, max_norm=1.0, every=1)),
        stateful=True,
        after_step=True,
        compile=False,
    ),
    TransformInfo(
        "docs-example-ChannelRMSNormalize",
        lambda m: EXAMPLE(eps=1e-8),
        lambda m: EXAMPLE(eps=1.0),
        [(lambda s: _set(s, ("config", "eps"), 0.0), ValueError)],
        homogeneous=False,
        linear=False,
        dtensor=False,  # its per-channel mean is not written for sharded tensors
    ),
]
ENTRIES = pytest.mark.parametrize("info", INFOS, ids=[i.name for i in INFOS])
ABSTRACT = {GradientTransform, ConfiguredTransform, Directional, Wrapper}  # bases, never constructed themselves


# ------------------------------------------------------------------------------------------- coverage
def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def _types_in(t: GradientTransform) -> set[type]:
    found = {type(t)}
    for child in (getattr(t, "transform", None), *getattr(t, "transforms", ())):
        if isinstance(child, GradientTransform):
            found |= _types_in(child)
    return found


def test_every_transform_has_an_entry():
    for module in pkgutil.walk_packages(cdgrad.__path__, "cdgrad."):
        importlib.import_module(module.name)  # every subclass cdgrad defines is now known
    ours = {c for c in _subclasses(GradientTransform) if c.__module__.split(".")[0] == "cdgrad"}
    covered: set[type] = set()
    for info in INFOS:
        covered |= _types_in(info.make(Net())) | _types_in(info.other(Net()))
    missing = ours - ABSTRACT - covered
    assert not missing, f"transforms without a TransformInfo entry: {sorted(c.__qualname__ for c in missing)}"
    assert OperatorNormClipper in ours and Directional in ours  # found without being exported
    exported = {getattr(cdgrad, n) for n in cdgrad.__all__}
    assert {c for c in exported if isinstance(c, type) and issubclass(c, GradientTransform)} - ABSTRACT <= covered


# --------------------------------------------------------------------------------------------- battery
@ENTRIES
def test_selection(info):
    model = Net()
    for t in (info.make(model), info.other(model)):
        assert not t.select(model.scale)
        assert any(t.select(p) for p in model.parameters()) == info.selects
    # a transform bound to a model selects nothing of another instance; the others decide by shape
    other = Net()
    t = info.make(model)
    chosen = [t.select(p) for p in other.parameters()]
    assert (not any(chosen)) if info.needs_model else chosen == [t.select(p) for p in model.parameters()]


@ENTRIES
def test_pure_and_in_place_forms_agree_and_pure_keeps_its_input(info):
    model = Net()
    t = info.make(model)
    params, grads = sample_grads(model, t, every=not info.selects)
    originals = [g.clone() for g in grads]
    pure = [t(g, p) for g, p in zip(grads, params, strict=True)]
    for g, o in zip(grads, originals, strict=True):
        assert torch.equal(g, o), "the pure form modified its input"
    t.transform_(grads, params)
    for a, b, o in zip(grads, pure, originals, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        assert a.dtype == o.dtype and a.shape == o.shape
    changed = [not torch.allclose(a, o) for a, o in zip(grads, originals, strict=True)]
    assert any(changed) != info.identity, "the transform changed nothing" if not info.identity else "not identity"


@ENTRIES
def test_state_dict_round_trip_between_instances(info):
    model = Net()
    a, b = info.make(model), info.other(model)
    expected = outputs(b, model)
    assert snapshot(a) != snapshot(b), "the two sample constructions must differ"
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    version = a.state_version
    a.load_state_dict(torch.load(buf, weights_only=True))
    assert a.state_version != version
    got = outputs(a, model)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert snapshot(a) == snapshot(b)
    assert [a.select(p) for p in model.parameters()] == [b.select(p) for p in model.parameters()]


@ENTRIES
def test_a_step_after_a_load_is_the_loaded_transforms_step(info):
    """Train with `a`, load `b`'s state into it: the next step equals a twin's step with a fresh `b`."""
    model = Net()
    a = info.make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = cdgrad.attach(opt, a)
    loss(model, 0).backward()
    opt.step()
    twin = Net()
    twin.load_state_dict(model.state_dict())
    b = info.other(twin)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own momentum buffers
    cdgrad.attach(twin_opt, b)
    a.load_state_dict(info.other(Net()).state_dict())
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        loss(m, 1).backward()
    if isinstance(handle, cdgrad.AttachHandle):  # the selection followed the load
        expected = [p for p, q in zip(model.parameters(), twin.parameters(), strict=True) if b.select(q)]
        assert [id(p) for p in handle.selected()] == [id(p) for p in expected]
    opt.step()  # raised for SpatialGradientScaling before selection followed the state
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@ENTRIES
def test_bad_gradient_leaves_parameters_gradients_and_optimizer_state_untouched(info):
    model = Net()
    t = info.make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cdgrad.attach(opt, t)
    loss(model, 0).backward()
    selected = [p for p in model.parameters() if t.select(p)]
    if not info.selects:
        assert selected == []
        return
    victim = selected[-1]
    victim.grad = victim.grad.to_sparse()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    for p, w, g in zip(model.parameters(), weights, grads, strict=True):
        assert torch.equal(p, w)
        assert torch.equal(p.grad.to_dense(), g.to_dense())
    assert opt.state_dict()["state"] == {}


@ENTRIES
def test_bad_gradient_in_transform_leaves_the_others_untouched(info):
    """Validate all, then transform: one gradient that cannot be transformed changes none of the others."""
    model = Net()
    t = info.make(model)
    params, grads = sample_grads(model, t, every=not info.selects)
    before = [g.clone() for g in grads]
    for bad in (torch.zeros(params[0].shape, dtype=torch.int64), torch.randn(params[0].shape).to_sparse()):
        with pytest.raises(TypeError, match="grads"):
            t.transform_([*grads, bad], [*params, params[0]])
        for g, b in zip(grads, before, strict=True):
            assert torch.equal(g, b)


@ENTRIES
def test_failed_load_leaves_the_object_unchanged(info):
    model = Net()
    t = info.make(model)
    good = info.other(model).state_dict()
    before, version = snapshot(t), t.state_version
    expected = outputs(t, model)
    for corrupt, exc in GENERIC_BAD_STATES + info.bad_states:
        with pytest.raises(exc):
            t.load_state_dict(corrupt(good))
        assert snapshot(t) == before and t.state_version == version
    got = outputs(t, model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@ENTRIES
def test_homogeneity_and_linearity_as_declared(info):
    """`homogeneous` promises T(s g) = s T(g) for s > 0 (AMP with fused optimizers relies on it); `linear` adds
    T(a g + b h) = a T(g) + b T(h). Each is asserted where the entry declares it, refuted where it denies it."""
    model = Net()
    t = info.make(model)
    assert t.homogeneous == info.homogeneous
    params, grads = sample_grads(model, t, every=not info.selects)
    _, others = sample_grads(model, t, seed=2, every=not info.selects)
    scaled = [rel_err(t(g * 3.0, p), t(g, p) * 3.0) for g, p in zip(grads, params, strict=True)]
    combined = [
        rel_err(t(2.0 * g - 0.5 * h, p), 2.0 * t(g, p) - 0.5 * t(h, p))
        for g, h, p in zip(grads, others, params, strict=True)
    ]
    if info.homogeneous:
        for g, p in zip(grads, params, strict=True):
            torch.testing.assert_close(t(g * 2.0**10, p), t(g, p) * 2.0**10, rtol=0, atol=0)  # exact: a power of 2
    assert (max(scaled) < 1e-14) == info.homogeneous
    assert (max(combined) < 1e-13) == info.linear
