"""train(): determinism for a seed, exact resume after an interruption, checkpoints, real MNIST smoke."""

import math
import os

import pytest
import torch

from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.progress import Progress
from cdgrad.experiments.setup import load_data, make_scheduler
from cdgrad.experiments.tasks.supervised import CLASSIFICATION_SPEC, evaluate
from cdgrad.experiments.train import train
from helpers import SHARED_DATA, Interrupt, interrupt_after, register_fixtures, synthetic_dataset

register_fixtures()

TINY = RunConfig(dataset="synthetic", model="tiny", epochs=4, batch_size=32, lr=0.1, eval_every=2, threads=1)
METRICS = ("epoch", "train_loss", "train_acc", "test_epoch", "test_loss", "test_acc")


def _curves(result):
    return {k: result["curves"][k] for k in METRICS}


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "none"},
        {"method": "sobolev", "lam": 1.0, "beta": 0.5},
        {"method": "h0", "lam": 3.0, "convention": "paper", "direction": "flat", "scope": "all"},
        {"method": "centralize", "optimizer": "adam", "lr": 0.01, "schedule": "cosine"},
    ],
)
def test_same_seed_same_numbers_and_seed_matters(changes):
    config = TINY.replace(**changes)
    a, b, c = train(config, 0), train(config, 0), train(config, 1)
    assert _curves(a) == _curves(b)
    assert _curves(a) != _curves(c)
    assert a["curves"]["epoch"] == [1, 2, 3, 4]
    assert a["curves"]["test_epoch"] == [2, 4]  # eval_every=2, the last epoch always
    assert all(math.isfinite(v) for v in a["curves"]["train_loss"])


def test_methods_change_the_training():
    base = train(TINY, 0)
    for changes in ({"method": "sobolev", "lam": 1.0}, {"method": "h0", "lam": 4.0}, {"method": "ls", "sigma": 2.0}):
        assert _curves(train(TINY.replace(**changes), 0)) != _curves(base)


def test_sgs_pipelines_train_differently_and_the_authors_one_leaves_the_run_stream_alone():
    """The authors' pipeline measures on batches of its own generator in eval mode: its runs differ from the cdgrad
    pipeline's, and from plain SGD once G is measured; the default pipeline keeps the earlier numbers."""
    sgs = TINY.replace(method="sgs", sgs_every=2, sgs_batches=2)
    authors = train(sgs.replace(sgs_pipeline="authors"), 0)
    assert _curves(authors) != _curves(train(sgs, 0))
    assert _curves(authors) != _curves(train(TINY, 0))
    assert _curves(train(sgs.replace(sgs_pipeline="cdgrad"), 0)) == _curves(train(sgs, 0))


def test_fixed_and_post_optimizer_scalings_change_the_training():
    """sgs-fixed differs from SGD; on the update (Adam) it differs from the same scaling on the gradient."""
    adam = TINY.replace(optimizer="adam", lr=0.01)
    fixed = adam.replace(method="sgs-fixed", sgs_edge=2.0, sgs_corner=4.0)
    on_gradient, on_update = train(fixed, 0), train(fixed.replace(sgs_on="update"), 0)
    assert _curves(on_gradient) != _curves(train(adam, 0))
    assert _curves(on_update) != _curves(on_gradient)


def test_reparameterised_training_is_the_plain_model_after_merging():
    """Method repvgg trains a ResNet-8 of RepVGG blocks: it differs from plain training, and its model, merged, loads
    into the plain ResNet-8 of the same config and computes what the blocks compute."""
    import cdgrad
    from cdgrad.experiments.setup import build

    config = TINY.replace(model="resnet8", epochs=2, eval_every=1)
    rep = train(config.replace(method="repvgg"), 0)
    assert _curves(rep) != _curves(train(config, 0))
    ds = load_data(config)
    run = build(config.replace(method="repvgg"), 0, ds, torch.device("cpu"))
    model = run.units[0].module
    assert any(isinstance(m, cdgrad.reparam.RepBlock) for m in model.modules())
    x = torch.randn(4, *ds.train_x.shape[1:])
    branched = model.eval()(x).detach()
    plain = build(config, 0, ds, torch.device("cpu")).units[0].module
    plain.load_state_dict(cdgrad.reparam.merge(model).state_dict())
    assert torch.allclose(plain.eval()(x), branched, atol=1e-5, rtol=1e-5)


def test_learns_the_synthetic_task():
    result = train(TINY.replace(epochs=15, eval_every=15), 0)
    assert result["final"]["test_acc"] > 60.0  # 4 classes: chance is 25 %


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "none", "augment": True},
        {"method": "none", "schedule": "cosine", "warmup_epochs": 2},
        {"method": "sobolev", "lam": 2.0, "beta": 0.1, "schedule": "step", "step_every": 2},
        {"method": "h0", "lam": 2.0, "optimizer": "adam", "lr": 0.01},
        {"method": "sgs", "sgs_every": 2, "sgs_batches": 2},
        {"method": "sgs", "sgs_every": 2, "sgs_batches": 2, "sgs_pipeline": "authors", "augment": True},
        {"method": "sgs", "sgs_every": 2, "sgs_warmup": 1},
        {"method": "sgs-fixed", "sgs_on": "update", "optimizer": "adam", "lr": 0.01},
        {"method": "dbb", "model": "resnet8"},
        {"method": "opnorm", "clip_norm": 1.0, "clip_every": 3},
    ],
)
def test_resume_after_interruption_gives_identical_numbers(tmp_path, changes):
    config = TINY.replace(epochs=5, **changes)
    full = train(config, 3)
    ckpt = str(tmp_path / "run.pt")
    with pytest.raises(Interrupt):
        train(config, 3, checkpoint=ckpt, callback=interrupt_after(2))
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and len(state["curves"]["epoch"]) == 2
    torch.manual_seed(12345)  # the global RNG state of the new process is irrelevant
    resumed = train(config, 3, checkpoint=ckpt)
    assert _curves(resumed) == _curves(full)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes leave no temporaries


