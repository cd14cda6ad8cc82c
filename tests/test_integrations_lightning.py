"""cdgrad.integrations.lightning inside a real `lightning.Trainer` (CPU): each fit is compared with the plain
training loop it stands for, under full precision, bf16 and float16 (GradScaler) mixed precision, with gradient
accumulation and clipping, with manual optimisation of two optimizers, and across a checkpoint resume."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import cdgrad

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from cdgrad.integrations.lightning import TransformCallback  # noqa: E402

ACCUMULATE, CLIP, EPOCHS, BATCH = 2, 0.5, 2, 8


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    return model.to(dtype)


def data(dtype: torch.dtype = torch.float32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (48,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


class Classifier(pl.LightningModule):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = net(dtype)

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
    )  # fmt: skip
    return pl.Trainer(**(defaults | kwargs))


def sobolev() -> cdgrad.GradientTransform:
    return cdgrad.ChannelDirected("sobolev", 1.0, 0.1)


def plain_loop(amp: torch.dtype | None, dtype: torch.dtype = torch.float32, transform=sobolev) -> nn.Module:
    """What Lightning does for automatic optimisation, written out: loss / accumulate, (scaled) backward,
    unscale, clip the norm, step (skipped on overflow), zero."""
    model = net(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if transform is not None:
        cdgrad.attach(opt, transform())
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(data(dtype)):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = nn.functional.cross_entropy(model(x), y) / ACCUMULATE
            (scaler.scale(loss) if scaler else loss).backward()
            if i % ACCUMULATE == ACCUMULATE - 1:
                if scaler:
                    scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
    return model


def max_distance(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


PRECISIONS = {
    "64-true": (dict(precision="64-true"), None, torch.float64),
    "bf16-mixed": (dict(precision="bf16-mixed"), torch.bfloat16, torch.float32),
    # on a CPU Lightning turns precision="16-mixed" into bf16; the plugin keeps float16 and its GradScaler
    "16-mixed": (dict(plugins=[MixedPrecision("16-mixed", device="cpu")]), torch.float16, torch.float32),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_fit_equals_the_plain_loop(precision):
    """The callback makes Lightning train exactly as the plain loop with `cdgrad.attach` does (accumulation over 2
    batches, norm clipping first, AMP unscaling first): the transform sees each step's accumulated, clipped and
    unscaled gradient once. Lightning's 32-bit automatic optimisation passes a closure to `optimizer.step`."""
    kwargs, amp, dtype = PRECISIONS[precision]
    callback = TransformCallback(sobolev())
    module = Classifier(dtype)
    fit = trainer(callbacks=[callback], **kwargs)
    fit.fit(module, data(dtype))
    expected = plain_loop(amp, dtype)
    assert max_distance(module.net, expected) == 0.0
    assert max_distance(module.net, plain_loop(amp, dtype, transform=None)) > 1e-3  # the transform mattered
    assert all(not opt._optimizer_step_pre_hooks for opt in fit.optimizers), "the hooks outlived the fit"


def test_checkpoint_resume_restores_the_transform_state(tmp_path):
    """SGS scalings, measured in epoch 0, are saved in the checkpoint and loaded before the resumed fit's first
    step: fit(1 epoch) -> checkpoint -> fresh objects -> fit(ckpt_path=...) equals an uninterrupted fit."""

    def sgs_fit(epochs: int, ckpt_path=None, **kwargs):
        module = Classifier(torch.float64)
        callback = TransformCallback(cdgrad.SpatialGradientScaling(module.net, k=5.0, num_batches=2, every=5))
        fit = trainer(max_epochs=epochs, precision="64-true", callbacks=[callback], **kwargs)
        fit.fit(module, data(torch.float64), ckpt_path=ckpt_path)
        return module, callback, fit

    whole, whole_cb, _ = sgs_fit(EPOCHS)
    _, first_cb, fit = sgs_fit(1, default_root_dir=tmp_path, enable_checkpointing=True)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    assert fit.checkpoint_callback is not None
    resumed, resumed_cb, _ = sgs_fit(EPOCHS, ckpt_path=checkpoint)
    scalings = resumed_cb.transform.state_dict()["scalings"]
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scalings.values()), "the scalings were never measured"
    for name, s in whole_cb.transform.state_dict()["scalings"].items():
        assert torch.equal(scalings[name], s)
    assert max_distance(resumed.net, whole.net) == 0.0


class TwoOptimizers(pl.LightningModule):
    """Manual optimisation with two optimizers (the GAN pattern): one per half of the network."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net(torch.float64)

    def training_step(self, batch, index):
        x, y = batch
        first, second = self.optimizers()
        for opt in (first, second):
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
            opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[:2].parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(self.net[2:].parameters(), lr=1e-2),
        )


def test_manual_optimisation_with_two_optimizers_transforms_both():
    module = TwoOptimizers()
    fit = trainer(callbacks=[TransformCallback(sobolev())], precision="64-true", gradient_clip_val=None,
                  accumulate_grad_batches=1)  # fmt: skip
    fit.fit(module, data(torch.float64))
    model = net(torch.float64)
    opts = (
        torch.optim.SGD(model[:2].parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(model[2:].parameters(), lr=1e-2),
    )
    transform = sobolev()
    for opt in opts:
        cdgrad.attach(opt, transform)
    for _ in range(EPOCHS):
        for x, y in data(torch.float64):
            for opt in opts:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    assert max_distance(module.net, model) == 0.0


def test_bad_transform_and_bad_checkpoint_state():
    with pytest.raises(TypeError, match="transform must be a cdgrad GradientTransform"):
        TransformCallback(torch.optim.SGD)
    callback = TransformCallback(cdgrad.ChannelDirected("h0", 2.0))
    before = callback.transform.state_dict()
    with pytest.raises(ValueError, match="TransformCallback state"):
        callback.load_state_dict({"lam": 1.0})
    with pytest.raises(ValueError):
        callback.load_state_dict({"transform": sobolev().state_dict()["config"]})
    assert callback.transform.state_dict() == before


def test_sgs_authors_pipeline_measures_on_the_callbacks_batches():
    """`batches=` feeds `begin_epoch`: the first measurement is `measure` of those batches at initialisation."""
    drawn: list[int] = []

    def batches(epoch):
        for i, (x, _) in enumerate(data()):
            drawn.append(i)
            yield x

    module = Classifier()
    sgs = cdgrad.SpatialGradientScaling(module.net, num_batches=2, every=1, pipeline="authors")
    trainer(callbacks=[TransformCallback(sgs, batches=batches)]).fit(module, data())
    assert drawn == [0, 1] * EPOCHS  # two batches per epoch, drawn lazily
    reference = cdgrad.SpatialGradientScaling(net(), num_batches=2, every=1, pipeline="authors")
    reference.measure([x for x, _ in list(data())[:2]])
    first = sgs.first_scalings
    assert first.keys() == reference.scalings.keys()
    for name, g in reference.scalings.items():
        assert torch.equal(first[name], g) and not torch.equal(g, torch.ones_like(g))
    with pytest.raises(ValueError, match="batches"):
        bare = cdgrad.SpatialGradientScaling(Classifier().net, pipeline="authors")
        trainer(callbacks=[TransformCallback(bare)]).fit(Classifier(), data())
    with pytest.raises(TypeError, match="batches"):
        TransformCallback(sobolev(), batches=[1])
