"""Fast bounds of conv operator norms, the reshaped-kernel baseline, and the clipper's projections and estimates.

References are independent of the code under test: the dense matrix of the layer (`conv_dense_matrix`, itself
tested against loops and ``nn.Conv2d`` in test_spectral.py) with a brute-force SVD, numpy's FFT and SVD.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cdgrad.norm_bounds import (
    clip_reshaped_norm,
    conv_norm_gram,
    conv_norm_power,
    reshaped_norm,
    reshaped_norm_power,
)
from cdgrad.spectral import (
    NORM_ESTIMATES,
    PROJECTIONS,
    OperatorNormClipper,
    conv_dense_matrix,
    conv_operator_norm,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

shapes = st.tuples(
    st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(0, 3), st.integers(0, 3)
).map(lambda t: (t[0], t[1], t[2], t[3], t[2] + t[4] + 1, t[3] + t[5] + 1))


def weight_of(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[:4], generator=g, dtype=F64)


def dense_norm(weight: torch.Tensor, size: tuple[int, int]) -> float:
    """The brute-force operator norm: largest singular value of the layer's dense matrix."""
    return float(torch.linalg.matrix_norm(conv_dense_matrix(weight, size), ord=2))


def numpy_reshaped_norm(weight: torch.Tensor) -> float:
    w = weight.numpy()
    return float(np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0])


# ----------------------------------------------------------------------------- reshaped kernel


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_reshaped_norm_brackets_the_operator_norm(shape, seed):
    """||R|| = numpy's SVD, and ||R|| <= ||conv|| <= sqrt(kh kw) ||R|| (sum_uv P P^H = n_h n_w R R^T)."""
    w = weight_of(shape, seed)
    size = shape[4:]
    r = float(reshaped_norm(w))
    assert r == pytest.approx(numpy_reshaped_norm(w), rel=1e-12)
    exact = dense_norm(w, size)
    assert r <= exact * (1 + 1e-10)
    assert exact <= math.sqrt(shape[2] * shape[3]) * r * (1 + 1e-10)


def test_reshaped_bounds_are_attained():
    """Lower bound attained by a kernel with one tap; upper bound by a constant kernel (all taps add up at 0)."""
    one_tap = torch.zeros(3, 2, 3, 3, dtype=F64)
    one_tap[:, :, 1, 2] = torch.randn(3, 2, dtype=F64)
    assert dense_norm(one_tap, (5, 5)) == pytest.approx(float(reshaped_norm(one_tap)), rel=1e-10)
    constant = torch.ones(1, 1, 3, 3, dtype=F64)
    assert dense_norm(constant, (5, 5)) == pytest.approx(3.0 * float(reshaped_norm(constant)), rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), frac=st.floats(0.05, 1.5))
def test_clip_reshaped_norm_matches_numpy_svd_clip(shape, seed, frac):
    w = weight_of(shape, seed)
    c = frac * numpy_reshaped_norm(w)
    m = w.numpy().reshape(shape[0], -1)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    expected = ((u * np.minimum(s, c)) @ vh).reshape(w.shape)
    before = w.clone()
    out = clip_reshaped_norm(w, c)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12 * max(1.0, float(s[0])))
    assert float(reshaped_norm(out)) <= c * (1 + 1e-10)
    assert torch.equal(w, before) and out.shape == w.shape and out.dtype == F64 and not out.requires_grad


def test_clip_reshaped_inside_is_unchanged_and_keeps_dtype():
    w = torch.randn(4, 3, 3, 3)
    assert torch.equal(clip_reshaped_norm(w, float(reshaped_norm(w)) * 1.01), w)
    out = clip_reshaped_norm(w.to(torch.bfloat16), 0.5)
    assert out.dtype == torch.bfloat16 and float(reshaped_norm(out.float())) <= 0.5 * 1.02


