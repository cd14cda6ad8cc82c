"""Tests of cdgrad.experiments.data.dataset: the Dataset container, channel statistics, normalize, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.experiments import data as D

HYP = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------------------------------------
# Dataset container
# ----------------------------------------------------------------------------------------------------------


def small_dataset(seed: int = 0, c: int = 3) -> D.Dataset:
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randint(0, 256, (20, c, 5, 5), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 200, (8, c, 5, 5), dtype=torch.uint8, generator=g)
    mean, std = D.channel_stats(train_x)
    return D.Dataset(
        "cifar10", train_x, torch.randint(0, 10, (20,), generator=g), test_x,
        torch.randint(0, 10, (8,), generator=g), 10, mean, std,
    )  # fmt: skip


def test_swap_train_test():
    ds = small_dataset()
    sw = ds.swap_train_test()
    assert sw.train_x is ds.test_x and sw.train_y is ds.test_y
    assert sw.test_x is ds.train_x and sw.test_y is ds.train_y
    assert sw.swapped and not ds.swapped and sw.name == ds.name and sw.num_classes == ds.num_classes
    ref = ds.test_x.double() / 255
    np.testing.assert_allclose(sw.mean, ref.mean(dim=(0, 2, 3)).numpy(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(sw.std, ref.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-12, rtol=0)
    back = sw.swap_train_test()
    assert back.train_x is ds.train_x and not back.swapped
    np.testing.assert_allclose(back.mean, ds.mean, atol=1e-15)


def test_dataset_to_device():
    ds = small_dataset()
    moved = ds.to("meta")
    for f in ("train_x", "train_y", "test_x", "test_y"):
        assert getattr(moved, f).device.type == "meta" and getattr(ds, f).device.type == "cpu"
    assert moved.mean == ds.mean and moved.name == ds.name


def test_dataset_validation():
    ds = small_dataset()
    with pytest.raises(TypeError, match="train_x"):
        D.Dataset("x", ds.train_x.float(), ds.train_y, ds.test_x, ds.test_y, 10, ds.mean, ds.std)
    with pytest.raises(TypeError, match="test_y"):
        D.Dataset("x", ds.train_x, ds.train_y, ds.test_x, ds.test_y[:3], 10, ds.mean, ds.std)
    with pytest.raises(ValueError, match="mean and std"):
        D.Dataset("x", ds.train_x, ds.train_y, ds.test_x, ds.test_y, 10, (0.5,), ds.std)


@HYP
@given(n=st.integers(1, 6), c=st.integers(1, 4), h=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_channel_stats(n, c, h, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, h + 1), dtype=torch.uint8, generator=g)
    mean, std = D.channel_stats(x)
    ref = x.double() / 255
    np.testing.assert_allclose(mean, ref.mean(dim=(0, 2, 3)).numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(std, ref.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# normalize
# ----------------------------------------------------------------------------------------------------------


@HYP
@given(n=st.integers(0, 4), c=st.integers(1, 4), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_normalize(n, c, batched, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, 3, 4) if batched else (c, 3, 4), dtype=torch.uint8, generator=g)
    mean = torch.rand(c, generator=g, dtype=torch.float64).tolist()
    std = (0.05 + torch.rand(c, generator=g, dtype=torch.float64)).tolist()
    out = D.normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = torch.empty(x.shape, dtype=torch.float64)
    for ch in range(c):
        ref[..., ch, :, :] = (x[..., ch, :, :].double() / 255 - mean[ch]) / std[ch]
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


def test_normalize_bad_input():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="x_uint8.*uint8"):
        D.normalize(x.float(), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="mean.*3"):
        D.normalize(x, (0.5,), (0.5,) * 3)
    with pytest.raises(ValueError, match="std must be positive"):
        D.normalize(x, (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="x_uint8 must have shape"):
        D.normalize(x[0, 0], (0.5,), (0.5,))


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


def test_register_dataset_and_the_loader_contract():
    ds = small_dataset()
    seen = []

    def loader(root, download):
        seen.append((root, download))
        return ds

    assert "dstest-set" not in D.dataset_names()
    D.register_dataset("dstest-set", loader)
    try:
        assert D.dataset_names()[: len(D.DATASETS)] == D.DATASETS and "dstest-set" in D.dataset_names()
        assert D.dataset.load_registered("dstest-set", "/r", True) is ds and seen == [("/r", True)]
        D.register_dataset("dstest-set", lambda root, download: "not a data set")  # a name can be registered again
        with pytest.raises(TypeError, match="loader of data set 'dstest-set' must return a Dataset, got str"):
            D.dataset.load_registered("dstest-set", None, False)
    finally:
        D.DATASET_REGISTRY.unregister("dstest-set")
    assert "dstest-set" not in D.dataset_names()
    with pytest.raises(TypeError, match="loader must be callable"):
        D.register_dataset("x", "not callable")
    with pytest.raises(ValueError, match="non-empty word"):
        D.register_dataset("two words", loader)
    for name in D.DATASETS:
        with pytest.raises(ValueError, match="built in"):
            D.register_dataset(name, loader)
