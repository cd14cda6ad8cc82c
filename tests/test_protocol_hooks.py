"""The transform protocol's hooks and markers: `after_step` through `attach` (skipped with a skipped step),
`begin_epoch(epoch, batches)` of SGS with the authors' pipeline, `OnUpdate`, and `ConfiguredTransform`'s contract."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import cdgrad
from cdgrad.transforms_base import GradientTransform


class StepCounter(GradientTransform):
    """Counts `after_step` calls; leaves gradients alone."""

    homogeneous = True

    def __init__(self) -> None:
        self.calls = 0

    def apply_(self, grads, params) -> None:
        pass

    def after_step(self) -> None:
        self.calls += 1


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).to(dtype)


def step_loss(model: nn.Module, i: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(4, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (4,), generator=g)
    return nn.functional.cross_entropy(model(x), y) * scale


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("on_update", [False, True])
def test_after_step_runs_after_every_step_and_not_after_a_skipped_one(fused, on_update):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    counter = StepCounter()
    handle = cdgrad.attach(opt, cdgrad.OnUpdate(counter) if on_update else counter)
    assert isinstance(handle, cdgrad.UpdateHandle if on_update else cdgrad.AttachHandle)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i, scale in enumerate((1.0, float("inf"), 1.0)):  # the second step overflows: GradScaler skips it
        opt.zero_grad()
        weights = [p.detach().clone() for p in model.parameters()]
        scaler.scale(step_loss(model, i, scale)).backward()
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
        assert skipped == (i == 1)
        assert counter.calls == (1 if i < 2 else 2)
    opt.step(lambda: step_loss(model, 5))  # a closure step (the hook runs once, after it)
    assert counter.calls == 3
    handle.remove()
    opt.step()
    assert counter.calls == 3


def test_after_step_is_forwarded_by_every_wrapper():
    counters = [StepCounter() for _ in range(3)]
    t = cdgrad.Chain(cdgrad.Scaled(counters[0], 2.0), cdgrad.masked(counters[1], lambda p: True), counters[2])
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cdgrad.attach(opt, t, params=list(model.parameters())[:1])
    step_loss(model, 0).backward()
    opt.step()
    opt.step()
    assert [c.calls for c in counters] == [2, 2, 2]


def test_sgs_authors_begin_epoch_measures_on_the_first_batches_like_measure():
    """`begin_epoch(epoch, batches)` is `measure(first num_batches of batches)` at due epochs, bit for bit; it draws
    only those batches from a lazy iterator, none at other epochs, and needs batches when due."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    twin = copy.deepcopy(model)
    data = [torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    a = cdgrad.SpatialGradientScaling(model, pipeline="authors", num_batches=2, every=2)
    b = cdgrad.SpatialGradientScaling(twin, pipeline="authors", num_batches=2, every=2)
    drawn: list[int] = []

    def lazy():
        for i, x in enumerate(data):
            drawn.append(i)
            yield x

    a.begin_epoch(1, lazy())  # not due: nothing drawn, nothing measured
    assert drawn == [] and all(torch.equal(g, torch.ones_like(g)) for g in a.scalings.values())
    stream = lazy()
    a.begin_epoch(2, stream)
    assert drawn == [0, 1] and next(stream) is data[2]  # the rest of the iterator is left for the caller
    b.measure(data[:2])
    for name, g in b.scalings.items():
        assert torch.equal(a.scalings[name], g) and not torch.equal(g, torch.ones_like(g))
    with pytest.raises(ValueError, match="batches"):
        a.begin_epoch(4)
    assert model.training and twin.training
    chain = cdgrad.Chain(cdgrad.Centralize(), a)  # a Chain forwards the batches
    before = a.state_version
    chain.begin_epoch(4, itertools.islice(data, 3, None))
    assert a.state_version != before


def test_sgs_default_pipeline_ignores_batches_and_arms_capture():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    sgs = cdgrad.SpatialGradientScaling(model, num_batches=1)
    sgs.begin_epoch(0, iter(()))
    assert sgs.armed


def test_on_update_marker():
    t = cdgrad.ChannelDirected("sobolev", 0.5, 0.1)
    u = cdgrad.on_update(t)
    assert isinstance(u, cdgrad.OnUpdate) and u.transform is t and repr(u).startswith("OnUpdate(ChannelDirected(")
    g = torch.randn(6, 3, 3, 3)
    assert torch.equal(u(g), t(g))  # as a tensor transform it is the wrapped one
    with pytest.raises(ValueError, match="OnUpdate"):
        cdgrad.OnUpdate(u)
    with pytest.raises(TypeError, match="GradientTransform"):
        cdgrad.OnUpdate("sobolev")
    model = net(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (cdgrad.Chain(u), cdgrad.Scaled(u, 2.0)):
        with pytest.raises(ValueError, match="OnUpdate"):
            cdgrad.attach(opt, bad)
    with pytest.raises(ValueError, match="OnUpdate"):
        cdgrad.attach_update(opt, u)


def test_on_update_with_params_restricts_the_update():
    def run(restrict: bool) -> list[torch.Tensor]:
        model = net(torch.float64)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        first = list(model.parameters())[:1]
        t = cdgrad.ChannelDirected("sobolev", 0.5, scope="all")
        if restrict:
            cdgrad.attach(opt, cdgrad.OnUpdate(t), params=first)
        else:
            cdgrad.attach_update(opt, cdgrad.masked(t, first))
        for i in range(3):
            opt.zero_grad()
            step_loss(model, i).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for p, q in zip(run(True), run(False), strict=True):
        assert torch.equal(p, q)


class Clamp(cdgrad.ConfiguredTransform):
    config_keys = ("bound",)

    def __init__(self, bound: float = 1.0) -> None:
        super().__init__(bound=bound)

    @classmethod
    def validate_config(cls, config):
        if not isinstance(config["bound"], float) or config["bound"] <= 0:
            raise ValueError(f"bound must be a float > 0, got {config['bound']!r}")
        return {"bound": config["bound"]}

    def apply_(self, grads, params) -> None:
        for g in grads:
            g.clamp_(-self.bound, self.bound)


def test_configured_transform_contract():
    c = Clamp(0.5)
    assert c.config() == {"bound": 0.5} and c.state_dict() == {"type": "Clamp", "config": {"bound": 0.5}}
    assert repr(c) == "Clamp(bound=0.5)"
    assert torch.equal(c(torch.tensor([-2.0, 0.25, 3.0])), torch.tensor([-0.5, 0.25, 0.5]))
    with pytest.raises(ValueError, match="bound"):
        Clamp(-1.0)
    with pytest.raises(TypeError, match="exactly the arguments"):
        cdgrad.ConfiguredTransform.__init__(c, bound=1.0, other=2)
    other = Clamp(2.0)
    version = other.state_version
    other.load_state_dict(c.state_dict())
    assert other.bound == 0.5 and other.state_version != version
    for bad in ({"type": "Clamp", "config": {"bound": -1.0}}, {"type": "Clamp", "config": {}}, {"type": "X"}):
        with pytest.raises(ValueError):
            other.load_state_dict(bad)
        assert other.bound == 0.5

    class Unfinished(cdgrad.ConfiguredTransform):
        config_keys = ("x",)

    with pytest.raises(NotImplementedError, match="validate_config"):
        Unfinished(x=1)
