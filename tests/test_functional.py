"""The pure kernels against independent float64 references and the identities of method.md."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cdgrad
from cdgrad import _kernels as K
from cdgrad import _native
from cdgrad import functional as F
from helpers import dense_laplacian_smooth, dense_sobolev, fft_sobolev, loop_centralize, loop_h0, rel_err

REFERENCE = {"h0": F.reweighted_h0_reference, "sobolev": F.sobolev_reference}  # the plain-PyTorch path

pytestmark = pytest.mark.usefixtures("float64_default")
SETTINGS = settings(max_examples=40, deadline=None)


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)
lams = st.floats(0.05, 20.0)


def dims_for(shape):
    return [0, None] + ([1] if len(shape) > 1 else [])


# ------------------------------------------------------------------------------------------- Sobolev
@SETTINGS
@given(shape=shapes, lam=lams, seed=st.integers(0, 2**16))
def test_sobolev_matches_dense_and_fft_solves(shape, lam, seed):
    """The FFT solve is well conditioned; the dense solve's own error grows with cond(A) ~ 4 lam n^2."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for dim in dims_for(shape):
        n = x.numel() if dim is None else shape[dim]
        dense_tol = max(1e-10, 1e-14 * 4 * lam * n * n)
        for g in (cdgrad.sobolev(x, lam, dim), F.sobolev_reference(x, lam, dim)):
            assert rel_err(g, fft_sobolev(x, lam, dim)) < 1e-10
            if n <= 128:  # a dense solve of a longer rasterised fiber is slow and even worse conditioned
                assert rel_err(g, dense_sobolev(x, lam, dim)) < dense_tol


