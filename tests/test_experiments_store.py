"""Results store and sweep runner: one transaction per run, failed runs not counted, completed runs skipped."""

import json
import os
import sqlite3
from pathlib import Path

import pytest

from cdgrad.experiments import presets as presets_mod
from cdgrad.experiments import runner as runner_mod
from cdgrad.experiments import train as train_mod
from cdgrad.experiments.config import RunConfig, run_key, to_dict
from cdgrad.experiments.presets import Preset, grid
from cdgrad.experiments.runner import run_all
from cdgrad.experiments.store import ResultStore
from helpers import register_fixtures

register_fixtures()

TINY = RunConfig(dataset="synthetic", model="tiny", epochs=2, batch_size=64, lr=0.1, threads=1)


def _metrics(acc=50.0):
    return {"curves": {"epoch": [1], "test_acc": [acc]}, "final": {"test_acc": acc}, "wall_s": 1.0}


def test_save_and_read_back(tmp_path):
    store = ResultStore(str(tmp_path))
    store.check_writable()
    config = TINY.replace(method="h0", lam=2.0)
    key = store.save(config, 3, _metrics(61.5))
    assert key == run_key(config, 3) and store.done_keys() == {key}
    (run,) = store.runs()
    assert run.config == config and run.seed == 3 and run.final == {"test_acc": 61.5}
    assert run.curves == {"epoch": [1], "test_acc": [61.5]}
    assert run.version and run.env["torch"] and run.env["python"] and run.env["device"] == "cpu"
    assert "threads" in run.env and "platform" in run.env
    row = sqlite3.connect(store.path).execute("SELECT config FROM runs").fetchone()
    assert json.loads(row[0]) == to_dict(config)  # the full config, paths included
    assert store.is_done(config, 3) and not store.is_done(config, 4)


def test_a_failing_index_commit_loses_no_run(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))
    store.save(TINY, 0, _metrics())
    real_connect = store._connect

    class FailingCommit:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    monkeypatch.setattr(store, "_connect", lambda: FailingCommit(real_connect()))
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store.save(TINY, 1, _metrics())
    rows = sqlite3.connect(store.path).execute("SELECT key FROM runs").fetchall()
    assert rows == [(run_key(TINY, 0),)]  # the index was not changed ...
    monkeypatch.undo()
    assert store.done_keys() == {run_key(TINY, 0), run_key(TINY, 1)}  # ... but the record stands and is indexed


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        ResultStore(str(blocker / "results")).check_writable()


def test_sweep_skips_done_runs_and_failed_runs_are_not_done(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))
    runs = [(TINY.replace(method=m), s) for m in ("none", "centralize") for s in (0, 1)]
    calls = []
    real_train = train_mod.train

    def flaky_train(config, seed, **kw):
        calls.append((config.method, seed))
        if len(calls) == 3:
            raise RuntimeError("crash in the middle of a run")
        return real_train(config, seed, **kw)

    monkeypatch.setattr(runner_mod, "train", flaky_train)
    with pytest.raises(RuntimeError, match="crash"):
        run_all(runs, store, log=lambda s: None)
    assert len(store.done_keys()) == 2  # the crashed run is not counted
    calls.clear()
    keys = run_all(runs, store, log=lambda s: None)
    assert len(calls) == 2  # only the crashed run and the one never started
    assert set(keys) == store.done_keys() and len(keys) == 4
    calls.clear()
    run_all(runs, store, log=lambda s: None)
    assert calls == []


