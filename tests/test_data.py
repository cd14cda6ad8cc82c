"""Tests of cdgrad.experiments.data: IDX and CIFAR-10 readers, lookup, download, batch utilities."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.experiments import data as D
from helpers import SHARED_DATA

MNIST_DIR = SHARED_DATA / "mnist"
MNIST_SOURCES = SHARED_DATA / "SOURCES.md"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
HAVE_MNIST = all((MNIST_DIR / f"{n}.gz").is_file() for n in IDX_NAMES)
HAVE_FASHION = all((FASHION_DIR / f"{n}.gz").is_file() for n in IDX_NAMES)

HYP = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------------------------------------
# Writers of the official formats (independent of the code under test)
# ----------------------------------------------------------------------------------------------------------

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C,
             np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}  # fmt: skip


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding written by hand: 0, 0, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist(d: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0, side: int = 28):
    """Four synthetic IDX files in `d`; returns (train_x, train_y, test_x, test_y) as numpy arrays."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )
    for name, arr in zip(IDX_NAMES, arrays, strict=True):
        write_file(d / name, idx_bytes(arr), gz)
    return arrays


def cifar_batch_dict(n: int, seed: int, label: bytes = b"training batch 1 of 5") -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def cifar_payloads(n: int = 4) -> dict[str, dict]:
    return {b: cifar_batch_dict(n + i, seed=10 + i) for i, b in enumerate(CIFAR_BATCHES)}


