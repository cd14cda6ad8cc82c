"""Tests of cdgrad.experiments.unet, .spade and .tasks.gan: the networks and losses of the dense tasks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cdgrad.experiments.models import build_model, count_parameters, model_names
from cdgrad.experiments.spade import (
    SPADE,
    SYNTHESIS_MODELS,
    MultiscaleDiscriminator,
    SPADEGenerator,
    SPADEResBlock,
    one_hot_labels,
    spade_discriminator,
    spade_generator,
)
from cdgrad.experiments.tasks.gan import feature_matching_loss, hinge_d_loss, hinge_g_loss
from cdgrad.experiments.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET50_ENCODER_PARAMETERS = 23_508_032  # torchvision resnet50: 25,557,032 minus fc (2048 x 1000 + 1000)


def conv_at(model: nn.Module, path: str) -> nn.Conv2d:
    conv = model.get_submodule(path)
    assert isinstance(conv, nn.Conv2d)
    return conv


def patch_convs(d: MultiscaleDiscriminator, scale: int) -> list[nn.Conv2d]:
    """The convolutions of the PatchGAN of one scale, first to last."""
    return [conv_at(layer, "0") for layer in d.get_submodule(f"discriminator_{scale}").children()]


@pytest.fixture(scope="module")
def unet50() -> UNet:
    torch.manual_seed(0)
    return UNet(21, encoder="resnet50")


# ----------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------


def torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of torchvision's resnet50 without fc, written from its architecture."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    return shapes


def test_resnet50_encoder_matches_torchvision_naming_and_count(unet50: UNet) -> None:
    state = unet50.encoder.state_dict()
    expected = torchvision_resnet50_shapes()
    assert list(state) == list(expected)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert count_parameters(unet50.encoder) == RESNET50_ENCODER_PARAMETERS
    assert tuple(state["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (512, 256, 1, 1)
    strides = {name: conv_at(unet50.encoder, f"layer2.0.{name}").stride for name in ("conv1", "conv2", "downsample.0")}
    assert strides == {"conv1": (1, 1), "conv2": (2, 2), "downsample.0": (2, 2)}  # v1.5: stride on the 3x3 conv


def test_unet_resnet50_decoder_parameter_count(unet50: UNet) -> None:
    ins, skips, outs = (2048, 256, 128, 64, 32), (1024, 512, 256, 64, 0), (256, 128, 64, 32, 16)
    decoder = sum(9 * (i + s) * o + 2 * o + 9 * o * o + 2 * o for i, s, o in zip(ins, skips, outs, strict=True))
    head = 9 * 16 * 21 + 21
    assert count_parameters(unet50) == RESNET50_ENCODER_PARAMETERS + decoder + head
    for m in unet50.modules():
        if isinstance(m, nn.Conv2d) and m is not unet50.segmentation_head[0]:
            assert m.bias is None  # every convolution but the head's is followed by batch norm


def test_unet_resnet50_forward_shapes(unet50: UNet) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = unet50.encoder(x)
        out = unet50(x)
    assert [tuple(f.shape) for f in features] == [
        (1, 64, 32, 32),
        (1, 256, 16, 16),
        (1, 512, 8, 8),
        (1, 1024, 4, 4),
        (1, 2048, 2, 2),
    ]
    assert out.shape == (1, 21, 64, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        unet50(torch.randn(1, 3, 48, 48))


def test_unet_small_shapes_and_structure() -> None:
    model = UNet(5, in_channels=1, encoder="small")
    assert model.encoder.out_channels == (16, 32, 64, 128)
    assert [conv_at(b, "conv2.0").out_channels for b in model.decoder.blocks] == [32, 16, 8, 8]
    x = torch.randn(2, 1, 64, 48)
    features = model.encoder(x)
    assert [tuple(f.shape) for f in features] == [(2, 16, 32, 24), (2, 32, 16, 12), (2, 64, 8, 6), (2, 128, 4, 3)]
    assert model(x).shape == (2, 5, 64, 48)
    custom = UNet(3, in_channels=3, encoder="small", decoder_channels=(64, 32, 16, 16))
    assert custom(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(2, 1, 40, 40))
    with pytest.raises(ValueError, match="one entry per encoder feature"):
        UNet(3, encoder="small", decoder_channels=(32, 16, 8))
    with pytest.raises(ValueError, match="encoder"):
        UNet(3, encoder="resnet18")


def test_unet_small_training_step() -> None:
    torch.manual_seed(0)
    model = UNet(4, in_channels=1, encoder="small")
    before = [p.detach().clone() for p in model.parameters()]
    y = torch.randint(0, 4, (4, 32, 32))
    y[:, :4] = 255
    loss = F.cross_entropy(model(torch.randn(4, 1, 32, 32)), y, ignore_index=255)
    torch.autograd.backward(loss)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_registered_unets() -> None:
    assert {"unet-small", "unet-resnet50"} <= set(model_names())
    model = build_model("unet-small", num_classes=3, in_channels=1, image_size=32)
    assert isinstance(model, UNet) and model.encoder_name == "small"
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model("unet-small", num_classes=3, in_channels=1, image_size=40)


def test_load_encoder_round_trip_ignores_fc(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = {k: torch.randn(s) if s else torch.tensor(7) for k, s in torchvision_resnet50_shapes().items()}
    source["fc.weight"], source["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(source, path)
    model = UNet(2, encoder="resnet50")
    head = copy.deepcopy(model.segmentation_head.state_dict())
    model.load_encoder(path)
    state = model.encoder.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in state)
    assert all(torch.equal(v, model.segmentation_head.state_dict()[k]) for k, v in head.items())


def test_load_encoder_adapts_first_conv(tmp_path: Path) -> None:
    source = UNet(2, in_channels=3, encoder="small").encoder.state_dict()
    path = tmp_path / "small.pth"
    torch.save(source, path)
    w = source["conv1.weight"]
    one = UNet(2, in_channels=1, encoder="small")
    one.load_encoder(path)
    torch.testing.assert_close(one.encoder.conv1.weight.detach(), w.sum(1, keepdim=True))
    five = UNet(2, in_channels=5, encoder="small")
    five.load_encoder(path)
    torch.testing.assert_close(five.encoder.conv1.weight.detach(), w[:, [0, 1, 2, 0, 1]] * 0.6)


def test_load_encoder_mismatch_names_the_file(tmp_path: Path) -> None:
    small = UNet(2, encoder="small")
    state = small.encoder.state_dict()
    path = tmp_path / "weights.pth"
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"weights\.pth.*unexpected \['extra\.weight'\]"):
        small.load_encoder(path)
    torch.save({k: v for k, v in state.items() if k != "layer3.conv2.weight"}, path)
    with pytest.raises(ValueError, match=r"weights\.pth.*missing \['layer3\.conv2\.weight'\]"):
        small.load_encoder(path)
    torch.save({**state, "layer1.conv1.weight": torch.zeros(32, 16, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"weights\.pth.*shape mismatch \['layer1\.conv1\.weight \(32, 16, 1, 1\)"):
        small.load_encoder(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"weights\.pth.*state dict"):
        small.load_encoder(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read .*weights\.pth"):
        small.load_encoder(path)
    with pytest.raises(ValueError, match=r"missing\.pth"):
        small.load_encoder(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------------------
# one-hot label maps
# ----------------------------------------------------------------------------------------------------------


def test_one_hot_labels_with_ignored_pixels() -> None:
    y = torch.tensor([[[0, 2, 255], [1, 255, 2]]])
    out = one_hot_labels(y, 3)
    assert out.shape == (1, 3, 2, 3) and out.dtype == torch.float32
    expected = torch.tensor(
        [[[[1, 0, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]]], dtype=torch.float32
    )
    assert torch.equal(out, expected)
    assert torch.equal(out.sum(1), (y != 255).float())
    assert one_hot_labels(y, 3, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\[3\]"):
        one_hot_labels(torch.tensor([[[0, 3]]]), 3)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        one_hot_labels(torch.tensor([[[-1, 0]]]), 3)
    with pytest.raises(ValueError, match="integer"):
        one_hot_labels(torch.zeros(1, 2, 2), 3)


# ----------------------------------------------------------------------------------------------------------
# SPADE
# ----------------------------------------------------------------------------------------------------------


def test_spade_with_zero_modulation_is_the_param_free_norm() -> None:
    torch.manual_seed(0)
    for norm in ("batch", "instance"):
        spade = SPADE(6, 4, hidden=8, norm=norm)
        for conv in (spade.mlp_gamma, spade.mlp_beta):
            assert conv.bias is not None
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        x = 3 * torch.randn(2, 6, 5, 7) + 1
        seg = one_hot_labels(torch.randint(0, 4, (2, 10, 14)), 4)
        reference = copy.deepcopy(spade.param_free_norm)(x)
        assert torch.equal(spade(x, seg), reference)
        dims = (0, 2, 3) if norm == "batch" else (2, 3)
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        torch.testing.assert_close(reference, (x - mean) / torch.sqrt(var + 1e-5))
    assert not any(p.requires_grad for p in spade.param_free_norm.parameters())


def test_spade_constant_label_map_gives_uniform_modulation() -> None:
    torch.manual_seed(0)
    spade = SPADE(5, 3, hidden=8)
    seg = torch.zeros(2, 3, 12, 12)
    seg[:, 1] = 1.0
    gamma, beta = spade.modulation(seg, (12, 12))
    x = torch.randn(2, 5, 12, 12)
    out = spade(x, seg)
    normed = copy.deepcopy(spade.param_free_norm)(x)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # two 3x3 convs: zero padding reaches 2 pixels
    for t in (gamma, beta):
        torch.testing.assert_close(t[inner], t[:, :, 2:3, 2:3].expand_as(t[inner]), rtol=0, atol=1e-6)
        assert t[0, :, 2, 2].abs().max() > 0  # a nonzero modulation, uniform over the interior
    g, b = gamma[:, :, 2:3, 2:3], beta[:, :, 2:3, 2:3]
    torch.testing.assert_close(out[inner], (normed * (1 + g) + b)[inner])


def test_spade_resizes_the_label_map_nearest() -> None:
    torch.manual_seed(0)
    spade = SPADE(4, 3, hidden=8).eval()
    seg = one_hot_labels(torch.randint(0, 3, (2, 16, 16)), 3)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(spade(x, seg), spade(x, seg[:, :, ::2, ::2]), rtol=0, atol=0)


@pytest.mark.parametrize("fin, fout", [(8, 8), (8, 4)])
def test_spade_resblock_structure_and_formula(fin: int, fout: int) -> None:
    torch.manual_seed(0)
    block = SPADEResBlock(fin, fout, label_nc=3, hidden=8)
    assert block.learned_shortcut == (fin != fout)
    assert block.conv_0.weight.shape == (min(fin, fout), fin, 3, 3)
    assert block.conv_1.weight.shape == (fout, min(fin, fout), 3, 3)
    convs = [block.conv_0, block.conv_1] + ([block.conv_s] if block.conv_s is not None else [])
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    if fin != fout:
        assert block.conv_s is not None and block.norm_s is not None
        assert block.conv_s.weight.shape == (fout, fin, 1, 1) and block.conv_s.bias is None
    else:
        assert block.conv_s is None and block.norm_s is None
    seg = one_hot_labels(torch.randint(0, 3, (2, 8, 8)), 3)
    x = torch.randn(2, fin, 8, 8)
    block(x, seg)  # one training step of batch-norm statistics, then the eval-mode formula
    block.eval()

    def act(t: Tensor) -> Tensor:
        return F.leaky_relu(t, 0.2)

    dx = block.conv_1(act(block.norm_1(block.conv_0(act(block.norm_0(x, seg))), seg)))
    shortcut = x if block.conv_s is None or block.norm_s is None else block.conv_s(block.norm_s(x, seg))
    out = block(x, seg)
    assert out.shape == (2, fout, 8, 8)
    torch.testing.assert_close(out, shortcut + dx)


def test_spectral_norm_bounds_the_resblock_convolutions() -> None:
    torch.manual_seed(0)
    block = SPADEResBlock(4, 6, label_nc=2, hidden=4)
    seg = torch.ones(2, 2, 4, 4)
    for _ in range(30):  # power iterations converge during training forwards
        block(torch.randn(2, 4, 4, 4), seg)
    assert block.conv_s is not None
    for conv in (block.conv_0, block.conv_1, block.conv_s):
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        torch.testing.assert_close(sigma, torch.tensor(1.0), rtol=1e-3, atol=0)


def test_generator_shapes_and_range() -> None:
    torch.manual_seed(0)
    g = spade_generator("spade-small", label_nc=5, image_size=64)
    assert (g.sh, g.sw, g.ngf) == (2, 2, 16)
    seg = one_hot_labels(torch.randint(0, 5, (2, 64, 64)), 5)
    out = g(seg)
    assert out.shape == (2, 3, 64, 64)
    assert out.abs().max() <= 1
    rect = SPADEGenerator(4, out_channels=1, ngf=2, image_size=(32, 64), hidden=4)
    assert (rect.sh, rect.sw) == (1, 2)
    assert rect(one_hot_labels(torch.randint(0, 4, (2, 32, 64)), 4)).shape == (2, 1, 32, 64)
    assert [getattr(rect, f"up_{i}").conv_1.weight.shape[0] for i in range(4)] == [16, 8, 4, 2]


@pytest.mark.parametrize("num_up", [6, 7])
def test_generator_more_and_most_upsamplings(num_up: int) -> None:
    torch.manual_seed(0)
    g = SPADEGenerator(3, ngf=2, image_size=2**num_up, num_up=num_up, hidden=4)
    assert (g.sh, g.sw) == (1, 1)
    assert (g.up_4 is not None) == (num_up == 7)
    seg = one_hot_labels(torch.randint(0, 3, (2, 2**num_up, 2**num_up)), 3)
    assert g(seg).shape == (2, 3, 2**num_up, 2**num_up)


def test_generator_with_latent_code() -> None:
    torch.manual_seed(0)
    g = SPADEGenerator(3, ngf=2, image_size=32, z_dim=8, hidden=4)
    assert isinstance(g.fc, nn.Linear) and g.fc.out_features == 32 * 1 * 1
    seg = one_hot_labels(torch.randint(0, 3, (2, 32, 32)), 3)
    g(seg)
    g.eval()
    z = torch.randn(2, 8)
    assert torch.equal(g(seg, z), g(seg, z))
    assert g(seg).shape == (2, 3, 32, 32)


def test_generator_validation() -> None:
    with pytest.raises(ValueError, match="divisible by 2\\*\\*num_up = 32"):
        SPADEGenerator(3, ngf=2, image_size=48)
    with pytest.raises(ValueError, match="num_up"):
        SPADEGenerator(3, ngf=2, image_size=64, num_up=4)
    with pytest.raises(ValueError, match="name"):
        spade_generator("pix2pix", 3, 64)


def test_paper_sized_networks() -> None:
    assert SYNTHESIS_MODELS == ("spade", "spade-small")
    g = spade_generator("spade", label_nc=35, image_size=(256, 512))
    assert (g.sh, g.sw) == (8, 16)
    assert g.fc.weight.shape == (1024, 35, 3, 3)
    assert g.head_0.norm_0.mlp_shared[0].weight.shape == (128, 35, 3, 3)
    assert g.head_0.norm_0.mlp_gamma.weight.shape == (1024, 128, 3, 3)
    assert [getattr(g, f"up_{i}").conv_1.weight.shape[0] for i in range(4)] == [512, 256, 128, 64]
    assert g.conv_img.weight.shape == (3, 64, 3, 3) and g.up_4 is None
    d = spade_discriminator("spade", label_nc=35)
    assert isinstance(d, MultiscaleDiscriminator) and d.num_d == 2
    convs = patch_convs(d, 0)
    assert [tuple(c.weight.shape) for c in convs] == [
        (64, 38, 4, 4),
        (128, 64, 4, 4),
        (256, 128, 4, 4),
        (512, 256, 4, 4),
        (1, 512, 4, 4),
    ]


def test_discriminator_output_structure() -> None:
    torch.manual_seed(0)
    d = MultiscaleDiscriminator(input_nc=5, ndf=4, n_layers=3, num_d=3)
    x = torch.randn(2, 5, 32, 32)
    out = d(x)
    assert len(out) == 3 and all(len(scale) == 4 for scale in out)
    side = 32
    for scale in out:
        s1 = side // 2 + 1  # 4x4 convolutions, padding 2: side // stride + 1 for strides 2, 2, 1, 1
        s2 = s1 // 2 + 1
        sides = [s1, s2, s2 + 1, s2 + 2]
        assert [tuple(f.shape) for f in scale] == [(2, c, s, s) for c, s in zip((4, 8, 16, 1), sides, strict=True)]
        side = (side + 1) // 2  # avg-pool 3, stride 2, padding 1
    convs = patch_convs(d, 0)
    assert [parametrize.is_parametrized(c, "weight") for c in convs] == [False, True, True, False]
    assert [c.bias is None for c in convs] == [False, True, True, False]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1), (1, 1)]
    layers = list(d.get_submodule("discriminator_0").children())
    assert all(isinstance(layer.get_submodule("1"), nn.InstanceNorm2d) for layer in layers[1:3])
    d.eval()
    pooled = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    torch.testing.assert_close(d(x)[1][-1], d.get_submodule("discriminator_1")(pooled)[-1])


# ----------------------------------------------------------------------------------------------------------
# GAN losses
# ----------------------------------------------------------------------------------------------------------


def test_hinge_losses_against_hand_values() -> None:
    real = [torch.tensor([[0.5, 2.0], [-1.0, 1.0]]), torch.tensor([0.0, 3.0])]
    fake = [torch.tensor([[-2.0, 0.5], [-0.5, 1.0]]), torch.tensor([-1.5, 0.0])]
    # scale 0: relu(1 - real) = 0.5, 0, 2, 0 -> 0.625; relu(1 + fake) = 0, 1.5, 0.5, 2 -> 1.0
    # scale 1: relu(1 - real) = 1, 0 -> 0.5; relu(1 + fake) = 0, 1 -> 0.5
    d = hinge_d_loss(real, fake)
    torch.testing.assert_close(d, torch.tensor(((0.625 + 1.0) + (0.5 + 0.5)) / 2))
    # fake means: -0.25 and -0.75
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor((0.25 + 0.75) / 2))
    as_features = [[torch.randn(3), r] for r in real], [[torch.randn(3), f] for f in fake]
    torch.testing.assert_close(hinge_d_loss(*as_features), d)
    torch.testing.assert_close(hinge_g_loss(as_features[1]), hinge_g_loss(fake))
    torch.testing.assert_close(hinge_g_loss(fake[0]), torch.tensor(0.25))
    with pytest.raises(ValueError, match="scales"):
        hinge_d_loss(real, fake[:1])


def test_feature_matching_loss_brute_force_and_no_gradient_to_real() -> None:
    torch.manual_seed(0)
    shapes = [[(2, 3, 4, 4), (2, 5, 2, 2), (2, 1, 3, 3)], [(2, 3, 2, 2), (2, 5, 1, 1), (2, 1, 2, 2)]]
    real = [[torch.randn(s, requires_grad=True) for s in scale] for scale in shapes]
    fake = [[torch.randn(s, requires_grad=True) for s in scale] for scale in shapes]
    loss = feature_matching_loss(real, fake)
    expected = torch.tensor(0.0)
    for r_scale, f_scale in zip(real, fake, strict=True):
        for r, f in zip(r_scale[:-1], f_scale[:-1], strict=True):  # the logits (last) are left out
            expected = expected + (f.detach() - r.detach()).abs().mean()
    torch.testing.assert_close(loss, expected / 2)
    torch.autograd.backward(loss)
    assert all(t.grad is None for scale in real for t in scale)
    assert all(f.grad is not None for scale in fake for f in scale[:-1])
    assert all(scale[-1].grad is None for scale in fake)


# ----------------------------------------------------------------------------------------------------------
# a training step
# ----------------------------------------------------------------------------------------------------------


def _flat(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_one_training_step_of_small_gan() -> None:
    torch.manual_seed(0)
    label_nc = 4
    g = spade_generator("spade-small", label_nc, image_size=32, out_channels=1)
    d = spade_discriminator("spade-small", label_nc, out_channels=1)
    assert len(d(torch.randn(2, label_nc + 1, 32, 32))) == 2
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.01), torch.optim.SGD(d.parameters(), lr=0.04)
    seg = one_hot_labels(torch.randint(0, label_nc, (2, 32, 32)), label_nc)
    real = torch.rand(2, 1, 32, 32) * 2 - 1
    g_before, d_before = _flat(g), _flat(d)

    fake = g(seg)
    pred_real = d(torch.cat([seg, real], 1))
    pred_fake = d(torch.cat([seg, fake], 1))
    g_loss = hinge_g_loss(pred_fake) + 10 * feature_matching_loss(pred_real, pred_fake)
    opt_g.zero_grad()
    torch.autograd.backward(g_loss)
    opt_g.step()

    pred_real = d(torch.cat([seg, real], 1))
    pred_fake = d(torch.cat([seg, fake.detach()], 1))
    d_loss = hinge_d_loss(pred_real, pred_fake)
    opt_d.zero_grad()
    torch.autograd.backward(d_loss)
    opt_d.step()

    assert torch.isfinite(g_loss) and torch.isfinite(d_loss)
    assert all(not torch.equal(b, p) for b, p in zip(g_before, g.parameters(), strict=True))
    # every parameter of D moves but the logit biases: while all hinge terms are active (logits in (-1, 1) at
    # initialisation) their gradients -1 (real) and +1 (fake) cancel
    changed = {n: not torch.equal(b, p) for b, (n, p) in zip(d_before, d.named_parameters(), strict=True)}
    assert {n for n, c in changed.items() if not c} == {f"discriminator_{i}.model3.0.bias" for i in range(2)}
