"""Exact singular values of convolutional layers and projection onto an operator-norm ball.

A stride-1 convolution with wrap-around (``nn.Conv2d`` with circular padding) of a weight
``K`` of shape ``(O, I, kh, kw)`` on ``I x n_h x n_w`` inputs is a linear map
``R^(I n_h n_w) -> R^(O n_h n_w)``. It is block-circulant, so the 2-D DFT block-diagonalises it
(Sedghi, Gupta and Long, 2019):

    singular values of the layer = union over (u, v) of svd(P[u, v]),
    P[u, v] = FFT2(K zero-padded to n_h x n_w)[:, :, u, v]            (an O x I complex matrix).

Cross-correlation versus convolution and the placement of the padding only conjugate ``P`` or
multiply it by a unit phase, which leaves the singular values unchanged. For a real kernel
``P[-u, -v] = conj(P[u, v])``, so only the half spectrum ``v = 0 .. n_w // 2`` is decomposed
(``torch.fft.rfft2``) and the other half is mirrored.

The characterisation is exact only for stride 1 and wrap-around; see ``docs/spectral.md`` for
zero padding, stride and the dependence on the input size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._conv_spectrum import (
    _check_finite,
    _check_weight,
    _half_spectrum,
    _input_size,
    _is_int,
    _max_norm,
    _work_dtype,
)
from .norm_bounds import clip_reshaped_norm, conv_norm_gram, conv_norm_power, reshaped_norm
from .validation import check_choice, check_int

__all__ = [
    "NORM_ESTIMATES",
    "PROJECTIONS",
    "OperatorNormClipper",
    "Projection",
    "clip_operator_norm",
    "conv_dense_matrix",
    "conv_operator_norm",
    "conv_singular_values",
    "record_input_sizes",
]

Size = int | tuple[int, int]


def _mirror(half: Tensor, n_w: int) -> Tensor:
    """Full (n_h, n_w, ...) from the half spectrum, using ``X[u, v] = X[-u, -v]`` for ``v > n_w // 2``."""
    n_h = half.shape[0]
    if n_w // 2 + 1 == n_w:  # n_w in (1, 2): the half spectrum is the full spectrum
        return half
    u = (-torch.arange(n_h, device=half.device)) % n_h
    v = n_w - torch.arange(n_w // 2 + 1, n_w, device=half.device)
    return torch.cat([half, half[u][:, v]], dim=1)


def conv_singular_values(weight: Tensor, input_size: Size, *, per_frequency: bool = False) -> Tensor:
    """All singular values of the stride-1 circular convolution by ``weight`` on ``input_size`` inputs.

    ``sigma = union_{u, v} svd(P[u, v])``, ``P[u, v] = FFT2(weight zero-padded to n_h x n_w)[:, :, u, v]``.

    Args:
        weight: conv weight (O, I, kh, kw), as ``nn.Conv2d`` stores it.
        input_size: ``n`` or ``(n_h, n_w)``, at least ``(kh, kw)``.
        per_frequency: if False (default) return the ``n_h * n_w * min(O, I)`` singular values as a
            1-D tensor sorted in descending order; if True return shape ``(n_h, n_w, min(O, I))``,
            entry ``[u, v]`` holding the singular values of ``P[u, v]`` in descending order.

    Computed in float64 (complex128) for float64 weights and in float32 otherwise, on the weight's
    device; the result has that real dtype. Differentiable through ``torch.linalg.svdvals``.
    """
    _check_weight(weight)
    size = _input_size(input_size, weight)
    half = torch.linalg.svdvals(_half_spectrum(weight, size))
    full = _mirror(half, size[1])
    if per_frequency:
        return full
    return torch.sort(full.reshape(-1), descending=True).values


def conv_operator_norm(weight: Tensor, input_size: Size) -> Tensor:
    """Largest singular value ``max_{u, v} sigma_max(P[u, v])`` of the circular conv (a 0-d tensor).

    Needs only the half spectrum ``v <= n_w // 2``; no dense matrix is formed.
    """
    _check_weight(weight)
    size = _input_size(input_size, weight)
    out: Tensor = torch.linalg.svdvals(_half_spectrum(weight, size)).amax()
    return out


def clip_operator_norm(weight: Tensor, input_size: Size, max_norm: float) -> Tensor:
    """One alternating-projection step towards the ball ``{K : ||conv_K|| <= max_norm}``.

    ``P[u, v] = U S V^H`` -> ``U min(S, max_norm) V^H`` at every frequency, inverse FFT2, real part,
    cut back to the kernel support ``kh x kw``. Implemented as
    ``weight - crop(IFFT2(U (S - min(S, c)) V^H))``, so a layer already inside the ball is returned
    exactly unchanged. The cut-back can push the norm above ``max_norm`` again; repeated application
    converges to a kernel inside the ball.

    Pure: returns a new tensor (same dtype, device and shape, not attached to autograd).
    """
    _check_weight(weight)
    size = _input_size(input_size, weight)
    c = _max_norm(max_norm)
    kh, kw = weight.shape[-2:]
    with torch.no_grad():
        w = weight.detach().to(_work_dtype(weight))
        p = _half_spectrum(w, size)
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        excess = (s - s.clamp(max=c)).to(p.dtype)
        d = (u * excess.unsqueeze(-2)) @ vh  # (n_h, n_w//2+1, O, I), Hermitian-symmetric as a full spectrum
        delta = torch.fft.irfft2(d.permute(2, 3, 0, 1), s=size)[..., :kh, :kw]
        out: Tensor = (w - delta).to(weight.dtype)
        return out


@dataclass(frozen=True)
class Projection:
    """A way to pull a conv weight towards an operator-norm ball: ``apply(weight, input_size, max_norm) -> weight``."""

    name: str
    summary: str
    apply: Callable[[Tensor, tuple[int, int], float], Tensor]


def _gram_rescale(weight: Tensor, input_size: tuple[int, int], max_norm: float) -> Tensor:
    """``weight * min(1, c / gram_bound)``: certified to end with operator norm <= c (unchanged when inside)."""
    bound = float(conv_norm_gram(weight, input_size))
    return weight.detach().clone() if bound <= max_norm else weight.detach() * (max_norm / bound)


def _reshaped_clip(weight: Tensor, input_size: tuple[int, int], max_norm: float) -> Tensor:
    return clip_reshaped_norm(weight, max_norm)


PROJECTIONS: dict[str, Projection] = {
    p.name: p
    for p in (
        Projection(
            "exact",
            "clip the singular values of every P[u, v] to max_norm, cut back to the kernel support (Sedghi et al.)",
            clip_operator_norm,
        ),
        Projection(
            "reshaped",
            "clip the singular values of the O x (I kh kw) reshaped kernel (Yoshida & Miyato; bounds the true "
            "norm only up to sqrt(kh kw))",
            _reshaped_clip,
        ),
        Projection(
            "gram",
            "rescale the kernel by min(1, max_norm / Gram-iteration bound): certified inside the ball, no SVD",
            _gram_rescale,
        ),
    )
}
NORM_ESTIMATES = ("exact", "power", "gram", "reshaped")


def conv_dense_matrix(weight: Tensor, input_size: Size) -> Tensor:
    """The dense ``(O n_h n_w) x (I n_h n_w)`` matrix of ``nn.Conv2d(padding_mode="circular")``, stride 1.

    Column ``j`` is the layer's output (flattened in C order over (O, n_h, n_w)) for the ``j``-th
    basis vector of the input space (C order over (I, n_h, n_w)); padding ``(k - 1) // 2`` before and
    ``k - 1 - (k - 1) // 2`` after in each spatial dimension, so outputs are ``n_h x n_w``.
    O((n_h n_w)^2 O I) memory and time: a reference for small layers, not for production use.
    """
    _check_weight(weight)
    n_h, n_w = _input_size(input_size, weight)
    o, i, kh, kw = weight.shape
    basis = torch.eye(i * n_h * n_w, dtype=weight.dtype, device=weight.device).reshape(-1, i, n_h, n_w)
    pad = ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(basis, pad, mode="circular"), weight)
    return out.reshape(i * n_h * n_w, o * n_h * n_w).T


