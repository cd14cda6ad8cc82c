"""The task registry: classification's loss, score and evaluation against independent references; the training
loop takes its loss and metrics from the run's task."""

import dataclasses

import pytest
import torch

from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.tasks import TASKS, get_task
from cdgrad.experiments.tasks.supervised import (
    CLASSIFICATION_SPEC,
    classification_loss,
    classification_score,
    supervised_task,
)
from cdgrad.experiments.train import train
from helpers import register_fixtures

register_fixtures()

TINY = RunConfig(dataset="synthetic", model="tiny", epochs=2, batch_size=64, lr=0.1, threads=1)


def test_classification_loss_and_score_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (7,), generator=g)
    log_p = [logits[i, target[i]] - torch.log(torch.exp(logits[i]).sum()) for i in range(7)]
    ref = -sum(float(v) for v in log_p)
    assert classification_loss(logits, target, reduction="sum").item() == pytest.approx(ref, rel=1e-12)
    assert classification_loss(logits, target).item() == pytest.approx(ref / 7, rel=1e-12)
    hits = sum(int(max(range(5), key=lambda c: logits[i, c].item()) == target[i]) for i in range(7))
    assert classification_score(logits, target).item() == hits


def test_registry_declares_metrics_primary_first():
    task = get_task("classification")
    assert task is TASKS["classification"]
    assert task.primary.name == "test_acc" and task.primary.higher_is_better
    assert {m.name for m in task.metrics} == {"test_acc", "test_loss", "train_acc", "train_loss"}
    with pytest.raises(ValueError, match="classification"):
        get_task("segmentation-someday")


def test_the_training_loop_takes_its_loss_from_the_task(monkeypatch):
    calls = []

    def counted_loss(output, target, reduction="mean"):
        calls.append(reduction)
        return classification_loss(output, target, reduction)

    counted = supervised_task(dataclasses.replace(CLASSIFICATION_SPEC, name="counted", loss=counted_loss))
    monkeypatch.setitem(TASKS, "counted", counted)
    base = train(TINY, 0)
    same = train(TINY.replace(task="counted"), 0)
    # every step of 256 / 64 batches, then the evaluation of the 128 test images (one batch, summed)
    assert calls == (["mean"] * 4 + ["sum"]) * TINY.epochs
    assert same["curves"]["train_loss"] == base["curves"]["train_loss"]

    smoothed = supervised_task(
        dataclasses.replace(
            CLASSIFICATION_SPEC,
            name="smoothed",
            loss=lambda o, t, reduction="mean": torch.nn.functional.cross_entropy(
                o, t, reduction=reduction, label_smoothing=0.3
            ),
        )
    )
    monkeypatch.setitem(TASKS, "smoothed", smoothed)
    assert train(TINY.replace(task="smoothed"), 0)["curves"]["train_loss"] != base["curves"]["train_loss"]
