"""The command line of sweeps beyond one process: `cdgrad run --executor local|slurm` and `cdgrad status`.

`cdgrad.experiments.cli` builds the parser and calls these; the executors themselves are
`cdgrad.experiments.executors`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.worker import load_plugins

__all__ = [
    "add_executor_arguments",
    "add_status_parser",
    "cmd_status",
    "executor_options",
    "load_plugins",
    "run_states",
    "run_with_executor",
]


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    from cdgrad.experiments.executors import EXECUTORS

    g = p.add_argument_group("where the runs train (docs/cluster.md)")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="inline",
        help="inline: one run at a time in this process (default); local: a pool of worker processes on this "
        "machine; slurm: one SLURM array task per run (submitit)",
    )
    g.add_argument("--jobs", type=int, default=None, metavar="N", help="local: worker processes (default: CPU count)")
    g.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="local: comma-separated devices the workers are pinned to round robin, e.g. cuda:0,cuda:1 "
        "(default: the configs' device, CPU threads split between the workers)",
    )
    g.add_argument("--retry-failed", action="store_true", help="train runs recorded as failed again")
    g.add_argument("--wait", action="store_true", help="slurm: wait for the runs (progress bar), then report")
    g.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="slurm: stop waiting after S seconds")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="slurm: partition (default: the cluster's)")
    g.add_argument(
        "--slurm-time",
        default="60",
        metavar="TIME",
        help="slurm: time limit per task, minutes or HH:MM:SS (default 60)",
    )
    g.add_argument("--slurm-gpus-per-task", type=int, default=None, metavar="N", help="slurm: GPUs per task")
    g.add_argument("--slurm-cpus-per-task", type=int, default=1, metavar="N", help="slurm: CPUs per task (default 1)")
    g.add_argument("--slurm-mem", default=None, metavar="SIZE", help="slurm: memory per task, e.g. 8G")
    g.add_argument(
        "--slurm-array-parallelism",
        type=int,
        default=256,
        metavar="N",
        help="slurm: at most N tasks of the array at once (default 256)",
    )
    g.add_argument(
        "--slurm-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="slurm: any other sbatch option, e.g. --slurm-extra account=proj --slurm-extra qos=low (repeatable)",
    )


def add_status_parser(sub: Any, add_common: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    """The `status` subcommand of the parser whose subcommands are `sub`; `add_common` adds --results etc."""
    p = sub.add_parser(
        "status",
        help="show which runs of a preset are done, running, pending or failed",
        description="Per configuration of a preset: how many runs are done, running, pending (queued in a SLURM "
        "job), failed or still to do, then the job id and log file of every running, pending or failed run.",
    )
    p.add_argument("preset", help="preset name (see `cdgrad list`)")
    add_common(p, True)
    p.add_argument("--max-seeds", type=int, default=None, metavar="N", help="count at most N seeds per configuration")
    p.add_argument("-q", "--quiet", action="store_true", help="only the table of counts")


def executor_options(args: argparse.Namespace) -> tuple[int, list[str] | None, object]:
    """(jobs, devices, slurm options) from the command line; ValueError naming a flag that does not fit."""
    from cdgrad.experiments.executors import SlurmOptions, parse_minutes

    if args.executor != "local" and (args.jobs is not None or args.devices is not None):
        raise ValueError("--jobs and --devices apply to --executor local only")
    slurm_flags = {k: v for k, v in vars(args).items() if k.startswith("slurm_")}
    defaults = {"slurm_time": "60", "slurm_cpus_per_task": 1, "slurm_array_parallelism": 256, "slurm_extra": []}
    if args.executor != "slurm" and any(v not in (None, defaults.get(k)) for k, v in slurm_flags.items()):
        raise ValueError("--slurm-* options apply to --executor slurm only")
    if args.executor != "slurm" and (args.wait or args.wait_timeout is not None):
        raise ValueError("--wait and --wait-timeout apply to --executor slurm only (the others always wait)")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if devices is not None:
        import torch

        for d in devices:
            try:
                torch.device(d)
            except RuntimeError:
                raise ValueError(f"--devices: {d!r} is not a device; accepted: cpu, cuda, cuda:N, mps") from None
    jobs = args.jobs if args.jobs is not None else (len(devices) if devices else os.cpu_count() or 1)
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    for flag, value in (("--slurm-cpus-per-task", args.slurm_cpus_per_task),
                        ("--slurm-array-parallelism", args.slurm_array_parallelism),
                        ("--slurm-gpus-per-task", args.slurm_gpus_per_task)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.wait_timeout is not None and not args.wait_timeout > 0:
        raise ValueError(f"--wait-timeout must be a positive number of seconds, got {args.wait_timeout}")
    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-extra must be KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        extra[key.strip().lstrip("-").replace("-", "_")] = value
    options = SlurmOptions(
        partition=args.slurm_partition,
        time_min=parse_minutes(args.slurm_time),
        gpus_per_task=args.slurm_gpus_per_task,
        cpus_per_task=args.slurm_cpus_per_task,
        mem=args.slurm_mem,
        array_parallelism=args.slurm_array_parallelism,
        extra=extra,
    )
    return jobs, devices, options


def run_with_executor(
    args: argparse.Namespace, runs: list[tuple[RunConfig, int]], store: ResultStore, report: Callable[[], None]
) -> int:
    """`cdgrad run --executor local|slurm`, then `report()` once the runs are finished: 0 when every run is
    finished, 1 when some failed or are lost."""
    from cdgrad.experiments.executors import check_slurm, run_local, submit_slurm, wait_for_jobs
    from cdgrad.experiments.runner import prepare

    jobs, devices, options = executor_options(args)
    from cdgrad.experiments.launch import init_from_env

    if "WORLD_SIZE" in os.environ or init_from_env() is not None:
        raise ValueError(f"--executor {args.executor} cannot run under torchrun; use the default --executor inline")
    if args.executor == "slurm":
        check_slurm()  # before anything is loaded or created
    prepare(runs, store, remove_orphans=args.executor == "local")  # jobs elsewhere may be writing temporaries
    if args.executor == "local":
        outcome = run_local(
            runs, store, jobs=jobs, devices=devices, progress=args.progress, retry_failed=args.retry_failed
        )
    else:
        keys = submit_slurm(runs, store, options, retry_failed=args.retry_failed)  # type: ignore[arg-type]
        if not args.wait:
            print(f"`cdgrad status {args.preset} --results {args.results}` shows their progress")
            return 0
        outcome = wait_for_jobs(keys, store, progress=args.progress, timeout_s=args.wait_timeout)
    report()
    return 1 if any(v not in ("completed", "diverged", "done") for v in outcome.values()) else 0


def run_states(runs: list[tuple[RunConfig, int]], store: ResultStore) -> dict[str, str]:
    """Each run's state for `--dry-run` (done, running, pending, failed, todo), asking the scheduler only about
    runs submitted to it."""
    from cdgrad.experiments.executors import queued_jobs
    from cdgrad.experiments.status import run_state

    done, failures, submitted = store.done_keys(), store.failures(), store.submissions()
    queued = queued_jobs() if submitted else {}
    keys = [run_key(c, s) for c, s in runs]
    return {k: run_state(k, done, failures, submitted, queued, store.root) for k in keys}


def cmd_status(args: argparse.Namespace, runs: list[tuple[RunConfig, int]]) -> int:
    """`cdgrad status PRESET` over the preset's `runs`."""
    from cdgrad.experiments.executors import queued_jobs
    from cdgrad.experiments.status import format_status, sweep_status

    if not runs:
        raise ValueError(f"--where {args.where} matches none of preset {args.preset!r}'s runs")
    store = ResultStore(args.results)
    queued = queued_jobs() if store.submissions() else {}
    if queued is None:
        print("cdgrad status: squeue did not answer; runs submitted to it are shown as todo", file=sys.stderr)
    print(format_status(sweep_status(runs, store, queued), verbose=not args.quiet))
    return 0
