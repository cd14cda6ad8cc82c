"""Fault tests of what a run reads back and writes when it resumes: damaged kept models, checkpoints of another run
or world size, a disk that fills up while a checkpoint is written, and a run resumed with other settings.

Like `test_faults`, each fault ends in a clear message (or is repaired, saying so), loses and duplicates no run,
and a sweep completed after it stores exactly the numbers of an uninterrupted sweep. Everything uses the tiny model
on the synthetic data.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import cdgrad._files
import cdgrad._kernels
from cdgrad.experiments import cli
from cdgrad.experiments.checkpoint import read_checkpoint
from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.presets import Preset
from cdgrad.experiments.report import summarize
from cdgrad.experiments.runner import run_all
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.train import train
from cdgrad.functional import plain_route
from helpers import flip_tensor_byte, install_preset, register_fixtures

register_fixtures()
pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"dataset": "synthetic", "model": "tiny", "epochs": 3, "batch_size": 64, "lr": 0.1, "threads": 1}
PRESET = Preset(
    "faults-resume", "fault-test sweep", BASE, (({"method": "none"}, 2), ({"method": "sobolev", "lam": 1.0}, 1))
)
CONFIG = RunConfig(**BASE)
install_preset(PRESET)


def _stored(results) -> dict:
    """What must be identical between a sweep completed after a fault and an uninterrupted one."""
    return {
        run.key: ({k: v for k, v in run.curves.items() if k != "epoch_time"}, run.final, run.status)
        for run in ResultStore(str(results)).runs()
    }


def _run_argv(results) -> list[str]:
    return ["run", PRESET.name, "--results", str(results), "--no-plots"]


def _train_argv(results, **changes) -> list[str]:
    argv = ["train", "--results", str(results), "--seed", "0"]
    return argv + [x for k, v in {**BASE, **changes}.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted sweep, trained in this process."""
    results = tmp_path_factory.mktemp("reference")
    run_all(PRESET.runs(), ResultStore(str(results)), log=lambda message: None)
    return _stored(results)


def _interrupted(path: str, config: RunConfig = CONFIG, seed: int = 0) -> None:
    """Train `config` until its first checkpoint (epoch 1) is written at `path`, then stop as Ctrl-C would."""

    def stop(epoch, curves):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, seed, checkpoint=path, callback=stop)


