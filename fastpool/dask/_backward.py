"""Backward ops on dask arrays: one task per block of the input gradient.

Each input block gathers the gradient blocks whose windows can reach it (from
the whole array's window table) and runs fastpool's backward kernels on them:
max gradients through their whole-plane indices, average gradients through
the table's windows clipped to the block, with the whole array's divisors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from fastpool import _dispatch, _threads
from fastpool._params import Layout, SlidingWindow, WindowTable, adaptive_table, check_bool
from fastpool.dask._core import (
    _meta,
    _xp,
    assemble,
    block_indices,
    check_dask_array,
    kernel_threads,
    pooled_axes,
)


def _input_chunks(grad, axes, table: WindowTable, anchors, input_shape, op, chunks):
    """Input-gradient chunks: ``chunks`` if given, else the inverse of align="input"."""
    nd = len(axes)
    result = []
    for i, axis in enumerate(axes):
        size = input_shape[axis]
        if chunks is not None:
            item = chunks[i] if isinstance(chunks, (tuple, list)) else chunks
            if isinstance(item, (tuple, list)):
                if sum(item) != size:
                    raise ValueError(f"fastpool.dask.{op}: chunks for axis {axis} must sum "
                                     f"to {size}, got {tuple(item)}")
                result.append(tuple(int(c) for c in item))
            else:
                full, rest = divmod(size, int(item))
                result.append((int(item),) * full + ((rest,) if rest else ()))
            continue
        starts = np.concatenate([[0], np.cumsum(grad.chunks[axis])[:-1]]).astype(np.int64)
        cuts = sorted({0, *(int(np.clip(anchors[i][s], 0, size)) for s in starts[1:])})
        cuts = [c for c in cuts if c < size] + [size]
        result.append(tuple(int(b - a) for a, b in zip(cuts[:-1], cuts[1:])))
    del nd
    return result


def _covering(table: WindowTable, row: int, n_out: int, a: int, b: int, full: bool):
    """Outputs [c0, c1) whose windows may touch input [a, b)."""
    if full:
        return 0, n_out
    start, stop = table.start[row, :n_out], table.stop[row, :n_out]
    touching = np.nonzero((start < b) & (stop > a))[0]
    if len(touching) == 0:
        return 0, 0
    return int(touching[0]), int(touching[-1]) + 1


def _block_table(table: WindowTable, rows, outputs, ranges) -> WindowTable:
    out_shape = list(table.out_shape)
    for row, (c0, c1) in zip(rows, outputs):
        out_shape[row] = c1 - c0
    width = max(out_shape)
    start = np.zeros((3, width), np.int64)
    stop = np.zeros((3, width), np.int64)
    divisor = np.ones((3, width), np.float64)
    for row in range(3):
        n = out_shape[row]
        start[row, :n], stop[row, :n] = table.start[row, :n], table.stop[row, :n]
        divisor[row, :n] = table.divisor[row, :n]
    for row, (c0, c1), (a, b) in zip(rows, outputs, ranges):
        n = c1 - c0
        step = int(table.step[row])
        s = table.start[row, c0:c1] - a
        # the first read at or after the block's start, on the window's step grid
        s = np.where(s < 0, s + (-s + step - 1) // step * step, s)
        start[row, :n] = np.minimum(s, b - a)
        stop[row, :n] = np.clip(table.stop[row, c0:c1] - a, 0, b - a)
        stop[row, :n] = np.maximum(stop[row, :n], start[row, :n])
        divisor[row, :n] = table.divisor[row, c0:c1]
    interior = np.zeros((3, 5), np.int64)
    interior[:, 2] = 1
    sub = WindowTable(tuple(out_shape), start, stop, table.step.copy(), divisor, table.scale,
                      interior)
    sub.__dict__["window_sizes"] = table.window_sizes
    return sub


@dataclass(frozen=True, eq=False)
class _MaxBackwardTask:
    op: str
    nd: int
    channels_last: bool
    backend: str | None
    axes: tuple
    parts: tuple
    block_shape: tuple
    origins: tuple
    whole_spatial: tuple

    def __call__(self, grads, indices):
        grad = assemble(grads, self.axes, self.parts, (0,) * len(self.axes))
        index = assemble(indices, self.axes, self.parts, (0,) * len(self.axes))
        xp = _xp(grad)
        rest = index
        coords = []
        for size in reversed(self.whole_spatial[1:]):
            coords.append(rest % size)
            rest = rest // size
        coords.append(rest)
        coords.reverse()
        spatial = tuple(self.block_shape[a] for a in self.axes)
        inside = xp.ones(index.shape, bool)
        local = xp.zeros(index.shape, np.int64)
        for coord, origin, size in zip(coords, self.origins, spatial):
            c = coord - origin
            inside &= (c >= 0) & (c < size)
            local = local * size + c
        local = xp.where(inside, local, 0)
        grad = xp.where(inside, grad, grad.dtype.type(0))
        with _threads.thread_cap(kernel_threads()):
            return _dispatch.max_backward(grad, local, self.block_shape, self.nd, op=self.op,
                                          kind="sliding", channels_last=self.channels_last,
                                          backend=self.backend)


@dataclass(frozen=True, eq=False)
class _SumBackwardTask:
    op: str
    nd: int
    channels_last: bool
    backend: str | None
    axes: tuple
    parts: tuple
    block_shape: tuple
    table: WindowTable

    def __call__(self, grads):
        grad = assemble(grads, self.axes, self.parts, (0,) * len(self.axes))
        with _threads.thread_cap(kernel_threads()):
            impl = _dispatch._backend(self.backend, grad, self.op)
            grad = impl.asarray(grad, self.op, "grad_output")
            layout = Layout.of(self.block_shape, self.nd, self.channels_last, self.op, False)
            result = _dispatch._sum_backward(impl, grad, None, layout, self.table, None,
                                             self.block_shape, self.op)
            return _dispatch._wrap(impl, result, grad)


def _check_grad(grad, name, op, input_shape, nd, channels_last, expected_spatial):
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    want = layout.result_shape(expected_spatial)
    if tuple(grad.shape) != want:
        raise ValueError(f"fastpool.dask.{op}: {name} has shape {tuple(grad.shape)}, but the "
                         f"forward op on input_shape {input_shape} gives {want}")
    return layout


def _input_shape(input_shape, op):
    return _dispatch._input_shape(input_shape, op)


def backward(op, nd, kind, grad, indices, input_shape, *, table=None, anchors=None,
             channels_last=False, backend=None, chunks=None, full_cover=False):
    """Build the input gradient; ``indices`` None means an average (sum) backward."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    channels_last = check_bool(channels_last, "channels_last", op)
    axes = pooled_axes(len(input_shape), nd, channels_last)
    rows = tuple(range(3 - nd, 3))
    grad_dtype = np.dtype(grad.dtype)
    if grad_dtype.newbyteorder("=") not in (np.dtype(np.float32), np.dtype(np.float64)) and \
            not _dispatch._on_gpu(grad._meta):
        raise TypeError(f"fastpool.dask.{op}: grad_output dtype {grad.dtype} is not "
                        f"supported; gradients are float32 or float64")
    in_chunks = _input_chunks(grad, axes, table, anchors, input_shape, op, chunks)
    for axis in range(len(input_shape)):
        if axis not in axes and grad.chunks[axis] != () and \
                sum(grad.chunks[axis]) != input_shape[axis]:
            raise ValueError(f"fastpool.dask.{op}: grad_output's axis {axis} has size "
                             f"{sum(grad.chunks[axis])}, input_shape {input_shape}")
    all_chunks = [grad.chunks[i] if i not in axes else in_chunks[axes.index(i)]
                  for i in range(len(input_shape))]
    token = tokenize(op, grad, indices, input_shape, channels_last, backend, all_chunks)
    name = f"{op.replace('_', '-')}-{token}"
    whole_spatial = tuple(input_shape[a] for a in axes)
    per_axis = []
    for i, axis in enumerate(axes):
        n_out = grad.shape[axis]
        row = rows[i]
        grad_bounds = np.concatenate([[0], np.cumsum(grad.chunks[axis])]).astype(np.int64)
        entries = []
        a = 0
        for size in in_chunks[i]:
            b = a + size
            c0, c1 = _covering(table, row, n_out, a, b, full_cover)
            parts, blocks = [], []
            for block in range(len(grad.chunks[axis])):
                lo, hi = max(c0, grad_bounds[block]), min(c1, grad_bounds[block + 1])
                if hi > lo:
                    blocks.append(block)
                    parts.append((int(lo - grad_bounds[block]), int(hi - grad_bounds[block])))
            entries.append(((a, b), (c0, c1), blocks, tuple(parts)))
            a = b
        per_axis.append(entries)
    other_axes = [i for i in range(len(input_shape)) if i not in axes]
    dsk = {}
    for combo in itertools.product(*[range(len(e)) for e in per_axis]):
        entries = [per_axis[i][j] for i, j in enumerate(combo)]
        if any(not e[2] for e in entries):
            task_kind = "zeros"
        else:
            task_kind = "max" if indices is not None else "sum"
        for rest in itertools.product(*[range(len(grad.chunks[i])) for i in other_axes]):
            index = [0] * len(input_shape)
            for axis, value in zip(other_axes, rest):
                index[axis] = value
            out_index = list(index)
            for axis, j in zip(axes, combo):
                out_index[axis] = j
            block_shape = tuple(all_chunks[i][out_index[i]] for i in range(len(input_shape)))
            if task_kind == "zeros":
                dsk[(name, *out_index)] = (_Zeros(block_shape, grad_dtype), (grad.name, *index))
                continue
            deps_g, deps_i = [], []
            for blocks in itertools.product(*[e[2] for e in entries]):
                for axis, b in zip(axes, blocks):
                    index[axis] = b
                deps_g.append((grad.name, *index))
                if indices is not None:
                    deps_i.append((indices.name, *index))
            parts = tuple(e[3] for e in entries)
            if task_kind == "max":
                task = _MaxBackwardTask(op, nd, channels_last, backend, axes, parts,
                                        block_shape, tuple(e[0][0] for e in entries),
                                        whole_spatial)
                dsk[(name, *out_index)] = (task, deps_g, deps_i)
            else:
                sub = _block_table(table, rows, [e[1] for e in entries],
                                   [e[0] for e in entries])
                task = _SumBackwardTask(op, nd, channels_last, backend, axes, parts,
                                        block_shape, sub)
                dsk[(name, *out_index)] = (task, deps_g)
    deps = [grad] if indices is None else [grad, indices]
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    return da.Array(graph, name, tuple(tuple(c) for c in all_chunks),
                    meta=_meta(grad, grad_dtype, len(input_shape)))


