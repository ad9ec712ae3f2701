"""Generalized-mean (GeM) pooling on dask arrays, composed as the in-memory op is.

``gem = mean(max(x, eps) ** p) ** (1/p)`` (see :mod:`fastpool._gem`): the powers
are element-wise block maps running the very NumPy expressions of the in-memory
op, and the window means are fastpool.dask's average pooling (sliding windows
with their halos, adaptive windows, or the global tree reduction).  The
in-memory CPU op fuses the steps in one kernel (fastpool.cpu.gem), so for
float32 the two differ by an ulp (the global mean to rounding, as
``global_avg_pool``'s).  Running the fused
kernels per block would need the block's slice of a per-channel p: a next step.
"""

from __future__ import annotations

import numpy as np

from fastpool import _gem
from fastpool._params import (
    Layout,
    adaptive_output_shape,
    check_backend,
    check_bool,
    check_dtype,
)
from fastpool.dask import _core, _global


def _powered(block, p, eps, compute):
    """``max(x, eps) ** p`` in the compute dtype, as :class:`fastpool._gem._GeM`."""
    return _gem._raised(np.maximum(np.asarray(block, compute), eps), p)


def _powered_per_channel(block, p, eps, compute):
    return np.maximum(np.asarray(block, compute), eps) ** p


def _root(mean, p, dtype):
    """``mean ** (1/p)``, rounded once to the input's dtype."""
    return (mean ** (1.0 / p)).astype(dtype)


def gem_pool(x, nd, p, eps, output_size, kernel_size, stride, *, op, channels_last=False,
             backend=None):
    import dask.array as da

    x = _core.check_dask_array(x, op)
    channels_last = check_bool(channels_last, "channels_last", op)
    check_backend(backend, op)
    dtype = np.dtype(x.dtype).newbyteorder("=")
    if dtype != _gem._HALF:
        check_dtype(dtype, "avg", op, _core._float_dtypes(x))
    # float16 is computed in float32 and rounded once at the end, as in memory
    compute = np.dtype(np.float32) if dtype == _gem._HALF else dtype
    layout = Layout.of(tuple(x.shape), nd, channels_last, op, True)
    channel_axis = x.ndim - 1 if channels_last else x.ndim - nd - 1
    p = _gem._check_p(p, x.shape[channel_axis], op)
    eps = _gem._check_eps(eps, op)
    meta = _core._meta(x, compute, x.ndim)
    if isinstance(p, float):
        powered = x.map_blocks(_powered, p, eps, compute, dtype=compute, meta=meta)
        inverse = p
    else:
        # p per channel, as a dask array on x's channel chunks (1 on the other axes)
        tail = 0 if channels_last else nd
        p_array = da.from_array(p.astype(compute).reshape((-1,) + (1,) * tail),
                                chunks=(x.chunks[channel_axis],) + ((1,),) * tail)
        powered = da.map_blocks(_powered_per_channel, x, p_array, eps, compute, dtype=compute,
                                meta=meta)
        inverse = p_array
    common = dict(op=op, strict=True, channels_last=channels_last, backend=backend)
    if kernel_size is not None:
        mean = _core.sliding_pool(powered, "avg", nd, kernel_size, stride, **common)
    elif adaptive_output_shape(op, nd, output_size, layout.spatial) == (1,) * nd:
        # one mean per plane: the tree reduction, not one task joining every plane
        mean = _global.global_pool(powered, "avg", nd, op=op, keepdims=True,
                                   channels_last=channels_last, backend=backend)
    else:
        mean = _core.adaptive_pool(powered, "avg", nd, output_size, **common)
    out_meta = _core._meta(x, dtype, x.ndim)
    if isinstance(inverse, float):
        return mean.map_blocks(_root, inverse, dtype, dtype=dtype, meta=out_meta)
    return da.map_blocks(_root, mean, inverse, dtype, dtype=dtype, meta=out_meta)

