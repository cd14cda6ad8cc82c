"""The MLflow sink against a real `mlflow server` (SQLite backend in a temporary folder): two runs logged from two
processes at once read back exactly with MlflowClient; a run killed (SIGKILL) while checkpointing resumes in the
same MLflow run with no step twice; a server down at start or going down mid-run gives one warning and the run,
its checkpoint and its record go on; the report's files land in a preset-level run; a rerun logs nothing new."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'cdgrad[mlflow]')")

import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cdgrad.experiments import cli  # noqa: E402
from cdgrad.experiments.config import RunConfig, run_key, to_dict  # noqa: E402
from cdgrad.experiments.presets import Preset  # noqa: E402
from cdgrad.experiments.store import ResultStore  # noqa: E402
from cdgrad.experiments.tracking import RunInfo, Sink, Tracker, TrackingWarning  # noqa: E402
from cdgrad.experiments.tracking.mlflow import MlflowSink, find_runs  # noqa: E402
from cdgrad.experiments.train import train  # noqa: E402
from helpers import install_preset, register_fixtures, uninstall_preset  # noqa: E402
from tracking_helpers import EPOCHS, STEPS, driver, expected, finish, free_port, train_argv  # noqa: E402

register_fixtures()
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # real servers: run once in CI

QUIET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "DO_NOT_TRACK": "true"}
BASE = {"dataset": "synthetic", "model": "tiny", "epochs": EPOCHS, "batch_size": 64, "lr": 0.1, "threads": 1}
BASE["eval_every"] = 2
CONFIG = RunConfig(**BASE)


@pytest.fixture(autouse=True)
def _quiet_client(monkeypatch):
    """No retries against a server that is down, no usage reporting."""
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and an artifact folder in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    args = ["server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    log = open(root / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # until it answers its health check
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run as MLflow holds it: key -> [(step, value)] in step order."""
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def the_run(client: MlflowClient, experiment: str, key: str):
    """The one MLflow run of run key `key`."""
    (found,) = find_runs(client, client.get_experiment_by_name(experiment).experiment_id, cdgrad__key=key)
    return found


class Steps(Sink):
    """Keeps the per-step scalars of a run."""

    name = "steps"

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, float]]] = {}

    def log_step(self, step, metrics):
        for k, v in metrics.items():
            self.seen.setdefault(f"step/{k}", []).append((step, v))


def test_two_runs_logged_from_two_processes_at_once(server, tmp_path):
    results, go = tmp_path / "results", tmp_path / "go"
    procs = [
        driver(
            {"commands": [train_argv(results, "--log", "mlflow", "--mlflow-uri", server, seed=s)], "go_file": str(go)}
        )
        for s in (0, 1)
    ]
    go.touch()
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 0, err
    client = MlflowClient(server)
    runs = ResultStore(str(results)).runs()
    assert sorted(r.seed for r in runs) == [0, 1]
    for run in runs:
        found = the_run(client, "cdgrad", run.key)
        assert found.info.status == "FINISHED" and found.info.run_name == run.key
        assert found.data.params == {k: str(v) for k, v in {**to_dict(run.config), "seed": run.seed}.items()}
        tags = found.data.tags
        assert (tags["cdgrad.key"], tags["cdgrad.seed"], tags["cdgrad.status"]) == (run.key, str(run.seed), "completed")
        assert tags["cdgrad.kernel"] == run.env["kernel"]
        assert tags["mlflow.source.git.commit"] == str(run.env["git_commit"])
        got = histories(client, found.info.run_id)
        assert {k: v for k, v in got.items() if not k.startswith("step/")} == expected(run)
        assert [s for s, _ in got["step/train_loss"]] == list(range(1, EPOCHS * STEPS + 1))


