"""The CPU back end: Numba ``@njit(parallel=True)`` kernels.

The kernels compile on first use (and are cached on disk), so importing this
package compiles nothing.
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
from fastpool.cpu.conv import conv, conv_backward
from fastpool.cpu.pooling import max_backward, max_pool, sum_backward, sum_pool

__all__ = ["max_pool", "sum_pool", "max_backward", "sum_backward", "conv", "conv_backward",
           "conv_bias_grad", "asarray", "canonical", "empty", "zeros", "absolute",
           "times_sign", "wrap", "FLOAT_DTYPES", "host_only"]
