"""FID: the matrix square root and the Fréchet distance against scipy and closed forms, statistics files, the FID
Inception network's layout (the keys and shapes of pytorch-fid's weights file) and feature extraction."""

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from cdgrad.experiments.fid import (
    FID_WEIGHTS_URL,
    BasicConv2d,
    FIDInceptionA,
    FIDInceptionE_1,
    FIDInceptionE_2,
    InceptionV3Features,
    extract_features,
    feature_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
    sqrtm_psd,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- helpers
def random_psd(seed: int, dim: int, rank: int, scale: float = 1.0) -> np.ndarray:
    """A random PSD matrix (dim, dim) of the given rank, as A A^T with A (dim, rank)."""
    a = np.random.default_rng(seed).standard_normal((dim, rank)) * scale
    psd: np.ndarray = a @ a.T
    return psd


def scipy_sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular matrices: "the result might be inaccurate"
        root = scipy.linalg.sqrtm(a)
    return np.real(root)


def pytorch_fid_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The formula as pytorch-fid evaluates it: tr((S1 S2)^{1/2}) with scipy's general matrix square root."""
    diff = mu1 - mu2
    covmean = scipy_sqrtm(sigma1 @ sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


psd_cases = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 12), st.data())


PsdCase = tuple[int, int, st.DataObject]


def _draw_psd(case: PsdCase) -> tuple[np.ndarray, int, float]:
    seed, dim, data = case
    rank = data.draw(st.integers(1, dim), label="rank")
    scale = data.draw(st.sampled_from([1e-2, 1.0, 30.0]), label="scale")
    return random_psd(seed, dim, rank, scale), rank, scale


# ----------------------------------------------------------------------------------------------- sqrtm_psd
@settings(max_examples=40, deadline=None)
@given(psd_cases)
def test_sqrtm_psd_matches_scipy(case: PsdCase) -> None:
    a, rank, scale = _draw_psd(case)
    root = sqrtm_psd(torch.from_numpy(a))
    assert root.dtype == torch.float64 and torch.equal(root, root.T)
    assert bool((torch.linalg.eigvalsh(root) >= -1e-12 * scale).all())
    np.testing.assert_allclose((root @ root).numpy(), a, rtol=0, atol=1e-12 * max(1.0, scale**2) * a.shape[0])
    # scipy's Schur-based root is exact to round-off for a nonsingular matrix, to ~sqrt(eps) for a singular one
    tol = 1e-10 if rank == a.shape[0] else 1e-6
    np.testing.assert_allclose(root.numpy(), scipy_sqrtm(a), rtol=0, atol=tol * max(1.0, scale) * a.shape[0])


def test_sqrtm_psd_clamps_negative_round_off() -> None:
    v = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    a = v @ torch.diag(torch.tensor([4.0, 1.0, 0.0, -1e-15], dtype=torch.float64)) @ v.T
    root = sqrtm_psd(a)
    assert not bool(torch.isnan(root).any())
    torch.testing.assert_close(torch.linalg.eigvalsh(root), torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    assert torch.equal(sqrtm_psd(torch.zeros(3, 3)), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="a must be a square matrix"):
        sqrtm_psd(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------- frechet_distance
@settings(max_examples=40, deadline=None)
@given(psd_cases, psd_cases)
def test_frechet_distance_matches_pytorch_fid_formula(case1: PsdCase, case2: PsdCase) -> None:
    s1, rank1, scale1 = _draw_psd(case1)
    dim = s1.shape[0]
    s2 = random_psd(case2[0], dim, min(case2[1], dim), 1.0)
    rng = np.random.default_rng(case1[0] + 1)
    mu1, mu2 = rng.standard_normal((dim,)), rng.standard_normal((dim,))
    d = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(d, float)
    expected = pytorch_fid_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(expected, rel=1e-6, abs=1e-6 * dim * max(1.0, scale1))
    assert d == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9, abs=1e-9 * dim * max(1.0, scale1))


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    dim = 6
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    dmu2 = float((mu1 - mu2) @ (mu1 - mu2))
    s = random_psd(1, dim, dim)
    # equal covariances: only the means differ
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(dmu2, rel=1e-10)
    # identical Gaussians: zero, also for a rank-deficient covariance
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-10)
    low = random_psd(2, dim, 2)
    assert frechet_distance(mu1, low, mu1, low) == pytest.approx(0.0, abs=1e-10)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |dmu|^2
    a, b = rng.uniform(0.0, 3.0, dim), rng.uniform(0.0, 3.0, dim)
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum()) + dmu2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: the same formula
    q = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # tensors of any float dtype give the same float64 result
    t = frechet_distance(torch.tensor(mu1), torch.tensor(s1, dtype=torch.float64), torch.tensor(mu2), torch.tensor(s2))
    assert t == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-12)


