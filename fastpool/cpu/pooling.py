"""Host drivers of the CPU back end: allocate outputs and launch the kernels.

Inputs arrive canonical (C-contiguous, native byte order, 4-D channels-first
or 5-D channels-last) with a validated :class:`~fastpool._params.WindowTable`.
"""

from __future__ import annotations

import numpy as np

from fastpool._params import WindowTable
from fastpool._threads import get_num_threads
from fastpool.cpu import kernels
from fastpool.cpu.runtime import launch


def _chunks(x: np.ndarray, table: WindowTable) -> int:
    """How many parallel tasks the output rows (batch, od, oh) are split into."""
    return _task_count(x.shape[0] * table.out_shape[0] * table.out_shape[1])


def _task_count(items: int) -> int:
    """Tasks for ``items`` units of work: enough to balance the threads, few enough
    that each one's scratch allocation is amortised."""
    return max(1, min(items, 16 * get_num_threads()))


def _out_shape(x: np.ndarray, table: WindowTable, channels_last: bool) -> tuple:
    return (x.shape[0], *table.out_shape, *x.shape[4:5]) if channels_last else (
        x.shape[0], *table.out_shape)


# Windows of at least this many elements take the separable kernels (a W pass,
# then a D/H pass) when that halves the element reads and their row buffers stay
# under SEPARABLE_MAX_BUFFER bytes.
SEPARABLE_MIN_WINDOW = 9
SEPARABLE_MAX_BUFFER = 64 << 20


def _separable(x: np.ndarray, table: WindowTable, channels_last: bool,
               bytes_per_entry: int) -> int:
    """0 for the direct kernels, else the channel block of the separable ones."""
    if table.max_window_size < SEPARABLE_MIN_WINDOW:
        return 0
    depth, height = x.shape[1:3]
    out_d, out_h, out_w = table.out_shape
    size_d, size_h, size_w = table.window_sizes
    direct = out_d * out_h * out_w * size_d * size_h * size_w
    separable = depth * height * out_w * size_w + out_d * out_h * out_w * size_d * size_h
    if SEPARABLE_MIN_WINDOW > 1 and 2 * separable > direct:
        return 0
    block = _channel_block(x.shape[0], x.shape[4]) if channels_last else 1
    fits = depth * height * table.out_shape[2] * block * bytes_per_entry <= SEPARABLE_MAX_BUFFER
    return block if fits else 0