def write_cifar_tar(path: Path, batches: dict[str, bytes], extra: bool = True) -> Path:
    """A tar.gz with the official member names (folder entry, batches.meta and readme.html included)."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        members = dict(batches)
        if extra:
            members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
            members["readme.html"] = b"<html></html>"
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def pickled(payloads: dict[str, dict]) -> dict[str, bytes]:
    return {k: pickle.dumps(v, protocol=2) for k, v in payloads.items()}


def expected_cifar(payloads: dict[str, dict]):
    """Images by a per-pixel loop over the official layout: row[c * 1024 + 32 i + j] is pixel (c, i, j)."""

    def images(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], 3, 32, 32), np.uint8)
        for c in range(3):
            for i in range(32):
                for j in range(32):
                    out[:, c, i, j] = rows[:, c * 1024 + 32 * i + j]
        return out

    train = [payloads[b] for b in CIFAR_BATCHES[:5]]
    train_x = images(np.concatenate([p[b"data"] for p in train]))
    train_y = np.concatenate([p[b"labels"] for p in train])
    test = payloads["test_batch"]
    return train_x, train_y, images(test[b"data"]), np.asarray(test[b"labels"])


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No CDGRAD_DATA, a fresh home (empty cache) and an empty system data dir; no network."""
    monkeypatch.delenv("CDGRAD_DATA", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(D, "_SYSTEM_DATASETS_DIR", system)

    def no_network(url, dest, timeout):
        raise AssertionError(f"network access attempted: {url}")

    monkeypatch.setattr(D, "fetch_url", no_network)
    return tmp_path


def md5_table(sources: Path) -> dict[str, str]:
    """The official md5 of each MNIST file, from the MNIST section of SOURCES.md."""
    section = sources.read_text().split("## MNIST", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*([\w.-]+\.gz)\s*\|\s*\d+\s*\|\s*([0-9a-f]{32})\s*\|", section, re.M)
    return dict(rows)


# ----------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST files absent")
def test_real_mnist(clean_env):
    table = md5_table(MNIST_SOURCES)
    assert len(table) == 4
    for name, md5 in table.items():
        assert hashlib.md5((MNIST_DIR / name).read_bytes()).hexdigest() == md5
    ds = D.load_dataset("mnist", root=MNIST_DIR, download=False)
    assert ds.name == "mnist" and ds.num_classes == 10 and not ds.swapped
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.test_x.dtype == torch.uint8
    assert ds.train_y.shape == (60000,) and ds.train_y.dtype == torch.int64
    assert ds.test_y.shape == (10000,) and ds.test_y.dtype == torch.int64
    assert ds.train_y.min() == 0 and ds.train_y.max() == 9 and ds.test_y.min() == 0 and ds.test_y.max() == 9
    # Well-known first labels of the official files, and the usual normalisation constants.
    assert ds.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert ds.mean[0] == pytest.approx(0.1307, abs=5e-5) and ds.std[0] == pytest.approx(0.3081, abs=5e-5)
    # Digits are centred on a black background: rows and columns are not transposed or shifted.
    avg = ds.train_x[:, 0].sum(0, dtype=torch.int64) / ds.train_x.shape[0]
    assert avg[:2].max() < 1 and avg[:, :3].max() < 1 and avg[10:18, 10:18].mean() > 60
    # Digits are taller than wide: the row profile is spread wider than the column profile.
    assert avg.mean(1)[5] > 2 * avg.mean(0)[5]


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST files absent")
def test_real_mnist_uncompressed_and_corrupt(clean_env):
    """Uncompressed official files verify by content md5; one changed byte is caught, naming the file."""
    d = clean_env / "mnist_raw"
    d.mkdir()
    for name in IDX_NAMES:
        src = MNIST_DIR / f"{name}.gz"
        if "labels" in name:
            (d / name).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            (d / f"{name}.gz").symlink_to(src)
    ds = D.load_dataset("mnist", root=d, download=False)
    assert ds.test_y[:3].tolist() == [7, 2, 1]
    buf = bytearray((d / "t10k-labels-idx1-ubyte").read_bytes())
    buf[8] = (buf[8] + 1) % 10  # still a valid label: only the checksum can tell
    (d / "t10k-labels-idx1-ubyte").write_bytes(bytes(buf))
    with pytest.raises(D.ChecksumError, match="t10k-labels-idx1-ubyte"):
        D.load_dataset("mnist", root=d, download=False)
    assert D.load_dataset("mnist", root=d, download=False, verify=False).test_y[0] == 8


@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST files absent")
def test_real_fashion_mnist_from_standard_location(clean_env, monkeypatch):
    monkeypatch.setattr(D, "_SYSTEM_DATASETS_DIR", FASHION_DIR.parent)
    assert D.find_dataset_dir("fashion-mnist") == FASHION_DIR
    ds = D.load_dataset("fashion-mnist", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert torch.equal(torch.bincount(ds.train_y, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y, minlength=10), torch.full((10,), 1000))
    assert ds.mean[0] == pytest.approx(0.2860, abs=5e-5) and ds.std[0] == pytest.approx(0.3530, abs=5e-5)


# ----------------------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------------------


@HYP
@given(
    dtype=st.sampled_from(sorted(IDX_CODES, key=str)),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_idx_round_trip(tmp_path_factory, dtype, shape, gz, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_file(tmp_path_factory.mktemp("idx") / "x-idx", idx_bytes(arr), gz)
    out = D.read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative and out.shape == tuple(shape)
    np.testing.assert_array_equal(out, arr)


def test_mnist_synthetic_gz_and_raw(clean_env):
    for gz in (True, False):
        d = clean_env / f"set_{gz}"
        train_x, train_y, test_x, test_y = write_mnist(d, gz=gz, seed=int(gz))
        ds = D.load_dataset("mnist", root=d, download=False, verify=False)
        np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), train_x)
        np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), test_x)
        np.testing.assert_array_equal(ds.train_y.numpy(), train_y)
        np.testing.assert_array_equal(ds.test_y.numpy(), test_y)
        ref = train_x.astype(np.float64) / 255
        assert ds.mean[0] == pytest.approx(ref.mean(), abs=1e-12)
        assert ds.std[0] == pytest.approx(ref.std(), abs=1e-12)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "dtype code"),
        (lambda b: b[:-1], "size mismatch"),
        (lambda b: b + b"\x00", "size mismatch"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:3], "too short"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_file_names_it(tmp_path, mutate, message, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "bad-idx3-ubyte", mutate(idx_bytes(arr)), gz)
    with pytest.raises(D.DatasetFormatError, match=message) as info:
        D.read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_in_dataset_names_file(clean_env):
    d = clean_env / "m"
    write_mnist(d, gz=True)
    path = d / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(D.DatasetFormatError, match="train-labels-idx1-ubyte.gz") as info:
        D.load_dataset("mnist", root=d, download=False, verify=False)
    assert "gzip" in str(info.value)


