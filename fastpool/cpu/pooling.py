"""Host drivers of the CPU back end: allocate outputs and launch the kernels.

Inputs arrive canonical (C-contiguous, native byte order, 4-D channels-first
or 5-D channels-last) with a validated :class:`~fastpool._params.WindowTable`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fastpool import _memory as memory
from fastpool._params import WindowTable
from fastpool._threads import get_num_threads
from fastpool.cpu import kernels
from fastpool.cpu.runtime import bind, launch, runs_serially
from fastpool.cpu.tasks import Constant

# Each driver is split in two: ``plan_<op>`` makes every choice that follows from
# the shapes, dtype and window table (the kernel, serial or parallel, and its
# non-array arguments) and returns a runner that only allocates and launches.
# The dispatch layer caches the runners per call signature; ``<op>`` itself plans
# and runs at once.  Runners hold the tuning constants below as they were when
# planned (tests that change them clear fastpool._dispatch.PLANS).


def _runner(run: Callable, serial: bool) -> Callable:
    """``run``, marked with the thread count its launches split the work for
    (``run.threads``; None when they run serially, for any thread count)."""
    run.threads = None if serial else get_num_threads()
    return run


def _chunks(shape: tuple, table: WindowTable, serial: bool = False) -> int:
    """How many tasks the output rows (batch, od, oh) are split into: one for a
    serial launch, which gains nothing from splitting them."""
    return 1 if serial else _task_count(shape[0] * table.out_shape[0] * table.out_shape[1])


def _task_count(items: int) -> int:
    """Tasks for ``items`` units of work: enough to balance the threads, few enough
    that each one's scratch allocation is amortised."""
    return max(1, min(items, 16 * get_num_threads()))


def _out_shape(shape: tuple, table: WindowTable, channels_last: bool) -> tuple:
    return (shape[0], *table.out_shape, *shape[4:5]) if channels_last else (
        shape[0], *table.out_shape)


def _pool_work(out_shape: tuple, table: WindowTable) -> int:
    """About the element reads of a forward pooling call."""
    return math.prod(out_shape) * table.max_window_size


def _forward_serially(work: int, shape: tuple, table: WindowTable,
                      channels_last: bool) -> bool:
    """Whether a forward call runs its kernel serially: for little work, or
    for one channels-last output row (global pooling), which the direct kernels
    cannot split: a parallel launch of one task only costs its wake-up."""
    return runs_serially(work) or (
        channels_last and shape[0] * table.out_shape[0] * table.out_shape[1] == 1)


# Windows of at least this many elements take the separable kernels (a W pass,
# then a D/H pass) when that halves the element reads and their row buffers stay
# under SEPARABLE_MAX_BUFFER bytes.
SEPARABLE_MIN_WINDOW = 9
SEPARABLE_MAX_BUFFER = 64 << 20


def _separable(shape: tuple, table: WindowTable, channels_last: bool,
               bytes_per_entry: int, serial: bool = False) -> int:
    """0 for the direct kernels, else the channel block of the separable ones
    (``shape``: the canonical input's)."""
    if table.max_window_size < SEPARABLE_MIN_WINDOW:
        return 0
    depth, height = shape[1:3]
    out_d, out_h, out_w = table.out_shape
    size_d, size_h, size_w = table.window_sizes
    direct = out_d * out_h * out_w * size_d * size_h * size_w
    separable = depth * height * out_w * size_w + out_d * out_h * out_w * size_d * size_h
    if SEPARABLE_MIN_WINDOW > 1 and 2 * separable > direct:
        return 0
    block = _channel_block(shape[0], shape[4], serial) if channels_last else 1
    fits = depth * height * table.out_shape[2] * block * bytes_per_entry <= SEPARABLE_MAX_BUFFER
    return block if fits else 0


# The interior patterns kernels._fold_interior sweeps in vector lanes, as
# (step, stride, kernel); stride 1 is swept offset by offset at any kernel.
_VECTOR_SWEEPS = ((1, 2, 2), (1, 2, 3), (1, 3, 3), (1, 4, 4))
# Output rows narrower than this gain little from a vectorised interior sweep.
ROWS_FIRST_MAX_OUT_W = 16


