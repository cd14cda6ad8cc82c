"""Structural re-parameterisation: training-time multi-branch blocks that merge exactly into one plain conv.

The baselines spatial gradient scaling is compared with (docs/sgs.md).  A block replaces a k x k convolution and
the BatchNorm that follows it; every branch has its own BatchNorm, and the branch outputs are summed:

* **ACB** (ACNet, Ding et al. 2019): k x k, 1 x k and k x 1 convolutions.
* **RepVGG** (Ding et al. 2021): k x k, 1 x 1, and an identity (a BatchNorm alone) when the block maps C channels
  to C channels with stride 1.
* **DBB** (Diverse Branch Block, Ding et al. 2021): k x k; 1 x 1; 1 x 1 -> k x k; 1 x 1 -> k x k average pool.
  The 1 x 1 of the third branch is identity-based (its kernel is `I + W`, W starting at 0), and the first stage
  of the two sequential branches pads with its BatchNorm's output for a zero input (not with zeros), so that the
  sequential branches merge exactly.

Every branch is, in eval mode, an affine map `x -> conv(x, K_n) + b_n` in the block's k x k frame (a BatchNorm
folds into the conv before it: `K * gamma / sigma`, `beta - mu * gamma / sigma`; a 1 x k kernel is zero-padded to
k x k, centred; a 1 x 1 conv followed by a k x k one is the k x k kernel `K2 @ K1` over channels), so the block is
the conv with `K = sum_n K_n`, `b = sum_n b_n`.  `merge` writes that back as the plain architecture: the conv
(no bias) and a BatchNorm that adds `b` (weight 1, bias b, running mean 0, running variance 1 - eps).

    model = cdgrad.reparam.reparameterize(model, "dbb")  # every eligible conv + BN pair becomes a DBB
    ... train ...
    plain = cdgrad.reparam.merge(model)  # the same eval-mode function, the plain model's state_dict keys

Eligible: a `Conv2d` with an odd square kernel k >= 3, padding >= k // 2 (symmetric, zero padding), dilation 1,
groups 1, followed by a `BatchNorm2d` that reads nothing else.  The pairs are found by tracing the model with
torch.fx.  Bad input raises before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BLOCKS", "ACBlock", "DiverseBranchBlock", "RepBlock", "RepVGGBlock", "eligible", "merge", "reparameterize"]


def eligible(conv: nn.Module) -> str | None:
    """None if a block can replace `conv`, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"it is a {type(conv).__name__}, not an nn.Conv2d"
    kh, kw = conv.kernel_size
    if kh != kw or kh < 3 or kh % 2 == 0:
        return f"its kernel is {kh}x{kw}; accepted: odd square kernels of size 3 or more"
    padding = conv.padding
    if isinstance(padding, str) or padding[0] != padding[1] or padding[0] < kh // 2:
        return f"its padding is {padding!r}; accepted: equal padding of at least kernel_size // 2 = {kh // 2}"
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or conv.groups != 1:
        return "accepted: zero padding, dilation 1 and groups 1"
    return None


def _fold(kernel: Tensor, bn: nn.Module | None) -> tuple[Tensor, Tensor]:
    """(kernel * gamma / sigma, beta - mu * gamma / sigma): the conv followed by `bn` in eval mode."""
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _bn_constant(bn: nn.BatchNorm2d) -> Tensor:
    """What `bn` outputs for a zero input in eval mode, per channel."""
    weight: Tensor = bn.weight
    return _fold(torch.zeros(bn.num_features, 1, 1, 1, dtype=weight.dtype, device=weight.device), bn)[1]


def _centred(kernel: Tensor, k: int) -> Tensor:
    """`kernel` (.., h, w) zero-padded, centred, to (.., k, k)."""
    ph, pw = (k - kernel.shape[2]) // 2, (k - kernel.shape[3]) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


class _ConvBN(nn.Module):
    """A bias-free conv, then (unless bn=False) its BatchNorm."""

    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], bn: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(cout) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.conv(x)
        return y if self.bn is None else self.bn(y)


