"""Sedghi, Gupta and Long: operator-norm clipping of conv layers (Fig. 2, Fig. 3, section 4.4) and the reduced
study."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cdgrad.experiments.presets.base import Preset, grid
from cdgrad.experiments.presets.paper import CIFAR_SGD

# Sedghi, Gupta and Long: ResNet-32 with BatchNorm on CIFAR-10, SGD, operator-norm clipping every 100 steps.
# The learning-rate schedule is the toolkit's CIFAR one (lr 0.1, / 10 every 60 epochs, 180 epochs): our choice.
SPECTRAL_CIFAR = {**CIFAR_SGD, "model": "resnet32", "lr": 0.1, "batch_size": 128, "epochs": 180, "step_every": 60}
SPECTRAL_HEADLINE = (
    "ResNet-32 with BatchNorm on CIFAR-10: test error 6.2% without clipping, 5.3% with the exact projection "
    "every 100 steps (Sedghi et al., abstract and Fig. 2)"
)
SPECTRAL_CLIPS = (0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
RESHAPED_CLIPS = (0.05, 0.1, 0.2, 0.5, 1.0)


def clip_sweep(norms: Iterable[float], every: int = 100, projection: str | None = None) -> list[dict[str, Any]]:
    """One `opnorm` method per norm, projecting every `every` steps (`projection` unset: the exact one)."""
    extra = {} if projection is None else {"clip_projection": projection}
    return [{"method": "opnorm", "clip_norm": float(c), "clip_every": every, **extra} for c in norms]


_spectral_fig3_settings = [
    {"batchnorm": bn, "lr": lr, "batch_size": b, "step_every": e}
    for bn in (True, False)
    for lr in (0.1, 0.01)
    for b in (32, 128)
    for e in (1, 2)
]
# Reduced: Fashion-MNIST, ResNet-8, 10,000 images, 6 epochs (79 steps each), projections every 20 steps
# (about 4 per epoch, as every 100 of CIFAR-10's 390 steps per epoch).
SPECTRAL_REDUCED = {
    "dataset": "fashion-mnist",
    "model": "resnet8",
    "train_subset": 10000,
    "test_subset": 10000,
    "optimizer": "sgd",
    "lr": 0.1,
    "batch_size": 128,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "step_every": 4,
    "epochs": 6,
}
_spectral_reduced_bn = (
    [{"method": "none"}]
    + clip_sweep((0.5, 1.0, 2.0), every=20)
    + clip_sweep((1.0,), every=1)
    + clip_sweep((0.5, 1.0), every=20, projection="reshaped")
    + clip_sweep((1.0,), every=1, projection="reshaped")
    + clip_sweep((1.0,), every=20, projection="gram")
)

PRESETS = (
    Preset(
        "spectral-fig2",
        "Sedghi et al. Fig. 2 and 4: ResNet-32 with BatchNorm on CIFAR-10, exact operator-norm clipping every "
        "100 steps to 0.1 ... 3.0 and none; test error against epochs and against wall time",
        SPECTRAL_CIFAR,
        grid([{}], [{"method": "none"}, *clip_sweep(SPECTRAL_CLIPS)], 3),
        plots=("curves", "walltime", "hist"),
        published=SPECTRAL_HEADLINE,
    ),
    Preset(
        "spectral-fig3",
        "Sedghi et al. Fig. 3: ResNet-32 on CIFAR-10 without and with BatchNorm over a grid of initial lr x batch "
        "size x epochs per decay (lr x 0.95 per decay, 100 epochs), clipping to 0.5 ... 2.0 and none",
        {**SPECTRAL_CIFAR, "epochs": 100, "lr_decay": 0.95},
        grid(_spectral_fig3_settings, [{"method": "none"}, *clip_sweep((0.5, 1.0, 1.5, 2.0))], 1),
        plots=("hist",),
        published="Sedghi et al. Fig. 3 sets the best test errors over such a grid with and without clipping "
        "side by side, with and without BatchNorm (the grid values here are our choice)",
    ),
    Preset(
        "spectral-sec44",
        "Sedghi et al. section 4.4: reshaped-kernel clipping (Yoshida & Miyato) to 0.05 ... 1.0 every 100 steps "
        "and every step, beside the exact projection; ResNet-32 with BatchNorm on CIFAR-10",
        SPECTRAL_CIFAR,
        grid(
            [{}],
            [
                {"method": "none"},
                *clip_sweep(RESHAPED_CLIPS, projection="reshaped"),
                *clip_sweep(RESHAPED_CLIPS, every=1, projection="reshaped"),
                *clip_sweep(RESHAPED_CLIPS),
                *clip_sweep((1.0,), every=1),
            ],
            3,
        ),
        plots=("curves", "walltime", "hist"),
        published="exact clipping every step took less time per step than reshaped clipping (Sedghi et al. "
        "section 4.4)",
    ),
    Preset(
        "spectral-reduced",
        "Operator-norm clipping reduced: Fashion-MNIST, ResNet-8 with and without BatchNorm; exact, reshaped "
        "and Gram projections",
        SPECTRAL_REDUCED,
        grid([{}], _spectral_reduced_bn, 3)
        + grid([{"batchnorm": False, "lr": 0.02}], [{"method": "none"}, *clip_sweep((1.0,), every=20)], 3),
        plots=("curves", "walltime", "hist"),
        cuts="Fashion-MNIST and ResNet-8 instead of CIFAR-10 and ResNet-32, 10,000 training images, 6 epochs "
        "with lr / 10 after 4, projections every 20 steps (4 per epoch, as every 100 steps on CIFAR-10), norms "
        "0.5, 1, 2, 3 seeds; without BatchNorm lr 0.02 (at 0.1 the test loss blew up); about 40 minutes on 2 CPU cores",
        published=SPECTRAL_HEADLINE,
    ),
)