def max_pool(x: np.ndarray, table: WindowTable, channels_last: bool, lowest,
             with_indices: bool, stream=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Window maxima and, if asked, their flat indices within the spatial plane."""
    shape = _out_shape(x, table, channels_last)
    out = np.empty(shape, x.dtype)
    # None, not an array, compiles the kernels without their position bookkeeping.
    indices = np.empty(shape, np.int64) if with_indices else None
    lowest = x.dtype.type(lowest)
    if not channels_last and table.is_whole_plane(x.shape[1:4]):
        launch(kernels.plane_max, x.reshape(x.shape[0], -1), out.reshape(-1),
               None if indices is None else indices.reshape(-1), lowest)
    elif block := _separable(x, table, channels_last, x.itemsize + 8 * with_indices):
        _launch_separable("max_pool", channels_last, block, (x, out, indices), table, lowest)
    elif channels_last:
        launch(kernels.max_pool_channels_last, x, out, indices, table.start, table.stop,
               table.step, lowest, _chunks(x, table))
    else:
        launch(kernels.max_pool_channels_first, x, out, indices, table.start, table.stop,
               table.step, table.interior, lowest, _chunks(x, table))
    return out, indices


def sum_pool(x: np.ndarray, table: WindowTable, channels_last: bool,
             power: float | None, stream=None) -> np.ndarray:
    """``(scale * sum(x**power) / divisor) ** (1/power)`` over each window; power None
    is the average (its own specialisation, free of pow calls)."""
    out = np.empty(_out_shape(x, table, channels_last), x.dtype)
    lp = None if power is None else float(power)
    zero = accumulator_zero(x.dtype, table, lp)
    if not channels_last and table.is_whole_plane(x.shape[1:4]):
        launch(kernels.plane_sum, x.reshape(x.shape[0], -1), out.reshape(-1),
               table.scale / float(np.prod(table.divisor[:, 0])), lp, zero)
    elif block := _separable(x, table, channels_last, np.dtype(type(zero)).itemsize):
        _launch_separable("sum_pool", channels_last, block, (x, out), table, table.divisor,
                          table.scale, lp, zero)
    else:
        _sum_pool_direct(x, out, table, channels_last, lp, zero)
    return out


def _sum_pool_direct(x, out, table, channels_last, lp, zero, grad=None) -> None:
    """The direct sum kernels: window sums finished as norms, or as the Lp backward's
    coefficients when ``grad`` is given."""
    if channels_last:
        launch(kernels.sum_pool_channels_last, x, out, table.start, table.stop, table.step,
               table.divisor, table.scale, lp, zero, _chunks(x, table), grad)
    else:
        launch(kernels.sum_pool_channels_first, x, out, table.start, table.stop, table.step,
               table.interior, table.divisor, table.scale, lp, zero, _chunks(x, table), grad)


def _launch_separable(name: str, channels_last: bool, block: int, arrays: tuple,
                      table: WindowTable, *arguments) -> None:
    """Run ``name``'s separable kernel on ``arrays`` (input, output and, for max, the
    indices): channels-first ones sweep the interior windows, channels-last ones
    take a channel block."""
    head = (*arrays, table.start, table.stop, table.step)
    if channels_last:
        launch(getattr(kernels, f"{name}_separable_channels_last"), *head, *arguments, block)
    else:
        launch(getattr(kernels, f"{name}_separable_channels_first"), *head, table.interior,
               *arguments)


# Windows up to this many elements sum float32 input in float32, as torch does;
# larger ones (and Lp powers) sum in float64, where rounding would add up.
FLOAT32_SUM_LIMIT = 64


def accumulator_zero(dtype, table: WindowTable, power: float | None = None):
    """The zero of the accumulator type: its type selects the kernel specialisation."""
    if np.dtype(dtype) == np.float32 and power is None and \
            table.max_window_size <= FLOAT32_SUM_LIMIT:
        return np.float32(0)
    return np.float64(0)


def _channel_block(batch: int, channels: int) -> int:
    """Channels per task of a channels-last backward: whole images when there are
    enough of them to keep every thread busy, else channel slices of them."""
    tasks_wanted = 4 * get_num_threads()
    if batch >= tasks_wanted:
        return max(channels, 1)
    slices = -(-tasks_wanted // max(batch, 1))
    return max(16, -(-channels // slices))


# Channels-last max backward gathers (each input row sums the gradients of the
# windows whose maximum it holds) only for windows that do not overlap, and only
# when the batch is too small to give each task whole images: the scatter's
# channel slices are then the slower choice.  Otherwise the scatter wins, by 2x
# for ResNet's overlapping 3x3 stride-2 windows (both paths timed on the
# benchmark's channels-last shapes, one thread, process CPU time).
GATHER_MIN_CHANNELS = 32
GATHER_MAX_COVER = 1
GATHER_MAX_BATCH_PER_THREAD = 3


def max_backward(grad_out: np.ndarray, indices: np.ndarray, input_shape: tuple,
                 channels_last: bool, table: WindowTable | None = None,
                 stream=None) -> tuple[np.ndarray, int]:
    """Gradients to the maxima's positions: (grad_input, indices outside the plane)."""
    batch, spatial = input_shape[0], int(np.prod(input_shape[1:4]))
    tail = input_shape[4:]
    if channels_last and table is not None and tail[0] >= GATHER_MIN_CHANNELS and \
            batch <= GATHER_MAX_BATCH_PER_THREAD * get_num_threads() and \
            table.max_cover(input_shape[1:4]) <= GATHER_MAX_COVER:
        first, last = table.covering_outputs(input_shape[1:4])
        grad_in = np.empty(input_shape, grad_out.dtype)
        matched = launch(kernels.max_backward_gather_channels_last, grad_out, indices, grad_in,
                         first, last, table.start, table.stop, table.step)
        if matched == grad_out.size:
            return grad_in, 0
    grad_in = np.empty((batch, spatial, *tail), grad_out.dtype)  # zeroed by the kernels
    shape = (batch, -1, *tail)
    if channels_last:
        outside = launch(kernels.max_backward_channels_last, grad_out.reshape(shape),
                         indices.reshape(shape), grad_in, _channel_block(batch, tail[0]))
    else:
        outside = launch(kernels.max_backward_channels_first, grad_out.reshape(shape),
                         indices.reshape(shape), grad_in)
    return grad_in.reshape(input_shape), int(outside)


