"""Tests of cdgrad.experiments.data.formats: IDX, gzip with a size cap, CIFAR-10 pickles and archives."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdgrad.experiments.data import formats as FM
from helpers import (
    CIFAR_BATCHES,
    IDX_CODES,
    cifar_batch_dict,
    cifar_payloads,
    expected_cifar,
    idx_bytes,
    pickled,
    write_cifar_tar,
)

HYP = settings(max_examples=30, deadline=None)


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
def test_idx_round_trip(dtype, shape, gz, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    buf = idx_bytes(arr)
    assert FM.idx_size(buf) == len(buf)
    content = FM.gunzip_idx(gzip.compress(buf), "x.gz") if gz else buf
    out = FM.parse_idx(content, "x")
    assert out.dtype == dtype and out.dtype.isnative and out.shape == tuple(shape)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "dtype code"),
        (lambda b: b[:-1], "size mismatch"),
        (lambda b: b + b"\x00", "size mismatch"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:3], "too short"),
        (lambda b: b[:3] + b"\x00" + b[4:], "0 dimensions"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_buffer_names_its_source(mutate, message, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    buf = mutate(idx_bytes(arr))
    with pytest.raises(FM.DatasetFormatError, match=message) as info:
        FM.parse_idx(FM.gunzip_idx(gzip.compress(buf), "src-name") if gz else buf, "src-name")
    assert "src-name" in str(info.value)


def test_idx_size_of_headers():
    assert FM.idx_size(bytes([0, 0, 0x08, 1]) + (7).to_bytes(4, "big")) == 8 + 7
    assert FM.idx_size(bytes([0, 0, 0x0E, 2]) + (3).to_bytes(4, "big") + (5).to_bytes(4, "big")) == 12 + 3 * 5 * 8
    for bad in (
        b"",
        b"\x00\x00\x08",
        b"\x01\x00\x08\x01" + bytes(4),
        b"\x00\x00\x07\x01" + bytes(4),
        b"\x00\x00\x08\x02",
    ):
        assert FM.idx_size(bad) is None


# ----------------------------------------------------------------------------------------------------------
# gzip with a cap
# ----------------------------------------------------------------------------------------------------------


class CountingStream(FM.GzipStream):
    """A GzipStream that records the largest size it ever held decompressed in one read."""

    largest = 0

    def read(self, n):
        out = super().read(n)
        CountingStream.largest = max(CountingStream.largest, len(out))
        return out


def test_gzip_bomb_is_refused_without_inflating_it(monkeypatch):
    """An IDX header declaring 10 bytes, followed by 64 MiB of zeros that compress to ~64 KiB."""
    header = bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big")
    bomb = gzip.compress(header + bytes(64 << 20), compresslevel=9)
    assert len(bomb) < 1 << 17
    monkeypatch.setattr(FM, "GzipStream", CountingStream)
    CountingStream.largest = 0
    with pytest.raises(FM.DatasetFormatError, match=r"bomb.gz: IDX size mismatch.*beyond the 18 bytes"):
        FM.gunzip_idx(bomb, "bomb.gz")
    assert CountingStream.largest <= 18  # never more than the header's size decompressed
    with pytest.raises(FM.DatasetFormatError, match="exceeds 1000 bytes"):
        FM.gunzip(bomb, "bomb.gz", 1000)


def test_header_declaring_more_than_deflate_can_hold_is_refused_up_front():
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28))
    tiny = gzip.compress(header + bytes(100))
    with pytest.raises(FM.DatasetFormatError, match="more than .* gzipped bytes can hold"):
        FM.gunzip_idx(tiny, "t.gz")


@HYP
@given(payload=st.binary(max_size=3000), members=st.integers(1, 3), padding=st.integers(0, 3), seed=st.integers(0, 9))
def test_gzip_stream_matches_gzip_decompress(payload, members, padding, seed):
    parts = [payload[i::members] for i in range(members)]
    raw = b"".join(gzip.compress(p, compresslevel=seed) for p in parts) + bytes(padding)
    expected = gzip.decompress(raw)
    assert FM.gunzip(raw, "s", len(expected)) == expected
    stream = FM.GzipStream(raw, "s")
    pieces = []
    while chunk := stream.read(1 + seed * 37):
        pieces.append(chunk)
    assert b"".join(pieces) == expected


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-12], "ends before the end-of-stream marker"),  # inside the deflate data
        (lambda b: b[:-4], "ends before the end-of-stream marker"),  # inside the trailer
        (lambda b: b[:-8] + bytes(8), "incorrect data check"),  # CRC and length zeroed
        (lambda b: b + b"junk", "trailing bytes"),
    ],
)
def test_corrupt_gzip_names_the_source(mutate, message):
    raw = mutate(gzip.compress(bytes(range(256)) * 40))
    with pytest.raises(FM.DatasetFormatError, match=rf"src-name: corrupt or truncated gzip file \(.*{message}"):
        FM.gunzip(raw, "src-name", 1 << 20)
    with pytest.raises((OSError, EOFError, zlib.error)):  # the standard library agrees that it is broken
        gzip.decompress(raw)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------------------


def test_cifar_batch_layout():
    payload = cifar_batch_dict(5, 3)
    x, y = FM.read_cifar_batch(pickle.dumps(payload, protocol=2), "b")
    ref = expected_cifar({b: payload for b in CIFAR_BATCHES})
    np.testing.assert_array_equal(x, ref[2])
    np.testing.assert_array_equal(y, ref[3])
    assert x.dtype == np.uint8 and y.dtype == np.int64


def test_cifar_str_keys_and_protocol_4():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    blob = pickle.dumps({"data": data, "labels": [1, 2, 3]}, protocol=4)
    x, y = FM.read_cifar_batch(blob, "b")
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
    with pytest.raises(FM.UnsafePickleError, match=r"evil_batch.*refusing.*system") as info:
        FM.read_cifar_batch(blob, tmp_path / "evil_batch")
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
    with pytest.raises(FM.UnsafePickleError, match="src-name: refusing to load global"):
        FM.read_cifar_batch(blob, "src-name")


def test_codecs_encode_only_latin1():
    """``_codecs.encode`` is admitted (protocol-2 bytes) but only with the latin-1 codec."""
    ok = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R."
    assert FM.RestrictedUnpickler(io.BytesIO(ok), "s").load() == b"abc"
    bad = ok.replace(b"X\x06\x00\x00\x00latin1", b"X\x05\x00\x00\x00rot13")
    with pytest.raises(FM.DatasetFormatError, match="src-name.*rot13"):
        FM.read_cifar_batch(bad, "src-name")


def test_corrupt_batches():
    blobs = pickled(cifar_payloads(2))
    with pytest.raises(FM.DatasetFormatError, match="b1.*not a readable"):
        FM.read_cifar_batch(blobs["data_batch_1"][:-20], "b1")
    bad = cifar_batch_dict(3, 0)
    bad[b"data"] = bad[b"data"][:, :100]
    with pytest.raises(FM.DatasetFormatError, match=r"b2.*\(n, 3072\)"):
        FM.read_cifar_batch(pickle.dumps(bad, protocol=2), "b2")
    bad = cifar_batch_dict(3, 0)
    bad[b"labels"] = [0, 1]
    with pytest.raises(FM.DatasetFormatError, match="b3.*3 images"):
        FM.read_cifar_batch(pickle.dumps(bad, protocol=2), "b3")
    bad = cifar_batch_dict(3, 0)
    bad[b"labels"] = [0, 1, 10]
    with pytest.raises(FM.DatasetFormatError, match=r"b4.*\[0, 10\)"):
        FM.read_cifar_batch(pickle.dumps(bad, protocol=2), "b4")


def test_archive_members_are_read_in_memory(tmp_path):
    blobs = pickled(cifar_payloads(2))
    archive = write_cifar_tar(tmp_path / "a.tar.gz", blobs)
    wanted = [f"cifar-10-batches-py/{b}" for b in ("data_batch_2", "test_batch", "no_such_member")]
    got = FM.read_cifar_archive(archive.read_bytes(), archive, wanted)
    assert got == {wanted[0]: blobs["data_batch_2"], wanted[1]: blobs["test_batch"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz"]  # nothing extracted


def test_archive_member_larger_than_a_batch_is_refused(tmp_path):
    """A tar header declaring a 100 MB batch is refused before the member is read."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 100_000_000
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(FM.DatasetFormatError, match=r"big.tar.gz:cifar-10-batches-py/data_batch_1: 100000000 bytes"):
        FM.read_cifar_archive(raw.getvalue(), "big.tar.gz", ["cifar-10-batches-py/data_batch_1"])


def test_truncated_archive_names_it(tmp_path):
    archive = write_cifar_tar(tmp_path / "a.tar.gz", pickled(cifar_payloads(2)))
    raw = archive.read_bytes()
    with pytest.raises(FM.DatasetFormatError, match="a.tar.gz: corrupt or truncated tar archive"):
        FM.read_cifar_archive(raw[: len(raw) // 2], archive, [f"cifar-10-batches-py/{b}" for b in CIFAR_BATCHES])