def test_bad_input_fails_before_training_and_leaves_the_store_alone(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))
    store.save(TINY, 0, _metrics())
    before = Path(store.path).read_bytes()
    trained = []
    monkeypatch.setattr(runner_mod, "train", lambda *a, **k: trained.append(1))
    bad = [(TINY, 1), (TINY.replace(method="h0", sigma=1.0), 0)]
    with pytest.raises(ValueError, match="sigma"):
        run_all(bad, store, log=lambda s: None)
    monkeypatch.setenv("CDGRAD_DATA", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    missing = [(TINY, 1), (TINY.replace(dataset="mnist", data_root=str(tmp_path / "nowhere")), 0)]
    with pytest.raises(FileNotFoundError, match="mnist"):
        run_all(missing, store, log=lambda s: None)
    assert trained == [] and Path(store.path).read_bytes() == before


def test_preset_expansion_overrides_and_filters():
    p = Preset(
        "t",
        "test",
        {"dataset": "synthetic", "model": "tiny"},
        grid([{"lr": 0.1}, {"lr": 0.2}], [{"method": "none"}, {"method": "h0", "lam": 2.0}], 3),
    )
    runs = p.runs()
    assert len(runs) == 12 and sorted({s for _, s in runs}) == [0, 1, 2]
    assert len(p.runs(where={"lr": 0.2})) == 6
    assert len(p.runs(max_seeds=1)) == 4
    assert all(c.epochs == 7 for c, _ in p.runs({"epochs": 7}))


def test_every_shipped_preset_is_valid_and_reduced_ones_say_what_they_cut():
    from cdgrad.experiments.checks import validate

    for preset in presets_mod.PRESETS.values():
        runs = preset.runs()
        assert runs
        for config, _ in runs:
            validate(config)
        assert len({run_key(c, s) for c, s in runs}) == len(runs)
        if preset.name.endswith("reduced") or preset.name == "demo":
            assert preset.cuts
    t2 = presets_mod.PRESETS["table2"].runs()
    assert {(c.model, c.optimizer, c.batch_size) for c, _ in t2} == {
        ("resnet56", "sgd", 128),
        ("resnet56", "sgd", 32),
        ("resnet56", "sgd", 8),
        ("vgg16", "sgd", 128),
        ("vgg16", "sgd", 8),
        ("vgg16", "sgd", 6),
        ("resnet56", "adam", 128),
        ("resnet56", "adam", 32),
        ("resnet56", "adam", 8),
    }
    seeds = {
        (c.optimizer, c.method): max(s for c2, s in t2 if (c2.optimizer, c2.method) == (c.optimizer, c.method))
        for c, _ in t2
    }
    assert set(seeds.values()) == {24, 9}  # 25 seeds with SGD, 10 with Adam
    fig6 = presets_mod.PRESETS["fig6"].runs()
    assert all(c.swap_train_test and c.batch_size == 100 and c.epochs == 100 and c.model == "cnn2" for c, _ in fig6)
    assert {c.dataset for c, _ in fig6} == {"mnist", "fashion-mnist"} and max(s for _, s in fig6) == 4


def test_environment_records_threads_kernel_path_and_source_revision(tmp_path, monkeypatch):
    import torch

    from cdgrad import _native
    from cdgrad.experiments import store as store_mod

    threads = torch.get_num_threads()
    store = ResultStore(str(tmp_path))
    store.save(TINY.replace(threads=threads + 2), 0, _metrics())  # saved after training restored the thread count
    store.save(TINY.replace(threads=0), 1, _metrics())
    by_seed = {run.seed: run.env for run in store.runs()}
    assert by_seed[0]["threads"] == threads + 2 and by_seed[1]["threads"] == threads
    expected = "native" if _native.library() is not None else "reference"
    assert by_seed[0]["kernel"] == expected
    assert {"git_commit", "git_dirty"} <= set(by_seed[0])
    monkeypatch.setattr(_native, "library", lambda: None)
    assert store_mod.kernel_path("cpu") == "reference"
    monkeypatch.setattr(_native, "library", lambda: object())
    assert store_mod.kernel_path("cpu") == "native" and store_mod.kernel_path("cuda:0") == "reference"


def test_git_revision_of_a_checkout(tmp_path):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    pkg = tmp_path / "repo" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    from cdgrad.experiments.store import git_revision

    assert git_revision(pkg) == (None, None)  # not a checkout
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(pkg.parent), *args], check=True, capture_output=True, text=True, env={**os.environ, **env}
        ).stdout.strip()

    git("init", "-q")
    assert git_revision(pkg) == (None, None)  # a checkout that does not track the package
    git("add", "pkg/__init__.py")
    git("commit", "-q", "-m", "c")
    assert git_revision(pkg) == (git("rev-parse", "HEAD"), False)
    (pkg / "__init__.py").write_text("x = 2\n")
    assert git_revision(pkg) == (git("rev-parse", "HEAD"), True)
    git("commit", "-q", "-am", "d")
    (pkg.parent / "new.py").write_text("")
    assert git_revision(pkg) == (git("rev-parse", "HEAD"), True)  # untracked files count


