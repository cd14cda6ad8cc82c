"""Checkpoints of unfinished runs: durable atomic writes, checked reads, corrupt files set aside, orphans removed.

A checkpoint is written to `<path>.tmp<pid>`, flushed to disk (fsync), renamed over `<path>` and the folder is
fsynced, so after a crash or power cut `<path>` is either the previous complete checkpoint or the new one.
`read_checkpoint` first checks every member of the file against the CRC-32 its zip archive records
(`verify_archive`: one flipped byte is found), then loads with `weights_only=True` (no code runs) and checks that the
file holds a checkpoint of this very run; a file that is damaged, cannot be read or lacks what a checkpoint holds
raises `CorruptCheckpointError`, and one of another run or world size `ForeignCheckpointError`. `resume_state` sets
either aside (`set_aside` renames it to `<path>.corrupt-<timestamp>`) so that the run starts afresh instead of
failing on every retry. A write that fails for want of space raises `CheckpointWriteError` naming the disk and the
file. `remove_orphans` deletes the temporary files of writers that were killed.

A checkpoint also records the run's segments, `[{"epochs", "kernel", "threads"}, ...]`: how many epochs ran in a
row on one kernel path and thread count (`add_epoch`), so that a run resumed with other settings says so.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
import zipfile
from typing import IO, Any

import torch

from cdgrad._files import fsync_dir, torch_save_durably
from cdgrad.experiments.config import RunConfig, from_dict, identity_dict, to_dict
from cdgrad.experiments.tasks import TASKS
from cdgrad.experiments.tasks.base import BASE_CURVES

__all__ = [
    "CURVES",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "ForeignCheckpointError",
    "add_epoch",
    "read_checkpoint",
    "remove_orphans",
    "resume_state",
    "run_entries",
    "save_checkpoint",
    "segments_of",
    "set_aside",
    "verify_archive",
]

CURVES = BASE_CURVES  # the curves of a classification run; a task declares its own (`Task.curves`)
ORPHAN_AGE_S = 3600.0  # a temporary file this old is an orphan whoever wrote it
_TMP = re.compile(r"(?:\.tmp|^\.probe)(\d+)$")  # `<name>.tmp<pid>`, and the results folder's write probe


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not hold what a checkpoint holds; the message names it."""


class ForeignCheckpointError(ValueError):
    """A valid checkpoint of another run or world size; `reason` says which, the message also what to do."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (`errno` ENOSPC for a full disk); the message names the file and
    the cause. The previous checkpoint, if any, is left as it was."""


