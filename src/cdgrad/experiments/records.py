"""One record file per run, the source of truth of a sweep: `<results>/runs/<key>.json`.

The process that trains a run (inline, a local worker, a SLURM task on any node) writes its record, and nothing
else: no two machines ever write one shared file. A record holds the run's key, seed, full config, library
version, environment, per-epoch curves, final metrics, wall time, finishing time and status ("completed",
"diverged", or "failed" with its error), and where it ran (`job_id`, `log_path`). It is published by a temporary
file, fsync and rename (`cdgrad._files.write_durably`), so a reader sees the previous record or the new one, never
a part. Writing is idempotent: a task executed twice, or rerun after a requeue, writes the same record again; a
failed attempt never replaces a finished record. `results.sqlite` is an index of these files
(`cdgrad.experiments.store`), and record folders of several clusters merge by copying the files into one folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from cdgrad._files import write_durably
from cdgrad.experiments.config import RunConfig, run_key, to_dict

__all__ = [
    "DONE",
    "RECORD_STATUSES",
    "failed_record",
    "finished_record",
    "iter_records",
    "read_record",
    "record_path",
    "records_dir",
    "write_record",
]

DONE = ("completed", "diverged")  # a run with one of these records is never trained again
RECORD_STATUSES = (*DONE, "failed")
_REQUIRED = ("key", "seed", "config", "status")


def records_dir(root: str) -> str:
    return os.path.join(root, "runs")


def record_path(root: str, key: str) -> str:
    return os.path.join(records_dir(root), f"{key}.json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def finished_record(
    config: RunConfig,
    seed: int,
    metrics: dict[str, Any],
    env: dict[str, Any],
    job_id: str | None = None,
    log_path: str | None = None,
) -> dict[str, Any]:
    """The record of a run `train` returned `metrics` for (status "completed" or "diverged")."""
    from cdgrad import __version__

    status = metrics.get("status", "completed")
    if status not in DONE:
        raise ValueError(f"metrics['status'] must be one of {', '.join(DONE)}, got {status!r}")
    return {
        "key": run_key(config, seed),
        "seed": seed,
        "config": to_dict(config),
        "version": __version__,
        "env": env,
        "curves": metrics["curves"],
        "final": metrics["final"],
        "wall_s": float(metrics["wall_s"]),
        "finished": _now(),
        "status": status,
        "job_id": job_id,
        "log_path": log_path,
        "error": None,
    }


def failed_record(
    config: RunConfig, seed: int, error: str, job_id: str | None = None, log_path: str | None = None
) -> dict[str, Any]:
    """The record of a run whose training raised `error` (one line: the exception's type and message)."""
    from cdgrad import __version__

    return {
        "key": run_key(config, seed),
        "seed": seed,
        "config": to_dict(config),
        "version": __version__,
        "finished": _now(),
        "status": "failed",
        "job_id": job_id,
        "log_path": log_path,
        "error": error,
    }


def read_record(path: str) -> dict[str, Any]:
    """The record at `path`; ValueError naming the file if it is not a record (OSError if it cannot be read)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"run record {path} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or any(k not in record for k in _REQUIRED):
        raise ValueError(f"run record {path} lacks one of {', '.join(_REQUIRED)}")
    if record["status"] not in RECORD_STATUSES:
        raise ValueError(f"run record {path} has status {record['status']!r}, not one of {', '.join(RECORD_STATUSES)}")
    return record


def write_record(root: str, record: dict[str, Any]) -> bool:
    """Publish `record` at `record_path(root, record["key"])`; returns False (writing nothing) when it is a failure
    and a finished record of the run is already there."""
    path = record_path(root, record["key"])
    if record["status"] == "failed" and os.path.exists(path):
        try:
            if read_record(path)["status"] in DONE:
                return False
        except (OSError, ValueError):
            pass  # an unreadable record is replaced
    os.makedirs(records_dir(root), exist_ok=True)
    text = json.dumps(record, sort_keys=True, indent=1)
    write_durably(path, lambda fh: fh.write(text.encode()))
    return True


def iter_records(root: str, names: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
    """(path, record or None, problem) for every `*.json` in the records folder (or the files `names` in it), in
    name order; a file that cannot be read or is not a record gives None and the reason."""
    folder = records_dir(root)
    if names is None:
        try:
            names = [n for n in os.listdir(folder) if n.endswith(".json")]
        except OSError:
            return
    for name in sorted(names):
        path = os.path.join(folder, name)
        try:
            record = read_record(path)
        except (OSError, ValueError) as exc:
            yield path, None, str(exc)
            continue
        if record["key"] != name[: -len(".json")]:
            yield path, None, f"run record {path} holds run {record['key']!r}, not the run its name says"
            continue
        yield path, record, ""
