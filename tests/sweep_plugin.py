"""A `CDGRAD_PLUGINS` module for the executor tests: `setup` registers the test data set and models and the test
presets in every process of a sweep (the coordinator, local workers, SLURM jobs), and installs hooks the tests
steer through environment variables:

- `CDGRAD_TEST_STEPS_DIR`: every process writes its number of optimizer steps to `<dir>/steps-<pid>`;
- `CDGRAD_TEST_HOLD_AT=N` with `CDGRAD_TEST_RELEASE=<file>`: at its N-th optimizer step a process writes its pid
  to `<file>.held-<pid>` and waits until `<file>` exists (a run held mid-way, after its first checkpoints).

The model "broken" raises when built: a run that fails.
"""

from __future__ import annotations

import os
import time

from helpers import install_preset, register_fixtures

BASE = {"dataset": "synthetic", "model": "tiny", "epochs": 3, "batch_size": 64, "lr": 0.1, "threads": 1}
STEPS_PER_EPOCH = 4  # 256 training images in batches of 64


class Broken(Exception):
    """Raised when the "broken" model is built."""


def _broken(*args: object, **kwargs: object):
    raise Broken("this model fails on purpose")


def presets():
    from cdgrad.experiments.presets import Preset

    methods = ({"method": "none"}, {"method": "sobolev", "lam": 1.0, "beta": 0.5})
    return (
        Preset("sweep-test", "executor test sweep", BASE, tuple((m, 2) for m in methods)),
        Preset("sweep-fail", "one configuration fails", BASE, (({"method": "none"}, 2), ({"model": "broken"}, 1))),
        Preset("sweep-one", "one long run", {**BASE, "epochs": 4}, (({"method": "none"}, 1),)),
    )


def setup() -> None:
    from cdgrad.experiments import models

    register_fixtures()
    models.register_model("broken", _broken)
    for preset in presets():
        install_preset(preset)
    _install_hooks()


def teardown() -> None:
    """Remove the test presets `setup` added (the data set and models stay: other tests register them too)."""
    from helpers import uninstall_preset

    for preset in presets():
        uninstall_preset(preset.name)


_INSTALLED: list[bool] = []


def _install_hooks() -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps_dir, hold_at = os.environ.get("CDGRAD_TEST_STEPS_DIR"), int(os.environ.get("CDGRAD_TEST_HOLD_AT", "0"))
    release = os.environ.get("CDGRAD_TEST_RELEASE")
    if _INSTALLED or not (steps_dir or hold_at):
        return
    _INSTALLED.append(True)
    count = [0]

    def before_step(optimizer, args, kwargs):
        count[0] += 1
        if steps_dir:
            with open(os.path.join(steps_dir, f"steps-{os.getpid()}"), "w") as fh:
                fh.write(str(count[0]))
        if hold_at and release and count[0] == hold_at and not os.path.exists(release):
            with open(f"{release}.held-{os.getpid()}", "w") as fh:
                fh.write(str(os.getpid()))
            while not os.path.exists(release):
                time.sleep(0.05)

    register_optimizer_step_pre_hook(before_step)
