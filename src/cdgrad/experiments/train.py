"""Train one configuration for one seed: `train(config, seed) -> metrics`.

The whole data set lives as uint8 tensors on the training device; an epoch draws a permutation from a
seeded generator and indexes batches out of it, normalising (and, for CIFAR, augmenting) whole
batches. The run is a deterministic function of (config, seed) on the CPU. With `checkpoint=path`,
the complete state (model, optimizer, method state, scheduler, generators, curves) is written
atomically after every epoch, and a later call with the same path resumes from it and ends with the
same numbers as an uninterrupted run.

Under torchrun (`WORLD_SIZE`/`RANK` in the environment, see `cdgrad.experiments.launch.init_from_env`) the model is
wrapped in DistributedDataParallel and every rank draws the same global permutation and batches of
`batch_size`, training on rows `r::world` of each batch; the loss is scaled so that DDP's gradient average is
the gradient of the global batch's mean loss, i.e. the run equals the single-process run up to round-off (for
models without BatchNorm, whose statistics are per rank). Only rank 0 writes the checkpoint; every rank
reads it on resume, which needs the same world size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad.experiments import data as data_mod
from cdgrad.experiments.config import RunConfig, from_dict, identity_dict, to_dict, validate
from cdgrad.experiments.launch import init_from_env
from cdgrad.experiments.methods import attach_method

CURVES = ("epoch", "train_loss", "train_acc", "test_epoch", "test_loss", "test_acc", "epoch_time")


# ------------------------------------------------------------------------------------------------- data
def load_data(config: RunConfig) -> data_mod.Dataset:
    """The data set of `config`, with the Fig. 6 swap and the subsets applied (on the CPU)."""
    if config.dataset == "synthetic":
        ds = synthetic_dataset()
    else:
        ds = data_mod.load_dataset(config.dataset, root=config.data_root, download=config.download)
    if config.swap_train_test:
        ds = ds.swap_train_test()
    return subset(ds, config.train_subset, config.test_subset)


def subset(ds: data_mod.Dataset, n_train: int, n_test: int) -> data_mod.Dataset:
    """Keep the first `n_train` training and `n_test` test images (0 keeps all)."""
    import dataclasses

    def cut(x: Tensor, n: int) -> Tensor:
        return x[:n] if 0 < n < len(x) else x

    return dataclasses.replace(
        ds,
        train_x=cut(ds.train_x, n_train),
        train_y=cut(ds.train_y, n_train),
        test_x=cut(ds.test_x, n_test),
        test_y=cut(ds.test_y, n_test),
    )


def synthetic_dataset(n_train: int = 256, n_test: int = 128, size: int = 8, classes: int = 4) -> data_mod.Dataset:
    """A tiny, learnable, generated data set (one class-specific pattern plus noise), for tests only."""
    g = torch.Generator().manual_seed(1234)
    patterns = torch.rand(classes, 1, size, size, generator=g)

    def make(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, 1, size, size, generator=g)
        return (x * 255).round().to(torch.uint8), y.to(torch.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return data_mod.Dataset(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=classes,
        mean=(0.5,),
        std=(0.25,),
    )


# ------------------------------------------------------------------------------------------------ model
class TinyNet(nn.Module):
    """Two 3x3 convolutions and a linear layer: a seconds-fast network for tests only."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(F.max_pool2d(x, 2)))
        return self.fc(x.mean(dim=(2, 3)))