def test_synthetic_files_fail_checksum(clean_env):
    d = clean_env / "m"
    write_mnist(d, gz=True)
    with pytest.raises(D.ChecksumError, match=r"train-images-idx3-ubyte\.gz.*md5"):
        D.load_dataset("mnist", root=d, download=False)


def test_idx_semantic_errors(clean_env):
    d = clean_env / "m"
    write_mnist(d, n_train=6, gz=False)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(D.DatasetFormatError, match="6 images.*train-labels-idx1-ubyte.*5 labels"):
        D.load_dataset("mnist", root=d, download=False, verify=False)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 3, 4, 10], np.uint8)))
    with pytest.raises(D.DatasetFormatError, match=r"train-labels-idx1-ubyte.*\[0, 10\)"):
        D.load_dataset("mnist", root=d, download=False, verify=False)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(6, np.int32)))
    with pytest.raises(D.DatasetFormatError, match="train-labels-idx1-ubyte.*uint8"):
        D.load_dataset("mnist", root=d, download=False, verify=False)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------------------


def check_cifar(ds: D.Dataset, payloads: dict[str, dict]) -> None:
    train_x, train_y, test_x, test_y = expected_cifar(payloads)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    np.testing.assert_array_equal(ds.train_x.numpy(), train_x)
    np.testing.assert_array_equal(ds.train_y.numpy(), train_y)
    np.testing.assert_array_equal(ds.test_x.numpy(), test_x)
    np.testing.assert_array_equal(ds.test_y.numpy(), test_y)
    ref = train_x.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, ref.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ds.std, ref.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_cifar_tar_gz(clean_env):
    payloads = cifar_payloads()
    write_cifar_tar(clean_env / "cifar-10-python.tar.gz", pickled(payloads))
    ds = D.load_dataset("cifar10", root=clean_env, download=False, verify=False)
    assert ds.train_x.shape == (4 + 5 + 6 + 7 + 8, 3, 32, 32) and ds.test_x.shape == (9, 3, 32, 32)
    check_cifar(ds, payloads)
    assert not (clean_env / "cifar-10-batches-py").exists()  # nothing extracted to disk
    with pytest.raises(D.ChecksumError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", root=clean_env, download=False)


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_folder(clean_env, point_at_folder):
    payloads = cifar_payloads(3)
    folder = clean_env / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, blob in pickled(payloads).items():
        (folder / name).write_bytes(blob)
    root = folder if point_at_folder else clean_env  # clean_env/cifar10 is found as root/<name>
    check_cifar(D.load_dataset("cifar10", root=root, download=False, verify=False), payloads)
    with pytest.raises(D.ChecksumError, match="data_batch_1"):
        D.load_dataset("cifar10", root=root, download=False)


def test_cifar_str_keys_and_protocol_4():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    blob = pickle.dumps({"data": data, "labels": [1, 2, 3]}, protocol=4)
    x, y = D.read_cifar_batch(blob, "b")
    np.testing.assert_array_equal(x.reshape(3, -1), data)
    np.testing.assert_array_equal(y, [1, 2, 3])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2)
    with pytest.raises(D.UnsafePickleError, match=r"evil_batch.*refusing.*system") as info:
        D.read_cifar_batch(blob, tmp_path / "evil_batch")
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize(
    "blob",
    [
        b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1;\x85R.",
        b"\x80\x02csubprocess\nPopen\n)R.",
        b"\x80\x02cnumpy\nload\n)R.",
        b"\x80\x02cposix\nsystem\n)R.",
    ],
)
def test_other_globals_refused(blob):
    with pytest.raises(D.UnsafePickleError, match="src-name: refusing to load global"):
        D.read_cifar_batch(blob, "src-name")


