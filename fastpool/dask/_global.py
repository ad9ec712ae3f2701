"""Global pooling as a tree reduction: per-block partials, then combines.

Max partials carry whole-plane indices, and the combine keeps torch's rules
across blocks: a NaN wins (the last NaN in the plane's scan order, as the
kernels' ``value > best or value != value`` update leaves it); among equal
maxima the first in scan order wins.  Average partials are float64 sums.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import numpy as np

from fastpool import _dispatch, _threads
from fastpool._params import (
    COMBINED_MODES,
    EXTREMES,
    GLOBAL_MODES,
    Layout,
    check_backend,
    check_bool,
    check_dtype,
)
from fastpool.dask._core import (
    _float_dtypes,
    _meta,
    _xp,
    check_dask_array,
    kernel_threads,
    pooled_axes,
    to_global_indices,
)


@dataclass(frozen=True, eq=False)
class _Partial:
    mode: str
    nd: int
    channels_last: bool
    backend: str | None
    axes: tuple
    origins: tuple
    whole_spatial: tuple

    def __call__(self, block):
        xp = _xp(block)
        if self.mode == "avg":
            return xp.sum(block, axis=self.axes, keepdims=True, dtype=np.float64)
        with _threads.thread_cap(kernel_threads()):
            values, indices = _dispatch.adaptive_pool(
                block, self.mode, self.nd, (1,) * self.nd, op=f"global_{self.mode}_pool",
                strict=False,
                return_indices=True, channels_last=self.channels_last, backend=self.backend)
        spatial = tuple(block.shape[a] for a in self.axes)
        return values, to_global_indices(indices, spatial, self.origins, self.whole_spatial)


def _combine_extreme(parts, better=operator.gt):
    """Max (``better`` >) or min (<) partials combined: min pooling is max pooling
    under an order-reversing bijection, so the same NaN and tie rules hold."""
    values, indices = parts[0]
    xp = _xp(values)
    for other_values, other_indices in parts[1:]:
        later = other_indices > indices
        earlier = other_indices < indices
        if values.dtype.kind == "f":
            nan, other_nan = values != values, other_values != other_values
            take = (other_nan & (~nan | later)) | (~nan & ~other_nan & (
                better(other_values, values) | ((other_values == values) & earlier)))
        else:
            take = better(other_values, values) | ((other_values == values) & earlier)
        values = xp.where(take, other_values, values)
        indices = xp.where(take, other_indices, indices)
    return values, indices


def _combine(mode, parts):
    if mode == "avg":
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total
    return _combine_extreme(parts, operator.lt if mode == "min" else operator.gt)


@dataclass(frozen=True, eq=False)
class _Final:
    mode: str
    size: int
    dtype: object
    shape_axes: tuple  # the pooled axes to drop (empty with keepdims)
    with_indices: bool = False

    def __call__(self, parts):
        result = _combine(self.mode, parts)
        if self.mode == "avg":
            result = (result * (1.0 / self.size)).astype(self.dtype)
            return result.squeeze(self.shape_axes) if self.shape_axes else result
        if self.shape_axes:
            result = tuple(r.squeeze(self.shape_axes) for r in result)
        return result if self.with_indices else result[0]


def global_pool(x, mode, nd, *, op, keepdims=False, return_indices=False, channels_last=False,
                backend=None, split_every=None):
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    x = check_dask_array(x, op)
    keepdims = check_bool(keepdims, "keepdims", op)
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if mode not in EXTREMES and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max and min "
                         f"pooling")
    check_backend(backend, op)
    check_dtype(np.dtype(x.dtype), mode, op, _float_dtypes(x))
    layout = Layout.of(tuple(x.shape), nd, channels_last, op, True)
    if split_every is None:
        split_every = 16
    if not isinstance(split_every, int) or isinstance(split_every, bool) or split_every < 2:
        raise ValueError(f"fastpool.dask.{op}: split_every must be an int >= 2, got "
                         f"{split_every!r}")
    axes = pooled_axes(x.ndim, nd, channels_last)
    token = tokenize(x, mode, nd, keepdims, return_indices, channels_last, backend, split_every)
    name = f"{op.replace('_', '-')}-{token}"
    bounds = [np.concatenate([[0], np.cumsum(x.chunks[a])]) for a in axes]
    other_axes = [i for i in range(x.ndim) if i not in axes]
    dsk = {}
    final_axes = () if keepdims else axes
    out_chunks = tuple((1,) if i in axes else x.chunks[i] for i in range(x.ndim)
                       if keepdims or i not in axes)
    plane = int(np.prod(layout.spatial))
    final = _Final(mode, plane, np.dtype(x.dtype), final_axes, return_indices)
    level_names = itertools.count()
    for rest in itertools.product(*[range(len(x.chunks[i])) for i in other_axes]):
        keys = []
        for combo in itertools.product(*[range(len(x.chunks[a])) for a in axes]):
            index = [0] * x.ndim
            for axis, value in zip(other_axes, rest):
                index[axis] = value
            for axis, value in zip(axes, combo):
                index[axis] = value
            key = (f"{name}-partial", *index)
            dsk[key] = (_Partial(mode, nd, channels_last, backend, axes,
                                 tuple(int(b[c]) for b, c in zip(bounds, combo)),
                                 layout.spatial), (x.name, *index))
            keys.append(key)
        out_index = tuple(rest[other_axes.index(i)] if i in other_axes else 0
                          for i in range(x.ndim) if keepdims or i not in axes)
        while len(keys) > split_every:
            grouped = []
            for start in range(0, len(keys), split_every):
                key = (f"{name}-combine", next(level_names))
                dsk[key] = (_combine, mode, keys[start:start + split_every])
                grouped.append(key)
            keys = grouped
        dsk[(name, *out_index)] = (final, keys)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    ndim = len(out_chunks)
    if not return_indices:
        return da.Array(graph, name, out_chunks, meta=_meta(x, x.dtype, ndim))
    pair = da.Array(graph, name, out_chunks, meta=_meta(x, x.dtype, ndim))
    results = []
    for part, dtype, suffix in ((0, x.dtype, "values"), (1, np.int64, "indices")):
        sub_name = f"{name}-{suffix}"
        sub = {(sub_name, *k[1:]): (operator.getitem, k, part)
               for k in _flatten(pair.__dask_keys__())}
        sub_graph = HighLevelGraph.from_collections(sub_name, sub, dependencies=[pair])
        results.append(da.Array(sub_graph, sub_name, out_chunks, meta=_meta(x, dtype, ndim)))
    return tuple(results)


def global_pool_mode(x, mode, nd, *, op, keepdims=False, return_indices=False,
                     channels_last=False, backend=None, split_every=None):
    """``fastpool.global_pool{nd}d``'s modes: avg, max and min as themselves; timm's
    avgmax (``0.5 * (avg + max)``) and catavgmax (the average's channels, then the
    maximum's) composed from the global average and maximum, indices the maximum's."""
    if mode not in GLOBAL_MODES:
        raise ValueError(f"fastpool.dask.{op}: mode must be one of {GLOBAL_MODES}, got "
                         f"{mode!r}")
    common = dict(op=op, keepdims=keepdims, channels_last=channels_last, backend=backend,
                  split_every=split_every)
    if mode not in COMBINED_MODES:
        return global_pool(x, mode, nd, return_indices=return_indices, **common)
    return_indices = check_bool(return_indices, "return_indices", op)
    avg = global_pool(x, "avg", nd, **common)
    top, indices = global_pool(x, "max", nd, return_indices=True, **common)
    if mode == "avgmax":
        # as the in-memory op: the sum in the input's dtype, then times 0.5 in it
        out = (avg + top) * np.dtype(avg.dtype).type(0.5)
    else:
        import dask.array as da

        axis = x.ndim - 1 if channels_last else x.ndim - nd - 1
        out = da.concatenate([avg, top], axis=axis)
    return (out, indices) if return_indices else out


def _flatten(keys):
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten(k)
    else:
        yield keys
