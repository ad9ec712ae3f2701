"""Scalar arithmetic shared by the CPU and CUDA kernels.

Plain Python functions, compiled by each back end in its own way
(``njit(inline="always")`` on the CPU, ``cuda.jit(device=True)`` on the GPU), so
both follow one rule.  Importing this module compiles nothing.
"""

from __future__ import annotations

import math

import numpy as np


def torch_power(value, power):
    """``value ** power`` for a scalar, as torch's ``pow(tensor, scalar)`` computes it.

    torch multiplies the small integer powers out and takes square roots for
    +-0.5, whose results differ from C's ``pow`` at -inf (NaN, not inf) and at
    -0.0; Lp pooling's forward and backward both go through it.
    """
    if power == 2.0:
        return value * value
    if power == 1.0:
        return value
    if power == 3.0:
        return value * value * value
    # math.sqrt, not np.sqrt (numba-cuda has no ufuncs in device code); guarded,
    # and dividing a NumPy one, because plain Python (CUDA's simulator) raises
    # below 0 and at 1 / 0.
    if power == 0.5:
        return math.nan if value < 0 else math.sqrt(value)
    if power == -0.5:
        return math.nan if value < 0 else np.float64(1.0) / math.sqrt(value)
    return value ** power
