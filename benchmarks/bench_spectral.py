"""Benchmark: exact conv singular values by FFT (Sedghi et al.), cheaper norm bounds, and projections.

    PYTHONPATH=src python benchmarks/bench_spectral.py [--device cpu|cuda] [--threads N] [--min-run-time S] [--large]
    PYTHONPATH=src python benchmarks/bench_spectral.py --smoke   # every part once, smallest sizes: seconds
    PYTHONPATH=src python benchmarks/bench_spectral.py --bounds-only --nets resnet32   # part 3 on ResNet-32 only

Part 1 computes all singular values of every conv of a CIFAR ResNet-56 (``build_model("resnet56")``,
55 convs), with each conv at the spatial size of its own input for a 32x32 image (recorded by
``record_input_sizes``), and again with every conv at 32x32.
Part 2 compares the FFT method with the SVD of the dense (O n^2) x (I n^2) matrix where the latter
is feasible, and checks that the two agree; ``--large`` adds a 4096 x 4096 dense case (minutes on CPU).
Part 3 sets the norm estimates beside the exact operator norm, per layer and summed over every conv of
ResNet-32 and ResNet-56 (ResNet-8 under ``--smoke``): time and tightness (estimate / exact) of power
iteration, global and per frequency (cold, and warm-started from the previous step's vectors after a
training-sized change of the weight), the Gram-iteration bound and the reshaped-kernel norm. Part 4 times
one projection of every conv of ResNet-32 (exact, reshaped, Gram) beside one SGD training step of the same
network (batch 128) and a plain copy of its conv weights: what clipping every step, or every 100 steps, adds to
training.
``--smoke`` runs every part once at the smallest sizes (16x16 images, one small dense case), in seconds.
"""

from __future__ import annotations

import argparse

import torch

from cdgrad.experiments.models import build_model
from cdgrad.norm_bounds import conv_norm_gram, conv_norm_power, reshaped_norm, reshaped_norm_power
from cdgrad.spectral import (
    PROJECTIONS,
    conv_dense_matrix,
    conv_operator_norm,
    conv_singular_values,
    record_input_sizes,
)
from timing import environment, seconds


def resnet_convs(name: str = "resnet56", image: int = 32) -> list[tuple[str, torch.Tensor, tuple[int, int]]]:
    """(name, initial weight, input size) of every conv of a CIFAR ResNet (shortcut A; ResNet-56: 55 convs)."""
    torch.manual_seed(0)
    model = build_model(name, image_size=image)
    sizes = record_input_sizes(model, torch.zeros(1, 3, image, image))
    modules = dict(model.named_modules())
    return [(layer, modules[layer].weight.detach().clone(), size) for layer, size in sizes.items()]


def estimates(w: torch.Tensor, n: tuple[int, int], moved: torch.Tensor) -> dict[str, tuple[object, object]]:
    """name -> (function computing the estimate of `moved`'s norm, its value); warm starts come from `w`."""
    _, x = conv_norm_power(w, n, iters=50)
    _, xf = conv_norm_power(w, n, iters=50, per_frequency=True)
    _, u = reshaped_norm_power(w, iters=50)
    fns = {
        "exact (spectrum + SVD)": lambda: conv_operator_norm(moved, n),
        "power, cold, 10 its": lambda: conv_norm_power(moved, n, iters=10)[0],
        "power, warm, 2 its": lambda: conv_norm_power(moved, n, vector=x, iters=2)[0],
        "per-freq power, cold, 10 its": lambda: conv_norm_power(moved, n, iters=10, per_frequency=True)[0],
        "per-freq power, warm, 1 it": lambda: conv_norm_power(moved, n, vector=xf, iters=1, per_frequency=True)[0],
        "per-freq power, warm, 2 its": lambda: conv_norm_power(moved, n, vector=xf, iters=2, per_frequency=True)[0],
        "Gram bound, 4 its": lambda: conv_norm_gram(moved, n, iters=4),
        "Gram bound, 6 its": lambda: conv_norm_gram(moved, n, iters=6),
        "reshaped, SVD": lambda: reshaped_norm(moved),
        "reshaped, warm power, 1 it": lambda: reshaped_norm_power(moved, vector=u, iters=1)[0],
    }
    return {k: (f, float(f())) for k, f in fns.items()}


