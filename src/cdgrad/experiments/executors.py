"""Where the runs of a sweep train: `inline` (this process, `runner.run_all`), `local` (a pool of worker
processes on this machine) or `slurm` (one SLURM array task per run, submitted with submitit).

Every worker writes one record file per run (`cdgrad.experiments.records`); this process, the coordinator, reads
them into the index (`ResultStore.ingest`). The scheduler is asked only what is queued (`squeue`, with a time
limit): which runs are finished, failed or lost is decided by the record files, never by waiting on a job's
result (without SLURM accounting, submitit cannot tell a cancelled job from a running one). A run is submitted
again only when it has no finished record and is neither pending nor running in a live job, so repeating a
command, or two commands at once, never train a run twice.
"""

from __future__ import annotations

import getpass
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from cdgrad.experiments.config import RunConfig, from_dict, run_key, to_dict
from cdgrad.experiments.locks import coordinator_lock, holder
from cdgrad.experiments.progress import Progress
from cdgrad.experiments.runner import data_key, todo_runs
from cdgrad.experiments.store import ResultStore, Submission

__all__ = [
    "EXECUTORS",
    "SlurmOptions",
    "check_slurm",
    "parse_minutes",
    "queued_jobs",
    "run_local",
    "submit_slurm",
    "wait_for_jobs",
]

EXECUTORS = ("inline", "local", "slurm")
SCHEDULER_TIMEOUT_S = 60.0  # the longest any one call to the scheduler may take


# ------------------------------------------------------------------------------------------------ local pool
_SLOT: dict[str, Any] = {}  # in a worker process: its device and its data sets


def _init_worker(slots: Any, threads: int) -> None:
    import torch

    _SLOT["device"] = slots.get()
    _SLOT["data"] = {}
    if threads:
        torch.set_num_threads(threads)


