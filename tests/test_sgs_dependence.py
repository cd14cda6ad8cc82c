"""cdgrad.sgs.dependence: the spatial dependence matrix against naive pixel-pair loops."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cdgrad.sgs.dependence as dep_module
from cdgrad.sgs import normalized_mutual_information, spatial_dependence
from helpers import features, ref_dependence, ref_nmi

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def small_chunks(elements: int):
    """Force `_per_channel_mi` to walk the batch in chunks of about `elements` values."""
    old = dep_module._CHUNK
    dep_module._CHUNK = elements
    try:
        yield
    finally:
        dep_module._CHUNK = old


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


def test_spatial_dependence_refuses_bins_whose_histograms_cannot_fit(monkeypatch):
    """bins=10**6 asks for terabytes of joint histograms: refused naming bins before any is allocated; the boundary
    is 4 displacements (one of each pair d, -d of a 3 x 3 kernel) x 2 channels x 21^2 cells at 8 bytes, plus one
    displacement's folded counts and entropy terms at 40 bytes a cell."""
    from cdgrad import validation

    x = features(0, (3, 2, 5, 5), "noise")
    with pytest.raises(validation.MemoryRequestError, match=r"bins=1000000 needs about .*TiB"):
        spatial_dependence(x, 3, bins=10**6)
    expected = spatial_dependence(x, 3, bins=20)
    need = (8 * 4 + 40) * 2 * 21 * 21
    monkeypatch.setattr(validation, "ALWAYS_FITS", 0)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: need - 1)
    with pytest.raises(validation.MemoryRequestError, match=r"bins=20 needs"):
        spatial_dependence(x, 3, bins=20)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: need)
    assert torch.equal(spatial_dependence(x, 3, bins=20), expected)
    spatial_dependence(x, 3, bins=10**6, method="autocorr")  # bins are not used by the correlation
