"""The image-synthesis task: SPADE (Park et al. 2019) renders label maps as images; scored by FID.

The task trains two networks, the generator G and the discriminator D (units `model` and `disc`). Each step,
as in SPADE's trainer, first updates the generator G on

    L_G = hinge_G(D(s, G(s))) + 10 * FM(D(s, x), D(s, G(s)))        (hinge loss and feature matching, lambda 10)

and then the discriminator D on `hinge_D(D(s, x), D(s, G'(s)))`, G' the updated generator (no gradient into it),
with one optimizer each (the run's optimizer, momentum and weight decay; lr for G, `lr_d` (default 4 lr) for D),
each with its own schedule and the run's gradient method attached to it. Images enter as `x / 127.5 - 1` (tanh
range), label maps as one-hot maps `s`. At every evaluation, G (in eval mode) renders every label map of the test
split, and the FID between those images and the real test images is computed in the features of `fid_extractor`:

    'inception'   the standard FID network (`cdgrad.experiments.fid.InceptionV3Features`, weights from a file)
    'classifier'  `PresenceClassifier`: a small CNN trained once per data set (seed 0, on the training split)
                  to say which classes a label map holds; its 128 pooled features divided by one number, their
                  root-mean-square standard deviation over the real training images (so the FID is in units of
                  the real features' average spread; one scale for all features keeps FID's geometry, where a
                  per-feature scale would magnify features that barely vary). FIDs in these features are
                  comparable between runs on the same data set only.

The real images' statistics are computed once per run, or read from `fid_stats` (an .npz with `mu` and `sigma`).

Both networks, their optimizers, schedules and methods are checkpointed by the one training loop like a supervised
run's network. A synthesis run trains in one process (no torchrun).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad.experiments.fid import (
    InceptionV3Features,
    extract_features,
    feature_statistics,
    frechet_distance,
    load_statistics,
)
from cdgrad.experiments.spade import one_hot_labels, spade_discriminator, spade_generator
from cdgrad.experiments.tasks.base import Context, Metric, Network, Task, Unit
from cdgrad.experiments.tasks.gan import feature_matching_loss, hinge_d_loss, hinge_g_loss

__all__ = [
    "FEATURE_MATCHING_WEIGHT",
    "SYNTHESIS",
    "PresenceClassifier",
    "check_fid_source",
    "fid_extractor",
    "render",
]

FEATURE_MATCHING_WEIGHT = 10.0  # lambda_feat of pix2pixHD and SPADE


# ------------------------------------------------------------------------------------------ FID features
class PresenceClassifier(nn.Module):
    """Three 3x3 conv + ReLU stages (32, 64, 128 channels, 2x2 max-pool between) and a global average pool: the
    128 features of the FID; a linear layer on them predicts which classes (1..K-1) appear in an image."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes - 1)
        self.scale: Tensor
        self.register_buffer("scale", torch.ones(()))  # 1 / the features' RMS std over the real training images

    def features(self, x: Tensor) -> Tensor:
        """The 128 pooled features of uint8 images (N, C, H, W)."""
        out: Tensor = self.body(x.float() / 127.5 - 1.0)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The FID features: `features(x) * scale`."""
        return self.features(x) * self.scale

    def logits(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


def presence(y: Tensor, num_classes: int) -> Tensor:
    """(N, K-1) float: 1 where class k (1..K-1) labels at least one pixel of the label map (255 ignored)."""
    hits = torch.zeros(len(y), num_classes + 1, device=y.device)
    flat = y.reshape(len(y), -1).clamp(max=num_classes)  # 255 -> the spare column num_classes
    hits.scatter_(1, flat, 1.0)
    return hits[:, 1:num_classes]


def train_presence_classifier(ds: Any, epochs: int = 3, batch_size: int = 128) -> PresenceClassifier:
    """`PresenceClassifier` trained with Adam (lr 1e-3) on multi-label BCE over the training split, seed 0."""
    device = ds.train_x.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PresenceClassifier(ds.train_x.shape[1], ds.num_classes).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        target = presence(ds.train_y, ds.num_classes)
        for _ in range(epochs):
            perm = torch.randperm(len(ds.train_x), generator=gen, device=device)
            for i in range(0, len(perm), batch_size):
                idx = perm[i : i + batch_size]
                loss = F.binary_cross_entropy_with_logits(model.logits(ds.train_x[idx]), target[idx])
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(ds.train_x[i : i + 500]) for i in range(0, len(ds.train_x), 500)])
    spread = feats.double().var(0).mean().sqrt()
    model.scale.fill_(1.0 / float(spread) if spread > 0 else 1.0)
    return model


FEATURE_DIMS = {"inception": 2048, "classifier": 128}  # the FID feature dimension of each extractor


def _inception(config: Any) -> InceptionV3Features:
    """The FID Inception network from `fid_weights`; ValueError (FileNotFoundError) naming what is missing."""
    if config.fid_weights is None:
        raise ValueError(
            "fid_extractor=inception needs fid_weights, the path of pt_inception-2015-12-05-6726825d.pth "
            "(see docs/dense.md for where to get it), or fid_extractor=classifier"
        )
    return InceptionV3Features.from_file(config.fid_weights)


def _real_statistics(config: Any) -> tuple[Tensor, Tensor] | None:
    """The real images' feature statistics from `fid_stats` (checked against the extractor's size), or None."""
    if config.fid_stats is None:
        return None
    return load_statistics(config.fid_stats, FEATURE_DIMS[config.fid_extractor])


def check_fid_source(config: Any) -> None:
    """ValueError (naming the file) unless the FID of `config` can be computed: for 'inception', the weights file
    must be given and hold the FID Inception network; `fid_stats` must hold statistics of the extractor's size."""
    _real_statistics(config)
    if config.fid_extractor == "inception":
        _inception(config)


