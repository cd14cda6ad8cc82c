"""One native call per step: every selected gradient of a step goes to the compiled kernel at once.

The multi-tensor path (`transform_` of ChannelDirected, LaplacianSmoothing and Centralize, one `_native.Jobs.run`
for the whole list) against the per-tensor reference path (`cdgrad._kernels.*_reference`, one tensor at a time,
plain PyTorch), for every transform, direction and dtype and for tensors in every layout; the Laplacian kernel
(a linear-time periodic solve) against a dense float64 solve; and float32 inputs or hyper-parameters at the edge of
the float32 range, which must give the exact answer (computed in float64), not NaN.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cdgrad
from cdgrad import _kernels as K
from cdgrad import _native
from helpers import dense_laplacian_smooth, dense_sobolev, fft_sobolev, loop_centralize, loop_h0

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no native kernel here: only the reference path")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    """Conv, linear and bias gradients: contiguous, channels_last, a transposed (non-contiguous) view, long axes."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return [
        randn(16, 8, 3, 3),
        randn(8, 16, 3, 3).to(memory_format=torch.channels_last),
        randn(12, 6, 3, 3).transpose(0, 1),  # (6, 12, 3, 3), no native layout: goes through a copy
        randn(1100, 3, 1, 1),  # an axis longer than 1024: float32 accumulates in double
        randn(4, 5, 2, 2, 2),
        randn(10, 7),
        randn(9),
    ]


def _reference(name: str, g: torch.Tensor, dim: int | None) -> torch.Tensor:
    axis = None if dim is None else dim % g.dim()
    if name == "sobolev":
        return K.sobolev_reference(g, 0.7, axis, 0.1)
    if name == "h0":
        return K.reweighted_h0_reference(g, 1.7, axis, -0.2)
    if name == "laplacian":
        return K.laplacian_reference(g, 0.6, axis)
    return K.centralize_reference(g)


TRANSFORMS = {
    "sobolev": lambda direction: cdgrad.ChannelDirected("sobolev", 0.7, 0.1, direction, "all"),
    "h0": lambda direction: cdgrad.ChannelDirected("h0", 1.7, -0.2, direction, "all"),
    "laplacian": lambda direction: cdgrad.LaplacianSmoothing(0.6, direction, "all"),
    "centralize": lambda direction: cdgrad.Centralize("all"),
}
CASES = [(n, d) for n in TRANSFORMS for d in (("output",) if n == "centralize" else ("output", "input", "flat"))]


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    run = _native.Jobs.run

    def counted(self: _native.Jobs, threads: int) -> None:
        calls.append(len(self))
        run(self, threads)

    monkeypatch.setattr(_native.Jobs, "run", counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "direction"), CASES)
def test_one_call_per_step_agrees_with_the_per_tensor_reference(name, direction, dtype, monkeypatch):
    t = TRANSFORMS[name](direction)
    grads = [g for g in _grads(dtype) if t.select(g)]
    assert len(grads) >= 4
    dim = cdgrad.transforms.DIRECTIONS[direction] if name != "centralize" else 0
    expected = [_reference(name, g.double(), dim) for g in grads]  # one tensor at a time, in float64
    per_tensor = [_reference(name, g, dim) for g in grads]  # the reference path in the gradient's own dtype
    calls = _count_kernel_calls(monkeypatch)
    work = [g.clone() for g in grads]
    t.transform_(work, work)
    assert calls == [len(grads)], "every gradient of the step in one kernel call"
    for w, g, e, p in zip(work, grads, expected, per_tensor, strict=True):
        assert w.dtype == g.dtype and w.shape == g.shape and w.stride() == g.stride()
        scale = max(1.0, float(e.abs().max()))
        assert float((w.double() - e).abs().max()) <= TOLERANCE[dtype] * scale * 4, (name, direction, g.shape)
        # the two paths agree as closely as each agrees with float64
        assert float((w.double() - p.double()).abs().max()) <= TOLERANCE[dtype] * scale * 8
    pure = [t(g, g) for g in grads]  # the pure form: one native call per tensor, the same numbers
    assert all(torch.equal(a, b) for a, b in zip(pure, work, strict=True))


@pytest.mark.parametrize(("name", "direction"), CASES)
def test_a_mixed_list_is_grouped_by_dtype_in_one_call(name, direction, monkeypatch):
    t = TRANSFORMS[name](direction)
    grads = [g for dtype in DTYPES for g in _grads(dtype) if t.select(g)]
    singles = []
    for g in grads:
        w = g.clone()
        t.transform_([w], [w])
        singles.append(w)
    calls = _count_kernel_calls(monkeypatch)
    work = [g.clone() for g in grads]
    t.transform_(work, work)
    assert calls == [len(grads)]
    assert all(torch.equal(a, b) for a, b in zip(work, singles, strict=True))  # the same numbers, bit for bit


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    dim=st.sampled_from([0, 1, None]),
    sigma=st.sampled_from([1e-6, 0.05, 0.5, 3.0, 250.0, 1e5]),
    double=st.booleans(),
)
def test_laplacian_kernel_matches_a_dense_solve(shape, dim, sigma, double):
    if dim == 1 and len(shape) < 2:
        dim = 0
    dtype = torch.float64 if double else torch.float32
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=dtype)
    out = cdgrad.laplacian_smooth(x, sigma, dim)
    expected = dense_laplacian_smooth(x, sigma, dim)
    tolerance = 1e-11 if double else 2e-6
    assert float((out.double() - expected).abs().max()) <= tolerance * max(1.0, float(x.abs().max()))


