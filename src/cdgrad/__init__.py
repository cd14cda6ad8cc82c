"""cdgrad: channel-directed gradients and related geometry-aware gradient transforms.

import cdgrad
handle = cdgrad.attach(optimizer, cdgrad.ChannelDirected("sobolev", lam=1.0, beta=0.1))
"""

from .attach import AttachHandle, UpdateHandle, attach, attach_update
from .functional import centralize, laplacian_smooth, reweighted_h0, sobolev
from .norm_bounds import clip_reshaped_norm, conv_norm_gram, conv_norm_power, reshaped_norm, reshaped_norm_power
from .reparam import merge, reparameterize
from .sgs import (
    FixedSpatialScaling,
    SpatialGradientScaling,
    normalized_mutual_information,
    sgs_scaling,
    spatial_dependence,
)
from .spectral import (
    OperatorNormClipper,
    clip_operator_norm,
    conv_operator_norm,
    conv_singular_values,
    record_input_sizes,
)
from .transforms import (
    Centralize,
    Chain,
    ChannelDirected,
    LaplacianSmoothing,
    Masked,
    Scaled,
    masked,
    paper_convention,
)
from .transforms_base import GradientTransform

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
    "ChannelDirected",
    "LaplacianSmoothing",
    "Centralize",
    "Scaled",
    "Chain",
    "Masked",
    "masked",
    "paper_convention",
    "GradientTransform",
    "conv_singular_values",
    "conv_operator_norm",
    "clip_operator_norm",
    "OperatorNormClipper",
    "record_input_sizes",
    "conv_norm_power",
    "conv_norm_gram",
    "reshaped_norm",
    "reshaped_norm_power",
    "clip_reshaped_norm",
    "reparameterize",
    "merge",
    "SpatialGradientScaling",
    "FixedSpatialScaling",
    "normalized_mutual_information",
    "sgs_scaling",
    "spatial_dependence",
]
