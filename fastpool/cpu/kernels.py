"""Numba CPU kernels over canonical arrays.

Channels-first kernels take ``x`` of shape ``(planes, D, H, W)``; channels-last
kernels take ``(batch, D, H, W, C)`` and run their innermost loop over the
contiguous channel axis.  Windows come from a :class:`fastpool._params.WindowTable`
(``start``, ``stop``, ``step``, ``divisor``), so one kernel per op and layout
serves 1-D, 2-D and 3-D, sliding and adaptive pooling alike.

Work is split over output rows ``(plane or batch, od, oh)``: each row is
written by exactly one thread.  Sums accumulate in float64.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
from numba import njit, types
from numba.extending import overload

from fastpool._config import CPU_JIT_OPTIONS
from fastpool._scalar import torch_power
from fastpool.cpu.tasks import (
    HELPER_JIT_OPTIONS,
    OVERLOAD_JIT_OPTIONS,
    int_max,
    int_min,
    parallel_kernel,
    reshaped,
    scratch,
    share,
    zeroed,
)

# Which sweep a kernel runs is fixed when it is built (see per_constants): compiling
# every pattern into one kernel, for a run-time choice, cost seconds of each cold
# first call.  A sweep is a pair (stride, kernel) of the interior windows' constants:
# a window-major sweep with both constant (step 1); an offset-major one with a
# run-time window length for (stride, 0), a run-time stride too for (0, 0), max
# only (sums with other strides do better window by window); or NO_SWEEP.
WINDOW_SWEEPS = ((2, 2), (2, 3), (3, 3), (4, 4))
NO_SWEEP = (-1, -1)


def interior_sweep(interior, step, max_fold: bool) -> tuple[int, int]:
    """The sweep of a kernel over interior windows ``interior`` ([lo, hi, stride,
    offset, kernel] along W) at dilation ``step``; ``max_fold``: for maxima (else
    sums)."""
    lo, hi, stride, _, kernel = (int(value) for value in interior)
    if hi <= lo:
        return NO_SWEEP
    if step == 1 and (stride, kernel) in WINDOW_SWEEPS:
        return stride, kernel
    if stride == 1:
        return 1, 0
    return (0, 0) if max_fold else NO_SWEEP


_built: dict = {}
_built_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _built_lock
    _built_lock = threading.Lock()  # a parent thread may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def per_constants(factory):
    """Memoise ``factory(*constants)``, which builds a kernel for a tuple of int
    constants: an interior sweep (see :func:`interior_sweep`), a register window (see
    :func:`register_window`), a convolution's tile width (``fastpool.cpu.conv``).

    The kernel is a closure whose cells hold the ints (literal constants to
    numba): numba's on-disk cache keys closures by their cells' contents, so each
    build is cached, and loaded by later processes.  (A numba function in a cell
    would pickle with a per-process id: a cache miss in every process.)  A build
    runs with its own constants, so it must be given windows of the table they were
    chosen from (``fastpool.cpu.pooling`` picks both from one table)."""

    @functools.wraps(factory)
    def build(constants):
        key = (factory.__name__, *constants)
        kernel = _built.get(key)
        if kernel is None:
            with _built_lock:
                kernel = _built.get(key)
                if kernel is None:
                    values = tuple(int(value) for value in constants)
                    kernel = factory(*values)
                    # Each build's machine code under a name of its own.  The builds
                    # share their function's name, and numba's names carry a
                    # per-process count: builds compiled alike by two processes and
                    # loaded from the disk cache by a third got one symbol, and a
                    # parallel launch looks its kernel up by symbol (tasks.py), so
                    # it could run another build's code (another sweep: wrong maxima).
                    function = kernel.body.py_func
                    function.__qualname__ += "_" + "_".join(
                        str(value).replace("-", "m") for value in values)
                    _built[key] = kernel
        return kernel

    return build


def built_kernels() -> list:
    """The kernels :func:`per_constants` factories have built in this process."""
    return list(_built.values())


@njit(inline="always")
def _row_coords(row, out_d, out_h):
    plane = row // (out_d * out_h)
    rest = row - plane * (out_d * out_h)
    od = rest // out_h
    return plane, od, rest - od * out_h


# Window loops are written as while loops: a ``range`` with a run-time step costs
# a division per window to find its trip count, which dominated small windows.


@njit(inline="always")
def _max_along_row(x_row, best, best_at, base, start, stop, step_w, first, last):
    """Fold one input row into the running maxima of outputs first..last-1."""
    for ow in range(first, last):
        row_best, row_at = best[ow], best_at[ow]
        w, w1 = start[2, ow], stop[2, ow]
        while w < w1:
            value = x_row[w]
            # torch's update: a NaN always wins, ties keep the first.
            if (value > row_best) | (value != value):
                row_best, row_at = value, base + w
            w += step_w
        best[ow], best_at[ow] = row_best, row_at


# A window's row of at least this many contiguous elements is summed by
# _contiguous_sum, in vector lanes (a fixed order for a given length, so the
# result does not depend on threads or chunks): one chain of dependent adds, 4
# cycles each, made PSPNet's 30-wide adaptive windows half torch's speed.  Below
# it, the call (and its array reference counting) costs more than it saves.
LONG_ROW = 16


@njit(inline="always")
def _sum_along_row(x_row, total, start, stop, step_w, power, zero, first, last, assign=False):
    """Add one input row's share to the window sums of outputs first..last-1 (or,
    with ``assign``, store it)."""
    for ow in range(first, last):
        w, w1 = start[2, ow], stop[2, ow]
        if step_w == 1 and w1 - w >= LONG_ROW:
            row_total = _contiguous_sum(x_row[w:w1], power, zero)
        else:
            row_total = zero
            while w < w1:
                row_total += _raise_to(x_row[w], power)
                w += step_w
        total[ow] = row_total if assign else total[ow] + row_total


@per_constants
def max_pool_channels_first(sweep_stride, sweep_kernel):
    """The channels-first max kernel for one interior sweep (see :func:`per_constants`)."""

    @parallel_kernel
    def max_pool_channels_first(part, parts, x, out, indices, start, stop, step, interior, lowest,
                                chunks):
        """Window maxima; their flat positions too unless ``indices`` is None (then the
        position bookkeeping is compiled out)."""
        planes, out_d, out_h, out_w = out.shape
        height, width = x.shape[2], x.shape[3]
        step_d, step_h, step_w = step[0], step[1], step[2]
        # Outputs whose windows lie wholly inside the row are swept by _max_interior
        # (_max_interior_at, with indices: keeping positions): loads and selects that
        # vectorise across outputs.
        lo, hi, stride, offset, kernel = (interior[2, 0], interior[2, 1], interior[2, 2],
                                          interior[2, 3], interior[2, 4])
        if sweep_stride < 0:
            lo = hi = 0
        # Rows go in chunks, each with one scratch row: an allocation per output row
        # costs more than a small row's arithmetic.
        rows = planes * out_d * out_h
        per_chunk = (rows + chunks - 1) // chunks
        for chunk in range(*share(chunks, part, parts)):
            best_at = scratch(out_w, np.int64)
            for row in range(chunk * per_chunk, int_min(rows, (chunk + 1) * per_chunk)):
                plane, od, oh = _row_coords(row, out_d, out_h)
                d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
                best = out[plane, od, oh]
                best[:] = lowest
                if indices is not None:
                    for ow in range(out_w):
                        best_at[ow] = (d0 * height + h0) * width + start[2, ow]
                # Input rows of the window in scan order, each swept for the whole
                # output row.
                d = d0
                while d < d1:
                    h = h0
                    while h < h1:
                        x_row = x[plane, d, h]
                        base = (d * height + h) * width
                        _max_along_row(x_row, best, best_at, base, start, stop, step_w, 0, lo)
                        if sweep_stride >= 0 and hi > lo and indices is not None:
                            _max_interior_at(sweep_stride, sweep_kernel, x_row, best, best_at,
                                             base, lo, hi, stride, offset, kernel, step_w)
                        elif sweep_stride >= 0 and hi > lo:
                            _max_interior(sweep_stride, sweep_kernel, x_row, best, lo, hi,
                                          stride, offset, kernel, step_w, None)
                        _max_along_row(x_row, best, best_at, base, start, stop, step_w,
                                       int_max(lo, hi), out_w)
                        h += step_h
                    d += step_d
                if indices is not None:
                    # Element by element: numba's checked array assignment compiles
                    # its error message's string formatting (seconds).
                    positions = indices[plane, od, oh]
                    for ow in range(out_w):
                        positions[ow] = best_at[ow]

    return max_pool_channels_first


@per_constants
def max_pool_channels_last(window_rows, window_columns):
    """The channels-last max kernel for one register window (see
    :func:`register_window`)."""

    @parallel_kernel
    def max_pool_channels_last(part, parts, x, out, indices, start, stop, step, lowest, chunks):
        """Window maxima over (batch, D, H, W, C), vectorised over channels.  Without
        positions each output is pooled whole (:func:`_max_windows_of_row`); with
        them each output row accumulates in place, one input row of its windows at a
        time."""
        batch, out_d, out_h, out_w, channels = out.shape
        height, width = x.shape[2], x.shape[3]
        step_d, step_h, step_w = step[0], step[1], step[2]
        rows = batch * out_d * out_h
        per_chunk = (rows + chunks - 1) // chunks
        for chunk in range(*share(chunks, part, parts)):
            acc = scratch(channels if indices is None else 0, x.dtype)
            for row in range(chunk * per_chunk, int_min(rows, (chunk + 1) * per_chunk)):
                n, od, oh = _row_coords(row, out_d, out_h)
                d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
                best = out[n, od, oh]
                if indices is None:
                    _max_windows_of_row(window_rows, window_columns, best, x[n], acc, d0, d1,
                                        h0, h1, start, stop, step, None, lowest, 1.0, None)
                    continue
                best[:] = lowest
                for ow in range(out_w):
                    indices[n, od, oh, ow, :] = (d0 * height + h0) * width + start[2, ow]
                d = d0
                while d < d1:
                    h = h0
                    while h < h1:
                        _max_with_positions_into_row(best, indices[n, od, oh], x[n, d, h],
                                                     start, stop, step_w,
                                                     (d * height + h) * width)
                        h += step_h
                    d += step_d

    return max_pool_channels_last


# --------------------------------------------------------------------------
# Channels-last forward, window by window.  Each output's window is folded
# whole, input row by input row, into a vector over the channels: its reads are
# runs of contiguous channel vectors, and the channel loop is the innermost,
# vectorised one.  A kernel is built for one *register window* (see
# register_window): windows of that many rows x columns, up to 4 x 4, fold in
# registers, the loops unrolled, and store each output once.  Other windows (the
# clipped ones at the edges, or all of them in a kernel built for none) fold into
# a scratch vector (in L1): column by column at the edges; in unrolled groups of 4,
# 2 and 1 columns (one load and store of the scratch per group) otherwise.  Each
# build compiles one register variant: all of them in one kernel cost every cold
# first call seconds.  The order of the fold is the scan order (d, h, w) of every
# window, as in the row-by-row kernels: maxima keep torch's first index and NaN
# rule, sums their rounding, bit for bit.
# --------------------------------------------------------------------------

# The (rows, columns) of windows with a register variant: 1-D windows of 1 to 4,
# 2x2, 3x3 and 2x2x2 (as 4 rows of 2).
REGISTER_WINDOWS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (3, 3), (4, 2))
NO_REGISTER_WINDOW = (0, 0)


def register_window(window_sizes: tuple[int, int, int]) -> tuple[int, int]:
    """The register window of a channels-last kernel for windows of at most
    ``window_sizes`` (D, H, W) input positions: their (rows, columns) if in
    :data:`REGISTER_WINDOWS`, else :data:`NO_REGISTER_WINDOW`."""
    size_d, size_h, size_w = window_sizes
    window = (size_d * size_h, size_w)
    return window if window in REGISTER_WINDOWS else NO_REGISTER_WINDOW


@njit(inline="always")
def _count(first, stop, step):
    """How many of first, first + step, ... lie below stop (no division for step 1)."""
    if stop <= first:
        return 0
    return stop - first if step == 1 else (stop - first + step - 1) // step


@njit(inline="always")
def _fold_in_registers(fold, finish, result, ow, r0, r1, r2, r3, w0, step_w, rows, columns,
                       power, first, factor):
    """``result[ow]`` = the finished fold of ``columns`` columns from ``w0`` of the
    first ``rows`` of r0..r3 (literals at the call site: the loops unroll).  Indexed
    ``result[ow, c]``, not through a view of the row per window, whose reference
    counting cost the 2x2 channels-last average's rows a fifth of their time."""
    for c in range(result.shape[1]):
        kept = first
        for j in range(columns):
            kept = fold(kept, r0[w0 + j * step_w, c], power)
        if rows > 1:
            for j in range(columns):
                kept = fold(kept, r1[w0 + j * step_w, c], power)
        if rows > 2:
            for j in range(columns):
                kept = fold(kept, r2[w0 + j * step_w, c], power)
        if rows > 3:
            for j in range(columns):
                kept = fold(kept, r3[w0 + j * step_w, c], power)
        result[ow, c] = finish(kept, factor, power)