# ------------------------------------------------------------------------------------------ kept models
def test_a_kept_model_with_a_flipped_byte_is_refused_and_set_aside_by_analyze(tmp_path, capsys):
    results = tmp_path / "res"
    assert cli.main(_train_argv(results) + ["--save-model"]) == 0
    store = ResultStore(str(results))
    key = run_key(CONFIG, 0)
    model = store.model_path(key)
    Path(model).write_bytes(flip_tensor_byte(Path(model).read_bytes()))
    damaged = Path(model).read_bytes()
    out = tmp_path / "analysis"
    capsys.readouterr()
    assert cli.main(["analyze", key, "--results", str(results), "--out-dir", str(out), "--input-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "CRC-32" in err and model in err and "Traceback" not in err
    assert not os.path.exists(model) and not out.exists()
    (aside,) = [p for p in os.listdir(os.path.dirname(model)) if ".corrupt-" in p]
    assert Path(os.path.dirname(model), aside).read_bytes() == damaged  # kept for inspection, unchanged


# ------------------------------------------------------------------------ another run's or world's checkpoint
@pytest.mark.parametrize("kind", ["another-run", "another-world-size"])
def test_a_checkpoint_of_another_run_or_world_size_is_set_aside_and_the_sweep_completes(
    tmp_path, capsys, reference, kind
):
    results = tmp_path / "res"
    store = ResultStore(str(results))
    store.check_writable()
    runs = PRESET.runs()
    real = str(tmp_path / "real.pt")
    _interrupted(real, *runs[0])
    state = torch.load(real, weights_only=True)
    if kind == "another-world-size":
        state["world_size"] = 2
        target = store.checkpoint_path(run_key(*runs[0]))
    else:  # seed 0's checkpoint where seed 1's belongs
        target = store.checkpoint_path(run_key(*runs[1]))
    torch.save(state, target)
    assert cli.main(_run_argv(results)) == 0
    captured = capsys.readouterr()
    assert target in captured.err and "moved it to" in captured.err and "afresh" in captured.err
    assert ("different run" if kind == "another-run" else "world size 2") in captured.err
    assert "remove it" not in captured.err and "launch" not in captured.err  # no advice that no longer applies
    assert "3 of 3 runs complete" in captured.out
    assert _stored(results) == reference
    assert [p for p in os.listdir(store.checkpoint_dir) if ".corrupt-" in p]


# -------------------------------------------------------------------------------------------- full disk
class _FillingFile:
    """A file on a disk with room for `room` more bytes: a write beyond it fails with ENOSPC, as the kernel's."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.fh.close()


def test_a_full_disk_while_writing_a_checkpoint_says_so_damages_nothing_and_a_rerun_completes(
    tmp_path, capsys, monkeypatch, reference
):
    results = tmp_path / "res"
    store = ResultStore(str(results))
    first = run_key(*sorted(PRESET.runs(), key=lambda run: run[1])[0])  # the sweep trains seed-major
    opened: list[str] = []

    def filling_open(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller, which closes it
        if "w" in mode and os.path.basename(os.path.dirname(str(path))) == "checkpoints":
            opened.append(str(path))
            if len(opened) == 2:  # the first run's second checkpoint: the disk fills up after 1000 bytes
                return _FillingFile(fh, 1000)
        return fh

    monkeypatch.setattr(cdgrad._files, "open", filling_open, raising=False)
    assert cli.main(_run_argv(results)) == 2
    err = capsys.readouterr().err
    assert "no space left on the device that holds the checkpoint" in err and store.checkpoint_path(first) in err
    assert "enforce fail" not in err and "unexpected pos" not in err and "Traceback" not in err
    # nothing on disk is damaged: the first checkpoint is intact, the partial one is gone, no claim is left
    assert read_checkpoint(store.checkpoint_path(first), *PRESET.runs()[0])["epoch"] == 1
    assert os.listdir(store.checkpoint_dir) == [os.path.basename(store.checkpoint_path(first))]
    assert store.done_keys() == set()
    monkeypatch.undo()
    assert cli.main(_run_argv(results)) == 0
    assert _stored(results) == reference
    assert os.listdir(store.checkpoint_dir) == []


# ------------------------------------------------------------------------------ settings of each segment
def test_a_run_resumed_with_other_threads_and_kernel_records_each_segment_and_the_report_says_so(tmp_path, monkeypatch):
    results = tmp_path / "res"
    store = ResultStore(str(results))
    store.check_writable()
    first_kernel = plain_route("cpu")
    checkpoint = store.checkpoint_path(run_key(CONFIG, 0))
    _interrupted(checkpoint)  # epoch 1 on 1 thread and this machine's kernel path
    assert read_checkpoint(checkpoint, CONFIG, 0)["segments"] == [{"epochs": 1, "kernel": first_kernel, "threads": 1}]
    monkeypatch.setattr(cdgrad._kernels, "native_usable", lambda: False)  # as with CDGRAD_NATIVE=0
    assert cli.main(_train_argv(results, threads=2)) == 0  # threads is not part of the run's identity
    (run,) = store.runs()
    assert run.env["segments"] == [
        {"epochs": 1, "kernel": first_kernel, "threads": 1},
        {"epochs": 2, "kernel": "reference", "threads": 2},
    ]
    (setting,) = summarize([run])
    notes = " ".join(setting.notes)
    assert "thread counts (1+2: 1 run)" in notes
    assert ("kernel paths" in notes) == (first_kernel != "reference")
    # a run trained in one go on one setting has one segment and no note
    monkeypatch.undo()
    pure = tmp_path / "pure"
    assert cli.main(_train_argv(pure)) == 0
    (run,) = ResultStore(str(pure)).runs()
    assert run.env["segments"] == [{"epochs": 3, "kernel": first_kernel, "threads": 1}]
    assert summarize([run])[0].notes == []
