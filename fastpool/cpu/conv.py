"""Strided convolution on the CPU: direct convolution on a register-blocked micro-kernel.

No im2col and no BLAS: the products run on :func:`multiply_tile`
(:mod:`fastpool.cpu.microkernel`), which keeps a tile of up to ``TILE_ROWS`` rows
by a tile's columns (64 float32 with AVX-512) in vector registers and reads its
operands where they lie, at any element strides (its rows, and its depth, a
value each).  Each of the three products is such a walk:

===============  ===========================  ===========  ==========================
product          tile rows                    columns      depth (blocks)
===============  ===========================  ===========  ==========================
output           outputs of a row             ``C_out``    ``(kw, c_in)`` (``kh``)
input gradient   every ``stride``-th pixel    ``C_in``     ``C_out``
weight gradient  ``c_in`` of one ``(kh, kw)``  ``C_out``    ``ow`` (``oh``)
===============  ===========================  ===========  ==========================

(Where a pixel has fewer channels than a vector's lanes, an image's 3, a window
row's ``KW*C_in`` values take a pixel's ``C_in`` place instead: as the input
gradient's columns, its tile rows outputs, the window rows added up into the
input row; and as the weight gradient's tile rows, read from the input's rows
channels-last with the padding along W as zeros: the input itself where it is
channels-last and every window lies inside its rows, else a copy the input
gradient's tasks make.)

A tile is as wide as its product's columns want (:func:`tile_vectors`: 1 to 4
vectors; a kernel build per width), and its columns are read as whole vectors: the
packed weights, their channels padded to whole tiles (zeros, dropped from the sums),
and, for the weight gradient, the output gradient's rows channels-last, ``C_out``
padded likewise.  That is the gradient itself where it is channels-last with whole
tiles of channels, else a copy of the whole gradient (at most the input's size, as a
rule: ``C_out`` times the output's pixels) that the input gradient's tasks make, a
share of its rows each, in their launch.  The products read their rows and depth in
place, in either layout (the weight gradient's window rows aside), but the output's
depth runs over a window row's ``KW*C_in`` values, one contiguous run in a
channels-last input only, so a channels-first input is copied channels-last: where
windows do not overlap along D and H, each input row is in at most one task's
windows, and each task copies its own window rows; else the input is copied first, a
chunk of whole images (at most :data:`CHUNK_BYTES`) at a time, so that a chunk is
still in cache when the products read it and the scratch stays bounded.  Each copy
moves blocks of a vector's lanes of channels by as many pixels, transposed in
registers (:func:`transpose_block`).  (Run in place, a call per ``kw``, ``C_in``
deep, the forward of a 3-channel 7x7 stem took 1.65 ms where it takes 1.25, and per
tile through a copy of its pixels 2.0.)

Each task owns its tiles' outputs (an output row; an input row, whose gradient
it gathers from every output row its windows cover, and a share of the gradient
rows it copies; tiles of the weight gradient, summed over every image), so no
two threads write an element and
every sum runs in a fixed order: results repeat bit for bit at any thread
count.  Padding adds nothing, so the products skip it: the window rows and
planes outside the input drop out of the blocks, the weight gradient's depth
covers the outputs whose pixel is inside, and the forward's tiles at the ends of
a row, whose windows reach into the padding, read a small copy of their pixels
with zeros around.

Measured on the 2-core Zen 5 benchmark machine, 8x64x56x56 float32, 64 3x3
filters, stride 2, padding 1, channels-last: forward 0.94 ms and backward 2.1 ms,
against torch's (oneDNN) 0.87-0.9 and 2.1-2.2 ms; im2col with OpenBLAS's GEMM
took 2.7 and 5.8 ms (``python -m bench --full --filter conv``).

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
from fastpool.cpu.kernels import per_constants
from fastpool.cpu.microkernel import (
    TILE_ROWS,
    VECTOR_BYTES,
    multiply_tile,
    tile_columns,
    tile_vectors,
    transpose_block,
)
from fastpool.cpu.runtime import launch
from fastpool.cpu.tasks import (
    HELPER_JIT_OPTIONS,
    Constant,
    int_max,
    int_min,
    parallel_kernel,
    reshaped,
    scratch,
    share,
)

# The most bytes of the forward's channels-last copy of a channels-first input one
# chunk of images may fill: a copy is still in cache when the products read it, and
# a big input's scratch stays bounded.  The tests lower it to exercise the chunking.
CHUNK_BYTES = 4 * 2**20

# The bytes of input and gradient rows the weight gradient's tiles sum over in turn:
# a band that stays in the core's L2 cache (1 MB on Zen 4 and 5, 512 kB on Zen 3).
BAND_BYTES = 2**18



@parallel_kernel
def channels_last_copy(part, parts, source, target, pad, channels_last):
    """``target`` ``(N, D, H, W', C')``: ``source`` (``(N, C, D, H, W)``, or
    ``(N, D, H, W, C)`` with ``channels_last``) moved channels-last, each row from
    pixel ``pad`` on, zeros around it and past its ``C`` channels; a row ``(n, d, h)``
    a task (:func:`_copy_padded_row`)."""
    depth, height = target.shape[1], target.shape[2]
    for task in range(*share(target.shape[0] * depth * height, part, parts)):
        h, d, n = task % height, task // height % depth, task // (height * depth)
        _copy_padded_row(source, target[n, d, h], n, d, h, pad, channels_last)


@njit(inline="always")
def _transpose_row(source, s_at, s_channel, target, t_at, t_pixel, channels, width):
    """A row of ``width`` pixels of ``channels`` channels moved channels-last:
    ``target[t_at + w*t_pixel + c] = source[s_at + c*s_channel + w]`` (flat arrays).

    In blocks of a vector's lanes of channels by as many pixels, transposed in
    registers (:func:`transpose_block`), the last block of each axis flush with its
    end (over values the block before it copied: written twice, alike); rows of
    fewer channels or pixels a value at a time.  (A value at a time, each store
    ``t_pixel`` apart, a 5x64x56x56 copy took 0.31-0.35 ms on one core; in blocks,
    0.11-0.13.)"""
    lanes = VECTOR_BYTES // source.itemsize
    if channels >= lanes and width >= lanes:
        for c_block in range(-(-channels // lanes)):
            c0 = int_min(c_block * lanes, channels - lanes)
            for w_block in range(-(-width // lanes)):
                w0 = int_min(w_block * lanes, width - lanes)
                transpose_block(source, s_at + c0 * s_channel + w0, s_channel,
                                target, t_at + w0 * t_pixel + c0, t_pixel)
    else:  # through views, whose indices (loop counters) need no wraparound checks
        pixels = reshaped(target[t_at:t_at + width * t_pixel], (width, t_pixel))
        for c in range(channels):
            line = source[s_at + c * s_channel:s_at + c * s_channel + width]
            for w in range(width):
                pixels[w, c] = line[w]


@njit(inline="always")
def _tile(t, count):
    """Tile ``t`` of ``count`` rows cut into tiles of ``TILE_ROWS``: its first row and
    its rows (the last tile has what is left).  A tile of fewer rows runs in pairs
    of rows, then one (see :func:`multiply_tile`), and a row alone leaves the
    multiply-adds waiting on its loads: whole tiles and one tail have at most one
    such row, where near-equal tiles (5, 6, 5, 6, 6 rows for 28) had one per tile
    of an odd count."""
    first = t * TILE_ROWS
    return first, int_min(TILE_ROWS, count - first)


@njit(inline="always")
def _span(offset, stride, pad, first, stop, count):
    """The outputs ``o`` in ``[lo, hi)``, within ``[0, count)``, whose input index
    ``o*stride - pad + offset`` lies in ``[first, stop)``."""
    lo = -((pad - offset + first) // -stride)  # ceil division
    hi = (stop - 1 + pad - offset) // stride + 1
    lo = int_min(int_max(lo, 0), count)
    return lo, int_max(int_min(hi, count), lo)


@njit(inline="always")
def _window_rows(output, stride, pad, kernel, size):
    """The kernel offsets ``[lo, hi)`` that put output ``output``'s window inside the
    input's ``[0, size)``."""
    first = output * stride - pad
    lo = int_min(int_max(-first, 0), kernel)
    return lo, int_max(int_min(size - first, kernel), lo)


