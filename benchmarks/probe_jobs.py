"""How many runs of a preset to train at once on one device so that the whole sweep ends by a deadline.

    python benchmarks/probe_jobs.py fig6 --device cuda:0 --until UNIX_TIME [--set K=V ...] [--where K=V ...]
        [--max-seeds N] [--results DIR] [--max-jobs N] [--out FILE]

Times the preset's most expensive configuration (Sobolev before H0 before the rest) on random images of its data
set's size (after the Fig. 6 swap and the subsets; content does not change the time) through the toolkit's own
`train` with a checkpoint every epoch, as a sweep's worker runs it: after a warm-up run of one epoch (what a worker
pays once), 4 epochs evaluated after the 2nd and 4th.  Epoch 1 less epoch 3 gives the fixed cost of a run (set-up),
epoch 3 the time of a training epoch, epochs 2 and 4 less epoch 3 the time of an evaluation.  First in one worker
process alone, then in P = cap worker processes at once (cap: CPU cores, host memory / the peak resident memory of
one worker, device memory / the memory one worker held, the runs to train, --max-jobs).  With every time at n
workers interpolated linearly between 1 and P (start: from spawn to the end of the warm-up), one run takes

    T(n) = fixed + epochs * t_epoch(n) + evaluations * t_eval(n),    sweep(n) = start(n) + ceil(runs / n) * T(n)

and the n in 1..cap with the shortest sweep is chosen.  The arithmetic is printed; the last line is `jobs N`.
A sweep that does not fit before the deadline is still started (the sweep order is seed-major, so a sweep cut
short leaves every configuration with about as many seeds, and rerunning the command resumes it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from queue import Empty
from typing import Any

import torch

# (channels, size, classes, images in the training split, images in the test split) of the official data sets
SHAPES = {
    "mnist": (1, 28, 10, 60000, 10000),
    "fashion-mnist": (1, 28, 10, 60000, 10000),
    "cifar10": (3, 32, 10, 50000, 10000),
    "cifar100": (3, 32, 100, 50000, 10000),
}
PROBE_EPOCHS, PROBE_EVAL_EVERY = 4, 2


def fake_dataset(config: Any) -> Any:
    """Random uint8 images of the size the run trains and evaluates on."""
    from cdgrad.experiments.data import Dataset

    channels, size, classes, n_train, n_test = SHAPES[config.dataset]
    if config.swap_train_test:
        n_train, n_test = n_test, n_train
    n_train = min(n_train, config.train_subset or n_train)
    n_test = min(n_test, config.test_subset or n_test)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    mean, std = (0.5,) * channels, (0.25,) * channels
    return Dataset(config.dataset, x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, mean, std)


def worker(config_dict: dict[str, Any], device: str, barrier: Any, queue: Any) -> None:
    """One probe run in this process; puts {epoch durations, memory} (or {"error": ...}) on `queue`."""
    try:
        from cdgrad.experiments.config import from_dict
        from cdgrad.experiments.train import train

        config = from_dict(config_dict).replace(device=device, epochs=PROBE_EPOCHS, eval_every=PROBE_EVAL_EVERY)
        ds = fake_dataset(config)
        train(config.replace(epochs=1, eval_every=1), 0, dataset=ds)  # what a worker pays once, not per run
        barrier.wait()
        marks = [time.perf_counter()]
        with tempfile.TemporaryDirectory() as tmp:
            train(
                config,
                0,
                dataset=ds,
                checkpoint=os.path.join(tmp, "c.pt"),
                callback=lambda e, c: marks.append(time.perf_counter()),
            )
        out: dict[str, Any] = {"epochs_s": [b - a for a, b in zip(marks, marks[1:], strict=False)]}
        out["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(device)
            out["device_used_bytes"], out["device_total_bytes"] = total - free, total
        queue.put(out)
    except BaseException as exc:
        barrier.abort()  # the others, and the parent, stop waiting at once
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def probe(config: Any, device: str, processes: int) -> tuple[list[dict[str, Any]], float]:
    """Start `processes` workers; their results once they have trained together, and the seconds from their
    spawn to the common start (after a warm-up run each)."""
    from cdgrad.experiments.config import to_dict

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes + 1), ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(to_dict(config), device, barrier, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its error is on the queue
        barrier.wait(timeout=600)
    start_s = time.perf_counter() - t0
    results: list[dict[str, Any]] = []
    while len(results) < processes:
        try:
            results.append(queue.get(timeout=1.0))
        except Empty:
            if not any(p.is_alive() for p in procs) and queue.empty():
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"probe workers ended without a result (exit codes {codes})") from None
    for p in procs:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"probe worker failed: {errors[0]}")
    return results, start_s


def times(results: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(fixed cost of a run, one training epoch, one evaluation), medians over workers."""
    fixed, epoch, evaluation = [], [], []
    for r in results:
        d = r["epochs_s"]
        epoch.append(d[2])
        evaluation.append(max(0.0, (d[1] + d[3]) / 2 - d[2]))
        fixed.append(max(0.0, d[0] - d[2]))
    return statistics.median(fixed), statistics.median(epoch), statistics.median(evaluation)


def lerp(n: int, cap: int, a: float, b: float) -> float:
    """The value at n workers between `a` at 1 and `b` at `cap`."""
    return a if cap == 1 else a + (b - a) * (n - 1) / (cap - 1)


