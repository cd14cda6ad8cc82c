"""cdgrad.reparam: ACB, RepVGG and DBB blocks, their exact merge into one conv, reparameterize/merge on whole models,
Lemma 1 with the real (BatchNorm-free) blocks, and bad input leaving the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cdgrad
from cdgrad.experiments.models import build_model
from cdgrad.reparam import BLOCKS, ACBlock, RepVGGBlock, merge, reparameterize
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("float64_default")


def randomise_batchnorms(module: nn.Module, seed: int) -> None:
    """Statistics and affine parameters far from their defaults, so that every fold is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def randomise_weights(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(BLOCKS)),
    k=st.sampled_from([3, 5]),
    extra_padding=st.integers(0, 1),
    stride=st.integers(1, 2),
    cin=st.integers(1, 5),
    same_channels=st.booleans(),
    cout=st.integers(1, 5),
    size=st.integers(5, 9),
    seed=st.integers(0, 2**16),
)
def test_every_block_merges_exactly(kind, k, extra_padding, stride, cin, same_channels, cout, size, seed):
    """Eval mode, float64: block(x) = conv2d(x, K, stride, padding) + b to round-off, for any shape the block takes
    (kernel 3 or 5, padding k // 2 or more, stride 1 or 2, channel changes; RepVGG's identity where C -> C at
    stride 1)."""
    cout = cin if same_channels else cout
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2 + extra_padding, bias=False)
    block = BLOCKS[kind](conv)
    randomise_weights(block, seed)
    randomise_batchnorms(block, seed + 1)
    block.eval()
    if kind == "repvgg":
        assert (block.identity is not None) == (cin == cout and stride == 1 and extra_padding == 0)
    x = torch.randn(2, cin, size, size, generator=torch.Generator().manual_seed(seed + 2))
    expected = block(x)
    merged = block.to_conv()
    assert merged(x).shape == expected.shape == conv(x).shape
    assert rel_err(merged(x), expected) < 1e-12


def test_batchnorm_and_pad_pads_with_the_batchnorms_output_for_zero():
    """DBB's sequential branches: the first stage's border equals what the BatchNorm gives a zero input, so the
    1x1 -> kxk chain is the merged kxk conv of a zero-padded input (checked against an explicit construction)."""
    torch.manual_seed(0)
    block = BLOCKS["dbb"](nn.Conv2d(3, 4, 3, 1, 1, bias=False))
    randomise_batchnorms(block, 3)
    block.eval()
    x = torch.randn(1, 3, 5, 5)
    padded = block.seq_pad(block.seq_first(x))
    inner = block.seq_pad.bn(block.seq_first(x))
    border = block.seq_pad.bn(block.seq_first(torch.zeros(1, 3, 1, 1)))
    assert torch.equal(padded[..., 1:-1, 1:-1], inner)
    torch.testing.assert_close(padded[..., 0, 0], border[..., 0, 0], rtol=0, atol=1e-15)
    torch.testing.assert_close(padded[..., -1, 2], border[..., 0, 0], rtol=0, atol=1e-15)


MODELS = ["resnet20", "vgg11"]


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@pytest.mark.parametrize("name", MODELS)
def test_reparameterize_train_merge_round_trip(name, kind):
    """A model re-parameterised, trained two steps (BN statistics move), merged: in eval mode the merged model
    computes what the branched one does (1e-10), has the plain model's parameter count and state_dict keys, and
    its state_dict loads (strictly) into a freshly built plain model that computes the same."""
    torch.manual_seed(0)
    plain = build_model(name)
    model = reparameterize(copy.deepcopy(plain), kind)
    blocks = [m for m in model.modules() if isinstance(m, cdgrad.reparam.RepBlock)]
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(blocks) == len(convs) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=g)), torch.arange(4)).backward()
        opt.step()
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=g)
    branched = model(x).detach()
    merge(model)
    assert not any(isinstance(m, cdgrad.reparam.RepBlock) for m in model.modules())
    assert rel_err(model(x).detach(), branched) < 1e-10
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert list(model.state_dict()) == list(plain.state_dict())
    fresh = build_model(name)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert rel_err(fresh(x).detach(), branched) < 1e-10


