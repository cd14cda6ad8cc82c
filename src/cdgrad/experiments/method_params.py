"""The hyper-parameters of the toolkit's gradient methods, each declared once (type, help, range or choices,
default); a method takes them by name and may narrow their choices or change their default (`Param.but`)."""

from __future__ import annotations

from cdgrad.experiments.registry import Param
from cdgrad.spectral import PROJECTIONS

__all__ = ["PARAMS"]

# ------------------------------------------------------------------------------------------------ parameters

PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            name="lam",
            type=float,
            default=1.0,
            minimum=0.0,
            help="lambda of h0 / sobolev (> 0 in the exact convention)",
        ),
        Param(name="beta", type=float, default=0.0, help="h0 / sobolev: add beta times the ordinary gradient"),
        Param(name="sigma", type=float, default=1.0, minimum=0.0, help="sigma of Laplacian smoothing (ls)"),
        Param(
            name="direction",
            type=str,
            choices=("output", "input", "flat"),
            help="axis to smooth along: output, input or flat (h0/sobolev); flat or output (ls)",
        ),
        Param(name="scope", type=str, choices=("conv", "all"), help="which weights: conv (3+ dims) or all"),
        Param(
            name="convention",
            type=str,
            default="exact",
            choices=("exact", "paper"),
            help="lambda convention of h0 / sobolev: 'exact' (docs/math.md 1.1-1.2, the default) "
            "or 'paper' (the published code, via cdgrad.paper_convention)",
        ),
        Param(
            name="sgs_k",
            type=float,
            default=5.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="spatial gradient scaling: strength k",
        ),
        Param(
            name="sgs_batches", type=int, default=2, minimum=1, help="spatial gradient scaling: batches per estimate"
        ),
        Param(
            name="sgs_every", type=int, default=5, minimum=1, help="spatial gradient scaling: epochs between estimates"
        ),
        Param(
            name="sgs_pipeline",
            type=str,
            default="cdgrad",
            choices=("cdgrad", "authors"),
            help="spatial gradient scaling: 'cdgrad' (training-mode capture, channel mean then k-transform) or "
            "'authors' (the authors' code: eval-mode capture of padded inputs, k-transform per channel)",
        ),
        Param(
            name="sgs_dependence",
            type=str,
            default="mi",
            choices=("mi", "autocorr"),
            help="spatial gradient scaling: dependence measure, normalised mutual information or autocorrelation",
        ),
        Param(
            name="sgs_warmup",
            type=int,
            default=0,
            minimum=0,
            help="spatial gradient scaling: epochs of plain gradients before the first estimate",
        ),
        Param(
            name="sgs_on",
            type=str,
            default="gradient",
            choices=("gradient", "update"),
            help="spatial gradient scaling: scale the gradient (before the optimizer) or the optimizer's update "
            "(after it: the paper's post-optimizer variant, 'Adagrad*')",
        ),
        Param(
            name="sgs_edge",
            type=float,
            default=2.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="fixed spatial scaling: ratio of the centre tap to the other taps of the centre row and column",
        ),
        Param(
            name="sgs_corner",
            type=float,
            default=4.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="fixed spatial scaling: ratio of the centre tap to the corner taps",
        ),
        Param(
            name="clip_norm",
            type=float,
            default=1.0,
            minimum=0.0,
            exclusive_minimum=True,
            help="opnorm: operator-norm bound of each conv layer",
        ),
        Param(name="clip_every", type=int, default=100, minimum=1, help="opnorm: optimizer steps between projections"),
        Param(
            name="clip_projection",
            type=str,
            default="exact",
            choices=tuple(PROJECTIONS),
            help="opnorm: 'exact' (clip every frequency's singular values, Sedghi et al.), 'reshaped' (clip the "
            "O x (I kh kw) reshaped kernel, Yoshida & Miyato) or 'gram' (rescale under the Gram-iteration bound)",
        ),
    )
}
