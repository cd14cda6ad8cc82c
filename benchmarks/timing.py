"""The one timing runner of the benchmarks, on `torch.utils.benchmark`.

    from timing import measure, seconds
    seconds(lambda: cdgrad.sobolev(g, 1.0), min_run_time=0.3)    # median seconds per call

`torch.utils.benchmark.Timer` runs the call with the thread count given (torch's default otherwise), warms it up
while it sizes its blocks, synchronises CUDA around every block, and reports per-call statistics of blocks of
calls; every benchmark quotes the median, so numbers from different scripts compare.  `min_run_time=0` (the
scripts' --smoke) runs the call once: a check that the code runs, not a timing.

`interleaved` times several variants in rounds, each round timing every variant in turn, and reports each
variant's median over the rounds (what ratios on a busy machine need).

Used by bench_transforms.py and bench_spectral.py.  Measurements it does not fit stay outside: the end-to-end
part of `bench_transforms.py` times three training set-ups interleaved step by step (so that drift of a shared
machine hits each alike, which timing one statement at a time cannot do); `bench_distributed.py` times collective
steps between barriers of several processes; `bench_throughput.py` and `bench_sgs.py` report CPU seconds of the
process beside wall time (the Timer measures wall time only), and bench_sgs.py profiles phases with cProfile.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import benchmark

__all__ = ["environment", "interleaved", "measure", "seconds"]


def measure(
    fn: Callable[[], Any],
    *,
    min_run_time: float,
    threads: int | None = None,
    label: str = "",
    sub_label: str = "",
    description: str = "",
) -> benchmark.Measurement:
    """`fn()` timed by `torch.utils.benchmark.Timer.blocked_autorange` for at least `min_run_time` seconds."""
    timer = benchmark.Timer(
        stmt="fn()",
        globals={"fn": fn},
        num_threads=threads or torch.get_num_threads(),
        label=label,
        sub_label=sub_label,
        description=description,
    )
    if min_run_time <= 0:
        return timer.timeit(1)
    return timer.blocked_autorange(min_run_time=min_run_time)


def seconds(fn: Callable[[], Any], *, min_run_time: float, threads: int | None = None) -> float:
    """Median seconds per call of `fn()` (see `measure`)."""
    return float(measure(fn, min_run_time=min_run_time, threads=threads).median)


def interleaved(
    fns: dict[str, Callable[[], Any]], *, rounds: int, min_run_time: float, threads: int | None = None
) -> dict[str, float]:
    """Median over `rounds` rounds of each function's median seconds per call (`seconds`), every round timing
    each function in turn: drift of a shared machine then hits every variant alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            times[k].append(seconds(fn, min_run_time=min_run_time, threads=threads))
    return {k: statistics.median(v) for k, v in times.items()}


def environment(device: torch.device | str = "cpu") -> str:
    """One line naming what the numbers were measured on."""
    from cdgrad import _native

    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        kernel = "yes" if _native.library() is not None else "no (PyTorch path)"
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {torch.get_num_threads()} threads, native kernel: {kernel}"
    return f"torch {torch.__version__}, {where}"
