"""Fault tests of the experiment toolkit, tried as a hostile user would: kill -9 at chosen moments, corrupt and
tampered files, read-only places, out-of-range input, diverging runs, two processes on one sweep.

Each fault must end in a clear message (or be repaired, saying so) and lose or duplicate no run; a sweep resumed
after a kill stores exactly the numbers of an uninterrupted sweep. Processes that are killed run
`tests/fault_driver.py`; everything uses the tiny model on the synthetic data with 1 thread.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cdgrad
from cdgrad.experiments import cli
from cdgrad.experiments.checkpoint import CorruptCheckpointError, read_checkpoint, save_checkpoint
from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.locks import RunLock, holder
from cdgrad.experiments.presets import Preset
from cdgrad.experiments.runner import run_all
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.train import train
from helpers import flip_tensor_byte, install_preset, register_fixtures, uninstall_preset

register_fixtures()
pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
BASE = {"dataset": "synthetic", "model": "tiny", "epochs": 3, "batch_size": 64, "lr": 0.1, "threads": 1}
VARIANTS = [[{"method": "none"}, 3], [{"method": "sobolev", "lam": 1.0, "beta": 0.5}, 3]]
PRESET = {"name": "faults", "base": BASE, "variants": VARIANTS}
STEPS = 3 * 4  # optimizer steps per run: 3 epochs of 256 / 64 batches
CONFIG = RunConfig(**BASE)


def _preset() -> Preset:
    return Preset("faults", "fault-test sweep", BASE, tuple((c, s) for c, s in VARIANTS))


install_preset(_preset())


def _numbers(run) -> tuple:
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    return {k: v for k, v in run.curves.items() if k != "epoch_time"}, run.final, run.status


def _stored(results) -> dict:
    return {run.key: _numbers(run) for run in ResultStore(str(results)).runs()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted sweep, trained in this process."""
    results = tmp_path_factory.mktemp("reference")
    run_all(_preset().runs(), ResultStore(str(results)), log=lambda message: None)
    stored = _stored(results)
    assert len(stored) == 6
    return stored


