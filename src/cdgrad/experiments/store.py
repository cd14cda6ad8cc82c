"""The results store: one SQLite file (`<results>/results.sqlite`), one row per finished run.

A row holds the run's key (`config.run_key`), seed, full config (JSON), library version, environment
(torch, python, platform, thread count, kernel path, device, git commit of the source, and the `segments` of
epochs with the kernel path and thread count each ran on), per-epoch curves and its
status: "completed", or "diverged" when its training loss became non-finite. It is written in a single
transaction after the run has finished, so a run that crashes is never counted as done; checkpoints of
unfinished runs live in `<results>/checkpoints/` and are removed once the row is committed (kept as
`<results>/models/<key>.pt` for completed runs with `save_model`).

Several processes may run one sweep on one store: a process trains a run only after claiming it in the
`claims` table (key, owner pid, host and start time, heartbeat time). A claim is taken over when its owner is
no longer running on this host (its process id gone, or now another process's) or its heartbeat is older than
`claim_timeout_s`; the owner refreshes the heartbeat after every epoch and releases the claim in the transaction
that stores the run.

A store that cannot be used raises `StoreError` naming the cause: a full disk, a corrupt file, or a folder that
cannot be written. A row that cannot be used (invalid JSON, a config this version does not know, a `final` without
its task's reported metrics as numbers, finite for a completed run) is skipped and named.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdgrad._files import replace_durably
from cdgrad.experiments.checkpoint import remove_orphans
from cdgrad.experiments.config import RunConfig, from_dict, run_key, to_dict
from cdgrad.experiments.store_errors import STATUSES, StoreError, final_problem, named_causes, store_error

__all__ = [
    "CLAIM_TIMEOUT_S",
    "COLUMNS",
    "SCHEMA",
    "STATUSES",
    "Claim",
    "ResultStore",
    "Run",
    "StoreError",
    "environment",
    "final_problem",
    "git_revision",
    "kernel_path",
    "process_start",
    "source_revision",
]

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
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    started TEXT NOT NULL DEFAULT ''
);
"""
COLUMNS = ("key", "seed", "config", "version", "env", "curves", "final", "wall_s", "finished", "status")
_CLAIM_COLUMNS = "key, pid, host, heartbeat, started"
CLAIM_TIMEOUT_S = 6 * 3600.0  # a claim whose owner has not reported for this long is taken over


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
class Claim:
    """A run being trained by process `pid` on `host`, which last reported at `heartbeat` (seconds since epoch);
    `started` tells that process from a later one given the same id ('' where unknown)."""

    key: str
    pid: int
    host: str
    heartbeat: float
    started: str = ""


@functools.lru_cache(maxsize=1)
def source_revision() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout the `cdgrad` package runs from; (None, None) outside a checkout.

    Read once per process (the code a process runs is the code it imported).
    """
    import cdgrad

    return git_revision(Path(cdgrad.__file__).resolve().parent)


def git_revision(package: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git checkout that tracks `package/__init__.py`; (None, None) if none does.

    `dirty` counts tracked and untracked (not ignored) changes anywhere in the checkout.
    """

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", "__init__.py")  # the package itself is part of the checkout
    if tracked is None or tracked.returncode != 0:
        return None, None
    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    if head is None or status is None or head.returncode != 0 or status.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def kernel_path(device: str) -> str:
    """ "native" when the compiled CPU kernel is available and the run is on the CPU, else "reference"."""
    from cdgrad.functional import plain_route

    return plain_route(device)


