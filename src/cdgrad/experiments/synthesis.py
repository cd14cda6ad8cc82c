"""The image-synthesis task: SPADE (Park et al. 2019) renders label maps as images; scored by FID.

`train_synthesis(config, seed)` is the task's loop (called by `cdgrad.experiments.train.train` for
`task="synthesis"`). Each step, as in SPADE's trainer, first updates the generator G on

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

The run's state (both networks, optimizers, schedules, methods, the batch generator) is checkpointed after every
epoch like a supervised run's, and a rerun resumes from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad.experiments import data as data_mod
from cdgrad.experiments.checkpoint import resume_state, run_entries, save_checkpoint
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.dense_models import (
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    one_hot_labels,
    spade_discriminator,
    spade_generator,
)
from cdgrad.experiments.fid import (
    InceptionV3Features,
    extract_features,
    feature_statistics,
    frechet_distance,
    load_statistics,
)
from cdgrad.experiments.methods import AttachedMethod, attach_method
from cdgrad.experiments.progress import Progress
from cdgrad.experiments.setup import load_data, make_optimizer, make_scheduler
from cdgrad.experiments.tasks import SYNTHESIS, check_dataset
from cdgrad.experiments.tracking import RunInfo, Tracker

__all__ = [
    "FEATURE_MATCHING_WEIGHT",
    "PresenceClassifier",
    "check_fid_source",
    "fid_extractor",
    "render",
    "train_synthesis",
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


def train_presence_classifier(ds: data_mod.Dataset, epochs: int = 3, batch_size: int = 128) -> PresenceClassifier:
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


def _inception(config: RunConfig) -> InceptionV3Features:
    """The FID Inception network from `fid_weights`; ValueError (FileNotFoundError) naming what is missing."""
    if config.fid_weights is None:
        raise ValueError(
            "fid_extractor=inception needs fid_weights, the path of pt_inception-2015-12-05-6726825d.pth "
            "(see docs/dense.md for where to get it), or fid_extractor=classifier"
        )
    return InceptionV3Features.from_file(config.fid_weights)


def _real_statistics(config: RunConfig) -> tuple[Tensor, Tensor] | None:
    """The real images' feature statistics from `fid_stats` (checked against the extractor's size), or None."""
    if config.fid_stats is None:
        return None
    return load_statistics(config.fid_stats, FEATURE_DIMS[config.fid_extractor])


def check_fid_source(config: RunConfig) -> None:
    """ValueError (naming the file) unless the FID of `config` can be computed: for 'inception', the weights file
    must be given and hold the FID Inception network; `fid_stats` must hold statistics of the extractor's size."""
    _real_statistics(config)
    if config.fid_extractor == "inception":
        _inception(config)


_CLASSIFIERS: dict[tuple[Any, ...], PresenceClassifier] = {}


def fid_extractor(config: RunConfig, ds: data_mod.Dataset) -> Callable[[Tensor], Tensor]:
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
    ds: data_mod.Dataset,
    extract: Callable[[Tensor], Tensor],
    real: tuple[Tensor, Tensor],
    batch_size: int,
) -> float:
    """FID between the test split's real images (statistics `real`) and G's renderings of its label maps."""
    fake = render(generator, ds.test_y, ds.num_classes, batch_size)
    mu, sigma = feature_statistics(extract_features(extract, fake, batch_size))
    return frechet_distance(mu, sigma, *real)


# ------------------------------------------------------------------------------------------------ training
def _state(
    g: nn.Module, d: nn.Module, opts: list[torch.optim.Optimizer], scheds: list[Any], methods: list[AttachedMethod]
) -> dict[str, Any]:
    return {
        "model": g.state_dict(),
        "optimizer": opts[0].state_dict(),
        "scheduler": scheds[0].state_dict(),
        "method": methods[0].state_dict(),
        "disc": d.state_dict(),
        "disc_optimizer": opts[1].state_dict(),
        "disc_scheduler": scheds[1].state_dict(),
        "disc_method": methods[1].state_dict(),
    }