def _driver(spec: dict, prefix: list[str] | None = None) -> subprocess.Popen:
    """`tests/fault_driver.py` with `spec` (the "faults" preset registered) in a new process, output piped."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(cdgrad.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(TESTS / "fault_driver.py"), json.dumps({"preset": PRESET, **spec})]
    return subprocess.Popen((prefix or []) + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run_argv(results) -> list[str]:
    return ["run", "faults", "--results", str(results), "--no-plots"]


def _held_locks(results) -> list[str]:
    """The run locks of `results` some process still holds (none once a sweep has ended)."""
    folder = Path(results) / "locks"
    names = sorted(p.stem for p in folder.glob("*.lock")) if folder.exists() else []
    return [k for k in names if holder(str(results), k) is not None]


# ------------------------------------------------------------------------------------------------ kill -9
@pytest.mark.parametrize(
    "kill, stored_before, resumed_steps",
    [
        ({"at": "step", "n": STEPS + 6}, 1, 4),  # in the middle of the second run's second epoch
        ({"at": "checkpoint-write", "n": 5}, 1, 4),  # half-way through writing the second run's second checkpoint
        ({"at": "after-commit", "n": 2}, 2, 0),  # the second run is stored, its checkpoint not yet removed
    ],
    ids=["mid-epoch", "checkpoint-write", "after-commit"],
)
def test_kill_9_then_rerun_loses_nothing_duplicates_nothing_and_matches_bit_for_bit(
    tmp_path, reference, kill, stored_before, resumed_steps
):
    results = tmp_path / "res"
    code, out, err = _finish(_driver({"commands": [_run_argv(results)], "kill": kill}))
    assert code == -9, err
    assert len(ResultStore(str(results)).done_keys()) == stored_before
    leftovers = os.listdir(results / "checkpoints")
    assert leftovers  # a checkpoint to resume from (and, for checkpoint-write, the half-written temporary)
    if kill["at"] == "checkpoint-write":
        assert any(".tmp" in name for name in leftovers)
    log = tmp_path / "trained.log"
    counts = tmp_path / "counts.json"
    spec = {"commands": [_run_argv(results)], "trained_log": str(log), "counts_file": str(counts)}
    code, out, err = _finish(_driver(spec))
    assert code == 0, err
    assert "6 of 6 runs complete" in out
    trained = log.read_text().split()
    assert len(trained) == len(set(trained)) == 6 - stored_before  # only the runs not yet stored
    # the interrupted run resumed from its last checkpoint (epoch 1) instead of starting over
    assert json.loads(counts.read_text())["step"] == (6 - stored_before) * STEPS - resumed_steps
    assert _stored(results) == reference  # resumed runs equal uninterrupted ones, bit for bit
    assert os.listdir(results / "checkpoints") == []  # no checkpoint, temporary or corrupt file left
    assert _held_locks(results) == []


# ------------------------------------------------------------------------------ two processes, one sweep
def test_two_processes_on_one_store_share_the_work(tmp_path, reference):
    results, go = tmp_path / "res", tmp_path / "go"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        _driver({"commands": [_run_argv(results)], "trained_log": str(log), "go_file": str(go), "step_sleep_s": 0.02})
        for log in logs
    ]
    time.sleep(0.5)
    go.write_text("go")
    outcomes = [_finish(p) for p in procs]
    for code, out, err in outcomes:
        assert code == 0, err
        assert "6 of 6 runs complete" in out  # each reports once every run is stored
    a, b = (set(log.read_text().split()) if log.exists() else set() for log in logs)
    assert a and b, (a, b)  # both trained some runs
    assert not a & b and len(a) + len(b) == 6  # every run trained exactly once
    assert _stored(results) == reference
    assert _held_locks(results) == []


def _spawn_and_reap() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_another_process_holds_are_left_to_it_and_taken_over_once_free(tmp_path):
    runs = _preset().runs()[:2]
    keys = [run_key(c, s) for c, s in runs]
    results = tmp_path / "res"
    other = RunLock(str(results), keys[0])  # held as another process would hold it (a second open file)
    assert other.acquire()
    messages: list[str] = []
    run_all(runs, ResultStore(str(results)), log=messages.append, wait=False)
    store = ResultStore(str(results))
    assert store.done_keys() == {keys[1]}  # the free run was trained, the held one left alone
    assert any("still being trained by" in m and f"pid {os.getpid()}" in m and keys[0] in m for m in messages)
    other.release()  # its holder ends (a killed holder's lock goes the same way: the kernel drops it)
    run_all(runs, ResultStore(str(results)), log=messages.append, wait=False)
    assert store.done_keys() == set(keys) and _held_locks(results) == []


def test_train_refuses_a_run_another_live_process_is_training(tmp_path, capsys):
    results = tmp_path / "res"
    other = RunLock(str(results), run_key(CONFIG, 0))
    assert other.acquire()
    argv = ["train", "--results", str(results), "--seed", "0"]
    argv += [x for k, v in BASE.items() for x in ("--" + k.replace("_", "-"), str(v))]
    try:
        assert cli.main(argv) == 2
    finally:
        other.release()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in capsys.readouterr().err
    assert ResultStore(str(results)).done_keys() == set()


# ------------------------------------------------------------------------------------- corrupt checkpoints
class _RunsCode:
    """A pickle that would create `marker` when loaded without `weights_only`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def _interrupted_checkpoint(tmp_path) -> str:
    path = str(tmp_path / "real.pt")

    def stop(epoch, curves):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, 0, checkpoint=path, callback=stop)
    return path