def test_reshaped_power_iteration_is_a_lower_bound_that_converges_and_warm_starts():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=F64)
    exact = float(reshaped_norm(w))
    previous = 0.0
    for iters in (1, 2, 4, 8, 16):
        est, u = reshaped_norm_power(w, iters=iters)
        assert previous - 1e-12 <= float(est) <= exact * (1 + 1e-12)
        previous = float(est)
    est, u = reshaped_norm_power(w, iters=300)
    assert float(est) == pytest.approx(exact, rel=1e-9)
    assert u.shape == (16,) and float(u.norm()) == pytest.approx(1.0)
    # one iteration from the vector of the previous step beats one from the fixed start on a nearby weight
    moved = w + 1e-3 * torch.randn_like(w)
    target = float(reshaped_norm(moved))
    warm, _ = reshaped_norm_power(moved, vector=u, iters=1)
    cold, _ = reshaped_norm_power(moved, iters=1)
    assert target - float(warm) < 1e-3 * (target - float(cold))


# ----------------------------------------------------------------------------- power iteration


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), iters=st.integers(1, 6))
def test_power_iteration_never_exceeds_the_exact_norm_and_increases(shape, seed, iters):
    """sqrt(x^T A^T A x) of a unit x is at most ||A||; the Rayleigh quotient of M^n x0 does not decrease in n."""
    w = weight_of(shape, seed)
    size = shape[4:]
    exact = dense_norm(w, size)
    est, x = conv_norm_power(w, size, iters=iters)
    more, _ = conv_norm_power(w, size, iters=iters + 1)
    assert float(est) <= exact * (1 + 1e-10)
    assert float(more) >= float(est) * (1 - 1e-10)
    assert x.shape == (shape[1], *size) and float(x.norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("shape,size", [((8, 4, 3, 3), (6, 6)), ((3, 5, 3, 1), (5, 4)), ((6, 6, 1, 1), (3, 3))])
def test_power_iteration_converges_to_the_exact_norm(shape, size):
    torch.manual_seed(3)
    w = torch.randn(shape, dtype=F64)
    est, _ = conv_norm_power(w, size, iters=2000)
    assert float(est) == pytest.approx(dense_norm(w, size), rel=1e-6)


def test_power_iteration_warm_start_tracks_a_moving_weight():
    """A training-like sequence of small changes: two iterations per step from the kept vector stay close to
    the exact norm, much closer than two iterations from the fixed start."""
    torch.manual_seed(4)
    w = torch.randn(8, 8, 3, 3, dtype=F64)
    _, x = conv_norm_power(w, 8, iters=200)
    warm_gaps, cold_gaps = [], []
    for _ in range(10):
        w = w + 1e-3 * torch.randn_like(w)
        exact = float(conv_operator_norm(w, 8))
        warm, x = conv_norm_power(w, 8, vector=x, iters=2)
        cold, _ = conv_norm_power(w, 8, iters=2)
        warm_gaps.append((exact - float(warm)) / exact)
        cold_gaps.append((exact - float(cold)) / exact)
    assert max(warm_gaps) < 1e-3 and max(warm_gaps) < 0.1 * min(cold_gaps)


def test_power_iteration_vector_checks():
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"vector must have shape \(2, 6, 6\)"):
        conv_norm_power(w, 6, vector=torch.randn(2, 5, 5, dtype=F64))
    with pytest.raises(TypeError, match="vector"):
        conv_norm_power(w, 6, vector=[1.0, 2.0])
    # a zero (or non-finite) vector restarts from the fixed start vector
    fresh, _ = conv_norm_power(w, 6, iters=3)
    again, _ = conv_norm_power(w, 6, vector=torch.zeros(2, 6, 6, dtype=F64), iters=3)
    assert float(fresh) == float(again)
    with pytest.raises(ValueError, match="iters"):
        conv_norm_power(w, 6, iters=0)
    state = torch.random.get_rng_state()
    conv_norm_power(w, 6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


# ----------------------------------------------------------------------------- Gram iteration


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_gram_bound_is_certified_and_tightens(shape, seed):
    """exact <= bound_t <= min(O, I)^(1 / 2^(t+1)) exact, and bound_t does not increase with t."""
    w = weight_of(shape, seed)
    size = shape[4:]
    exact = dense_norm(w, size)
    rank = min(shape[0], shape[1])
    previous = math.inf
    for t in range(8):
        bound = float(conv_norm_gram(w, size, iters=t))
        assert bound >= exact * (1 - 1e-12)
        assert bound <= exact * rank ** (1 / 2 ** (t + 1)) * (1 + 1e-10)
        assert bound <= previous * (1 + 1e-12)
        previous = bound


def test_gram_zero_iterations_is_the_largest_frobenius_norm():
    torch.manual_seed(5)
    w = torch.randn(4, 3, 3, 2, dtype=F64)
    p = np.fft.fft2(w.numpy(), s=(5, 6))
    expected = max(np.linalg.norm(p[:, :, u, v]) for u in range(5) for v in range(6))
    assert float(conv_norm_gram(w, (5, 6), iters=0)) == pytest.approx(expected, rel=1e-12)


def test_gram_bound_converges_and_does_not_overflow():
    torch.manual_seed(6)
    w = torch.randn(16, 16, 3, 3, dtype=F64)
    exact = float(conv_operator_norm(w, 8))
    assert float(conv_norm_gram(w, 8, iters=12)) == pytest.approx(exact, rel=1e-10)
    # G_t grows like sigma^(2^t): without the rescaling 1e30 ** 64 overflows float64
    huge = float(conv_norm_gram(w * 1e30, 8, iters=6))
    assert huge == pytest.approx(1e30 * float(conv_norm_gram(w, 8, iters=6)), rel=1e-10)
    tiny = float(conv_norm_gram(w * 1e-30, 8, iters=6))
    assert tiny == pytest.approx(1e-30 * float(conv_norm_gram(w, 8, iters=6)), rel=1e-10)


def test_gram_and_power_in_float32():
    torch.manual_seed(7)
    w = torch.randn(8, 4, 3, 3)
    exact = float(conv_operator_norm(w.double(), 7))
    bound = conv_norm_gram(w, 7)
    est, x = conv_norm_power(w, 7, iters=50)
    assert bound.dtype == torch.float32 and x.dtype == torch.float32
    assert float(bound) >= exact * (1 - 1e-5) and float(est) <= exact * (1 + 1e-5)
    assert float(bound) == pytest.approx(exact, rel=1e-3)


def test_zero_weight_has_zero_bounds():
    w = torch.zeros(3, 2, 3, 3, dtype=F64)
    assert float(conv_norm_gram(w, 5)) == 0.0
    assert float(conv_norm_power(w, 5)[0]) == 0.0
    assert float(reshaped_norm(w)) == 0.0 and float(reshaped_norm_power(w)[0]) == 0.0


def test_bounds_on_a_trained_layer():
    """A layer after real training steps (a small CNN fitted to a fixed task): bracketing holds there too."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 2, 8, 8, dtype=F64), torch.randn(16, 4, 8, 8, dtype=F64)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    for conv in (net[0], net[2]):
        w = conv.weight.detach()
        exact = dense_norm(w, (8, 8))
        assert float(reshaped_norm(w)) <= exact * (1 + 1e-10)
        assert float(conv_norm_power(w, 8, iters=500)[0]) == pytest.approx(exact, rel=1e-6)
        assert exact * (1 - 1e-12) <= float(conv_norm_gram(w, 8)) <= exact * 1.01


@pytest.mark.parametrize("fn", [conv_norm_gram, lambda w, s: conv_norm_power(w, s)[0]])
def test_bound_bad_input(fn):
    with pytest.raises(ValueError, match="input_size"):
        fn(torch.randn(2, 2, 3, 3), 0)
    with pytest.raises(ValueError, match="4-D"):
        fn(torch.randn(2, 3, 3), 4)
    with pytest.raises(TypeError, match="input_size"):
        fn(torch.randn(2, 2, 3, 3), "8")
    with pytest.raises(ValueError, match="non-finite"):
        fn(torch.full((2, 2, 3, 3), float("nan")), 4)


def test_reshaped_bad_input():
    with pytest.raises(ValueError, match="max_norm"):
        clip_reshaped_norm(torch.randn(2, 2, 3, 3), 0.0)
    with pytest.raises(ValueError, match="4-D"):
        reshaped_norm(torch.randn(4, 4))
    with pytest.raises(ValueError, match="iters"):
        reshaped_norm_power(torch.randn(2, 2, 3, 3), iters=0)


# ----------------------------------------------------------------------------- the regulariser form


def test_operator_norm_penalty_gradient_matches_finite_differences():
    """The penalty `loss + mu * conv_operator_norm(conv.weight, n)` needs no new API: its gradient is exact."""
    torch.manual_seed(9)
    w = torch.randn(3, 2, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: conv_operator_norm(k, 5), (w,))


# ----------------------------------------------------------------------------- clipper projections and estimates


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.c1(x))


def scaled_net(scale: float = 5.0) -> Net:
    torch.manual_seed(10)
    net = Net().double()
    with torch.no_grad():
        for m in (net.c1, net.c2):
            m.weight.mul_(scale)
    return net


def test_projection_registry_and_accepted_names():
    assert set(PROJECTIONS) == {"exact", "reshaped", "gram"}
    assert all(p.summary for p in PROJECTIONS.values())
    net = scaled_net()
    with pytest.raises(ValueError, match="projection.*exact.*reshaped.*gram"):
        OperatorNormClipper(net, 8, max_norm=1.0, projection="frobenius")
    clipper = OperatorNormClipper(net, 8, max_norm=1.0)
    with pytest.raises(ValueError, match="estimate.*exact.*power.*gram.*reshaped"):
        clipper.operator_norms("svd")
    assert clipper.projection == "exact" and "projection='exact'" in repr(clipper)


def test_reshaped_projection_bounds_the_reshaped_norm_only():
    net = scaled_net()
    clipper = OperatorNormClipper(net, 8, max_norm=0.5, every=1, projection="reshaped")
    before = net.c1.weight.detach().clone()
    clipper.after_step()
    assert torch.equal(net.c1.weight.detach(), clip_reshaped_norm(before, 0.5))
    for m in (net.c1, net.c2):
        assert float(reshaped_norm(m.weight)) <= 0.5 * (1 + 1e-10)
        assert float(conv_operator_norm(m.weight.detach(), 8)) <= 0.5 * 3 * (1 + 1e-10)  # sqrt(kh kw) = 3


def test_gram_projection_is_certified_after_one_step_and_leaves_inside_alone():
    net = scaled_net()
    clipper = OperatorNormClipper(net, 8, max_norm=0.5, every=1, projection="gram")
    clipper.after_step()
    for m in (net.c1, net.c2):
        assert dense_norm(m.weight.detach(), (8, 8)) <= 0.5 * (1 + 1e-12)
    inside = [m.weight.detach().clone() for m in (net.c1, net.c2)]
    OperatorNormClipper(net, 8, max_norm=10.0, every=1, projection="gram").after_step()
    assert all(torch.equal(m.weight, w) for m, w in zip((net.c1, net.c2), inside, strict=True))


def test_estimates_bracket_the_exact_norm_and_power_vectors_persist():
    net = scaled_net()
    clipper = OperatorNormClipper(net, {"c1": 8, "c2": (8, 6)}, max_norm=1.0)
    exact = clipper.operator_norms()
    gram = clipper.operator_norms("gram")
    reshaped = clipper.operator_norms("reshaped")
    first = clipper.operator_norms("power")
    for _ in range(200):
        later = clipper.operator_norms("power")
    for name in exact:
        assert reshaped[name] <= exact[name] * (1 + 1e-10) and exact[name] <= gram[name] * (1 + 1e-12)
        assert first[name] <= later[name] * (1 + 1e-12) and later[name] <= exact[name] * (1 + 1e-10)
        assert later[name] == pytest.approx(exact[name], rel=1e-6)
    state = clipper.state_dict()
    assert state["projection"] == "exact" and set(state["power_vectors"]) == {"c1", "c2"}
    assert state["power_vectors"]["c2"].shape == (8, 4, 6) and state["power_vectors"]["c2"].is_complex()
    other = OperatorNormClipper(net, 8, max_norm=2.0, projection="gram")
    other.load_state_dict(state)
    assert other.projection == "exact" and other.input_sizes == clipper.input_sizes
    assert other.operator_norms("power") == clipper.operator_norms("power")  # the same warm vectors


def test_clipper_state_checks_and_older_states():
    net = scaled_net()
    c = OperatorNormClipper(net, 8, max_norm=1.0, projection="reshaped")
    c.operator_norms("power")
    good = c.state_dict()
    for bad in [
        {**good, "projection": "svd"},
        {**good, "power_vectors": {"c9": torch.zeros(2, 8, 8)}},
        {**good, "power_vectors": {"c1": torch.zeros(2, 4, 4)}},
        {**good, "power_vectors": {"c1": [0.0]}},
        {**good, "power_vectors": [1, 2]},
    ]:
        with pytest.raises(ValueError, match="projection|power_vectors"):
            c.load_state_dict(bad)
        after = c.state_dict()
        assert after["projection"] == "reshaped" and after.keys() == good.keys()
        assert all(torch.equal(after["power_vectors"][k], v) for k, v in good["power_vectors"].items())
    global_vectors = {**good, "power_vectors": {"c1": torch.ones(good["power_vectors"]["c1"].shape[-1], 8, 8)}}
    c.load_state_dict(global_vectors)  # the older global iteration's vectors: dropped, the next estimate starts cold
    assert c.state_dict()["power_vectors"] == {}
    older = {k: v for k, v in good.items() if k not in ("projection", "power_vectors")}
    c.load_state_dict(older)  # states written before projections existed: the exact projection, no vectors
    assert c.projection == "exact" and c.state_dict()["power_vectors"] == {}


def test_every_projection_and_estimate_leaves_the_model_alone_on_bad_input():
    net = scaled_net()
    before = [p.detach().clone() for p in net.parameters()]
    for projection in PROJECTIONS:
        clipper = OperatorNormClipper(net, 8, max_norm=1.0, projection=projection)
        with torch.no_grad():
            net.c2.weight[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="layer 'c2'.*non-finite"):
            clipper.clip_()
        for estimate in NORM_ESTIMATES:
            with pytest.raises(ValueError, match="layer 'c2'"):
                clipper.operator_norms(estimate)
        with torch.no_grad():
            net.c2.weight[0, 0, 0, 0] = before[2][0, 0, 0, 0]
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="groups=1 and dilation=1"):
        OperatorNormClipper(nn.Conv2d(2, 2, 3, dilation=2), 8, max_norm=1.0, projection="gram")
    with pytest.raises(ValueError, match="max_norm"):
        OperatorNormClipper(net, 8, max_norm=-1.0, projection="reshaped")


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_contract(name, dtype):
    """Every registered projection: pure, same shape and dtype, a kernel inside the ball returned unchanged, and
    the exact norm of a kernel outside it brought down (never up)."""
    project = PROJECTIONS[name].apply
    torch.manual_seed(12)
    w = (3.0 * torch.randn(5, 4, 3, 3)).to(dtype)
    before = w.clone()
    exact = float(conv_operator_norm(w.double(), (7, 6)))
    out = project(w, (7, 6), 0.5 * exact)
    assert torch.equal(w, before) and out.shape == w.shape and out.dtype == dtype and not out.requires_grad
    assert float(conv_operator_norm(out.double(), (7, 6))) < exact
    inside = project(w, (7, 6), 1.01 * exact * 3.0)  # above the exact norm and above 3x the reshaped norm
    assert torch.equal(inside, w) and inside.data_ptr() != w.data_ptr()


# ----------------------------------------------------------------------------- memory: refuse what cannot fit
def _limit_memory(monkeypatch, free):
    from cdgrad import validation

    monkeypatch.setattr(validation, "ALWAYS_FITS", 0)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: free)


BOUND_CALLS = {
    "power": lambda w, s: conv_norm_power(w, s, iters=3)[0],
    "gram": lambda w, s: conv_norm_gram(w, s),
}


@pytest.mark.parametrize("name", BOUND_CALLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounds_refuse_a_size_that_cannot_fit_and_compute_at_the_boundary(monkeypatch, name, dtype):
    from cdgrad.spectral import memory_needed
    from cdgrad.validation import MemoryRequestError

    w = torch.randn(5, 3, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected = BOUND_CALLS[name](w, (7, 9))
    _limit_memory(monkeypatch, 64 * 2**30)
    with pytest.raises(MemoryRequestError, match=r"input_size=100000 needs about .*TiB"):
        BOUND_CALLS[name](w, 100000)
    need = memory_needed(name, w.shape, (7, 9), dtype)
    _limit_memory(monkeypatch, need - 1)
    with pytest.raises(MemoryRequestError, match=r"input_size=\(7, 9\)"):
        BOUND_CALLS[name](w, (7, 9))
    _limit_memory(monkeypatch, need)
    assert torch.equal(BOUND_CALLS[name](w, (7, 9)), expected)


def test_reshaped_svds_refuse_a_weight_whose_factors_cannot_fit(monkeypatch):
    from cdgrad.validation import MemoryRequestError

    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    expected = (reshaped_norm(w), clip_reshaped_norm(w, 0.5))
    need = (2 * 6 * 36 + 6 * (6 + 36)) * 8  # R's copy and U, V^H of the 6 x 36 reshaped kernel, float64
    _limit_memory(monkeypatch, need - 1)
    for call in (lambda: reshaped_norm(w), lambda: clip_reshaped_norm(w, 0.5)):
        with pytest.raises(MemoryRequestError, match=r"weight.shape=\(6, 4, 3, 3\) needs .*reshaped kernel"):
            call()
    _limit_memory(monkeypatch, need)
    assert torch.equal(reshaped_norm(w), expected[0]) and torch.equal(clip_reshaped_norm(w, 0.5), expected[1])


@settings(max_examples=25, deadline=None)
@given(
    o=st.integers(1, 6),
    i=st.integers(1, 6),
    k=st.sampled_from([1, 2, 3]),
    n_h=st.integers(3, 7),
    n_w=st.integers(3, 7),
    seed=st.integers(0, 2**16),
)
def test_per_frequency_power_iteration_is_a_lower_bound_converging_to_the_exact_norm(o, i, k, n_h, n_w, seed):
    """Against the dense matrix's SVD (float64): every estimate is below the norm, and the per-frequency
    iteration converges at each frequency's own gap (far fewer iterations than the global one)."""
    w = torch.randn(o, i, k, k, generator=torch.Generator().manual_seed(seed), dtype=F64)
    size = (max(n_h, k), max(n_w, k))
    exact = float(torch.linalg.svdvals(conv_dense_matrix(w, size))[0])
    estimates = [float(conv_norm_power(w, size, iters=t, per_frequency=True)[0]) for t in (1, 3, 300)]
    assert all(e <= exact * (1 + 1e-12) for e in estimates)
    assert estimates[-1] == pytest.approx(exact, rel=1e-9)


def test_per_frequency_power_iteration_warm_starts_and_checks_its_vector():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 6, 3, 3, generator=gen, dtype=F64)
    exact = float(conv_operator_norm(w, 8))
    _, x = conv_norm_power(w, 8, iters=100, per_frequency=True)
    assert x.shape == (8, 5, 6) and x.is_complex()
    moved = w + 1e-3 * torch.randn(w.shape, generator=gen, dtype=F64)
    moved_exact = float(conv_operator_norm(moved, 8))
    warm, _ = conv_norm_power(moved, 8, vector=x, iters=1, per_frequency=True)
    cold, _ = conv_norm_power(moved, 8, iters=1, per_frequency=True)
    assert float(warm) <= moved_exact * (1 + 1e-12) and float(warm) == pytest.approx(moved_exact, rel=1e-4)
    assert float(cold) < float(warm)
    assert exact > 0
    with pytest.raises(ValueError, match="vector must be a complex tensor of shape"):
        conv_norm_power(w, 8, vector=torch.zeros(6, 8, 8, dtype=F64), per_frequency=True)
    zero = torch.zeros(8, 5, 6, dtype=torch.complex128)  # a zero vector restarts from the fixed start vector
    assert float(conv_norm_power(w, 8, vector=zero, iters=3, per_frequency=True)[0]) == float(
        conv_norm_power(w, 8, iters=3, per_frequency=True)[0]
    )


