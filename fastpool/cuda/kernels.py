"""numba.cuda kernels over canonical 5-D arrays ``(batch, D, H, W, C)``.

Channels-first input runs as ``(planes, D, H, W, 1)``, a free view, so one
kernel per op serves both layouts and 1-D to 3-D.  Forward kernels run one
thread per output element and backward kernels one thread per *input*
element, gathering from the outputs whose windows cover it: every element is
written once, with no atomics, so gradients are bit-identical run to run.
Consecutive threads take consecutive elements of the innermost axis (W, or C
channels-last), so global memory accesses coalesce.  All index arithmetic is
64-bit and every kernel is a grid-stride loop.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from fastpool._config import CUDA_JIT_OPTIONS
from fastpool._scalar import torch_power


@cuda.jit(device=True, inline=True)
def _first_and_stride():
    start = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    return start, np.int64(cuda.gridDim.x) * cuda.blockDim.x


_power = cuda.jit(device=True, inline=True)(torch_power)


@cuda.jit(device=True, inline=True)
def _unravel(i, shape):
    """(n, d, h, w, c) of flat index i in a C-ordered array of 5-D ``shape``."""
    c = i % shape[4]
    i //= shape[4]
    w = i % shape[3]
    i //= shape[3]
    h = i % shape[2]
    i //= shape[2]
    d = i % shape[1]
    return i // shape[1], d, h, w, c


@cuda.jit(**CUDA_JIT_OPTIONS)
def max_pool(x, out, indices, start, stop, step, lowest, with_indices):
    height, width = x.shape[2], x.shape[3]
    i, grid = _first_and_stride()
    while i < out.size:
        n, od, oh, ow, c = _unravel(i, out.shape)
        d0, d1 = start[0, od], stop[0, od]
        h0, h1 = start[1, oh], stop[1, oh]
        w0, w1 = start[2, ow], stop[2, ow]
        best = lowest
        best_at = (d0 * height + h0) * width + w0
        d = d0
        while d < d1:
            h = h0
            while h < h1:
                w = w0
                while w < w1:
                    value = x[n, d, h, w, c]
                    # torch's update: a NaN always wins, ties keep the first.
                    if value > best or value != value:
                        best = value
                        best_at = (d * height + h) * width + w
                    w += step[2]
                h += step[1]
            d += step[0]
        out[n, od, oh, ow, c] = best
        if with_indices:
            indices[n, od, oh, ow, c] = best_at
        i += grid


@cuda.jit(device=True, inline=True)
def _window_sum(x, n, c, d0, d1, h0, h1, w0, w1, step, power, total):
    d = d0
    while d < d1:
        h = h0
        while h < h1:
            w = w0
            while w < w1:
                if power is None:
                    total += x[n, d, h, w, c]
                else:
                    total += _power(x[n, d, h, w, c], power)
                w += step[2]
            h += step[1]
        d += step[0]
    return total


@cuda.jit(**CUDA_JIT_OPTIONS)
def sum_pool(x, out, start, stop, step, divisor, scale, power, zero):
    """Averages (power None) or Lp norms; ``zero`` sets the accumulator type."""
    i, grid = _first_and_stride()
    while i < out.size:
        n, od, oh, ow, c = _unravel(i, out.shape)
        total = _window_sum(x, n, c, start[0, od], stop[0, od], start[1, oh], stop[1, oh],
                            start[2, ow], stop[2, ow], step, power, zero)
        mean = total * (scale / (divisor[0, od] * divisor[1, oh] * divisor[2, ow]))
        if power is None:
            out[n, od, oh, ow, c] = mean
        else:
            out[n, od, oh, ow, c] = _power(mean, 1.0 / power)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def output_coefficients(grad_out, x, coefficient, start, stop, step, divisor, scale, power,
                        zero):
    """d loss / d (window sum of x**p) per output, by torch's avg/lp_pool chain rule."""
    i, grid = _first_and_stride()
    while i < grad_out.size:
        n, od, oh, ow, c = _unravel(i, grad_out.shape)
        window_divisor = divisor[0, od] * divisor[1, oh] * divisor[2, ow]
        grad = grad_out[n, od, oh, ow, c] * (zero + 1)
        if power is None:
            coefficient[n, od, oh, ow, c] = grad * scale / window_divisor
        else:
            total = _window_sum(x, n, c, start[0, od], stop[0, od], start[1, oh],
                                stop[1, oh], start[2, ow], stop[2, ow], step, power, zero)
            mean = total / window_divisor
            scaled = grad * (1.0 / power) * _power(mean * scale, 1.0 / power - 1.0) * scale
            if mean != mean:
                scaled = 0.0 * scaled  # torch.sign(nan) is 0
            elif mean == 0.0:
                scaled = 0.0  # relu's gradient at 0
            coefficient[n, od, oh, ow, c] = scaled / window_divisor
        i += grid