def test_checkpoint_of_another_run_is_set_aside_and_the_run_starts_afresh(tmp_path, capsys):
    ckpt = str(tmp_path / "run.pt")
    first = train(TINY.replace(epochs=1), 0, checkpoint=ckpt)
    # paths, threads and device do not change a run: its checkpoint is accepted (nothing is left to train)
    resumed = train(TINY.replace(epochs=1, threads=2, data_root=str(tmp_path)), 0, checkpoint=ckpt)
    assert "moved it to" not in capsys.readouterr().err
    assert resumed["curves"]["train_loss"] == first["curves"]["train_loss"] and resumed["wall_s"] == first["wall_s"]
    for config, seed in ((TINY.replace(epochs=1), 1), (TINY.replace(epochs=1, lr=0.2), 0)):
        got = train(config, seed, checkpoint=ckpt)
        err = capsys.readouterr().err
        assert "different run" in err and "moved it to" in err and "remove it" not in err
        assert got["curves"]["train_loss"] == train(config, seed)["curves"]["train_loss"]
    assert len([p for p in os.listdir(tmp_path) if ".corrupt-" in p]) == 2


def test_bad_seed_and_config_fail_before_training():
    with pytest.raises(ValueError, match="seed"):
        train(TINY, -1)
    with pytest.raises(ValueError, match="sigma"):
        train(TINY.replace(method="h0", sigma=1.0), 0)


def test_evaluate_matches_a_plain_loop():
    ds = synthetic_dataset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).double()
    x = (ds.test_x.double() / 255 - 0.5) / 0.25
    loss_ref = sum(
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), ds.test_y[i : i + 1]).item() for i in range(len(x))
    ) / len(x)
    acc_ref = 100.0 * sum(int(model(x[i : i + 1]).argmax() == ds.test_y[i]) for i in range(len(x))) / len(x)
    model = model.float()
    loss, scores = evaluate(CLASSIFICATION_SPEC, model, ds.test_x, ds.test_y, (0.5,), (0.25,), batch_size=50)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert scores == {"acc": acc_ref}


@pytest.mark.parametrize(
    "schedule, decay, warmup, expected",
    [
        ("cosine", 0.1, 2, [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]),
        ("step", 0.1, 2, [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 0.1, 0.1]),
        ("constant", 0.1, 1, [0.5] + [1.0] * 6),
    ]
    + [
        (schedule, decay, 0, expected)
        for schedule, decay, expected in [
            ("step", 0.1, [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01]),
            ("step", 0.95, [1.0, 1.0, 1.0, 0.95, 0.95, 0.95, 0.9025]),  # Sedghi et al.'s exponential decay
            ("constant", 0.1, [1.0] * 7),
            ("cosine", 0.1, [0.5 * (1 + math.cos(math.pi * e / 7)) for e in range(7)]),
        ]
    ],
)
def test_schedules(schedule, decay, warmup, expected):
    """Per-epoch lr against closed forms; warm-up W: lr (e+1)/(W+1), then the schedule over the other epochs."""
    config = RunConfig(lr=1.0, epochs=7, step_every=3, schedule=schedule, lr_decay=decay, warmup_epochs=warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(config, opt)
    got = []
    for _ in range(7):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, abs=1e-12)


def test_subsets_and_swap():
    ds = load_data(TINY.replace(train_subset=100, test_subset=50))
    assert (len(ds.train_x), len(ds.test_x)) == (100, 50)
    full = synthetic_dataset()
    sw = load_data(TINY.replace(swap_train_test=True))
    assert torch.equal(sw.train_x, full.test_x) and torch.equal(sw.test_x, full.train_x)


def test_progress_bar_is_quiet_unless_enabled():
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    quiet, loud = Sink(), Sink()
    for sink, enabled in ((quiet, None), (loud, True)):
        bar = Progress(3, "x", enabled=enabled, stream=sink)
        for _ in range(3):
            bar.update(info="loss 1")
        bar.close()
    assert quiet.text == ""
    assert "100%" in loud.text and "3/3" in loud.text and "loss 1" in loud.text


MNIST = str(SHARED_DATA / "mnist")


@pytest.mark.skipif(not os.path.isdir(MNIST), reason="MNIST files not present")
def test_one_real_mnist_epoch_on_a_subset():
    config = RunConfig(
        dataset="mnist",
        data_root=MNIST,
        model="cnn2",
        epochs=1,
        batch_size=20,
        lr=0.05,
        train_subset=1000,
        test_subset=1000,
        method="sobolev",
        lam=1.0,
        threads=1,
    )
    result = train(config, 0)
    assert result["final"]["test_acc"] > 70.0
