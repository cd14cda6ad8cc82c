"""Peak memory of the spectral computations against the estimate they check before allocating.

Each call runs in a fresh process: its peak resident memory (Linux: the high-water mark `VmHWM`, reset just before
the call through `/proc/self/clear_refs`) minus the resident memory before it, side by side with
`cdgrad.spectral.memory_needed` for the same computation, weight shape, input size and dtype. A ratio
`estimate / measured` of at least 1 means the check never lets through a call that needs more than it reckoned.

    PYTHONPATH=src python benchmarks/bench_memory.py            # 8x8, 16x4, 4x16 at 512; 1x1 at 2048
    PYTHONPATH=src python benchmarks/bench_memory.py --smoke    # one 4x4 conv at 64: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from cdgrad import norm_bounds, spectral
name, o, i, n, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), getattr(torch, sys.argv[5])
w = torch.randn(o, i, 3, 3, dtype=dtype)
calls = {
    "singular_values": lambda: spectral.conv_singular_values(w, n),
    "operator_norm": lambda: spectral.conv_operator_norm(w, n),
    "clip": lambda: spectral.clip_operator_norm(w, n, 1.0),
    "power": lambda: norm_bounds.conv_norm_power(w, n, iters=2),
    "gram": lambda: norm_bounds.conv_norm_gram(w, n),
}
calls[name]()  # once to load the libraries the call needs; then measure a second call

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the high-water mark to the current resident memory
before = status("VmRSS")
result = calls[name]()
print(json.dumps({"measured": status("VmHWM") - before, "estimate": spectral.memory_needed(name, w.shape, n, dtype)}))
"""

COMPUTATIONS = ("singular_values", "operator_norm", "clip", "power", "gram")


def measure(name: str, o: int, i: int, n: int, dtype: str) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(o), str(i), str(n), dtype], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"{name} {o}x{i} at {n} ({dtype}) failed:\n{out.stderr}")
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one small conv: every path in seconds")
    args = parser.parse_args()
    if not os.path.exists("/proc/self/clear_refs"):
        print("needs Linux's /proc/self/clear_refs to reset the memory high-water mark; nothing measured")
        return
    shapes = [(4, 4, 64)] if args.smoke else [(8, 8, 512), (16, 4, 512), (4, 16, 512), (1, 1, 2048)]
    dtypes = ["float32"] if args.smoke else ["float32", "float64"]
    print(f"{'computation':16s} {'O x I':>7s} {'n':>5s} {'dtype':8s} {'measured MiB':>13s} {'estimate MiB':>13s} ratio")
    worst = float("inf")
    for o, i, n in shapes:
        for dtype in dtypes:
            for name in COMPUTATIONS:
                r = measure(name, o, i, n, dtype)
                ratio = r["estimate"] / max(r["measured"], 1)
                worst = min(worst, ratio)
                print(
                    f"{name:16s} {f'{o}x{i}':>7s} {n:5d} {dtype:8s} {r['measured'] / 2**20:13.1f} "
                    f"{r['estimate'] / 2**20:13.1f} {ratio:5.2f}"
                )
    print(f"smallest estimate / measured: {worst:.2f}")


if __name__ == "__main__":
    main()