# ----------------------------------------------------------------------------- the two per-frequency paths


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), iters=st.integers(1, 4), warm=st.booleans())
def test_per_frequency_native_kernel_equals_the_batched_products(shape, seed, iters, warm):
    """The native kernel (spectrum built from the taps, vectors across frequencies) against the batched complex
    products on the FFT spectrum (float64), cold and warm, with folding (inputs smaller than the kernel); and the
    estimate of one iteration from a warm vector is at least its Rayleigh value max_uv ||P[u, v] x_uv||."""
    from cdgrad import _conv_spectrum, _native
    from cdgrad import norm_bounds as nb

    if _native.library() is None:
        pytest.skip("no native kernel here")
    w = weight_of(shape, seed)
    size = shape[4:]
    start = None
    if warm:
        gen = torch.Generator().manual_seed(seed + 1)
        start = torch.randn((size[0], size[1] // 2 + 1, shape[1]), generator=gen, dtype=torch.complex128)
    native = conv_norm_power(w, size, vector=start, iters=iters, per_frequency=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nb, "native_usable", lambda: False)
        batched = conv_norm_power(w, size, vector=start, iters=iters, per_frequency=True)
    assert float(native[0]) == pytest.approx(float(batched[0]), rel=1e-12, abs=1e-300)
    torch.testing.assert_close(native[1], batched[1], rtol=1e-10, atol=1e-12)
    if start is not None:
        p = _conv_spectrum.half_spectrum_fft(w, size)
        unit = start / torch.linalg.vector_norm(start, dim=-1, keepdim=True)
        rayleigh = float(torch.linalg.vector_norm(p @ unit.unsqueeze(-1), dim=(-2, -1)).amax())
        one, _ = conv_norm_power(w, size, vector=start, iters=1, per_frequency=True)
        assert float(one) >= rayleigh * (1 - 1e-12)
    estimates = [float(conv_norm_power(w, size, vector=start, iters=t, per_frequency=True)[0]) for t in (1, 2, 3)]
    assert estimates == sorted(estimates) or max(estimates) - min(estimates) <= 1e-12 * max(estimates)


def test_per_frequency_native_kernel_in_float32_tracks_float64():
    gen = torch.Generator().manual_seed(8)
    for o, i, n in ((16, 3, 32), (32, 16, 16), (20, 36, 9), (5, 7, 2)):
        w = torch.randn(o, i, 3, 3, generator=gen, dtype=F64)
        exact = float(conv_operator_norm(w, n))
        single, x = conv_norm_power(w.float(), n, iters=40, per_frequency=True)
        assert single.dtype == torch.float32 and x.dtype == torch.complex64
        assert float(single) == pytest.approx(exact, rel=2e-5)
        assert float(single) <= exact * (1 + 1e-5)
