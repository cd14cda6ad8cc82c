"""`cdgrad run --executor slurm` against a real single-node SLURM cluster (the `slurm_cluster` fixture; skipped
where SLURM, munge, root or submitit is missing).

Every command runs in a fresh process with the test plugin (tests/sweep_plugin.py), as a user would run it; runs
are held mid-way by the plugin (at a chosen optimizer step, until a file appears) instead of being timed, and
every wait has a limit.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from sweep_helpers import cdgrad_cmd, finish, numbers, records, steps, sweep_env, wait_until
from sweep_plugin import STEPS_PER_EPOCH, presets, setup, teardown

pytestmark = [pytest.mark.usefixtures("slurm_cluster"), pytest.mark.slow]
RUN = ["--executor", "slurm", "--no-plots"]
WAIT = ["--wait", "--wait-timeout", "300"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, tuple]:
    """The inline numbers of the test presets' runs, trained in this process one at a time."""
    from cdgrad.experiments.runner import run_all
    from cdgrad.experiments.store import ResultStore

    setup()  # no hooks here: none of their variables is set in this process
    try:
        results = tmp_path_factory.mktemp("inline")
        runs = [run for preset in presets() if preset.name in ("sweep-test", "sweep-one") for run in preset.runs()]
        run_all(runs, ResultStore(str(results)), log=lambda m: None)
    finally:
        teardown()
    return {k: numbers(r) for k, r in records(results).items()}


def _job_of(results: Path, key: str) -> str:
    with sqlite3.connect(results / "results.sqlite") as conn:
        return conn.execute("SELECT job_id FROM submissions WHERE key = ?", (key,)).fetchone()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_slurm_gives_the_records_and_numbers_of_inline_and_a_rerun_submits_nothing(tmp_path, reference):
    results = tmp_path / "res"
    code, out, err = finish(cdgrad_cmd("run", "sweep-test", "--results", str(results), *RUN, *WAIT))
    assert code == 0, out + err
    assert "4 to submit" in out and "4 of 4 runs complete" in out
    got = records(results)
    assert {k: numbers(r) for k, r in got.items()} == {k: reference[k] for k in got} and len(got) == 4
    for record in got.values():  # where each ran, and its log, under the results folder
        assert re.fullmatch(r"\d+_\d+", record["job_id"]) and record["status"] == "completed"
        assert Path(record["log_path"]).is_file() and Path(record["log_path"]).is_relative_to(results / "jobs")
    code, out, err = finish(cdgrad_cmd("run", "sweep-test", "--results", str(results), *RUN))
    assert code == 0 and "4 already complete" in out and "0 to submit" in out, out + err
    code, out, err = finish(cdgrad_cmd("status", "sweep-test", "--results", str(results)))
    assert code == 0 and "| all | 4 | 0 | 0 | 0 | 0 |" in out, out + err


def _held_run(tmp_path: Path) -> tuple[Path, Path, dict[str, str], int, str]:
    """Submit "sweep-one" (4 epochs) and wait until its task is held at the first step of epoch 3 (the
    checkpoint of epoch 2 written); returns (results, release file, env, pid of the task, job id)."""
    results, release, steps_dir = tmp_path / "res", tmp_path / "release", tmp_path / "steps"
    steps_dir.mkdir()
    env = sweep_env(
        CDGRAD_TEST_STEPS_DIR=str(steps_dir),
        CDGRAD_TEST_HOLD_AT=str(2 * STEPS_PER_EPOCH + 1),
        CDGRAD_TEST_RELEASE=str(release),
    )
    code, out, err = finish(cdgrad_cmd("run", "sweep-one", "--results", str(results), *RUN, env=env))
    assert code == 0 and "1 to submit" in out, out + err
    held = wait_until(lambda: sorted(tmp_path.glob("release.held-*")), what="the task reaching epoch 3")
    (key,) = [p.stem for p in (results / "checkpoints").glob("*.pt")]
    return results, release, env, int(held[0].read_text()), key


