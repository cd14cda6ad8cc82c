"""The networks of the experiments: a 2-layer CNN for (Fashion-)MNIST, CIFAR ResNets and VGG-16.

Every convolution weight has PyTorch layout ``(out, in, kh, kw)`` (output channels on dim 0), the layout the
gradient transforms assume. Initialisation (`init_weights`) follows the references (He et al. 2015/2016,
``fb.resnet.torch``): convolution weights ``N(0, 2 / (kh kw out))`` (Kaiming normal, fan-out, ReLU gain),
convolution and linear biases 0, batch-norm scale 1 and shift 0, linear weights PyTorch's default
``U(-1/sqrt(in), 1/sqrt(in))``. No forward pass has data-dependent Python control flow, so every model
traces with ``torch.compile(fullgraph=True)``.

`register_model(name, builder)` adds a network by name, ``builder(num_classes, in_channels, image_size)``:
`build_model` and ``RunConfig(model=name)`` accept it from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgrad import validation as V
from cdgrad.experiments.registry import Registry

__all__ = [
    "CNN2",
    "MODELS",
    "MODEL_REGISTRY",
    "VGG",
    "VGG11_CFG",
    "ResNet18",
    "VGG16_CFG",
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "build_model",
    "count_parameters",
    "init_weights",
    "model_names",
    "register_model",
]

# the built-in networks; see also `model_names`
MODELS = ("cnn2", "resnet8", "resnet20", "resnet32", "resnet56", "vgg16", "vgg11", "resnet18")

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-out, ReLU) convolutions, zero biases, unit/zero batch norm; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
            nn.init.zeros_(m.bias)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (each shared tensor counted once); buffers excluded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------------------
# 2-layer CNN (Lao et al., MNIST and Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------


class CNN2(nn.Module):
    """The 2-layer CNN of Lao et al. for MNIST / Fashion-MNIST.

    ``conv5x5(in -> 50) -> ReLU -> maxpool2 -> conv5x5(50 -> 100) -> ReLU -> maxpool2 -> flatten ->
    linear(100 s^2 -> num_classes)``, no padding, ``s = ((image_size - 4) // 2 - 4) // 2``
    (``s = 4`` for 28x28 inputs: 1,600 features; ``s = 5`` for 32x32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        V.check_int(num_classes, "num_classes", 1)
        V.check_int(in_channels, "in_channels", 1)
        V.check_int(image_size, "image_size", 1)
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for cnn2 (two 5x5 convs, two 2x2 pools), got {image_size}")
        side = ((image_size - 4) // 2 - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, 50, kernel_size=5)
        self.conv2 = nn.Conv2d(50, 100, kernel_size=5)
        self.fc = nn.Linear(100 * side * side, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        out: Tensor = self.fc(torch.flatten(x, 1))
        return out


# ----------------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2)
# ----------------------------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Parameter-free shortcut (option A): ``y = zero-pad channels(x[:, :, ::stride, ::stride])``.

    The ``out - in`` new channels are zeros, split evenly before and after the input channels.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"out_planes ({out_planes}) must be >= in_planes ({in_planes})")
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


def _norm(planes: int, batchnorm: bool) -> nn.Module:
    """``BatchNorm2d(planes)``, or the identity for a network without batch norm."""
    return nn.BatchNorm2d(planes) if batchnorm else nn.Identity()


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions, no conv biases.

    The shortcut is the identity when shape is kept; otherwise option ``"A"`` (`ShortcutA`, parameter-free)
    or ``"B"`` (1x1 convolution with stride + batch norm, a projection). ``batchnorm=False``: every BN is the
    identity and every convolution has a bias instead.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A", batchnorm: bool = True
    ) -> None:
        super().__init__()
        bias = not batchnorm
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(planes, batchnorm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(planes, batchnorm)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias), _norm(planes, batchnorm)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for CIFAR (He et al. 2016, section 4.2), ``depth = 6 n + 2``.

    ``conv3x3(in -> 16) -> BN -> ReLU``, then three stages of ``n`` `BasicBlock` s with 16, 32, 64 channels
    (the first block of stages 2 and 3 has stride 2), global average pooling, ``linear(64 -> num_classes)``.
    ``shortcut="A"`` (default, the paper's CIFAR choice): parameter-free stride-2 subsampling plus zero
    channel padding; ``"B"``: 1x1 convolution + BN projections where the shape changes. Parameter counts for
    10 classes and 3 input channels: ResNet-20 269,722 (A) / 272,474 (B); ResNet-32 464,154 / 466,906;
    ResNet-56 853,018 / 855,770. ``batchnorm=False`` (Sedghi et al.'s Fig. 3 without BN) replaces every BN by
    the identity and gives every convolution a bias.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "A",
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        V.check_int(num_classes, "num_classes", 1)
        V.check_int(in_channels, "in_channels", 1)
        n = (depth - 2) // 6
        self.depth, self.shortcut_option = depth, shortcut
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=not batchnorm)
        self.bn1 = _norm(16, batchnorm)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut, batchnorm))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        out: Tensor = self.fc(x)
        return out


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 of the SGS paper's tables (the common CIFAR adaptation of He et al.'s ImageNet net).

    ``conv3x3(in -> 64) -> BN -> ReLU`` (no max-pool), four stages of two `BasicBlock` s with 64, 128, 256, 512
    channels (the first block of stages 2-4 has stride 2, option-B projection shortcuts), global average pooling,
    ``linear(512 -> num_classes)``. 11,173,962 parameters for 10 classes and 3 input channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, batchnorm: bool = True) -> None:
        super().__init__()
        V.check_int(num_classes, "num_classes", 1)
        V.check_int(in_channels, "in_channels", 1)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=not batchnorm)
        self.bn1 = _norm(64, batchnorm)
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_planes, planes, stride, "B", batchnorm), BasicBlock(planes, planes, 1, "B", batchnorm)
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return out


