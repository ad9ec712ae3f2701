"""Graph construction and the per-block tasks of :mod:`fastpool.dask`.

Each output block is one task: it slices the input blocks its windows read
(see :mod:`fastpool.dask._plan`), joins them into one piece and runs the
fastpool kernels on it with the slice of the *whole* array's window table that
belongs to the block, so divisors, ceil_mode windows and padding follow the
whole array's rules exactly.  Max indices are mapped from the piece's plane
to the whole plane.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import operator
import os
import threading
from dataclasses import dataclass

import numpy as np

from fastpool import _dispatch, _threads
from fastpool._params import (
    EXTREMES,
    FLOAT_DTYPES,
    Layout,
    WindowTable,
    check_backend,
    check_bool,
    check_dtype,
)
from fastpool.dask._plan import ALIGNS, Plan, axis_plan, output_chunks

# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def check_dask_array(x: object, op: str, name: str = "x"):
    import dask.array as da

    if not isinstance(x, da.Array):
        raise TypeError(f"fastpool.dask.{op}: {name} must be a dask array, got "
                        f"{type(x).__name__}; wrap it with dask.array.from_array, or call "
                        f"fastpool.{op} on in-memory arrays")
    if any(math.isnan(c) for chunks in x.chunks for c in chunks):
        raise ValueError(f"fastpool.dask.{op}: {name} has unknown chunk sizes "
                         f"(chunks={x.chunks}); call {name}.compute_chunk_sizes() first")
    return x


def _float_dtypes(x) -> tuple:
    if _dispatch._on_gpu(getattr(x, "_meta", None)):
        return (np.dtype(np.float16), *FLOAT_DTYPES)
    return FLOAT_DTYPES


def _check_align(align: object, out_chunks: object, op: str) -> str:
    if align not in ALIGNS:
        raise ValueError(f"fastpool.dask.{op}: align must be one of {ALIGNS}, got {align!r}")
    return "output" if out_chunks is not None else align


def _out_chunk_arg(out_chunks, nd: int, op: str) -> tuple:
    if out_chunks is None:
        return (None,) * nd
    if isinstance(out_chunks, (int, np.integer)) and not isinstance(out_chunks, bool):
        items = (int(out_chunks),) * nd
    elif isinstance(out_chunks, (tuple, list)) and len(out_chunks) == nd:
        items = tuple(out_chunks)
    else:
        raise ValueError(f"fastpool.dask.{op}: out_chunks must be an int or a sequence of "
                         f"{nd} entries (ints, or tuples of chunk sizes), got {out_chunks!r}")
    for item in items:
        sizes = item if isinstance(item, (tuple, list)) else (item,)
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                   for s in sizes):
            raise ValueError(f"fastpool.dask.{op}: out_chunks entries must be positive "
                             f"ints, got {out_chunks!r}")
    return items


def pooled_axes(ndim: int, nd: int, channels_last: bool) -> tuple:
    end = ndim - int(channels_last)
    return tuple(range(end - nd, end))


# --------------------------------------------------------------------------
# Threads: numba threads x dask threads must not exceed the cores
# --------------------------------------------------------------------------


def dask_concurrency() -> int:
    """How many tasks dask runs at once in this process, seen from inside a task."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    if worker is not None:
        threads = getattr(getattr(worker, "state", worker), "nthreads", None) or 1
        # The nanny sets OMP_NUM_THREADS=1 in worker processes (dask's own rule for
        # native thread pools); follow it.
        omp = os.environ.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and int(omp) >= 1:
            return max(threads, _threads.get_num_threads() // int(omp))
        return threads
    current = threading.current_thread()
    if current is threading.main_thread():
        if multiprocessing.parent_process() is None:
            return 1  # the synchronous scheduler
        from dask.system import CPU_COUNT  # a worker of the processes scheduler

        return CPU_COUNT
    try:
        import dask.threaded as threaded

        executors = [threaded.default_pool] + [e for pools in threaded.pools.values()
                                               for e in pools.values()]
        for executor in executors:
            if executor is not None and current in getattr(executor, "_threads", ()):
                return executor._max_workers
    except (ImportError, AttributeError):
        pass
    from dask.system import CPU_COUNT

    return CPU_COUNT


def kernel_threads() -> int:
    """Threads for one task's kernels: ``max(1, cores // dask's concurrent tasks)``."""
    return max(1, _threads.get_num_threads() // dask_concurrency())


# --------------------------------------------------------------------------
# Pieces: the input a block reads, joined from slices of input blocks
# --------------------------------------------------------------------------


def _xp(array):
    module = type(array).__module__.split(".")[0]
    if module == "numpy":
        return np
    import importlib

    return importlib.import_module(module)


def assemble(blocks: list, axes: tuple, parts: tuple, extra: tuple, scratch: bool = False,
             presliced: tuple = ()):
    """Join ``blocks`` (C order over the pooled axes' block lists) into one piece.

    ``parts[i]`` lists (first, stop) slices of each block along ``axes[i]``;
    ``extra[i]`` appends that many (never read) zeros along it.  One block read
    whole is returned as it is; otherwise the piece is allocated once and each
    slice copied into place (one copy), into this thread's reused buffer with
    ``scratch`` (valid until the thread's next scratch piece).
    """
    counts = [len(p) for p in parts]
    if len(blocks) == 1 and not any(extra):
        block = blocks[0]
        index = [slice(None)] * block.ndim
        for axis, part in zip(axes, parts):
            a, b = part[0]
            if (a != 0 or b != block.shape[axis]) and not presliced:
                index[axis] = slice(a, b)
        piece = block[tuple(index)]
        if scratch and _xp(piece) is np and not piece.flags.c_contiguous:
            # the kernels want C order: copy into the reused buffer, not a fresh one
            target = _scratch(np, piece.shape, piece.dtype)
            target[...] = piece
            return target
        return piece
    xp = _xp(blocks[0])
    shape = list(blocks[0].shape)
    for axis, part, more in zip(axes, parts, extra):
        shape[axis] = sum(b - a for a, b in part) + more
    piece = _scratch(xp, tuple(shape), blocks[0].dtype) if scratch else \
        xp.empty(tuple(shape), blocks[0].dtype)
    if any(extra):
        piece[...] = 0
    offsets = [np.concatenate([[0], np.cumsum([b - a for a, b in part])]) for part in parts]
    for k, (block, combo) in enumerate(zip(blocks, itertools.product(*[range(c) for c in counts]))):
        source = [slice(None)] * block.ndim
        target = [slice(None)] * block.ndim
        for axis, part, offset, j in zip(axes, parts, offsets, combo):
            a, b = part[j]
            if not (presliced and presliced[k]):
                source[axis] = slice(a, b)
            target[axis] = slice(int(offset[j]), int(offset[j + 1]))
        piece[tuple(target)] = block[tuple(source)]
    return piece


_local = threading.local()


def _copy_slices(block, wheres: tuple) -> tuple:
    """Copies of the slices ``wheres`` of ``block`` (the halos its neighbours read)."""
    return tuple(block[where].copy() for where in wheres)


def _scratch(xp, shape: tuple, dtype):
    """An uninitialised host array, reusing this thread's buffer: a fresh allocation
    of a piece costs as much in page faults as copying into it.  (A task's piece is
    dead once the task returns: the kernels' results never alias it.)"""
    if xp is not np:
        return xp.empty(shape, dtype)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < nbytes:
        buffer = _local.buffer = np.empty(nbytes, np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


def sub_table(table: WindowTable, rows: tuple, outputs: tuple, origins: tuple
              ) -> WindowTable:
    """The part of ``table`` for outputs ``outputs[i]`` on canonical rows ``rows[i]``,
    shifted to a piece starting at ``origins[i]``."""
    out_shape = list(table.out_shape)
    for row, (o0, o1) in zip(rows, outputs):
        out_shape[row] = o1 - o0
    width = max(out_shape)
    start = np.zeros((3, width), np.int64)
    stop = np.zeros((3, width), np.int64)
    divisor = np.ones((3, width), np.float64)
    interior = table.interior.copy()
    for row in range(3):
        n = out_shape[row]
        start[row, :n] = table.start[row, :n]
        stop[row, :n] = table.stop[row, :n]
        divisor[row, :n] = table.divisor[row, :n]
    for row, (o0, o1), origin in zip(rows, outputs, origins):
        n = o1 - o0
        start[row, :n] = table.start[row, o0:o1] - origin
        stop[row, :n] = table.stop[row, o0:o1] - origin
        divisor[row, :n] = table.divisor[row, o0:o1]
        lo, hi, stride, offset, kernel = (int(v) for v in table.interior[row])
        new_lo = min(max(lo - o0, 0), n)
        new_hi = max(new_lo, min(hi - o0, n))
        interior[row] = (new_lo, new_hi, stride, offset + o0 * stride - origin, kernel)
    sub = WindowTable(tuple(out_shape), start, stop, table.step.copy(), divisor, table.scale,
                      interior)
    # The whole table's window sizes choose the accumulator type (float32 or
    # float64 sums): keep the whole array's choice on every block.
    sub.__dict__["window_sizes"] = table.window_sizes
    return sub


def to_global_indices(indices, piece_spatial: tuple, origins: tuple, whole_spatial: tuple):
    """Flat indices within a piece's plane -> flat indices within the whole plane."""
    rest = indices.astype(np.int64, copy=False)
    coords = []
    for size in reversed(piece_spatial[1:]):
        coords.append(rest % size)
        rest = rest // size
    coords.append(rest)
    coords.reverse()
    result = coords[0] + origins[0]
    for coord, origin, size in zip(coords[1:], origins[1:], whole_spatial[1:]):
        result = result * size + (coord + origin)
    return result


def separable_choice(mode: str, layout: Layout, table: WindowTable, dtype,
                     power: float | None):
    """The CPU back end's separable-or-direct choice for the *whole* array (None when it
    is not the plain sliding-window path), so that every block sums in the same order."""
    if mode in EXTREMES:
        return None
    from fastpool.cpu import pooling

    canonical = layout.canonical_shape()
    if not layout.channels_last and table.is_whole_plane(canonical[1:4]):
        return "plane"  # one block reads the whole plane: the same call as in memory
    zero = pooling.accumulator_zero(np.dtype(dtype), table, power)
    return pooling._separable(canonical, table, layout.channels_last,
                              np.dtype(type(zero)).itemsize)


def _sum_pool(impl, canonical, table: WindowTable, channels_last: bool, power: float | None,
              separable, out=None):
    """Window sums as the whole array's call makes them; into ``out`` (the CPU
    kernels' canonical output, C-contiguous) when given."""
    from fastpool import cpu

    if impl is not cpu or separable is None or separable == "plane":
        result = impl.sum_pool(canonical, table, channels_last, power)
        if out is None:
            return result
        out[...] = result
        return out
    from fastpool.cpu import pooling

    # Never the whole-plane kernel (a block whose one window is the block): it sums in
    # another order than the whole array's kernel.
    if out is None:
        out = np.empty(pooling._out_shape(canonical.shape, table, channels_last),
                       canonical.dtype)
    lp = None if power is None else float(power)
    zero = pooling.accumulator_zero(canonical.dtype, table, lp)
    if separable:
        block = pooling._channel_block(canonical.shape[0], canonical.shape[4]) \
            if channels_last else 1
        pooling._launch_separable("sum_pool", channels_last, block, (canonical, out), table,
                                  table.divisor, table.scale, lp, zero)
    else:
        pooling._sum_pool_direct(canonical, out, table, channels_last, lp, zero)
    return out


def _max_pool_into(canonical, table: WindowTable, channels_last: bool, out, indices):
    """The CPU max kernels writing into ``out`` (and ``indices``, or None): the kernel
    choice of :func:`fastpool.cpu.pooling.plan_max_pool` but for the whole-plane
    one, without allocating the output."""
    from fastpool.cpu import pooling, runtime

    shape = canonical.shape
    work = pooling._pool_work(out.shape, table)
    serial = runtime.runs_serially(work)
    lowest = canonical.dtype.type(_dispatch._lowest(np.dtype(canonical.dtype)))
    block = pooling._separable(shape, table, channels_last,
                               canonical.dtype.itemsize + 8 * (indices is not None), serial)
    if block:
        kernel, *tail = pooling._separable_arguments("max_pool", channels_last, block, table,
                                                     (lowest,), indices is not None)
    elif channels_last:
        kernel, tail = pooling.max_pool_channels_last(table, indices is not None), (
            table.start, table.stop, table.step, lowest, pooling._chunks(shape, table, serial))
    else:
        kernel, tail = pooling.max_pool_channels_first(table), (
            table.start, table.stop, table.step, table.interior, lowest,
            pooling._chunks(shape, table, serial))
    runtime.launch(kernel, canonical, out, indices, *tail, work=work)


@dataclass(frozen=True, eq=False)
class PoolTask:
    """Everything one output block's task needs besides its input blocks."""

    op: str
    mode: str  # "max", "min" or "sum"
    nd: int
    channels_last: bool
    power: float | None  # of the window sums: None for averages (and Lp with p = 1)
    max_of_abs: bool
    with_indices: bool
    backend: str | None
    axes: tuple
    parts: tuple
    extra: tuple
    origins: tuple
    whole_spatial: tuple
    table: WindowTable
    separable: object
    # Per input block read: None (the block itself), or which of the halos its
    # "edges" task copied out is read (a slice already cut to size).
    picks: tuple = ()

    def __call__(self, blocks, after=None):
        # ``after``: the halo tasks of the blocks read whole, only there to run
        # them first (see build_pool)
        if self.picks:
            blocks = [b if p is None else b[p] for b, p in zip(blocks, self.picks)]
        with _threads.thread_cap(kernel_threads()):
            return self._run(blocks)

    def _run(self, blocks):
        if not any(self.extra) and _xp(blocks[0]) is np:
            result = self._run_split(blocks)
            if result is not None:
                return result
        presliced = tuple(p is not None for p in self.picks)
        piece = assemble(blocks, self.axes, self.parts, self.extra, scratch=True,
                         presliced=presliced)
        out, indices = self._pool(piece, self.table, self.origins)
        impl = _dispatch._backend(self.backend, piece, self.op)
        return _dispatch._wrap(impl, out if indices is None else (out, indices), piece)

    def _run_split(self, blocks):
        """The block's outputs without copying its own input block: those whose
        windows lie inside it run on the block itself, and only the thin rims of
        outputs that read a neighbour's halo run on small joined pieces (a few
        planes).  Joining the whole piece cost a copy of every input block, as
        much as the kernels' own pass over it.  None where this does not apply
        (the block is a strided view, or no window lies inside it): then the caller
        joins."""
        axes, parts, nd = self.axes, self.parts, self.nd
        counts = [len(p) for p in parts]
        if all(c == 1 for c in counts) and not self.picks:
            return None  # a plain per-block map: the usual path copies nothing either
        mains = [max(range(len(p)), key=lambda j, p=p: p[j][1] - p[j][0]) for p in parts]
        flat = 0
        for count, m in zip(counts, mains):
            flat = flat * count + m
        main = blocks[flat]
        presliced = tuple(p is not None for p in self.picks) or (False,) * len(blocks)
        if presliced[flat] or main.size == 0 or not main.flags.c_contiguous:
            return None
        rows = tuple(range(3 - nd, 3))
        table = self.table
        offsets = [np.concatenate([[0], np.cumsum([b - a for a, b in p])]).astype(np.int64)
                   for p in parts]
        inner = []
        for i, row in enumerate(rows):
            n = table.out_shape[row]
            # the main block's place in the piece's coordinates (the task may read
            # only part of it, but all of it is the input's data)
            first = int(offsets[i][mains[i]]) - parts[i][mains[i]][0]
            length = main.shape[axes[i]]
            # the first run of outputs whose windows lie inside the block (not a
            # search: dilated windows that start in the padding break the order)
            inside = (table.start[row, :n] >= first) & (table.stop[row, :n] <= first + length)
            if not inside.any():
                return None
            lo = int(np.argmax(inside))
            hi = lo + int(np.argmin(inside[lo:])) if not inside[lo:].all() else n
            inner.append((lo, hi, n, first))
        # Every block as the part of it the task reads (presliced halos already are).
        views = []
        for k, (block, combo) in enumerate(zip(blocks, itertools.product(
                *[range(c) for c in counts]))):
            if presliced[k]:
                views.append(block)
                continue
            where = [slice(None)] * block.ndim
            for axis, part, j in zip(axes, parts, combo):
                where[axis] = slice(*part[j])
            views.append(block[tuple(where)])
        # The interior box, then the rims: along axis j the outputs before and after
        # the interior, over the interior of the axes before j and all of those after.
        boxes = [[(lo, hi) for lo, hi, _, _ in inner]]
        for j, (lo, hi, n, _) in enumerate(inner):
            for side in ((0, lo), (hi, n)):
                if side[1] > side[0]:
                    boxes.append([(a, b) for a, b, _, _ in inner[:j]] + [side]
                                 + [(0, m) for _, _, m, _ in inner[j + 1:]])
        out = indices = None
        shape = list(main.shape)
        for axis, (_, _, n, _) in zip(axes, inner):
            shape[axis] = n
        for number, box in enumerate(boxes):
            if number == 0:
                piece, origins = main, [first for *_, first in inner]
            else:
                origins, ranges = [], []
                for i, (row, (o0, o1)) in enumerate(zip(rows, box)):
                    size = int(offsets[i][-1])
                    lo = min(int(table.start[row, o0:o1].min()), size - 1)
                    hi = min(max(int(table.stop[row, o0:o1].max()),
                                 int(table.start[row, o0:o1].max()) + 1), size)
                    origins.append(lo)
                    ranges.append((lo, hi))
                piece = _join_range(views, axes, offsets, ranges)
            sub = sub_table(table, rows, tuple(box), tuple(origins))
            where = [slice(None)] * len(shape)
            for axis, (o0, o1) in zip(axes, box):
                where[axis] = slice(o0, o1)
            where = tuple(where)
            if out is None and self.mode in ("max", "sum") and main.dtype != np.bool_:
                out = np.empty(shape, main.dtype.newbyteorder("="))  # the results' dtype
            part_out, part_indices = self._pool(
                piece, sub, tuple(o + g for o, g in zip(origins, self.origins)),
                None if out is None else out[where])
            if out is None:
                out = np.empty(shape, part_out.dtype)
            if part_indices is not None and indices is None:
                indices = np.empty(shape, np.int64)
            if part_out is not None:
                out[where] = part_out
            if indices is not None:
                indices[where] = part_indices
        return out if indices is None else (out, indices)

    def _pool(self, piece, table: WindowTable, origins: tuple, into=None):
        """The kernels on one piece, with its window table; indices into the whole
        plane given the piece's place in it (``origins``).  With ``into`` (a view of
        the result block), the CPU kernels write the values there when it is
        contiguous (and the values returned are None): the rims' results are
        small, but copying the interior's would cost a pass over the output."""
        from fastpool import cpu

        impl = _dispatch._backend(self.backend, piece, self.op)
        array = impl.asarray(piece, self.op, "x")
        layout = Layout.of(tuple(array.shape), self.nd, self.channels_last, self.op, False)
        out_spatial = table.out_shape[3 - self.nd:]
        result_shape = layout.result_shape(out_spatial)
        dtype = np.dtype(array.dtype)
        if layout.is_empty():
            out = impl.empty(result_shape, dtype)
            return out, (impl.empty(result_shape, np.int64) if self.with_indices else None)
        if self.max_of_abs:
            array = impl.absolute(array)
        canonical = impl.canonical(array, layout.canonical_shape())
        if dtype == np.bool_:
            canonical = canonical.view(np.uint8)
        target = None
        if into is not None and impl is cpu and self.mode in ("max", "sum") and \
                dtype != np.bool_ and into.flags.c_contiguous and dtype.isnative and \
                not (not self.channels_last and table.is_whole_plane(
                    tuple(canonical.shape[1:4]))):
            target = into.reshape(layout.canonical_out_shape(out_spatial))
        if target is not None and self.mode == "max":
            indices = np.empty(target.shape, np.int64) if self.with_indices else None
            _max_pool_into(canonical, table, self.channels_last, target, indices)
            out = None
        elif target is not None:
            _sum_pool(impl, canonical, table, self.channels_last, self.power, self.separable,
                      target)
            out, indices = None, None
        elif self.mode in EXTREMES:
            # min is max under an order-reversing bijection, as in fastpool._dispatch
            if self.mode == "min":
                canonical = impl.reverse_order(canonical)
            out, indices = impl.max_pool(canonical, table, self.channels_last,
                                         _dispatch._lowest(np.dtype(canonical.dtype)),
                                         self.with_indices)
            if self.mode == "min":
                out = impl.reverse_order(out)
            out = out.view(np.bool_) if dtype == np.bool_ else out
        else:
            out = _sum_pool(impl, canonical, table, self.channels_last, self.power,
                            self.separable)
            indices = None
        out = None if out is None else out.reshape(result_shape)
        if not self.with_indices:
            return out, None
        return out, to_global_indices(indices.reshape(result_shape), layout.spatial, origins,
                                      self.whole_spatial)


def _join_range(views: list, axes: tuple, offsets: list, ranges: list):
    """The range ``ranges[i]`` (piece coordinates) along each of ``axes`` of the
    piece that ``views`` (C order over the axes' parts, ``offsets`` their bounds)
    make up, joined into one array."""
    counts = [len(o) - 1 for o in offsets]
    picked, parts = [], []
    for offset, (lo, hi) in zip(offsets, ranges):
        js = [j for j in range(len(offset) - 1) if offset[j] < hi and offset[j + 1] > lo]
        picked.append(js)
        parts.append([(max(lo, int(offset[j])) - int(offset[j]),
                       min(hi, int(offset[j + 1])) - int(offset[j])) for j in js])
    chosen = []
    for combo in itertools.product(*picked):
        flat = 0
        for count, j in zip(counts, combo):
            flat = flat * count + j
        chosen.append(views[flat])
    return assemble(chosen, axes, tuple(parts), (0,) * len(axes))


# --------------------------------------------------------------------------
# Graph construction
# --------------------------------------------------------------------------


# Set by fastpool.dask.plan: the ops then return their plan instead of a graph.
planning = threading.local()


def block_indices(ndim: int, other_axes: tuple, rest: tuple, axes: tuple,
                  combo: tuple) -> tuple[list, list]:
    """A block's index over the unpooled axes (``rest``, the pooled ones 0, to be
    filled per input block read) and its output block's (``combo`` on the pooled
    axes)."""
    index = [0] * ndim
    for axis, value in zip(other_axes, rest):
        index[axis] = value
    out_index = list(index)
    for axis, j in zip(axes, combo):
        out_index[axis] = j
    return index, out_index


def make_plan(op: str, x, axes: tuple, table: WindowTable, anchors: list, align: str,
              out_chunks: tuple) -> Plan:
    plans = []
    nd = len(axes)
    for i, axis in enumerate(axes):
        row = 3 - nd + i
        n_out = table.out_shape[row]
        size = x.shape[axis]
        chunks = output_chunks(op, axis, size, x.chunks[axis], anchors[i], align, out_chunks[i])
        plans.append(axis_plan(axis, size, x.chunks[axis], table.start[row, :n_out],
                               table.stop[row, :n_out], chunks))
    return Plan(op, tuple(plans))


def _meta(x, dtype, ndim):
    from dask.array.utils import meta_from_array

    return meta_from_array(x._meta, ndim=ndim, dtype=dtype)


def _distributed_client() -> bool:
    """Whether a dask.distributed client is the default (the order tokens' chain
    would then cost a scheduler round trip per link, before the first output)."""
    try:
        from distributed import default_client

        default_client()
        return True
    except (ImportError, ValueError):
        return False


def _token(*_):
    return None


def _order_tokens(plan: Plan, outs: list, name: str, dsk: dict) -> dict:
    """Steer dask.order through the output blocks in the halos' direction.

    A graph whose keys all feed one final task (``dask.compute``'s and
    ``da.store``'s ``finalize``) is ordered by dask.order output block after
    output block, most (transitive) dependencies first: interior blocks before
    those on the faces, ties broken by key name.  With halos that visits a
    block's neighbours long before the block itself, so each input block, loaded
    for its neighbours' halos, waits for its own output block to the end: memory
    grows with the array.  A chain of empty tasks, one per output block, each
    output depending on the link as far from the chain's end as it is from the
    first output block in the halos' direction, makes the blocks' dependency
    counts fall along that direction: dask.order then visits them in it, and
    every block's neighbours that feed it halos come first.  The links hold None
    and run in microseconds.
    """
    # per pooled axis: +1 (ascending) unless the halos only come from later blocks
    signs = []
    for a in plan.axes:
        left = right = False
        for chunk in range(len(a.out_chunks)):
            parts = a.blocks(chunk)
            main = max(parts, key=lambda p: p[2] - p[1])[0]
            left |= any(p[0] < main for p in parts)
            right |= any(p[0] > main for p in parts)
        signs.append(-1 if right and not left else 1)
    axes = [a.axis for a in plan.axes]

    def rank(index):
        return tuple(-i if axis in axes and signs[axes.index(axis)] < 0 else i
                     for axis, i in enumerate(index))

    order = sorted((out_index for out_index, _, _ in outs), key=rank)
    n = len(order)
    for t in range(n):
        dsk[(name, t)] = (_token, (name, t - 1)) if t else (_token,)
    return {index: (name, n - 1 - r) for r, index in enumerate(order)}


def build_pool(x, plan: Plan, task_fields: dict, out_dtype, with_indices: bool, name: str):
    """One task per output block, reading the input blocks of its plan."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    axes = tuple(a.axis for a in plan.axes)
    nd = len(axes)
    token = tokenize(x, plan, sorted((k, repr(v)) for k, v in task_fields.items()
                                     if k != "table"), with_indices)
    key = f"{name}-{token}"
    table = task_fields["table"]
    rows = tuple(range(3 - nd, 3))
    per_axis = []
    for a in plan.axes:
        entries = []
        for chunk in range(len(a.out_chunks)):
            lo, hi = a.ranges[chunk]
            entries.append((a.blocks(chunk), a.outputs[chunk], lo, max(hi - a.size, 0)))
        per_axis.append(entries)
    other = [range(len(c)) for i, c in enumerate(x.chunks) if i not in axes]
    other_axes = [i for i in range(x.ndim) if i not in axes]
    # First pass: per output block, the input blocks it reads and whether each is a
    # halo (a thin slice, copied out by the block's "edges" task) or read directly.
    outs = []
    edges = {}  # input block index -> list of the slices its neighbours read
    for combo in itertools.product(*[range(len(e)) for e in per_axis]):
        entries = [per_axis[i][j] for i, j in enumerate(combo)]
        outputs = tuple(e[1] for e in entries)
        origins = tuple(e[2] for e in entries)
        block_table = sub_table(table, rows, outputs, origins)
        task = PoolTask(
            table=block_table, axes=axes, parts=tuple(tuple((p[1], p[2]) for p in e[0])
                                                      for e in entries),
            extra=tuple(e[3] for e in entries), origins=origins,
            **{k: v for k, v in task_fields.items() if k != "table"})
        block_lists = [[p[0] for p in e[0]] for e in entries]
        part_lists = [[(p[1], p[2]) for p in e[0]] for e in entries]
        for rest in itertools.product(*other):
            index, out_index = block_indices(x.ndim, other_axes, rest, axes, combo)
            reads = []
            for blocks, slices in zip(itertools.product(*block_lists),
                                      itertools.product(*part_lists)):
                for axis, b in zip(axes, blocks):
                    index[axis] = b
                source = tuple(index)
                if any(2 * (b - a) <= x.chunks[axis][blk] for axis, blk, (a, b) in
                       zip(axes, blocks, slices)):
                    where = [slice(None)] * x.ndim
                    for axis, (a, b) in zip(axes, slices):
                        where[axis] = slice(a, b)
                    wheres = edges.setdefault(source, [])
                    where = tuple(where)
                    if where not in wheres:
                        wheres.append(where)
                    reads.append((source, wheres.index(where)))
                else:
                    reads.append((source, None))
            outs.append((tuple(out_index), task, reads))
    # The halos: one task per input block that copies out every slice its
    # neighbours read (so the block itself is not kept for them), run before the
    # block's own output tasks, which list it as a dependency they do not read.
    # Then every input block is released as soon as its own outputs are done,
    # whatever order dask runs the blocks in: memory stays a few blocks per
    # thread, whatever the array's size.
    halo_key = f"{name}-halo-{token}"
    dsk = {(halo_key, *source): (_copy_slices, (x.name, *source), tuple(wheres))
           for source, wheres in edges.items()}
    tokens = _order_tokens(plan, outs, f"{name}-order-{token}", dsk) \
        if edges and not _distributed_client() else {}
    for out_index, task, reads in outs:
        deps = [(x.name, *source) if pick is None else (halo_key, *source)
                for source, pick in reads]
        picks = tuple(pick for _, pick in reads)
        after = [(halo_key, *source) for source, pick in reads
                 if pick is None and source in edges]
        if out_index in tokens:
            after.append(tokens[out_index])
        if any(p is not None for p in picks):
            task = dataclasses.replace(task, picks=picks)
        dsk[(key, *out_index)] = (task, deps, after) if after else (task, deps)
    chunks = list(x.chunks)
    for a in plan.axes:
        chunks[a.axis] = a.out_chunks
    chunks = tuple(chunks)
    if not with_indices:
        graph = HighLevelGraph.from_collections(key, dsk, dependencies=[x])
        return da.Array(graph, key, chunks, meta=_meta(x, out_dtype, x.ndim))
    layer = HighLevelGraph.from_collections(key, dsk, dependencies=[x])
    results = []
    for part, dtype, suffix in ((0, out_dtype, "values"), (1, np.int64, "indices")):
        sub_key = f"{name}-{suffix}-{token}"
        sub = {(sub_key, *k[1:]): (operator.getitem, k, part) for k in dsk if k[0] == key}
        graph = HighLevelGraph.from_collections(sub_key, sub, dependencies=[
            da.Array(layer, key, chunks, meta=_meta(x, out_dtype, x.ndim))])
        results.append(da.Array(graph, sub_key, chunks, meta=_meta(x, dtype, x.ndim)))
    return tuple(results)


# --------------------------------------------------------------------------
# The forward ops
# --------------------------------------------------------------------------


def sliding_pool(x, mode, nd, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode=False, *, op, strict, norm_type=None, count_include_pad=True,
                 divisor_override=None, return_indices=False, channels_last=False,
                 backend=None, align="input", out_chunks=None):
    x = check_dask_array(x, op)
    spec = _dispatch._SlidingOp.from_args(op, mode, nd, kernel_size, stride, padding,
                                          dilation, ceil_mode, norm_type, count_include_pad,
                                          divisor_override)
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if spec.mode not in EXTREMES and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max and min "
                         f"pooling")
    check_backend(backend, op)
    check_dtype(np.dtype(x.dtype), spec.mode, op, _float_dtypes(x))
    align = _check_align(align, out_chunks, op)
    out_chunks = _out_chunk_arg(out_chunks, nd, op)
    layout = Layout.of(tuple(x.shape), nd, channels_last, op, strict)
    table = spec.table(layout)
    axes = pooled_axes(x.ndim, nd, channels_last)
    window = spec.window
    anchors = [np.arange(table.out_shape[3 - nd + i], dtype=np.int64) * window.stride[i]
               for i in range(nd)]
    plan = make_plan(op, x, axes, table, anchors, align, out_chunks)
    if getattr(planning, "active", False):
        return plan
    max_of_abs = spec.is_max_of_abs
    kernel_mode = "max" if max_of_abs else spec.mode if spec.mode in EXTREMES else "sum"
    fields = dict(op=op, mode=kernel_mode, nd=nd, channels_last=channels_last,
                  power=spec.forward_power, max_of_abs=max_of_abs,
                  with_indices=return_indices, backend=backend, whole_spatial=layout.spatial,
                  table=table, separable=separable_choice(kernel_mode, layout, table, x.dtype,
                                                          spec.forward_power))
    return build_pool(x, plan, fields, x.dtype, return_indices, op.replace("_", "-"))


def adaptive_pool(x, mode, nd, output_size, *, op, strict, return_indices=False,
                  channels_last=False, backend=None, align="input", out_chunks=None):
    from fastpool._params import adaptive_output_shape, adaptive_table

    x = check_dask_array(x, op)
    if mode not in ("max", "min", "avg"):
        raise ValueError(f"{op}: mode must be 'max', 'min' or 'avg', got {mode!r}")
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if mode not in EXTREMES and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max and min "
                         f"pooling")
    check_backend(backend, op)
    check_dtype(np.dtype(x.dtype), mode, op, _float_dtypes(x))
    align = _check_align(align, out_chunks, op)
    out_chunks = _out_chunk_arg(out_chunks, nd, op)
    layout = Layout.of(tuple(x.shape), nd, channels_last, op, strict)
    out_spatial = adaptive_output_shape(op, nd, output_size, layout.spatial)
    table = adaptive_table(layout.spatial, out_spatial)
    axes = pooled_axes(x.ndim, nd, channels_last)
    anchors = [table.start[3 - nd + i, :out_spatial[i]] for i in range(nd)]
    plan = make_plan(op, x, axes, table, anchors, align, out_chunks)
    if getattr(planning, "active", False):
        return plan
    kernel_mode = mode if mode in EXTREMES else "sum"
    fields = dict(op=op, mode=kernel_mode, nd=nd, channels_last=channels_last, power=None,
                  max_of_abs=False, with_indices=return_indices, backend=backend,
                  whole_spatial=layout.spatial, table=table,
                  separable=separable_choice(kernel_mode, layout, table, x.dtype, None))
    return build_pool(x, plan, fields, x.dtype, return_indices, op.replace("_", "-"))
