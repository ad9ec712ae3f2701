"""numba.cuda kernels over canonical 5-D arrays ``(batch, D, H, W, C)``.

Channels-first input runs as ``(planes, D, H, W, 1)``, a free view, so one
kernel per op serves both layouts and 1-D to 3-D.  Forward kernels run one
thread per output element and backward kernels one thread per *input*
element, gathering from the outputs whose windows cover it: every element is
written once, with no atomics, so gradients are bit-identical run to run.
Consecutive threads take consecutive elements of the innermost axis (W, or C
channels-last), so global memory accesses coalesce.  Every kernel is a
grid-stride loop, specialised by ``narrow``: True when every array of the launch
has fewer than 2**31 elements, and then the grid-stride loop runs in unsigned
32-bit, a thread's position is unravelled with 32-bit unsigned divisions (none for
unit axes) and every per-element division or modulo is unsigned 32-bit (the
compiler check finds no 64-bit one in these specialisations' PTX); None otherwise
(64-bit).  Forward kernels use at most 64 registers in both (the 64-bit Lp and
convolution under the register cap, ``_REGISTER_CAP``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda

from fastpool._config import CUDA_JIT_OPTIONS, CUDA_MAX_THREADS_PER_BLOCK
from fastpool._scalar import torch_power

if config.ENABLE_CUDASIM:  # the simulator has no libdevice; the same bit casts in NumPy
    def _int_as_float(bits):
        return np.array(bits, np.int64).astype(np.uint32).view(np.float32)[()]

    def _float_as_int(value):
        return np.array(value, np.float32).view(np.int32)[()]

    def _sqrt(value):
        with np.errstate(invalid="ignore"):  # NaN below 0, as on the device
            return np.sqrt(value)
else:
    from numba.cuda.libdevice import float_as_int as _float_as_int
    from numba.cuda.libdevice import int_as_float as _int_as_float
    _sqrt = math.sqrt  # NaN below 0 on the device; float32 stays float32


# A cap of 64 registers a thread for the kernels whose 64-bit index specialisation
# would take a few more (Lp pooling's general pow, the convolution): launch bounds of
# the most threads a launch uses (fastpool._config) and enough blocks an SM to fill its
# 65536 registers at 64 each.  In the PTX, so ptxas allocates within it (and
# tests/cuda/test_compiler.py checks that it does without spilling); the simulator
# takes no launch bounds.
_REGISTER_CAP = {} if config.ENABLE_CUDASIM else {"launch_bounds": (
    CUDA_MAX_THREADS_PER_BLOCK, max(1, 65536 // (64 * CUDA_MAX_THREADS_PER_BLOCK)))}

# Device functions are inlined by NVVM (``forceinline``: LLVM's alwaysinline), not
# at numba's IR level, which deep-copies the callee's IR into every call site: that
# copying was most of each kernel's compile time (the same PTX either way; the
# simulator takes no ``forceinline``).
_device_function = (cuda.jit(device=True) if config.ENABLE_CUDASIM
                    else cuda.jit(device=True, forceinline=True))


@_device_function
def _first_and_stride():
    start = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    return start, np.int64(cuda.gridDim.x) * cuda.blockDim.x


_power = _device_function(torch_power)


@_device_function
def _first_and_stride_in(narrow):
    """:func:`_first_and_stride` in the index type: unsigned 32-bit when ``narrow``
    (a position below 2**31 plus a grid below 2**31 cannot wrap), so the grid-stride
    loop's trip count, which LLVM computes to unroll the loop, divides in 32 bits."""
    i, grid = _first_and_stride()
    if narrow is None:
        return i, grid
    return np.uint32(i), np.uint32(grid)


@_device_function
def _index_count(size, narrow):
    """A loop bound in the type of :func:`_first_and_stride_in`."""
    if narrow is None:
        return np.int64(size)
    return np.uint32(size)


@_device_function
def _advance(i, grid, narrow):
    """``i + grid`` kept in the type of :func:`_first_and_stride_in` (numba widens
    the sum to 64 bits)."""
    if narrow is None:
        return i + grid
    return np.uint32(i + grid)


