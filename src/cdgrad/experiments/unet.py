"""The segmentation network: `UNet`, the UNet of ``segmentation_models_pytorch`` (the network of Lao et al. on
PascalVOC) with a ResNet-50 encoder whose state-dict keys are torchvision's ``resnet50`` without ``fc.*``, so ImageNet
weights load from a file with `UNet.load_encoder`; ``encoder="small"`` is a CPU-sized variant. Registered in the
toolkit's model registry as ``"unet-resnet50"`` and ``"unet-small"``.

Every convolution weight has layout ``(out, in, kh, kw)``, and no forward pass has data-dependent Python control
flow. The UNet is initialised with `cdgrad.experiments.models.init_weights` (Kaiming-normal fan-out convs, as
torchvision's ResNet).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad import validation as V
from cdgrad.experiments.models import BasicBlock, ModelBuilder, init_weights, register_model

__all__ = ["Bottleneck", "ResNet50Encoder", "SmallEncoder", "UNet", "UNetDecoder", "UNetDecoderBlock", "positive_pair"]


def positive_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(H, W)`` from an int side or a pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return V.check_int(value, name, 1), value
    if isinstance(value, Sequence) and len(value) == 2:
        return V.check_int(value[0], name, 1), V.check_int(value[1], name, 1)
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
        V.check_int(in_channels, "in_channels", 1)
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
        V.check_int(in_channels, "in_channels", 1)
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 channel counts, got {widths!r}")
        self.out_channels = tuple(V.check_int(w, "widths entry", 1) for w in widths)
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
        outs = [V.check_int(c, "decoder_channels entry", 1) for c in decoder_channels]
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
        V.check_int(num_classes, "num_classes", 1)
        V.check_int(in_channels, "in_channels", 1)
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
        V.check_int(image_size, "image_size", 1)
        if image_size % model.divisor:
            raise ValueError(f"unet-{encoder} needs image_size divisible by {model.divisor}, got {image_size}")
        return model

    return build


register_model("unet-resnet50", _unet_builder("resnet50"))
register_model("unet-small", _unet_builder("small"))
