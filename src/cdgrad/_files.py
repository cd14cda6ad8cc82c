"""Durable file publication shared by the kernel cache and the experiment toolkit.

A file is published by writing it under a temporary name, flushing it to disk (`fsync_file`), renaming it over
its final name and flushing the folder (`replace_durably`): after a crash or power cut the final name holds
either the previous complete file or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = ["fsync_dir", "fsync_file", "replace_durably", "torch_save_durably", "write_durably"]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush the contents of the file at `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush `folder`'s entries (a rename inside it) to disk; a no-op where folders cannot be opened or fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the (already fsynced) file `tmp` over `path`, then fsync the folder that holds `path`."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_durably(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Publish a file at `path` atomically and durably: `write(fh)` fills a temporary file, which is fsynced and
    renamed over `path` (then the folder is fsynced); on any error the temporary file is removed."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def torch_save_durably(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save(obj)` to `path` through `write_durably`."""
    import torch

    write_durably(path, lambda fh: torch.save(obj, fh))
