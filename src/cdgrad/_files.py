"""Durable file publication shared by the kernel cache and the experiment toolkit.

A file is published by writing it under a temporary name, flushing it to disk (`fsync_file`), renaming it over
its final name and flushing the folder (`replace_durably`): after a crash or power cut the final name holds
either the previous complete file or the new one.
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "fsync_file", "replace_durably"]


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
