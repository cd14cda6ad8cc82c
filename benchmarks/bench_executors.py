"""Overhead per run of each executor of `cdgrad run` against inline, on a preset of short runs.

Each measurement is one `cdgrad run PRESET --executor E` command in a fresh process and a fresh results folder,
timed end to end (start-up, checks, data, submission, training, records, index, report). The runs train a tiny
generated problem for one epoch (a few hundredths of a second each), so what is left is the executor's cost. Each
executor runs the preset at N and at 2N runs: the difference of the two wall times over N, less the training time
per run (from the records), is its overhead per run (inline: storing a run; local: handing it to a worker and
writing its record and log; slurm: an array task that starts a Python interpreter, imports torch, loads the data
and writes the record); what remains of the N-run wall time is its fixed cost (start-up, checks, the worker pool or
the submission, the report). The executors run one run at a time here (`--jobs 1`, `--slurm-array-parallelism 1`)
so that the numbers compare. Rounds interleave the executors (drift of a shared machine hits each alike); medians are
reported. The slurm executor runs on a single-node cluster started for the benchmark (tests/slurm_cluster.py;
skipped where SLURM, munge, root or submitit is missing).

    PYTHONPATH=src python benchmarks/bench_executors.py --runs 3 --rounds 2
    PYTHONPATH=src python benchmarks/bench_executors.py --smoke     # 1 and 2 runs, one round: every executor
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESET = "bench-executors"


# ------------------------------------------------------------------------ the plugin every process loads
def register() -> None:
    """CDGRAD_PLUGINS entry: a generated data set, a tiny network and the benchmark preset (`BENCH_RUNS` runs)."""
    import torch
    from torch import nn

    from cdgrad.experiments import data, models
    from cdgrad.experiments.presets import PRESETS, Preset

    def dataset(*args: object, **kwargs: object) -> data.Dataset:
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(384, 1, 8, 8, generator=g) * 255).to(torch.uint8)
        y = torch.randint(0, 4, (384,), generator=g)
        return data.Dataset("bench-synthetic", x[:256], y[:256], x[256:], y[256:], 4, mean=(0.5,), std=(0.25,))

    def tiny(num_classes: int = 4, in_channels: int = 1, *_: object, **__: object) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(6, num_classes))  # fmt: skip

    data.register_dataset("bench-synthetic", dataset)
    models.register_model("bench-tiny", tiny)
    base = {"dataset": "bench-synthetic", "model": "bench-tiny", "epochs": 1, "batch_size": 64, "threads": 1}
    runs = int(os.environ.get("BENCH_RUNS", "1"))
    PRESETS.register(PRESET, Preset(PRESET, "executor overhead", base, (({"method": "none"}, runs),)))


# ------------------------------------------------------------------------------------------- measuring
def measure(executor: list[str], runs: int, env: dict[str, str], timeout_s: float) -> tuple[float, float]:
    """One `cdgrad run` of `runs` runs with `executor` options: (wall time, training time of its runs)."""
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as results:
        argv = [sys.executable, "-m", "cdgrad.experiments.cli", "run", PRESET, "--results", results, "--no-plots"]
        t0 = time.perf_counter()
        out = subprocess.run(
            argv + executor, env={**env, "BENCH_RUNS": str(runs)}, capture_output=True, text=True, timeout=timeout_s
        )
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(executor) or 'inline'} failed:\n{out.stdout}\n{out.stderr}")
        records = [json.loads(p.read_text()) for p in Path(results, "runs").glob("*.json")]
        if len(records) != runs:
            raise RuntimeError(f"{len(records)} records of {runs} runs:\n{out.stdout}\n{out.stderr}")
    return wall, sum(r["wall_s"] for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="N: runs of the smaller preset (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians reported (default 2)")
    parser.add_argument("--no-slurm", action="store_true", help="leave out the slurm executor")
    parser.add_argument("--smoke", action="store_true", help="N = 1, one round: every path (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.rounds = 1, 1
    import cdgrad

    src = str(Path(cdgrad.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "CDGRAD_PLUGINS": "bench_executors:register", "PYTHONPATH": path}
    executors = {"inline": [], "local --jobs 1": ["--executor", "local", "--jobs", "1"]}
    cluster = None
    if not args.no_slurm:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from slurm_cluster import SlurmCluster

        reason = SlurmCluster.unavailable()
        if reason is None:
            cluster = SlurmCluster()
            cluster.start()
            env["SLURM_CONF"] = str(cluster.conf)
            executors["slurm"] = ["--executor", "slurm", "--slurm-array-parallelism", "1", "--wait",
                                  "--wait-timeout", "600"]  # fmt: skip
        else:
            print(f"slurm executor left out: {reason}")
    n = args.runs
    walls: dict[tuple[str, int], list[float]] = {(name, k): [] for name in executors for k in (n, 2 * n)}
    trains: dict[str, list[float]] = {name: [] for name in executors}
    try:
        for _ in range(args.rounds):
            for name, options in executors.items():
                for k in (n, 2 * n):
                    wall, train = measure(options, k, env, timeout_s=900)
                    walls[(name, k)].append(wall)
                    trains[name].append(train / k)
    finally:
        if cluster is not None:
            cluster.stop()
    med = {key: statistics.median(v) for key, v in walls.items()}
    print(f"runs of 1 epoch, N = {n} and 2N = {2 * n} runs, one at a time, {args.rounds} round(s), medians; "
          f"{os.cpu_count()} cores")  # fmt: skip
    print("| executor | wall, N runs s | wall, 2N runs s | overhead per run s | vs inline, per run s | fixed s |")
    print("|---|---:|---:|---:|---:|---:|")
    inline = None
    for name in executors:
        per_run = (med[(name, 2 * n)] - med[(name, n)]) / n - statistics.median(trains[name])
        inline = per_run if inline is None else inline
        fixed = med[(name, n)] - n * (per_run + statistics.median(trains[name]))
        print(f"| {name} | {med[(name, n)]:.1f} | {med[(name, 2 * n)]:.1f} | {per_run:.2f} | {per_run - inline:+.2f} "
              f"| {fixed:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