def sum_backward(grad_out: np.ndarray, x: np.ndarray | None, table: WindowTable,
                 channels_last: bool, input_shape: tuple, power: float | None,
                 stream=None) -> np.ndarray:
    """Gradient of :func:`sum_pool` (x is needed for Lp only), as a gather."""
    lp = None if power is None else float(power)
    if not channels_last and lp is None and table.is_whole_plane(input_shape[1:4]):
        grad_in = np.empty(input_shape, grad_out.dtype)
        launch(kernels.plane_broadcast, grad_out.reshape(-1),
               grad_in.reshape(input_shape[0], -1),
               table.scale / float(np.prod(table.divisor[:, 0])))
        return grad_in
    coefficient, scale = grad_out, table.scale
    if lp is not None:
        # d loss / d window mean, with the forward's window sums; the gather then
        # divides by the divisor alone.
        coefficient = np.empty(grad_out.shape, np.float64)
        _sum_pool_direct(x, coefficient, table, channels_last, lp, np.float64(0), grad_out)
        scale = 1.0
    grad_in = np.empty(input_shape, grad_out.dtype)
    first, last = table.covering_outputs(input_shape[1:4])
    arguments = (coefficient, grad_in if x is None else x, grad_in, first, last, table.start,
                 table.stop, table.step, table.divisor, scale, lp)
    if channels_last:
        launch(kernels.sum_backward_channels_last, *arguments,
               np.float64(0) if lp is not None else grad_out.dtype.type(0))
    else:
        zero = accumulator_zero(grad_out.dtype, table, lp)
        slabs = input_shape[0] * input_shape[1]
        launch(kernels.sum_backward_channels_first, *arguments, zero,
               _task_count(slabs))
    return grad_in


def max_unpool(x: np.ndarray, indices: np.ndarray, size: int, channels_last: bool,
               stream=None) -> tuple[np.ndarray, int]:
    """Scatter canonical ``x`` ((planes, inputs), or (batch, inputs, C)) to planes of
    ``size`` elements: (out, indices outside the plane)."""
    out = np.empty((x.shape[0], size, *x.shape[2:]), x.dtype)
    kernel = kernels.unpool_channels_last if channels_last else kernels.unpool_channels_first
    return out, int(launch(kernel, x, indices, out))


def max_unpool_backward(grad_out: np.ndarray, indices: np.ndarray,
                        stream=None) -> tuple[np.ndarray, int]:
    """Gather canonical 3-D ``grad_out`` (batch, size, C) at ``indices`` (batch, inputs,
    C): (grad_input, indices outside the plane)."""
    grad_in = np.empty(indices.shape, grad_out.dtype)
    return grad_in, int(launch(kernels.unpool_backward, grad_out, indices, grad_in))


def fractional_max_pool(x: np.ndarray, starts: np.ndarray, kernel: np.ndarray,
                        out_shape: tuple, lowest, stream=None):
    """Canonical 5-D ``x`` (batch, D, H, W, C) pooled over windows of size ``kernel``
    starting at ``starts`` (batch, C, 3, outputs): (values, flat plane indices)."""
    shape = (x.shape[0], *out_shape, x.shape[4])
    out, indices = np.empty(shape, x.dtype), np.empty(shape, np.int64)
    launch(kernels.fractional_max_pool, x, out, indices, starts, kernel, x.dtype.type(lowest))
    return out, indices
