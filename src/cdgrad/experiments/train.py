"""Train one configuration for one seed: `train(config, seed) -> metrics`, the one epoch loop of every task.

The whole data set lives as uint8 tensors on the training device; an epoch draws a permutation from a seeded
generator and hands the task batches out of it (augmented when the config says so); the task's step trains its
networks on each (`cdgrad.experiments.tasks`: one network for classification and segmentation, generator and
discriminator for synthesis). The run is a deterministic function of (config, seed) on the CPU for a given thread
count and kernel path (see docs/experiments.md). At the start of every epoch each method's transform gets its epoch
hook with the batches it may measure on; it is attached to its optimizer for the whole run.

With `checkpoint=path`, the complete state (networks, optimizers, methods' state, schedules, generators, curves) is
written atomically after every epoch, and a later call with the same path resumes from it and ends with the same
numbers as an uninterrupted run; a checkpoint that is damaged, cannot be read, or does not fit the run, is set aside
(`<path>.corrupt-<timestamp>`, said on stderr) and the run starts afresh. The result's `segments` say on which
kernel path and thread count each stretch of epochs ran (a resumed run may have changed them). A run whose training
loss becomes non-finite stops at the end of that epoch with `status` "diverged".

Under torchrun (`WORLD_SIZE`/`RANK` in the environment, see `cdgrad.experiments.launch.init_from_env`) a task that
allows it trains data-parallel: the networks are wrapped in DistributedDataParallel and every rank draws the same
global permutation and batches of `batch_size`, training on rows `r::world` of each batch (the run equals the
single-process run up to round-off, for models without BatchNorm, whose statistics are per rank). Only rank 0
writes the checkpoint; every rank reads it on resume, which needs the same world size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cdgrad import validation as V
from cdgrad.experiments import data as data_mod
from cdgrad.experiments.checkpoint import add_epoch, resume_state, run_entries, save_checkpoint, segments_of, set_aside
from cdgrad.experiments.checks import validate
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.launch import init_from_env
from cdgrad.experiments.progress import Progress
from cdgrad.experiments.setup import Run, build, data_batches, load_data, measurement_batches
from cdgrad.experiments.tasks import Context, Task, get_task
from cdgrad.experiments.tracking import RunInfo, Tracker
from cdgrad.functional import plain_route

__all__ = ["MAX_SEED", "check_seed", "train"]

MAX_SEED = 2**63 - 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """`seed` as a Python int in [0, 2**63 - 1]; ValueError (TypeError for a non-integer) naming `name` otherwise."""
    return V.check_int(seed, name, 0, MAX_SEED)


def _restore(run: Run, state: dict[str, Any], device: torch.device) -> None:
    run.load_state_dict(state)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


class Start(NamedTuple):
    """Where a run starts: set up, and restored from its checkpoint when there is one that fits."""

    run: Run
    curves: dict[str, list[Any]] | None
    epoch: int
    elapsed: float
    segments: list[dict[str, Any]]
    tracking: dict[str, Any] | None  # the live log's state (`cdgrad.experiments.tracking`)


def _start(
    config: RunConfig,
    seed: int,
    ds: data_mod.Dataset,
    device: torch.device,
    checkpoint: str | None,
    rank: int,
    world: int,
) -> Start:
    state = resume_state(checkpoint, config, seed, rank, world)
    run = build(config, seed, ds, device)
    if state is None or checkpoint is None:
        return Start(run, None, 0, 0.0, [], None)
    try:
        _restore(run, state, device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        run.remove()
        if rank == 0:
            set_aside(checkpoint, f"checkpoint {checkpoint} does not fit this run ({type(exc).__name__}: {exc})")
        return Start(build(config, seed, ds, device), None, 0, 0.0, [], None)
    tracking = state.get("tracking") if state["epoch"] > 0 else None
    return Start(run, state["curves"], state["epoch"], state["elapsed"], segments_of(state), tracking)


def _diagnostics_prefix(run: Run, unit: Any) -> str:
    """Where a method's diagnostics go in the live log: `diagnostics/`, or `diagnostics/<network>/` for a task
    that trains several."""
    return "diagnostics/" if len(run.units) == 1 else f"diagnostics/{unit.name}/"


def _add(sums: dict[str, Tensor], batch: dict[str, Tensor] | Any) -> None:
    """Add a step's sums to the epoch's (floating sums accumulate in float64)."""
    for key, value in batch.items():
        if key in sums:
            sums[key] = sums[key] + value
        else:
            sums[key] = value.to(torch.float64) if value.is_floating_point() else value


def _all_reduce(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """The sums of every rank (integer sums stay integers)."""
    keys = list(sums)
    flat = [sums[k].reshape(-1).to(torch.float64) for k in keys]
    total = torch.cat(flat)
    torch.distributed.all_reduce(total)
    out, i = {}, 0
    for k, part in zip(keys, flat, strict=True):
        value = total[i : i + len(part)]
        i += len(part)
        if sums[k].is_floating_point():
            out[k] = value.reshape(sums[k].shape)
        else:
            out[k] = value.round().to(sums[k].dtype).reshape(sums[k].shape)
    return out


def _step_scalars(run: Run, batch: Any, count: int) -> dict[str, float]:
    """What a live log records at a step: each training loss of the batch (its mean) and each network's lr."""
    out = {f"train_{k}": float(v.item()) / count for k, v in batch.items() if k.endswith("loss")}
    for i, unit in enumerate(run.units):
        out["lr" if i == 0 else f"lr_{unit.name}"] = float(unit.optimizer.param_groups[0]["lr"])
    return out