def test_codecs_encode_only_latin1():
    """``_codecs.encode`` is admitted (protocol-2 bytes) but only with the latin-1 codec."""
    ok = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R."
    assert D._RestrictedUnpickler(io.BytesIO(ok), "s").load() == b"abc"
    bad = ok.replace(b"X\x06\x00\x00\x00latin1", b"X\x05\x00\x00\x00rot13")
    with pytest.raises(D.DatasetFormatError, match="src-name.*rot13"):
        D.read_cifar_batch(bad, "src-name")


def test_malicious_member_in_tar_refused(clean_env):
    marker = clean_env / "pwned"
    blobs = pickled(cifar_payloads(2))
    blobs["data_batch_3"] = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    write_cifar_tar(clean_env / "cifar-10-python.tar.gz", blobs)
    with pytest.raises(D.UnsafePickleError, match="cifar-10-batches-py/data_batch_3"):
        D.load_dataset("cifar10", root=clean_env, download=False, verify=False)
    assert not marker.exists()


def test_cifar_corrupt_archive_and_batches(clean_env):
    blobs = pickled(cifar_payloads(2))
    archive = write_cifar_tar(clean_env / "cifar-10-python.tar.gz", blobs)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(D.DatasetFormatError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", root=clean_env, download=False, verify=False)
    missing = {k: v for k, v in blobs.items() if k != "data_batch_4"}
    write_cifar_tar(archive, missing)
    with pytest.raises(D.DatasetFormatError, match="lacks.*data_batch_4"):
        D.load_dataset("cifar10", root=clean_env, download=False, verify=False)
    with pytest.raises(D.DatasetFormatError, match="b1.*not a readable"):
        D.read_cifar_batch(blobs["data_batch_1"][:-20], "b1")
    bad = cifar_batch_dict(3, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    with pytest.raises(D.DatasetFormatError, match=r"b2.*\(n, 3072\)"):
        D.read_cifar_batch(pickle.dumps(bad, protocol=2), "b2")
    bad = cifar_batch_dict(3, 0)
    bad[b"labels"] = [0, 1]
    with pytest.raises(D.DatasetFormatError, match="b3.*3 images"):
        D.read_cifar_batch(pickle.dumps(bad, protocol=2), "b3")
    bad = cifar_batch_dict(3, 0)
    bad[b"labels"] = [0, 1, 10]
    with pytest.raises(D.DatasetFormatError, match=r"b4.*\[0, 10\)"):
        D.read_cifar_batch(pickle.dumps(bad, protocol=2), "b4")


# ----------------------------------------------------------------------------------------------------------
# Lookup and download
# ----------------------------------------------------------------------------------------------------------


def test_lookup_order(clean_env, monkeypatch):
    home = Path(os.environ["HOME"])
    root, env, system = clean_env / "root", clean_env / "env", clean_env / "system"
    cache = home / ".cache/cdgrad/data"
    write_mnist(system / "mnist")
    assert D.find_dataset_dir("mnist") == system / "mnist"
    with pytest.raises(D.DatasetNotFoundError):  # other data sets are looked up under their own names
        D.find_dataset_dir("fashion-mnist", root=system)
    write_mnist(cache / "mnist")
    assert D.find_dataset_dir("mnist") == cache / "mnist"
    write_mnist(env / "mnist")  # env/<name>
    monkeypatch.setenv("CDGRAD_DATA", str(env))
    assert D.find_dataset_dir("mnist") == env / "mnist"
    write_mnist(env)  # the env directory itself comes before env/<name>
    assert D.find_dataset_dir("mnist") == env
    write_mnist(root / "mnist")
    assert D.find_dataset_dir("mnist", root=root) == root / "mnist"
    write_mnist(root)  # the root itself comes before root/<name>
    assert D.find_dataset_dir("mnist", root=root) == root
    assert D.find_dataset_dir("mnist", root=str(root / "mnist")) == root / "mnist"
    # An incomplete root does not count: the search goes on.
    partial = clean_env / "partial"
    write_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    assert D.find_dataset_dir("mnist", root=partial) == env
    # Several directories in the variable, in order.
    monkeypatch.setenv("CDGRAD_DATA", os.pathsep.join([str(partial), str(root / "mnist"), str(env)]))
    assert D.find_dataset_dir("mnist") == root / "mnist"


def test_loader_uses_lookup(clean_env, monkeypatch):
    first = write_mnist(clean_env / "env" / "mnist", n_train=7, seed=1)
    write_mnist(Path(os.environ["HOME"]) / ".cache/cdgrad/data/mnist", n_train=9, seed=2)
    monkeypatch.setenv("CDGRAD_DATA", str(clean_env / "env"))
    ds = D.load_dataset("mnist", download=False, verify=False)
    np.testing.assert_array_equal(ds.train_y.numpy(), first[1])


def test_not_found_message(clean_env):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("mnist", root=clean_env / "nowhere", download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for name in IDX_NAMES:
        assert name in msg
    assert str(clean_env / "nowhere") in msg and str(clean_env / "system" / "mnist") in msg
    assert "CDGRAD_DATA" in msg and ".cache/cdgrad/data/mnist" in msg
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", download=False)


def test_download_offline(clean_env, monkeypatch):
    calls = []

    def offline(url, dest, timeout):
        calls.append((url, timeout))
        dest.write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(D, "fetch_url", offline)
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("fashion-mnist")
    msg = str(info.value)
    assert "no route to host" in msg and "CDGRAD_DATA" in msg
    for name in IDX_NAMES:
        assert f"{name}.gz" in msg
    urls = [u for u, _ in calls]
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz" in urls
    assert len(urls) == 4 * len(D._MIRRORS["fashion-mnist"]) and all(t == 20.0 for _, t in calls)
    cache = Path(os.environ["HOME"]) / ".cache/cdgrad/data/fashion-mnist"
    assert list(cache.iterdir()) == []  # no partial files left behind


def test_download_success_and_bad_mirror(clean_env, monkeypatch):
    src = clean_env / "served"
    arrays = write_mnist(src, gz=True, seed=5)
    for name in IDX_NAMES:
        md5 = hashlib.md5((src / f"{name}.gz").read_bytes()).hexdigest()
        monkeypatch.setitem(D._MD5["mnist"], name, {"gz": md5})
    first, second = D._MIRRORS["mnist"]
    calls = []

    def fetch(url, dest, timeout):
        calls.append(url)
        fname = url.rsplit("/", 1)[1]
        if url.startswith(first):  # the first mirror serves corrupt files
            dest.write_bytes(b"\x1f\x8b garbage")
        else:
            dest.write_bytes((src / fname).read_bytes())

    monkeypatch.setattr(D, "fetch_url", fetch)
    ds = D.load_dataset("mnist")
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), arrays[0])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[3])
    cache = Path(os.environ["HOME"]) / ".cache/cdgrad/data/mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    assert len(calls) == 8 and sum(u.startswith(second) for u in calls) == 4
    # A second load finds the cached files and does not download again.
    D.load_dataset("mnist")
    assert len(calls) == 8


