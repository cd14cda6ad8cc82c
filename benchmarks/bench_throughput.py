"""Training and evaluation throughput (images/s) of the experiment models on this machine.

    PYTHONPATH=src python benchmarks/bench_throughput.py      # cnn2 and resnet20, 1 and 2 threads
    PYTHONPATH=src python benchmarks/bench_throughput.py --models cnn2 --threads 1 --methods none sobolev
    PYTHONPATH=src python benchmarks/bench_throughput.py --smoke  # every method on cnn2, a few steps: seconds

A training step is the one `cdgrad.experiments.train` runs (normalise a uint8 batch, forward, cross-entropy,
backward, gradient method, SGD with momentum and weight decay); evaluation is `train.evaluate`, a no-grad
forward pass in batches of the config's default `eval_batch_size`. Images are random (throughput does not
depend on their content). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from cdgrad.experiments.config import RunConfig
from cdgrad.experiments.data import Dataset, normalize
from cdgrad.experiments.setup import build
from cdgrad.experiments.tasks.supervised import CLASSIFICATION_SPEC, evaluate

SHAPES = {
    "cnn2": (1, 28, 100),
    "resnet20": (3, 32, 128),
    "resnet32": (3, 32, 128),
    "resnet56": (3, 32, 128),
    "vgg16": (3, 32, 128),
}  # (channels, image size, batch size of the paper's protocol)
METHODS = {"none": {}, "h0": {"lam": 1.0}, "sobolev": {"lam": 1.0}, "ls": {"sigma": 1.0}}


def fake_dataset(channels: int, size: int, n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("fake", x, y, x, y, 10, (0.5,) * channels, (0.25,) * channels)


def bench(model_name: str, method: str, threads: int, seconds: float) -> tuple[float, float, float]:
    """(training images/s, training images per CPU-second of this process, evaluation images/s).

    On a machine shared with other work the wall-clock rate drops; with one thread the rate per CPU-second
    stays close to what an idle core delivers.
    """
    torch.set_num_threads(threads)
    channels, size, batch = SHAPES[model_name]
    ds = fake_dataset(channels, size, 2000)
    config = RunConfig(model=model_name, method=method, batch_size=batch, lr=0.01, **METHODS[method])
    run = build(config, 0, ds, torch.device("cpu"))  # the network, its optimizer and the method attached to it
    model, optimizer = run.units[0].module, run.units[0].optimizer
    model.train()

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch) % len(ds.train_x)
        loss = F.cross_entropy(model(normalize(ds.train_x[idx], ds.mean, ds.std)), ds.train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(2):  # warm-up
        step(i)
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or steps < 3:
        step(steps)
        steps += 1
    train_rate = steps * batch / (time.perf_counter() - t0)
    cpu_rate = steps * batch / (time.process_time() - c0)
    run.remove()
    n_eval, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2 or n_eval == 0:
        evaluate(CLASSIFICATION_SPEC, model, ds.test_x, ds.test_y, ds.mean, ds.std, config.eval_batch_size)
        n_eval += len(ds.test_x)
    return train_rate, cpu_rate, n_eval / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn2", "resnet20"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["none", "h0", "sobolev"], choices=list(METHODS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts to try")
    parser.add_argument("--seconds", type=float, default=8.0, help="time spent measuring each training cell")
    parser.add_argument("--smoke", action="store_true", help="every method on cnn2, 1 thread, 3 steps each")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.methods, args.threads, args.seconds = ["cnn2"], list(METHODS), [1], 0.0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads by default, load average {load:.1f} at start\n"
    )
    print("| model | batch | method | threads | train images/s | train images per CPU-s | eval images/s |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for method in args.methods:
            for threads in args.threads:
                tr, cpu, ev = bench(model_name, method, threads, args.seconds)
                print(
                    f"| {model_name} | {SHAPES[model_name][2]} | {method} | {threads} | {tr:.0f} | {cpu:.0f} | "
                    f"{ev:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
