"""Record files, the local worker pool and the executor options (no scheduler needed; the SLURM executor's tests
are in test_executors_slurm.py)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from cdgrad.experiments import cli
from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.executors import SlurmOptions, parse_minutes, queued_jobs
from cdgrad.experiments.records import failed_record, finished_record, read_record, record_path, write_record
from cdgrad.experiments.runner import run_all
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.worker import load_plugins
from sweep_helpers import cdgrad_cmd, finish, numbers, records
from sweep_plugin import presets, setup, teardown

TINY = RunConfig(dataset="synthetic", model="tiny", epochs=2, batch_size=64, lr=0.1, threads=1)
METRICS = {"curves": {"epoch": [1]}, "final": {"test_acc": 50.0}, "wall_s": 1.0, "status": "completed"}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    """The test data set, models and presets in this process too (no hooks: none of their variables is set)."""
    setup()
    yield
    teardown()


@pytest.fixture(scope="module")
def inline(tmp_path_factory) -> Path:
    """The "sweep-test" preset trained inline in this process."""
    results = tmp_path_factory.mktemp("inline")
    run_all(presets()[0].runs(), ResultStore(str(results)), log=lambda m: None)
    return results


def test_local_pool_of_two_equals_inline_bit_for_bit(tmp_path, inline):
    results = tmp_path / "res"
    code, out, err = finish(cdgrad_cmd("run", "sweep-test", "--results", str(results), "--executor", "local",
                                       "--jobs", "2", "--no-plots"))  # fmt: skip
    assert code == 0 and "4 to train in 2 worker processes" in out and "4 of 4 runs complete" in out, out + err
    got, want = records(results), records(inline)
    assert len(got) == 4 and {k: numbers(r) for k, r in got.items()} == {k: numbers(r) for k, r in want.items()}
    pids = set()
    for record in got.values():
        assert record["job_id"].startswith("local:") and Path(record["log_path"]).is_file()
        pids.add(record["job_id"])
    assert len(pids) == 2  # both workers trained
    assert {run.key for run in ResultStore(str(results)).runs()} == set(got)  # the coordinator indexed them
    assert os.listdir(results / "checkpoints") == []


def test_local_pool_records_a_failure_and_finishes_the_others_then_retries_it_on_request(tmp_path):
    results = tmp_path / "res"
    argv = ["run", "sweep-fail", "--results", str(results), "--executor", "local", "--jobs", "2", "--no-plots"]
    code, out, err = finish(cdgrad_cmd(*argv))
    assert code == 1 and "2 of 3 runs complete" in out, out + err
    (failed,) = [r for r in records(results).values() if r["status"] == "failed"]
    assert failed["error"] == "Broken: this model fails on purpose"
    assert "Traceback" in Path(failed["log_path"]).read_text()  # the whole error is in the run's log
    code, out, err = finish(cdgrad_cmd(*argv))
    assert code == 0 and "1 failed before" in out and "0 to train" in out, out + err
    code, out, err = finish(cdgrad_cmd(*argv, "--retry-failed"))
    assert code == 1 and "1 to train" in out, out + err
    assert read_record(record_path(str(results), failed["key"]))["finished"] >= failed["finished"]


def test_a_failure_never_replaces_a_finished_record_and_rewrites_are_idempotent(tmp_path):
    root = str(tmp_path)
    done = finished_record(TINY, 0, METRICS, {"torch": "x"}, job_id="7_0")
    assert write_record(root, done) and write_record(root, done)  # a task executed twice: one record
    assert not write_record(root, failed_record(TINY, 0, "RuntimeError: late duplicate"))
    assert read_record(record_path(root, run_key(TINY, 0))) == done
    assert sorted(os.listdir(tmp_path / "runs")) == [f"{run_key(TINY, 0)}.json"]  # no temporary left
    first = failed_record(TINY, 1, "RuntimeError: out of memory")
    assert write_record(root, first)
    assert write_record(root, finished_record(TINY, 1, METRICS, {}))  # a retry that succeeds replaces a failure
    store = ResultStore(root)
    assert store.done_keys() == {run_key(TINY, 0), run_key(TINY, 1)} and store.failures() == {}


@pytest.mark.parametrize(
    "content, words",
    [(b"{not json", "not valid JSON"), (b'{"key": "k"}', "lacks"), (b'{"key": "k", "seed": 0, "config": {}, '
     b'"status": "running"}', "status 'running'")],
)  # fmt: skip
def test_an_unreadable_record_is_named_and_skipped(tmp_path, capsys, content, words):
    store = ResultStore(str(tmp_path))
    store.save(TINY, 0, METRICS)
    (tmp_path / "runs" / "k.json").write_bytes(content)
    assert store.done_keys() == {run_key(TINY, 0)}
    err = capsys.readouterr().err
    assert words in err and "k.json" in err


def test_record_folders_of_two_clusters_merge_into_one_report(tmp_path, capsys):
    runs = presets()[0].runs()
    a, b = tmp_path / "a", tmp_path / "b"
    run_all(runs[:2], ResultStore(str(a)), log=lambda m: None)
    run_all(runs[2:], ResultStore(str(b)), log=lambda m: None)
    for path in (b / "runs").iterdir():
        shutil.copy(path, a / "runs" / path.name)
    assert cli.main(["report", "sweep-test", "--results", str(a), "--no-plots"]) == 0
    assert "4 of 4 runs complete" in capsys.readouterr().out
    with sqlite3.connect(a / "results.sqlite") as conn:  # the report indexed the copied records
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone() == (4,)


def test_status_counts_runs_per_configuration(tmp_path, capsys):
    results = tmp_path / "res"
    runs = presets()[0].runs()
    run_all(runs[:1], ResultStore(str(results)), log=lambda m: None)
    write_record(str(results), failed_record(*runs[1], "RuntimeError: boom", job_id="3_1", log_path="/x.log"))
    assert cli.main(["status", "sweep-test", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| all | 1 | 0 | 0 | 1 | 2 |" in out
    assert "failed" in out and "job 3_1, log /x.log: RuntimeError: boom" in out
    assert cli.main(["run", "sweep-test", "--results", str(results), "--dry-run"]) == 0
    flags = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines())
    assert flags == ["done", "failed", "todo", "todo"]


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0-0:0:1", 1)],
)
def test_slurm_time_limits(text, minutes):
    assert parse_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "0", "1:-1"])
def test_bad_slurm_time_limits_name_the_flag(text):
    with pytest.raises(ValueError, match="--slurm-time"):
        parse_minutes(text)


def test_slurm_options_become_submitit_parameters():
    options = SlurmOptions(partition="gpu", time_min=90, gpus_per_task=1, cpus_per_task=4, mem="8G",
                           array_parallelism=16, extra={"account": "proj"})  # fmt: skip
    assert options.parameters() == {
        "name": "cdgrad",
        "timeout_min": 90,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 4,
        "slurm_array_parallelism": 16,
        "slurm_partition": "gpu",
        "slurm_gpus_per_task": 1,
        "slurm_mem": "8G",
        "slurm_additional_parameters": {"account": "proj"},
    }


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--jobs", "2"], "--jobs and --devices apply to --executor local"),
        (["--executor", "local", "--jobs", "0"], "--jobs must be at least 1"),
        (["--executor", "local", "--devices", "gpu0"], "--devices: 'gpu0' is not a device"),
        (["--slurm-time", "60:00"], "--slurm-* options apply to --executor slurm"),
        (["--executor", "local", "--wait"], "--wait and --wait-timeout apply to --executor slurm"),
        (["--executor", "slurm", "--slurm-time", "soon"], "--slurm-time must be a SLURM time limit"),
        (["--executor", "slurm", "--slurm-extra", "account"], "--slurm-extra must be KEY=VALUE"),
        (["--executor", "slurm", "--slurm-cpus-per-task", "0"], "--slurm-cpus-per-task must be at least 1"),
    ],
)
def test_bad_executor_options_are_clear_errors_and_create_nothing(tmp_path, capsys, extra, words):
    results = tmp_path / "res"
    assert cli.main(["run", "sweep-test", "--results", str(results), *extra]) == 2
    assert words in capsys.readouterr().err
    assert not results.exists()


def test_queued_jobs_is_none_without_a_scheduler(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue to be found
    assert queued_jobs() is None


def test_plugins_are_imported_and_a_bad_one_is_named(monkeypatch):
    assert load_plugins("sweep_plugin:setup, json") == ["sweep_plugin:setup", "json"]
    with pytest.raises(ValueError, match="CDGRAD_PLUGINS entry 'no_such_module_xyz'"):
        load_plugins("no_such_module_xyz")
    with pytest.raises(ValueError, match="'json:nothing'"):
        load_plugins("json:nothing")


def test_slurm_executor_without_slurm_is_a_clear_error_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no squeue
    results = tmp_path / "res"
    assert cli.main(["run", "sweep-test", "--results", str(results), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "--executor slurm needs the SLURM commands" in err and "sbatch" in err
    assert not results.exists()


def test_a_filesystem_without_locks_trains_the_run_unlocked_and_says_so(tmp_path, capsys, monkeypatch):
    import errno

    from cdgrad.experiments import locks
    from cdgrad.experiments.worker import execute

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="No locks"):
        locks.RunLock(str(tmp_path), "k").acquire()
    assert execute(str(tmp_path), TINY, 0) == "completed"
    assert "trains without its lock" in capsys.readouterr().err
    assert read_record(record_path(str(tmp_path), run_key(TINY, 0)))["status"] == "completed"
    assert execute(str(tmp_path), TINY, 0) == "done"  # finished: not trained again
