"""The SGS transform: a per-layer, data-driven scaling of convolution gradients.

Each selected `k_h x k_w` convolution gets a positive scaling matrix `G` of shape `(k_h, k_w)`, mean 1,
and its weight gradient `f` (layout `(O, I, k_h, k_w)`) becomes `G * f`, broadcast over `O` and `I`.
`G` is computed from the layer's *input* feature maps:

    S[i, j] = spatial dependence between a pixel and its neighbour displaced by
              (i - k_h // 2, j - k_w // 2)                      (centre entry exactly 1)
    G = k * S / ((k - 1) * S + 1),   then   G <- G / mean(G)

The dependence is the normalised mutual information
`NMI(P, Q) = (H(P) + H(Q) - H(P, Q)) / H(P, Q)` of the two pixel populations (histogram
estimate, Sturges' rule bins), pooled over the batch and averaged over channels, or, with
`method="autocorr"`, the absolute Pearson correlation of the two populations.

By Lemma 1 of the method, training the single conv with `G = sum_n M_n` is exactly training an
N-branch re-parameterisation with binary receptive-field masks `M_n`, for any optimizer linear in
its gradient (SGD, momentum, coupled weight decay); SGS replaces the hand-picked masks by `G`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from ..transforms_base import Commit, GradientTransform, config_fields, state_fields, trained_weight
from ..validation import check_choice, check_int, check_positive, check_tensor
from .dependence import authors_channel_dependence, check_dependence_method, dependence_matrices
from .nmi import check_bins

__all__ = ["PIPELINES", "SpatialGradientScaling", "authors_sgs_scaling", "sgs_scaling"]

PIPELINES = ("cdgrad", "authors")


def sgs_scaling(S: Tensor, k: float = 5.0) -> Tensor:
    """The SGS k-transform `G = k*S / ((k-1)*S + 1)`, normalised to mean 1 over the last two dims.

    `S` has shape `(..., k_h, k_w)` with finite entries `>= 0` (and at least one `> 0` per matrix); `k > 0`.
    `G` is increasing in `S` (`dG/dS = k / ((k-1) S + 1)^2 > 0`); `k = 1` gives `G = S / mean(S)`, and a
    larger `k` flattens `G` towards uniform on the entries with `S > 0`.
    """
    check_tensor(S, "S")
    k = check_positive(k, "k")
    if S.dim() < 2:
        raise ValueError(f"S must have shape (..., k_h, k_w), got {tuple(S.shape)}")
    if S.numel() == 0:
        raise ValueError(f"S must be non-empty, got shape {tuple(S.shape)}")
    if not torch.isfinite(S).all() or (S < 0).any():
        raise ValueError("S must contain only finite values >= 0")
    if k > 1e30:  # k S would overflow float32: the same G as S / ((1 - 1/k) S + 1/k), 0 where S = 0
        g = torch.where(S > 0, S / ((1.0 - 1.0 / k) * S + 1.0 / k), torch.zeros_like(S))
    else:
        g = k * S / ((k - 1.0) * S + 1.0)
    mean = g.mean(dim=(-2, -1), keepdim=True)
    if (mean <= 0).any():
        raise ValueError("S must have at least one entry > 0 in every (k_h, k_w) matrix")
    return g / mean


def authors_sgs_scaling(
    features: Tensor,
    kernel_size: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
    k: float = 5.0,
    diagonal_removal: bool = False,
) -> Tensor:
    """`G` as the authors' code computes it (docs/sgs.md, "Two pipelines"), float64 `(k_h, k_w)`.

    The per-channel NMI maps of the input zero-padded by the layer's padding (`authors_channel_dependence`), the
    k-transform applied to each channel's map, then the mean over channels, normalised to mean 1:
    `G = mean_c T(S_c) / mean(mean_c T(S_c))`, `T(s) = k s / ((k-1) s + 1)`.  (`sgs_scaling(spatial_dependence(x))`
    instead averages the maps first and measures the unpadded input: `G = T(mean_c S_c) / mean(...)`.)
    """
    k = check_positive(k, "k")
    dep, alive = authors_channel_dependence(features, kernel_size, padding, diagonal_removal)
    if not bool(alive.any()):
        return torch.ones(dep.shape[1:], dtype=torch.float64, device=dep.device)
    transformed = k * dep[alive] / ((k - 1.0) * dep[alive] + 1.0)
    s = transformed.mean(dim=0)
    return s / s.mean()


# -------------------------------------------------------------------------------------------- transform
class SpatialGradientScaling(GradientTransform):
    """Spatial gradient scaling: `grad <- G * grad` for each conv weight `(O, I, k_h, k_w)`, `G` `(k_h, k_w)`.

    `G = sgs_scaling(spatial_dependence(inputs), k)` per layer, from the inputs of `num_batches`
    training-mode forward passes captured after `begin_epoch(epoch)` when `due(epoch)`: `epoch % every == 0`, or
    with `warmup` epochs of plain gradients first, `epoch >= warmup` and `(epoch - warmup) % every == 0`. Layers:
    every `nn.Conv2d` of `model` whose kernel has at least `min_kernel` elements (default 2: all but
    1x1). Before the first capture `G` is all ones (plain gradients).

    `pipeline="authors"` computes `G` as the authors' code does (`authors_sgs_scaling`: inputs zero-padded by each
    layer's padding, the k-transform per channel before the channel mean; `diagonal_removal` their ImageNet
    option); it captures as they do, in eval mode without gradients: `begin_epoch(epoch, batches)` measures on the
    first `num_batches` of `batches` when `due(epoch)` (`measure(batches)` does it at any time).
    """

    homogeneous = True  # G * grad is linear in the gradient

    def __init__(
        self,
        model: nn.Module,
        k: float = 5.0,
        num_batches: int = 2,
        every: int = 5,
        bins: int | None = None,
        method: str = "mi",
        min_kernel: int = 2,
        pipeline: str = "cdgrad",
        diagonal_removal: bool = False,
        warmup: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._hyper = self._validate(
            dict(
                k=k,
                num_batches=num_batches,
                every=every,
                bins=bins,
                method=method,
                min_kernel=min_kernel,
                pipeline=pipeline,
                diagonal_removal=diagonal_removal,
                warmup=warmup,
            )
        )
        self._measuring = False
        self.model = model
        self._hooks: list[Any] = []
        self._armed = False
        self._seen = 0
        self._captured: dict[str, list[tuple[Tensor, int]]] = {}
        self._setup_layers()

    # ----------------------------------------------------------------------------------------- config
    _KEYS = ("k", "num_batches", "every", "bins", "method", "min_kernel", "pipeline", "diagonal_removal", "warmup")
    # keys newer than some saved states: their defaults
    _ADDED = {"pipeline": "cdgrad", "diagonal_removal": False, "warmup": 0}

    @staticmethod
    def _validate(cfg: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(cfg, Mapping):
            cfg = {**SpatialGradientScaling._ADDED, **cfg}
        config_fields(cfg, "SpatialGradientScaling", SpatialGradientScaling._KEYS)
        pipeline = check_choice(cfg["pipeline"], "pipeline", PIPELINES)
        if not isinstance(cfg["diagonal_removal"], bool):
            raise TypeError(f"diagonal_removal must be True or False, got {cfg['diagonal_removal']!r}")
        if (cfg["diagonal_removal"] or pipeline == "authors") and (cfg["method"] != "mi" or cfg["bins"] is not None):
            raise ValueError(
                "pipeline='authors' and diagonal_removal measure mutual information with Sturges bins: they need "
                f"method='mi' and bins=None, got method={cfg['method']!r}, bins={cfg['bins']!r}"
            )
        if cfg["diagonal_removal"] and pipeline != "authors":
            raise ValueError("diagonal_removal is an option of pipeline='authors'")
        return dict(
            k=check_positive(cfg["k"], "k"),
            num_batches=check_int(cfg["num_batches"], "num_batches", minimum=1),
            every=check_int(cfg["every"], "every", minimum=1),
            bins=check_bins(cfg["bins"]),
            method=check_dependence_method(cfg["method"]),
            min_kernel=check_int(cfg["min_kernel"], "min_kernel", minimum=1),
            pipeline=pipeline,
            diagonal_removal=cfg["diagonal_removal"],
            warmup=check_int(cfg["warmup"], "warmup", minimum=0),
        )

    def config(self) -> dict[str, Any]:
        """Hyper-parameters (the constructor arguments other than `model`)."""
        return dict(self._hyper)

    @property
    def layers(self) -> dict[str, nn.Conv2d]:
        """The scaled layers, by qualified module name."""
        return dict(self._layers)

    @property
    def scalings(self) -> dict[str, Tensor]:
        """Current `G` of each layer (float64 copies), by qualified module name."""
        return {name: g.clone() for name, g in self._scalings.items()}

    @property
    def first_scalings(self) -> dict[str, Tensor]:
        """`G` of each layer at its first measurement (float64 copies; empty before any): the start of training."""
        return {name: g.clone() for name, g in self._first.items()}

    @property
    def armed(self) -> bool:
        """Whether the next training-mode forward passes are being captured."""
        return self._armed

    # ------------------------------------------------------------------------------------------ hooks
    def _select_layers(self, min_kernel: int) -> dict[str, nn.Conv2d]:
        return {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size[0] * m.kernel_size[1] >= min_kernel
        }

    def _setup_layers(self) -> None:
        self.remove()
        self._layers = self._select_layers(self._hyper["min_kernel"])
        self._scalings = {
            name: torch.ones(m.kernel_size, dtype=torch.float64, device=trained_weight(m).device)
            for name, m in self._layers.items()
        }
        self._first: dict[str, Tensor] = {}  # each layer's G at its first measurement
        self._cast: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._by_id: dict[int, str] = {}
        for name, m in self._layers.items():
            self._hooks.append(m.register_forward_pre_hook(self._make_capture(name)))
        self._hooks.append(self.model.register_forward_hook(self._after_forward))

    def _make_capture(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def capture(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if self._armed and (self.model.training or self._measuring):
                x = inputs[0].detach()  # held by reference: autograd already forbids in-place edits
                self._captured.setdefault(name, []).append((x if x.dim() == 4 else x.unsqueeze(0), x._version))

        return capture

    def _after_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._armed and self.model.training:
            self._seen += 1
            if self._seen >= self._hyper["num_batches"]:
                self.update()

    def measure(self, batches: Iterable[Tensor]) -> None:
        """Measure `G` as the authors' code does: forward `batches` (model inputs) through the model in eval mode
        without gradients, capturing every scaled layer's input, then `update()`; the model's mode is restored."""
        if not self._hooks:
            raise RuntimeError("the hooks of this SpatialGradientScaling were removed; build a new one")
        was_training = self.model.training
        self._armed, self._seen, self._captured, self._measuring = True, 0, {}, True
        try:
            self.model.eval()
            with torch.no_grad():
                for x in batches:
                    self.model(x)
            if not self._captured:
                raise ValueError("measure() got no batches: nothing was captured")
            self.update()
        finally:
            self._measuring = False
            self._armed, self._seen, self._captured = False, 0, {}
            self.model.train(was_training)

    def remove(self) -> None:
        """Remove the forward hooks and drop any captured inputs; the scalings are kept."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        self._armed = False
        self._seen = 0
        self._captured = {}

    def due(self, epoch: int) -> bool:
        """Whether `G` is re-measured at the start of `epoch`: `epoch >= warmup` and `(epoch - warmup) % every == 0`
        (the first measurement right after the `warmup` epochs of plain gradients; epoch 0 when warmup = 0)."""
        epoch = check_int(epoch, "epoch", minimum=0)
        every: int = self._hyper["every"]
        warmup: int = self._hyper["warmup"]
        return epoch >= warmup and (epoch - warmup) % every == 0

    def begin_epoch(self, epoch: int, batches: Iterable[Tensor] | None = None) -> None:
        """Call at the start of every epoch: when `due(epoch)` (epoch 0 included), arms capture of the next
        `num_batches` training-mode forward passes (`batches` is not used).

        With `pipeline="authors"` nothing is armed: when due, `G` is measured now in eval mode on the first
        `num_batches` of `batches` (model inputs; `measure`), which must then be given (`ValueError` if None).
        """
        due = self.due(epoch)
        if not self._hooks:
            raise RuntimeError("the hooks of this SpatialGradientScaling were removed; build a new one")
        if not due:
            return
        if self._hyper["pipeline"] == "authors":
            if batches is None:
                raise ValueError(
                    f"SpatialGradientScaling(pipeline='authors') measures in eval mode at the start of epoch {epoch}: "
                    "pass batches= (an iterable of normalised training input batches) to begin_epoch"
                )
            self.measure(itertools.islice(batches, self._hyper["num_batches"]))
            return
        self._armed = True
        self._seen = 0
        self._captured = {}

    # ------------------------------------------------------------------------------------ computation
    def update(self) -> None:
        """Compute `G` of every layer that has captured inputs, then disarm and free the captures.

        Runs by itself after the `num_batches`-th captured forward pass; call it directly to use fewer.
        Inputs are held by reference, not copied (autograd already forbids editing them in place while
        they are needed for the backward pass); an in-place edit is detected and raises `RuntimeError`.
        """
        captured, self._captured = self._captured, {}
        self._armed = False
        self._seen = 0
        for name, entries in captured.items():  # check everything before changing any scaling
            if any(x._version != version for x, version in entries):
                raise RuntimeError(f"an input of layer {name!r} was modified in place after it was captured")
        hp = self._hyper
        workspace: dict[str, Tensor] = {}
        scalings = dict(self._scalings)
        with torch.no_grad():
            for name, entries in captured.items():
                module = self._layers[name]
                xs = [x for x, _ in entries]
                groups: dict[tuple[int, ...], list[Tensor]] = {}
                for x in xs:
                    groups.setdefault(tuple(x.shape[1:]), []).append(x)
                total = sum(x.shape[0] for x in xs)
                s = torch.zeros(module.kernel_size, dtype=torch.float64, device=trained_weight(module).device)
                for group in groups.values():
                    feats = group[0] if len(group) == 1 else torch.cat(group)
                    try:
                        kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
                        if hp["pipeline"] == "authors":  # one call on all the inputs: the k-transform per channel
                            feats = torch.cat(xs)
                            padding = (int(module.padding[0]), int(module.padding[1]))
                            g = authors_sgs_scaling(feats, kernel, padding, hp["k"], hp["diagonal_removal"])
                            break
                        dilation = (int(module.dilation[0]), int(module.dilation[1]))
                        dep = dependence_matrices(feats, kernel, hp["bins"], hp["method"], dilation, workspace)
                    except ValueError as exc:  # non-finite inputs: name the layer; no scaling has changed
                        raise ValueError(f"layer {name!r}: {exc} (has training diverged?)") from None
                    s += dep.to(s.device) * (feats.shape[0] / total)
                else:
                    g = sgs_scaling(s, hp["k"])
                scalings[name] = g.to(s.device)
        for name in captured:
            self._first.setdefault(name, scalings[name].clone())
        self._scalings = scalings
        self._cast = {}
        self.mark_changed()

    # -------------------------------------------------------------------------------------- transform
    def _name_of(self, param: Tensor) -> str | None:
        name = self._by_id.get(id(param))
        if name is None or trained_weight(self._layers[name]) is not param:
            self._by_id = {id(trained_weight(m)): n for n, m in self._layers.items()}
            name = self._by_id.get(id(param))
        return name

    def select(self, param: Tensor) -> bool:
        """True exactly for the weight tensors of the scaled conv layers (by identity)."""
        return self._name_of(param) is not None

    def check(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Every `params[i]` must be the weight of a scaled layer and `grads[i]` a floating tensor of its shape."""
        super().check(grads, params)
        for i, (g, p) in enumerate(zip(grads, params, strict=True)):
            name = self._name_of(p)
            if name is None:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not the weight of a conv layer this "
                    f"SpatialGradientScaling scales; accepted: the weights of {sorted(self._layers)}"
                )
            if g.shape != p.shape:
                raise ValueError(f"grad of layer {name!r} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")

    def apply_(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """`grads[i] *= G` of the layer whose weight is `params[i]`, broadcast over `(O, I)`."""
        with torch.no_grad():
            for g, p in zip(grads, params, strict=True):
                name = self._name_of(p)
                assert name is not None
                key = (name, g.dtype, g.device)
                scale = self._cast.get(key)
                if scale is None:
                    scale = self._cast[key] = self._scalings[name].to(device=g.device, dtype=g.dtype)
                F.multiply_(g, scale)

    def __call__(self, grad: Tensor, param: Tensor | None = None) -> Tensor:
        """Pure form: `G * grad` for the layer whose weight is `param` (required)."""
        if param is None:
            raise ValueError("param is required: the scaling depends on which conv layer's weight it is")
        return super().__call__(grad, param)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """`{"type", "config", "scalings": {layer name: G (float64, CPU)}, "first_scalings": {layer name: G at its
        first measurement}}`; captured inputs are not saved."""
        return {
            "type": type(self).__name__,
            "config": copy.deepcopy(self.config()),
            "scalings": {name: g.detach().cpu().clone() for name, g in self._scalings.items()},
            "first_scalings": {name: g.detach().cpu().clone() for name, g in self._first.items()},
        }

    @staticmethod
    def _checked_scalings(scalings: Any, layers: Mapping[str, nn.Conv2d], key: str, every: bool) -> dict[str, Tensor]:
        """`state_dict[key]` checked against `layers` (all of them when `every`, else a subset), as float64 copies."""
        if not isinstance(scalings, Mapping):
            raise TypeError(f"state_dict[{key!r}] must be a dict of tensors, got {type(scalings).__name__}")
        if (set(scalings) != set(layers)) if every else not set(scalings) <= set(layers):
            raise ValueError(f"state_dict {key} are for layers {sorted(scalings)}, this model has {sorted(layers)}")
        loaded = {}
        for name in scalings:
            g, m = scalings[name], layers[name]
            if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                raise TypeError(f"scaling of layer {name!r} must be a floating torch.Tensor")
            if tuple(g.shape) != tuple(m.kernel_size):
                raise ValueError(f"scaling of layer {name!r} has shape {tuple(g.shape)}, expected {m.kernel_size}")
            if not torch.isfinite(g).all() or (g < 0).any():
                raise ValueError(f"scaling of layer {name!r} must contain only finite values >= 0")
            loaded[name] = g.detach().to(device=trained_weight(m).device, dtype=torch.float64).clone()
        return loaded

    def prepare_load(self, state: Any) -> Commit:
        """Hyper-parameters and scalings saved from the same architecture; validated before any change.  States
        saved before `first_scalings` existed load with none."""
        if isinstance(state, Mapping) and "first_scalings" not in state:
            state = {**state, "first_scalings": {}}
        fields = state_fields(state, "SpatialGradientScaling", ("config", "scalings", "first_scalings"))
        hyper = self._validate(fields["config"])
        layers = self._select_layers(hyper["min_kernel"])
        loaded = self._checked_scalings(fields["scalings"], layers, "scalings", every=True)
        first = self._checked_scalings(fields["first_scalings"], layers, "first_scalings", every=False)

        def commit() -> None:
            self._hyper = hyper
            self._setup_layers()
            self._scalings = loaded
            self._first = first
            self.mark_changed()

        return commit
