"""Launch helpers for the toolkit under torchrun: the default process group from the environment, rank 0.

The library's sharded mathematics (`cdgrad.distributed`) never initialises a process group; the experiment
toolkit does, through `init_from_env`, when `cdgrad train` / `cdgrad run` are started by torchrun.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_main_process"]


def init_from_env(backend: str | None = None, timeout: timedelta | None = None) -> tuple[int, int] | None:
    """Initialise the default process group from torchrun's environment variables.

    Returns `(rank, world_size)`, or `None` when the process was not launched for distributed training
    (no `WORLD_SIZE` in the environment and no process group yet). If a default group already exists it is
    reused. `backend` defaults to "cpu:gloo,cuda:nccl" when CUDA is available (then the current CUDA device is
    set to `LOCAL_RANK`) and to "gloo" otherwise. Rendezvous is `env://` (`MASTER_ADDR`, `MASTER_PORT`);
    `timeout` bounds every collective (torch's default when None).
    """
    if not dist.is_available():
        return None
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return None
    world = _env_int("WORLD_SIZE", minimum=1)
    rank = _env_int("RANK", minimum=0)
    if rank >= world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE) = [0, {world}), got {rank}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str such as 'gloo', 'nccl' or 'cpu:gloo,cuda:nccl', got {backend!r}")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta or None, got {type(timeout).__name__}")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", minimum=0) if "LOCAL_RANK" in os.environ else 0)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 of the default process group, and in any process without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _env_int(name: str, minimum: int) -> int:
    raw = os.environ.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer >= {minimum}, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name} must be an integer >= {minimum}, got {value}")
    return value
