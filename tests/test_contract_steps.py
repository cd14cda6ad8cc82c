"""The transform contract battery, the legs that train or hook: `after_step` and `begin_epoch(epoch, batches)`
through `attach`, `attach(opt, OnUpdate(t))` against `attach_update`, DTensor gradients sharded unevenly over two
gloo processes, and `torch.compile` of the step; run on every entry of `tests/test_contract.py`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import cdgrad
from contract_battery import Net, loss, outputs, snapshot
from test_contract import ENTRIES

pytestmark = pytest.mark.usefixtures("float64_default")


@ENTRIES
def test_begin_epoch_with_batches(info):
    """`begin_epoch(epoch, batches)` consumes exactly the batches the method measures on, lazily; the others
    consume none and change nothing. A negative epoch is refused."""
    model = Net()
    t = info.make(model)
    before, version = outputs(t, model), t.state_version
    drawn: list[int] = []

    def batches():
        for i in range(10):
            drawn.append(i)
            yield torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(i))

    t.begin_epoch(0, batches())
    assert len(drawn) == info.measures
    after = outputs(t, model)
    same = after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert same != bool(info.measures) and (t.state_version != version) == bool(info.measures)
    if info.measures:
        with pytest.raises(ValueError, match="batches"):
            info.make(model).begin_epoch(0)
    else:
        t.begin_epoch(3)
    with pytest.raises(ValueError, match="epoch"):
        t.begin_epoch(-1, batches())


@ENTRIES
def test_after_step_through_attach(info):
    """`attach` calls `after_step` after every step; only a transform that acts after the step moves weights."""
    model = Net()
    t = info.make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the optimizer itself moves nothing
    handle = cdgrad.attach(opt, t)
    moved = []
    for i in range(4):
        opt.zero_grad()
        loss(model, i).backward()
        weights = [p.detach().clone() for p in model.parameters()]
        opt.step()
        moved.append(any(not torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True)))
    assert moved == ([False, True, False, True] if info.after_step else [False] * 4)
    handle.remove()
    state = snapshot(t)
    loss(model, 9).backward()
    opt.step()  # detached: no hook runs
    assert snapshot(t) == state


@ENTRIES
def test_training_changes_the_state_only_of_what_acts_after_steps(info):
    model = Net()
    t = info.make(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cdgrad.attach(opt, t)
    state = snapshot(t)
    for i in range(2):
        opt.zero_grad()
        loss(model, i).backward()
        opt.step()
    assert (snapshot(t) != state) == (info.stateful and info.after_step)  # the clipper counts steps


@ENTRIES
def test_on_update_is_attach_update(info):
    """`attach(opt, OnUpdate(t))` is `attach_update(opt, t)` bit for bit (Adam: the update is not the gradient),
    and for plain SGD and a linear transform both equal `attach(opt, t)`."""

    def train(mode: str, make_opt: Callable) -> list[torch.Tensor]:
        model = Net()
        t = info.make(model)
        inner = t.transform if info.on_update else t
        opt = make_opt(model.parameters())
        if mode == "on_update":
            cdgrad.attach(opt, t if info.on_update else cdgrad.OnUpdate(t))
        elif mode == "attach_update":
            cdgrad.attach_update(opt, inner)
        else:
            cdgrad.attach(opt, inner)
        for i in range(3):
            opt.zero_grad()
            loss(model, i).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    adam = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
    for p, q in zip(train("on_update", adam), train("attach_update", adam), strict=True):
        assert torch.equal(p, q)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.01)  # noqa: E731
    if info.linear:
        for p, q in zip(train("attach_update", sgd), train("attach", sgd), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    # OnUpdate's state round trips, and the wrapped transform's bare state loads into it
    model = Net()
    a = cdgrad.OnUpdate(info.make(model)) if not info.on_update else info.make(model)
    b = info.other(model)
    b_inner = b.transform if info.on_update else b
    a.load_state_dict(b.state_dict() if info.on_update else cdgrad.OnUpdate(b).state_dict())
    assert snapshot(a.transform) == snapshot(b_inner)
    a.load_state_dict(info.make(Net()).state_dict() if not info.on_update else info.make(Net()).transform.state_dict())
    assert a.state_dict()["type"] == "OnUpdate"


@ENTRIES
def test_dtensor_gradients_on_two_ranks_match_plain_ones(info, dtensor_results):
    if not info.dtensor:
        assert info.name not in dtensor_results
        return
    for rank, results in enumerate(dtensor_results[info.name]):
        assert results["uneven"], "no gradient was sharded unevenly"
        assert len(results["errors"]) >= 3, "nothing was compared"
        bad = {k: v for k, v in results["errors"].items() if not v <= 1e-13}
        assert not bad, f"rank {rank}: {bad}"


@pytest.fixture(scope="module")
def dtensor_results() -> dict[str, list[dict]]:
    import tempfile

    from contract_battery import dtensor_worker
    from helpers import spawn

    runs = spawn(dtensor_worker, 2, tempfile.mkdtemp(prefix="cdgrad-contract-"), timeout=240)
    return {name: [run[name] for run in runs] for name in runs[0]}


@ENTRIES
def test_compiled_optimizer_step_matches_eager(info):
    """`torch.compile(optimizer.step)` traces the attached transform (reference route) and keeps following it:
    a state change between steps (a load) and `remove()` take effect in the compiled step as in the eager one."""
    if not info.compile:
        pytest.skip("compile=False for this entry (see its TransformInfo)")
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def train(compiled: bool) -> list[torch.Tensor]:
        torch._dynamo.reset()  # every run compiles afresh (and stays under the recompile limit)
        model = Net()
        a, b = info.make(model), info.other(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        handle = cdgrad.attach(opt, a)
        step = torch.compile(opt.step, backend=counter) if compiled else opt.step
        for i in range(6):
            if i == 2:
                a.load_state_dict(b.state_dict())
            if i == 4:
                handle.remove()
            opt.zero_grad()
            loss(model, i).backward()
            step()
        return [p.detach().clone() for p in model.parameters()]

    eager, compiled = train(False), train(True)
    assert counter.frame_count > 0 and counter.op_count > 0, "nothing was compiled"
    for p, q in zip(eager, compiled, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
