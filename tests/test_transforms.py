"""Transforms: selection, composition, paper conventions, state dicts and construction-time validation."""

import io

import pytest
import torch

import cdgrad

pytestmark = pytest.mark.usefixtures("float64_default")


def params_of_every_kind():
    return {
        "conv2d": torch.zeros(8, 4, 3, 3),
        "conv1d": torch.zeros(8, 4, 3),
        "conv3d": torch.zeros(8, 4, 3, 3, 3),
        "linear": torch.zeros(10, 8),
        "bias": torch.zeros(8),
    }


@pytest.mark.parametrize(
    ("scope", "direction", "expected"),
    [
        ("conv", "output", {"conv2d", "conv1d", "conv3d"}),
        ("all", "output", {"conv2d", "conv1d", "conv3d", "linear", "bias"}),
        ("all", "input", {"conv2d", "conv1d", "conv3d", "linear"}),
        ("all", "flat", {"conv2d", "conv1d", "conv3d", "linear", "bias"}),
    ],
)
def test_channel_directed_scope(scope, direction, expected):
    t = cdgrad.ChannelDirected("h0", lam=2.0, direction=direction, scope=scope)
    assert {k for k, p in params_of_every_kind().items() if t.select(p)} == expected


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
@pytest.mark.parametrize(("direction", "dim"), [("output", 0), ("input", 1), ("flat", None)])
def test_channel_directed_is_metric_gradient_plus_beta_f(metric, direction, dim):
    f = torch.randn(6, 5, 3, 3)
    t = cdgrad.ChannelDirected(metric, lam=0.8, beta=0.25, direction=direction)
    g = f.clone()
    t.transform_([g], [torch.zeros_like(f)])
    fn = cdgrad.sobolev if metric == "sobolev" else cdgrad.reweighted_h0
    expected = fn(f, 0.8, dim) + 0.25 * f
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(t(f), expected, rtol=1e-12, atol=1e-14)


def test_paper_h0_convention_is_f_plus_lambda_mean():
    """The paper's Figure 3 code: f + lam * mean_o(f)."""
    f = torch.randn(16, 3, 3, 3)
    for lam in (0.0, 0.5, 3.0, 20.0):
        t = cdgrad.paper_convention("h0", lam)
        g = f.clone()
        t.transform_([g], [f])
        torch.testing.assert_close(g, f + lam * f.mean(0, keepdim=True), rtol=1e-12, atol=1e-13)


def test_paper_sobolev_convention_scales_by_lambda_and_adds_beta_f():
    f = torch.randn(16, 3, 3, 3)
    t = cdgrad.paper_convention("sobolev", 2.0, beta=0.1)
    torch.testing.assert_close(t(f), 2.0 * cdgrad.sobolev(f, 2.0) + 0.1 * f, rtol=1e-12, atol=1e-13)
    same = cdgrad.paper_convention("sobolev", 1.0, beta=0.1)
    torch.testing.assert_close(same(f), cdgrad.ChannelDirected("sobolev", 1.0, 0.1)(f), rtol=0, atol=0)


def test_laplacian_and_centralize_transforms_match_functions():
    f = torch.randn(6, 5, 3, 3)
    for t, expected in [
        (cdgrad.LaplacianSmoothing(0.5), cdgrad.laplacian_smooth(f, 0.5)),
        (cdgrad.LaplacianSmoothing(0.5, direction="output"), cdgrad.laplacian_smooth(f, 0.5, 0)),
        (cdgrad.Centralize(), cdgrad.centralize(f)),
    ]:
        g = f.clone()
        t.transform_([g], [f])
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    assert cdgrad.Centralize("all").select(torch.zeros(3, 4)) and not cdgrad.Centralize().select(torch.zeros(3, 4))
    assert not cdgrad.Centralize("all").select(torch.zeros(3))


