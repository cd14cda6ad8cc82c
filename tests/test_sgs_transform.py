"""cdgrad.sgs.transform: the k-transform, the SpatialGradientScaling transform, and Lemma 1 as an exact identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cdgrad
from cdgrad.sgs import SpatialGradientScaling, sgs_scaling
from helpers import features, fft_sobolev, ref_dependence, ref_scaling

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)

pytestmark = pytest.mark.usefixtures("one_thread")


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
    k=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**31),
)
def test_sgs_scaling_formula_mean_one_positive_monotone(shape, k, seed):
    s = torch.tensor(np.random.default_rng(seed).uniform(0.01, 1.0, size=shape), dtype=F64)
    g = sgs_scaling(s, k)
    for b in range(shape[0]):
        np.testing.assert_allclose(g[b].numpy(), ref_scaling(s[b].numpy(), k), rtol=1e-13, atol=0)
    np.testing.assert_allclose(g.mean(dim=(-2, -1)).numpy(), 1.0, rtol=0, atol=1e-13)
    assert (g > 0).all()
    flat_s, flat_g = s.reshape(shape[0], -1), g.reshape(shape[0], -1)
    less = flat_s.unsqueeze(-1) < flat_s.unsqueeze(-2)
    assert (flat_g.unsqueeze(-1) < flat_g.unsqueeze(-2))[less].all()  # strictly increasing in S


def test_sgs_scaling_special_values():
    s = torch.tensor([[0.2, 0.5], [1.0, 0.0]], dtype=F64)
    assert torch.allclose(sgs_scaling(s, 1.0), s / s.mean(), rtol=0, atol=1e-15)  # k = 1: S normalised
    assert torch.equal(sgs_scaling(torch.ones(3, 3, dtype=F64)), torch.ones(3, 3, dtype=F64))
    big = sgs_scaling(s, 1e6)  # large k: uniform over the entries with S > 0
    assert torch.allclose(big, torch.tensor([[4 / 3, 4 / 3], [4 / 3, 0.0]], dtype=F64), atol=1e-5)


@pytest.mark.parametrize(
    ("s", "k", "error", "match"),
    [
        ([[1.0]], 5.0, TypeError, "S must be a torch.Tensor"),
        (torch.ones(3), 5.0, ValueError, r"S must have shape \(\.\.\., k_h, k_w\)"),
        (torch.ones(0, 3), 5.0, ValueError, "non-empty"),
        (torch.tensor([[0.5, -0.1]]), 5.0, ValueError, "finite values >= 0"),
        (torch.tensor([[0.5, float("nan")]]), 5.0, ValueError, "finite values >= 0"),
        (torch.zeros(2, 2), 5.0, ValueError, "at least one entry > 0"),
        (torch.ones(2, 2), 0.0, ValueError, "k must be a finite real number > 0"),
        (torch.ones(2, 2), float("inf"), ValueError, "k must be a finite real number > 0"),
        (torch.ones(2, 2), True, TypeError, "k must be a finite real number > 0"),
        (torch.ones(2, 2), "5", TypeError, "k must be a finite real number > 0"),
    ],
)
def test_sgs_scaling_rejects_bad_input(s, k, error, match):
    with pytest.raises(error, match=match):
        sgs_scaling(s, k)


# ------------------------------------------------------------------------------------------- transform
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)  # one-element kernel: not scaled by default
        self.c = nn.Conv2d(4, 3, (3, 1), padding=(1, 0))
        self.d = nn.Conv2d(3, 3, 3, padding=2, dilation=2)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))
        return self.fc(x.mean(dim=(2, 3)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batches(count: int, seed: int = 1, size: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 2, 6, 7, generator=g, dtype=F64).cumsum(-1) for _ in range(count)]


def layer_inputs(net: Net, xs):
    """Inputs of every conv, recorded independently of the transform's hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].clone()))
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        for x in xs:
            net(x)
    for h in hooks:
        h.remove()
    return {name: torch.cat(v) for name, v in seen.items()}