def test_scancel_then_rerun_resumes_from_the_checkpoint_with_the_same_numbers(tmp_path, reference, slurm_cluster):
    results, release, env, pid, key = _held_run(tmp_path)
    job = _job_of(results, key)
    subprocess.run(["scancel", job], check=True, env=slurm_cluster.env, timeout=60)
    wait_until(lambda: job not in slurm_cluster.jobs() and not _alive(pid), what="the cancelled task ending")
    assert records(results) == {}
    code, out, _ = finish(cdgrad_cmd("status", "sweep-one", "--results", str(results), env=env))
    assert "| all | 0 | 0 | 0 | 0 | 1 |" in out  # lost: to do again
    release.touch()
    code, out, err = finish(cdgrad_cmd("run", "sweep-one", "--results", str(results), *RUN, *WAIT, env=env))
    assert code == 0 and "1 to submit" in out, out + err
    assert numbers(records(results)[key]) == reference[key]
    counts = steps(tmp_path / "steps")
    assert counts.pop(pid) == 2 * STEPS_PER_EPOCH + 1  # held at the first step of epoch 3, then cancelled
    assert list(counts.values()) == [2 * STEPS_PER_EPOCH]  # the rerun trained epochs 3 and 4 only


def test_scontrol_requeue_resumes_from_the_checkpoint_with_the_same_numbers(tmp_path, reference, slurm_cluster):
    results, release, env, pid, key = _held_run(tmp_path)
    job = _job_of(results, key)
    subprocess.run(["scontrol", "requeue", job], check=True, env=slurm_cluster.env, timeout=60)
    wait_until(lambda: not _alive(pid), what="the requeued task's first execution ending")
    release.touch()
    code, out, err = finish(cdgrad_cmd("run", "sweep-one", "--results", str(results), *RUN, *WAIT, env=env))
    assert code == 0 and "1 queued in live jobs" in out and "0 to submit" in out, out + err  # not submitted again
    assert numbers(records(results)[key]) == reference[key] and records(results)[key]["job_id"] == job
    counts = steps(tmp_path / "steps")
    assert counts.pop(pid) == 2 * STEPS_PER_EPOCH + 1
    assert list(counts.values()) == [2 * STEPS_PER_EPOCH]  # the requeued task resumed at epoch 3


def test_a_task_that_raises_is_recorded_failed_and_the_others_finish(tmp_path):
    results = tmp_path / "res"
    code, out, err = finish(cdgrad_cmd("run", "sweep-fail", "--results", str(results), *RUN, *WAIT))
    assert code == 1, out + err  # not every run finished
    got = records(results)
    failed = [r for r in got.values() if r["status"] == "failed"]
    assert len(got) == 3 and sorted(r["status"] for r in got.values()) == ["completed", "completed", "failed"]
    (record,) = failed
    assert record["error"] == "Broken: this model fails on purpose" and record["config"]["model"] == "broken"
    assert "this model fails on purpose" in Path(record["log_path"]).read_text()
    code, out, err = finish(cdgrad_cmd("status", "sweep-fail", "--results", str(results)))
    assert "| all | 2 | 0 | 0 | 1 | 0 |" in out and record["job_id"] in out and record["log_path"] in out, out + err
    code, out, err = finish(cdgrad_cmd("run", "sweep-fail", "--results", str(results), *RUN))
    assert code == 0 and "1 failed before" in out and "0 to submit" in out, out + err


def test_two_commands_at_once_never_train_a_run_twice(tmp_path, reference):
    results, steps_dir = tmp_path / "res", tmp_path / "steps"
    steps_dir.mkdir()
    env = sweep_env(CDGRAD_TEST_STEPS_DIR=str(steps_dir))
    procs = [cdgrad_cmd("run", "sweep-test", "--results", str(results), *RUN, *WAIT, env=env) for _ in range(2)]
    outcomes = [finish(p) for p in procs]
    submitted = 0
    for code, out, err in outcomes:
        assert code == 0 and "4 of 4 runs complete" in out, out + err
        submitted += sum(int(n) for n in re.findall(r"submitted (\d+) array tasks", out))
    assert submitted == 4  # each run handed to the scheduler once
    assert sorted(steps(steps_dir).values()) == [3 * STEPS_PER_EPOCH] * 4  # and trained once, in full
    assert {k: numbers(r) for k, r in records(results).items()} == {
        k: v for k, v in reference.items() if k in records(results)
    }
