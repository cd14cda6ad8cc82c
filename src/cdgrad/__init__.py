"""cdgrad: channel-directed gradients and related geometry-aware gradient transforms.

import cdgrad
handle = cdgrad.attach(optimizer, cdgrad.ChannelDirected("sobolev", lam=1.0, beta=0.1))

The top level holds `attach`, the transforms, their combinators and the pure functions.  Exact singular values
and the operator-norm projection are in `cdgrad.spectral`, fast norm bounds in `cdgrad.norm_bounds`,
re-parameterisations in `cdgrad.reparam` and the SGS analysis in `cdgrad.sgs`.
"""

from . import norm_bounds, reparam, sgs, spectral
from .attach import AttachHandle, UpdateHandle, attach, attach_update
from .functional import centralize, laplacian_smooth, reweighted_h0, sobolev
from .sgs import FixedSpatialScaling, SpatialGradientScaling
from .transforms import (
    Centralize,
    Chain,
    ChannelDirected,
    LaplacianSmoothing,
    Masked,
    OnUpdate,
    Scaled,
    masked,
    on_update,
    paper_convention,
)
from .transforms_base import ConfiguredTransform, GradientTransform

__version__ = "0.1.0"

__all__ = [
    "attach",
    "AttachHandle",
    "attach_update",
    "UpdateHandle",
    "reweighted_h0",
    "sobolev",
    "laplacian_smooth",
    "centralize",
    "GradientTransform",
    "ConfiguredTransform",
    "ChannelDirected",
    "LaplacianSmoothing",
    "Centralize",
    "SpatialGradientScaling",
    "FixedSpatialScaling",
    "Scaled",
    "Chain",
    "Masked",
    "masked",
    "OnUpdate",
    "on_update",
    "paper_convention",
    "norm_bounds",
    "reparam",
    "sgs",
    "spectral",
]