def make_model(config: RunConfig, ds: data_mod.Dataset) -> nn.Module:
    in_channels, image_size = ds.train_x.shape[1], ds.train_x.shape[-1]
    if config.model == "tiny":
        return TinyNet(ds.num_classes, in_channels)
    from cdgrad.experiments.models import build_model

    return build_model(config.model, num_classes=ds.num_classes, in_channels=in_channels, image_size=image_size)


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: lr * 0.1**floor(epoch/step_every) ('step'), cosine to 0, or constant."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    gamma = 0.1 if config.schedule == "step" else 1.0
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_every, gamma=gamma)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of `model` on (x, y), in no-grad batches."""
    loss_sum, correct = _evaluate_sums(model, x, y, mean, std, batch_size)
    return loss_sum / len(x), 100.0 * correct / len(x)


@torch.no_grad()
def _evaluate_sums(model: nn.Module, x: Tensor, y: Tensor, mean: Any, std: Any, batch_size: int) -> tuple[float, int]:
    """Summed cross-entropy and number of correct predictions of `model` on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(data_mod.normalize(x[i : i + batch_size], mean, std))
        target = y[i : i + batch_size]
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss_sum, correct


def _evaluate_sharded(
    model: nn.Module, ds: data_mod.Dataset, batch_size: int, rank: int, world: int
) -> tuple[float, float]:
    """`evaluate` on the test split with rank r taking the r-th contiguous chunk; sums all-reduced."""
    n = len(ds.test_x)
    lo, hi = n * rank // world, n * (rank + 1) // world
    loss_sum, correct = _evaluate_sums(model, ds.test_x[lo:hi], ds.test_y[lo:hi], ds.mean, ds.std, batch_size)
    sums = torch.tensor([loss_sum, float(correct)], dtype=torch.float64, device=ds.test_x.device)
    torch.distributed.all_reduce(sums)
    return sums[0].item() / n, 100.0 * round(sums[1].item()) / n


