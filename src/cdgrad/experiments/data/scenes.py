"""Digit scenes: a reduced semantic-segmentation data set (and label-map-to-image task) built from real images.

A scene is a ``canvas x canvas`` grey image on which several 28x28 MNIST or Fashion-MNIST images ("digits")
are pasted, with a per-pixel class mask. Definition:

* Layout (`scene_layouts`). Scene ``i`` draws from its own generator
  ``numpy.random.Generator(PCG64(SeedSequence((seed, i))))``, so it does not depend on ``count``: the first
  ``n`` scenes of any longer run are the ``n`` scenes of ``count=n`` (prefix property). In this order it draws
  ``k = rng.integers(digits[0], digits[1] + 1)`` (uniform in ``[digits[0], digits[1]]``), then
  ``index = rng.integers(0, M, size=k)`` (uniform over the ``M`` source images, with replacement), then
  ``rng.integers(0, canvas - 27, size=(k, 2))``: the ``(top, left)`` corner of each digit, uniform over every
  position where the 28x28 patch lies inside the canvas. Digits are pasted in the order drawn.
* Image (`render_scenes`). Each scene pixel is the maximum over the pasted digits of their intensity there
  (0 where no digit covers it).
* Mask. With ``m`` the scene pixel: ``0`` (background) where ``m == 0``; `IGNORE_INDEX` (255) where
  ``0 < m < threshold`` (faint stroke edges, ignored like PascalVOC's boundaries); otherwise ``label + 1``
  of the digit whose intensity there is ``m`` (the largest, hence ``>= threshold``), the later-pasted digit
  on a tie. Classes: ``0`` background, ``1 + c`` source class ``c``; 11 in all. The default ``threshold=64``
  (a quarter of full intensity, rather than half) keeps the darker insides of Fashion-MNIST items labelled.

`compose_scenes` is `scene_layouts` followed by `render_scenes`. Registered data sets ("mnist-scenes",
"fashion-mnist-scenes"), loaded with `load_dataset`: 6,000 training scenes composed from the official
training split only (``seed=0``) and 1,000 test scenes from the official test split only (``seed=1``), each
64x64 with 2 to 4 digits and ``threshold=64``; ``x`` uint8 ``(N, 1, 64, 64)``, ``y`` int64 ``(N, 64, 64)``;
mean/std are `channel_stats` of the training scenes. The base files are looked up as for the base data set
(``root``, ``$CDGRAD_DATA``, the standard locations).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdgrad import validation as V
from cdgrad.experiments.data.dataset import IGNORE_INDEX, Dataset, channel_stats, register_dataset
from cdgrad.experiments.data.sources import load_dataset

__all__ = [
    "SCENE_DATASETS",
    "SceneLayout",
    "compose_scenes",
    "load_scenes",
    "render_scenes",
    "scene_layouts",
    "scenes_dataset",
]

PATCH = 28  # side of a source image
SOURCE_CLASSES = 10  # classes of the source images; a mask holds 1 + SOURCE_CLASSES classes
NUM_CLASSES = SOURCE_CLASSES + 1
CANVAS = 64
DIGITS = (2, 4)
THRESHOLD = 64
TRAIN_SCENES, TEST_SCENES = 6000, 1000
TRAIN_SEED, TEST_SEED = 0, 1

# scene data set -> the official data set its digits come from
SCENE_DATASETS = {"mnist-scenes": "mnist", "fashion-mnist-scenes": "fashion-mnist"}


@dataclass(frozen=True)
class SceneLayout:
    """Where the digits of ``count`` scenes go: slot ``j < digits[i]`` of scene ``i`` is pasted ``j``-th.

    ``index``: int64 ``(count, slots)``, the source image of each slot, -1 for an unused slot (slots are
    ``digits[1]``; the used ones come first); ``top``/``left``: int64 ``(count, slots)``, the patch's upper-left
    corner on the canvas (0 for an unused slot).
    """

    canvas: int
    index: Tensor
    top: Tensor
    left: Tensor

    def __post_init__(self) -> None:
        _check_canvas(self.canvas)
        for field in ("index", "top", "left"):
            t = getattr(self, field)
            if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 2:
                raise TypeError(f"{field} must be an int64 tensor of shape (count, slots)")
        if not self.index.shape == self.top.shape == self.left.shape or 0 in self.index.shape:
            raise ValueError("index, top and left must have one and the same non-empty shape (count, slots)")
        if bool((self.index < -1).any()):
            raise ValueError("index must hold source image indices >= 0, or -1 for an unused slot")
        used = self.index >= 0
        for field in ("top", "left"):
            t = getattr(self, field)[used]
            if bool(((t < 0) | (t > self.canvas - PATCH)).any()):
                raise ValueError(f"{field} must be in [0, canvas - {PATCH}] = [0, {self.canvas - PATCH}]")

    @property
    def count(self) -> int:
        return int(self.index.shape[0])

    @property
    def digits(self) -> Tensor:
        """int64 ``(count,)``: the number of digits of each scene."""
        return (self.index >= 0).sum(1)


def _check_count(count: Any) -> int:
    return V.check_int(count, "count", minimum=1)


def _check_canvas(canvas: Any) -> int:
    return V.check_int(canvas, "canvas", minimum=PATCH)


def _check_digits(digits: Any) -> tuple[int, int]:
    if not isinstance(digits, Sequence) or isinstance(digits, str) or len(digits) != 2:
        raise TypeError(f"digits must be a pair (min, max) of ints, got {digits!r}")
    lo = V.check_int(digits[0], "digits[0]", minimum=1)
    hi = V.check_int(digits[1], "digits[1]", minimum=1)
    if lo > hi:
        raise ValueError(f"digits must be a pair (min, max) with 1 <= min <= max, got {digits!r}")
    return lo, hi


def scene_layouts(
    num_images: int, count: int, *, canvas: int = CANVAS, digits: Sequence[int] = DIGITS, seed: int
) -> SceneLayout:
    """The layouts of scenes ``0 .. count - 1`` over ``num_images`` source images (see the module docstring)."""
    m = V.check_int(num_images, "num_images", minimum=1)
    count = _check_count(count)
    canvas = _check_canvas(canvas)
    lo, hi = _check_digits(digits)
    seed = V.check_int(seed, "seed", minimum=0)
    index = np.full((count, hi), -1, dtype=np.int64)
    corner = np.zeros((count, hi, 2), dtype=np.int64)
    for i in range(count):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, i))))
        k = int(rng.integers(lo, hi + 1))
        index[i, :k] = rng.integers(0, m, size=k)
        corner[i, :k] = rng.integers(0, canvas - PATCH + 1, size=(k, 2))
    return SceneLayout(
        canvas,
        torch.from_numpy(index),
        torch.from_numpy(np.ascontiguousarray(corner[..., 0])),
        torch.from_numpy(np.ascontiguousarray(corner[..., 1])),
    )


def _check_sources(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor of shape (M, 1, {PATCH}, {PATCH})")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, PATCH, PATCH) or images.shape[0] < 1:
        raise ValueError(f"images must have shape (M, 1, {PATCH}, {PATCH}) with M >= 1, got {tuple(images.shape)}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        raise TypeError("labels must be an int64 tensor of shape (M,)")
    if tuple(labels.shape) != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    y = labels.detach().cpu().numpy()
    if y.size and (y.min() < 0 or y.max() >= SOURCE_CLASSES):
        raise ValueError(f"labels must be in [0, {SOURCE_CLASSES}), got values in [{y.min()}, {y.max()}]")
    return images.detach().cpu().numpy()[:, 0], y


def render_scenes(
    images: Tensor, labels: Tensor, layout: SceneLayout, *, threshold: int = THRESHOLD
) -> tuple[Tensor, Tensor]:
    """Scenes of ``layout``: uint8 images ``(count, 1, canvas, canvas)`` and int64 masks ``(count, canvas, canvas)``.

    ``images``: uint8 ``(M, 1, 28, 28)``, ``labels``: int64 ``(M,)`` in ``[0, 10)``; pixel and mask rules in the
    module docstring. Vectorised over scenes: one gather and scatter per digit slot.
    """
    src, cls = _check_sources(images, labels)
    threshold = V.check_int(threshold, "threshold", minimum=1, maximum=255)
    if not isinstance(layout, SceneLayout):
        raise TypeError(f"layout must be a SceneLayout, got {type(layout).__name__}")
    index, top, left = (t.detach().cpu().numpy() for t in (layout.index, layout.top, layout.left))
    if index.max() >= src.shape[0]:
        raise ValueError(f"layout refers to source image {index.max()} but images holds only {src.shape[0]}")
    count, side = layout.count, layout.canvas
    best = np.zeros(count * side * side, dtype=np.uint8)  # the scenes, flat: max intensity so far
    owner = np.zeros(count * side * side, dtype=np.uint8)  # label + 1 of the digit holding it (the later on ties)
    offsets = np.arange(PATCH)
    for j in range(index.shape[1]):
        scenes = np.nonzero(index[:, j] >= 0)[0]
        if scenes.size == 0:
            continue
        patch = src[index[scenes, j]]
        rows = (top[scenes, j] + scenes * side)[:, None] + offsets  # row of the stacked (count * side, side) canvas
        cols = left[scenes, j][:, None] + offsets
        flat = (rows * side)[:, :, None] + cols[:, None, :]
        here = best[flat]
        wins = patch >= here
        best[flat] = np.where(wins, patch, here)
        owner[flat] = np.where(wins, (cls[index[scenes, j]] + 1).astype(np.uint8)[:, None, None], owner[flat])
    mask = np.where(best >= threshold, owner, np.where(best > 0, np.uint8(IGNORE_INDEX), np.uint8(0)))
    x = torch.from_numpy(best.reshape(count, 1, side, side))
    return x, torch.from_numpy(mask.reshape(count, side, side)).to(torch.int64)


def compose_scenes(
    images: Tensor,
    labels: Tensor,
    count: int,
    *,
    canvas: int = CANVAS,
    digits: Sequence[int] = DIGITS,
    threshold: int = THRESHOLD,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """``count`` scenes of the source ``images``/``labels``: `scene_layouts` then `render_scenes`."""
    _check_sources(images, labels)
    layout = scene_layouts(images.shape[0], count, canvas=canvas, digits=digits, seed=seed)
    return render_scenes(images, labels, layout, threshold=threshold)


def scenes_dataset(
    base: Dataset,
    name: str,
    *,
    train_count: int = TRAIN_SCENES,
    test_count: int = TEST_SCENES,
    canvas: int = CANVAS,
    digits: Sequence[int] = DIGITS,
    threshold: int = THRESHOLD,
    train_seed: int = TRAIN_SEED,
    test_seed: int = TEST_SEED,
) -> Dataset:
    """The scene `Dataset` ``name`` of ``base``: training scenes from its training split, test scenes from its test."""
    if not isinstance(base, Dataset):
        raise TypeError(f"base must be a Dataset, got {type(base).__name__}")
    options: dict[str, Any] = {"canvas": canvas, "digits": digits, "threshold": threshold}
    train_x, train_y = compose_scenes(base.train_x, base.train_y, train_count, seed=train_seed, **options)
    test_x, test_y = compose_scenes(base.test_x, base.test_y, test_count, seed=test_seed, **options)
    mean, std = channel_stats(train_x)
    return Dataset(name, train_x, train_y, test_x, test_y, NUM_CLASSES, mean, std)


def load_scenes(name: str, root: str | os.PathLike[str] | None = None, download: bool = True) -> Dataset:
    """Scene data set ``name`` (a key of `SCENE_DATASETS`) from the official files of its base data set."""
    V.check_choice(name, "name", tuple(SCENE_DATASETS))
    return scenes_dataset(load_dataset(SCENE_DATASETS[name], root, download), name)


for _name in SCENE_DATASETS:
    register_dataset(_name, functools.partial(load_scenes, _name))
