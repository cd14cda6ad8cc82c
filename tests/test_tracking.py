"""The tracking protocol and its fan-out, with recording sinks (no TensorBoard or MLflow needed): what the loop
logs equals the stored curves, logging changes no number, a failing sink gives one warning, a resumed run logs each
step once, bad --log values fail before anything is created."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import cdgrad
from cdgrad.experiments import cli
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.tracking import (
    RunInfo,
    Sink,
    Tracker,
    TrackingWarning,
    diagnostics,
    epoch_metrics,
    parse_log,
)
from cdgrad.experiments.train import train
from helpers import Interrupt, interrupt_after, register_fixtures

register_fixtures()
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = RunConfig(dataset="synthetic", model="tiny", epochs=3, batch_size=64, lr=0.1, eval_every=2, threads=1)
STEPS = 4  # 256 training images in batches of 64


class Recorder(Sink):
    """Keeps every call; `state_dict` returns how many steps it has seen."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, run, state):
        self.calls.append(("start", run, state))

    def log_step(self, step, metrics):
        self.calls.append(("step", step, dict(metrics)))

    def log_eval(self, step, metrics):
        self.calls.append(("eval", step, dict(metrics)))

    def state_dict(self):
        return {"steps": sum(c[0] == "step" for c in self.calls)}

    def end(self, final, status):
        self.calls.append(("end", dict(final), status))

    def abort(self):
        self.calls.append(("abort",))

    def of(self, kind):
        return [c for c in self.calls if c[0] == kind]


class Broken(Recorder):
    """Fails at its `fail_at`-th call of kind `kind`."""

    name = "broken"

    def __init__(self, kind: str, fail_at: int = 1) -> None:
        super().__init__()
        self.kind, self.fail_at, self.seen, self.closed = kind, fail_at, 0, False

    def _maybe_fail(self):
        self.seen += 1
        if self.seen >= self.fail_at:
            raise ConnectionError("tracking server unreachable")

    def start(self, run, state):
        if self.kind == "start":
            self._maybe_fail()
        super().start(run, state)

    def log_step(self, step, metrics):
        if self.kind == "step":
            self._maybe_fail()
        super().log_step(step, metrics)

    def close(self):
        self.closed = True


def _numbers(result):
    return {k: v for k, v in result["curves"].items() if k != "epoch_time"}, result["final"], result["status"]


def test_logged_scalars_are_the_curves_and_logging_changes_no_number():
    plain = train(CONFIG, 0)
    rec = Recorder()
    logged = train(CONFIG, 0, tracker=Tracker([rec]))
    assert _numbers(logged) == _numbers(plain)
    curves = logged["curves"]
    (start,) = rec.of("start")
    assert start[1].key == RunInfo(CONFIG, 0, STEPS).key and start[1].epoch == 0 and start[2] is None
    steps = rec.of("step")
    assert [c[1] for c in steps] == list(range(1, 3 * STEPS + 1))
    assert all(set(c[2]) == {"train_loss", "lr"} and c[2]["lr"] == 0.1 for c in steps)
    evals = rec.of("eval")
    assert [c[1] for c in evals] == [STEPS, 2 * STEPS, 3 * STEPS]
    for i, (_, _, metrics) in enumerate(evals):  # every curve's entry of that epoch, the test ones where evaluated
        expected = {k: curves[k][i] for k in ("train_loss", "train_acc", "epoch_time")}
        if i + 1 in curves["test_epoch"]:
            j = curves["test_epoch"].index(i + 1)
            expected.update(test_loss=curves["test_loss"][j], test_acc=curves["test_acc"][j])
        assert metrics == expected
    (end,) = rec.of("end")
    assert end[1] == logged["final"] and end[2] == "completed"
    # the per-step losses average to the epoch's training loss (batches of equal size)
    for e in range(3):
        mean = sum(c[2]["train_loss"] for c in steps[e * STEPS : (e + 1) * STEPS]) / STEPS
        assert math.isclose(mean, curves["train_loss"][e], rel_tol=1e-6)


