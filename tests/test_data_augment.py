"""Tests of cdgrad.experiments.data.augment: random crop with zero padding and horizontal flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.experiments import data as D

HYP = settings(max_examples=30, deadline=None)


def naive_crop_flip(x: torch.Tensor, dy, dx, flip, pad: int) -> torch.Tensor:
    out = torch.empty_like(x)
    _, _, h, w = x.shape
    for i in range(x.shape[0]):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        crop = padded[:, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


@HYP
@given(
    n=st.integers(0, 6), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), pad=st.integers(0, 4),
    seed=st.integers(0, 2**16), uint8=st.booleans(),
)  # fmt: skip
def test_augment_matches_per_image_reference(n, c, h, w, pad, seed, uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g)
    x = x.to(torch.uint8) if uint8 else x.double() / 7
    before = x.clone()
    out = D.augment_crop_flip(x, pad, generator=torch.Generator().manual_seed(seed + 1))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(x, before)
    dy, dx, flip = D.crop_flip_params(n, pad, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(out, naive_crop_flip(x, dy, dx, flip, pad))
    assert torch.equal(D.crop_flip(x, dy, dx, flip, pad), out)


def test_augment_outputs_are_crops_of_padded_input():
    """Brute force: every output equals one of the (2 pad + 1)^2 * 2 crops/flips of its padded input."""
    pad = 2
    x = torch.randn(24, 2, 6, 5, dtype=torch.float64)
    out = D.augment_crop_flip(x, pad, generator=torch.Generator().manual_seed(3))
    seen = set()
    for i in range(x.shape[0]):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        matches = [
            (dy, dx, fl)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for fl in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if fl else c)(padded[:, dy : dy + 6, dx : dx + 5]))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # the draws vary between images


def test_augment_determinism_and_distribution():
    x = torch.arange(4000 * 2 * 4 * 4, dtype=torch.float32).reshape(4000, 2, 4, 4)
    a = D.augment_crop_flip(x, 3, generator=torch.Generator().manual_seed(0))
    b = D.augment_crop_flip(x, 3, generator=torch.Generator().manual_seed(0))
    c = D.augment_crop_flip(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = D.augment_crop_flip(x, 3)
    torch.manual_seed(7)
    assert torch.equal(d, D.augment_crop_flip(x, 3))
    dy, dx, flip = D.crop_flip_params(4000, 3, generator=torch.Generator().manual_seed(0))
    assert set(dy.tolist()) == set(range(7)) and set(dx.tolist()) == set(range(7))
    assert 0.45 < flip.double().mean().item() < 0.55
    # pad 0: only flips, each image is itself or its mirror image.
    e = D.augment_crop_flip(x, 0, generator=torch.Generator().manual_seed(0))
    same = (e == x).flatten(1).all(1)
    mirrored = (e == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 1000 < int(mirrored.sum()) < 3000


def test_augment_bad_input():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="pad must be a non-negative int"):
        D.augment_crop_flip(x, -1)
    with pytest.raises(ValueError, match="pad must be a non-negative int"):
        D.augment_crop_flip(x, 1.5)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, C, H, W\)"):
        D.augment_crop_flip(x[0])
    zeros = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"dy and dx must lie in \[0, 2\]"):
        D.crop_flip(x, zeros + 3, zeros, zeros.bool(), pad=1)
    with pytest.raises(ValueError, match="flip must have shape"):
        D.crop_flip(x, zeros, zeros, zeros[:1].bool(), pad=1)
