"""The native kernel loader (`cdgrad._native`) under faults: damaged caches, read-only places, no compiler.

Whatever is in the cache, a process either loads a library that matches its manifest (size and SHA-256) or
rebuilds it once, or runs the reference path with a warning; it never crashes.  A damaged library can kill the
process that maps it (SIGBUS), so each scenario runs in a fresh Python process.  The kernel is compiled once per
module into a cache that each test copies.

Two probes: `LOADER_PROBE` loads `cdgrad/_native/__init__.py` on its own (no torch: fast) and checks the kernel
against the equations of method.md 1.1 and 1.2 in pure Python; `TORCH_PROBE` imports cdgrad and checks the public
functions against an FFT solve (method.md 1.2), counting the kernel's calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdgrad import _native

NATIVE_INIT = Path(_native.__file__)
HAS_COMPILER = (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")) is not None
TOLERANCE = 1e-12  # float64 against an independent solve

LOADER_PROBE = r"""
import importlib.util, json, sys, warnings
from array import array

spec = importlib.util.spec_from_file_location("cdgrad_native_probe", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = native.library()
report = {
    "native": lib is not None,
    "status": native.status() if hasattr(native, "status") else None,
    "warnings": [str(w.message) for w in caught],
    "error": None,
}
if lib is not None:
    # one float64 job of shape (1, N, M) per metric, against method.md 1.1 and the equation of 1.2
    N, M, lam = 6, 3, 0.7
    f = array("d", [((7 * i) % 13) / 4.0 - 1.5 for i in range(N * M)])
    errors = []
    for metric, inv in ((native.H0, 1.0 / lam), (native.SOBOLEV, 1.0 / (lam * N * N))):
        g = array("d", [0.0] * (N * M))
        jobs = native.Jobs()
        jobs.add(f.buffer_info()[0], g.buffer_info()[0], 1, N, M, inv, 0.0, metric, True)
        jobs.run(1)
        for m in range(M):
            fo = [f[o * M + m] for o in range(N)]
            go = [g[o * M + m] for o in range(N)]
            fbar, gbar = sum(fo) / N, sum(go) / N
            if metric == native.H0:  # g = fbar + (f - fbar) / lam
                errors += [go[o] - (fbar + (fo[o] - fbar) / lam) for o in range(N)]
            else:  # f[o] = mean(g) - lam N^2 (g[o+1] - 2 g[o] + g[o-1]), indices mod N
                errors += [gbar - lam * N * N * (go[(o + 1) % N] - 2 * go[o] + go[o - 1]) - fo[o] for o in range(N)]
    report["error"] = max(abs(e) for e in errors)
print(json.dumps(report))
"""

TORCH_PROBE = r"""
import json, math, warnings
import torch

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import cdgrad
    from cdgrad import _native

    lib = _native.library()
calls = []
run, run_one = _native.Jobs.run, getattr(_native, "run_one", None)
_native.Jobs.run = lambda self, threads: (calls.append(len(self)), run(self, threads))[1]
if run_one is not None:  # the pure functions' single-job call
    _native.run_one = lambda *args: (calls.append(1), run_one(*args))[1]
x = torch.randn(9, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
lam, O = 0.8, x.shape[0]
# method.md 1.2: multiplier 1 at frequency 0, 1 / (lam O^2 (2 - 2 cos(2 pi k / O))) elsewhere
k = torch.arange(1, O, dtype=torch.float64)
mult = torch.cat([torch.ones(1, dtype=torch.float64), 1 / (lam * O * O * (2 - 2 * torch.cos(2 * math.pi * k / O)))])
sobolev = torch.fft.ifft(torch.fft.fft(x, dim=0) * mult.view(-1, 1, 1, 1), dim=0).real
fbar = x.mean(0, keepdim=True)
h0 = fbar + (x - fbar) / lam  # method.md 1.1
error = max(
    (cdgrad.sobolev(x, lam) - sobolev).abs().max().item(), (cdgrad.reweighted_h0(x, lam) - h0).abs().max().item()
)
print(json.dumps({
    "native": lib is not None,
    "status": _native.status() if hasattr(_native, "status") else None,
    "warnings": [str(w.message) for w in caught],
    "error": error,
    "kernel_calls": len(calls),
}))
"""


def probe_env(cache: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "CDGRAD_NATIVE"}
    return {**base, "CDGRAD_CACHE": str(cache), **env}


def run_probe(cache: Path, *, torch_probe: bool = False, prefix: tuple[str, ...] = (), **env: str) -> dict:
    """Run a probe in a fresh process; it must exit normally and report as JSON."""
    command = [*prefix, sys.executable, "-c", TORCH_PROBE if torch_probe else LOADER_PROBE, str(NATIVE_INIT)]
    proc = subprocess.run(command, env=probe_env(cache, **env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the probe died (status {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def library_files(cache: Path) -> tuple[Path, Path]:
    """The cached library and its manifest (the manifest may be missing)."""
    [so] = (cache / "native").glob("kernels-*.so")
    return so, so.with_suffix(".json")


def assert_manifest_matches(cache: Path) -> None:
    so, manifest = library_files(cache)
    record = json.loads(manifest.read_text())
    data = so.read_bytes()
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()


def assert_native(report: dict) -> None:
    assert report["native"], report
    assert report["status"] == "native"
    assert report["error"] < TOLERANCE
    assert report.get("kernel_calls", 1) > 0  # the torch probe counts kernel calls


def assert_reference(report: dict, reason: str) -> None:
    assert not report["native"], report
    assert report["status"].startswith("reference (") and reason in report["status"], report["status"]
    if "kernel_calls" in report:  # the torch probe: the public functions computed it, right, without the kernel
        assert report["error"] < TOLERANCE
        assert report["kernel_calls"] == 0


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding one freshly built library."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    cache = tmp_path_factory.mktemp("built-cache")
    assert_native(run_probe(cache))
    return cache


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    return copy


@pytest.fixture
def read_only(tmp_path: Path):
    """make(folder) -> command prefix under which `folder` cannot be written (root ignores permission bits)."""
    restore: list[Path] = []

    def make(folder: Path) -> tuple[str, ...]:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            restore.append(folder)
            return ()
        prefix = ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(folder))
        check = subprocess.run([*prefix, "sh", "-c", '! touch "$0/.probe" 2>/dev/null', str(folder)], check=False)
        if check.returncode != 0:
            pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
        return prefix

    yield make
    for folder in restore:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------- a clean build
def test_build_publishes_a_library_with_a_matching_manifest(built):
    assert_manifest_matches(built)
    leftovers = [p.name for p in (built / "native").iterdir() if p.suffix not in (".so", ".json", ".lock")]
    assert leftovers == []


def test_status_names_the_path_that_runs(monkeypatch):
    assert (_native.status() == "native") == (_native.library() is not None)
    monkeypatch.setattr(_native, "library", lambda: None)
    assert _native.status().startswith("reference (")


def test_kernel_results_do_not_depend_on_the_thread_count():
    """Each column is computed by one thread in a fixed order: 1 and 2 threads agree bit for bit (lists large
    enough for the kernel to split them over threads: 2^22 elements for H0 and Sobolev, whose work counts 1/16 of
    the Laplacian's; float32 and float64, every metric and direction)."""
    import torch

    from cdgrad import functional as F

    if _native.library() is None:
        pytest.skip("no native kernel here: only the reference path exists")
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.float64):
            grads = [torch.randn(512, 512, 4, 4, generator=gen, dtype=dtype), torch.randn(7, 3000, dtype=dtype)]
            for metric, dim in (("sobolev", 0), ("sobolev", None), ("h0", 1), ("laplacian", 0)):
                outs = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    work = [g.clone() for g in grads]
                    if metric == "laplacian":
                        F.laplacian_smooth_(work, 0.7, dim)
                    else:
                        F.channel_directed_(work, metric, 0.9, 0.1, dim)
                    outs.append(work)
                assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True)), (dtype, metric, dim)
                assert not torch.equal(outs[0][0], grads[0])
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- damaged caches
def test_truncated_library_is_rebuilt_not_loaded(cache):
    """A build cut short (half the file): the process survives, rebuilds once, and computes the right numbers."""
    so, _ = library_files(cache)
    size = so.stat().st_size
    with open(so, "r+b") as fh:
        fh.truncate(size // 2)
    report = run_probe(cache, torch_probe=True)
    assert_native(report)
    assert len(report["warnings"]) == 1 and str(so) in report["warnings"][0], report["warnings"]
    assert so.stat().st_size == size
    assert_manifest_matches(cache)
    assert_native(run_probe(cache))  # and the next process loads the rebuilt one without a word
    assert run_probe(cache)["warnings"] == []


@pytest.mark.parametrize("damage", ["garbage manifest", "tampered library", "missing manifest"])
def test_library_that_does_not_match_its_manifest_is_rebuilt(cache, damage):
    so, manifest = library_files(cache)
    if damage == "garbage manifest":
        manifest.write_bytes(b"\x00{not json")
    elif damage == "tampered library":  # same size, other bytes: only the hash tells
        data = bytearray(so.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        so.write_bytes(bytes(data))
    else:
        manifest.unlink()
    damaged = so.read_bytes()
    report = run_probe(cache)
    assert_native(report)
    assert_manifest_matches(cache)
    if damage == "missing manifest":  # as an older version or a power cut between the two renames leaves it
        assert report["warnings"] == []
    else:
        assert len(report["warnings"]) == 1 and str(so) in report["warnings"][0], report["warnings"]
    if damage == "tampered library":
        assert so.read_bytes() != damaged


# ---------------------------------------------------------------------------------------------- read-only places
def test_read_only_cache_with_a_valid_library_is_used_as_it_is(cache, read_only):
    before = snapshot(cache)
    report = run_probe(cache, prefix=read_only(cache / "native"))
    assert_native(report)
    assert report["warnings"] == []
    assert snapshot(cache) == before


def test_read_only_cache_with_a_damaged_library_builds_privately(cache, read_only, tmp_path):
    so, _ = library_files(cache)
    with open(so, "r+b") as fh:
        fh.truncate(so.stat().st_size // 2)
    before = snapshot(cache)
    private = tmp_path / "tmp"
    private.mkdir()
    report = run_probe(cache, prefix=read_only(cache / "native"), TMPDIR=str(private))
    assert_native(report)
    assert len(report["warnings"]) == 1 and str(cache / "native") in report["warnings"][0], report["warnings"]
    assert snapshot(cache) == before  # nothing written where it could not be
    assert list(private.iterdir()) == []  # the private build is removed once loaded


def test_read_only_package_folder_builds_into_the_cache(read_only, tmp_path):
    """An installed package in a read-only site-packages: the kernel is built in the cache, never beside the
    package, and the package folder is left as it was."""
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    package = NATIVE_INIT.parent.parent
    before = snapshot(package)
    report = run_probe(tmp_path / "fresh-cache", torch_probe=True, prefix=read_only(package))
    assert_native(report)
    assert report["warnings"] == [], report["warnings"]
    assert list((tmp_path / "fresh-cache" / "native").glob("kernels-*.so"))
    assert snapshot(package) == before


def test_cache_path_that_cannot_be_a_folder_builds_privately(tmp_path):
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    private = tmp_path / "tmp"
    private.mkdir()
    report = run_probe(blocker / "cache", TMPDIR=str(private))
    assert_native(report)
    assert len(report["warnings"]) == 1 and "cannot write" in report["warnings"][0], report["warnings"]
    assert blocker.read_text() == "not a folder"
    assert list(private.iterdir()) == []


# ---------------------------------------------------------------------------------------------- no native path
def test_no_compiler_runs_the_reference_path_silently(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    report = run_probe(tmp_path / "cache", torch_probe=True, CC=str(tmp_path / "no-such-cc"), PATH=str(empty))
    assert_reference(report, "no C compiler")
    assert report["warnings"] == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["0", "off", " False "])
def test_disabled_by_environment(cache, value):
    before = snapshot(cache)
    report = run_probe(cache, torch_probe=value == "0", CDGRAD_NATIVE=value)
    assert_reference(report, "CDGRAD_NATIVE")
    assert report["warnings"] == []
    assert snapshot(cache) == before


def test_failing_compiler_warns_naming_the_file_and_falls_back(tmp_path):
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program to stand in for a broken compiler")
    report = run_probe(tmp_path / "cache", torch_probe=True, CC=failing)
    assert_reference(report, "build")
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "unavailable" in report["warnings"][0] and str(tmp_path / "cache" / "native") in report["warnings"][0]


def test_damaged_library_whose_rebuild_fails_falls_back_naming_the_file(tmp_path):
    """The compiler that built the cache (same path, so the same cache key) now fails: reference path, a warning."""
    real = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    compiler, cache = tmp_path / "cc", tmp_path / "cache"
    compiler.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    compiler.chmod(0o755)
    assert_native(run_probe(cache, CC=str(compiler)))
    so, _ = library_files(cache)
    with open(so, "r+b") as fh:
        fh.truncate(so.stat().st_size // 2)
    compiler.write_text("#!/bin/sh\necho 'cc: out of disk space' >&2\nexit 1\n")
    report = run_probe(cache, torch_probe=True, CC=str(compiler))
    assert_reference(report, "build")
    assert len(report["warnings"]) == 1 and str(so) in report["warnings"][0], report["warnings"]
    assert "out of disk space" in report["warnings"][0]


# ---------------------------------------------------------------------------------------------- concurrency, kills
def test_processes_building_at_once_all_load_a_complete_library(tmp_path):
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", LOADER_PROBE, str(NATIVE_INIT)]
    procs = [
        subprocess.Popen(command, env=probe_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert_native(report)
        assert report["warnings"] == []
    assert_manifest_matches(cache)
    assert sorted(p.suffix for p in (cache / "native").iterdir()) == [".json", ".lock", ".so"]


def test_build_killed_midway_leaves_nothing_that_breaks_the_next_process(tmp_path):
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", LOADER_PROBE, str(NATIVE_INIT)]
    proc = subprocess.Popen(
        command, env=probe_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not any(p.is_dir() for p in (cache / "native").glob("*")):  # the compiler is running
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the probe and its compiler
    proc.wait(timeout=60)
    report = run_probe(cache)
    assert_native(report)
    assert_manifest_matches(cache)
    assert [p.name for p in (cache / "native").iterdir() if p.is_dir()] == []  # the killed build's folder is gone


# ---------------------------------------------------------------------------------------------- what is mapped
SURVIVOR_PROBE = r"""
import importlib.util, json, sys
from array import array

spec = importlib.util.spec_from_file_location("cdgrad_native_probe", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
assert native.library() is not None
print("loaded", flush=True)
sys.stdin.readline()  # meanwhile the published library is written over in place
N, M, lam = 6, 3, 0.7
f = array("d", [((7 * i) % 13) / 4.0 - 1.5 for i in range(N * M)])
g = array("d", [0.0] * (N * M))
jobs = native.Jobs()
jobs.add(f.buffer_info()[0], g.buffer_info()[0], 1, N, M, 1.0 / lam, 0.0, native.H0, True)
jobs.run(1)
errors = []
for m in range(M):
    fo = [f[o * M + m] for o in range(N)]
    fbar = sum(fo) / N
    errors += [g[o * M + m] - (fbar + (fo[o] - fbar) / lam) for o in range(N)]
print(json.dumps({"error": max(abs(e) for e in errors)}))
"""


@pytest.mark.parametrize("damage", ["truncated in place", "overwritten in place", "rebuilt"])
def test_a_process_with_the_kernel_loaded_survives_its_library_being_rewritten(cache, damage):
    """The loaded code is a private copy of the checked bytes: writing over, truncating or rebuilding the
    published file while a process runs the kernel cannot reach that process (it would die of SIGBUS)."""
    so, manifest = library_files(cache)
    proc = subprocess.Popen(
        [sys.executable, "-c", SURVIVOR_PROBE, str(NATIVE_INIT)],
        env=probe_env(cache),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "loaded"
        if damage == "truncated in place":
            with open(so, "r+b") as fh:
                fh.truncate(0)
        elif damage == "overwritten in place":
            with open(so, "r+b") as fh:
                fh.write(b"\xff" * so.stat().st_size)
        else:  # a later build publishes a new file under the same name
            manifest.unlink()
            assert_native(run_probe(cache))
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"the process died (status {proc.returncode}): {err[-3000:]}"
    assert json.loads(out.strip().splitlines()[-1])["error"] < TOLERANCE


def test_loading_writes_nothing_over_the_published_library_and_leaves_no_copy(cache):
    so, _ = library_files(cache)
    before = so.stat()
    assert_native(run_probe(cache, torch_probe=True))
    after = so.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert sorted(p.suffix for p in (cache / "native").iterdir()) == [".json", ".lock", ".so"]


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_cache_variable_means_the_default_cache_not_the_current_folder(tmp_path, value):
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: only the reference path exists")
    home, workdir = tmp_path / "home", tmp_path / "work"
    workdir.mkdir()
    command = [sys.executable, "-c", LOADER_PROBE, str(NATIVE_INIT)]
    env = {**probe_env(tmp_path / "unused"), "CDGRAD_CACHE": value, "HOME": str(home)}
    proc = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_native(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert list(workdir.iterdir()) == []  # nothing built into ./native
    assert list((home / ".cache" / "cdgrad" / "native").glob("kernels-*.so"))
