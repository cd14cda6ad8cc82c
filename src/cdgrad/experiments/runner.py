"""The runner of a sweep: validate every configuration, load every data set and check the results folder before
the first run starts, then train whatever is not already in the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cdgrad.experiments.checks import validate
from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.launch import init_from_env, is_main_process
from cdgrad.experiments.locks import RunLock, holder
from cdgrad.experiments.methods import describe
from cdgrad.experiments.setup import load_data
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.tasks import get_task
from cdgrad.experiments.tracking import Tracker
from cdgrad.experiments.train import check_seed, train

__all__ = ["data_key", "prepare", "run_all", "todo_runs"]


def data_key(config: RunConfig) -> tuple[Any, ...]:
    return (config.dataset, config.data_root, config.swap_train_test, config.train_subset, config.test_subset)


def prepare(
    runs: list[tuple[RunConfig, int]], store: ResultStore | None, remove_orphans: bool = True
) -> dict[tuple[Any, ...], Any]:
    """Check everything that can fail before training: configs, seeds, data, then the results folder (the first
    thing created on disk, with the temporary files of killed writers of this machine removed unless
    `remove_orphans` is False: jobs on other machines may be writing there). Returns the data sets."""
    for config, seed in runs:
        validate(config)
        check_seed(seed)
    datasets: dict[tuple[Any, ...], Any] = {}
    for config, _ in runs:
        if data_key(config) not in datasets:
            datasets[data_key(config)] = load_data(config)
        get_task(config.task).check_dataset(config, datasets[data_key(config)])
    distributed = init_from_env() is not None
    if store is not None and is_main_process():  # under torchrun only rank 0 writes the results folder
        store.check_writable()
        if remove_orphans:
            store.remove_orphans()
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # the other ranks read the store only once rank 0 has created it
    return datasets


def todo_runs(
    runs: list[tuple[RunConfig, int]], store: ResultStore, retry_failed: bool = False
) -> tuple[list[tuple[RunConfig, int]], set[str], set[str]]:
    """(runs to train in seed-major order, keys finished, keys failed and not retried). Seed-major: an interrupted
    sweep leaves every configuration with about as many seeds."""
    keys = {run_key(c, s) for c, s in runs}
    done = store.done_keys() & keys
    failed = set() if retry_failed else (set(store.failures()) & keys) - done
    todo = [(c, s) for c, s in runs if run_key(c, s) not in done and run_key(c, s) not in failed]
    return sorted(todo, key=lambda run: run[1]), done, failed


def run_all(
    runs: list[tuple[RunConfig, int]],
    store: ResultStore,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    wait: bool = True,
    poll_s: float = 2.0,
    retry_failed: bool = False,
    tracker: Tracker | None = None,
) -> list[str]:
    """Train every run not yet finished in `store`, in this process (resuming from its checkpoint if one exists);
    returns all keys. A run that raises stops the sweep (the error propagates); its checkpoint stays for a rerun.

    A run is trained only while this process holds its lock (`cdgrad.experiments.locks`), so several processes on
    one machine and results folder share the work: runs another live process holds are skipped, and once nothing
    is left this process waits (polling every `poll_s` seconds) until those are finished too, taking over any whose
    holder died; with `wait=False` it returns instead and logs which runs another process still holds. Runs
    recorded as failed (by a worker of another executor) are left alone unless `retry_failed`. `tracker` logs each
    trained run live (`cdgrad.experiments.tracking`); stored runs are not trained, so nothing is logged for them.
    """

    datasets = prepare(runs, store)
    main = is_main_process()  # under torchrun every rank trains, rank 0 alone locks, stores and logs
    distributed = init_from_env() is not None
    if not main:
        log = _quiet
    todo, done, failed = todo_runs(runs, store, retry_failed)
    if main:  # a process killed between storing a run and removing its checkpoint left the checkpoint behind
        for config, seed in runs:
            if run_key(config, seed) in done:
                store.finish_checkpoint(config, run_key(config, seed))
    skipped = f", {len(failed)} failed before (rerun them with --retry-failed)" if failed else ""
    log(f"{len(runs)} runs, {len(done)} already complete{skipped}, {len(todo)} to train (results: {store.path})")
    by_key = {run_key(c, s): (c, s) for c, s in todo}
    pending = list(by_key)
    t_all, trained, waiting_for = time.perf_counter(), 0, None
    lock: RunLock | None = None

    def next_run() -> str | None:
        """Rank 0: the key of the next run this process locked, "" to wait for others, None when all are stored."""
        nonlocal lock
        stored = store.done_keys()
        pending[:] = [k for k in pending if k not in stored]
        for k in pending:
            candidate = RunLock(store.root, k)
            if candidate.acquire():
                if k in store.done_keys():  # finished by its last holder between the two looks
                    candidate.release()
                    continue
                lock = candidate
                return k
        return "" if pending else None

    while True:
        choice = next_run() if main else None
        if distributed:
            import torch.distributed as dist

            shared: list[Any] = [choice]
            dist.broadcast_object_list(shared, src=0)
            choice = shared[0]
        if choice is None:
            break
        if choice == "":
            holders = ", ".join(sorted({h for h in (holder(store.root, k) for k in pending) if h})) or "another process"
            if not wait:
                log(f"{len(pending)} runs are still being trained by {holders}: {', '.join(pending)}")
                break
            if waiting_for != len(pending):
                log(f"waiting for {len(pending)} runs being trained by {holders}")
                waiting_for = len(pending)
            time.sleep(poll_s)
            continue
        key = choice
        config, seed = by_key[key]
        pending.remove(key)
        t0 = time.perf_counter()
        try:
            metrics = train(
                config,
                seed,
                dataset=datasets[data_key(config)],
                checkpoint=store.checkpoint_path(key),
                progress=progress,
                tracker=tracker,
            )
            if main:
                store.save(config, seed, metrics)
        finally:
            if lock is not None:
                lock.release()
                lock = None
        trained += 1
        result = get_task(config.task).headline(metrics["final"])
        if metrics.get("status") == "diverged":
            result = f"diverged at epoch {metrics['curves']['epoch'][-1]} (loss not finite)"
        log(
            f"[{trained}/{len(todo)}] {config.dataset} {config.model} {describe(config)} seed {seed}: "
            f"{result} ({time.perf_counter() - t0:.0f} s)"
        )
    if trained:
        log(f"trained {trained} runs in {time.perf_counter() - t_all:.0f} s")
    return [run_key(c, s) for c, s in runs]


def _quiet(message: str) -> None:
    """The log of the ranks other than 0 under torchrun."""