@njit(inline="always")
def _window_row(x_image, k, rows_h, d0, h0, step_d, step_h):
    """Input row ``k`` (< 2 * rows_h, or any with rows_h = 1) of a window, in scan
    order, without a division."""
    if rows_h == 1:
        return x_image[d0 + k * step_d, h0]
    if k < rows_h:
        return x_image[d0, h0 + k * step_h]
    return x_image[d0 + step_d, h0 + (k - rows_h) * step_h]


@njit(inline="always")
def _fold_column_group(fold, acc, x_row, w0, step_w, columns, power):
    for c in range(acc.size):
        kept = acc[c]
        for j in range(columns):
            kept = fold(kept, x_row[w0 + j * step_w, c], power)
        acc[c] = kept


@njit(inline="always")
def _folded(kept, factor, power):
    return kept


@njit(inline="always")
def _finish_sum(kept, factor, power):
    return _root(_scaled(kept, factor), power)


@njit(inline="always")
def _factor_of_row(factor, divisor, ow):
    return factor


@njit(inline="always")
def _factor_of_window(factor, divisor, ow):
    return factor / divisor[2, ow]


def _max_windows_of_row(window_rows, window_columns, result, x_image, acc, d0, d1, h0, h1,
                        start, stop, step, power, first, factor, divisor):
    """The maxima ``result`` (W_out, C) of one output row's windows over ``x_image``
    (D, H, W, C), those of ``window_rows`` x ``window_columns`` (literal ints) in
    registers (``power``, ``factor`` and ``divisor`` are None, 1.0 and None;
    ``first``: the dtype's lowest value)."""


def _sum_windows_of_row(window_rows, window_columns, result, x_image, acc, d0, d1, h0, h1,
                        start, stop, step, power, first, factor, divisor):
    """The averages / Lp norms ``result`` (W_out, C) of one output row's windows
    (``factor`` / ``divisor[2]``: their scales; ``first``: zero in the sums' dtype),
    those of ``window_rows`` x ``window_columns`` (literal ints) in registers; or,
    with ``divisor`` None, their sums (of powers), unfinished."""


def _windows_of_row(fold):
    """The implementation of a row of channels-last windows folded by ``fold``, one
    per register window.  Its body is not an inlined function: numba inlines by
    copying the callee's IR block by block, each copy with all its variables, so a
    large inlined body costs seconds of each cold compile."""

    def implementation(window_rows, window_columns, result, x_image, acc, d0, d1, h0, h1,
                       start, stop, step, power, first, factor, divisor):
        if not isinstance(window_rows, types.IntegerLiteral) or \
                not isinstance(window_columns, types.IntegerLiteral):
            return None
        fixed_rows, fixed_columns = window_rows.literal_value, window_columns.literal_value
        # Float32 averages of windows too large to sum in float32 (float64 ``first``):
        # each run of up to COLUMN_BLOCK columns of a window row is summed in float32
        # (vector lanes, at memory speed) and the runs in float64, so that rounding
        # does not grow with the window.  Summed in float64 throughout, the
        # conversions held the loads to two thirds of memory speed.
        blocked = (fold is _fold_sum and isinstance(power, types.NoneType)
                   and x_image.dtype == types.float32 and first == types.float64)
        finished = isinstance(divisor, types.NoneType)
        finish = _folded if finished else _finish_sum
        factor_of = _factor_of_row if finished else _factor_of_window

        def windows_of_row(window_rows, window_columns, result, x_image, acc, d0, d1, h0,
                           h1, start, stop, step, power, first, factor, divisor):
            step_d, step_h, step_w = step[0], step[1], step[2]
            if blocked:  # a constant: other builds allocate nothing
                run = zeroed(acc.size, np.float32)
            rows_h = _count(h0, h1, step_h)
            rows = _count(d0, d1, step_d) * rows_h
            r0 = r1 = r2 = r3 = x_image[d0, h0]
            if fixed_rows > 0 and rows == fixed_rows:
                if fixed_rows > 1:
                    r1 = _window_row(x_image, 1, rows_h, d0, h0, step_d, step_h)
                if fixed_rows > 2:
                    r2 = _window_row(x_image, 2, rows_h, d0, h0, step_d, step_h)
                if fixed_rows > 3:
                    r3 = _window_row(x_image, 3, rows_h, d0, h0, step_d, step_h)
            for ow in range(result.shape[0]):
                w0, w1 = start[2, ow], stop[2, ow]
                window_factor = factor_of(factor, divisor, ow)
                columns = _count(w0, w1, step_w)
                if fixed_rows > 0 and rows == fixed_rows and columns == fixed_columns:
                    _fold_in_registers(fold, finish, result, ow, r0, r1, r2, r3, w0, step_w,
                                       fixed_rows, fixed_columns, power, first,
                                       window_factor)
                    continue
                acc[:] = first
                pending = 0
                d = d0
                while d < d1:
                    h = h0
                    while h < h1:
                        x_row = x_image[d, h]
                        if blocked:
                            pending = _sum_row_blocks(acc, run, pending, x_row, w0, step_w,
                                                      columns)
                            h += step_h
                            continue
                        w, left = w0, columns
                        if fixed_rows == 0:  # all windows here: worth unrolled groups
                            while left >= 4:
                                _fold_column_group(fold, acc, x_row, w, step_w, 4, power)
                                w += 4 * step_w
                                left -= 4
                            if left >= 2:
                                _fold_column_group(fold, acc, x_row, w, step_w, 2, power)
                                w += 2 * step_w
                                left -= 2
                        while left > 0:
                            _fold_column_group(fold, acc, x_row, w, step_w, 1, power)
                            w += step_w
                            left -= 1
                        h += step_h
                    d += step_d
                if blocked and pending:
                    _flush_run(acc, run)
                for c in range(result.shape[1]):
                    result[ow, c] = finish(acc[c], window_factor, power)

        return windows_of_row

    return implementation


# Float32 window rows are summed in runs of this many columns in float32, the runs
# in float64 (see _windows_of_row): the limit of a float32 sum in fastpool.
COLUMN_BLOCK = 64


@njit(inline="always")
def _flush_run(acc, run):
    """Add the float32 run's sums to the float64 ``acc``, and empty the run."""
    for c in range(acc.size):
        acc[c] += run[c]
        run[c] = 0


@njit(inline="always")
def _sum_row_blocks(acc, run, pending, x_row, w0, step_w, columns):
    """Add ``columns`` columns of float32 ``x_row`` (W, C) from ``w0`` to the float32
    ``run`` (holding ``pending`` columns' sums), flushed into the float64 channel
    sums ``acc`` each time it holds COLUMN_BLOCK; returns the columns it holds."""
    w, left = w0, columns
    while left > 0:
        if pending == COLUMN_BLOCK:
            _flush_run(acc, run)
            pending = 0
        block = int_min(left, COLUMN_BLOCK - pending)
        pending += block
        left -= block
        while block >= 4:
            _fold_column_group(_fold_sum, run, x_row, w, step_w, 4, None)
            w, block = w + 4 * step_w, block - 4
        if block >= 2:
            _fold_column_group(_fold_sum, run, x_row, w, step_w, 2, None)
            w, block = w + 2 * step_w, block - 2
        if block > 0:
            _fold_column_group(_fold_sum, run, x_row, w, step_w, 1, None)
            w += step_w
    return pending


# Channels-last windows fold a run of input columns into a channel vector.  For
# the short contiguous runs of common windows the run length is a literal at the
# call site: the column loop unrolls inside the channel loop, which vectorises
# with one load and store of the accumulator per run instead of per column.


@njit(inline="always")
def _fold_columns(fold, acc, x_row, w0, columns, power):
    for c in range(acc.size):
        kept = acc[c]
        for j in range(columns):
            kept = fold(kept, x_row[w0 + j, c], power)
        acc[c] = kept


# Compiled once per dtype as plain functions called once per input row: inlined
# into the parallel kernels, their unrolled variants multiplied compile time.
@njit(**HELPER_JIT_OPTIONS)
def _max_into_row(best, x_row, start, stop, step_w):
    """Fold input row ``x_row`` (W, C) into the running maxima ``best`` (W_out, C)."""
    for ow in range(best.shape[0]):
        _fold_channels(_fold_max, best[ow], x_row, start[2, ow], stop[2, ow], step_w, None)


@njit(**HELPER_JIT_OPTIONS)
def _sum_into_row(totals, x_row, start, stop, step_w, power):
    """Add input row ``x_row``'s share (of powers) to the window sums ``totals``."""
    for ow in range(totals.shape[0]):
        _fold_channels(_fold_sum, totals[ow], x_row, start[2, ow], stop[2, ow], step_w, power)


@njit(**HELPER_JIT_OPTIONS)
def _max_with_positions_into_row(best, best_at, x_row, start, stop, step_w, base):
    """:func:`_max_into_row`, keeping the positions ``base + w`` of the maxima."""
    for ow in range(best.shape[0]):
        _max_channels_with_position(best[ow], best_at[ow], x_row, start[2, ow], stop[2, ow],
                                    step_w, base)


@njit(inline="always")
def _fold_channels(fold, acc, x_row, w0, w1, step_w, power):
    """Fold columns w0, w0 + step_w, ... < w1 of ``x_row`` (W, C) into ``acc`` (C)."""
    if step_w == 1 and w1 - w0 == 2:
        _fold_columns(fold, acc, x_row, w0, 2, power)
    elif step_w == 1 and w1 - w0 == 3:
        _fold_columns(fold, acc, x_row, w0, 3, power)
    elif step_w == 1 and w1 - w0 == 4:
        _fold_columns(fold, acc, x_row, w0, 4, power)
    else:
        w = w0
        while w < w1:
            values = x_row[w]
            for c in range(acc.size):
                acc[c] = fold(acc[c], values[c], power)
            w += step_w


@njit(inline="always")
def _max_columns_with_position(best, best_at, x_row, w0, columns, base):
    for c in range(best.size):
        kept, kept_at = best[c], best_at[c]
        for j in range(columns):
            value = x_row[w0 + j, c]
            if (value > kept) | (value != value):
                kept, kept_at = value, base + w0 + j
        best[c], best_at[c] = kept, kept_at


@njit(inline="always")
def _max_channels_with_position(best, best_at, x_row, w0, w1, step_w, base):
    """As :func:`_fold_channels` for maxima, with their positions ``base + w``."""
    if step_w == 1 and w1 - w0 == 2:
        _max_columns_with_position(best, best_at, x_row, w0, 2, base)
    elif step_w == 1 and w1 - w0 == 3:
        _max_columns_with_position(best, best_at, x_row, w0, 3, base)
    else:
        w = w0
        while w < w1:
            _max_with_position(best, best_at, x_row[w], base + w)
            w += step_w


@njit(inline="always")
def _max_with_position(best, best_at, values, at):
    """Fold a channel vector into running maxima and their positions."""
    for c in range(len(values)):
        value = values[c]
        if (value > best[c]) | (value != value):
            best[c] = value
            best_at[c] = at


# A function of its own (compiled once per signature and inlined by LLVM), not
# inlined by numba: its IR copied into each of the many callers cost seconds of an
# Lp op's first call.
_power = njit(**HELPER_JIT_OPTIONS)(torch_power)


# Inlined, and ``power is None`` decided by type at compile time: averages and Lp
# norms get separate specialisations, and the averaging loops stay free of branches
# and calls (as a function of its own, the identity stayed a call per element in
# the loops that called it, which then did not vectorise; the pow of Lp norms is
# _power's call).
@njit(inline="always")
def _raise_to(value, power):
    """``value ** power`` in float64; the identity when power is None (averages)."""
    if power is None:
        return value
    return _power(np.float64(value), power)


