"""Run `cdgrad` commands in a fresh process for the fault tests, killing the process (SIGKILL) at a chosen moment.

    python tests/fault_driver.py '<spec as JSON>'

spec keys:
- "commands": list of argument lists for `cdgrad` (cdgrad.experiments.cli.main), run in order; after each one
  `[driver] rc <status>` is printed; the exit status is the last one's.
- "preset": {"name", "base", "variants": [[changes, seeds], ...]}: a preset registered before the commands run.
- "kill": {"at": "step" | "checkpoint-write" | "after-commit", "n": N} or absent: SIGKILL this process at the N-th
  optimizer step, in the middle of writing the N-th checkpoint (half of its bytes written), or at the N-th
  stored run right after its row is committed (before its checkpoint is removed).
- "step_sleep_s": sleep this long before every optimizer step (keeps runs slow enough to overlap).
- "go_file": wait until this file exists before the first command (processes start together).
- "trained_log": append the key of every run this process trains to this file, one per line.
- "counts_file": at the end, write the number of optimizer steps, checkpoint writes and stored runs as JSON.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(spec: dict) -> int:
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cdgrad.experiments import cli
    from cdgrad.experiments import runner as runner_mod
    from cdgrad.experiments import train as train_mod
    from cdgrad.experiments.config import run_key
    from cdgrad.experiments.presets import Preset
    from cdgrad.experiments.store import ResultStore
    from helpers import install_preset, register_fixtures

    register_fixtures()
    if "preset" in spec:
        p = spec["preset"]
        install_preset(Preset(p["name"], "fault-test sweep", p["base"], tuple((c, s) for c, s in p["variants"])))

    kill = spec.get("kill") or {}
    counts = {"step": 0, "checkpoint-write": 0, "after-commit": 0}
    sleep_s = float(spec.get("step_sleep_s", 0.0))

    def before_step(optimizer, args, kwargs):
        counts["step"] += 1
        if kill.get("at") == "step" and counts["step"] == kill["n"]:
            _die()
        if sleep_s:
            time.sleep(sleep_s)

    register_optimizer_step_pre_hook(before_step)

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        counts["checkpoint-write"] += 1
        if kill.get("at") == "checkpoint-write" and counts["checkpoint-write"] == kill["n"] and hasattr(f, "write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save

    real_finish = ResultStore.finish_checkpoint

    def finish_checkpoint(self, config, key, keep=None):
        if os.path.exists(self.checkpoint_path(key)):
            counts["after-commit"] += 1
            if kill.get("at") == "after-commit" and counts["after-commit"] == kill["n"]:
                _die()
        return real_finish(self, config, key, keep)

    ResultStore.finish_checkpoint = finish_checkpoint

    real_train = train_mod.train
    log = spec.get("trained_log")

    def train(config, seed, **kwargs):
        if log:
            with open(log, "a") as fh:
                fh.write(run_key(config, seed) + "\n")
        return real_train(config, seed, **kwargs)

    train_mod.train = train
    runner_mod.train = train  # the runner calls train by the name it imported

    go = spec.get("go_file")
    deadline = time.monotonic() + 60
    while go and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    rc = 0
    for argv in spec["commands"]:
        rc = cli.main(argv)
        print(f"[driver] rc {rc}", flush=True)
    if spec.get("counts_file"):
        with open(spec["counts_file"], "w") as fh:
            json.dump(counts, fh)
    return rc


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
