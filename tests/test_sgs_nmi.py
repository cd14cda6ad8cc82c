"""cdgrad.sgs.nmi: normalised mutual information against numpy.histogram2d entropies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.sgs import normalized_mutual_information
from helpers import ref_nmi

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _limit_memory(monkeypatch, free):
    from cdgrad import validation

    monkeypatch.setattr(validation, "ALWAYS_FITS", 0)
    monkeypatch.setattr(validation, "available_memory", lambda device=None: free)


def test_bins_whose_histograms_cannot_fit_are_refused_naming_bins(monkeypatch):
    """bins = 10**9 asks for 10**18 joint cells: refused before anything is allocated; the boundary is the
    documented count, 40 bytes per joint cell and 16 per observation."""
    from cdgrad.validation import MemoryRequestError

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 50, generator=g, dtype=F64), torch.randn(3, 50, generator=g, dtype=F64)
    _limit_memory(monkeypatch, 64 * 2**30)
    with pytest.raises(MemoryRequestError, match=r"bins=1000000000 needs about .*3 joint histograms") as info:
        normalized_mutual_information(p, q, bins=10**9)
    assert isinstance(info.value, ValueError)
    expected = normalized_mutual_information(p, q, bins=20)
    need = 40 * 3 * 21 * 21 + 16 * 3 * 50
    _limit_memory(monkeypatch, need - 1)
    with pytest.raises(MemoryRequestError, match="bins=20"):
        normalized_mutual_information(p, q, bins=20)
    _limit_memory(monkeypatch, need)
    assert torch.equal(normalized_mutual_information(p, q, bins=20), expected)