def test_chain_applies_in_order_on_each_selection():
    conv, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    chain = cdgrad.Chain(cdgrad.Centralize(), cdgrad.ChannelDirected("sobolev", 0.5, scope="all"))
    g_conv, g_bias = conv.clone(), bias.clone()
    chain.transform_([g_conv, g_bias], [conv, bias])
    torch.testing.assert_close(g_conv, cdgrad.sobolev(cdgrad.centralize(conv), 0.5), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_bias, cdgrad.sobolev(bias, 0.5), rtol=1e-12, atol=1e-14)
    # the other order gives a different result: the chain is not commutative
    rev = cdgrad.Chain(cdgrad.Centralize(), cdgrad.LaplacianSmoothing(1.0))
    other = cdgrad.Chain(cdgrad.LaplacianSmoothing(1.0), cdgrad.Centralize())
    assert not torch.allclose(rev(conv), other(conv))


@pytest.mark.parametrize(
    "make",
    [
        lambda: cdgrad.ChannelDirected("sobolev", 0.3, 0.2, "input", "all"),
        lambda: cdgrad.LaplacianSmoothing(1.5, "output", "conv"),
        lambda: cdgrad.Centralize("all"),
        lambda: cdgrad.paper_convention("h0", 4.0),
        lambda: cdgrad.Chain(cdgrad.Centralize(), cdgrad.paper_convention("sobolev", 2.0, beta=0.1)),
    ],
)
def test_state_dict_round_trip_through_torch_save(make):
    t = make()
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    fresh = {
        "ChannelDirected": lambda: cdgrad.ChannelDirected(),
        "LaplacianSmoothing": lambda: cdgrad.LaplacianSmoothing(),
        "Centralize": lambda: cdgrad.Centralize(),
        "Scaled": lambda: cdgrad.Scaled(cdgrad.ChannelDirected(), 1.0),
        "Chain": lambda: cdgrad.Chain(cdgrad.Centralize(), cdgrad.Scaled(cdgrad.ChannelDirected(), 1.0)),
    }[type(t).__name__]()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert repr(fresh) == repr(t)
    f = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(fresh(f), t(f), rtol=0, atol=0)


def test_load_state_dict_of_another_transform_is_refused():
    with pytest.raises(ValueError, match="ChannelDirected"):
        cdgrad.Centralize().load_state_dict(cdgrad.ChannelDirected().state_dict())


