"""Fréchet Inception Distance (FID), computed exactly in float64.

The FID of two image sets is the Fréchet distance between Gaussians fitted to their features,

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}),

where mu, S are the mean and the (ddof 1) covariance of the features. For PSD S1, S2 the matrix S1 S2 is
similar to S1^{1/2} S2 S1^{1/2} (symmetric PSD), so the last trace equals tr((S1 S2)^{1/2}), which pytorch-fid
evaluates with `scipy.linalg.sqrtm`; here it is the sum of the singular values of S1^{1/2} S2^{1/2}, with the
symmetric square roots from eigendecompositions.

Features come from an *extractor*: any callable (usually an `nn.Module`) mapping a uint8 image batch (N, 3, H, W)
to features (N, D). `InceptionV3Features` is the standard one (pytorch-fid's FID Inception network, 2048-d pool3
features, weights loaded from pytorch-fid's file); a small classifier's penultimate layer is another.
Statistics files are `.npz` with the keys `mu` (D,) and `sigma` (D, D), pytorch-fid's format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FID_WEIGHTS_URL",
    "Extractor",
    "InceptionV3Features",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "load_statistics",
    "save_statistics",
    "sqrtm_psd",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)

Extractor = Callable[[Tensor], Tensor]  # uint8 images (N, 3, H, W) -> features (N, D)

ArrayLike = Tensor | np.ndarray | Sequence[Any]  # anything `torch.as_tensor` takes


# ----------------------------------------------------------------------------------------------- linear algebra
def _float64(x: Any) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


def sqrtm_psd(a: ArrayLike) -> Tensor:
    """Symmetric PSD square root `V diag(sqrt(max(w, 0))) V^T` of `(a + a^T) / 2 = V diag(w) V^T`, in float64.

    Eigenvalues below zero (round-off of a PSD matrix) are clamped to 0, so the result is symmetric PSD.
    """
    m = _float64(a)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a must be a square matrix, got shape {tuple(m.shape)}")
    w, v = torch.linalg.eigh((m + m.T) / 2)
    root: Tensor = (v * w.clamp_min(0).sqrt()) @ v.T
    return (root + root.T) / 2  # exactly symmetric


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet distance (the FID value) between N(mu1, S1) and N(mu2, S2), in float64:

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).

    With B = S1^{1/2} S2^{1/2} the middle matrix is B B^T, so the last trace is the sum of the singular values of
    B, taken from an SVD of B rather than from the eigenvalues of B B^T: no square root of eigenvalues near zero
    that carry round-off, hence d(P, P) = 0 and d(P, Q) = d(Q, P) to round-off also for singular covariances.
    (A singular covariance still leaves d only determined to ~sqrt(machine eps), by any method.)
    """
    m1, s1, m2, s2 = _float64(mu1), _float64(sigma1), _float64(mu2), _float64(sigma2)
    if m1.ndim != 1:
        raise ValueError(f"mu1 must be a vector (D,), got shape {tuple(m1.shape)}")
    d = m1.shape[0]
    for name, x, shape in (("sigma1", s1, (d, d)), ("mu2", m2, (d,)), ("sigma2", s2, (d, d))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (D={d} from mu1), got {tuple(x.shape)}")
    for name, x in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} has non-finite entries")
    s2 = s2.to(s1.device)
    tr_covmean = torch.linalg.svdvals(sqrtm_psd(s1) @ sqrtm_psd(s2)).sum()
    diff = m1 - m2.to(m1.device)
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