_CLASSIFIERS: dict[tuple[Any, ...], PresenceClassifier] = {}


def fid_extractor(config: Any, ds: Any) -> Callable[[Tensor], Tensor]:
    """The FID feature extractor of `config` for `ds`: uint8 images (N, C, H, W) -> (N, D) features."""
    if config.fid_extractor == "inception":
        net = _inception(config).to(ds.train_x.device).eval()
        return lambda x: net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
    key = (ds.name, tuple(ds.train_x.shape), int(ds.train_x.sum()), str(ds.train_x.device))
    if key not in _CLASSIFIERS:  # trained once per data set and process (deterministic: seed 0)
        _CLASSIFIERS[key] = train_presence_classifier(ds)
    return _CLASSIFIERS[key]


# ------------------------------------------------------------------------------------------------ rendering
def to_images(x: Tensor) -> Tensor:
    """Generator outputs in [-1, 1] as uint8 images, round((x + 1) 127.5)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def render(generator: nn.Module, labels: Tensor, num_classes: int, batch_size: int) -> Tensor:
    """uint8 images G renders (eval mode) from the label maps `labels` (N, H, W)."""
    generator.eval()
    out = [
        to_images(generator(one_hot_labels(labels[i : i + batch_size], num_classes)))
        for i in range(0, len(labels), batch_size)
    ]
    return torch.cat(out)


def fid(
    generator: nn.Module,
    ds: Any,
    extract: Callable[[Tensor], Tensor],
    real: tuple[Tensor, Tensor],
    batch_size: int,
) -> float:
    """FID between the test split's real images (statistics `real`) and G's renderings of its label maps."""
    fake = render(generator, ds.test_y, ds.num_classes, batch_size)
    mu, sigma = feature_statistics(extract_features(extract, fake, batch_size))
    return frechet_distance(mu, sigma, *real)


# -------------------------------------------------------------------------------------------------- the task
def _networks(config: Any, ds: Any) -> list[Network]:
    channels, size = ds.train_x.shape[1], tuple(ds.train_x.shape[2:])
    g = spade_generator(config.model, ds.num_classes, size, channels)
    d = spade_discriminator(config.model, ds.num_classes, channels)

    def g_inputs(x: Tensor, y: Tensor) -> Tensor:
        return one_hot_labels(y, ds.num_classes)

    def d_inputs(x: Tensor, y: Tensor) -> Tensor:
        return torch.cat([one_hot_labels(y, ds.num_classes), x.float() / 127.5 - 1], 1)

    return [Network("model", g, config.lr, g_inputs), Network("disc", d, config.lr_d or 4 * config.lr, d_inputs)]


def _step(units: list[Unit], x: Tensor, y: Tensor, ctx: Context, count: int) -> dict[str, Tensor]:
    """One G step (hinge loss and feature matching against the real pair's features), then one D step on the same
    batch against a fresh rendering by the updated G (as SPADE does)."""
    g, d = units[0].net, units[1].net
    real_x, s = x.float() / 127.5 - 1.0, one_hot_labels(y, ctx.ds.num_classes)
    fake = g(s)
    fake_out = d(torch.cat([s, fake], 1))
    with torch.no_grad():
        real_out = d(torch.cat([s, real_x], 1))
    loss_g = hinge_g_loss(fake_out) + FEATURE_MATCHING_WEIGHT * feature_matching_loss(real_out, fake_out)
    units[0].optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss_g)
    units[0].optimizer.step()
    with torch.no_grad():
        fake = g(s)
    loss_d = hinge_d_loss(d(torch.cat([s, real_x], 1)), d(torch.cat([s, fake], 1)))
    units[1].optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss_d)
    units[1].optimizer.step()
    return {"loss": loss_g.detach() * count, "d_loss": loss_d.detach() * count}


def _epoch_curves(sums: dict[str, Tensor], n: int) -> dict[str, float]:
    return {"train_loss": sums["loss"].item() / n, "train_d_loss": sums["d_loss"].item() / n}


def _evaluator(config: Any, ds: Any) -> Callable[..., dict[str, float]]:
    """The FID of G at an evaluation; the real images' statistics and the extractor are prepared now (a bad
    statistics or weights file fails before training)."""
    extract = fid_extractor(config, ds)
    stats = _real_statistics(config)
    if stats is None:
        stats = feature_statistics(extract_features(extract, ds.test_x, config.eval_batch_size))

    def run(units: list[Unit], ctx: Context, diverged: bool) -> dict[str, float]:
        return {"test_fid": math.nan if diverged else fid(units[0].module, ds, extract, stats, config.eval_batch_size)}

    return run


def _finish(units: list[Unit], ctx: Context, curves: dict[str, list[Any]]) -> dict[str, float]:
    return {k: curves[k][-1] for k in ("test_fid", "train_loss", "train_d_loss")}


def _check_data(config: Any, ds: Any) -> None:
    check_fid_source(config)


SYNTHESIS = Task(
    name="synthesis",
    summary="image synthesis from label maps (SPADE): hinge GAN loss with feature matching, FID of the test "
    "split's label maps rendered by the generator against the real test images",
    metrics=(
        Metric("test_fid", "FID (test split)", False, percent=False, short="FID"),
        Metric("train_loss", "generator loss (last epoch's mean)", False, percent=False),
        Metric("train_d_loss", "discriminator loss (last epoch's mean)", False, percent=False),
    ),
    networks=_networks,
    step=_step,
    epoch_curves=_epoch_curves,
    evaluator=_evaluator,
    finish=_finish,
    curves=("epoch", "train_loss", "train_d_loss", "test_epoch", "test_fid", "epoch_time"),
    dense=True,
    models=("spade-small", "spade"),
    distributed=False,
    progress=("G", "loss"),
    check_data=_check_data,
    samples=lambda g, x, y, ds: (y, x, render(g, y, ds.num_classes, len(y))),
)
