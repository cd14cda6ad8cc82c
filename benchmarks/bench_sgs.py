"""Time spatial gradient scaling on a CIFAR ResNet-56: the scalings of every conv layer from 2 batches of 128.

    PYTHONPATH=src python benchmarks/bench_sgs.py [--threads 1] [--method mi|autocorr] [--repeats 3] [--smoke]
    PYTHONPATH=src python benchmarks/bench_sgs.py --pipelines   # how far apart ours and the authors' G are

Phases: the capture (two training-mode forward passes, with and without the hooks), then
`SpatialGradientScaling.update()` (the computation of every layer's `G`), timed as a whole and broken
down by primitive with cProfile. Wall-clock and process CPU time are both printed: on a shared machine
the CPU time is the steadier figure.  --smoke runs both methods once on two batches of 8 images, in seconds
(a check that the script works, not a timing).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch import nn

from cdgrad.experiments.models import build_model
from cdgrad.sgs import SpatialGradientScaling


class _Clock:
    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


PHASES = {  # profiled function -> phase (cumulative; re-binning of trimmed crops counts under "quantise")
    "_extrema": "extrema (min/max per crop)",
    "bin_codes": "quantise",
    "<built-in method torch.add>": "joint codes",
    "<built-in method torch.bincount>": "histograms (bincount)",
    "nmi_from_joint": "entropies",
    "_per_channel_autocorr": "moments (autocorr)",
}


def _breakdown(prof: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    out: dict[str, float] = {}
    for (_, _, name), (_, _, _, cum, _) in stats.items():
        if name in PHASES:
            out[PHASES[name]] = out.get(PHASES[name], 0.0) + cum
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2, help="captured batches (default 2)")
    ap.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed update() runs; the last is profiled")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--method", choices=("mi", "autocorr"), default="mi", help="dependence measure")
    ap.add_argument("--smoke", action="store_true", help="both methods, 2 batches of 8, one run each, in seconds")
    ap.add_argument(
        "--pipelines",
        action="store_true",
        help="instead: G of every layer by our pipeline and by the authors' on the same batches, and how far apart",
    )
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.batch_size, args.repeats = 2, 8, 1
        for method in ("mi", "autocorr"):
            args.method = method
            run(args)
        compare_pipelines(args)
    elif args.pipelines:
        compare_pipelines(args)
    else:
        run(args)


def compare_pipelines(args: argparse.Namespace) -> None:
    """Both pipelines on the same ResNet-56 (initial weights) and the same batches: per layer, the largest
    |G_cdgrad - G_authors| in a mean-1 G, summarised over the layers (docs/sgs.md, "Two pipelines")."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("resnet56")
    images = [
        nn.functional.avg_pool2d(torch.randn(args.batch_size, 3, 36, 36), 5, stride=1) * 5 for _ in range(args.batches)
    ]
    ours = SpatialGradientScaling(model, num_batches=args.batches)
    model.train()
    ours.begin_epoch(0)
    with torch.no_grad():
        for x in images:
            model(x)
    ours.remove()
    authors = SpatialGradientScaling(model, num_batches=args.batches, pipeline="authors")
    authors.measure(images)
    gaps = torch.tensor(
        [float((ours.scalings[n] - authors.scalings[n]).abs().max()) for n in ours.layers], dtype=torch.float64
    )
    print(
        f"ResNet-56 (initial weights), {args.batches} batches of {args.batch_size} smooth random images: "
        f"max |G_cdgrad - G_authors| per layer over {len(gaps)} layers: median {gaps.median():.3f}, "
        f"max {gaps.max():.3f}, min {gaps.min():.3f}"
    )


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("resnet56").train()
    # spatially smooth random images (5x5 box-filtered noise), so that neighbouring pixels are dependent
    images = [
        nn.functional.avg_pool2d(torch.randn(args.batch_size, 3, 36, 36), 5, stride=1) * 5 for _ in range(args.batches)
    ]
    sgs = SpatialGradientScaling(model, num_batches=args.batches, method=args.method)
    print(
        f"ResNet-56: {len(sgs.layers)} scaled conv layers; {args.batches} batches of {args.batch_size}; "
        f"method={args.method}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    captured: dict[str, list] = {}
    compute = sgs.update
    sgs.update = lambda: captured.update(sgs._captured)  # keep the captures, time update() separately
    with torch.no_grad():
        model(images[0])  # warm-up
        sgs.remove()
        with _Clock() as plain:
            for x in images:
                model(x)
        sgs._setup_layers()
        sgs.begin_epoch(0)
        with _Clock() as hooked:
            for x in images:
                model(x)
    del sgs.update
    print(
        f"capture: forward of {args.batches} batches {plain.wall:.3f} s without hooks, {hooked.wall:.3f} s with hooks"
    )
    elements = sum(x.numel() for entries in captured.values() for x, _ in entries)
    print(f"captured {elements / 1e6:.1f} M activations ({elements * 4 / 2**20:.0f} MiB)")

    walls, cpus = [], []
    for r in range(args.repeats):
        sgs._captured = {k: list(v) for k, v in captured.items()}
        prof = cProfile.Profile() if r == args.repeats - 1 else None
        with _Clock() as clock:
            if prof is not None:
                prof.enable()
            compute()
            if prof is not None:
                prof.disable()
        walls.append(clock.wall)
        cpus.append(clock.cpu)
        print(
            f"update() run {r + 1}: wall {clock.wall:.3f} s, process CPU {clock.cpu:.3f} s"
            + (" (profiled)" if prof is not None else "")
        )
    best = min(walls[:-1]) if len(walls) > 1 else walls[0]
    print(f"scalings of all {len(sgs.layers)} layers: best wall {best:.3f} s (unprofiled runs)")
    parts = _breakdown(prof)
    total = walls[-1]
    print("breakdown of the profiled run (cumulative wall s):")
    for phase, seconds in parts.items():
        print(f"  {phase:28s} {seconds:.3f}")
    if "moments (autocorr)" not in parts:
        print(f"  {'other':28s} {total - sum(parts.values()):.3f}")
    print(f"  {'total':28s} {total:.3f}")
    g = sgs.scalings[next(iter(sgs.layers))]
    print("G of the first layer:\n", g.numpy().round(4))


if __name__ == "__main__":
    main()
