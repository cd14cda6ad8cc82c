"""What live logging costs a training step: each sink (TensorBoard, MLflow on a local SQLite file, both) against
logging off, on one run of the demo preset's model (cnn2, batch 100, SGD, Fashion-MNIST-shaped images).

    PYTHONPATH=src python benchmarks/bench_tracking.py            # 2-epoch runs, 5 interleaved rounds
    PYTHONPATH=src python benchmarks/bench_tracking.py --smoke    # every path once, a few steps: seconds

Two measurements, side by side in one process:

- whole runs: `train(config, 0, tracker=...)` of each variant in turn, round after round (drift of a shared machine
  hits each alike); the median wall time per run, and the extra time per optimizer step against logging off,
  (median_sink - median_off) / steps;
- the sink alone: an epoch's worth of logging (a `Tracker.log_step` of the loss and learning rate per step, then the
  epoch's `log_epoch`, which sends MLflow's batch, and the `state_dict` of its checkpoint, which flushes
  TensorBoard's writer) timed by `torch.utils.benchmark` (see timing.py), per step: the sink's own cost, free of
  the training's noise.

Images are random (the cost does not depend on their content); one thread. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cdgrad.experiments.config import RunConfig  # noqa: E402
from cdgrad.experiments.data import Dataset  # noqa: E402
from cdgrad.experiments.tracking import RunInfo, Tracker, make_tracker  # noqa: E402
from cdgrad.experiments.train import train  # noqa: E402
from timing import environment, seconds  # noqa: E402

VARIANTS = ("off", "tensorboard", "mlflow", "tensorboard,mlflow")


def fake_fashion_mnist(n_train: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Dataset("fake", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10, (0.286,), (0.353,))


def tracker(variant: str, folder: str, db: str) -> Tracker | None:
    """The variant's tracker: TensorBoard under `folder`, MLflow into the SQLite file `db` (one for all runs)."""
    if variant == "off":
        return None
    return make_tracker(variant.split(","), folder, "bench-tracking", f"sqlite:///{db}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of whole runs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=2000, help="the demo preset's training subset")
    parser.add_argument("--smoke", action="store_true", help="every path once on a few steps: a check, not a timing")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.epochs, args.train_images = 1, 1, 300
    torch.set_num_threads(1)
    config = RunConfig(
        dataset="fashion-mnist", model="cnn2", batch_size=100, lr=0.01, epochs=args.epochs, threads=1, eval_every=100
    )
    ds = fake_fashion_mnist(args.train_images, 500)
    steps = args.epochs * -(-args.train_images // config.batch_size)
    print(environment(), f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"cnn2, batch 100, {args.epochs} epochs of {args.train_images} images = {steps} steps, 1 thread\n")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's and SQLAlchemy's deprecation notices
        db = os.path.join(tmp, "mlflow.db")
        for r in range(args.rounds + 1):  # round 0 warms up (imports, MLflow's database tables)
            for v in VARIANTS:
                folder = os.path.join(tmp, f"{v}-{r}")
                t = tracker(v, folder, db)
                t0 = time.perf_counter()
                train(config, r, dataset=ds, tracker=t)
                if r > 0:
                    times[v].append(time.perf_counter() - t0)
        off = statistics.median(times["off"])
        print("| logging | median s per run | vs off | extra ms per step (whole run / steps) |")
        print("|---|---|---|---|")
        for v in VARIANTS:
            med = statistics.median(times[v])
            extra = "-" if v == "off" else f"{(med - off) / steps * 1e3:.2f}"
            print(f"| {v} | {med:.3f} | {med / off:.3f}x | {extra} |")

        per_epoch = -(-args.train_images // config.batch_size)
        what = f"an epoch of {per_epoch} `log_step` calls, its `log_epoch` and checkpoint state"
        print(f"\n| logging | µs per step ({what}) |")
        print("|---|---|")
        curves = {"epoch": [1], "train_loss": [0.5], "train_acc": [80.0], "test_epoch": [1], "test_loss": [0.4]}
        curves.update(test_acc=[85.0], epoch_time=[1.0])
        for v in VARIANTS[1:]:
            t = tracker(v, os.path.join(tmp, f"calls-{v}"), db)
            assert t is not None
            t.start(RunInfo(config, 0, per_epoch))
            counter = iter(range(1, 10**12))

            def epoch(t: Tracker = t, counter: Iterator[int] = counter) -> None:
                for _ in range(per_epoch):
                    step = next(counter)
                    t.log_step(step, {"train_loss": 0.5, "lr": 0.01})
                t.log_epoch(step, curves)
                t.state_dict()

            per_step = seconds(epoch, min_run_time=0 if args.smoke else 2.0) / per_epoch
            t.end({"test_acc": 0.0}, "completed")
            print(f"| {v} | {per_step * 1e6:.1f} |")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
