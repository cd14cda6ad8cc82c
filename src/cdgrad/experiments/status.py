"""`cdgrad status PRESET`: where every run of a sweep stands, per configuration.

A run is "done" (finished record: completed or diverged), "failed" (failed record), "running" or "pending" (its
SLURM job is in the queue in that state, or a process on this machine holds its lock: running), or "todo"
(never started, or its job left the queue without a record: the next `cdgrad run` submits it again and it resumes
from its checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cdgrad.experiments.config import RunConfig, config_hash, run_key
from cdgrad.experiments.locks import holder
from cdgrad.experiments.methods import describe
from cdgrad.experiments.store import Failure, ResultStore, Submission

__all__ = ["STATES", "ConfigStatus", "format_status", "sweep_status"]

STATES = ("done", "running", "pending", "failed", "todo")
_RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING")


@dataclass
class ConfigStatus:
    """The runs of one configuration by state, with the job id and log file of each run that has them."""

    label: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    jobs: list[tuple[str, int, str, str, str]] = field(default_factory=list)  # (state, seed, job id, log, error)


def run_state(
    key: str,
    done: set[str],
    failures: dict[str, Failure],
    submitted: dict[str, Submission],
    queued: dict[str, str] | None,
    root: str,
) -> str:
    """The state of run `key` (see the module docstring)."""
    if key in done:
        return "done"
    if key in failures:
        return "failed"
    submission = submitted.get(key)
    if submission is not None and queued is not None and submission.job_id in queued:
        return "running" if queued[submission.job_id] in _RUNNING else "pending"
    return "running" if holder(root, key) is not None else "todo"


def sweep_status(
    runs: list[tuple[RunConfig, int]], store: ResultStore, queued: dict[str, str] | None
) -> list[ConfigStatus]:
    """One `ConfigStatus` per configuration of `runs`, in their order; `queued` is `executors.queued_jobs()`."""
    done, failures, submitted = store.done_keys(), store.failures(), store.submissions()
    out: dict[str, ConfigStatus] = {}
    for config, seed in runs:
        key = run_key(config, seed)
        row = out.setdefault(config_hash(config), ConfigStatus(f"{config.dataset} {config.model} {describe(config)}"))
        state = run_state(key, done, failures, submitted, queued, store.root)
        row.counts[state] += 1
        if state == "failed":
            failure = failures[key]
            row.jobs.append((state, seed, failure.job_id or "-", failure.log_path or "-", failure.error))
        elif state in ("running", "pending") and key in submitted:
            sub = submitted[key]
            row.jobs.append((state, seed, sub.job_id, sub.log_path or "-", ""))
    return list(out.values())


def format_status(rows: list[ConfigStatus], verbose: bool = True) -> str:
    """A Markdown table of counts per configuration, then (with `verbose`) one line per running, pending or failed
    run with its job id, log file and error."""
    lines = ["| configuration | " + " | ".join(STATES) + " |", "|---|" + "---:|" * len(STATES)]
    for row in rows:
        lines.append(f"| {row.label} | " + " | ".join(str(row.counts[s]) for s in STATES) + " |")
    totals = {s: sum(r.counts[s] for r in rows) for s in STATES}
    lines.append("| all | " + " | ".join(str(totals[s]) for s in STATES) + " |")
    if verbose:
        for row in rows:
            for state, seed, job, log, error in row.jobs:
                tail = f": {error}" if error else ""
                lines.append(f"{state:8s} {row.label} seed {seed}: job {job}, log {log}{tail}")
    return "\n".join(lines)
