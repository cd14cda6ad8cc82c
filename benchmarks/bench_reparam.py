"""The SGS paper's cost claim, measured: a training step of the plain model, of each re-parameterised model, and of the
plain model with SGS (its periodic measurement amortised), side by side in one run.

    PYTHONPATH=src python benchmarks/bench_reparam.py [--models resnet18 vgg11] [--batch-size 128] [--threads 2]
    PYTHONPATH=src python benchmarks/bench_reparam.py --smoke   # every variant once, small sizes: seconds

For each model (CIFAR-sized 32x32 inputs, 100 classes): one SGD training step (forward, cross-entropy, backward,
momentum step) of the plain network, the network with ACB, RepVGG and DBB blocks, and the plain network with SGS
attached; the median per step (`torch.utils.benchmark`, benchmarks/timing.py). SGS's measurement (the authors'
pipeline: an eval-mode pass over 2 batches, then every layer's G) is timed on its own and amortised over the steps
between two measurements (every 5 epochs of CIFAR's 391 steps: 1,955 steps). The plain network is timed first and
again last (the faster of the two is the reference of the ratios: a variant timed after larger ones reuses memory
the allocator kept mapped). Memory: the bytes autograd saves for the
backward pass of one step (exact, from saved-tensor hooks) plus parameters, gradients and momentum buffers; on a GPU
also the allocator's peak. Beside them, a plain copy of the parameters: the memory-bound floor.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import cdgrad
from cdgrad.experiments.models import build_model
from cdgrad.sgs import SpatialGradientScaling
from timing import environment, seconds

# plain is measured first and again last: the C allocator serves later steps from memory earlier (larger) variants
# left mapped, so a variant measured later can look faster than it is; the ratios use the faster plain timing
KINDS = ("plain", "acb", "repvgg", "dbb", "sgs", "plain")
STEPS_BETWEEN_MEASUREMENTS = 5 * 391  # every 5 epochs of CIFAR at batch 128


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during one call of `step` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    momentum = sum(v.numel() * v.element_size() for v in tensors)
    return 2 * params + buffers + momentum  # weights and gradients, BN statistics, momentum


def setup(name: str, kind: str, device: torch.device, batch: int, image: int):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100, image_size=image)
    if kind in ("acb", "repvgg", "dbb"):
        cdgrad.reparam.reparameterize(model, kind)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sgs = None
    if kind == "sgs":
        sgs = SpatialGradientScaling(model, pipeline="authors")
        cdgrad.attach(opt, sgs)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return model, opt, sgs, step, x


def bench(name: str, args: argparse.Namespace, device: torch.device) -> None:
    print(f"\n{name}, batch {args.batch_size}, {args.image}x{args.image}, 100 classes")
    rows = []
    for index, kind in enumerate(KINDS):
        model, opt, sgs, step, x = setup(name, kind, device, args.batch_size, args.image)
        step()  # momentum buffers exist from here on
        t = seconds(step, min_run_time=args.min_run_time)
        extra = ""
        if sgs is not None:
            t_measure = seconds(lambda sgs=sgs, x=x: sgs.measure([x, x]), min_run_time=args.min_run_time)
            t += t_measure / STEPS_BETWEEN_MEASUREMENTS
            extra = f" (measurement {1e3 * t_measure:.0f} ms, amortised over {STEPS_BETWEEN_MEASUREMENTS} steps)"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
        else:
            peak = "-"
        saved = saved_bytes(step) / 2**20
        state = state_bytes(model, opt) / 2**20
        count = sum(p.numel() for p in model.parameters()) / 1e6
        label = kind + (" (again, last)" if kind == "plain" and index else "") + extra
        rows.append((kind, label, count, t, saved, state, peak))
    base = min(t for kind, _, _, t, *_ in rows if kind == "plain")
    print("| variant | parameters (M) | step ms | / plain | saved for backward MiB | state MiB | peak MiB (GPU) |")
    print("|---|---|---|---|---|---|---|")
    for _, label, count, t, saved, state, peak in rows:
        print(f"| {label} | {count:.2f} | {1e3 * t:.1f} | {t / base:.2f} | {saved:.0f} | {state:.0f} | {peak} |")
    params = [p.detach().clone() for p in setup(name, "plain", device, 2, args.image)[0].parameters()]
    t_copy = seconds(lambda: [p.clone() for p in params], min_run_time=args.min_run_time)
    print(f"plain copy of the parameters: {1e3 * t_copy:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "vgg11"], help="toolkit model names")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image", type=int, default=32, help="image side")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds spent timing each variant")
    ap.add_argument("--smoke", action="store_true", help="every variant once on ResNet-8, batch 4, 16x16: seconds")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.batch_size, args.image, args.min_run_time = ["resnet8"], 4, 16, 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(environment(device))
    for name in args.models:
        bench(name, args, device)


if __name__ == "__main__":
    main()
