"""The transforms and the training-step overhead on a GPU, CUDA-synchronised, every variant side by side in one run.

    python benchmarks/bench_gpu.py [--device cuda] [--only kernels|step] [--out DIR] [--budget-s S] [--smoke]

kernels: per conv shape of ResNet-56 and VGG-16 (from `cdgrad.experiments.models.build_model`), median time
(benchmarks/timing.py: `torch.utils.benchmark`, which synchronises CUDA around every block of calls) of
  clone        `g.clone()`: the memory-bound floor
  h0, sobolev, ls, centralize
               the pure functions (`cdgrad.reweighted_h0` lam 2, `cdgrad.sobolev` lam 1, `cdgrad.laplacian_smooth`
               sigma 1, `cdgrad.centralize`), out of place
  *_           the same methods in place, as `cdgrad.attach` runs them: `transform_` of `ChannelDirected`,
               `LaplacianSmoothing`, `Centralize` (a refill of the buffer before each call, its time subtracted)
  reference    `cdgrad.functional.sobolev_reference` (two cumsums: the path every non-CPU tensor takes), eager
  compiled     the same function under `torch.compile` (inductor: fused GPU kernels), one graph per shape
  published    the published algorithm (`published_style_sobolev` of benchmarks/bench_transforms.py)
and whole models: every conv gradient of a ResNet-56 (55 tensors) and a VGG-16 (13) transformed in place, against
one `torch._foreach_mul_` pass over the same tensors.  Results are checked first: the published algorithm against
`cdgrad.sobolev` in float64, the compiled reference against the eager one in float32.

step: ResNet-56 at batch 128 with SGD (momentum 0.9, weight decay 5e-4), plain and with H0 and Sobolev attached
(`cdgrad.attach`), three identical set-ups timed in interleaved rounds (the order rotating): a whole iteration
(synchronised at its ends only, as training runs) and `optimizer.step()` alone (synchronised around it); the
overhead is the difference of median iterations over the plain median.  Goal: at most 2%.

--out DIR writes DIR/gpu_bench.json and DIR/gpu_bench.md after every row (a run cut short keeps what it measured);
--only merges its part into the files already there.  --budget-s S: once S seconds have passed, the compiled
cells left are skipped (compiling costs seconds per shape).  --smoke: the two smallest shapes and ResNet-56's
gradients, one call per cell, `torch.compile` with the "eager" backend, two rounds of a ResNet-8 at batch 2:
every path in seconds, numbers meaningless.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import cdgrad
from bench_transforms import conv_weight_shapes, published_style_sobolev
from cdgrad import functional as F
from timing import environment, seconds

METHODS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], cdgrad.GradientTransform]] = {
    "h0": (lambda g: cdgrad.reweighted_h0(g, 2.0), cdgrad.ChannelDirected("h0", 2.0)),
    "sobolev": (lambda g: cdgrad.sobolev(g, 1.0), cdgrad.ChannelDirected("sobolev", 1.0)),
    "ls": (lambda g: cdgrad.laplacian_smooth(g, 1.0), cdgrad.LaplacianSmoothing(1.0)),
    "centralize": (cdgrad.centralize, cdgrad.Centralize()),
}
MODELS = {"ResNet-56": "resnet56", "VGG-16": "vgg16"}
# the largest differences accepted between two computations of the same Sobolev gradient of randn data
TOLERANCE = {"published - sobolev, float64": 1e-12, "compiled - reference, float32": 1e-4}


class Bench:
    """The settings of one run and its result document, written to `out` after every change."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.min_time, self.smoke, self.out = args.min_time, args.smoke, args.out
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
        self.result: dict[str, Any] = {}
        self.compiled_shapes: set[tuple[int, ...]] = set()  # shapes compiled and checked
        path = os.path.join(self.out, "gpu_bench.json") if self.out else None
        if path and args.only and os.path.exists(path):
            with open(path) as fh:
                self.result = json.load(fh)
        self.result.update(environment=environment(self.device) + cuda_line(self.device), smoke=self.smoke)
        self.result.setdefault("commands", []).append("python " + " ".join(sys.argv))

    def time(self, fn: Callable[[], Any]) -> float:
        """Median microseconds per call."""
        return seconds(fn, min_run_time=self.min_time) * 1e6

    def save(self) -> None:
        if not self.out:
            return
        os.makedirs(self.out, exist_ok=True)
        for name, text in (
            ("gpu_bench.json", json.dumps(self.result, indent=1)),
            ("gpu_bench.md", markdown(self.result)),
        ):
            tmp = os.path.join(self.out, name + ".tmp")
            with open(tmp, "w") as fh:
                fh.write(text + "\n")
            os.replace(tmp, os.path.join(self.out, name))