def _rows_first(table: WindowTable, any_order: bool) -> bool:
    """Whether a channels-first forward without positions takes the rows-first
    kernels: windows whose W pattern no vector sweep covers (adaptive tables, wide
    strides), or, where the fold's order cannot change the result (``any_order``:
    maxima), windows of several rows in output rows too narrow to profit from one.
    Sums decide on the window parameters alone, so that every call with the same
    parameters sums in the same order: a window of one row sums as the direct
    kernels do, and fastpool.dask's blocks equal the in-memory result bit for bit.
    (The Lp backward's coefficients always sum rows first, see
    :func:`_sum_pool_direct_call`: in the forward's order or not, to rounding.)"""
    _, _, stride, _, kernel = (int(v) for v in table.interior[2])
    swept = kernel > 0 and (stride == 1 or (int(table.step[2]), stride, kernel) in
                            _VECTOR_SWEEPS)
    if not any_order:
        return not swept
    size_d, size_h, _ = table.window_sizes
    return size_d * size_h > 1 and (not swept or table.out_shape[2] < ROWS_FIRST_MAX_OUT_W)


# Whole-plane sums and maxima (without positions) read several elements a
# nanosecond in vector lanes, not the one runtime.SERIAL_WORK_LIMIT counts on:
# their work weighs this many times less, so that a batch-1 head (1280 planes of
# 7x7, 8 us on one thread) runs serially, without a thread wake-up that costs
# more than its reads.
PLANE_READS_PER_WORK = 4


def _without_indices(launcher: Callable) -> Callable:
    """``launcher`` of a kernel that takes no indices, called as those that do."""
    def launch_values(x, out, indices):
        return launcher(x, out)

    return launch_values


