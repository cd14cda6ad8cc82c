"""Spatial gradient scaling (SGS): a per-layer, data-driven scaling of convolution gradients.

Three parts: `nmi` (normalised mutual information from a joint histogram), `dependence` (the spatial
dependence matrix `S` of a layer's input maps) and `transform` (`G = sgs_scaling(S, k)` and the
`SpatialGradientScaling` gradient transform).  See `cdgrad.sgs.transform` for the method.
"""

from .dependence import authors_channel_dependence, spatial_dependence
from .fixed import FixedSpatialScaling, fixed_scaling
from .nmi import normalized_mutual_information
from .transform import PIPELINES, SpatialGradientScaling, authors_sgs_scaling, sgs_scaling

__all__ = [
    "FixedSpatialScaling",
    "PIPELINES",
    "SpatialGradientScaling",
    "authors_channel_dependence",
    "authors_sgs_scaling",
    "fixed_scaling",
    "normalized_mutual_information",
    "sgs_scaling",
    "spatial_dependence",
]
