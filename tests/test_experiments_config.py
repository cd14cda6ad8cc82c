"""RunConfig: command-line round trip, JSON round trip, run identity, registry-driven fields, bad input."""

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.experiments import checks
from cdgrad.experiments import config as cfg
from cdgrad.experiments import data as data_mod
from cdgrad.experiments import models as models_mod
from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.config_cli import add_config_arguments, config_from_args, config_to_argv
from cdgrad.experiments.methods import METHODS, PARAMS
from cdgrad.experiments.presets import PRESETS


def C(**values):
    """A config from flat values: fields and method arguments by name (`C(method="h0", lam=2.0)`)."""
    return cfg.from_dict(values)


def flat(config):
    """The config's fields and method arguments as one flat dict (the form of earlier versions)."""
    out = {k: v for k, v in cfg.to_dict(config).items() if k != "method_args"}
    return {**out, **config.method_args}


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def _value(draw, p):
    """A value inside parameter `p`'s declared choices or range."""
    if p.choices is not None:
        return draw(st.sampled_from(p.accepted_choices()))
    lo = p.minimum if p.minimum is not None else -5.0
    if p.type is int:
        return draw(st.integers(int(lo), int(lo) + 20))
    return draw(st.floats(lo + (0.1 if p.exclusive_minimum or p.name == "lam" else 0.0), lo + 20.0))


DENSE = {  # task -> (data sets, models)
    "segmentation": (("voc2012", "fashion-mnist-scenes"), ("unet-small", "unet-resnet50")),
    "synthesis": (("cityscapes", "mnist-scenes"), ("spade-small", "spade")),
}


@st.composite
def configs(draw):
    method = draw(st.sampled_from(list(METHODS)))
    m = METHODS[method]
    task = draw(st.sampled_from(["classification", "classification", *DENSE]))
    dense = {}
    if task != "classification" and m.reshape is None:
        dense = {
            "task": task,
            "dataset": draw(st.sampled_from(DENSE[task][0])),
            "model": draw(st.sampled_from(DENSE[task][1])),
            "crop": draw(st.integers(0, 512)),
        }
        if task == "synthesis":
            dense["lr_d"] = draw(st.one_of(st.none(), st.floats(1e-5, 1.0)))
            dense["fid_extractor"] = draw(st.sampled_from(["classifier", "inception"]))
            dense["fid_weights"] = draw(st.sampled_from([None, "/weights/pt_inception.pth"]))
    values = {
        "dataset": draw(st.sampled_from(data_mod.DATASETS)),
        # a method that re-parameterises conv + BN pairs needs a model with batch norm
        "model": draw(st.sampled_from([n for n in models_mod.MODELS if m.reshape is None or n != "cnn2"])),
        "epochs": draw(st.integers(1, 300)),
        "batch_size": draw(st.integers(1, 512)),
        "lr": draw(st.floats(1e-5, 1.0)),
        "momentum": draw(st.floats(0.0, 0.99)),
        "weight_decay": draw(st.floats(0.0, 1e-2)),
        "optimizer": draw(st.sampled_from(["sgd", "adam"])),
        "schedule": draw(st.sampled_from(["step", "cosine", "constant"])),
        "swap_train_test": draw(st.booleans()),
        "augment": draw(st.booleans()),
        "train_subset": draw(st.integers(0, 60000)),
        "data_root": draw(st.sampled_from([None, "/data/x", "rel/dir"])),
        "method": method,
        **dense,
    }
    for p in m.params:
        if draw(st.booleans()):
            values[p.name] = _value(draw, p)
    return C(**values)


@settings(max_examples=40, deadline=None)
@given(configs())
def test_cli_round_trip(config):
    checks.validate(config)
    assert _parse(config_to_argv(config)) == config
    assert cfg.from_dict(json.loads(json.dumps(cfg.to_dict(config)))) == config


def test_defaults_and_flags_come_from_the_dataclass():
    assert _parse([]) == RunConfig()
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    for name, f in cfg.FIELDS.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(f.metadata["help"].split()) in text
    for name in data_mod.dataset_names() + models_mod.model_names() + tuple(METHODS):
        assert name in text
    c = _parse(["--method", "h0", "--lam", "2.5", "--swap-train-test", "--epochs", "3", "--data-root", "none"])
    assert (c.method, c.arg("lam"), c.swap_train_test, c.epochs, c.data_root) == ("h0", 2.5, True, 3, None)


