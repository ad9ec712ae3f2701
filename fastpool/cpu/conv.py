"""Strided convolution on the CPU: im2col kernels (Numba) around BLAS GEMMs (NumPy).

A convolution is one matrix product once each output position's receptive field
is copied out as a row of a matrix ("im2col", here the *cols*): for an input
with ``C_in`` channels and a ``KD x KH x KW`` kernel, ``K = KD*KH*KW*C_in``
values per output position.  BLAS then does the arithmetic near the machine's
peak, where direct loops ran at a few percent of it.  With ``M`` output
positions, cols ``(M, K)`` and the weight as a ``(C_out, K)`` matrix ``W``:

=================  ======================================
output             ``cols @ W.T``, ``(M, C_out)``
input gradient     ``col2im(grad @ W)``
weight gradient    ``grad.T @ cols``, summed over chunks
=================  ======================================

The cols are laid out channels-last: a row holds, per kernel offset
``(kd, kh, kw)``, one input pixel's ``C_in`` contiguous channels (and the
``KW`` pixels of one kernel row are adjacent, so one copy), so im2col runs
near memcpy speed.  Channels-last input therefore needs no transpose at all,
its products ``cols @ W.T`` landing in channels-last order; channels-first
input is transposed by a tiled kernel, which costs less than a channels-first
im2col (with stride 2 that gathered every other element and ran at a third of
the copy speed).  Channels-first outputs and gradients need none: the forward's
products are taken per image as ``W @ cols.T``, ``(C_out, positions)``, the
output itself; the backward's from each image's ``(C_out, positions)``
gradient, and col2im writes the input gradient in either layout.
Outputs, transposes and cols come from fastpool's buffer pool (fastpool._memory):
fresh pages of those 12 MB cost the 8x64x56x56 forward a third of its time.

Canonical arrays: input ``(N, C_in, D, H, W)`` or, channels-last,
``(N, D, H, W, C_in)``; weight ``(C_out, C_in, KD, KH, KW)`` in both layouts
(reordered to the cols' ``(C_out, KD, KH, KW, C_in)``, small); 1-D and 2-D run
with size-1 leading spatial axes.  The output positions are
grouped in *units*: one ``(n, od, oh)`` row of ``OW`` outputs.  The scratch is
bounded by :data:`CHUNK_BYTES`: the work runs over chunks of whole images, or,
when one image's cols are larger, over runs of units of one image.  When the
windows tile the input (kernel == stride, no padding), the cols are a reshape
of the channels-last input: no im2col at all where strides can express it.

Threads: a large call is cut into runs of whole images, one per thread, each run
start to finish (transposes, im2col, GEMMs, col2im) in its own thread with serial
kernels and BLAS held to one thread (:meth:`_Geometry.parts`, :func:`_run_parts`).
Alternating numba's parallel kernels with BLAS's own threaded GEMMs left each
pool's threads spinning on the cores the other needed, and 2 threads ran slower
than one.

Sums run in the input's dtype (float32 stays float32 in BLAS, as in torch).
col2im gathers: each input element is summed by one thread in a fixed order,
and the chunks run in a fixed order (the threads' weight gradients are summed in
the order of their images), so results are race-free and repeat bit for bit at a
given thread count (BLAS's own sums depend on its thread count, which follows
fastpool's: see :func:`_blas_threads`).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np
from numba import njit

from fastpool import _memory as memory
from fastpool import _threads
from fastpool.cpu.runtime import launch
from fastpool.cpu.tasks import parallel_kernel, share

# The most bytes of cols one chunk may fill.  Small enough that the cols stay in
# cache between im2col writing them and the GEMM reading them (on the 2-core Zen 3
# benchmark machine, one thread, a 3-D convolution whose cols total 43 MB ran in
# 12-15 ms in 4 MiB chunks, 20-23 ms in one 64 MiB chunk; the 8x64x56x56 2-D case
# 6.4 against 8.3 ms), large enough that each GEMM still has a few thousand rows.
# It also bounds the scratch memory of a big input.  The tests lower it to
# exercise the chunking.
CHUNK_BYTES = 4 * 2**20

# Fewer parallel tasks than this many per thread and the kernels also split the
# last spatial axis, so that a lone long 1-D signal still uses every core.
_TASKS_PER_THREAD = 4


@njit(inline="always")
def _span(offset, stride, pad, first, stop, count):
    """The outputs ``o`` in ``[lo, hi)``, within ``[0, count)``, whose input index
    ``o*stride - pad + offset`` lies in ``[first, stop)``."""
    lo = -((pad - offset + first) // -stride)  # ceil division
    hi = (stop - 1 + pad - offset) // stride + 1
    lo = min(max(lo, 0), count)
    return lo, max(min(hi, count), lo)


@njit(inline="always")
def _source(position, pad, offset, stride, size):
    """The output index whose window puts kernel ``offset`` on input ``position``, or -1."""
    t = position + pad - offset
    if t < 0 or t % stride != 0 or t // stride >= size:
        return -1
    return t // stride


@parallel_kernel
def im2col(part, parts, x, cols, n0, v0, units_per_image, windows, width):
    """im2col of channels-last ``x``: ``cols[(i, v - v0, ow), (kd, kh, kw, c)]``.

    ``x`` comes as ``(N, D, H, W*C_in)``, its input rows flat (``width`` is ``W``).
    Covers images ``n0 + i`` and, in each, units ``v0 .. v0 + units_per_image - 1``
    (a unit ``v`` is the output row ``(od, oh) = divmod(v, OH)``).  Each task fills
    one cols row (one output position).  For each ``(kd, kh)`` its ``KW`` pixels
    are adjacent in the input row, so they go as one contiguous copy of
    ``KW*C_in`` values (zeros where the window is in the padding): far fewer,
    longer copies than one per pixel, which matters when ``C_in`` is small.
    ``windows``: the rows out_size, kernel, stride, pad (see ``_Geometry.windows``).
    """
    out_size, kernel, stride, pad = windows[0], windows[1], windows[2], windows[3]
    depth, height = x.shape[1], x.shape[2]
    out_h, out_w = out_size[1], out_size[2]
    k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
    c_in = cols.shape[1] // (k_d * k_h * k_w)
    run = k_w * c_in
    for m in range(*share(cols.shape[0], part, parts)):
        j, ow = m // out_w, m % out_w
        n, v = n0 + j // units_per_image, v0 + j % units_per_image
        row = cols[m]
        w0 = ow * stride[2] - pad[2]
        # The window's pixels inside the row, as offsets [a, b) into the run.
        a, b = max(0, -w0) * c_in, max(min(k_w, width - w0), 0) * c_in
        base = 0
        for kd in range(k_d):
            d = (v // out_h) * stride[0] - pad[0] + kd
            for kh in range(k_h):
                h = (v % out_h) * stride[1] - pad[1] + kh
                if 0 <= d < depth and 0 <= h < height and a < b:
                    row[base:base + a] = 0
                    row[base + a:base + b] = x[n, d, h, w0 * c_in + a:w0 * c_in + b]
                    row[base + b:base + run] = 0
                else:
                    row[base:base + run] = 0
                base += run


@parallel_kernel
def col2im(part, parts, cols, grad_in, n0, v0, units_per_image, windows, blocks, channels_last,
           accumulate):
    """Store (or, with ``accumulate``, add) ``cols`` (laid out as :func:`im2col`'s) as
    the gradient ``grad_in``, channels-last ``(N, D, H, W, C_in)`` or channels-first
    ``(N, C_in, D, H, W)``.

    A gather: a task owns one input row ``(n, d, h)`` (or, with ``blocks > 1``,
    one of that many pieces of it: parallel work for a lone 1-D signal), sums
    every cols entry whose window covered it, in the fixed order (kernel offset,
    ``ow``), in a scratch row, and writes the row once in ``grad_in``'s layout: no
    two threads write one element, each element's sum runs in the same order
    whatever the number of blocks or threads, and a channels-first gradient needs
    no transpose.  Cols of whole images hold every window of their rows: their
    rows are stored, zeros included, so ``grad_in`` needs no zeroing; runs of
    units of one image ``accumulate`` into a zeroed one.  ``windows``: as
    :func:`im2col`'s.
    """
    out_size, kernel, stride, pad = windows[0], windows[1], windows[2], windows[3]
    if channels_last:
        depth, height, width, c_in = (grad_in.shape[1], grad_in.shape[2],
                                      grad_in.shape[3], grad_in.shape[4])
    else:
        c_in, depth, height, width = (grad_in.shape[1], grad_in.shape[2],
                                      grad_in.shape[3], grad_in.shape[4])
    out_d, out_h, out_w = out_size[0], out_size[1], out_size[2]
    k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
    images = cols.shape[0] // max(units_per_image * out_w, 1)
    block = (width + blocks - 1) // blocks
    for task in range(*share(images * depth * height * blocks, part, parts)):
        b = task % blocks
        h = task // blocks % height
        d = task // (blocks * height) % depth
        i = task // (blocks * height * depth)
        first, stop = b * block, min(width, (b + 1) * block)
        n = n0 + i
        sums = np.zeros((max(stop - first, 0), c_in), cols.dtype)
        for kd in range(k_d):
            od = _source(d, pad[0], kd, stride[0], out_d)
            if od < 0:
                continue
            for kh in range(k_h):
                oh = _source(h, pad[1], kh, stride[1], out_h)
                v = od * out_h + oh - v0
                if oh < 0 or v < 0 or v >= units_per_image:
                    continue
                row = (i * units_per_image + v) * out_w
                for kw in range(k_w):
                    base = ((kd * k_h + kh) * k_w + kw) * c_in
                    lo, hi = _span(kw, stride[2], pad[2], first, stop, out_w)
                    for ow in range(lo, hi):
                        at = ow * stride[2] - pad[2] + kw - first
                        for c in range(c_in):
                            sums[at, c] += cols[row + ow, base + c]
        if channels_last:
            target = grad_in[n, d, h, first:stop]
            for w in range(stop - first):
                for c in range(c_in):
                    target[w, c] = target[w, c] + sums[w, c] if accumulate else sums[w, c]
        else:
            for c in range(c_in):
                target = grad_in[n, c, d, h, first:stop]
                for w in range(stop - first):
                    target[w] = target[w] + sums[w, c] if accumulate else sums[w, c]


# Spatial positions per task of the layout transposes: a tile of 64 positions by all
# channels stays in L1 while one side is read or written contiguously.
_TILE = 64


@parallel_kernel
def move_channels(part, parts, source, target, to_last):
    """``target[n, s, c] = source[n, c, s]`` (``to_last``) or ``target[n, c, s] =
    source[n, s, c]``, tiled over the positions ``s``.

    NumPy's strided copy reads the channels of one position at the channel stride;
    with a power-of-two-like stride (a 16x56x56 volume's) those reads collide in
    the cache and the copy ran at a fifth of its usual speed.  Tiles read each
    channel's run of positions contiguously instead, and run in parallel.
    """
    batch = source.shape[0]
    channels, size = (source.shape[1], source.shape[2]) if to_last else (source.shape[2],
                                                                          source.shape[1])
    tiles = (size + _TILE - 1) // _TILE
    for task in range(*share(batch * tiles, part, parts)):
        n = task // tiles
        first = task % tiles * _TILE
        stop = min(first + _TILE, size)
        for c in range(channels):
            for s in range(first, stop):
                if to_last:
                    target[n, s, c] = source[n, c, s]
                else:
                    target[n, c, s] = source[n, s, c]


# --------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_libraries = None  # threadpoolctl's BLAS controllers, once looked up


def _blas_libraries_found() -> list:
    """NumPy's BLAS (and any other loaded by the first call) as threadpoolctl
    controllers; empty without threadpoolctl."""
    global _blas_libraries
    if _blas_libraries is None:
        with _blas_lock:
            if _blas_libraries is None:
                try:
                    from threadpoolctl import ThreadpoolController
                    found = ThreadpoolController().select(user_api="blas").lib_controllers
                except Exception:  # not installed, or it cannot inspect this process
                    found = []
                _blas_libraries = list(found)
    return _blas_libraries


_blas_holders = 0  # calls now holding BLAS lowered, and the counts to restore after
_blas_saved: list = []
_blas_stale: list = []  # in a forked child: the counts the parent's calls had lowered


def _reset_after_fork() -> None:
    """A forked child starts with no call in flight: a fresh lock (the parent's may
    have been held), and the parent's lowering to undo at the child's next call
    (not here: BLAS has its own fork handlers, which may not have run yet)."""
    global _blas_lock, _blas_holders, _blas_stale
    _blas_lock = threading.Lock()
    if _blas_holders:
        _blas_holders, _blas_stale = 0, _blas_saved


os.register_at_fork(after_in_child=_reset_after_fork)


@contextmanager
def _blas_threads(wanted=None):
    """Hold BLAS to fastpool's thread count (or to ``wanted``) during the GEMMs.

    NumPy's BLAS keeps its own thread pool, sized to all cores; without this, a
    lower :func:`fastpool.set_num_threads` (fastpool.torch's torch thread count,
    fastpool.dask's per-task cap) would bind the im2col kernels but not the
    products, and oversubscribe the cores.  It only lowers BLAS, never raising it
    over a limit the user set, and needs ``threadpoolctl`` (optional: without it
    BLAS runs as configured).  The libraries' own setters, not
    ``threadpoolctl.threadpool_limits``: that costs ~40 us a call, as much as a
    small convolution.  BLAS's count is process-wide, so concurrent calls share
    one lowering: the last to finish restores the counts the first one found.
    """
    global _blas_holders, _blas_saved, _blas_stale
    wanted = _threads.get_num_threads() if wanted is None else wanted
    libraries = _blas_libraries_found()
    if _blas_stale:
        with _blas_lock:
            for library, threads in _blas_stale:
                library.set_num_threads(threads)
            _blas_stale = []
    if all(library.num_threads <= wanted for library in libraries):
        yield  # nothing to lower (the usual case: both use every core)
        return
    with _blas_lock:
        if _blas_holders == 0:
            _blas_saved = [(library, library.num_threads) for library in libraries]
        _blas_holders += 1
        for library in libraries:
            if library.num_threads > wanted:
                library.set_num_threads(wanted)
    try:
        yield
    finally:
        with _blas_lock:
            _blas_holders -= 1
            if _blas_holders == 0:
                for library, threads in _blas_saved:
                    library.set_num_threads(threads)


class _Geometry:
    """The sizes one convolution call needs, and its chunks.

    Parameters
    ----------
    x_shape : tuple of int
        The canonical channels-last input shape, ``(N, D, H, W, C_in)``.
    weight_shape : tuple of int
        ``(C_out, C_in, KD, KH, KW)``.
    out_size : tuple of int
        The output's spatial size ``(OD, OH, OW)``.
    stride, pad : tuple of int
        Three each.
    dtype : numpy.dtype
        The dtype the products run in.
    """

    def __init__(self, x_shape, weight_shape, out_size, stride, pad, dtype):
        self.dtype = np.dtype(dtype)
        self.batch = x_shape[0]
        self.c_out, self.c_in = weight_shape[0], weight_shape[1]
        self.spatial = tuple(x_shape[1:4])
        # Python ints: numba compiles the kernels once for int64 tuples.
        self.kernel = tuple(map(int, weight_shape[2:]))
        self.out_size = tuple(map(int, out_size))
        self.stride = tuple(map(int, stride))
        self.pad = tuple(map(int, pad))
        # The kernels' copy: a (4, 3) table, rows out_size, kernel, stride, pad.
        self.windows = np.array([self.out_size, self.kernel, self.stride, self.pad], np.int64)
        self.k = self.c_in * math.prod(self.kernel)  # a cols row's length
        self.units_per_image = self.out_size[0] * self.out_size[1]

    def chunks(self, images):
        """``(n0, count, v0, units)`` per chunk of the first ``images`` images: images
        ``n0 .. n0+count-1``, and in each the units ``v0 .. v0+units-1``.  Whole images
        while one image's cols fit in :data:`CHUNK_BYTES`, else runs of units of one
        image."""
        if self.whole_images:
            step = max(1, CHUNK_BYTES // (self._unit_bytes * self.units_per_image))
            for n0 in range(0, images, step):
                yield n0, min(step, images - n0), 0, self.units_per_image
            return
        step = max(1, CHUNK_BYTES // self._unit_bytes)
        for n in range(images):
            for v0 in range(0, self.units_per_image, step):
                yield n, 1, v0, min(step, self.units_per_image - v0)

    def parts(self):
        """The batch cut into ``[first, stop)`` runs of images, one per thread.

        Each part runs whole in one thread, serial kernels and a one-thread BLAS:
        alternating numba's thread pool with BLAS's, each pool's threads spin on
        the cores the other needs just after its work, and on 2 threads the 8x64x56x56
        forward ran slower than on one.  Split, both threads stay busy with their own
        images.  One part (run with parallel kernels and BLAS at fastpool's thread
        count) when the product is too small to pay a thread hand-off, or when BLAS's
        thread count cannot be lowered (no ``threadpoolctl``: each part's BLAS would
        start every core's threads)."""
        threads = min(_threads.get_num_threads(), self.batch)
        work = self.batch * self.units_per_image * self.out_size[2] * self.k * self.c_out
        if threads < 2 or work < _SPLIT_WORK or not _blas_libraries_found():
            return [(0, self.batch)]
        bounds = [self.batch * i // threads for i in range(threads + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def whole(self, v0, units):
        """Whether a chunk covers its images whole."""
        return v0 == 0 and units == self.units_per_image

    @property
    def _unit_bytes(self) -> int:
        """Bytes of one unit's cols (at least 1)."""
        return max(self.k * self.out_size[2] * self.dtype.itemsize, 1)

    @property
    def whole_images(self) -> bool:
        """Whether every chunk covers its images whole (one image's cols fit in
        :data:`CHUNK_BYTES`)."""
        return self._unit_bytes * self.units_per_image <= CHUNK_BYTES

    @property
    def tiles(self) -> bool:
        """Whether the windows tile the input: kernel == stride, no padding."""
        return self.kernel == self.stride and not any(self.pad)

    def cols(self, scratch, images, units):
        """The chunk's ``(M, K)`` cols in ``scratch`` (allocated by the first chunk,
        the largest), as a list of one array so that the caller keeps it."""
        m = images * units * self.out_size[2]
        if not scratch:
            scratch.append(memory.empty((m * self.k,), self.dtype))
        return scratch[0][:m * self.k].reshape(m, self.k)

    def matrix_weight(self, weight):
        """The weight as ``(C_out, K)``, ``K`` ordered ``(kd, kh, kw, c)`` as cols'."""
        return np.ascontiguousarray(weight.transpose(0, 2, 3, 4, 1)).reshape(self.c_out, self.k)

    def tensor_weight(self, matrix):
        """The inverse of :meth:`matrix_weight`."""
        shaped = matrix.reshape(self.c_out, *self.kernel, self.c_in)
        return np.ascontiguousarray(shaped.transpose(0, 4, 1, 2, 3))

    def blocks(self, tasks, length):
        """How many pieces to cut each of ``tasks`` parallel tasks into (along an axis of
        ``length``) so that every thread has work: a lone long 1-D signal."""
        wanted = _TASKS_PER_THREAD * _threads.get_num_threads()
        if tasks >= wanted or length <= 1:
            return 1
        return max(1, min(-(-wanted // max(tasks, 1)), length))

    def im2col(self, source, first, images, v0, units, scratch, serial=False):
        """The chunk's cols from channels-last ``source`` (its images from index
        ``first``), and whether they are a view of ``source`` (the windows tile it)
        rather than filled in :meth:`cols`' buffer; in this thread when ``serial``."""
        if self.whole(v0, units):
            patches = self.patches(source[first:first + images])
            if patches is not None:
                return patches, True
        cols = self.cols(scratch, images, units)
        rows = source.reshape(*source.shape[:3], source.shape[3] * source.shape[4])
        _launch(serial, im2col, rows, cols, first, v0, units, self.windows, self.spatial[2])
        return cols, False

    def col2im(self, cols, target, first, images, v0, units, channels_last, serial=False):
        """Store the cols' gradient in ``target`` (its images from index ``first``), or
        add it for a run of units of one image; in this thread when ``serial``."""
        rows = images * self.spatial[0] * self.spatial[1]
        blocks = 1 if serial else self.blocks(rows, self.spatial[2])
        _launch(serial, col2im, cols, target, first, v0, units, self.windows, blocks,
                channels_last, not self.whole(v0, units))

    def patches(self, array):
        """Non-overlapping windows (kernel == stride, no padding) of a channels-last
        array as the ``(M, K)`` cols matrix itself, a view; None when that is not
        expressible with strides (or the windows overlap or pad)."""
        if not self.tiles or array.size == 0:
            return None
        (od, oh, ow), (kd, kh, kw) = self.out_size, self.kernel
        view = array[:, :od * kd, :oh * kh, :ow * kw].reshape(
            array.shape[0], od, kd, oh, kh, ow, kw, array.shape[-1])
        return _as_matrix(view.transpose(0, 1, 3, 5, 2, 4, 6, 7), 4)  # (n,od,oh,ow),(kd,kh,kw,c)


def _as_matrix(view, split):
    """``view`` as a 2-D array (axes ``[:split]`` the rows, the rest the columns)
    sharing its memory, or None when that needs a copy or the columns are not
    contiguous (BLAS wants unit stride along one axis)."""
    merged = []
    for axes in (range(split), range(split, view.ndim)):
        size, stride, expected = 1, view.itemsize, None
        for axis in reversed(axes):  # innermost first
            length, step = view.shape[axis], view.strides[axis]
            if length == 1:
                continue
            if expected is None:
                stride = step
            elif step != expected:
                return None
            expected = step * length
            size *= length
        merged.append((size, stride))
    (rows, row_stride), (columns, column_stride) = merged
    if column_stride != view.itemsize or rows * columns == 0:
        return None
    return np.lib.stride_tricks.as_strided(view, (rows, columns), (row_stride, column_stride))


def _channels_moved(array, last, serial=False, out=None):
    """A C-contiguous copy of 5-D ``array`` (into ``out`` if given) with its channels
    moved from axis 1 to the end (``last``), or from the end back to axis 1; in this
    thread when ``serial``."""
    batch = array.shape[0]
    if last:
        channels, spatial = array.shape[1], array.shape[2:]
        shape, source_shape = (batch, *spatial, channels), (batch, channels, math.prod(spatial))
    else:
        channels, spatial = array.shape[-1], array.shape[1:-1]
        shape, source_shape = (batch, channels, *spatial), (batch, math.prod(spatial), channels)
    out = memory.empty(shape, array.dtype) if out is None else out
    target_shape = (batch, source_shape[2], source_shape[1])
    _launch(serial, move_channels, array.reshape(source_shape), out.reshape(target_shape),
            last)
    return out


def _launch(serial, kernel, *args):
    """``launch``, or with ``serial`` the kernel serially in this thread (work 0
    is below any parallel threshold)."""
    return launch(kernel, *args, work=0) if serial else launch(kernel, *args)


# The smallest product (multiply-adds) split over threads: about 0.1 ms on one core,
# several times a thread hand-off (tens of microseconds).
_SPLIT_WORK = 2**21

_pool = None  # the worker threads of split calls, started on first use
_pool_lock = threading.Lock()


def _run_parts(task, parts):
    """``task(first, stop, serial)`` for each part, in order of parts; the parts after
    the first run in the worker threads, each with serial kernels and BLAS at one
    thread (a lone part: parallel kernels, BLAS at fastpool's count)."""
    global _pool
    if len(parts) == 1:
        with _blas_threads():
            return [task(*parts[0], False)]
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max(_threads._available_threads() - 1, 1),
                                           thread_name_prefix="fastpool-conv")
    with _blas_threads(1):
        futures = [_pool.submit(task, *part, True) for part in parts[1:]]
        try:
            first = task(*parts[0], True)
        finally:
            wait(futures)  # their arrays and BLAS's lowering must outlive them
        return [first] + [future.result() for future in futures]


def _reset_pool_after_fork() -> None:
    """A forked child has none of the parent's worker threads."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def conv(x, weight, bias, out_shape, stride, pad, channels_last=False, stream=None):
    """The convolution's output, ``(N, C_out, OD, OH, OW)`` or, with
    ``channels_last``, ``(N, OD, OH, OW, C_out)`` (``out_shape``).

    Parameters
    ----------
    x : numpy.ndarray
        The canonical input, C-contiguous: ``(N, C_in, D, H, W)``, or
        ``(N, D, H, W, C_in)`` with ``channels_last``.
    weight : numpy.ndarray
        ``(C_out, C_in, KD, KH, KW)``, of ``x``'s dtype.
    bias : numpy.ndarray
        ``(C_out,)``; all zeros when the caller has none.
    out_shape : tuple of int
        The output's shape, in ``x``'s layout.
    stride, pad : tuple of int
        Three each, for ``(D, H, W)``.
    channels_last : bool, optional
        The layout of ``x`` and of the result.
    stream : None
        Unused (the CUDA back end's argument).

    Returns
    -------
    numpy.ndarray
        The output, of ``x``'s dtype.
    """
    # Channels-first arrays go through channels-last copies: one tiled transpose each
    # way costs less than a channels-first im2col (a strided gather at stride > 1),
    # and one kernel family serves both layouts.
    spatial = x.shape[1:4] if channels_last else x.shape[2:]
    channels = x.shape[-1] if channels_last else x.shape[1]
    spatial_out = out_shape[1:4] if channels_last else out_shape[2:]
    g = _Geometry((x.shape[0], *spatial, channels), weight.shape, spatial_out, stride, pad,
                  x.dtype)
    out = memory.empty(out_shape, x.dtype)
    if out.size == 0:
        return out
    matrix = g.matrix_weight(weight)
    with_bias = bias.any()  # the dispatch layer passes zeros for "no bias": skip that pass
    positions = g.units_per_image * g.out_size[2]  # output positions per image

    def part(first, stop, serial):
        source = x[first:stop] if channels_last else _channels_moved(x[first:stop], True,
                                                                     serial)
        # Channels-first products land in place as W @ cols.T, (C_out, positions)
        # per image: no transpose of the output.
        planes = out[first:stop].reshape(stop - first, g.c_out, positions)
        rows = out[first:stop].reshape(-1, g.c_out)
        scratch = []
        for n0, images, v0, units in g.chunks(stop - first):
            cols, _ = g.im2col(source, n0, images, v0, units, scratch, serial)
            if channels_last:
                start = (n0 * g.units_per_image + v0) * g.out_size[2]
                chunk = rows[start:start + len(cols)]
                np.matmul(cols, matrix.T, out=chunk)
                if with_bias:  # while the chunk is in cache
                    chunk += bias
                continue
            start, length = v0 * g.out_size[2], len(cols) // images
            for i in range(images):
                chunk = planes[n0 + i, :, start:start + length]
                np.matmul(matrix, cols[i * length:(i + 1) * length].T, out=chunk)
                if with_bias:
                    chunk += bias[:, None]

    _run_parts(part, g.parts())
    return out


def conv_backward(grad, x, weight, stride, pad, channels_last=False, stream=None):
    """Gradients of :func:`conv` with respect to its input and weight.

    Parameters
    ----------
    grad : numpy.ndarray
        The output's gradient, C-contiguous, in the layout of ``x``.
    x, weight, stride, pad, channels_last
        As :func:`conv`'s.
    stream : None
        Unused.

    Returns
    -------
    grad_in : numpy.ndarray
        Of ``x``'s shape, and ``grad``'s dtype (as torch's).
    grad_weight : numpy.ndarray
        Of ``weight``'s shape, and ``grad``'s dtype.
    """
    dtype = grad.dtype
    x = x.astype(dtype, copy=False)
    spatial = x.shape[1:4] if channels_last else x.shape[2:]
    channels = x.shape[-1] if channels_last else x.shape[1]
    spatial_out = grad.shape[1:4] if channels_last else grad.shape[2:]
    g = _Geometry((x.shape[0], *spatial, channels), weight.shape, spatial_out, stride, pad,
                  dtype)
    matrix = g.matrix_weight(weight.astype(dtype, copy=False))
    if grad.size == 0 or x.size == 0:
        return np.zeros(x.shape, dtype), g.tensor_weight(np.zeros((g.c_out, g.k), dtype))
    grad_in = memory.empty(x.shape, dtype)
    # col2im stores whole images' rows; runs of units of one image add into zeros, as
    # do the tiling windows' products (which leave a ragged end untouched).
    if not g.whole_images or channels_last and g.tiles:
        grad_in.fill(0)
    positions = g.units_per_image * g.out_size[2]  # output positions per image

    def part(first, stop, serial):
        """The part's images' input gradient, in place, and their weight gradient."""
        source = x[first:stop] if channels_last else _channels_moved(x[first:stop], True,
                                                                     serial)
        target = grad_in[first:stop]
        if channels_last:
            rows = grad[first:stop].reshape(-1, g.c_out)
        else:  # products per image with its (C_out, positions) gradient: no transpose
            planes = grad[first:stop].reshape(stop - first, g.c_out, positions)
        grad_matrix = np.zeros((g.c_out, g.k), dtype)
        scratch = []
        for n0, images, v0, units in g.chunks(stop - first):
            cols, view = g.im2col(source, n0, images, v0, units, scratch, serial)
            if channels_last:
                start = (n0 * g.units_per_image + v0) * g.out_size[2]
                chunk = rows[start:start + len(cols)]  # the chunk's gradient, (M, C_out)
                grad_matrix += chunk.T @ cols
                if view:  # windows that tile the input: their gradient lands in place
                    np.matmul(chunk, matrix, out=g.patches(target[n0:n0 + images]))
                    continue
                np.matmul(chunk, matrix, out=cols)  # the cols are spent: reuse them
            else:
                start, length = v0 * g.out_size[2], len(cols) // images
                spent = g.cols(scratch, images, units) if view else cols
                for i in range(images):
                    image_grad = planes[n0 + i, :, start:start + length]
                    image_cols = slice(i * length, (i + 1) * length)
                    grad_matrix += image_grad @ cols[image_cols]
                    np.matmul(image_grad.T, matrix, out=spent[image_cols])
                cols = spent
            g.col2im(cols, target, n0, images, v0, units, channels_last, serial)
        return grad_matrix

    # The parts' weight gradients summed in a fixed order: repeatable bit for bit.
    return grad_in, g.tensor_weight(sum(_run_parts(part, g.parts())))
