"""Tests of cdgrad.experiments.models: shapes, parameter counts against closed-form formulas, structure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdgrad.experiments.models import (
    MODEL_REGISTRY,
    MODELS,
    VGG11_CFG,
    VGG16_CFG,
    CifarResNet,
    ShortcutA,
    build_model,
    count_parameters,
    model_names,
    register_model,
)

RESNETS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# Closed-form parameter counts (written from the architecture descriptions, not from the code)
# ----------------------------------------------------------------------------------------------------------


def conv_params(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c  # scale and shift


def resnet_formula(depth: int, shortcut: str, in_channels: int = 3, num_classes: int = 10) -> int:
    """He et al. (2016) CIFAR ResNet: stem, 3 stages of n basic blocks (16, 32, 64 channels), linear head."""
    n = (depth - 2) // 6
    total = conv_params(in_channels, 16, 3, False) + bn_params(16)
    cin = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += conv_params(cin, c, 3, False) + bn_params(c) + conv_params(c, c, 3, False) + bn_params(c)
            if shortcut == "B" and cin != c:
                total += conv_params(cin, c, 1, False) + bn_params(c)
            cin = c
    return total + 64 * num_classes + num_classes


def vgg_formula(cfg, in_channels: int = 3, num_classes: int = 10) -> int:
    total, cin = 0, in_channels
    for v in cfg:
        if v != "M":
            total += conv_params(cin, v, 3, True) + bn_params(v)
            cin = v
    return total + 512 * num_classes + num_classes


def cnn2_formula(in_channels: int, image_size: int, num_classes: int = 10) -> int:
    side = ((image_size - 4) // 2 - 4) // 2
    convs = conv_params(in_channels, 50, 5, True) + conv_params(50, 100, 5, True)
    return convs + 100 * side**2 * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(RESNETS))
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("in_channels, num_classes", [(3, 10), (1, 100)])
def test_resnet_parameter_counts(name, shortcut, in_channels, num_classes):
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
    assert count_parameters(model) == resnet_formula(RESNETS[name], shortcut, in_channels, num_classes)


def test_resnet_published_counts():
    """He et al. (2016), Table 6 (option A): ResNet-20 0.27M, ResNet-32 0.46M, ResNet-56 0.85M parameters.

    The exact counts for 10 classes are those the formula gives: option A (parameter-free shortcuts)
    269,722 / 464,154 / 853,018; option B adds two 1x1 projections (576 + 2,176 = 2,752 parameters):
    272,474 / 466,906 / 855,770 (ResNet-32 B would round to 0.47M, unlike the table).
    """
    assert resnet_formula(20, "A") == 269_722 and resnet_formula(20, "B") == 272_474
    assert resnet_formula(56, "A") == 853_018 and resnet_formula(56, "B") == 855_770
    for name, millions in (("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)):
        assert round(count_parameters(build_model(name, shortcut="A")) / 1e6, 2) == millions
    assert count_parameters(build_model("resnet20")) == 269_722  # option A is the default


@pytest.mark.parametrize("name", ["resnet8", "resnet32", "vgg16"])
def test_without_batchnorm(name):
    """batchnorm=False: no BN module, every conv gains a bias; the parameter count changes by exactly that."""
    with_bn, without = build_model(name, in_channels=1, image_size=28), build_model(name, 10, 1, 28, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    convs = [m for m in without.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is not None and not m.bias.any() for m in convs)
    bn_params = sum(p.numel() for m in with_bn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    conv_bias_before = sum(m.bias.numel() for m in with_bn.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)
    added = sum(m.bias.numel() for m in convs) - conv_bias_before
    assert count_parameters(without) == count_parameters(with_bn) - bn_params + added
    out = without(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_vgg11_and_resnet18_parameter_counts():
    """VGG-11 by the VGG formula; ResNet-18 by its own: stem, 8 basic blocks (3 with 1x1 projections), fc."""
    assert count_parameters(build_model("vgg11")) == vgg_formula(VGG11_CFG) == 9_231_114
    assert count_parameters(build_model("vgg11", num_classes=100)) == vgg_formula(VGG11_CFG, 3, 100)

    def block(cin: int, c: int, projection: bool) -> int:
        return 9 * cin * c + 9 * c * c + 4 * c + ((cin * c + 2 * c) if projection else 0)

    def resnet18(classes: int, cin: int = 3) -> int:
        total = 9 * cin * 64 + 2 * 64
        for cin_, c in ((64, 64), (64, 128), (128, 256), (256, 512)):
            total += block(cin_, c, cin_ != c) + block(c, c, False)
        return total + 512 * classes + classes

    assert count_parameters(build_model("resnet18")) == resnet18(10) == 11_173_962
    assert count_parameters(build_model("resnet18", num_classes=100, in_channels=1)) == resnet18(100, 1)


def test_vgg16_parameter_count():
    assert count_parameters(build_model("vgg16")) == vgg_formula(VGG16_CFG) == 14_728_266
    m = build_model("vgg16", num_classes=100, in_channels=1, image_size=28)
    assert count_parameters(m) == vgg_formula(VGG16_CFG, 1, 100)


@pytest.mark.parametrize("in_channels, image_size", [(1, 28), (3, 32), (1, 16)])
def test_cnn2_parameter_count(in_channels, image_size):
    m = build_model("cnn2", in_channels=in_channels, image_size=image_size)
    assert count_parameters(m) == cnn2_formula(in_channels, image_size)
    assert cnn2_formula(1, 28) == 1300 + 125_100 + 16_010  # 100 * 4 * 4 = 1,600 features for 28x28


def test_count_parameters_shared_and_trainable():
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_parameters(model) == 16
    lin.bias.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 12
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        count_parameters([lin.weight])


# ----------------------------------------------------------------------------------------------------------
# Forward, structure, gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels, image_size", [(1, 28), (3, 32)])
def test_forward_shapes(name, in_channels, image_size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    out = model(torch.randn(3, in_channels, image_size, image_size))
    assert out.shape == (3, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_conv_weights_are_out_in_kh_kw(name):
    model = build_model(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for m in convs:
        assert m.weight.dim() == 4
        assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    conv_params_ = {id(m.weight) for m in convs}
    for p in model.parameters():  # every 4-D parameter is a convolution weight
        assert p.dim() != 4 or id(p) in conv_params_


@pytest.mark.parametrize("name", MODELS)
def test_gradients_flow(name):
    torch.manual_seed(1)
    in_channels, size = (1, 28) if name == "cnn2" else (3, 32)
    model = build_model(name, in_channels=in_channels, image_size=size)
    x = torch.randn(4, in_channels, size, size)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    # A convolution bias followed by batch norm (VGG) is cancelled by the batch mean: its gradient is 0.
    mods = list(model.modules())
    cancelled = {
        id(m.bias)
        for m, nxt in zip(mods, mods[1:], strict=False)
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and m.bias is not None
    }
    assert bool(cancelled) == name.startswith("vgg")
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if id(p) in cancelled:
            assert p.grad.abs().max() < 1e-6 * (1 + loss.item()), pname
        else:
            assert p.grad.abs().sum() > 0, pname


def test_layer_structure():
    for name, depth in RESNETS.items():
        model = build_model(name)
        weighted = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        assert len(weighted) == depth  # option A: every layer counted in the depth has weights
        assert not any(m.kernel_size == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
        b = build_model(name, shortcut="B")
        assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in b.modules()) == 2
    vgg = build_model("vgg16")
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [v for v in VGG16_CFG if v != "M"] and len(convs) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13


def test_cnn2_matches_functional_definition():
    """conv5x5(50) -> ReLU -> pool2 -> conv5x5(100) -> ReLU -> pool2 -> flatten -> linear, by hand."""
    torch.manual_seed(2)
    model = build_model("cnn2", in_channels=1, image_size=28).double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    c1, c2 = model.conv1, model.conv2
    h = F.max_pool2d(F.relu(F.conv2d(x, c1.weight, c1.bias)), 2)
    assert h.shape == (2, 50, 12, 12)
    h = F.max_pool2d(F.relu(F.conv2d(h, c2.weight, c2.bias)), 2)
    assert h.shape == (2, 100, 4, 4)
    ref = h.reshape(2, 1600) @ model.fc.weight.T + model.fc.bias
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_shortcut_a_against_loop():
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64)
    out = ShortcutA(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 3)
    ref = torch.zeros(2, 32, 4, 3, dtype=torch.float64)
    for c in range(16):
        for i in range(4):
            for j in range(3):
                ref[:, 8 + c, i, j] = x[:, c, 2 * i, 2 * j]
    assert torch.equal(out, ref)


def test_resnet_block_by_hand():
    """The first block of stage 2 computes relu(bn(conv(relu(bn(conv x)))) + shortcut(x))."""
    torch.manual_seed(3)
    model = CifarResNet(20).double().eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    block = model.layer2[0]
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)

    def bn(t, m):
        v = lambda u: u.view(1, -1, 1, 1)
        return (t - v(m.running_mean)) / torch.sqrt(v(m.running_var) + m.eps) * v(m.weight) + v(m.bias)

    h = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    h = bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    short = torch.zeros(2, 32, 4, 4, dtype=torch.float64)
    short[:, 8:24] = x[:, :, ::2, ::2]
    torch.testing.assert_close(block(x), F.relu(h + short), rtol=1e-12, atol=1e-12)


def test_initialisation():
    torch.manual_seed(4)
    vgg = build_model("vgg16")
    big = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)][7]  # 256 -> 512: fan-out != fan-in
    assert (big.in_channels, big.out_channels) == (256, 512)
    expected_std = math.sqrt(2.0 / (3 * 3 * big.out_channels))  # Kaiming normal, fan-out, ReLU gain
    assert big.weight.std().item() == pytest.approx(expected_std, rel=0.01)
    assert abs(big.weight.mean().item()) < 0.01 * expected_std
    for m in vgg.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_for_a_seed(name):
    def state(seed):
        torch.manual_seed(seed)
        return build_model(name).state_dict()

    a, b, c = state(5), state(5), state(6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["cnn2", "resnet20", "vgg16"])
def test_compiles_without_graph_breaks(name):
    torch.manual_seed(6)
    in_channels, size = (1, 28) if name == "cnn2" else (3, 32)
    model = build_model(name, in_channels=in_channels, image_size=size).eval()
    x = torch.randn(2, in_channels, size, size)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(x), model(x))


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of") as info:
        build_model("resnet19")
    for name in MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="shortcut must be 'A' or 'B'"):
        build_model("resnet20", shortcut="C")
    with pytest.raises(TypeError, match=r"unexpected keyword.*shortcut.*accepted: \['batchnorm'\]"):
        build_model("vgg16", shortcut="A")
    with pytest.raises(TypeError, match=r"unexpected keyword.*batchnorm.*accepted: none"):
        build_model("cnn2", batchnorm=False)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(TypeError, match="in_channels must be an int >= 1, got float"):  # a non-int is a TypeError
        build_model("vgg16", in_channels=2.0)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        build_model("cnn2", image_size=12)
    with pytest.raises(ValueError, match="image_size 1 is too small"):
        build_model("vgg16", image_size=1)
    with pytest.raises(ValueError, match="depth must be 6n"):
        CifarResNet(21)


def test_register_model_makes_a_network_buildable_by_name():
    calls = []

    def builder(num_classes, in_channels, image_size):
        calls.append((num_classes, in_channels, image_size))
        return nn.Linear(in_channels * image_size * image_size, num_classes)

    assert "regtest-linear" not in model_names()
    register_model("regtest-linear", builder)
    try:
        assert model_names()[: len(MODELS)] == MODELS and "regtest-linear" in model_names()
        model = build_model("regtest-linear", num_classes=3, in_channels=2, image_size=4)
        assert calls == [(3, 2, 4)] and count_parameters(model) == 2 * 16 * 3 + 3
        with pytest.raises(TypeError, match=r"unexpected keyword.*shortcut"):
            build_model("regtest-linear", shortcut="A")
        register_model("regtest-linear", lambda num_classes, in_channels, image_size: "not a module")
        with pytest.raises(TypeError, match="builder of model 'regtest-linear' must return a torch.nn.Module"):
            build_model("regtest-linear")
    finally:
        MODEL_REGISTRY.unregister("regtest-linear")
    with pytest.raises(ValueError, match="name must be one of"):
        build_model("regtest-linear")
    for name in MODELS:
        with pytest.raises(ValueError, match="built in"):
            register_model(name, builder)
    with pytest.raises(TypeError, match="builder must be callable"):
        register_model("x", None)
