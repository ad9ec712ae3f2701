"""Strided convolution on the CPU: im2col kernels (Numba) around BLAS GEMMs (NumPy).

A convolution is one matrix product once each output position's receptive field
is copied out as a column ("im2col"): for an input with ``C_in`` channels and a
``KD x KH x KW`` kernel, ``K = C_in*KD*KH*KW`` values per output position.  BLAS
then does the arithmetic at near peak speed, where direct loops ran at a few
percent of it.  The three products:

=================  ==================================  ==================================
                   channels-first (cols ``(K, M)``)    channels-last (cols ``(M, K)``)
=================  ==================================  ==================================
output             ``W @ cols``                        ``cols @ W.T``
input gradient     ``col2im(W.T @ grad)``              ``col2im(grad @ W)``
weight gradient    ``grad @ cols.T`` (summed)          ``grad.T @ cols`` (summed)
=================  ==================================  ==================================

``M`` counts output positions.  Each layout gets the cols orientation whose
copy is cheap: channels-first copies contiguous runs of one input row into a
cols row; channels-last copies a pixel's ``C_in`` contiguous channels into a
cols row, whose ``K`` axis is then ordered ``(kd, kh, kw, c)``, and whose
products land in channels-last order, so no transpose of the input or output
is ever made.

Canonical arrays: input ``(N, C_in, D, H, W)`` or, channels-last,
``(N, D, H, W, C_in)``; weight ``(C_out, C_in, KD, KH, KW)`` in both layouts;
1-D and 2-D run with size-1 leading spatial axes.  The output positions are
grouped in *units*: one ``(n, od, oh)`` row of ``OW`` outputs.  The cols
scratch is bounded by :data:`CHUNK_BYTES`: the work runs over chunks of whole
images, or, when one image's cols are larger, over runs of units of one image.

Sums run in the input's dtype (float32 stays float32 in BLAS, as in torch).
col2im gathers: each input element is summed by one thread in a fixed order,
and the chunks run in a fixed order, so results are race-free and do not depend
on the thread count.
"""

from __future__ import annotations

import math
import threading
from contextlib import nullcontext

import numpy as np
from numba import njit, prange

from fastpool import _threads
from fastpool._config import CPU_JIT_OPTIONS
from fastpool.cpu.runtime import launch

# The most bytes of cols scratch one chunk may use.  Large enough that one chunk
# covers a typical batch (fewer, larger GEMMs), small enough to bound the memory a
# big input needs.  The tests lower it to exercise the chunking.
CHUNK_BYTES = 64 * 2**20

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


@njit(inline="always")
def _piece(b, blocks, length):
    """Block ``b`` of ``length`` items cut into ``blocks`` near-equal pieces."""
    size = (length + blocks - 1) // blocks
    return min(b * size, length), min((b + 1) * size, length)


@njit(inline="always")
def _gather(target, start, source, first, step, count):
    """``target[start + t] = source[first + t*step]`` for ``t < count``, the
    common steps 1 and 2 as constants so that LLVM vectorises their loads."""
    target = target[start:start + count]
    if step == 1:
        source = source[first:first + count]
        for t in range(count):
            target[t] = source[t]
    elif step == 2:
        source = source[first:first + 2 * count - 1]
        for t in range(count):
            target[t] = source[2 * t]
    else:
        for t in range(count):
            target[t] = source[first + t * step]