@cuda.jit(device=True, inline=True)
def _covers(position, o, start, stop, step, axis):
    # The modulo only matters for dilation; a division per test is not free.
    return position < stop[axis, o] and (
        step[axis] == 1 or (position - start[axis, o]) % step[axis] == 0)


@cuda.jit(**CUDA_JIT_OPTIONS)
def sum_backward(coefficient, x, grad_in, first_out, last_out, start, stop, step, power,
                 zero):
    """grad_in[i] = factor(x[i]) * sum of the coefficients of the windows covering i."""
    i, grid = _first_and_stride()
    while i < grad_in.size:
        n, d, h, w, c = _unravel(i, grad_in.shape)
        total = zero
        for od in range(first_out[0, d], last_out[0, d]):
            if _covers(d, od, start, stop, step, 0):
                for oh in range(first_out[1, h], last_out[1, h]):
                    if _covers(h, oh, start, stop, step, 1):
                        for ow in range(first_out[2, w], last_out[2, w]):
                            if _covers(w, ow, start, stop, step, 2):
                                total += coefficient[n, od, oh, ow, c]
        if power is None:
            grad_in[n, d, h, w, c] = total
        else:
            grad_in[n, d, h, w, c] = total * (power * _power(x[n, d, h, w, c], power - 1.0))
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def max_backward(grad_out, indices, grad_in, first_out, last_out, start, stop, step, zero):
    """grad_in[i] = sum of grad_out over the covering windows whose maximum is i."""
    height, width = grad_in.shape[2], grad_in.shape[3]
    i, grid = _first_and_stride()
    while i < grad_in.size:
        n, d, h, w, c = _unravel(i, grad_in.shape)
        here = (d * height + h) * width + w
        total = zero
        for od in range(first_out[0, d], last_out[0, d]):
            if _covers(d, od, start, stop, step, 0):
                for oh in range(first_out[1, h], last_out[1, h]):
                    if _covers(h, oh, start, stop, step, 1):
                        for ow in range(first_out[2, w], last_out[2, w]):
                            if (_covers(w, ow, start, stop, step, 2)
                                    and indices[n, od, oh, ow, c] == here):
                                total += grad_out[n, od, oh, ow, c]
        grad_in[n, d, h, w, c] = total
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def max_backward_by_plane(grad_out, indices, grad_in, outside):
    """Scatter without window information: one thread per (batch, channel) plane,
    adding in output order (deterministic, no atomics)."""
    batch, outputs, channels = grad_out.shape
    size = grad_in.shape[1]
    i, grid = _first_and_stride()
    while i < batch * channels:
        n = i // channels
        c = i % channels
        for q in range(outputs):
            at = indices[n, q, c]
            if 0 <= at < size:
                grad_in[n, at, c] += grad_out[n, q, c]
            else:
                outside[0] = 1
        i += grid


@cuda.jit(device=True, inline=True)
def _in_window(position, o, start, stop, step, axis):
    return start[axis, o] <= position < stop[axis, o] and \
        (position - start[axis, o]) % step[axis] == 0


