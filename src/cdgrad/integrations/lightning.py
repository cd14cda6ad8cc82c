"""A Lightning `Callback` that attaches a cdgrad transform to every optimizer of the fit.

    from cdgrad.integrations.lightning import TransformCallback
    trainer = lightning.Trainer(callbacks=[TransformCallback(cdgrad.ChannelDirected("sobolev", 1.0, 0.1))])

What it does, in Lightning's terms:

* `on_fit_start`: `cdgrad.attach` to each of `trainer.optimizers` (several optimizers, as in a GAN, share the
  transform); `on_fit_end`/`teardown` remove the hooks again.
* The transform runs inside `optimizer.step()`: after Lightning's gradient clipping, after AMP unscaling
  (`precision="16-mixed"`: a step GradScaler skips on overflow skips the transform too), once per optimizer step
  under `accumulate_grad_batches` (on the accumulated gradient), with manual optimisation as well.
* `on_train_epoch_start` calls `transform.begin_epoch(trainer.current_epoch, batches)` (SGS re-measures its
  scalings), `batches` from the callback's `batches(epoch)` (None without it): the normalised input batches a
  method measures on (SGS with `pipeline="authors"` needs them).
* After every optimizer step, the transform's `after_step()` (once per step of each optimizer).
* The transform's `state_dict` is saved in Lightning checkpoints (`callbacks` entry) and loaded on resume, before
  the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("cdgrad.integrations.lightning needs Lightning: pip install 'cdgrad[lightning]'") from error

from ..attach import AttachHandle, attach
from ..transforms import check_transform
from ..transforms_base import GradientTransform

__all__ = ["TransformCallback"]


class TransformCallback(pl.Callback):  # type: ignore[misc]
    """Attach `transform` to every optimizer of `trainer.fit` (see the module docstring).

    batches: a function of the epoch returning an iterable (e.g. a lazy iterator) of normalised training input
    batches, passed to `transform.begin_epoch` for methods that measure on data.
    """

    def __init__(self, transform: GradientTransform, batches: Callable[[int], Iterable[Tensor]] | None = None) -> None:
        self.transform = check_transform(transform, "transform")
        if batches is not None and not callable(batches):
            raise TypeError(f"batches must be a function epoch -> iterable of batches or None, got {batches!r}")
        self.batches = batches
        self._handles: list[AttachHandle] = []

    @property
    def state_key(self) -> str:
        return str(self._generate_state_key(transform=type(self.transform).__name__))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        self._handles = [attach(optimizer, self.transform) for optimizer in trainer.optimizers]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.transform.begin_epoch(epoch, None if self.batches is None else self.batches(epoch))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    def state_dict(self) -> dict[str, Any]:
        return {"transform": self.transform.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"transform"}:
            raise ValueError(
                "the checkpoint's TransformCallback state must be {'transform': <the transform's state_dict>}, "
                f"got {state_dict!r:.200}"
            )
        self.transform.load_state_dict(state_dict["transform"])

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
