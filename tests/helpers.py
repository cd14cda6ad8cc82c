"""Helpers shared by the test modules: where the shared data lives, independent references."""

from __future__ import annotations

from pathlib import Path

# `shared/` sits beside the checkout: <parent>/<checkout>/tests/helpers.py -> <parent>/shared
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"


# ---------------------------------------------------------------------------------- toolkit test fixtures
# A generated data set ("synthetic") and a seconds-fast network ("tiny") for the toolkit's tests. They are not
# user-facing choices: a test (and every process a test starts) calls `register_fixtures()` first.
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def synthetic_dataset(n_train: int = 256, n_test: int = 128, size: int = 8, classes: int = 4):
    """A tiny, learnable, generated data set (one class-specific pattern plus noise)."""
    from cdgrad.experiments.data import Dataset

    g = torch.Generator().manual_seed(1234)
    patterns = torch.rand(classes, 1, size, size, generator=g)

    def make(n: int):
        y = torch.randint(0, classes, (n,), generator=g)
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, 1, size, size, generator=g)
        return (x * 255).round().to(torch.uint8), y.to(torch.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Dataset(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=classes,
        mean=(0.5,),
        std=(0.25,),
    )


class TinyNet(nn.Module):
    """Two 3x3 convolutions and a linear layer: the "tiny" network."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(F.max_pool2d(x, 2)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_net(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **_: object) -> TinyNet:
    """The "tiny" network for `num_classes` classes and `in_channels` input channels."""
    return TinyNet(num_classes, in_channels)


def _synthetic_loader(*args: object, **kwargs: object):
    return synthetic_dataset()


def dense_synthetic_dataset(n_train: int = 24, n_test: int = 8, size: int = 32, classes: int = 3):
    """A tiny generated segmentation data set: per image, squares of classes 1..classes-1 (each class its own
    grey level) on a background of class 0, plus noise; pixels on a square's border are labelled 255 (ignored)."""
    from cdgrad.experiments.data import Dataset

    g = torch.Generator().manual_seed(4321)

    def make(n: int):
        y = torch.zeros(n, size, size, dtype=torch.int64)
        for i in range(n):
            for c in range(1, classes):
                side = int(torch.randint(size // 4, size // 2, (1,), generator=g))
                top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
                y[i, top : top + side, left : left + side] = 255
                y[i, top + 1 : top + side - 1, left + 1 : left + side - 1] = c
        level = torch.linspace(0.1, 0.9, classes + 1)
        x = level[y.clamp(max=classes)] + 0.1 * torch.rand(n, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1), y

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Dataset("synthetic-dense", train_x, train_y, test_x, test_y, classes, mean=(0.5,), std=(0.25,))


class Interrupt(Exception):
    """Raised by `interrupt_after` to stop a run the way a kill would, after a checkpoint."""


def interrupt_after(epoch: int):
    """A `train` callback that raises `Interrupt` after epoch `epoch` (its checkpoint is written)."""

    def callback(e, curves):
        if e == epoch:
            raise Interrupt

    return callback


def register_fixtures() -> None:
    """Make "synthetic", "synthetic-dense" and "tiny" available to the toolkit in this process (idempotent)."""
    from cdgrad.experiments import data, models

    data.register_dataset("synthetic", _synthetic_loader)
    data.register_dataset("synthetic-dense", lambda *args, **kwargs: dense_synthetic_dataset())
    models.register_model("tiny", tiny_net)


def install_preset(preset) -> None:
    """Make `preset` available to `cdgrad run` / `report` in this process (a test sweep)."""
    from cdgrad.experiments import presets

    if hasattr(presets.PRESETS, "register"):
        presets.PRESETS.register(preset.name, preset)
    else:
        presets.PRESETS[preset.name] = preset


def uninstall_preset(name: str) -> None:
    """Remove a preset `install_preset` added."""
    from cdgrad.experiments import presets

    if hasattr(presets.PRESETS, "unregister"):
        presets.PRESETS.unregister(name)
    else:
        presets.PRESETS.pop(name, None)


# ------------------------------------------------------------------------- independent numerical references
# Float64 references for the library's transforms, shared by test_functional, test_distributed, test_contract
# and the SGS tests. Each is computed another way than the library does (dense solves, Fourier multipliers).
import math  # noqa: E402


def periodic_second_difference(n: int) -> torch.Tensor:
    """Dense L with (L u)[o] = u[o+1] - 2u[o] + u[o-1], indices mod n, built entry by entry (float64)."""
    L = torch.zeros(n, n, dtype=torch.float64)
    for o in range(n):
        L[o, o] -= 2.0
        L[o, (o + 1) % n] += 1.0
        L[o, (o - 1) % n] += 1.0
    return L


def along(fn, x: torch.Tensor, dim):
    """Apply a fiber map (n, m) -> (n, m) along `dim` (None = rasterised in C order) of `x` in float64."""
    x = x.double()
    if dim is None:
        return fn(x.reshape(-1, 1)).reshape(x.shape)
    moved = x.movedim(dim, 0)
    return fn(moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, dim)


def dense_sobolev(x: torch.Tensor, lam: float, dim=0) -> torch.Tensor:
    """Solve f = (1/n) 11^T g - lam n^2 L g with a dense matrix (method.md 1.2)."""

    def solve(f):
        n = f.shape[0]
        A = torch.full((n, n), 1.0 / n, dtype=torch.float64) - lam * n * n * periodic_second_difference(n)
        return torch.linalg.solve(A, f)

    return along(solve, x, dim)


def fft_sobolev(x: torch.Tensor, lam: float, dim=0) -> torch.Tensor:
    """The Sobolev gradient from its Fourier multiplier: 1 at k = 0, 1 / (lam n^2 (2 - 2 cos(2 pi k/n))) otherwise.
    Better conditioned than the dense solve for long axes."""

    def solve(f):
        n = f.shape[0]
        k = torch.arange(n, dtype=torch.float64)
        mult = torch.ones(n, dtype=torch.float64)
        mult[1:] = 1.0 / (lam * n * n * (2 - 2 * torch.cos(2 * math.pi * k[1:] / n)))
        return torch.fft.ifft(torch.fft.fft(f, dim=0) * mult[:, None], dim=0).real

    return along(solve, x, dim)


def loop_h0(x: torch.Tensor, lam: float, dim=0) -> torch.Tensor:
    """`fbar + (f - fbar) / lam` along `dim`, with the mean summed by a Python loop."""

    def solve(f):
        out = torch.empty_like(f)
        for col in range(f.shape[1]):
            m = sum(f[:, col].tolist()) / f.shape[0]
            for o in range(f.shape[0]):
                out[o, col] = m + (f[o, col] - m) / lam
        return out

    return along(solve, x, dim)


def dense_laplacian_smooth(x: torch.Tensor, sigma: float, dim=None) -> torch.Tensor:
    """`(I - sigma L)^-1 f` along `dim` by a dense solve."""

    def solve(f):
        n = f.shape[0]
        return torch.linalg.solve(torch.eye(n, dtype=torch.float64) - sigma * periodic_second_difference(n), f)

    return along(solve, x, dim)


def loop_centralize(x: torch.Tensor) -> torch.Tensor:
    """Each output row minus its own mean, the mean summed by a Python loop."""
    x = x.double()
    return torch.stack([x[o] - sum(x[o].reshape(-1).tolist()) / x[o].numel() for o in range(x.shape[0])])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (0 for two empty tensors of one shape)."""
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0 if a.shape == b.shape else math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------- writers of the official data formats
# Independent of the code under test: the IDX and CIFAR-10 layouts written out by hand.
import gzip as _gzip  # noqa: E402
import io as _io  # noqa: E402
import pickle as _pickle  # noqa: E402
import struct as _struct  # noqa: E402
import tarfile as _tarfile  # noqa: E402

import numpy as _np  # noqa: E402

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_CODES = {_np.dtype("u1"): 0x08, _np.dtype("i1"): 0x09, _np.dtype("i2"): 0x0B, _np.dtype("i4"): 0x0C,
             _np.dtype("f4"): 0x0D, _np.dtype("f8"): 0x0E}  # fmt: skip
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def idx_bytes(arr):
    """IDX encoding written by hand: 0, 0, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + _struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_file(path, payload: bytes, gz: bool):
    """`payload` at `path` (gzipped, at `path.gz`, when `gz`); returns the path written."""
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(_gzip.compress(payload) if gz else payload)
    return path


def write_mnist(d, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0, side: int = 28):
    """Four synthetic IDX files in `d`; returns (train_x, train_y, test_x, test_y) as numpy arrays."""
    rng = _np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, side, side), dtype=_np.uint8),
        rng.integers(0, 10, n_train, dtype=_np.uint8),
        rng.integers(0, 256, (n_test, side, side), dtype=_np.uint8),
        rng.integers(0, 10, n_test, dtype=_np.uint8),
    )
    for name, arr in zip(IDX_NAMES, arrays, strict=True):
        write_file(d / name, idx_bytes(arr), gz)
    return arrays