def test_layers_and_select_are_by_identity():
    net = make_net()
    sgs = SpatialGradientScaling(net)
    assert list(sgs.layers) == ["a", "c", "d"]
    assert [sgs.select(p) for p in net.parameters()] == [
        n in ("a.weight", "c.weight", "d.weight") for n, _ in net.named_parameters()
    ]
    assert not sgs.select(net.a.weight.detach().clone())  # same shape and values, other tensor
    assert list(SpatialGradientScaling(net, min_kernel=1).layers) == ["a", "b", "c", "d"]
    assert list(SpatialGradientScaling(net, min_kernel=4).layers) == ["a", "d"]


def test_scalings_start_at_one_and_leave_gradients_unchanged():
    net = make_net()
    sgs = SpatialGradientScaling(net)
    for name, g in sgs.scalings.items():
        assert torch.equal(g, torch.ones(net.get_submodule(name).kernel_size, dtype=F64))
    grad = torch.randn_like(net.a.weight)
    assert torch.equal(sgs(grad, net.a.weight), grad)


@pytest.mark.parametrize("method", ["mi", "autocorr"])
def test_capture_computes_the_scalings_from_the_layer_inputs(method):
    net = make_net()
    xs = batches(3)
    sgs = SpatialGradientScaling(net, k=3.0, num_batches=2, every=5, method=method, bins=6)
    net.eval()
    sgs.begin_epoch(0)
    with torch.no_grad():
        net(xs[2])  # eval mode: neither captured nor counted
    assert sgs.armed and all(torch.equal(g, torch.ones_like(g)) for g in sgs.scalings.values())
    net.train()
    with torch.no_grad():
        net(xs[0])
        assert sgs.armed
        net(xs[1])
    assert not sgs.armed
    inputs = layer_inputs(net, xs[:2])
    for name, g in sgs.scalings.items():
        m = net.get_submodule(name)
        s = ref_dependence(inputs[name].numpy(), *m.kernel_size, bins=6, method=method, dilation=m.dilation)
        np.testing.assert_allclose(g.numpy(), ref_scaling(s, 3.0), rtol=0, atol=1e-12)
    assert not np.allclose(sgs.scalings["a"].numpy(), 1.0)
    before = sgs.scalings
    with torch.no_grad():
        net(xs[2])  # disarmed: nothing changes
    assert all(torch.equal(before[n], g) for n, g in sgs.scalings.items())


def test_begin_epoch_arms_every_few_epochs():
    net = make_net()
    sgs = SpatialGradientScaling(net, every=3, num_batches=1)
    armed = []
    for epoch in range(7):
        sgs.begin_epoch(epoch)
        armed.append(sgs.armed)
        with torch.no_grad():
            net(batches(1, seed=epoch)[0])
    assert armed == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        sgs.begin_epoch(-1)
    with pytest.raises(TypeError, match="epoch must be an int"):
        sgs.begin_epoch(1.0)


def test_transform_multiplies_by_the_layer_scaling():
    net = make_net()
    sgs = SpatialGradientScaling(net, num_batches=1)
    sgs.begin_epoch(0)
    with torch.no_grad():
        net(batches(1)[0])
    params = [net.a.weight, net.c.weight, net.d.weight]
    grads = [torch.randn_like(p) for p in params]
    expected = [g * sgs.scalings[n].view(1, 1, *g.shape[2:]) for g, n in zip(grads, "acd", strict=True)]
    pure = [sgs(g, p) for g, p in zip(grads, params, strict=True)]
    sgs.transform_(grads, params)
    for g, e, q in zip(grads, expected, pure, strict=True):
        assert torch.equal(g, e) and torch.equal(q, e)
    f32 = torch.randn(net.a.weight.shape)
    assert torch.allclose(sgs(f32, net.a.weight), f32 * sgs.scalings["a"].float(), rtol=1e-6)


def test_transform_rejects_foreign_parameters_without_touching_anything():
    net = make_net()
    sgs = SpatialGradientScaling(net)
    state = sgs.state_dict()
    state["scalings"]["a"] = torch.full((3, 3), 2.0, dtype=F64)
    sgs.load_state_dict(state)
    good = torch.ones_like(net.a.weight)
    foreign = torch.ones_like(net.b.weight)
    with pytest.raises(ValueError, match="is not the weight of a conv layer"):
        sgs.transform_([good, foreign], [net.a.weight, net.b.weight])
    assert torch.equal(good, torch.ones_like(good))
    with pytest.raises(ValueError, match="shape"):
        sgs.transform_([torch.ones(3, 3)], [net.a.weight])
    with pytest.raises(ValueError, match="equal lengths"):
        sgs.transform_([good], [])
    with pytest.raises(ValueError, match="param is required"):
        sgs(good)


