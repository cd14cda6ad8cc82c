"""Augmentation of whole uint8 batches: random crop with zero padding and horizontal flip (the CIFAR protocol); for
dense tasks, random scale, crop and flip of images and label maps together.

`augment_crop_flip(x, pad, generator)` draws the offsets and flips (`crop_flip_params`) and applies them
(`crop_flip`) with one gather for the whole batch, on the batch's device. `scale_crop_flip(x, y, crop, ...)` does
the joint augmentation of the dense tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cdgrad import validation as V
from cdgrad.experiments.data.dataset import IGNORE_INDEX

__all__ = ["augment_crop_flip", "crop_flip", "crop_flip_params", "scale_crop_flip"]


def crop_flip_params(
    n: int, pad: int = 4, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Random draws of `augment_crop_flip` for ``n`` images: ``(dy, dx, flip)``.

    ``dy``, ``dx``: int64 offsets uniform in ``[0, 2 pad]``; ``flip``: bool, True with probability 1/2.
    Drawn in that order from ``generator`` (on the generator's device; the global generator of
    ``device`` when None) and returned on ``device``.
    """
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    draw_device = generator.device if generator is not None else device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=draw_device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=draw_device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=draw_device).bool()
    return dy.to(device), dx.to(device), flip.to(device)


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Deterministic part of `augment_crop_flip`.

    With ``P`` = ``x`` zero-padded by ``pad`` on each spatial side,
    ``out[n, :, i, j] = P[n, :, dy[n] + i, dx[n] + j']`` where ``j' = W - 1 - j`` if ``flip[n]`` else ``j``.
    One gather for the whole batch, no loop over images.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', x)!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    n, _, h, w = x.shape
    for name, t in (("dy", dy), ("dx", dx), ("flip", flip)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if n and (int(dy.min()) < 0 or int(dy.max()) > 2 * pad or int(dx.min()) < 0 or int(dx.max()) > 2 * pad):
        raise ValueError(f"dy and dx must lie in [0, {2 * pad}] for pad={pad}")
    return _crop_flip(x, dy, dx, flip, pad)


def _crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int) -> Tensor:
    n, _, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev, torch.bool)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (N, W)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded[idx_n, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C): advanced dims come first
    return out.permute(0, 3, 1, 2).contiguous()


def augment_crop_flip(x: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Standard CIFAR augmentation for a whole batch ``(N, C, H, W)`` on its own device.

    Zero-pad by ``pad``, take a random ``H x W`` crop per image, flip it horizontally with probability
    1/2: ``crop_flip(x, *crop_flip_params(N, pad, generator, x.device), pad)``. Zero padding of uint8
    images (before `normalize`) matches torchvision's ``RandomCrop(padding=pad)``; after `normalize` the
    border is the channel mean instead.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', x)!r}")
    dy, dx, flip = crop_flip_params(x.shape[0], pad, generator, x.device)
    return _crop_flip(x, dy, dx, flip, pad)  # offsets in range by construction: no device sync


def _nearest_index(n_out: int, n_in: int, device: torch.device) -> Tensor:
    """Source index of each of ``n_out`` output pixels resampled from ``n_in``: the input pixel holding the
    output pixel's centre, ``floor((j + 1/2) n_in / n_out)``, in exact integer arithmetic."""
    return (2 * torch.arange(n_out, device=device) + 1) * n_in // (2 * n_out)


def scale_crop_flip(
    x: Tensor,
    y: Tensor,
    crop: int,
    scale: tuple[float, float] = (0.5, 2.0),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Random scale, crop and horizontal flip of images uint8 ``(N, C, H, W)`` and their label maps int64 ``(N, H, W)``.

    Per image: a factor ``s`` uniform in ``scale``; the image resized to ``(round(s H), round(s W))`` (at least 1)
    by bilinear interpolation (``align_corners=False``, rounded back to uint8) and the label map by nearest
    neighbour (the input pixel holding each output pixel's centre); both padded at the bottom and right to at
    least ``crop x crop`` (image with 0, labels with `IGNORE_INDEX`); a ``crop x crop`` window at a uniformly
    random offset; both flipped horizontally with probability 1/2. Returns uint8 ``(N, C, crop, crop)`` and int64
    ``(N, crop, crop)`` on ``x``'s device. All draws come from ``generator`` (on its device; the default generator
    of ``x``'s device when None): one float64 ``torch.rand((4, N))`` whose rows give the scale, the row and column
    offsets and the flip.
    """
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"x must be a uint8 tensor of shape (N, C, H, W), got {getattr(x, 'shape', x)!r}")
    n, c, h, w = x.shape
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (n, h, w):
        raise TypeError(f"y must be an int64 tensor of shape {(n, h, w)}, got {getattr(y, 'shape', y)!r}")
    V.check_int(crop, "crop", 1)
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a pair (low, high) of floats, got {scale!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"scale must satisfy 0 < low <= high (finite), got {scale!r}")
    dev = x.device
    draw_device = generator.device if generator is not None else dev
    draws = torch.rand((4, n), generator=generator, device=draw_device, dtype=torch.float64).cpu().tolist()
    out_x, out_y = [], []
    for i in range(n):
        s = lo + (hi - lo) * draws[0][i]
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        xi, yi = x[i : i + 1], y[i]
        if (nh, nw) != (h, w):
            resized = F.interpolate(xi.float(), size=(nh, nw), mode="bilinear", align_corners=False)
            xi = resized.round_().clamp_(0, 255).to(torch.uint8)
            yi = yi[_nearest_index(nh, h, dev)[:, None], _nearest_index(nw, w, dev)]
        ph, pw = max(0, crop - nh), max(0, crop - nw)
        if ph or pw:
            xi = F.pad(xi, (0, pw, 0, ph), value=0)
            yi = F.pad(yi, (0, pw, 0, ph), value=IGNORE_INDEX)
        oy = min(int(draws[1][i] * (nh + ph - crop + 1)), nh + ph - crop)
        ox = min(int(draws[2][i] * (nw + pw - crop + 1)), nw + pw - crop)
        xi, yi = xi[0, :, oy : oy + crop, ox : ox + crop], yi[oy : oy + crop, ox : ox + crop]
        if draws[3][i] < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        out_x.append(xi)
        out_y.append(yi)
    if not out_x:
        return x.new_empty((0, c, crop, crop)), y.new_empty((0, crop, crop))
    return torch.stack(out_x), torch.stack(out_y)