# ----------------------------------------------------------------------------------------------------------
# VGG with batch norm
# ----------------------------------------------------------------------------------------------------------


def _pooled_size(image_size: int, pools: int) -> int:
    """Side after ``pools`` 2x2 max-pools with ceil mode; each pool needs an input side >= 2."""
    side = image_size
    for _ in range(pools):
        if side < 2:
            raise ValueError(f"image_size {image_size} is too small for {pools} 2x2 max-pools")
        side = (side + 1) // 2
    return side


class VGG(nn.Module):
    """VGG with batch norm for CIFAR-sized images.

    Each integer ``c`` of ``cfg`` is ``conv3x3(c, padding 1, with bias) -> BN -> ReLU``; each ``"M"`` is a
    2x2 max-pool (ceil mode, so 28x28 inputs reach 1x1 as 32x32 ones do). Classifier: a single
    ``linear(512 s^2 -> num_classes)`` on the flattened features, ``s`` the final side (1 for 28 and 32).
    With `VGG16_CFG`, 10 classes and 3 input channels: 14,728,266 parameters (`VGG11_CFG`: 9,231,114).
    ``batchnorm=False`` leaves the BNs out.
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        V.check_int(num_classes, "num_classes", 1)
        V.check_int(in_channels, "in_channels", 1)
        V.check_int(image_size, "image_size", 1)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                v = V.check_int(v, "cfg entry", 1)
                layers += [nn.Conv2d(channels, v, 3, padding=1), _norm(v, batchnorm), nn.ReLU(inplace=True)]
                channels = v
        side = _pooled_size(image_size, sum(v == "M" for v in cfg))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * side * side, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

# builder(num_classes, in_channels, image_size) -> nn.Module
ModelBuilder = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered network: its builder and the extra keywords `build_model` passes on to it."""

    builder: Callable[..., nn.Module]
    keywords: tuple[str, ...] = ()


