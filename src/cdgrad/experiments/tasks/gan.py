"""The losses of the image-synthesis task (SPADE, pix2pixHD): hinge losses and feature matching.

The generator loss of the paper is ``hinge_g_loss(fake) + 10 * feature_matching_loss(real, fake)`` (its VGG
perceptual term is not provided); the discriminator loss is ``hinge_d_loss(real, fake)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["feature_matching_loss", "hinge_d_loss", "hinge_g_loss"]


# the discriminator's output: logits, or per scale logits or a list of features whose last entry is the logits
Predictions = Tensor | Sequence[Tensor | Sequence[Tensor]]


def _logits(pred: Predictions, name: str) -> list[Tensor]:
    if isinstance(pred, Tensor):
        return [pred]
    out = [p if isinstance(p, Tensor) else p[-1] for p in pred]
    if not out:
        raise ValueError(f"{name} holds no scale")
    return out


def hinge_d_loss(real: Predictions, fake: Predictions) -> Tensor:
    """Discriminator hinge loss ``mean(relu(1 - real)) + mean(relu(1 + fake))``, averaged over scales."""
    reals, fakes = _logits(real, "real"), _logits(fake, "fake")
    if len(reals) != len(fakes):
        raise ValueError(f"real and fake have different numbers of scales: {len(reals)} and {len(fakes)}")
    total = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(reals, fakes, strict=True))
    return torch.as_tensor(total) / len(reals)


def hinge_g_loss(fake: Predictions) -> Tensor:
    """Generator hinge loss ``-mean(fake)``, averaged over scales."""
    fakes = _logits(fake, "fake")
    return -torch.as_tensor(sum(f.mean() for f in fakes)) / len(fakes)


def feature_matching_loss(real: Sequence[Sequence[Tensor]], fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """pix2pixHD's feature matching: ``sum_{scale, layer} L1(fake, real.detach()) / num_d`` over the intermediate
    features (all but the last, the logits) of each scale. The caller applies the weight (10 in SPADE)."""
    if len(real) != len(fake) or not fake:
        raise ValueError(f"real and fake must hold the same, nonzero number of scales; got {len(real)}, {len(fake)}")
    total = torch.zeros((), device=fake[0][-1].device, dtype=fake[0][-1].dtype)
    for r_scale, f_scale in zip(real, fake, strict=True):
        if len(r_scale) != len(f_scale):
            raise ValueError(f"real and fake have different numbers of features: {len(r_scale)}, {len(f_scale)}")
        for r, f in zip(r_scale[:-1], f_scale[:-1], strict=True):
            total = total + F.l1_loss(f, r.detach())
    return total / len(fake)