def cuda_line(device: torch.device) -> str:
    return f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


# ------------------------------------------------------------------------------------------------ kernels
def make_compiled(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`sobolev_reference(g, 1)` under torch.compile: one static graph per shape, all kept (no eager fallback)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 4096)
    compiled = torch.compile(F.sobolev_reference, backend=backend, dynamic=False, fullgraph=True)
    return lambda g: compiled(g, 1.0, 0, 0.0)


def per_layer(bench: Bench, shape: tuple[int, ...], models: list[str], compiled: Any, notes: list[str]) -> dict:
    dev = bench.device
    gen = torch.Generator(device=dev).manual_seed(0)
    g = torch.randn(shape, device=dev, generator=gen)
    label = "x".join(map(str, shape))
    g64 = g.double()
    diff = published_style_sobolev(g64, 1.0) - cdgrad.sobolev(g64, 1.0)
    checks = {"published - sobolev, float64": diff.abs().max().item()}
    work = g.clone()
    us: dict[str, float | None] = {"clone": bench.time(lambda: g.clone())}
    refill = bench.time(lambda: work.copy_(g))
    for name, (pure, transform) in METHODS.items():
        us[name] = bench.time(lambda pure=pure: pure(g))
        us[name + "_"] = bench.time(lambda t=transform: t.transform_([work.copy_(g)], [work])) - refill
    us["reference"] = bench.time(lambda: F.sobolev_reference(g, 1.0))
    us["published"] = bench.time(lambda: published_style_sobolev(g, 1.0))
    us["compiled"], compile_s = None, None
    if compiled is not None and time.monotonic() < bench.deadline:
        try:
            t0 = time.perf_counter()
            out = compiled(g)
            sync(dev)
            compile_s = time.perf_counter() - t0
            checks["compiled - reference, float32"] = (out - F.sobolev_reference(g, 1.0)).abs().max().item()
            us["compiled"] = bench.time(lambda: compiled(g))
            bench.compiled_shapes.add(tuple(shape))
        except Exception as exc:  # a backend that cannot compile here: the rest of the run goes on
            notes.append(f"{label}: torch.compile failed ({first_line(exc)})")
    elif compiled is not None:
        notes.append(f"{label}: not compiled (--budget-s spent)")
    for what, err in checks.items():
        if not err <= TOLERANCE[what]:
            notes.append(f"{label}: CHECK FAILED: max |{what}| = {err:.3g} > {TOLERANCE[what]}")
    return {"shape": list(shape), "models": models, "us": us, "compile_s": compile_s, "max_abs_diff": checks}


def whole_model(bench: Bench, label: str, shapes: list[tuple[int, ...]], compiled: Any) -> dict:
    dev = bench.device
    gen = torch.Generator(device=dev).manual_seed(1)
    grads = [torch.randn(s, device=dev, generator=gen) for s in shapes]
    work = [g.clone() for g in grads]
    us: dict[str, float | None] = {"foreach_mul": bench.time(lambda: torch._foreach_mul_(work, 1.0))}
    refill = bench.time(lambda: torch._foreach_copy_(work, grads))

    def in_place(transform: cdgrad.GradientTransform) -> float:
        def run() -> None:
            torch._foreach_copy_(work, grads)
            transform.transform_(work, work)

        return bench.time(run) - refill

    for name, (_, transform) in METHODS.items():
        us[name + "_"] = in_place(transform)
    us["reference"] = bench.time(lambda: [F.sobolev_reference(g, 1.0) for g in grads])
    us["published"] = bench.time(lambda: [published_style_sobolev(g, 1.0) for g in grads])
    ready = compiled is not None and (bench.smoke or all(tuple(g.shape) in bench.compiled_shapes for g in grads))
    us["compiled"] = bench.time(lambda: [compiled(g) for g in grads]) if ready else None
    numel = sum(g.numel() for g in grads)
    return {"model": label, "tensors": len(grads), "numel": numel, "us": us}