# ----------------------------------------------------------------------------- training-time projection


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


class OperatorNormClipper:
    """Project conv weights towards ``||conv_K|| <= max_norm`` every ``every`` optimizer steps.

    After optimizer steps ``every, 2 * every, ...`` each chosen weight is replaced in place by
    ``PROJECTIONS[projection].apply(weight, input_size, max_norm)``: by default ``"exact"``,
    `clip_operator_norm` (one alternating-projection step; Sedghi et al. clip every 100 steps); ``"reshaped"``
    clips the reshaped kernel's singular values (the Yoshida & Miyato baseline); ``"gram"`` rescales each kernel
    under a certified Gram-iteration bound.

    Args:
        layers: an ``nn.Module`` (all its ``nn.Conv2d`` submodules, named by qualified module name,
            the module itself included if it is a conv), or a sequence of ``nn.Conv2d`` modules and/or
            4-D weight tensors (named ``"0"``, ``"1"``, ...). Convs must have groups=1 and dilation=1;
            strided convs are clipped through their stride-1 circular map, whose norm bounds theirs.
        input_sizes: one size (``n`` or ``(n_h, n_w)``) for every layer, a mapping from layer name to
            size (for a model, ``record_input_sizes(model, batch)`` gives one; it must cover every
            layer), or a sequence of sizes aligned with ``layers`` (a pair of ints is always read as
            one ``(n_h, n_w)`` for all layers).
        max_norm: the operator-norm bound, > 0.
        every: clip after every ``every``-th optimizer step, a positive int.
        projection: a name in `PROJECTIONS` (``"exact"``, ``"reshaped"``, ``"gram"``).

    `operator_norms(estimate)` reports each layer's norm for monitoring (``"exact"``, or the cheaper ``"power"``,
    which keeps one warm-started vector per layer in the clipper's state, ``"gram"`` and ``"reshaped"``).

    Use ``handle = clipper.attach(optimizer)`` (an ``optimizer.register_step_post_hook``) or call
    ``clipper.step()`` after each ``optimizer.step()``.
    """

    def __init__(
        self,
        layers: nn.Module | Iterable[nn.Module | Tensor],
        input_sizes: Size | Mapping[str, Size] | Sequence[Size],
        max_norm: float,
        every: int = 100,
        projection: str = "exact",
    ) -> None:
        self.max_norm = _max_norm(max_norm)
        self.every = self._check_every(every)
        self.projection = self._check_projection(projection)
        self._layers = self._collect(layers)
        self.input_sizes = self._sizes(input_sizes)
        self.step_count = 0
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
                _check_weight(layer, f"layers[{k}]")
            found[name] = layer
        if not found:
            raise ValueError("layers must contain at least one conv layer or weight")
        return found

    def _weight(self, name: str) -> Tensor:
        layer = self._layers[name]
        return layer.weight if isinstance(layer, nn.Module) else layer

    def _sizes(self, input_sizes: Any) -> dict[str, tuple[int, int]]:
        names = list(self._layers)
        if isinstance(input_sizes, Mapping):
            missing = [n for n in names if n not in input_sizes]
            if missing:
                raise ValueError(f"input_sizes has no entry for layers {missing}; it has {sorted(input_sizes)}")
            raw = {n: input_sizes[n] for n in names}
        elif _is_int(input_sizes) or (
            isinstance(input_sizes, Sequence) and len(input_sizes) == 2 and all(_is_int(s) for s in input_sizes)
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
        return {n: _input_size(s, self._weight(n), f"input_sizes[{n!r}]") for n, s in raw.items()}

    # -- use
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def clip_(self) -> None:
        """Apply one projection step to every layer now (in place, under ``torch.no_grad()``)."""
        with torch.no_grad():
            for name in self._layers:  # a diverged layer stops everything before any weight changes
                _check_finite(self._weight(name), f"layer {name!r}")
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
                _check_finite(self._weight(name), f"layer {name!r}")
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

    def step(self) -> bool:
        """Count one optimizer step; clip when the count is a multiple of ``every``. True if it clipped."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            self.clip_()
            return True
        return False

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call ``self.step()`` after every ``optimizer.step()``; ``handle.remove()`` detaches."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.step()

        return optimizer.register_step_post_hook(hook)

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "step_count": self.step_count,
            "max_norm": self.max_norm,
            "every": self.every,
            "projection": self.projection,
            "input_sizes": {n: list(s) for n, s in self.input_sizes.items()},
            "power_vectors": {n: v.clone() for n, v in self._power_vectors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step counter, hyper-parameters and input sizes (validated before any change)."""
        if not isinstance(state, Mapping) or state.get("type") != type(self).__name__:
            got = state.get("type") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state is for {got!r}, cannot load it into {type(self).__name__}")
        missing = {"step_count", "max_norm", "every", "input_sizes"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        step = check_int(state["step_count"], "state['step_count']", minimum=0)
        max_norm = _max_norm(state["max_norm"])
        every = self._check_every(state["every"])
        sizes = state["input_sizes"]
        if not isinstance(sizes, Mapping) or set(sizes) != set(self._layers):
            got = sorted(sizes) if isinstance(sizes, Mapping) else sizes
            raise ValueError(f"state['input_sizes'] must name exactly the layers {self.layer_names}, got {got}")
        new_sizes = {n: _input_size(sizes[n], self._weight(n), f"input_sizes[{n!r}]") for n in self._layers}
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
        self.step_count, self.max_norm, self.every, self.input_sizes = step, max_norm, every, new_sizes
        self.projection = projection
        self._power_vectors = kept

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layer_names}, max_norm={self.max_norm}, "
            f"every={self.every}, projection={self.projection!r}, step_count={self.step_count})"
        )
