"""The results index: one SQLite file (`<results>/results.sqlite`) over the per-run record files.

The record files `<results>/runs/<key>.json` (`cdgrad.experiments.records`) are the source of truth: whoever
trains a run writes its record, on any machine. `results.sqlite` indexes them for queries and is written only by
the coordinating process (`cdgrad run`, `report`, `status`), which `ingest`s new or changed records: a finished
record becomes a row of `runs` (key, seed, full config as JSON, library version, environment, per-epoch curves,
final metrics, wall time, status "completed" or "diverged"), a failed one a row of `failures` (error, job id, log
path). `submissions` remembers which scheduler job each run was last handed to. A run that crashes leaves no
record and is never counted as done; checkpoints of unfinished runs live in `<results>/checkpoints/` and are
removed once the record is written (kept as `<results>/models/<key>.pt` for completed runs with `save_model`).

Stores written by earlier versions (no record files, a `claims` table) migrate when first opened for writing:
their rows are written out as records and the claims table is dropped. Several processes on one machine share a
sweep through run locks (`cdgrad.experiments.locks`), not through this file.

A store that cannot be used raises `StoreError` naming the cause: a full disk, a corrupt file, or a folder that
cannot be written. A row that cannot be used (invalid JSON, a config this version does not know, a `final` without
its task's reported metrics as numbers, finite for a completed run) is skipped and named. A run's environment holds
the `segments` of epochs with the kernel path and thread count each ran on (a resumed run may have several).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from cdgrad._files import replace_durably
from cdgrad.experiments.checkpoint import remove_orphans
from cdgrad.experiments.config import RunConfig, from_dict, run_key
from cdgrad.experiments.environment import environment, git_revision, kernel_path, source_revision
from cdgrad.experiments.records import DONE, finished_record, iter_records, record_path, records_dir, write_record
from cdgrad.experiments.store_errors import StoreError, final_problem, named_causes, store_error

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    version TEXT NOT NULL,
    env TEXT NOT NULL,
    curves TEXT NOT NULL,
    final TEXT NOT NULL,
    wall_s REAL NOT NULL,
    finished TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'completed'
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    error TEXT NOT NULL,
    job_id TEXT,
    log_path TEXT,
    finished TEXT NOT NULL,
    stamp TEXT
);
CREATE TABLE IF NOT EXISTS submissions (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    executor TEXT NOT NULL,
    log_path TEXT,
    submitted TEXT NOT NULL
);
DROP TABLE IF EXISTS claims;
"""
COLUMNS = ("key", "seed", "config", "version", "env", "curves", "final", "wall_s", "finished", "status")
_ADDED = {"status": "TEXT NOT NULL DEFAULT 'completed'", "job_id": "TEXT", "log_path": "TEXT", "stamp": "TEXT"}
STATUSES = DONE


@dataclass(frozen=True)
class Run:
    """One finished run as read back from the store; `status` is "completed" or "diverged"."""

    key: str
    seed: int
    config: RunConfig
    version: str
    env: dict[str, Any]
    curves: dict[str, list[Any]]
    final: dict[str, float]
    wall_s: float
    finished: str
    status: str = "completed"


@dataclass(frozen=True)
class Failure:
    """A run whose last attempt raised: its error (type and message), scheduler job id and log file."""

    key: str
    seed: int
    config: dict[str, Any]
    error: str
    job_id: str | None
    log_path: str | None
    finished: str


@dataclass(frozen=True)
class Submission:
    """The scheduler job a run was last handed to (`executor` "slurm"), with its log file."""

    key: str
    job_id: str
    executor: str
    log_path: str | None
    submitted: str


def _stamp(path: str) -> str:
    """What tells one version of a record file from the next: its modification time (ns) and size."""
    st = os.stat(path)
    return f"{st.st_mtime_ns}:{st.st_size}"