def cifar_batch_dict(n: int, seed: int, label: bytes = b"training batch 1 of 5") -> dict:
    """A CIFAR-10 batch as the official pickles hold it (bytes keys, uint8 rows of 3,072)."""
    rng = _np.random.default_rng(seed)
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=_np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def cifar_payloads(n: int = 4) -> dict:
    return {b: cifar_batch_dict(n + i, seed=10 + i) for i, b in enumerate(CIFAR_BATCHES)}


def pickled(payloads: dict) -> dict:
    return {k: _pickle.dumps(v, protocol=2) for k, v in payloads.items()}


def write_cifar_tar(path, batches: dict, extra: bool = True):
    """A tar.gz with the official member names (folder entry, batches.meta and readme.html included)."""
    with _tarfile.open(path, "w:gz") as tar:
        folder = _tarfile.TarInfo("cifar-10-batches-py")
        folder.type = _tarfile.DIRTYPE
        tar.addfile(folder)
        members = dict(batches)
        if extra:
            members["batches.meta"] = _pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
            members["readme.html"] = b"<html></html>"
        for name, payload in members.items():
            info = _tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, _io.BytesIO(payload))
    return path


def cifar_images(rows):
    """Images by a per-pixel loop over the official layout: row[c * 1024 + 32 i + j] is pixel (c, i, j)."""
    out = _np.zeros((rows.shape[0], 3, 32, 32), _np.uint8)
    for c in range(3):
        for i in range(32):
            for j in range(32):
                out[:, c, i, j] = rows[:, c * 1024 + 32 * i + j]
    return out


