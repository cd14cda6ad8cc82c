"""Why a results store, or one of its rows, cannot be used.

A store: a full disk, a corrupt file, or a folder that cannot be written. SQLite reports all three as
`sqlite3.DatabaseError`s and the file system as `OSError`s; `store_error` turns those it recognises into one
`StoreError` whose message names the cause, the place and what to do (`named_causes` does it for a store method).
A row: `final_problem` says why a stored run's final metrics cannot be reported.
"""

from __future__ import annotations

import errno
import functools
import math
import sqlite3
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["CAUSES", "STATUSES", "StoreError", "cause_of", "final_problem", "named_causes", "store_error"]

STATUSES = ("completed", "diverged")

CAUSES = ("disk full", "corrupt", "not writable")

_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk full",
    errno.EACCES: "not writable",
    errno.EPERM: "not writable",
    errno.EROFS: "not writable",
}
_SQLITE = {  # SQLite's primary result codes (stable, https://sqlite.org/rescode.html)
    13: "disk full",  # SQLITE_FULL
    11: "corrupt",  # SQLITE_CORRUPT
    26: "corrupt",  # SQLITE_NOTADB
    8: "not writable",  # SQLITE_READONLY
    14: "not writable",  # SQLITE_CANTOPEN
    3: "not writable",  # SQLITE_PERM
}
_SQLITE_MESSAGES = {  # an error built without a result code
    "database or disk is full": "disk full",
    "file is not a database": "corrupt",
    "database disk image is malformed": "corrupt",
    "attempt to write a readonly database": "not writable",
    "unable to open database file": "not writable",
}


class StoreError(OSError, ValueError):
    """A results store that cannot be used; `cause` is one of `CAUSES`.

    An `OSError` (the disk or folder) that is also a `ValueError` (a `--results` folder the user must change).
    """

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def cause_of(exc: BaseException) -> str | None:
    """The cause of a file-system or SQLite error, one of `CAUSES`, or None when it is none of them."""
    if isinstance(exc, StoreError):
        return exc.cause
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and (code & 0xFF) in _SQLITE:
            return _SQLITE[code & 0xFF]  # the primary result code of an extended one
        text = str(exc).lower()
        return next((cause for message, cause in _SQLITE_MESSAGES.items() if message in text), None)
    if isinstance(exc, OSError):
        return _ERRNOS.get(exc.errno) if exc.errno is not None else None
    return None


def store_error(exc: BaseException, root: str, path: str, default: str | None = None) -> StoreError | None:
    """A `StoreError` naming why the store `path` in the folder `root` failed with `exc` (or `default` where
    `exc` has none of `CAUSES`); None when the cause is unknown and there is no default."""
    if isinstance(exc, StoreError):
        return exc
    cause = cause_of(exc) or default
    if cause == "disk full":
        message = (
            f"no space left on the device that holds the results folder {root!r} ({exc}): free some space, or pass "
            "another folder with --results, and run the same command again; stored runs are kept and an "
            "unfinished run resumes from its last checkpoint"
        )
    elif cause == "corrupt":
        message = (
            f"the results store {path!r} is corrupt ({exc}): move results.sqlite aside (its runs are then no "
            "longer seen) or pass another folder with --results"
        )
    elif cause == "not writable":
        message = f"results folder {root!r} is not writable ({exc}); pass a writable folder with --results"
    else:
        return None
    return StoreError(message, cause)


P = ParamSpec("P")
T = TypeVar("T")


def named_causes(method: Callable[P, T]) -> Callable[P, T]:
    """Re-raise a file-system or SQLite error of a store method (its first argument the store, with `root` and
    `path`) as a `StoreError` naming its cause; errors of no known cause pass unchanged."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (OSError, sqlite3.Error) as exc:
            store: Any = args[0]
            named = store_error(exc, str(store.root), str(store.path))
            if named is None or named is exc:
                raise
            raise named from exc

    return wrapper


def final_problem(config: Any, status: str, final: dict[str, Any]) -> str | None:
    """Why a stored run's `final` cannot be reported (None if it can): its `status` must be one of `STATUSES`, and
    each metric the report reads (the primary and `report` metrics of `config.task`) a number, finite in a
    completed run."""
    from cdgrad.experiments.tasks import get_task

    if status not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {status!r}"
    task = get_task(config.task)
    for name in (task.primary.name, *task.report):
        if name not in final:
            return f"its final metrics lack {name!r}"
        value = final[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"its final {name!r} is {value!r}, not a number"
        if status == "completed" and not math.isfinite(value):
            return f"its final {name!r} is {value!r} in a completed run"
    return None