# Half precision: float16 and bfloat16 are loaded, widened to float32 in registers,
# computed on in float32 and rounded once on the store (torch's rule), so no kernel
# uses half arithmetic (numba-cuda would leave it to a linked C++ shim).  ``half``
# marks the array: None for every other dtype (the branches specialise away, and
# the load is a plain load), False for float16, True for bfloat16, which travels as
# its uint16 bits.  ``zero`` is 0 in the compute type: subtracting +0.0 converts
# float16 exactly (-0.0 and NaN included).


@_device_function
def _load(array, index, zero, half):
    """``array[index]`` in the compute type of ``zero``."""
    if half is None:
        return array[index]
    if not half:
        return array[index] - zero
    bits = np.int64(array[index]) << 16
    if bits >= 0x80000000:
        bits -= 0x100000000
    return _int_as_float(np.int32(bits))


@_device_function
def _bf16_bits(value):
    """float32 to bfloat16 bits, rounding to nearest even; NaN is 0x7FC0 (as in c10)."""
    if value != value:
        return np.uint16(0x7FC0)
    bits = np.int64(_float_as_int(np.float32(value))) & 0xFFFFFFFF
    return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)


@_device_function
def _store(array, index, value, half):
    """``array[index] = value``, rounded once to the array's dtype."""
    if half is None or not half:
        array[index] = value
    else:
        array[index] = _bf16_bits(value)


@_device_function
def _ix(value, narrow):
    """``value`` in the index type: int32 when ``narrow`` (every array of the launch
    has fewer than 2**31 elements, torch's canUse32BitIndexMath), int64 when None."""
    if narrow is None:
        return np.int64(value)
    return np.int32(value)