def _scaled(total, factor):
    """``total * factor`` in ``total``'s type (see the overload)."""


@overload(_scaled, inline="always")
def _scaled_overload(total, factor):
    # A float32 sum scaled by a float64 factor widened, multiplied and narrowed every
    # element: a third of the channels-last 2x2 average's time (2.0 against 1.5 ms
    # for DenseNet's transition, one thread).  A float32 sum is divided by the window's
    # divisor in float32, in its own lanes, as torch divides (a multiply by a float32
    # 1/3 was an ulp off torch's 7/3; memory-bound, the division costs no time).
    if total == types.float32:
        return lambda total, factor: total / np.float32(1.0 / factor)
    return lambda total, factor: total * factor


@njit(**HELPER_JIT_OPTIONS)
def _root(mean, power):
    """``mean ** (1/power)``: the Lp norm from its mean power, as torch's lp_pool."""
    if power is None:
        return mean
    return _power(mean, 1.0 / power)


# --------------------------------------------------------------------------
# Interior sweeps (channels-first).  Outputs lo <= o < hi of a sliding table
# have whole windows inside the row, reading ``o*stride + offset + j*step``.
# With stride and kernel known to LLVM as constants, the window-major loop
# vectorises across outputs (interleaved loads); the common pairs get such a
# copy, other strides sweep offset by offset.
# --------------------------------------------------------------------------


@njit(inline="always")
def _fold_max(kept, value, power):
    # torch's update: a NaN always wins, ties keep the first.
    return value if (value > kept) | (value != value) else kept


@njit(inline="always")
def _fold_sum(kept, value, power):
    return kept + _raise_to(value, power)


# Functions of their own, called once per output row by the kernels, compiled once
# per register window (and shared by the kernels that fold windows alike).
# ``noalias`` as the kernels' (see fastpool.cpu.tasks): their arrays do not overlap,
# and without it the fold's channel loops kept run-time overlap checks (the 2x2
# channels-last average's row, one thread: 2.6 -> 2.2 ms).
# numba's own pipeline (see tasks._LightlyPreoptimisedLibrary: through the kernels'
# the channels-last 3x3 stride-2 max ran 15% slower).
_ROW_JIT_OPTIONS = {"error_model": "numpy", "fastmath": CPU_JIT_OPTIONS["fastmath"],
                    "noalias": True}
overload(_max_windows_of_row, jit_options=_ROW_JIT_OPTIONS)(_windows_of_row(_fold_max))
overload(_sum_windows_of_row, jit_options=_ROW_JIT_OPTIONS)(_windows_of_row(_fold_sum))


# Both sweeps index views that start at the first interior window: indices that
# are provably non-negative spare numba's wraparound select, which would turn
# the vector loads into gathers.


@njit(inline="always")
def _fold_windows(fold, x_row, acc, lo, hi, stride, offset, kernel, power):
    windows, kept_row = x_row[lo * stride + offset:], acc[lo:hi]
    for i in range(hi - lo):
        base = i * stride
        kept = kept_row[i]
        for j in range(kernel):
            kept = fold(kept, windows[base + j], power)
        kept_row[i] = kept


@njit(inline="always")
def _fold_offsets(fold, x_row, acc, lo, hi, stride, offset, kernel, step, power):
    windows, kept_row = x_row[lo * stride + offset:], acc[lo:hi]
    for j in range(kernel):
        shifted = windows[j * step:]
        for i in range(hi - lo):
            kept_row[i] = fold(kept_row[i], shifted[i * stride], power)


def _max_interior(sweep_stride, sweep_kernel, x_row, acc, lo, hi, stride, offset, kernel,
                  step, power):
    """Fold the interior windows of one input row into the running maxima ``acc`` by
    the sweep (``sweep_stride``, ``sweep_kernel``), literal ints (``power``: None)."""


def _max_interior_at(sweep_stride, sweep_kernel, x_row, acc, acc_at, base, lo, hi, stride,
                     offset, kernel, step):
    """:func:`_max_interior` keeping the maxima's positions in ``acc_at`` (``base`` +
    the column), as :func:`_max_along_row` does: the same folds in the same order,
    vectorised across outputs (its table-driven loop became AVX-512 gathers, and
    max pooling with indices ran at a fifth of the speed without)."""


@njit(inline="always")
def _max_windows_at(x_row, acc, acc_at, base, lo, hi, stride, offset, kernel):
    windows, kept_row, at_row = x_row[lo * stride + offset:], acc[lo:hi], acc_at[lo:hi]
    first = base + lo * stride + offset  # the position of windows[0]
    for i in range(hi - lo):
        column = i * stride
        kept, kept_at = kept_row[i], at_row[i]
        for j in range(kernel):
            kept, kept_at = _fold_max_at(kept, kept_at, windows[column + j], first + column + j)
        kept_row[i], at_row[i] = kept, kept_at


@njit(inline="always")
def _max_offsets_at(x_row, acc, acc_at, base, lo, hi, stride, offset, kernel, step):
    windows, kept_row, at_row = x_row[lo * stride + offset:], acc[lo:hi], acc_at[lo:hi]
    first = base + lo * stride + offset
    for j in range(kernel):
        shifted = windows[j * step:]
        for i in range(hi - lo):
            kept_row[i], at_row[i] = _fold_max_at(kept_row[i], at_row[i], shifted[i * stride],
                                               first + i * stride + j * step)


@overload(_max_interior_at, jit_options=OVERLOAD_JIT_OPTIONS)
def _max_interior_at_overload(sweep_stride, sweep_kernel, x_row, acc, acc_at, base, lo, hi,
                              stride, offset, kernel, step):
    if not isinstance(sweep_stride, types.IntegerLiteral) or \
            not isinstance(sweep_kernel, types.IntegerLiteral):
        return None
    fixed_stride, fixed_kernel = sweep_stride.literal_value, sweep_kernel.literal_value
    if fixed_kernel > 0:
        def window_sweep(sweep_stride, sweep_kernel, x_row, acc, acc_at, base, lo, hi, stride,
                         offset, kernel, step):
            _max_windows_at(x_row, acc, acc_at, base, lo, hi, fixed_stride, offset,
                            fixed_kernel)
        return window_sweep

    def offset_sweep(sweep_stride, sweep_kernel, x_row, acc, acc_at, base, lo, hi, stride,
                     offset, kernel, step):
        _max_offsets_at(x_row, acc, acc_at, base, lo, hi,
                        fixed_stride if fixed_stride > 0 else stride, offset, kernel, step)
    return offset_sweep


def _sum_interior(sweep_stride, sweep_kernel, x_row, acc, lo, hi, stride, offset, kernel,
                  step, power):
    """Add the interior windows' sums (of powers) of one input row to ``acc`` by the
    sweep (``sweep_stride``, ``sweep_kernel``), literal ints."""


def _interior_sweep_impl(fold):
    """The implementation of the interior sweep folding by ``fold``, per sweep."""

    def sweep_impl(sweep_stride, sweep_kernel, x_row, acc, lo, hi, stride, offset, kernel,
                   step, power):
        if not isinstance(sweep_stride, types.IntegerLiteral) or \
                not isinstance(sweep_kernel, types.IntegerLiteral):
            return None
        fixed_stride, fixed_kernel = sweep_stride.literal_value, sweep_kernel.literal_value
        if fixed_kernel > 0:
            def window_sweep(sweep_stride, sweep_kernel, x_row, acc, lo, hi, stride, offset,
                             kernel, step, power):
                _fold_windows(fold, x_row, acc, lo, hi, fixed_stride, offset, fixed_kernel,
                              power)
            return window_sweep
        if fixed_stride > 0:
            def unit_stride_sweep(sweep_stride, sweep_kernel, x_row, acc, lo, hi, stride,
                                  offset, kernel, step, power):
                _fold_offsets(fold, x_row, acc, lo, hi, fixed_stride, offset, kernel, step,
                              power)
            return unit_stride_sweep

        def offset_sweep(sweep_stride, sweep_kernel, x_row, acc, lo, hi, stride, offset,
                         kernel, step, power):
            _fold_offsets(fold, x_row, acc, lo, hi, stride, offset, kernel, step, power)
        return offset_sweep

    return sweep_impl


# Functions of their own, called once per input row (not inlined into the kernels).
# A kernel passes its cells' literal ints, so only its own sweep compiles.
overload(_max_interior, jit_options=OVERLOAD_JIT_OPTIONS)(_interior_sweep_impl(_fold_max))
overload(_sum_interior, jit_options=OVERLOAD_JIT_OPTIONS)(_interior_sweep_impl(_fold_sum))


@per_constants
def sum_pool_channels_first(sweep_stride, sweep_kernel):
    """The channels-first sum kernel for one interior sweep (see :func:`per_constants`)."""

    @parallel_kernel
    def sum_pool_channels_first(part, parts, x, out, start, stop, step, interior, divisor, scale,
                                power, zero, chunks, grad):
        """Window sums, finished as Lp norms / averages, or (given ``grad``) as
        :func:`_lp_output_gradient` coefficients for the backward gather."""
        planes, out_d, out_h, out_w = out.shape
        step_d, step_h, step_w = step[0], step[1], step[2]
        lo, hi, stride, offset, kernel = (interior[2, 0], interior[2, 1], interior[2, 2],
                                          interior[2, 3], interior[2, 4])
        if sweep_stride < 0:
            lo = hi = 0
        rows = planes * out_d * out_h
        per_chunk = (rows + chunks - 1) // chunks
        for chunk in range(*share(chunks, part, parts)):
            totals = scratch(out_w, type(zero))
            for row in range(chunk * per_chunk, int_min(rows, (chunk + 1) * per_chunk)):
                plane, od, oh = _row_coords(row, out_d, out_h)
                d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
                total = totals
                total[:] = zero
                d = d0
                while d < d1:
                    h = h0
                    while h < h1:
                        x_row = x[plane, d, h]
                        if sweep_stride >= 0 and hi > lo:
                            _sum_interior(sweep_stride, sweep_kernel, x_row, total, lo, hi,
                                          stride, offset, kernel, step_w, power)
                        _sum_along_row(x_row, total, start, stop, step_w, power, zero, 0, lo)
                        _sum_along_row(x_row, total, start, stop, step_w, power, zero,
                                       int_max(lo, hi), out_w)
                        h += step_h
                    d += step_d
                _finish_sums(out, grad, plane, od, oh, total, divisor, scale, power)

    return sum_pool_channels_first


@njit(inline="always")
def _finish_sums(out, grad, plane, od, oh, total, divisor, scale, power):
    """Finish output row (plane, od, oh)'s window sums ``total`` as Lp norms /
    averages, or (given ``grad``) as :func:`_lp_output_gradient` coefficients."""
    row_divisor = divisor[0, od] * divisor[1, oh]
    result = out[plane, od, oh]
    if grad is None:
        for ow in range(result.size):
            result[ow] = _root(_scaled(total[ow], scale / (row_divisor * divisor[2, ow])),
                               power)
    else:
        grad_row = grad[plane, od, oh]
        if power == 2.0:  # a loop free of calls (see _lp_output_gradient_square)
            for ow in range(result.size):
                result[ow] = _lp_output_gradient_square(grad_row[ow], total[ow],
                                                        row_divisor * divisor[2, ow], scale)
            return
        for ow in range(result.size):
            result[ow] = _lp_output_gradient(grad_row[ow], total[ow],
                                             row_divisor * divisor[2, ow], scale, power)