def test_a_run_killed_while_checkpointing_resumes_the_same_mlflow_run_without_repeated_steps(server, tmp_path):
    results = tmp_path / "results"
    argv = train_argv(results, "--log", "mlflow", "--mlflow-uri", server, seed=5)
    key = run_key(CONFIG, 5)
    code, _, err = finish(driver({"commands": [argv], "kill": {"at": "checkpoint-write", "n": 2}}))
    assert code == -signal.SIGKILL, err
    client = MlflowClient(server)
    killed = the_run(client, "cdgrad", key)
    assert max(s for s, _ in histories(client, killed.info.run_id)["train_loss"]) == 2 * STEPS  # beyond the checkpoint
    saved = torch.load(ResultStore(str(results)).checkpoint_path(key), weights_only=True)
    assert saved["epoch"] == 1 and saved["tracking"]["mlflow"]["run_id"] == killed.info.run_id
    code, _, err = finish(driver({"commands": [argv]}))
    assert code == 0, err
    (run,) = ResultStore(str(results)).runs()
    resumed = the_run(client, "cdgrad", key)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    got = histories(client, resumed.info.run_id)
    want = expected(run)
    # an epoch redone after the kill keeps the wall-clock epoch_time the killed process logged; all else is exact
    assert [s for s, _ in got["epoch_time"]] == [s for s, _ in want.pop("epoch_time")]
    assert {k: v for k, v in got.items() if not k.startswith("step/") and k != "epoch_time"} == want
    reference = Steps()
    train(CONFIG, 5, tracker=Tracker([reference]))
    assert {k: v for k, v in got.items() if k.startswith("step/")} == reference.seen  # each step once, same values
    # a rerun of the stored run logs nothing
    code, out, err = finish(driver({"commands": [argv]}))
    assert code == 0 and "already complete" in out, err
    assert the_run(client, "cdgrad", key).info.run_id == resumed.info.run_id
    assert histories(client, resumed.info.run_id) == got


def test_a_run_killed_before_its_first_checkpoint_is_taken_over_and_a_finished_one_is_not(server):
    info = RunInfo(CONFIG, 7, STEPS)
    killed = MlflowSink(server, "orphans")
    killed.start(info, None)  # created with its params, then the process dies before its first checkpoint
    rerun = MlflowSink(server, "orphans")
    rerun.start(info, None)
    assert rerun.run_id == killed.run_id
    rerun.log_eval(STEPS, {"train_loss": 1.5})
    rerun.end({"test_acc": 50.0}, "completed")
    again = MlflowSink(server, "orphans")  # the same run trained afresh (its stored result deleted): a new MLflow run
    again.start(info, None)
    assert again.run_id != killed.run_id
    client = MlflowClient(server)
    assert histories(client, killed.run_id) == {"train_loss": [(STEPS, 1.5)], "final/test_acc": [(STEPS, 50.0)]}


def test_sending_within_an_epoch_keeps_the_last_step_for_its_epoch_metrics(server):
    """With every call past the flush interval, the steps before the current one are sent at once; the epoch's
    metrics at its last step still arrive, and the `cdgrad.logged_step` mark only names complete steps."""
    sink = MlflowSink(server, "flushing", flush_secs=0.0)
    sink.start(RunInfo(CONFIG, 8, STEPS), None)
    client = MlflowClient(server)
    for step in range(1, STEPS + 1):
        sink.log_step(step, {"train_loss": float(step)})
        assert client.get_run(sink.run_id).data.tags.get("cdgrad.logged_step") == (str(step - 1) if step > 1 else None)
    sink.log_eval(STEPS, {"test_acc": 50.0})
    run_id = sink.run_id
    sink.end({"test_acc": 50.0}, "completed")
    assert histories(client, run_id) == {
        "step/train_loss": [(s, float(s)) for s in range(1, STEPS + 1)],
        "test_acc": [(STEPS, 50.0)],
        "final/test_acc": [(STEPS, 50.0)],
    }


