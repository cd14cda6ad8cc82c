"""The image-synthesis networks: SPADE (Park et al. 2019, the reference implementation's defaults): `SPADE`,
`SPADEResBlock`, `SPADEGenerator` (no VAE unless ``z_dim`` is given) and `MultiscaleDiscriminator` (pix2pixHD's
PatchGAN at ``num_d`` scales); the generator is registered in the model registry as ``"spade"`` and
``"spade-small"``. The losses that train them live beside the synthesis task (`cdgrad.experiments.tasks.gan`).

Every convolution weight has layout ``(out, in, kh, kw)``. The networks are initialised as the reference
implementation (Xavier-normal weights with gain 0.02, zero biases), spectral norm applied after initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from cdgrad import validation as V
from cdgrad.experiments.models import MODEL_REGISTRY, ModelBuilder, ModelEntry
from cdgrad.experiments.unet import positive_pair

__all__ = [
    "SPADE",
    "SYNTHESIS_MODELS",
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "SPADEGenerator",
    "SPADEResBlock",
    "one_hot_labels",
    "spade_discriminator",
    "spade_generator",
]

# the image-synthesis networks (`spade_generator`, `spade_discriminator`)
SYNTHESIS_MODELS = ("spade", "spade-small")

SPADE_INIT_GAIN = 0.02  # the reference's init_variance for Xavier-normal weights


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
    V.check_int(num_classes, "num_classes", 1)
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
            V.check_int(value, name, 1)
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
        V.check_int(fin, "fin", 1)
        V.check_int(fout, "fout", 1)
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
            V.check_int(value, name, 1)
        if num_up not in (5, 6, 7):
            raise ValueError(f"num_up must be 5 ('normal'), 6 ('more') or 7 ('most'), got {num_up!r}")
        if num_up == 7 and ngf < 2:
            raise ValueError(f"num_up=7 needs ngf >= 2 (its last block has ngf // 2 channels), got {ngf}")
        height, width = positive_pair(image_size, "image_size")
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
            V.check_int(z_dim, "z_dim", 1)
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
        V.check_int(input_nc, "input_nc", 1)
        V.check_int(ndf, "ndf", 1)
        V.check_int(n_layers, "n_layers", 1)
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
        V.check_int(num_d, "num_d", 1)
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
    V.check_int(label_nc, "label_nc", 1)
    V.check_int(out_channels, "out_channels", 1)
    return MultiscaleDiscriminator(label_nc + out_channels, s["ndf"], s["n_layers"], s["num_d"])


# Imported last: cdgrad.experiments.models imports this module at its end, so whichever of the two is imported
# first, each finds the other's definitions in place.


def _spade_builder(name: str) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        """SPADE's generator: label maps of `num_classes` classes to `in_channels`-channel images."""
        return spade_generator(name, num_classes, image_size, in_channels)

    return build


for _name in SYNTHESIS_MODELS:
    MODEL_REGISTRY.register(_name, ModelEntry(_spade_builder(_name)), builtin=True)
