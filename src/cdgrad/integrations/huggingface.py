"""A Hugging Face `TrainerCallback` that attaches a cdgrad transform to `transformers.Trainer`'s optimizer.

    from cdgrad.integrations.huggingface import TransformCallback
    trainer = transformers.Trainer(..., callbacks=[TransformCallback(cdgrad.ChannelDirected("sobolev", 1.0, 0.1))])

What it does, in the Trainer's terms:

* `on_train_begin`: `cdgrad.attach` to the optimizer (the torch optimizer inside accelerate's wrapper), removed
  again at `on_train_end`.  The transform runs inside `optimizer.step()`: after `max_grad_norm` clipping, after
  AMP unscaling, once per optimizer step on the gradient accumulated over `gradient_accumulation_steps`.
* `on_epoch_begin` calls `transform.begin_epoch(epoch, batches)` (SGS re-measures its scalings), `batches` from the
  callback's `batches(epoch)` (None without it): the normalised input batches a method measures on (SGS with
  `pipeline="authors"` needs them).  After every optimizer step, the transform's `after_step()`.
* `on_save` writes the transform's `state_dict` to `cdgrad_transform.pt` in the checkpoint folder the Trainer has
  just written (`<output_dir>/checkpoint-<step>`), atomically.  When training resumes (`global_step > 0` at
  `on_train_begin`), the state is loaded from that file in `<output_dir>/checkpoint-<step>`, or from
  `resume_from` when the checkpoint lies elsewhere; a missing file is an error, raised before the first step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cdgrad.integrations.huggingface needs transformers: pip install 'cdgrad[huggingface]'"
    ) from error

from .._files import torch_save_durably
from ..attach import AttachHandle, attach
from ..transforms import check_transform
from ..transforms_base import GradientTransform

__all__ = ["STATE_FILE", "TransformCallback"]

STATE_FILE = "cdgrad_transform.pt"
_CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR


class TransformCallback(TrainerCallback):  # type: ignore[misc]
    """Attach `transform` to the Trainer's optimizer (see the module docstring).

    resume_from: the checkpoint folder to load the transform's state from when training resumes (default: the
    Trainer's own `<output_dir>/checkpoint-<global_step>`).
    batches: a function of the epoch returning an iterable (e.g. a lazy iterator) of normalised training input
    batches, passed to `transform.begin_epoch` for methods that measure on data.
    """

    def __init__(
        self,
        transform: GradientTransform,
        resume_from: str | os.PathLike[str] | None = None,
        batches: Callable[[int], Iterable[Tensor]] | None = None,
    ) -> None:
        self.transform = check_transform(transform, "transform")
        if batches is not None and not callable(batches):
            raise TypeError(f"batches must be a function epoch -> iterable of batches or None, got {batches!r}")
        self.batches = batches
        if resume_from is not None and not isinstance(resume_from, str | os.PathLike):
            raise TypeError(f"resume_from must be a checkpoint folder path or None, got {type(resume_from).__name__}")
        self.resume_from = resume_from
        self._handle: AttachHandle | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")  # accelerate's AcceleratedOptimizer: attach unwraps it
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "TransformCallback needs the Trainer's torch optimizer at on_train_begin, got "
                f"{type(optimizer).__name__}"
            )
        if state.global_step > 0:
            self._load(self.resume_from or os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}"))
        self._detach()
        self._handle = attach(optimizer, self.transform)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = int(state.epoch or 0)
        self.transform.begin_epoch(epoch, None if self.batches is None else self.batches(epoch))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        if os.path.isdir(folder):
            torch_save_durably(self.transform.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._detach()

    def _load(self, folder: str | os.PathLike[str]) -> None:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming training: the transform state {path} does not exist (it is written by TransformCallback "
                "at every checkpoint); pass TransformCallback(..., resume_from=<the checkpoint folder>)"
            )
        self.transform.load_state_dict(torch.load(path, weights_only=True))

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