@cuda.jit(**CUDA_JIT_OPTIONS)
def flag_outside_window(indices, start, stop, step, height, width, flag):
    """Flag an index that is no element of its own output's window: the gather in
    :func:`max_backward` would drop it, so the caller scatters instead."""
    i, grid = _first_and_stride()
    while i < indices.size:
        n, od, oh, ow, c = _unravel(i, indices.shape)
        at = indices[n, od, oh, ow, c]
        d = at // (height * width)
        h = (at // width) % height
        w = at % width
        if at < 0 or not (_in_window(d, od, start, stop, step, 0)
                          and _in_window(h, oh, start, stop, step, 1)
                          and _in_window(w, ow, start, stop, step, 2)):
            flag[0] = 1
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def fill(array, value):
    i, grid = _first_and_stride()
    while i < array.size:
        array[i] = value
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def negate(source, out):
    i, grid = _first_and_stride()
    while i < out.size:
        out[i] = -source[i]
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def invert(source, out):
    i, grid = _first_and_stride()
    while i < out.size:
        out[i] = ~source[i]
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def absolute(source, out):
    i, grid = _first_and_stride()
    while i < out.size:
        out[i] = abs(source[i])
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def times_sign(values, x):
    """values * sign(x), with torch's sign(NaN) = 0 (the gradient of |x| at NaN)."""
    i, grid = _first_and_stride()
    while i < values.size:
        if x[i] > 0:
            sign = 1.0
        elif x[i] < 0:
            sign = -1.0
        else:
            sign = 0.0  # zero or NaN
        values[i] = values[i] * sign
        i += grid


# --------------------------------------------------------------------------
# Strided convolution: input (N, C_in, D, H, W), weight (C_out, C_in, KD, KH, KW).
# --------------------------------------------------------------------------


@cuda.jit(device=True, inline=True)
def _source(position, pad, kernel_offset, stride, size):
    t = position + pad - kernel_offset
    if t < 0 or t % stride != 0 or t // stride >= size:
        return -1
    return t // stride


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_forward(x, weight, bias, out, stride, pad, zero):
    """One thread per output element."""
    i, grid = _first_and_stride()
    while i < out.size:
        n, co, od, oh, ow = _unravel(i, out.shape)
        total = zero + bias[co]
        for ci in range(x.shape[1]):
            for kd in range(weight.shape[2]):
                d = od * stride[0] - pad[0] + kd
                if 0 <= d < x.shape[2]:
                    for kh in range(weight.shape[3]):
                        h = oh * stride[1] - pad[1] + kh
                        if 0 <= h < x.shape[3]:
                            for kw in range(weight.shape[4]):
                                w = ow * stride[2] - pad[2] + kw
                                if 0 <= w < x.shape[4]:
                                    total += x[n, ci, d, h, w] * weight[co, ci, kd, kh, kw]
        out[n, co, od, oh, ow] = total
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_backward_input(grad, weight, grad_in, stride, pad, zero):
    """One thread per input element, gathering from the outputs it fed."""
    i, grid = _first_and_stride()
    while i < grad_in.size:
        n, ci, d, h, w = _unravel(i, grad_in.shape)
        total = zero
        for co in range(grad.shape[1]):
            for kd in range(weight.shape[2]):
                od = _source(d, pad[0], kd, stride[0], grad.shape[2])
                if od >= 0:
                    for kh in range(weight.shape[3]):
                        oh = _source(h, pad[1], kh, stride[1], grad.shape[3])
                        if oh >= 0:
                            for kw in range(weight.shape[4]):
                                ow = _source(w, pad[2], kw, stride[2], grad.shape[4])
                                if ow >= 0:
                                    total += grad[n, co, od, oh, ow] * weight[co, ci, kd, kh, kw]
        grad_in[n, ci, d, h, w] = total
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_backward_weight(grad, x, grad_weight, stride, pad, zero):
    """One thread per weight element, summing over batch and outputs in order."""
    i, grid = _first_and_stride()
    while i < grad_weight.size:
        co, ci, kd, kh, kw = _unravel(i, grad_weight.shape)
        total = zero
        for n in range(grad.shape[0]):
            for od in range(grad.shape[2]):
                d = od * stride[0] - pad[0] + kd
                if 0 <= d < x.shape[2]:
                    for oh in range(grad.shape[3]):
                        h = oh * stride[1] - pad[1] + kh
                        if 0 <= h < x.shape[3]:
                            for ow in range(grad.shape[4]):
                                w = ow * stride[2] - pad[2] + kw
                                if 0 <= w < x.shape[4]:
                                    total += grad[n, co, od, oh, ow] * x[n, ci, d, h, w]
        grad_weight[co, ci, kd, kh, kw] = total
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_bias_grad(grad, grad_bias, zero):
    """One thread per output channel."""
    i, grid = _first_and_stride()
    while i < grad_bias.size:
        total = zero
        for n in range(grad.shape[0]):
            for od in range(grad.shape[2]):
                for oh in range(grad.shape[3]):
                    for ow in range(grad.shape[4]):
                        total += grad[n, i, od, oh, ow]
        grad_bias[i] = total
        i += grid


# --------------------------------------------------------------------------
# Max unpooling over (batch, inputs, C) (channels-first as C = 1).  Duplicate
# indices keep the last input in scan order without depending on thread timing:
# each input claims its target with an atomic maximum of its position, then only
# the winner writes.
# --------------------------------------------------------------------------


@cuda.jit(device=True, inline=True)
def _batch_input_channel(i, shape):
    c = i % shape[2]
    i //= shape[2]
    return i // shape[1], i % shape[1], c


@cuda.jit(**CUDA_JIT_OPTIONS)
def unpool_claim(indices, winner, outside):
    i, grid = _first_and_stride()
    size = winner.shape[1]
    while i < indices.size:
        n, q, c = _batch_input_channel(i, indices.shape)
        at = indices[n, q, c]
        if 0 <= at < size:
            cuda.atomic.max(winner, (n, at, c), q)
        else:
            cuda.atomic.add(outside, 0, 1)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def unpool_write(x, indices, winner, out):
    i, grid = _first_and_stride()
    size = out.shape[1]
    while i < x.size:
        n, q, c = _batch_input_channel(i, x.shape)
        at = indices[n, q, c]
        if 0 <= at < size and winner[n, at, c] == q:
            out[n, at, c] = x[n, q, c]
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def unpool_backward(grad_out, indices, grad_in, outside):
    i, grid = _first_and_stride()
    size = grad_out.shape[1]
    while i < grad_in.size:
        n, q, c = _batch_input_channel(i, grad_in.shape)
        at = indices[n, q, c]
        if 0 <= at < size:
            grad_in[n, q, c] = grad_out[n, at, c]
        else:
            grad_in[n, q, c] = 0
            cuda.atomic.add(outside, 0, 1)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def fractional_max_pool(x, out, indices, starts, kernel, lowest):
    """One thread per output of (batch, D, H, W, C); windows of size ``kernel`` at
    ``starts[n, c, axis, o]``."""
    i, grid = _first_and_stride()
    height, width = x.shape[2], x.shape[3]
    while i < out.size:
        n, od, oh, ow, c = _unravel(i, out.shape)
        d0, h0, w0 = starts[n, c, 0, od], starts[n, c, 1, oh], starts[n, c, 2, ow]
        best = lowest
        best_at = (d0 * height + h0) * width + w0
        for d in range(d0, d0 + kernel[0]):
            for h in range(h0, h0 + kernel[1]):
                for w in range(w0, w0 + kernel[2]):
                    value = x[n, d, h, w, c]
                    if value > best or value != value:
                        best = value
                        best_at = (d * height + h) * width + w
        out[n, od, oh, ow, c] = best
        indices[n, od, oh, ow, c] = best_at
        i += grid
