"""One run, trained where it is sent (a local worker process, a SLURM task): train, write the record, tidy up.

`execute(root, config, seed)` trains one run of results folder `root` unless its record says it is finished,
resuming from the run's own checkpoint `<root>/checkpoints/<key>.pt` (so a task killed, cancelled, preempted or
requeued goes on from its last epoch when it runs again), and writes the run's record
(`cdgrad.experiments.records`). A run that raises gets a "failed" record with the error and the log path. It
holds the run's lock (`cdgrad.experiments.locks`) while training, so two executions on one machine never train
one run at once; executions on several machines write the same record, which is harmless. `RunTask` is the
picklable, submitit-checkpointable form a scheduler runs.

Worker processes import the modules named in the environment variable `CDGRAD_PLUGINS` (comma-separated,
`module` or `module:function`, the function called with no arguments) before anything else, so data sets and
models a user registers in such a module exist in every worker.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

from cdgrad.experiments.config import RunConfig, from_dict, run_key
from cdgrad.experiments.locks import RunLock
from cdgrad.experiments.records import DONE, failed_record, finished_record, read_record, record_path, write_record

__all__ = ["PLUGINS_ENV", "RunTask", "execute", "load_plugins"]

PLUGINS_ENV = "CDGRAD_PLUGINS"


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the modules of `spec` (default: `$CDGRAD_PLUGINS`), calling `module:function` entries; returns them."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    loaded = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        module_name, _, function = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
            if function:
                getattr(module, function)()
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{PLUGINS_ENV} entry {entry!r} cannot be loaded ({type(exc).__name__}: {exc})") from None
        loaded.append(entry)
    return loaded


def _finished(root: str, key: str) -> bool:
    try:
        return read_record(record_path(root, key))["status"] in DONE
    except (OSError, ValueError):
        return False


def execute(
    root: str,
    config: RunConfig | dict[str, Any],
    seed: int,
    *,
    job_id: str | None = None,
    log_path: str | None = None,
    raise_errors: bool = False,
    dataset: Any = None,
) -> str:
    """Train run (`config`, `seed`) of results folder `root` and write its record; returns what happened:
    "completed" or "diverged" (trained now), "done" (finished before), "busy" (another process on this machine is
    training it) or "failed" (recorded as failed; with `raise_errors` the error is raised after recording it).
    `dataset` (`load_data(config)`) saves reading the files again."""
    from cdgrad.experiments.environment import environment
    from cdgrad.experiments.setup import load_data
    from cdgrad.experiments.store import finish_checkpoint
    from cdgrad.experiments.train import train

    load_plugins()
    config = from_dict(config) if isinstance(config, dict) else config
    key = run_key(config, seed)
    checkpoint = os.path.join(root, "checkpoints", f"{key}.pt")
    model = os.path.join(root, "models", f"{key}.pt")
    if _finished(root, key):
        return "done"
    lock = RunLock(root, key)
    try:
        if not lock.acquire():
            return "busy"
    except OSError as exc:  # no working locks on this filesystem: the record files alone keep runs apart
        print(f"cdgrad: run {key} trains without its lock ({exc})", file=sys.stderr)
    try:
        if _finished(root, key):  # finished by another execution while this one waited to start
            finish_checkpoint(checkpoint, model, config.save_model)
            return "done"
        try:
            os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
            data = dataset if dataset is not None else load_data(config)
            metrics = train(config, seed, dataset=data, checkpoint=checkpoint, progress=False)
            record = finished_record(config, seed, metrics, environment(config), job_id, log_path)
        except Exception as exc:
            traceback.print_exc()
            write_record(root, failed_record(config, seed, f"{type(exc).__name__}: {exc}", job_id, log_path))
            if raise_errors:
                raise
            return "failed"
        write_record(root, record)
        finish_checkpoint(checkpoint, model, config.save_model and record["status"] == "completed")
        return str(record["status"])
    finally:
        lock.release()


class RunTask:
    """One run as a scheduler task: `task()` trains it (raising, after recording, if it fails); submitit calls
    `checkpoint()` on preemption or timeout and requeues the same task, which resumes from the run's checkpoint."""

    def __init__(self, root: str, config: dict[str, Any], seed: int):
        self.root, self.config, self.seed = os.path.abspath(root), config, seed

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        return execute(
            self.root, self.config, self.seed, job_id=env.job_id, log_path=str(env.paths.stderr), raise_errors=True
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue this very task: the run's own checkpoint (written after every epoch) holds its progress."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)