# -------------------------------------------------------------------------------------------------- run keys

# The run identity as it was defined before the method registry: these identity fields with these defaults;
# the key hashes the ones that differ. Written out here so that the key's definition cannot drift unnoticed.
LEGACY_IDENTITY_DEFAULTS = {
    "dataset": "fashion-mnist",
    "swap_train_test": False,
    "train_subset": 0,
    "test_subset": 0,
    "augment": False,
    "model": "cnn2",
    "epochs": 10,
    "batch_size": 100,
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "step",
    "step_every": 40,
    "method": "none",
    **dict.fromkeys(
        (
            "lam",
            "beta",
            "sigma",
            "direction",
            "scope",
            "convention",
            "sgs_k",
            "sgs_batches",
            "sgs_every",
            "clip_norm",
            "clip_every",
        )
    ),
    "eval_every": 1,
    # fields added later: at their defaults they are left out of the key, so every earlier key stays valid
    "batchnorm": True,
    "lr_decay": 0.1,
    "clip_projection": None,
    "sgs_pipeline": None,
    "warmup_epochs": 0,
    "sgs_warmup": None,
    "sgs_dependence": None,
    "sgs_on": None,
    "sgs_edge": None,
    "sgs_corner": None,
    "task": "classification",
    "crop": 0,
    "lr_d": None,
    "fid_extractor": "classifier",
}


