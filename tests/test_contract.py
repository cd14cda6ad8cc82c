"""The transform contract, checked once for every public transform (in the style of torch's OptimizerInfo).

Each `TransformInfo` declares two differently configured sample constructions and bad states; one battery of
tests runs every entry through: plain and DTensor gradients, pure vs in-place forms, the pure form leaving
its input alone, state_dict round trips between the two instances (also through torch.save), selection
after a load, bad input leaving parameters, gradients and optimizer state untouched, and a failed
load_state_dict leaving the object exactly as it was. A public transform without an entry fails the suite.
"""

from __future__ import annotations

import copy
import io
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import cdgrad
from cdgrad.transforms_base import GradientTransform
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("float64_default")


class Net(nn.Module):
    """Every kind of parameter: 3x3 and 1x1 convs, a linear layer, biases and a 0-d scalar."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.point(torch.tanh(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3))) * self.scale


def _sgs(model: nn.Module, **kwargs: Any) -> cdgrad.SpatialGradientScaling:
    sgs = cdgrad.SpatialGradientScaling(model, **kwargs)
    state = sgs.state_dict()
    g = torch.Generator().manual_seed(len(state["scalings"]))
    state["scalings"] = {n: torch.rand(v.shape, generator=g) + 0.5 for n, v in state["scalings"].items()}
    sgs.load_state_dict(state)
    return sgs


@dataclass
class TransformInfo:
    """One public transform: two differently configured constructions (`make`, `other`) and bad states."""

    name: str
    make: Callable[[nn.Module], GradientTransform]
    other: Callable[[nn.Module], GradientTransform]
    bad_states: list[tuple[Callable[[dict], Any], type[Exception]]] = field(default_factory=list)
    identity: bool = False  # `make` leaves gradients as they are (e.g. the paper's h0 at lam = 0, plain SGD)


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
    ),
    TransformInfo(
        "ChannelDirected-flat",
        lambda m: cdgrad.ChannelDirected("sobolev", 0.7, 0.0, "flat", "conv"),
        lambda m: cdgrad.ChannelDirected("sobolev", 0.2, 0.5, "input", "conv"),
        [(lambda s: _set(s, ("config", "scope"), "linear"), ValueError)],
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
    ),
    TransformInfo(
        "Centralize",
        lambda m: cdgrad.Centralize(),
        lambda m: cdgrad.Centralize("all"),
        [(lambda s: _set(s, ("config", "scope"), "bias"), ValueError)],
    ),
    TransformInfo(
        "Scaled",
        lambda m: cdgrad.Scaled(cdgrad.LaplacianSmoothing(1.0, "output", "all"), 0.5),
        lambda m: cdgrad.Scaled(cdgrad.LaplacianSmoothing(3.0, "input", "conv"), -2.0),
        [
            (lambda s: _set(s, ("factor",), float("inf")), ValueError),
            (lambda s: _set(s, ("transform", "config", "sigma"), -1.0), ValueError),
        ],
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
    ),
    TransformInfo(
        "paper_convention-h0",
        lambda m: cdgrad.paper_convention("h0", 0.0),
        lambda m: cdgrad.paper_convention("h0", 4.0, beta=0.5, scope="all"),
        identity=True,
    ),
]
ENTRIES = pytest.mark.parametrize("info", INFOS, ids=[i.name for i in INFOS])


def sample_grads(model: nn.Module, t: GradientTransform, seed: int = 1) -> tuple[list, list]:
    """(params, random gradients) of the parameters `t` selects."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if t.select(p)]
    return params, [torch.randn(p.shape, generator=g) for p in params]


