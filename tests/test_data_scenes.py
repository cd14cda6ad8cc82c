"""Tests of cdgrad.experiments.data.scenes: digit scenes with per-pixel class masks."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from cdgrad.experiments import data as D
from cdgrad.experiments.data import scenes as S
from helpers import SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")
HYP = settings(max_examples=25, deadline=None)
Placed = tuple[int, int, int]  # (source index, top, left) of one pasted digit


def sources(m: int, seed: int = 0, levels: tuple[int, ...] = (0, 0, 0, 30, 64, 100, 200, 255)) -> tuple[Tensor, Tensor]:
    """``m`` random 28x28 images over a few grey levels (frequent ties, zeros and faint pixels) and labels."""
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array(levels, dtype=np.uint8), size=(m, 1, 28, 28))
    y = rng.integers(0, 10, m)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def documented_layout(m: int, i: int, canvas: int, digits: tuple[int, int], seed: int) -> list[Placed]:
    """Scene ``i``'s draws exactly as the module docstring defines them: [(index, top, left), ...] in paste order."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, i))))
    k = int(rng.integers(digits[0], digits[1] + 1))
    index = rng.integers(0, m, size=k)
    corner = rng.integers(0, canvas - 27, size=(k, 2))
    return [(int(index[j]), int(corner[j, 0]), int(corner[j, 1])) for j in range(k)]


def naive_scene(
    images: Tensor, labels: Tensor, placed: list[Placed], canvas: int, threshold: int
) -> tuple[Tensor, Tensor]:
    """One scene by a per-pixel loop: max over the covering digits; mask by the documented rule."""
    imgs = images[:, 0].tolist()
    labs = labels.tolist()
    x = [[0] * canvas for _ in range(canvas)]
    y = [[0] * canvas for _ in range(canvas)]
    for r in range(canvas):
        for c in range(canvas):
            covering = [
                (imgs[idx][r - top][c - left], labs[idx])
                for idx, top, left in placed
                if top <= r < top + 28 and left <= c < left + 28
            ]
            m = max((v for v, _ in covering), default=0)
            x[r][c] = m
            if m == 0:
                y[r][c] = 0
            elif m < threshold:
                y[r][c] = D.IGNORE_INDEX
            else:
                y[r][c] = [lab for v, lab in covering if v == m][-1] + 1  # the later-pasted one on a tie
    return torch.tensor(x, dtype=torch.uint8)[None], torch.tensor(y, dtype=torch.int64)


def placed_of(layout: S.SceneLayout, i: int) -> list[Placed]:
    k = int(layout.digits[i])
    return [(int(layout.index[i, j]), int(layout.top[i, j]), int(layout.left[i, j])) for j in range(k)]


# ------------------------------------------------------------------------------------------------ layouts


def test_layouts_follow_the_documented_draws() -> None:
    m, canvas, digits = 37, 40, (1, 5)
    layout = D.scene_layouts(m, 30, canvas=canvas, digits=digits, seed=7)
    assert layout.count == 30 and layout.canvas == canvas
    assert layout.index.shape == layout.top.shape == layout.left.shape == (30, 5)
    assert all(t.dtype == torch.int64 for t in (layout.index, layout.top, layout.left))
    for i in range(30):
        assert placed_of(layout, i) == documented_layout(m, i, canvas, digits, seed=7)
        k = int(layout.digits[i])
        assert (layout.index[i, k:] == -1).all() and (layout.top[i, k:] == 0).all() and (layout.left[i, k:] == 0).all()


def test_layouts_cover_the_documented_ranges() -> None:
    layout = D.scene_layouts(5, 2000, canvas=31, digits=(2, 4), seed=0)
    assert set(layout.digits.tolist()) == {2, 3, 4}
    used = layout.index >= 0
    assert set(layout.index[used].tolist()) == set(range(5))
    for t in (layout.top, layout.left):
        assert set(t[used].tolist()) == {0, 1, 2, 3}  # every position where the patch fits in the canvas


# ------------------------------------------------------------------------------------------------ composition


