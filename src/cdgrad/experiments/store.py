"""The results store: one SQLite file (`<results>/results.sqlite`), one row per completed run.

A row holds the run's key (`config.run_key`), seed, full config (JSON), library version, environment
(torch, python, platform, threads, device) and per-epoch curves. It is written in a single
transaction after the run has finished, so a run that crashes is never counted as done; checkpoints of
unfinished runs live in `<results>/checkpoints/` and are removed once the row is committed (kept as
`<results>/models/<key>.pt` for runs with `save_model`).
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch

from cdgrad.experiments.config import RunConfig, from_dict, run_key, to_dict

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
    finished TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Run:
    """One completed run as read back from the store."""

    key: str
    seed: int
    config: RunConfig
    version: str
    env: dict[str, Any]
    curves: dict[str, list]
    final: dict[str, float]
    wall_s: float
    finished: str


def environment(config: RunConfig | None = None) -> dict[str, Any]:
    """What the numbers may depend on besides the config: versions, platform, threads, device."""
    import numpy

    device = config.device if config is not None else "cpu"
    env = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


class ResultStore:
    """Completed runs in `<root>/results.sqlite`; `check_writable` fails early on an unusable folder."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, "results.sqlite")

    # -- setup
    def check_writable(self) -> None:
        """Create the folder and database if needed; raise ValueError if either cannot be written."""
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
            raise ValueError(
                f"results folder {self.root!r} is not writable ({exc}); pass a writable folder with --results"
            ) from None

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.root, "checkpoints")

    def checkpoint_path(self, key: str) -> str:
        return os.path.join(self.checkpoint_dir, f"{key}.pt")

    def model_path(self, key: str) -> str:
        """Where the final checkpoint of a run with `save_model` is kept (`{"model": state_dict, ...}`)."""
        return os.path.join(self.root, "models", f"{key}.pt")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute(SCHEMA)
        return conn

    # -- queries
    def done_keys(self) -> set[str]:
        if not os.path.exists(self.path):
            return set()
        with closing(self._connect()) as conn:
            return {row[0] for row in conn.execute("SELECT key FROM runs")}

    def is_done(self, config: RunConfig, seed: int) -> bool:
        return run_key(config, seed) in self.done_keys()

    def runs(self, keys: Iterable[str] | None = None) -> list[Run]:
        """Completed runs, all of them or those with the given keys (in that order, missing ones skipped)."""
        if not os.path.exists(self.path):
            return []
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT key, seed, config, version, env, curves, final, wall_s, finished FROM runs ORDER BY finished"
            ).fetchall()
        by_key = {
            r[0]: Run(
                r[0],
                r[1],
                from_dict(json.loads(r[2])),
                r[3],
                json.loads(r[4]),
                json.loads(r[5]),
                json.loads(r[6]),
                r[7],
                r[8],
            )
            for r in rows
        }
        if keys is None:
            return list(by_key.values())
        return [by_key[k] for k in keys if k in by_key]

    # -- writing
    def save(self, config: RunConfig, seed: int, metrics: dict[str, Any], env: dict[str, Any] | None = None) -> str:
        """Record a finished run in one transaction, then remove its checkpoint (or, with `config.save_model`,
        keep it as `model_path(key)`); returns the run key."""
        from cdgrad import __version__

        key = run_key(config, seed)
        row = (
            key,
            seed,
            json.dumps(to_dict(config), sort_keys=True),
            __version__,
            json.dumps(env or environment(config), sort_keys=True),
            json.dumps(metrics["curves"]),
            json.dumps(metrics["final"]),
            float(metrics["wall_s"]),
            time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        os.makedirs(self.root, exist_ok=True)
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
        ckpt = self.checkpoint_path(key)
        if os.path.exists(ckpt):
            if config.save_model:
                os.makedirs(os.path.dirname(self.model_path(key)), exist_ok=True)
                os.replace(ckpt, self.model_path(key))
            else:
                os.remove(ckpt)
        return key