def _epoch(
    task: Task, run: Run, ctx: Context, perm: Tensor, bar: Progress, epoch: int, step: int, track: Tracker | None
) -> dict[str, Tensor]:
    """One epoch's training steps (the first after optimizer step `step`); returns the summed step outputs."""
    config = ctx.config
    sums: dict[str, Tensor] = {}
    label, key = task.progress
    for x, y in data_batches(config, ctx.ds, perm, run.generator):
        count = len(x)
        if ctx.world > 1:  # this rank's rows of the global batch (augmented whole: same random draws)
            x, y = x[ctx.rank :: ctx.world], y[ctx.rank :: ctx.world]
        batch = task.step(run.units, x, y, ctx, count)
        _add(sums, batch)
        info = f"epoch {epoch + 1}/{config.epochs} {label} {batch[key].item() / count:.3f}" if bar.enabled else None
        bar.update(info=info)
        step += 1
        if track is not None:
            track.log_step(step, _step_scalars(run, batch, count))
    return sums


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
    IoU, and the final `train_*` and `gap_*` = train - test from one more evaluation of the unaugmented training
    split; synthesis: generator and discriminator losses, FID). `train_*` curves are running averages over the
    epoch's batches; `test_*` are measured at epochs `test_epoch` (every `eval_every`, always the last). `status` is
    "completed", or "diverged" when a training loss of the epoch was not finite (training stops after that epoch,
    which is evaluated; no checkpoint is written for it). `segments` lists `{"epochs", "kernel", "threads"}` for
    each stretch of epochs run on one kernel path and thread count (`cdgrad.experiments.checkpoint.add_epoch`).
    `dataset` (from `load_data(config)`) saves re-reading files in a sweep; `callback(epoch, curves)` runs after
    each epoch's checkpoint; `tracker` (`cdgrad.experiments.tracking`) logs the run live, on rank 0: every step's
    losses and learning rates, every epoch's curves and the methods' diagnostics, the final metrics; its state is
    kept in the checkpoint, so a resumed run continues its log without repeating a step.
    """
    validate(config)
    seed = check_seed(seed)
    task = get_task(config.task)
    dist_info = init_from_env()
    rank, world = dist_info if dist_info is not None else (0, 1)
    if world > 1 and not task.distributed:
        raise ValueError(f"task {task.name!r} trains in one process; launch it without torchrun")
    device = torch.device(config.device)
    ds = (dataset if dataset is not None else load_data(config)).to(device)
    task.check_dataset(config, ds)
    evaluate = task.evaluator(config, ds)  # before training: files the evaluation needs fail here
    ctx = Context(config, ds, rank, world)
    n = len(ds.train_x)

    run, restored, start_epoch, elapsed, segments, tracking = _start(config, seed, ds, device, checkpoint, rank, world)
    curves: dict[str, list[Any]] = restored if restored is not None else {k: [] for k in task.curves}
    steps = math.ceil(n / config.batch_size)
    track = tracker if rank == 0 else None
    if track is not None:
        track.start(RunInfo(config, seed, steps, start_epoch, curves), tracking)
    methods = [(_diagnostics_prefix(run, u), u.method) for u in run.units]
    if world > 1:  # after loading the checkpoint; DDP also broadcasts rank 0's parameters and buffers
        ids = [device.index] if device.type == "cuda" and device.index is not None else None
        for unit in run.units:
            unit.net = nn.parallel.DistributedDataParallel(unit.module, device_ids=ids)
    bar = Progress(
        (config.epochs - start_epoch) * steps, desc=f"{config.method} s{seed}", enabled=progress if rank == 0 else False
    )
    status = "completed"
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            for unit in run.units:
                if unit.method is not None:
                    unit.method.begin_epoch(epoch, measurement_batches(config, ds, seed, epoch, unit))
                unit.net.train()
            perm = torch.randperm(n, generator=run.generator, device=device)
            sums = _epoch(task, run, ctx, perm, bar, epoch, epoch * steps, track)
            add_epoch(segments, plain_route(device), torch.get_num_threads())
            for unit in run.units:
                unit.scheduler.step()
            if world > 1:
                sums = _all_reduce(sums)
            curves["epoch"].append(epoch + 1)
            for key, value in task.epoch_curves(sums, n).items():
                curves[key].append(value)
            diverged = not all(math.isfinite(curves[k][-1]) for k in task.loss_curves)  # the same on every rank

            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs or diverged:
                curves["test_epoch"].append(epoch + 1)
                for key, value in evaluate(run.units, ctx, diverged).items():
                    curves[key].append(value)
            curves["epoch_time"].append(time.perf_counter() - t0)
            elapsed += curves["epoch_time"][-1]
            if track is not None:
                track.log_epoch((epoch + 1) * steps, curves, *methods)
            if diverged:
                status = "diverged"
                break

            if checkpoint is not None and rank == 0:
                cuda = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
                save_checkpoint(
                    checkpoint,
                    {
                        **run_entries(config, seed, epoch + 1, elapsed, world, curves),
                        **run.state_dict(),
                        **cuda,
                        "segments": segments,
                        **({"tracking": track.state_dict()} if track is not None else {}),
                    },
                )
            if checkpoint is not None and world > 1:
                torch.distributed.barrier()  # no rank goes on (and may read the file) before it is written
            if callback is not None:
                callback(epoch + 1, curves)
    except BaseException:
        if track is not None:  # the run stopped: a resume continues its log
            track.abort()
        raise
    finally:
        bar.close()
        run.remove()
        torch.set_num_threads(threads)

    final = task.finish(run.units, ctx, curves)
    if track is not None:
        track.end(final, status)
    return {"curves": curves, "final": final, "wall_s": elapsed, "status": status, "segments": segments}