def test_frechet_distance_shape_errors_name_the_parameter() -> None:
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1 must be a vector"):
        frechet_distance(np.zeros((3, 1)), s, mu, s)
    with pytest.raises(ValueError, match=r"sigma1 must have shape \(3, 3\)"):
        frechet_distance(mu, np.eye(2), mu, s)
    with pytest.raises(ValueError, match=r"mu2 must have shape \(3,\)"):
        frechet_distance(mu, s, np.zeros(4), s)
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\)"):
        frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        frechet_distance(mu, s, mu, np.full((3, 3), np.nan))


# ------------------------------------------------------------------------------------------------ statistics
def test_feature_statistics_match_numpy() -> None:
    x = np.random.default_rng(3).standard_normal((40, 7)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(x))
    assert mu.dtype == sigma.dtype == torch.float64 and mu.shape == (7,) and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu.numpy(), np.mean(x.astype(np.float64), axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="features must be"):
        feature_statistics(np.zeros((1, 7)))


def test_statistics_file_round_trip(tmp_path: Path) -> None:
    mu, sigma = feature_statistics(np.random.default_rng(4).standard_normal((10, 5)))
    path = tmp_path / "stats.npz"
    save_statistics(path, mu, sigma)
    with np.load(path) as data:  # pytorch-fid's format: plain arrays under `mu` and `sigma`
        assert sorted(data.files) == ["mu", "sigma"] and data["mu"].dtype == np.float64
    mu2, sigma2 = load_statistics(path, dim=5)
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    assert torch.equal(load_statistics(str(path))[1], sigma)
    # a name without the suffix is written as given
    save_statistics(tmp_path / "plain", mu, sigma)
    assert (tmp_path / "plain").is_file()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"mu": np.zeros(3)}, r"lacks key\(s\) \['sigma'\]"),
        ({"sigma": np.eye(3)}, r"lacks key\(s\) \['mu'\]"),
        ({"mu": np.zeros((3, 1)), "sigma": np.eye(3)}, r"mu of shape \(3, 1\) and sigma of shape \(3, 3\)"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"mu of shape \(3,\) and sigma of shape \(4, 4\)"),
        ({"mu": np.zeros(3), "sigma": np.eye(3)}, r"mu of shape \(3,\) .*expected \(5,\) and \(5, 5\)"),
    ],
)
def test_bad_statistics_file_names_the_file(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad_stats.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        load_statistics(path, dim=5)


def test_unreadable_statistics_file_names_the_file(tmp_path: Path) -> None:
    npy = tmp_path / "mu.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ValueError, match=re.escape(str(npy)) + ".*not an .npz archive"):
        load_statistics(npy)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_statistics(garbage)
    with pytest.raises(FileNotFoundError):
        load_statistics(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------------------- Inception network
def _conv(out_c: int, in_c: int, kh: int, kw: int | None = None) -> tuple[int, ...]:
    return (out_c, in_c, kh, kh if kw is None else kw)


def expected_conv_shapes() -> dict[str, tuple[int, ...]]:
    """Every conv weight of torchvision's inception_v3 without the auxiliary classifier, written out by block."""
    shapes = {
        "Conv2d_1a_3x3": _conv(32, 3, 3),
        "Conv2d_2a_3x3": _conv(32, 32, 3),
        "Conv2d_2b_3x3": _conv(64, 32, 3),
        "Conv2d_3b_1x1": _conv(80, 64, 1),
        "Conv2d_4a_3x3": _conv(192, 80, 3),
    }
    for name, c_in, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        shapes |= {
            f"{name}.branch1x1": _conv(64, c_in, 1),
            f"{name}.branch5x5_1": _conv(48, c_in, 1),
            f"{name}.branch5x5_2": _conv(64, 48, 5),
            f"{name}.branch3x3dbl_1": _conv(64, c_in, 1),
            f"{name}.branch3x3dbl_2": _conv(96, 64, 3),
            f"{name}.branch3x3dbl_3": _conv(96, 96, 3),
            f"{name}.branch_pool": _conv(pool, c_in, 1),
        }
    shapes |= {
        "Mixed_6a.branch3x3": _conv(384, 288, 3),
        "Mixed_6a.branch3x3dbl_1": _conv(64, 288, 1),
        "Mixed_6a.branch3x3dbl_2": _conv(96, 64, 3),
        "Mixed_6a.branch3x3dbl_3": _conv(96, 96, 3),
    }
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        shapes |= {
            f"{name}.branch1x1": _conv(192, 768, 1),
            f"{name}.branch7x7_1": _conv(c7, 768, 1),
            f"{name}.branch7x7_2": _conv(c7, c7, 1, 7),
            f"{name}.branch7x7_3": _conv(192, c7, 7, 1),
            f"{name}.branch7x7dbl_1": _conv(c7, 768, 1),
            f"{name}.branch7x7dbl_2": _conv(c7, c7, 7, 1),
            f"{name}.branch7x7dbl_3": _conv(c7, c7, 1, 7),
            f"{name}.branch7x7dbl_4": _conv(c7, c7, 7, 1),
            f"{name}.branch7x7dbl_5": _conv(192, c7, 1, 7),
            f"{name}.branch_pool": _conv(192, 768, 1),
        }
    shapes |= {
        "Mixed_7a.branch3x3_1": _conv(192, 768, 1),
        "Mixed_7a.branch3x3_2": _conv(320, 192, 3),
        "Mixed_7a.branch7x7x3_1": _conv(192, 768, 1),
        "Mixed_7a.branch7x7x3_2": _conv(192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3": _conv(192, 192, 7, 1),
        "Mixed_7a.branch7x7x3_4": _conv(192, 192, 3),
    }
    for name, c_in in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        shapes |= {
            f"{name}.branch1x1": _conv(320, c_in, 1),
            f"{name}.branch3x3_1": _conv(384, c_in, 1),
            f"{name}.branch3x3_2a": _conv(384, 384, 1, 3),
            f"{name}.branch3x3_2b": _conv(384, 384, 3, 1),
            f"{name}.branch3x3dbl_1": _conv(448, c_in, 1),
            f"{name}.branch3x3dbl_2": _conv(384, 448, 3),
            f"{name}.branch3x3dbl_3a": _conv(384, 384, 1, 3),
            f"{name}.branch3x3dbl_3b": _conv(384, 384, 3, 1),
            f"{name}.branch_pool": _conv(192, c_in, 1),
        }
    return shapes


# a sample of the weights file's keys with their shapes, written out literally
SAMPLE_KEYS: dict[str, tuple[int, ...]] = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.bn.running_var": (64,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}

# 94 conv + BatchNorm units; 4 BatchNorm tensors each (weight, bias, running mean and variance) + the fc's 2
NUM_CONVS = 94
NUM_TENSORS = NUM_CONVS * 5 + 2  # 472, without the BatchNorm `num_batches_tracked` counters
# torchvision documents 27,161,264 parameters for inception_v3 (aux classifier, 1000 classes); without the aux
# classifier (conv0 128x768 + bn 2x128, conv1 768x128x5x5 + bn 2x768, fc 768x1000 + 1000: 3,326,696) and with a
# 1008-class fc (8 more rows of 2048 + 8 biases: 16,392)
NUM_PARAMETERS = 27_161_264 - 3_326_696 + 16_392


@pytest.fixture(scope="module")
def inception() -> InceptionV3Features:
    torch.manual_seed(0)
    return InceptionV3Features().eval()


def test_inception_state_dict_layout(inception: InceptionV3Features) -> None:
    state = inception.state_dict()
    counters = {k for k in state if k.endswith(".bn.num_batches_tracked")}
    tensors = {k: tuple(v.shape) for k, v in state.items() if k not in counters}
    assert len(tensors) == NUM_TENSORS and len(counters) == NUM_CONVS
    assert sum(p.numel() for p in inception.parameters()) == NUM_PARAMETERS == 23_850_960
    expected = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for unit, shape in expected_conv_shapes().items():
        expected[f"{unit}.conv.weight"] = shape
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{unit}.bn.{tensor}"] = (shape[0],)
    assert len(expected_conv_shapes()) == NUM_CONVS
    assert tensors == expected
    assert counters == {k.replace(".conv.weight", ".bn.num_batches_tracked") for k in expected if ".conv." in k}
    for key, shape in SAMPLE_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    units = [m for m in inception.modules() if isinstance(m, BasicConv2d)]
    assert len(units) == NUM_CONVS and all(m.bn.eps == 1e-3 and m.conv.bias is None for m in units)


def test_inception_forward_gives_pool3_features(inception: InceptionV3Features) -> None:
    images = torch.randint(0, 256, (2, 3, 40, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = extract_features(inception, images, batch_size=1)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    assert bool((feats >= 0).all()) and bool(torch.isfinite(feats).all())  # average of ReLU outputs
    with torch.no_grad():
        together = inception(images)
    torch.testing.assert_close(feats, together.double(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="images must be uint8"):
        inception(images.float())


def test_tf_fid_pooling() -> None:
    # A, C and E_1 blocks average over the unpadded pixels: a constant input stays constant at the border
    x = torch.rand(1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    block_a = FIDInceptionA(4, pool_features=2).eval()
    calls = []
    block_a.branch_pool.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    with torch.no_grad():
        block_a(torch.ones(1, 4, 5, 6))
    torch.testing.assert_close(calls[0], torch.ones(1, 4, 5, 6))
    torch.testing.assert_close(
        FIDInceptionE_1(4)._pool(x), F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    )
    # the last E block (Mixed_7c) max-pools in its pool branch
    torch.testing.assert_close(FIDInceptionE_2(4)._pool(x), F.max_pool2d(x, 3, stride=1, padding=1))


def test_from_file_round_trip(tmp_path: Path, inception: InceptionV3Features) -> None:
    state = {k: v.clone() for k, v in inception.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    for v in state.values():
        if v.is_floating_point():
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    loaded = InceptionV3Features.from_file(path)
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    # a file without the BatchNorm counters (written before they existed) loads too
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path)
    assert torch.equal(InceptionV3Features.from_file(str(path)).fc.weight, state["fc.weight"])
    # a wrong shape is named with the file
    bad = dict(old, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(bad, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*fc\.(weight|bias): \(1000"):
        InceptionV3Features.from_file(path)


def test_from_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*" + re.escape(FID_WEIGHTS_URL)):
        InceptionV3Features.from_file(missing)
    wrong = tmp_path / "wrong_keys.pth"
    torch.save({"Conv2d_1a_3x3.conv.weights": torch.zeros(32, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + ".*missing key.*unexpected key"):
        InceptionV3Features.from_file(wrong)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match=re.escape(str(not_a_dict))):
        InceptionV3Features.from_file(not_a_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        InceptionV3Features.from_file(garbage)


# -------------------------------------------------------------------------------------------- extraction
class TinyExtractor(nn.Module):
    """Per-channel mean intensity -> linear -> dropout (which must be off during extraction)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.dropout(self.linear(x.float().mean((2, 3)) / 255))
        return out


def test_extract_features_batches_eval_and_no_grad() -> None:
    torch.manual_seed(0)
    model = TinyExtractor().train()
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.linear(images.float().mean((2, 3)) / 255).double()
    for batch_size in (1, 3, 7, 50):
        feats = extract_features(model, images, batch_size=batch_size)
        assert feats.shape == (7, 4) and feats.dtype == torch.float64 and not feats.requires_grad
        torch.testing.assert_close(feats, expected)
    assert model.training  # mode restored
    # any callable mapping uint8 images to (N, D) is an extractor
    feats = extract_features(lambda x: x.float().flatten(1)[:, :2], images, batch_size=2)
    assert torch.equal(feats, images.flatten(1)[:, :2].double())


def test_extract_features_errors() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="images_uint8 must be a uint8 tensor"):
        extract_features(TinyExtractor(), images.float())
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(TinyExtractor(), images, batch_size=0)
    with pytest.raises(ValueError, match="extractor must map"):
        extract_features(lambda x: x.float().mean(), images)
    with pytest.raises(ValueError, match="no images"):
        extract_features(TinyExtractor(), images[:0])