def kernels(bench: Bench, backend: str) -> None:
    shapes_of = {label: conv_weight_shapes(name) for label, name in MODELS.items()}
    unique = sorted({s for shapes in shapes_of.values() for s in shapes}, key=lambda s: (s[0], s[1]))
    if bench.smoke:
        unique = unique[:2]
    notes: list[str] = []
    section: dict[str, Any] = {"min_run_time_s": bench.min_time, "compile_backend": backend, "layers": []}
    section.update(models=[], notes=notes)
    bench.result["kernels"] = section
    compiled = None
    try:
        compiled = make_compiled(backend)
    except Exception as exc:
        notes.append(f"torch.compile unavailable ({first_line(exc)})")
    for shape in unique:
        models = [label for label, shapes in shapes_of.items() if shape in shapes]
        section["layers"].append(per_layer(bench, shape, models, compiled, notes))
        bench.save()
    for label, shapes in shapes_of.items():
        if bench.smoke and label != "ResNet-56":
            continue
        section["models"].append(whole_model(bench, label, shapes, compiled))
        bench.save()


# --------------------------------------------------------------------------------------------------- step
def step_overhead(bench: Bench, batch: int, rounds: int, warmup: int) -> None:
    """Three identical ResNet-56 + SGD set-ups (none, H0, Sobolev), attached once, timed in interleaved rounds
    (--smoke: ResNet-8)."""
    from cdgrad.experiments.models import build_model

    dev = bench.device
    torch.manual_seed(0)
    label, arch = ("ResNet-8", "resnet8") if bench.smoke else ("ResNet-56", "resnet56")
    base = build_model(arch).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    transforms = {"none": None, "h0": cdgrad.ChannelDirected("h0", 2.0)}
    transforms["sobolev"] = cdgrad.ChannelDirected("sobolev", 1.0, 0.1)
    setups = {}
    for name, transform in transforms.items():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if transform is not None:
            cdgrad.attach(opt, transform)
        setups[name] = (model, opt)

    def iteration(model: torch.nn.Module, opt: torch.optim.Optimizer, split: bool) -> tuple[float, float]:
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if split:
            sync(dev)
        t1 = time.perf_counter()
        opt.step()
        sync(dev)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    iters: dict[str, list[float]] = {k: [] for k in setups}
    steps: dict[str, list[float]] = {k: [] for k in setups}
    names = list(setups)
    for r in range(warmup + rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: no set-up always runs first
            whole, _ = iteration(*setups[name], split=False)
            _, step = iteration(*setups[name], split=True)
            if r >= warmup:
                iters[name].append(whole)
                steps[name].append(step)
    med: dict[str, dict[str, float]] = {
        k: {"iteration_ms": statistics.median(iters[k]) * 1e3, "step_ms": statistics.median(steps[k]) * 1e3}
        for k in setups
    }
    base_it = med["none"]["iteration_ms"]
    for k in ("h0", "sobolev"):
        med[k]["overhead_pct"] = 100 * (med[k]["iteration_ms"] - base_it) / base_it
        med[k]["step_extra_pct"] = 100 * (med[k]["step_ms"] - med["none"]["step_ms"]) / base_it
    bench.result["step"] = {
        "model": label,
        "batch": batch,
        "rounds": rounds,
        "warmup": warmup,
        "goal_pct": 2.0,
        "setups": med,
    }
    bench.save()


# ----------------------------------------------------------------------------------------------- markdown
def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _r(a: Any, b: Any) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(result: dict[str, Any]) -> str:
    """The result document as Markdown tables (times in microseconds, medians)."""
    smoke = " (--smoke: not a measurement)" if result["smoke"] else ""
    lines = [f"Measured on: {result['environment']}{smoke}", ""]
    lines.append("Commands: " + "; ".join(f"`{c}`" for c in result.get("commands", [])))
    k = result.get("kernels")
    if k:
        names = ["clone", *METHODS, *(m + "_" for m in METHODS)]
        lines += ["", f"### Per layer, us per call (torch.compile backend: {k['compile_backend']})", ""]
        header = ["shape", "models", *(n.replace("_", " in place") for n in names)]
        rows = [
            ["x".join(map(str, r["shape"])), ", ".join(r["models"]), *(_f(r["us"][n]) for n in names)]
            for r in k["layers"]
        ]
        lines += _table(header, rows)
        header = ["shape", "reference us", "compiled us", "published us", "compile s", "sobolev in place / clone"]
        header += ["reference / compiled", "published / sobolev in place", "published / compiled"]
        rows = []
        for r in k["layers"]:
            us = r["us"]
            rows.append(
                ["x".join(map(str, r["shape"])), _f(us["reference"]), _f(us["compiled"]), _f(us["published"])]
                + [_f(r["compile_s"]), _r(us["sobolev_"], us["clone"]), _r(us["reference"], us["compiled"])]
                + [_r(us["published"], us["sobolev_"]), _r(us["published"], us["compiled"])]
            )
        lines += ["", *_table(header, rows)]
        cols = ["foreach_mul", *(m + "_" for m in METHODS), "reference", "compiled", "published"]
        lines += ["", "### Every conv gradient of a model in place, us per pass", ""]
        header = ["model", "_foreach_mul_", *(c.replace("_", " in place") for c in cols[1:])]
        header += ["h0 / mul", "sobolev / mul", "published / sobolev"]
        rows = []
        for r in k["models"]:
            us = r["us"]
            label = f"{r['model']} ({r['tensors']} tensors, {r['numel'] / 1e6:.2f} M)"
            rows.append(
                [label, *(_f(us[c], 0) for c in cols), _r(us["h0_"], us["foreach_mul"])]
                + [_r(us["sobolev_"], us["foreach_mul"]), _r(us["published"], us["sobolev_"])]
            )
        lines += _table(header, rows)
        if k["notes"]:
            lines += ["", *(f"- {n}" for n in k["notes"])]
    s = result.get("step")
    if s:
        lines += ["", f"### Training step, {s['model']} at batch {s['batch']}, SGD, {s['rounds']} interleaved rounds"]
        lines += [f"(medians; goal: at most {s['goal_pct']:.0f}% overhead)", ""]
        header = ["method", "iteration ms", "step() alone ms", "overhead of the iteration"]
        header += ["step() extra, % of the iteration", "goal met"]
        rows = []
        for name, m in s["setups"].items():
            over = m.get("overhead_pct")
            met = "-" if over is None else ("yes" if over <= s["goal_pct"] else "no")
            pct = "-" if over is None else f"{over:.2f}%"
            extra = "-" if over is None else f"{m['step_extra_pct']:.2f}%"
            rows.append([name, f"{m['iteration_ms']:.2f}", f"{m['step_ms']:.3f}", pct, extra, met])
        lines += _table(header, rows)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=("kernels", "step"), default=None, help="run one part (default: both)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write gpu_bench.json and gpu_bench.md here")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of calls per timed cell (default 0.1)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip compiling once S seconds have passed")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the step measurement (default 128)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 100 on CUDA, 10 elsewhere)")
    parser.add_argument("--smoke", action="store_true", help="every path once at the smallest sizes, in seconds")
    args = parser.parse_args()
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device; accepted: cpu, cuda, cuda:N")
    rounds = args.rounds or (100 if args.device.startswith("cuda") else 10)
    warmup = 10 if args.device.startswith("cuda") else 2
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.smoke:
        args.min_time, args.batch, rounds, warmup = 0.0, 2, 1, 1
    bench = Bench(args)
    print(bench.result["environment"], flush=True)
    if args.only in (None, "kernels"):
        kernels(bench, backend)
    if args.only in (None, "step"):
        step_overhead(bench, args.batch, rounds, warmup)
    print(markdown(bench.result))


if __name__ == "__main__":
    main()
