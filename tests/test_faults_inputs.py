"""Fault tests of input that used to pass validation and then crash: thread counts torch cannot start, rates above
float32's range, devices without storage, invalid configs in a dry run, seed caps below 1, sizes whose plot data
cannot fit, and a stored row that cannot be used when its run is asked for again.

Each must end in a clear message naming the parameter and what it accepts, with nothing created or changed.
Commands that used to kill the process run in a fresh one (`tests/fault_driver.py`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cdgrad
from cdgrad.experiments import cli
from cdgrad.experiments.checks import THREADS_PER_CORE, validate
from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.presets import Preset
from cdgrad.experiments.store import ResultStore
from helpers import install_preset, register_fixtures, uninstall_preset

register_fixtures()
pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
BASE = {"dataset": "synthetic", "model": "tiny", "epochs": 2, "batch_size": 64, "lr": 0.1, "threads": 1}
PRESET = {"name": "faults-inputs", "base": BASE, "variants": [[{"method": "none"}, 2]]}
CONFIG = RunConfig(**BASE)
install_preset(Preset(PRESET["name"], "fault-test sweep", BASE, (({"method": "none"}, 2),)))


def _train_argv(results, **changes) -> list[str]:
    argv = ["train", "--results", str(results), "--seed", "0"]
    return argv + [x for k, v in {**BASE, **changes}.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _run_argv(results, *extra: str) -> list[str]:
    return ["run", PRESET["name"], "--results", str(results), "--no-plots", *extra]


# ---------------------------------------------------------------------------------------------- threads
def test_a_thread_count_torch_cannot_start_is_refused_naming_it(tmp_path):
    """`--threads 50000` used to kill the process inside torch (SIGSEGV): a fresh process must exit with 2."""
    results = tmp_path / "res"
    commands = [_train_argv(results, threads=50000), _run_argv(results, "--set", "threads=50000")]
    src = os.path.dirname(os.path.dirname(os.path.abspath(cdgrad.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    spec = json.dumps({"preset": PRESET, "commands": commands})
    proc = subprocess.run(
        [sys.executable, str(TESTS / "fault_driver.py"), spec], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.count("[driver] rc 2") == 2, proc.stdout + proc.stderr
    limit = THREADS_PER_CORE * (os.cpu_count() or 1)
    assert proc.stderr.count(f"threads=50000 is more than {THREADS_PER_CORE} x the") == 2
    assert f"accepted: 0 (torch's default) to {limit}" in proc.stderr and "Traceback" not in proc.stderr
    assert not results.exists()


def test_threads_up_to_the_limit_are_accepted_and_one_more_is_not():
    limit = THREADS_PER_CORE * (os.cpu_count() or 1)
    validate(CONFIG.replace(threads=limit))
    with pytest.raises(ValueError, match=f"threads={limit + 1} is more than .* accepted: 0 .* to {limit}"):
        validate(CONFIG.replace(threads=limit + 1))


# ------------------------------------------------------------------------------------ rates and devices
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", "1e308", "lr=1e+308 is larger than 3.40282e+38, the largest float32"),
        ("weight_decay", "1e39", "weight_decay=1e+39 is larger than 3.40282e+38, the largest float32"),
        ("device", "meta", "device='meta': runs train on a CPU or CUDA device only; accepted: cpu, cuda or cuda:N"),
    ],
)
def test_a_rate_above_float32_or_a_device_without_storage_is_refused_before_training(
    tmp_path, capsys, option, value, message
):
    results = tmp_path / "res"
    assert cli.main(_train_argv(results, **{option: value})) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not results.exists()


def test_the_largest_float32_rate_is_accepted():
    validate(CONFIG.replace(lr=float(torch.finfo(torch.float32).max), weight_decay=0.0))


# ------------------------------------------------------------------------------------ dry run, max seeds
@pytest.mark.parametrize("change, field", [("epochs=0", "epochs"), ("lr=nan", "lr"), ("model=bogus", "model")], ids=str)
def test_dry_run_validates_every_config_as_a_real_run_does(tmp_path, capsys, change, field):
    results = tmp_path / "res"
    assert cli.main(_run_argv(results, "--set", change, "--dry-run")) == 2
    captured = capsys.readouterr()
    assert field in captured.err and "todo" not in captured.out and "Traceback" not in captured.err
    assert not results.exists()


def test_dry_run_of_an_invalid_preset_is_an_error(tmp_path, capsys):
    install_preset(Preset("faults-invalid", "t", {**BASE, "epochs": 0}, (({}, 1),)))
    try:
        assert cli.main(["run", "faults-invalid", "--results", str(tmp_path / "res"), "--dry-run"]) == 2
    finally:
        uninstall_preset("faults-invalid")
    assert "epochs" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_seeds_below_1_is_refused_naming_it(tmp_path, capsys, value):
    results = tmp_path / "res"
    assert cli.main(_run_argv(results, "--max-seeds", value, "--dry-run")) == 2
    captured = capsys.readouterr()
    assert f"--max-seeds must be at least 1 (leave it out to run every seed), got {value}" in captured.err
    assert "matches none" not in captured.err and captured.out == ""
    with pytest.raises(ValueError, match="max_seeds"):
        Preset("p", "t", BASE, (({}, 3),)).runs(max_seeds=int(value))
    assert len(Preset("p", "t", BASE, (({}, 3),)).runs(max_seeds=1)) == 1


# ----------------------------------------------------------------------------------- unusable stored row
def test_train_of_a_run_whose_stored_row_cannot_be_used_names_the_row(tmp_path, capsys):
    results = tmp_path / "res"
    assert cli.main(_train_argv(results)) == 0
    key = run_key(CONFIG, 0)
    with sqlite3.connect(results / "results.sqlite") as conn:
        conn.execute("UPDATE runs SET final = '{\"test_loss\": 1.0}' WHERE key = ?", (key,))
    capsys.readouterr()
    assert cli.main(_train_argv(results)) == 2
    err = capsys.readouterr().err
    assert f"run {key} is stored in" in err and "its row cannot be used" in err and f"unusable rows: {key}" in err
    assert "IndexError" not in err and "Traceback" not in err
    assert ResultStore(str(results)).done_keys() == {key}  # nothing changed


# ---------------------------------------------------------------------------------------- analyze sizes
@pytest.mark.parametrize("option", ["--bins", "--max-distance"])
def test_analyze_refuses_a_bin_count_or_distance_whose_plot_data_cannot_fit(tmp_path, capsys, option):
    path = tmp_path / "m.pt"
    torch.save({"model": torch.nn.Conv2d(3, 4, 3).state_dict()}, path)
    out = tmp_path / "analysis"
    value = 10**12
    argv = ["analyze", str(path), "--out-dir", str(out), "--input-size", "8", option, str(value)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{option[2:].replace('-', '_')}={value} needs about" in err and "TiB" in err and "Traceback" not in err
    assert not out.exists()