def expected_cifar(payloads: dict):
    """(train_x, train_y, test_x, test_y) of CIFAR-10 payloads, the images by `cifar_images`."""
    images = cifar_images
    train = [payloads[b] for b in CIFAR_BATCHES[:5]]
    train_x = images(_np.concatenate([p[b"data"] for p in train]))
    train_y = _np.concatenate([p[b"labels"] for p in train])
    test = payloads["test_batch"]
    return train_x, train_y, images(test[b"data"]), _np.asarray(test[b"labels"])


def isolate_data_env(tmp_path, monkeypatch):
    """No CDGRAD_DATA, a fresh home (empty cache), an empty system data folder, no network; returns tmp_path."""
    from cdgrad.experiments.data import sources

    monkeypatch.delenv("CDGRAD_DATA", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(sources, "_SYSTEM_DATASETS_DIR", system)

    def no_network(url, dest, timeout):
        raise AssertionError(f"network access attempted: {url}")

    monkeypatch.setattr(sources, "fetch_url", no_network)
    return tmp_path


# --------------------------------------------------------------------------------- SGS numpy references
# Naive references for cdgrad.sgs (histogram2d entropies, pixel-pair loops), shared by test_sgs_*.py.
import itertools  # noqa: E402

import numpy as np  # noqa: E402


def ref_edges(v: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width edges over the sample's own [min, max], the last edge exactly max; constant: bin 0."""
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo + np.arange(bins + 1, dtype=np.float64)
    edges = lo + (hi - lo) * (np.arange(bins + 1) / bins)
    edges[-1] = hi
    return edges


def ref_entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def ref_nmi(p: np.ndarray, q: np.ndarray, bins: int | None = None) -> float:
    """NMI from numpy.histogram2d; Sturges' bins by the textbook formula; 1 when H(P,Q) = 0."""
    n = p.size
    b = bins if bins is not None else int(np.ceil(np.log2(n))) + 1
    counts, _, _ = np.histogram2d(p, q, bins=[ref_edges(p, b), ref_edges(q, b)])
    assert counts.sum() == n  # every observation binned
    joint = counts / n
    h_pq = ref_entropy(joint.ravel())
    if h_pq == 0:
        return 1.0
    return (ref_entropy(joint.sum(1)) + ref_entropy(joint.sum(0)) - h_pq) / h_pq


def ref_abs_corr(p: np.ndarray, q: np.ndarray) -> float:
    flat_p, flat_q = p.min() == p.max(), q.min() == q.max()
    if flat_p and flat_q:
        return 1.0
    if flat_p or flat_q:
        return 0.0
    return float(abs(np.corrcoef(p, q)[0, 1]))


def ref_dependence(x: np.ndarray, kh: int, kw: int, bins=None, method="mi", dilation=(1, 1)) -> np.ndarray:
    """Plain loops: for each kernel entry and channel, gather the pixel pairs one by one, then average."""
    n, c, h, w = x.shape
    live = [ch for ch in range(c) if x[:, ch].min() != x[:, ch].max()]
    if not live:
        return np.ones((kh, kw))
    out = np.zeros((kh, kw))
    for i, j in itertools.product(range(kh), range(kw)):
        di, dj = dilation[0] * (i - kh // 2), dilation[1] * (j - kw // 2)
        values = []
        for ch in live:
            ps, qs = [], []
            for b, a0, a1 in itertools.product(range(n), range(h), range(w)):
                if 0 <= a0 + di < h and 0 <= a1 + dj < w:
                    ps.append(x[b, ch, a0, a1])
                    qs.append(x[b, ch, a0 + di, a1 + dj])
            if not ps:
                values.append(0.0)
            elif method == "mi":
                values.append(ref_nmi(np.array(ps), np.array(qs), bins))
            else:
                values.append(ref_abs_corr(np.array(ps), np.array(qs)))
        out[i, j] = np.mean(values)
    out[kh // 2, kw // 2] = 1.0
    return out


def ref_scaling(s: np.ndarray, k: float) -> np.ndarray:
    g = k * s / ((k - 1) * s + 1)
    return g / g.mean()


def features(seed: int, shape, kind: str = "smooth") -> torch.Tensor:
    """Continuous test maps: spatially smooth (correlated neighbours), white noise, or after a ReLU."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if kind == "smooth":
        x = x.cumsum(axis=-1).cumsum(axis=-2)
    elif kind == "relu":
        x = np.maximum(x.cumsum(axis=-1), 0.0)
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------------- code run from the docs
DOCS = Path(__file__).resolve().parents[1] / "docs"


def docs_python_blocks(page: str) -> list[str]:
    """The code blocks fenced as ```python in docs/<page> (blocks fenced otherwise, e.g. ```py, are not run)."""
    import re

    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def run_docs_page(page: str, first: int | None = None) -> dict:
    """Execute the ```python blocks of docs/<page> (the `first` ones only, when given) in order in one namespace;
    return the namespace."""
    namespace: dict = {"__name__": "docs_" + page.replace("/", "_").removesuffix(".md")}
    for i, block in enumerate(docs_python_blocks(page)[:first]):
        exec(compile(block, f"docs/{page} (python block {i})", "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------------- multi-process tests
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, outdir: str, timeout: float = 300) -> list[dict]:
    """Run `worker(rank, world, port, outdir)` in `world` spawned processes; return each rank's rank{r}.json."""
    import json
    import time

    import torch.multiprocessing as mp

    deadline = time.monotonic() + timeout
    for attempt in range(3):
        ctx = mp.start_processes(
            worker, args=(world, free_port(), outdir), nprocs=world, join=False, start_method="spawn"
        )
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"the {world}-process run did not finish in {timeout:.0f} s")
            break
        except mp.ProcessExitedException:
            # a process killed by a signal before it could report (gloo aborts when another process took the port
            # between free_port() and its bind): start again on a new port; a worker's own exception is not retried
            if attempt == 2:
                raise
    return [json.loads(Path(outdir, f"rank{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------------------- damaged files
def flip_tensor_byte(data: bytes) -> bytes:
    """`data` (a torch.save archive) with one bit flipped in the middle of its largest tensor's data (not the
    pickle): still a loadable file, whose numbers have changed; only the archive's CRC-32 tells."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    # a stored member's bytes follow its local header: 30 bytes, then the name and the extra field
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    out = bytearray(data)
    out[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    return bytes(out)
