"""Channel-directed gradients on FSDP2-sharded gradients: sharded solve vs gather-then-transform.

Every process holds the `Shard(0)` DTensor gradients of a stack of wide convolutions (as FSDP2 leaves them) and
applies the output-direction transform to all of them, once per step, in two ways:

* sharded: `cdgrad.distributed.channel_directed_dtensor_` (one collective of float64 column statistics per layer);
* gather:  `full_tensor()` of each gradient, the single-process transform on the full tensor, keep the local rows.

Bytes are counted from the collectives actually issued (a dispatch mode records the input tensor of every c10d and
functional collective): "sent" is what this rank contributes; "received" is what it gets under the usual ring
algorithms: (W-1)*b for an all-gather of b bytes per rank, 2(W-1)/W*b for an all-reduce of b bytes.

    PYTHONPATH=src python benchmarks/bench_distributed.py --world 2 --layers 4 --channels 512
    PYTHONPATH=src python benchmarks/bench_distributed.py --smoke   # 2 processes, one 8x8x3x3 layer: seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from cdgrad import distributed as D
from cdgrad.experiments import launch

_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier")


class CollectiveBytes(TorchDispatchMode):
    """Records (op, kind, input bytes) for every collective dispatched inside the block."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.records: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace in _COLLECTIVE_NAMESPACES and not name.startswith(_NOT_COLLECTIVES):
            # c10d._allgather_base_(output, input, ...) has its input second; the others first
            src = args[1] if name == "_allgather_base_" else args[0]
            tensors = src if isinstance(src, (list, tuple)) else [src]
            nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            kind = "all_gather" if "gather" in name else "all_reduce" if "reduce" in name else name
            self.records.append((name, kind, nbytes))
        return func(*args, **(kwargs or {}))

    def sent(self) -> int:
        return sum(b for _, _, b in self.records)

    def received(self) -> float:
        w = self.world
        total = 0.0
        for _, kind, b in self.records:
            total += (w - 1) * b if kind == "all_gather" else 2 * (w - 1) / w * b
        return total


def _gather_step(grads, metric, lam, beta):
    for g in grads:
        D.channel_directed_dtensor_(g, metric, lam, beta, "output", gather=True)


def _sharded_step(grads, metric, lam, beta):
    for g in grads:
        D.channel_directed_dtensor_(g, metric, lam, beta, "output", gather=False)


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.world))
    torch.set_num_threads(args.threads)
    launch.init_from_env(backend="gloo")
    mesh = init_device_mesh("cpu", (args.world,))
    dtype = getattr(torch, args.dtype)
    shape = (args.channels, args.channels, args.kernel, args.kernel)
    grads, originals = [], []
    for layer in range(args.layers):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(layer), dtype=dtype)
        g = distribute_tensor(full, mesh, [Shard(0)])
        grads.append(g)
        originals.append(g.to_local().clone())

    def reset():
        for g, o in zip(grads, originals, strict=True):
            g.to_local().copy_(o)

    results = {}
    outputs = {}
    for name, step in (("sharded", _sharded_step), ("gather", _gather_step)):
        reset()
        step(grads, args.metric, args.lam, args.beta)  # warm-up
        reset()
        counter = CollectiveBytes(args.world)
        with counter:
            step(grads, args.metric, args.lam, args.beta)
        outputs[name] = [g.to_local().clone() for g in grads]
        times = []
        for _ in range(args.steps):
            reset()
            dist.barrier()
            t0 = time.perf_counter()
            step(grads, args.metric, args.lam, args.beta)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        results[name] = (counter, times)
    diff = max(
        ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        for a, b in zip(outputs["sharded"], outputs["gather"], strict=True)
    )
    if rank == 0:
        numel = args.layers * args.channels * args.channels * args.kernel**2
        print(
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"gloo on 127.0.0.1, {args.world} processes x {args.threads} thread(s)"
        )
        print(
            f"{args.layers} layers of {shape} {args.dtype} ({numel * torch.finfo(dtype).bits // 8 / 2**20:.1f} "
            f"MiB of gradients), Shard(0); metric={args.metric}, lam={args.lam}, beta={args.beta}, "
            f"direction=output; {args.steps} timed steps"
        )
        print()
        print("| path | collectives/step | sent/rank/step | received/rank/step | time/step (median) | min |")
        print("|---|---|---|---|---|---|")
        for name, (counter, times) in results.items():
            print(
                f"| {name} | {len(counter.records)} | {_fmt_bytes(counter.sent())} | "
                f"{_fmt_bytes(counter.received())} | {1e3 * statistics.median(times):.1f} ms | "
                f"{1e3 * min(times):.1f} ms |"
            )
        print()
        print(f"max relative difference sharded vs gather: {diff:.2e}")
        assert diff < (1e-4 if args.dtype == "float32" else 1e-10), "the sharded and gathered results disagree"
    dist.destroy_process_group()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--layers", type=int, default=4, help="conv layers in the stack (default 4)")
    parser.add_argument("--channels", type=int, default=512, help="input = output channels (default 512)")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size (default 3)")
    parser.add_argument("--metric", choices=("sobolev", "h0"), default="sobolev")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--smoke", action="store_true", help="2 processes, one 8x8x3x3 layer, 1 step, in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.world, args.layers, args.channels, args.steps, args.threads = 2, 1, 8, 1, 1
    for name in ("world", "layers", "channels", "kernel", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args, port), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