def test_a_failing_sink_gives_one_warning_and_the_others_and_the_run_go_on():
    plain = train(CONFIG, 0)
    rec, broken = Recorder(), Broken("step", fail_at=3)
    with pytest.warns(TrackingWarning, match="broken logging failed.*ConnectionError.*goes on") as caught:
        result = train(CONFIG, 0, tracker=Tracker([broken, rec]))
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert _numbers(result) == _numbers(plain)
    assert len(broken.of("step")) == 2 and broken.closed and not broken.of("end")
    assert len(rec.of("step")) == 3 * STEPS and len(rec.of("end")) == 1


def test_a_sink_failing_at_start_is_left_out_of_the_run_and_retried_for_the_next():
    broken = Broken("start")
    tracker = Tracker([broken])
    with pytest.warns(TrackingWarning):
        train(CONFIG, 0, tracker=tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure of the same sink is not warned again
        train(CONFIG.replace(epochs=1), 1, tracker=tracker)
    assert broken.seen == 2 and broken.calls == []


def test_resume_logs_each_step_once_with_the_state_saved_in_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    whole = Recorder()
    train(CONFIG, 0, tracker=Tracker([whole]))
    first = Recorder()
    with pytest.raises(Interrupt):
        train(CONFIG, 0, checkpoint=ckpt, callback=interrupt_after(2), tracker=Tracker([first]))
    assert first.calls[-1] == ("abort",)
    assert torch.load(ckpt, weights_only=True)["tracking"] == {"recorder": {"steps": 2 * STEPS}}
    second = Recorder()
    train(CONFIG, 0, checkpoint=ckpt, tracker=Tracker([second]))
    (start,) = second.of("start")
    assert start[1].epoch == 2 and start[1].step == 2 * STEPS and start[2] == {"steps": 2 * STEPS}
    resumed = [c for c in first.calls if c[0] in ("step", "eval")] + [
        c for c in second.calls if c[0] in ("step", "eval")
    ]
    reference = [c for c in whole.calls if c[0] in ("step", "eval")]

    def numbers(calls):  # epoch_time is wall-clock
        return [(k, s, {n: v for n, v in m.items() if n != "epoch_time"}) for k, s, m in calls]

    assert numbers(resumed) == numbers(reference)


def test_a_sink_without_saved_state_gets_the_restored_epochs_first(tmp_path):
    """Logging turned on for a run resumed from a checkpoint written without it: the past epochs come first."""
    ckpt = str(tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        train(CONFIG, 0, checkpoint=ckpt, callback=interrupt_after(2))
    assert "tracking" not in torch.load(ckpt, weights_only=True)  # logging off: the checkpoint is unchanged
    rec = Recorder()
    result = train(CONFIG, 0, checkpoint=ckpt, tracker=Tracker([rec]))
    evals = rec.of("eval")
    assert [c[1] for c in evals] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert [c[2]["train_loss"] for c in evals] == result["curves"]["train_loss"]
    assert [c[1] for c in rec.of("step")] == list(range(2 * STEPS + 1, 3 * STEPS + 1))


def test_diagnostics_come_from_the_optional_hook_of_the_method_its_transform_or_clipper(monkeypatch):
    class Transform:
        def diagnostics(self):
            return {"conv1/g_mean": torch.tensor(1.5), "conv2/g_mean": 2}

    class Clipper:
        def diagnostics(self):
            return {"conv1/opnorm": 0.75}

    class Wrapper:  # a transform wrapping another (OnUpdate, Scaled): both may offer diagnostics
        transform = Transform()

        def diagnostics(self):
            return Clipper().diagnostics()

    assert diagnostics(Wrapper()) == {
        "diagnostics/conv1/opnorm": 0.75,
        "diagnostics/conv1/g_mean": 1.5,
        "diagnostics/conv2/g_mean": 2.0,
    }
    assert diagnostics(cdgrad.Centralize()) == {}  # no hook: nothing
    monkeypatch.setattr(cdgrad.ChannelDirected, "diagnostics", lambda self: {"epochs_seen": 1.0}, raising=False)
    rec = Recorder()
    train(CONFIG.replace(method="h0", lam=2.0), 0, tracker=Tracker([rec]))
    assert all(c[2]["diagnostics/epochs_seen"] == 1.0 for c in rec.of("eval"))


def test_epoch_metrics_pick_the_test_entries_of_evaluated_epochs_only():
    curves = {
        "epoch": [1, 2, 3],
        "train_loss": [3.0, 2.0, 1.0],
        "test_epoch": [2, 3],
        "test_loss": [2.5, 1.5],
        "epoch_time": [0.1, 0.2, 0.3],
    }
    assert epoch_metrics(curves, 0) == {"train_loss": 3.0, "epoch_time": 0.1}
    assert epoch_metrics(curves, 1) == {"train_loss": 2.0, "test_loss": 2.5, "epoch_time": 0.2}
    assert epoch_metrics(curves, 2) == {"train_loss": 1.0, "test_loss": 1.5, "epoch_time": 0.3}


def test_log_option_values():
    assert parse_log([]) == []
    assert parse_log(["tensorboard,mlflow", "tensorboard"]) == ["tensorboard", "mlflow"]
    assert parse_log(["MLflow", " tensorboard "]) == ["mlflow", "tensorboard"]
    with pytest.raises(ValueError, match="--log 'wandb' is not a sink; accepted values: tensorboard, mlflow"):
        parse_log(["tensorboard,wandb"])


def test_a_bad_log_value_fails_before_anything_is_created(tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["train", "--dataset", "synthetic", "--model", "tiny", "--epochs", "1", "--results", str(results)]
    assert cli.main([*argv, "--log", "wandb"]) == 2
    assert "accepted values: tensorboard, mlflow" in capsys.readouterr().err
    assert not os.path.exists(results)


def test_the_synthesis_loop_logs_both_networks_and_resumes_without_repeating_steps(tmp_path, monkeypatch):
    gan = RunConfig(
        task="synthesis", dataset="synthetic-dense", model="spade-small", epochs=2, batch_size=8, lr=1e-3,
        train_subset=16, threads=1,
    )  # fmt: skip
    steps = 2  # 16 images in batches of 8
    gan = gan.replace(method="h0", lam=2.0)
    monkeypatch.setattr(cdgrad.ChannelDirected, "diagnostics", lambda self: {"n": 1.0}, raising=False)
    whole = Recorder()
    plain = train(gan, 0, tracker=Tracker([whole]))
    assert [c[1] for c in whole.of("step")] == [1, 2, 3, 4]
    assert set(whole.of("step")[0][2]) == {"train_loss", "train_d_loss", "lr", "lr_disc"}
    evals = whole.of("eval")
    assert [c[1] for c in evals] == [steps, 2 * steps]
    assert [c[2]["train_d_loss"] for c in evals] == plain["curves"]["train_d_loss"]
    assert evals[-1][2]["test_fid"] == plain["final"]["test_fid"]
    assert evals[0][2]["diagnostics/model/n"] == evals[0][2]["diagnostics/disc/n"] == 1.0
    assert whole.of("end") == [("end", plain["final"], "completed")]
    ckpt = str(tmp_path / "gan.pt")
    first, second = Recorder(), Recorder()
    with pytest.raises(Interrupt):
        train(gan, 0, checkpoint=ckpt, callback=interrupt_after(1), tracker=Tracker([first]))
    resumed = train(gan, 0, checkpoint=ckpt, tracker=Tracker([second]))
    assert second.of("start")[0][2] == {"steps": steps}
    assert [c[1] for c in first.of("step") + second.of("step")] == [1, 2, 3, 4]
    assert _numbers(resumed) == _numbers(plain)