def _run_in_worker(root: str, config: dict[str, Any], seed: int) -> tuple[str, str]:
    """In a worker: train one run with its output going to `<root>/logs/<key>.log`; returns (key, outcome)."""
    from cdgrad.experiments.setup import load_data
    from cdgrad.experiments.worker import execute, load_plugins

    load_plugins()
    run = from_dict(config)
    if _SLOT.get("device"):
        run = run.replace(device=_SLOT["device"])
    key = run_key(run, seed)
    path = os.path.join(root, "logs", f"{key}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    try:
        data = _SLOT.setdefault("data", {})
        if data_key(run) not in data:
            data[data_key(run)] = load_data(run)
        job = f"local:{socket.gethostname()}:{os.getpid()}"
        return key, execute(root, run, seed, job_id=job, log_path=path, dataset=data[data_key(run)])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved_fd in ((1, saved[0]), (2, saved[1])):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def run_local(
    runs: list[tuple[RunConfig, int]],
    store: ResultStore,
    *,
    jobs: int,
    devices: list[str] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    wait: bool = True,
    poll_s: float = 1.0,
    retry_failed: bool = False,
) -> dict[str, str]:
    """Train the unfinished runs in `jobs` worker processes, one run each at a time; returns {key: outcome}.

    Worker i trains on `devices[i % len(devices)]` (the configs' device otherwise) and, without devices, with
    cpu_count // jobs intra-op threads (for configs that leave `threads` at 0). A run that raises is recorded as
    failed (its log in `<results>/logs/<key>.log`) and the others go on. Runs another process on this machine
    is training are waited for (`wait`) or left to it.
    """
    todo, done, failed = todo_runs(runs, store, retry_failed)
    skipped = f", {len(failed)} failed before (rerun them with --retry-failed)" if failed else ""
    log(f"{len(runs)} runs, {len(done)} already complete{skipped}, {len(todo)} to train in {jobs} worker processes")
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Queue()
    for i in range(jobs):
        slots.put(devices[i % len(devices)] if devices else None)
    threads = 0 if devices else max(1, (os.cpu_count() or 1) // jobs)
    outcome: dict[str, str] = {}
    bar = Progress(len(todo), desc="runs", enabled=progress)
    by_key = {run_key(c, s): (c, s) for c, s in todo}
    busy: list[str] = []
    try:
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(slots, threads)) as pool:

            def submit(key: str) -> Any:
                config, seed = by_key[key]
                return pool.submit(_run_in_worker, store.root, to_dict(config), seed)

            futures = {submit(k): k for k in by_key}
            while futures or busy:
                finished, _ = wait_futures(list(futures), timeout=poll_s, return_when=FIRST_COMPLETED)
                for future in finished:
                    key, status = future.result()
                    del futures[future]
                    if status == "busy" and wait:
                        busy.append(key)
                        continue
                    outcome[key] = status
                    bar.update(info=f"{key} {status}")
                    if status == "failed":
                        log(f"run {key} failed; its log: {os.path.join(store.root, 'logs', key + '.log')}")
                for key in [k for k in busy if holder(store.root, k) is None]:
                    busy.remove(key)
                    futures[submit(key)] = key
                if busy and not futures:
                    time.sleep(poll_s)
    except BrokenProcessPool:
        raise RuntimeError(
            "a worker process died (out of memory, or killed); finished runs are recorded, run the same command "
            "again to resume the others from their checkpoints"
        ) from None
    finally:
        bar.close()
    store.ingest()
    left = [k for k, s in outcome.items() if s == "busy"]
    if left:
        log(f"{len(left)} runs are being trained by other processes: {', '.join(left)}")
    return outcome


# ----------------------------------------------------------------------------------------------------- SLURM
@dataclass(frozen=True)
class SlurmOptions:
    """The sbatch options of each array task (None: the cluster's default)."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_task: int | None = None
    cpus_per_task: int = 1
    mem: str | None = None
    array_parallelism: int = 256
    extra: dict[str, str] = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        """submitit AutoExecutor parameters."""
        params: dict[str, Any] = {
            "name": "cdgrad",
            "timeout_min": self.time_min,
            "nodes": 1,
            "tasks_per_node": 1,
            "cpus_per_task": self.cpus_per_task,
            "slurm_array_parallelism": self.array_parallelism,
        }
        for name, value in (
            ("slurm_partition", self.partition),
            ("slurm_gpus_per_task", self.gpus_per_task),
            ("slurm_mem", self.mem),
        ):
            if value is not None:
                params[name] = value
        if self.extra:
            params["slurm_additional_parameters"] = dict(self.extra)
        return params


def parse_minutes(text: str, name: str = "--slurm-time") -> int:
    """A SLURM time limit in minutes: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM" or "D-HH:MM:SS" (rounded up)."""
    try:
        days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
        parts = [int(p) for p in rest.split(":")]
        if int(days) < 0 or any(p < 0 for p in parts) or not 1 <= len(parts) <= 3:
            raise ValueError
        if "-" in text:  # D-HH[:MM[:SS]]
            seconds = sum(p * m for p, m in zip(parts, (3600, 60, 1), strict=False))
        else:  # MM, MM:SS, HH:MM:SS
            units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
            seconds = sum(p * m for p, m in zip(parts, units, strict=True))
        minutes = math.ceil((int(days) * 86400 + seconds) / 60)
    except ValueError:
        raise ValueError(
            f"{name} must be a SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; got {text!r}"
        ) from None
    if minutes < 1:
        raise ValueError(f"{name} must be at least one minute, got {text!r}")
    return minutes


def check_slurm() -> None:
    """ValueError saying what is missing when submitit or the SLURM commands are not available here."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError("--executor slurm needs submitit: pip install 'cdgrad[slurm]'") from None
    missing = [c for c in ("sbatch", "squeue") if shutil.which(c) is None]
    if missing:
        raise ValueError(
            f"--executor slurm needs the SLURM commands, and {' and '.join(missing)} is not on PATH; run cdgrad on a "
            "machine that submits to the cluster (a login node), or use --executor local"
        )


def queued_jobs(timeout_s: float = SCHEDULER_TIMEOUT_S) -> dict[str, str] | None:
    """{job id: state} of this user's pending, running or requeued jobs (array tasks one by one), from `squeue`;
    None if squeue failed or did not answer within `timeout_s` seconds."""
    user = getpass.getuser()
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--user", user, "--format", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return dict(line.strip().split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def submit_slurm(
    runs: list[tuple[RunConfig, int]],
    store: ResultStore,
    options: SlurmOptions,
    *,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Submit one array task per unfinished run that is not pending or running in a live job; returns the keys
    of every run this command waits for (the new tasks and the live ones). One coordinator submits at a time."""
    check_slurm()
    import submitit

    from cdgrad.experiments.worker import RunTask

    with coordinator_lock(store.root):
        todo, done, failed = todo_runs(runs, store, retry_failed)
        submitted = store.submissions()
        queued = queued_jobs()
        if queued is None and any(run_key(c, s) in submitted for c, s in todo):
            raise RuntimeError(
                "squeue did not answer, so it is unknown which submitted runs are still queued; nothing was "
                "submitted (run `cdgrad status` or this command again once the scheduler answers)"
            )
        live = {k for k, sub in submitted.items() if queued is not None and sub.job_id in queued}
        new = [(c, s) for c, s in todo if run_key(c, s) not in live]
        skipped = f", {len(failed)} failed before (rerun them with --retry-failed)" if failed else ""
        log(
            f"{len(runs)} runs, {len(done)} already complete{skipped}, {len(todo) - len(new)} queued in live jobs, "
            f"{len(new)} to submit (results: {store.path})"
        )
        if new:
            executor = submitit.AutoExecutor(folder=os.path.join(os.path.abspath(store.root), "jobs", "%j"))
            executor.update_parameters(**options.parameters())
            with executor.batch():
                jobs = [executor.submit(RunTask(store.root, to_dict(c), s)) for c, s in new]
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            store.record_submissions(
                Submission(run_key(c, s), str(job.job_id), "slurm", str(job.paths.stderr), now)
                for (c, s), job in zip(new, jobs, strict=True)
            )
            log(f"submitted {len(new)} array tasks of job {str(jobs[0].job_id).split('_')[0]}")
    return [run_key(c, s) for c, s in todo]


def wait_for_jobs(
    keys: list[str],
    store: ResultStore,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    scheduler_silence_s: float = 600.0,
) -> dict[str, str]:
    """Wait until every run of `keys` has a record or has left the queue without one; {key: outcome} with
    outcome "done" (completed or diverged), "failed" or "lost" (no record, no live job: cancelled or killed; the same
    command resubmits it and it resumes from its checkpoint). Stops early after `timeout_s` seconds, or when
    squeue has not answered for `scheduler_silence_s` seconds; runs still queued then are "queued"."""
    bar = Progress(len(keys), desc="runs", enabled=progress)
    start = last_answer = time.monotonic()
    outcome: dict[str, str] = {}
    shown = 0
    try:
        while True:
            queued = queued_jobs()  # first the queue, then the records: a job leaves the queue after its record
            finished, failed = store.done_keys(), store.failures()
            outcome = {k: "done" if k in finished else "failed" if k in failed else "queued" for k in keys}
            bar.update(sum(v != "queued" for v in outcome.values()) - shown)
            shown = sum(v != "queued" for v in outcome.values())
            if queued is not None:
                last_answer = time.monotonic()
                submitted = store.submissions()
                for k in keys:
                    if outcome[k] == "queued" and (k not in submitted or submitted[k].job_id not in queued):
                        outcome[k] = "lost"
            if "queued" not in outcome.values():
                break
            if time.monotonic() - last_answer > scheduler_silence_s:
                log(f"squeue has not answered for {scheduler_silence_s:.0f} s; stopped waiting")
                break
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                log(f"stopped waiting after {timeout_s:.0f} s; `cdgrad status` shows the runs still queued")
                break
            time.sleep(poll_s)
    finally:
        bar.close()
    lost = [k for k, v in outcome.items() if v == "lost"]
    if lost:
        log(f"{len(lost)} runs left the queue without a record (cancelled or killed); rerun to resume them")
    return outcome