def test_state_dict_round_trip_and_mismatches():
    net = make_net()
    sgs = SpatialGradientScaling(net, k=2.0, num_batches=1, every=2, bins=7, method="autocorr")
    sgs.begin_epoch(0)
    with torch.no_grad():
        net(batches(1)[0])
    state = sgs.state_dict()
    assert state["config"] == {
        "k": 2.0,
        "num_batches": 1,
        "every": 2,
        "bins": 7,
        "method": "autocorr",
        "min_kernel": 2,
        "pipeline": "cdgrad",
        "diagonal_removal": False,
        "warmup": 0,
    }
    other = SpatialGradientScaling(make_net(seed=5))
    other.load_state_dict(state)
    assert other.config() == sgs.config()
    for name, g in sgs.scalings.items():
        assert torch.equal(other.scalings[name], g)
    saved = other.scalings
    bad = {**state, "scalings": {k: v for k, v in state["scalings"].items() if k != "d"}}
    with pytest.raises(ValueError, match="scalings are for layers"):
        other.load_state_dict(bad)
    bad = {**state, "scalings": {**state["scalings"], "a": torch.ones(3, 1)}}
    with pytest.raises(ValueError, match="has shape"):
        other.load_state_dict(bad)
    bad = {**state, "scalings": {**state["scalings"], "a": -torch.ones(3, 3)}}
    with pytest.raises(ValueError, match="finite values >= 0"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="k must be"):
        other.load_state_dict({**state, "config": {**state["config"], "k": -1.0}})
    with pytest.raises(ValueError, match="cannot load it into SpatialGradientScaling"):
        other.load_state_dict({"type": "Chain", "transforms": []})
    assert other.config() == sgs.config()
    assert all(torch.equal(saved[n], g) for n, g in other.scalings.items())  # untouched by the failures
    other.load_state_dict(
        {
            **state,
            "config": {**state["config"], "min_kernel": 1},
            "scalings": {**state["scalings"], "b": torch.ones(1, 1, dtype=F64)},
        }
    )
    assert list(other.layers) == ["a", "b", "c", "d"]


def test_remove_detaches_the_hooks():
    net = make_net()
    sgs = SpatialGradientScaling(net, num_batches=1)
    sgs.remove()
    assert not net._forward_hooks and all(not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="removed"):
        sgs.begin_epoch(0)


def test_in_place_edit_of_a_captured_input_is_detected():
    conv = nn.Conv2d(1, 1, 3).double()
    sgs = SpatialGradientScaling(conv, num_batches=2)
    sgs.begin_epoch(0)
    x = torch.randn(2, 1, 5, 5, dtype=F64)
    with torch.no_grad():
        conv(x)
        x.add_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            conv(x)
    assert torch.equal(sgs.scalings[""], torch.ones(3, 3, dtype=F64))