def _make_bad_checkpoint(kind: str, path: str, tmp_path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    real = _interrupted_checkpoint(tmp_path)
    data = Path(real).read_bytes()
    if kind == "empty":
        Path(path).write_bytes(b"")
    elif kind == "truncated":
        Path(path).write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        Path(path).write_bytes(os.urandom(3000))
    elif kind == "code":
        torch.save({"model": _RunsCode(str(tmp_path / "code-ran"))}, path)
    elif kind == "plain-pickle":
        Path(path).write_bytes(pickle.dumps({"epoch": 1}, protocol=2))
    elif kind == "missing-entries":
        state = torch.load(real, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    elif kind == "wrong-shapes":
        state = torch.load(real, weights_only=True)
        state["model"]["conv1.weight"] = torch.zeros(2, 2)
        torch.save(state, path)
    elif kind == "flipped-byte":  # one bit of one weight changes: still a loadable checkpoint of this run
        Path(path).write_bytes(flip_tensor_byte(data))
    elif kind == "epoch-past-the-end":
        state = torch.load(real, weights_only=True)
        state["epoch"] = 99
        torch.save(state, path)
    else:
        raise AssertionError(kind)


CORRUPT = [
    "empty",
    "truncated",
    "garbage",
    "code",
    "plain-pickle",
    "missing-entries",
    "wrong-shapes",
    "epoch-past-the-end",
    "flipped-byte",
]


@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_checkpoint_is_set_aside_named_and_the_run_starts_afresh(tmp_path, capsys, kind):
    results = tmp_path / "res"
    store = ResultStore(str(results))
    ckpt = store.checkpoint_path(run_key(CONFIG, 0))
    _make_bad_checkpoint(kind, ckpt, tmp_path)
    bad = Path(ckpt).read_bytes()
    argv = ["train", "--results", str(results), "--seed", "0"]
    argv += [x for k, v in BASE.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert ckpt in err and "moved it to" in err and "afresh" in err
    # no advice to load the file in a way that would run code from it
    assert "weights_only" not in err and "safe_globals" not in err and "can still be loaded" not in err
    (aside,) = [p for p in os.listdir(store.checkpoint_dir) if ".corrupt-" in p]
    assert Path(store.checkpoint_dir, aside).read_bytes() == bad  # kept for inspection, unchanged
    assert not (tmp_path / "code-ran").exists()  # nothing in the file was executed
    (run,) = store.runs()
    fresh = train(CONFIG, 0)
    assert (run.curves["train_loss"], run.curves["test_acc"]) == (
        fresh["curves"]["train_loss"],
        fresh["curves"]["test_acc"],
    )


def test_corrupt_checkpoint_in_a_sweep_is_set_aside_and_the_sweep_completes(tmp_path, capsys, reference):
    results = tmp_path / "res"
    store = ResultStore(str(results))
    key = run_key(*_preset().runs()[1])
    _make_bad_checkpoint("truncated", store.checkpoint_path(key), tmp_path)
    assert cli.main(_run_argv(results)) == 0
    captured = capsys.readouterr()
    assert store.checkpoint_path(key) in captured.err and "6 of 6 runs complete" in captured.out
    assert _stored(results) == reference


def test_read_checkpoint_tells_corrupt_from_another_run(tmp_path):
    real = _interrupted_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="different run") as info:
        read_checkpoint(real, CONFIG, 1)
    assert not isinstance(info.value, CorruptCheckpointError)  # another run's file is not set aside
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptCheckpointError, match=str(bad)):
        read_checkpoint(str(bad), CONFIG, 0)


def test_checkpoint_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(str(tmp_path / "c.pt"), {"x": torch.ones(3)})
    assert events == [("fsync", "file"), ("replace", "c.pt"), ("fsync", "dir")]
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["x"], torch.ones(3))


