"""Benchmark: exact conv singular values by FFT (Sedghi et al.) against the dense matrix.

    PYTHONPATH=src python benchmarks/bench_spectral.py [--device cpu|cuda] [--threads N] [--repeats R] [--large]
    PYTHONPATH=src python benchmarks/bench_spectral.py --smoke   # both parts once, smallest sizes: seconds

Part 1 computes all singular values of every conv of a CIFAR ResNet-56 (``build_model("resnet56")``,
55 convs), with each conv at the spatial size of its own input for a 32x32 image (recorded by
``record_input_sizes``), and again with every conv at 32x32.
Part 2 compares the FFT method with the SVD of the dense (O n^2) x (I n^2) matrix where the latter
is feasible, and checks that the two agree; ``--large`` adds a 4096 x 4096 dense case (minutes on CPU).
``--smoke`` runs both parts once at the smallest sizes (16x16 images, one small dense case), in seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from cdgrad.experiments.models import build_model
from cdgrad.spectral import conv_dense_matrix, conv_operator_norm, conv_singular_values, record_input_sizes


def resnet56_convs(image: int = 32) -> list[tuple[str, torch.Tensor, tuple[int, int]]]:
    """(name, initial weight, input size) of every conv of the CIFAR ResNet-56 (shortcut A: 55 convs)."""
    torch.manual_seed(0)
    model = build_model("resnet56", image_size=image)
    sizes = record_input_sizes(model, torch.zeros(1, 3, image, image))
    modules = dict(model.named_modules())
    return [(name, modules[name].weight.detach().clone(), size) for name, size in sizes.items()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` runs of ``fn`` (after one warm-up run when repeats > 1)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs for the fast timings")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--large", action="store_true", help="add the 16x16x3x3 @ 16x16 dense case")
    parser.add_argument("--smoke", action="store_true", help="both parts once at the smallest sizes, in seconds")
    args = parser.parse_args()
    image = 16 if args.smoke else 32
    if args.smoke:
        args.repeats, args.large = 1, False
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")

    gen = torch.Generator().manual_seed(0)
    convs = [(w, n) for _, w, n in resnet56_convs(image)]
    print(f"\nResNet-56: {len(convs)} convs, {sum(w.numel() for w, _ in convs)} conv weights, {image}x{image} images")
    for dtype in (torch.float32, torch.float64):
        ws = [(w.to(dev, dtype), n) for w, n in convs]
        count = sum(conv_singular_values(w, n).numel() for w, n in ws)
        t_own = timed(lambda ws=ws: [conv_singular_values(w, n) for w, n in ws], dev, args.repeats)
        t_norm = timed(lambda ws=ws: [conv_operator_norm(w, n) for w, n in ws], dev, args.repeats)
        t_32 = timed(lambda ws=ws: [conv_singular_values(w, image) for w, _ in ws], dev, 1)
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
        sync(dev)
        t = time.perf_counter()
        dense = torch.linalg.svdvals(conv_dense_matrix(w, n))
        sync(dev)
        t_dense = time.perf_counter() - t
        t_fft = timed(lambda w=w, n=n: conv_singular_values(w, n), dev, max(args.repeats, 3))
        fft = conv_singular_values(w, n)
        diff = (fft - dense[: fft.numel()]).abs().max().item()
        assert diff < 1e-9, f"FFT and dense singular values disagree by {diff:.1e} for {shape} @ {n}x{n}"
        size = shape[0] * n * n
        print(
            f"  {str(shape) + f' @ {n}x{n}':28s} {size:>5d}x{shape[1] * n * n:<5d} {t_dense:9.3f} "
            f"{t_fft:9.5f} {t_dense / t_fft:8.0f}x {diff:10.1e}"
        )


if __name__ == "__main__":
    main()
