"""cdgrad with the optimizer wrappers users combine it with (pytorch_optimizer's Lookahead and SAM): `attach`
unwraps them, so the transform acts where the weights are updated, once per update; each case is compared with
the same training written out with the transform applied by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cdgrad

pytest.importorskip("pytorch_optimizer")
from pytorch_optimizer import SAM, Lookahead  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64_default")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(16, 3))


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + step)
    x, y = torch.randn(5, 2, 4, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def transform() -> cdgrad.GradientTransform:
    return cdgrad.ChannelDirected("sobolev", 0.5, 0.1)


def by_hand(model: nn.Module, t: cdgrad.GradientTransform) -> None:
    params = [p for p in model.parameters() if p.grad is not None and t.select(p)]
    t.transform_([p.grad for p in params], params)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def lookahead(model: nn.Module) -> Lookahead:
    return Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=3, alpha=0.5)


def test_lookahead_transforms_every_fast_step_once_and_survives_a_state_dict_round_trip():
    def run(where: str, steps: int = 7, resume_at: int | None = None) -> list[torch.Tensor]:
        model = net()
        opt, t = lookahead(model), transform()
        if where != "hand":
            handle = cdgrad.attach(opt if where == "wrapper" else opt.optimizer, t)
            assert handle.optimizer is opt.optimizer
        for step in range(steps):
            if step == resume_at:  # a fresh wrapper and a fresh attach, from the saved state
                saved = copy.deepcopy(opt.state_dict())
                opt = lookahead(model)
                opt.load_state_dict(saved)
                cdgrad.attach(opt, t)
            opt.zero_grad()
            loss_of(model, step).backward()
            if where == "hand":
                by_hand(model, t)
            opt.step()
        return weights(model)

    expected = run("hand")
    assert_equal(run("wrapper"), expected)
    assert_equal(run("inner"), expected)
    assert_equal(run("wrapper", resume_at=4), expected)  # resumed between two slow updates
    plain = net()
    assert any(not torch.allclose(p, q) for p, q in zip(expected, plain.parameters(), strict=True))


def sam(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def test_sam_descends_along_the_transformed_gradient_and_ascends_along_the_plain_one():
    """SAM's ascent (first_step) uses the plain gradient, its descent (second_step: the base optimizer's step) the
    transformed gradient at the perturbed point; the two-step and the closure APIs agree. Attaching to the SAM
    object itself (whose `step` the two-step API never calls) still transforms, because attach unwraps it."""

    def run(api: str) -> list[torch.Tensor]:
        model = net()
        opt, t = sam(model), transform()
        if api != "hand":
            assert cdgrad.attach(opt, t).optimizer is opt.base_optimizer
        for step in range(4):
            opt.zero_grad()
            loss_of(model, step).backward()
            if api == "closure":

                def closure(step=step):
                    loss = loss_of(model, step)
                    loss.backward()
                    return loss

                opt.step(closure)
                continue
            opt.first_step(zero_grad=True)
            loss_of(model, step).backward()
            if api == "hand":
                by_hand(model, t)
            opt.second_step()
        return weights(model)

    expected = run("hand")
    assert_equal(run("two-step"), expected)
    assert_equal(run("closure"), expected)


def test_unwrapping_stops_at_the_innermost_optimizer_and_survives_cycles():
    model = net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = Lookahead(inner)
    assert cdgrad.attach(outer, transform()).optimizer is inner
    assert cdgrad.attach(inner, transform()).optimizer is inner
    odd = torch.optim.SGD(model.parameters(), lr=0.1)
    odd.optimizer = odd  # a self-reference ends the search
    assert cdgrad.attach(odd, transform()).optimizer is odd