@pytest.mark.parametrize(
    ("make", "exc", "name"),
    [
        (lambda: cdgrad.ChannelDirected("h1"), ValueError, "metric"),
        (lambda: cdgrad.ChannelDirected("sobolev", lam=0.0), ValueError, "lam"),
        (lambda: cdgrad.ChannelDirected("sobolev", lam=float("inf")), ValueError, "lam"),
        (lambda: cdgrad.ChannelDirected("sobolev", lam=float("nan")), ValueError, "lam"),
        (lambda: cdgrad.ChannelDirected("sobolev", beta=float("nan")), ValueError, "beta"),
        (lambda: cdgrad.ChannelDirected("sobolev", direction="spatial"), ValueError, "direction"),
        (lambda: cdgrad.ChannelDirected("sobolev", scope="linear"), ValueError, "scope"),
        (lambda: cdgrad.LaplacianSmoothing(-1.0), ValueError, "sigma"),
        (lambda: cdgrad.Centralize("bias"), ValueError, "scope"),
        (lambda: cdgrad.Chain(cdgrad.Centralize(), "sobolev"), TypeError, "transforms"),
        (lambda: cdgrad.paper_convention("h0", -0.5), ValueError, "lam"),
        (lambda: cdgrad.paper_convention("sobolev", 0.0), ValueError, "lam"),
    ],
)
def test_bad_hyper_parameters_fail_at_construction(make, exc, name):
    with pytest.raises(exc, match=name) as info:
        make()
    if exc is ValueError and name in ("metric", "direction", "scope"):
        assert "one of" in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: cdgrad.ChannelDirected("sobolev", 1.0, scope="all"),
        lambda: cdgrad.ChannelDirected("h0", 2.0, direction="flat", scope="all"),
        lambda: cdgrad.LaplacianSmoothing(1.0, direction="output", scope="all"),
        lambda: cdgrad.LaplacianSmoothing(1.0),
        lambda: cdgrad.Centralize("all"),
    ],
)
def test_scalar_parameters_are_left_alone(make):
    """A 0-d parameter has no axis to smooth: it is not selected, and a step with it works."""
    model = torch.nn.Linear(3, 2)
    model.temperature = torch.nn.Parameter(torch.tensor(2.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = make()
    cdgrad.attach(opt, t)
    (model(torch.randn(4, 3)).sum() * model.temperature).backward()
    grad = model.temperature.grad.clone()
    assert not t.select(model.temperature)
    opt.step()  # ZeroDivisionError / ValueError before scalars were left out
    assert torch.equal(model.temperature.detach(), torch.tensor(2.0).add(grad, alpha=-0.1))  # SGD's own update


def test_paper_convention_has_one_type_and_states_load_across_settings():
    one, two = cdgrad.paper_convention("sobolev", 1.0), cdgrad.paper_convention("sobolev", 2.0, beta=0.1)
    assert type(one) is type(two) is cdgrad.Scaled
    f = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(one(f), cdgrad.sobolev(f, 1.0), rtol=0, atol=0)  # factor 1: not multiplied
    one.load_state_dict(two.state_dict())
    torch.testing.assert_close(one(f), two(f), rtol=0, atol=0)
    h0 = cdgrad.paper_convention("h0", 0.0)
    h0.load_state_dict(cdgrad.paper_convention("h0", 3.0).state_dict())
    torch.testing.assert_close(h0(f), f + 3.0 * f.mean(0, keepdim=True))
    # a state saved from a bare ChannelDirected (what lam = 1 used to return) loads with factor 1
    fresh = cdgrad.paper_convention("sobolev", 5.0)
    fresh.load_state_dict(cdgrad.ChannelDirected("sobolev", 1.0, 0.1).state_dict())
    assert fresh.factor == 1.0 and fresh.transform.beta == 0.1


def test_numpy_scalars_are_accepted_as_hyper_parameters():
    np = pytest.importorskip("numpy")
    f = torch.randn(8, 3, 3, 3)
    t = cdgrad.ChannelDirected("sobolev", lam=np.float64(2.0), beta=np.float32(0.5))
    torch.testing.assert_close(t(f), cdgrad.ChannelDirected("sobolev", 2.0, 0.5)(f), rtol=0, atol=0)
    assert type(t.lam) is float
    assert cdgrad.LaplacianSmoothing(np.int64(2)).sigma == 2.0
    assert cdgrad.paper_convention("h0", np.float64(2.0)).factor == 3.0
    assert cdgrad.Scaled(cdgrad.Centralize(), np.float16(0.5)).factor == 0.5
    with pytest.raises(TypeError, match="lam"):
        cdgrad.ChannelDirected("sobolev", lam=np.bool_(True))


def test_failed_load_leaves_a_chain_exactly_as_it_was():
    chain = cdgrad.Chain(cdgrad.Centralize(), cdgrad.ChannelDirected("sobolev", 0.5))
    state = cdgrad.Chain(cdgrad.Centralize("all"), cdgrad.ChannelDirected("h0", 2.0)).state_dict()
    state["transforms"][1]["config"]["lam"] = -1.0  # the first child's state is fine, the second's is not
    before = repr(chain)
    with pytest.raises(ValueError, match="lam"):
        chain.load_state_dict(state)
    assert repr(chain) == before  # the Centralize child was not loaded either


def test_masked_selects_by_predicate_or_parameters():
    a, b = torch.zeros(4, 3, 3, 3), torch.zeros(5, 3, 3, 3)
    by_list = cdgrad.masked(cdgrad.ChannelDirected(), [a])
    by_predicate = cdgrad.masked(cdgrad.ChannelDirected(), lambda p: p.shape[0] == 5)
    assert by_list.select(a) and not by_list.select(b)
    assert by_predicate.select(b) and not by_predicate.select(a)
    assert not cdgrad.masked(cdgrad.ChannelDirected(), [torch.zeros(3)]).select(torch.zeros(3))  # inner says no
    with pytest.raises(TypeError, match="mask"):
        cdgrad.masked(cdgrad.ChannelDirected(), 3)
    with pytest.raises(TypeError, match="transform"):
        cdgrad.masked("sobolev", [a])
