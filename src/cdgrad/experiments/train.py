"""Train one configuration for one seed: `train(config, seed) -> metrics`.

The whole data set lives as uint8 tensors on the training device; an epoch draws a permutation from a
seeded generator and indexes batches out of it, normalising (and, for CIFAR, augmenting) whole
batches. The run is a deterministic function of (config, seed) on the CPU for a given thread count and kernel
path (see docs/experiments.md). With `checkpoint=path`, the complete state (model, optimizer, method state,
scheduler, generators, curves) is written atomically after every epoch, and a later call with the same path
resumes from it and ends with the same numbers as an uninterrupted run; a checkpoint that cannot be read is set
aside (`<path>.corrupt-<timestamp>`, said on stderr) and the run starts afresh. The loss and the metrics come
from the run's task (`cdgrad.experiments.tasks`); a run whose training loss becomes non-finite stops at the end
of that epoch with `status` "diverged".

Under torchrun (`WORLD_SIZE`/`RANK` in the environment, see `cdgrad.experiments.launch.init_from_env`) the model is
wrapped in DistributedDataParallel and every rank draws the same global permutation and batches of
`batch_size`, training on rows `r::world` of each batch; the loss is scaled so that DDP's gradient average is
the gradient of the global batch's mean loss, i.e. the run equals the single-process run up to round-off (for
models without BatchNorm, whose statistics are per rank). Only rank 0 writes the checkpoint; every rank
reads it on resume, which needs the same world size.

The pieces live in `setup` (data, model, optimizer, schedule), `evaluation`, `checkpoint` and `progress`; the
names below are re-exported from here.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cdgrad import validation as V
from cdgrad.experiments import data as data_mod
from cdgrad.experiments.checkpoint import CURVES, read_checkpoint, resume_state, run_entries, save_checkpoint, set_aside
from cdgrad.experiments.config import RunConfig, validate
from cdgrad.experiments.evaluation import evaluate, evaluate_sharded
from cdgrad.experiments.launch import init_from_env
from cdgrad.experiments.progress import Progress
from cdgrad.experiments.setup import Setup, build, load_data, make_model, make_optimizer, make_scheduler, subset
from cdgrad.experiments.tasks import check_dataset, get_task
from cdgrad.experiments.tracking import RunInfo, Tracker

__all__ = [
    "CURVES",
    "MAX_SEED",
    "Progress",
    "check_seed",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "make_model",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
    "subset",
    "train",
]

MAX_SEED = 2**63 - 1
load_checkpoint = read_checkpoint  # the former name


def check_seed(seed: Any, name: str = "seed") -> int:
    """`seed` as a Python int in [0, 2**63 - 1]; ValueError (TypeError for a non-integer) naming `name` otherwise."""
    return V.check_int(seed, name, 0, MAX_SEED)


def _restore(run: Setup, state: dict[str, Any], device: torch.device) -> None:
    run.load_state_dict(state)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def measurement_batches(
    config: RunConfig, ds: data_mod.Dataset, seed: int, epoch: int, count: int
) -> list[torch.Tensor]:
    """`count` normalised training batches for a method that measures at the start of `epoch` (SGS with the
    authors' pipeline), drawn with a generator of their own (seeded by seed and epoch): the run's own random
    stream is untouched, and every rank of a distributed run draws the same batches."""
    gen = torch.Generator(device=ds.train_x.device).manual_seed(1_000_003 * seed + epoch)
    n = len(ds.train_x)
    idx = torch.randperm(n, generator=gen, device=ds.train_x.device)[: count * config.batch_size]
    out = []
    for start in range(0, len(idx), config.batch_size):
        chunk = idx[start : start + config.batch_size]
        x = ds.train_x[chunk]
        if config.augment and ds.dense:
            x = data_mod.scale_crop_flip(x, ds.train_y[chunk], config.crop or x.shape[-1], generator=gen)[0]
        elif config.augment:
            x = data_mod.augment_crop_flip(x, pad=4, generator=gen)
        out.append(data_mod.normalize(x, ds.mean, ds.std))
    return out


def train(
    config: RunConfig,
    seed: int,
    *,
    dataset: data_mod.Dataset | None = None,
    checkpoint: str | None = None,
    progress: bool | None = None,
    callback: Callable[[int, dict[str, list[Any]]], None] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train `config` from seed `seed`; return per-epoch curves, final metrics, wall time and status.

    Loss and metrics are the task's (classification: mean cross-entropy, accuracy in percent; segmentation: also mean
    IoU, and the final `train_*` and `gap_*` = train - test from one more evaluation, of the unaugmented training
    split; image synthesis runs its own loop, `cdgrad.experiments.synthesis`). `train_*` curves are
    running averages over the epoch's batches; `test_*` are measured at epochs `test_epoch` (every `eval_every`,
    always the last). `status` is "completed", or "diverged" when the epoch's training loss was not finite
    (training stops after that epoch, which is evaluated; no checkpoint is written for it). `dataset` (from
    `load_data(config)`) saves re-reading files in a sweep; `callback(epoch, curves)` runs after each epoch's
    checkpoint; `tracker` (`cdgrad.experiments.tracking`) logs the run live, on rank 0 (None: nothing is logged).

    Under torchrun (a default process group, or `WORLD_SIZE` in the environment) the run is data-parallel as
    described in the module docstring; every rank returns the same metrics and only rank 0 writes `checkpoint`.
    """
    validate(config)
    seed = check_seed(seed)
    task = get_task(config.task)
    if task.fit is not None:  # a task with a loop of its own (image synthesis: two networks)
        return task.fit(
            config, seed, dataset=dataset, checkpoint=checkpoint, progress=progress, callback=callback, tracker=tracker
        )
    assert task.loss is not None and task.stats is not None and task.summarize is not None
    dist_info = init_from_env()
    rank, world = dist_info if dist_info is not None else (0, 1)
    device = torch.device(config.device)
    ds = (dataset if dataset is not None else load_data(config)).to(device)
    check_dataset(task, ds.dense, config.dataset)
    n = len(ds.train_x)

    # ---- set-up, then the checkpoint's state (a file that does not fit is set aside and the run starts afresh)
    state = resume_state(checkpoint, config, seed, rank, world)
    run = build(config, seed, ds, device)
    curves: dict[str, list[Any]] = {k: [] for k in task.curves}
    start_epoch, elapsed = 0, 0.0
    if state is not None and checkpoint is not None:
        try:
            _restore(run, state, device)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            run.method.remove()
            if rank == 0:
                set_aside(checkpoint, f"checkpoint {checkpoint} does not fit this run ({type(exc).__name__}: {exc})")
            run = build(config, seed, ds, device)
        else:
            curves, start_epoch, elapsed = state["curves"], state["epoch"], state["elapsed"]
    model, optimizer, method, gen = run.model, run.optimizer, run.method, run.generator
    # ---- tracking: start or resume the run's live log (rank 0)
    track = tracker if rank == 0 else None
    if track is not None:
        saved = state.get("tracking") if state is not None and start_epoch > 0 else None
        track.start(RunInfo(config, seed, math.ceil(n / config.batch_size), start_epoch, curves), saved)

    net: nn.Module = model
    if world > 1:  # after loading the checkpoint; DDP also broadcasts rank 0's parameters and buffers
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None
        )
    steps = math.ceil(n / config.batch_size)
    bar = Progress(
        (config.epochs - start_epoch) * steps, desc=f"{config.method} s{seed}", enabled=progress if rank == 0 else False
    )
    status = "completed"
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        for epoch in range(start_epoch, config.epochs):
            # ---- one epoch
            t0 = time.perf_counter()
            method.begin_epoch(epoch, functools.partial(measurement_batches, config, ds, seed, epoch))
            net.train()
            perm = torch.randperm(n, generator=gen, device=device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            sums: torch.Tensor | int = 0  # the task's batch statistics, summed
            for i in range(steps):
                idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
                x, y = ds.train_x[idx], ds.train_y[idx]
                if config.augment and task.dense:  # image and label map together
                    x, y = data_mod.scale_crop_flip(x, y, config.crop or x.shape[-1], generator=gen)
                elif config.augment:  # on the uint8 batch: zero padding is black, as in torchvision
                    x = data_mod.augment_crop_flip(x, pad=4, generator=gen)
                if world > 1:  # this rank's rows of the global batch (augmented whole: same random draws)
                    x, y = x[rank::world], y[rank::world]
                x = data_mod.normalize(x, ds.mean, ds.std)
                logits = net(x)
                if world == 1:
                    loss = task.loss(logits, y)
                    batch_loss = loss.detach() * len(idx)
                else:  # DDP averages over ranks: world/B * (local sum) averages to the global batch mean
                    batch_loss = task.loss(logits, y, reduction="sum")
                    loss = batch_loss * (world / len(idx))
                    batch_loss = batch_loss.detach()
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)  # = loss.backward()
                optimizer.step()
                if track is not None:  # ---- tracking: per-step scalars
                    track.log_step(
                        epoch * steps + i + 1, {"train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
                    )
                loss_sum += batch_loss
                sums = sums + task.stats(logits.detach(), y)
                bar.update(info=f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}" if bar.enabled else None)
            run.scheduler.step()
            assert isinstance(sums, torch.Tensor)
            if world > 1:
                total = torch.cat([loss_sum.reshape(1), sums.to(torch.float64)])
                torch.distributed.all_reduce(total)
                loss_sum, sums = total[0], total[1:].round().to(torch.int64)
            curves["epoch"].append(epoch + 1)
            curves["train_loss"].append(loss_sum.item() / n)
            for key, value in task.summarize(sums).items():
                curves[f"train_{key}"].append(value)
            diverged = not math.isfinite(curves["train_loss"][-1])  # the same on every rank (all-reduced)

            # ---- evaluation
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs or diverged:
                if world == 1:
                    test_loss, scores = evaluate(
                        model, ds.test_x, ds.test_y, ds.mean, ds.std, config.eval_batch_size, task
                    )
                else:
                    test_loss, scores = evaluate_sharded(model, ds, config.eval_batch_size, rank, world, task)
                curves["test_epoch"].append(epoch + 1)
                curves["test_loss"].append(test_loss)
                for key, value in scores.items():
                    curves[f"test_{key}"].append(value)
            curves["epoch_time"].append(time.perf_counter() - t0)
            elapsed += curves["epoch_time"][-1]
            if track is not None:  # ---- tracking: the epoch's curves and the method's diagnostics
                track.log_epoch((epoch + 1) * steps, curves, ("diagnostics/", method))
            if diverged:
                status = "diverged"
                break

            # ---- checkpoint
            if checkpoint is not None and rank == 0:
                save_checkpoint(
                    checkpoint,
                    {
                        **run_entries(config, seed, epoch + 1, elapsed, world, curves),
                        **run.state_dict(),
                        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                        **({"tracking": track.state_dict()} if track is not None else {}),  # ---- tracking
                    },
                )
            if checkpoint is not None and world > 1:
                torch.distributed.barrier()  # no rank goes on (and may read the file) before it is written
            if callback is not None:
                callback(epoch + 1, curves)
    except BaseException:
        if track is not None:  # ---- tracking: the run stopped; a resume continues its log
            track.abort()
        raise
    finally:
        bar.close()
        method.remove()
        torch.set_num_threads(threads)

    final = {k: curves[k][-1] for k in ("train_loss", "test_loss")}
    for key in task.summary_metrics:
        final[f"train_{key}"], final[f"test_{key}"] = curves[f"train_{key}"][-1], curves[f"test_{key}"][-1]
    if task.dense:  # the training metrics of a dense task: the same evaluation on the training split
        _, scores = evaluate(model, ds.train_x, ds.train_y, ds.mean, ds.std, config.eval_batch_size, task)
        for key, value in scores.items():
            final[f"train_{key}"] = value
            final[f"gap_{key}"] = value - final[f"test_{key}"]
    if track is not None:  # ---- tracking: final metrics and status
        track.end(final, status)
    return {"curves": curves, "final": final, "wall_s": elapsed, "status": status}
