"""Exact singular values of convolutional layers and projection onto an operator-norm ball.

`operator`: the singular values of a stride-1 circular convolution from the 2-D DFT of its kernel (Sedghi, Gupta
and Long, 2019), one alternating-projection step onto the ball ``{K : ||conv_K|| <= max_norm}`` and the dense matrix
used as a reference; `clipper`: `OperatorNormClipper`, the training-time projection as a gradient transform
(attached with `cdgrad.attach`), and `record_input_sizes`.  See docs/spectral.md.
"""

from .clipper import OperatorNormClipper, record_input_sizes
from .operator import (
    NORM_ESTIMATES,
    PROJECTIONS,
    Projection,
    clip_operator_norm,
    conv_dense_matrix,
    conv_operator_norm,
    conv_singular_values,
    memory_needed,
)

__all__ = [
    "NORM_ESTIMATES",
    "PROJECTIONS",
    "OperatorNormClipper",
    "Projection",
    "clip_operator_norm",
    "conv_dense_matrix",
    "conv_operator_norm",
    "conv_singular_values",
    "memory_needed",
    "record_input_sizes",
]
