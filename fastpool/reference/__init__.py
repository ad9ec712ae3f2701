"""The pure-NumPy reference back end (``backend="numpy"``).

Vectorised over output positions, looping over window offsets: slow next to
the compiled kernels, but short enough to read and check by eye.  fastpool's
tests use it as an oracle beside PyTorch, and the benchmark suite as the
NumPy baseline.
"""

from fastpool._host import (
    FLOAT_DTYPES,
    absolute,
    asarray,
    canonical,
    conv_bias_grad,
    empty,
    host_only,
    times_sign,
    wrap,
    zeros,
)
from fastpool.reference.conv import conv, conv_backward
from fastpool.reference.pooling import max_backward, max_pool, sum_backward, sum_pool

__all__ = ["max_pool", "sum_pool", "max_backward", "sum_backward", "conv", "conv_backward",
           "conv_bias_grad", "asarray", "canonical", "empty", "zeros", "absolute",
           "times_sign", "wrap", "FLOAT_DTYPES", "host_only"]