@njit(**CPU_JIT_OPTIONS)
def im2col_first(x, cols, n0, v0, units_per_image, out_size, kernel, stride, pad, blocks):
    """Channels-first im2col: ``cols[(c, kd, kh, kw), (i, v - v0, ow)]``.

    Covers images ``n0 + i`` and, in each, units ``v0 .. v0 + units_per_image - 1``
    (a unit ``v`` is the output row ``(od, oh) = divmod(v, OH)``).  A task fills
    one cols row for one image, unit by unit: a copy of part of one input row,
    zeros where the window is in the padding.  With ``blocks > 1`` the task is
    one of that many pieces of the image's units (or, with a single unit, of its
    ``OW`` outputs): parallel work for few rows, such as a 1-channel signal.
    """
    depth, height, width = x.shape[2], x.shape[3], x.shape[4]
    out_h, out_w = out_size[1], out_size[2]
    k_d, k_h, k_w = kernel
    images = cols.shape[1] // max(units_per_image * out_w, 1)
    for task in prange(cols.shape[0] * images * blocks):
        b = task % blocks
        i = task // blocks % images
        row = task // (blocks * images)
        kw = row % k_w
        kh = row // k_w % k_h
        kd = row // (k_w * k_h) % k_d
        c = row // (k_w * k_h * k_d)
        n = n0 + i
        if units_per_image > 1:
            j0, j1 = _piece(b, blocks, units_per_image)
            ow0, ow1 = 0, out_w
        else:
            j0, j1 = 0, 1
            ow0, ow1 = _piece(b, blocks, out_w)
        inside_lo, inside_hi = _span(kw, stride[2], pad[2], 0, width, out_w)
        lo, hi = min(max(inside_lo, ow0), ow1), max(min(inside_hi, ow1), ow0)
        for j in range(j0, j1):
            v = v0 + j
            d = (v // out_h) * stride[0] - pad[0] + kd
            h = (v % out_h) * stride[1] - pad[1] + kh
            base = (i * units_per_image + j) * out_w
            if d < 0 or d >= depth or h < 0 or h >= height:
                for ow in range(ow0, ow1):
                    cols[row, base + ow] = 0
                continue
            for ow in range(ow0, lo):
                cols[row, base + ow] = 0
            _gather(cols[row], base + lo, x[n, c, d, h], lo * stride[2] + kw - pad[2],
                    stride[2], hi - lo)
            for ow in range(hi, ow1):
                cols[row, base + ow] = 0


@njit(**CPU_JIT_OPTIONS)
def im2col_last(x, cols, n0, v0, units_per_image, out_size, kernel, stride, pad):
    """Channels-last im2col: ``cols[(i, v - v0, ow), (kd, kh, kw, c)]``.

    Each task fills one cols row (one output position) with ``KD*KH*KW``
    contiguous ``C_in``-channel copies; zeros where the window leaves the input.
    """
    depth, height, width, c_in = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    out_h, out_w = out_size[1], out_size[2]
    k_d, k_h, k_w = kernel
    for m in prange(cols.shape[0]):
        j, ow = m // out_w, m % out_w
        n, v = n0 + j // units_per_image, v0 + j % units_per_image
        for kd in range(k_d):
            d = (v // out_h) * stride[0] - pad[0] + kd
            for kh in range(k_h):
                h = (v % out_h) * stride[1] - pad[1] + kh
                for kw in range(k_w):
                    w = ow * stride[2] - pad[2] + kw
                    base = ((kd * k_h + kh) * k_w + kw) * c_in
                    if 0 <= d < depth and 0 <= h < height and 0 <= w < width:
                        for c in range(c_in):
                            cols[m, base + c] = x[n, d, h, w, c]
                    else:
                        for c in range(c_in):
                            cols[m, base + c] = 0


@njit(**CPU_JIT_OPTIONS)
def col2im_first(cols, grad_in, n0, v0, units_per_image, out_size, kernel, stride, pad,
                 blocks):
    """Channels-first col2im: add ``cols`` (laid out as :func:`im2col_first`'s) into
    ``grad_in``.

    A task owns one input plane ``(n, c)`` (or, with ``blocks > 1``, one of that
    many pieces of its rows, or of its columns when it has a single row) and adds
    every cols entry that lands in it, in the fixed order (kernel offset, unit,
    ``ow``): no two threads write one element, and each element's sum runs in the
    same order whatever the number of blocks or threads.
    """
    c_in, depth, height, width = (grad_in.shape[1], grad_in.shape[2], grad_in.shape[3],
                                  grad_in.shape[4])
    out_h, out_w = out_size[1], out_size[2]
    k_d, k_h, k_w = kernel
    images = cols.shape[1] // max(units_per_image * out_w, 1)
    for task in prange(images * c_in * blocks):
        b = task % blocks
        c = task // blocks % c_in
        i = task // (blocks * c_in)
        n = n0 + i
        if depth * height > 1:
            r0, r1 = _piece(b, blocks, depth * height)
            w0, w1 = 0, width
        else:
            r0, r1 = 0, 1
            w0, w1 = _piece(b, blocks, width)
        for kd in range(k_d):
            for kh in range(k_h):
                for kw in range(k_w):
                    row = ((c * k_d + kd) * k_h + kh) * k_w + kw
                    lo, hi = _span(kw, stride[2], pad[2], w0, w1, out_w)
                    shift = kw - pad[2]
                    for j in range(units_per_image):
                        v = v0 + j
                        d = (v // out_h) * stride[0] - pad[0] + kd
                        h = (v % out_h) * stride[1] - pad[1] + kh
                        r = d * height + h
                        if d < 0 or d >= depth or h < 0 or h >= height or r < r0 or r >= r1:
                            continue
                        base = (i * units_per_image + j) * out_w
                        for ow in range(lo, hi):
                            grad_in[n, c, d, h, ow * stride[2] + shift] += cols[row, base + ow]


@njit(**CPU_JIT_OPTIONS)
def col2im_last(cols, grad_in, n0, v0, units_per_image, out_size, kernel, stride, pad,
                blocks):
    """Channels-last col2im: add ``cols`` (laid out as :func:`im2col_last`'s) into
    ``grad_in``; a gather over input rows ``(n, d, h)`` as :func:`col2im_first`."""
    depth, height, width, c_in = (grad_in.shape[1], grad_in.shape[2], grad_in.shape[3],
                                  grad_in.shape[4])
    out_d, out_h, out_w = out_size
    k_d, k_h, k_w = kernel
    images = cols.shape[0] // max(units_per_image * out_w, 1)
    block = (width + blocks - 1) // blocks
    for task in prange(images * depth * height * blocks):
        b = task % blocks
        h = task // blocks % height
        d = task // (blocks * height) % depth
        i = task // (blocks * height * depth)
        first, stop = b * block, min(width, (b + 1) * block)
        n = n0 + i
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
                        w = ow * stride[2] - pad[2] + kw
                        for c in range(c_in):
                            grad_in[n, d, h, w, c] += cols[row + ow, base + c]


# --------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_libraries = None  # threadpoolctl's BLAS controllers, once looked up; False without it


def _blas_threads():
    """A context that holds BLAS to fastpool's thread count during the GEMMs.

    NumPy's BLAS keeps its own thread pool, sized to all cores; without this, a
    lower :func:`fastpool.set_num_threads` (or fastpool.dask's per-task cap) would
    bind the im2col kernels but not the products.  It lowers BLAS only, never
    raises it over a limit the user set, and needs ``threadpoolctl`` (optional:
    without it BLAS runs as configured).
    """
    global _blas_libraries
    if _blas_libraries is None:
        with _blas_lock:
            if _blas_libraries is None:
                try:
                    from threadpoolctl import ThreadpoolController
                    libraries = ThreadpoolController().select(user_api="blas")
                    _blas_libraries = libraries if libraries.lib_controllers else False
                except Exception:  # not installed, or it cannot inspect this process
                    _blas_libraries = False
    wanted = _threads.get_num_threads()
    if not _blas_libraries or all(lib.num_threads <= wanted
                                  for lib in _blas_libraries.lib_controllers):
        return nullcontext()
    return _blas_libraries.limit(limits=wanted)



class _Geometry:
    """The sizes one convolution call needs, from its canonical arrays.

    Parameters
    ----------
    x_shape : tuple of int
        The canonical input shape, ``(N, C_in, D, H, W)`` or, with
        ``channels_last``, ``(N, D, H, W, C_in)``.
    weight_shape : tuple of int
        ``(C_out, C_in, KD, KH, KW)``.
    out_size : tuple of int
        The output's spatial size ``(OD, OH, OW)``.
    stride, pad : tuple of int
        Three each.
    channels_last : bool
        The layout of the input, the output and their gradients.
    """

    def __init__(self, x_shape, weight_shape, out_size, stride, pad, channels_last):
        self.channels_last = channels_last
        self.batch = x_shape[0]
        self.c_out, self.c_in = weight_shape[0], weight_shape[1]
        self.spatial = tuple(x_shape[1:4] if channels_last else x_shape[2:5])
        self.kernel = tuple(int(k) for k in weight_shape[2:])
        self.out_size = tuple(int(o) for o in out_size)
        self.stride = tuple(int(s) for s in stride)
        self.pad = tuple(int(p) for p in pad)
        self.k = self.c_in * math.prod(self.kernel)  # a cols column's length
        self.units_per_image = self.out_size[0] * self.out_size[1]
        self.positions = self.units_per_image * self.out_size[2]  # L: outputs per image

    def chunks(self, itemsize):
        """``(n0, images, v0, units)`` per chunk: images ``n0 .. n0+images-1``, and in
        each the units ``v0 .. v0+units-1``.  Whole images while one image's cols fit
        in :data:`CHUNK_BYTES`, else runs of units of one image."""
        unit_bytes = max(self.k * self.out_size[2] * itemsize, 1)
        image_bytes = unit_bytes * self.units_per_image
        if image_bytes <= CHUNK_BYTES:
            step = max(1, CHUNK_BYTES // image_bytes)
            for n0 in range(0, self.batch, step):
                yield n0, min(step, self.batch - n0), 0, self.units_per_image
            return
        step = max(1, CHUNK_BYTES // unit_bytes)
        for n in range(self.batch):
            for v0 in range(0, self.units_per_image, step):
                yield n, 1, v0, min(step, self.units_per_image - v0)

    def scratch(self, dtype):
        """One flat cols buffer, for the largest chunk (the first)."""
        _, images, _, units = next(self.chunks(dtype.itemsize), (0, 0, 0, 0))
        return np.empty(images * units * self.out_size[2] * self.k, dtype)

    def cols(self, scratch, images, units):
        """The chunk's cols: ``(K, M)`` channels-first, ``(M, K)`` channels-last."""
        m = images * units * self.out_size[2]
        flat = scratch[:m * self.k]
        return flat.reshape(m, self.k) if self.channels_last else flat.reshape(self.k, m)

    def matrix_weight(self, weight):
        """The weight as ``(C_out, K)``, ``K`` ordered as the layout's cols."""
        if self.channels_last:
            weight = np.ascontiguousarray(np.moveaxis(weight, 1, -1))
        return weight.reshape(self.c_out, self.k)

    def tensor_weight(self, matrix):
        """The inverse of :meth:`matrix_weight`."""
        if not self.channels_last:
            return matrix.reshape(self.c_out, self.c_in, *self.kernel)
        shaped = matrix.reshape(self.c_out, *self.kernel, self.c_in)
        return np.ascontiguousarray(np.moveaxis(shaped, -1, 1))

    def blocks(self, tasks, length):
        """How many pieces to cut each of ``tasks`` parallel tasks into (along an axis of
        ``length``) so that every thread has work: a lone long 1-D signal, one plane."""
        wanted = _TASKS_PER_THREAD * _threads.get_num_threads()
        if tasks >= wanted or length <= 1:
            return 1
        return max(1, min(-(-wanted // max(tasks, 1)), length))

    def im2col(self, x, cols, n0, images, v0, units):
        args = (n0, v0, units, self.out_size, self.kernel, self.stride, self.pad)
        if self.channels_last:
            launch(im2col_last, x, cols, *args)
        else:
            launch(im2col_first, x, cols, *args,
                   self.blocks(self.k * images, units if units > 1 else self.out_size[2]))

    def col2im(self, cols, grad_in, n0, images, v0, units):
        args = (n0, v0, units, self.out_size, self.kernel, self.stride, self.pad)
        rows = self.spatial[0] * self.spatial[1]
        if self.channels_last:
            launch(col2im_last, cols, grad_in, *args,
                   self.blocks(images * rows, self.spatial[2]))
        else:
            launch(col2im_first, cols, grad_in, *args,
                   self.blocks(images * self.c_in, rows if rows > 1 else self.spatial[2]))

    def patches(self, array):
        """Non-overlapping windows (kernel == stride, no padding) of a channels-last
        array as the ``(M, K)`` cols matrix itself, a view; None when that is not
        expressible with strides (or the windows overlap or pad)."""
        if not self.channels_last or self.kernel != self.stride or any(self.pad):
            return None
        if array.size == 0:
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
    out_size = out_shape[1:4] if channels_last else out_shape[2:5]
    g = _Geometry(x.shape, weight.shape, out_size, stride, pad, channels_last)
    out = np.empty(out_shape, x.dtype)
    if out.size == 0:
        return out
    with _blas_threads():
        if channels_last:
            _forward_last(g, x, g.matrix_weight(weight), out.reshape(-1, g.c_out))
        else:
            _forward_first(g, x, g.matrix_weight(weight),
                           out.reshape(g.batch, g.c_out, g.positions))
    if bias.any():  # the dispatch layer passes zeros for "no bias": skip that pass
        if channels_last:
            out.reshape(-1, g.c_out)[...] += bias
        else:
            out.reshape(g.batch, g.c_out, g.positions)[...] += bias[:, None]
    return out


def _forward_last(g, x, matrix, rows):
    """Channels-last forward into ``rows``, the output as ``(N*L, C_out)``."""
    patches = g.patches(x)
    if patches is not None:  # the input already is the cols matrix
        np.matmul(patches, matrix.T, out=rows)
        return
    scratch = g.scratch(x.dtype)
    for n0, images, v0, units in g.chunks(x.itemsize):
        cols = g.cols(scratch, images, units)
        g.im2col(x, cols, n0, images, v0, units)
        first = (n0 * g.units_per_image + v0) * g.out_size[2]
        np.matmul(cols, matrix.T, out=rows[first:first + cols.shape[0]])


def _forward_first(g, x, matrix, planes):
    """Channels-first forward into ``planes``, the output as ``(N, C_out, L)``."""
    scratch = g.scratch(x.dtype)
    for n0, images, v0, units in g.chunks(x.itemsize):
        cols = g.cols(scratch, images, units)
        g.im2col(x, cols, n0, images, v0, units)
        start, span = v0 * g.out_size[2], units * g.out_size[2]
        if images == 1:  # straight into the output plane (a BLAS-ready strided view)
            np.matmul(matrix, cols, out=planes[n0, :, start:start + span])
        else:
            # One GEMM for the chunk's images, whose columns are (image, position),
            # then its (C_out, images, L) result copied to (images, C_out, L): a pass
            # C_out/K the size of the im2col's.  (Per-image GEMMs on strided cols
            # would make NumPy copy each image's cols instead.)
            planes[n0:n0 + images] = (matrix @ cols).reshape(
                g.c_out, images, span).transpose(1, 0, 2)


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
    out_size = grad.shape[1:4] if channels_last else grad.shape[2:5]
    g = _Geometry(x.shape, weight.shape, out_size, stride, pad, channels_last)
    dtype = grad.dtype
    x = x.astype(dtype, copy=False)
    matrix = g.matrix_weight(weight.astype(dtype, copy=False))
    grad_matrix = np.zeros((g.c_out, g.k), dtype)
    if grad.size == 0 or x.size == 0:
        return np.zeros(x.shape, dtype), g.tensor_weight(grad_matrix)
    with _blas_threads():
        if channels_last:
            grad_in = _backward_last(g, grad.reshape(-1, g.c_out), x, matrix, grad_matrix)
        else:
            grad_in = _backward_first(g, grad.reshape(g.batch, g.c_out, g.positions), x,
                                      matrix, grad_matrix)
    return grad_in, g.tensor_weight(grad_matrix)


def _backward_last(g, rows, x, matrix, grad_matrix):
    """Channels-last gradients: ``rows`` is grad as ``(N*L, C_out)``; adds the weight
    gradient into ``grad_matrix`` and returns the input gradient."""
    patches = g.patches(x)
    if patches is not None:
        # No two windows overlap: the input gradient is grad @ W written straight
        # into its windows, with zeros where no window reaches.
        covered = all(o * k == s for o, k, s in zip(g.out_size, g.kernel, g.spatial))
        grad_in = (np.empty if covered else np.zeros)(x.shape, x.dtype)
        np.matmul(rows.T, patches, out=grad_matrix)
        np.matmul(rows, matrix, out=g.patches(grad_in))
        return grad_in
    grad_in = np.zeros(x.shape, x.dtype)
    scratch = g.scratch(x.dtype)
    for n0, images, v0, units in g.chunks(x.itemsize):
        cols = g.cols(scratch, images, units)
        g.im2col(x, cols, n0, images, v0, units)
        first = (n0 * g.units_per_image + v0) * g.out_size[2]
        chunk = rows[first:first + cols.shape[0]]  # (M, C_out)
        grad_matrix += chunk.T @ cols
        np.matmul(chunk, matrix, out=cols)  # cols now holds the cols' gradient
        g.col2im(cols, grad_in, n0, images, v0, units)
    return grad_in


def _backward_first(g, planes, x, matrix, grad_matrix):
    """Channels-first gradients: ``planes`` is grad as ``(N, C_out, L)``; as
    :func:`_backward_last`."""
    grad_in = np.zeros(x.shape, x.dtype)
    scratch = g.scratch(x.dtype)
    for n0, images, v0, units in g.chunks(x.itemsize):
        cols = g.cols(scratch, images, units)
        g.im2col(x, cols, n0, images, v0, units)
        start, span = v0 * g.out_size[2], units * g.out_size[2]
        # The chunk's gradient as one (C_out, M) matrix, its columns in cols' order,
        # so each product is one GEMM (a copy when the chunk spans images).
        if images == 1:
            chunk = planes[n0, :, start:start + span]
        else:
            chunk = np.ascontiguousarray(planes[n0:n0 + images].transpose(1, 0, 2)) \
                .reshape(g.c_out, images * span)
        grad_matrix += chunk @ cols.T
        np.matmul(matrix.T, chunk, out=cols)  # cols now holds the cols' gradient
        g.col2im(cols, grad_in, n0, images, v0, units)
    return grad_in
