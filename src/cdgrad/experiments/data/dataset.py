"""The `Dataset` container, its normalisation, and the registry of data sets.

A `Dataset` holds the images of both splits as uint8 ``(N, C, H, W)`` tensors with int64 labels, and the
per-channel mean and std that `normalize` uses: ``(x / 255 - mean[c]) / std[c]``.

`register_dataset(name, loader)` makes a data set available by name to `load_dataset` and to
`RunConfig(dataset=...)`; the official ones (MNIST, Fashion-MNIST, CIFAR-10) are registered by
`cdgrad.experiments.data.sources`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cdgrad.experiments.registry import Registry

__all__ = [
    "DATASET_REGISTRY",
    "IGNORE_INDEX",
    "Dataset",
    "Loader",
    "channel_stats",
    "dataset_names",
    "load_registered",
    "normalize",
    "register_dataset",
]


IGNORE_INDEX = 255  # the label of a pixel without a class in a label map (PascalVOC's boundaries, Cityscapes' void)


@dataclass
class Dataset:
    """Images and labels of one data set, kept whole in memory.

    ``train_x``/``test_x``: uint8 ``(N, C, H, W)``; ``train_y``/``test_y``: int64, either ``(N,)`` class labels
    in ``[0, num_classes)`` or ``(N, H, W)`` per-pixel label maps (dense tasks: segmentation, synthesis) whose
    values are in ``[0, num_classes)`` or `IGNORE_INDEX` (255, a pixel without a label). ``mean``/``std``:
    per-channel mean and (population) standard deviation of ``train_x / 255``, the constants `normalize`
    expects. ``swapped`` is True after `swap_train_test`.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    swapped: bool = False

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise TypeError(f"{split}_x must be a uint8 tensor of shape (N, C, H, W)")
            dense = (x.shape[0], *x.shape[2:])
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape not in (x.shape[:1], dense):
                raise TypeError(f"{split}_y must be an int64 tensor of shape ({x.shape[0]},) or {dense}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"train_x and test_x must have the same image shape, got {tuple(self.train_x.shape[1:])} "
                f"and {tuple(self.test_x.shape[1:])}"
            )
        if (self.train_y.dim() == 1) != (self.test_y.dim() == 1):
            raise ValueError("train_y and test_y must both be class labels or both be label maps")
        channels = self.train_x.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std must have one value per channel ({channels})")

    @property
    def dense(self) -> bool:
        """True when the labels are per-pixel label maps ``(N, H, W)``."""
        return self.train_y.dim() == 3

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with all four tensors on ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def swap_train_test(self) -> Dataset:
        """Train on the test split and evaluate on the training split (Lao et al., Fig. 6).

        ``mean``/``std`` are recomputed from the new training split (the old test images), so no
        statistic of the evaluation images enters training. Swapping twice gives back the original splits.
        """
        mean, std = channel_stats(self.test_x)
        return dataclasses.replace(
            self,
            train_x=self.test_x,
            train_y=self.test_y,
            test_x=self.train_x,
            test_y=self.train_y,
            mean=mean,
            std=std,
            swapped=not self.swapped,
        )


# ----------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``x / 255`` for uint8 ``x`` of shape ``(N, C, H, W)``.

    Exact in float64 from the 256-bin histogram of each channel:
    ``mean_c = sum_v n_c(v) v / n``, ``std_c = sqrt(sum_v n_c(v) (v - mean_c)^2 / n)``, ``v = k / 255``.
    """
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError("x must be a uint8 tensor of shape (N, C, H, W)")
    if x.numel() == 0:
        raise ValueError("x must hold at least one image")
    x = x.detach().cpu()
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = counts.sum()
        mean = float(counts @ values / n)
        means.append(mean)
        stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / n)))
    return tuple(means), tuple(stds)


def _per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {channels} floats, got {values!r}") from None
    if len(out) != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {len(out)}")
    return out


def normalize(x_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Float32 ``(x / 255 - mean[c]) / std[c]`` per channel; ``x_uint8`` is ``(N, C, H, W)`` or ``(C, H, W)``.

    The result is on ``x_uint8``'s device.
    """
    if not isinstance(x_uint8, Tensor) or x_uint8.dtype != torch.uint8:
        raise TypeError("x_uint8 must be a uint8 tensor")
    if x_uint8.dim() not in (3, 4):
        raise ValueError(f"x_uint8 must have shape (N, C, H, W) or (C, H, W), got {tuple(x_uint8.shape)}")
    channels = x_uint8.shape[-3]
    m = _per_channel(mean, channels, "mean")
    s = _per_channel(std, channels, "std")
    if not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"std must be positive and finite, got {s}")
    s64 = torch.tensor(s, dtype=torch.float64)
    m64 = torch.tensor(m, dtype=torch.float64)
    scale = (1.0 / (255.0 * s64)).to(x_uint8.device, torch.float32).view(channels, 1, 1)
    shift = (m64 / s64).to(x_uint8.device, torch.float32).view(channels, 1, 1)
    return x_uint8.to(torch.float32) * scale - shift


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

# loader(root, download) -> Dataset: `root` is the folder given by the user (an existing directory) or None,
# `download` whether fetching missing files is allowed.
Loader = Callable[[str | os.PathLike[str] | None, bool], Dataset]

DATASET_REGISTRY: Registry[Loader] = Registry("dataset")


def register_dataset(name: str, loader: Loader) -> None:
    """Make data set ``name`` loadable: ``loader(root, download) -> Dataset``.

    ``root`` is the folder the user gave (``--data-root``; an existing directory, checked before the call) or
    None, ``download`` whether missing files may be fetched. From then on `load_dataset(name, ...)` calls the
    loader and ``RunConfig(dataset=name)`` validates. The official names cannot be replaced; registering
    another name again replaces its loader.
    """
    if not callable(loader):
        raise TypeError(f"loader must be callable as loader(root, download) -> Dataset, got {loader!r}")
    DATASET_REGISTRY.register(name, loader)


def dataset_names() -> tuple[str, ...]:
    """The names `load_dataset` accepts now, the official ones first."""
    return DATASET_REGISTRY.names()


def load_registered(name: str, root: str | os.PathLike[str] | None, download: bool) -> Dataset:
    """``loader(root, download)`` of the registered data set ``name``, checked to be a `Dataset`."""
    ds = DATASET_REGISTRY.get(name)(root, download)
    if not isinstance(ds, Dataset):
        raise TypeError(f"the loader of data set {name!r} must return a Dataset, got {type(ds).__name__}")
    return ds