def test_orphaned_temporaries_are_removed_at_the_start_of_a_sweep(tmp_path):
    results = tmp_path / "res"
    folder = results / "checkpoints"
    folder.mkdir(parents=True)
    dead = folder / f"a.pt.tmp{_spawn_and_reap()}"
    old = folder / f"b.pt.tmp{os.getppid()}"  # a live process, but untouched for two hours
    live = folder / f"c.pt.tmp{os.getppid()}"  # a live writer: kept
    probe = folder / f".probe{_spawn_and_reap()}"  # the writability probe of a process killed while probing
    for path in (dead, old, live, probe):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    run_all(_preset().runs()[:1], ResultStore(str(results)), log=lambda m: None)
    assert sorted(os.listdir(folder)) == [live.name]


# ------------------------------------------------------------------------------------------- divergence
def test_a_run_whose_loss_is_not_finite_stops_and_is_stored_as_diverged(tmp_path, capsys):
    config = CONFIG.replace(lr=1e6, epochs=4)
    metrics = train(config, 0)
    assert metrics["status"] == "diverged"
    assert len(metrics["curves"]["epoch"]) < config.epochs  # training stopped
    assert not all(map(lambda v: v == v, metrics["curves"]["train_loss"]))  # NaN is the reason
    assert train(CONFIG, 0)["status"] == "completed"
    results = tmp_path / "res"
    argv = ["train", "--results", str(results), "--seed", "0", "--save-model"]
    argv += [x for k, v in {**BASE, "lr": 1e6, "epochs": 4}.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(argv) == 0
    assert "diverged" in capsys.readouterr().err
    store = ResultStore(str(results))
    (run,) = store.runs()
    assert run.status == "diverged" and len(run.curves["epoch"]) == len(metrics["curves"]["epoch"])
    assert not os.path.exists(store.model_path(run.key))  # no model kept for a diverged run
    assert os.listdir(store.checkpoint_dir) == []
    assert cli.main(argv) == 0  # stored: not trained again
    assert "already stored: diverged" in capsys.readouterr().out


def test_an_old_store_gains_the_status_column(tmp_path):
    results = tmp_path / "res"
    results.mkdir()
    path = results / "results.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE runs (key TEXT PRIMARY KEY, seed INTEGER NOT NULL, config TEXT NOT NULL, version TEXT NOT "
            "NULL, env TEXT NOT NULL, curves TEXT NOT NULL, final TEXT NOT NULL, wall_s REAL NOT NULL, finished "
            "TEXT NOT NULL)"
        )
        conn.execute(
            "INSERT INTO runs VALUES (?, 0, ?, '0.1.0', '{}', '{}', '{\"test_acc\": 50.0}', 1.0, '2026-01-01')",
            (run_key(CONFIG, 0), json.dumps({"dataset": "synthetic", "model": "tiny"})),
        )
    (run,) = ResultStore(str(results)).runs()
    assert run.status == "completed" and run.final == {"test_acc": 50.0}
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(runs)")]
    assert "status" in columns


def test_an_old_store_with_claims_migrates_to_record_files(tmp_path):
    results = tmp_path / "res"
    results.mkdir()
    path = results / "results.sqlite"
    config = json.dumps({"dataset": "synthetic", "model": "tiny"})
    with sqlite3.connect(path) as conn:  # the schema of the previous version, a claim left by a killed process
        conn.execute(
            "CREATE TABLE runs (key TEXT PRIMARY KEY, seed INTEGER NOT NULL, config TEXT NOT NULL, version TEXT NOT "
            "NULL, env TEXT NOT NULL, curves TEXT NOT NULL, final TEXT NOT NULL, wall_s REAL NOT NULL, finished "
            "TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'completed')"
        )
        conn.execute("CREATE TABLE claims (key TEXT PRIMARY KEY, pid INTEGER, host TEXT, heartbeat REAL, started TEXT)")
        conn.execute(
            "INSERT INTO runs VALUES (?, 0, ?, '0.1.0', '{}', '{\"epoch\": [1]}', '{\"test_acc\": 50.0}', 1.0, "
            "'2026-01-01', 'diverged')",
            (run_key(CONFIG, 0), config),
        )
        conn.execute("INSERT INTO claims VALUES ('k', 1, 'h', 0.0, '')")
    store = ResultStore(str(results))
    store.check_writable()
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "claims" not in tables
    record = json.loads((results / "runs" / f"{run_key(CONFIG, 0)}.json").read_text())
    assert record["status"] == "diverged" and record["final"] == {"test_acc": 50.0} and record["seed"] == 0
    assert record["version"] == "0.1.0" and record["finished"] == "2026-01-01" and record["curves"] == {"epoch": [1]}
    path.unlink()  # the record alone rebuilds the index
    (run,) = ResultStore(str(results)).runs()
    assert run.key == run_key(CONFIG, 0) and run.status == "diverged" and run.final == {"test_acc": 50.0}