class ResultStore:
    """The index `<root>/results.sqlite` over the record files `<root>/runs/*.json`; `check_writable` fails early
    on an unusable folder (and migrates a store written by an earlier version)."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, "results.sqlite")
        self.bad_rows: list[str] = []  # keys of the rows the last `runs()` could not read
        self._unindexed: dict[str, dict[str, Any]] = {}  # records read while the index could not be written

    # -- setup
    def check_writable(self) -> None:
        """Create the folder and index if needed (migrating an old store); raise `StoreError` (a ValueError) naming
        the cause if either cannot be written: a full disk, a corrupt store, or any other failure (not writable)."""
        try:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            probe = os.path.join(self.checkpoint_dir, f".probe{os.getpid()}")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
            with closing(self._connect()) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            self.migrate()
        except (OSError, sqlite3.Error) as exc:
            named = store_error(exc, self.root, self.path, default="not writable")
            assert named is not None  # a default cause always names one
            raise named from None

    @named_causes
    def remove_orphans(self) -> list[str]:
        """Delete temporary files left by killed writers of this machine in the checkpoint, model and record
        folders (never call it while jobs on other machines may be writing there)."""
        return [p for d in (self.checkpoint_dir, os.path.join(self.root, "models"), records_dir(self.root))
                for p in remove_orphans(d)]  # fmt: skip

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.root, "checkpoints")

    def checkpoint_path(self, key: str) -> str:
        return os.path.join(self.checkpoint_dir, f"{key}.pt")

    def model_path(self, key: str) -> str:
        """Where the final checkpoint of a run with `save_model` is kept (`{"model": state_dict, ...}`)."""
        return os.path.join(self.root, "models", f"{key}.pt")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE) committed when the block ends, rolled back if it raises."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        """A connection with the current schema; an old store gains the new tables and columns (if writable)."""
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for name, kind in _ADDED.items():
                if name not in columns:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        except sqlite3.OperationalError:
            if not self._readable_only(conn):
                conn.close()
                raise
        return conn

    @staticmethod
    def _readable_only(conn: sqlite3.Connection) -> bool:
        """True if `conn` can read the runs table (the schema update failed because the store is read-only)."""
        try:
            conn.execute("SELECT key FROM runs LIMIT 1")
        except sqlite3.Error:
            return False
        return True

    @named_causes
    def migrate(self) -> int:
        """Write a record file for every row of an earlier version's store that has none; returns how many."""
        if not os.path.exists(self.path):
            return 0
        written = 0
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE stamp IS NULL").fetchall()
            for r in rows:
                try:
                    config = from_dict(json.loads(r[2]))
                    metrics = {"curves": json.loads(r[5]), "final": json.loads(r[6]), "wall_s": r[7], "status": r[9]}
                    record = {**finished_record(config, int(r[1]), metrics, json.loads(r[4])), "version": r[3]}
                except (ValueError, TypeError, KeyError):
                    continue  # an unreadable row stays in the index only; `runs` names it
                record["key"], record["finished"] = r[0], r[8]
                if not os.path.exists(record_path(self.root, r[0])):
                    write_record(self.root, record)
                    written += 1
                conn.execute("UPDATE runs SET stamp = ? WHERE key = ?", (_stamp(record_path(self.root, r[0])), r[0]))
        return written

    # -- ingesting record files (the coordinating process only)
    @named_causes
    def ingest(self) -> int:
        """Bring new and changed record files into the index; returns how many. Where the index cannot be written
        (a read-only folder), the records are kept in memory for this object's queries instead."""
        try:
            names = [n for n in os.listdir(records_dir(self.root)) if n.endswith(".json")]
        except OSError:
            return 0
        known: dict[str, str | None] = {}
        if os.path.exists(self.path):
            with closing(self._connect()) as conn:
                for table in ("runs", "failures"):
                    with suppress(sqlite3.OperationalError):  # an old read-only store without the table or column
                        known.update(conn.execute(f"SELECT key, stamp FROM {table}").fetchall())
        changed = []
        for path, record, problem in iter_records(self.root, [n for n in names if self._changed(n, known)]):
            if record is None:
                print(f"cdgrad: results folder {self.root}: skipping {problem}", file=sys.stderr)
            else:
                changed.append((record, _stamp(path)))
        if not changed:
            return 0
        try:
            with self._transaction() as conn:
                for record, stamp in changed:
                    self._index(conn, record, stamp)
        except (sqlite3.OperationalError, OSError) as exc:
            if "readonly" not in str(exc) and "read-only" not in str(exc) and os.access(self.root, os.W_OK):
                raise  # a failure other than a read-only folder: the records stay and the next look indexes them
            self._unindexed.update((record["key"], record) for record, _ in changed)
        return len(changed)

    def _changed(self, name: str, known: dict[str, str | None]) -> bool:
        try:
            return known.get(name[: -len(".json")]) != _stamp(os.path.join(records_dir(self.root), name))
        except OSError:
            return False

    @staticmethod
    def _index(conn: sqlite3.Connection, record: dict[str, Any], stamp: str) -> None:
        key, config = record["key"], json.dumps(record["config"], sort_keys=True)
        if record["status"] in DONE:
            values = (key, record["seed"], config, record.get("version", ""), json.dumps(record.get("env", {}),
                      sort_keys=True), json.dumps(record.get("curves", {})), json.dumps(record.get("final", {})),
                      float(record.get("wall_s", 0.0)), record.get("finished", ""), record["status"],
                      record.get("job_id"), record.get("log_path"), stamp)  # fmt: skip
            names = ", ".join((*COLUMNS, "job_id", "log_path", "stamp"))
            conn.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({', '.join('?' * len(values))})", values)
            conn.execute("DELETE FROM failures WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO failures (key, seed, config, error, job_id, log_path, finished, stamp) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, record["seed"], config, str(record.get("error")), record.get("job_id"), record.get("log_path"),
                 record.get("finished", ""), stamp),
            )  # fmt: skip
            conn.execute("DELETE FROM runs WHERE key = ?", (key,))

    # -- queries (each ingests the records first)
    @named_causes
    def done_keys(self) -> set[str]:
        """Keys of every finished run, completed or diverged."""
        self.ingest()
        keys = {k for k, r in self._unindexed.items() if r["status"] in DONE}
        if not os.path.exists(self.path):
            return keys
        with closing(self._connect()) as conn:
            return keys | {row[0] for row in conn.execute("SELECT key FROM runs")}

    @named_causes
    def is_done(self, config: RunConfig, seed: int) -> bool:
        return run_key(config, seed) in self.done_keys()

    @named_causes
    def runs(self, keys: Iterable[str] | None = None, warn: bool = True) -> list[Run]:
        """Finished runs, all of them or those with the given keys (in that order, missing ones skipped).

        A row that cannot be read (invalid JSON, a config this version does not know) is skipped, named on
        stderr (with `warn`) and listed in `bad_rows`.
        """
        self.ingest()
        self.bad_rows = []
        rows: list[Sequence[Any]] = []
        if os.path.exists(self.path):
            with closing(self._connect()) as conn:
                columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
                select = ", ".join(c if c in columns else f"'completed' AS {c}" for c in COLUMNS)
                rows = conn.execute(f"SELECT {select} FROM runs ORDER BY finished").fetchall()
        for rec in self._unindexed.values():
            if rec["status"] in DONE:
                rows.append([rec["key"], rec["seed"], json.dumps(rec["config"]), rec.get("version", ""),
                             *(json.dumps(rec.get(k, {})) for k in ("env", "curves", "final")),
                             rec.get("wall_s", 0.0), rec.get("finished", ""), rec["status"]])  # fmt: skip
        by_key: dict[str, Run] = {}
        for r in rows:
            try:
                env, curves, final = (json.loads(x) for x in r[4:7])
                config = from_dict(json.loads(r[2]))
                run = Run(r[0], int(r[1]), config, r[3], env, curves, final, float(r[7]), r[8], r[9])
                if not isinstance(run.env, dict) or not isinstance(run.curves, dict) or not isinstance(run.final, dict):
                    raise ValueError("env, curves and final must be JSON objects")
                problem = final_problem(run.config, run.status, run.final)
                if problem is not None:
                    raise ValueError(problem)
            except (ValueError, TypeError, KeyError) as exc:
                self.bad_rows.append(str(r[0]))
                if warn:
                    print(
                        f"cdgrad: results store {self.path}: skipping unreadable run {r[0]!r} ({exc})", file=sys.stderr
                    )
                continue
            by_key[run.key] = run
        if keys is None:
            return list(by_key.values())
        return [by_key[k] for k in keys if k in by_key]

    @named_causes
    def failures(self) -> dict[str, Failure]:
        """Runs whose last attempt failed, by key."""
        self.ingest()
        out = {
            k: Failure(k, r["seed"], r["config"], str(r["error"]), r.get("job_id"), r.get("log_path"), r["finished"])
            for k, r in self._unindexed.items()
            if r["status"] == "failed"
        }
        if os.path.exists(self.path):
            with closing(self._connect()) as conn:
                try:
                    rows = conn.execute("SELECT key, seed, config, error, job_id, log_path, finished FROM failures")
                    out.update((r[0], Failure(r[0], r[1], json.loads(r[2]), *r[3:])) for r in rows.fetchall())
                except sqlite3.OperationalError:
                    pass
        return out

    @named_causes
    def submissions(self) -> dict[str, Submission]:
        """The scheduler job each run was last handed to, by key."""
        if not os.path.exists(self.path):
            return {}
        with closing(self._connect()) as conn:
            try:
                rows = conn.execute("SELECT key, job_id, executor, log_path, submitted FROM submissions").fetchall()
            except sqlite3.OperationalError:
                return {}
        return {r[0]: Submission(*r) for r in rows}

    # -- writing
    @named_causes
    def record_submissions(self, submissions: Iterable[Submission]) -> None:
        """Remember the jobs runs were handed to (replacing earlier ones of the same runs)."""
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO submissions (key, job_id, executor, log_path, submitted) "
                "VALUES (?, ?, ?, ?, ?)",
                [(s.key, s.job_id, s.executor, s.log_path, s.submitted) for s in submissions],
            )

    @named_causes
    def save(
        self,
        config: RunConfig,
        seed: int,
        metrics: dict[str, Any],
        env: dict[str, Any] | None = None,
        job_id: str | None = None,
        log_path: str | None = None,
    ) -> str:
        """Record a finished run: its record file, then its index row, then its checkpoint is removed (or, with
        `config.save_model` and a completed run, kept as `model_path(key)`); returns the run key."""
        env = env or environment(config)
        if "segments" in metrics:  # the kernel path and threads of each stretch of epochs (a resumed run)
            env = {**env, "segments": metrics["segments"]}
        record = finished_record(config, seed, metrics, env, job_id, log_path)
        write_record(self.root, record)
        self.ingest()
        self.finish_checkpoint(config, record["key"], keep=config.save_model and record["status"] == "completed")
        return str(record["key"])

    @named_causes
    def finish_checkpoint(self, config: RunConfig, key: str, keep: bool | None = None) -> None:
        """The checkpoint of the stored run `key`: moved to `model_path(key)` if `keep` (default: the config's
        `save_model`), removed otherwise. Also finishes what a process killed right after storing left behind."""
        finish_checkpoint(self.checkpoint_path(key), self.model_path(key), config.save_model if keep is None else keep)


def finish_checkpoint(checkpoint: str, model: str, keep: bool) -> None:
    """Move a finished run's `checkpoint` to `model` if `keep`, else remove it (nothing if there is none)."""
    if not os.path.exists(checkpoint):
        return
    if keep:
        os.makedirs(os.path.dirname(model), exist_ok=True)
        replace_durably(checkpoint, model)
    else:
        with suppress(FileNotFoundError):  # removed meanwhile by another execution of the same run
            os.remove(checkpoint)


__all__ = [
    "STATUSES",
    "Failure",
    "ResultStore",
    "Run",
    "StoreError",
    "Submission",
    "final_problem",
    "environment",
    "finish_checkpoint",
    "git_revision",
    "kernel_path",
    "source_revision",
]
