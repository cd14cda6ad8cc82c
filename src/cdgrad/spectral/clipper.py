"""Training-time projection of conv weights towards an operator-norm ball, as a gradient transform.

`OperatorNormClipper` selects no gradient (gradients pass untouched); after every ``every``-th optimizer step
(its `after_step` hook, called by `cdgrad.attach`) it replaces each chosen weight ``K`` in place by
``PROJECTIONS[projection].apply(K, input_size, max_norm)``. `record_input_sizes` finds each conv's input size.

    clipper = OperatorNormClipper(model, record_input_sizes(model, batch), max_norm=1.0, every=100)
    handle = cdgrad.attach(optimizer, clipper)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._conv_spectrum import (
    SPECTRA_HELD,
    check_finite,
    check_reshaped_memory,
    check_spectrum_memory,
    check_weight,
    checked_input_size,
    checked_max_norm,
    is_int,
)
from ..norm_bounds import conv_norm_gram, conv_norm_power, reshaped_norm
from ..transforms_base import Commit, GradientTransform, trained_weight
from ..validation import check_choice, check_int
from .operator import NORM_ESTIMATES, PROJECTIONS, Size, conv_operator_norm

__all__ = ["OperatorNormClipper", "record_input_sizes"]

_STATE_KEYS = ("step_count", "max_norm", "every", "input_sizes")  # required; "projection", "power_vectors" optional
_OPTIONAL_KEYS = ("projection", "power_vectors")  # absent from states written before they existed


def _is_supported_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


def _check_conv(name: str, module: nn.Conv2d) -> None:
    if module.groups != 1 or tuple(module.dilation) != (1, 1):
        raise ValueError(
            f"layer {name!r}: only convolutions with groups=1 and dilation=1 are supported, "
            f"got groups={module.groups}, dilation={tuple(module.dilation)}"
        )


def record_input_sizes(model: nn.Module, batch: Tensor | Sequence[Any]) -> dict[str, tuple[int, int]]:
    """Spatial size ``(n_h, n_w)`` of the input of every ``nn.Conv2d`` in ``model``, keyed by module name.

    Runs one forward pass on ``batch`` (a tensor, or a tuple/list of positional arguments) under
    ``torch.no_grad()`` in eval mode, so BatchNorm statistics are not updated; every module's
    train/eval flag is restored afterwards. Convs not reached by the forward pass are left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch, Tensor | tuple | list):
        raise TypeError(f"batch must be a tensor or a tuple/list of forward arguments, got {type(batch).__name__}")
    args = (batch,) if isinstance(batch, Tensor) else tuple(batch)
    sizes: dict[str, tuple[int, int]] = {}
    handles: list[RemovableHandle] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            size = (int(inputs[0].shape[-2]), int(inputs[0].shape[-1]))
            if sizes.setdefault(name, size) != size:
                raise ValueError(
                    f"conv {name!r} is applied to inputs of different spatial sizes {sizes[name]} and {size}"
                )

        return hook

    flags = {m: m.training for m in model.modules()}
    try:
        for name, module in model.named_modules():
            if _is_supported_conv(module):
                handles.append(module.register_forward_pre_hook(make_hook(name)))
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return sizes


