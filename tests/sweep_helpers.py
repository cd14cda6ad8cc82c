"""Shared by the executor tests: `cdgrad` commands in fresh processes with the test plugin, stored numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cdgrad

TESTS = Path(__file__).resolve().parent


def sweep_env(**extra: str) -> dict[str, str]:
    """The environment of a coordinator (and, through it, of its workers and jobs): cdgrad's sources and the
    tests on the path, the test plugin loaded."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(cdgrad.__file__)))
    path = os.pathsep.join(p for p in (src, str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "CDGRAD_PLUGINS": "sweep_plugin:setup", **extra}


def cdgrad_cmd(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cdgrad ARGV...` in a new process, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "cdgrad.experiments.cli", *argv],
        env=env or sweep_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def numbers(record: dict) -> tuple:
    """What must be identical between two executions of a run: curves (but epoch times), final metrics, status."""
    return {k: v for k, v in record["curves"].items() if k != "epoch_time"}, record["final"], record["status"]


def records(results) -> dict[str, dict]:
    folder = Path(results) / "runs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}


def wait_until(condition, timeout_s: float = 180.0, what: str = "condition"):
    """Poll `condition()` until it returns something true; AssertionError after `timeout_s` (a hung test)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def steps(folder) -> dict[int, int]:
    """{pid: optimizer steps} written by the test plugin."""
    return {int(p.name.split("-")[1]): int(p.read_text() or 0) for p in Path(folder).glob("steps-*")}
