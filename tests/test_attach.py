"""attach(): the transform runs inside optimizer.step(), before the optimizer's own update."""

import copy
import io

import pytest
import torch
from torch import nn

import cdgrad
from cdgrad.transforms_base import GradientTransform


def small_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)
    ).to(dtype)


def batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(5, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (5,), generator=g)


def loss_fn(model, step):
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x), y)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
}
TRANSFORMS = {
    "sobolev": lambda: cdgrad.ChannelDirected("sobolev", lam=1.0, beta=0.1),
    "h0-all": lambda: cdgrad.ChannelDirected("h0", lam=3.0, scope="all"),
    "paper-chain": lambda: cdgrad.Chain(cdgrad.Centralize(), cdgrad.paper_convention("h0", 2.0)),
}


def init(model):
    model(batch(0, next(model.parameters()).dtype)[0])  # materialise the lazy layer
    return model


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("t_name", list(TRANSFORMS))
def test_attached_equals_hand_transformed(opt_name, t_name):
    a, b = init(small_net()), init(small_net())
    opt_a, opt_b = OPTIMIZERS[opt_name](a.parameters()), OPTIMIZERS[opt_name](b.parameters())
    transform = TRANSFORMS[t_name]()
    cdgrad.attach(opt_a, transform)
    for step in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_fn(model, step).backward()
        with torch.no_grad():  # hand-transform b's gradients
            for p in b.parameters():
                if transform.select(p):
                    p.grad = transform(p.grad, p)
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), f"step {step}"
    # the same run without the transform ends elsewhere: the transform did change the updates
    plain = init(small_net())
    opt_p = OPTIMIZERS[opt_name](plain.parameters())
    run(plain, opt_p, range(5))
    moved = [not torch.equal(pa, pp) for pa, pp in zip(a.parameters(), plain.parameters(), strict=True)]
    assert any(moved), "the transform changed nothing"


