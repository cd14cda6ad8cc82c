"""RunConfig: command-line round trip, JSON round trip, run identity, and rejection of bad input."""

import argparse
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.experiments import config as cfg
from cdgrad.experiments.config import RunConfig, add_config_arguments, config_from_args, config_to_argv
from cdgrad.experiments.methods import METHODS


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@st.composite
def configs(draw):
    method = draw(st.sampled_from(list(METHODS)))
    m = METHODS[method]
    values = {
        "dataset": draw(st.sampled_from(cfg.DATASET_CHOICES)),
        "model": draw(st.sampled_from(cfg.MODEL_CHOICES)),
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
    }
    if "lam" in m.params and draw(st.booleans()):
        values["lam"] = draw(st.floats(0.1, 20.0))
    if "beta" in m.params and draw(st.booleans()):
        values["beta"] = draw(st.floats(0.0, 2.0))
    if "sigma" in m.params and draw(st.booleans()):
        values["sigma"] = draw(st.floats(0.0, 3.0))
    if m.directions and draw(st.booleans()):
        values["direction"] = draw(st.sampled_from(m.directions))
    if "scope" in m.params and draw(st.booleans()):
        values["scope"] = draw(st.sampled_from(["conv", "all"]))
    if "convention" in m.params and draw(st.booleans()):
        values["convention"] = draw(st.sampled_from(["exact", "paper"]))
    if method == "sgs":
        values["sgs_k"] = draw(st.floats(1.0, 10.0))
        values["sgs_every"] = draw(st.integers(1, 10))
    if method == "opnorm":
        values["clip_norm"] = draw(st.floats(0.1, 2.0))
    return RunConfig(**values)


@settings(max_examples=40, deadline=None)
@given(configs())
def test_cli_round_trip(config):
    cfg.validate(config)
    assert _parse(config_to_argv(config)) == config
    assert cfg.from_dict(json.loads(json.dumps(cfg.to_dict(config)))) == config


def test_defaults_and_flags_come_from_the_dataclass():
    assert _parse([]) == RunConfig()
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for name, f in cfg.FIELDS.items():
        assert "--" + name.replace("_", "-") in text
        assert f.metadata["help"].split()[0] in text
    c = _parse(["--method", "h0", "--lam", "2.5", "--swap-train-test", "--epochs", "3", "--data-root", "none"])
    assert (c.method, c.lam, c.swap_train_test, c.epochs, c.data_root) == ("h0", 2.5, True, 3, None)


def test_run_key_ignores_paths_device_threads_but_not_hyper_parameters():
    a = RunConfig(method="h0", lam=2.0)
    assert cfg.run_key(a, 0) == cfg.run_key(a.replace(data_root="/x", threads=3, device="cpu"), 0)
    assert cfg.run_key(a, 0) != cfg.run_key(a, 1)
    assert cfg.run_key(a, 0) != cfg.run_key(a.replace(lam=2.5), 0)
    assert cfg.run_key(a, 0) != cfg.run_key(a.replace(convention="paper"), 0)


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
        ({"method": "bogus"}, ["method", "h0", "sobolev"]),
        ({"model": "resnet99"}, ["model", "cnn2"]),
        ({"dataset": "imagenet"}, ["dataset", "mnist"]),
        ({"optimizer": "rmsprop"}, ["optimizer", "adam"]),
        ({"epochs": 0}, ["epochs"]),
        ({"momentum": 1.0}, ["momentum"]),
        ({"lr": -0.1}, ["lr"]),
        ({"device": "tpu9"}, ["device"]),
    ],
)
def test_bad_configs_name_the_parameter(changes, words):
    with pytest.raises(ValueError) as info:
        cfg.validate(RunConfig(**changes))
    for w in words:
        assert w in str(info.value)


def test_bad_types_and_unknown_fields():
    with pytest.raises(TypeError, match="epochs"):
        cfg.validate(RunConfig(epochs="3"))
    with pytest.raises(TypeError, match="augment"):
        cfg.validate(RunConfig(augment=1))
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