@HYP
@given(
    m=st.integers(1, 6), count=st.integers(1, 4), canvas=st.integers(28, 36), lo=st.integers(1, 3),
    extra=st.integers(0, 3), threshold=st.sampled_from([1, 64, 100, 128, 255]), seed=st.integers(0, 2**32),
)  # fmt: skip
def test_render_matches_per_pixel_reference(
    m: int, count: int, canvas: int, lo: int, extra: int, threshold: int, seed: int
) -> None:
    images, labels = sources(m, seed=seed % 1000)
    layout = D.scene_layouts(m, count, canvas=canvas, digits=(lo, lo + extra), seed=seed)
    x, y = D.render_scenes(images, labels, layout, threshold=threshold)
    assert x.shape == (count, 1, canvas, canvas) and x.dtype == torch.uint8
    assert y.shape == (count, canvas, canvas) and y.dtype == torch.int64
    for i in range(count):
        rx, ry = naive_scene(images, labels, placed_of(layout, i), canvas, threshold)
        assert torch.equal(x[i], rx) and torch.equal(y[i], ry)
    cx, cy = D.compose_scenes(images, labels, count, canvas=canvas, digits=(lo, lo + extra), threshold=threshold,
                              seed=seed)  # fmt: skip
    assert torch.equal(cx, x) and torch.equal(cy, y)


def test_labelled_pixels_belong_to_the_brightest_covering_digit() -> None:
    """Each labelled pixel: some digit covers it with the scene's (maximal) intensity >= threshold and that class."""
    images, labels = sources(20, seed=3)
    canvas, threshold = 48, 100
    layout = D.scene_layouts(20, 40, canvas=canvas, digits=(2, 6), seed=5)
    x, y = D.render_scenes(images, labels, layout, threshold=threshold)
    for i in range(40):
        stack = torch.zeros(len(placed_of(layout, i)), canvas, canvas, dtype=torch.uint8)
        covered = torch.zeros_like(stack, dtype=torch.bool)
        for j, (idx, top, left) in enumerate(placed_of(layout, i)):
            stack[j, top : top + 28, left : left + 28] = images[idx, 0]
            covered[j, top : top + 28, left : left + 28] = True
        assert torch.equal(x[i, 0], stack.max(0).values)
        cls = torch.tensor([labels[idx] + 1 for idx, _, _ in placed_of(layout, i)])
        is_max = covered & (stack == x[i, 0]) & (stack >= threshold)
        lab = (y[i] >= 1) & (y[i] <= 10)
        ok = (is_max & (cls[:, None, None] == y[i])).any(0)
        assert ok[lab].all()
        assert torch.equal(lab, x[i, 0] >= threshold)


def test_mask_background_and_ignored_pixels() -> None:
    images, labels = sources(50, seed=1)
    x, y = D.compose_scenes(images, labels, 64, seed=2, threshold=64)
    x = x[:, 0]
    assert torch.equal(y == 0, x == 0)  # background exactly where no digit has ink
    assert torch.equal(y == D.IGNORE_INDEX, (x > 0) & (x < 64))
    assert set(y.flatten().tolist()) <= set(range(11)) | {D.IGNORE_INDEX}


def test_ties_go_to_the_later_digit() -> None:
    images = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    labels = torch.tensor([3, 8])
    index = torch.tensor([[0, 1], [1, 0]])
    corner = torch.zeros(2, 2, dtype=torch.int64)
    layout = D.SceneLayout(28, index, corner, corner.clone())
    _, y = D.render_scenes(images, labels, layout, threshold=128)
    assert (y[0] == 9).all() and (y[1] == 4).all()


# ------------------------------------------------------------------------------------------------ seeds