def legacy_hash(values: dict) -> str:
    changed = {k: v for k, v in values.items() if k in LEGACY_IDENTITY_DEFAULTS and v != LEGACY_IDENTITY_DEFAULTS[k]}
    return hashlib.sha256(json.dumps(changed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def test_run_keys_of_every_preset_are_the_legacy_ones():
    n = 0
    for preset in PRESETS.values():
        for config, seed in preset.runs():
            assert cfg.config_hash(config) == legacy_hash(flat(config)), (preset.name, config)
            assert cfg.run_key(config, seed) == f"{legacy_hash(flat(config))}-s{seed}"
            n += 1
    assert n > 900  # every run of every preset was compared


@settings(max_examples=60, deadline=None)
@given(configs())
def test_run_key_is_the_legacy_one(config):
    assert cfg.config_hash(config) == legacy_hash(flat(config))
    fields = set(cfg.identity_dict(config)) - set(config.method_args)
    assert fields == {k for k in LEGACY_IDENTITY_DEFAULTS if k not in PARAMS} | {"task"}
    assert set(config.method_args) <= set(METHODS[config.method].param_names)


def test_run_key_ignores_paths_device_threads_but_not_hyper_parameters():
    a = C(method="h0", lam=2.0)
    assert cfg.run_key(a, 0) == cfg.run_key(a.replace(data_root="/x", threads=3, device="cpu"), 0)
    assert cfg.run_key(a, 0) != cfg.run_key(a, 1)
    assert cfg.run_key(a, 0) != cfg.run_key(a.replace(lam=2.5), 0)
    assert cfg.run_key(a, 0) != cfg.run_key(a.replace(convention="paper"), 0)


def test_task_is_an_identity_field_from_the_task_registry(monkeypatch):
    from cdgrad.experiments import tasks

    assert RunConfig().task == "classification" and "task" in cfg.identity_dict(RunConfig())
    with pytest.raises(ValueError, match="task must be one of .*'segmentation', 'synthesis'.*got 'detection'"):
        checks.validate(RunConfig(task="detection"))
    monkeypatch.setitem(tasks.TASKS, "detection", tasks.TASKS["classification"])
    other = RunConfig(task="detection")
    checks.validate(other)
    assert cfg.run_key(other, 0) != cfg.run_key(RunConfig(), 0)
    # an old stored config without the field reads back as the default task, with the same key
    old = cfg.to_dict(RunConfig(method="h0"))
    del old["task"]
    assert cfg.run_key(cfg.from_dict(old), 0) == cfg.run_key(RunConfig(method="h0"), 0)


def test_numbers_are_normalised_so_one_config_has_one_key():
    a = RunConfig(lr=np.float64(0.05), epochs=np.int64(3), momentum=np.float32(0.5), augment=np.bool_(True))
    b = RunConfig(lr=0.05, epochs=3, momentum=0.5, augment=True)
    assert a == b and cfg.run_key(a, 0) == cfg.run_key(b, 0)
    assert (type(a.lr), type(a.epochs), type(a.momentum), type(a.augment)) == (float, int, float, bool)
    assert cfg.run_key(RunConfig(lr=1), 0) == cfg.run_key(RunConfig(lr=1.0), 0)
    checks.validate(a)
    json.dumps(cfg.to_dict(a))


# ------------------------------------------------------------------------------------ fields from registries


def test_method_parameters_are_arguments_of_the_method_not_fields():
    assert not set(PARAMS) & set(cfg.FIELDS)  # one mapping, method_args, carries them
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    for name, p in PARAMS.items():
        assert "--" + name.replace("_", "-") in text  # a command-line option each, typed by its declaration
        assert cfg.value_type(name) is p.type
    with pytest.raises(ValueError, match="not a hyper-parameter of method 'sobolev'.*it takes: lam, beta"):
        checks.validate(C(method="sobolev", sigma=1.0))
    with pytest.raises(TypeError, match="method_args must be a mapping"):
        RunConfig(method_args=[("lam", 1.0)])
    c = C(method="h0", lam=2)
    assert c.method_args == {"lam": 2.0} and type(c.arg("lam")) is float and c.arg("beta") is None
    assert c.replace(lam=None).method_args == {} and hash(c) == hash(C(method="h0", lam=2.0))
    used = {p.name for m in METHODS.values() for p in m.params}
    assert used == set(PARAMS)
    for m in METHODS.values():
        for p in m.params:
            assert p.type is PARAMS[p.name].type
            if p.choices is not None:
                assert set(p.accepted_choices()) <= set(PARAMS[p.name].accepted_choices())


def test_registered_data_sets_and_models_are_accepted_then_gone():
    def loader(root, download):
        raise AssertionError("not called by validation")

    assert "regtest-set" not in data_mod.dataset_names()
    with pytest.raises(ValueError, match="dataset must be one of.*mnist"):
        checks.validate(RunConfig(dataset="regtest-set"))
    data_mod.register_dataset("regtest-set", loader)
    models_mod.register_model("regtest-net", lambda num_classes, in_channels, image_size: None)
    try:
        checks.validate(RunConfig(dataset="regtest-set", model="regtest-net"))
        assert _parse(["--dataset", "regtest-set", "--model", "regtest-net"]).dataset == "regtest-set"
    finally:
        data_mod.DATASET_REGISTRY.unregister("regtest-set")
        models_mod.MODEL_REGISTRY.unregister("regtest-net")
    with pytest.raises(ValueError, match="model must be one of"):
        checks.validate(RunConfig(model="regtest-net"))
    with pytest.raises(SystemExit):
        _parse(["--dataset", "regtest-set"])


def test_help_of_a_fresh_process_lists_no_test_fixtures():
    out = subprocess.run(
        [sys.executable, "-m", "cdgrad.experiments.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "fashion-mnist" in out and "resnet56" in out and "sobolev" in out
    assert "synthetic" not in out and "tiny" not in out


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"method": "ls", "lam": 1.0}, ["lam", "ls", "sigma"]),
        ({"method": "h0", "sigma": 0.5}, ["sigma", "h0", "lam"]),
        ({"method": "none", "beta": 0.1}, ["beta", "none"]),
        ({"method": "centralize", "direction": "output"}, ["direction", "centralize"]),
        ({"method": "ls", "direction": "input"}, ["direction", "flat", "output"]),
        ({"method": "h0", "lam": 0.0}, ["lam"]),
        ({"method": "h0", "lam": -1.0, "convention": "paper"}, ["lam"]),
        ({"method": "sgs", "sgs_k": 0.0}, ["sgs_k"]),
        ({"method": "sgs", "sgs_every": 0}, ["sgs_every", ">= 1"]),
        ({"method": "opnorm", "clip_every": 0}, ["clip_every", ">= 1"]),
        ({"method": "opnorm", "clip_projection": "svd"}, ["clip_projection", "exact", "reshaped", "gram"]),
        ({"method": "none", "clip_projection": "gram"}, ["clip_projection", "none"]),
        ({"batchnorm": False}, ["batchnorm", "cnn2", "resnet8", "vgg16"]),
        ({"lr_decay": 0.0}, ["lr_decay", "(0, 1]"]),
        ({"lr_decay": 1.5}, ["lr_decay", "(0, 1]"]),
        ({"method": "bogus"}, ["method", "h0", "sobolev"]),
        ({"model": "resnet99"}, ["model", "cnn2"]),
        ({"dataset": "imagenet"}, ["dataset", "mnist"]),
        ({"optimizer": "rmsprop"}, ["optimizer", "adam"]),
        ({"epochs": 0}, ["epochs", ">= 1"]),
        ({"momentum": 1.0}, ["momentum", "[0, 1)"]),
        ({"lr": -0.1}, ["lr", "> 0"]),
        ({"train_subset": -1}, ["train_subset", ">= 0"]),
        ({"device": "tpu9"}, ["device"]),
    ],
)
def test_bad_configs_name_the_parameter(changes, words):
    with pytest.raises(ValueError) as info:
        checks.validate(C(**changes))
    for w in words:
        assert w in str(info.value)


NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize(
    "changes, name",
    [
        ({}, "lr"),
        ({}, "momentum"),
        ({}, "weight_decay"),
        ({"method": "h0"}, "lam"),
        ({"method": "sobolev"}, "beta"),
        ({"method": "ls"}, "sigma"),
        ({"method": "sgs"}, "sgs_k"),
        ({"method": "opnorm"}, "clip_norm"),
    ],
)
def test_every_float_option_rejects_non_finite_values(changes, name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be a finite real number"):
        checks.validate(C(**changes, **{name: bad}))


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_weight_decay_nan_from_the_command_line_is_refused(text):
    config = _parse([f"--weight-decay={text}"])
    with pytest.raises(ValueError, match=r"weight_decay must be a finite real number >= 0"):
        checks.validate(config)


def test_every_numeric_field_is_range_checked():
    """Each int/float field refuses a value below its declared minimum, naming it and the range."""
    checked = 0
    options = {name: (f.metadata["option"], cfg.FIELD_TYPES[name]) for name, f in cfg.FIELDS.items()}
    options.update({name: (p, p.type) for name, p in PARAMS.items()})
    for name, (option, kind) in options.items():
        if kind not in (int, float):
            continue
        assert option.minimum is not None or name == "beta", f"{name} declares no range"
        if option.minimum is None:
            continue
        method = next((m.name for m in METHODS.values() if name in m.param_names), "none")
        below = kind(option.minimum) - (1 if kind is int else 0.5)
        with pytest.raises(ValueError, match=rf"{name} must be .*{re.escape(option.range_text())}"):
            checks.validate(C(method=method, **{name: below}))
        checked += 1
    assert checked >= 15


def test_bad_types_and_unknown_fields():
    with pytest.raises(TypeError, match="epochs"):
        checks.validate(RunConfig(epochs="3"))
    with pytest.raises(TypeError, match="epochs must be an int"):
        checks.validate(RunConfig(epochs=2.5))
    with pytest.raises(TypeError, match="augment"):
        checks.validate(RunConfig(augment=1))
    with pytest.raises(TypeError, match="lr must be a finite real number"):
        checks.validate(RunConfig(lr="0.1"))
    with pytest.raises(TypeError, match="lam"):
        checks.validate(C(method="h0", lam="1"))
    with pytest.raises(TypeError, match="method must be one of"):
        checks.validate(RunConfig(method=3))
    with pytest.raises(TypeError, match="dataset must be a str"):
        checks.validate(RunConfig(dataset=None))
    with pytest.raises(TypeError, match="config must be a RunConfig"):
        checks.validate({"method": "h0"})
    with pytest.raises(ValueError, match="unknown config field"):
        cfg.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="field=value"):
        cfg.parse_overrides(["epochs3"])
    with pytest.raises(ValueError, match="epochs must be of type int"):
        cfg.parse_overrides(["epochs=three"])
    assert cfg.parse_overrides(["data-root=/x", "lam=none", "augment=yes"]) == {
        "data_root": "/x",
        "lam": None,
        "augment": True,
    }


def test_reparameterising_methods_need_batch_norm():
    for method in ("acb", "repvgg", "dbb"):
        with pytest.raises(ValueError, match=f"method '{method}' re-parameterises conv \\+ BatchNorm pairs"):
            checks.validate(RunConfig(method=method, model="cnn2"))
        with pytest.raises(ValueError, match="needs batchnorm=True"):
            checks.validate(RunConfig(method=method, model="resnet8", batchnorm=False))
        checks.validate(RunConfig(method=method, model="resnet8"))
