"""The pieces of the transform contract battery (tests/test_contract.py): the sample network, the entry type, the
sampling helpers, and the worker of the two-process DTensor leg."""

from __future__ import annotations

import io
import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdgrad.transforms_base import GradientTransform
from helpers import rel_err


class Net(nn.Module):
    """Every kind of parameter: 3x3 and 1x1 convs, a linear layer, biases and a 0-d scalar. Odd channel counts, so
    that two ranks hold uneven shards of every axis but the 3x3 conv's input channels."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 7, 3, padding=1)
        self.point = nn.Conv2d(7, 5, 1)
        self.fc = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.point(torch.tanh(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3))) * self.scale


@dataclass
class TransformInfo:
    """One transform: two differently configured constructions (`make`, `other`), bad states, and its properties."""

    name: str
    make: Callable[[nn.Module], GradientTransform]
    other: Callable[[nn.Module], GradientTransform]
    bad_states: list[tuple[Callable[[dict], Any], type[Exception]]] = field(default_factory=list)
    identity: bool = False  # `make` leaves gradients as they are (e.g. the paper's h0 at lam = 0, plain SGD)
    homogeneous: bool = True  # T(s g) = s T(g) for s > 0 (its `homogeneous` flag says so)
    linear: bool = True  # T(a g + b h) = a T(g) + b T(h)
    selects: bool = True  # it acts on some gradient
    needs_model: bool = False  # its selection is bound to the model it was built for (none of another instance)
    stateful: bool = False  # it has state beyond its hyper-parameters
    dtensor: bool = True  # it accepts DTensor gradients
    after_step: bool = False  # `make`'s after_step moves weights (after steps 2 and 4)
    measures: int = 0  # how many batches `make`'s begin_epoch(0, batches) consumes
    on_update: bool = False  # `make` is an OnUpdate: attach acts on the update
    compile: bool = True  # run the torch.compile leg


def sample_grads(
    model: nn.Module, t: GradientTransform, seed: int = 1, every: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, random gradients) of the parameters `t` selects (every parameter with an axis if `every`)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if (p.dim() > 0 if every else t.select(p))]
    return params, [torch.randn(p.shape, generator=g) for p in params]


def outputs(t: GradientTransform, model: nn.Module) -> dict[str, torch.Tensor]:
    """The in-place result of `t` on every parameter it selects, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    params, grads = sample_grads(model, t)
    t.transform_(grads, params)
    return {names[id(p)]: g for p, g in zip(params, grads, strict=True)}


def snapshot(t: GradientTransform) -> bytes:
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    return buf.getvalue()


def loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 3, generator=g)
    return nn.functional.mse_loss(model(x), y)


# ------------------------------------------------------------------------------------- two-process DTensor leg
def _dtensor_entry(info: TransformInfo, mesh: Any, world: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    model = Net()
    t = info.make(model)
    params, grads = sample_grads(model, t, every=not info.selects)
    expected = [t(g, p) for g, p in zip(grads, params, strict=True)]
    errors: dict[str, float] = {}
    uneven = False
    for name, placement, dim in (("S0", Shard(0), 0), ("S1", Shard(1), 1), ("R", Replicate(), -1)):
        chosen = [i for i, g in enumerate(grads) if g.dim() > dim]
        sharded = [distribute_tensor(grads[i].clone(), mesh, [placement]) for i in chosen]
        uneven |= any(dim >= 0 and grads[i].shape[dim] % world != 0 for i in chosen)
        for d, i in zip(sharded, chosen, strict=True):
            errors[f"{name} pure {i}"] = rel_err(t(d, params[i]).full_tensor(), expected[i])
            errors[f"{name} input kept {i}"] = float(not torch.equal(d.full_tensor(), grads[i]))
        t.transform_(sharded, [params[i] for i in chosen])
        for d, i in zip(sharded, chosen, strict=True):
            errors[f"{name} in place {i}"] = rel_err(d.full_tensor(), expected[i])
    return {"uneven": uneven, "errors": errors}


def dtensor_worker(rank: int, world: int, port: int, outdir: str) -> None:
    """Each entry that supports DTensors, its gradients sharded over `world` gloo ranks; errors to rank{r}.json."""
    from torch.distributed.device_mesh import init_device_mesh

    from test_contract import INFOS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    for info in INFOS:
        if info.dtensor:
            try:
                results[info.name] = _dtensor_entry(info, mesh, world)
            except Exception:  # reported by the entry's test
                results[info.name] = {"uneven": True, "errors": {traceback.format_exc(): float("inf")}}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()