def test_determinism_and_seeds() -> None:
    images, labels = sources(30, seed=4)
    a = D.compose_scenes(images, labels, 20, seed=11)
    b = D.compose_scenes(images, labels, 20, seed=11)
    c = D.compose_scenes(images, labels, 20, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_prefix_property() -> None:
    images, labels = sources(30, seed=4)
    short = D.compose_scenes(images, labels, 10, seed=3)
    long = D.compose_scenes(images, labels, 100, seed=3)
    assert torch.equal(short[0], long[0][:10]) and torch.equal(short[1], long[1][:10])
    la, lb = D.scene_layouts(30, 10, seed=3), D.scene_layouts(30, 100, seed=3)
    assert torch.equal(la.index, lb.index[:10]) and torch.equal(la.top, lb.top[:10])


# ------------------------------------------------------------------------------------------------ data sets


def marked_base(value_train: int = 201, value_test: int = 202) -> D.Dataset:
    """A base data set whose training and test images have distinct grey levels."""
    rng = np.random.default_rng(0)
    ink = rng.random((2, 40, 1, 28, 28)) < 0.3
    train_x = torch.from_numpy(np.where(ink[0], value_train, 0).astype(np.uint8))
    test_x = torch.from_numpy(np.where(ink[1], value_test, 0).astype(np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, 40))
    return D.Dataset("base", train_x, y, test_x, y.flip(0), 10, (0.5,), (0.5,))


def test_scenes_dataset_uses_each_split_only() -> None:
    ds = D.scenes_dataset(marked_base(), "scenes", train_count=30, test_count=20)
    assert ds.name == "scenes" and ds.num_classes == 11 and ds.dense
    assert ds.train_x.shape == (30, 1, 64, 64) and ds.test_x.shape == (20, 1, 64, 64)
    assert set(ds.train_x.flatten().tolist()) == {0, 201}
    assert set(ds.test_x.flatten().tolist()) == {0, 202}
    assert (ds.mean, ds.std) == D.channel_stats(ds.train_x)
    base = marked_base()
    x, y = D.compose_scenes(base.test_x, base.test_y, 20, seed=1)
    assert torch.equal(ds.test_x, x) and torch.equal(ds.test_y, y)


@pytest.mark.parametrize("name, base_name", [("mnist-scenes", "mnist"), ("fashion-mnist-scenes", "fashion-mnist")])
def test_registered_scenes_on_real_data(name: str, base_name: str) -> None:
    root = SHARED_DATA / base_name
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    assert name in D.dataset_names()
    ds = D.load_dataset(name, root, download=False)
    assert isinstance(ds, D.Dataset) and ds.name == name and ds.num_classes == 11 and ds.dense
    assert ds.train_x.shape == (6000, 1, 64, 64) and ds.train_y.shape == (6000, 64, 64)
    assert ds.test_x.shape == (1000, 1, 64, 64) and ds.test_y.shape == (1000, 64, 64)
    assert (ds.mean, ds.std) == D.channel_stats(ds.train_x)
    for y in (ds.train_y, ds.test_y):
        assert set(y.flatten().tolist()) == set(range(11)) | {D.IGNORE_INDEX}
    base = D.load_dataset(base_name, root, download=False)
    for split, seed in (("train", 0), ("test", 1)):
        bx, by = getattr(base, f"{split}_x"), getattr(base, f"{split}_y")
        layout = D.scene_layouts(bx.shape[0], 50, seed=seed)
        x, y = D.render_scenes(bx, by, layout, threshold=64)
        assert torch.equal(getattr(ds, f"{split}_x")[:50], x) and torch.equal(getattr(ds, f"{split}_y")[:50], y)


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"canvas": 27}, "canvas"),
        ({"digits": (3, 2)}, "digits"),
        ({"digits": (0, 2)}, "digits"),
        ({"count": 0}, "count"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 256}, "threshold"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    images, labels = sources(3)
    args = {"count": 2, "seed": 0, **kwargs}
    count = args.pop("count")
    with pytest.raises(ValueError, match=param):
        D.compose_scenes(images, labels, count, **args)
    if param != "threshold":
        with pytest.raises(ValueError, match=param):
            D.scene_layouts(3, count, **args)


def test_bad_sources_and_layouts() -> None:
    images, labels = sources(3)
    with pytest.raises(TypeError, match="images"):
        D.compose_scenes(images.float(), labels, 2, seed=0)
    with pytest.raises(ValueError, match="images"):
        D.compose_scenes(images[:, :, :20], labels, 2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        D.compose_scenes(images, labels + 10, 2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        D.compose_scenes(images, labels[:2], 2, seed=0)
    with pytest.raises(TypeError, match="digits"):
        D.compose_scenes(images, labels, 2, digits=cast(Any, 3), seed=0)
    zero = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="top"):
        D.SceneLayout(30, zero, zero + 3, zero)
    with pytest.raises(ValueError, match="canvas"):
        D.SceneLayout(20, zero, zero, zero)
    with pytest.raises(ValueError, match="source image"):
        D.render_scenes(images, labels, D.SceneLayout(28, zero + 3, zero, zero))