def test_analyze_stops_on_non_finite_weights(tmp_path, capsys):
    weights = torch.nn.Conv2d(3, 4, 3).state_dict()
    weights["weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"model": weights}, path)
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(path), "--out-dir", str(out), "--input-size", "8"]) == 2
    err = capsys.readouterr().err
    assert re.search("non-finite|not finite", err) and "weight" in err and "Traceback" not in err
    assert not out.exists()


def test_analyze_refuses_an_input_size_that_cannot_fit(tmp_path, capsys):
    """--input-size 100000 asks for terabytes of spectra (4 TB for this 4 x 3 conv): refused naming it, nothing
    written."""
    path = tmp_path / "m.pt"
    torch.save({"model": torch.nn.Conv2d(3, 4, 3).state_dict()}, path)
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(path), "--out-dir", str(out), "--input-size", "100000"]) == 2
    err = capsys.readouterr().err
    assert "input_size=100000 needs about" in err and "TiB" in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------- bad input, disk
@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64 + 5)])
def test_seed_outside_0_to_2_63_is_refused_naming_it_and_nothing_is_created(tmp_path, capsys, seed):
    results = tmp_path / "res"
    argv = ["train", "--results", str(results), "--seed", seed]
    argv += [x for k, v in BASE.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(argv) == 2
    assert "--seed" in capsys.readouterr().err
    assert not results.exists()


def test_largest_seed_is_accepted():
    assert train(CONFIG.replace(epochs=1), 2**63 - 1)["status"] == "completed"


def test_nothing_is_created_before_the_data_is_found(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CDGRAD_DATA", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    results = tmp_path / "res"
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path / "nowhere"), "--results", str(results)]
    assert cli.main(argv) == 2
    assert "mnist" in capsys.readouterr().err
    missing = Preset(
        "faults-missing", "t", {**BASE, "dataset": "mnist", "data_root": str(tmp_path / "nowhere")}, (({}, 1),)
    )
    install_preset(missing)
    try:
        assert cli.main(["run", "faults-missing", "--results", str(results)]) == 2
    finally:
        uninstall_preset("faults-missing")
    assert not results.exists()