def train_synthesis(
    config: RunConfig,
    seed: int,
    *,
    dataset: data_mod.Dataset | None = None,
    checkpoint: str | None = None,
    progress: bool | None = None,
    callback: Callable[[int, dict[str, list[Any]]], None] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train SPADE on `config`'s data from `seed`; curves of the G and D losses and the test FID (one process);
    `tracker` logs it live (`cdgrad.experiments.tracking`)."""
    from cdgrad.experiments.launch import init_from_env

    if init_from_env() is not None:
        raise ValueError("task 'synthesis' trains in one process; launch it without torchrun")
    device = torch.device(config.device)
    ds = (dataset if dataset is not None else load_data(config)).to(device)
    check_dataset(SYNTHESIS, ds.dense, config.dataset)
    real = _real_statistics(config)  # before training: a bad statistics or weights file fails here
    extract = fid_extractor(config, ds)
    if real is None:
        real = feature_statistics(extract_features(extract, ds.test_x, config.eval_batch_size))
    channels, size = ds.train_x.shape[1], tuple(ds.train_x.shape[2:])

    state = resume_state(checkpoint, config, seed)

    torch.manual_seed(seed)
    g = spade_generator(config.model, ds.num_classes, size, channels).to(device)
    d = spade_discriminator(config.model, ds.num_classes, channels).to(device)
    opts = [make_optimizer(config, g), make_optimizer(config.replace(lr=config.lr_d or 4 * config.lr), d)]
    scheds = [make_scheduler(config, o) for o in opts]
    seg = one_hot_labels(ds.train_y[:2], ds.num_classes)
    methods = [
        attach_method(config, g, opts[0], sample=seg),
        attach_method(config, d, opts[1], sample=torch.cat([seg, ds.train_x[:2].float() / 127.5 - 1], 1)),
    ]
    gen = torch.Generator(device=device).manual_seed(seed)
    curves: dict[str, list[Any]] = {k: [] for k in SYNTHESIS.curves}
    start_epoch, elapsed = 0, 0.0
    if state is not None:
        g.load_state_dict(state["model"])
        d.load_state_dict(state["disc"])
        for i, prefix in enumerate(("", "disc_")):
            opts[i].load_state_dict(state[f"{prefix}optimizer"])
            scheds[i].load_state_dict(state[f"{prefix}scheduler"])
            methods[i].load_state_dict(state[f"{prefix}method"])
        gen.set_state(state["generator"].to(gen.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        curves, start_epoch, elapsed = state["curves"], state["epoch"], state["elapsed"]

    n = len(ds.train_x)
    steps = math.ceil(n / config.batch_size)
    if tracker is not None:  # ---- tracking: start or resume the run's live log
        tracker.start(RunInfo(config, seed, steps, start_epoch, curves), state.get("tracking") if state else None)
    bar = Progress((config.epochs - start_epoch) * steps, desc=f"{config.method} s{seed}", enabled=progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    status = "completed"
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            for m in methods:
                m.begin_epoch(epoch)
            g.train()
            d.train()
            perm = torch.randperm(n, generator=gen, device=device)
            g_sum = torch.zeros((), device=device, dtype=torch.float64)
            d_sum = torch.zeros((), device=device, dtype=torch.float64)
            for i in range(steps):
                idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
                x, y = ds.train_x[idx], ds.train_y[idx]
                if config.augment:
                    x, y = data_mod.scale_crop_flip(x, y, config.crop or x.shape[-1], generator=gen)
                real_x, s = x.float() / 127.5 - 1.0, one_hot_labels(y, ds.num_classes)
                # generator step: hinge loss and feature matching against the real pair's features
                fake = g(s)
                fake_out = d(torch.cat([s, fake], 1))
                with torch.no_grad():
                    real_out = d(torch.cat([s, real_x], 1))
                loss_g = hinge_g_loss(fake_out) + FEATURE_MATCHING_WEIGHT * feature_matching_loss(real_out, fake_out)
                opts[0].zero_grad(set_to_none=True)
                torch.autograd.backward(loss_g)
                opts[0].step()
                # discriminator step on the same batch, against a fresh rendering by the updated G (as SPADE does)
                with torch.no_grad():
                    fake = g(s)
                loss_d = hinge_d_loss(d(torch.cat([s, real_x], 1)), d(torch.cat([s, fake], 1)))
                opts[1].zero_grad(set_to_none=True)
                torch.autograd.backward(loss_d)
                opts[1].step()
                if tracker is not None:  # ---- tracking: per-step scalars
                    tracker.log_step(
                        epoch * steps + i + 1,
                        {
                            "train_loss": loss_g.item(),
                            "train_d_loss": loss_d.item(),
                            "lr": opts[0].param_groups[0]["lr"],
                            "lr_d": opts[1].param_groups[0]["lr"],
                        },
                    )
                g_sum += loss_g.detach() * len(idx)
                d_sum += loss_d.detach() * len(idx)
                bar.update(info=f"epoch {epoch + 1}/{config.epochs} G {loss_g.item():.3f}" if bar.enabled else None)
            for sched in scheds:
                sched.step()
            curves["epoch"].append(epoch + 1)
            curves["train_loss"].append(g_sum.item() / n)
            curves["train_d_loss"].append(d_sum.item() / n)
            diverged = not (math.isfinite(curves["train_loss"][-1]) and math.isfinite(curves["train_d_loss"][-1]))
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs or diverged:
                curves["test_epoch"].append(epoch + 1)
                curves["test_fid"].append(math.nan if diverged else fid(g, ds, extract, real, config.eval_batch_size))
            curves["epoch_time"].append(time.perf_counter() - t0)
            elapsed += curves["epoch_time"][-1]
            if tracker is not None:  # ---- tracking: the epoch's curves and both methods' diagnostics
                tracker.log_epoch(
                    (epoch + 1) * steps, curves, ("diagnostics/g/", methods[0]), ("diagnostics/d/", methods[1])
                )
            if diverged:
                status = "diverged"
                break
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint,
                    {
                        **run_entries(config, seed, epoch + 1, elapsed, 1, curves),
                        **_state(g, d, opts, scheds, methods),
                        "generator": gen.get_state(),
                        **({"tracking": tracker.state_dict()} if tracker is not None else {}),  # ---- tracking
                    },
                )
            if callback is not None:
                callback(epoch + 1, curves)
    except BaseException:
        if tracker is not None:  # ---- tracking: the run stopped; a resume continues its log
            tracker.abort()
        raise
    finally:
        bar.close()
        for m in methods:
            m.remove()
        torch.set_num_threads(threads)
    final = {
        "test_fid": curves["test_fid"][-1],
        "train_loss": curves["train_loss"][-1],
        "train_d_loss": curves["train_d_loss"][-1],
    }
    if tracker is not None:  # ---- tracking: final metrics and status
        tracker.end(final, status)
    return {"curves": curves, "final": final, "wall_s": elapsed, "status": status}