def test_download_only_missing_files(clean_env, monkeypatch):
    cache = Path(os.environ["HOME"]) / ".cache/cdgrad/data/mnist"
    write_mnist(cache)
    (cache / "t10k-images-idx3-ubyte.gz").unlink()
    calls = []
    monkeypatch.setattr(D, "fetch_url", lambda url, dest, timeout: calls.append(url))
    with pytest.raises(D.DatasetNotFoundError, match="t10k-images-idx3-ubyte.gz.*md5"):
        D.load_dataset("mnist")
    assert {u.rsplit("/", 1)[1] for u in calls} == {"t10k-images-idx3-ubyte.gz"}


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"name must be one of \('mnist', 'fashion-mnist', 'cifar10'\)"):
        D.load_dataset("svhn")
    with pytest.raises(ValueError, match="name must be one of"):
        D.find_dataset_dir("MNIST")
    with pytest.raises(TypeError, match="download"):
        D.load_dataset("mnist", download="yes")
    with pytest.raises(TypeError, match="root must be a directory path"):
        D.load_dataset("mnist", root=3)


# ----------------------------------------------------------------------------------------------------------
# Dataset container
# ----------------------------------------------------------------------------------------------------------


def small_dataset(seed: int = 0, c: int = 3) -> D.Dataset:
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randint(0, 256, (20, c, 5, 5), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 200, (8, c, 5, 5), dtype=torch.uint8, generator=g)
    mean, std = D.channel_stats(train_x)
    return D.Dataset(
        "cifar10", train_x, torch.randint(0, 10, (20,), generator=g), test_x,
        torch.randint(0, 10, (8,), generator=g), 10, mean, std,
    )  # fmt: skip