def test_report_skips_an_unreadable_row_and_names_it(tmp_path, capsys):
    results = tmp_path / "res"
    run_all(_preset().runs(), ResultStore(str(results)), log=lambda m: None)
    keys = [run_key(c, s) for c, s in _preset().runs()]
    with sqlite3.connect(results / "results.sqlite") as conn:
        conn.execute("UPDATE runs SET config = '{not json' WHERE key = ?", (keys[0],))
        conn.execute("UPDATE runs SET config = ? WHERE key = ?", (json.dumps({"no_such_field": 1}), keys[3]))
    assert cli.main(["report", "faults", "--results", str(results), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert keys[0] in captured.err and keys[3] in captured.err
    assert "4 of 6 runs complete" in captured.out
    store = ResultStore(str(results))
    assert len(store.runs()) == 4 and sorted(store.bad_rows) == sorted([keys[0], keys[3]])


def test_report_and_run_skip_a_row_whose_final_lacks_the_metric_or_is_not_a_number_and_name_it(tmp_path, capsys):
    results = tmp_path / "res"
    run_all(_preset().runs(), ResultStore(str(results)), log=lambda m: None)
    keys = [run_key(c, s) for c, s in _preset().runs()]
    with sqlite3.connect(results / "results.sqlite") as conn:
        conn.execute("UPDATE runs SET final = '{\"test_loss\": 1.0}' WHERE key = ?", (keys[1],))
        conn.execute('UPDATE runs SET final = \'{"test_acc": "abc"}\' WHERE key = ?', (keys[4],))
    for argv in (["report", "faults", "--results", str(results), "--no-plots"], _run_argv(results)):
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        assert keys[1] in captured.err and "'test_acc'" in captured.err and keys[4] in captured.err
        assert "'abc'" in captured.err and "Traceback" not in captured.err and "KeyError" not in captured.err
    assert "4 of 6 runs complete" in captured.out


def test_run_on_a_corrupt_store_says_corrupt_not_unwritable(tmp_path, capsys):
    results = tmp_path / "res"
    results.mkdir()
    (results / "results.sqlite").write_bytes(b"not a database " * 300)
    assert cli.main(_run_argv(results)) == 2
    err = capsys.readouterr().err
    assert "is corrupt" in err and "move results.sqlite aside" in err and "not writable" not in err
    assert "Traceback" not in err


def test_a_full_disk_while_storing_a_run_says_so_and_a_rerun_completes_the_sweep(
    tmp_path, capsys, monkeypatch, reference
):
    results = tmp_path / "res"
    real_connect = ResultStore._connect

    class FullDisk:  # SQLite's error when the file cannot grow: "database or disk is full" (SQLITE_FULL)
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql.startswith("INSERT OR REPLACE INTO runs"):
                exc = sqlite3.OperationalError("database or disk is full")
                exc.sqlite_errorcode = sqlite3.SQLITE_FULL
                raise exc
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    monkeypatch.setattr(ResultStore, "_connect", lambda self: FullDisk(real_connect(self)))
    assert cli.main(_run_argv(results)) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and str(results) in err and "Traceback" not in err
    assert "cannot be used" not in err and "move results.sqlite aside" not in err
    monkeypatch.undo()  # the run's record was written before the index: nothing is lost, the rerun indexes it
    assert cli.main(_run_argv(results)) == 0
    assert _stored(results) == reference


def _read_only_prefix() -> list[str]:
    """Run a command so that file permissions bind (root ignores them unless it gives up that capability)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_read_only_results_folder_is_a_clear_error_and_nothing_is_created(tmp_path):
    stored = tmp_path / "stored"  # a finished sweep, then made read-only: report works, run and train refuse
    run_all(_preset().runs()[:2], ResultStore(str(stored)), log=lambda m: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    parent = tmp_path / "parent"
    parent.mkdir()
    for path in (stored / "checkpoints", stored / "results.sqlite", stored, empty, parent):
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = {p: sorted(os.listdir(p)) for p in (stored, empty, parent)}
    train_argv = ["train", "--seed", "0"] + [x for k, v in BASE.items() for x in ("--" + k.replace("_", "-"), str(v))]
    commands = [
        ["report", "faults", "--results", str(stored), "--no-plots"],
        _run_argv(stored),
        _run_argv(empty),
        train_argv + ["--results", str(parent / "new")],
    ]
    try:
        code, out, err = _finish(_driver({"commands": commands}, prefix=_read_only_prefix()))
    finally:
        for path in (stored, stored / "checkpoints", empty, parent):
            path.chmod(0o755)
    assert "2 of 6 runs complete" in out
    assert out.count("[driver] rc ") == 4 and "[driver] rc 0" in out, out + err
    assert [line for line in out.splitlines() if line.startswith("[driver] rc")] == ["[driver] rc 0"] + [
        "[driver] rc 2"
    ] * 3
    assert err.count("not writable") == 3 and "Traceback" not in err
    assert {p: sorted(os.listdir(p)) for p in (stored, empty, parent)} == before
