"""The channel-directed gradients paper (Lao et al.): Fig. 6 (MNIST / Fashion-MNIST lambda sweeps), Table 2
(CIFAR-10, ResNet-56 and VGG-16 with SGD and Adam), the direction ablation and the demo."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cdgrad.experiments.presets.base import Preset, grid


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

# The demo's scale: Fig. 6's protocol on 2,000 Fashion-MNIST images for 6 epochs (minutes on a CPU).
DEMO = {**FIG6, "dataset": "fashion-mnist", "train_subset": 2000, "test_subset": 10000, "epochs": 6, "eval_every": 3}
_table2_settings = [{"model": "resnet56", "lr": 0.1, "batch_size": b} for b in (128, 32, 8)] + [
    {"model": "vgg16", "lr": 0.01, "batch_size": b} for b in (128, 8, 6)
]
PRESETS = (
    Preset(
        "demo",
        "Fashion-MNIST, Fig. 6 protocol in miniature: SGD vs H0 vs Sobolev (beta 1) at two lambdas",
        DEMO,
        grid([{}], lambda_sweep([2.0, 10.0], sobolev_betas=(1.0,)), 3),
        plots=("lambda", "curves"),
        cuts="2,000 of the 10,000 training images, 6 epochs instead of 100, evaluation on 10,000 of the 60,000 "
        "held-out images, lambda in {2, 10}, 3 seeds; about 4 minutes on 2 CPU cores",
    ),
    Preset(
        "fig5-variance",
        "Fig. 5: trial-to-trial variance at the demo's scale, SGD vs H0 vs Sobolev (beta 1) at lambda 10, "
        "25 seeds each, Brown-Forsythe test of equal variances against SGD",
        DEMO,
        grid([{}], lambda_sweep([10.0], sobolev_betas=(1.0,)), 25),
        plots=("hist", "curves"),
        cuts="the demo's miniature of the Fig. 6 protocol (Fashion-MNIST, 2-layer CNN, 2,000 training images, 6 "
        "epochs, evaluation on 10,000 held-out images) instead of the paper's networks and epochs, lambda 10 only, 25 "
        "seeds per method; 45 minutes through the single-node test cluster on 2 busy CPU cores",
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
