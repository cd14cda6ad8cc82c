"""Spatial gradient scaling (cdgrad.sgs) against naive numpy references, plus Lemma 1 as an exact identity."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cdgrad
import cdgrad.sgs as sgs_module
from cdgrad.sgs import SpatialGradientScaling, normalized_mutual_information, sgs_scaling, spatial_dependence

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def small_chunks(elements: int):
    """Force `_per_channel_mi` to walk the batch in chunks of about `elements` values."""
    old = sgs_module._CHUNK
    sgs_module._CHUNK = elements
    try:
        yield
    finally:
        sgs_module._CHUNK = old


# ------------------------------------------------------------------------------------------- references
def ref_edges(v: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width edges over the sample's own [min, max], the last edge exactly max; constant: bin 0."""
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo + np.arange(bins + 1, dtype=np.float64)
    edges = lo + (hi - lo) * (np.arange(bins + 1) / bins)
    edges[-1] = hi
    return edges


def ref_entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def ref_nmi(p: np.ndarray, q: np.ndarray, bins: int | None = None) -> float:
    """NMI from numpy.histogram2d; Sturges' bins by the textbook formula; 1 when H(P,Q) = 0."""
    n = p.size
    b = bins if bins is not None else int(np.ceil(np.log2(n))) + 1
    counts, _, _ = np.histogram2d(p, q, bins=[ref_edges(p, b), ref_edges(q, b)])
    assert counts.sum() == n  # every observation binned
    joint = counts / n
    h_pq = ref_entropy(joint.ravel())
    if h_pq == 0:
        return 1.0
    return (ref_entropy(joint.sum(1)) + ref_entropy(joint.sum(0)) - h_pq) / h_pq


def ref_abs_corr(p: np.ndarray, q: np.ndarray) -> float:
    flat_p, flat_q = p.min() == p.max(), q.min() == q.max()
    if flat_p and flat_q:
        return 1.0
    if flat_p or flat_q:
        return 0.0
    return float(abs(np.corrcoef(p, q)[0, 1]))


