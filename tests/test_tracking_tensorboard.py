"""The TensorBoard sink against TensorBoard itself: the event files read back with its EventAccumulator and served by
`tensorboard --logdir` hold exactly the stored curves; a run killed (SIGKILL) while writing a checkpoint and resumed
continues the same event folder with no step twice; a rerun of a stored run writes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'cdgrad[tensorboard]')")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from cdgrad.experiments import cli  # noqa: E402
from cdgrad.experiments.config import RunConfig, run_key  # noqa: E402
from cdgrad.experiments.presets import Preset  # noqa: E402
from cdgrad.experiments.store import ResultStore  # noqa: E402
from cdgrad.experiments.tracking import Tracker  # noqa: E402
from cdgrad.experiments.tracking.tensorboard import TensorBoardSink  # noqa: E402
from cdgrad.experiments.train import train  # noqa: E402
from helpers import install_preset, register_fixtures, uninstall_preset  # noqa: E402
from tracking_helpers import EPOCHS, STEPS, driver, expected, finish, free_port, train_argv  # noqa: E402

register_fixtures()
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # real servers: run once in CI

BASE = {"dataset": "synthetic", "model": "tiny", "epochs": EPOCHS, "batch_size": 64, "lr": 0.1, "threads": 1}
BASE["eval_every"] = 2
PRESET = Preset("tb-test", "TensorBoard test sweep", BASE, (({"method": "none"}, 1), ({"method": "sobolev"}, 1)))


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in `folder` as TensorBoard reads it: tag -> [(step, value)] (float64)."""
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {
        tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, list]:
    """`cdgrad run tb-test --log tensorboard`: two stored runs and their event folders."""
    results = tmp_path_factory.mktemp("tb-sweep")
    install_preset(PRESET)
    try:
        assert cli.main(["run", PRESET.name, "--results", str(results), "--log", "tensorboard", "--no-plots"]) == 0
    finally:
        uninstall_preset(PRESET.name)
    runs = ResultStore(str(results)).runs()
    assert len(runs) == 2
    return results, runs


def test_event_files_hold_every_stored_curve_exactly_and_the_hparams(sweep):
    results, runs = sweep
    for run in runs:
        folder = results / "tensorboard" / run.key
        got = scalars(folder)
        assert {k: v for k, v in got.items() if not k.startswith("step/")} == expected(run)
        assert [s for s, _ in got["step/train_loss"]] == list(range(1, EPOCHS * STEPS + 1))
        assert got["step/lr"] == [(s, 0.1) for s in range(1, EPOCHS * STEPS + 1)]
        acc = ea.EventAccumulator(str(folder))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["method"].string_value == run.config.method
        assert hparams["seed"].number_value == run.seed and hparams["status"].string_value == "completed"
        assert hparams["preset"].string_value == PRESET.name
        assert "lam" not in hparams  # unset fields are left out


def test_tensorboard_serves_the_same_scalars(sweep):
    results, runs = sweep
    port = free_port()
    args = ["--logdir", str(results / "tensorboard"), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", *args, "--load_fast", "false", "--reload_interval", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"

    def get(path: str):
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return json.load(response)

    try:
        tags: dict = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the server listens and has loaded both runs
            try:
                tags = get("/tags")
            except OSError:
                tags = {}
            if all(run.key in tags and "final/test_acc" in tags[run.key] for run in runs):
                break
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.2)
        for run in runs:
            want = expected(run)
            assert set(want) <= set(tags[run.key])
            for tag, series in want.items():
                query = urllib.parse.urlencode({"run": run.key, "tag": tag})
                assert [(step, value) for _, step, value in get(f"/scalars?{query}")] == series
        # the HParams dashboard: the hyper-parameters that differ between the runs, from their sessions
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/data/plugin/hparams/experiment",
            data=json.dumps({"experimentName": ""}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            infos = {h["name"]: h for h in json.load(response)["hparamInfos"]}
        assert infos["method"]["differs"] and sorted(infos["method"]["domainDiscrete"]) == ["none", "sobolev"]
        assert not infos["lr"]["differs"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_run_killed_while_checkpointing_resumes_in_the_same_folder_without_repeated_steps(tmp_path):
    results = tmp_path / "results"
    argv = train_argv(results, "--log", "tensorboard")
    # killed half-way through writing the epoch-2 checkpoint: epoch 2 is logged and flushed, the checkpoint is epoch 1
    code, _, err = finish(driver({"commands": [argv], "kill": {"at": "checkpoint-write", "n": 2}}))
    assert code == -signal.SIGKILL, err
    config = RunConfig(**BASE)
    folder = results / "tensorboard" / run_key(config, 0)
    (first,) = folder.glob("events.out.tfevents.*")
    written = [e.step for e in EventFileLoader(str(first)).Load() if e.summary.value]
    assert max(written) == 2 * STEPS  # the killed process wrote steps after its last checkpoint (epoch 1)
    code, out, err = finish(driver({"commands": [argv]}))
    assert code == 0, err
    (run,) = ResultStore(str(results)).runs()
    got = scalars(folder)
    assert {k: v for k, v in got.items() if not k.startswith("step/")} == expected(run)
    # the per-step scalars are those of an uninterrupted run, each step once
    reference = tmp_path / "reference"
    train(config, 0, tracker=Tracker([TensorBoardSink(str(reference))]))
    want = scalars(reference / run.key)
    assert {k: v for k, v in got.items() if k.startswith("step/")} == {
        k: v for k, v in want.items() if k.startswith("step/")
    }
    # a rerun of the stored run logs nothing
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = finish(driver({"commands": [argv]}))
    assert code == 0 and "already complete" in out, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