@per_constants
def sum_pool_channels_last(window_rows, window_columns):
    """The channels-last sum kernel for one register window (see
    :func:`register_window`)."""

    @parallel_kernel
    def sum_pool_channels_last(part, parts, x, out, start, stop, step, divisor, scale, power, zero,
                               chunks, grad):
        """As :func:`sum_pool_channels_first`, vectorised over channels, window by
        window (see :func:`_windows_of_row`)."""
        batch, out_d, out_h, out_w, channels = out.shape
        rows = batch * out_d * out_h
        per_chunk = (rows + chunks - 1) // chunks
        for chunk in range(*share(chunks, part, parts)):
            acc = scratch(channels, type(zero))
            # Lp norms accumulate whole output rows, input row by input row: their pow
            # calls per element run faster in those long loops than window by window.
            # The Lp backward's window sums go a row at a time too.
            row_totals = scratch((out_w if power is not None or grad is not None else 0,
                                   channels), type(zero))
            for row in range(chunk * per_chunk, int_min(rows, (chunk + 1) * per_chunk)):
                n, od, oh = _row_coords(row, out_d, out_h)
                d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
                row_divisor = divisor[0, od] * divisor[1, oh]
                if grad is None and power is None:
                    _sum_windows_of_row(window_rows, window_columns, out[n, od, oh], x[n], acc,
                                        d0, d1, h0, h1, start, stop, step, power, zero,
                                        scale / row_divisor, divisor)
                    continue
                if grad is None:
                    row_totals[...] = zero
                    d = d0
                    while d < d1:
                        h = h0
                        while h < h1:
                            _sum_into_row(row_totals, x[n, d, h], start, stop, step[2], power)
                            h += step[1]
                        d += step[0]
                    for ow in range(out_w):
                        total, result = row_totals[ow], out[n, od, oh, ow]
                        factor = scale / (row_divisor * divisor[2, ow])
                        for c in range(channels):
                            result[c] = _root(total[c] * factor, power)
                    continue
                # The window sums themselves (unfinished: no scale, no root).
                _sum_windows_of_row(window_rows, window_columns, row_totals, x[n], acc, d0, d1,
                                    h0, h1, start, stop, step, power, zero, 1.0, None)
                for ow in range(out_w):
                    total, result, grad_at = row_totals[ow], out[n, od, oh, ow], grad[n, od,
                                                                                        oh, ow]
                    window_divisor = row_divisor * divisor[2, ow]
                    if power == 2.0:  # a loop free of calls: it vectorises
                        for c in range(channels):
                            result[c] = _lp_output_gradient_square(grad_at[c], total[c],
                                                                   window_divisor, scale)
                        continue
                    for c in range(channels):
                        result[c] = _lp_output_gradient(grad_at[c], total[c], window_divisor,
                                                        scale, power)

    return sum_pool_channels_last


# --------------------------------------------------------------------------
# Backward.  Each thread owns whole planes (channels-first) or whole bands of
# an image's positions (channels-last) of grad_input and visits outputs in a
# fixed order: race-free without atomics, and bit-identical at every thread
# count.
# --------------------------------------------------------------------------

@parallel_kernel(counts=True)
def max_backward_channels_first(part, parts, grad_out, indices, grad_in):
    """``grad_in[p, indices[p, q]] += grad_out[p, q]``; returns how many indices were
    outside the plane (and skipped).  Each task zeroes its own planes first: in
    parallel, and while they are in cache."""
    planes, outputs = grad_out.shape
    size = np.uint64(grad_in.shape[1])
    outside = 0
    for plane in range(*share(planes, part, parts)):
        target = grad_in[plane]
        target[:] = 0
        for q in range(outputs):
            at = np.uint64(indices[plane, q])  # 0 <= at < size in one comparison
            if at < size:
                target[at] += grad_out[plane, q]
            else:
                outside += 1
    return outside


@parallel_kernel(counts=True)
def max_backward_channels_last(part, parts, grad_out, indices, grad_in, bands, scans_all):
    """Scatter-add over (batch, outputs, C) into (batch, size * C).

    Each task owns one band of an image's positions and takes only the maxima that
    land in it: each element of grad_in is written by one task, and every task
    streams only its own band of grad_in (split by channel slices instead, every
    task swept the whole image's grad_in: 4 slices made a batch-1 ResNet stem 3x
    slower).  ``bands`` (one row per band of every image, ``bands.shape[0]`` per
    image): the band's positions ``[lo, hi)`` and the outputs ``[first, last)`` it
    scans.  ``scans_all``: every band scans every output, and the kernel returns
    how many indices were outside the plane (counted by each image's first band);
    else a band scans only the outputs whose windows reach it (their maxima land
    nowhere else), and the kernel returns how many entries it took, for the
    caller to check that every entry was."""
    batch, outputs, channels = grad_out.shape
    size, per_image = grad_in.shape[1] // channels, bands.shape[0]
    count = 0
    for task in range(*share(batch * per_image, part, parts)):
        n, band = task // per_image, task % per_image
        lo, hi, first, last = bands[band, 0], bands[band, 1], bands[band, 2], bands[band, 3]
        target = grad_in[n]
        target[lo * channels:hi * channels] = 0
        if scans_all:  # the two loops apart: a flag tested per entry cost 5-10%
            count += _scatter_band(target, indices[n], grad_out[n], lo, hi, first, last,
                                   size if band == 0 else 0, False)
        else:
            count += _scatter_band(target, indices[n], grad_out[n], lo, hi, first, last, 0,
                                   True)
    return count


@njit(inline="always")
def _scatter_band(target, indices, grad_out, lo, hi, first, last, size, count_taken):
    """Add outputs ``[first, last)``'s gradients whose index lies in ``[lo, hi)`` to
    ``target`` (positions by channels, flat); returns how many it added
    (``count_taken``, a literal) or how many indices lay outside ``[0, size)``."""
    counted = 0
    channels = grad_out.shape[1]
    # One unsigned comparison per entry tests lo <= at < hi, and the flat target's
    # offset is known non-negative, so numba adds no wraparound select: 1.3x faster
    # than ``target2d[at, c]`` behind two signed comparisons (YOLOv5's SPPF 5x5
    # stride-1 backward, one thread).
    band = np.uint64(int_max(hi - lo, 0))  # a band of none takes none
    for q in range(first, last):
        at_row, grad_row = indices[q], grad_out[q]
        for c in range(channels):
            at = at_row[c]
            if np.uint64(at - lo) < band:
                target[np.uint64(at * channels + c)] += grad_row[c]
                if count_taken:
                    counted += 1
            elif not count_taken and (at < 0 or at >= size) and size > 0:
                counted += 1
    return counted


@njit(inline="always")
def _lp_output_gradient(grad, window_sum, window_divisor, scale, power):
    """d loss / d (mean of x**p over the window), by torch's lp_pool chain rule."""
    # torch: out = (sign(m) * relu(|m|) * scale) ** (1/p) with m = mean(x**p), so
    # d out / d m = scale / p * u ** (1/p - 1) with u = m * scale.  u ** (1/p - 1)
    # is root(u) / u: a square root, not a pow call, for the usual p = 2.
    mean = window_sum / window_divisor
    u = mean * scale
    slope = _root(u, power) / u if 0.0 < u < np.inf else _power(u, 1.0 / power - 1.0)
    grad_scaled = np.float64(grad) * (1.0 / power) * slope * scale
    if mean != mean:
        return 0.0 * grad_scaled  # torch.sign(nan) is 0
    if mean == 0.0:
        return 0.0  # relu's gradient at 0
    return grad_scaled


@njit(inline="always")
def _lp_output_gradient_square(grad, window_sum, window_divisor, scale):
    """:func:`_lp_output_gradient` for p = 2, the same arithmetic inlined: no calls
    (``_root`` and ``_power`` are functions of their own), so a loop over channels
    vectorises (Lp channels-last backward, 32x56x56x64: its coefficients took 5 of
    its 8 ms)."""
    mean = window_sum / window_divisor
    u = mean * scale
    slope = math.sqrt(u) / u if 0.0 < u < np.inf else 1.0 / math.sqrt(u)
    grad_scaled = np.float64(grad) * 0.5 * slope * scale
    if mean != mean:
        return 0.0 * grad_scaled
    if mean == 0.0:
        return 0.0
    return grad_scaled


@njit(**HELPER_JIT_OPTIONS)
def _input_factor(value, power):
    """d (x**p) / dx; 1 for averages (see _raise_to)."""
    if power is None:
        return 1.0
    return power * _power(np.float64(value), power - 1.0) if power != 1.0 else 1.0


# --------------------------------------------------------------------------
# Sum backward as a gather: every input element is written once, with the sum,
# in output order, of ``coefficient * scale / divisor`` over the windows that
# cover it, times d (x**p) / dx for Lp.  The coefficient is grad_output itself
# for averages, and d loss / d mean from the sum kernels (with scale 1) for Lp.
# --------------------------------------------------------------------------


@njit(inline="always")
def _covers(position, o, start, step, axis, dilated):
    """Whether output ``o``, one of ``position``'s covering outputs along ``axis``
    (:meth:`~fastpool._params.WindowTable.covering_outputs`: its window starts at or
    before ``position`` and stops after it), holds it: only a ``dilated`` window
    can step over it."""
    return not dilated or (position - start[axis, o]) % step[axis] == 0


@njit(inline="always")
def _dilated(step):
    return step[0] != 1 or step[1] != 1 or step[2] != 1


@parallel_kernel
def sum_backward_channels_first(part, parts, coefficient, x, grad_in, first_out, last_out, start,
                                stop, step, divisor, scale, power, zero, chunks):
    """Separably: each output row's weighted coefficients are spread over input
    columns (a W pass, into scratch), then each input row adds up the spread rows
    of the output rows covering it.  Per input element that is kw + kd*kh terms,
    not kd*kh*kw, and the adds of the second pass are whole contiguous rows."""
    planes, depth, height, width = grad_in.shape
    out_h, out_w = coefficient.shape[2], coefficient.shape[3]
    dilated = _dilated(step)
    cover_d = 0
    for d in range(depth):
        cover_d = int_max(cover_d, last_out[0, d] - first_out[0, d])
    slabs = planes * depth
    per_chunk = (slabs + chunks - 1) // chunks
    for chunk in range(*share(chunks, part, parts)):
        spread = scratch((cover_d, out_h, width), type(zero))
        total = scratch(width, type(zero))
        ready = (-1, -1, -1)  # (plane, od0, od1) whose rows spread holds
        for slab in range(chunk * per_chunk, int_min(slabs, (chunk + 1) * per_chunk)):
            plane = slab // depth
            d = slab - plane * depth
            od0, od1 = first_out[0, d], last_out[0, d]
            if (plane, od0, od1) != ready:
                for od in range(od0, od1):
                    for oh in range(out_h):
                        row_divisor = divisor[0, od] * divisor[1, oh]
                        terms, target = coefficient[plane, od, oh], spread[od - od0, oh]
                        target[:] = zero
                        for ow in range(out_w):
                            term = type(zero)(terms[ow] * (scale / (row_divisor * divisor[2, ow])))
                            w = start[2, ow]
                            while w < stop[2, ow]:
                                target[w] += term
                                w += step[2]
                ready = (plane, od0, od1)
            for h in range(height):
                total[:] = zero
                for od in range(od0, od1):
                    if not _covers(d, od, start, step, 0, dilated):
                        continue
                    for oh in range(first_out[1, h], last_out[1, h]):
                        if _covers(h, oh, start, step, 1, dilated):
                            row = spread[od - od0, oh]
                            for w in range(width):
                                total[w] += row[w]
                result = grad_in[plane, d, h]
                if power is None:
                    # Element by element: numba's checked array assignment compiles
                    # its error message's string formatting (seconds).
                    for w in range(width):
                        result[w] = total[w]
                elif power == 2.0:  # _input_factor's 2 * x, inlined: the loop vectorises
                    x_row = x[plane, d, h]
                    for w in range(width):
                        result[w] = total[w] * (2.0 * np.float64(x_row[w]))
                else:
                    x_row = x[plane, d, h]
                    for w in range(width):
                        result[w] = total[w] * _input_factor(x_row[w], power)


@njit(inline="always")
def _gather_window_terms(sums, at, terms, weights, d, h, w, first_out, last_out, start, step,
                         zero, dilated):
    """``sums[at]`` (a row of lanes) = the sum, in output order, of ``terms[od, oh, ow]``
    (rows of lanes) times ``weights[od, oh, ow]`` over the windows covering
    (d, h, w).  Indexed element by element, not through row views, whose
    reference counting cost more than the arithmetic of narrow rows.  ``dilated``:
    a literal at each call site (see :func:`sum_backward_channels_last`)."""
    lanes = sums.shape[1]
    for c in range(lanes):
        sums[at, c] = zero
    for od in range(first_out[0, d], last_out[0, d]):
        if not _covers(d, od, start, step, 0, dilated):
            continue
        for oh in range(first_out[1, h], last_out[1, h]):
            if not _covers(h, oh, start, step, 1, dilated):
                continue
            for ow in range(first_out[2, w], last_out[2, w]):
                if not _covers(w, ow, start, step, 2, dilated):
                    continue
                weight = weights[od, oh, ow]
                for c in range(lanes):
                    sums[at, c] += terms[od, oh, ow, c] * weight