# --------------------------------------------------------------------------------------------------- statistics
def feature_statistics(features: ArrayLike) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of features (N, D), float64: `mu = mean_i x_i`,
    `sigma = sum_i (x_i - mu)(x_i - mu)^T / (N - 1)` (ddof 1, as `np.cov(x, rowvar=False)`)."""
    x = _float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def save_statistics(path: str | os.PathLike[str], mu: ArrayLike, sigma: ArrayLike) -> None:
    """Write `mu` (D,) and `sigma` (D, D) as float64 arrays to the `.npz` file `path` (keys `mu`, `sigma`)."""
    m, s = _float64(mu).cpu().numpy(), _float64(sigma).cpu().numpy()
    if m.ndim != 1:
        raise ValueError(f"mu must be a vector (D,), got shape {m.shape}")
    if s.shape != (m.shape[0], m.shape[0]):
        raise ValueError(f"sigma must have shape {(m.shape[0], m.shape[0])}, got {s.shape}")
    with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to a name without it
        np.savez(f, mu=m, sigma=s)


def load_statistics(path: str | os.PathLike[str], dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Read `(mu, sigma)` (float64 tensors) from a `.npz` file with keys `mu` (D,) and `sigma` (D, D).

    `dim`: the feature dimension D the statistics must have (None: any). A missing key, wrong shapes, or a D
    other than `dim` raise ValueError naming the file.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read statistics file {os.fspath(path)}: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"statistics file {os.fspath(path)} is not an .npz archive (keys mu, sigma)")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"statistics file {os.fspath(path)} lacks key(s) {missing}; found keys {data.files}")
        mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"statistics file {os.fspath(path)} has mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
            "expected mu (D,) and sigma (D, D)"
        )
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(
            f"statistics file {os.fspath(path)} has mu of shape {mu.shape} and sigma of shape {sigma.shape}; "
            f"expected ({dim},) and ({dim}, {dim})"
        )
    return torch.from_numpy(mu.astype(np.float64)), torch.from_numpy(sigma.astype(np.float64))


# ---------------------------------------------------------------------------------------------------- extraction
def extract_features(extractor: Extractor, images_uint8: Tensor, batch_size: int = 50) -> Tensor:
    """Features (N, D), float64 on the CPU, of uint8 images (N, 3, H, W), in no-grad batches of `batch_size`.

    An `nn.Module` extractor runs in eval mode (its mode is restored afterwards) and gets each batch on the
    device of its first parameter or buffer.
    """
    if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        what = getattr(images_uint8, "dtype", type(images_uint8))
        shape = tuple(getattr(images_uint8, "shape", ()))
        raise ValueError(f"images_uint8 must be a uint8 tensor (N, 3, H, W), got {what} of shape {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = images_uint8.device
    was_training = None
    if isinstance(extractor, nn.Module):
        tensor: Tensor | None = next(iter(extractor.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(extractor.buffers()), None)
        device = tensor.device if tensor is not None else device
        was_training = extractor.training
        extractor.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(images_uint8), batch_size):
                batch = images_uint8[start : start + batch_size].to(device)
                out = extractor(batch)
                if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
                    raise ValueError(
                        f"extractor must map {len(batch)} images to features ({len(batch)}, D), got "
                        f"{tuple(getattr(out, 'shape', ())) or type(out)}"
                    )
                chunks.append(out.to(device="cpu", dtype=torch.float64))
    finally:
        if was_training is not None:
            assert isinstance(extractor, nn.Module)
            extractor.train(was_training)
    if not chunks:
        raise ValueError("images_uint8 holds no images")
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------ FID Inception network
class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, as torchvision's Inception v3 (keys `conv.*`, `bn.*`)."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, averages over the unpadded pixels only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Inception A block (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool (padding not counted)-1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Inception C block (17x17) with factorised 7x7 convolutions; avg pool (padding not counted)-1x1."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE_1(nn.Module):
    """Inception E block (8x8) with expanded 1x3 / 3x1 branches; avg pool (padding not counted)-1x1."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def _pool(self, x: Tensor) -> Tensor:
        return _avg_pool_tf(x)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        bp = self.branch_pool(self._pool(x))
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionE_2(FIDInceptionE_1):
    """The last Inception E block: as `FIDInceptionE_1` but with a 3x3 stride-1 *max* pool in the pool branch
    (as in the TensorFlow graph the FID weights come from)."""

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionV3Features(nn.Module):
    """pytorch-fid's FID Inception v3 network, returning the 2048-d pool3 features of uint8 images.

    torchvision's Inception v3 (no auxiliary classifier) with the TF-FID changes: average pools that ignore the
    padding in the A, C and E blocks and a max pool in the last E block's pool branch. The input (N, 3, H, W),
    uint8, is resized bilinearly to 299 x 299 and scaled to [-1, 1] (`x / 255 * 2 - 1`). The module names, and so
    the `state_dict` keys, are those of pytorch-fid's weights file; the 1008-class `fc` is kept only for them.
    Build with random weights (`InceptionV3Features()`) or load the FID weights with `from_file`; the parameters
    are frozen (`requires_grad=False`).
    """

    feature_dim = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """pool3 features (N, 2048) of uint8 images (N, 3, H, W)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} of shape {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype) / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> InceptionV3Features:
        """The network with the weights of pytorch-fid's file `pt_inception-2015-12-05-6726825d.pth` at `path`.

        Loaded with `torch.load(weights_only=True)` and `load_state_dict(strict=True)`; the file's BatchNorm
        `num_batches_tracked` counters may be absent (files written before they existed). A missing file raises
        FileNotFoundError, a file with other keys or shapes ValueError naming the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Download {FID_WEIGHTS_URL} on a machine with internet "
                "access and pass the path of the downloaded file."
            )
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # not a torch file, or one holding more than tensors
            raise ValueError(f"cannot read FID Inception weights from {path}: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"FID Inception weights file {path} holds a {type(state).__name__}, not a state dict")
        model = cls()
        expected = model.state_dict()
        optional = {k for k in expected if k.endswith(".num_batches_tracked")}
        missing = sorted(set(expected) - set(state) - optional)
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"FID Inception weights file {path} does not match the network: "
                f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
            )
        bad = [
            f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__} in the file, "
            f"{tuple(expected[k].shape)} expected"
            for k, v in state.items()
            if not isinstance(v, Tensor) or v.shape != expected[k].shape
        ]
        if bad:
            raise ValueError(f"FID Inception weights file {path} has tensors of the wrong shape: {bad[:5]}")
        full = {**{k: expected[k] for k in optional}, **state}  # absent counters: the fresh module's zeros
        model.load_state_dict(full, strict=True)
        return model.eval()
