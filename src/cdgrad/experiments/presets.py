"""Named sweeps, one per published table or figure, and the runner that executes them.

A preset is a list of (setting, method) configurations, each with a number of seeds (0, 1, ...). The
runner validates every configuration, loads every data set and checks the results folder before the
first run starts, then trains whatever is not already in the store. `*-reduced` presets are sized for
a 2-core CPU; their `cuts` say what differs from the published protocol.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cdgrad.experiments.config import FIELDS, RunConfig, from_dict, run_key, to_dict, validate
from cdgrad.experiments.methods import describe
from cdgrad.experiments.registry import Registry
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.tasks import check_dataset, get_task


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    base: dict[str, Any]
    variants: tuple[tuple[dict[str, Any], int], ...]  # (changes to base, number of seeds)
    plots: tuple[str, ...] = ("curves", "hist")
    cuts: str = ""  # for reduced presets: what is cut and why
    published: str = ""  # the paper's numbers that the report sets ours beside

    def runs(
        self, overrides: dict[str, Any] | None = None, where: dict[str, Any] | None = None, max_seeds: int | None = None
    ) -> list[tuple[RunConfig, int]]:
        """Every (config, seed) of the sweep; `overrides` change every config, `where` keeps matching ones."""
        out = []
        for changes, seeds in self.variants:
            config = from_dict({**self.base, **changes, **(overrides or {})})
            if any(getattr(config, k) != v for k, v in (where or {}).items()):
                continue
            out += [(config, s) for s in range(min(seeds, max_seeds) if max_seeds else seeds)]
        return out


def grid(
    settings: Iterable[dict[str, Any]],
    methods: Iterable[dict[str, Any]],
    seeds: int | Callable[[dict[str, Any]], int],
) -> tuple[tuple[dict[str, Any], int], ...]:
    """All (setting, method) combinations; `seeds` may depend on the setting."""
    return tuple(
        ({**s, **m}, seeds(s) if callable(seeds) else seeds)
        for s, m in itertools.product(list(settings), list(methods))
    )


def lambda_sweep(lams: Iterable[float], sobolev_betas: Iterable[float | None] = (None, 1.0)) -> list[dict[str, Any]]:
    """SGD, h0 at each lambda and sobolev at each lambda and beta, in the paper's lambda convention (Fig. 6).

    The paper adds `beta * f` to the Sobolev gradient "to avoid over-smoothing" without publishing beta; the
    sweeps run without it (beta = 0) and with beta = 1.
    """
    lams = [float(lam) for lam in lams]
    return (
        [{"method": "none"}]
        + [{"method": "h0", "lam": lam, "convention": "paper"} for lam in lams]
        + [
            {"method": "sobolev", "lam": lam, "convention": "paper", **({} if b is None else {"beta": b})}
            for b in sobolev_betas
            for lam in lams
        ]
    )


# The 2-layer CNN protocol of Fig. 6: train on the 10,000 test images, evaluate on the 60,000 training images.
FIG6 = {
    "model": "cnn2",
    "swap_train_test": True,
    "batch_size": 100,
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "step_every": 40,
}
CIFAR_SGD = {
    "dataset": "cifar10",
    "augment": True,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "step_every": 40,
    "epochs": 240,
    "eval_every": 10,
}
CIFAR_ADAM = {**CIFAR_SGD, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 200}
# Table 2's methods. The paper states lambda = 1 for H1~ and publishes neither beta nor H0's lambda;
# these two are our choices, in the paper's convention.
TABLE2_METHODS: tuple[dict[str, Any], ...] = (
    {"method": "none"},
    {"method": "sobolev", "lam": 1.0, "beta": 1.0, "convention": "paper"},
    {"method": "h0", "lam": 1.0, "convention": "paper"},
)
ABLATION_METHODS: tuple[dict[str, Any], ...] = (
    {"method": "none"},
    *(
        {"method": m, "lam": 1.0, "direction": d, "convention": "paper", **({"beta": 1.0} if m == "sobolev" else {})}
        for m in ("h0", "sobolev")
        for d in ("output", "input", "flat")
    ),
    {"method": "ls", "sigma": 0.5, "direction": "flat", "scope": "all"},
    {"method": "ls", "sigma": 0.5, "direction": "output", "scope": "conv"},
)

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

_table2_settings = [{"model": "resnet56", "lr": 0.1, "batch_size": b} for b in (128, 32, 8)] + [
    {"model": "vgg16", "lr": 0.01, "batch_size": b} for b in (128, 8, 6)
]
_PRESETS = (
    Preset(
        "demo",
        "Fashion-MNIST, Fig. 6 protocol in miniature: SGD vs H0 vs Sobolev (beta 1) at two lambdas",
        {**FIG6, "dataset": "fashion-mnist", "train_subset": 2000, "test_subset": 10000, "epochs": 6, "eval_every": 3},
        grid([{}], lambda_sweep([2.0, 10.0], sobolev_betas=(1.0,)), 3),
        plots=("lambda", "curves"),
        cuts="2,000 of the 10,000 training images, 6 epochs instead of 100, evaluation on 10,000 of the 60,000 "
        "held-out images, lambda in {2, 10}, 3 seeds; about 4 minutes on 2 CPU cores",
    ),
    Preset(
        "fig6",
        "Fig. 6: MNIST and Fashion-MNIST, 2-layer CNN, accuracy vs lambda (paper convention)",
        {**FIG6, "epochs": 100, "eval_every": 10},
        grid([{"dataset": "mnist"}, {"dataset": "fashion-mnist"}], lambda_sweep([1.0, 2.0, 5.0, 10.0, 15.0, 20.0]), 5),
        plots=("curves", "lambda", "hist"),
    ),
    Preset(
        "fig6-reduced",
        "Fig. 6 reduced: SGD, H0 and Sobolev (beta 0 and 1) at lambda 1, 5, 20 (paper convention), 3 seeds",
        {**FIG6, "train_subset": 5000, "epochs": 6, "eval_every": 3, "test_subset": 10000},
        grid([{"dataset": "mnist"}, {"dataset": "fashion-mnist"}], lambda_sweep([1.0, 5.0, 20.0]), 3),
        plots=("curves", "lambda", "hist"),
        cuts="5,000 of the 10,000 training images (the first half of the test split), 6 epochs instead of 100 "
        "(so the lr / 10 at epoch 40 never happens), lambda in {1, 5, 20} instead of 0..20, 3 seeds instead "
        "of 5, evaluation on the first 10,000 of the 60,000 training images; about 45 minutes on one shared "
        "CPU core per data set",
    ),
    Preset(
        "table2",
        "Table 2: CIFAR-10, ResNet-56 and VGG-16 with SGD (25 seeds), ResNet-56 with Adam "
        "(10 seeds), batch sizes 128/32/8 and 128/8/6",
        {**CIFAR_SGD},
        grid(_table2_settings, TABLE2_METHODS, 25)
        + grid([{**CIFAR_ADAM, "model": "resnet56", "batch_size": b} for b in (128, 32, 8)], TABLE2_METHODS, 10),
        plots=("curves", "hist"),
    ),
    Preset(
        "table2-reduced",
        "Table 2 reduced: CIFAR-10, ResNet-20, SGD, batch 128, 3 seeds",
        {
            **CIFAR_SGD,
            "model": "resnet20",
            "lr": 0.1,
            "batch_size": 128,
            "train_subset": 10000,
            "epochs": 15,
            "step_every": 10,
            "eval_every": 5,
        },
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist"),
        cuts="ResNet-20 instead of ResNet-56/VGG-16, 10,000 of the 50,000 training images, 15 epochs with lr "
        "/ 10 at epoch 10 instead of 240 epochs, batch 128 only, SGD only, 3 seeds instead of 25",
    ),
    Preset(
        "ablation",
        "Fig. 5 right: smoothing direction ablation on CIFAR-10, ResNet-56, SGD, batch 128",
        {**CIFAR_SGD, "model": "resnet56", "lr": 0.1, "batch_size": 128},
        grid([{}], ABLATION_METHODS, 10),
        plots=("curves", "hist"),
    ),
    Preset(
        "ablation-reduced",
        "Direction ablation reduced: Fashion-MNIST Fig. 6 protocol, 2-layer CNN",
        {**FIG6, "dataset": "fashion-mnist", "epochs": 10, "eval_every": 5, "test_subset": 20000},
        grid([{}], ABLATION_METHODS, 3),
        plots=("curves", "hist"),
        cuts="Fashion-MNIST and the 2-layer CNN of Fig. 6 instead of CIFAR-10 and ResNet-56, 10 epochs, "
        "3 seeds instead of 10, evaluation on 20,000 of the 60,000 held-out images",
    ),
)
_SPECTRAL_PRESETS = (
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
# ------------------------------------------------------------------ Reparameterization through Spatial Gradient Scaling
# The authors' CIFAR-100 protocol (their configs/strategies/SGS/wei_cifar.yaml): SGD momentum 0.9 (no Nesterov),
# lr 0.1 cosine over 200 epochs, weight decay 5e-4, batch 128, SGS k = 5 re-measured every 5 epochs from 2 batches
# in eval mode (our `sgs_pipeline=authors`). They also train with Cutout (16 px), which the toolkit does not have.
SGS_CIFAR = {
    "dataset": "cifar100",
    "augment": True,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "schedule": "cosine",
    "epochs": 200,
    "eval_every": 10,
}
SGS_METHOD: dict[str, Any] = {
    "method": "sgs",
    "sgs_k": 5.0,
    "sgs_every": 5,
    "sgs_batches": 2,
    "sgs_pipeline": "authors",
}
SGS_HEADLINE = (
    "CIFAR-100 test accuracy, plain -> SGS, from the authors' repository README: VGG-11 70.8 +- 0.1 -> 73.2 +- 0.1 "
    "(paper; 73.4 +- 0.1 with the repository), VGG-16 74.9 +- 0.1 -> 76.2 +- 0.1 (76.7 +- 0.1), ResNet-18 "
    "77.8 +- 0.1 -> 78.8 +- 0.1 (78.6 +- 0.1); GPU hours plain/SGS 0.62/0.65, 0.83/0.89, 1.02/1.15"
)
SGS_BASELINES: list[dict[str, Any]] = [
    {"method": "none"},
    {"method": "acb"},
    {"method": "repvgg"},
    {"method": "dbb"},
    SGS_METHOD,
]
SGS_FIXED_GRID = [
    {"method": "sgs-fixed", "sgs_edge": e, "sgs_corner": c} for e in (1.5, 2.0, 3.0) for c in (2.0, 4.0, 8.0) if c >= e
]
SGS_REDUCED = {  # the authors' optimiser settings, on data and a network this CPU trains in minutes
    **SGS_CIFAR,
    "dataset": "fashion-mnist",
    "model": "resnet8",
    "train_subset": 10000,
    "augment": False,
    "epochs": 6,
    "eval_every": 2,
}
_SGS_PRESETS = (
    Preset(
        "sgs-table1",
        "SGS paper, CIFAR comparison: VGG-11, VGG-16, ResNet-18 on CIFAR-100 and CIFAR-10; plain vs ACB vs RepVGG "
        "vs DBB vs SGS",
        SGS_CIFAR,
        grid(
            [{"dataset": d, "model": m} for d in ("cifar100", "cifar10") for m in ("vgg11", "vgg16", "resnet18")],
            SGS_BASELINES,
            3,
        ),
        plots=("curves", "hist"),
        published=SGS_HEADLINE,
    ),
    Preset(
        "sgs-dependence",
        "SGS paper, dependence measures: mutual information vs autocorrelation vs a fixed scaling grid-searched over "
        "the centre-to-edge and centre-to-corner ratios; VGG-11 on CIFAR-100",
        {**SGS_CIFAR, "model": "vgg11"},
        grid([{}], [{"method": "none"}, SGS_METHOD, {**SGS_METHOD, "sgs_dependence": "autocorr"}, *SGS_FIXED_GRID], 3),
        plots=("hist",),
        published=SGS_HEADLINE + " (the grid values here are our choice)",
    ),
    Preset(
        "sgs-optimizers",
        "SGS paper, optimizers: SGD and Adam with and without SGS, SGS on the gradient and on the optimizer's update "
        "(the post-optimizer variant); VGG-11 on CIFAR-100",
        {**SGS_CIFAR, "model": "vgg11"},
        grid(
            [{}, {"optimizer": "adam", "lr": 1e-3}],
            [{"method": "none"}, SGS_METHOD, {**SGS_METHOD, "sgs_on": "update"}],
            3,
        ),
        plots=("curves", "hist"),
        published=SGS_HEADLINE,
    ),
    Preset(
        "sgs-k",
        "SGS paper, the strength k of the k-transform: k = 1, 2, 5, 10, 20 and plain SGD; VGG-11 on CIFAR-100",
        {**SGS_CIFAR, "model": "vgg11"},
        grid([{}], [{"method": "none"}, *({**SGS_METHOD, "sgs_k": k} for k in (1.0, 2.0, 5.0, 10.0, 20.0))], 3),
        plots=("hist",),
        published=SGS_HEADLINE + " (k = 5)",
    ),
    Preset(
        "sgs-reduced",
        "SGS paper reduced: Fashion-MNIST, ResNet-8; plain vs ACB vs RepVGG vs DBB vs SGS (both pipelines, on the "
        "gradient and on the update) vs a fixed scaling",
        SGS_REDUCED,
        grid(
            [{}],
            [
                *SGS_BASELINES[:4],
                {**SGS_METHOD, "sgs_every": 2},
                {**SGS_METHOD, "sgs_every": 2, "sgs_pipeline": "cdgrad"},
                {**SGS_METHOD, "sgs_every": 2, "sgs_on": "update"},
                {"method": "sgs-fixed", "sgs_edge": 2.0, "sgs_corner": 4.0},
            ],
            3,
        ),
        plots=("curves", "walltime", "hist"),
        cuts="Fashion-MNIST and ResNet-8 instead of CIFAR and VGG-11/VGG-16/ResNet-18, 10,000 training images, "
        "6 epochs (cosine), no augmentation, SGS re-measured every 2 epochs, 3 seeds",
        published=SGS_HEADLINE,
    ),
)
# The channel-directed paper's other two tasks (its Fig. 7 and Table 3); the settings are the paper's Table 1.
# The paper gives optimiser, lr, batch and epochs; the rest (schedule, crop, momentum of the UNet run) is ours.
DENSE_HEADLINE_SEG = (
    "PascalVOC 2012, UNet (ResNet-50 encoder), SGD lr 7e-3, batch 2, 70 epochs, 3 trials: H1~ and H0 give about "
    "8% higher segmentation accuracy than SGD and a smaller generalisation gap (Fig. 7; numbers read off a plot)"
)
DENSE_HEADLINE_GAN = (
    "Cityscapes, SPADE, SGD momentum 0.9, weight decay 5e-4, lr 1e-4 (G) / 4e-4 (D), batch 2, 24 models per "
    "optimizer: H1~ and H0 give a lower mean FID and a smaller FID spread than SGD (Table 3)"
)
SEG_VOC = {
    "task": "segmentation",
    "dataset": "voc2012",
    "model": "unet-resnet50",
    "optimizer": "sgd",
    "lr": 7e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 2,
    "epochs": 70,
    "schedule": "constant",
    "augment": True,
    "crop": 320,
    "eval_every": 5,
    "eval_batch_size": 4,
    "save_model": True,
}
SPADE_CITYSCAPES = {
    "task": "synthesis",
    "dataset": "cityscapes",
    "model": "spade",
    "optimizer": "sgd",
    "lr": 1e-4,
    "lr_d": 4e-4,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 2,
    "epochs": 200,
    "schedule": "constant",
    "eval_every": 20,
    "eval_batch_size": 8,
    "fid_extractor": "inception",
    "save_model": True,
}
SEG_REDUCED = {
    **SEG_VOC,
    "dataset": "fashion-mnist-scenes",
    "model": "unet-small",
    "lr": 0.05,
    "batch_size": 32,
    "epochs": 6,
    "augment": False,
    "crop": 0,
    "eval_every": 2,
    "eval_batch_size": 250,
}
SPADE_REDUCED = {
    **SPADE_CITYSCAPES,
    "dataset": "fashion-mnist-scenes",
    "model": "spade-small",
    "lr": 1e-3,
    "lr_d": 4e-3,
    "batch_size": 16,
    "train_subset": 2000,
    "epochs": 2,
    "eval_every": 1,
    "eval_batch_size": 250,
    "fid_extractor": "classifier",
}
_DENSE_PRESETS = (
    Preset(
        "seg-voc",
        "Fig. 7: semantic segmentation, PascalVOC 2012, UNet with a ResNet-50 encoder; SGD vs H1~ vs H0",
        SEG_VOC,
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist", "samples"),
        published=DENSE_HEADLINE_SEG,
    ),
    Preset(
        "seg-reduced",
        "Fig. 7 reduced: segmentation of Fashion-MNIST scenes (64x64, 11 classes), small UNet; SGD vs H1~ vs H0",
        SEG_REDUCED,
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist", "samples"),
        cuts="scenes of 2-4 Fashion-MNIST images with per-pixel masks (6,000 training, 1,000 test scenes) instead "
        "of PascalVOC, a small UNet instead of ResNet-50, batch 32 and lr 0.05 instead of 2 and 7e-3, 6 epochs "
        "instead of 70, no augmentation; about 25 minutes on 2 CPU cores",
        published=DENSE_HEADLINE_SEG,
    ),
    Preset(
        "spade-cityscapes",
        "Table 3: image synthesis, Cityscapes label maps to images, SPADE, FID over 24 models per optimizer",
        SPADE_CITYSCAPES,
        grid([{}], TABLE2_METHODS, 24),
        plots=("curves", "hist", "samples"),
        published=DENSE_HEADLINE_GAN,
    ),
    Preset(
        "spade-reduced",
        "Table 3 reduced: Fashion-MNIST scene label maps to images, small SPADE, FID in a scene classifier's "
        "features; SGD vs H1~ vs H0",
        SPADE_REDUCED,
        grid([{}], TABLE2_METHODS, 3),
        plots=("curves", "hist", "samples"),
        cuts="Fashion-MNIST scenes (64x64, 11 classes) instead of Cityscapes, a small SPADE, 2,000 training scenes, "
        "batch 16, lr 1e-3 / 4e-3 instead of 1e-4 / 4e-4 (ten times the paper's, for a run of 250 steps), 2 epochs, "
        "FID over the 1,000 test scenes in the features of a small classifier trained on the scenes instead of "
        "Inception, 3 seeds instead of 24; about 35 minutes on 2 CPU cores",
        published=DENSE_HEADLINE_GAN,
    ),
)
PRESETS: Registry[Preset] = Registry("preset")
for _preset in _PRESETS + _SPECTRAL_PRESETS + _SGS_PRESETS + _DENSE_PRESETS:
    PRESETS.register(_preset.name, _preset, builtin=True)


def get_preset(name: str) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS.get(name)


def data_key(config: RunConfig) -> tuple[Any, ...]:
    return (config.dataset, config.data_root, config.swap_train_test, config.train_subset, config.test_subset)


def prepare(runs: list[tuple[RunConfig, int]], store: ResultStore | None) -> dict[tuple[Any, ...], Any]:
    """Check everything that can fail before training: configs, seeds, data, then the results folder (the first
    thing created on disk, with the temporary files of killed writers removed). Returns the data sets."""
    from cdgrad.experiments.launch import init_from_env, is_main_process
    from cdgrad.experiments.train import check_seed, load_data

    for config, seed in runs:
        validate(config)
        check_seed(seed)
    datasets: dict[tuple[Any, ...], Any] = {}
    for config, _ in runs:
        if data_key(config) not in datasets:
            datasets[data_key(config)] = load_data(config)
        check_dataset(get_task(config.task), datasets[data_key(config)].dense, config.dataset)
        if config.task == "synthesis":
            from cdgrad.experiments.synthesis import check_fid_source

            check_fid_source(config)
    distributed = init_from_env() is not None
    if store is not None and is_main_process():  # under torchrun only rank 0 writes the results folder
        store.check_writable()
        store.remove_orphans()
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # the other ranks read the store only once rank 0 has created it
    return datasets


def run_all(
    runs: list[tuple[RunConfig, int]],
    store: ResultStore,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    wait: bool = True,
    poll_s: float = 2.0,
) -> list[str]:
    """Train every run not yet in `store` (resuming from its checkpoint if one exists); returns all keys.

    Each run is claimed in the store before it is trained, so several processes on one store share the work:
    runs another live process holds are skipped, and once nothing is left to claim this process waits (polling
    every `poll_s` seconds) until those are stored too, taking over any whose owner died; with `wait=False` it
    returns instead and logs which runs another process still holds.
    """
    from cdgrad.experiments.launch import init_from_env, is_main_process
    from cdgrad.experiments.train import train

    datasets = prepare(runs, store)
    main = is_main_process()  # under torchrun every rank trains, rank 0 alone claims, stores and logs
    distributed = init_from_env() is not None
    if not main:
        log = _quiet
    done = store.done_keys()
    if main:  # a process killed between storing a run and removing its checkpoint left the checkpoint behind
        for config, seed in runs:
            if run_key(config, seed) in done:
                store.finish_checkpoint(config, run_key(config, seed))
    # seed-major order: an interrupted sweep leaves every configuration with about as many seeds
    todo = sorted(((c, s) for c, s in runs if run_key(c, s) not in done), key=lambda run: run[1])
    log(f"{len(runs)} runs, {len(runs) - len(todo)} already complete, {len(todo)} to train (results: {store.path})")
    by_key = {run_key(c, s): (c, s) for c, s in todo}
    pending = list(by_key)
    t_all, trained, waiting_for = time.perf_counter(), 0, None

    def next_run() -> str | None:
        """Rank 0: the key of the next run this process claimed, "" to wait for others, None when all are stored."""
        stored = store.done_keys()
        pending[:] = [k for k in pending if k not in stored]
        for k in pending:
            if store.claim(k):
                return k
        return "" if pending else None

    while True:
        choice = next_run() if main else None
        if distributed:
            import torch.distributed as dist

            shared: list[Any] = [choice]
            dist.broadcast_object_list(shared, src=0)
            choice = shared[0]
        if choice is None:
            break
        if choice == "":
            held = store.held_elsewhere(pending) if main else {}
            holders = ", ".join(sorted({f"pid {c.pid} on {c.host}" for c in held.values()})) or "another process"
            if not wait:
                log(f"{len(pending)} runs are still being trained by {holders}: {', '.join(pending)}")
                break
            if waiting_for != len(pending):
                log(f"waiting for {len(pending)} runs being trained by {holders}")
                waiting_for = len(pending)
            time.sleep(poll_s)
            continue
        key = choice
        config, seed = by_key[key]
        pending.remove(key)
        t0 = time.perf_counter()
        try:
            metrics = train(
                config,
                seed,
                dataset=datasets[data_key(config)],
                checkpoint=store.checkpoint_path(key),
                progress=progress,
                callback=_heartbeat(store, key) if main else None,
            )
            if main:
                store.save(config, seed, metrics)
        except BaseException:
            if main:
                store.release(key)
            raise
        trained += 1
        result = get_task(config.task).headline(metrics["final"])
        if metrics.get("status") == "diverged":
            result = f"diverged at epoch {metrics['curves']['epoch'][-1]} (loss not finite)"
        log(
            f"[{trained}/{len(todo)}] {config.dataset} {config.model} {describe(config)} seed {seed}: "
            f"{result} ({time.perf_counter() - t0:.0f} s)"
        )
    if trained:
        log(f"trained {trained} runs in {time.perf_counter() - t_all:.0f} s")
    return [run_key(c, s) for c, s in runs]


def _heartbeat(store: ResultStore, key: str) -> Callable[[int, dict[str, list[Any]]], None]:
    """The `train` callback that refreshes this process's claim on run `key` after every epoch."""

    def beat(epoch: int, curves: dict[str, list[Any]]) -> None:
        store.heartbeat(key)

    return beat


def _quiet(message: str) -> None:
    """The log of the ranks other than 0 under torchrun."""


def describe_preset(preset: Preset, verbose: bool = False) -> str:
    runs = preset.runs()
    lines = [f"{preset.name:18s} {len(runs):5d} runs  {preset.title}"]
    if preset.cuts:
        lines.append(f"{'':18s} {'':10s} reduced: {preset.cuts}")
    if verbose:
        base = to_dict(from_dict(preset.base))
        lines.append(f"{'':29s} base: " + ", ".join(f"{k}={v}" for k, v in base.items() if v != FIELDS[k].default))
        for changes, seeds in preset.variants:
            lines.append(f"{'':29s} {seeds:3d} seeds x " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return "\n".join(lines)