def plan(
    runs: int, epochs: int, evaluations: int, one: tuple[float, ...], many: tuple[float, ...], cap: int
) -> dict[int, float]:
    """{n: estimated seconds of the whole sweep in n workers} for n in 1..cap, from the (start, fixed, epoch,
    evaluation) seconds measured with one worker and with `cap` workers at once (the module's formula)."""
    sweep = {}
    for n in range(1, cap + 1):
        start, fixed, epoch, evaluation = (lerp(n, cap, a, b) for a, b in zip(one, many, strict=True))
        sweep[n] = start + math.ceil(runs / n) * (fixed + epochs * epoch + evaluations * evaluation)
    return sweep


def choose(sweep: dict[int, float]) -> int:
    """The number of workers with the shortest estimated sweep (the fewest among equals)."""
    return min(sweep, key=lambda n: (sweep[n], n))


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--until", type=float, required=True, metavar="UNIX_TIME", help="when the sweep must end")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--where", action="append", default=[], metavar="K=V")
    parser.add_argument("--max-seeds", type=int, default=None)
    parser.add_argument("--results", default=None, metavar="DIR", help="runs finished there are not counted")
    parser.add_argument("--max-jobs", type=int, default=None, metavar="N", help="at most N workers")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the measurements and the choice as JSON")
    args = parser.parse_args()
    for flag, value in (("--max-jobs", args.max_jobs), ("--max-seeds", args.max_seeds)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    from cdgrad.experiments.config import parse_overrides, run_key
    from cdgrad.experiments.methods import describe
    from cdgrad.experiments.presets import get_preset

    runs = get_preset(args.preset).runs(parse_overrides(args.overrides), parse_overrides(args.where), args.max_seeds)
    if args.results and os.path.exists(os.path.join(args.results, "results.sqlite")):
        from cdgrad.experiments.store import ResultStore

        done = ResultStore(args.results).done_keys()
        runs = [(c, s) for c, s in runs if run_key(c, s) not in done]
    if not runs:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"runs": 0, "jobs": 1}, fh)
        print("no runs to train\njobs 1")
        return
    rank = {"sobolev": 2, "h0": 1}  # the last configuration of the most expensive method (beta > 0 comes last)
    config = max(reversed([c for c, _ in runs]), key=lambda c: rank.get(c.method, 0))
    evaluations = len([e for e in range(1, config.epochs + 1) if e % config.eval_every == 0 or e == config.epochs])
    log = lambda text: print(text, flush=True)
    log(
        f"{len(runs)} runs of {config.epochs} epochs, {evaluations} evaluations each; probing "
        f"{config.dataset} {config.model} {describe(config)} on {args.device}"
    )

    single, start1 = probe(config, args.device, 1)
    fixed1, epoch1, eval1 = times(single)
    log(f"1 worker: fixed {fixed1:.2f} s, epoch {epoch1:.3f} s, evaluation {eval1:.3f} s, start {start1:.1f} s")
    caps = {"CPU cores": os.cpu_count() or 1, "runs": len(runs)}
    rss, avail = single[0]["rss_bytes"], mem_available()
    if avail:
        caps["host memory"] = max(1, int(0.8 * avail / rss))
        log(f"host: {avail / 2**30:.1f} GiB available, a worker peaks at {rss / 2**30:.2f} GiB")
    if "device_used_bytes" in single[0]:
        used, total = single[0]["device_used_bytes"], single[0]["device_total_bytes"]
        caps["device memory"] = max(1, int(0.9 * total / used))
        log(f"device: {total / 2**30:.1f} GiB, one worker held {used / 2**30:.2f} GiB")
    if args.max_jobs:
        caps["--max-jobs"] = args.max_jobs
    cap = min(caps.values())
    log("cap " + ", ".join(f"{k} {v}" for k, v in caps.items()) + f" -> {cap}")
    fixed_p, epoch_p, eval_p, start_p, parallel = fixed1, epoch1, eval1, start1, single
    if cap > 1:
        parallel, start_p = probe(config, args.device, cap)
        fixed_p, epoch_p, eval_p = times(parallel)
        log(
            f"{cap} workers at once: fixed {fixed_p:.2f} s, epoch {epoch_p:.3f} s, evaluation {eval_p:.3f} s, "
            f"start {start_p:.1f} s"
        )

    one, many = (start1, fixed1, epoch1, eval1), (start_p, fixed_p, epoch_p, eval_p)
    sweep = plan(len(runs), config.epochs, evaluations, one, many, cap)
    jobs = choose(sweep)
    start = lerp(jobs, cap, start1, start_p)
    run_s = (sweep[jobs] - start) / math.ceil(len(runs) / jobs)
    log("estimated sweep seconds by workers: " + ", ".join(f"{n}: {s:.0f}" for n, s in sweep.items()))
    left = args.until - time.time()
    verdict = "fits" if sweep[jobs] <= left else "does NOT fit: the sweep will be cut short and can be resumed"
    log(
        f"T({jobs}) = {run_s:.1f} s per run; sweep({jobs}) = {start:.1f} + ceil({len(runs)}/{jobs}) * "
        f"{run_s:.1f} = {sweep[jobs]:.0f} s; {left:.0f} s left: {verdict}"
    )
    if args.out:
        with open(args.out, "w") as fh:
            record = {"runs": len(runs), "config": describe(config)}
            record.update(single=single, caps=caps, cap=cap, sweep_s={str(n): s for n, s in sweep.items()})
            record.update(parallel=parallel, start_s={"1": start1, str(cap): start_p})
            record.update(jobs=jobs, seconds_left=left, fits=sweep[jobs] <= left)
            json.dump(record, fh, indent=1)
    log(f"jobs {jobs}")


if __name__ == "__main__":
    main()
