"""Spatial gradient scaling (Reparameterization through Spatial Gradient Scaling): its tables and the reduced
study."""

from __future__ import annotations

from typing import Any

from cdgrad.experiments.presets.base import Preset, grid

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
PRESETS = (
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