def run(model, opt, steps, scheduler=None):
    for step in steps:
        opt.zero_grad()
        loss_fn(model, step).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def test_state_dict_mid_run_resumes_bit_for_bit():
    ref = init(small_net())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    cdgrad.attach(opt, cdgrad.paper_convention("sobolev", 1.5, beta=0.05))
    run(ref, opt, range(6), sched)

    first = init(small_net())
    opt1 = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, 2, 0.5)
    t1 = cdgrad.paper_convention("sobolev", 1.5, beta=0.05)
    cdgrad.attach(opt1, t1)
    run(first, opt1, range(3), sched1)
    buf = io.BytesIO()
    torch.save(
        {
            "model": first.state_dict(),
            "opt": opt1.state_dict(),
            "sched": sched1.state_dict(),
            "transform": t1.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    second = init(small_net(seed=7))
    second.load_state_dict(state["model"])
    opt2 = torch.optim.SGD(second.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(state["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    sched2.load_state_dict(state["sched"])
    t2 = cdgrad.paper_convention("sobolev", 9.0)  # wrong hyper-parameters, overwritten by the state dict
    t2.load_state_dict(state["transform"])
    cdgrad.attach(opt2, t2)
    run(second, opt2, range(3, 6), sched2)
    for p, q in zip(ref.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


class Spy(GradientTransform):
    """Records the gradients it is given, then applies an inner transform."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def select(self, param):
        return self.inner.select(param)

    def transform_(self, grads, params):
        self.seen.append([g.clone() for g in grads])
        self.inner.transform_(grads, params)


def test_grad_scaler_unscales_before_and_skips_on_overflow():
    model = init(small_net(dtype=torch.float32))
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = Spy(cdgrad.ChannelDirected("sobolev", 1.0))
    cdgrad.attach(opt, spy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch(1, torch.float32)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    nn.functional.cross_entropy(reference(x), y).backward()
    expected = [p.grad for p in reference.parameters() if spy.select(p)]
    assert len(spy.seen) == 1
    for seen, exp in zip(spy.seen[0], expected, strict=True):
        torch.testing.assert_close(seen, exp, rtol=1e-5, atol=1e-7)  # unscaled, not 4096x larger

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)  # overflow: step skipped, and the transform with it
    assert len(spy.seen) == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_clipping_scheduler_groups_and_subset():
    model = init(small_net())
    convs = [p for p in model.parameters() if p.dim() == 4]
    rest = [p for p in model.parameters() if p.dim() != 4]
    opt = torch.optim.SGD([{"params": convs, "lr": 0.1}, {"params": rest, "lr": 0.01}], momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    spy = Spy(cdgrad.ChannelDirected("h0", 2.0, scope="all"))
    handle = cdgrad.attach(opt, spy, params=convs[:1])
    opt.zero_grad()
    loss_fn(model, 0).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    clipped = convs[0].grad.clone()
    opt.step()
    sched.step()
    assert len(spy.seen) == 1 and len(spy.seen[0]) == 1
    assert torch.equal(spy.seen[0][0], clipped)  # the transform sees the clipped gradient
    torch.testing.assert_close(convs[0].grad, cdgrad.reweighted_h0(clipped, 2.0))
    handle.remove()
    opt.zero_grad()
    loss_fn(model, 1).backward()
    opt.step()
    assert len(spy.seen) == 1  # removed


def test_parameters_without_gradient_are_skipped():
    model = init(small_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = Spy(cdgrad.ChannelDirected("sobolev", 1.0))
    cdgrad.attach(opt, spy)
    model[0].weight.requires_grad_(False)
    loss_fn(model, 0).backward()
    opt.step()
    assert [g.shape for g in spy.seen[0]] == [model[2].weight.shape]


def test_parameters_added_or_replaced_after_attach_are_selected():
    """The selection is kept between steps and decided afresh when the optimizer's parameters change: a group
    added after `attach`, a parameter replaced in a group's list."""
    model = init(small_net())
    first, second = model[0].weight, model[2].weight
    opt = torch.optim.SGD([first], lr=0.1)
    spy = Spy(cdgrad.ChannelDirected("sobolev", 1.0))
    handle = cdgrad.attach(opt, spy)
    loss_fn(model, 0).backward()
    opt.step()
    assert [id(p) for p in handle.selected()] == [id(first)]
    opt.add_param_group({"params": [second], "lr": 0.05})
    loss_fn(model, 1).backward()
    opt.step()
    assert [g.shape for g in spy.seen[-1]] == [first.shape, second.shape]
    replacement = torch.nn.Parameter(torch.randn_like(second))
    replacement.grad = torch.randn_like(second)
    opt.param_groups[1]["params"][0] = replacement  # in place: the list object is the same
    assert [id(p) for p in handle.selected()] == [id(first), id(replacement)]


def test_step_with_a_closure_transforms_the_closures_gradients():
    """`step(closure)` computes the gradients inside the step, after the pre-hook: the transform runs after each
    evaluation of the closure. SGD: step(closure), positional or keyword, equals backward-then-step; LBFGS (several
    evaluations per step): attach equals a closure that transforms by hand; two attached transforms keep their order."""
    first, second = cdgrad.Centralize(), cdgrad.ChannelDirected("sobolev", 0.5, 0.2)

    def sgd_run(mode: str) -> list[torch.Tensor]:
        model = init(small_net())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cdgrad.attach(opt, first)
        cdgrad.attach(opt, second)
        for step in range(3):
            opt.zero_grad()

            def closure(step=step):
                opt.zero_grad()
                loss = loss_fn(model, step)
                loss.backward()
                return loss

            if mode == "backward":
                closure()
                assert opt.step() is None
            else:
                loss = opt.step(closure) if mode == "positional" else opt.step(closure=closure)
                assert isinstance(loss, torch.Tensor)
        return [p.detach().clone() for p in model.parameters()]

    expected = sgd_run("backward")
    for mode in ("positional", "keyword"):
        for p, q in zip(sgd_run(mode), expected, strict=True):
            assert torch.equal(p, q), mode

    def lbfgs_run(by_hand: bool) -> list[torch.Tensor]:
        model = init(small_net())
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        if not by_hand:
            cdgrad.attach(opt, second)
        calls = []

        def closure():
            opt.zero_grad()
            loss = loss_fn(model, 0)
            loss.backward()
            calls.append(1)
            if by_hand:
                params = [p for p in model.parameters() if second.select(p)]
                second.transform_([p.grad for p in params], params)
            return loss

        for _ in range(2):
            opt.step(closure)
        assert len(calls) > 2  # LBFGS evaluates the closure several times per step
        return [p.detach().clone() for p in model.parameters()]

    untransformed_model = init(small_net())
    for p, q in zip(lbfgs_run(False), lbfgs_run(True), strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(lbfgs_run(False), untransformed_model.parameters(), strict=True))


def _inductor_available() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


INDUCTOR = pytest.mark.skipif(not _inductor_available(), reason="torch.compile's default backend needs a C++ compiler")


def _train_compiled(compile_model: bool, compile_step: bool, opt_cls, transform="sobolev", **opt_kwargs):
    """Three steps of small_net with the Sobolev transform attached; the model and/or optimizer.step compiled
    with the default backend (inductor)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = init(small_net())  # float64: the comparison is not blurred by float32 reassociation in inductor
    opt = opt_cls(model.parameters(), lr=0.05, **opt_kwargs)
    if transform is not None:
        cdgrad.attach(opt, cdgrad.ChannelDirected(transform, 1.0, 0.1))
    forward = torch.compile(model) if compile_model else model
    step = torch.compile(opt.step) if compile_step else opt.step
    for i in range(3):
        opt.zero_grad()
        x, y = batch(i)
        nn.functional.cross_entropy(forward(x), y).backward()
        step()
    torch._dynamo.reset()
    return [p.detach().clone() for p in model.parameters()]


@INDUCTOR
@pytest.mark.slow
def test_compiled_model_and_compiled_step_match_eager():
    """The README's promise: a model compiled with the default backend, and a compiled `optimizer.step` with a
    transform attached, train as the eager loop does: exactly for SGD with momentum; for Adam within the distance
    torch's own compiled Adam keeps from its eager one (about 1e-5 here, also without cdgrad), far below the
    transform's effect."""
    eager = _train_compiled(False, False, torch.optim.SGD, momentum=0.9)
    for compile_model, compile_step in ((True, False), (False, True), (True, True)):
        got = _train_compiled(compile_model, compile_step, torch.optim.SGD, momentum=0.9)
        for p, q in zip(got, eager, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=f"SGD {compile_model=} {compile_step=}")
    eager = _train_compiled(False, False, torch.optim.Adam)
    got = _train_compiled(True, True, torch.optim.Adam)
    untransformed = _train_compiled(False, False, torch.optim.Adam, transform=None)
    distance = max(float((p - q).abs().max()) for p, q in zip(got, eager, strict=True))
    effect = max(float((p - q).abs().max()) for p, q in zip(untransformed, eager, strict=True))
    assert distance < 1e-4 and effect > 1e-2, (distance, effect)


def test_bad_input_leaves_everything_untouched():
    emb = nn.Embedding(10, 4, sparse=True).double()
    conv = nn.Conv2d(2, 3, 3).double()
    opt = torch.optim.SGD(list(emb.parameters()) + list(conv.parameters()), lr=0.1, momentum=0.9)
    cdgrad.attach(opt, cdgrad.ChannelDirected("sobolev", 1.0, scope="all"))
    (emb(torch.tensor([1, 2])).sum() + conv(torch.randn(1, 2, 5, 5, dtype=torch.float64)).sum()).backward()
    before = [p.detach().clone() for p in (emb.weight, conv.weight)]
    conv_grad = conv.weight.grad.clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before[0]) and torch.equal(conv.weight, before[1])
    assert torch.equal(conv.weight.grad, conv_grad)
    assert opt.state_dict()["state"] == {}

    with pytest.raises(TypeError, match="optimizer"):
        cdgrad.attach(conv, cdgrad.ChannelDirected())
    with pytest.raises(TypeError, match="transform"):
        cdgrad.attach(opt, cdgrad.sobolev)
    with pytest.raises(ValueError, match="not a parameter of the optimizer"):
        cdgrad.attach(opt, cdgrad.ChannelDirected(), params=[torch.zeros(3, requires_grad=True)])


def test_attach_params_is_masked_and_follows_state_changes():
    """attach(params=) selects like cdgrad.masked; a hyper-parameter change re-decides the cached selection."""
    model = init(small_net())
    convs = [p for p in model.parameters() if p.dim() == 4]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = cdgrad.ChannelDirected("h0", 2.0)
    handle = cdgrad.attach(opt, t, params=convs[:1])
    other = cdgrad.attach(opt, cdgrad.masked(cdgrad.ChannelDirected("h0", 2.0), convs[:1]))
    loss_fn(model, 0).backward()
    assert [id(p) for p in handle.selected()] == [id(p) for p in other.selected()] == [id(convs[0])]
    handle.remove()  # one transform is attached to one optimizer once
    whole = cdgrad.attach(opt, t)
    assert [id(p) for p in whole.selected()] == [id(p) for p in convs]
    t.scope = "all"  # every parameter with an axis now
    assert len(whole.selected()) == len(list(model.parameters()))
    for h in (other, whole):
        h.remove()


def _one_step(attach_twice):
    """The weights after one SGD step with `cdgrad.ChannelDirected("h0", 2.0)` attached by `attach_twice(opt, t)`."""
    model = init(small_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = cdgrad.ChannelDirected("h0", 2.0)
    attach_twice(opt, t)
    loss_fn(model, 0).backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


class Wrapper(torch.optim.Optimizer):
    """A wrapper in the style of Lookahead: `optimizer` is the one that updates the weights."""

    def __init__(self, inner):
        self.optimizer = inner


@pytest.mark.parametrize(
    "first, second",
    [
        (cdgrad.attach, cdgrad.attach),
        (cdgrad.attach, cdgrad.attach_update),
        (cdgrad.attach_update, cdgrad.attach),
        (lambda o, t: cdgrad.attach(o, t, params=[p for g in o.param_groups for p in g["params"]][:1]), cdgrad.attach),
    ],
    ids=["attach-attach", "attach-update", "update-attach", "params-attach"],
)
def test_attaching_one_transform_twice_is_refused_and_changes_nothing(first, second):
    def twice(opt, t):
        first(opt, t)
        with pytest.raises(ValueError, match=r"transform \(ChannelDirected\) is already attached.*apply twice"):
            second(opt, t)
        with pytest.raises(ValueError, match="already attached"):  # through a wrapper, to the same optimizer
            second(Wrapper(opt), t)

    # the refused calls hooked nothing: the step is that of the transform attached once
    assert all(torch.equal(a, b) for a, b in zip(_one_step(twice), _one_step(first), strict=True))


def test_a_removed_handle_frees_the_transform_and_other_optimizers_are_independent():
    model = init(small_net())
    opt, other = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
    t = cdgrad.ChannelDirected("h0", 2.0)
    handle = cdgrad.attach(opt, t)
    cdgrad.attach(other, t).remove()  # another optimizer: allowed
    handle.remove()
    with cdgrad.attach(opt, t):  # removed: may be attached again
        pass
    cdgrad.attach_update(opt, t).remove()
    cdgrad.attach(opt, cdgrad.ChannelDirected("h0", 2.0)).remove()  # an equal but distinct transform composes


def test_a_parameter_listed_twice_is_refused():
    conv = nn.Conv2d(2, 3, 3).double()
    t = cdgrad.ChannelDirected("h0", 2.0)
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch only warns
        twice = torch.optim.SGD([conv.weight, conv.bias, conv.weight], lr=0.1)
    for attach in (cdgrad.attach, cdgrad.attach_update):
        with pytest.raises(ValueError, match=r"twice \(param_groups\[0\]\['params'\]\[0\] and .*\[2\]\)"):
            attach(twice, t)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] are the same parameter"):
        cdgrad.attach(opt, t, params=[conv.weight, conv.bias, conv.weight])
    cdgrad.attach(opt, t, params=[conv.weight]).remove()  # the refused calls attached nothing


@pytest.mark.parametrize("params, what", [(5, "got int"), (torch.zeros(3), "single tensor"), (3.5, "got float")])
def test_params_that_is_not_an_iterable_of_parameters_names_the_argument(params, what):
    opt = torch.optim.SGD(nn.Conv2d(2, 3, 3).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=f"params must be an iterable of parameters.*{what}"):
        cdgrad.attach(opt, cdgrad.ChannelDirected(), params=params)


def test_a_gradient_that_cannot_be_transformed_leaves_the_others_untouched():
    """Validate all, then transform: Chain checks every child on every gradient before the first one runs."""
    conv, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    chain = cdgrad.Chain(cdgrad.Centralize(), cdgrad.ChannelDirected("sobolev", 0.5, direction="input", scope="all"))
    g_conv, g_bias = conv.clone(), bias.clone()
    with pytest.raises(ValueError, match="direction"):  # a 1-D gradient has no input axis
        chain.transforms[1].transform_([g_conv, g_bias], [conv, bias])
    assert torch.equal(g_conv, conv) and torch.equal(g_bias, bias)
    sparse = torch.randn(6, 4, 3, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        chain.transform_([g_conv, sparse], [conv, conv])
    assert torch.equal(g_conv, conv)


class Square(GradientTransform):
    """Not homogeneous: `g -> g * |g|` (a scale s becomes s^2); records every call."""

    def __init__(self):
        self.calls = []

    def select(self, param):
        return param.dim() == 4

    def apply_(self, grads, params):
        self.calls.append([g.clone() for g in grads])
        for g in grads:
            g.mul_(g.abs())


FUSED = {
    "sgd": lambda p, fused: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=fused),
    "adamw": lambda p, fused: torch.optim.AdamW(p, lr=1e-2, fused=fused),
}


@pytest.mark.parametrize("opt_name", list(FUSED))
@pytest.mark.parametrize("make", [Square, lambda: cdgrad.ChannelDirected("sobolev", 0.5, 0.1)])
def test_fused_optimizers_under_grad_scaler(opt_name, make):
    """GradScaler hands fused optimizers scaled gradients: the result must equal the unfused (unscaled) run, and an
    overflow step must not run the transform."""
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    models = [init(small_net(dtype=torch.float32)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    transforms = [make(), make()]
    opts, scalers = [], []
    for model, t, fused in zip(models, transforms, (True, False), strict=True):
        opts.append(FUSED[opt_name](model.parameters(), fused))
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**4))
        cdgrad.attach(opts[-1], t)
    assert opts[0]._step_supports_amp_scaling and not getattr(opts[1], "_step_supports_amp_scaling", False)
    x, y = batch(3, torch.float32)
    for step in range(4):
        for model, opt, scaler in zip(models, opts, scalers, strict=True):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            if step == 2:
                loss = loss * float("inf")  # overflow: every optimizer skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if step == 2 and isinstance(transforms[0], Square):
            assert len(transforms[0].calls) == len(transforms[1].calls) == 2  # not called on the skipped step
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    if isinstance(transforms[0], Square):
        for a, b in zip(transforms[0].calls, transforms[1].calls, strict=True):
            for ga, gb in zip(a, b, strict=True):  # the fused side saw unscaled gradients too
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- attach_update
def _update_run(opt_name: str, mode: str, steps: int = 3) -> list[torch.Tensor]:
    """Three steps with a transform on the gradient ("gradient"), on the update ("update"), or on the update by
    hand ("hand": step a copy, transform its update, write it back)."""
    model = init(small_net())
    opt = OPTIMIZERS[opt_name](model.parameters())
    t = cdgrad.ChannelDirected("sobolev", 0.5, 0.2)
    if mode == "gradient":
        cdgrad.attach(opt, t)
    elif mode == "update":
        handle = cdgrad.attach_update(opt, t)
        assert handle.optimizer is opt
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, step).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if mode == "hand":
            with torch.no_grad():
                for p, old in zip(model.parameters(), before, strict=True):
                    if t.select(p):
                        p.copy_(old + t(p - old, p))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_attach_update_transforms_the_update(opt_name):
    """w <- w_before + T(w_after - w_before), checked against the update transformed by hand; it differs from the
    gradient transform wherever the optimizer has state."""
    got, hand, on_grad = (
        _update_run(opt_name, "update"),
        _update_run(opt_name, "hand"),
        _update_run(opt_name, "gradient"),
    )
    for p, q in zip(got, hand, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    assert any(not torch.allclose(p, q, atol=1e-9) for p, q in zip(got, on_grad, strict=True))


def test_attach_update_equals_attach_for_plain_sgd():
    """Plain SGD (no momentum, no weight decay) and a linear T: T(-lr g) = -lr T(g), so both attachments agree."""
    OPTIMIZERS["plain"] = lambda p: torch.optim.SGD(p, lr=0.1)
    try:
        for p, q in zip(_update_run("plain", "update"), _update_run("plain", "gradient"), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    finally:
        del OPTIMIZERS["plain"]


def test_attach_update_bad_input_and_remove():
    emb = nn.Embedding(10, 4, sparse=True).double()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    cdgrad.attach_update(opt, cdgrad.ChannelDirected("sobolev", 1.0, scope="all"))
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)  # raised before the step changed anything
    with pytest.raises(TypeError, match="optimizer"):
        cdgrad.attach_update(emb, cdgrad.Centralize())
    model = init(small_net())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = cdgrad.attach_update(opt, cdgrad.Centralize())
    handle.remove()
    twin = copy.deepcopy(model)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=0.01)
    for m, o in ((model, opt), (twin, opt_twin)):
        loss_fn(m, 0).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_attach_update_with_a_closure():
    """step(closure) computes the gradients after the pre-hook: the update is still transformed, as without one."""

    def run(with_closure: bool, attached: bool = True) -> list[torch.Tensor]:
        model = init(small_net())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if attached:
            cdgrad.attach_update(opt, cdgrad.ChannelDirected("sobolev", 0.5, 0.2))
        for step in range(3):
            opt.zero_grad(set_to_none=True)

            def closure(step=step):
                opt.zero_grad()
                loss = loss_fn(model, step)
                loss.backward()
                return loss

            if with_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(True), run(False), strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(run(True), run(True, attached=False), strict=True))