def test_a_server_down_at_start_gives_one_warning_and_the_run_is_stored(tmp_path):
    results = tmp_path / "results"
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(TrackingWarning, match="mlflow logging failed") as caught:
        assert cli.main(train_argv(results, "--log", "mlflow", "--mlflow-uri", down)) == 0
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    (run,) = ResultStore(str(results)).runs()
    plain = train(CONFIG, 0)
    assert (run.curves["train_loss"], run.final, run.status) == (
        plain["curves"]["train_loss"],
        plain["final"],
        "completed",
    )


class Proxy:
    """A TCP forwarder 127.0.0.1:port -> target that can be cut: `close()` ends every connection and the listener."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.open = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        while self.open:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    upstream = socket.create_connection(self.target)
                    peers[client], peers[upstream] = upstream, client
                    self.sockets += [client, upstream]
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None:
                    for s in (sock, other):
                        if s is not None and s in peers:
                            sel.unregister(s)
                            peers.pop(s)
                            s.close()
                    continue
                other.sendall(data)
        for s in self.sockets:
            s.close()

    def close(self) -> None:
        self.open = False


def test_a_server_going_down_mid_run_gives_one_warning_and_checkpoints_and_record_go_on(server, tmp_path):
    host, port = server.rsplit("/", 1)[-1].split(":")
    proxy = Proxy((host, int(port)))
    url = f"http://127.0.0.1:{proxy.port}"
    ckpt = str(tmp_path / "run.pt")
    checkpoints = []

    def after_epoch(epoch, curves):
        checkpoints.append(torch.load(ckpt, weights_only=True)["epoch"])
        if epoch == 1:
            proxy.close()  # the server is unreachable from now on

    tracker = Tracker([MlflowSink(url, "mid-run")])
    with pytest.warns(TrackingWarning, match="mlflow logging failed") as caught:
        result = train(CONFIG, 0, checkpoint=ckpt, callback=after_epoch, tracker=tracker)
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert checkpoints == [1, 2, 3]
    plain = train(CONFIG, 0)
    assert (result["curves"]["train_loss"], result["final"]) == (plain["curves"]["train_loss"], plain["final"])
    store = ResultStore(str(tmp_path / "results"))
    store.save(CONFIG, 0, result)
    assert [r.key for r in store.runs()] == [run_key(CONFIG, 0)]
    client = MlflowClient(server)  # what reached the server: epoch 1, the run left open
    found = the_run(client, "mid-run", run_key(CONFIG, 0))
    assert found.info.status == "RUNNING"
    assert histories(client, found.info.run_id)["train_loss"] == [(STEPS, result["curves"]["train_loss"][0])]


def test_the_report_goes_to_a_preset_run_and_a_rerun_logs_nothing_new(tmp_path):
    """Offline, on a sqlite URI: `cdgrad run` logs its runs and then the report's table and plots."""
    preset = Preset("mlflow-test", "MLflow test sweep", {**BASE, "epochs": 2}, (({"method": "none"}, 1),))
    results = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["run", preset.name, "--results", str(results), "--log", "mlflow", "--mlflow-uri", uri]
    install_preset(preset)
    try:
        assert cli.main(argv) == 0
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(preset.name).experiment_id
        (run,) = ResultStore(str(results)).runs()
        logged = the_run(client, preset.name, run.key)
        assert logged.data.tags["cdgrad.preset"] == preset.name
        (report,) = find_runs(client, experiment, cdgrad__kind="report")
        files = sorted(a.path for a in client.list_artifacts(report.info.run_id))
        assert files == sorted([f"{preset.name}.md", *(f"{preset.name}_{k}.png" for k in preset.plots)])
        text = Path(client.download_artifacts(report.info.run_id, f"{preset.name}.md", str(tmp_path))).read_text()
        assert text == (results / "report" / f"{preset.name}.md").read_text()
        before = histories(client, logged.info.run_id)
        assert cli.main(argv) == 0
        assert len(client.search_runs([experiment])) == 2  # the run and the report run, nothing new
        assert histories(client, logged.info.run_id) == before
    finally:
        uninstall_preset(preset.name)
