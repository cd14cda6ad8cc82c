"""What a run's numbers may depend on besides its config: library versions, platform, thread count, kernel path,
device and the git commit of the source (`environment`), stored with every run."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from cdgrad.experiments.config import RunConfig

__all__ = ["environment", "git_revision", "kernel_path", "source_revision"]


@functools.lru_cache(maxsize=1)
def source_revision() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout the `cdgrad` package runs from; (None, None) outside a checkout.

    Read once per process (the code a process runs is the code it imported).
    """
    import cdgrad

    return git_revision(Path(cdgrad.__file__).resolve().parent)


def git_revision(package: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git checkout that tracks `package/__init__.py`; (None, None) if none does.

    `dirty` counts tracked and untracked (not ignored) changes anywhere in the checkout.
    """

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", "__init__.py")  # the package itself is part of the checkout
    if tracked is None or tracked.returncode != 0:
        return None, None
    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    if head is None or status is None or head.returncode != 0 or status.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def kernel_path(device: str) -> str:
    """ "native" when the compiled CPU kernel is available and the run is on the CPU, else "reference"."""
    from cdgrad.functional import plain_route

    return plain_route(device)


def environment(config: RunConfig | None = None) -> dict[str, Any]:
    """What the numbers may depend on besides the config: versions, platform, threads, kernel path, device, commit.

    `threads` is the intra-op thread count the run trains with (`config.threads`, or torch's when that is 0);
    `kernel` is the path the channel-directed transforms take; the two change results at round-off.
    """
    import numpy

    device = config.device if config is not None else "cpu"
    commit, dirty = source_revision()
    env = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": (config.threads if config is not None else 0) or torch.get_num_threads(),
        "kernel": kernel_path(device),
        "device": device,
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env
