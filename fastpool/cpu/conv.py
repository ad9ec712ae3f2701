"""Strided convolution on the CPU: direct convolution on a register-blocked micro-kernel.

No im2col and no BLAS: the products run on :func:`multiply_tile`
(:mod:`fastpool.cpu.microkernel`), which keeps a tile of ``TILE_ROWS`` outputs by
a tile's columns (64 float32 with AVX-512) in vector registers and reads its
operands where they lie.  In a channels-last input a window row's ``KW`` pixels
are adjacent, so its ``KW*C_in`` values are one contiguous run: the depth of one
micro-kernel step, the outputs of a tile ``stride*C_in`` values apart.  Each of
the three products is such a walk over a channels-last copy of the input with
its padding in it (zeros), wide enough for whole tiles:

===============  ========================  ==================  ==================
product          tile rows                 tile columns        depth
===============  ========================  ==================  ==================
output           outputs of a row          ``C_out``           ``(kh, kw, c_in)``
input gradient   every ``stride``-th pixel  ``C_in``            ``C_out``
weight gradient  ``(kw, c_in)`` of a ``kh``  ``C_out``           ``(oh, ow)``
===============  ========================  ==================  ==================

Each task owns its tiles' outputs (an output row; an input row, whose gradient
it gathers from every output row its windows cover; a tile of the weight
gradient, summed over every image), so no two threads write an element and
every sum runs in a fixed order: results repeat bit for bit at any thread
count.  The channel counts are padded to whole tiles in the packed weights and
the gradient's copy (zeros: a padded column sums zeros and is dropped), and
output rows to whole tiles (the extra outputs read zeros or padding).

The input's copy doubles as the layout change of a channels-first input (one
transpose of each row, in cache) and costs a pass over the input, against the
4-5 passes of im2col's matrix (``KH*KW/stride**2`` times the input, written and
read back); it runs over chunks of whole images of at most :data:`CHUNK_BYTES`,
so it is still in cache when the products read it, and the scratch is bounded.

Measured on the 2-core Zen 5 benchmark machine, 8x64x56x56 float32, 64 3x3
filters, stride 2, padding 1: forward 1.1-1.3 ms against torch's (oneDNN) 0.95-1.1
ms; im2col with OpenBLAS's GEMM took 2.7-4.0 ms.

Canonical arrays: input ``(N, C_in, D, H, W)`` or, channels-last,
``(N, D, H, W, C_in)``; weight ``(C_out, C_in, KD, KH, KW)`` in both layouts;
1-D and 2-D run with size-1 leading spatial axes.  Sums run in the input's
dtype (float32 stays float32, as in torch).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fastpool import _memory as memory
from fastpool.cpu.microkernel import TILE_ROWS, TILE_VECTORS, VECTOR_BYTES, multiply_tile
from fastpool.cpu.runtime import launch
from fastpool.cpu.tasks import parallel_kernel, share

# The most bytes of padded input (and, in the backward, gradient copy) one chunk of
# images may fill: the copy is still in cache when the products read it, and a big
# input's scratch stays bounded.  The tests lower it to exercise the chunking.
CHUNK_BYTES = 4 * 2**20

# The bytes of input and gradient rows the weight gradient's tiles sum over in turn:
# a band that stays in the core's L2 cache (1 MB on Zen 4 and 5, 512 kB on Zen 3).
BAND_BYTES = 2**18

# Bytes of a tile's row (its columns times the itemsize): a constant to the kernels.
TILE_BYTES = TILE_VECTORS * VECTOR_BYTES


@parallel_kernel
def padded_copy(part, parts, source, target, pads, channels_first):
    """``target``, channels-last ``(N, Dt, Ht, Wt, Ct)``: ``source`` (channels-last, or
    ``channels_first``) placed at offsets ``pads`` (the padding before each spatial
    axis), zeros around it and in the channels past the source's.  A task fills one
    target row ``(n, d, h)``, zeros included, so ``target`` needs no zeroing first."""
    depth, height, width, columns = (target.shape[1], target.shape[2], target.shape[3],
                                     target.shape[4])
    if channels_first:
        c_in, source_d, source_h, source_w = (source.shape[1], source.shape[2],
                                              source.shape[3], source.shape[4])
    else:
        source_d, source_h, source_w, c_in = (source.shape[1], source.shape[2],
                                              source.shape[3], source.shape[4])
    for task in range(*share(target.shape[0] * depth * height, part, parts)):
        h, d, n = task % height, task // height % depth, task // (height * depth)
        row = target[n, d, h]
        d_source, h_source = d - pads[0], h - pads[1]
        inside = 0 <= d_source < source_d and 0 <= h_source < source_h
        first = pads[2] if inside else width
        stop = first + source_w if inside else width
        for w in range(width):
            if w < first or w >= stop:
                for c in range(columns):
                    row[w, c] = 0
            else:
                for c in range(c_in, columns):
                    row[w, c] = 0
        if not inside:
            continue
        if channels_first:  # a transpose of one row: contiguous reads, writes in cache
            for c in range(c_in):
                line = source[n, c, d_source, h_source]
                for w in range(source_w):
                    row[first + w, c] = line[w]
        else:
            line = source[n, d_source, h_source]
            for w in range(source_w):
                for c in range(c_in):
                    row[first + w, c] = line[w, c]


@parallel_kernel
def direct_conv(part, parts, padded, packed, bias, out, n0, windows, channels_last):
    """Output rows ``(n0 + i, od, oh)`` of the convolution of ``padded`` (the images'
    :func:`padded_copy`) by ``packed`` (the weight as ``(KD, KH, KW, C_in, columns)``,
    ``C_out`` padded with zeros to whole tiles), plus ``bias`` (``columns`` long),
    stored in ``out`` (``(N, OD, OH, OW, C_out)``, or channels-first).

    A task owns one output row, summed in a scratch row of whole tiles: per tile,
    one :func:`multiply_tile` call per ``kd``, over the ``KH`` window rows as its
    blocks, each ``KW*C_in`` values deep.  ``windows``: the rows out_size, kernel,
    stride (see ``_Geometry.windows``).
    """
    out_size, kernel, stride = windows[0], windows[1], windows[2]
    out_d, out_h, out_w = out_size[0], out_size[1], out_size[2]
    k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
    depth, height, width, c_in = (padded.shape[1], padded.shape[2], padded.shape[3],
                                  padded.shape[4])
    columns = packed.shape[4]
    c_out = out.shape[4] if channels_last else out.shape[1]
    tile_columns = TILE_BYTES // packed.itemsize
    tiled_w = -(-out_w // TILE_ROWS) * TILE_ROWS
    row_depth = k_w * c_in  # a window row's values, adjacent in the input row
    sums = np.empty((tiled_w, columns), out.dtype)
    for task in range(*share(padded.shape[0] * out_d * out_h, part, parts)):
        oh, od, i = task % out_h, task // out_h % out_d, task // (out_h * out_d)
        for w in range(tiled_w):
            for c in range(columns):
                sums[w, c] = bias[c]
        for j in range(0, columns, tile_columns):  # a panel of the weight, kept in cache
            for w in range(0, tiled_w, TILE_ROWS):
                for kd in range(k_d):
                    pixel = ((i * depth + od * stride[0] + kd) * height
                             + oh * stride[1]) * width + w * stride[2]
                    multiply_tile(sums, w * columns + j, columns,
                                  padded, pixel * c_in, stride[2] * c_in, 1,
                                  packed, kd * k_h * row_depth * columns + j, columns, row_depth,
                                  k_h, width * c_in, row_depth * columns)
        n = n0 + i
        if channels_last:
            target = out[n, od, oh]
            for w in range(out_w):
                for c in range(c_out):
                    target[w, c] = sums[w, c]
        else:
            for c in range(c_out):
                line = out[n, c, od, oh]
                for w in range(out_w):
                    line[w] = sums[w, c]


@parallel_kernel
def weight_gradient(part, parts, padded, grad_rows, grad_weight, windows, band):
    """Add a chunk of images' weight gradient to ``grad_weight``, laid out
    ``(KD, KH, span, columns)``: ``[kd, kh, kw*C_in + c, o]`` the gradient of weight
    ``[o, c, kd, kh, kw]``, ``span`` being ``KW*C_in`` rounded up to whole tiles.

    ``padded``: the images' :func:`padded_copy`; ``grad_rows``: their output
    gradient as ``(images, OD, OH, tiled OW, columns)``.  A tile is rows ``(kw, c)``
    of one ``(kd, kh)`` (adjacent values of every window row, hence ``padded``'s
    extra width) by a tile of output channels, and a task owns a share of the
    tiles.  It walks the images' output rows in bands of ``band`` rows, small
    enough that a band's input and gradient rows stay in cache while every tile
    of the share sums over them: per tile, one :func:`multiply_tile` call, the
    band's rows as its blocks, the outputs of a row as its depth.  Each tile's sum
    runs over images, ``od``, ``oh``, ``ow`` in order, whatever the shares.
    """
    out_size, kernel, stride = windows[0], windows[1], windows[2]
    out_d, out_h, out_w = out_size[0], out_size[1], out_size[2]
    k_d, k_h = kernel[0], kernel[1]
    depth, height, width, c_in = (padded.shape[1], padded.shape[2], padded.shape[3],
                                  padded.shape[4])
    tiled_w, columns = grad_rows.shape[3], grad_rows.shape[4]
    span = grad_weight.shape[2]
    tile_columns = TILE_BYTES // grad_weight.itemsize
    row_tiles, column_tiles = span // TILE_ROWS, columns // tile_columns
    first, stop = share(k_d * k_h * row_tiles * column_tiles, part, parts)
    for i in range(padded.shape[0]):
        for od in range(out_d):
            for oh in range(0, out_h, band):
                rows = min(band, out_h - oh)
                gradient = ((i * out_d + od) * out_h + oh) * tiled_w * columns
                for task in range(first, stop):
                    j = task % column_tiles * tile_columns
                    r = task // column_tiles % row_tiles * TILE_ROWS
                    kh = task // (column_tiles * row_tiles) % k_h
                    kd = task // (column_tiles * row_tiles * k_h)
                    pixel = ((i * depth + od * stride[0] + kd) * height
                             + oh * stride[1] + kh) * width
                    multiply_tile(grad_weight, ((kd * k_h + kh) * span + r) * columns + j,
                                  columns,
                                  padded, pixel * c_in + r, 1, stride[2] * c_in,
                                  grad_rows, gradient + j, columns, out_w,
                                  rows, stride[1] * width * c_in, tiled_w * columns)


@njit(inline="always")
def _source(position, pad, offset, stride, size):
    """The output index whose window puts kernel ``offset`` on input ``position``, or -1."""
    t = position + pad - offset
    if t < 0 or t % stride != 0 or t // stride >= size:
        return -1
    return t // stride


@parallel_kernel
def input_gradient(part, parts, grad_rows, packed, grad_in, n0, windows, channels_last,
                   padded_width):
    """Input rows ``(n0 + i, d, h)`` of the gradient ``grad_in`` (channels-last
    ``(N, D, H, W, C_in)``, or channels-first), from ``grad_rows`` (the images'
    output gradient as ``(images, OD, OH, tiled OW, columns)``, zeros past ``OW``)
    and ``packed`` (the weight as ``(KD, KH, KW, C_out, C_in columns)``).

    A gather: a task owns one input row, summed in a scratch row as wide as the
    forward's padded input, and takes from every output row whose windows cover
    it, per window offset ``kw`` a tile of ``TILE_ROWS`` outputs at a time: their
    ``kw`` pixels are ``stride`` pixels apart, ``C_out`` deep.  ``windows``: the
    rows out_size, kernel, stride, pad.
    """
    out_size, kernel, stride, pad = windows[0], windows[1], windows[2], windows[3]
    out_d, out_h = out_size[0], out_size[1]
    k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
    if channels_last:
        depth, height, width, c_in = (grad_in.shape[1], grad_in.shape[2], grad_in.shape[3],
                                      grad_in.shape[4])
    else:
        c_in, depth, height, width = (grad_in.shape[1], grad_in.shape[2], grad_in.shape[3],
                                      grad_in.shape[4])
    tiled_w, rows_columns = grad_rows.shape[3], grad_rows.shape[4]
    c_out, columns = packed.shape[3], packed.shape[4]
    tile_columns = TILE_BYTES // packed.itemsize
    sums = np.empty((padded_width, columns), grad_in.dtype)
    for task in range(*share(grad_rows.shape[0] * depth * height, part, parts)):
        h, d, i = task % height, task // height % depth, task // (height * depth)
        for w in range(padded_width):
            for c in range(columns):
                sums[w, c] = 0
        for kd in range(k_d):
            od = _source(d, pad[0], kd, stride[0], out_d)
            for kh in range(k_h):
                oh = _source(h, pad[1], kh, stride[1], out_h)
                if od < 0 or oh < 0:
                    continue
                row = ((i * out_d + od) * out_h + oh) * tiled_w * rows_columns
                for j in range(0, columns, tile_columns):
                    for kw in range(k_w):
                        panel = ((kd * k_h + kh) * k_w + kw) * c_out * columns + j
                        for w in range(0, tiled_w, TILE_ROWS):
                            multiply_tile(sums, (w * stride[2] + kw) * columns + j,
                                          stride[2] * columns,
                                          grad_rows, row + w * rows_columns, rows_columns, 1,
                                          packed, panel, columns, c_out,
                                          1, 0, 0)
        n = n0 + i
        if channels_last:
            target = grad_in[n, d, h]
            for w in range(width):
                for c in range(c_in):
                    target[w, c] = sums[pad[2] + w, c]
        else:
            for c in range(c_in):
                line = grad_in[n, c, d, h]
                for w in range(width):
                    line[w] = sums[pad[2] + w, c]


def _tiled(count: int, step: int) -> int:
    """``count`` rounded up to a multiple of ``step``."""
    return -(-count // step) * step


class _Geometry:
    """The sizes one convolution call needs, its packed weights and its chunks.

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
        self.kernel = tuple(map(int, weight_shape[2:]))
        self.out_size = tuple(map(int, out_size))
        self.stride = tuple(map(int, stride))
        self.pad = tuple(map(int, pad))
        # The kernels' copy: a (4, 3) table, rows out_size, kernel, stride, pad.
        self.windows = np.array([self.out_size, self.kernel, self.stride, self.pad], np.int64)
        self.tile_columns = TILE_BYTES // self.dtype.itemsize
        self.tiled_w = _tiled(self.out_size[2], TILE_ROWS)  # output rows in whole tiles
        # The weight gradient's tile rows: a window row's KW*C_in values, whole tiles.
        self.span = _tiled(self.kernel[2] * self.c_in, TILE_ROWS)
        # The padded input's width: the padding, whole tiles of outputs (the forward
        # and the input gradient) and the weight gradient's whole tiles of a window row.
        self.padded_width = max(
            self.spatial[2] + 2 * self.pad[2],
            (self.tiled_w - 1) * self.stride[2] + self.kernel[2],
            (self.out_size[2] - 1) * self.stride[2] + -(-self.span // max(self.c_in, 1)))
        self.padded_shape = (self.spatial[0] + 2 * self.pad[0],
                             self.spatial[1] + 2 * self.pad[1], self.padded_width, self.c_in)

    @property
    def band(self) -> int:
        """Output rows per band of :func:`weight_gradient`: their input rows and
        gradient rows fill about :data:`BAND_BYTES`."""
        row_bytes = (self.stride[1] * self.padded_width * self.c_in
                     + self.tiled_w * _tiled(self.c_out, self.tile_columns))
        return max(1, BAND_BYTES // max(row_bytes * self.dtype.itemsize, 1))

    @property
    def products(self) -> int:
        """Multiply-adds of one product over the whole batch (each of the three
        takes as many)."""
        return (self.batch * math.prod(self.out_size) * self.c_out * self.c_in
                * math.prod(self.kernel))

    def packed_weight(self, weight, bias):
        """The weight as :func:`direct_conv` reads it, ``(KD, KH, KW, C_in, columns)``,
        and the bias, ``columns`` long (zeros past ``C_out``)."""
        columns = _tiled(self.c_out, self.tile_columns)
        packed = np.zeros((*self.kernel, self.c_in, columns), self.dtype)
        packed[..., :self.c_out] = weight.transpose(2, 3, 4, 1, 0)
        tiled_bias = np.zeros(columns, self.dtype)
        tiled_bias[:self.c_out] = bias
        return packed, tiled_bias

    def transposed_weight(self, weight):
        """The weight as :func:`input_gradient` reads it, ``(KD, KH, KW, C_out,
        columns)``, ``C_in`` padded to whole tiles."""
        packed = np.zeros((*self.kernel, self.c_out, _tiled(self.c_in, self.tile_columns)),
                          self.dtype)
        packed[..., :self.c_in] = weight.transpose(2, 3, 4, 0, 1)
        return packed

    def chunks(self, *image_bytes):
        """``[first, stop)`` runs of whole images, as many as fit the scratch of
        ``image_bytes`` per image in :data:`CHUNK_BYTES` (at least one)."""
        step = max(1, CHUNK_BYTES // max(sum(image_bytes), 1))
        return [(first, min(first + step, self.batch)) for first in range(0, self.batch, step)]

    def padded(self, x, channels_last, buffer):
        """The images ``x`` (a chunk) as a channels-last copy in ``buffer`` with the
        padding in it (zeros), :attr:`padded_width` wide; a channels-last input that
        needs none of that as it is."""
        if channels_last and not any(self.pad) and self.padded_width == self.spatial[2]:
            return x
        padded = buffer[:len(x)]
        launch(padded_copy, x, padded, np.array(self.pad, np.int64), not channels_last,
               work=padded.size)
        return padded

    def gradient_rows(self, grad, channels_last, buffer):
        """The images' output gradient ``grad`` (a chunk) as ``(images, OD, OH, tiled OW,
        columns)`` in ``buffer``, zeros past ``OW`` and ``C_out``; a channels-last
        gradient of that shape as it is."""
        columns = buffer.shape[-1]
        if channels_last and self.tiled_w == self.out_size[2] and columns == self.c_out:
            return grad
        rows = buffer[:len(grad)]
        launch(padded_copy, grad, rows, np.zeros(3, np.int64), not channels_last,
               work=rows.size)
        return rows


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
    g = _geometry(x, weight, out_shape, stride, pad, channels_last, x.dtype)
    out = memory.empty(out_shape, x.dtype)
    if out.size == 0:
        return out
    packed, tiled_bias = g.packed_weight(weight, bias)
    chunks = g.chunks(math.prod(g.padded_shape) * g.dtype.itemsize)
    buffer = memory.empty((chunks[0][1], *g.padded_shape), g.dtype)
    for first, stop in chunks:
        padded = g.padded(x[first:stop], channels_last, buffer)
        launch(direct_conv, padded, packed, tiled_bias, out, first, g.windows, channels_last,
               work=g.products * (stop - first) // g.batch)
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
    g = _geometry(x, weight, grad.shape, stride, pad, channels_last, dtype)
    if grad.size == 0 or x.size == 0:
        return np.zeros(x.shape, dtype), np.zeros(weight.shape, dtype)
    packed = g.transposed_weight(weight.astype(dtype, copy=False))
    columns = _tiled(g.c_out, g.tile_columns)
    rows_shape = (*g.out_size[:2], g.tiled_w, columns)
    (k_d, k_h, k_w), itemsize = g.kernel, g.dtype.itemsize
    grad_weight = np.zeros((k_d, k_h, g.span, columns), dtype)
    grad_in = memory.empty(x.shape, dtype)
    chunks = g.chunks(math.prod(g.padded_shape) * itemsize, math.prod(rows_shape) * itemsize)
    images = chunks[0][1]
    padded_buffer = memory.empty((images, *g.padded_shape), dtype)
    rows_buffer = memory.empty((images, *rows_shape), dtype)
    for first, stop in chunks:
        work = g.products * (stop - first) // g.batch
        rows = g.gradient_rows(grad[first:stop], channels_last, rows_buffer)
        launch(input_gradient, rows, packed, grad_in, first, g.windows, channels_last,
               g.padded_width, work=work)
        padded = g.padded(x[first:stop], channels_last, padded_buffer)
        launch(weight_gradient, padded, rows, grad_weight, g.windows, g.band, work=work)
    # [kd, kh, kw*C_in + c, o] -> [o, c, kd, kh, kw]
    window = grad_weight[:, :, :k_w * g.c_in, :g.c_out].reshape(k_d, k_h, k_w, g.c_in, g.c_out)
    return grad_in, np.ascontiguousarray(window.transpose(4, 3, 0, 1, 2))


def _geometry(x, weight, out_shape, stride, pad, channels_last, dtype):
    """The :class:`_Geometry` of a call with canonical ``x`` and an output (or
    output gradient) of ``out_shape``, in ``x``'s layout."""
    spatial = x.shape[1:4] if channels_last else x.shape[2:]
    channels = x.shape[-1] if channels_last else x.shape[1]
    spatial_out = out_shape[1:4] if channels_last else out_shape[2:]
    return _Geometry((x.shape[0], *spatial, channels), weight.shape, spatial_out, stride, pad,
                     dtype)
