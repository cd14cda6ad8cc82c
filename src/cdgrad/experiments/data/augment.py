"""Augmentation of whole uint8 batches: random crop with zero padding and horizontal flip (the CIFAR protocol).

`augment_crop_flip(x, pad, generator)` draws the offsets and flips (`crop_flip_params`) and applies them
(`crop_flip`) with one gather for the whole batch, on the batch's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["augment_crop_flip", "crop_flip", "crop_flip_params"]


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
