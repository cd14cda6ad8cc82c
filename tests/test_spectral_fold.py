"""Inputs smaller than the kernel (n < k): the exact singular values and the projection of the folded kernel,
against the dense matrix of the circular convolution built tap by tap (brute-force SVD and least squares)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cdgrad
from cdgrad import norm_bounds
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


def tap_matrix(o: int, i: int, kh: int, kw: int, oi: tuple[int, int], tap: tuple[int, int], n: tuple[int, int]):
    """The dense matrix of `nn.Conv2d(padding_mode="circular")` for the kernel with one unit tap: output pixel y
    reads input pixel (y + tap - pad) mod n, pad = (k - 1) // 2 (the layer's padding before)."""
    n_h, n_w = n
    m = torch.zeros(o, n_h, n_w, i, n_h, n_w, dtype=F64)
    for y_h in range(n_h):
        for y_w in range(n_w):
            x_h = (y_h + tap[0] - (kh - 1) // 2) % n_h
            x_w = (y_w + tap[1] - (kw - 1) // 2) % n_w
            m[oi[0], y_h, y_w, oi[1], x_h, x_w] += 1.0
    return m.reshape(o * n_h * n_w, i * n_h * n_w)


def tap_basis(shape: tuple[int, int, int, int], n: tuple[int, int]) -> torch.Tensor:
    """(taps, rows * cols): row t is the flattened dense matrix of the t-th unit kernel (C order over O, I, kh, kw)."""
    o, i, kh, kw = shape
    rows = []
    for a in range(o):
        for b in range(i):
            for p in range(kh):
                for q in range(kw):
                    rows.append(tap_matrix(o, i, kh, kw, (a, b), (p, q), n).reshape(-1))
    return torch.stack(rows)


def dense(weight: torch.Tensor, n: tuple[int, int]) -> torch.Tensor:
    o, i = weight.shape[:2]
    flat = weight.reshape(-1) @ tap_basis(tuple(weight.shape), n)
    return flat.reshape(o * n[0] * n[1], i * n[0] * n[1])


SHAPES = st.tuples(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)
)


@settings(max_examples=40, deadline=None)
@given(SHAPES, st.integers(0, 2**16))
def test_singular_values_match_the_dense_matrix_for_any_input_size(shape, seed):
    o, i, kh, kw, n_h, n_w = shape
    w = torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(seed))
    a = dense(w, (n_h, n_w))
    torch.testing.assert_close(conv_dense_matrix(w, (n_h, n_w)), a, rtol=0, atol=1e-13)
    expected = torch.linalg.svdvals(a)
    got = conv_singular_values(w, (n_h, n_w))
    assert got.shape == (n_h * n_w * min(o, i),)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * float(expected[0]))
    torch.testing.assert_close(conv_operator_norm(w, (n_h, n_w)), expected[0], rtol=1e-12, atol=0)
    assert conv_singular_values(w, (n_h, n_w), per_frequency=True).shape == (n_h, n_w, min(o, i))


@pytest.mark.parametrize("n", [1, 2, (2, 3), (4, 1)])
def test_norm_bounds_bracket_the_folded_norm(n):
    w = torch.randn(3, 4, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(7))
    size = (n, n) if isinstance(n, int) else n
    exact = float(torch.linalg.svdvals(dense(w, size))[0])
    assert exact * (1 - 1e-12) <= float(norm_bounds.conv_norm_gram(w, n)) <= exact * 1.01
    assert float(norm_bounds.conv_norm_power(w, n, iters=300)[0]) == pytest.approx(exact, rel=1e-6)


