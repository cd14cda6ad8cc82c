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
from cdgrad.experiments.store import ResultStore


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    base: dict[str, Any]
    variants: tuple[tuple[dict[str, Any], int], ...]  # (changes to base, number of seeds)
    plots: tuple[str, ...] = ("curves", "hist")
    cuts: str = ""  # for reduced presets: what is cut and why

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
    settings: Iterable[dict[str, Any]], methods: Iterable[dict[str, Any]], seeds: int | Callable[[dict], int]
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
TABLE2_METHODS = (
    {"method": "none"},
    {"method": "sobolev", "lam": 1.0, "beta": 1.0, "convention": "paper"},
    {"method": "h0", "lam": 1.0, "convention": "paper"},
)
ABLATION_METHODS = (
    {"method": "none"},
    *(
        {"method": m, "lam": 1.0, "direction": d, "convention": "paper", **({"beta": 1.0} if m == "sobolev" else {})}
        for m in ("h0", "sobolev")
        for d in ("output", "input", "flat")
    ),
    {"method": "ls", "sigma": 0.5, "direction": "flat", "scope": "all"},
    {"method": "ls", "sigma": 0.5, "direction": "output", "scope": "conv"},
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
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def data_key(config: RunConfig) -> tuple:
    return (config.dataset, config.data_root, config.swap_train_test, config.train_subset, config.test_subset)


def prepare(runs: list[tuple[RunConfig, int]], store: ResultStore | None) -> dict[tuple, Any]:
    """Check everything that can fail before training: configs, results folder, data. Returns the data sets."""
    from cdgrad.experiments.launch import init_from_env, is_main_process
    from cdgrad.experiments.train import load_data

    for config, _ in runs:
        validate(config)
    distributed = init_from_env() is not None
    if store is not None and is_main_process():  # under torchrun only rank 0 writes the results folder
        store.check_writable()
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # the other ranks read the store only once rank 0 has created it
    datasets: dict[tuple, Any] = {}
    for config, _ in runs:
        if data_key(config) not in datasets:
            datasets[data_key(config)] = load_data(config)
    return datasets


def run_all(
    runs: list[tuple[RunConfig, int]],
    store: ResultStore,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Train every run not yet in `store` (resuming from its checkpoint if one exists); returns all keys."""
    from cdgrad.experiments.launch import is_main_process
    from cdgrad.experiments.train import train

    datasets = prepare(runs, store)
    main = is_main_process()  # under torchrun every rank trains, rank 0 alone stores and logs
    if not main:
        log = _quiet
    done = store.done_keys()
    # seed-major order: an interrupted sweep leaves every configuration with about as many seeds
    todo = sorted(((c, s) for c, s in runs if run_key(c, s) not in done), key=lambda run: run[1])
    log(f"{len(runs)} runs, {len(runs) - len(todo)} already complete, {len(todo)} to train (results: {store.path})")
    t_all = time.perf_counter()
    for i, (config, seed) in enumerate(todo, 1):
        key = run_key(config, seed)
        t0 = time.perf_counter()
        metrics = train(
            config, seed, dataset=datasets[data_key(config)], checkpoint=store.checkpoint_path(key), progress=progress
        )
        if main:
            store.save(config, seed, metrics)
        log(
            f"[{i}/{len(todo)}] {config.dataset} {config.model} {describe(config)} seed {seed}: "
            f"test acc {metrics['final']['test_acc']:.2f}% ({time.perf_counter() - t0:.0f} s)"
        )
    if todo:
        log(f"trained {len(todo)} runs in {time.perf_counter() - t_all:.0f} s")
    return [run_key(c, s) for c, s in runs]


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
