"""The networks of the dense tasks: a UNet for semantic segmentation and SPADE for image synthesis.

Segmentation: `UNet`, the UNet of ``segmentation_models_pytorch`` (the network of Lao et al. on PascalVOC)
with a ResNet-50 encoder whose state-dict keys are torchvision's ``resnet50`` without ``fc.*``, so ImageNet
weights load from a file with `UNet.load_encoder`; ``encoder="small"`` is a CPU-sized variant. Registered in
the toolkit's model registry as ``"unet-resnet50"`` and ``"unet-small"``.

Synthesis: SPADE (Park et al. 2019, the reference implementation's defaults): `SPADE`, `SPADEResBlock`,
`SPADEGenerator` (no VAE unless ``z_dim`` is given), `MultiscaleDiscriminator` (pix2pixHD's PatchGAN at
``num_d`` scales), the hinge losses `hinge_d_loss` / `hinge_g_loss` and `feature_matching_loss`. The
generator loss of the paper is ``hinge_g_loss(fake) + 10 * feature_matching_loss(real, fake)`` (its VGG
perceptual term is not provided); the discriminator loss is ``hinge_d_loss(real, fake)``.

Every convolution weight has layout ``(out, in, kh, kw)``, and no forward pass has data-dependent Python control
flow. The UNet is initialised with `cdgrad.experiments.models.init_weights` (Kaiming-normal fan-out convs, as
torchvision's ResNet); the SPADE networks as the reference implementation (Xavier-normal weights with gain 0.02,
zero biases), spectral norm applied after initialisation.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from cdgrad.experiments.models import MODEL_REGISTRY, BasicBlock, ModelBuilder, ModelEntry, init_weights, register_model

__all__ = [
    "SPADE",
    "SYNTHESIS_MODELS",
    "Bottleneck",
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "ResNet50Encoder",
    "SPADEGenerator",
    "SPADEResBlock",
    "SmallEncoder",
    "UNet",
    "UNetDecoder",
    "UNetDecoderBlock",
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "one_hot_labels",
    "spade_discriminator",
    "spade_generator",
]

# the image-synthesis networks (`spade_generator`, `spade_discriminator`)
SYNTHESIS_MODELS = ("spade", "spade-small")

SPADE_INIT_GAIN = 0.02  # the reference's init_variance for Xavier-normal weights


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(H, W)`` from an int side or a pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value, name), value
    if isinstance(value, Sequence) and len(value) == 2:
        return _positive_int(value[0], name), _positive_int(value[1], name)
    raise ValueError(f"{name} must be a positive int or a pair (H, W) of them, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# UNet encoders
# ----------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: ``1x1 -> 3x3 (stride) -> 1x1 (x4)``, BN after each, no conv biases.

    ``downsample`` (1x1 convolution with stride + BN) projects the input when the shape changes.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50Encoder(nn.Module):
    """ResNet-50 without its classifier; state-dict keys equal torchvision's ``resnet50`` without ``fc.*``.

    ``conv7x7(in -> 64, stride 2) -> BN -> ReLU`` (feature 1, 1/2), ``maxpool3x3/2``, then `Bottleneck` stages
    ``layer1..layer4`` of 3, 4, 6, 3 blocks (stride 2 on the 3x3 conv of the first block of ``layer2..4``).
    `forward` returns the five features at 1/2, 1/4, 1/8, 1/16, 1/32 with `out_channels` 64, 256, 512, 1024,
    2048. 23,508,032 parameters for 3 input channels.
    """

    out_channels = (64, 256, 512, 1024, 2048)

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        _positive_int(in_channels, "in_channels")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages: list[nn.Module] = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(self.maxpool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        return [f1, f2, f3, f4, self.layer4(f4)]


class SmallEncoder(nn.Module):
    """A CPU-sized residual encoder with 4 downsamplings.

    ``conv3x3(in -> w0, stride 2) -> BN -> ReLU`` (feature 1, 1/2), then ``layer1..layer3``: one
    `cdgrad.experiments.models.BasicBlock` each, stride 2, 1x1-projection shortcut, widths ``w1..w3``. `forward`
    returns the features at 1/2, 1/4, 1/8, 1/16 with `out_channels` = ``widths`` (default 16, 32, 64, 128).
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        _positive_int(in_channels, "in_channels")
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 channel counts, got {widths!r}")
        self.out_channels = tuple(_positive_int(w, "widths entry") for w in widths)
        w0, w1, w2, w3 = self.out_channels
        self.conv1 = nn.Conv2d(in_channels, w0, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.layer1 = BasicBlock(w0, w1, stride=2, shortcut="B")
        self.layer2 = BasicBlock(w1, w2, stride=2, shortcut="B")
        self.layer3 = BasicBlock(w2, w3, stride=2, shortcut="B")

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(f1)
        f3 = self.layer2(f2)
        return [f1, f2, f3, self.layer3(f3)]


# ----------------------------------------------------------------------------------------------------------
# UNet decoder and model
# ----------------------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """``conv3x3 (no bias) -> BN -> ReLU`` (``segmentation_models_pytorch``'s ``Conv2dReLU``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetDecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip feature (if any), then two ``conv3x3 -> BN -> ReLU``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        out: Tensor = self.conv2(self.conv1(x))
        return out


class UNetDecoder(nn.Module):
    """The UNet decoder of ``segmentation_models_pytorch``: one `UNetDecoderBlock` per encoder feature.

    Block ``i`` takes the previous output (the deepest feature first), upsamples it and concatenates the
    encoder feature of the same resolution; the last block (back to full resolution) has no skip.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]) -> None:
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"decoder_channels must have one entry per encoder feature ({len(encoder_channels)}), "
                f"got {tuple(decoder_channels)}"
            )
        outs = [_positive_int(c, "decoder_channels entry") for c in decoder_channels]
        deep_first = list(encoder_channels)[::-1]
        ins = [deep_first[0], *outs[:-1]]
        skips = [*deep_first[1:], 0]
        self.blocks = nn.ModuleList(UNetDecoderBlock(i, s, o) for i, s, o in zip(ins, skips, outs, strict=True))

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        skips: list[Tensor | None] = [*features[-2::-1], None]
        for block, skip in zip(self.blocks, skips, strict=True):
            x = block(x, skip)
        return x


class UNet(nn.Module):
    """UNet (``segmentation_models_pytorch.Unet``) with a ResNet-50 or a small residual encoder.

    ``encoder="resnet50"``: `ResNet50Encoder` (features 64, 256, 512, 1024, 2048 at 1/2 .. 1/32), decoder
    channels ``(256, 128, 64, 32, 16)``; inputs divisible by 32. ``encoder="small"``: `SmallEncoder` (16, 32,
    64, 128 at 1/2 .. 1/16), decoder channels ``(32, 16, 8, 8)``; inputs divisible by 16 (for speed on CPU: a
    training step on 16 images 1x64x64 costs about half of one with decoder channels ``(64, 32, 16, 16)``). A final
    ``conv3x3 -> num_classes`` (with bias) gives logits ``(N, num_classes, H, W)`` at the input's size. Module
    names follow ``segmentation_models_pytorch`` (``encoder``, ``decoder.blocks.i.conv1.0``, ...,
    ``segmentation_head.0``); initialisation is `cdgrad.experiments.models.init_weights` throughout.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str = "resnet50",
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _positive_int(num_classes, "num_classes")
        _positive_int(in_channels, "in_channels")
        self.encoder: ResNet50Encoder | SmallEncoder
        if encoder == "resnet50":
            self.encoder = ResNet50Encoder(in_channels)
            default: tuple[int, ...] = (256, 128, 64, 32, 16)
        elif encoder == "small":
            self.encoder = SmallEncoder(in_channels)
            default = (32, 16, 8, 8)
        else:
            raise ValueError(f"encoder must be 'resnet50' or 'small', got {encoder!r}")
        channels = tuple(default if decoder_channels is None else decoder_channels)
        self.encoder_name = encoder
        self.decoder = UNetDecoder(self.encoder.out_channels, channels)
        self.segmentation_head = nn.Sequential(nn.Conv2d(channels[-1], num_classes, 3, padding=1))
        self.divisor = 2 ** len(self.encoder.out_channels)  # input sides must be multiples of this
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(
                f"UNet({self.encoder_name!r}) needs input sides divisible by {self.divisor}, got {tuple(x.shape)}"
            )
        out: Tensor = self.segmentation_head(self.decoder(self.encoder(x)))
        return out

    def load_encoder(self, path: str | os.PathLike[str]) -> None:
        """Load encoder weights from a file holding a state dict (torchvision's ``resnet50`` for ``"resnet50"``).

        Keys ``fc.*`` are ignored; every other key must match the encoder exactly (names and shapes), else
        `ValueError` naming the file. With ``in_channels != 3`` a 3-channel ``conv1.weight`` is adapted as in
        ``segmentation_models_pytorch``: summed over its input channels for 1 channel, otherwise cycled over
        the new channels and scaled by ``3 / in_channels``.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            raise ValueError(f"cannot read encoder weights from {os.fspath(path)!r}: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{os.fspath(path)!r} does not hold a state dict (a dict of named tensors)")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.encoder.state_dict()
        weight = state.get("conv1.weight")
        conv1 = own["conv1.weight"]
        if isinstance(weight, Tensor) and weight.dim() == 4 and weight.shape[1] == 3 and conv1.shape[1] != 3:
            new_in = conv1.shape[1]
            if new_in == 1:
                state["conv1.weight"] = weight.sum(dim=1, keepdim=True)
            else:
                state["conv1.weight"] = weight[:, [i % 3 for i in range(new_in)]] * (3 / new_in)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(
            f"{k} {tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__} "
            f"(expected {tuple(own[k].shape)})"
            for k in set(own) & set(state)
            if not isinstance(state[k], Tensor) or state[k].shape != own[k].shape
        )
        if missing or unexpected or wrong:
            problems = [
                f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
                if items
            ]
            raise ValueError(
                f"{os.fspath(path)!r} does not match the {self.encoder_name} encoder: " + "; ".join(problems)
            )
        self.encoder.load_state_dict(state, strict=True)


def _unet_builder(encoder: str) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        model = UNet(num_classes, in_channels, encoder=encoder)
        _positive_int(image_size, "image_size")
        if image_size % model.divisor:
            raise ValueError(f"unet-{encoder} needs image_size divisible by {model.divisor}, got {image_size}")
        return model

    return build


# ----------------------------------------------------------------------------------------------------------
# SPADE (Park et al. 2019)
# ----------------------------------------------------------------------------------------------------------


def _spade_conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = True,
    sn: bool = False,
) -> nn.Conv2d:
    """A convolution initialised as SPADE's reference (Xavier normal, gain 0.02; zero bias), optionally
    spectrally normalised (after initialisation, so the power-iteration vectors fit the weight)."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2 if padding is None else padding, bias=bias)
    nn.init.xavier_normal_(conv.weight, gain=SPADE_INIT_GAIN)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    if sn:
        spectral_norm(conv)  # registers the parametrization in place
    return conv


def one_hot_labels(y: Tensor, num_classes: int, ignore_index: int = 255, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot ``(N, num_classes, H, W)`` maps of integer labels ``y`` ``(N, H, W)``; ``ignore_index`` pixels
    are all-zero. Any other label outside ``[0, num_classes)`` raises `ValueError`."""
    _positive_int(num_classes, "num_classes")
    if y.dim() != 3 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must be an integer tensor (N, H, W), got {y.dtype} {tuple(y.shape)}")
    keep = y != ignore_index
    labels = y.long().masked_fill(~keep, 0)
    if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
        bad = torch.unique(y[keep & ((labels < 0) | (labels >= num_classes))])[:5].tolist()
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index} (ignored), got {bad}")
    out = torch.zeros(y.shape[0], num_classes, *y.shape[1:], dtype=dtype, device=y.device)
    out.scatter_(1, labels.unsqueeze(1), 1.0)
    return out * keep.unsqueeze(1).to(dtype)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``norm(x) * (1 + gamma(seg)) + beta(seg)``.

    ``norm``: parameter-free batch norm (``"batch"``, the paper's default ``spadesyncbatch3x3``) or instance
    norm (``"instance"``). The label map is resized (nearest) to the size of ``x``, then ``mlp_shared``
    (``conv kxk label_nc -> hidden -> ReLU``) and two ``conv kxk hidden -> norm_nc`` give ``gamma`` and ``beta``.
    """

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128, kernel: int = 3, norm: str = "batch") -> None:
        super().__init__()
        for value, name in ((norm_nc, "norm_nc"), (label_nc, "label_nc"), (hidden, "hidden"), (kernel, "kernel")):
            _positive_int(value, name)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (same-size convolutions), got {kernel}")
        self.param_free_norm: nn.Module
        if norm == "batch":
            self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        elif norm == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        else:
            raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")
        self.mlp_shared = nn.Sequential(_spade_conv(label_nc, hidden, kernel), nn.ReLU())
        self.mlp_gamma = _spade_conv(hidden, norm_nc, kernel)
        self.mlp_beta = _spade_conv(hidden, norm_nc, kernel)

    def modulation(self, segmap: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(gamma, beta)``, each ``(N, norm_nc, *size)``, from the label map resized (nearest) to ``size``."""
        seg = F.interpolate(segmap, size=tuple(size), mode="nearest")
        actv = self.mlp_shared(seg)
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x: Tensor, segmap: Tensor) -> Tensor:
        gamma, beta = self.modulation(segmap, x.shape[-2:])
        out: Tensor = self.param_free_norm(x) * (1 + gamma) + beta
        return out


class SPADEResBlock(nn.Module):
    """SPADE residual block: ``conv_1(lrelu(norm_1(conv_0(lrelu(norm_0(x)))))) + shortcut(x)``.

    ``norm_*`` are `SPADE` layers, ``lrelu`` leaky ReLU (slope 0.2), ``conv_*`` 3x3 convolutions with spectral
    norm (``fin -> min(fin, fout) -> fout``). The shortcut is the identity when ``fin == fout``, else learned:
    ``conv_s(norm_s(x))``, a 1x1 spectrally normalised convolution without bias (no activation).
    """

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128, norm: str = "batch") -> None:
        super().__init__()
        _positive_int(fin, "fin")
        _positive_int(fout, "fout")
        fmiddle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = _spade_conv(fin, fmiddle, 3, sn=True)
        self.conv_1 = _spade_conv(fmiddle, fout, 3, sn=True)
        self.norm_0 = SPADE(fin, label_nc, hidden, norm=norm)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden, norm=norm)
        self.conv_s: nn.Conv2d | None = None
        self.norm_s: SPADE | None = None
        if self.learned_shortcut:
            self.conv_s = _spade_conv(fin, fout, 1, bias=False, sn=True)
            self.norm_s = SPADE(fin, label_nc, hidden, norm=norm)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        x_s: Tensor = x if self.conv_s is None or self.norm_s is None else self.conv_s(self.norm_s(x, seg))
        dx: Tensor = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


class SPADEGenerator(nn.Module):
    """The SPADE generator: label map ``(N, label_nc, H, W)`` (one-hot floats) -> image ``(N, out_channels, H, W)``
    in ``[-1, 1]``.

    From ``sh x sw = H / 2**num_up x W / 2**num_up``: ``fc`` (without VAE: conv3x3 of the label map resized
    (nearest) to ``sh x sw``, ``label_nc -> 16 ngf``; with ``z_dim``: linear ``z -> 16 ngf sh sw``, ``z`` drawn
    from N(0, I) when not given), then `SPADEResBlock` s ``head_0``, ``G_middle_0``, ``G_middle_1`` (16 ngf) and
    ``up_0..up_3`` (``16 ngf -> 8 -> 4 -> 2 -> 1 ngf``) with nearest x2 upsamplings as the reference:
    ``num_up=5`` ("normal": after ``head_0`` and before each ``up_i``), 6 ("more": also after ``G_middle_0``),
    7 ("most": also an ``up_4`` block ``ngf -> ngf // 2``). Then leaky ReLU (0.2), ``conv_img`` (3x3 to
    ``out_channels``) and tanh. ``image_size`` (an int or ``(H, W)``) must be divisible by ``2**num_up``.
    """

    def __init__(
        self,
        label_nc: int,
        out_channels: int = 3,
        ngf: int = 64,
        image_size: int | Sequence[int] = (256, 512),
        num_up: int = 5,
        z_dim: int | None = None,
        hidden: int = 128,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        for value, name in ((label_nc, "label_nc"), (out_channels, "out_channels"), (ngf, "ngf")):
            _positive_int(value, name)
        if num_up not in (5, 6, 7):
            raise ValueError(f"num_up must be 5 ('normal'), 6 ('more') or 7 ('most'), got {num_up!r}")
        if num_up == 7 and ngf < 2:
            raise ValueError(f"num_up=7 needs ngf >= 2 (its last block has ngf // 2 channels), got {ngf}")
        height, width = _pair(image_size, "image_size")
        if height % 2**num_up or width % 2**num_up:
            raise ValueError(f"image_size must be divisible by 2**num_up = {2**num_up}, got {(height, width)}")
        self.image_size = (height, width)
        self.sh, self.sw = height // 2**num_up, width // 2**num_up
        self.num_up, self.ngf, self.z_dim = num_up, ngf, z_dim
        nf = 16 * ngf
        self.fc: nn.Module
        if z_dim is None:
            self.fc = _spade_conv(label_nc, nf, 3)
        else:
            _positive_int(z_dim, "z_dim")
            self.fc = nn.Linear(z_dim, nf * self.sh * self.sw)
            nn.init.xavier_normal_(self.fc.weight, gain=SPADE_INIT_GAIN)
            nn.init.zeros_(self.fc.bias)

        def block(fin: int, fout: int) -> SPADEResBlock:
            return SPADEResBlock(fin, fout, label_nc, hidden, norm)

        self.head_0 = block(nf, nf)
        self.G_middle_0 = block(nf, nf)
        self.G_middle_1 = block(nf, nf)
        self.up_0 = block(nf, 8 * ngf)
        self.up_1 = block(8 * ngf, 4 * ngf)
        self.up_2 = block(4 * ngf, 2 * ngf)
        self.up_3 = block(2 * ngf, ngf)
        final_nc = ngf
        self.up_4: SPADEResBlock | None = None
        if num_up == 7:
            self.up_4 = block(ngf, ngf // 2)
            final_nc = ngf // 2
        self.conv_img = _spade_conv(final_nc, out_channels, 3)

    @staticmethod
    def _up(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, seg: Tensor, z: Tensor | None = None) -> Tensor:
        if self.z_dim is None:
            x = self.fc(F.interpolate(seg, size=(self.sh, self.sw), mode="nearest"))
        else:
            if z is None:
                z = torch.randn(seg.shape[0], self.z_dim, device=seg.device, dtype=seg.dtype)
            x = self.fc(z).view(-1, 16 * self.ngf, self.sh, self.sw)
        x = self._up(self.head_0(x, seg))
        x = self.G_middle_0(x, seg)
        if self.num_up >= 6:
            x = self._up(x)
        x = self.G_middle_1(x, seg)
        for up_block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = up_block(self._up(x), seg)
        if self.up_4 is not None:
            x = self.up_4(self._up(x), seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


class NLayerDiscriminator(nn.Module):
    """pix2pixHD / SPADE PatchGAN with 4x4 convolutions (padding 2), as SPADE's ``NLayerDiscriminator``.

    ``model0``: conv (``input_nc -> ndf``, stride 2, bias) + leaky ReLU 0.2; ``model1..model{n_layers-1}``:
    spectrally normalised conv without bias (channels doubling, capped at 512; stride 2, the last stride 1) +
    instance norm (no affine) + leaky ReLU 0.2; ``model{n_layers}``: conv to 1 channel, stride 1 (patch logits).
    `forward` returns the ``n_layers + 1`` outputs of ``model0..model{n_layers}``, the last the logits.
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 4) -> None:
        super().__init__()
        _positive_int(input_nc, "input_nc")
        _positive_int(ndf, "ndf")
        _positive_int(n_layers, "n_layers")
        nf = ndf
        layers: list[nn.Sequential] = [
            nn.Sequential(_spade_conv(input_nc, nf, 4, stride=2, padding=2), nn.LeakyReLU(0.2))
        ]
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            conv = _spade_conv(nf_prev, nf, 4, stride=stride, padding=2, bias=False, sn=True)
            layers.append(nn.Sequential(conv, nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2)))
        layers.append(nn.Sequential(_spade_conv(nf, 1, 4, stride=1, padding=2)))
        for i, layer in enumerate(layers):
            self.add_module(f"model{i}", layer)

    def forward(self, x: Tensor) -> list[Tensor]:
        results = []
        for layer in self.children():
            x = layer(x)
            results.append(x)
        return results


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` `NLayerDiscriminator` s (``discriminator_0`` at full size), each next one on the input
    average-pooled (3x3, stride 2, padding 1, padding excluded from the means).

    The input is ``cat([label one-hot, image], dim=1)`` (``input_nc = label_nc + image channels``). `forward`
    returns one list per scale of the ``n_layers + 1`` features of that scale, the last the patch logits.
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 4, num_d: int = 2) -> None:
        super().__init__()
        _positive_int(num_d, "num_d")
        self.num_d, self.n_layers = num_d, n_layers
        for i in range(num_d):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(input_nc, ndf, n_layers))

    def forward(self, x: Tensor) -> list[list[Tensor]]:
        result = []
        for i, d in enumerate(self.children()):
            if i:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            result.append(d(x))
        return result


# ----------------------------------------------------------------------------------------------------------
# GAN losses
# ----------------------------------------------------------------------------------------------------------

# the discriminator's output: logits, or per scale logits or a list of features whose last entry is the logits
Predictions = Tensor | Sequence[Tensor | Sequence[Tensor]]


def _logits(pred: Predictions, name: str) -> list[Tensor]:
    if isinstance(pred, Tensor):
        return [pred]
    out = [p if isinstance(p, Tensor) else p[-1] for p in pred]
    if not out:
        raise ValueError(f"{name} holds no scale")
    return out


def hinge_d_loss(real: Predictions, fake: Predictions) -> Tensor:
    """Discriminator hinge loss ``mean(relu(1 - real)) + mean(relu(1 + fake))``, averaged over scales."""
    reals, fakes = _logits(real, "real"), _logits(fake, "fake")
    if len(reals) != len(fakes):
        raise ValueError(f"real and fake have different numbers of scales: {len(reals)} and {len(fakes)}")
    total = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(reals, fakes, strict=True))
    return torch.as_tensor(total) / len(reals)


def hinge_g_loss(fake: Predictions) -> Tensor:
    """Generator hinge loss ``-mean(fake)``, averaged over scales."""
    fakes = _logits(fake, "fake")
    return -torch.as_tensor(sum(f.mean() for f in fakes)) / len(fakes)


def feature_matching_loss(real: Sequence[Sequence[Tensor]], fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """pix2pixHD's feature matching: ``sum_{scale, layer} L1(fake, real.detach()) / num_d`` over the intermediate
    features (all but the last, the logits) of each scale. The caller applies the weight (10 in SPADE)."""
    if len(real) != len(fake) or not fake:
        raise ValueError(f"real and fake must hold the same, nonzero number of scales; got {len(real)}, {len(fake)}")
    total = torch.zeros((), device=fake[0][-1].device, dtype=fake[0][-1].dtype)
    for r_scale, f_scale in zip(real, fake, strict=True):
        if len(r_scale) != len(f_scale):
            raise ValueError(f"real and fake have different numbers of features: {len(r_scale)}, {len(f_scale)}")
        for r, f in zip(r_scale[:-1], f_scale[:-1], strict=True):
            total = total + F.l1_loss(f, r.detach())
    return total / len(fake)


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------

# generator and discriminator sizes: the paper's ("spade") and a CPU-sized variant for 64x64 images
_SYNTHESIS_SIZES: dict[str, dict[str, int]] = {
    "spade": {"ngf": 64, "hidden": 128, "num_up": 5, "ndf": 64, "n_layers": 4, "num_d": 2},
    "spade-small": {"ngf": 16, "hidden": 32, "num_up": 5, "ndf": 16, "n_layers": 3, "num_d": 2},
}


def _synthesis_sizes(name: str) -> dict[str, int]:
    if name not in _SYNTHESIS_SIZES:
        raise ValueError(f"name must be one of {SYNTHESIS_MODELS}, got {name!r}")
    return _SYNTHESIS_SIZES[name]


def spade_generator(name: str, label_nc: int, image_size: int | Sequence[int], out_channels: int = 3) -> SPADEGenerator:
    """The generator ``name``: ``"spade"`` (ngf 64, SPADE hidden 128, 5 upsamplings) or ``"spade-small"``
    (ngf 16, hidden 32, 5 upsamplings: 2x2 latent for 64x64 images)."""
    s = _synthesis_sizes(name)
    return SPADEGenerator(label_nc, out_channels, s["ngf"], image_size, s["num_up"], hidden=s["hidden"])


def spade_discriminator(name: str, label_nc: int, out_channels: int = 3) -> MultiscaleDiscriminator:
    """The discriminator ``name`` on ``label_nc + out_channels`` input channels: ``"spade"`` (ndf 64, 4 layers,
    2 scales) or ``"spade-small"`` (ndf 16, 3 layers, 2 scales)."""
    s = _synthesis_sizes(name)
    _positive_int(label_nc, "label_nc")
    _positive_int(out_channels, "out_channels")
    return MultiscaleDiscriminator(label_nc + out_channels, s["ndf"], s["n_layers"], s["num_d"])


# Imported last: cdgrad.experiments.models imports this module at its end, so whichever of the two is imported
# first, each finds the other's definitions in place.


def _spade_builder(name: str) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        """SPADE's generator: label maps of `num_classes` classes to `in_channels`-channel images."""
        return spade_generator(name, num_classes, image_size, in_channels)

    return build


# registered when the toolkit's configuration is imported (`cdgrad.experiments.config` imports this module)
register_model("unet-resnet50", _unet_builder("resnet50"))
register_model("unet-small", _unet_builder("small"))
for _name in SYNTHESIS_MODELS:
    MODEL_REGISTRY.register(_name, ModelEntry(_spade_builder(_name)), builtin=True)