def test_layer_called_twice_per_forward_pools_both_inputs():
    """A shared conv sees two input sizes per forward: S is the image-weighted mean of the two groups."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).sum() + self.conv(F.avg_pool2d(x, 2)).sum()

    torch.manual_seed(0)
    model = Twice().double()
    sgs = SpatialGradientScaling(model, num_batches=2, bins=5)
    sgs.begin_epoch(0)
    xs = [features(s, (2, 2, 8, 8)) for s in (1, 2)]
    with torch.no_grad():
        for x in xs:
            model(x)
    full = torch.cat(xs).numpy()
    half = F.avg_pool2d(torch.cat(xs), 2).numpy()
    s = 0.5 * ref_dependence(full, 3, 3, 5) + 0.5 * ref_dependence(half, 3, 3, 5)
    np.testing.assert_allclose(sgs.scalings["conv"].numpy(), ref_scaling(s, 5.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "model must be a torch.nn.Module"),
        ({"k": 0.0}, ValueError, "k must be a finite real number > 0"),
        ({"num_batches": 0}, ValueError, "num_batches must be an int >= 1"),
        ({"num_batches": 1.5}, TypeError, "num_batches must be an int"),
        ({"every": 0}, ValueError, "every must be an int >= 1"),
        ({"bins": 0}, ValueError, "bins must be an int >= 1"),
        ({"method": "corr"}, ValueError, r"method must be one of \('mi', 'autocorr'\)"),
        ({"min_kernel": 0}, ValueError, "min_kernel must be an int >= 1"),
        ({"min_kernel": True}, TypeError, "min_kernel must be an int"),
    ],
)
def test_constructor_rejects_bad_hyper_parameters(kwargs, error, match):
    args = {"model": make_net(), **kwargs}
    before = dict(args["model"]._forward_hooks) if isinstance(args["model"], nn.Module) else None
    with pytest.raises(error, match=match):
        SpatialGradientScaling(**args)
    if before is not None:
        assert dict(args["model"]._forward_hooks) == before


def test_through_attach_and_sgd():
    net, ref = make_net(), make_net()
    sgs = SpatialGradientScaling(net, num_batches=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    handle = cdgrad.attach(opt, sgs)
    for epoch, x in enumerate(batches(4)):
        sgs.begin_epoch(epoch)
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).square().sum().backward()
        for name in sgs.layers:  # the reference applies G by hand, with the G in force at this step
            w = ref.get_submodule(name).weight
            w.grad *= sgs.scalings[name].view(1, 1, *w.shape[2:])
        opt.step()
        ref_opt.step()
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(sgs.scalings["a"], torch.ones(3, 3, dtype=F64))
    handle.remove()


def test_chain_with_channel_directed_sobolev():
    net = make_net()
    sgs = SpatialGradientScaling(net)
    state = sgs.state_dict()
    g = torch.Generator().manual_seed(3)
    state["scalings"] = {n: torch.rand(v.shape, generator=g, dtype=F64) + 0.5 for n, v in state["scalings"].items()}
    sgs.load_state_dict(state)
    chain = cdgrad.Chain(sgs, cdgrad.ChannelDirected("sobolev", lam=0.5, beta=0.2))
    params = [net.a.weight, net.c.weight, net.b.weight]
    assert chain.select(net.b.weight) and not sgs.select(net.b.weight)
    grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    scales = [state["scalings"]["a"].numpy(), state["scalings"]["c"].numpy(), 1.0]
    expected = []
    for grad, s in zip(grads, scales, strict=True):
        f = grad.numpy() * s
        expected.append(fft_sobolev(torch.from_numpy(f), 0.5).numpy() + 0.2 * f)
    chain.transform_(grads, params)
    for grad, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad.numpy(), e, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ Lemma 1
MASKS = {  # branch kernel shape -> its binary receptive field inside the 3x3 support
    (3, 3): torch.ones(3, 3, dtype=F64),
    (1, 3): F.pad(torch.ones(1, 3, dtype=F64), (0, 0, 1, 1)),
    (3, 1): F.pad(torch.ones(3, 1, dtype=F64), (1, 1, 0, 0)),
    (1, 1): F.pad(torch.ones(1, 1, dtype=F64), (1, 1, 1, 1)),
}


def merged(branches: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the branch kernels, each zero-padded (centred) into the 3x3 support: M_n * W_n summed."""
    out = 0
    for w in branches:
        ph, pw = (3 - w.shape[2]) // 2, (3 - w.shape[3]) // 2
        out = out + F.pad(w, (pw, pw, ph, ph))
    return out