def environment(config: RunConfig | None = None) -> dict[str, Any]:
    """What the numbers may depend on besides the config: versions, platform, threads, kernel path, device, commit.

    `threads` is the intra-op thread count the run trains with (`config.threads`, or torch's when that is 0);
    `kernel` is the path the channel-directed transforms take; the two change results at round-off.
    """
    import numpy

    device = config.device if config is not None else "cpu"
    commit, dirty = source_revision()
    env = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": (config.threads if config is not None else 0) or torch.get_num_threads(),
        "kernel": kernel_path(device),
        "device": device,
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def _with_segments(env: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """`env` with the run's `segments` (the kernel path and threads of each stretch of epochs) when `metrics` has
    them: a run resumed with other settings records every one, not only the last."""
    return {**env, "segments": metrics["segments"]} if "segments" in metrics else env


def process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc); '' where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(claim: Claim) -> bool:
    """Whether the process holding `claim` may still be running (always True on another host)."""
    from cdgrad.experiments.checkpoint import _alive

    if claim.host != socket.gethostname():
        return True
    if not _alive(claim.pid):
        return False
    return not claim.started or process_start(claim.pid) in ("", claim.started)  # not a reused process id


class ResultStore:
    """Finished runs in `<root>/results.sqlite`; `check_writable` fails early on an unusable folder."""

    def __init__(self, root: str, claim_timeout_s: float = CLAIM_TIMEOUT_S):
        self.root = root
        self.path = os.path.join(root, "results.sqlite")
        self.claim_timeout_s = claim_timeout_s
        self.bad_rows: list[str] = []  # keys of the rows the last `runs()` could not read

    # -- setup
    def check_writable(self) -> None:
        """Create the folder and database if needed; raise `StoreError` (a ValueError) naming the cause if either
        cannot be written: a full disk, a corrupt store, or (any other failure) a folder that is not writable."""
        try:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            probe = os.path.join(self.checkpoint_dir, f".probe{os.getpid()}")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
            with closing(self._connect()) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
        except (OSError, sqlite3.Error) as exc:
            named = store_error(exc, self.root, self.path, default="not writable")
            assert named is not None  # a default cause always names one
            raise named from None

    @named_causes
    def remove_orphans(self) -> list[str]:
        """Delete temporary files left by killed writers in the checkpoint and model folders."""
        return remove_orphans(self.checkpoint_dir) + remove_orphans(os.path.join(self.root, "models"))

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
        """A connection with the current schema; an old store gains the `status` column (if it can be written)."""
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            if "status" not in columns:
                conn.execute("ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'completed'")
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

    # -- queries
    @named_causes
    def done_keys(self) -> set[str]:
        """Keys of every stored run, completed or diverged."""
        if not os.path.exists(self.path):
            return set()
        with closing(self._connect()) as conn:
            return {row[0] for row in conn.execute("SELECT key FROM runs")}

    def is_done(self, config: RunConfig, seed: int) -> bool:
        return run_key(config, seed) in self.done_keys()

    @named_causes
    def runs(self, keys: Iterable[str] | None = None, warn: bool = True) -> list[Run]:
        """Stored runs, all of them or those with the given keys (in that order, missing ones skipped).

        A row that cannot be read or reported (invalid JSON, a config this version does not know, a `final` that
        `final_problem` refuses) is skipped, named on stderr (with `warn`) and listed in `bad_rows`.
        """
        self.bad_rows = []
        if not os.path.exists(self.path):
            return []
        with closing(self._connect()) as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            select = ", ".join(c if c in columns else f"'completed' AS {c}" for c in COLUMNS)
            rows = conn.execute(f"SELECT {select} FROM runs ORDER BY finished").fetchall()
        by_key: dict[str, Run] = {}
        for r in rows:
            try:
                run = Run(
                    r[0],
                    int(r[1]),
                    from_dict(json.loads(r[2])),
                    r[3],
                    json.loads(r[4]),
                    json.loads(r[5]),
                    json.loads(r[6]),
                    float(r[7]),
                    r[8],
                    r[9],
                )
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

    # -- writing
    @named_causes
    def save(self, config: RunConfig, seed: int, metrics: dict[str, Any], env: dict[str, Any] | None = None) -> str:
        """Record a finished run (and release its claim) in one transaction, then remove its checkpoint (or, with
        `config.save_model` and a completed run, keep it as `model_path(key)`); returns the run key."""
        from cdgrad import __version__

        status = metrics.get("status", "completed")
        if status not in STATUSES:
            raise ValueError(f"metrics['status'] must be one of {', '.join(STATUSES)}, got {status!r}")
        key = run_key(config, seed)
        row = (
            key,
            seed,
            json.dumps(to_dict(config), sort_keys=True),
            __version__,
            json.dumps(_with_segments(env or environment(config), metrics), sort_keys=True),
            json.dumps(metrics["curves"]),
            json.dumps(metrics["final"]),
            float(metrics["wall_s"]),
            time.strftime("%Y-%m-%dT%H:%M:%S"),
            status,
        )
        os.makedirs(self.root, exist_ok=True)
        with self._transaction() as conn:
            conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 10)})", row)
            conn.execute("DELETE FROM claims WHERE key = ?", (key,))
        self.finish_checkpoint(config, key, keep=config.save_model and status == "completed")
        return key

    @named_causes
    def finish_checkpoint(self, config: RunConfig, key: str, keep: bool | None = None) -> None:
        """The checkpoint of the stored run `key`: moved to `model_path(key)` if `keep` (default: the config's
        `save_model`), removed otherwise. Also finishes what a process killed right after storing left behind."""
        ckpt = self.checkpoint_path(key)
        if not os.path.exists(ckpt):
            return
        if config.save_model if keep is None else keep:
            os.makedirs(os.path.dirname(self.model_path(key)), exist_ok=True)
            replace_durably(ckpt, self.model_path(key))
        else:
            os.remove(ckpt)

    # -- claims (several processes on one sweep)
    @property
    def owner(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def _stale(self, claim: Claim, now: float) -> bool:
        if (claim.pid, claim.host) == self.owner:
            return True  # our own (e.g. left by an earlier run of this process)
        return not _owner_alive(claim) or now - claim.heartbeat > self.claim_timeout_s

    @named_causes
    def claim(self, key: str) -> bool:
        """Claim run `key` for this process; False if it is stored already or another live process holds it."""
        pid, host = self.owner
        now = time.time()
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None:
                return False
            row = conn.execute(f"SELECT {_CLAIM_COLUMNS} FROM claims WHERE key = ?", (key,)).fetchone()
            if row is not None and not self._stale(Claim(*row), now):
                return False
            conn.execute(
                f"INSERT OR REPLACE INTO claims ({_CLAIM_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (key, pid, host, now, process_start(pid)),
            )
            return True

    @named_causes
    def heartbeat(self, key: str) -> None:
        """Refresh this process's claim on `key` (called after every epoch)."""
        pid, host = self.owner
        with closing(self._connect()) as conn:
            conn.execute(
                "UPDATE claims SET heartbeat = ? WHERE key = ? AND pid = ? AND host = ?", (time.time(), key, pid, host)
            )

    @named_causes
    def release(self, key: str) -> None:
        """Drop this process's claim on `key` (a run that failed; a stored run's claim goes with `save`)."""
        pid, host = self.owner
        with closing(self._connect()) as conn:
            conn.execute("DELETE FROM claims WHERE key = ? AND pid = ? AND host = ?", (key, pid, host))

    @named_causes
    def claims(self) -> dict[str, Claim]:
        """Every claim in the store, live or stale, by run key."""
        if not os.path.exists(self.path):
            return {}
        with closing(self._connect()) as conn:
            return {r[0]: Claim(*r) for r in conn.execute(f"SELECT {_CLAIM_COLUMNS} FROM claims")}

    def held_elsewhere(self, keys: Iterable[str]) -> dict[str, Claim]:
        """The claims among `keys` held by other live processes (not stale)."""
        now = time.time()
        wanted = set(keys)
        return {k: c for k, c in self.claims().items() if k in wanted and not self._stale(c, now)}
