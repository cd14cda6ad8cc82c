"""The `cdgrad` command line on tiny synthetic data: train, run, report, list, help and bad input."""

import os
from pathlib import Path

import pytest

from cdgrad.experiments import cli
from cdgrad.experiments import presets as presets_mod
from cdgrad.experiments.presets import Preset, grid
from cdgrad.experiments.store import ResultStore
from helpers import install_preset, register_fixtures, uninstall_preset

register_fixtures()

TINY = {"dataset": "synthetic", "model": "tiny", "epochs": 3, "batch_size": 64, "lr": 0.1, "threads": 1}


@pytest.fixture
def tiny_preset():
    preset = Preset(
        "tiny-test",
        "tiny synthetic sweep",
        dict(TINY, eval_every=1),
        grid(
            [{}],
            [
                {"method": "none"},
                {"method": "h0", "lam": 2.0, "convention": "paper"},
                {"method": "sobolev", "lam": 2.0, "convention": "paper"},
            ],
            2,
        ),
        plots=("curves", "hist", "lambda"),
        cuts="everything",
    )
    install_preset(preset)
    yield preset
    uninstall_preset(preset.name)


def test_run_then_rerun_then_report(tmp_path, tiny_preset, capsys):
    results, out = str(tmp_path / "res"), str(tmp_path / "out")
    assert cli.main(["run", "tiny-test", "--results", results, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "6 to train" in text
    assert "| method | seeds | test acc % (mean ± std) | 95% CI |" in text
    assert "baseline" in text and "sobolev lam=2 (paper)" in text
    for kind in ("curves", "hist", "lambda"):
        path = os.path.join(out, f"tiny-test_{kind}.png")
        assert os.path.getsize(path) > 1000 and Path(path).read_bytes()[:4] == b"\x89PNG"
    assert "6 of 6 runs complete" in Path(out, "tiny-test.md").read_text()
    assert len(ResultStore(results).done_keys()) == 6
    assert not os.listdir(os.path.join(results, "checkpoints"))  # removed once stored

    assert cli.main(["run", "tiny-test", "--results", results, "--no-plots", "--out", out]) == 0
    assert "6 already complete, 0 to train" in capsys.readouterr().out
    assert cli.main(["report", "--results", results]) == 0
    assert "## tiny-test" in capsys.readouterr().out
    assert (
        cli.main(["run", "tiny-test", "--results", results, "--dry-run", "--set", "epochs=4", "--where", "method=none"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("todo") for line in lines)


def test_train_subcommand_stores_and_skips(tmp_path, capsys):
    results = str(tmp_path / "res")
    argv = ["train", "--results", results, "--seed", "1", "--method", "ls", "--sigma", "0.5"]
    argv += [x for k, v in TINY.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch   3" in out and '"test_acc"' in out
    assert cli.main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    (run,) = ResultStore(results).runs()
    assert run.config.method == "ls" and run.config.arg("sigma") == 0.5 and run.seed == 1


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "no-such-preset"], ["unknown preset", "demo"]),
        (["train", "--dataset", "synthetic", "--model", "tiny", "--method", "h0", "--sigma", "1"], ["sigma", "h0"]),
        (["train", "--dataset", "synthetic", "--model", "tiny", "--method", "none", "--lam", "2"], ["lam", "none"]),
        (["run", "demo", "--set", "lam=3"], ["lam", "none"]),
        (["run", "demo", "--set", "epochz=3"], ["unknown config field"]),
        (["report", "nope"], ["unknown preset"]),
    ],
)
def test_bad_input_is_a_clear_error_and_the_store_is_untouched(tmp_path, capsys, argv, words):
    results = tmp_path / "res"
    store = ResultStore(str(results))
    store.save(presets_mod.PRESETS["demo"].runs()[0][0], 0, {"curves": {}, "final": {"test_acc": 1.0}, "wall_s": 0.0})
    before = Path(store.path).read_bytes()
    assert cli.main(argv + ["--results", str(results)]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert Path(store.path).read_bytes() == before


def test_argparse_rejects_unknown_choices(capsys):
    for argv in (["train", "--model", "resnet99"], ["train", "--method", "adagrad"], ["train", "--dataset", "x"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_missing_data_and_unwritable_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CDGRAD_DATA", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert (
        cli.main(
            ["train", "--dataset", "mnist", "--data-root", str(tmp_path / "none"), "--results", str(tmp_path / "r")]
        )
        == 2
    )
    assert "mnist" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert cli.main(["train", "--dataset", "synthetic", "--model", "tiny", "--results", str(tmp_path / "f" / "r")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_help_of_every_subcommand(capsys):
    for sub in ("train", "run", "report", "list", "analyze"):
        with pytest.raises(SystemExit) as info:
            cli.main([sub, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: cdgrad " + sub)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in (
        "--lam",
        "lambda of h0 / sobolev",
        "--swap-train-test",
        "--eval-every",
        "(default: cnn2)",
        "(default: the method's)",
    ):
        assert words in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "cdgrad run demo" in capsys.readouterr().out


def test_list(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("demo", "fig6", "fig6-reduced", "table2", "table2-reduced", "ablation", "ablation-reduced"):
        assert name in text
    assert "reduced:" in text
    assert cli.main(["list", "--methods"]) == 0
    text = capsys.readouterr().out
    assert "sobolev" in text and "sigma" in text and "sgs_k" in text


def test_saved_model_feeds_analyze(tmp_path, capsys):
    results = str(tmp_path / "res")
    argv = ["train", "--results", results, "--save-model", "--method", "sobolev", "--lam", "1"]
    argv += [x for k, v in TINY.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert cli.main(argv) == 0
    (run,) = ResultStore(results).runs()
    path = ResultStore(results).model_path(run.key)
    assert os.path.exists(path) and not os.listdir(os.path.join(results, "checkpoints"))
    capsys.readouterr()
    assert cli.main(["analyze", path, "--out-dir", str(tmp_path / "an"), "--input-size", "8"]) == 0
    assert "conv" in capsys.readouterr().out


def test_clipping_preset_with_every_projection_reports_the_published_number(tmp_path, capsys):
    """A spectral-style sweep: each projection ends with conv norms where it promises, the report prints the
    paper's number and writes the wall-time plot."""
    import torch

    from cdgrad.norm_bounds import reshaped_norm
    from cdgrad.spectral import conv_operator_norm

    methods = [{"method": "none"}] + [
        {"method": "opnorm", "clip_norm": 0.3, "clip_every": 1, "clip_projection": p}
        for p in ("exact", "reshaped", "gram")
    ]
    preset = Preset(
        "tiny-clip",
        "tiny clipping sweep",
        dict(TINY, epochs=2, save_model=True),
        grid([{}], methods, 1),
        plots=("curves", "walltime"),
        published="test error 6.2% to 5.3% (a stand-in)",
    )
    install_preset(preset)
    try:
        results, out = str(tmp_path / "res"), str(tmp_path / "out")
        assert cli.main(["run", "tiny-clip", "--results", results, "--out", out]) == 0
        text = capsys.readouterr().out
        assert "Published: test error 6.2% to 5.3% (a stand-in)." in text
        assert "opnorm clip_norm=0.3 clip_every=1 clip_projection=gram" in text
        assert os.path.getsize(os.path.join(out, "tiny-clip_walltime.png")) > 1000
        store = ResultStore(results)
        for run in store.runs():
            state = torch.load(store.model_path(run.key), weights_only=True)
            model = state.get("model", state)
            convs = {k: v.double() for k, v in model.items() if k.endswith(".weight") and v.dim() == 4}
            sizes = {"conv1.weight": 8, "conv2.weight": 4}  # the synthetic 8x8 images, then a 2x2 pool
            projection = run.config.arg("clip_projection")
            for name, w in convs.items():
                if projection == "reshaped":
                    assert float(reshaped_norm(w)) <= 0.3 * (1 + 1e-5)
                elif projection == "gram":
                    assert float(conv_operator_norm(w, sizes[name])) <= 0.3 * (1 + 1e-5)
                elif projection is None:  # no clipping: the trained layers are far outside the ball
                    assert float(conv_operator_norm(w, sizes[name])) > 0.3
    finally:
        uninstall_preset("tiny-clip")