def lemma_run(block: cdgrad.reparam.RepBlock, opt_kwargs: dict, steps: int = 5) -> float:
    """The BN-free block and a plain conv (initialised to the merged kernel, gradient scaled by block.scaling())
    trained side by side; the largest difference between the merged block and the conv over the steps."""
    g = torch.Generator().manual_seed(0)
    randomise_weights(block, 1)
    conv = nn.Conv2d(block.in_channels, block.out_channels, block.k, block.stride, block.padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(block.kernel_bias()[0])
    sgs = cdgrad.SpatialGradientScaling(conv)
    state = sgs.state_dict()
    state["scalings"] = {"": block.scaling()}
    sgs.load_state_dict(state)
    opt_block = torch.optim.SGD(block.parameters(), **opt_kwargs)
    opt_conv = torch.optim.SGD(conv.parameters(), **opt_kwargs)
    cdgrad.attach(opt_conv, sgs)
    target = torch.randn(4, block.out_channels, 6, 6, generator=g)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(4, block.in_channels, 6, 6, generator=g)
        for net, opt in ((block, opt_block), (conv, opt_conv)):
            opt.zero_grad()
            (torch.tanh(net(x)) - target).square().mean().backward()
            opt.step()
        worst = max(worst, (block.kernel_bias()[0] - conv.weight).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "make, opt_kwargs",
    [
        (lambda: ACBlock(nn.Conv2d(3, 4, 3, 1, 1), bn=False), {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.05}),
        (lambda: ACBlock(nn.Conv2d(3, 3, 5, 1, 2), bn=False), {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (lambda: RepVGGBlock(nn.Conv2d(3, 4, 3, 1, 1), bn=False), {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.05}),
        # with an identity branch (C -> C): no weight decay, which the fixed identity would escape
        (lambda: RepVGGBlock(nn.Conv2d(4, 4, 3, 1, 1), bn=False), {"lr": 0.2, "momentum": 0.9}),
    ],
)
def test_lemma1_with_the_real_blocks(make, opt_kwargs):
    """Lemma 1: the branched block trained by SGD gives, step for step, the merged weights of the plain conv trained
    with G = block.scaling() (the sum of the branch masks), to 1e-12 in float64."""
    block = make()
    assert lemma_run(block, opt_kwargs) < 1e-12


def test_lemma1_fails_without_its_conditions():
    """Counter-check: weight decay with RepVGG's fixed identity branch breaks the identity (the identity is not
    decayed in the block, but is in the plain conv)."""
    block = RepVGGBlock(nn.Conv2d(4, 4, 3, 1, 1), bn=False)
    assert lemma_run(block, {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.05}) > 1e-6
    with pytest.raises(NotImplementedError, match="sequential"):
        BLOCKS["dbb"](nn.Conv2d(2, 2, 3, 1, 1)).scaling()


def structure(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()), {
        k: v.clone() for k, v in model.state_dict().items()
    }


def assert_untouched(model: nn.Module, before: tuple) -> None:
    after = structure(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])


def test_bad_input_names_the_problem_and_changes_nothing():
    model = build_model("resnet20")
    before = structure(model)
    with pytest.raises(ValueError, match=r"kind must be one of \['acb', 'dbb', 'repvgg'\]"):
        reparameterize(model, "rep")
    with pytest.raises(ValueError, match="no re-parameterised block to merge"):
        merge(model)
    assert_untouched(model, before)

    no_pairs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 2), nn.BatchNorm2d(4))
    snapshot = structure(no_pairs)
    with pytest.raises(ValueError, match="no conv \\+ BatchNorm pair"):
        reparameterize(no_pairs, "acb")
    assert_untouched(no_pairs, snapshot)

    reparameterize(model, "acb")
    twice = structure(model)
    with pytest.raises(ValueError, match="already holds re-parameterised blocks"):
        reparameterize(model, "dbb")
    assert_untouched(model, twice)
    merge(model)
    with pytest.raises(ValueError, match="already merged"):
        merge(model)
    for bad in (None, "resnet20", model.state_dict()):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got"):
            merge(bad)

    for conv, why in [
        (nn.Conv2d(3, 4, 2), "kernel is 2x2"),
        (nn.Conv2d(3, 4, (3, 1), padding=1), "kernel is 3x1"),
        (nn.Conv2d(3, 4, 3, padding=0), "padding"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups 1"),
        (nn.Conv2d(3, 4, 3, padding=1, dilation=2), "dilation 1"),
        (nn.Linear(3, 4), "not an nn.Conv2d"),
    ]:
        for block in BLOCKS.values():
            with pytest.raises(ValueError, match=why):
                block(conv)
    with pytest.raises(ValueError, match="no BatchNorm-free form"):
        BLOCKS["dbb"](nn.Conv2d(3, 4, 3, padding=1), bn=False)


def test_a_conv_bias_folds_into_the_batchnorm():
    """A conv with a bias before its BatchNorm (as in VGG): the block absorbs the bias, and the merged model keeps
    the conv's bias key (zero) with the BatchNorm adding the merged bias."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5), nn.ReLU())
    randomise_batchnorms(plain, 0)
    plain.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = plain(x).detach()
    model = reparameterize(copy.deepcopy(plain), "repvgg").eval()
    for branch in (model[0].point, model[0].identity):  # only the k x k branch carries the plain conv
        if branch is not None:
            with torch.no_grad():
                for p in branch.parameters():
                    p.zero_()
    assert rel_err(model(x).detach(), expected) < 1e-12
    merge(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert torch.equal(model[0].bias, torch.zeros(5))
    assert rel_err(model(x).detach(), expected) < 1e-12