def outputs(t: GradientTransform, model: nn.Module) -> dict[str, torch.Tensor]:
    """The in-place result of `t` on every parameter it selects, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    params, grads = sample_grads(model, t)
    t.transform_(grads, params)
    return {names[id(p)]: g for p, g in zip(params, grads, strict=True)}


def snapshot(t: GradientTransform) -> Any:
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    return buf.getvalue()


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


def test_every_public_transform_has_an_entry():
    exported = {getattr(cdgrad, name) for name in cdgrad.__all__}
    public = {c for c in _subclasses(GradientTransform) if c.__module__.startswith("cdgrad.") and c in exported}
    public |= {c for c in exported if isinstance(c, type) and issubclass(c, GradientTransform)}
    public.discard(GradientTransform)  # the protocol itself
    covered: set[type] = set()
    for info in INFOS:
        covered |= _types_in(info.make(Net())) | _types_in(info.other(Net()))
    assert public - covered == set(), f"transforms without a TransformInfo entry: {public - covered}"
    assert GradientTransform in exported and cdgrad.masked in exported and cdgrad.paper_convention in exported


# --------------------------------------------------------------------------------------------- battery
@ENTRIES
def test_scalars_are_never_selected_and_something_is(info):
    model = Net()
    for t in (info.make(model), info.other(model)):
        assert not t.select(model.scale)
        assert any(t.select(p) for p in model.parameters())


@ENTRIES
def test_pure_and_in_place_forms_agree_and_pure_keeps_its_input(info):
    model = Net()
    t = info.make(model)
    params, grads = sample_grads(model, t)
    originals = [g.clone() for g in grads]
    pure = [t(g, p) for g, p in zip(grads, params, strict=True)]
    for g, o in zip(grads, originals, strict=True):
        assert torch.equal(g, o), "the pure form modified its input"
    t.transform_(grads, params)
    for a, b, o in zip(grads, pure, originals, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        assert a.dtype == o.dtype and a.shape == o.shape
    changed = [not torch.allclose(a, o) for a, o in zip(grads, originals, strict=True)]
    assert any(changed) != info.identity, "the transform changed nothing"


@ENTRIES
def test_begin_epoch_is_accepted(info):
    model = Net()
    t = info.make(model)
    before = outputs(t, model)
    t.begin_epoch(0)
    t.begin_epoch(3)
    with pytest.raises(ValueError, match="epoch"):
        t.begin_epoch(-1)
    after = outputs(t, model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@ENTRIES
def test_state_dict_round_trip_between_instances(info):
    model = Net()
    a, b = info.make(model), info.other(model)
    expected = outputs(b, model)
    assert outputs(a, model).keys() != expected.keys() or any(
        not torch.equal(outputs(a, model)[k], expected[k]) for k in expected
    ), "the two sample constructions must differ"
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


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 5, generator=g)
    return nn.functional.mse_loss(model(x), y)


@ENTRIES
def test_selection_after_load_through_attach(info):
    model = Net()
    a, b = info.make(model), info.other(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = cdgrad.attach(opt, a)
    _loss(model, 0).backward()
    opt.step()
    a.load_state_dict(b.state_dict())
    opt.zero_grad()
    _loss(model, 1).backward()
    expected = [p for p in model.parameters() if b.select(p)]
    assert [id(p) for p in handle.selected()] == [id(p) for p in expected]
    # the step transforms exactly what b would
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    twin_b = info.other(twin)
    grads = {id(p): q.grad.clone() for p, q in zip(model.parameters(), twin.parameters(), strict=True)}
    opt.step()  # raised for SpatialGradientScaling before selection followed the state
    params = [q for q in twin.parameters() if twin_b.select(q)]
    twin_b.transform_([q.grad for q in params], params)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if twin_b.select(q):
            assert not torch.equal(q.grad, grads[id(p)])
        assert torch.equal(p.grad, q.grad)
    handle.remove()


@ENTRIES
def test_bad_gradient_leaves_parameters_gradients_and_optimizer_state_untouched(info):
    model = Net()
    t = info.make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cdgrad.attach(opt, t)
    _loss(model, 0).backward()
    selected = [p for p in model.parameters() if t.select(p)]
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
    params, grads = sample_grads(model, t)
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


# ---------------------------------------------------------------------------------------------- DTensor
@pytest.fixture(scope="module")
def mesh():
    """A one-process gloo world with a 1-D device mesh, torn down (and the previous state restored) after."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this process")
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@ENTRIES
def test_dtensor_gradients_match_plain_ones(info, mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    model = Net()
    t = info.make(model)
    params, grads = sample_grads(model, t)
    expected = [t(g, p) for g, p in zip(grads, params, strict=True)]
    for placement in (Shard(0), Replicate()):
        sharded = [distribute_tensor(g.clone(), mesh, [placement]) for g in grads]
        for d, p, e, g in zip(sharded, params, expected, grads, strict=True):
            torch.testing.assert_close(t(d, p).full_tensor(), e, rtol=0, atol=1e-13)
            assert torch.equal(d.full_tensor(), g)  # the pure form left the DTensor alone
        t.transform_(sharded, params)
        for d, e in zip(sharded, expected, strict=True):
            torch.testing.assert_close(d.full_tensor(), e, rtol=0, atol=1e-13)


@ENTRIES
def test_homogeneous_transforms_commute_with_a_loss_scale(info):
    """What `homogeneous` promises (AMP with fused optimizers relies on it): T(s g) = s T(g) for s > 0."""
    model = Net()
    t = info.make(model)
    assert t.homogeneous  # every public transform is linear in the gradient
    params, grads = sample_grads(model, t)
    for g, p in zip(grads, params, strict=True):
        torch.testing.assert_close(t(g * 2.0**10, p), t(g, p) * 2.0**10, rtol=0, atol=0)  # exact: a power of 2
        assert rel_err(t(g * 3.0, p), t(g, p) * 3.0) < 1e-14


@ENTRIES
def test_compiled_optimizer_step_matches_eager(info):
    """`torch.compile(optimizer.step)` traces the attached transform (reference route) and keeps following it:
    a state change between steps (a load) and `remove()` take effect in the compiled step as in the eager one."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def train(compiled: bool) -> list[torch.Tensor]:
        torch._dynamo.reset()  # every run compiles afresh (and stays under the recompile limit)
        model = Net()
        a, b = info.make(model), info.other(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        handle = cdgrad.attach(opt, a)
        step = torch.compile(opt.step, backend=counter) if compiled else opt.step
        for i in range(6):
            if i == 2:
                a.load_state_dict(b.state_dict())
            if i == 4:
                handle.remove()
            opt.zero_grad()
            _loss(model, i).backward()
            step()
        return [p.detach().clone() for p in model.parameters()]

    eager, compiled = train(False), train(True)
    assert counter.frame_count > 0 and counter.op_count > 0, "nothing was compiled"
    for p, q in zip(eager, compiled, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
