"""Spatial gradient scaling (SGS): a per-layer, data-driven scaling of convolution gradients.

Three parts: `nmi` (normalised mutual information from a joint histogram), `dependence` (the spatial
dependence matrix `S` of a layer's input maps) and `transform` (`G = sgs_scaling(S, k)` and the
`SpatialGradientScaling` gradient transform).  See `cdgrad.sgs.transform` for the method.
"""

from .dependence import spatial_dependence
from .nmi import normalized_mutual_information
from .transform import SpatialGradientScaling, sgs_scaling

__all__ = [
    "SpatialGradientScaling",
    "normalized_mutual_information",
    "sgs_scaling",
    "spatial_dependence",
]