@per_constants
def direct_conv(vectors, copies_rows):
    """:func:`direct_conv` for tiles ``vectors`` vectors wide (``C_out``'s, see
    ``_Geometry``), reading a channels-last ``x`` in place or, ``copies_rows``, a
    channels-first one through a copy of each task's window rows."""

    @parallel_kernel
    def direct_conv(part, parts, x, packed, bias, out, n0, windows, channels_last):
        """Output rows ``(n0 + i, od, oh)`` of the convolution of ``x`` (channels-last
        ``(images, D, H, W, C_in)``, or channels-first ``(images, C_in, D, H, W)``
        with ``copies_rows``) by ``packed`` (the weight as ``(KD, KH, KW, C_in,
        columns)``, ``C_out`` padded with zeros to whole tiles), plus ``bias``
        (``columns`` long), stored in ``out`` (``(N, OD, OH, OW, C_out)``, or
        channels-first).

        A task owns one output row, summed in a scratch row: per tile of outputs, one
        :func:`multiply_tile` call per ``kd`` whose windows' plane is inside the input,
        over the window rows inside it as its blocks, each ``KW*C_in`` values deep (a
        window row's pixels are adjacent).  The outputs whose windows lie inside the
        row read their rows in place; the few at its ends, whose windows reach into
        the padding, read a copy of their pixels with zeros around (``edge``).  With
        ``copies_rows`` the task first copies its window rows channels-last (each
        input row is some one task's when windows do not overlap along D and H).
        ``windows``: the rows out_size, kernel, stride, pad (see ``_Geometry.windows``).
        """
        out_size, kernel, stride, pad = windows[0], windows[1], windows[2], windows[3]
        out_d, out_h, out_w = out_size[0], out_size[1], out_size[2]
        k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
        (c_in, depth, height, width), _ = _layout(x.shape, not copies_rows)
        columns = packed.shape[4]
        c_out = out.shape[4] if channels_last else out.shape[1]
        tile_width = vectors * VECTOR_BYTES // packed.itemsize
        row_depth = k_w * c_in  # a window row's values, adjacent in the input row
        sums = scratch((out_w, columns), out.dtype)
        edge_width = (TILE_ROWS - 1) * stride[2] + k_w
        edge = scratch((k_h, edge_width, c_in), x.dtype)
        # The task's window rows, channels-last (a row of each plane when not copied).
        rows = scratch((k_d, k_h, width, c_in) if copies_rows else (1, 1, 1, 1), x.dtype)
        tiles = -(-out_w // TILE_ROWS)
        # The outputs whose windows lie inside the input row.
        inner_lo = _span(0, stride[2], pad[2], 0, width, out_w)[0]
        inner_hi = _span(k_w - 1, stride[2], pad[2], 0, width, out_w)[1]
        for task in range(*share(x.shape[0] * out_d * out_h, part, parts)):
            oh, od, i = task % out_h, task // out_h % out_d, task // (out_h * out_d)
            for w in range(out_w):
                for c in range(columns):
                    sums[w, c] = bias[c]
            kd_lo, kd_hi = _window_rows(od, stride[0], pad[0], k_d, depth)
            kh_lo, kh_hi = _window_rows(oh, stride[1], pad[1], k_h, height)
            h = oh * stride[1] - pad[1] + kh_lo
            d0 = od * stride[0] - pad[0]
            if copies_rows:  # each channel's runs read in turn
                _copy_window_rows(x[i], rows, d0 + kd_lo, kd_hi - kd_lo, h, kh_hi - kh_lo)
                image, d_first, h_first = rows, -kd_lo, 0
            else:
                image, d_first, h_first = x[i], d0, h
            # One array type for the image's values and the edge's.
            image_values, edge_values = reshaped(image, -1), reshaped(edge, -1)
            for j in range(0, columns, tile_width):  # a panel of the weight, kept in cache
                for kd in range(kd_lo, kd_hi):
                    d = d_first + kd
                    panel = ((kd * k_h + kh_lo) * row_depth) * columns + j
                    for tile in range(tiles):
                        w, rows_in_tile = _tile(tile, out_w)
                        first = w * stride[2] - pad[2]  # the tile's first window's first pixel
                        if inner_lo <= w and w + rows_in_tile <= inner_hi:  # inside the row
                            source = image_values
                            at = ((d * image.shape[1] + h_first) * width + first) * c_in
                            source_row = width * c_in
                        else:  # the row's ends: a copy of their pixels, zeros around
                            for t in range(kh_hi - kh_lo):
                                for p in range(edge_width):
                                    inside = 0 <= first + p < width
                                    for c in range(c_in):
                                        edge[t, p, c] = (image[d, h_first + t, first + p, c]
                                                         if inside else 0)
                            source, at, source_row = edge_values, 0, edge_width * c_in
                        # One call site: each compiles the micro-kernel's variants anew.
                        multiply_tile(rows_in_tile, sums, w * columns + j, columns,
                                      source, at, stride[2] * c_in, 1,
                                      packed, panel, columns, row_depth,
                                      kh_hi - kh_lo, source_row, row_depth * columns, vectors)
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

    return direct_conv


@njit(inline="always")
def _copy_window_rows(image, rows, d, planes, h, count):
    """``rows[p, t]`` (channels-last, ``(KD, KH, W, C)``): row ``h + t`` of plane
    ``d + p`` of ``image`` (channels-first ``(C, D, H, W)``), for ``p < planes`` and
    ``t < count``."""
    channels, depth, height, width = image.shape
    values, copied = reshaped(image, -1), reshaped(rows, -1)
    for p in range(planes):
        for t in range(count):
            _transpose_row(values, ((d + p) * height + h + t) * width, depth * height * width,
                           copied, (p * rows.shape[1] + t) * width * channels, channels,
                           channels, width)


@njit(**HELPER_JIT_OPTIONS)
def _layout(shape, channels_last):
    """The sizes ``(C, D, H, W)`` of a C-contiguous array of images of ``shape``
    (``(N, C, D, H, W)``, or channels-last ``(N, D, H, W, C)``) and its element
    steps ``(image, channel, d, h, w)``."""
    if channels_last:
        sizes = (shape[4], shape[1], shape[2], shape[3])
        channel, pixel = 1, shape[4]
    else:
        sizes = (shape[1], shape[2], shape[3], shape[4])
        channel, pixel = shape[2] * shape[3] * shape[4], 1
    row = sizes[3] * pixel
    plane = sizes[2] * row
    image = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    return sizes, (image, channel, plane, row, pixel)


@per_constants
def weight_gradient(vectors, window_rows):
    """:func:`weight_gradient` for tiles ``vectors`` vectors wide (``C_out``'s), its
    tiles' rows a pixel's ``C_in`` or (``window_rows``) a window row's ``KW*C_in``
    values."""

    @parallel_kernel
    def weight_gradient(part, parts, x, grad_rows, grad_weight, windows, band, channels_last):
        """The weight gradient, into ``grad_weight`` (zeros), laid out ``(KD, KH, KW,
        C_in, columns)`` (``[kd, kh, kw, c, o]``: the gradient of weight ``[o, c, kd,
        kh, kw]``).

        ``x``: the input, ``(N, C_in, D, H, W)`` or channels-last; ``grad_rows``: the
        output's gradient, channels-last, ``C_out`` padded with zeros to ``columns``
        (the micro-kernel reads a row's output channels as whole vectors).  A tile is
        ``TILE_ROWS`` input channels of one ``(kd, kh, kw)`` by a tile of output
        channels, and a task owns a share of the tiles.  It walks the images' output
        rows in bands of ``band`` rows, small enough that a band's input and gradient
        rows stay in cache while every tile of the share sums over them: per tile, one
        :func:`multiply_tile` call, the band's rows whose windows' row is inside the
        input as its blocks, the outputs of a row whose window pixel is inside it as
        its depth (padding adds nothing).  Each tile's sum runs over images, ``od``,
        ``oh``, ``ow`` in order, whatever the shares.

        With ``window_rows``, ``x`` is the input's rows channels-last with the padding
        along W as zeros (``(N, D, H, W', C_in)``, pixel ``pad`` the row's first), and
        a tile's rows are ``TILE_ROWS`` of a window row's ``KW*C_in`` values, adjacent
        there: a 7x7 stem's window row of 3 channels, 21 values, is three whole
        tiles and a tail of 3 rows, where each ``kw``'s 3 channels ran as a pair of
        rows and a row.  (The walk is the same, with
        the window row as one ``kw`` of ``KW*C_in`` channels, a pixel ``C_in``
        apart, and no padding.)
        """
        out_size, kernel, stride, pad = windows[0], windows[1], windows[2], windows[3]
        out_d, out_h, out_w = out_size[0], out_size[1], out_size[2]
        k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
        (c_in, depth, height, width), (image, channel, plane, row, pixel) = _layout(
            x.shape, channels_last)
        pad_w = pad[2]
        if window_rows:
            c_in, k_w, pad_w = k_w * c_in, 1, 0
        columns = grad_rows.shape[4]
        tile_width = vectors * VECTOR_BYTES // grad_weight.itemsize
        row_tiles, column_tiles = -(-c_in // TILE_ROWS), columns // tile_width
        first, stop = share(k_d * k_h * k_w * row_tiles * column_tiles, part, parts)
        x_values = reshaped(x, -1)
        for i in range(x.shape[0]):
            for od in range(out_d):
                for band_first in range(0, out_h, band):
                    band_stop = int_min(band_first + band, out_h)
                    for task in range(first, stop):
                        j = task % column_tiles * tile_width
                        c, rows = _tile(task // column_tiles % row_tiles, c_in)
                        kw = task // (column_tiles * row_tiles) % k_w
                        kh = task // (column_tiles * row_tiles * k_w) % k_h
                        kd = task // (column_tiles * row_tiles * k_w * k_h)
                        d = od * stride[0] - pad[0] + kd
                        oh_lo, oh_hi = _span(kh, stride[1], pad[1], 0, height, out_h)
                        oh_lo, oh_hi = int_max(oh_lo, band_first), int_min(oh_hi, band_stop)
                        ow_lo, ow_hi = _span(kw, stride[2], pad_w, 0, width, out_w)
                        if d < 0 or d >= depth or oh_lo >= oh_hi:
                            continue
                        h = oh_lo * stride[1] - pad[1] + kh
                        pixels = (i * image + d * plane + h * row
                                  + (ow_lo * stride[2] - pad_w + kw) * pixel + c * channel)
                        gradient = ((((i * out_d + od) * out_h + oh_lo) * out_w + ow_lo) * columns
                                    + j)
                        target = (((kd * k_h + kh) * k_w + kw) * c_in + c) * columns + j
                        multiply_tile(rows, grad_weight, target, columns,
                                      x_values, pixels, channel, stride[2] * pixel,
                                      grad_rows, gradient, columns, ow_hi - ow_lo,
                                      oh_hi - oh_lo, stride[1] * row, out_w * columns, vectors)

    return weight_gradient


@njit(inline="always")
def _source(position, pad, offset, stride, size):
    """The output index whose window puts kernel ``offset`` on input ``position``, or -1."""
    t = position + pad - offset
    if t < 0 or t % stride != 0 or t // stride >= size:
        return -1
    return t // stride


@njit(inline="always")
def _store_window_rows(grad_in, sums, n, d, h, stride, pad, k_w, channels_last):
    """Input row ``(n, d, h)`` of ``grad_in`` from ``sums``, one output's window row
    (``KW*C_in`` values) per row, each pixel's the sum of the window rows that reach
    it, in order of the outputs (zero where none does: gaps, padding)."""
    if channels_last:
        width, c_in = grad_in.shape[3], grad_in.shape[4]
        target = grad_in[n, d, h]
        for x in range(width):
            for c in range(c_in):
                target[x, c] = 0
        for w in range(sums.shape[0]):
            for kw in range(k_w):
                x = w * stride - pad + kw
                if 0 <= x < width:
                    for c in range(c_in):
                        target[x, c] += sums[w, kw * c_in + c]
    else:
        c_in, width = grad_in.shape[1], grad_in.shape[4]
        for c in range(c_in):
            line = grad_in[n, c, d, h]
            for x in range(width):
                line[x] = 0
            for w in range(sums.shape[0]):
                for kw in range(k_w):
                    x = w * stride - pad + kw
                    if 0 <= x < width:
                        line[x] += sums[w, kw * c_in + c]


@njit(inline="always")
def _copy_padded_row(x, target, n, d, h, pad, channels_last):
    """``target`` (``(W', C')``): row ``(n, d, h)`` of ``x`` (``(N, C, D, H, W)``, or
    ``(N, D, H, W, C)`` with ``channels_last``) channels-last, from pixel ``pad`` on,
    zeros around it and past its ``C`` channels."""
    columns = target.shape[1]
    if channels_last:
        line = x[n, d, h]
        width, channels = line.shape[0], line.shape[1]
        if columns == channels:  # one run of values (as flat loops: they vectorise)
            values, run = reshaped(line, -1), reshaped(target, -1)
            for q in range(pad * channels):
                run[q] = 0
            for q in range(width * channels):
                run[pad * channels + q] = values[q]
        else:
            for p in range(pad):
                for c in range(columns):
                    target[p, c] = 0
            for w in range(width):
                for c in range(channels):
                    target[pad + w, c] = line[w, c]
    else:
        channels, depth, height, width = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
        for p in range(pad):
            for c in range(columns):
                target[p, c] = 0
        _transpose_row(reshaped(x, -1), ((n * channels * depth + d) * height + h) * width,
                       depth * height * width, reshaped(target, -1), pad * columns, columns,
                       channels, width)
    if columns > channels:
        for w in range(pad, pad + width):
            for c in range(channels, columns):
                target[w, c] = 0
    for p in range(pad + width, target.shape[0]):
        for c in range(columns):
            target[p, c] = 0


@per_constants
def input_gradient(vectors, window_rows):
    """:func:`input_gradient` for tiles ``vectors`` vectors wide, its columns a window
    row's values (``window_rows``, pixels of fewer channels than a vector's lanes) or
    a pixel's ``C_in``."""

    @parallel_kernel
    def input_gradient(part, parts, grad, packed, grad_in, windows, channels_last, grad_rows,
                       x, x_rows):
        """Input rows ``(n, d, h)`` of the gradient ``grad_in`` (``(N, C_in, D, H, W)``,
        or channels-last ``(N, D, H, W, C_in)``), from ``grad`` (the output's gradient,
        in the same layout) and ``packed`` (the weight as ``(KD, KH, KW, C_out,
        columns)``, ``C_in`` padded to whole tiles; or, ``window_rows``, as ``(KD, KH,
        1, C_out, columns)``, a window row's ``KW*C_in`` values padded).

        A gather: a task owns one input row, summed in a scratch row (or in the row
        itself, channels-last, where its channels fill whole tiles and no window
        reaches into padding along W), and takes from every output row whose windows
        cover it a tile of ``TILE_ROWS`` outputs at a time, ``C_out`` deep (read where
        they lie: adjacent channels-last, a plane apart channels-first).  Its columns
        are, per window offset ``kw``, the ``C_in`` of the outputs' ``kw`` pixels,
        ``stride`` pixels apart in a scratch row that spans the padding; or, for
        pixels of few channels (``window_rows``), each output's whole window row,
        ``KW*C_in`` values (3 input channels fill a 48-column tile with a 16-wide
        window, not 3 of 16), added up into the input row where windows overlap.
        ``windows``: the rows out_size, kernel, stride, pad.

        Each task also copies a share of the gradient's rows into ``grad_rows``
        (channels-last, ``C_out`` padded with zeros to its last axis), as
        :func:`weight_gradient` reads them, unless ``grad_rows`` is empty (``grad`` is
        read in place): a copy without a launch of its own.  With ``window_rows`` it
        copies its row of ``x`` (the input, in ``grad_in``'s layout) into ``x_rows``
        as well, channels-last with the padding along W as zeros, for the weight
        gradient's window rows, unless ``x_rows`` is empty.
        """
        out_size, kernel, stride, pad = windows[0], windows[1], windows[2], windows[3]
        out_d, out_h, out_w = out_size[0], out_size[1], out_size[2]
        k_d, k_h, k_w = kernel[0], kernel[1], kernel[2]
        (c_in, depth, height, width), _ = _layout(grad_in.shape, channels_last)
        _, (out_image, out_channel, out_plane, out_row, out_pixel) = _layout(grad.shape,
                                                                             channels_last)
        groups, c_out, columns = packed.shape[2], packed.shape[3], packed.shape[4]
        tile_width = vectors * VECTOR_BYTES // packed.itemsize
        tiles = -(-out_w // TILE_ROWS)
        grad_values = reshaped(grad, -1)
        # The scratch row: an output's window row per row, or every pixel a window puts
        # a kernel offset on, padding included.
        sums = scratch((out_w if window_rows else
                        int_max((out_w - 1) * stride[2] + k_w, pad[2] + width), columns),
                       grad_in.dtype)
        # A tile's rows: outputs a row apart, or their pixels ``stride`` apart.
        tile_row = columns if window_rows else stride[2] * columns
        # Sums go straight into a channels-last row of whole tiles of channels where no
        # window reaches past its ends (no padding along W): the row's copy from the
        # scratch row took a fifth of a 2x2 stride-2 gradient of 32 channels.
        in_place = (channels_last and not window_rows and columns == c_in and pad[2] == 0
                    and (out_w - 1) * stride[2] + k_w <= width)
        for task in range(*share(grad.shape[0] * depth * height, part, parts)):
            h, d, n = task % height, task // height % depth, task // (height * depth)
            if window_rows and x_rows.size:
                _copy_padded_row(x, x_rows[n, d, h], n, d, h, pad[2], channels_last)
            row = reshaped(grad_in[n, d, h] if in_place else sums, -1)
            for i in range(row.size):
                row[i] = 0
            for kd in range(k_d):
                od = _source(d, pad[0], kd, stride[0], out_d)
                for kh in range(k_h):
                    oh = _source(h, pad[1], kh, stride[1], out_h)
                    if od < 0 or oh < 0:
                        continue
                    out_origin = n * out_image + od * out_plane + oh * out_row
                    for j in range(0, columns, tile_width):
                        for kw in range(groups):
                            panel = ((kd * k_h + kh) * groups + kw) * c_out * columns + j
                            for tile in range(tiles):
                                w, rows = _tile(tile, out_w)
                                multiply_tile(rows, row, w * tile_row + kw * columns + j,
                                              tile_row,
                                              grad_values, out_origin + w * out_pixel, out_pixel,
                                              out_channel,
                                              packed, panel, columns, c_out,
                                              1, 0, 0, vectors)
            if window_rows:  # zeros, then each window's pixels from its output's row
                _store_window_rows(grad_in, sums, n, d, h, stride[2], pad[2], k_w,
                                   channels_last)
            elif in_place:  # the sums are the row's already
                continue
            elif channels_last:
                target = grad_in[n, d, h]
                for p in range(width):
                    for c in range(c_in):
                        target[p, c] = sums[pad[2] + p, c]
            else:
                for c in range(c_in):
                    line = grad_in[n, c, d, h]
                    for p in range(width):
                        line[p] = sums[pad[2] + p, c]
        rows_wanted = grad.shape[0] * out_d * out_h if grad_rows.size else 0
        for task in range(*share(rows_wanted, part, parts)):
            oh, od, n = task % out_h, task // out_h % out_d, task // (out_h * out_d)
            _copy_padded_row(grad, grad_rows[n, od, oh], n, od, oh, 0, channels_last)

    return input_gradient


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
        # The input gradient's columns, and the weight gradient's tile rows: a
        # window row's values where a pixel has fewer channels than a vector's lanes
        # (an image's 3: patch embeddings, 16-wide windows of 3 channels in 48
        # columns, ran 1.8x faster than 3 of a 16-wide tile; a 7x7 stride-2 stem's
        # 21 in 32 columns, once, against 3 in 16 per kw, 3.5x), else a pixel's
        # channels (16 or 32 channels of 2x2 windows ran 1.2-1.7x slower as window
        # rows, channels-first).
        self.window_rows = self.c_in < tile_columns(self.dtype.itemsize, 1)
        self.in_columns = self.c_in * (self.kernel[2] if self.window_rows else 1)
        # Windows that do not overlap along D and H: each input row is in at most one
        # output row's windows, so the forward's tasks copy a channels-first input's rows
        # themselves, each once (a 2x2 stride-2 convolution of 32 channels, 8x32x64x64:
        # 0.50 -> 0.39 ms); overlapping windows (3x3 stride 2) would copy rows 1.5
        # times, and take a copy of the whole input (chunked) instead.
        self.rows_apart = (self.kernel[0] <= self.stride[0]
                           and self.kernel[1] <= self.stride[1])
        # Tiles as wide as each product's columns want (see tile_vectors): C_out's for
        # the output and the weight gradient, the input gradient's own.
        self.out_vectors = tile_vectors(self.c_out, self.dtype.itemsize)
        self.in_vectors = tile_vectors(self.in_columns, self.dtype.itemsize)

    @property
    def out_columns(self) -> int:
        """``C_out`` padded to whole tiles: the columns of the packed weight, of the
        weight gradient and of the channels-last output gradient the kernels read."""
        return _tiled(self.c_out, tile_columns(self.dtype.itemsize, self.out_vectors))

    @property
    def padded_width(self) -> int:
        """Pixels of an input row padded along W as every window reads it: the
        padding at the start, and at the end as far as the last window reaches."""
        return max(self.pad[2] + self.spatial[2],
                   (self.out_size[2] - 1) * self.stride[2] + self.kernel[2])

    @property
    def band(self) -> int:
        """Output rows per band of :func:`weight_gradient`: their input rows and
        gradient rows fill about :data:`BAND_BYTES`."""
        width = self.padded_width if self.window_rows else self.spatial[2]
        row_bytes = self.stride[1] * width * self.c_in + self.out_size[2] * self.out_columns
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
        columns = self.out_columns
        packed = np.zeros((*self.kernel, self.c_in, columns), self.dtype)
        packed[..., :self.c_out] = weight.transpose(2, 3, 4, 1, 0)
        tiled_bias = np.zeros(columns, self.dtype)
        tiled_bias[:self.c_out] = bias
        return packed, tiled_bias

    def transposed_weight(self, weight):
        """The weight as :func:`input_gradient` reads it, ``(KD, KH, KW, C_out,
        columns)``, ``C_in`` padded to whole tiles; or, for window rows, ``(KD, KH, 1,
        C_out, columns)``, ``[kd, kh, 0, o, kw*C_in + c]``, ``KW*C_in`` padded."""
        columns = _tiled(self.in_columns, tile_columns(self.dtype.itemsize, self.in_vectors))
        k_d, k_h, k_w = self.kernel
        if self.window_rows:
            packed = np.zeros((k_d, k_h, 1, self.c_out, columns), self.dtype)
            packed[:, :, 0, :, :self.in_columns] = weight.transpose(2, 3, 0, 4, 1).reshape(
                k_d, k_h, self.c_out, self.in_columns)
            return packed
        packed = np.zeros((*self.kernel, self.c_out, columns), self.dtype)
        packed[..., :self.c_in] = weight.transpose(2, 3, 4, 0, 1)
        return packed

    def chunks(self, image_bytes):
        """``[first, stop)`` runs of whole images, as many as fit the copies of
        ``image_bytes`` per image in :data:`CHUNK_BYTES` (at least one; all of them
        without copies)."""
        step = max(1, CHUNK_BYTES // image_bytes) if image_bytes else self.batch
        return [(first, min(first + step, self.batch)) for first in range(0, self.batch, step)]


class _ChannelsLast:
    """Chunks of an array of images as :func:`direct_conv` reads them: channels-last,
    the array itself when it is, else copied chunk by chunk into one buffer.

    Parameters
    ----------
    array : numpy.ndarray
        Canonical, ``(N, C, D, H, W)`` or, ``channels_last``, ``(N, D, H, W, C)``.
    channels_last : bool
        Its layout.
    """

    def __init__(self, array, channels_last):
        self.array, self.copied = array, not channels_last
        self.shape = array.shape if channels_last else (array.shape[0], *array.shape[2:],
                                                        array.shape[1])
        self.image_bytes = (math.prod(self.shape[1:]) * array.itemsize) if self.copied else 0
        self.buffer = None

    def chunk(self, first, stop):
        """Images ``[first, stop)``, channels-last."""
        images = self.array[first:stop]
        if not self.copied:
            return images
        if self.buffer is None:  # sized by the first chunk, the largest
            self.buffer = memory.empty((stop - first, *self.shape[1:]), self.array.dtype)
        target = self.buffer[:stop - first]
        launch(channels_last_copy, images, target, 0, Constant(False), work=target.size)
        return target


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
    layout = Constant(channels_last)
    if not channels_last and g.rows_apart:  # each task copies its own window rows
        launch(direct_conv((g.out_vectors, True)), x, packed, tiled_bias, out, 0, g.windows,
               layout, work=g.products)
        return out
    source = _ChannelsLast(x, channels_last)
    for first, stop in g.chunks(source.image_bytes):
        launch(direct_conv((g.out_vectors, False)), source.chunk(first, stop), packed,
               tiled_bias, out, first, g.windows, layout,
               work=g.products * (stop - first) // g.batch)
    return out


def conv_backward(grad, x, weight, stride, pad, channels_last=False, stream=None,
                  output_mask=(True, True)):
    """Gradients of :func:`conv` with respect to its input and weight.

    Parameters
    ----------
    grad : numpy.ndarray
        The output's gradient, C-contiguous, in the layout of ``x``.
    x, weight, stride, pad, channels_last
        As :func:`conv`'s.
    stream : None
        Unused.
    output_mask : pair of bool
        Whether to compute each gradient; the other comes back as None.

    Returns
    -------
    grad_in : numpy.ndarray or None
        Of ``x``'s shape, and ``grad``'s dtype (as torch's).
    grad_weight : numpy.ndarray or None
        Of ``weight``'s shape, and ``grad``'s dtype.
    """
    wants_input, wants_weight = output_mask
    dtype = grad.dtype
    x = x.astype(dtype, copy=False)
    g = _geometry(x, weight, grad.shape, stride, pad, channels_last, dtype)
    if grad.size == 0 or x.size == 0:
        return (np.zeros(x.shape, dtype) if wants_input else None,
                np.zeros(weight.shape, dtype) if wants_weight else None)
    layout = Constant(channels_last)
    no_copy = np.empty((0, 0, 0, 0, 0), dtype)
    grad_rows = copied = x_rows = x_copied = no_copy
    if wants_weight:
        if channels_last and g.c_out == g.out_columns:  # read in place
            grad_rows, copied = grad, np.empty((0, 0, 0, 0, g.out_columns), dtype)
        else:
            grad_rows = copied = memory.empty((g.batch, *g.out_size, g.out_columns), dtype)
        # The weight gradient's window rows read the input's rows channels-last, padded
        # along W: x itself where it is channels-last and every window lies inside its
        # rows (patch embeddings), else a copy (made below, as the gradient's is).
        x_rows = x
        if g.window_rows and not (channels_last and g.padded_width == g.spatial[2]):
            x_rows = x_copied = memory.empty((g.batch, *g.spatial[:2], g.padded_width,
                                              g.c_in), dtype)
    grad_in = None
    if wants_input:  # its tasks make the weight gradient's copies too
        grad_in = memory.empty(x.shape, dtype)
        launch(input_gradient((g.in_vectors, g.window_rows)), grad,
               g.transposed_weight(weight.astype(dtype, copy=False)), grad_in, g.windows,
               layout, copied, x, x_copied, work=g.products)
    else:  # by the forward's copy kernel (no build of the input gradient's)
        for source, target, pad in ((grad, copied, 0), (x, x_copied, g.pad[2])):
            if target.size:
                launch(channels_last_copy, source, target, pad, layout, work=target.size)
    if not wants_weight:
        return grad_in, None
    grad_weight = np.zeros((*g.kernel, g.c_in, g.out_columns), dtype)
    launch(weight_gradient((g.out_vectors, g.window_rows)), x_rows, grad_rows, grad_weight,
           g.windows, g.band, Constant(True) if g.window_rows else layout, work=g.products)
    # [kd, kh, kw, c, o] -> [o, c, kd, kh, kw]
    return grad_in, np.ascontiguousarray(grad_weight[..., :g.c_out].transpose(4, 3, 0, 1, 2))


def _geometry(x, weight, out_shape, stride, pad, channels_last, dtype):
    """The :class:`_Geometry` of a call with canonical ``x`` and an output (or
    output gradient) of ``out_shape``, in ``x``'s layout."""
    spatial = x.shape[1:4] if channels_last else x.shape[2:]
    channels = x.shape[-1] if channels_last else x.shape[1]
    spatial_out = out_shape[1:4] if channels_last else out_shape[2:]
    return _Geometry((x.shape[0], *spatial, channels), weight.shape, spatial_out, stride, pad,
                     dtype)
