"""Set-up of one run: its data (subsets and the Fig. 6 swap applied), its units (network, optimizer, schedule and
method, one per network of the task) and the batch generator; and their state, which a checkpoint holds.

`build(config, seed, ds, device)` seeds torch's global generator with `seed` and creates, in this order, the task's
networks (each rebuilt by the method when it changes networks, then moved to the device), their optimizers, their
schedules, the method's transform for each (attached with `cdgrad.attach`) and the batch generator: the order fixes
which random numbers each one draws, so a run is a deterministic function of (config, seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

import cdgrad
from cdgrad.experiments import data as data_mod
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.methods import build_method, reshape_model
from cdgrad.experiments.tasks import Unit, get_task

__all__ = ["Run", "build", "load_data", "make_optimizer", "make_scheduler", "measurement_batches", "subset"]


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


def make_optimizer(config: RunConfig, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (lr, momentum, coupled weight decay) or Adam (lr, coupled weight decay) over all parameters; `lr`
    overrides the config's (a task's second network may have its own)."""
    lr = config.lr if lr is None else lr
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)


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


def _part_key(unit: str, part: str) -> str:
    """The checkpoint key of one part of a unit: `model`, `optimizer`, ... for the first network (`model`); the
    unit's name for its module and `<name>_<part>` for the rest otherwise (`disc`, `disc_optimizer`, ...)."""
    if unit == "model":
        return part
    return unit if part == "model" else f"{unit}_{part}"


def method_state(unit: Unit) -> dict[str, Any]:
    """The checkpoint entry of a unit's method: `{"transform": its state}`, `{}` for the ordinary gradient."""
    return {} if unit.method is None else {"transform": unit.method.state_dict()}


def load_method_state(unit: Unit, state: Any) -> None:
    """Load a unit's method state; ValueError when the checkpoint has no state for a method that has one."""
    if unit.method is None:
        return
    if not isinstance(state, dict) or not ({"transform", "clipper"} & set(state)):
        raise ValueError(f"the checkpoint holds no state of the method of {unit.name!r} (no 'transform' entry)")
    unit.method.load_state_dict(state["transform"] if "transform" in state else state["clipper"])


@dataclasses.dataclass
class Run:
    """Everything a run trains and whose state a checkpoint holds: the units and the batch generator."""

    units: list[Unit]
    generator: torch.Generator  # batch order and augmentation

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for u in self.units:
            out[_part_key(u.name, "model")] = u.module.state_dict()
            out[_part_key(u.name, "optimizer")] = u.optimizer.state_dict()
            out[_part_key(u.name, "scheduler")] = u.scheduler.state_dict()
            out[_part_key(u.name, "method")] = method_state(u)
        out["generator"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # methods first: a method that reads a weight while it loads (a spectral-norm parametrization updates its
        # power-iteration vectors on every read in training mode) cannot change what the networks then load
        for u in self.units:
            load_method_state(u, state[_part_key(u.name, "method")])
        for u in self.units:
            u.module.load_state_dict(state[_part_key(u.name, "model")])
            u.optimizer.load_state_dict(state[_part_key(u.name, "optimizer")])
            u.scheduler.load_state_dict(state[_part_key(u.name, "scheduler")])
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))

    def remove(self) -> None:
        """Detach every method from its optimizer."""
        for u in self.units:
            if u.handle is not None:
                u.handle.remove()
                u.handle = None


def build(config: RunConfig, seed: int, ds: data_mod.Dataset, device: torch.device) -> Run:
    """Seed torch with `seed`, then create the networks, optimizers, schedules, methods and batch generator."""
    torch.manual_seed(seed)
    networks = get_task(config.task).networks(config, ds)
    modules = [reshape_model(config, n.module).to(device) for n in networks]
    optimizers = [make_optimizer(config, m, n.lr) for n, m in zip(networks, modules, strict=True)]
    schedulers = [make_scheduler(config, o) for o in optimizers]
    units = []
    for n, module, optimizer, scheduler in zip(networks, modules, optimizers, schedulers, strict=True):
        method = build_method(config, module, n.inputs(ds.train_x[:2], ds.train_y[:2]))
        handle = cdgrad.attach(optimizer, method) if method is not None else None
        units.append(Unit(n.name, module, module, optimizer, scheduler, method, n.inputs, handle))
    generator = torch.Generator(device=device).manual_seed(seed)
    return Run(units, generator)


def data_batches(
    config: RunConfig, ds: data_mod.Dataset, perm: Tensor, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """The (augmented) batches of data `perm` orders, in turn: random scale, crop and flip of image and label map
    together for dense data, random crop (pad 4) and flip of the image otherwise, when `config.augment`."""
    for start in range(0, len(perm), config.batch_size):
        idx = perm[start : start + config.batch_size]
        x, y = ds.train_x[idx], ds.train_y[idx]
        if config.augment and ds.dense:  # image and label map together
            x, y = data_mod.scale_crop_flip(x, y, config.crop or x.shape[-1], generator=generator)
        elif config.augment:  # on the uint8 batch: zero padding is black, as in torchvision
            x = data_mod.augment_crop_flip(x, pad=4, generator=generator)
        yield x, y


def measurement_batches(config: RunConfig, ds: data_mod.Dataset, seed: int, epoch: int, unit: Unit) -> Iterator[Tensor]:
    """The inputs of `unit` a method may measure on at the start of `epoch` (SGS with the authors' pipeline), drawn
    lazily with a generator of their own (seeded by seed and epoch): the run's own random stream is untouched, and
    every rank of a distributed run draws the same batches."""
    gen = torch.Generator(device=ds.train_x.device).manual_seed(1_000_003 * seed + epoch)
    perm = torch.randperm(len(ds.train_x), generator=gen, device=ds.train_x.device)
    for x, y in data_batches(config, ds, perm, gen):
        yield unit.inputs(x, y)