def run_lemma(opt_kwargs: dict, steps: int = 6, l2_in_loss: float = 0.0, adam: bool = False):
    """Train a 4-branch re-parameterised conv and a single conv with G = sum of the masks side by side.

    Returns the largest difference, over the steps, between the merged branch weights and the single conv.
    """
    o, i = 4, 3
    g = torch.Generator().manual_seed(0)
    branches = [nn.Parameter(torch.randn(o, i, *shape, generator=g, dtype=F64) * 0.3) for shape in MASKS]
    conv = nn.Conv2d(i, o, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(merged(branches))  # the only condition on the initialisation
    sgs = SpatialGradientScaling(conv)
    state = sgs.state_dict()
    state["scalings"] = {"": sum(MASKS.values())}  # G = sum_n M_n = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    sgs.load_state_dict(state)
    make = (lambda ps: torch.optim.Adam(ps, lr=0.01)) if adam else (lambda ps: torch.optim.SGD(ps, **opt_kwargs))
    opt_branches, opt_single = make(branches), make([conv.weight])
    handle = cdgrad.attach(opt_single, sgs)
    target = torch.randn(5, o, 6, 6, generator=g, dtype=F64)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(5, i, 6, 6, generator=g, dtype=F64)
        for weight, opt in ((merged(branches), opt_branches), (conv.weight, opt_single)):
            opt.zero_grad()
            loss = (torch.tanh(F.conv2d(x, weight, padding=1)) - target).square().mean()
            if l2_in_loss:
                params = branches if opt is opt_branches else [conv.weight]
                loss = loss + 0.5 * l2_in_loss * sum(p.square().sum() for p in params)
            loss.backward()
            opt.step()
        worst = max(worst, (merged(branches) - conv.weight).abs().max().item())
        if not adam and not l2_in_loss and opt_kwargs.get("momentum"):
            # the mechanism: the merged velocity is the sum of the (padded) branch velocities
            velocity = merged([opt_branches.state[p]["momentum_buffer"] for p in branches])
            torch.testing.assert_close(velocity, opt_single.state[conv.weight]["momentum_buffer"], rtol=0, atol=1e-12)
    handle.remove()
    return worst


@pytest.mark.parametrize(
    "opt_kwargs",
    [
        {"lr": 0.5},
        {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.05},
        {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True},
        {"lr": 0.2, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1},
    ],
)
def test_lemma1_branches_equal_single_conv_with_summed_masks(opt_kwargs):
    """Lemma 1, exactly (float64, 1e-12), step for step.

    Conditions: branch masks binary (M_n * M_n = M_n; otherwise G = sum M_n^2); merged initial weight equal to
    the single conv's (any split of it over the branches); momentum buffers starting empty; weight decay as
    the optimizer's coupled L2 term (SGD adds `wd * w` to the transformed gradient, and summed over branches
    `wd * sum_n M_n W_n = wd * W`); an optimizer linear in the gradient (SGD, momentum, dampening,
    Nesterov).
    """
    assert run_lemma(opt_kwargs) < 1e-12


def test_lemma1_needs_its_conditions():
    """Counter-checks: the identity fails with an L2 term in the loss (G would scale the decay) or Adam."""
    assert run_lemma({"lr": 0.2, "momentum": 0.9}, l2_in_loss=0.05) > 1e-6
    assert run_lemma({}, adam=True) > 1e-6


def test_load_with_another_min_kernel_then_step():
    """The attach selection follows the loaded state: before, the next optimizer.step() raised."""
    net = make_net()
    sgs = SpatialGradientScaling(net, min_kernel=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = cdgrad.attach(opt, sgs)
    x = batches(1)[0]
    net(x).square().sum().backward()
    opt.step()
    wider = SpatialGradientScaling(make_net(), min_kernel=1).state_dict()
    sgs.load_state_dict(wider)
    opt.zero_grad()
    net(x).square().sum().backward()
    opt.step()
    assert {id(p) for p in handle.selected()} == {id(m.weight) for m in sgs.layers.values()}
    handle.remove()


def test_diverged_inputs_name_the_layer_and_change_nothing():
    net = make_net()
    sgs = SpatialGradientScaling(net, num_batches=1)
    before = sgs.scalings
    sgs.begin_epoch(0)
    x = batches(1)[0].clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'a'.*finite"):
        net(x)
    assert all(torch.equal(before[k], v) for k, v in sgs.scalings.items())


# ------------------------------------------------------------------------------------------ fixed scaling
@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (3, 5), (1, 3)])
@pytest.mark.parametrize("edge, corner", [(2.0, 4.0), (0.5, 3.0), (1.0, 1.0)])
def test_fixed_scaling_has_its_ratios_and_mean_one(kernel, edge, corner):
    from cdgrad.sgs import fixed_scaling

    g = fixed_scaling(kernel, edge, corner)
    kh, kw = kernel
    centre = g[kh // 2, kw // 2]
    assert abs(float(g.mean()) - 1.0) < 1e-15
    for i in range(kh):
        for j in range(kw):
            if (i, j) == (kh // 2, kw // 2):
                continue
            ratio = edge if i == kh // 2 or j == kw // 2 else corner
            assert abs(float(centre / g[i, j]) - ratio) < 1e-12, (i, j)


def test_fixed_scaling_equals_an_sgs_transform_loaded_with_the_same_g():
    """Two routes to G * grad: the fixed transform, and SpatialGradientScaling with G loaded by hand."""
    import cdgrad
    from cdgrad.sgs import fixed_scaling

    net = make_net()
    fixed = cdgrad.FixedSpatialScaling(edge=1.5, corner=3.0)
    sgs = SpatialGradientScaling(net)
    state = sgs.state_dict()
    state["scalings"] = {name: fixed_scaling(tuple(m.kernel_size), 1.5, 3.0) for name, m in sgs.layers.items()}
    sgs.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    for name, m in sgs.layers.items():
        grad = torch.randn(m.weight.shape, generator=g, dtype=F64)
        assert fixed.select(m.weight)
        torch.testing.assert_close(fixed(grad, m.weight), sgs(grad, m.weight), rtol=0, atol=1e-15, msg=name)


def test_warmup_delays_the_first_measurement():
    sgs = SpatialGradientScaling(make_net(), every=3, warmup=2)
    assert [e for e in range(12) if sgs.due(e)] == [2, 5, 8, 11]
    assert [e for e in range(7) if SpatialGradientScaling(make_net(), every=3).due(e)] == [0, 3, 6]
    sgs.begin_epoch(1)
    assert not sgs.armed
    sgs.begin_epoch(2)
    assert sgs.armed
    with pytest.raises(ValueError, match="warmup"):
        SpatialGradientScaling(make_net(), warmup=-1)


def test_first_scalings_keep_the_start_of_training():
    """Figs. 4-5 of the SGS paper set G at the start of training beside G at the end: the first measurement is
    kept (and saved), later ones only change `scalings`; states without it load with none."""
    net = make_net()
    sgs = SpatialGradientScaling(net, num_batches=1, every=1)
    assert sgs.first_scalings == {}
    sgs.begin_epoch(0)
    net(batches(1, seed=1)[0])
    first = sgs.scalings
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-2.0).add_(0.3)  # other weights: other inputs for the later layers
    sgs.begin_epoch(1)
    net(batches(1, seed=7)[0] * 3)
    later = sgs.scalings
    assert any(not torch.allclose(first[n], later[n]) for n in first)
    assert sgs.first_scalings.keys() == first.keys()
    assert all(torch.equal(sgs.first_scalings[n], first[n]) for n in first)
    state = sgs.state_dict()
    other = SpatialGradientScaling(make_net(seed=3))
    other.load_state_dict(state)
    assert all(torch.equal(other.first_scalings[n], first[n]) for n in first)
    old = {k: v for k, v in state.items() if k != "first_scalings"}
    other.load_state_dict(old)
    assert other.first_scalings == {} and all(torch.equal(other.scalings[n], later[n]) for n in later)
    with pytest.raises(ValueError, match="first_scalings are for layers"):
        other.load_state_dict({**state, "first_scalings": {"nowhere": torch.ones(3, 3)}})
    assert other.first_scalings == {}


@pytest.mark.parametrize("k", [1e39, 3e38, 1e300])
def test_sgs_scaling_with_k_beyond_float32_gives_the_exact_answer_not_nan(k):
    """`k S` overflows float32 for such k; G must still be the float64 value, rounded, not NaN."""
    s = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s[0, 1, 1] = 0.0
    g = sgs_scaling(s.float(), k)
    assert bool(torch.isfinite(g).all())
    expected = np.stack([ref_scaling(m, k) for m in s.float().double().numpy()])
    np.testing.assert_allclose(g.double().numpy(), expected, rtol=1e-6, atol=1e-7)