@SETTINGS
@given(shape=shapes, lam=lams, seed=st.integers(0, 2**16))
def test_sobolev_is_the_riemannian_gradient(shape, lam, seed):
    """sum(f*k) == O sum(mean(g) mean(k)) + lam O^2 sum(Dg Dk) for every tangent vector k (method.md eq. 7)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, generator=gen)
    g = cdgrad.sobolev(f, lam, 0)
    n = shape[0]
    for _ in range(3):
        k = torch.randn(shape, generator=gen)
        D = lambda u: torch.roll(u, -1, dims=0) - u
        lhs = (f * k).sum()
        rhs = n * (g.mean(0) * k.mean(0)).sum() + lam * n * n * (D(g) * D(k)).sum()
        assert abs(lhs - rhs) <= 1e-10 * max(1.0, (f.abs() * k.abs()).sum().item())


def test_sobolev_matches_continuum_kernel_of_eq9():
    """The discrete solution approximates the circular convolution with K(x) = 1 + (x^2 - x + 1/6)/(2 lam)."""
    O, lam = 64, 1.0
    f = torch.randn(O, 32, 3, 3, generator=torch.Generator().manual_seed(0))
    x = torch.arange(O) / O
    K = 1 + (x**2 - x + 1 / 6) / (2 * lam)
    C = torch.stack([torch.roll(K, o) for o in range(O)])  # C[o, j] = K((o - j) mod O / O)
    continuum = torch.einsum("oj,j...->o...", C, f) / O
    err = rel_err(cdgrad.sobolev(f, lam), continuum)
    assert err < 1e-3
    assert err > 0  # the discrete and continuum operators are different


@SETTINGS
@given(shape=shapes, lam=lams, seed=st.integers(0, 2**16))
def test_mean_is_preserved(shape, lam, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for fn in (cdgrad.sobolev, cdgrad.reweighted_h0):
        for dim in dims_for(shape):
            flat = dim is None
            g = fn(x, lam, dim)
            a, b = (g.reshape(-1), x.reshape(-1)) if flat else (g, x)
            torch.testing.assert_close(a.mean(0 if flat else dim), b.mean(0 if flat else dim), rtol=0, atol=1e-12)


def test_single_channel_returns_input():
    x = torch.randn(1, 5, 3, 3)
    torch.testing.assert_close(cdgrad.sobolev(x, 0.3), x, rtol=0, atol=1e-15)
    torch.testing.assert_close(cdgrad.reweighted_h0(x, 0.3), x, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------ H0
@SETTINGS
@given(shape=shapes, lam=lams, seed=st.integers(0, 2**16))
def test_h0_matches_loop(shape, lam, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for dim in dims_for(shape):
        assert rel_err(cdgrad.reweighted_h0(x, lam, dim), loop_h0(x, lam, dim)) < 1e-12


def test_h0_lambda_one_is_identity_and_large_lambda_keeps_the_mean():
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(cdgrad.reweighted_h0(x, 1.0), x, rtol=0, atol=1e-15)
    big = cdgrad.reweighted_h0(x, 1e12)
    torch.testing.assert_close(big, x.mean(0, keepdim=True).expand_as(x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------- Laplacian, centralise
@SETTINGS
@given(shape=shapes, sigma=st.floats(0.0, 5.0), seed=st.integers(0, 2**16))
def test_laplacian_smoothing_matches_dense_solve(shape, sigma, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for dim in dims_for(shape):
        assert rel_err(cdgrad.laplacian_smooth(x, sigma, dim), dense_laplacian_smooth(x, sigma, dim)) < 1e-10


def test_laplacian_smoothing_sigma_zero_is_identity():
    x = torch.randn(6, 5, 3)
    torch.testing.assert_close(cdgrad.laplacian_smooth(x, 0.0), x, rtol=0, atol=0)


@SETTINGS
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple), seed=st.integers(0, 2**16))
def test_centralize_matches_loop(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert rel_err(cdgrad.centralize(x), loop_centralize(x)) < 1e-12


# ------------------------------------------------------------------------- dtypes, layouts, purity
@pytest.mark.parametrize("fn", [cdgrad.sobolev, cdgrad.reweighted_h0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_floating_dtype(fn, dtype):
    x64 = torch.randn(16, 8, 3, 3)
    exact = fn(x64, 0.5)
    out = fn(x64.to(dtype), 0.5)
    assert out.dtype == dtype and out.shape == x64.shape
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert rel_err(out.double(), exact) < tol


@pytest.mark.parametrize("fn", [cdgrad.sobolev, cdgrad.reweighted_h0, cdgrad.laplacian_smooth])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_non_contiguous_and_channels_last(fn, dtype, dim):
    base = torch.randn(12, 10, 5, 5, dtype=dtype)
    views = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
        "strided": torch.randn(24, 10, 5, 5, dtype=dtype)[::2],
    }
    for name, v in views.items():
        before = v.clone()
        out = fn(v, 0.7, dim)
        expected = fn(v.contiguous(), 0.7, dim)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err(out, expected) < tol, name
        assert torch.equal(v, before), f"{name}: input modified"


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_native_path_agrees_with_reference(metric, monkeypatch):
    if _native.library() is None:
        pytest.skip("no C compiler: only the reference path exists here")
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 3, 3), (3, 1, 1, 1), (64, 32, 3, 3), (1000, 3), (5, 7, 2, 9), (2050, 2)]:
        for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 2e-6)]:
            x = torch.randn(shape, generator=gen, dtype=dtype)
            for dim in [0, 1, None]:
                fast = F.channel_directed(x, metric, 0.37, -0.2, dim)
                ref = REFERENCE[metric](x.double(), 0.37, dim, -0.2)
                assert rel_err(fast.double(), ref) < tol, (shape, dtype, dim)
                inplace = x.clone()
                F.channel_directed_([inplace], metric, 0.37, -0.2, dim)
                assert torch.equal(inplace, fast)
    monkeypatch.setattr(_native, "library", lambda: None)
    x = torch.randn(9, 4, 3, 3, generator=gen)
    assert rel_err(F.channel_directed(x, metric, 2.0, 0.1, 0), REFERENCE[metric](x, 2.0, 0, 0.1)) < 1e-14


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=4).map(tuple),
    lam=lams,
    beta=st.floats(-1.0, 1.0),
    metric=st.sampled_from(["h0", "sobolev"]),
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
)
@example(shape=(1,), lam=0.5, beta=-0.99999, metric="h0", seed=1, layout="contiguous")  # g(f) + beta f cancels
def test_native_in_place_path_agrees_with_reference_for_any_shape(shape, lam, beta, metric, seed, layout):
    """The attach() path (in place, one kernel call for a list) against the reference, shapes and layouts varied."""
    if _native.library() is None:
        pytest.skip("no C compiler: only the reference path exists here")
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a non-dense view: the kernel works on a copy that is written back
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)
        target, untouched = base[..., ::2], base[..., 1::2].clone()
    else:
        target = torch.randn(shape, generator=gen)
        if layout == "channels_last" and target.dim() == 4:
            target = target.to(memory_format=torch.channels_last)
    x, strides = target.clone(), target.stride()
    for dim in dims_for(shape):
        view = target if dim == dims_for(shape)[-1] else target.clone(memory_format=torch.preserve_format)
        single = x.float()
        F.channel_directed_([view, single], metric, lam, beta, dim)
        expected = REFERENCE[metric](x, lam, dim, beta)
        # errors relative to the summands g(f) and beta f: their sum cancels when beta is near -1 on a constant fiber
        scale = float((expected - beta * x).abs().max() + abs(beta) * x.abs().max())
        assert float((view - expected).abs().max()) <= 1e-11 * scale
        assert float((single.double() - expected).abs().max()) <= 1e-4 * scale
    assert target.stride() == strides
    if layout == "strided":
        assert torch.equal(base[..., 1::2], untouched)


def test_float32_long_axis_is_accurate():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3))
    exact = cdgrad.sobolev(x, 1.0, None)
    assert rel_err(cdgrad.sobolev(x.float(), 1.0, None).double(), exact) < 1e-4


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        cdgrad.sobolev(torch.randn(3, 3), lam)
    with pytest.raises(ValueError, match="lam"):
        cdgrad.reweighted_h0(torch.randn(3, 3), lam)


def test_bad_types_and_values():
    with pytest.raises(TypeError, match="lam"):
        cdgrad.sobolev(torch.randn(3, 3), "1")
    with pytest.raises(TypeError, match="lam"):
        cdgrad.sobolev(torch.randn(3, 3), True)
    with pytest.raises(ValueError, match="sigma"):
        cdgrad.laplacian_smooth(torch.randn(3, 3), -0.1)
    with pytest.raises(TypeError, match="floating"):
        cdgrad.sobolev(torch.ones(3, 3, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="sparse"):
        cdgrad.reweighted_h0(torch.eye(3).to_sparse(), 1.0)
    with pytest.raises(ValueError, match="dim"):
        cdgrad.sobolev(torch.randn(3), 1.0, dim=1)
    with pytest.raises(TypeError, match="dim"):
        cdgrad.sobolev(torch.randn(3, 3), 1.0, dim="output")
    with pytest.raises(ValueError, match="centralize"):
        cdgrad.centralize(torch.randn(5))
    with pytest.raises(ValueError, match="metric"):
        F.channel_directed(torch.randn(3, 3), "h1", 1.0)


def test_a_replayed_call_equals_the_validated_one_and_bad_input_is_still_refused():
    """A pure call whose arguments and gradient layout were validated before replays that decision (the kept kernel
    job) without the checks: the same numbers, and every argument that was not validated before still gets its
    error, even right after a valid call with equal-looking values."""
    g = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    for fn, args, fresh in (
        (F.channel_directed, ("sobolev", 0.7, 0.1, 0), lambda: K.sobolev_reference(g, 0.7, 0, 0.1)),
        (cdgrad.laplacian_smooth, (0.4, 0), lambda: K.laplacian_reference(g, 0.4, 0)),
        (cdgrad.centralize, (), lambda: K.centralize_reference(g)),
    ):
        first, again = fn(g, *args), fn(g, *args)  # validated, then replayed
        assert torch.equal(first, again) and again.data_ptr() != first.data_ptr()
        assert rel_err(again.double(), fresh().double()) < 1e-6
    cdgrad.sobolev(g, 1.0)
    with pytest.raises(TypeError, match="lam"):
        cdgrad.sobolev(g, True)  # equal to 1 and to 1.0, but a bool
    with pytest.raises(ValueError, match="lam"):
        cdgrad.sobolev(g, float("nan"))
    with pytest.raises(ValueError, match="dim"):
        cdgrad.sobolev(g, 1.0, dim=4)
    with pytest.raises(TypeError, match="floating"):
        cdgrad.sobolev(g.to(torch.int32), 1.0)
    with pytest.raises(TypeError, match="sparse"):
        cdgrad.sobolev(g.to_sparse(), 1.0)
    np = pytest.importorskip("numpy")
    assert torch.equal(cdgrad.sobolev(g, np.float64(1.0)), cdgrad.sobolev(g, 1.0))  # validated, then equal
    assert torch.equal(cdgrad.sobolev(g, 1), cdgrad.sobolev(g, 1.0))
    assert torch.equal(cdgrad.sobolev(g, 1.0, dim=-4), cdgrad.sobolev(g, 1.0, dim=0))


def test_native_fast_path_is_used_for_lists(monkeypatch):
    """channel_directed_ rewrites a whole list with ONE call of the compiled kernel (observed), and every
    tensor equals its own out-of-place result."""
    if _native.library() is None:
        pytest.skip("no C compiler: only the reference path exists here")
    calls = []
    real_run = _native.Jobs.run

    def spy(self, num_threads):
        calls.append(len(self))
        return real_run(self, num_threads)

    real_one = _native.run_one

    def spy_one(*args):
        calls.append(1)
        return real_one(*args)

    monkeypatch.setattr(_native.Jobs, "run", spy)
    monkeypatch.setattr(_native, "run_one", spy_one)
    grads = [torch.randn(s) for s in [(16, 3, 3, 3), (16, 16, 3, 3), (32, 16, 1, 1), (7,)]]
    expected = [F.channel_directed(g, "sobolev", 1.5, 0.1, 0) for g in grads]
    assert calls == [1, 1, 1, 1]  # the out-of-place form: one kernel job per call
    calls.clear()
    F.channel_directed_(grads, "sobolev", 1.5, 0.1, 0)
    assert calls == [4]  # one call, four jobs
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    assert [F.route(g) for g in grads] == ["native"] * 4


def test_route_never_hands_a_subclass_to_the_kernel(monkeypatch):
    """Exact type check: a tensor subclass takes the reference path (its memory may not have its shape)."""

    class Wrapped(torch.Tensor):
        pass

    x = torch.randn(6, 4, 3, 3)
    w = x.clone().as_subclass(Wrapped)
    assert F.route(w) == "reference"
    if _native.library() is not None:
        assert F.route(x) == "native"
    monkeypatch.setattr(_native.Jobs, "run", lambda self, n: pytest.fail("the kernel ran on a subclass"))
    torch.testing.assert_close(cdgrad.sobolev(w, 0.5).as_subclass(torch.Tensor), F.sobolev_reference(x, 0.5))
    F.channel_directed_([w], "sobolev", 0.5, 0.0, 0)
    torch.testing.assert_close(w.as_subclass(torch.Tensor), F.sobolev_reference(x, 0.5))


@pytest.mark.parametrize("fn", [cdgrad.sobolev, cdgrad.reweighted_h0])
def test_zero_length_axis_gives_an_empty_result(fn):
    for shape, dim in [((0, 3, 3, 3), 0), ((4, 0, 3, 3), 1), ((0,), None), ((0, 5), None)]:
        x = torch.randn(shape)
        out = fn(x, 0.5, dim)
        assert out.shape == x.shape and out.dtype == x.dtype
        F.channel_directed_([x], "sobolev", 0.5, 0.0, dim)
    assert cdgrad.laplacian_smooth(torch.randn(0, 3), 1.0, 0).shape == (0, 3)
    assert cdgrad.centralize(torch.randn(0, 3)).shape == (0, 3)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    x = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(cdgrad.sobolev(x, np.float64(2.0)), cdgrad.sobolev(x, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(cdgrad.reweighted_h0(x, np.float32(2.0), np.int64(1)), cdgrad.reweighted_h0(x, 2.0, 1))
    torch.testing.assert_close(cdgrad.laplacian_smooth(x, np.int32(1)), cdgrad.laplacian_smooth(x, 1.0))
    with pytest.raises(TypeError, match="dim"):
        cdgrad.sobolev(x, 1.0, np.bool_(True))


def test_functional_api_compiles_without_graph_breaks():
    """Under `torch.compile` every function traces the reference (the native kernel is called through raw pointers,
    which a trace cannot hold): fullgraph=True compiles, and the results equal the eager ones."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    cases = {
        "sobolev": lambda g: F.sobolev(g, 0.7, 0),
        "reweighted_h0": lambda g: F.reweighted_h0(g, 2.0, 1),
        "channel_directed": lambda g: F.channel_directed(g, "sobolev", 1.3, 0.1, None),
        "laplacian_smooth": lambda g: F.laplacian_smooth(g, 1.0, 0),
        "centralize": F.centralize,
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="eager", fullgraph=True)  # a graph break is an error
        assert rel_err(compiled(x), fn(x)) < 1e-14, name

    def in_place(g: torch.Tensor) -> torch.Tensor:
        F.channel_directed_([g], "sobolev", 0.5, 0.2, 0)
        return g

    torch._dynamo.reset()
    got = torch.compile(in_place, backend="eager", fullgraph=True)(x.clone())
    assert rel_err(got, in_place(x.clone())) < 1e-14
    torch._dynamo.reset()
