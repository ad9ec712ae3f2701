"""The pure-NumPy reference back end (``backend="numpy"``).

Vectorised over output positions, looping over window offsets: slow next to
the compiled kernels, but short enough to read and check by eye.  fastpool's
tests use it as an oracle beside PyTorch, and the benchmark suite as the
NumPy baseline.
"""

# The host array API the dispatch layer uses (asarray, canonical, wrap, ...).
from fastpool._host import *  # noqa: F403
from fastpool._host import __all__ as _ARRAY_API
from fastpool.reference.conv import conv, conv_backward
from fastpool.reference.pooling import (
    fractional_max_pool,
    max_backward,
    max_pool,
    max_unpool,
    max_unpool_backward,
    sum_backward,
    sum_pool,
)

__all__ = ["max_pool", "fractional_max_pool", "sum_pool", "max_backward", "sum_backward",
           "max_unpool", "max_unpool_backward", "conv", "conv_backward", *_ARRAY_API]