@parallel_kernel
def sum_backward_channels_last(part, parts, coefficient, x, grad_in, first_out, last_out, start,
                               stop, step, weights, power, zero):
    """One task per input row; each element gathers its covering windows' terms,
    vectorised over channels."""
    batch, depth, height, width, channels = grad_in.shape
    dilated = _dilated(step)
    for row in range(*share(batch * depth * height, part, parts)):
        n, d, h = _row_coords(row, depth, height)
        sums, terms = grad_in[n, d, h], coefficient[n]
        for w in range(width):
            # Two inlined copies, each with its literal: the undilated one has no
            # tests in its loops, which LLVM did not unswitch (4.7x slower).
            if dilated:
                _gather_window_terms(sums, w, terms, weights, d, h, w, first_out, last_out,
                                     start, step, zero, True)
            else:
                _gather_window_terms(sums, w, terms, weights, d, h, w, first_out, last_out,
                                     start, step, zero, False)
            if power == 2.0:  # _input_factor's 2 * x, inlined: the loop vectorises
                for c in range(channels):
                    sums[w, c] *= 2.0 * np.float64(x[n, d, h, w, c])
            elif power is not None:
                for c in range(channels):
                    sums[w, c] *= _input_factor(x[n, d, h, w, c], power)


@parallel_kernel
def sum_backward_plane_blocks(part, parts, coefficients, values, targets, first_out, last_out,
                              start, stop, step, weights, power, zero, block, spatial):
    """:func:`sum_backward_channels_first` over small planes, ``block`` planes at a
    time transposed into vector lanes: each task copies its planes' coefficients
    into an (od, oh, ow, block) scratch, runs the same two passes on rows of
    (width, block) elements (the same sums in the same order: the same bits) and
    copies the sums back into the planes.  Row by row, narrow rows spent their
    time in loop overhead instead.  The planes come flattened: ``coefficients`` (planes,
    od * oh * ow), ``values`` (the input, for the Lp backward) and ``targets`` (planes,
    D * H * W), with ``spatial`` (D, H, W) (reshaped here, they cost the first call
    compiles of numba's reshape).  ``weights``: each window's scale / divisor (od, oh,
    ow) in float64, as the row kernel computes it."""
    planes, size = targets.shape
    depth, height, width = spatial
    out_d, out_h, out_w = weights.shape
    outputs, run = coefficients.shape[1], width * block
    dilated = _dilated(step)
    cover_d = 0
    for d in range(depth):
        cover_d = int_max(cover_d, last_out[0, d] - first_out[0, d])
    for task in range(*share((planes + block - 1) // block, part, parts)):
        first = task * block
        lanes = int_min(block, planes - first)
        # Zeroed: a last, partial block's idle lanes then sum zeros, never denormals.
        terms = zeroed((out_d, out_h, out_w, block), coefficients.dtype)
        spread = scratch((cover_d, out_h, width, block), type(zero))
        sums = scratch((depth * height, run), type(zero))
        term_rows = reshaped(terms, (outputs, block))
        for lane in range(lanes):
            for q in range(outputs):
                term_rows[q, lane] = coefficients[first + lane, q]
        spread_rows = reshaped(spread, (cover_d * out_h, run))
        ready_od0, ready_od1 = -1, -1
        for d in range(depth):
            od0, od1 = first_out[0, d], last_out[0, d]
            if od0 != ready_od0 or od1 != ready_od1:
                for od in range(od0, od1):
                    for oh in range(out_h):
                        target = spread[od - od0, oh]
                        target[:] = zero
                        for ow in range(out_w):
                            weight = weights[od, oh, ow]
                            w = start[2, ow]
                            while w < stop[2, ow]:
                                for c in range(block):
                                    target[w, c] += type(zero)(terms[od, oh, ow, c] * weight)
                                w += step[2]
                ready_od0, ready_od1 = od0, od1
            for h in range(height):
                at = d * height + h
                for i in range(run):
                    sums[at, i] = zero
                for od in range(od0, od1):
                    if not _covers(d, od, start, step, 0, dilated):
                        continue
                    for oh in range(first_out[1, h], last_out[1, h]):
                        if _covers(h, oh, start, step, 1, dilated):
                            spread_at = (od - od0) * out_h + oh
                            for i in range(run):
                                sums[at, i] += spread_rows[spread_at, i]
        lane_sums = reshaped(sums, (size, block))
        for lane in range(lanes):
            target = targets[first + lane]
            if power is None:
                for i in range(size):
                    target[i] = lane_sums[i, lane]
            elif power == 2.0:  # _input_factor's 2 * x, inlined: the loop vectorises
                for i in range(size):
                    target[i] = lane_sums[i, lane] * (2.0 * np.float64(values[first + lane, i]))
            else:
                for i in range(size):
                    target[i] = lane_sums[i, lane] * _input_factor(values[first + lane, i],
                                                                   power)


# --------------------------------------------------------------------------
# Channels-first forward over small planes, a block of planes at a time
# transposed into vector lanes (as sum_backward_plane_blocks): output rows of a
# few elements spent their time in per-row overhead instead (32x512x7x7 float32
# 2x2 average, two threads: 0.79 ms row by row, torch 0.39).  Each output folds
# its window in the row kernels' order, so the results are the same bits.
# --------------------------------------------------------------------------


@njit(inline="always")
def _block_in_lanes(values, out, task, block, spatial, out_spatial):
    """Block ``task`` of ``block`` planes: its first plane, its planes' count, their
    values transposed into lanes ``(D*H*W, block)`` and the scratch for their
    outputs, ``(OD*OH*OW, block)``."""
    first = task * block
    lanes = int_min(block, values.shape[0] - first)
    lane_values = scratch((spatial[0] * spatial[1] * spatial[2], block), values.dtype)
    _planes_to_lanes(values, first, lanes, lane_values)
    lane_out = scratch((out_spatial[0] * out_spatial[1] * out_spatial[2], block), out.dtype)
    return first, lanes, lane_values, lane_out


@njit(inline="always")
def _planes_to_lanes(values, first, lanes, lane_values):
    """``lane_values[q, lane]`` = ``values[first + lane, q]``, zeros in idle lanes."""
    size, block = lane_values.shape
    for lane in range(lanes):
        plane = values[first + lane]
        for q in range(size):
            lane_values[q, lane] = plane[q]
    for q in range(size):
        for lane in range(lanes, block):
            lane_values[q, lane] = 0


@njit(inline="always")
def _lanes_to_planes(lane_out, out, first, lanes):
    """``out[first + lane, q]`` = ``lane_out[q, lane]`` for the block's planes."""
    for lane in range(lanes):
        plane = out[first + lane]
        for q in range(plane.size):
            plane[q] = lane_out[q, lane]


@njit(inline="always")
def _add_columns(total, columns, start, stop, step, ow):
    """``total`` += the window ``ow``'s columns, along the row (rows first)."""
    w = start[2, ow]
    while w < stop[2, ow]:
        for c in range(total.size):
            total[c] += columns[w, c]
        w += step[2]


@njit(inline="always")
def _fold_window_elements(fold, kept, lane_values, spatial, d0, d1, h0, h1, ow, start, stop,
                          step, power):
    """``kept`` folded with the window's elements one by one, in (d, h, w) order (the
    direct kernels' interior sweep)."""
    height, width = spatial[1], spatial[2]
    d = d0
    while d < d1:
        h = h0
        while h < h1:
            at = (d * height + h) * width
            w = start[2, ow]
            while w < stop[2, ow]:
                for c in range(kept.size):
                    kept[c] = fold(kept[c], lane_values[at + w, c], power)
                w += step[2]
            h += step[1]
        d += step[0]


@njit(inline="always")
def _add_window_rows(total, row_total, lane_values, spatial, d0, d1, h0, h1, ow, start, stop,
                     step, power, zero):
    """``total`` += each of the window's input rows' own sums, in (d, h) order (the
    direct kernel's row edges, :func:`_sum_along_row`)."""
    height, width = spatial[1], spatial[2]
    d = d0
    while d < d1:
        h = h0
        while h < h1:
            at = (d * height + h) * width
            for c in range(total.size):
                row_total[c] = zero
            w = start[2, ow]
            while w < stop[2, ow]:
                for c in range(total.size):
                    row_total[c] = _fold_sum(row_total[c], lane_values[at + w, c], power)
                w += step[2]
            for c in range(total.size):
                total[c] += row_total[c]
            h += step[1]
        d += step[0]


@per_constants
def sum_pool_plane_blocks(rows_first, sweeps):
    """The plane-block sum kernel for one row kernel's order (see
    :func:`per_constants`): ``rows_first`` 1, the rows-first kernel's; else the
    direct kernel's, whose interior sweep (``sweeps`` 1) folds the outputs
    ``[swept_lo, swept_hi)`` of a row.  One build per order compiles only its own
    folds (the three in one build compiled for 0.8 s)."""

    @parallel_kernel
    def sum_pool_plane_blocks(part, parts, values, out, start, stop, step, divisor, scale,
                              power, zero, block, spatial, out_spatial, swept_lo, swept_hi):
        """:func:`sum_pool_channels_first` over ``(planes, D*H*W)`` ``values`` into
        ``(planes, OD*OH*OW)`` ``out``, ``block`` planes a task in vector lanes, each
        window summed in the row kernel's order (the caller keeps windows narrower
        than LONG_ROW, whose sums the row kernels reassociate).  ``spatial``,
        ``out_spatial``: (D, H, W) and (OD, OH, OW).  Rows first, a window's columns
        are summed over its rows, then along the row; else the swept outputs add
        element by element in (d, h, w) order, the others each input row's sum."""
        height, width = spatial[1], spatial[2]
        out_h, out_w = out_spatial[1], out_spatial[2]
        for task in range(*share((values.shape[0] + block - 1) // block, part, parts)):
            first, lanes, lane_values, lane_out = _block_in_lanes(values, out, task, block,
                                                                  spatial, out_spatial)
            total = scratch(block, type(zero))
            row_total = scratch(block, type(zero))
            columns = scratch((width if rows_first else 0, block), type(zero))
            for od in range(out_spatial[0]):
                for oh in range(out_h):
                    d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
                    if rows_first:
                        for w in range(width):
                            for c in range(block):
                                columns[w, c] = zero
                        d = d0
                        while d < d1:
                            h = h0
                            while h < h1:
                                at = (d * height + h) * width
                                for w in range(width):
                                    for c in range(block):
                                        columns[w, c] = _fold_sum(
                                            columns[w, c], lane_values[at + w, c], power)
                                h += step[1]
                            d += step[0]
                    row_divisor = divisor[0, od] * divisor[1, oh]
                    for ow in range(out_w):
                        for c in range(block):
                            total[c] = zero
                        if rows_first:
                            _add_columns(total, columns, start, stop, step, ow)
                        elif sweeps and swept_lo <= ow < swept_hi:
                            _fold_window_elements(_fold_sum, total, lane_values, spatial, d0,
                                                  d1, h0, h1, ow, start, stop, step, power)
                        else:
                            _add_window_rows(total, row_total, lane_values, spatial, d0, d1,
                                             h0, h1, ow, start, stop, step, power, zero)
                        factor = scale / (row_divisor * divisor[2, ow])
                        result = lane_out[(od * out_h + oh) * out_w + ow]
                        for c in range(block):
                            result[c] = _root(_scaled(total[c], factor), power)
            _lanes_to_planes(lane_out, out, first, lanes)

    return sum_pool_plane_blocks


@parallel_kernel
def max_pool_plane_blocks(part, parts, values, out, start, stop, step, lowest, block, spatial,
                          out_spatial):
    """Window maxima (values only) of :func:`max_pool_channels_first` over small
    planes, as :func:`sum_pool_plane_blocks` takes them."""
    out_d, out_h, out_w = out_spatial
    for task in range(*share((values.shape[0] + block - 1) // block, part, parts)):
        first, lanes, lane_values, lane_out = _block_in_lanes(values, out, task, block,
                                                              spatial, out_spatial)
        for od in range(out_d):
            for oh in range(out_h):
                for ow in range(out_w):
                    best = lane_out[(od * out_h + oh) * out_w + ow]
                    for c in range(block):
                        best[c] = lowest
                    _fold_window_elements(_fold_max, best, lane_values, spatial,
                                          start[0, od], stop[0, od], start[1, oh],
                                          stop[1, oh], ow, start, stop, step, None)
        _lanes_to_planes(lane_out, out, first, lanes)


@parallel_kernel(counts=True)
def max_backward_gather_channels_last(part, parts, grad_out, indices, grad_in, first_out, last_out,
                                      start, stop, step):
    """Each input element sums the gradients of the covering windows whose maximum
    it is.  Returns how many (output, channel) indices were matched: fewer than
    grad_out.size means some index lies outside its own window (not from this
    forward), and the caller scatters instead, as torch would."""
    batch, depth, height, width, channels = grad_in.shape
    dilated = _dilated(step)
    matched = 0
    for row in range(*share(batch * depth * height, part, parts)):
        n, d, h = _row_coords(row, depth, height)
        for w in range(width):
            # As in sum_backward_channels_last: a copy per literal.
            if dilated:
                matched += _gather_maxima(grad_in[n, d, h, w], grad_out[n], indices[n], d, h,
                                          w, height, width, first_out, last_out, start,
                                          step, True)
            else:
                matched += _gather_maxima(grad_in[n, d, h, w], grad_out[n], indices[n], d, h,
                                          w, height, width, first_out, last_out, start,
                                          step, False)
    return matched


@njit(inline="always")
def _gather_maxima(total, grad_out, indices, d, h, w, height, width, first_out, last_out,
                   start, step, dilated):
    """``total`` (a row of channels) = the sum of the gradients ``grad_out`` of the
    windows covering (d, h, w) whose maximum ``indices`` says it is; returns how
    many it took."""
    here = (d * height + h) * width + w
    total[:] = 0.0
    matched = 0
    for od in range(first_out[0, d], last_out[0, d]):
        if not _covers(d, od, start, step, 0, dilated):
            continue
        for oh in range(first_out[1, h], last_out[1, h]):
            if not _covers(h, oh, start, step, 1, dilated):
                continue
            for ow in range(first_out[2, w], last_out[2, w]):
                if not _covers(w, ow, start, step, 2, dilated):
                    continue
                grads, at = grad_out[od, oh, ow], indices[od, oh, ow]
                for c in range(total.size):
                    if at[c] == here:
                        total[c] += grads[c]
                        matched += 1
    return matched


@njit(inline="always")
def _sum_window_rows(rows, total, od, oh, start, stop, step, zero):
    """The D/H pass of the separable sums: ``total`` = the sum of the W-pass rows
    ``rows[d, h]`` over output (od, oh)'s D/H window (rows of any trailing shape)."""
    total[...] = zero
    d = start[0, od]
    while d < stop[0, od]:
        h = start[1, oh]
        while h < stop[1, oh]:
            total += rows[d, h]
            h += step[1]
        d += step[0]


@per_constants
def sum_pool_separable_channels_first(sweep_stride, sweep_kernel):
    """The channels-first separable sum kernel for one interior sweep (see
    :func:`per_constants`)."""

    @parallel_kernel
    def sum_pool_separable_channels_first(part, parts, x, out, start, stop, step, interior, divisor,
                                          scale, power, zero):
        planes, out_d, out_h, out_w = out.shape
        depth, height = x.shape[1], x.shape[2]
        lo, hi, stride, offset, kernel = (interior[2, 0], interior[2, 1], interior[2, 2],
                                          interior[2, 3], interior[2, 4])
        if sweep_stride < 0:
            lo = hi = 0
        for plane in range(*share(planes, part, parts)):
            rows = scratch((depth, height, out_w), type(zero))
            for d in range(depth):
                for h in range(height):
                    x_row, row = x[plane, d, h], rows[d, h]
                    if sweep_stride >= 0 and hi > lo:
                        row[lo:hi] = zero
                        _sum_interior(sweep_stride, sweep_kernel, x_row, row, lo, hi, stride,
                                      offset, kernel, step[2], power)
                    _sum_along_row(x_row, row, start, stop, step[2], power, zero, 0, lo, True)
                    _sum_along_row(x_row, row, start, stop, step[2], power, zero, int_max(lo, hi),
                                   out_w, True)
            total = scratch(out_w, type(zero))
            for od in range(out_d):
                for oh in range(out_h):
                    _sum_window_rows(rows, total, od, oh, start, stop, step, zero)
                    row_divisor = divisor[0, od] * divisor[1, oh]
                    result = out[plane, od, oh]
                    for ow in range(out_w):
                        result[ow] = _root(_scaled(total[ow],
                                                   scale / (row_divisor * divisor[2, ow])),
                                           power)

    return sum_pool_separable_channels_first


@parallel_kernel
def sum_pool_separable_channels_last(part, parts, x, out, start, stop, step, divisor, scale, power,
                                     zero, channel_block):
    batch, out_d, out_h, out_w, channels = out.shape
    depth, height = x.shape[1], x.shape[2]
    blocks = (channels + channel_block - 1) // channel_block
    for task in range(*share(batch * blocks, part, parts)):
        n = task // blocks
        c0 = (task - n * blocks) * channel_block
        c1 = int_min(c0 + channel_block, channels)
        rows = scratch((depth, height, out_w, c1 - c0), type(zero))
        for d in range(depth):
            for h in range(height):
                for ow in range(out_w):
                    total = rows[d, h, ow]
                    total[:] = zero
                    w = start[2, ow]
                    while w < stop[2, ow]:
                        values = x[n, d, h, w, c0:c1]
                        for c in range(c1 - c0):
                            total[c] += _raise_to(values[c], power)
                        w += step[2]
        totals = scratch((out_w, c1 - c0), type(zero))
        for od in range(out_d):
            for oh in range(out_h):
                _sum_window_rows(rows, totals, od, oh, start, stop, step, zero)
                row_divisor = divisor[0, od] * divisor[1, oh]
                for ow in range(out_w):
                    factor = scale / (row_divisor * divisor[2, ow])
                    result = out[n, od, oh, ow, c0:c1]
                    for c in range(c1 - c0):
                        result[c] = _root(_scaled(totals[ow, c], factor), power)


@per_constants
def max_pool_separable_channels_first(sweep_stride, sweep_kernel):
    """The channels-first separable max kernel for one interior sweep (see
    :func:`per_constants`)."""

    @parallel_kernel
    def max_pool_separable_channels_first(part, parts, x, out, indices, start, stop, step, interior,
                                          lowest):
        planes, out_d, out_h, out_w = out.shape
        depth, height, width = x.shape[1], x.shape[2], x.shape[3]
        positions = (depth, height, out_w) if indices is not None else (1, 1, 1)
        # Without indices the W pass sweeps the interior windows (see _max_interior).
        lo, hi, stride, offset, kernel = (interior[2, 0], interior[2, 1], interior[2, 2],
                                          interior[2, 3], interior[2, 4])
        if sweep_stride < 0 or indices is not None:
            lo = hi = 0
        for plane in range(*share(planes, part, parts)):
            rows = scratch((depth, height, out_w), x.dtype)
            rows_at = scratch(positions, np.int64)
            for d in range(depth):
                for h in range(height):
                    x_row = x[plane, d, h]
                    if sweep_stride >= 0 and hi > lo:
                        rows[d, h, lo:hi] = lowest
                        _max_interior(sweep_stride, sweep_kernel, x_row, rows[d, h], lo, hi,
                                      stride, offset, kernel, step[2], None)
                    for ow in range(out_w):
                        if lo <= ow < hi:
                            continue
                        best, best_at = lowest, start[2, ow]
                        w = start[2, ow]
                        while w < stop[2, ow]:
                            value = x_row[w]
                            if (value > best) | (value != value):
                                best, best_at = value, w
                            w += step[2]
                        rows[d, h, ow] = best
                        if indices is not None:
                            rows_at[d, h, ow] = best_at
            for od in range(out_d):
                for oh in range(out_h):
                    d0, h0 = start[0, od], start[1, oh]
                    best = out[plane, od, oh]
                    best[:] = lowest
                    if indices is not None:
                        best_at = indices[plane, od, oh]
                        for ow in range(out_w):
                            best_at[ow] = (d0 * height + h0) * width + start[2, ow]
                    d = d0
                    while d < stop[0, od]:
                        h = h0
                        while h < stop[1, oh]:
                            if indices is None:
                                row = rows[d, h]
                                for ow in range(out_w):
                                    best[ow] = _fold_max(best[ow], row[ow], None)
                            else:
                                _max_with_row_positions(best, indices[plane, od, oh],
                                                        rows[d, h], rows_at[d, h],
                                                        (d * height + h) * width)
                            h += step[1]
                        d += step[0]

    return max_pool_separable_channels_first


@njit(**HELPER_JIT_OPTIONS)
def _max_rows(best, rows):
    """Fold W-pass maxima ``rows`` (W_out, C) into the running maxima ``best``."""
    for ow in range(best.shape[0]):
        kept, row = best[ow], rows[ow]
        for c in range(row.size):
            kept[c] = _fold_max(kept[c], row[c], None)


@njit(inline="always")
def _max_with_row_positions(best, best_at, row, row_at, base):
    """Fold a row of W-pass maxima (at W positions ``row_at``) into ``best``."""
    for i in range(len(row)):
        value = row[i]
        if (value > best[i]) | (value != value):
            best[i] = value
            best_at[i] = base + row_at[i]


@per_constants
def max_pool_w_pass_channels_last(window_rows, window_columns):
    """The kernel below for one register window of its W pass (one row; see
    :func:`register_window`)."""

    @parallel_kernel
    def max_pool_w_pass_channels_last(part, parts, x, maxima, start, stop, step, lowest, chunks):
        """The first pass of the separable max kernel without positions,
        channels-last: every input row's W-pass maxima ``maxima`` (W_out, C), window
        by window (:func:`_max_windows_of_row` on one-row windows).

        Its second pass, :func:`max_fold_rows_channels_last`, folds them into the
        output rows.  Both split rows over their tasks, not channel blocks (whose
        strided slices do not vectorise), so that batch 1 uses every thread too."""
        batch, depth, height, channels = x.shape[0], x.shape[1], x.shape[2], x.shape[4]
        in_rows = batch * depth * height
        per_chunk = (in_rows + chunks - 1) // chunks
        for chunk in range(*share(chunks, part, parts)):
            acc = scratch(channels, x.dtype)
            for row in range(chunk * per_chunk, int_min(in_rows, (chunk + 1) * per_chunk)):
                n, d, h = _row_coords(row, depth, height)
                _max_windows_of_row(window_rows, window_columns, maxima[n, d, h], x[n], acc,
                                    d, d + 1, h, h + 1, start, stop, step, None, lowest, 1.0,
                                    None)

    return max_pool_w_pass_channels_last


@parallel_kernel
def max_fold_rows_channels_last(part, parts, maxima, out, start, stop, step, lowest, chunks):
    """The second pass of the separable max kernel without positions,
    channels-last (see :func:`max_pool_w_pass_channels_last`): each output row is
    the fold of the W-pass rows ``maxima`` of its D/H window in scan order, each a
    vector op over the row's W_out * C contiguous elements.  Folding first-in-row
    maxima row by row in scan order keeps torch's first index and NaN rule."""
    batch, out_d, out_h = out.shape[0], out.shape[1], out.shape[2]
    out_rows = batch * out_d * out_h
    per_chunk = (out_rows + chunks - 1) // chunks
    for chunk in range(*share(chunks, part, parts)):
        for row in range(chunk * per_chunk, int_min(out_rows, (chunk + 1) * per_chunk)):
            n, od, oh = _row_coords(row, out_d, out_h)
            _max_windows_of_rows(out[n, od, oh], maxima[n], start[0, od], stop[0, od],
                                 start[1, oh], stop[1, oh], step, lowest)


@njit(inline="always")
def _max_of_row_group(best, r0, r1, r2, r3, rows, fresh, lowest):
    """Fold the first ``rows`` of rows r0..r3 (flat) into ``best``, or (``fresh``)
    into ``lowest``; both literals at the call site."""
    for i in range(best.size):
        kept = lowest if fresh else best[i]
        kept = _fold_max(kept, r0[i], None)
        if rows > 1:
            kept = _fold_max(kept, r1[i], None)
        if rows > 2:
            kept = _fold_max(kept, r2[i], None)
        if rows > 3:
            kept = _fold_max(kept, r3[i], None)
        best[i] = kept


@njit(inline="always")
def _scan_row(rows, k, rows_h, d0, h0, step):
    """Row ``k`` of a D/H window of ``rows`` in scan order, flat."""
    i = k // rows_h
    return reshaped(rows[d0 + i * step[0], h0 + (k - i * rows_h) * step[1]], -1)


@njit(**HELPER_JIT_OPTIONS)
def _max_windows_of_rows(result, rows, d0, d1, h0, h1, step, lowest):
    """``result`` (W_out, C) = the maxima of the rows ``rows[d, h]`` (W_out, C) of
    one D/H window, folded in scan order as flat W_out * C vectors, up to 4 rows
    per pass over ``result``.  No pass folds a single row into it: that fold, a
    select of the stored value, compiles to a masked store, microcoded (slow) on
    AMD cores; so 5 rows go as 3 + 2."""
    best = reshaped(result, -1)
    rows_h = _count(h0, h1, step[1])
    total = _count(d0, d1, step[0]) * rows_h
    if total == 0:
        best[:] = lowest
        return
    k = 0
    while k < total:
        left = total - k
        take = 3 if left == 5 else int_min(left, 4)
        r0 = r1 = r2 = r3 = _scan_row(rows, k, rows_h, d0, h0, step)
        if take > 1:
            r1 = _scan_row(rows, k + 1, rows_h, d0, h0, step)
        if take > 2:
            r2 = _scan_row(rows, k + 2, rows_h, d0, h0, step)
        if take > 3:
            r3 = _scan_row(rows, k + 3, rows_h, d0, h0, step)
        if k == 0 and take == 1:
            _max_of_row_group(best, r0, r1, r2, r3, 1, True, lowest)
        elif k == 0 and take == 2:
            _max_of_row_group(best, r0, r1, r2, r3, 2, True, lowest)
        elif k == 0 and take == 3:
            _max_of_row_group(best, r0, r1, r2, r3, 3, True, lowest)
        elif k == 0:
            _max_of_row_group(best, r0, r1, r2, r3, 4, True, lowest)
        elif take == 2:
            _max_of_row_group(best, r0, r1, r2, r3, 2, False, lowest)
        elif take == 3:
            _max_of_row_group(best, r0, r1, r2, r3, 3, False, lowest)
        else:
            _max_of_row_group(best, r0, r1, r2, r3, 4, False, lowest)
        k += take


@parallel_kernel
def max_pool_separable_channels_last(part, parts, x, out, indices, start, stop, step, lowest,
                                     channel_block):
    batch, out_d, out_h, out_w, channels = out.shape
    depth, height, width = x.shape[1], x.shape[2], x.shape[3]
    blocks = (channels + channel_block - 1) // channel_block
    for task in range(*share(batch * blocks, part, parts)):
        n = task // blocks
        c0 = (task - n * blocks) * channel_block
        c1 = int_min(c0 + channel_block, channels)
        rows = scratch((depth, height, out_w, c1 - c0), x.dtype)
        rows_at = scratch((depth, height, out_w, c1 - c0) if indices is not None
                           else (1, 1, 1, 1), np.int64)
        for d in range(depth):
            for h in range(height):
                if indices is None:
                    # The channels-last forward's row sweep (vectorised over channels).
                    rows[d, h] = lowest
                    _max_into_row(rows[d, h], x[n, d, h, :, c0:c1], start, stop, step[2])
                    continue
                for ow in range(out_w):
                    best = rows[d, h, ow]
                    best[:] = lowest
                    rows_at[d, h, ow, :] = start[2, ow]
                    w = start[2, ow]
                    while w < stop[2, ow]:
                        _max_with_position(best, rows_at[d, h, ow], x[n, d, h, w, c0:c1], w)
                        w += step[2]
        for od in range(out_d):
            for oh in range(out_h):
                d0, h0 = start[0, od], start[1, oh]
                for ow in range(out_w):
                    out[n, od, oh, ow, c0:c1] = lowest
                    if indices is not None:
                        indices[n, od, oh, ow, c0:c1] = (d0 * height + h0) * width + start[2, ow]
                d = d0
                while d < stop[0, od]:
                    h = h0
                    while h < stop[1, oh]:
                        base = (d * height + h) * width
                        if indices is None:
                            _max_rows(out[n, od, oh, :, c0:c1], rows[d, h])
                        else:
                            for ow in range(out_w):
                                _max_with_row_positions(out[n, od, oh, ow, c0:c1],
                                                        indices[n, od, oh, ow, c0:c1],
                                                        rows[d, h, ow], rows_at[d, h, ow], base)
                        h += step[1]
                    d += step[0]


# --------------------------------------------------------------------------
# Whole-plane reductions (global pooling, channels-first): each plane is one
# contiguous run of memory.
# --------------------------------------------------------------------------


# Reassociation alone lets LLVM vectorise a contiguous sum (in its own order, as
# torch's is in its own); without the other fast-math flags NaN and inf still
# propagate.
# --------------------------------------------------------------------------
# Rows first (channels-first, no positions).  An output row's windows share
# their D/H rows, so those rows are folded element-wise into one row of
# ``columns`` first (contiguous, independent lanes: vector loads, adds and
# selects), and each window then folds its few columns.  The direct kernels
# instead fold every input row window by window: for windows without a
# vectorised interior sweep (adaptive tables, wide strides) or narrow outputs,
# that is a chain of dependent scalar adds per window and per row.
# --------------------------------------------------------------------------


@njit(inline="always")
def _fold_window_rows(fold, columns, x_plane, d0, d1, h0, h1, step_d, step_h, power):
    """``columns[w]`` = the fold of ``x_plane[d, h, w]`` over the window's rows."""
    d = d0
    while d < d1:
        h = h0
        while h < h1:
            x_row = x_plane[d, h]
            for w in range(columns.size):
                columns[w] = fold(columns[w], x_row[w], power)
            h += step_h
        d += step_d


@parallel_kernel
def max_pool_rows_first_channels_first(part, parts, x, out, start, stop, step, lowest, chunks):
    """Window maxima (values only) of :func:`max_pool_channels_first`, rows first."""
    planes, out_d, out_h, out_w = out.shape
    rows = planes * out_d * out_h
    per_chunk = (rows + chunks - 1) // chunks
    for chunk in range(*share(chunks, part, parts)):
        columns = scratch(x.shape[3], x.dtype)
        for row in range(chunk * per_chunk, int_min(rows, (chunk + 1) * per_chunk)):
            plane, od, oh = _row_coords(row, out_d, out_h)
            columns[:] = lowest
            _fold_window_rows(_fold_max, columns, x[plane], start[0, od], stop[0, od],
                              start[1, oh], stop[1, oh], step[0], step[1], None)
            result = out[plane, od, oh]
            for ow in range(out_w):
                best = lowest
                w = start[2, ow]
                while w < stop[2, ow]:
                    best = _fold_max(best, columns[w], None)
                    w += step[2]
                result[ow] = best


@parallel_kernel
def sum_pool_rows_first_channels_first(part, parts, x, out, start, stop, step, divisor, scale,
                                       power, zero, chunks, grad):
    """:func:`sum_pool_channels_first`, rows first."""
    planes, out_d, out_h, out_w = out.shape
    rows = planes * out_d * out_h
    per_chunk = (rows + chunks - 1) // chunks
    for chunk in range(*share(chunks, part, parts)):
        columns = scratch(x.shape[3], type(zero))
        totals = scratch(out_w, type(zero))
        for row in range(chunk * per_chunk, int_min(rows, (chunk + 1) * per_chunk)):
            plane, od, oh = _row_coords(row, out_d, out_h)
            columns[:] = zero
            _fold_window_rows(_fold_sum, columns, x[plane], start[0, od], stop[0, od],
                              start[1, oh], stop[1, oh], step[0], step[1], power)
            for ow in range(out_w):
                # _sum_along_row's order: a window of one row sums as it does there.
                w, w1 = start[2, ow], stop[2, ow]
                if step[2] == 1 and w1 - w >= LONG_ROW:
                    totals[ow] = _contiguous_sum(columns[w:w1], None, zero)
                else:
                    total = zero
                    while w < w1:
                        total += columns[w]
                        w += step[2]
                    totals[ow] = total
            _finish_sums(out, grad, plane, od, oh, totals, divisor, scale, power)


@njit(**{**HELPER_JIT_OPTIONS, "fastmath": CPU_JIT_OPTIONS["fastmath"] or {"reassoc"}})
def _contiguous_sum(values, power, zero):
    total = zero
    for i in range(values.size):
        total += _raise_to(values[i], power)
    return total


# Plane sums add blocks of PLANE_SUM_BLOCK elements in the accumulator type (float32
# for float32 averages: LLVM's vector lanes, as torch's cascade sum adds them, at
# memory bandwidth where float64 conversions are not) and the blocks' totals in
# float64, so that rounding does not grow with the plane.  The order depends on
# the plane's size alone: the same at any thread count and in any dask block.
PLANE_SUM_BLOCK = 1024


@parallel_kernel
def plane_sum(part, parts, x, out, factor, power, zero):
    planes, size = x.shape
    for plane in range(*share(planes, part, parts)):
        values = x[plane]
        if size <= PLANE_SUM_BLOCK:
            total = np.float64(_contiguous_sum(values, power, zero))
        else:
            total = 0.0
            for first in range(0, size, PLANE_SUM_BLOCK):
                total += _contiguous_sum(values[first:first + PLANE_SUM_BLOCK], power, zero)
        out[plane] = _root(total * factor, power)


# A running maximum is a chain of dependent selects.  Plane maxima keep
# MAX_LANES independent ones (lane j folds elements j, j + MAX_LANES, ...): the
# lane loop vectorises, and merging the lanes afterwards gives exactly the
# sequential fold's answer (see _merge_lanes).
MAX_LANES = 16


@njit(inline="always")
def _merge_lanes(best, best_at, lowest):
    """The sequential fold's (value, index) from per-lane folds: the last NaN if
    any lane saw one, else the maximum at its first index."""
    value, at, nan_value, nan_at = lowest, -1, lowest, -1
    for j in range(best.size):
        if best[j] != best[j]:
            if best_at[j] > nan_at:
                nan_value, nan_at = best[j], best_at[j]
        elif best_at[j] >= 0 and (best[j] > value or (best[j] == value and
                                                      (at < 0 or best_at[j] < at))):
            value, at = best[j], best_at[j]
    return (nan_value, nan_at) if nan_at >= 0 else (value, at)


@parallel_kernel
def plane_max(part, parts, x, out, indices, lowest):
    """Plane maxima and their positions (maxima alone: :func:`plane_max_values`)."""
    planes, size = x.shape
    full = size - size % MAX_LANES
    for plane in range(*share(planes, part, parts)):
        values = x[plane]
        best = scratch(MAX_LANES, x.dtype)
        # -1: the lane has seen nothing above lowest yet (a plane of lowest
        # values answers index 0, as the sequential fold does).
        best_at = scratch(MAX_LANES, np.int64)
        for j in range(MAX_LANES):
            best[j], best_at[j] = lowest, -1
        for i in range(0, full, MAX_LANES):
            block = values[i:i + MAX_LANES]
            # Selects, not branches: conditional stores would not vectorise.
            for j in range(MAX_LANES):
                value, kept = block[j], best[j]
                take = (value > kept) | (value != value)
                best[j] = value if take else kept
                best_at[j] = i + j if take else best_at[j]
        for i in range(full, size):
            j = i - full
            if (values[i] > best[j]) | (values[i] != values[i]):
                best[j], best_at[j] = values[i], i
        value, at = _merge_lanes(best, best_at, lowest)
        out[plane], indices[plane] = value, int_max(at, 0)


# Plane maxima without positions compare integer order keys, not floats: LLVM
# vectorises an integer max reduction (8 float32 keys an instruction) but not a
# NaN-aware float one, which left the plane maxima at half the memory bandwidth.
# A float's key is its bits with the magnitude bits flipped when the sign bit is
# set, so that keys order as the values do (-0 just below +0); NaNs take the top
# key.  Integer and bool data are their own keys (a magnitude mask of 0).


def _as_type_of(value, like):
    """``value`` cast to ``like``'s integer type: numba widens narrow integers in
    arithmetic, and a reduction in int64 lanes runs at half the speed."""


@overload(_as_type_of)
def _as_type_of_impl(value, like):
    kind = like
    return lambda value, like: kind(value)


@njit(inline="always")
def _order_key(bits, magnitude_mask):
    """The order key of a value's ``bits`` (an involution: it also decodes a key)."""
    zero = bits ^ bits
    return _as_type_of(bits ^ (magnitude_mask if bits < zero else zero), bits)


@parallel_kernel
def plane_max_values(part, parts, bits, out_bits, lowest_key, magnitude_mask, inf_bits, nan_key):
    """Plane maxima over ``bits`` (planes, size), the input's bits as same-width
    integers, into ``out_bits``.  ``magnitude_mask``: all bits but the sign for
    floats, 0 for integers; ``inf_bits``: the bits of +inf (floats) or the largest
    integer; ``nan_key``: the key NaNs take; ``lowest_key``: the running maximum's
    start.  Bit for bit the sequential fold's answer (a NaN wins, the last one;
    ties keep the first, so of a zero maximum the first zero's sign)."""
    planes, size = bits.shape
    for plane in range(*share(planes, part, parts)):
        row = bits[plane]
        top = lowest_key
        for i in range(size):
            value = row[i]
            key = _order_key(value, magnitude_mask)
            key = nan_key if _as_type_of(value & magnitude_mask, value) > inf_bits else key
            top = key if key > top else top
        result = _order_key(top, magnitude_mask)
        if magnitude_mask != 0 and top == nan_key:
            for i in range(size - 1, -1, -1):  # the last NaN, as the fold keeps it
                if _as_type_of(row[i] & magnitude_mask, row[i]) > inf_bits:
                    result = row[i]
                    break
        elif magnitude_mask != 0 and _as_type_of(result & magnitude_mask, result) == 0:
            for i in range(size):  # the first zero, of either sign
                if _as_type_of(row[i] & magnitude_mask, row[i]) == 0:
                    result = row[i]
                    break
        out_bits[plane] = result


@parallel_kernel
def plane_broadcast(part, parts, grad_out, grad_in, factor):
    """Backward of a whole-plane average: every element gets its plane's share."""
    planes, size = grad_in.shape
    for plane in range(*share(planes, part, parts)):
        value = grad_out[plane] * factor
        target = grad_in[plane]
        for i in range(size):
            target[i] = value


# --------------------------------------------------------------------------
# Max unpooling: out[plane, indices[plane, q]] = x[plane, q], zero elsewhere.  Each
# task owns whole planes and writes them in scan order, so among duplicate indices
# the last input wins at any thread count; the backward is the matching gather.
# --------------------------------------------------------------------------


@parallel_kernel(counts=True)
def unpool_channels_first(part, parts, x, indices, out):
    """Scatter ``x`` (planes, inputs) into the zeroed ``out`` (planes, size); returns
    how many indices were outside the plane (and skipped)."""
    planes, inputs = x.shape
    size = out.shape[1]
    outside = 0
    for plane in range(*share(planes, part, parts)):
        out[plane, :] = 0
        for q in range(inputs):
            at = indices[plane, q]
            if 0 <= at < size:
                out[plane, at] = x[plane, q]
            else:
                outside += 1
    return outside


@parallel_kernel(counts=True)
def unpool_channels_last(part, parts, x, indices, out):
    """As :func:`unpool_channels_first` over (batch, inputs, C) and (batch, size, C).

    An image's output is zeroed by a loop over its flat elements, where numba's
    ``out[n, :, :] = 0`` ran a loop nest over the 3-D view (16x64x56x56 float32 to
    112x112, 2x2 indices, two threads: the kernel 3.36 ms, 3.04 with the flat
    loop)."""
    batch, inputs, channels = x.shape
    size = out.shape[1]
    outside = 0
    for n in range(*share(batch, part, parts)):
        image = out[n]
        _zero_flat(image)
        for q in range(inputs):
            for c in range(channels):
                at = indices[n, q, c]
                if 0 <= at < size:
                    image[at, c] = x[n, q, c]
                else:
                    outside += 1
    return outside


@njit(inline="always")
def _zero_flat(array):
    """Zero a C-contiguous ``array``, a loop over its elements in memory order."""
    flat = reshaped(array, array.size)
    for i in range(flat.size):
        flat[i] = 0


@njit(inline="always")
def _gather_run(source, at_row, target, first, stop):
    """``target[q] = source[at_row[q]]`` for ``q`` from ``first`` until ``stop`` or the
    first index outside ``source``; returns where it stopped.

    A loop with an early exit, which LLVM leaves scalar: vectorised (with the
    kernels' arrays ``noalias``) it became AVX-512 gathers, which took twice as long
    as scalar loads (max_unpool2d's backward, 16x64x112x112 float32, one thread of
    the Zen 5 benchmark machine: 5.1 against 2.5 ms)."""
    size = np.uint64(source.shape[0])
    q = first
    while q < stop:
        at = np.uint64(at_row[q])  # 0 <= at < size in one comparison, no wraparound
        if at >= size:
            break
        target[q] = source[at]
        q += 1
    return q


@parallel_kernel(counts=True)
def unpool_backward_channels_first(part, parts, grad_out, indices, grad_in):
    """``grad_in[p, q] = grad_out[p, indices[p, q]]`` over (planes, inputs) and
    (planes, size); returns how many indices were outside the plane (gradient 0)."""
    planes, inputs = grad_in.shape
    outside = 0
    for plane in range(*share(planes, part, parts)):
        source, at_row, target = grad_out[plane], indices[plane], grad_in[plane]
        q = _gather_run(source, at_row, target, 0, inputs)
        while q < inputs:  # an index outside the plane: gradient 0, and go on
            target[q] = 0
            outside += 1
            q = _gather_run(source, at_row, target, q + 1, inputs)
    return outside


@parallel_kernel(counts=True)
def unpool_backward(part, parts, grad_out, indices, grad_in):
    """``grad_in[n, q, c] = grad_out[n, indices[n, q, c], c]`` (channels-first runs
    with C = 1); returns how many indices were outside the plane (their gradient 0).
    Scalar loads, as :func:`_gather_run`'s (a loop with an early exit)."""
    batch, inputs, channels = grad_in.shape
    size = grad_out.shape[1]
    outside = 0
    for n in range(*share(batch, part, parts)):
        for q in range(inputs):
            c = 0
            while c < channels:
                while c < channels:
                    at = indices[n, q, c]
                    if at < 0 or at >= size:
                        break
                    grad_in[n, q, c] = grad_out[n, at, c]
                    c += 1
                if c < channels:
                    grad_in[n, q, c] = 0
                    outside += 1
                    c += 1
    return outside


# --------------------------------------------------------------------------
# Fractional max pooling: windows of a fixed size whose starts differ per (batch,
# channel) plane, over (batch, D, H, W, C) (channels-first as C = 1).  Since the
# windows differ per plane, both layouts pool plane by plane: channels-first
# planes in place, channels-last ones from a block of channels first transposed
# into a cache-sized scratch (reading the input one contiguous channel run at a
# time), where per-channel window starts would otherwise make every read a gather.
# --------------------------------------------------------------------------


@njit(inline="always")
def _fold_max_at(kept, kept_at, value, at):
    """One step of torch's running maximum with its position: a NaN always wins,
    ties keep the first."""
    take = (value > kept) | (value != value)
    return (value if take else kept), (at if take else kept_at)


# Compiled once per dtype as a plain function (its loops vectorise, which is slow
# to compile), called per plane by both layouts' kernels.
@njit(**HELPER_JIT_OPTIONS)
def _fractional_plane(plane, out, indices, starts, kernel, rows, rows_at, best, best_at):
    """Pool one (D, H, W) ``plane`` into ``out`` and ``indices`` (out_d, out_h,
    out_w) over windows starting at ``starts`` (3, outputs).

    Windows start at irregular W offsets, so a direct loop folds one scalar at a
    time.  Instead: (1) each input row's maxima of the ``kw`` columns starting at
    *every* w (``rows``, positions ``rows_at``, (D*H, W - kw + 1) scratch); (2) per
    output row, those of the window's input rows folded in scan order into
    ``best``/``best_at`` (W - kw + 1 scratch); (3) the output row picked from them
    at its windows' starts.  Steps 1 and 2 are contiguous loops that vectorise.
    Folding row maxima row by row keeps torch's order: the first maximum of the
    earliest row holding it is the first in scan order, and the last NaN of the
    last row holding one is the last NaN."""
    height, width = plane.shape[1], plane.shape[2]
    out_d, out_h, out_w = out.shape
    kd, kh, kw = kernel[0], kernel[1], kernel[2]
    span = width - kw + 1
    for d in range(plane.shape[0]):
        for h in range(height):
            row, at = plane[d, h], (d * height + h) * width
            kept, kept_at = rows[d * height + h], rows_at[d * height + h]
            for w in range(span):
                kept[w], kept_at[w] = row[w], at + w
            for j in range(1, kw):
                shifted = row[j:]
                for w in range(span):
                    kept[w], kept_at[w] = _fold_max_at(kept[w], kept_at[w], shifted[w],
                                                       at + j + w)
    for od in range(out_d):
        d0 = starts[0, od]
        for oh in range(out_h):
            h0 = starts[1, oh]
            first = d0 * height + h0
            # Element by element: see max_pool_channels_first.
            for w in range(span):
                best[w], best_at[w] = rows[first, w], rows_at[first, w]
            for d in range(d0, d0 + kd):
                for h in range(h0, h0 + kh):
                    if d * height + h == first:
                        continue  # already in best
                    kept, kept_at = rows[d * height + h], rows_at[d * height + h]
                    for w in range(span):
                        best[w], best_at[w] = _fold_max_at(best[w], best_at[w], kept[w],
                                                           kept_at[w])
            for ow in range(out_w):
                w0 = starts[2, ow]
                out[od, oh, ow], indices[od, oh, ow] = best[w0], best_at[w0]


@parallel_kernel
def fractional_max_pool_planes(part, parts, x, out, indices, starts, kernel):
    """Channels-first: ``x`` (planes, D, H, W), ``starts`` (planes, 3, outputs)."""
    planes, depth, height, width = x.shape
    span = width - kernel[2] + 1
    for plane in range(*share(planes, part, parts)):
        rows = scratch((depth * height, span), x.dtype)
        rows_at = scratch((depth * height, span), np.int64)
        best, best_at = scratch(span, x.dtype), scratch(span, np.int64)
        _fractional_plane(x[plane], out[plane], indices[plane], starts[plane], kernel,
                          rows, rows_at, best, best_at)


@parallel_kernel
def fractional_max_pool(part, parts, x, out, indices, starts, kernel, channel_block):
    """Channels-last: ``x`` (batch, D, H, W, C), ``starts`` (batch, C, 3, outputs);
    each task pools ``channel_block`` channels of one image."""
    batch, depth, height, width, channels = x.shape
    span = width - kernel[2] + 1
    blocks = (channels + channel_block - 1) // channel_block
    for task in range(*share(batch * blocks, part, parts)):
        n = task // blocks
        c0 = (task - n * blocks) * channel_block
        c1 = int_min(c0 + channel_block, channels)
        planes = scratch((c1 - c0, depth, height, width), x.dtype)
        pixels, flat = reshaped(x[n], (-1, channels)), reshaped(planes, (c1 - c0, -1))
        for at in range(depth * height * width):
            for c in range(c1 - c0):
                flat[c, at] = pixels[at, c0 + c]
        rows = scratch((depth * height, span), x.dtype)
        rows_at = scratch((depth * height, span), np.int64)
        best, best_at = scratch(span, x.dtype), scratch(span, np.int64)
        # Contiguous per-plane results (one specialisation of _fractional_plane for
        # both layouts), then stored across the channels.
        plane_out = scratch(out.shape[1:4], x.dtype)
        plane_at = scratch(out.shape[1:4], np.int64)
        for c in range(c1 - c0):
            _fractional_plane(planes[c], plane_out, plane_at, starts[n, c0 + c], kernel, rows,
                              rows_at, best, best_at)
            for od in range(out.shape[1]):
                for oh in range(out.shape[2]):
                    for ow in range(out.shape[3]):
                        out[n, od, oh, ow, c0 + c] = plane_out[od, oh, ow]
                        indices[n, od, oh, ow, c0 + c] = plane_at[od, oh, ow]