def max_pool(x: np.ndarray, table: WindowTable, channels_last: bool, lowest,
             with_indices: bool, stream=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Window maxima and, if asked, their flat indices within the spatial plane."""
    return plan_max_pool(x.shape, x.dtype, table, channels_last, lowest, with_indices)(x)


def plan_max_pool(shape: tuple, dtype: np.dtype, table: WindowTable, channels_last: bool,
                  lowest, with_indices: bool) -> Callable:
    """:func:`max_pool` planned for canonical input of ``shape`` and ``dtype``: a
    function of that input (and an ignored stream) returning (out, indices)."""
    dtype = np.dtype(dtype)
    out_shape = _out_shape(shape, table, channels_last)
    work = _pool_work(out_shape, table)
    serial = _forward_serially(work, shape, table, channels_last)
    lowest = dtype.type(lowest)
    flat_input = None  # the whole-plane kernel reads (planes, plane size)
    key_type = None  # the whole-plane kernel without positions reads the input's bits
    if not channels_last and table.is_whole_plane(shape[1:4]):
        flat_input = (shape[0], -1)
        if with_indices:
            launcher = bind(kernels.plane_max, lowest, work=work, serial=serial)
        else:
            key_type, *constants = _order_key_constants(dtype, lowest)
            work = work // PLANE_READS_PER_WORK
            serial = runs_serially(work)
            launcher = _without_indices(bind(kernels.plane_max_values, *constants,
                                             work=work, serial=serial))
    elif not channels_last and not with_indices and (
            block := _forward_plane_block(shape, table, dtype.itemsize, serial)):
        launcher = _on_planes(bind(kernels.max_pool_plane_blocks, table.start, table.stop,
                                   table.step, lowest, block, tuple(shape[1:4]),
                                   tuple(table.out_shape), work=work, serial=serial), shape[0])
    elif not channels_last and not with_indices and _rows_first(table, True):
        launcher = bind(kernels.max_pool_rows_first_channels_first, table.start, table.stop,
                        table.step, lowest, _chunks(shape, table, serial), work=work,
                        serial=serial)
        launcher = _without_indices(launcher)
    elif block := _separable(shape, table, channels_last, dtype.itemsize + 8 * with_indices,
                             serial):
        if channels_last and not with_indices:
            launcher = _bind_separable_rows(shape, table, lowest, serial, work)
        else:
            launcher = _bind_separable("max_pool", channels_last, block, table, (lowest,),
                                       work, serial, with_indices)
    elif channels_last:
        launcher = bind(max_pool_channels_last(table, with_indices), table.start,
                        table.stop, table.step, lowest, _chunks(shape, table, serial),
                        work=work, serial=serial)
    else:
        launcher = bind(max_pool_channels_first(table), table.start,
                        table.stop, table.step, table.interior, lowest,
                        _chunks(shape, table, serial), work=work, serial=serial)

    def run_max_pool(x: np.ndarray, stream=None):
        out = memory.empty(out_shape, dtype)
        # None, not an array, compiles the kernels without their position bookkeeping.
        indices = memory.empty(out_shape, np.int64) if with_indices else None
        if flat_input is None:
            launcher(x, out, indices)
        elif key_type is not None:
            launcher(x.reshape(flat_input).view(key_type), out.reshape(-1).view(key_type),
                     None)
        else:
            launcher(x.reshape(flat_input), out.reshape(-1),
                     None if indices is None else indices.reshape(-1))
        return out, indices

    return _runner(run_max_pool, serial)


def _order_key_constants(dtype: np.dtype, lowest) -> tuple:
    """The integer type whose view of ``dtype`` kernels.plane_max_values reads, and
    its constants after the arrays: the key of ``lowest``, the magnitude mask, the
    bits of +inf (or the largest integer) and the key NaNs take."""
    if dtype.kind == "b":
        key_type = np.dtype(np.uint8)
    elif dtype.kind == "f":
        key_type = np.dtype(f"i{dtype.itemsize}")
    else:
        key_type = dtype
    top = key_type.type(np.iinfo(key_type).max)
    if dtype.kind != "f":
        return (key_type, np.asarray(lowest, dtype).view(key_type)[()], key_type.type(0),
                top, top)
    magnitude = key_type.type(top)  # all bits but the sign
    lowest_bits = np.asarray(lowest, dtype).view(key_type)[()]
    lowest_key = lowest_bits ^ magnitude if lowest_bits < 0 else lowest_bits
    inf_bits = np.asarray(np.inf, dtype).view(key_type)[()]
    return key_type, key_type.type(lowest_key), magnitude, inf_bits, top


def _sweep(table: WindowTable, max_fold: bool) -> tuple[int, int]:
    """The interior sweep the channels-first kernels are built for (for maxima or
    sums) over ``table``'s windows."""
    return kernels.interior_sweep(table.interior[2], int(table.step[2]), max_fold)


def max_pool_channels_first(table: WindowTable):
    """The channels-first direct max kernel for ``table`` (its interior swept with
    the positions kept too, when asked for: see kernels._max_interior_at)."""
    return kernels.max_pool_channels_first(_sweep(table, True))


def _register_window(table: WindowTable) -> tuple[int, int]:
    return kernels.register_window(table.window_sizes)


def max_pool_channels_last(table: WindowTable, with_indices: bool):
    """The channels-last direct max kernel for ``table``'s register window: kept
    positions fold input row by input row, so those builds have none."""
    return kernels.max_pool_channels_last(
        kernels.NO_REGISTER_WINDOW if with_indices else _register_window(table))


def sum_pool(x: np.ndarray, table: WindowTable, channels_last: bool,
             power: float | None, stream=None) -> np.ndarray:
    """``(scale * sum(x**power) / divisor) ** (1/power)`` over each window; power None
    is the average (its own specialisation, free of pow calls)."""
    return plan_sum_pool(x.shape, x.dtype, table, channels_last, power)(x)


def plan_sum_pool(shape: tuple, dtype: np.dtype, table: WindowTable, channels_last: bool,
                  power: float | None) -> Callable:
    """:func:`sum_pool` planned for canonical input of ``shape`` and ``dtype``: a
    function of that input (and an ignored stream) returning the output."""
    dtype = np.dtype(dtype)
    out_shape = _out_shape(shape, table, channels_last)
    work = _pool_work(out_shape, table)
    serial = _forward_serially(work, shape, table, channels_last)
    lp = _kernel_power(power)
    zero = accumulator_zero(dtype, table, lp)
    flat_input = None
    if not channels_last and table.is_whole_plane(shape[1:4]):
        flat_input = (shape[0], -1)
        # Float32 averages sum each block of kernels.PLANE_SUM_BLOCK elements in
        # float32 and the blocks in float64, whatever the plane's size.
        block_zero = np.float32(0) if dtype == np.float32 and lp is None else zero
        if lp is None:
            work = work // PLANE_READS_PER_WORK
            serial = runs_serially(work)
        launcher = bind(kernels.plane_sum, table.scale / float(np.prod(table.divisor[:, 0])),
                        lp, block_zero, work=work, serial=serial)
    elif block := _separable(shape, table, channels_last, np.dtype(type(zero)).itemsize,
                             serial):
        launcher = _bind_separable("sum_pool", channels_last, block, table,
                                   (table.divisor, table.scale, lp, zero), work,
                                   serial)
    elif not channels_last and (block := _forward_plane_block(shape, table, dtype.itemsize,
                                                              serial, sums=True)):
        # The row kernel's order: rows first, or its interior sweep's outputs.
        rows_first = _rows_first(table, False)
        swept = (0, 0)
        if not rows_first and _sweep(table, False)[0] >= 0:
            swept = (int(table.interior[2, 0]), int(table.interior[2, 1]))
        kernel = kernels.sum_pool_plane_blocks((rows_first, swept[1] > swept[0]))
        launcher = _on_planes(bind(kernel, table.start, table.stop, table.step,
                                   table.divisor, table.scale, lp, zero, block,
                                   tuple(shape[1:4]), tuple(table.out_shape), *swept,
                                   work=work, serial=serial), shape[0])
    else:
        launcher = bind(*_sum_pool_direct_call(shape, table, channels_last, lp, zero, serial),
                        None, work=work, serial=serial)

    def run_sum_pool(x: np.ndarray, stream=None):
        out = memory.empty(out_shape, dtype)
        if flat_input is None:
            launcher(x, out)
        else:
            launcher(x.reshape(flat_input), out.reshape(-1))
        return out

    return _runner(run_sum_pool, serial)


def _sum_pool_direct_call(shape, table, channels_last, lp, zero, serial=False,
                          grad_rows_first=False) -> tuple:
    """The direct sum kernel (rows first for channels-first windows no sweep covers)
    and its arguments after (x, out), up to the optional ``grad`` (given, the window
    sums are finished as the Lp backward's coefficients).

    ``grad_rows_first``: rows first for the channels-first Lp backward's coefficients
    whatever the windows.  That kernel has no interior sweep to compile: the cold
    first call of lp_pool2d_backward took 1.8 s where it took 2.25 s, and the
    backward's time did not move (32x64x56x56, 2x2: 4.96 against 4.94 ms, two
    threads)."""
    if channels_last:
        return (kernels.sum_pool_channels_last(_register_window(table)), table.start,
                table.stop, table.step, table.divisor, table.scale, lp, zero,
                _chunks(shape, table, serial))
    if grad_rows_first or _rows_first(table, False):
        return (kernels.sum_pool_rows_first_channels_first, table.start, table.stop,
                table.step, table.divisor, table.scale, lp, zero,
                _chunks(shape, table, serial))
    return (kernels.sum_pool_channels_first(_sweep(table, False)), table.start, table.stop,
            table.step, table.interior, table.divisor, table.scale, lp, zero,
            _chunks(shape, table, serial))


def _sum_pool_direct(x, out, table, channels_last, lp, zero, grad=None, work=None) -> None:
    """The direct sum kernels: window sums finished as norms, or as the Lp backward's
    coefficients when ``grad`` is given."""
    serial = work is not None and runs_serially(work)
    kernel, *arguments = _sum_pool_direct_call(x.shape, table, channels_last, lp, zero,
                                               serial, grad_rows_first=grad is not None)
    launch(kernel, x, out, *arguments, grad, work=work)


def _separable_arguments(name: str, channels_last: bool, block: int, table: WindowTable,
                         arguments: tuple, with_indices: bool = False) -> tuple:
    """``name``'s separable kernel and its arguments after the arrays (input, output
    and, for max, the indices): channels-first ones sweep the interior windows
    (unless they keep the maxima's positions), channels-last ones take a channel
    block."""
    head = (table.start, table.stop, table.step)
    if channels_last:
        return (getattr(kernels, f"{name}_separable_channels_last"), *head, *arguments,
                block)
    sweep = kernels.NO_SWEEP if with_indices else _sweep(table, name == "max_pool")
    return (getattr(kernels, f"{name}_separable_channels_first")(sweep), *head,
            table.interior, *arguments)


def _bind_separable(name, channels_last, block, table, arguments, work, serial,
                    with_indices=False):
    kernel, *tail = _separable_arguments(name, channels_last, block, table, arguments,
                                         with_indices)
    return bind(kernel, *tail, work=work, serial=serial)


def _bind_separable_rows(shape: tuple, table: WindowTable, lowest, serial: bool,
                         work: int) -> Callable:
    """The channels-last separable max kernel without positions, split over rows
    (not channel blocks): a W pass over the input rows into a scratch of W-pass
    maxima, then a fold of those into the output rows; launched as the kernels
    that take indices."""
    rows = max(shape[0] * shape[1] * shape[2], shape[0] * table.out_shape[0] *
               table.out_shape[1])
    chunks = 1 if serial else _task_count(rows)
    w_pass = bind(kernels.max_pool_w_pass_channels_last(
        kernels.register_window((1, 1, table.window_sizes[2]))), table.start, table.stop,
        table.step, lowest, chunks, work=work, serial=serial)
    fold = bind(kernels.max_fold_rows_channels_last, table.start, table.stop, table.step,
                lowest, chunks, work=work, serial=serial)
    out_w = table.out_shape[2]

    def launch_passes(x, out, indices):
        maxima = np.empty(x.shape[:3] + (out_w, x.shape[4]), x.dtype)
        w_pass(x, maxima)
        fold(maxima, out)

    return launch_passes


def _launch_separable(name: str, channels_last: bool, block: int, arrays: tuple,
                      table: WindowTable, *arguments) -> None:
    """Run ``name``'s separable kernel on ``arrays`` (in parallel)."""
    kernel, *tail = _separable_arguments(name, channels_last, block, table, arguments)
    launch(kernel, *arrays, *tail)


# Windows up to this many elements sum float32 input in float32, as torch does;
# larger ones (and Lp powers) sum in float64, where rounding would add up.
FLOAT32_SUM_LIMIT = 64


def _kernel_power(power: float | None):
    """``power`` as the kernels take it: None (averages), a :class:`Constant` 2 (L2
    norms, the usual Lp pooling: a build of their own), else a float."""
    if power is None:
        return None
    return SQUARE if power == 2 else float(power)


SQUARE = Constant(2)


def accumulator_zero(dtype, table: WindowTable, power: float | None = None):
    """The zero of the accumulator type: its type selects the kernel specialisation."""
    if np.dtype(dtype) == np.float32 and power is None and \
            table.max_window_size <= FLOAT32_SUM_LIMIT:
        return np.float32(0)
    return np.float64(0)


def _channel_block(batch: int, channels: int, serial: bool = False) -> int:
    """Channels per task of a channels-last separable kernel: whole images when
    there are enough of them to keep every thread busy (or for a serial launch),
    else as few channel slices of each as give every thread the same number of
    tasks, in whole vectors (multiples of 16).

    A task's fixed costs (its row buffers, a view per window element) weigh on
    narrow slices: with four tasks a thread, 16-channel slices, the 7x7 stride-1
    average of a 2x64x28x28 batch ran at 1.25x torch, with one 64-channel task a
    thread at 2.9x (1x256x20x20 5x5: 0.72x -> 1.1x; 3x128x28x28 7x7: 1.3-1.5x ->
    2.4x; two threads)."""
    threads = get_num_threads()
    if serial or batch >= 4 * threads:
        return max(channels, 1)
    slices = threads // math.gcd(max(batch, 1), threads)
    per_slice = -(-channels // slices)
    return min(max(channels, 1), max(16, -(-per_slice // 16) * 16))


# Channels-last max backward gathers (each input row sums the gradients of the
# windows whose maximum it holds) only for single-element windows that do not
# overlap (FPN's max_pool2d(1, 2)), and only for batches too small to give each
# task whole images: the gather then skips the positions no window reads, which
# the scatter zeroes and re-reads (1.4x faster).  Windows of several elements make
# it compare each output's index once per element of the window: the scatter,
# one add per output, was 1.7x faster for 2x2 stride-2 windows and 2x for ResNet's
# overlapping 3x3 stride-2 ones (both paths timed on the benchmark's
# channels-last shapes, one thread, process CPU time).
GATHER_MIN_CHANNELS = 32
GATHER_MAX_COVER = 1
GATHER_MAX_WINDOW = 1
GATHER_MAX_BATCH_PER_THREAD = 3


def _position_bands(count: int, in_spatial: tuple, outputs: int,
                    table: WindowTable | None) -> np.ndarray:
    """The channels-last max backward's bands of an image, ``(count, 4)`` rows of
    positions ``[lo, hi)`` and outputs ``[first, last)`` to scan.  With the window
    ``table`` the bands are runs of whole planes (or rows, for 2-D input) of the
    outermost axis longer than one, each scanning only the outputs whose windows
    reach it: a band otherwise read every gradient and index of the image, so two
    bands of a batch-1 ResNet stem took as long as one (one band: all of it).
    ``outputs``: the outputs per image."""
    size = math.prod(in_spatial)
    axes = [axis for axis in range(2) if in_spatial[axis] > 1]
    if count == 1 or table is None or not axes:
        return np.array([[b * size // count, (b + 1) * size // count, 0, outputs]
                         for b in range(count)], np.int64)
    axis = axes[0]
    length, inner = in_spatial[axis], math.prod(in_spatial[axis + 1:])
    out_inner = math.prod(table.out_shape[axis + 1:])
    first, last = table.covering_outputs(in_spatial)
    bands = []
    for b in range(count):
        a_lo, a_hi = b * length // count, (b + 1) * length // count
        q_lo = int(first[axis, a_lo]) * out_inner if a_hi > a_lo else 0
        q_hi = int(last[axis, a_hi - 1]) * out_inner if a_hi > a_lo else 0
        bands.append([a_lo * inner, a_hi * inner, q_lo, max(q_hi, q_lo)])
    return np.array(bands, np.int64)


def max_backward(grad_out: np.ndarray, indices: np.ndarray, input_shape: tuple,
                 channels_last: bool, table: WindowTable | None = None,
                 stream=None) -> tuple[np.ndarray, int]:
    """Gradients to the maxima's positions: (grad_input, indices outside the plane)."""
    return plan_max_backward(grad_out.shape, grad_out.dtype, input_shape, channels_last,
                             table)(grad_out, indices)


def plan_max_backward(out_shape: tuple, dtype: np.dtype, input_shape: tuple,
                      channels_last: bool, table: WindowTable | None = None) -> Callable:
    """:func:`max_backward` planned for canonical gradients of ``out_shape`` and
    ``dtype``: a function of (grad_out, indices[, stream])."""
    dtype = np.dtype(dtype)
    batch, spatial = input_shape[0], math.prod(input_shape[1:4])
    tail = input_shape[4:]
    work = math.prod(out_shape) + math.prod(input_shape)
    gather = None
    if channels_last and table is not None and tail[0] >= GATHER_MIN_CHANNELS and \
            batch <= GATHER_MAX_BATCH_PER_THREAD * get_num_threads() and \
            table.max_window_size <= GATHER_MAX_WINDOW and \
            table.max_cover(input_shape[1:4]) <= GATHER_MAX_COVER:
        first, last = table.covering_outputs(input_shape[1:4])
        gather = bind(kernels.max_backward_gather_channels_last, first, last, table.start,
                      table.stop, table.step, work=work)
    rows = (batch, -1, *tail)
    if channels_last:
        # Bands of positions only where there are fewer images than threads.
        count = 1 if runs_serially(work) else -(-get_num_threads() // max(batch, 1))
        outputs = math.prod(out_shape[1:4])
        every_output = _position_bands(count, input_shape[1:4], outputs, None)
        bands = _position_bands(count, input_shape[1:4], outputs, table)
        scans_all = np.array_equal(bands, every_output)
        scatter = bind(kernels.max_backward_channels_last, bands, scans_all, work=work)
        scatter_all = bind(kernels.max_backward_channels_last, every_output, True, work=work)
    else:
        scatter, scans_all = bind(kernels.max_backward_channels_first, work=work), True

    def run_max_backward(grad_out: np.ndarray, indices: np.ndarray, stream=None):
        if gather is not None:
            grad_in = memory.empty(input_shape, dtype)
            if gather(grad_out, indices, grad_in) == grad_out.size:
                return grad_in, 0
            # Some maximum lies outside its window (indices not from this forward):
            # the scatter takes any in-plane index and counts the others.
        # Zeroed by the kernels; channels-last scatters into flat images.
        grad_in = memory.empty((batch, spatial * math.prod(tail)), dtype)
        arrays = grad_out.reshape(rows), indices.reshape(rows), grad_in
        outside = scatter(*arrays)
        if not scans_all:  # it counted the entries taken: all of them, or rescan
            # A maximum outside its window's reach (indices not from this forward):
            # every band scans every output, and counts those outside the plane.
            outside = 0 if outside == grad_out.size else scatter_all(*arrays)
        return grad_in.reshape(input_shape), int(outside)

    return _runner(run_max_backward, runs_serially(work))


# Channels-first sum backward over planes of up to PLANE_BLOCK_MAX_BYTES of sums
# (in the accumulator's type) gathers PLANE_BLOCK planes at a time transposed into
# vector lanes, the block's scratch staying in L1/L2; larger planes' rows are long
# enough to vectorise in place (one thread, process CPU time: 14x14 planes 2.3x
# faster in blocks, 56x56 ones 1.2x slower).
PLANE_BLOCK_MAX_BYTES = 4096
PLANE_BLOCK = 32
PLANE_BLOCK_MIN = 8


# Channels-first forwards (values only) whose output rows are at most
# PLANE_BLOCK_FORWARD_MAX_OUT_W wide run a block of planes at a time in vector lanes
# (kernels.sum_pool_plane_blocks, max_pool_plane_blocks), where the block's input
# fits in PLANE_BLOCK_FORWARD_MAX_BYTES (L2).  Row by row, a row of a few outputs cost
# more in loop overhead than its reads (32x512x14x14 float32, 2x2 average, two
# threads: 2.7 ms row by row, torch 2.2).
PLANE_BLOCK_FORWARD_MAX_OUT_W = 8
PLANE_BLOCK_FORWARD_MAX_BYTES = 1 << 18
PLANE_BLOCK_FORWARD = 64


def _forward_plane_block(shape: tuple, table: WindowTable, itemsize: int, serial: bool,
                         sums: bool = False) -> int:
    """0 for the row by row channels-first forward kernels, else the planes per task of
    the plane-block ones (``shape``: the canonical input's).  Sums take no windows
    of :data:`kernels.LONG_ROW` or more along W, whose sums the row kernels
    reassociate."""
    out_w = table.out_shape[2]
    if out_w > PLANE_BLOCK_FORWARD_MAX_OUT_W:
        return 0
    if sums and int(table.step[2]) == 1 and \
            int((table.stop[2, :out_w] - table.start[2, :out_w]).max()) >= kernels.LONG_ROW:
        return 0
    planes, threads = shape[0], get_num_threads()
    block = PLANE_BLOCK_FORWARD if serial else max(
        PLANE_BLOCK_MIN, min(PLANE_BLOCK_FORWARD, -(-planes // (4 * threads))))
    block = min(block, -(-planes // PLANE_BLOCK_MIN) * PLANE_BLOCK_MIN)  # no idle blocks
    if math.prod(shape[1:4]) * block * itemsize > PLANE_BLOCK_FORWARD_MAX_BYTES:
        return 0
    if not serial and -(-planes // block) < threads:
        return 0  # too few planes to share: the row kernels split their rows
    return block


def _on_planes(launcher: Callable, planes: int) -> Callable:
    """``launcher`` of a plane-block kernel, which takes ``(planes, size)`` arrays,
    called with the canonical input and output (and indices, None)."""
    def launch_planes(x, out, indices=None):
        return launcher(x.reshape(planes, -1), out.reshape(planes, -1))

    return launch_planes


def _plane_block(input_shape: tuple, zero, serial: bool) -> int:
    """0 for the row by row channels-first sum backward, else the planes per task of
    :func:`kernels.sum_backward_plane_blocks` (fewer than PLANE_BLOCK where that
    leaves too few tasks for the threads; each plane's sums are the same bits in
    any block)."""
    if math.prod(input_shape[1:4]) * np.dtype(type(zero)).itemsize > PLANE_BLOCK_MAX_BYTES:
        return 0
    planes = input_shape[0]
    if serial:
        return PLANE_BLOCK
    return max(PLANE_BLOCK_MIN, min(PLANE_BLOCK, -(-planes // (4 * get_num_threads()))))


def _window_weights(table: WindowTable, scale: float, zero) -> np.ndarray:
    """Each window's ``scale / divisor`` (od, oh, ow), in the accumulator's type: the
    gathers' weights, divided once per call instead of once per term."""
    out_d, out_h, out_w = table.out_shape
    divisor = table.divisor
    # (d * h) * w, as the kernels multiplied them.
    window = (divisor[0, :out_d, None] * divisor[1, None, :out_h])[..., None] * \
        divisor[2, None, None, :out_w]
    return (scale / window).astype(type(zero))


def sum_backward(grad_out: np.ndarray, x: np.ndarray | None, table: WindowTable,
                 channels_last: bool, input_shape: tuple, power: float | None,
                 stream=None) -> np.ndarray:
    """Gradient of :func:`sum_pool` (x is needed for Lp only), as a gather."""
    return plan_sum_backward(grad_out.shape, grad_out.dtype, table, channels_last,
                             input_shape, power)(grad_out, x)


def plan_sum_backward(out_shape: tuple, dtype: np.dtype, table: WindowTable,
                      channels_last: bool, input_shape: tuple,
                      power: float | None) -> Callable:
    """:func:`sum_backward` planned for canonical gradients of ``out_shape`` and
    ``dtype``: a function of (grad_out, x[, stream])."""
    dtype = np.dtype(dtype)
    lp = _kernel_power(power)
    work = math.prod(out_shape) * table.max_window_size + math.prod(input_shape)
    if not channels_last and lp is None and table.is_whole_plane(input_shape[1:4]):
        planes = (input_shape[0], -1)
        broadcast = bind(kernels.plane_broadcast,
                         table.scale / float(np.prod(table.divisor[:, 0])), work=work)

        def run_plane_broadcast(grad_out: np.ndarray, x=None, stream=None):
            grad_in = memory.empty(input_shape, dtype)
            broadcast(grad_out.reshape(-1), grad_in.reshape(planes))
            return grad_in

        return _runner(run_plane_broadcast, runs_serially(work))
    serial = runs_serially(work)
    first, last = table.covering_outputs(input_shape[1:4])
    scale = table.scale if lp is None else 1.0
    head = (first, last, table.start, table.stop, table.step)
    if channels_last:
        zero = np.float64(0) if lp is not None else dtype.type(0)
        gather = bind(kernels.sum_backward_channels_last, *head,
                      _window_weights(table, scale, zero), lp, zero, work=work)
    elif block := _plane_block(input_shape, accumulator_zero(dtype, table, lp), serial):
        # float64 weights: the row kernel's (its terms round once, after the product).
        gather_planes = bind(kernels.sum_backward_plane_blocks, *head,
                             _window_weights(table, scale, np.float64(0)), lp,
                             accumulator_zero(dtype, table, lp), block,
                             tuple(input_shape[1:4]), work=work)
        planes = input_shape[0]

        def gather(coefficient, x, grad_in):  # the planes flattened, as the kernel takes them
            gather_planes(coefficient.reshape(planes, -1), x.reshape(planes, -1),
                          grad_in.reshape(planes, -1))
    else:
        gather = bind(kernels.sum_backward_channels_first, *head, table.divisor, scale, lp,
                      accumulator_zero(dtype, table, lp),
                      1 if serial else _task_count(input_shape[0] * input_shape[1]),
                      work=work)

    def run_sum_backward(grad_out: np.ndarray, x: np.ndarray | None, stream=None):
        coefficient = grad_out
        if lp is not None:
            # d loss / d window mean, with the forward's window sums; the gather then
            # divides by the divisor alone.
            coefficient = memory.empty(grad_out.shape, np.float64)
            _sum_pool_direct(x, coefficient, table, channels_last, lp, np.float64(0),
                             grad_out, work)
        grad_in = memory.empty(input_shape, dtype)
        gather(coefficient, grad_in if x is None else x, grad_in)
        return grad_in

    return _runner(run_sum_backward, serial)


def max_unpool(x: np.ndarray, indices: np.ndarray, size: int, channels_last: bool,
               stream=None) -> tuple[np.ndarray, int]:
    """Scatter canonical ``x`` ((planes, inputs), or (batch, inputs, C)) to planes of
    ``size`` elements: (out, indices outside the plane)."""
    out = memory.empty((x.shape[0], size, *x.shape[2:]), x.dtype)
    kernel = kernels.unpool_channels_last if channels_last else kernels.unpool_channels_first
    return out, int(launch(kernel, x, indices, out, work=x.size + out.size))


def max_unpool_backward(grad_out: np.ndarray, indices: np.ndarray,
                        stream=None) -> tuple[np.ndarray, int]:
    """Gather canonical 3-D ``grad_out`` (batch, size, C) at ``indices`` (batch, inputs,
    C): (grad_input, indices outside the plane)."""
    grad_in = memory.empty(indices.shape, grad_out.dtype)
    work = 2 * grad_in.size
    if grad_out.shape[2] == 1 and grad_out.shape[1] > 0:  # channels-first: plain planes
        # Reshaped, not indexed ([..., 0]): numba then knows the planes are contiguous
        # (a view's 'A' layout took the gather twice as long, 4.9 against 2.4 ms).
        planes = [a.reshape(a.shape[:2]) for a in (grad_out, indices, grad_in)]
        return grad_in, int(launch(kernels.unpool_backward_channels_first, *planes,
                                   work=work))
    return grad_in, int(launch(kernels.unpool_backward, grad_out, indices, grad_in,
                               work=work))


# Channels-last fractional pooling transposes up to this many bytes of channel planes
# at a time into each task's scratch: an image's channels all at once where they fit,
# in one pass over its pixels.  With 256 kB, four 16-channel passes over each image of
# a 32x64x56x56 batch ran 10-19 ms (the slower depending on where the input lay in
# memory), with 4 MB one pass 7.9 ms (torch 20-24 ms; two threads).
FRACTIONAL_SCRATCH_BYTES = 4 << 20


def fractional_max_pool(x: np.ndarray, starts: np.ndarray, kernel: np.ndarray,
                        out_shape: tuple, lowest, stream=None):
    """Canonical 5-D ``x`` (batch, D, H, W, C) pooled over windows of size ``kernel``
    starting at ``starts`` (batch, C, 3, outputs): (values, flat plane indices).
    Channels-first input comes as C = 1, one plane per batch row.  ``lowest`` (the
    back-end API's running maximum's start) is not needed: every window holds an
    element, and the kernels start from the first."""
    batch, channels = x.shape[0], x.shape[4]
    shape = (batch, *out_shape, channels)
    out, indices = memory.empty(shape, x.dtype), memory.empty(shape, np.int64)
    work = out.size * int(np.prod(kernel))
    if channels == 1:
        planes = x.shape[:4]
        launch(kernels.fractional_max_pool_planes, x.reshape(planes), out.reshape(shape[:4]),
               indices.reshape(shape[:4]), starts.reshape(batch, *starts.shape[2:]), kernel,
               work=work)
        return out, indices
    plane_bytes = max(1, math.prod(x.shape[1:4]) * x.dtype.itemsize)
    block = FRACTIONAL_SCRATCH_BYTES // plane_bytes
    if not runs_serially(work):
        # Enough tasks for every thread.
        block = min(block, -(-channels // -(-4 * get_num_threads() // batch)))
    # Blocks of whole cache lines of channels where the scratch allows it.
    block = max(1, min(channels, block - block % 16 if block >= 16 else block))
    launch(kernels.fractional_max_pool, x, out, indices, starts, kernel, block,
           work=work)
    return out, indices
