"""Singular values of circular convolutions, operator-norm clipping and the training-time clipper."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cdgrad
from cdgrad.spectral import (
    OperatorNormClipper,
    clip_operator_norm,
    conv_dense_matrix,
    conv_operator_norm,
    conv_singular_values,
    record_input_sizes,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- independent references


def dense_by_basis(weight: torch.Tensor, n_h: int, n_w: int, shift: tuple[int, int] | None = None) -> torch.Tensor:
    """Dense matrix of the layer: circular pad then conv2d (cross-correlation), one basis vector at a time."""
    o, i, kh, kw = weight.shape
    top, left = shift if shift is not None else ((kh - 1) // 2, (kw - 1) // 2)
    pad = (left, kw - 1 - left, top, kh - 1 - top)
    cols = []
    for j in range(i * n_h * n_w):
        e = torch.zeros(i * n_h * n_w, dtype=weight.dtype)
        e[j] = 1.0
        x = F.pad(e.reshape(1, i, n_h, n_w), pad, mode="circular")
        cols.append(F.conv2d(x, weight).reshape(-1))
    return torch.stack(cols, dim=1)


def dense_by_loops(w: np.ndarray, n_h: int, n_w: int) -> np.ndarray:
    """y[o, s, t] = sum_{i, a, b} w[o, i, a, b] x[i, (s + a - ph) % n_h, (t + b - pw) % n_w], written out."""
    o, i, kh, kw = w.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    m = np.zeros((o * n_h * n_w, i * n_h * n_w))
    for oo, s, t in itertools.product(range(o), range(n_h), range(n_w)):
        row = (oo * n_h + s) * n_w + t
        for ii, a, b in itertools.product(range(i), range(kh), range(kw)):
            col = (ii * n_h + (s + a - ph) % n_h) * n_w + (t + b - pw) % n_w
            m[row, col] += w[oo, ii, a, b]
    return m


def naive_clip(w: np.ndarray, n_h: int, n_w: int, c: float) -> np.ndarray:
    """Full complex FFT2, SVD clip at every frequency, inverse FFT2, real part, crop: written with numpy."""
    o, i, kh, kw = w.shape
    p = np.fft.fft2(w, s=(n_h, n_w))
    out = np.zeros_like(p)
    for u, v in itertools.product(range(n_h), range(n_w)):
        uu, s, vh = np.linalg.svd(p[:, :, u, v], full_matrices=False)
        out[:, :, u, v] = (uu * np.minimum(s, c)) @ vh
    return np.fft.ifft2(out).real[:, :, :kh, :kw]


shapes = st.tuples(
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2)
).map(lambda t: (t[0], t[1], t[2], t[3], max(t[2], 4) + t[4], max(t[3], 4) + t[5]))


# ----------------------------------------------------------------------------- singular values


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_singular_values_match_dense_matrix(shape, seed):
    o, i, kh, kw, n_h, n_w = shape
    w = torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(seed))
    got = conv_singular_values(w, (n_h, n_w))
    ref = torch.linalg.svdvals(dense_by_basis(w, n_h, n_w))
    assert got.dtype == F64 and got.shape == (min(o, i) * n_h * n_w,)
    assert torch.all(got[:-1] >= got[1:])
    torch.testing.assert_close(got, ref[: got.numel()], rtol=0, atol=1e-10)
    torch.testing.assert_close(conv_operator_norm(w, (n_h, n_w)), ref[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "o,i,kh,kw,n_h,n_w",
    [
        (1, 1, 1, 1, 4, 4),
        (3, 2, 1, 1, 5, 4),
        (2, 4, 3, 2, 4, 6),
        (4, 3, 2, 3, 6, 5),
        (2, 2, 3, 3, 3, 3),
        (3, 3, 2, 2, 2, 2),
        (2, 3, 1, 3, 1, 5),
        (4, 1, 3, 3, 5, 5),
    ],
)
def test_singular_values_fixed_cases(o, i, kh, kw, n_h, n_w):
    w = torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(o * 100 + n_h))
    ref = torch.linalg.svdvals(dense_by_basis(w, n_h, n_w))
    got = conv_singular_values(w, (n_h, n_w))
    torch.testing.assert_close(got, ref[: got.numel()], rtol=0, atol=1e-10)


def test_one_by_one_kernel_is_matrix_repeated():
    w = torch.randn(3, 5, 1, 1, dtype=F64)
    want = torch.linalg.svdvals(w[:, :, 0, 0]).repeat_interleave(4 * 5)
    torch.testing.assert_close(conv_singular_values(w, (4, 5)), want, rtol=0, atol=1e-12)


def test_per_frequency_matches_numpy_fft_and_flat_form():
    w = torch.randn(3, 2, 3, 2, dtype=F64)
    n_h, n_w = 5, 6
    per = conv_singular_values(w, (n_h, n_w), per_frequency=True)
    assert per.shape == (n_h, n_w, 2)
    p = np.fft.fft2(w.numpy(), s=(n_h, n_w))
    for u, v in itertools.product(range(n_h), range(n_w)):
        np.testing.assert_allclose(per[u, v].numpy(), np.linalg.svd(p[:, :, u, v], compute_uv=False), atol=1e-12)
    flat = conv_singular_values(w, (n_h, n_w))
    torch.testing.assert_close(flat, per.reshape(-1).sort(descending=True).values, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    o=st.integers(1, 4), i=st.integers(1, 4), kh=st.integers(1, 7), kw=st.integers(1, 7),
    n_h=st.integers(1, 9), n_w=st.integers(1, 9), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_half_spectrum_by_the_dft_basis_equals_numpy_fft(o, i, kh, kw, n_h, n_w, seed):
    """`half_spectrum` (a product with the DFT basis up to 32 taps, the FFT beyond) against numpy's fft2 of the
    zero-padded, folded kernel, float64, contiguous in the frequency-major layout."""
    from cdgrad._conv_spectrum import fold_kernel, half_spectrum

    w = torch.randn(o, i, kh, kw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = half_spectrum(w, (n_h, n_w))
    folded = fold_kernel(w, (n_h, n_w)).numpy()
    expected = np.fft.fft2(folded, s=(n_h, n_w))[:, :, :, : n_w // 2 + 1].transpose(2, 3, 0, 1)
    assert got.shape == expected.shape and got.dtype == torch.complex128
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 2), (2, 4), (4, 4)])
def test_half_spectrum_is_exact_at_quarter_turns(size):
    """Where every phase is a multiple of a quarter turn the DFT basis is exactly 0 and +-1 (as the FFT's twiddles
    are): the spectrum of a real kernel is exactly real wherever it is real, with no 1e-16 residues, which a Gram
    iteration would square into float32 denormals."""
    from cdgrad._conv_spectrum import half_spectrum

    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(2))
    got = half_spectrum(w, size)
    for u in range(size[0]):
        for v in range(size[1] // 2 + 1):
            real = (2 * u) % size[0] == 0 and (2 * v) % size[1] == 0  # phases 0 or pi only: a real spectrum
            assert not real or bool((got[u, v].imag == 0).all()), (u, v)
    assert bool((got.imag != 0).any()) == any(n > 2 for n in size)


def test_padding_offset_does_not_change_singular_values():
    w = torch.randn(2, 3, 3, 2, dtype=F64)
    a = torch.linalg.svdvals(dense_by_basis(w, 5, 4, shift=(0, 0)))
    b = torch.linalg.svdvals(dense_by_basis(w, 5, 4, shift=(2, 1)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(conv_singular_values(w, (5, 4)), a, rtol=0, atol=1e-10)


def test_int_input_size_means_square():
    w = torch.randn(2, 2, 3, 3, dtype=F64)
    torch.testing.assert_close(conv_singular_values(w, 5), conv_singular_values(w, (5, 5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(dtype):
    w64 = torch.randn(4, 3, 3, 3, dtype=F64)
    got = conv_singular_values(w64.to(dtype), 6)
    assert got.dtype == torch.float32
    want = conv_singular_values(w64.to(dtype).to(F64), 6)
    torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-5)
    assert conv_operator_norm(w64.to(dtype), 6).dtype == torch.float32


def test_conv_dense_matrix_matches_loops_and_nn_conv2d():
    for o, i, kh, kw, n_h, n_w in [(2, 3, 3, 2, 4, 5), (1, 2, 1, 3, 3, 4), (3, 1, 2, 2, 4, 4)]:
        w = torch.randn(o, i, kh, kw, dtype=F64)
        m = conv_dense_matrix(w, (n_h, n_w))
        np.testing.assert_allclose(m.numpy(), dense_by_loops(w.numpy(), n_h, n_w), atol=1e-13)
        torch.testing.assert_close(m, dense_by_basis(w, n_h, n_w), rtol=0, atol=1e-13)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    x = torch.randn(1, 3, 5, 6, dtype=F64)
    y = (conv_dense_matrix(conv.weight.detach(), (5, 6)) @ x.reshape(-1)).reshape(1, 4, 5, 6)
    torch.testing.assert_close(y, conv(x).detach(), rtol=0, atol=1e-12)


def test_zero_padded_and_strided_norms_are_bounded_as_documented():
    for seed in range(4):
        w = torch.randn(3, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
        n = 5
        basis = torch.eye(2 * n * n, dtype=F64).reshape(-1, 2, n, n)
        zero_padded = F.conv2d(basis, w, padding=1).reshape(2 * n * n, -1).T
        assert torch.linalg.svdvals(zero_padded)[0] <= conv_operator_norm(w, n + 2) * (1 + 1e-12)
        strided = F.conv2d(F.pad(basis, (1, 1, 1, 1), mode="circular"), w, stride=2).reshape(2 * n * n, -1).T
        assert torch.linalg.svdvals(strided)[0] <= conv_operator_norm(w, n) * (1 + 1e-12)


def test_numpy_integer_sizes_accepted():
    w = torch.randn(2, 2, 3, 3, dtype=F64)
    torch.testing.assert_close(conv_singular_values(w, (np.int64(4), 5)), conv_singular_values(w, (4, 5)))


def test_singular_values_are_differentiable():
    w = torch.randn(2, 2, 3, 3, dtype=F64, requires_grad=True)
    conv_operator_norm(w, 4).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- clipping


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), frac=st.floats(0.05, 0.95))
def test_repeated_clipping_reaches_the_ball(shape, seed, frac):
    o, i, kh, kw, n_h, n_w = shape
    w = torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(seed))
    c = frac * float(conv_operator_norm(w, (n_h, n_w)))
    w2 = w
    for _ in range(200):
        w2 = clip_operator_norm(w2, (n_h, n_w), c)
    assert w2.shape == w.shape and w2.dtype == F64
    # measured on the independent dense matrix; alternating projections converge from above
    assert torch.linalg.svdvals(dense_by_basis(w2, n_h, n_w))[0] <= c * (1 + 1e-6)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), frac=st.floats(0.05, 1.5))
def test_one_clip_step_matches_naive_full_fft(shape, seed, frac):
    o, i, kh, kw, n_h, n_w = shape
    w = torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(seed))
    c = frac * float(conv_operator_norm(w, (n_h, n_w)))
    got = clip_operator_norm(w, (n_h, n_w), c)
    np.testing.assert_allclose(got.numpy(), naive_clip(w.numpy(), n_h, n_w, c), rtol=0, atol=1e-12)


def test_inside_the_ball_is_unchanged_and_input_untouched():
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    before = w.clone()
    norm = float(conv_operator_norm(w, 6))
    out = clip_operator_norm(w, 6, norm * 1.01)
    assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()
    clipped = clip_operator_norm(w, 6, norm * 0.5)
    assert torch.equal(w, before)
    assert not torch.allclose(clipped, w)


def test_clip_keeps_support_dtype_and_has_no_autograd():
    w = torch.randn(4, 3, 2, 3, requires_grad=True)
    out = clip_operator_norm(w, (5, 7), 0.3)
    assert out.shape == w.shape and out.dtype == torch.float32 and not out.requires_grad
    # float32 agrees with the float64 computation
    ref = clip_operator_norm(w.detach().double(), (5, 7), 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_clip_one_by_one_kernel_is_matrix_clip():
    w = torch.randn(4, 3, 1, 1, dtype=F64)
    u, s, vh = torch.linalg.svd(w[:, :, 0, 0], full_matrices=False)
    want = (u * s.clamp(max=0.7)) @ vh
    torch.testing.assert_close(clip_operator_norm(w, 4, 0.7)[:, :, 0, 0], want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [conv_singular_values, conv_operator_norm, conv_dense_matrix])
def test_bad_input_errors(fn):
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="input_size"):
        fn(w, 0)
    with pytest.raises(ValueError, match="input_size"):
        fn(w, (5, -1))
    with pytest.raises(TypeError, match="input_size"):
        fn(w, 4.0)
    with pytest.raises(TypeError, match="input_size"):
        fn(w, (4, 4, 4))
    with pytest.raises(ValueError, match="weight"):
        fn(torch.randn(2, 3, 3), 4)
    with pytest.raises(TypeError, match="weight"):
        fn(torch.ones(2, 2, 3, 3, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="weight"):
        fn(np.ones((2, 2, 3, 3)), 4)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_clip_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        clip_operator_norm(torch.randn(2, 2, 3, 3), 4, bad)


def test_clip_max_norm_type():
    with pytest.raises(TypeError, match="max_norm"):
        clip_operator_norm(torch.randn(2, 2, 3, 3), 4, "1")


# ----------------------------------------------------------------------------- clipper


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.c3(self.c2(self.bn(self.c1(x))))


def big_weights(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(10)


def test_record_input_sizes_leaves_model_untouched():
    net = Net().double()
    net.train()
    bn_state = {k: v.clone() for k, v in net.bn.state_dict().items()}
    sizes = record_input_sizes(net, torch.randn(2, 2, 8, 6, dtype=F64))
    assert sizes == {"c1": (8, 6), "c2": (8, 6), "c3": (4, 3)}
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.bn.state_dict().items():
        assert torch.equal(v, bn_state[k])
    assert not any(m._forward_pre_hooks for m in net.modules())
    with pytest.raises(TypeError, match="batch"):
        record_input_sizes(net, {"x": torch.randn(1, 2, 8, 8)})
    with pytest.raises(TypeError, match="model"):
        record_input_sizes(lambda x: x, torch.randn(1, 2, 8, 8))


def test_clipper_fires_exactly_every_k_steps():
    torch.manual_seed(0)
    net = Net().double()
    big_weights(net)
    sizes = record_input_sizes(net, torch.randn(1, 2, 8, 8, dtype=F64))
    clipper = OperatorNormClipper(net, sizes, max_norm=1.0, every=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # steps leave weights alone; only the clipper moves them
    handle = cdgrad.attach(opt, clipper)
    changed = []
    for _ in range(9):
        before = [m.weight.clone() for m in (net.c1, net.c2, net.c3)]
        opt.step()
        after = [m.weight for m in (net.c1, net.c2, net.c3)]
        changed.append(any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)))
    assert changed == [False, False, True] * 3
    assert clipper.step_count == 9
    # each clip was one projection step of the stored weights
    w = net.c1.weight.detach().clone()
    for _ in range(3):
        opt.step()
    torch.testing.assert_close(net.c1.weight.detach(), clip_operator_norm(w, (8, 8), 1.0), rtol=0, atol=0)
    handle.remove()
    w = net.c1.weight.detach().clone()
    for _ in range(6):
        opt.step()
    assert torch.equal(net.c1.weight, w) and clipper.step_count == 12


def test_clipper_drives_norms_into_the_ball():
    torch.manual_seed(1)
    net = Net().double()
    big_weights(net)
    clipper = OperatorNormClipper([net.c1, net.c2.weight], [8, (8, 6)], max_norm=0.8, every=1)
    assert clipper.layer_names == ["0", "1"]
    for _ in range(200):
        clipper.after_step()
    norms = clipper.operator_norms()
    assert norms["0"] <= 0.8 * (1 + 1e-6) and norms["1"] <= 0.8 * (1 + 1e-6)
    assert float(conv_operator_norm(net.c3.weight.detach(), 4)) > 1.0  # not chosen, not clipped


def test_clipper_state_dict_round_trip():
    net = Net()
    a = OperatorNormClipper(net, {"c1": 8, "c2": (8, 6), "c3": 4}, max_norm=0.5, every=5)
    for _ in range(7):
        a.after_step()
    b = OperatorNormClipper(net, 16, max_norm=2.0, every=100)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert (b.step_count, b.max_norm, b.every) == (7, 0.5, 5)
    assert b.input_sizes == {"c1": (8, 8), "c2": (8, 6), "c3": (4, 4)}
    fired: list[int] = []
    b.clip_ = lambda: fired.append(b.step_count)  # records when it projects
    for _ in range(3):
        b.after_step()
    assert fired == [10]


def test_clipper_load_bad_state_leaves_it_untouched():
    net = Net()
    c = OperatorNormClipper(net, 8, max_norm=1.0, every=2)
    c.after_step()
    good = c.state_dict()
    for bad in [
        {**good, "max_norm": -1.0},
        {**good, "every": 0},
        {**good, "step_count": -3},
        {**good, "input_sizes": {"c1": [8, 8]}},
        {**good, "input_sizes": {**good["input_sizes"], "c1": [0, 2]}},
        {**good, "type": "Other"},
        {k: v for k, v in good.items() if k != "every"},
    ]:
        with pytest.raises(ValueError):
            c.load_state_dict(bad)
        assert c.state_dict() == good


def test_clipper_bad_construction():
    net = Net()
    with pytest.raises(ValueError, match="max_norm"):
        OperatorNormClipper(net, 8, max_norm=0.0)
    with pytest.raises(ValueError, match="every"):
        OperatorNormClipper(net, 8, max_norm=1.0, every=0)
    with pytest.raises(ValueError, match="input_sizes"):
        OperatorNormClipper(net, 0, max_norm=1.0)
    with pytest.raises(ValueError, match="input_sizes"):
        OperatorNormClipper(net, {"c1": 8}, max_norm=1.0)
    with pytest.raises(ValueError, match="input_sizes"):
        OperatorNormClipper([net.c1, net.c2], [8, 8, 8], max_norm=1.0)
    with pytest.raises(ValueError, match="weight"):
        OperatorNormClipper([torch.randn(3, 3, 3)], 8, max_norm=1.0)
    with pytest.raises(TypeError, match="layers"):
        OperatorNormClipper([nn.Linear(2, 2)], 8, max_norm=1.0)
    with pytest.raises(ValueError, match="groups"):
        OperatorNormClipper(nn.Conv2d(4, 4, 3, groups=2), 8, max_norm=1.0)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        OperatorNormClipper(nn.Linear(2, 2), 8, max_norm=1.0)
    with pytest.raises(TypeError, match="optimizer"):
        cdgrad.attach(net, OperatorNormClipper(net, 8, max_norm=1.0))


def test_clipper_float32_weights_in_place():
    conv = nn.Conv2d(3, 3, 3)
    with torch.no_grad():
        conv.weight.mul_(20)
    ptr = conv.weight.data_ptr()
    c = OperatorNormClipper(conv, 6, max_norm=1.0, every=1)
    for _ in range(200):
        c.after_step()
    assert conv.weight.data_ptr() == ptr and conv.weight.dtype == torch.float32
    assert c.operator_norms()[""] <= 1.0 + 1e-4
    assert math.isfinite(c.operator_norms()[""])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_diverged_weights_give_a_clear_error_naming_the_layer(bad):
    """A diverged model: a ValueError naming the layer (not a LinAlgError), and no weight changes."""
    net = Net().double()
    clipper = OperatorNormClipper(net, 8, max_norm=0.5)
    with torch.no_grad():
        net.c2.weight[0, 0, 0, 0] = bad
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="layer 'c2'.*non-finite"):
        clipper.clip_()
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b) or (torch.isnan(b).any() and torch.equal(p.isnan(), b.isnan()))
    with pytest.raises(ValueError, match="layer 'c2'"):
        clipper.operator_norms()
    for fn in (conv_singular_values, conv_operator_norm):
        with pytest.raises(ValueError, match="weight .*non-finite"):
            fn(net.c2.weight, 8)
    with pytest.raises(ValueError, match="non-finite"):
        clip_operator_norm(net.c2.weight, 8, 1.0)


def test_numpy_scalars_for_the_clipper():
    net = Net().double()
    clipper = OperatorNormClipper(net, np.int64(8), max_norm=np.float64(0.5), every=np.int32(2))
    assert clipper.max_norm == 0.5 and clipper.every == 2 and type(clipper.every) is int
    with pytest.raises(TypeError, match="every"):
        OperatorNormClipper(net, 8, max_norm=1.0, every=1.5)


# ----------------------------------------------------------------------------- memory: refuse what cannot fit
GIB = 2**30


def _limit_memory(monkeypatch, free):
    """Every request is checked (no size is too small to be) against `free` bytes on any device."""
    from cdgrad import validation

    monkeypatch.setattr(validation, "ALWAYS_FITS", 0)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: free)


def test_memory_needed_is_the_documented_count():
    """n_h (n_w // 2 + 1) (c O I + 2 (O + I + min(O, I))) complex numbers, counted here by hand."""
    from cdgrad.spectral import memory_needed

    # O, I = 4, 3 at 10 x 7: 10 * 4 = 40 frequencies; c = 7 (clip) -> 7 * 12 + 2 * (4 + 3 + 3) = 104 per frequency
    assert memory_needed("clip", (4, 3, 3, 3), (10, 7), F64) == 40 * 104 * 16
    assert memory_needed("clip", torch.Size((4, 3, 3, 3)), (10, 7), torch.float32) == 40 * 104 * 8
    assert memory_needed("operator_norm", (1, 1, 1, 1), 1) == 1 * 1 * (2.5 + 6) * 8
    with pytest.raises(ValueError, match="computation must be one of"):
        memory_needed("svd", (4, 3, 3, 3), 8)
    with pytest.raises(TypeError, match="weight_shape"):
        memory_needed("clip", (4, 3, 3), 8)
    # an input smaller than the kernel is the folded kernel's map: counted at the input's own size
    assert memory_needed("clip", (4, 3, 5, 5), 4, F64) == 4 * 3 * 104 * 16


SPECTRAL_CALLS = {
    "singular_values": lambda w, s: conv_singular_values(w, s),
    "operator_norm": lambda w, s: conv_operator_norm(w, s),
    "clip": lambda w, s: clip_operator_norm(w, s, 0.5),
}


@pytest.mark.parametrize("name", SPECTRAL_CALLS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_size_that_cannot_fit_is_refused_naming_it(monkeypatch, name, dtype):
    """The issue's size 100,000 asks for terabytes: refused before any allocation, whatever the machine."""
    from cdgrad.validation import MemoryRequestError

    _limit_memory(monkeypatch, 64 * GIB)
    w = torch.randn(16, 16, 3, 3, dtype=dtype)
    with pytest.raises(MemoryRequestError, match=r"input_size=100000 needs about .*TiB.* available on cpu") as info:
        SPECTRAL_CALLS[name](w, 100000)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)
    with pytest.raises(MemoryRequestError, match=r"input_size=\(8000, 9000\)"):
        SPECTRAL_CALLS[name](w, (8000, 9000))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(sorted(SPECTRAL_CALLS)),
    o=st.integers(1, 5),
    i=st.integers(1, 5),
    n_h=st.integers(3, 9),
    n_w=st.integers(3, 9),
    f64=st.booleans(),
)
def test_the_refusal_boundary_is_the_estimate(name, o, i, n_h, n_w, f64):
    """Refused with one byte less than `memory_needed` available; computed, unchanged, with exactly that much."""
    from cdgrad.spectral import memory_needed
    from cdgrad.validation import MemoryRequestError

    dtype = F64 if f64 else torch.float32
    w = torch.randn(o, i, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(o * 100 + i))
    need = memory_needed(name, w.shape, (n_h, n_w), dtype)
    expected = SPECTRAL_CALLS[name](w, (n_h, n_w))
    with pytest.MonkeyPatch.context() as mp:
        _limit_memory(mp, need - 1)
        with pytest.raises(MemoryRequestError, match="input_size"):
            SPECTRAL_CALLS[name](w, (n_h, n_w))
        _limit_memory(mp, need)
        assert torch.equal(SPECTRAL_CALLS[name](w, (n_h, n_w)), expected)