MODEL_REGISTRY: Registry[ModelEntry] = Registry("model")


def register_model(name: str, builder: ModelBuilder) -> None:
    """Make network ``name`` buildable: ``builder(num_classes, in_channels, image_size) -> nn.Module``.

    From then on `build_model(name, ...)` calls the builder and ``RunConfig(model=name)`` validates. The
    built-in names cannot be replaced; registering another name again replaces its builder.
    """
    if not callable(builder):
        raise TypeError(f"builder must be callable as builder(num_classes, in_channels, image_size), got {builder!r}")
    MODEL_REGISTRY.register(name, ModelEntry(builder))


def model_names() -> tuple[str, ...]:
    """The names `build_model` accepts now, the built-in ones first."""
    return MODEL_REGISTRY.names()


def models_taking(keyword: str) -> list[str]:
    """The registered networks whose builder takes `keyword` (e.g. `batchnorm`, the option to leave it out)."""
    return [n for n in MODEL_REGISTRY.names() if keyword in MODEL_REGISTRY.get(n).keywords]


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(
        num_classes: int, in_channels: int, image_size: int, shortcut: str = "A", batchnorm: bool = True
    ) -> nn.Module:
        V.check_int(image_size, "image_size", 1)
        return CifarResNet(depth, num_classes, in_channels, shortcut=shortcut, batchnorm=batchnorm)

    return build


def _vgg16(num_classes: int, in_channels: int, image_size: int, batchnorm: bool = True) -> nn.Module:
    return VGG(VGG16_CFG, num_classes, in_channels, image_size, batchnorm=batchnorm)


MODEL_REGISTRY.register("cnn2", ModelEntry(CNN2), builtin=True)
for _depth in (8, 20, 32, 56):
    MODEL_REGISTRY.register(f"resnet{_depth}", ModelEntry(_resnet(_depth), ("shortcut", "batchnorm")), builtin=True)


def _vgg11(num_classes: int, in_channels: int, image_size: int, batchnorm: bool = True) -> nn.Module:
    return VGG(VGG11_CFG, num_classes, in_channels, image_size, batchnorm=batchnorm)


def _resnet18(num_classes: int, in_channels: int, image_size: int, batchnorm: bool = True) -> nn.Module:
    V.check_int(image_size, "image_size", 1)
    return ResNet18(num_classes, in_channels, batchnorm=batchnorm)


MODEL_REGISTRY.register("vgg16", ModelEntry(_vgg16, ("batchnorm",)), builtin=True)
MODEL_REGISTRY.register("vgg11", ModelEntry(_vgg11, ("batchnorm",)), builtin=True)
MODEL_REGISTRY.register("resnet18", ModelEntry(_resnet18, ("batchnorm",)), builtin=True)


# ----------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------


def build_model(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs: object
) -> nn.Module:
    """Build model ``name`` (one of `MODELS`, or registered with `register_model`) for
    ``in_channels x image_size x image_size`` inputs.

    ``cnn2`` -> `CNN2`; ``resnet8/20/32/56`` -> `CifarResNet` of that depth (keywords ``shortcut="A"|"B"``,
    ``batchnorm``); ``vgg16`` -> `VGG` with `VGG16_CFG` (keyword ``batchnorm``). Parameters are drawn from
    torch's global generator, so a seed fixes them.
    """
    if not isinstance(name, str) or name not in MODEL_REGISTRY:
        raise ValueError(f"name must be one of {MODEL_REGISTRY.names()}, got {name!r}")
    entry = MODEL_REGISTRY.get(name)
    unknown = sorted(set(kwargs) - set(entry.keywords))
    if unknown:
        raise TypeError(
            f"build_model({name!r}) got unexpected keyword(s) {unknown}; accepted: {list(entry.keywords) or 'none'}"
        )
    model = entry.builder(num_classes, in_channels, image_size, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder of model {name!r} must return a torch.nn.Module, got {type(model).__name__}")
    return model
