"""train() under torchrun-style DDP: 2 spawned CPU processes (gloo) equal one process on the whole batch.

The workers only set torchrun's environment variables; `run_all` / `train` detect them and set up the process
group themselves. One spawn runs every scenario: a stored run through `run_all` (with `save_model`, so its final
weights are kept) and a run interrupted after epoch 1 and resumed under the same world size.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from cdgrad.experiments.config import RunConfig, run_key
from cdgrad.experiments.train import train
from helpers import register_fixtures

register_fixtures()

# batch 25 splits 13/12 over 2 ranks and the last batch (256 = 10*25 + 6) 3/3: uneven shards are exercised
CONFIG = RunConfig(
    dataset="synthetic",
    model="tiny",
    epochs=2,
    batch_size=25,
    lr=0.1,
    method="sobolev",
    lam=1.0,
    beta=0.1,
    threads=1,
    save_model=True,
)
SEED = 5
WORLD = 2
TOL = 1e-5
METRICS = ("epoch", "train_loss", "train_acc", "test_epoch", "test_loss", "test_acc")


class Interrupt(Exception):
    pass


def _interrupt_after_first_epoch(epoch, curves):
    if epoch == 1:
        raise Interrupt


def _curves(metrics: dict) -> dict:
    return {k: metrics["curves"][k] for k in METRICS}


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    register_fixtures()  # a spawned process registers the test fixtures itself
    from cdgrad.experiments import train as train_mod
    from cdgrad.experiments.runner import run_all
    from cdgrad.experiments.store import ResultStore

    writes = {"checkpoint": 0, "store": 0}
    save_checkpoint, store_save = train_mod.save_checkpoint, ResultStore.save

    def counting_checkpoint(*args, **kwargs):
        writes["checkpoint"] += 1
        return save_checkpoint(*args, **kwargs)

    def counting_store(self, *args, **kwargs):
        writes["store"] += 1
        return store_save(self, *args, **kwargs)

    train_mod.save_checkpoint = counting_checkpoint
    ResultStore.save = counting_store
    result: dict = {}
    try:
        run_all([(CONFIG, SEED)], ResultStore(str(Path(outdir, "results"))), log=lambda message: None)
        result["writes"] = dict(writes)
        ckpt = str(Path(outdir, "interrupted.pt"))
        result["interrupted"] = False
        try:
            train(CONFIG, SEED, checkpoint=ckpt, callback=_interrupt_after_first_epoch)
        except Interrupt:
            result["interrupted"] = True
        result["epoch_at_interrupt"] = torch.load(ckpt, weights_only=True)["epoch"]
        torch.distributed.barrier()  # every rank has read the interrupted checkpoint before rank 0 overwrites it
        result["resumed"] = _curves(train(CONFIG, SEED, checkpoint=ckpt))
        result["distributed"] = torch.distributed.is_initialized()
        torch.distributed.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
        print(f"rank {rank}:\n{result['error']}", file=sys.stderr, flush=True)
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(result))


@functools.cache
def _ddp() -> tuple[str, list[dict]]:
    from test_distributed import spawn

    outdir = tempfile.mkdtemp(prefix="cdgrad-ddp-")
    runs = spawn(_worker, WORLD, outdir, timeout=120)
    for rank, res in enumerate(runs):
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    return outdir, runs


@functools.cache
def _single() -> tuple[dict, dict]:
    ckpt = os.path.join(tempfile.mkdtemp(prefix="cdgrad-single-"), "run.pt")
    metrics = train(CONFIG, SEED, checkpoint=ckpt)
    return metrics, torch.load(ckpt, weights_only=True)["model"]


def _assert_curves_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=TOL, abs=TOL), k


def _assert_weights_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=TOL, atol=TOL, msg=name)


def _stored(outdir: str):
    from cdgrad.experiments.store import ResultStore

    store = ResultStore(os.path.join(outdir, "results"))
    return store, store.runs([run_key(CONFIG, SEED)])


def test_ddp_run_equals_single_process_run_on_the_whole_batch():
    outdir, runs = _ddp()
    assert all(res["distributed"] for res in runs)  # detected from the environment alone
    metrics, weights = _single()
    store, stored = _stored(outdir)
    assert len(stored) == 1
    _assert_curves_close({k: stored[0].curves[k] for k in METRICS}, _curves(metrics))
    _assert_weights_close(torch.load(store.model_path(run_key(CONFIG, SEED)), weights_only=True)["model"], weights)


def test_only_rank_zero_writes_checkpoints_and_results():
    outdir, runs = _ddp()
    assert runs[0]["writes"] == {"checkpoint": CONFIG.epochs, "store": 1}
    assert runs[1]["writes"] == {"checkpoint": 0, "store": 0}
    store, _ = _stored(outdir)
    assert os.listdir(store.checkpoint_dir) == []  # the stored run's checkpoint was moved to models/
    assert not [f for f in os.listdir(outdir) if ".tmp" in f]


def test_interrupted_ddp_run_resumes_to_the_same_numbers():
    outdir, runs = _ddp()
    metrics, weights = _single()
    assert [(res["interrupted"], res["epoch_at_interrupt"]) for res in runs] == [(True, 1), (True, 1)]
    assert runs[0]["resumed"] == runs[1]["resumed"]  # every rank returns the same (all-reduced) curves
    _assert_curves_close(runs[0]["resumed"], _curves(metrics))
    state = torch.load(os.path.join(outdir, "interrupted.pt"), weights_only=True)
    assert state["world_size"] == WORLD and state["epoch"] == CONFIG.epochs
    _assert_weights_close(state["model"], weights)


def test_a_checkpoint_of_another_world_size_is_set_aside_and_the_run_starts_afresh(tmp_path, capsys):
    outdir, _ = _ddp()
    ckpt = str(tmp_path / "interrupted.pt")
    shutil.copyfile(os.path.join(outdir, "interrupted.pt"), ckpt)  # written under world size 2
    got = train(CONFIG, SEED, checkpoint=ckpt)
    err = capsys.readouterr().err
    assert re.search("world size 2.*world size 1", err) and "moved it to" in err and "launch" not in err
    assert _curves(got) == _curves(train(CONFIG, SEED))  # trained from the start, as a fresh run