def test_a_3x3_conv_on_a_2x2_map_is_its_folded_kernel():
    """On a 2-torus the taps 0 and 2 of a 3-tap row read the same pixel: the layer equals a 2x2 kernel's layer."""
    w = torch.randn(4, 3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    folded = w[..., :2, :].clone()
    folded[..., 0, :] += w[..., 2, :]
    folded2 = folded[..., :2].clone()
    folded2[..., 0] += folded[..., 2]
    # the 3x3 layer's padding before is 1, the 2x2 layer's is 0: the same map up to a cyclic shift by one pixel
    x = torch.randn(1, 3, 2, 2, dtype=F64)
    layer3 = nn.functional.conv2d(x.repeat(1, 1, 3, 3)[..., 1:5, 1:5], w)  # circular padding by wrap-around
    layer2 = nn.functional.conv2d(x.repeat(1, 1, 2, 2)[..., :3, :3], folded2).roll((-1, -1), dims=(2, 3))
    torch.testing.assert_close(layer3, layer2, rtol=0, atol=1e-13)
    torch.testing.assert_close(conv_singular_values(w, 2), conv_singular_values(folded2, 2), rtol=0, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(SHAPES, st.integers(0, 2**16), st.floats(0.2, 2.0))
def test_projection_is_the_least_squares_min_norm_kernel(shape, seed, max_norm):
    """Reference: clip the dense matrix's singular values, then the kernel change of least Frobenius norm among
    those whose layer is nearest (least squares) to the clipped matrix: pinv of the tap basis."""
    o, i, kh, kw, n_h, n_w = shape
    w = 2.0 * torch.randn(o, i, kh, kw, dtype=F64, generator=torch.Generator().manual_seed(seed))
    basis = tap_basis((o, i, kh, kw), (n_h, n_w))
    a = (w.reshape(-1) @ basis).reshape(o * n_h * n_w, i * n_h * n_w)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    excess = (u * (s - s.clamp(max=max_norm))) @ vh
    change = torch.linalg.pinv(basis.T) @ excess.reshape(-1)
    expected = w - change.reshape(w.shape)
    got = clip_operator_norm(w, (n_h, n_w), max_norm)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * max(1.0, float(w.abs().max())))


def test_projection_of_a_folded_kernel_repeats_converges_into_the_ball():
    w = 5.0 * torch.randn(3, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    for _ in range(100):
        w = clip_operator_norm(w, 2, 1.0)
    assert float(conv_operator_norm(w, 2)) <= 1.0 + 1e-6


def test_clipper_on_a_generator_whose_first_conv_sees_a_2x2_map():
    """The case that failed: a 3x3 conv after an upsampling from 1x1 to 2x2."""
    net = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 6, 3, padding=1), nn.Upsample(scale_factor=4))
    net = net.double()
    with torch.no_grad():
        net[1].weight.mul_(10)
    sizes = record_input_sizes(net, torch.randn(2, 4, 1, 1, dtype=F64))
    assert sizes == {"1": (2, 2)}
    clipper = OperatorNormClipper(net, sizes, max_norm=1.0, every=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    handle = cdgrad.attach(opt, clipper)
    w = net[1].weight.detach().clone()
    opt.step()
    assert torch.equal(net[1].weight, w)
    opt.step()
    assert torch.equal(net[1].weight.detach(), clip_operator_norm(w, (2, 2), 1.0))
    assert clipper.operator_norms()["1"] < float(conv_operator_norm(w, 2))
    handle.remove()


def test_clipper_state_format_is_unchanged_and_old_states_load():
    net = nn.Sequential(nn.Conv2d(2, 3, 3))
    clipper = OperatorNormClipper(net, 8, max_norm=1.0, every=3)
    state = clipper.state_dict()
    assert set(state) == {"type", "step_count", "max_norm", "every", "projection", "input_sizes", "power_vectors"}
    old = {k: v for k, v in state.items() if k not in ("projection", "power_vectors")}  # before those keys existed
    other = OperatorNormClipper(net, 4, max_norm=2.0, every=5, projection="gram")
    other.load_state_dict({**old, "step_count": 4})
    assert (other.step_count, other.every, other.projection, other.input_sizes) == (4, 3, "exact", {"0": (8, 8)})
