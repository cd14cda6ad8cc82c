"""Tests of cdgrad.experiments.data.sources: official files, checksums, lookup, download, loading."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from cdgrad.experiments import data as D
from cdgrad.experiments.data import sources
from helpers import (
    IDX_NAMES,
    SHARED_DATA,
    cifar_images,
    cifar_payloads,
    expected_cifar,
    idx_bytes,
    isolate_data_env,
    pickled,
    write_cifar_tar,
    write_file,
    write_mnist,
)

MNIST_DIR = SHARED_DATA / "mnist"
MNIST_SOURCES = SHARED_DATA / "SOURCES.md"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_MNIST = all((MNIST_DIR / f"{n}.gz").is_file() for n in IDX_NAMES)
HAVE_FASHION = all((FASHION_DIR / f"{n}.gz").is_file() for n in IDX_NAMES)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    return isolate_data_env(tmp_path, monkeypatch)


def md5_table(sources_md: Path) -> dict[str, str]:
    """The official md5 of each MNIST file, from the MNIST section of SOURCES.md."""
    section = sources_md.read_text().split("## MNIST", 1)[1].split("\n## ", 1)[0]
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
    # The capped decompression gives exactly what the standard library gives.
    for name in IDX_NAMES:
        raw = (MNIST_DIR / f"{name}.gz").read_bytes()
        assert D.read_idx(MNIST_DIR / f"{name}.gz").tobytes() == D.parse_idx(gzip.decompress(raw)).tobytes()


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
    monkeypatch.setattr(sources, "_SYSTEM_DATASETS_DIR", FASHION_DIR.parent)
    assert D.find_dataset_dir("fashion-mnist") == FASHION_DIR
    ds = D.load_dataset("fashion-mnist", download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert torch.equal(torch.bincount(ds.train_y, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y, minlength=10), torch.full((10,), 1000))
    assert ds.mean[0] == pytest.approx(0.2860, abs=5e-5) and ds.std[0] == pytest.approx(0.3530, abs=5e-5)


# ----------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_names_a_bad_file(tmp_path, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "bad-idx3-ubyte", idx_bytes(arr) + b"\x00", gz)
    with pytest.raises(D.DatasetFormatError, match="size mismatch") as info:
        D.read_idx(path)
    assert str(path) in str(info.value)
    good = write_file(tmp_path / "good-idx3-ubyte", idx_bytes(arr), gz)
    np.testing.assert_array_equal(D.read_idx(good), arr)
    with pytest.raises(D.DatasetNotFoundError, match="cannot read"):
        D.read_idx(tmp_path / "absent")


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


def test_truncated_gzip_in_dataset_names_file(clean_env):
    d = clean_env / "m"
    write_mnist(d, gz=True)
    path = d / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(D.DatasetFormatError, match="train-labels-idx1-ubyte.gz") as info:
        D.load_dataset("mnist", root=d, download=False, verify=False)
    assert "gzip" in str(info.value)


def test_gzip_bomb_in_dataset_is_refused(clean_env):
    d = clean_env / "m"
    write_mnist(d, gz=True)
    header = bytes([0, 0, 0x08, 1]) + (12).to_bytes(4, "big")  # 12 labels, then 32 MiB more
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + bytes(12 + (32 << 20)), 9))
    with pytest.raises(D.DatasetFormatError, match=r"train-labels-idx1-ubyte.gz: IDX size mismatch.*beyond"):
        D.load_dataset("mnist", root=d, download=False, verify=False)


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
    with pytest.raises(D.ChecksumError, match="cifar-10-python.tar.gz") as info:
        D.load_dataset("cifar10", root=clean_env, download=False)
    # advice a user can follow wherever the error shows, the command line included (which has no verify=False)
    assert "verify=False" not in str(info.value) and "replace it with the official file" in str(info.value)


def test_cifar_archive_checksum_is_checked_before_decompression(clean_env, monkeypatch):
    payloads = cifar_payloads(2)
    archive = write_cifar_tar(clean_env / "cifar-10-python.tar.gz", pickled(payloads))
    calls = []
    real = sources.read_cifar_archive
    monkeypatch.setattr(sources, "read_cifar_archive", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(D.ChecksumError):
        D.load_dataset("cifar10", root=clean_env, download=False)
    assert calls == []  # refused before anything was decompressed
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(sources.MD5["cifar10"], "cifar-10-python.tar.gz", {"gz": md5})
    check_cifar(D.load_dataset("cifar10", root=clean_env, download=False), payloads)
    assert len(calls) == 1


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


def test_malicious_member_in_tar_refused(clean_env):
    marker = clean_env / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    blobs = pickled(cifar_payloads(2))
    blobs["data_batch_3"] = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    write_cifar_tar(clean_env / "cifar-10-python.tar.gz", blobs)
    with pytest.raises(D.UnsafePickleError, match="cifar-10-batches-py/data_batch_3"):
        D.load_dataset("cifar10", root=clean_env, download=False, verify=False)
    assert not marker.exists()


def test_cifar_corrupt_archive(clean_env):
    blobs = pickled(cifar_payloads(2))
    archive = write_cifar_tar(clean_env / "cifar-10-python.tar.gz", blobs)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(D.DatasetFormatError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", root=clean_env, download=False, verify=False)
    missing = {k: v for k, v in blobs.items() if k != "data_batch_4"}
    write_cifar_tar(archive, missing)
    with pytest.raises(D.DatasetFormatError, match="lacks.*data_batch_4"):
        D.load_dataset("cifar10", root=clean_env, download=False, verify=False)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-100 (fine and coarse labels from the same files)
# ----------------------------------------------------------------------------------------------------------


def cifar100_payloads(n_train: int = 7, n_test: int = 5) -> dict[str, dict]:
    """`train` and `test` as the official pickles hold them (bytes keys; fine labels 0..99, coarse 0..19)."""
    out = {}
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        rng = np.random.default_rng(seed)
        fine = rng.integers(0, 100, n)
        out[name] = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
    return out


def write_cifar100_tar(path: Path, blobs: dict[str, bytes]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        members = {**blobs, "meta": pickle.dumps({b"fine_label_names": [b"apple"]}, protocol=2)}
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_cifar100_fine_and_coarse_labels(clean_env, monkeypatch, layout):
    payloads = cifar100_payloads()
    blobs = {k: pickle.dumps(v, protocol=2) for k, v in payloads.items()}
    if layout == "archive":
        write_cifar100_tar(clean_env / "cifar-100-python.tar.gz", blobs)
    else:
        folder = clean_env / "cifar100" / "cifar-100-python"  # found as root/cifar100 for both label sets
        folder.mkdir(parents=True)
        for name, blob in blobs.items():
            (folder / name).write_bytes(blob)
    for name, key, classes in (("cifar100", b"fine_labels", 100), ("cifar100-coarse", b"coarse_labels", 20)):
        ds = D.load_dataset(name, root=clean_env, download=False, verify=False)
        assert ds.name == name and ds.num_classes == classes
        np.testing.assert_array_equal(ds.train_x.numpy(), cifar_images(payloads["train"][b"data"]))
        np.testing.assert_array_equal(ds.test_x.numpy(), cifar_images(payloads["test"][b"data"]))
        np.testing.assert_array_equal(ds.train_y.numpy(), payloads["train"][key])
        np.testing.assert_array_equal(ds.test_y.numpy(), payloads["test"][key])
        with pytest.raises(D.ChecksumError, match="cifar-100-python.tar.gz" if layout == "archive" else "train"):
            D.load_dataset(name, root=clean_env, download=False)
    if layout == "archive":  # with the archive's md5 declared official, the checked load reads it
        md5 = hashlib.md5((clean_env / "cifar-100-python.tar.gz").read_bytes()).hexdigest()
        monkeypatch.setitem(sources.MD5["cifar100"], "cifar-100-python.tar.gz", {"gz": md5})
        assert D.load_dataset("cifar100", root=clean_env, download=False).train_x.shape == (7, 3, 32, 32)


def test_cifar100_bad_files(clean_env):
    payloads = cifar100_payloads()
    payloads["train"][b"fine_labels"][3] = 100
    blobs = {k: pickle.dumps(v, protocol=2) for k, v in payloads.items()}
    write_cifar100_tar(clean_env / "cifar-100-python.tar.gz", blobs)
    with pytest.raises(D.DatasetFormatError, match=r"cifar-100-python/train.*\[0, 100\)"):
        D.load_dataset("cifar100", root=clean_env, download=False, verify=False)
    del payloads["test"][b"coarse_labels"]
    payloads["train"][b"fine_labels"][3] = 1
    blobs = {k: pickle.dumps(v, protocol=2) for k, v in payloads.items()}
    write_cifar100_tar(clean_env / "cifar-100-python.tar.gz", blobs)
    with pytest.raises(D.DatasetFormatError, match="cifar-100-python/test.*'coarse_labels' must be a list"):
        D.load_dataset("cifar100-coarse", root=clean_env, download=False, verify=False)
    write_cifar100_tar(clean_env / "cifar-100-python.tar.gz", {"train": blobs["train"]})
    with pytest.raises(D.DatasetFormatError, match="lacks.*cifar-100-python/test"):
        D.load_dataset("cifar100", root=clean_env, download=False, verify=False)
    with pytest.raises(D.DatasetNotFoundError, match=r"cifar-100-python.tar.gz \(or the extracted cifar-100-python/"):
        D.load_dataset("cifar100", download=False)  # the isolated environment holds no copy


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
    # An existing but incomplete directory in the variable does not count: the search goes on.
    partial = clean_env / "partial"
    write_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("CDGRAD_DATA", os.pathsep.join([str(partial), str(env)]))
    assert D.find_dataset_dir("mnist") == env
    # Several directories in the variable, in order; entries that do not exist are skipped.
    monkeypatch.setenv("CDGRAD_DATA", os.pathsep.join([str(clean_env / "gone"), str(partial), str(root / "mnist")]))
    assert D.find_dataset_dir("mnist") == root / "mnist"


@pytest.mark.parametrize("download", [False, True])
def test_root_that_does_not_exist_is_an_error_naming_it(clean_env, download):
    """A mistyped root must not fall back to another copy (here: a complete one in the system folder)."""
    write_mnist(clean_env / "system" / "mnist")
    assert D.find_dataset_dir("mnist") == clean_env / "system" / "mnist"
    missing = clean_env / "typo"
    for call in (
        lambda: D.find_dataset_dir("mnist", root=missing),
        lambda: D.load_dataset("mnist", root=missing, download=download, verify=False),
    ):
        with pytest.raises(D.DatasetNotFoundError, match=rf"data root '{re.escape(str(missing))}'.*'mnist'.*does not"):
            call()
    afile = clean_env / "file"
    afile.write_text("x")
    with pytest.raises(D.DatasetNotFoundError, match="is not a directory"):
        D.load_dataset("mnist", root=afile, download=download)
    assert not (Path(os.environ["HOME"]) / ".cache").exists()  # nothing downloaded or created


@pytest.mark.parametrize("download", [False, True])
def test_an_explicit_root_that_lacks_files_is_refused_not_replaced(clean_env, monkeypatch, download):
    """Complete copies in $CDGRAD_DATA, the cache and the system folder, and a mirror that would serve the files:
    an incomplete root given explicitly is still refused, naming it and only the file it lacks."""
    env = clean_env / "env"
    for d in (env, Path(os.environ["HOME"]) / ".cache/cdgrad/data/mnist", clean_env / "system" / "mnist"):
        write_mnist(d)
    monkeypatch.setenv("CDGRAD_DATA", str(env))
    fetched = []
    monkeypatch.setattr(sources, "fetch_url", lambda url, dest, timeout: fetched.append(url))
    for layout in ("root", "root/mnist"):
        root = clean_env / f"partial-{layout.replace('/', '-')}"
        files = root / "mnist" if layout == "root/mnist" else root
        write_mnist(files)
        (files / "t10k-labels-idx1-ubyte.gz").unlink()
        for call, kwargs in ((D.find_dataset_dir, {}), (D.load_dataset, {"download": download, "verify": False})):
            with pytest.raises(D.DatasetNotFoundError) as info:
                call("mnist", root=root, **kwargs)
            msg = str(info.value)
            assert "Missing files: t10k-labels-idx1-ubyte.gz (gzipped or not)." in msg
            for present in ("train-images", "train-labels", "t10k-images"):
                assert present not in msg.split("Searched:")[0]
            assert str(root) in msg and str(env) not in msg and "system" not in msg
    assert fetched == [] and D.find_dataset_dir("mnist") == env  # nothing downloaded; unset, the variable's copy


def test_missing_files_name_only_those_missing_without_a_root(clean_env, monkeypatch):
    partial = clean_env / "partial"
    write_mnist(partial)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (partial / f"{name}.gz").unlink()
    monkeypatch.setenv("CDGRAD_DATA", str(partial))
    with pytest.raises(D.DatasetNotFoundError, match=r"Missing files: train-images-idx3-ubyte.gz, t10k-images-idx3"):
        D.load_dataset("mnist", download=False)
    monkeypatch.setenv("CDGRAD_DATA", "")
    with pytest.raises(D.DatasetNotFoundError) as info:  # no directory at all: every file is missing
        D.load_dataset("mnist", download=False)
    assert all(f"{name}.gz" in str(info.value).split("Searched:")[0] for name in IDX_NAMES)


def test_loader_uses_lookup(clean_env, monkeypatch):
    first = write_mnist(clean_env / "env" / "mnist", n_train=7, seed=1)
    write_mnist(Path(os.environ["HOME"]) / ".cache/cdgrad/data/mnist", n_train=9, seed=2)
    monkeypatch.setenv("CDGRAD_DATA", str(clean_env / "env"))
    ds = D.load_dataset("mnist", download=False, verify=False)
    np.testing.assert_array_equal(ds.train_y.numpy(), first[1])


def test_not_found_message(clean_env):
    (clean_env / "empty").mkdir()
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("mnist", root=clean_env / "empty", download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for name in IDX_NAMES:
        assert name in msg
    assert str(clean_env / "empty") in msg and str(clean_env / "system" / "mnist") not in msg  # the root only
    assert "CDGRAD_DATA" in msg and "leave the root unset" in msg
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", download=False)


def test_download_offline(clean_env, monkeypatch):
    calls = []

    def offline(url, dest, timeout):
        calls.append((url, timeout))
        dest.write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(sources, "fetch_url", offline)
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("fashion-mnist")
    msg = str(info.value)
    assert "no route to host" in msg and "CDGRAD_DATA" in msg
    for name in IDX_NAMES:
        assert f"{name}.gz" in msg
    urls = [u for u, _ in calls]
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz" in urls
    assert len(urls) == 4 * len(sources.MIRRORS["fashion-mnist"]) and all(t == 20.0 for _, t in calls)
    cache = Path(os.environ["HOME"]) / ".cache/cdgrad/data/fashion-mnist"
    assert list(cache.iterdir()) == []  # no partial files left behind


def test_download_success_and_bad_mirror(clean_env, monkeypatch):
    src = clean_env / "served"
    arrays = write_mnist(src, gz=True, seed=5)
    for name in IDX_NAMES:
        md5 = hashlib.md5((src / f"{name}.gz").read_bytes()).hexdigest()
        monkeypatch.setitem(sources.MD5["mnist"], name, {"gz": md5})
    first, second = sources.MIRRORS["mnist"]
    calls = []

    def fetch(url, dest, timeout):
        calls.append(url)
        fname = url.rsplit("/", 1)[1]
        if url.startswith(first):  # the first mirror serves corrupt files
            dest.write_bytes(b"\x1f\x8b garbage")
        else:
            dest.write_bytes((src / fname).read_bytes())

    monkeypatch.setattr(sources, "fetch_url", fetch)
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
    monkeypatch.setattr(sources, "fetch_url", lambda url, dest, timeout: calls.append(url))
    with pytest.raises(D.DatasetNotFoundError, match="t10k-images-idx3-ubyte.gz.*md5"):
        D.load_dataset("mnist")
    assert {u.rsplit("/", 1)[1] for u in calls} == {"t10k-images-idx3-ubyte.gz"}


def test_bad_arguments():
    accepted = re.escape(repr(D.dataset_names()))
    with pytest.raises(ValueError, match=rf"name must be one of {accepted}, got 'svhn'"):
        D.load_dataset("svhn")
    with pytest.raises(
        ValueError, match=r"name must be one of \('mnist', 'fashion-mnist', 'cifar10', 'cifar100', 'cifar100-coarse'\)"
    ):
        D.find_dataset_dir("MNIST")
    with pytest.raises(TypeError, match="download"):
        D.load_dataset("mnist", download="yes")
    with pytest.raises(TypeError, match="verify"):
        D.load_dataset("mnist", verify=1)
    with pytest.raises(TypeError, match="root must be a directory path"):
        D.load_dataset("mnist", root=3)


def test_registered_data_sets_load_through_load_dataset(clean_env):
    """`load_dataset` passes (root, download) to a registered loader; the official names stay protected."""
    calls = []
    made = D.Dataset(
        "mine", *(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)) * 2, 3, (0.5,), (0.2,)
    )

    def loader(root, download):
        calls.append((root, download))
        return made

    D.register_dataset("srctest-set", loader)
    try:
        assert D.load_dataset("srctest-set", download=False) is made
        assert D.load_dataset("srctest-set", root=clean_env, download=True) is made
        assert calls == [(None, False), (clean_env, True)]
        with pytest.raises(D.DatasetNotFoundError, match="srctest-set.*does not exist"):
            D.load_dataset("srctest-set", root=clean_env / "nowhere")
        assert len(calls) == 2
    finally:
        D.DATASET_REGISTRY.unregister("srctest-set")
    with pytest.raises(ValueError, match="built in"):
        D.register_dataset("mnist", loader)