def nudged(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``w`` plus a random change of 1e-3 of its RMS entry: about what one training step does to a weight."""
    return w + 1e-3 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=gen).to(w.device)


def bench_bounds(image: int, min_run_time: float, dev: torch.device, nets: tuple[str, ...]) -> None:
    print("\nNorm estimates (float32; tightness = estimate / exact; warm: from the previous step's vector after")
    print("a change of the weight by 1e-3 of its size)")
    gen = torch.Generator().manual_seed(1)
    convs = resnet_convs(nets[0], image)
    picks = {n: (name, w, n) for name, w, n in convs[1:]}  # one conv per input size (the last one seen)
    print(f"  {'layer (O,I,kh,kw) @ n':26s} {'estimate':28s} {'time ms':>9s} {'tightness':>10s}")
    for _, w, n in picks.values():
        w = w.to(dev)
        found = estimates(w, n, nudged(w, gen))
        exact = found["exact (spectrum + SVD)"][1]
        for k, (fn, value) in found.items():
            t = seconds(fn, min_run_time=min_run_time)
            print(f"  {str(tuple(w.shape)) + f' @ {n[0]}':26s} {k:28s} {1e3 * t:9.3f} {value / exact:10.4f}")
    for net in nets:
        layers = [(w.to(dev), n) for _, w, n in resnet_convs(net, image)]
        per_layer = [estimates(w, n, nudged(w, gen)) for w, n in layers]
        print(f"\n  {net}, all {len(layers)} convs:  {'estimate':28s} {'time ms':>9s} {'tightness min..max':>20s}")
        for k in per_layer[0]:
            t = seconds(lambda k=k, fs=per_layer: [f[k][0]() for f in fs], min_run_time=min_run_time)
            ratios = [f[k][1] / f["exact (spectrum + SVD)"][1] for f in per_layer]
            print(f"  {'':26s} {k:28s} {1e3 * t:9.2f} {min(ratios):9.4f}..{max(ratios):.4f}")


def bench_projections(image: int, batch: int, min_run_time: float, dev: torch.device, net: str) -> None:
    torch.manual_seed(2)
    model = build_model(net, image_size=image).to(dev)
    sizes = record_input_sizes(model, torch.zeros(1, 3, image, image, device=dev))
    modules = dict(model.named_modules())
    weights = [(modules[k].weight, n) for k, n in sizes.items()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, image, image, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def train_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def copy() -> None:
        for w, _ in weights:
            w.detach().clone()

    t_step = seconds(train_step, min_run_time=min_run_time)
    t_copy = seconds(copy, min_run_time=min_run_time)
    print(f"\nProjection of all {len(weights)} convs of {net} ({image}x{image}, float32) vs one SGD step")
    print(f"  {'':34s} {'time ms':>9s} {'/ SGD step':>11s} {'per step, every 100':>20s}")
    print(f"  {f'one SGD training step (batch {batch})':34s} {1e3 * t_step:9.2f} {1.0:11.3f}")
    print(f"  {'plain copy of the conv weights':34s} {1e3 * t_copy:9.2f} {t_copy / t_step:11.3f}")
    for name, projection in PROJECTIONS.items():
        t = seconds(lambda p=projection: [p.apply(w.detach(), n, 0.5) for w, n in weights], min_run_time=min_run_time)
        print(f"  {f'projection {name!r}':34s} {1e3 * t:9.2f} {t / t_step:11.3f} {t / t_step / 100:20.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds spent timing each measurement")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--large", action="store_true", help="add the 16x16x3x3 @ 16x16 dense case")
    parser.add_argument("--smoke", action="store_true", help="both parts once at the smallest sizes, in seconds")
    parser.add_argument("--bounds-only", action="store_true", help="part 3 only (the norm estimates)")
    parser.add_argument("--nets", nargs="+", default=None, help="networks of part 3 (default: resnet32 resnet56)")
    args = parser.parse_args()
    image = 16 if args.smoke else 32
    if args.smoke:
        args.min_run_time, args.large = 0.0, False
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(environment(dev))

    nets = ("resnet8",) if args.smoke else tuple(args.nets or ("resnet32", "resnet56"))
    if args.bounds_only:
        bench_bounds(image, args.min_run_time, dev, nets)
        return
    gen = torch.Generator().manual_seed(0)
    convs = [(w, n) for _, w, n in resnet_convs("resnet56", image)]
    print(f"\nResNet-56: {len(convs)} convs, {sum(w.numel() for w, _ in convs)} conv weights, {image}x{image} images")
    for dtype in (torch.float32, torch.float64):
        ws = [(w.to(dev, dtype), n) for w, n in convs]
        count = sum(conv_singular_values(w, n).numel() for w, n in ws)
        t_own = seconds(lambda ws=ws: [conv_singular_values(w, n) for w, n in ws], min_run_time=args.min_run_time)
        t_norm = seconds(lambda ws=ws: [conv_operator_norm(w, n) for w, n in ws], min_run_time=args.min_run_time)
        t_32 = seconds(lambda ws=ws: [conv_singular_values(w, image) for w, _ in ws], min_run_time=0)
        print(f"  {str(dtype):14s} all {count} singular values, each conv at its input size: {t_own:7.3f} s")
        print(f"  {str(dtype):14s} operator norms only, each conv at its input size:          {t_norm:7.3f} s")
        print(f"  {str(dtype):14s} all singular values, every conv at {image}x{image}:                  {t_32:7.3f} s")

    print("\nFFT vs dense matrix (float64, all singular values)")
    print(
        f"  {'layer (O,I,kh,kw) @ n':28s} {'dense size':>11s} {'dense s':>9s} {'FFT s':>9s} {'ratio':>8s} "
        f"{'max |diff|':>10s}"
    )
    cases = [((4, 4, 3, 3), 4)] if args.smoke else [((16, 16, 3, 3), 8), ((32, 32, 3, 3), 8), ((8, 8, 3, 3), 16)]
    if args.large:
        cases.append(((16, 16, 3, 3), 16))
    for shape, n in cases:
        w = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1).to(dev)
        dense = torch.linalg.svdvals(conv_dense_matrix(w, n))
        t_dense = seconds(lambda w=w, n=n: torch.linalg.svdvals(conv_dense_matrix(w, n)), min_run_time=0)  # once
        t_fft = seconds(lambda w=w, n=n: conv_singular_values(w, n), min_run_time=args.min_run_time)
        fft = conv_singular_values(w, n)
        diff = (fft - dense[: fft.numel()]).abs().max().item()
        assert diff < 1e-9, f"FFT and dense singular values disagree by {diff:.1e} for {shape} @ {n}x{n}"
        size = shape[0] * n * n
        print(
            f"  {str(shape) + f' @ {n}x{n}':28s} {size:>5d}x{shape[1] * n * n:<5d} {t_dense:9.3f} "
            f"{t_fft:9.5f} {t_dense / t_fft:8.0f}x {diff:10.1e}"
        )

    bench_bounds(image, args.min_run_time, dev, nets)
    bench_projections(image, 8 if args.smoke else 128, args.min_run_time, dev, nets[0])


if __name__ == "__main__":
    main()