# ------------------------------------------------------------------------------------------ progress bar
class Progress:
    """A one-line progress bar on stderr; silent unless stderr is a terminal (or `enabled=True`)."""

    def __init__(self, total: int, desc: str = "", enabled: bool | None = None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.desc, self.n, self.info = total, desc, 0, ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, info: str | None = None) -> None:
        self.n += n
        if info is not None:
            self.info = info
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.2 or self.n >= self.total):
            self.last = now
            frac = self.n / max(self.total, 1)
            eta = (now - self.start) / max(frac, 1e-9) * (1 - frac)
            bar = "#" * int(24 * frac)
            self.stream.write(f"\r{self.desc} [{bar:<24}] {100 * frac:5.1f}% eta {eta:5.0f}s {self.info}\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (temporary file in the same folder, then os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, config: RunConfig, seed: int, world_size: int = 1) -> dict[str, Any]:
    """The state saved at `path`; ValueError if it belongs to another run or was written under another world size."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("config")
    if (
        not isinstance(saved, dict)
        or identity_dict(from_dict(saved)) != identity_dict(config)
        or state.get("seed") != seed
    ):
        raise ValueError(
            f"checkpoint {path} belongs to a different run (config or seed differ); remove it "
            "or pass a different checkpoint path"
        )
    saved_world = state.get("world_size", 1)  # checkpoints without the field come from single-process runs
    if saved_world != world_size:
        raise ValueError(
            f"checkpoint {path} was written by a run with world size {saved_world} and can only be "
            f"resumed with world size {saved_world}, but this run has world size {world_size}; "
            f"launch {saved_world} process(es) or remove the checkpoint"
        )
    return state


# ------------------------------------------------------------------------------------------------ train
def train(
    config: RunConfig,
    seed: int,
    *,
    dataset: data_mod.Dataset | None = None,
    checkpoint: str | None = None,
    progress: bool | None = None,
    callback: Callable[[int, dict[str, list]], None] | None = None,
) -> dict[str, Any]:
    """Train `config` from seed `seed`; return per-epoch curves and final metrics.

    Loss is the mean cross-entropy; accuracies are in percent. `train_*` are running averages over the
    epoch's batches; `test_*` are measured at epochs `test_epoch` (every `eval_every`, always the last).
    `dataset` (from `load_data(config)`) saves re-reading files in a sweep; `callback(epoch, curves)` runs
    after each epoch's checkpoint.

    Under torchrun (a default process group, or `WORLD_SIZE` in the environment) the run is data-parallel as
    described in the module docstring; every rank returns the same metrics and only rank 0 writes `checkpoint`.
    """
    validate(config)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    dist_info = init_from_env()
    rank, world = dist_info if dist_info is not None else (0, 1)
    device = torch.device(config.device)
    ds = (dataset if dataset is not None else load_data(config)).to(device)
    n = len(ds.train_x)

    torch.manual_seed(seed)
    model = make_model(config, ds).to(device)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    sample = data_mod.normalize(ds.train_x[:2], ds.mean, ds.std)
    method = attach_method(config, model, optimizer, sample=sample)
    gen = torch.Generator(device=device).manual_seed(seed)
    curves: dict[str, list] = {k: [] for k in CURVES}
    start_epoch, elapsed = 0, 0.0

    if checkpoint is not None and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint, config, seed, world)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        gen.set_state(state["generator"].to(gen.get_state().device))
        curves, start_epoch, elapsed = state["curves"], state["epoch"], state["elapsed"]

    net: nn.Module = model
    if world > 1:  # after loading the checkpoint; DDP also broadcasts rank 0's parameters and buffers
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None
        )
    steps = math.ceil(n / config.batch_size)
    bar = Progress(
        (config.epochs - start_epoch) * steps, desc=f"{config.method} s{seed}", enabled=progress if rank == 0 else False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            method.begin_epoch(epoch)
            net.train()
            perm = torch.randperm(n, generator=gen, device=device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            for i in range(steps):
                idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
                x, y = ds.train_x[idx], ds.train_y[idx]
                if config.augment:  # on the uint8 batch: zero padding is black, as in torchvision
                    x = data_mod.augment_crop_flip(x, pad=4, generator=gen)
                if world > 1:  # this rank's rows of the global batch (augmented whole: same random draws)
                    x, y = x[rank::world], y[rank::world]
                x = data_mod.normalize(x, ds.mean, ds.std)
                logits = net(x)
                if world == 1:
                    loss = F.cross_entropy(logits, y)
                    batch_loss = loss.detach() * len(idx)
                else:  # DDP averages over ranks: world/B * (local sum) averages to the global batch mean
                    batch_loss = F.cross_entropy(logits, y, reduction="sum")
                    loss = batch_loss * (world / len(idx))
                    batch_loss = batch_loss.detach()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += batch_loss
                correct += (logits.detach().argmax(1) == y).sum()
                bar.update(info=f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}" if bar.enabled else None)
            scheduler.step()
            if world > 1:
                sums = torch.stack([loss_sum, correct.to(torch.float64)])
                torch.distributed.all_reduce(sums)
                loss_sum, correct = sums[0], sums[1].round().to(torch.int64)
            curves["epoch"].append(epoch + 1)
            curves["train_loss"].append(loss_sum.item() / n)
            curves["train_acc"].append(100.0 * correct.item() / n)
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                if world == 1:
                    test_loss, test_acc = evaluate(model, ds.test_x, ds.test_y, ds.mean, ds.std, config.eval_batch_size)
                else:
                    test_loss, test_acc = _evaluate_sharded(model, ds, config.eval_batch_size, rank, world)
                curves["test_epoch"].append(epoch + 1)
                curves["test_loss"].append(test_loss)
                curves["test_acc"].append(test_acc)
            curves["epoch_time"].append(time.perf_counter() - t0)
            elapsed += curves["epoch_time"][-1]
            if checkpoint is not None and rank == 0:
                save_checkpoint(
                    checkpoint,
                    {
                        "config": to_dict(config),
                        "seed": seed,
                        "epoch": epoch + 1,
                        "elapsed": elapsed,
                        "world_size": world,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "method": method.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "generator": gen.get_state(),
                        "curves": curves,
                        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    },
                )
            if checkpoint is not None and world > 1:
                torch.distributed.barrier()  # no rank goes on (and may read the file) before it is written
            if callback is not None:
                callback(epoch + 1, curves)
    finally:
        bar.close()
        method.remove()
        torch.set_num_threads(threads)

    final = {k: curves[k][-1] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    return {"curves": curves, "final": final, "wall_s": elapsed}
