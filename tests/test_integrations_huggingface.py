"""cdgrad.integrations.huggingface inside a real `transformers.Trainer` (CPU): the training it does is compared
with the plain loop it stands for (float64, and bf16 autocast), with gradient accumulation and norm clipping, and a
resume from a checkpoint is compared with an uninterrupted run."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

import cdgrad

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from cdgrad.integrations.huggingface import STATE_FILE, TransformCallback  # noqa: E402

ACCUMULATE, CLIP, EPOCHS, BATCH, SAMPLES = 2, 0.5, 2, 8, 48
STEPS_PER_EPOCH = SAMPLES // BATCH // ACCUMULATE


@pytest.fixture(autouse=True)
def quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Net(nn.Module):
    """A tiny CNN in the Trainer's convention: keyword inputs, a dict with the loss out."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        ).to(dtype)  # fmt: skip

    def forward(self, pixel_values, labels):
        logits = self.body(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Images(torch.utils.data.Dataset):
    def __init__(self, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(SAMPLES, 1, 8, 8, generator=g, dtype=dtype)
        self.y = torch.randint(0, 3, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class InOrder(transformers.Trainer):
    """The Trainer with batches in dataset order, so that the plain loop can follow it."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def sobolev(model: nn.Module | None = None) -> cdgrad.GradientTransform:
    return cdgrad.ChannelDirected("sobolev", 1.0, 0.1)


def hf_train(out, dtype=torch.float64, bf16=False, make=sobolev, resume=None, callback_kwargs=None, **args):
    model = Net(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    settings = dict(
        per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, gradient_accumulation_steps=ACCUMULATE,
        max_grad_norm=CLIP, use_cpu=True, bf16=bf16, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    callback = TransformCallback(make(model), **(callback_kwargs or {})) if make is not None else None
    trainer = InOrder(
        model=model,
        args=transformers.TrainingArguments(str(out), **(settings | args)),
        train_dataset=Images(dtype),
        optimizers=(opt, schedule),
        callbacks=[callback] if callback else [],
    )
    trainer.train(resume_from_checkpoint=resume)
    assert not opt._optimizer_step_pre_hooks, "the hook outlived the training"
    return model, callback


def plain_loop(dtype=torch.float64, bf16=False, transform=sobolev) -> nn.Module:
    model = Net(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if transform is not None:
        cdgrad.attach(opt, transform())
    data = Images(dtype)
    for _ in range(EPOCHS):
        for i in range(SAMPLES // BATCH):
            batch = slice(BATCH * i, BATCH * (i + 1))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(data.x[batch], data.y[batch])["loss"] / ACCUMULATE
            loss.backward()
            if i % ACCUMULATE == ACCUMULATE - 1:
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                opt.zero_grad()
    return model


def max_distance(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("dtype, bf16", [(torch.float64, False), (torch.float32, True)], ids=["float64", "bf16"])
def test_trainer_equals_the_plain_loop(tmp_path, dtype, bf16):
    """The transform sees each optimizer step's accumulated and clipped gradient once, as with `cdgrad.attach`."""
    trained, _ = hf_train(tmp_path, dtype, bf16)
    assert max_distance(trained, plain_loop(dtype, bf16)) == 0.0
    assert max_distance(trained, plain_loop(dtype, bf16, transform=None)) > 1e-3  # the transform mattered


def sgs(model: nn.Module) -> cdgrad.SpatialGradientScaling:
    return cdgrad.SpatialGradientScaling(model, k=5.0, num_batches=2, every=5)


def test_resume_restores_the_transform_state(tmp_path):
    """SGS scalings measured in epoch 0 are written beside the checkpoint and loaded before the resumed run's first
    step: the resumed run ends where the uninterrupted one does; from a moved checkpoint with `resume_from`."""
    whole, whole_cb = hf_train(tmp_path / "whole", make=sgs)
    first = tmp_path / "first"
    hf_train(first, make=sgs, save_strategy="steps", save_steps=STEPS_PER_EPOCH)
    checkpoint = first / f"checkpoint-{STEPS_PER_EPOCH}"
    assert (checkpoint / STATE_FILE).is_file()
    resumed, resumed_cb = hf_train(first, make=sgs, resume=str(checkpoint))
    scalings = resumed_cb.transform.state_dict()["scalings"]
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scalings.values()), "the scalings were never measured"
    for name, s in whole_cb.transform.state_dict()["scalings"].items():
        assert torch.equal(scalings[name], s)
    assert max_distance(resumed, whole) == 0.0

    moved = tmp_path / "moved" / checkpoint.name
    shutil.copytree(checkpoint, moved)
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="resume_from"):
        hf_train(elsewhere, make=sgs, resume=str(moved))
    again, _ = hf_train(elsewhere, make=sgs, resume=str(moved), callback_kwargs={"resume_from": moved})
    assert max_distance(again, whole) == 0.0


def test_bad_arguments():
    with pytest.raises(TypeError, match="transform must be a cdgrad GradientTransform"):
        TransformCallback("sobolev")
    with pytest.raises(TypeError, match="resume_from"):
        TransformCallback(sobolev(), resume_from=3)


def test_sgs_authors_pipeline_measures_on_the_callbacks_batches(tmp_path):
    """`batches=` feeds `begin_epoch`: the first measurement is `measure` of those batches at initialisation."""
    drawn: list[int] = []

    def batches(epoch):
        for i, x in enumerate(Images(torch.float64).x.split(BATCH)):
            drawn.append(i)
            yield x

    def authors(model):  # on the network body: it measures by calling the module on the batches
        return cdgrad.SpatialGradientScaling(model.body, num_batches=2, every=1, pipeline="authors")

    _, callback = hf_train(tmp_path / "a", make=authors, callback_kwargs={"batches": batches})
    assert drawn == [0, 1] * EPOCHS  # two batches per epoch, drawn lazily
    reference = authors(Net(torch.float64))
    reference.measure(Images(torch.float64).x.split(BATCH)[:2])
    first = callback.transform.first_scalings
    assert first.keys() == reference.scalings.keys()
    for name, g in reference.scalings.items():
        assert torch.equal(first[name], g) and not torch.equal(g, torch.ones_like(g))
    with pytest.raises(ValueError, match="batches"):
        hf_train(tmp_path / "b", make=authors)
    with pytest.raises(TypeError, match="batches"):
        TransformCallback(sobolev(), batches=[1])
