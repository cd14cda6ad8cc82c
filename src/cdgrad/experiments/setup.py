"""Set-up of one run: its data (subsets and the Fig. 6 swap applied), model, optimizer and schedule.

`build(config, seed, ds, device)` seeds torch's global generator with `seed` and creates, in this order, the
model, the optimizer, the schedule, the gradient method and the batch generator: the order fixes which random
numbers each one draws, so a run is a deterministic function of (config, seed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from cdgrad.experiments import data as data_mod
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.methods import AttachedMethod, attach_method

__all__ = ["Setup", "build", "load_data", "make_model", "make_optimizer", "make_scheduler", "subset"]


def load_data(config: RunConfig) -> data_mod.Dataset:
    """The data set of `config`, with the Fig. 6 swap and the subsets applied (on the CPU)."""
    ds = data_mod.load_dataset(config.dataset, root=config.data_root, download=config.download)
    if config.swap_train_test:
        ds = ds.swap_train_test()
    return subset(ds, config.train_subset, config.test_subset)


def subset(ds: data_mod.Dataset, n_train: int, n_test: int) -> data_mod.Dataset:
    """Keep the first `n_train` training and `n_test` test images (0 keeps all)."""

    def cut(x: Tensor, n: int) -> Tensor:
        return x[:n] if 0 < n < len(x) else x

    return dataclasses.replace(
        ds,
        train_x=cut(ds.train_x, n_train),
        train_y=cut(ds.train_y, n_train),
        test_x=cut(ds.test_x, n_test),
        test_y=cut(ds.test_y, n_test),
    )


def make_model(config: RunConfig, ds: data_mod.Dataset) -> nn.Module:
    """The network `config.model` for the images and classes of `ds` (re-parameterised when the method is acb,
    repvgg or dbb)."""
    from cdgrad.experiments.methods import reshape_model
    from cdgrad.experiments.models import build_model

    in_channels, image_size = ds.train_x.shape[1], ds.train_x.shape[-1]
    options = {} if config.batchnorm else {"batchnorm": False}  # models without the option keep their signature
    model = build_model(
        config.model, num_classes=ds.num_classes, in_channels=in_channels, image_size=image_size, **options
    )
    return reshape_model(config, model)


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (lr, momentum, coupled weight decay) or Adam (lr, coupled weight decay) over all parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: lr * lr_decay**floor(epoch/step_every) ('step'), cosine to 0, or constant.

    With `warmup_epochs` W > 0 the lr first rises linearly, lr * (e + 1) / (W + 1) in epoch e < W, and the
    schedule then runs over the remaining epochs (cosine reaches 0 at the last one).
    """
    lr_sched = torch.optim.lr_scheduler
    warmup = config.warmup_epochs
    main: lr_sched.LRScheduler
    if config.schedule == "cosine":
        main = lr_sched.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs - warmup))
    else:
        gamma = config.lr_decay if config.schedule == "step" else 1.0
        main = lr_sched.StepLR(optimizer, step_size=config.step_every, gamma=gamma)
    if warmup == 0:
        return main
    ramp = lr_sched.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return lr_sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


@dataclasses.dataclass
class Setup:
    """Everything a run trains and whose state a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    method: AttachedMethod
    generator: torch.Generator  # batch order and augmentation

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))


def build(config: RunConfig, seed: int, ds: data_mod.Dataset, device: torch.device) -> Setup:
    """Seed torch with `seed`, then create the model, optimizer, schedule, method and batch generator."""
    torch.manual_seed(seed)
    model = make_model(config, ds).to(device)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    sample = data_mod.normalize(ds.train_x[:2], ds.mean, ds.std)
    method = attach_method(config, model, optimizer, sample=sample)
    generator = torch.Generator(device=device).manual_seed(seed)
    return Setup(model, optimizer, scheduler, method, generator)