class _PadWithBN(nn.Module):
    """BatchNorm, then padding with the BatchNorm's own output for a zero input (DBB's BNAndPad)."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.bn(x)
        if self.pad:
            y = F.pad(y, [self.pad] * 4)
            border = _bn_constant(self.bn).reshape(1, -1, 1, 1)
            inner = torch.zeros_like(y[:1, :1])
            inner[..., self.pad : -self.pad, self.pad : -self.pad] = 1
            y = y + (1 - inner) * border
        return y


class _IdentityBased1x1(nn.Conv2d):
    """A C -> C 1 x 1 conv whose kernel is `I + weight`, weight starting at zero (DBB)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1, bias=False)
        nn.init.zeros_(self.weight)
        self.identity: Tensor
        self.register_buffer("identity", torch.eye(channels).reshape(channels, channels, 1, 1), persistent=False)

    def kernel(self) -> Tensor:
        return self.weight + self.identity.to(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel())


class RepBlock(nn.Module):
    """Base of the blocks: branches summed; `kernel_bias()` is the merged conv (exact in eval mode)."""

    kind: str = ""
    square: _ConvBN
    # set by `reparameterize`: the BatchNorm this block stands in for, and its settings
    bn_name: str | None = None
    bn_eps: float = 1e-5
    bn_momentum: float | None = 0.1
    conv_bias: bool = False

    def __init__(self, conv: nn.Module, bn: bool = True) -> None:
        super().__init__()
        why = eligible(conv)
        if why is not None:
            raise ValueError(f"{type(self).__name__} cannot replace this conv: {why}")
        assert isinstance(conv, nn.Conv2d)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.k = conv.kernel_size[0]
        self.stride = (conv.stride[0], conv.stride[1])
        self.padding = int(conv.padding[0])
        self.bn = bn

    def branches(self) -> list[Callable[[Tensor], Tensor]]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for branch in self.branches():
            y = branch(x)
            out = y if out is None else out + y
        assert out is not None
        return out

    def kernel_bias(self) -> tuple[Tensor, Tensor]:
        """(K, b) with block(x) = conv2d(x, K, stride, padding) + b in eval mode."""
        raise NotImplementedError

    def scaling(self) -> Tensor:
        """G = the sum of the binary k x k receptive-field masks of the trainable parallel branches.

        Lemma 1 (docs/sgs.md): the BatchNorm-free block (`bn=False`) trained by SGD with momentum and weight decay
        gives, step for step, the merged weights of the plain conv trained with its gradient scaled by G.
        """
        raise NotImplementedError(f"{type(self).__name__} has sequential branches: no mask sum describes it")

    def _mask(self, h: int, w: int) -> Tensor:
        return _centred(torch.ones(1, 1, h, w), self.k)[0, 0]

    def _kb(self, branch: _ConvBN) -> tuple[Tensor, Tensor]:
        """The conv (+ BN) `branch` in the k x k frame."""
        kernel = _centred(branch.conv.weight, self.k)
        if branch.bn is not None:
            return _fold(kernel, branch.bn)
        return kernel, torch.zeros(self.out_channels, dtype=kernel.dtype, device=kernel.device)

    def to_conv(self) -> nn.Conv2d:
        """The merged plain conv, with the block's bias as the conv's bias."""
        kernel, bias = self.kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.k, self.stride, self.padding, bias=True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype).train(self.training)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)  # type: ignore[union-attr]
        return conv


