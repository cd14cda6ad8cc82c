"""The dense tasks in the toolkit: segmentation and image synthesis runs through the same config, training entry
point, checkpoints, report and checks as classification; their metrics against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from cdgrad.experiments import report as report_mod
from cdgrad.experiments import setup as setup_mod
from cdgrad.experiments.checks import validate
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.runner import prepare
from cdgrad.experiments.setup import build, load_data
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.tasks import get_task, synthesis
from cdgrad.experiments.tasks.supervised import segmentation_loss
from cdgrad.experiments.tasks.synthesis import check_fid_source, presence
from cdgrad.experiments.train import train
from helpers import Interrupt, dense_synthetic_dataset, interrupt_after, register_fixtures

register_fixtures()

SEG = RunConfig(
    task="segmentation", dataset="synthetic-dense", model="unet-small", epochs=2, batch_size=8, lr=0.05, threads=1
)
GAN = RunConfig(
    task="synthesis",
    dataset="synthetic-dense",
    model="spade-small",
    epochs=2,
    batch_size=8,
    lr=1e-3,
    train_subset=16,
    threads=1,
)


def _without_times(metrics):
    return {k: v for k, v in metrics["curves"].items() if k != "epoch_time"}, metrics["final"]


def brute_force_miou(pred, target, classes):
    """Mean IoU over the classes present in prediction or truth: pixel sets counted one pixel at a time."""
    inter, union = [0] * classes, [0] * classes
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t == 255:
            continue
        for c in range(classes):
            inter[c] += p == c and t == c
            union[c] += p == c or t == c
    ious = [100.0 * i / u for i, u in zip(inter, union, strict=True) if u > 0]
    return sum(ious) / len(ious)


def test_segmentation_loss_leaves_out_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 1, 2] = target[1, 0, 0] = 255
    terms = [
        -F.log_softmax(logits[n, :, i, j], 0)[target[n, i, j]].item()
        for n in range(2)
        for i in range(3)
        for j in range(5)
        if target[n, i, j] != 255
    ]
    assert segmentation_loss(logits, target, "sum").item() == pytest.approx(sum(terms), rel=1e-12)
    assert segmentation_loss(logits, target).item() == pytest.approx(sum(terms) / 28, rel=1e-12)


def test_segmentation_run_reports_miou_and_the_gap_of_one_evaluation(tmp_path):
    path = str(tmp_path / "ck.pt")
    out = train(SEG, 0, checkpoint=path)
    final = out["final"]
    assert set(get_task("segmentation").curves) == set(out["curves"])
    assert len(out["curves"]["test_miou"]) == len(out["curves"]["test_epoch"]) == 2
    assert final["gap_miou"] == final["train_miou"] - final["test_miou"]
    assert final["test_miou"] == out["curves"]["test_miou"][-1]
    # the final model (from the last checkpoint) scored again, one pixel at a time
    ds = dense_synthetic_dataset()
    model = build(SEG, 0, ds, torch.device("cpu")).units[0].module
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    model.eval()
    for x, y, key in ((ds.train_x, ds.train_y, "train_miou"), (ds.test_x, ds.test_y, "test_miou")):
        with torch.no_grad():
            pred = model((x.float() / 255 - 0.5) / 0.25).argmax(1)
        assert final[key] == pytest.approx(brute_force_miou(pred, y, 3), abs=1e-9)


def test_segmentation_resumes_to_the_uninterrupted_numbers(tmp_path):
    config = SEG.replace(augment=True, crop=16)
    full = train(config, 1)
    path = str(tmp_path / "ck.pt")
    with pytest.raises(Interrupt):
        train(config, 1, checkpoint=path, callback=interrupt_after(1))
    assert _without_times(train(config, 1, checkpoint=path)) == _without_times(full)


def test_synthesis_run_scores_fid_trains_both_networks_and_resumes(tmp_path, monkeypatch):
    plain = train(GAN, 0)
    assert set(plain["curves"]) == set(get_task("synthesis").curves)
    assert math.isfinite(plain["final"]["test_fid"]) and plain["final"]["test_fid"] > 0
    assert plain["final"]["test_fid"] == plain["curves"]["test_fid"][-1]
    attached, original = [], setup_mod.build

    def spy(*args, **kwargs):
        run = original(*args, **kwargs)
        attached.extend(run.units)
        return run

    monkeypatch.setattr(setup_mod, "build", spy)
    monkeypatch.setattr("cdgrad.experiments.train.build", spy)
    h0 = train(GAN.replace(method="h0", lam=5.0), 0)  # lam 1 is the plain gradient (method.md 1.1)
    assert h0["final"]["test_fid"] != plain["final"]["test_fid"]
    # the method went to both networks, each through its own optimizer over exactly its parameters
    assert [type(u.module).__name__ for u in attached] == ["SPADEGenerator", "MultiscaleDiscriminator"]
    for unit in attached:
        params = {id(p) for p in unit.module.parameters()}
        assert {id(p) for group in unit.optimizer.param_groups for p in group["params"]} == params
        assert unit.method is not None and unit.method.config()["lam"] == 5.0
    path = str(tmp_path / "ck.pt")
    with pytest.raises(Interrupt):
        train(GAN, 0, checkpoint=path, callback=interrupt_after(1))
    assert _without_times(train(GAN, 0, checkpoint=path)) == _without_times(plain)


def test_stored_fid_statistics_replace_the_computed_ones_and_bad_files_fail_first(tmp_path):
    from cdgrad.experiments.fid import extract_features, feature_statistics, save_statistics

    config = GAN.replace(epochs=1)
    ds = load_data(config)  # the run's data (its training subset trains the FID classifier)
    real = feature_statistics(extract_features(synthesis.fid_extractor(config, ds), ds.test_x))
    good, wrong = tmp_path / "real.npz", tmp_path / "wrong.npz"
    save_statistics(good, *real)
    save_statistics(wrong, real[0][:5], real[1][:5, :5])
    assert train(config.replace(fid_stats=str(good)), 0)["final"] == train(config, 0)["final"]
    with pytest.raises(ValueError, match=f"{wrong}.*expected \\(128,\\)"):
        prepare([(config.replace(fid_stats=str(wrong)), 0)], ResultStore(str(tmp_path / "results")))
    assert not (tmp_path / "results").exists()


def test_presence_marks_the_classes_a_label_map_holds():
    y = torch.tensor([[[0, 2], [255, 2]], [[1, 1], [0, 0]]])
    assert presence(y, 3).tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_the_fid_classifier_scales_the_real_features_to_unit_mean_variance():
    ds = dense_synthetic_dataset()
    model = synthesis.train_presence_classifier(ds, epochs=1, batch_size=8)
    with torch.no_grad():
        features = model(ds.train_x).double()
    assert features.shape == (24, 128)
    assert features.var(0).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_task_data_and_model_mismatches_fail_before_anything_is_written(tmp_path):
    results = tmp_path / "results"
    with pytest.raises(ValueError, match="'segmentation' needs a data set with per-pixel label maps.*'synthetic'"):
        prepare([(SEG.replace(dataset="synthetic"), 0)], ResultStore(str(results)))
    with pytest.raises(ValueError, match="'classification' needs a data set with one class per image"):
        prepare([(RunConfig(dataset="synthetic-dense", model="tiny"), 0)], ResultStore(str(results)))
    assert not results.exists()
    with pytest.raises(ValueError, match="task 'segmentation': model must be one of unet-small, unet-resnet50"):
        validate(SEG.replace(model="tiny"))
    with pytest.raises(ValueError, match="task 'classification': model must be one of .*got 'spade'"):
        validate(RunConfig(model="spade"))
    with pytest.raises(
        ValueError, match="lr_d applies to task 'synthesis' only; leave it unset for task 'segmentation'"
    ):
        validate(SEG.replace(lr_d=0.1))


def test_the_inception_weights_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="fid_extractor=inception needs fid_weights"):
        check_fid_source(GAN.replace(fid_extractor="inception"))
    bad = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match=str(bad)):
        prepare([(GAN.replace(fid_extractor="inception", fid_weights=str(bad)), 0)], None)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        check_fid_source(GAN.replace(fid_extractor="inception", fid_weights=str(tmp_path / "missing.pth")))


def _run(config, seed, final):
    from cdgrad.experiments.store import Run

    return Run(f"k{seed}{config.method}", seed, config, "0", {}, {}, final, 1.0, "")


def test_reports_take_the_primary_metric_and_its_direction_from_the_task():
    seg = [_run(SEG, s, {"test_miou": 50.0 + s, "test_acc": 90.0, "gap_miou": 2.0}) for s in range(3)]
    seg += [
        _run(SEG.replace(method="h0"), s, {"test_miou": 60.0 + s, "test_acc": 91.0, "gap_miou": 1.0}) for s in range(3)
    ]
    (setting,) = report_mod.summarize(seg)
    base, h0 = setting.rows
    assert (base.mean, h0.mean) == (51.0, 61.0)
    assert h0.reduction == pytest.approx((49.0 - 39.0) / 49.0)
    assert h0.extra == {"test_acc": (91.0, 0.0), "gap_miou": (1.0, 0.0)}
    text = report_mod.markdown([setting])
    assert (
        "| test mIoU % (mean ± std) | 95% CI | test acc % (mean ± std) | mIoU gap, train - test (mean ± std) |" in text
    )
    gan = [_run(GAN, s, {"test_fid": 20.0 + s}) for s in range(3)]
    gan += [_run(GAN.replace(method="h0"), s, {"test_fid": 15.0 + s}) for s in range(3)]
    (setting,) = report_mod.summarize(gan)
    assert setting.rows[1].reduction == pytest.approx((21.0 - 16.0) / 21.0)  # a lower FID is a reduction
    assert "| FID (mean ± std) |" in report_mod.markdown([setting])


@pytest.mark.parametrize("base", [SEG, GAN], ids=["segmentation", "synthesis"])
def test_a_dense_preset_runs_reports_and_draws_samples_from_the_stored_models(tmp_path, capsys, base):
    from pathlib import Path

    from cdgrad.experiments import cli
    from cdgrad.experiments.config import run_key, to_dict
    from cdgrad.experiments.presets import Preset, grid
    from cdgrad.experiments.store import ResultStore
    from helpers import flip_tensor_byte, install_preset, uninstall_preset

    fields = {k: v for k, v in to_dict(base.replace(epochs=1, save_model=True)).items() if v != getattr(RunConfig(), k)}
    methods = [{"method": "none"}, {"method": "h0", "lam": 5.0}]
    preset = Preset("dense-test", "dense", fields, grid([{}], methods, 1), plots=("curves", "hist", "samples"))
    install_preset(preset)
    try:
        results, out = str(tmp_path / "res"), str(tmp_path / "out")
        argv = ["run", "dense-test", "--results", results, "--out", out]
        assert cli.main(argv) == 0
        primary = get_task(base.task).primary
        assert f"Metric: final {primary.label}" in capsys.readouterr().out
        path = Path(out, "dense-test_samples.png")
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
        text = Path(out, "dense-test.md").read_text()
        assert ("| FID (mean ± std) |" if base.task == "synthesis" else "| test mIoU % (mean ± std) |") in text
        # a kept model with one flipped byte is set aside, not drawn from: the plot shows the other method only
        damaged = ResultStore(results).model_path(run_key(*preset.runs()[1]))
        Path(damaged).write_bytes(flip_tensor_byte(Path(damaged).read_bytes()))
        assert cli.main(["report", "dense-test", "--results", results, "--out", out]) == 0
        err = capsys.readouterr().err
        assert damaged in err and "CRC-32" in err and "leaving it out of the samples plot" in err
        assert not Path(damaged).exists() and path.stat().st_size > 1000
    finally:
        uninstall_preset(preset.name)


def test_train_command_prints_the_task_metrics_per_epoch(tmp_path, capsys):
    from cdgrad.experiments import cli

    argv = ["train", "--task", "segmentation", "--dataset", "synthetic-dense", "--model", "unet-small"]
    assert cli.main([*argv, "--epochs", "1", "--batch-size", "8", "--threads", "1", "--no-store"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("epoch"))
    assert "train loss" in line and " miou " in line and "test loss" in line and "acc" in line
