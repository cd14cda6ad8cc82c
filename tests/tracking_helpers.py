"""Shared by the tracking tests: the tiny run's command line, killed and resumed processes, a free local port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cdgrad

TESTS = Path(__file__).resolve().parent
STEPS = 4  # optimizer steps per epoch of the tiny run: 256 images in batches of 64
EPOCHS = 3
TRAIN = [
    "--dataset", "synthetic", "--model", "tiny", "--epochs", str(EPOCHS), "--batch-size", "64", "--lr", "0.1",
    "--threads", "1", "--eval-every", "2",
]  # fmt: skip


def train_argv(results: Path | str, *extra: str, seed: int = 0) -> list[str]:
    """`cdgrad train` of the tiny run with `seed` in `results`, plus `extra` options."""
    return ["train", *TRAIN, "--seed", str(seed), "--results", str(results), *extra]


def driver(spec: dict, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tests/fault_driver.py` with `spec` in a new process (this checkout's sources), output piped."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(cdgrad.__file__)))
    full = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(TESTS / "fault_driver.py"), json.dumps(spec)]
    return subprocess.Popen(args, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def free_port() -> int:
    """A TCP port nothing listens on at this moment (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected(run) -> dict[str, list[tuple[int, float]]]:
    """The stored curves and final metrics of `run` as (step, value) series, epoch e at step e * STEPS."""
    c = run.curves
    out = {
        name: [
            (STEPS * e, v)
            for e, v in zip(c["test_epoch" if name.startswith("test_") else "epoch"], values, strict=True)
        ]
        for name, values in c.items()
        if name not in ("epoch", "test_epoch")
    }
    out.update({f"final/{k}": [(STEPS * c["epoch"][-1], v)] for k, v in run.final.items()})
    return out