# ------------------------------------------------------------------------- rows that cannot be reported
@pytest.mark.parametrize(
    "final, why",
    [
        ({"test_loss": 1.0}, "lack 'test_acc'"),
        ({"test_acc": "abc"}, "'abc', not a number"),
        ({"test_acc": True}, "True, not a number"),
        ({"test_acc": None}, "None, not a number"),
        ({"test_acc": float("nan")}, "nan in a completed run"),
        ({"test_acc": float("inf")}, "inf in a completed run"),
    ],
)
def test_a_row_whose_final_cannot_be_reported_is_skipped_and_named(tmp_path, capsys, final, why):
    from cdgrad.experiments.report import markdown, summarize

    store = ResultStore(str(tmp_path))
    good = store.save(TINY, 0, _metrics(61.5))
    bad = store.save(TINY, 1, {**_metrics(), "final": final})
    runs = store.runs()
    assert [r.key for r in runs] == [good] and store.bad_rows == [bad]
    err = capsys.readouterr().err
    assert bad in err and why in err and good not in err
    (setting,) = summarize(runs)  # the report of what is left works
    assert setting.rows[0].accs == [61.5] and "61.50" in markdown([setting])


def test_a_diverged_row_may_hold_a_non_finite_metric_but_not_a_missing_one(tmp_path, capsys):
    store = ResultStore(str(tmp_path))
    nan_final = store.save(TINY, 0, {**_metrics(), "final": {"test_acc": float("nan")}, "status": "diverged"})
    missing = store.save(TINY, 1, {**_metrics(), "final": {}, "status": "diverged"})
    assert [r.key for r in store.runs()] == [nan_final] and store.bad_rows == [missing]
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE runs SET status = 'finished' WHERE key = ?", (nan_final,))
    assert store.runs() == [] and "'finished'" in capsys.readouterr().err


# ------------------------------------------------------------------- a store that cannot be used, named
def _capped_connect(store, monkeypatch):
    """Connections that may not grow the database file: SQLite's own "database or disk is full" (SQLITE_FULL)."""
    real = store._connect

    def capped():
        conn = real()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(store, "_connect", capped)


def test_a_full_disk_during_an_index_write_says_so_and_loses_nothing(tmp_path, monkeypatch):
    from cdgrad.experiments.store import StoreError

    store = ResultStore(str(tmp_path))
    store.save(TINY, 0, _metrics())
    before = Path(store.path).read_bytes()
    _capped_connect(store, monkeypatch)
    big = {**_metrics(), "curves": {"epoch": list(range(50_000))}}  # a row larger than the file may grow
    with pytest.raises(StoreError, match="no space left on the device") as info:
        store.save(TINY, 1, big)
    assert info.value.cause == "disk full" and str(tmp_path) in str(info.value)
    assert "move results.sqlite aside" not in str(info.value) and "not writable" not in str(info.value)
    monkeypatch.undo()
    assert Path(store.path).read_bytes() == before  # the index is as it was; the run's record was written first
    assert store.done_keys() == {run_key(TINY, 0), run_key(TINY, 1)}  # with space again the record is indexed


@pytest.mark.parametrize("where", ["probe", "keep-model"])
def test_an_injected_enospc_is_named_as_a_full_disk(tmp_path, monkeypatch, where):
    import errno

    from cdgrad.experiments import store as store_mod
    from cdgrad.experiments.store import StoreError

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = ResultStore(str(tmp_path))
    if where == "probe":  # the check before a sweep writes a probe file
        monkeypatch.setattr(store_mod, "open", no_space, raising=False)
        with pytest.raises(StoreError, match="no space left on the device") as info:
            store.check_writable()
    else:  # moving a finished run's checkpoint to models/
        store.check_writable()
        Path(store.checkpoint_path(run_key(TINY, 0))).write_bytes(b"checkpoint")
        monkeypatch.setattr(store_mod, "replace_durably", no_space)
        with pytest.raises(StoreError, match="no space left on the device") as info:
            store.save(TINY.replace(save_model=True), 0, _metrics())
    assert info.value.cause == "disk full" and isinstance(info.value, ValueError)
    assert "not writable" not in str(info.value)


@pytest.mark.parametrize("content", [b"this is not an SQLite file " * 200, b"SQLite format 3\x00" + b"\xff" * 8192])
def test_a_corrupt_store_is_named_corrupt_not_unwritable(tmp_path, content):
    from cdgrad.experiments.store import StoreError

    Path(tmp_path / "results.sqlite").write_bytes(content)
    store = ResultStore(str(tmp_path))
    for call in (store.check_writable, store.runs, store.done_keys):
        with pytest.raises(StoreError, match="is corrupt") as info:
            call()
        assert info.value.cause == "corrupt" and "move results.sqlite aside" in str(info.value)
        assert "not writable" not in str(info.value)
    assert Path(tmp_path / "results.sqlite").read_bytes() == content  # left as it was


def test_an_unclassified_store_error_passes_unchanged(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))

    def busy():
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_connect", busy)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.save(TINY, 0, _metrics())
