"""Run locks of one machine: a process trains a run only while it holds the run's lock.

A lock is an exclusive `flock` on `<results>/locks/<key>.lock`, taken without waiting. The kernel releases it when
its holder exits, however it exits (kill -9 included), so a run whose trainer died is free again at once, and no
process id, start time or heartbeat is ever compared. The file holds the holder's process id and host name for
messages only. `flock` is reliable between processes of one machine (the inline runner and the local worker pool);
jobs on a cluster do not rely on it: there the scheduler's queue and the per-run record files decide
(`cdgrad.experiments.executors`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RunLock", "coordinator_lock", "holder", "lock_path"]


def lock_path(root: str, key: str) -> str:
    return os.path.join(root, "locks", f"{key}.lock")


class RunLock:
    """The lock of run `key` in results folder `root`; `acquire()` is True when this process now holds it."""

    def __init__(self, root: str, key: str):
        self.path = lock_path(root, key)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False if another open lock (any process, this one included) holds it;
        OSError where the filesystem has no working locks."""
        if self._fd is not None:
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False  # held
            raise  # locks do not work here (e.g. ENOLCK on a network filesystem without a lock manager)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Let the lock go (the file stays: removing it could race with a process about to lock it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(root: str, key: str) -> str | None:
    """'pid N on HOST' of the process holding run `key`'s lock, 'another process' if unknown, None if free
    (the lock file is only read: this works on a read-only results folder)."""
    try:
        fd = os.open(lock_path(root, key), os.O_RDONLY)
    except OSError:
        return None  # no lock file: never locked
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        try:
            pid, host = os.read(fd, 4096).decode().split()
            return f"pid {int(pid)} on {host}"
        except (OSError, ValueError, UnicodeDecodeError):
            return "another process"
    finally:
        os.close(fd)


@contextmanager
def coordinator_lock(root: str, timeout_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold `<root>/locks/coordinator.lock` (one process at a time decides what to submit); TimeoutError naming
    the holder if it is not free within `timeout_s` seconds."""
    lock = RunLock(root, "coordinator")
    deadline = time.monotonic() + timeout_s
    while not lock.acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"another cdgrad command ({holder(root, 'coordinator')}) has been submitting runs of results folder "
                f"{root!r} for over {timeout_s:.0f} s; try again once it is done"
            )
        time.sleep(poll_s)
    try:
        yield
    finally:
        lock.release()