def run_entries(
    config: RunConfig, seed: int, epoch: int, elapsed: float, world: int, curves: dict[str, list[Any]]
) -> dict[str, Any]:
    """The entries every checkpoint holds beside the run's own state: its config, seed, epoch, elapsed time,
    world size, curves and torch's global random state."""
    return {
        "config": to_dict(config),
        "seed": seed,
        "epoch": epoch,
        "elapsed": elapsed,
        "world_size": world,
        "curves": curves,
        "torch_rng": torch.get_rng_state(),
    }


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically and durably (temporary file, fsync, rename, fsync of the folder).

    A failed write raises `CheckpointWriteError` naming `path` and the cause (torch reports a file that cannot grow
    as "enforce fail ... unexpected pos"; the error of the disk behind it is named instead); `path` keeps its
    previous checkpoint and no temporary file is left.
    """
    try:
        torch_save_durably(state, path)
    except (OSError, RuntimeError) as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            message = (
                f"no space left on the device that holds the checkpoint {path} ({cause.strerror or cause}): free "
                "some space and run the same command again; the run resumes from its last complete checkpoint"
            )
        else:
            message = f"cannot write the checkpoint {path} ({cause.strerror or cause})"
        error = CheckpointWriteError(message)
        error.errno = cause.errno
        raise error from exc


def _os_error(exc: BaseException) -> OSError | None:
    """The `OSError` that `exc` is or that caused it (torch wraps a failed write of its file in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# ------------------------------------------------------------------------------------------------ segments
def segments_of(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The segments a checkpoint records (a copy); a checkpoint written before they were recorded gives one
    segment of its epochs with kernel and threads None (not recorded); no checkpoint gives []."""
    if state is None:
        return []
    if "segments" not in state:
        return [{"epochs": state["epoch"], "kernel": None, "threads": None}]
    return [dict(s) for s in state["segments"]]


def add_epoch(segments: list[dict[str, Any]], kernel: str, threads: int) -> None:
    """Count one more epoch run on `kernel` with `threads` threads: the last segment grows when its settings are
    these, a new segment starts otherwise."""
    if segments and (segments[-1]["kernel"], segments[-1]["threads"]) == (kernel, threads):
        segments[-1]["epochs"] += 1
    else:
        segments.append({"epochs": 1, "kernel": kernel, "threads": threads})


def _segments_problem(state: dict[str, Any]) -> str | None:
    """Why the optional `segments` entry of a checkpoint is unusable (None if absent or usable)."""
    if "segments" not in state:
        return None
    segments = state["segments"]
    fields = {"epochs": int, "kernel": str, "threads": int}
    if not isinstance(segments, list) or not all(
        isinstance(s, dict)
        and set(s) == set(fields)
        and all(s[k] is None or isinstance(s[k], t) for k, t in fields.items())
        and isinstance(s["epochs"], int)
        and s["epochs"] >= 1
        for s in segments
    ):
        return "entry 'segments' is not a list of {epochs, kernel, threads}"
    if sum(s["epochs"] for s in segments) != state["epoch"]:
        return f"its segments do not add up to epoch {state['epoch']}"
    return None


# --------------------------------------------------------------------------------------------------- reads
def _check_structure(path: str, state: Any) -> dict[str, Any]:
    """`state` if it has every entry a checkpoint holds, with the right types; CorruptCheckpointError otherwise."""

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {path} is not a valid checkpoint ({what})")

    if not isinstance(state, dict):
        raise bad(f"holds a {type(state).__name__}, not a dict")
    for key, kind in (
        ("config", dict),
        ("seed", int),
        ("epoch", int),
        ("elapsed", float),
        ("model", dict),
        ("optimizer", dict),
        ("scheduler", dict),
        ("method", dict),
        ("torch_rng", torch.Tensor),
        ("generator", torch.Tensor),
        ("curves", dict),
    ):
        if not isinstance(state.get(key), kind):
            raise bad(f"entry {key!r} missing or not a {kind.__name__}")
    curves = state["curves"]
    task = state["config"].get("task", "classification")
    keys = TASKS[task].curves if task in TASKS else CURVES
    if any(not isinstance(curves.get(k), list) for k in keys):
        raise bad("curves incomplete")
    epoch = state["epoch"]
    if epoch < 1 or any(len(curves[k]) != epoch for k in keys if not k.startswith("test_")):
        raise bad(f"epoch {epoch} does not match the curves")
    problem = _segments_problem(state)
    if problem is not None:
        raise bad(problem)
    return state


def verify_archive(path: str) -> None:
    """Check that `path` is a zip archive (the format of `torch.save`) whose every member matches the CRC-32 the
    archive records for it; `CorruptCheckpointError` naming the file and the damaged member otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as exc:  # BadZipFile, OSError, zlib.error, EOFError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpointError(f"checkpoint {path} is not a complete torch.save archive ({reason})") from None
    if damaged is not None:
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: its member {damaged!r} does not match the checksum (CRC-32) the archive "
            "records for it"
        )


def _load_reason(exc: BaseException) -> str:
    """What `torch.load` found wrong, without its advice to load with `weights_only=False` (which would run code
    from the file, or to allow-list what the file asks for): the weights-only unpickler's own finding where there
    is one."""
    text = str(exc).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        finding = text.split(marker, 1)[1].split("Check the documentation", 1)[0].split("Please use", 1)[0]
        finding = " ".join(finding.split()) or "unsupported content"
        return f"it holds more than tensors and plain containers: {finding}"
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path: str, config: RunConfig, seed: int, world_size: int = 1) -> dict[str, Any]:
    """The checkpoint at `path` of run (`config`, `seed`) written under `world_size` processes.

    CorruptCheckpointError if the file is damaged (`verify_archive`), cannot be read or is not a checkpoint;
    ForeignCheckpointError (a ValueError) if it belongs to another run or another world size.
    """
    verify_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError from the zip reader, ...
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read ({_load_reason(exc)})") from None
    state = _check_structure(path, state)
    try:
        same = identity_dict(from_dict(state["config"])) == identity_dict(config)
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint {path} holds an unusable config ({exc})") from None
    if not same or state["seed"] != seed:
        raise ForeignCheckpointError(
            f"checkpoint {path} belongs to a different run (config or seed differ)",
            "remove it or pass a different checkpoint path",
        )
    saved_world = state.get("world_size", 1)  # checkpoints without the field come from single-process runs
    if saved_world != world_size:
        raise ForeignCheckpointError(
            f"checkpoint {path} was written by a run with world size {saved_world} and can only be "
            f"resumed with world size {saved_world}, but this run has world size {world_size}",
            f"launch {saved_world} process(es) or remove the checkpoint",
        )
    if state["epoch"] > config.epochs:
        raise CorruptCheckpointError(f"checkpoint {path} is at epoch {state['epoch']} of a {config.epochs}-epoch run")
    return state


def set_aside(path: str, reason: str, stream: IO[str] | None = None, then: str = "starting this run afresh") -> str:
    """Rename the bad checkpoint `path` to `<path>.corrupt-<timestamp>`, say so (and `then`, what happens next) on
    `stream`; returns the new name."""
    target = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while os.path.exists(target):
        target = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
        n += 1
    os.replace(path, target)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    print(f"cdgrad: {reason}; moved it to {target} and {then}", file=stream or sys.stderr)
    return target


# ------------------------------------------------------------------------------------------------- orphans
def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def remove_orphans(folder: str, max_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Delete the temporary files (`*.tmp<pid>`, `.probe<pid>`) in `folder` whose writer is dead or that are older
    than `max_age_s`.

    Returns the paths removed. Writers still running on this machine keep their files.
    """
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TMP.search(name)
        if match is None:
            continue
        path = os.path.join(folder, name)
        try:
            age = now - os.path.getmtime(path)
            if int(match.group(1)) != os.getpid() and (not _alive(int(match.group(1))) or age > max_age_s):
                os.remove(path)
                removed.append(path)
        except OSError:  # removed meanwhile by another process
            continue
    return removed


def resume_state(
    checkpoint: str | None, config: RunConfig, seed: int, rank: int = 0, world: int = 1
) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None (no file, or a corrupt one or one of another run or world size,
    which rank 0 sets aside, saying why)."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return None
    try:
        state: dict[str, Any] | None = read_checkpoint(checkpoint, config, seed, world)
        problem = None
    except CorruptCheckpointError as exc:
        state, problem = None, str(exc)
    except ForeignCheckpointError as exc:
        state, problem = None, exc.reason
    if world > 1:
        torch.distributed.barrier()  # every rank has read the file before rank 0 may move it
    if problem is not None and rank == 0:
        set_aside(checkpoint, problem)
    return state