def test_swap_train_test():
    ds = small_dataset()
    sw = ds.swap_train_test()
    assert sw.train_x is ds.test_x and sw.train_y is ds.test_y
    assert sw.test_x is ds.train_x and sw.test_y is ds.train_y
    assert sw.swapped and not ds.swapped and sw.name == ds.name and sw.num_classes == ds.num_classes
    ref = ds.test_x.double() / 255
    np.testing.assert_allclose(sw.mean, ref.mean(dim=(0, 2, 3)).numpy(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(sw.std, ref.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-12, rtol=0)
    back = sw.swap_train_test()
    assert back.train_x is ds.train_x and not back.swapped
    np.testing.assert_allclose(back.mean, ds.mean, atol=1e-15)


def test_dataset_to_device():
    ds = small_dataset()
    moved = ds.to("meta")
    for f in ("train_x", "train_y", "test_x", "test_y"):
        assert getattr(moved, f).device.type == "meta" and getattr(ds, f).device.type == "cpu"
    assert moved.mean == ds.mean and moved.name == ds.name


def test_dataset_validation():
    ds = small_dataset()
    with pytest.raises(TypeError, match="train_x"):
        D.Dataset("x", ds.train_x.float(), ds.train_y, ds.test_x, ds.test_y, 10, ds.mean, ds.std)
    with pytest.raises(TypeError, match="test_y"):
        D.Dataset("x", ds.train_x, ds.train_y, ds.test_x, ds.test_y[:3], 10, ds.mean, ds.std)
    with pytest.raises(ValueError, match="mean and std"):
        D.Dataset("x", ds.train_x, ds.train_y, ds.test_x, ds.test_y, 10, (0.5,), ds.std)


@HYP
@given(n=st.integers(1, 6), c=st.integers(1, 4), h=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_channel_stats(n, c, h, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, h + 1), dtype=torch.uint8, generator=g)
    mean, std = D.channel_stats(x)
    ref = x.double() / 255
    np.testing.assert_allclose(mean, ref.mean(dim=(0, 2, 3)).numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(std, ref.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# normalize and augmentation
# ----------------------------------------------------------------------------------------------------------


@HYP
@given(n=st.integers(0, 4), c=st.integers(1, 4), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_normalize(n, c, batched, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, 3, 4) if batched else (c, 3, 4), dtype=torch.uint8, generator=g)
    mean = torch.rand(c, generator=g, dtype=torch.float64).tolist()
    std = (0.05 + torch.rand(c, generator=g, dtype=torch.float64)).tolist()
    out = D.normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = torch.empty(x.shape, dtype=torch.float64)
    for ch in range(c):
        ref[..., ch, :, :] = (x[..., ch, :, :].double() / 255 - mean[ch]) / std[ch]
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


def test_normalize_bad_input():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="x_uint8.*uint8"):
        D.normalize(x.float(), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="mean.*3"):
        D.normalize(x, (0.5,), (0.5,) * 3)
    with pytest.raises(ValueError, match="std must be positive"):
        D.normalize(x, (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="x_uint8 must have shape"):
        D.normalize(x[0, 0], (0.5,), (0.5,))


def naive_crop_flip(x: torch.Tensor, dy, dx, flip, pad: int) -> torch.Tensor:
    out = torch.empty_like(x)
    _, _, h, w = x.shape
    for i in range(x.shape[0]):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        crop = padded[:, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


@HYP
@given(
    n=st.integers(0, 6), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), pad=st.integers(0, 4),
    seed=st.integers(0, 2**16), uint8=st.booleans(),
)  # fmt: skip
def test_augment_matches_per_image_reference(n, c, h, w, pad, seed, uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g)
    x = x.to(torch.uint8) if uint8 else x.double() / 7
    before = x.clone()
    out = D.augment_crop_flip(x, pad, generator=torch.Generator().manual_seed(seed + 1))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(x, before)
    dy, dx, flip = D.crop_flip_params(n, pad, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(out, naive_crop_flip(x, dy, dx, flip, pad))
    assert torch.equal(D.crop_flip(x, dy, dx, flip, pad), out)


def test_augment_outputs_are_crops_of_padded_input():
    """Brute force: every output equals one of the (2 pad + 1)^2 * 2 crops/flips of its padded input."""
    pad = 2
    x = torch.randn(24, 2, 6, 5, dtype=torch.float64)
    out = D.augment_crop_flip(x, pad, generator=torch.Generator().manual_seed(3))
    seen = set()
    for i in range(x.shape[0]):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        matches = [
            (dy, dx, fl)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for fl in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if fl else c)(padded[:, dy : dy + 6, dx : dx + 5]))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # the draws vary between images


def test_augment_determinism_and_distribution():
    x = torch.arange(4000 * 2 * 4 * 4, dtype=torch.float32).reshape(4000, 2, 4, 4)
    a = D.augment_crop_flip(x, 3, generator=torch.Generator().manual_seed(0))
    b = D.augment_crop_flip(x, 3, generator=torch.Generator().manual_seed(0))
    c = D.augment_crop_flip(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = D.augment_crop_flip(x, 3)
    torch.manual_seed(7)
    assert torch.equal(d, D.augment_crop_flip(x, 3))
    dy, dx, flip = D.crop_flip_params(4000, 3, generator=torch.Generator().manual_seed(0))
    assert set(dy.tolist()) == set(range(7)) and set(dx.tolist()) == set(range(7))
    assert 0.45 < flip.double().mean().item() < 0.55
    # pad 0: only flips, each image is itself or its mirror image.
    e = D.augment_crop_flip(x, 0, generator=torch.Generator().manual_seed(0))
    same = (e == x).flatten(1).all(1)
    mirrored = (e == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 1000 < int(mirrored.sum()) < 3000


def test_augment_bad_input():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="pad must be a non-negative int"):
        D.augment_crop_flip(x, -1)
    with pytest.raises(ValueError, match="pad must be a non-negative int"):
        D.augment_crop_flip(x, 1.5)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, C, H, W\)"):
        D.augment_crop_flip(x[0])
    zeros = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"dy and dx must lie in \[0, 2\]"):
        D.crop_flip(x, zeros + 3, zeros, zeros.bool(), pad=1)
    with pytest.raises(ValueError, match="flip must have shape"):
        D.crop_flip(x, zeros, zeros, zeros[:1].bool(), pad=1)
