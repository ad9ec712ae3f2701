"""The CPU back end: Numba ``@njit(parallel=True)`` kernels.

The kernels compile on first use (and are cached on disk), so importing this
package compiles nothing.
"""

# The host array API the dispatch layer uses (asarray, canonical, wrap, ...).
from fastpool._host import *  # noqa: F403
from fastpool._host import __all__ as _ARRAY_API
from fastpool.cpu.conv import conv, conv_backward
from fastpool.cpu.gem import input_grad as gem_input_grad
from fastpool.cpu.gem import roots as gem_roots
from fastpool.cpu.gem import window_sizes as gem_window_sizes
from fastpool.cpu.gem import window_sums as gem_window_sums
from fastpool.cpu.pooling import (
    fractional_max_pool,
    max_backward,
    max_pool,
    max_unpool,
    max_unpool_backward,
    plan_max_backward,
    plan_max_pool,
    plan_sum_backward,
    plan_sum_pool,
    sum_backward,
    sum_pool,
)

# conv and conv_backward take channels-last arrays as they are (channels_last=True):
# their GEMMs work in either layout, so the dispatch layer transposes nothing.
conv_channels_last = True

__all__ = ["max_pool", "fractional_max_pool", "sum_pool", "max_backward", "sum_backward",
           "max_unpool", "max_unpool_backward", "conv", "conv_backward", "plan_max_pool",
           "plan_sum_pool", "plan_max_backward", "plan_sum_backward", "gem_window_sums",
           "gem_window_sizes", "gem_roots", "gem_input_grad", *_ARRAY_API]