def ref_dependence(x: np.ndarray, kh: int, kw: int, bins=None, method="mi", dilation=(1, 1)) -> np.ndarray:
    """Plain loops: for each kernel entry and channel, gather the pixel pairs one by one, then average."""
    n, c, h, w = x.shape
    live = [ch for ch in range(c) if x[:, ch].min() != x[:, ch].max()]
    if not live:
        return np.ones((kh, kw))
    out = np.zeros((kh, kw))
    for i, j in itertools.product(range(kh), range(kw)):
        di, dj = dilation[0] * (i - kh // 2), dilation[1] * (j - kw // 2)
        values = []
        for ch in live:
            ps, qs = [], []
            for b, a0, a1 in itertools.product(range(n), range(h), range(w)):
                if 0 <= a0 + di < h and 0 <= a1 + dj < w:
                    ps.append(x[b, ch, a0, a1])
                    qs.append(x[b, ch, a0 + di, a1 + dj])
            if not ps:
                values.append(0.0)
            elif method == "mi":
                values.append(ref_nmi(np.array(ps), np.array(qs), bins))
            else:
                values.append(ref_abs_corr(np.array(ps), np.array(qs)))
        out[i, j] = np.mean(values)
    out[kh // 2, kw // 2] = 1.0
    return out


def ref_scaling(s: np.ndarray, k: float) -> np.ndarray:
    g = k * s / ((k - 1) * s + 1)
    return g / g.mean()


def features(seed: int, shape, kind: str = "smooth") -> torch.Tensor:
    """Continuous test maps: spatially smooth (correlated neighbours), white noise, or after a ReLU."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if kind == "smooth":
        x = x.cumsum(axis=-1).cumsum(axis=-2)
    elif kind == "relu":
        x = np.maximum(x.cumsum(axis=-1), 0.0)
    return torch.tensor(x, dtype=F64)


# ----------------------------------------------------------------------------------------------- NMI
@SETTINGS
@given(
    n=st.integers(1, 300),
    batch=st.lists(st.integers(1, 3), max_size=2),
    bins=st.one_of(st.none(), st.integers(1, 25)),
    seed=st.integers(0, 2**31),
    coupling=st.floats(0.0, 3.0),
)
def test_nmi_matches_histogram2d_reference(n, batch, bins, seed, coupling):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(*batch, n))
    q = coupling * p + rng.normal(size=(*batch, n))
    got = normalized_mutual_information(torch.tensor(p), torch.tensor(q), bins)
    assert got.shape == tuple(batch) and got.dtype == F64
    want = np.array([ref_nmi(a, b, bins) for a, b in zip(p.reshape(-1, n), q.reshape(-1, n), strict=True)])
    np.testing.assert_allclose(got.numpy().ravel(), want, rtol=0, atol=1e-12)


@SETTINGS
@given(n=st.integers(2, 400), seed=st.integers(0, 2**31), levels=st.integers(2, 6))
def test_nmi_self_is_one_and_symmetric(n, seed, levels):
    rng = np.random.default_rng(seed)
    continuous = torch.tensor(rng.normal(size=n))
    discrete = torch.tensor(rng.integers(0, levels, size=n).astype(np.float64))  # many ties
    other = torch.tensor(rng.normal(size=n))
    for p in (continuous, discrete):
        assert normalized_mutual_information(p, p).item() == pytest.approx(1.0, abs=1e-12)
        a = normalized_mutual_information(p, other).item()
        b = normalized_mutual_information(other, p).item()
        assert a == pytest.approx(b, abs=1e-12)
        assert 0.0 <= a <= 1.0


def test_nmi_of_independent_samples_is_near_zero_and_of_dependent_ones_is_not():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(50_000, generator=g, dtype=F64), torch.randn(50_000, generator=g, dtype=F64)
    assert normalized_mutual_information(p, q).item() < 0.01
    assert normalized_mutual_information(p, p + 0.3 * q).item() > 0.3


def test_nmi_degenerate_cases():
    x = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=F64)
    c = torch.full((4,), 7.0, dtype=F64)
    assert normalized_mutual_information(c, c + 1).item() == 1.0  # both constant: H(P,Q) = 0
    assert normalized_mutual_information(c, x).item() == 0.0  # one constant: no shared information
    assert normalized_mutual_information(x, c).item() == 0.0
    one = torch.tensor([2.5], dtype=F64)
    assert normalized_mutual_information(one, one * 3).item() == 1.0  # n = 1: a single bin
    assert normalized_mutual_information(x, x, bins=1).item() == 1.0  # one bin: everything constant
    assert normalized_mutual_information(torch.empty(0, 5), torch.empty(0, 5)).shape == (0,)


def test_nmi_keeps_the_input_dtype_and_is_close_in_float32():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 500, generator=g, dtype=F64)
    q = p + torch.randn(2, 500, generator=g, dtype=F64)
    got = normalized_mutual_information(p.float(), q.float())
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), normalized_mutual_information(p, q), atol=2e-2)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([1.0, 2.0], torch.ones(2)), {}, TypeError, "p must be a torch.Tensor"),
        ((torch.ones(2), torch.ones(2, dtype=torch.int64)), {}, TypeError, "q must have a floating dtype"),
        ((torch.ones(3), torch.ones(4)), {}, ValueError, "same shape"),
        ((torch.ones(()), torch.ones(())), {}, ValueError, r"\(\.\.\., n\)"),
        ((torch.ones(3, 0), torch.ones(3, 0)), {}, ValueError, "n >= 1"),
        ((torch.ones(3), torch.ones(3)), {"bins": 0}, ValueError, "bins must be an int >= 1"),
        ((torch.ones(3), torch.ones(3)), {"bins": 2.0}, TypeError, "bins must be an int"),
        ((torch.ones(3), torch.ones(3)), {"bins": True}, TypeError, "bins must be an int"),
        ((torch.tensor([1.0, float("nan")]), torch.ones(2)), {}, ValueError, "p must contain only finite"),
        ((torch.ones(2), torch.tensor([1.0, float("inf")])), {}, ValueError, "q must contain only finite"),
    ],
)
def test_nmi_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        normalized_mutual_information(*args, **kwargs)


# ------------------------------------------------------------------------------------ spatial dependence
@SETTINGS
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    bins=st.one_of(st.none(), st.integers(2, 8)),
    method=st.sampled_from(["mi", "autocorr"]),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    kind=st.sampled_from(["smooth", "noise", "relu"]),
    dead=st.booleans(),
    chunk=st.sampled_from([1, 40, 1 << 20]),
    seed=st.integers(0, 2**31),
)
def test_spatial_dependence_matches_naive_loops(n, c, h, w, kh, kw, bins, method, dilation, kind, dead, chunk, seed):
    x = features(seed, (n, c, h, w), kind)
    if dead:
        x[:, 0] = 0.5  # a constant channel is left out of the average
    with small_chunks(chunk):
        got = spatial_dependence(x, (kh, kw), bins=bins, method=method, dilation=dilation)
    want = ref_dependence(x.numpy(), kh, kw, bins, method, dilation)
    assert got.shape == (kh, kw) and got.dtype == F64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert got[kh // 2, kw // 2].item() == 1.0


@pytest.mark.parametrize("kernel", [(3, 1), (1, 3), (5, 3), (3, 5), (2, 2), (3, 3)])
@pytest.mark.parametrize("method", ["mi", "autocorr"])
def test_spatial_dependence_non_square_kernels(kernel, method):
    x = features(7, (2, 3, 9, 8), "smooth")
    got = spatial_dependence(x, kernel, method=method)
    np.testing.assert_allclose(got.numpy(), ref_dependence(x.numpy(), *kernel, method=method), rtol=0, atol=1e-12)
    kh, kw = kernel
    if kh % 2 and kw % 2:  # d and -d see the same pairs: point symmetric about the centre
        assert torch.equal(got, got.flip(0, 1))


def test_spatial_dependence_orders_directions_by_correlation():
    """Maps smooth along W only: horizontal neighbours are far more dependent than vertical ones."""
    x = features(3, (4, 2, 12, 12), "noise").cumsum(dim=-1)
    for method in ("mi", "autocorr"):
        s = spatial_dependence(x, 3, method=method)
        assert s[1, 0] > s[0, 1] + 0.1 and s[1, 2] > s[2, 1] + 0.1


def test_spatial_dependence_crop_that_loses_the_maximum():
    """The maximum sits on the border, so crops re-bin over their own range (the slow path)."""
    x = features(11, (2, 2, 7, 7), "smooth")
    x[1, 0, 0, 6] = x.max() + 5.0
    x[0, 1, 6, 0] = x.min() - 5.0
    for chunk in (1, 1 << 20):
        with small_chunks(chunk):
            got = spatial_dependence(x, (3, 3), bins=5)
        np.testing.assert_allclose(got.numpy(), ref_dependence(x.numpy(), 3, 3, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["mi", "autocorr"])
def test_spatial_dependence_with_constant_crops_of_a_live_channel(method):
    """x = [0, 1, 0]: at d = +-2 both one-pixel crops are constant (dependence 1); at d = +-1 they are
    [0, 1] and [1, 0], perfectly (anti-)dependent; with a second pixel row one crop only is constant."""
    x = torch.tensor([[[[0.0, 1.0, 0.0]]]], dtype=F64)
    assert torch.equal(spatial_dependence(x, (1, 5), method=method), torch.ones(1, 5, dtype=F64))
    y = torch.tensor([[[[0.0, 1.0, 0.0], [2.0, 0.0, 2.0]]]], dtype=F64)
    got = spatial_dependence(y, (3, 5), method=method)
    np.testing.assert_allclose(got.numpy(), ref_dependence(y.numpy(), 3, 5, method=method), rtol=0, atol=1e-12)


def test_spatial_dependence_ignores_memory_layout():
    x = features(9, (3, 4, 6, 5), "relu")
    for method in ("mi", "autocorr"):
        want = spatial_dependence(x, 3, method=method)
        assert torch.equal(spatial_dependence(x.to(memory_format=torch.channels_last), 3, method=method), want)
        wide = torch.zeros(3, 8, 6, 5, dtype=F64)
        wide[:, ::2] = x
        assert torch.equal(spatial_dependence(wide[:, ::2], 3, method=method), want)  # strided channels


def test_spatial_dependence_degenerate_inputs():
    assert torch.equal(spatial_dependence(torch.zeros(2, 3, 5, 5, dtype=F64), 3), torch.ones(3, 3, dtype=F64))
    tiny = spatial_dependence(features(0, (2, 2, 1, 1)), 3)  # no pixel pairs off-centre
    expected = torch.zeros(3, 3, dtype=F64)
    expected[1, 1] = 1.0
    assert torch.equal(tiny, expected)
    assert spatial_dependence(features(0, (2, 2, 4, 4)).float(), 3).dtype == torch.float32
    assert spatial_dependence(features(0, (2, 2, 4, 4)).half(), 3).dtype == torch.float16


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((np.zeros((1, 1, 3, 3)), 3), {}, TypeError, "features must be a torch.Tensor"),
        ((torch.zeros(1, 1, 3, 3, dtype=torch.int32), 3), {}, TypeError, "features must have a floating"),
        ((torch.zeros(1, 3, 3), 3), {}, ValueError, r"features must have shape \(N, C, H, W\)"),
        ((torch.zeros(0, 1, 3, 3), 3), {}, ValueError, "non-empty"),
        ((torch.zeros(1, 1, 3, 3), 0), {}, ValueError, "kernel_size must be an int >= 1 or a pair"),
        ((torch.zeros(1, 1, 3, 3), (3, 3, 3)), {}, ValueError, "kernel_size must be an int >= 1 or a pair"),
        ((torch.zeros(1, 1, 3, 3), 3), {"method": "pearson"}, ValueError, "method must be one of"),
        ((torch.zeros(1, 1, 3, 3), 3), {"bins": -1}, ValueError, "bins must be an int >= 1"),
        ((torch.zeros(1, 1, 3, 3), 3), {"dilation": 0}, ValueError, "dilation must be"),
        ((torch.full((1, 1, 3, 3), float("nan")), 3), {}, ValueError, "finite"),
        ((torch.full((1, 1, 3, 3), float("inf")), 3), {"method": "autocorr"}, ValueError, "finite"),
    ],
)
def test_spatial_dependence_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        spatial_dependence(*args, **kwargs)


# --------------------------------------------------------------------------------------------- scaling
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
        (torch.ones(2, 2), 0.0, ValueError, "k must be a positive finite"),
        (torch.ones(2, 2), float("inf"), ValueError, "k must be a positive finite"),
        (torch.ones(2, 2), True, TypeError, "k must be a positive finite"),
        (torch.ones(2, 2), "5", TypeError, "k must be a positive finite"),
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
    with pytest.raises(ValueError, match="params must be weights of the conv layers"):
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


def test_wide_joint_codes_use_int32():
    """C * (bins + 1)^2 above 2^15: the codes no longer fit in int16."""
    x = features(4, (2, 100, 3, 3), "noise")
    got = spatial_dependence(x, 3, bins=20)
    np.testing.assert_allclose(got.numpy(), ref_dependence(x.numpy(), 3, 3, 20), rtol=0, atol=1e-12)
    rng = np.random.default_rng(5)
    p, q = rng.normal(size=(100, 50)), rng.normal(size=(100, 50))
    want = [ref_nmi(a, b, 20) for a, b in zip(p, q, strict=True)]
    got = normalized_mutual_information(torch.tensor(p), torch.tensor(q), bins=20)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "model must be a torch.nn.Module"),
        ({"k": 0.0}, ValueError, "k must be a positive finite"),
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
    if not hasattr(cdgrad, "attach"):
        pytest.skip("cdgrad.attach is not available")
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


def sobolev_reference(f: np.ndarray, lam: float) -> np.ndarray:
    """Channel-directed Sobolev gradient along dim 0 through its Fourier multiplier (method.md 1.2)."""
    o = f.shape[0]
    k = np.arange(o).reshape(-1, *([1] * (f.ndim - 1)))
    with np.errstate(divide="ignore"):
        mult = np.where(k == 0, 1.0, 1.0 / (lam * o**2 * (2 - 2 * np.cos(2 * np.pi * k / o))))
    return np.real(np.fft.ifft(np.fft.fft(f, axis=0) * mult, axis=0))


def test_chain_with_channel_directed_sobolev():
    if not (hasattr(cdgrad, "Chain") and hasattr(cdgrad, "ChannelDirected")):
        pytest.skip("cdgrad.Chain / cdgrad.ChannelDirected are not available")
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
        expected.append(sobolev_reference(f, 0.5) + 0.2 * f)
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
    handle = cdgrad.attach(opt_single, sgs) if hasattr(cdgrad, "attach") else None
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
            if opt is opt_single and handle is None:
                sgs.transform_([conv.weight.grad], [conv.weight])
            opt.step()
        worst = max(worst, (merged(branches) - conv.weight).abs().max().item())
        if not adam and not l2_in_loss and opt_kwargs.get("momentum"):
            # the mechanism: the merged velocity is the sum of the (padded) branch velocities
            velocity = merged([opt_branches.state[p]["momentum_buffer"] for p in branches])
            torch.testing.assert_close(velocity, opt_single.state[conv.weight]["momentum_buffer"], rtol=0, atol=1e-12)
    if handle is not None:
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
