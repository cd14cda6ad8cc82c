"""Overhead per run of each executor of `cdgrad run` against inline, on a preset of short runs.

Each measurement is one `cdgrad run PRESET --executor E` command in a fresh process and a fresh results folder,
timed end to end (start-up, checks, data, submission, training, records, index, report). The runs train a tiny
generated problem for one epoch (about 0.1 s each), so what is left is the executor's cost: its overhead per run
is `(command wall time - training time of its runs) / runs`, the training time summed from the records. The
executors run one run at a time here (`--jobs 1`, `--slurm-array-parallelism 1`) so that the numbers compare;
`local --jobs 2` is shown beside them for its wall time. Rounds interleave the executors (drift of a shared machine
hits each alike); medians are reported. The slurm executor runs on a single-node cluster started for the
benchmark (tests/slurm_cluster.py; skipped where SLURM, munge, root or submitit is missing).

    PYTHONPATH=src python benchmarks/bench_executors.py --runs 8 --rounds 3
    PYTHONPATH=src python benchmarks/bench_executors.py --smoke     # 2 runs, one round: every executor, a minute
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
    runs = int(os.environ.get("BENCH_RUNS", "2"))
    PRESETS.register(PRESET, Preset(PRESET, "executor overhead", base, (({"method": "none"}, runs),)))


# ------------------------------------------------------------------------------------------- measuring
def measure(executor: list[str], runs: int, env: dict[str, str], timeout_s: float) -> dict[str, float]:
    """One `cdgrad run` with `executor` options: wall time, training time of its runs, overhead per run."""
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as results:
        argv = [sys.executable, "-m", "cdgrad.experiments.cli", "run", PRESET, "--results", results, "--no-plots"]
        t0 = time.perf_counter()
        out = subprocess.run(argv + executor, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(executor) or 'inline'} failed:\n{out.stdout}\n{out.stderr}")
        records = [json.loads(p.read_text()) for p in Path(results, "runs").glob("*.json")]
        if len(records) != runs:
            raise RuntimeError(f"{len(records)} records of {runs} runs:\n{out.stdout}\n{out.stderr}")
        train = sum(r["wall_s"] for r in records)
    return {"wall": wall, "train": train, "overhead": (wall - train) / runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="runs in the preset (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--no-slurm", action="store_true", help="leave out the slurm executor")
    parser.add_argument("--smoke", action="store_true", help="2 runs, 1 round: every path in seconds (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.rounds = 2, 1
    import cdgrad

    src = str(Path(cdgrad.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "BENCH_RUNS": str(args.runs), "CDGRAD_PLUGINS": "bench_executors:register", "PYTHONPATH": path}
    executors = {"inline": [], "local --jobs 1": ["--executor", "local", "--jobs", "1"]}
    if not args.smoke:  # the same code path as --jobs 1
        executors["local --jobs 2"] = ["--executor", "local", "--jobs", "2"]
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
    results: dict[str, list[dict[str, float]]] = {name: [] for name in executors}
    try:
        for _ in range(args.rounds):
            for name, options in executors.items():
                results[name].append(measure(options, args.runs, env, timeout_s=900))
    finally:
        if cluster is not None:
            cluster.stop()
    median = {n: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for n, ms in results.items()}
    base = median["inline"]["overhead"]
    print(f"{args.runs} runs of 1 epoch each, {args.rounds} round(s), medians; cores: {os.cpu_count()}")
    print("| executor | command wall s | training s | overhead per run s | vs inline, per run s |")
    print("|---|---:|---:|---:|---:|")
    for name, m in median.items():
        print(f"| {name} | {m['wall']:.2f} | {m['train']:.2f} | {m['overhead']:.2f} | {m['overhead'] - base:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