@dataclass(frozen=True, eq=False)
class _Zeros:
    shape: tuple
    dtype: object

    def __call__(self, like):
        return _xp(like).zeros(self.shape, self.dtype)


def _indices_check(indices, grad, op):
    indices = check_dask_array(indices, op, "indices")
    if np.dtype(indices.dtype) != np.int64:
        raise ValueError(f"fastpool.dask.{op}: indices must be int64 (as returned by the "
                         f"forward op with return_indices=True), got dtype {indices.dtype}")
    if indices.shape != grad.shape:
        raise ValueError(f"fastpool.dask.{op}: indices has shape {indices.shape} but "
                         f"grad_output has shape {grad.shape}")
    if indices.chunks != grad.chunks:
        indices = indices.rechunk(grad.chunks)
    return indices


def max_pool_backward(grad_output, indices, input_shape, nd, *, op, kernel_size=None,
                      stride=None, padding=0, dilation=1, ceil_mode=False,
                      channels_last=False, backend=None, chunks=None):
    grad = check_dask_array(grad_output, op, "grad_output")
    indices = _indices_check(indices, grad, op)
    input_shape = _input_shape(input_shape, op)
    channels_last = check_bool(channels_last, "channels_last", op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    if kernel_size is None:
        # Without the window any output may point anywhere: every block reads every
        # gradient block along the pooled axes.
        out_spatial = tuple(grad.shape[a] for a in pooled_axes(len(input_shape), nd,
                                                                 channels_last))
        table = adaptive_table(layout.spatial, out_spatial)
        full = True
    else:
        window = SlidingWindow.from_args(op, nd, kernel_size, stride, padding, dilation,
                                         ceil_mode)
        table = window.table(op, layout.spatial, "valid")
        out_spatial = table.out_shape[3 - nd:]
        full = False
    _check_grad(grad, "grad_output", op, input_shape, nd, channels_last, out_spatial)
    anchors = [table.start[3 - nd + i, :out_spatial[i]] for i in range(nd)]
    if kernel_size is not None:
        anchors = [np.arange(out_spatial[i], dtype=np.int64) * window.stride[i]
                   for i in range(nd)]
    return backward(op, nd, "sliding", grad, indices, input_shape, table=table,
                    anchors=anchors, channels_last=channels_last, backend=backend,
                    chunks=chunks, full_cover=full)


def adaptive_max_pool_backward(grad_output, indices, input_shape, nd, *, op,
                               channels_last=False, backend=None, chunks=None,
                               squeezed=False):
    return _adaptive_backward(grad_output, indices, input_shape, nd, op=op,
                              channels_last=channels_last, backend=backend, chunks=chunks,
                              squeezed=squeezed)


def _adaptive_backward(grad_output, indices, input_shape, nd, *, op, channels_last, backend,
                       chunks, squeezed):
    """Adaptive (or, ``squeezed``, global) backward: max given ``indices``, else avg."""
    grad = check_dask_array(grad_output, op, "grad_output")
    input_shape = _input_shape(input_shape, op)
    channels_last = check_bool(channels_last, "channels_last", op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    if indices is not None:
        indices = check_dask_array(indices, op, "indices")
    if squeezed:
        grad = _unsqueeze(grad, layout, nd, channels_last, op, "grad_output")
        if indices is not None:
            indices = _unsqueeze(indices, layout, nd, channels_last, op, "indices")
    if indices is not None:
        indices = _indices_check(indices, grad, op)
    out_spatial = tuple(grad.shape[a] for a in pooled_axes(len(input_shape), nd,
                                                             channels_last))
    _check_grad(grad, "grad_output", op, input_shape, nd, channels_last, out_spatial)
    table = adaptive_table(layout.spatial, out_spatial)
    anchors = [table.start[3 - nd + i, :out_spatial[i]] for i in range(nd)]
    if squeezed and chunks is None:
        chunks = _auto_chunks(grad, input_shape, nd, channels_last)
    return backward(op, nd, "adaptive", grad, indices, input_shape, table=table,
                    anchors=anchors, channels_last=channels_last, backend=backend,
                    chunks=chunks)


def _unsqueeze(array, layout, nd, channels_last, op, name):
    flat = layout.batch_shape + ((layout.channels,) if channels_last else ())
    keep = layout.result_shape((1,) * nd)
    if tuple(array.shape) == keep:
        return array
    if tuple(array.shape) != flat:
        raise ValueError(f"fastpool.dask.{op}: {name} has shape {tuple(array.shape)}, but the "
                         f"forward op on this input_shape gives {flat} (or {keep} with "
                         f"keepdims)")
    if channels_last:
        return array[(slice(None),) * len(layout.batch_shape) + (None,) * nd + (slice(None),)]
    return array[(Ellipsis,) + (None,) * nd]


def avg_pool_backward(grad_output, input_shape, nd, kernel_size, stride=None, padding=0,
                      ceil_mode=False, count_include_pad=True, divisor_override=None, *, op,
                      channels_last=False, backend=None, chunks=None):
    grad = check_dask_array(grad_output, op, "grad_output")
    input_shape = _input_shape(input_shape, op)
    spec = _dispatch._SlidingOp.from_args(op, "avg", nd, kernel_size, stride, padding, 1,
                                          ceil_mode, None, count_include_pad, divisor_override)
    channels_last = check_bool(channels_last, "channels_last", op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    table = spec.table(layout)
    out_spatial = table.out_shape[3 - nd:]
    _check_grad(grad, "grad_output", op, input_shape, nd, channels_last, out_spatial)
    anchors = [np.arange(out_spatial[i], dtype=np.int64) * spec.window.stride[i] for i in range(nd)]
    return backward(op, nd, "sliding", grad, None, input_shape, table=table, anchors=anchors,
                    channels_last=channels_last, backend=backend, chunks=chunks)


def adaptive_avg_pool_backward(grad_output, input_shape, nd, *, op, channels_last=False,
                               backend=None, chunks=None, squeezed=False):
    return _adaptive_backward(grad_output, None, input_shape, nd, op=op,
                              channels_last=channels_last, backend=backend, chunks=chunks,
                              squeezed=squeezed)


def _auto_chunks(grad, input_shape, nd, channels_last):
    """dask's "auto" chunks for the pooled axes of a global op's input gradient."""
    from dask.array.core import normalize_chunks

    axes = pooled_axes(len(input_shape), nd, channels_last)
    spec = tuple("auto" if i in axes else grad.chunks[i] for i in range(len(input_shape)))
    chunks = normalize_chunks(spec, input_shape, dtype=grad.dtype)
    return [chunks[a] for a in axes]


# --------------------------------------------------------------------------
# Lp pooling's backward: needs the forward input over every covering window
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _LpBackwardTask:
    """One input-gradient block of Lp pooling: the gradient of the outputs whose
    windows touch the block, and the input under all of those windows (the block
    plus halos, for the window sums the chain rule needs); the backward runs on
    that piece and the block is cut out of its result."""

    op: str
    nd: int
    channels_last: bool
    backend: str | None
    axes: tuple
    grad_parts: tuple
    x_parts: tuple
    keep: tuple  # per pooled axis, the block's range within the input piece
    table: WindowTable  # the covering outputs' windows, in the piece's coordinates
    power: float | None

    def __call__(self, grads, xs):
        zeros = (0,) * len(self.axes)
        grad = assemble(grads, self.axes, self.grad_parts, zeros)
        x = assemble(xs, self.axes, self.x_parts, zeros)
        with _threads.thread_cap(kernel_threads()):
            impl = _dispatch._backend(self.backend, grad, self.op)
            grad = impl.asarray(grad, self.op, "grad_output")
            layout = Layout.of(tuple(x.shape), self.nd, self.channels_last, self.op, False)
            result = _dispatch._sum_backward(impl, grad, x, layout, self.table, self.power,
                                             tuple(x.shape), self.op)
        where = [slice(None)] * result.ndim
        for axis, (a, b) in zip(self.axes, self.keep):
            where[axis] = slice(a, b)
        block = result[tuple(where)]
        # a copy when it is a part: the view would hold the whole piece
        return block if block.shape == result.shape else block.copy()


def _times_sign(values, x, backend, op):
    """``values * sign(x)``, with torch's sign(NaN) = 0 (the back end's own)."""
    return _dispatch._backend(backend, values, op).times_sign(values, x)


def lp_pool_backward(grad_output, x, norm_type, nd, kernel_size, stride=None,
                     ceil_mode=False, *, op, channels_last=False, backend=None):
    """Gradient of Lp pooling for the input ``x``; input-gradient blocks are x's."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    from fastpool._params import check_backend, check_dtype
    from fastpool.dask._core import _float_dtypes, sliding_pool, sub_table

    grad = check_dask_array(grad_output, op, "grad_output")
    x = check_dask_array(x, op, "x")
    spec = _dispatch._SlidingOp.from_args(op, "lp", nd, kernel_size, stride, 0, 1, ceil_mode,
                                          norm_type)
    channels_last = check_bool(channels_last, "channels_last", op)
    check_backend(backend, op)
    check_dtype(np.dtype(x.dtype), "lp", op, _float_dtypes(x), name="x")
    grad_dtype = np.dtype(grad.dtype)
    if grad_dtype.newbyteorder("=") not in (np.dtype(np.float32), np.dtype(np.float64)) and \
            not _dispatch._on_gpu(grad._meta):
        raise TypeError(f"fastpool.dask.{op}: grad_output dtype {grad.dtype} is not "
                        f"supported; gradients are float32 or float64")
    input_shape = tuple(x.shape)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    table = spec.table(layout)
    out_spatial = table.out_shape[3 - nd:]
    _check_grad(grad, "grad_output", op, input_shape, nd, channels_last, out_spatial)
    axes = pooled_axes(len(input_shape), nd, channels_last)
    # the gradient's blocks on x's batch and channel axes
    other = {i: x.chunks[i] for i in range(x.ndim) if i not in axes}
    if any(grad.chunks[i] != c for i, c in other.items()):
        grad = grad.rechunk(other)
    if spec.is_max_of_abs:
        # torch's norm_type=inf is max pooling of |x|: its gradient goes to the
        # maximum of |x| in each window, times sign(x)
        _, indices = sliding_pool(da.absolute(x), "max", nd, kernel_size, stride, 0, 1,
                                  ceil_mode, op=op, strict=True, return_indices=True,
                                  channels_last=channels_last, backend=backend)
        values = max_pool_backward(grad, indices, input_shape, nd, op=op,
                                   kernel_size=kernel_size, stride=stride,
                                   ceil_mode=ceil_mode, channels_last=channels_last,
                                   backend=backend, chunks=[x.chunks[a] for a in axes])
        return da.map_blocks(_times_sign, values, x, backend, op, dtype=grad_dtype,
                             meta=_meta(grad, grad_dtype, len(input_shape)))
    rows = tuple(range(3 - nd, 3))
    per_axis = []
    for i, axis in enumerate(axes):
        row, n_out = rows[i], out_spatial[i]
        grad_bounds = np.concatenate([[0], np.cumsum(grad.chunks[axis])]).astype(np.int64)
        x_bounds = np.concatenate([[0], np.cumsum(x.chunks[axis])]).astype(np.int64)
        entries = []
        for block in range(len(x.chunks[axis])):
            a, b = int(x_bounds[block]), int(x_bounds[block + 1])
            c0, c1 = _covering(table, row, n_out, a, b, False)
            if c1 <= c0:
                entries.append(None)
                continue
            lo = min(a, int(table.start[row, c0:c1].min()))
            hi = max(b, int(table.stop[row, c0:c1].max()))
            entries.append(((c0, c1), (lo, hi), (a - lo, b - lo),
                            _reads(grad_bounds, c0, c1), _reads(x_bounds, lo, hi)))
        per_axis.append(entries)
    token = tokenize(op, grad, x, spec, channels_last, backend)
    name = f"{op.replace('_', '-')}-{token}"
    dsk = {}
    other_axes = [i for i in range(x.ndim) if i not in axes]
    for combo in itertools.product(*[range(len(e)) for e in per_axis]):
        entries = [per_axis[i][j] for i, j in enumerate(combo)]
        task = None
        if all(e is not None for e in entries):
            sub = sub_table(table, rows, tuple(e[0] for e in entries),
                            tuple(e[1][0] for e in entries))
            task = _LpBackwardTask(op, nd, channels_last, backend, axes,
                                   tuple(tuple(p for _, p in e[3]) for e in entries),
                                   tuple(tuple(p for _, p in e[4]) for e in entries),
                                   tuple(e[2] for e in entries), sub, spec.power)
        for rest in itertools.product(*[range(len(x.chunks[i])) for i in other_axes]):
            index, out_index = block_indices(x.ndim, other_axes, rest, axes, combo)
            if task is None:
                shape = tuple(x.chunks[i][out_index[i]] for i in range(x.ndim))
                dsk[(name, *out_index)] = (_Zeros(shape, grad_dtype), (x.name, *out_index))
                continue
            deps = []
            for source, blocks in ((grad.name, [e[3] for e in entries]),
                                   (x.name, [e[4] for e in entries])):
                keys = []
                for picked in itertools.product(*blocks):
                    for axis, (block, _) in zip(axes, picked):
                        index[axis] = block
                    keys.append((source, *index))
                deps.append(keys)
            dsk[(name, *out_index)] = (task, *deps)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[grad, x])
    return da.Array(graph, name, x.chunks, meta=_meta(grad, grad_dtype, x.ndim))


def _reads(bounds: np.ndarray, lo: int, hi: int) -> list:
    """The blocks (and local ranges) that hold ``[lo, hi)``."""
    return [(block, (int(max(lo, bounds[block]) - bounds[block]),
                     int(min(hi, bounds[block + 1]) - bounds[block])))
            for block in range(len(bounds) - 1) if bounds[block] < hi and bounds[block + 1] > lo]