def test_dense_matrix_and_clipper_refuse_sizes_that_cannot_fit(monkeypatch):
    from cdgrad.validation import MemoryRequestError

    _limit_memory(monkeypatch, 64 * GIB)
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MemoryRequestError, match=r"input_size=300 needs .*the dense matrix"):
        conv_dense_matrix(w, 300)  # (3 * 300^2) x (10 * 300^2) floats: 9.8 TB
    for projection in ("exact", "gram"):
        with pytest.raises(MemoryRequestError, match=r"input_sizes\['1'\]=\(100000, 100000\)"):
            OperatorNormClipper([w, w.clone()], {"0": 8, "1": 100000}, 1.0, projection=projection)
    reshaped = OperatorNormClipper([w], 100000, 1.0, projection="reshaped")  # the reshaped kernel ignores the size
    reshaped.clip_()
    assert float(reshaped.operator_norms("reshaped")["0"]) <= 1.0 + 1e-5  # float32 SVD round-off


def test_available_memory_reads_the_machine(monkeypatch):
    from cdgrad import validation

    free = validation.available_memory()
    assert free is None or (isinstance(free, int) and free > 0)
    assert validation.available_memory("meta") is None
    monkeypatch.setattr(validation, "_meminfo_available", lambda: 8 * GIB)
    monkeypatch.setattr(validation, "_cgroup_headroom", lambda: 3 * GIB)  # a container's limit binds first
    assert validation.available_memory("cpu") == 3 * GIB
    monkeypatch.setattr(validation, "_cgroup_headroom", lambda: None)
    assert validation.available_memory() == 8 * GIB
    validation.check_memory(8 * GIB, "n", 1)  # exactly what is available: accepted
    with pytest.raises(validation.MemoryRequestError, match=r"n=2 needs about 8 GiB of memory \(x\), more than the"):
        validation.check_memory(8 * GIB + 1, "n", 2, what="x")
    monkeypatch.setattr(validation, "_meminfo_available", lambda: None)
    validation.check_memory(2**80, "n", 3)  # nothing known about the machine: not checked