class ACBlock(RepBlock):
    """ACNet's asymmetric convolution block: k x k + 1 x k + k x 1, each with its BatchNorm."""

    kind = "acb"

    def __init__(self, conv: nn.Module, bn: bool = True) -> None:
        super().__init__(conv, bn)
        k, p, s, cin, cout = self.k, self.padding, self.stride, self.in_channels, self.out_channels
        self.square = _ConvBN(cin, cout, (k, k), s, (p, p), bn)
        self.hor = _ConvBN(cin, cout, (1, k), s, (p - k // 2, p), bn)
        self.ver = _ConvBN(cin, cout, (k, 1), s, (p, p - k // 2), bn)

    def branches(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.square, self.hor, self.ver]

    def scaling(self) -> Tensor:
        return self._mask(self.k, self.k) + self._mask(1, self.k) + self._mask(self.k, 1)

    def kernel_bias(self) -> tuple[Tensor, Tensor]:
        parts = [self._kb(b) for b in (self.square, self.hor, self.ver)]
        return sum(k for k, _ in parts), sum(b for _, b in parts)  # type: ignore[return-value]


class RepVGGBlock(RepBlock):
    """RepVGG's block: k x k + 1 x 1, each with its BatchNorm, + a BatchNorm identity when C -> C at stride 1."""

    kind = "repvgg"

    def __init__(self, conv: nn.Module, bn: bool = True) -> None:
        super().__init__(conv, bn)
        k, p, s, cin, cout = self.k, self.padding, self.stride, self.in_channels, self.out_channels
        self.square = _ConvBN(cin, cout, (k, k), s, (p, p), bn)
        self.point = _ConvBN(cin, cout, (1, 1), s, (p - k // 2, p - k // 2), bn)
        has_identity = cin == cout and s == (1, 1) and p == k // 2
        self.identity: nn.Module | None = (nn.BatchNorm2d(cout) if bn else nn.Identity()) if has_identity else None

    def branches(self) -> list[Callable[[Tensor], Tensor]]:
        return [self.square, self.point] + ([self.identity] if self.identity is not None else [])

    def scaling(self) -> Tensor:
        return self._mask(self.k, self.k) + self._mask(1, 1)  # the identity branch has no weights to train

    def kernel_bias(self) -> tuple[Tensor, Tensor]:
        parts = [self._kb(self.square), self._kb(self.point)]
        if self.identity is not None:
            w = self.square.conv.weight
            eye = _centred(torch.eye(self.out_channels, dtype=w.dtype, device=w.device)[:, :, None, None], self.k)
            if isinstance(self.identity, nn.BatchNorm2d):
                parts.append(_fold(eye, self.identity))
            else:
                parts.append((eye, torch.zeros(self.out_channels, dtype=w.dtype, device=w.device)))
        return sum(k for k, _ in parts), sum(b for _, b in parts)  # type: ignore[return-value]


class DiverseBranchBlock(RepBlock):
    """DBB: k x k; 1 x 1; 1 x 1 (identity-based) -> k x k; 1 x 1 -> k x k average pool; each stage with its BN."""

    kind = "dbb"

    def __init__(self, conv: nn.Module, bn: bool = True) -> None:
        if not bn:
            raise ValueError("DiverseBranchBlock has no BatchNorm-free form (its sequential branches need the BNs)")
        super().__init__(conv, bn)
        k, p, s, cin, cout = self.k, self.padding, self.stride, self.in_channels, self.out_channels
        self.square = _ConvBN(cin, cout, (k, k), s, (p, p), True)
        self.point = _ConvBN(cin, cout, (1, 1), s, (p - k // 2, p - k // 2), True)
        self.seq_first = _IdentityBased1x1(cin)
        self.seq_pad = _PadWithBN(cin, p)
        self.seq_second = _ConvBN(cin, cout, (k, k), s, (0, 0), True)
        self.avg_first = nn.Conv2d(cin, cout, 1, bias=False)
        self.avg_pad = _PadWithBN(cout, p)
        self.avg_pool = nn.AvgPool2d(k, s, 0)
        self.avg_bn = nn.BatchNorm2d(cout)

    def branches(self) -> list[Callable[[Tensor], Tensor]]:
        return [
            self.square,
            self.point,
            lambda x: self.seq_second(self.seq_pad(self.seq_first(x))),
            lambda x: self.avg_bn(self.avg_pool(self.avg_pad(self.avg_first(x)))),
        ]

    def _sequential(self, first: Tensor, pad: _PadWithBN, second: Tensor, second_bias: Tensor) -> tuple[Tensor, Tensor]:
        """1 x 1 `first` (C_mid, C_in), its BN-and-pad, then the k x k `second` (C_out, C_mid, k, k) + bias."""
        k1, b1 = _fold(first, pad.bn)
        kernel = torch.einsum("omhw,mi->oihw", second, k1[:, :, 0, 0])
        return kernel, second_bias + torch.einsum("omhw,m->o", second, b1)

    def kernel_bias(self) -> tuple[Tensor, Tensor]:
        parts = [self._kb(self.square), self._kb(self.point)]
        k2, b2 = _fold(self.seq_second.conv.weight, self.seq_second.bn)
        parts.append(self._sequential(self.seq_first.kernel(), self.seq_pad, k2, b2))
        w = self.avg_first.weight
        pool = torch.eye(self.out_channels, dtype=w.dtype, device=w.device)[:, :, None, None].expand(
            -1, -1, self.k, self.k
        ) / (self.k * self.k)
        k_pool, b_pool = _fold(pool, self.avg_bn)
        parts.append(self._sequential(w, self.avg_pad, k_pool, b_pool))
        return sum(k for k, _ in parts), sum(b for _, b in parts)  # type: ignore[return-value]


BLOCKS: dict[str, type[RepBlock]] = {b.kind: b for b in (ACBlock, RepVGGBlock, DiverseBranchBlock)}


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) of every Conv2d whose only reader is a BatchNorm2d that reads nothing else."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # torch.fx raises many types for untraceable code
        raise ValueError(
            f"reparameterize traces the model with torch.fx to find conv + BatchNorm pairs, and tracing "
            f"{type(model).__name__} failed: {error}"
        ) from error
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.Conv2d or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and type(modules.get(user.target)) is nn.BatchNorm2d and len(user.args) == 1:
            pairs.append((str(node.target), str(user.target)))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def reparameterize(model: nn.Module, kind: str) -> nn.Module:
    """Replace every eligible conv + BatchNorm pair of `model` by a `kind` block (in place; returns `model`).

    kind: "acb", "repvgg" or "dbb".  The block's k x k branch starts from the conv's weights and the BatchNorm's
    parameters and statistics; the other branches start as their papers initialise them.  The BatchNorm's place
    holds an `nn.Identity` until `merge`.  Raises ValueError (nothing changed) for an unknown kind, a model that
    already holds blocks, or a model with no eligible pair.
    """
    if kind not in BLOCKS:
        raise ValueError(f"kind must be one of {sorted(BLOCKS)}, got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    held = [name for name, m in model.named_modules() if isinstance(m, RepBlock)]
    if held:
        raise ValueError(f"the model already holds re-parameterised blocks ({held[0]!r}, ...); merge it first")
    pairs = [(c, b) for c, b in _conv_bn_pairs(model) if eligible(model.get_submodule(c)) is None]
    if not pairs:
        raise ValueError(
            f"{type(model).__name__} has no conv + BatchNorm pair a block can replace (accepted: an nn.Conv2d with "
            "an odd square kernel >= 3, padding >= kernel_size // 2, dilation 1, groups 1, read only by an "
            "nn.BatchNorm2d)"
        )
    blocks = {}
    for conv_name, bn_name in pairs:  # build everything first: an error leaves the model as it was
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        block = BLOCKS[kind](conv)
        block.bn_name, block.bn_eps, block.bn_momentum = bn_name, bn.eps, bn.momentum
        block.conv_bias = conv.bias is not None
        block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        square_bn = block.square.bn
        assert square_bn is not None and square_bn.running_mean is not None
        with torch.no_grad():
            block.square.conv.weight.copy_(conv.weight)
            square_bn.load_state_dict(bn.state_dict())
            if conv.bias is not None:  # a conv bias folds into the BN's mean: BN(Wx + c) = BN'(Wx), mu' = mu - c
                square_bn.running_mean.sub_(conv.bias)
        blocks[conv_name] = block
    for conv_name, bn_name in pairs:
        _set(model, conv_name, blocks[conv_name])
        _set(model, bn_name, nn.Identity())
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every block of `model` back into a plain conv + BatchNorm (in place; returns `model`).

    The result computes the same function as the blocks in eval mode and has the state_dict keys of the model
    before `reparameterize` (the conv without bias; the BatchNorm adds the merged bias).  Raises ValueError
    (nothing changed) for a model without blocks; TypeError for anything but an `nn.Module`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, RepBlock)]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} holds no re-parameterised block to merge (reparameterize it first, or it was "
            "already merged)"
        )
    replacements: list[tuple[str, nn.Module, str | None, nn.Module | None]] = []
    with torch.no_grad():
        for name, block in blocks:
            bn_name = block.bn_name
            if bn_name is None:  # a block built by hand: the plain conv carries the bias
                replacements.append((name, block.to_conv(), None, None))
                continue
            kernel, bias = block.kernel_bias()
            conv = nn.Conv2d(
                block.in_channels, block.out_channels, block.k, block.stride, block.padding, bias=block.conv_bias
            )
            conv = conv.to(device=kernel.device, dtype=kernel.dtype).train(block.training)
            conv.weight.copy_(kernel)
            if conv.bias is not None:  # the plain model's conv bias: zero, the BatchNorm adds the merged bias
                conv.bias.zero_()
            eps, momentum = block.bn_eps, block.bn_momentum
            bn = nn.BatchNorm2d(block.out_channels, eps=eps, momentum=momentum).to(kernel.device, kernel.dtype)
            bn.train(block.training)
            bn.weight.fill_(1.0)
            bn.bias.copy_(bias)
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - eps)  # sqrt(running_var + eps) = 1: the BN adds the bias only
            replacements.append((name, conv, bn_name, bn))
    for name, merged, bn_name, merged_bn in replacements:
        _set(model, name, merged)
        if bn_name is not None and merged_bn is not None:
            _set(model, bn_name, merged_bn)
    return model
