"""Speed of the channel-directed transforms, measured side by side in one run.

    python benchmarks/bench_transforms.py [--quick] [--end-to-end] [--smoke] [--threads N]
        [--only shapes|models|step|laplacian|profile]

Per conv shape (CIFAR ResNet-56, VGG-16, one 512x512x3x3 layer), median time (benchmarks/timing.py:
torch.utils.benchmark) of:
  clone      a plain `clone()` of the gradient: the memory-bound floor
  h0         cdgrad.reweighted_h0 (out of place)
  sobolev    cdgrad.sobolev (out of place; the CPU fast path when the native kernel is available)
  reference  cdgrad's plain-PyTorch Sobolev (two cumsums along dim 0)
  published  a straightforward implementation of the published algorithm: permute the output axis last,
             repeat the mean, shift with a matmul, cumsum along the last axis, permute back
and the ratios ("in place" is the path `cdgrad.attach` takes: the kernel rewrites the gradient's own
memory).  Then whole models: every conv gradient of a ResNet-56 / VGG-16 transformed in place in one call
(as `cdgrad.attach` does) vs cloning each gradient.  Then one optimizer step's worth of work: all 55 ResNet-56
conv gradients through each transform's `transform_` (one native call) against one in-place
`torch._foreach_mul_` over the same tensors (the memory floor of a read and a write), and through the pure
functions one call each against a clone of each.  Then Laplacian smoothing (rasterised, sigma 0.5) beside
the LS-SGD algorithm of Osher et al. ported to numpy and to torch as published (FFT of the rasterised
gradient, multiplier `1 / (1 + 2 sigma (1 - cos(2 pi k / n)))` built each call).  With --end-to-end, the extra time that
`optimizer.step()` takes with the transform, as a share of a whole CIFAR ResNet-56 training iteration.
--smoke runs every measurement once at the smallest sizes, in seconds (a check that the script works, not a timing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import cdgrad
from cdgrad import functional as F
from timing import environment, interleaved, seconds


def conv_weight_shapes(name: str) -> list[tuple[int, ...]]:
    """The shapes of every conv weight of one of the toolkit's models, in order."""
    from cdgrad.experiments.models import build_model

    return [tuple(p.shape) for p in build_model(name).parameters() if p.dim() == 4]


def published_style_sobolev(f: torch.Tensor, lam: float) -> torch.Tensor:
    """The published algorithm written plainly (with the per-fiber constant fixed, so results compare)."""
    x = f.permute(*range(1, f.dim()), 0)  # output axis last
    O = x.shape[-1]
    mean = x.mean(-1, keepdim=True).repeat(*([1] * (x.dim() - 1)), O)
    c = torch.cumsum(x - mean, -1) / (lam * O * O)
    shift = torch.diag(torch.ones(O - 1, dtype=f.dtype, device=f.device), 1)  # (c @ shift)[o] = c[o-1], c[-1] = 0
    v = c.mean(-1, keepdim=True).repeat(*([1] * (x.dim() - 1)), O) - c @ shift
    u = torch.cumsum(v, -1)
    g = mean + u - u.mean(-1, keepdim=True)
    return g.permute(-1, *range(0, f.dim() - 1)).contiguous()


