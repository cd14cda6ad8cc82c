"""The runner of a sweep: validate every configuration, load every data set and check the results folder before
the first run starts, then train whatever is not already in the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cdgrad.experiments.config import RunConfig, run_key, validate
from cdgrad.experiments.methods import describe
from cdgrad.experiments.store import ResultStore
from cdgrad.experiments.tasks import check_dataset, get_task
from cdgrad.experiments.tracking import Tracker

__all__ = ["data_key", "prepare", "run_all"]


def data_key(config: RunConfig) -> tuple[Any, ...]:
    return (config.dataset, config.data_root, config.swap_train_test, config.train_subset, config.test_subset)


def prepare(runs: list[tuple[RunConfig, int]], store: ResultStore | None) -> dict[tuple[Any, ...], Any]:
    """Check everything that can fail before training: configs, seeds, data, then the results folder (the first
    thing created on disk, with the temporary files of killed writers removed). Returns the data sets."""
    from cdgrad.experiments.launch import init_from_env, is_main_process
    from cdgrad.experiments.train import check_seed, load_data

    for config, seed in runs:
        validate(config)
        check_seed(seed)
    datasets: dict[tuple[Any, ...], Any] = {}
    for config, _ in runs:
        if data_key(config) not in datasets:
            datasets[data_key(config)] = load_data(config)
        check_dataset(get_task(config.task), datasets[data_key(config)].dense, config.dataset)
        if config.task == "synthesis":
            from cdgrad.experiments.synthesis import check_fid_source

            check_fid_source(config)
    distributed = init_from_env() is not None
    if store is not None and is_main_process():  # under torchrun only rank 0 writes the results folder
        store.check_writable()
        store.remove_orphans()
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # the other ranks read the store only once rank 0 has created it
    return datasets


def run_all(
    runs: list[tuple[RunConfig, int]],
    store: ResultStore,
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    wait: bool = True,
    poll_s: float = 2.0,
    tracker: Tracker | None = None,
) -> list[str]:
    """Train every run not yet in `store` (resuming from its checkpoint if one exists); returns all keys.

    Each run is claimed in the store before it is trained, so several processes on one store share the work:
    runs another live process holds are skipped, and once nothing is left to claim this process waits (polling
    every `poll_s` seconds) until those are stored too, taking over any whose owner died; with `wait=False` it
    returns instead and logs which runs another process still holds. `tracker` logs each trained run live
    (`cdgrad.experiments.tracking`); stored runs are not trained, so nothing is logged for them.
    """
    from cdgrad.experiments.launch import init_from_env, is_main_process
    from cdgrad.experiments.train import train

    datasets = prepare(runs, store)
    main = is_main_process()  # under torchrun every rank trains, rank 0 alone claims, stores and logs
    distributed = init_from_env() is not None
    if not main:
        log = _quiet
    done = store.done_keys()
    if main:  # a process killed between storing a run and removing its checkpoint left the checkpoint behind
        for config, seed in runs:
            if run_key(config, seed) in done:
                store.finish_checkpoint(config, run_key(config, seed))
    # seed-major order: an interrupted sweep leaves every configuration with about as many seeds
    todo = sorted(((c, s) for c, s in runs if run_key(c, s) not in done), key=lambda run: run[1])
    log(f"{len(runs)} runs, {len(runs) - len(todo)} already complete, {len(todo)} to train (results: {store.path})")
    by_key = {run_key(c, s): (c, s) for c, s in todo}
    pending = list(by_key)
    t_all, trained, waiting_for = time.perf_counter(), 0, None

    def next_run() -> str | None:
        """Rank 0: the key of the next run this process claimed, "" to wait for others, None when all are stored."""
        stored = store.done_keys()
        pending[:] = [k for k in pending if k not in stored]
        for k in pending:
            if store.claim(k):
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
            held = store.held_elsewhere(pending) if main else {}
            holders = ", ".join(sorted({f"pid {c.pid} on {c.host}" for c in held.values()})) or "another process"
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
                callback=_heartbeat(store, key) if main else None,
                tracker=tracker,  # ---- tracking
            )
            if main:
                store.save(config, seed, metrics)
        except BaseException:
            if main:
                store.release(key)
            raise
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


def _heartbeat(store: ResultStore, key: str) -> Callable[[int, dict[str, list[Any]]], None]:
    """The `train` callback that refreshes this process's claim on run `key` after every epoch."""

    def beat(epoch: int, curves: dict[str, list[Any]]) -> None:
        store.heartbeat(key)

    return beat


def _quiet(message: str) -> None:
    """The log of the ranks other than 0 under torchrun."""