@_device_function
def _split(i, size, narrow):
    """(i // size, i % size) for 0 <= i: unsigned, so no floor fix-ups, and 32-bit
    when ``narrow`` (the truncation lets LLVM emit div.u32)."""
    if narrow is None:
        q = np.uint64(i) // np.uint64(size)
        return np.int64(q), np.int64(np.uint64(i) - q * np.uint64(size))
    q32 = np.uint32(np.uint32(i) // np.uint32(size))
    return np.int32(q32), np.int32(np.uint32(np.uint32(i) - q32 * np.uint32(size)))


@_device_function
def _rem(a, b, narrow):
    """a % b for 0 <= a and 0 < b, unsigned (div.u32/rem.u32 when ``narrow``: numba
    would promote an int32 ``%`` to a signed 64-bit one, with floor fix-ups)."""
    if narrow is None:
        return np.int64(np.uint64(a) % np.uint64(b))
    return np.int32(np.uint32(np.uint32(a) % np.uint32(b)))


@_device_function
def _quot(a, b, narrow):
    """a // b for 0 <= a and 0 < b, unsigned as :func:`_rem`."""
    if narrow is None:
        return np.int64(np.uint64(a) // np.uint64(b))
    return np.int32(np.uint32(np.uint32(a) // np.uint32(b)))


@_device_function
def _at(value, narrow):
    """An unsigned array subscript in the index type (no negative-index wraparound)."""
    if narrow is None:
        return np.uint64(value)
    return np.uint32(value)


@_device_function
def _output_position(i, out_shape, narrow):
    """(n, od, oh, ow, c) of flat output index ``i`` of ``out_shape`` (N, D, H, W, C);
    no division for channels-first (C == 1) or for 1-D/2-D's unit axes."""
    c = _ix(0, narrow)
    rest = _ix(i, narrow)
    if out_shape[4] != 1:
        rest, c = _split(rest, out_shape[4], narrow)
    rest, ow = _split(rest, out_shape[3], narrow)
    oh = _ix(0, narrow)
    if out_shape[2] != 1:
        rest, oh = _split(rest, out_shape[2], narrow)
    od = _ix(0, narrow)
    if out_shape[1] != 1:
        rest, od = _split(rest, out_shape[1], narrow)
    return rest, od, oh, ow, c


@cuda.jit(**CUDA_JIT_OPTIONS)
def max_pool(x, out, indices, in_shape, out_shape, start, stop, step, lowest, with_indices,
             zero, bf16, narrow):
    """One thread per output element over flat arrays: ``x`` (N, D, H, W, C) and
    ``out``/``indices`` (N, oD, oH, oW, C) given as shapes; consecutive threads take
    consecutive elements of the innermost axis (W channels-first, C channels-last).
    The per-output index arithmetic (divisions) is in the index type; the window
    loop advances a flat 64-bit offset by strides."""
    depth, height, width, channels = in_shape[1], in_shape[2], in_shape[3], in_shape[4]
    w_stride = step[2] * channels
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(out.size, narrow)
    while i < end:
        n, od, oh, ow, c = _output_position(i, out_shape, narrow)
        d0, d1 = start[0, od], stop[0, od]
        h0, h1 = start[1, oh], stop[1, oh]
        w0, w1 = start[2, ow], stop[2, ow]
        base = n * depth * height * width * channels + c
        best = lowest
        best_at = (d0 * height + h0) * width + w0
        d = d0
        while d < d1:
            h = h0
            while h < h1:
                at = base + ((d * height + h) * width + w0) * channels
                w = w0
                while w < w1:
                    value = _load(x, np.uint64(at), zero, bf16)
                    # torch's update: a NaN always wins, ties keep the first.
                    if value > best or value != value:
                        best = value
                        best_at = (d * height + h) * width + w
                    w += step[2]
                    at += w_stride
                h += step[1]
            d += step[0]
        _store(out, i, best, bf16)
        if with_indices:
            indices[i] = best_at
        i = _advance(i, grid, narrow)


@_device_function
def _lp_power(value, power):
    """``torch_power(value, power)`` (fastpool._scalar: the same branches, the same
    values) in the type of ``value``: torch_power's NaN and 1 are float64 literals, which
    made a float32 window sum accumulate in float64 and pull float64 pow into the kernel
    (torch's GPU lp_pool sums float32 in float32).  ``power / power`` is 1 in the
    power's type (power is -0.5 there)."""
    if power == 2.0:
        return value * value
    if power == 1.0:
        return value
    if power == 3.0:
        return value * value * value
    if power == 0.5:
        return _sqrt(value)
    if power == -0.5:
        return (power / power) / _sqrt(value)
    return value ** power


@_device_function
def _term(value, power, square):
    """One element's term of a window sum: ``value ** power`` (torch's pow) when
    ``power`` is given, ``value * value`` when ``square`` is (Lp with p = 2), else
    ``value``.  ``power`` and ``square`` are None or not per specialisation, so each
    kernel compiles one of the three: p = 2 and averages carry no pow (and its
    registers) in their loops."""
    if power is not None:
        return _lp_power(value, power)
    if square is not None:
        return value * value
    return value


@_device_function
def _root(mean, power, square):
    """The Lp norm from the window's mean of powers: ``mean ** (1 / p)`` as torch's
    pow; for p = 2 its square-root branch only (torch_power at 0.5), without pow."""
    if power is not None:
        return _lp_power(mean, (power / power) / power)
    if square is not None:
        return _sqrt(mean)
    return mean


@_device_function
def _window_sum(x, base, d0, d1, h0, h1, w0, w1, in_shape, step, power, square, total,
                bf16, narrow):
    """The sum over one window of :func:`_term`.  Each loop runs a flat offset from its
    first element to its end by its stride (offsets grow with the coordinate, so
    ``at < end`` is ``d < d1``): three values a loop and none of the coordinates, in
    the index type (32-bit registers when ``narrow``), so few registers stay live
    around the (pow) term."""
    zero = total - total
    channels = _ix(in_shape[4], narrow)
    row = _ix(in_shape[3] * channels, narrow)
    plane = _ix(in_shape[2] * row, narrow)
    d_stride = _ix(step[0] * plane, narrow)
    h_stride = _ix(step[1] * row, narrow)
    w_stride = _ix(step[2] * channels, narrow)
    h_span = _ix((h1 - h0) * row, narrow)
    w_span = _ix((w1 - w0) * channels, narrow)
    at_d = _ix(base + d0 * plane + h0 * row + w0 * channels, narrow)
    end_d = _ix(at_d + (d1 - d0) * plane, narrow)
    while at_d < end_d:
        at_h = at_d
        end_h = _ix(at_d + h_span, narrow)
        while at_h < end_h:
            at = at_h
            end = _ix(at_h + w_span, narrow)
            while at < end:
                total += _term(_load(x, _at(at, narrow), zero, bf16), power, square)
                at = _ix(at + w_stride, narrow)
            at_h = _ix(at_h + h_stride, narrow)
        at_d = _ix(at_d + d_stride, narrow)
    return total


@cuda.jit(**CUDA_JIT_OPTIONS, **_REGISTER_CAP)
def sum_pool(x, out, in_shape, out_shape, start, stop, step, divisor, scale, power, square,
             zero, bf16, narrow):
    """Averages (``power`` and ``square`` None) or Lp norms (``square`` True for p = 2,
    else ``power`` = p); ``zero`` sets the accumulate type, which ``divisor``,
    ``scale`` and ``power`` share (float32 for float32 and half input: torch's
    accscalar_t on the GPU).  Flat arrays, as in :func:`max_pool`."""
    plane = in_shape[1] * in_shape[2] * in_shape[3] * in_shape[4]
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(out.size, narrow)
    while i < end:
        n, od, oh, ow, c = _output_position(i, out_shape, narrow)
        # The window's weight before its sum: one value, not its three coordinates,
        # stays live across the loops.
        weight = scale / (divisor[0, od] * divisor[1, oh] * divisor[2, ow])
        total = _window_sum(x, n * plane + c, start[0, od], stop[0, od], start[1, oh],
                            stop[1, oh], start[2, ow], stop[2, ow], in_shape, step, power,
                            square, zero, bf16, narrow)
        _store(out, i, _root(total * weight, power, square), bf16)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def output_coefficients(grad_out, x, coefficient, in_shape, out_shape, start, stop, step,
                        divisor, scale, power, zero, bf16, narrow):
    """d loss / d (window sum of x**p) per output, by torch's avg/lp_pool chain rule.
    Flat arrays, as in :func:`max_pool`."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(grad_out.size, narrow)
    while i < end:
        n, od, oh, ow, c = _output_position(i, out_shape, narrow)
        window_divisor = divisor[0, od] * divisor[1, oh] * divisor[2, ow]
        grad = _load(grad_out, i, zero, bf16)
        if power is None:
            coefficient[i] = grad * scale / window_divisor
        else:
            base = n * in_shape[1] * in_shape[2] * in_shape[3] * in_shape[4] + c
            total = _window_sum(x, base, start[0, od], stop[0, od], start[1, oh],
                                stop[1, oh], start[2, ow], stop[2, ow], in_shape, step, power,
                                None, zero, bf16, narrow)
            mean = total / window_divisor
            scaled = grad * (1.0 / power) * _power(mean * scale, 1.0 / power - 1.0) * scale
            if mean != mean:
                scaled = 0.0 * scaled  # torch.sign(nan) is 0
            elif mean == 0.0:
                scaled = 0.0  # relu's gradient at 0
            coefficient[i] = scaled / window_divisor
        i = _advance(i, grid, narrow)


@_device_function
def _covers(position, o, start, stop, step, axis, narrow):
    # The modulo only matters for dilation; a division per test is not free.  Outputs
    # o of the covering range start at or before ``position`` (covering_outputs), so
    # the difference is never negative and the modulo unsigned (32-bit when narrow).
    return position < stop[axis, o] and (
        step[axis] == 1 or _rem(position - start[axis, o], step[axis], narrow) == 0)


@cuda.jit(**CUDA_JIT_OPTIONS)
def sum_backward(coefficient, x, grad_in, first_out, last_out, start, stop, step, power,
                 zero, bf16, narrow):
    """grad_in[i] = factor(x[i]) * sum of the coefficients of the windows covering i."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(grad_in.size, narrow)
    while i < end:
        n, d, h, w, c = _output_position(i, grad_in.shape, narrow)
        total = zero
        for od in range(first_out[0, d], last_out[0, d]):
            if _covers(d, od, start, stop, step, 0, narrow):
                for oh in range(first_out[1, h], last_out[1, h]):
                    if _covers(h, oh, start, stop, step, 1, narrow):
                        for ow in range(first_out[2, w], last_out[2, w]):
                            if _covers(w, ow, start, stop, step, 2, narrow):
                                total += coefficient[n, od, oh, ow, c]
        if power is None:
            _store(grad_in, (n, d, h, w, c), total, bf16)
        else:
            _store(grad_in, (n, d, h, w, c), total * (power * _power(
                _load(x, (n, d, h, w, c), zero, bf16), power - 1.0)), bf16)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def max_backward(grad_out, indices, grad_in, first_out, last_out, start, stop, step, zero,
                 bf16, flag, narrow):
    """grad_in[i] = sum of grad_out over the covering windows whose maximum is i.

    Skipped (every thread exits at once) when ``flag[0]`` is set: some index lay
    outside its own window, and :func:`max_backward_by_plane` scatters instead."""
    if flag[0] != 0:
        return
    height, width = grad_in.shape[2], grad_in.shape[3]
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(grad_in.size, narrow)
    while i < end:
        n, d, h, w, c = _output_position(i, grad_in.shape, narrow)
        here = (d * height + h) * width + w
        total = zero
        for od in range(first_out[0, d], last_out[0, d]):
            if _covers(d, od, start, stop, step, 0, narrow):
                for oh in range(first_out[1, h], last_out[1, h]):
                    if _covers(h, oh, start, stop, step, 1, narrow):
                        for ow in range(first_out[2, w], last_out[2, w]):
                            if (_covers(w, ow, start, stop, step, 2, narrow)
                                    and indices[n, od, oh, ow, c] == here):
                                total += _load(grad_out, (n, od, oh, ow, c), zero, bf16)
        _store(grad_in, (n, d, h, w, c), total, bf16)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def max_backward_by_plane(grad_out, indices, grad_in, total, outside, zero, bf16, flag,
                          when, narrow):
    """Scatter without window information: one thread per (batch, channel) plane,
    adding in output order into ``total`` (the compute type; deterministic, no
    atomics), then rounding each plane into ``grad_in`` once.  Runs only when
    ``flag[0] == when`` (the gather's check decides on the device)."""
    if flag[0] != when:
        return
    batch, outputs, channels = grad_out.shape
    size = grad_in.shape[1]
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(batch * channels, narrow)
    while i < end:
        n, c = _split(i, channels, narrow)
        for p in range(size):
            total[n, p, c] = zero
        for q in range(outputs):
            at = indices[n, q, c]
            if 0 <= at < size:
                total[n, at, c] += _load(grad_out, (n, q, c), zero, bf16)
            else:
                outside[0] = 1
        for p in range(size):
            _store(grad_in, (n, p, c), total[n, p, c], bf16)
        i = _advance(i, grid, narrow)


@_device_function
def _in_window(position, o, start, stop, step, axis, narrow):
    # The modulo runs only where start <= position: unsigned, as in _covers.
    return start[axis, o] <= position < stop[axis, o] and \
        _rem(position - start[axis, o], step[axis], narrow) == 0


@cuda.jit(**CUDA_JIT_OPTIONS)
def flag_outside_window(indices, start, stop, step, depth, height, width, flag, narrow):
    """Flag an index that is no element of its own output's window: the gather in
    :func:`max_backward` would drop it, so the scatter runs instead."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(indices.size, narrow)
    while i < end:
        n, od, oh, ow, c = _output_position(i, indices.shape, narrow)
        at = indices[n, od, oh, ow, c]
        if at < 0 or at >= depth * height * width:
            flag[0] = 1
        else:
            rest, w = _split(at, width, narrow)
            d, h = _split(rest, height, narrow)
            if not (_in_window(d, od, start, stop, step, 0, narrow)
                    and _in_window(h, oh, start, stop, step, 1, narrow)
                    and _in_window(w, ow, start, stop, step, 2, narrow)):
                flag[0] = 1
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def fill(array, value):
    i, grid = _first_and_stride()
    while i < array.size:
        array[i] = value
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def negate(source, out, zero, bf16):
    i, grid = _first_and_stride()
    while i < out.size:
        _store(out, i, -_load(source, i, zero, bf16), bf16)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def invert(source, out):
    i, grid = _first_and_stride()
    while i < out.size:
        out[i] = ~source[i]
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def absolute(source, out, zero, bf16):
    i, grid = _first_and_stride()
    while i < out.size:
        _store(out, i, abs(_load(source, i, zero, bf16)), bf16)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def times_sign(values, x, zero, bf16):
    """values * sign(x), with torch's sign(NaN) = 0 (the gradient of |x| at NaN)."""
    i, grid = _first_and_stride()
    while i < values.size:
        value = _load(x, i, zero, bf16)
        if value > 0:
            sign = 1.0
        elif value < 0:
            sign = -1.0
        else:
            sign = 0.0  # zero or NaN
        _store(values, i, _load(values, i, zero, bf16) * (zero + sign), bf16)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def scaled_sum(a, b, out, scale, zero, bf16):
    """out = scale * (a + b), computed in the compute type and rounded once."""
    i, grid = _first_and_stride()
    while i < out.size:
        _store(out, i, (_load(a, i, zero, bf16) + _load(b, i, zero, bf16)) * scale, bf16)
        i += grid


@cuda.jit(**CUDA_JIT_OPTIONS)
def copy_rows(source, out, width, source_row, source_offset, out_row, out_offset, narrow):
    """For each of the rows: ``width`` elements from ``source`` (rows of ``source_row``,
    starting at ``source_offset``) to ``out`` (rows of ``out_row``, at ``out_offset``).
    A plain copy of the bits: concatenates and splits channel blocks."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(_quot(source.size, source_row, narrow) * width, narrow)
    while i < end:
        row, column = _split(i, width, narrow)
        out[_at(row * out_row + out_offset + column, narrow)] = \
            source[_at(row * source_row + source_offset + column, narrow)]
        i = _advance(i, grid, narrow)


# --------------------------------------------------------------------------
# Generalized-mean (GeM) pooling: the element-wise steps around average pooling
# (fastpool._gem runs the window means on sum_pool / sum_backward).  ``p`` holds one
# power per channel (or one for all, channels = 1) in the compute type; element i of
# an array with ``plane`` elements per channel plane (1 channels-last) is of channel
# (i // plane) % channels.
# --------------------------------------------------------------------------


@_device_function
def _channel_power(p, i, plane, channels, narrow):
    if channels == 1:  # one p for all: no division
        return p[0]
    return p[_rem(_quot(i, plane, narrow), channels, narrow)]


@cuda.jit(**CUDA_JIT_OPTIONS)
def gem_powers(x, p, plane, channels, eps, powered, logged, with_log, zero, half, narrow):
    """powered = max(x, eps) ** p (NaN stays NaN, as torch's clamp); with_log also
    logged = powered * log(max(x, eps)), the p-derivative's window terms."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(powered.size, narrow)
    while i < end:
        value = _load(x, i, zero, half)
        clamped = eps if value < eps else value
        power = _channel_power(p, i, plane, channels, narrow)
        raised = _power(clamped, power)
        powered[i] = raised
        if with_log:
            logged[i] = raised * math.log(clamped)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def gem_root(mean, p, plane, channels, out, half, narrow):
    """out = mean ** (1 / p), rounded once to out's dtype."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(out.size, narrow)
    while i < end:
        power = _channel_power(p, i, plane, channels, narrow)
        _store(out, i, _power(mean[i], 1 / power), half)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def gem_output_grads(grad, mean, log_mean, p, plane, channels, grad_mean, grad_p, zero,
                     half, narrow):
    """With y = mean ** (1/p): grad_mean = grad y / (p mean), the window means'
    gradient; grad_p = grad y (log_mean / (p mean) - log(mean) / p**2), summed per
    channel on the host."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(grad_mean.size, narrow)
    while i < end:
        power = _channel_power(p, i, plane, channels, narrow)
        m = mean[i]
        y = _power(m, 1 / power)
        g = _load(grad, i, zero, half) * y
        grad_mean[i] = g / (power * m)
        grad_p[i] = g * (log_mean[i] / (power * m) - math.log(m) / (power * power))
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def gem_input_grad(pooled, x, powered, p, plane, channels, eps, grad_x, zero, half, narrow):
    """grad_x = pooled p max(x, eps) ** p / max(x, eps) where x >= eps, else 0 (the
    gradient passes the clamp at eps itself, as torch's does)."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(pooled.size, narrow)
    while i < end:
        value = _load(x, i, zero, half)
        result = zero
        if value >= eps:
            power = _channel_power(p, i, plane, channels, narrow)
            result = pooled[i] * (power * powered[i] / value)
        _store(grad_x, i, result, half)
        i = _advance(i, grid, narrow)


# --------------------------------------------------------------------------
# Strided convolution: input (N, C_in, D, H, W), weight (C_out, C_in, KD, KH, KW).
# --------------------------------------------------------------------------


@_device_function
def _source(position, pad, kernel_offset, stride, size, narrow):
    """The output fed by input ``position`` through kernel offset ``kernel_offset``, or
    -1; t is tested for t >= 0 first, so the division is unsigned (32-bit when
    narrow)."""
    t = _ix(position + pad - kernel_offset, narrow)
    if t < 0:
        return _ix(-1, narrow)
    q = _quot(t, stride, narrow)
    if _ix(t - q * stride, narrow) != 0 or q >= size:
        return _ix(-1, narrow)
    return q


@cuda.jit(**CUDA_JIT_OPTIONS, **_REGISTER_CAP)
def conv_forward(x, weight, bias, out, in_shape, w_shape, out_shape, stride, pad, zero, bf16,
                 narrow):
    """One thread per output element, over flat arrays: ``x`` (N, C_in, D, H, W),
    ``weight`` (C_out, C_in, KD, KH, KW) and ``out`` (N, C_out, oD, oH, oW) given as
    shapes.  Offsets in the index type, the input's advanced a plane and the weights'
    a kernel per input channel: no 5-D subscripts (five wraparound tests and a
    multiply chain a load).  The bounds tests inside the loops keep LLVM from
    unrolling them (which costs more registers than the tests cost time)."""
    channels, depth, height, width = in_shape[1], in_shape[2], in_shape[3], in_shape[4]
    k_depth, k_height, k_width = w_shape[2], w_shape[3], w_shape[4]
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(out.size, narrow)
    while i < end:
        n, co, od, oh, ow = _output_position(i, out_shape, narrow)
        d0 = _ix(od * stride[0] - pad[0], narrow)
        h0 = _ix(oh * stride[1] - pad[1], narrow)
        w0 = _ix(ow * stride[2] - pad[2], narrow)
        x_plane = _ix(n * channels * depth, narrow)
        w_plane = _ix(co * channels * k_depth, narrow)
        total = _load(bias, _at(co, narrow), zero, bf16)
        planes_end = _ix(x_plane + channels * depth, narrow)
        while x_plane < planes_end:
            for kd in range(k_depth):
                d = d0 + kd
                if 0 <= d < depth:
                    for kh in range(k_height):
                        h = h0 + kh
                        if 0 <= h < height:
                            x_row = _ix(((x_plane + d) * height + h) * width, narrow)
                            w_row = _ix(((w_plane + kd) * k_height + kh) * k_width, narrow)
                            for kw in range(k_width):
                                w = w0 + kw
                                if 0 <= w < width:
                                    total += (_load(x, _at(x_row + w, narrow), zero, bf16)
                                              * _load(weight, _at(w_row + kw, narrow), zero,
                                                      bf16))
            x_plane = _ix(x_plane + depth, narrow)
            w_plane = _ix(w_plane + k_depth, narrow)
        _store(out, i, total, bf16)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_backward_input(grad, weight, grad_in, stride, pad, zero, bf16, narrow):
    """One thread per input element, gathering from the outputs it fed."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(grad_in.size, narrow)
    while i < end:
        n, ci, d, h, w = _output_position(i, grad_in.shape, narrow)
        total = zero
        for co in range(grad.shape[1]):
            for kd in range(weight.shape[2]):
                od = _source(d, pad[0], kd, stride[0], grad.shape[2], narrow)
                if od >= 0:
                    for kh in range(weight.shape[3]):
                        oh = _source(h, pad[1], kh, stride[1], grad.shape[3], narrow)
                        if oh >= 0:
                            for kw in range(weight.shape[4]):
                                ow = _source(w, pad[2], kw, stride[2], grad.shape[4], narrow)
                                if ow >= 0:
                                    total += (_load(grad, (n, co, od, oh, ow), zero, bf16)
                                              * _load(weight, (co, ci, kd, kh, kw), zero, bf16))
        _store(grad_in, (n, ci, d, h, w), total, bf16)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_backward_weight(grad, x, grad_weight, stride, pad, zero, bf16, narrow):
    """One thread per weight element, summing over batch and outputs in order."""
    i, grid = _first_and_stride_in(narrow)
    end = _index_count(grad_weight.size, narrow)
    while i < end:
        co, ci, kd, kh, kw = _output_position(i, grad_weight.shape, narrow)
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
                                    total += (_load(grad, (n, co, od, oh, ow), zero, bf16)
                                              * _load(x, (n, ci, d, h, w), zero, bf16))
        _store(grad_weight, (co, ci, kd, kh, kw), total, bf16)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def conv_bias_grad(grad, grad_bias, zero, bf16):
    """One thread per output channel."""
    i, grid = _first_and_stride()
    while i < grad_bias.size:
        total = zero
        for n in range(grad.shape[0]):
            for od in range(grad.shape[2]):
                for oh in range(grad.shape[3]):
                    for ow in range(grad.shape[4]):
                        total += _load(grad, (n, i, od, oh, ow), zero, bf16)
        _store(grad_bias, i, total, bf16)
        i += grid


# --------------------------------------------------------------------------
# Max unpooling over (batch, inputs, C) (channels-first as C = 1).  Duplicate
# indices keep the last input in scan order without depending on thread timing:
# each input claims its target with an atomic maximum of its position, then only
# the winner writes.
# --------------------------------------------------------------------------


@_device_function
def _batch_input_channel(i, shape, narrow):
    rest, c = _split(i, shape[2], narrow)
    n, q = _split(rest, shape[1], narrow)
    return n, q, c


@cuda.jit(**CUDA_JIT_OPTIONS)
def unpool_claim(indices, winner, outside, narrow):
    i, grid = _first_and_stride_in(narrow)
    size = winner.shape[1]
    end = _index_count(indices.size, narrow)
    while i < end:
        n, q, c = _batch_input_channel(i, indices.shape, narrow)
        at = indices[n, q, c]
        if 0 <= at < size:
            cuda.atomic.max(winner, (n, at, c), np.int64(q))
        else:
            cuda.atomic.add(outside, 0, 1)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def unpool_write(x, indices, winner, out, narrow):
    i, grid = _first_and_stride_in(narrow)
    size = out.shape[1]
    end = _index_count(x.size, narrow)
    while i < end:
        n, q, c = _batch_input_channel(i, x.shape, narrow)
        at = indices[n, q, c]
        if 0 <= at < size and winner[n, at, c] == np.int64(q):
            out[n, at, c] = x[n, q, c]
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def unpool_backward(grad_out, indices, grad_in, outside, narrow):
    i, grid = _first_and_stride_in(narrow)
    size = grad_out.shape[1]
    end = _index_count(grad_in.size, narrow)
    while i < end:
        n, q, c = _batch_input_channel(i, grad_in.shape, narrow)
        at = indices[n, q, c]
        if 0 <= at < size:
            grad_in[n, q, c] = grad_out[n, at, c]
        else:
            grad_in[n, q, c] = 0
            cuda.atomic.add(outside, 0, 1)
        i = _advance(i, grid, narrow)


@cuda.jit(**CUDA_JIT_OPTIONS)
def fractional_max_pool(x, out, indices, in_shape, out_shape, starts, kernel, lowest, zero,
                        bf16, narrow):
    """One thread per output of flat (batch, D, H, W, C) ``out`` and ``indices``
    (``out_shape``), windows of ``kernel`` (a tuple) at ``starts[n, c, axis, o]`` in
    flat ``x`` (``in_shape``); half types compared in float32.  The window loops run
    flat offsets to their ends (as :func:`_window_sum`), the plane index of the
    maximum is rebuilt once from its offset."""
    height, width, channels = in_shape[2], in_shape[3], in_shape[4]
    row = width * channels
    plane = height * row
    i, grid = _first_and_stride_in(narrow)
    end_i = _index_count(out.size, narrow)
    while i < end_i:
        n, od, oh, ow, c = _output_position(i, out_shape, narrow)
        at_d = ((n * in_shape[1] + starts[n, c, 0, od]) * height + starts[n, c, 1, oh]) \
            * row + starts[n, c, 2, ow] * channels + c
        best = lowest
        best_at = at_d
        end_d = at_d + kernel[0] * plane
        while at_d < end_d:
            at_h, end_h = at_d, at_d + kernel[1] * row
            while at_h < end_h:
                at, end = at_h, at_h + kernel[2] * channels
                while at < end:
                    value = _load(x, np.uint64(at), zero, bf16)
                    if value > best or value != value:
                        best = value
                        best_at = at
                    at += channels
                at_h += row
            at_d += plane
        _store(out, i, best, bf16)
        # The plane index (d * H + h) * W + w of the maximum, from its offset: one
        # division an output (none channels-first).
        spot = best_at - c
        if channels != 1:
            spot = _quot(spot, channels, narrow)
        indices[i] = spot - n * (in_shape[1] * height * width)
        i = _advance(i, grid, narrow)