def ls_sgd_numpy(grad: np.ndarray, sigma: float) -> np.ndarray:
    """LS-SGD's smoothing (Osher et al.) in numpy, as published: the gradient rasterised in C order, FFT,
    multiplied by `1 / (1 + 2 sigma (1 - cos(2 pi k / n)))`, inverse FFT."""
    flat = grad.reshape(-1)
    n = flat.size
    multiplier = 1.0 / (1.0 + 2.0 * sigma * (1.0 - np.cos(2.0 * np.pi * np.arange(n // 2 + 1) / n)))
    return np.fft.irfft(np.fft.rfft(flat) * multiplier, n=n).astype(grad.dtype).reshape(grad.shape)


def ls_sgd_torch(grad: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same algorithm in torch (the published optimizer's step, one parameter)."""
    flat = grad.reshape(-1)
    n = flat.numel()
    k = torch.arange(n // 2 + 1, dtype=grad.dtype)
    multiplier = 1.0 / (1.0 + 2.0 * sigma * (1.0 - torch.cos(2.0 * torch.pi * k / n)))
    return torch.fft.irfft(torch.fft.rfft(flat) * multiplier, n=n).reshape(grad.shape)


def laplacian_vs_peers(shapes, min_time, rounds, sigma=0.5):
    print(
        "| shape | laplacian_smooth us | LS-SGD numpy us | LS-SGD torch us | numpy/cdgrad | torch/cdgrad |\n"
        "|---|---|---|---|---|---|"
    )
    for shape in shapes:
        g = torch.randn(shape)
        a = g.numpy()
        ours = cdgrad.laplacian_smooth(g, sigma)
        assert torch.allclose(ours, torch.from_numpy(ls_sgd_numpy(a, sigma)), atol=1e-5), shape
        assert torch.allclose(ours, ls_sgd_torch(g, sigma), atol=1e-5), shape
        t = interleaved(
            {
                "ours": lambda g=g: cdgrad.laplacian_smooth(g, sigma),
                "numpy": lambda a=a: ls_sgd_numpy(a, sigma),
                "torch": lambda g=g: ls_sgd_torch(g, sigma),
            },
            rounds=rounds,
            min_run_time=min_time,
        )
        print(
            f"| {'x'.join(map(str, shape))} | {t['ours'] * 1e6:.1f} | {t['numpy'] * 1e6:.1f} | "
            f"{t['torch'] * 1e6:.1f} | {t['numpy'] / t['ours']:.2f} | {t['torch'] / t['ours']:.2f} |"
        )


def one_step(shapes, min_time, rounds):
    """All conv gradients of a model through each transform: transform_ (in place) vs one _foreach_mul_ pass,
    and the pure function one call each vs a clone of each (every variant timed in interleaved rounds)."""
    grads = [torch.randn(s) for s in shapes]
    work = [g.clone() for g in grads]
    transforms = {
        "sobolev": (cdgrad.ChannelDirected("sobolev", 1.0, 0.1), lambda g: cdgrad.sobolev(g, 1.0)),
        "h0": (cdgrad.ChannelDirected("h0", 2.0), lambda g: cdgrad.reweighted_h0(g, 2.0)),
        "laplacian (flat)": (cdgrad.LaplacianSmoothing(0.5), lambda g: cdgrad.laplacian_smooth(g, 0.5)),
        "laplacian (output)": (
            cdgrad.LaplacianSmoothing(0.5, "output"),
            lambda g: cdgrad.laplacian_smooth(g, 0.5, 0),
        ),
        "centralize": (cdgrad.Centralize(), cdgrad.centralize),
    }
    fns = {
        "refill": lambda: torch._foreach_copy_(work, grads),
        "floor": lambda: torch._foreach_mul_(work, 1.0),
        "clone": lambda: [g.clone() for g in grads],
    }
    for name, (t, pure) in transforms.items():

        def run(t=t):
            torch._foreach_copy_(work, grads)  # in place, as attach() runs it: refilled each call
            t.transform_(work, work)

        fns[name + " in place"] = run
        fns[name + " pure"] = lambda pure=pure: [pure(g) for g in grads]
    s = interleaved(fns, rounds=rounds, min_run_time=min_time)
    print(
        f"\n{len(grads)} tensors, {sum(g.numel() for g in grads) / 1e6:.2f} M: _foreach_mul_ {s['floor'] * 1e6:.0f} "
        f"us, clone each {s['clone'] * 1e6:.0f} us (medians of {rounds} interleaved rounds)\n"
    )
    print("| transform | transform_ us | transform_/foreach_mul_ | pure, one call each us | pure/clone | us a call |")
    print("|---|---|---|---|---|---|")
    for name in transforms:
        t_in, t_pure = s[name + " in place"] - s["refill"], s[name + " pure"]
        print(
            f"| {name} | {t_in * 1e6:.0f} | {t_in / s['floor']:.2f} | {t_pure * 1e6:.0f} | {t_pure / s['clone']:.2f} | "
            f"{t_pure / len(grads) * 1e6:.1f} |"
        )


def profile_small_call(min_time, shape=(16, 16, 3, 3)):
    """Where the time of one pure call on a small gradient goes: each stage of `cdgrad.sobolev` timed alone."""
    from cdgrad import _native
    from cdgrad.validation import check_grad, check_positive, check_real

    g = torch.randn(shape)
    out = torch.empty_like(g)
    b, n, m = 1, g.shape[0], g.numel() // g.shape[0]
    threads = torch.get_num_threads()
    job = _native.Jobs.static(b, n, m, 1.0 / (n * n), 0.0, _native.SOBOLEV, False)
    stages = {
        "the whole call: cdgrad.sobolev(g, 1.0), replayed (validated before)": lambda: cdgrad.sobolev(g, 1.0),
        "the validated path of a first call (checks, route, job lookup, kernel)": lambda: F.channel_directed_checked(
            check_grad(g), F.check_metric("sobolev"), check_positive(1.0, "lam"), check_real(0.0, "beta"), 0
        ),
        "validation alone (grad, metric, lam, beta, dim)": lambda: (
            check_grad(g),
            F.check_metric("sobolev"),
            check_positive(1.0, "lam"),
            check_real(0.0, "beta"),
            F.check_dim(0, g),
        ),
        "route (kernel usable, exact tensor on the CPU)": lambda: F.route(g),
        "the output tensor (empty_like)": lambda: torch.empty_like(g),
        "the kernel call (ctypes, the job packed)": lambda: _native.run_one(g.data_ptr(), out.data_ptr(), job, threads),
        "for scale: g.clone()": lambda: g.clone(),
    }
    print(f"\n| stage of one pure call, {'x'.join(map(str, shape))} | us |\n|---|---|")
    for name, fn in stages.items():
        print(f"| {name} | {seconds(fn, min_run_time=min_time) * 1e6:.2f} |")


def per_shape(shapes, min_time, rounds=1):
    print(
        "| shape | clone us | h0 us | sobolev us | sobolev in place us | reference us | published us | h0/clone "
        "| sobolev/clone | in place/clone | published/sobolev |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        g = torch.randn(shape)
        expected = published_style_sobolev(g.double(), 1.0)
        assert torch.allclose(cdgrad.sobolev(g.double(), 1.0), expected, atol=1e-12), shape
        work = g.clone()
        # In place, as attach() runs it: refill the buffer each call (repeated smoothing would drive the
        # values into float32 denormals), and subtract the refill.
        t = interleaved(
            {
                "refill": lambda g=g, w=work: w.copy_(g),
                "clone": lambda g=g: g.clone(),
                "h0": lambda g=g: cdgrad.reweighted_h0(g, 2.0),
                "sobolev": lambda g=g: cdgrad.sobolev(g, 1.0),
                "inplace": lambda g=g, w=work: F.channel_directed_([w.copy_(g)], "sobolev", 1.0, 0.0, 0),
                "reference": lambda g=g: F.sobolev_reference(g, 1.0),
                "published": lambda g=g: published_style_sobolev(g, 1.0),
            },
            rounds=rounds,
            min_run_time=min_time,
        )
        t["inplace"] -= t.pop("refill")
        us = {k: v * 1e6 for k, v in t.items()}
        print(
            f"| {'x'.join(map(str, shape))} | {us['clone']:.1f} | {us['h0']:.1f} | {us['sobolev']:.1f} | "
            f"{us['inplace']:.1f} | {us['reference']:.1f} | {us['published']:.1f} | {t['h0'] / t['clone']:.2f} | "
            f"{t['sobolev'] / t['clone']:.2f} | {t['inplace'] / t['clone']:.2f} | "
            f"{t['published'] / t['sobolev']:.1f} |"
        )


def whole_model(name, shapes, min_time):
    """Every conv gradient of a model transformed in place in one call, as attach() does."""
    grads = [torch.randn(s) for s in shapes]
    work = [g.clone() for g in grads]
    numel = sum(g.numel() for g in grads)
    refill = seconds(lambda: torch._foreach_copy_(work, grads), min_run_time=min_time)

    def transformed(metric, lam, beta):
        def run():
            torch._foreach_copy_(work, grads)
            F.channel_directed_(work, metric, lam, beta, 0)

        return seconds(run, min_run_time=min_time) - refill

    t_clone = seconds(lambda: [g.clone() for g in grads], min_run_time=min_time)
    t_h0 = transformed("h0", 2.0, 0.0)
    t_sob = transformed("sobolev", 1.0, 0.1)
    t_pub = seconds(lambda: [published_style_sobolev(g, 1.0) for g in grads], min_run_time=min_time)
    print(
        f"| {name} ({len(grads)} tensors, {numel / 1e6:.2f} M) | {t_clone * 1e6:.0f} | "
        f"{t_h0 * 1e6:.0f} | {t_sob * 1e6:.0f} | {t_pub * 1e6:.0f} | {t_h0 / t_clone:.2f} | "
        f"{t_sob / t_clone:.2f} | {t_pub / t_sob:.1f} |"
    )


def end_to_end(batch_size=8, iterations=40, warmup=3):
    """Three identical ResNet-56 + SGD set-ups (none, H0, Sobolev), attached once, timed interleaved."""
    import copy

    from cdgrad.experiments.models import build_model

    torch.manual_seed(0)
    base = build_model("resnet56")
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))
    setups = {}
    for name, transform in {
        "none": None,
        "h0": cdgrad.ChannelDirected("h0", 2.0),
        "sobolev": cdgrad.ChannelDirected("sobolev", 1.0, 0.1),
    }.items():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if transform is not None:
            cdgrad.attach(opt, transform)
        setups[name] = (model, opt)
    step_times = {k: [] for k in setups}
    iter_times = []
    for it in range(iterations + warmup):
        for name, (model, opt) in setups.items():  # interleaved, so drift affects every variant alike
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if it >= warmup:
                step_times[name].append(t2 - t1)
                if name == "none":
                    iter_times.append(t2 - t0)
    it_med = statistics.median(iter_times)
    base_step = statistics.median(step_times["none"])
    print(
        f"ResNet-56, batch {batch_size}, SGD (momentum, weight decay): median iteration {it_med * 1e3:.1f} ms, "
        f"optimizer.step() {base_step * 1e3:.2f} ms"
    )
    for name in ("h0", "sobolev"):
        step = statistics.median(step_times[name])
        print(
            f"  {name}: step {step * 1e3:.2f} ms, extra {(step - base_step) * 1e3:.3f} ms "
            f"= {100 * (step - base_step) / it_med:.2f}% of an iteration"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    parser.add_argument("--end-to-end", action="store_true", help="also time a ResNet-56 training iteration")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[8],
        metavar="B",
        help="batch sizes of the end-to-end measurement (default: 8)",
    )
    parser.add_argument("--iterations", type=int, default=40, help="timed iterations per set-up end to end")
    parser.add_argument("--smoke", action="store_true", help="every measurement once, smallest sizes, in seconds")
    parser.add_argument(
        "--only",
        choices=("shapes", "models", "step", "laplacian", "profile"),
        help="run one part only (default: all)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of every table")
    parser.add_argument("--shapes", nargs="+", metavar="OxIxKxK", help="per-shape and LS-SGD tables: these shapes only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = 0.1 if args.quick else 0.5
    rounds = 1 if args.smoke else args.rounds
    if args.smoke:  # every code path above, on the two smallest shapes, ResNet-56 and two iterations end to end
        min_time = 0.0
        args.end_to_end, args.batch_sizes, args.iterations = True, [2], 2
    print(environment() + "\n")
    resnet56, vgg16 = conv_weight_shapes("resnet56"), conv_weight_shapes("vgg16")
    shapes = sorted(set(resnet56 + vgg16), key=lambda s: (s[0], s[1]))
    if args.shapes:
        shapes = [tuple(int(d) for d in text.split("x")) for text in args.shapes]
    part = args.only
    if part in (None, "shapes"):
        per_shape(shapes[:2] if args.smoke else shapes, min(min_time, 0.1), rounds)
    if part in (None, "models"):
        print(
            "\n| all conv gradients, in place in one call | clone each us | h0 us | sobolev us | published us "
            "| h0/clone | sobolev/clone | published/sobolev |"
        )
        print("|---|---|---|---|---|---|---|---|")
        whole_model("ResNet-56", resnet56, min_time)
        if not args.smoke:
            whole_model("VGG-16", vgg16, min_time)
    if part in (None, "step"):
        one_step(resnet56, min(min_time, 0.1), rounds)
    if part in (None, "laplacian"):
        print()
        laplacian_vs_peers(shapes[:2] if args.smoke else shapes, min(min_time, 0.1), rounds)
    if part in (None, "profile"):
        profile_small_call(min_time)
    if args.end_to_end:
        for batch_size in args.batch_sizes:
            print()
            end_to_end(batch_size, args.iterations, 1 if args.smoke else 3)


if __name__ == "__main__":
    main()
