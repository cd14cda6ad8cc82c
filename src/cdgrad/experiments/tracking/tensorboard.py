"""The TensorBoard sink: one event folder per run key under `<results>/tensorboard/`, written by
`torch.utils.tensorboard.SummaryWriter`.

Scalars are written in double precision (TensorBoard's scalar tensors), so they read back equal to the stored
curves. Per step: `step/train_loss`, `step/lr` (and the discriminator's for image synthesis); per epoch, at the
step ending it: every curve under its own name (`train_loss`, `test_acc`, `epoch_time`, ...) and the method's
`diagnostics/...`; at the end, `final/<metric>` and the HParams session (the config's set fields and the status),
so the HParams dashboard compares the runs of a preset.

Resume: the sink's state in each checkpoint is the size of every event file of the run once flushed. A resumed
run first cuts its event files back to those sizes and deletes files the checkpoint does not know (written by a
process killed before its next checkpoint), so whatever was written after the checkpoint is gone from disk and
the resumed process writes those steps once; a fresh run starts from an empty folder (a leftover of a run killed
before its first checkpoint). The new writer also starts with TensorBoard's purge at the checkpoint's step + 1
(`purge_step`), which readers that apply it (TensorBoard's own) honour too.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cdgrad.experiments.config import to_dict
from cdgrad.experiments.tracking import RunInfo, Sink

__all__ = ["TensorBoardSink", "hparam_values"]


def hparam_values(config_dict: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The config's set fields (None left out) as HParams values: bool, int, float and str kept, others as text."""
    out: dict[str, Any] = {}
    for name, value in {**config_dict, "seed": seed}.items():
        if value is None:
            continue
        out[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


def _event_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))


def _cut_back(folder: str, sizes: Mapping[str, int]) -> None:
    """Truncate each event file in `folder` to its size in `sizes`; delete those `sizes` does not name."""
    for path in _event_files(folder):
        size = sizes.get(os.path.basename(path))
        if size is None:
            os.remove(path)
        elif os.path.getsize(path) > size:
            os.truncate(path, size)


def _after_older_files(folder: str) -> None:
    """Wait until the clock's second is past that of the newest event file in `folder`: event files are read in
    name order, and the name starts with the creation second, so the new file must sort after the old ones."""
    newest = 0
    for path in _event_files(folder):
        try:
            newest = max(newest, int(os.path.basename(path).split(".")[3]))
        except (IndexError, ValueError):
            continue
    while int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardSink(Sink):
    """Scalars and HParams of each run in `<root>/<run key>/`."""

    name = "tensorboard"

    def __init__(self, root: str, flush_secs: int = 30) -> None:
        self.root = root
        self.folder = root
        self.flush_secs = flush_secs
        self.writer: Any = None
        self.run: RunInfo | None = None
        self.last_step = 0

    def start(self, run: RunInfo, state: Mapping[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        folder = os.path.join(self.root, run.key)
        os.makedirs(folder, exist_ok=True)
        _cut_back(folder, (state or {}).get("files", {}) if run.epoch > 0 else {})
        _after_older_files(folder)
        purge = run.step + 1 if run.epoch > 0 else 0
        self.writer = SummaryWriter(folder, purge_step=purge, flush_secs=self.flush_secs)
        self.folder, self.run, self.last_step = folder, run, run.step

    def _scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(prefix + name, value, step, new_style=True, double_precision=True)
        self.last_step = max(self.last_step, step)

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._scalars(step, metrics, "step/")

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self._scalars(step, metrics)

    def state_dict(self) -> dict[str, Any]:
        self.writer.flush()
        files = {os.path.basename(p): os.path.getsize(p) for p in _event_files(self.folder)}
        return {"step": self.last_step, "files": files}

    def end(self, final: Mapping[str, float], status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        assert self.run is not None
        metrics = {f"final/{k}": v for k, v in final.items()}
        self._scalars(self.last_step, metrics)
        values = {**hparam_values(to_dict(self.run.config), self.run.seed), "status": status}
        if self.run.preset is not None:
            values["preset"] = self.run.preset
        _, start_info, end_info = hparams(values, metrics)  # type: ignore[no-untyped-call]  # the experiment summary is derived from the sessions
        self.writer.file_writer.add_summary(start_info)
        self.writer.file_writer.add_summary(end_info)
        self.writer.close()
        self.writer = None

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()

    def log_artifacts(self, name: str, paths: Sequence[str]) -> None:
        """TensorBoard keeps no files: nothing to do."""