def test_centralize_kernel_matches_a_loop():
    x = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert float((cdgrad.centralize(x) - loop_centralize(x)).abs().max()) < 1e-14


# ---------------------------------------------------------------------------------------------- float32's range
BIG = 3.0e38  # near float32's largest finite value, 3.4e38


def _near_the_float32_maximum() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return (torch.rand(6, 4, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1) * BIG


PURE = {
    "sobolev": (lambda x: cdgrad.sobolev(x, 1.0), lambda x: dense_sobolev(x, 1.0)),
    "reweighted_h0": (lambda x: cdgrad.reweighted_h0(x, 1.0), lambda x: loop_h0(x, 1.0)),
    "laplacian_smooth": (lambda x: cdgrad.laplacian_smooth(x, 0.5), lambda x: dense_laplacian_smooth(x, 0.5)),
    "centralize": (cdgrad.centralize, loop_centralize),
}


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("name", list(PURE))
def test_float32_entries_near_the_maximum_give_the_exact_answer_not_nan(name, native, monkeypatch):
    if not native:
        monkeypatch.setattr(K, "native_usable", lambda: False)
    fn, exact = PURE[name]
    x64 = _near_the_float32_maximum()
    x = x64.float()
    expected = exact(x.double())
    assert float(expected.abs().max()) < 3.4e38  # representable in float32
    out = fn(x)
    assert bool(torch.isfinite(out).all()), f"{name} of float32 entries near 1e38 is not finite"
    assert float((out.double() - expected).abs().max()) <= 1e-6 * BIG


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_hyper_parameters_beyond_float32_give_the_exact_answer_not_nan(native, monkeypatch):
    if not native:
        monkeypatch.setattr(K, "native_usable", lambda: False)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 4, 3, 3, generator=gen)
    # sigma >= 1e39: every non-constant mode is damped to nothing, the fiber mean stays
    smoothed = cdgrad.laplacian_smooth(x, 1e39)
    assert bool(torch.isfinite(smoothed).all())
    torch.testing.assert_close(smoothed, x.double().mean().expand(x.shape).float(), rtol=1e-5, atol=1e-6)
    # lam = 1e-39 with entries small enough that the exact answer (of size |f| / lam) is representable
    tiny = x[:, :1] * 1e-32
    exact = fft_sobolev(tiny.double(), 1e-39)
    assert float(exact.abs().max()) < 3.4e38
    out = cdgrad.sobolev(tiny, 1e-39)
    assert bool(torch.isfinite(out).all())
    assert float((out.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    # 1 / lam beyond float32 for H0: g = fbar + (f - fbar) / lam
    h0 = cdgrad.reweighted_h0(tiny, 1e-39)
    assert bool(torch.isfinite(h0).all())
    expected = loop_h0(tiny.double(), 1e-39)
    assert float((h0.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("sigma", [0.5, 20.0, 3000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_laplacian_on_long_lines_matches_the_fourier_multiplier(sigma, dtype):
    """Single long lines (the rasterised direction; the last one-column chunk of a strided layout) take the
    kernel's side-by-side chains; against numpy's FFT with the multiplier 1 / (1 + 2 sigma (1 - cos(2 pi k/n)))."""
    import numpy as np

    gen = torch.Generator().manual_seed(7)
    cases = [(torch.randn(100003, generator=gen, dtype=dtype), None), (torch.randn(9001, 65, dtype=dtype), 0)]
    for x, dim in cases:
        out = cdgrad.laplacian_smooth(x, sigma, dim)
        a = x.double().numpy() if dim is None else x.double().numpy().T  # lines along the last axis
        n = a.shape[-1]
        multiplier = 1.0 / (1.0 + 2.0 * sigma * (1.0 - np.cos(2.0 * np.pi * np.arange(n // 2 + 1) / n)))
        expected = np.fft.irfft(np.fft.rfft(a, axis=-1) * multiplier, n=n, axis=-1)
        expected_t = torch.from_numpy(expected if dim is None else expected.T)
        tolerance = 1e-12 if dtype == torch.float64 else 2e-6
        assert float((out.double() - expected_t).abs().max()) <= tolerance * float(x.abs().max())


@pytest.mark.parametrize("name", ["sobolev", "h0", "laplacian", "centralize"])
def test_jobs_kept_per_layout_follow_a_change_of_layout_or_dtype(name):
    """A tensor's job is packed once per (shape, strides, dtype) and kept: tensors of one shape in other layouts
    and dtypes, in one list and across calls, in place and out of place, each get their own job."""
    t = TRANSFORMS[name]("output")
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64)
    variants = [
        base.float(),
        base.float().to(memory_format=torch.channels_last),
        base.clone(),
        base.float().transpose(2, 3).contiguous().transpose(2, 3),  # same shape, strides of no native layout
    ]
    for _ in range(2):  # the second round finds every job already packed
        work = [v.clone(memory_format=torch.preserve_format) for v in variants]
        t.transform_(work, work)
        for v, w in zip(variants, work, strict=True):
            expected = _reference(name, v.double(), 0)
            assert w.stride() == v.stride()
            assert float((w.double() - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
            assert torch.equal(t(v, v), w)