class OperatorNormClipper(GradientTransform):
    """Project conv weights towards ``||conv_K|| <= max_norm`` every ``every`` optimizer steps.

    A gradient transform that selects no gradient: attached with ``cdgrad.attach(optimizer, clipper)``, its
    `after_step` counts the optimizer's steps, and after steps ``every, 2 * every, ...`` each chosen weight is
    replaced in place by ``PROJECTIONS[projection].apply(weight, input_size, max_norm)``: by default ``"exact"``,
    `clip_operator_norm` (one alternating-projection step; Sedghi et al. clip every 100 steps); ``"reshaped"``
    clips the reshaped kernel's singular values (the Yoshida & Miyato baseline); ``"gram"`` rescales each kernel
    under a certified Gram-iteration bound.

    Args:
        layers: an ``nn.Module`` (all its ``nn.Conv2d`` submodules, named by qualified module name,
            the module itself included if it is a conv), or a sequence of ``nn.Conv2d`` modules and/or
            4-D weight tensors (named ``"0"``, ``"1"``, ...). Convs must have groups=1 and dilation=1;
            strided convs are clipped through their stride-1 circular map, whose norm bounds theirs.
        input_sizes: one size (``n`` or ``(n_h, n_w)``) for every layer, a mapping from layer name to
            size (positive; smaller than the kernel is exact too, by folding; for a model,
            ``record_input_sizes(model, batch)`` gives one; it must cover every
            layer), or a sequence of sizes aligned with ``layers`` (a pair of ints is always read as
            one ``(n_h, n_w)`` for all layers).
        max_norm: the operator-norm bound, > 0.
        every: clip after every ``every``-th optimizer step, a positive int.
        projection: a name in `PROJECTIONS` (``"exact"``, ``"reshaped"``, ``"gram"``).

    `operator_norms(estimate)` reports each layer's norm for monitoring (``"exact"``, or the cheaper ``"power"``,
    which keeps one warm-started vector per layer in the clipper's state, ``"gram"`` and ``"reshaped"``).

    Its state (``state_dict``) holds the step counter, the hyper-parameters, the input sizes and the power vectors.
    """

    homogeneous = True  # it changes no gradient

    def __init__(
        self,
        layers: nn.Module | Iterable[nn.Module | Tensor],
        input_sizes: Size | Mapping[str, Size] | Sequence[Size],
        max_norm: float,
        every: int = 100,
        projection: str = "exact",
    ) -> None:
        self.max_norm = checked_max_norm(max_norm)
        self.every = self._check_every(every)
        self.projection = self._check_projection(projection)
        self._layers = self._collect(layers)
        self.input_sizes = self._sizes(input_sizes)
        for name, size in self.input_sizes.items():  # refuse now what the first projection could not hold
            if self.projection == "reshaped":
                check_reshaped_memory(self._weight(name))
            else:
                held = SPECTRA_HELD["clip" if self.projection == "exact" else "gram"]
                check_spectrum_memory(self._weight(name), size, held, f"input_sizes[{name!r}]")
        self._step_count = 0
        self._power_vectors: dict[str, Tensor] = {}

    # -- construction helpers
    @staticmethod
    def _check_every(every: Any) -> int:
        return check_int(every, "every (clip after every `every` steps)", minimum=1)

    @staticmethod
    def _check_projection(projection: Any) -> str:
        return str(check_choice(projection, "projection", PROJECTIONS))

    @staticmethod
    def _collect(layers: Any) -> dict[str, nn.Conv2d | Tensor]:
        found: dict[str, nn.Conv2d | Tensor] = {}
        if isinstance(layers, nn.Module):
            for name, module in layers.named_modules():
                if _is_supported_conv(module):
                    _check_conv(name, module)
                    found[name] = module
            if not found:
                raise ValueError("layers: the module contains no nn.Conv2d to clip")
            return found
        if isinstance(layers, Tensor) or not isinstance(layers, Iterable):
            raise TypeError(
                "layers must be an nn.Module or a sequence of nn.Conv2d modules / 4-D weight tensors, "
                f"got {type(layers).__name__}"
            )
        for k, layer in enumerate(layers):
            name = str(k)
            if isinstance(layer, nn.Module):
                if not _is_supported_conv(layer):
                    raise TypeError(f"layers[{k}] must be an nn.Conv2d or a 4-D tensor, got {type(layer).__name__}")
                _check_conv(name, layer)  # type: ignore[arg-type]  # an nn.Conv2d, checked above
            else:
                check_weight(layer, f"layers[{k}]")
            found[name] = layer
        if not found:
            raise ValueError("layers must contain at least one conv layer or weight")
        return found

    def _weight(self, name: str) -> Tensor:
        layer = self._layers[name]
        return trained_weight(layer) if isinstance(layer, nn.Module) else layer

    def _sizes(self, input_sizes: Any) -> dict[str, tuple[int, int]]:
        names = list(self._layers)
        if isinstance(input_sizes, Mapping):
            missing = [n for n in names if n not in input_sizes]
            if missing:
                raise ValueError(f"input_sizes has no entry for layers {missing}; it has {sorted(input_sizes)}")
            raw = {n: input_sizes[n] for n in names}
        elif is_int(input_sizes) or (
            isinstance(input_sizes, Sequence) and len(input_sizes) == 2 and all(is_int(s) for s in input_sizes)
        ):  # one size for every layer; a pair of ints is always read as (n_h, n_w)
            raw = dict.fromkeys(names, input_sizes)
        elif isinstance(input_sizes, Sequence) and not isinstance(input_sizes, str):
            if len(input_sizes) != len(names):
                raise ValueError(f"input_sizes has {len(input_sizes)} entries but there are {len(names)} layers")
            raw = dict(zip(names, input_sizes, strict=True))
        else:
            raise TypeError(
                "input_sizes must be an int, a pair (n_h, n_w), a mapping from layer name to size, "
                f"or a sequence of sizes, got {input_sizes!r}"
            )
        return {n: checked_input_size(s, self._weight(n), f"input_sizes[{n!r}]") for n, s in raw.items()}

    # -- use
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def step_count(self) -> int:
        """The optimizer steps counted so far (by `after_step`)."""
        return self._step_count

    def select(self, param: Tensor) -> bool:
        """False: the clipper changes weights after the step, never a gradient."""
        return False

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Nothing: gradients pass untouched."""

    def after_step(self) -> None:
        """Count one optimizer step; project every layer (`clip_`) when the count is a multiple of ``every``."""
        self._step_count += 1
        if self._step_count % self.every == 0:
            self.clip_()

    def config(self) -> dict[str, Any]:
        """The hyper-parameters other than the layers and their input sizes."""
        return {"max_norm": self.max_norm, "every": self.every, "projection": self.projection}

    def clip_(self) -> None:
        """Apply one projection step to every layer now (in place, under ``torch.no_grad()``)."""
        with torch.no_grad():
            for name in self._layers:  # a diverged layer stops everything before any weight changes
                check_finite(self._weight(name), f"layer {name!r}")
            project = PROJECTIONS[self.projection].apply
            for name in self._layers:
                w = self._weight(name)
                w.copy_(project(w, self.input_sizes[name], self.max_norm))

    def operator_norms(self, estimate: str = "exact") -> dict[str, float]:
        """Each layer's operator norm at its input size, or a cheaper estimate of it.

        ``estimate``: ``"exact"`` (`conv_operator_norm`), ``"power"`` (one per-frequency power iteration of
        `cdgrad.norm_bounds.conv_norm_power` from the vectors kept since the last call: a lower bound that tracks
        the norm during training; docs/spectral.md has its accuracy and speed against the exact norms),
        ``"gram"`` (`conv_norm_gram`, an upper bound) or ``"reshaped"`` (the reshaped kernel's norm, which ignores
        the input size).
        """
        estimate = check_choice(estimate, "estimate", NORM_ESTIMATES)
        with torch.no_grad():
            for name in self._layers:
                check_finite(self._weight(name), f"layer {name!r}")
            out: dict[str, float] = {}
            for n in self._layers:
                w, size = self._weight(n), self.input_sizes[n]
                if estimate == "power":
                    value, self._power_vectors[n] = conv_norm_power(
                        w, size, self._power_vectors.get(n), iters=1, per_frequency=True
                    )
                elif estimate == "gram":
                    value = conv_norm_gram(w, size)
                elif estimate == "reshaped":
                    value = reshaped_norm(w)
                else:
                    value = conv_operator_norm(w, size)
                out[n] = float(value)
            return out

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "step_count": self._step_count,
            "max_norm": self.max_norm,
            "every": self.every,
            "projection": self.projection,
            "input_sizes": {n: list(s) for n, s in self.input_sizes.items()},
            "power_vectors": {n: v.clone() for n, v in self._power_vectors.items()},
        }

    def prepare_load(self, state: Any) -> Commit:
        """Check a state (the step counter, hyper-parameters and input sizes; states written before `projection`
        and `power_vectors` existed load as "exact" with none), then return its commit."""
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a dict (from {name}.state_dict()), got {type(state).__name__}")
        if state.get("type") != name:
            raise ValueError(f"state_dict is for {state.get('type')!r}, cannot load it into {name}")
        missing = set(_STATE_KEYS) - set(state)
        unknown = set(state) - {"type", *_STATE_KEYS, *_OPTIONAL_KEYS}
        if missing or unknown:
            raise ValueError(
                f"state_dict of {name} must have the keys {sorted(_STATE_KEYS)} (and optionally "
                f"{sorted(_OPTIONAL_KEYS)}); missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        step = check_int(state["step_count"], "state['step_count']", minimum=0)
        max_norm = checked_max_norm(state["max_norm"])
        every = self._check_every(state["every"])
        sizes = state["input_sizes"]
        if not isinstance(sizes, Mapping) or set(sizes) != set(self._layers):
            got = sorted(sizes) if isinstance(sizes, Mapping) else sizes
            raise ValueError(f"state['input_sizes'] must name exactly the layers {self.layer_names}, got {got}")
        new_sizes = {n: checked_input_size(sizes[n], self._weight(n), f"input_sizes[{n!r}]") for n in self._layers}
        projection = self._check_projection(state.get("projection", "exact"))  # states written before it: exact
        vectors = state.get("power_vectors", {})
        if not isinstance(vectors, Mapping) or not set(vectors) <= set(self._layers):
            got = sorted(vectors) if isinstance(vectors, Mapping) else type(vectors).__name__
            raise ValueError(f"state['power_vectors'] must map layer names {self.layer_names} to vectors, got {got}")
        kept = {}
        for n, v in vectors.items():
            (n_h, n_w), inputs = new_sizes[n], self._weight(n).shape[1]
            shape, older = (n_h, n_w // 2 + 1, inputs), (inputs, n_h, n_w)
            if isinstance(v, Tensor) and tuple(v.shape) == shape and v.is_complex():
                kept[n] = v.detach().clone()
            elif not (isinstance(v, Tensor) and tuple(v.shape) == older and not v.is_complex()):
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"state['power_vectors'][{n!r}] must be a complex tensor of shape {shape}, got {got}"
                )  # a real vector of the older global iteration's shape: dropped, the next estimate starts cold

        def commit() -> None:
            self._step_count, self.max_norm, self.every, self.input_sizes = step, max_norm, every, new_sizes
            self.projection = projection
            self._power_vectors = kept

        return commit

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layer_names}, max_norm={self.max_norm}, "
            f"every={self.every}, projection={self.projection!r}, step_count={self.step_count})"
        )
