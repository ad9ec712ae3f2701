"""Fused GeM kernels for the CPU back end (see :mod:`fastpool._gem`).

GeM is ``mean(c ** p) ** (1/p)`` over each window, ``c = max(x, eps)``; its
backward also needs ``sum(c ** p * ln c)`` per window (for p's gradient).
Composed from NumPy element-wise steps around the average-pooling kernels, a
forward made five passes over input-sized arrays and a backward a dozen; here
one kernel pass over the input gives every window's sums (the clamp, the power
and, for the backward, the logarithm fused in), and one more gives the input's
gradient (a gather through the average backward first when windows are not
whole planes).

Arrays are canonical, in the compute dtype (float32, or float64): channels-first
``(planes, D, H, W)`` (plane ``i`` of channel ``i % C``) and channels-last
``(N, D, H, W, C)``.  ``powers`` holds p per channel (one value when shared);
``kind`` is p when every p is the same integer 1-4, multiplied out as torch's
pow does, and 0 otherwise (a general power).  The powers are taken in the
compute dtype, so they overflow where torch's do, and summed in float64; the
backward's logarithm terms are taken and summed in the compute dtype over
blocks of :data:`_BLOCK` elements, the blocks' sums in float64.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fastpool._config import CPU_JIT_OPTIONS
from fastpool._params import WindowTable
from fastpool._threads import get_num_threads
from fastpool.cpu.runtime import launch, runs_serially
from fastpool.cpu.tasks import (
    HELPER_JIT_OPTIONS,
    int_min,
    parallel_kernel,
    scratch,
    share,
)

_BLOCK = 64  # elements a backward sums in the input's precision before float64


# --------------------------------------------------------------------------
# A natural logarithm that vectorises.  numba calls libm's log one element at a
# time (no SVML here), ~20 cycles each: most of a backward.  These are fdlibm's
# log in float64 and Cephes' logf in float32 (errors below 1 ulp) for positive
# normal numbers, written with bit operations and selects only; callers count
# the other inputs that matter (0 and subnormals: inf and NaN give the right
# products anyway) and redo those windows with np.log.
# --------------------------------------------------------------------------


# Each float type and the integer type of its width: a bitcast turns one into the other.
_SAME_WIDTH = {types.float64: (types.int64, ir.IntType(64)),
               types.int64: (types.float64, ir.DoubleType()),
               types.float32: (types.int32, ir.IntType(32)),
               types.int32: (types.float32, ir.FloatType())}


@intrinsic
def _reinterpret(typingctx, value):
    """``value``'s bits as the other type of its width (float64 <-> int64, float32 <->
    int32): no conversion, one bitcast."""
    if value not in _SAME_WIDTH:
        return None
    result, llvm_type = _SAME_WIDTH[value]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return result(value), codegen


_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LG1, _LG2, _LG3, _LG4 = (6.666666666666735130e-01, 3.999999999940941908e-01,
                          2.857142874366239149e-01, 2.222219843214978396e-01)
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01
_TWO52 = 4503599627370496.0  # 2 ** 52: its low mantissa bits hold an exponent field
_SMALLEST_NORMAL = 2.2250738585072014e-308


@njit(inline="always")
def _fast_log(value):
    """ln(value) for a positive normal float64."""
    bits = _reinterpret(value)
    # value = 2**k * m, m in [sqrt(2)/2, sqrt(2)); the exponent field (k + 1023)
    # read as a float by placing it in the mantissa of 2**52 (no int-to-float
    # conversion, which AVX2 lacks for int64).
    mantissa = _reinterpret((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    # (The mask makes the shift a logical one, which AVX2 has for int64 lanes.)
    k = _reinterpret(((bits >> 52) & 0x7FF) | 0x4330000000000000) - (_TWO52 + 1023.0)
    high = mantissa > 1.4142135623730951
    mantissa = mantissa * 0.5 if high else mantissa
    k = k + 1.0 if high else k
    f = mantissa - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    half_square = 0.5 * f * f
    return k * _LN2_HI - ((half_square - (s * (half_square + r) + k * _LN2_LO)) - f)


_F32 = np.float32


@njit(inline="always")
def _fast_log32(value):
    """ln(value) for a positive normal float32, in float32 (Cephes' logf, error
    below 1 ulp): float32 input's logarithms in float32, as torch takes them, and
    twice the vector lanes of :func:`_fast_log`."""
    bits = _reinterpret(value)
    mantissa = _reinterpret(np.int32((bits & 0x007FFFFF) | 0x3F800000))
    k = _reinterpret(np.int32(((bits >> 23) & 0xFF) | 0x4B000000)) - _F32(8388608.0 + 127.0)
    high = mantissa > _F32(1.41421356)
    mantissa = mantissa * _F32(0.5) if high else mantissa
    k = k + _F32(1.0) if high else k
    f = mantissa - _F32(1.0)
    z = f * f
    y = ((((((((_F32(7.0376836292e-2) * f - _F32(1.1514610310e-1)) * f
               + _F32(1.1676998740e-1)) * f - _F32(1.2420140846e-1)) * f
             + _F32(1.4249322787e-1)) * f - _F32(1.6668057665e-1)) * f
           + _F32(2.0000714765e-1)) * f - _F32(2.4999993993e-1)) * f
         + _F32(3.3333331174e-1)) * f * z
    y = y + k * _F32(-2.12194440e-4) + _F32(-0.5) * z
    return f + y + k * _F32(0.693359375)


def _log_of(value):
    """ln(value) in value's precision for a positive normal number (see the overload)."""


def _unusual_for_log(value):
    """1 where :func:`_log_of` does not apply, else 0, as a float of value's type (an
    integer count kept the loops from vectorising).  Only zero and subnormals: the
    fast logarithms of inf (finite) and NaN (NaN) give the exact products, inf
    and NaN, once multiplied by ``value ** p``."""


@overload(_log_of)
def _log_of_impl(value):
    if value == types.float32:
        return lambda value: _fast_log32(value)
    return lambda value: _fast_log(np.float64(value))


@overload(_unusual_for_log)
def _unusual_for_log_impl(value):
    if value == types.float32:
        smallest, one, zero = _F32(1.17549435e-38), _F32(1), _F32(0)
        return lambda value: one if value < smallest else zero
    return lambda value: 1.0 if value < _SMALLEST_NORMAL else 0.0


# --------------------------------------------------------------------------
# Element terms.  Integer p (``kind`` 1-4) is multiplied out with selects on
# ``kind``, so one branch-free loop serves all four; a general p (kind 0) takes
# its own copy of each loop, with ``c ** p``.  Each loop is compiled once per
# dtype: inlined copies per case multiplied the kernels' compile time.
# --------------------------------------------------------------------------


@njit(inline="always")
def _clamp(value, eps):
    # NaN stays NaN, as torch's clamp(min=eps) keeps it.
    return eps if value < eps else value


@njit(inline="always")
def _int_power(c, kind):
    """c ** kind for kind 1-4, multiplied out as c, c*c, c*c*c, (c*c)*(c*c)."""
    square = c * c
    high = square * square if kind == 4 else square * c
    low = c if kind == 1 else square
    return low if kind <= 2 else high


@njit(inline="always")
def _power(c, p, kind, general):
    """c ** p; ``general`` (a literal at every call site, so the other branch folds
    away) for p not an integer 1-4."""
    return c ** p if general else _int_power(c, kind)


@njit(inline="always")
def _slope(c, p, kind, general):
    """d(c ** p)/dc = p * c ** (p - 1), as torch's pow backward computes it."""
    if general:
        return p * c ** (p - 1)
    square = c * c
    high = square * c if kind == 4 else square
    return p if kind == 1 else p * (c if kind == 2 else high)


@njit(inline="always")
def _sum_rows(x, w0, w1, powers, first, eps, kind, sums, log_sums, with_log, general):
    for i in range(x.shape[0]):
        values = x[i][w0:w1]
        p = x.dtype.type(powers[(first + i) % powers.size])
        total, log_total, unusual = 0.0, 0.0, x.dtype.type(0)
        for j in range(values.size):
            total += _power(_clamp(values[j], eps), p, kind, general)
        if with_log:
            # The logarithm terms in the input's precision over blocks of at most
            # _BLOCK elements, the blocks' sums in float64: float32 lanes vectorise
            # twice as wide, and loops mixing float32 and float64 sums did not
            # vectorise at all.  (The powers' sums above stay in float64 throughout:
            # p's gradient takes the difference of nearly equal terms for small p.)
            for j0 in range(0, values.size, _BLOCK):
                block = values[j0:j0 + _BLOCK]
                log_part = x.dtype.type(0)
                for j in range(block.size):
                    c = _clamp(block[j], eps)
                    log_part += _power(c, p, kind, general) * _log_of(c)
                    unusual += _unusual_for_log(c)
                log_total += log_part
            log_sums[i] = _exact_log_sum(values, p, eps, kind) if unusual else log_total
        sums[i] = total


# Reassociation lets LLVM vectorise the sums over each run (in its own order, as
# torch sums in its own); NaN and inf still propagate.  A run is a whole plane or
# a window's span of one input row.
@njit(**{**HELPER_JIT_OPTIONS, "fastmath": CPU_JIT_OPTIONS["fastmath"] or {"reassoc"}})
def _planes_sums(x, w0, w1, powers, first, eps, kind, sums, log_sums, with_log):
    """Each row's sum of c ** p (and, ``with_log``, of c ** p ln c into
    ``log_sums``) over columns w0:w1 of ``x`` (rows, length), p = ``powers[(first +
    row) % powers.size]``.  Compiled once per dtype (whole C-contiguous rows, so
    planes and window spans share it) and called once per block of rows: inlined
    into every kernel, its loops multiplied their compile time."""
    if kind == 0:
        _sum_rows(x, w0, w1, powers, first, eps, kind, sums, log_sums, with_log, True)
    else:
        _sum_rows(x, w0, w1, powers, first, eps, kind, sums, log_sums, with_log, False)


@njit(**HELPER_JIT_OPTIONS)
def _exact_log_sum(values, p, eps, kind):
    """The sum of c ** p * ln c over a run with np.log: runs holding unusual values."""
    total = 0.0
    for i in range(values.size):
        c = _clamp(values[i], eps)
        total += (c ** p if kind == 0 else _int_power(c, kind)) * np.log(np.float64(c))
    return total


@njit(inline="always")
def _sum_channels(values, powers, eps, kind, totals, log_totals, with_log, general):
    unusual = values.dtype.type(0)
    if with_log:
        for c in range(values.size):
            clamped = _clamp(values[c], eps)
            powered = _power(clamped, powers[c], kind, general)
            totals[c] += powered
            log_totals[c] += powered * _log_of(clamped)
            unusual += _unusual_for_log(clamped)
    else:
        for c in range(values.size):
            totals[c] += _power(_clamp(values[c], eps), powers[c], kind, general)
    return unusual


# Reassociation for the count of unusual values, a float sum (each channel's sums
# accumulate in their own slots, in order).
@njit(**{**HELPER_JIT_OPTIONS, "fastmath": CPU_JIT_OPTIONS["fastmath"] or {"reassoc"}})
def _pixel_sums(values, powers, eps, kind, totals, log_totals, with_log):
    """Add one pixel's channels' c ** p (and, ``with_log``, c ** p ln c) to the
    running sums; returns the count of unusual values (see :func:`_unusual_for_log`)."""
    if kind == 0:
        return _sum_channels(values, powers, eps, kind, totals, log_totals, with_log, True)
    return _sum_channels(values, powers, eps, kind, totals, log_totals, with_log, False)


# --------------------------------------------------------------------------
# Window sums.  ``sums`` and ``log_sums`` are float64, output-shaped; without
# ``with_log`` (the forward) ``log_sums`` is only a placeholder, never written.
# --------------------------------------------------------------------------


@parallel_kernel
def gem_sums_planes(part, parts, x, powers, eps, kind, sums, log_sums, with_log, chunks):
    """Whole-plane windows (global GeM, channels-first): ``x`` (planes, size), in
    ``chunks`` tasks of whole planes (a call per plane costs more than a small
    plane's arithmetic)."""
    planes = x.shape[0]
    per_chunk = (planes + chunks - 1) // chunks
    for chunk in range(*share(chunks, part, parts)):
        first = chunk * per_chunk
        last = int_min(planes, first + per_chunk)
        _planes_sums(x[first:last], 0, x.shape[1], powers, first, eps, kind,
                     sums[first:last], log_sums[first:last] if with_log else log_sums[:0],
                     with_log)


@parallel_kernel
def gem_sums_channels_first(part, parts, x, start, stop, powers, eps, kind, sums, log_sums,
                            with_log):
    """Window sums over ``x`` (planes, D, H, W) into (planes, out_d, out_h, out_w);
    windows read whole runs of W (GeM has no dilation)."""
    planes, out_d, out_h, out_w = sums.shape
    for row in range(*share(planes * out_d * out_h, part, parts)):
        plane = row // (out_d * out_h)
        od = (row // out_h) % out_d
        oh = row % out_h
        one_p = powers[plane % powers.size:plane % powers.size + 1]
        h0, h1 = start[1, oh], stop[1, oh]
        run_sums, run_logs = scratch(h1 - h0, np.float64), scratch(h1 - h0, np.float64)
        for ow in range(out_w):
            total, log_total = 0.0, 0.0
            for d in range(start[0, od], stop[0, od]):
                # The window's rows of this input plane, columns w0:w1 of each.
                _planes_sums(x[plane, d, h0:h1], start[2, ow], stop[2, ow], one_p, 0, eps,
                             kind, run_sums, run_logs, with_log)
                total += run_sums.sum()
                log_total += run_logs.sum() if with_log else 0.0
            sums[plane, od, oh, ow] = total
            if with_log:
                log_sums[plane, od, oh, ow] = log_total


@parallel_kernel
def gem_sums_channels_last(part, parts, x, start, stop, powers, eps, kind, sums, log_sums,
                           with_log):
    """Window sums over ``x`` (N, D, H, W, C) into (N, out_d, out_h, out_w, C),
    accumulated a pixel at a time across the contiguous channels; ``powers`` has
    one p per channel."""
    batch, out_d, out_h, out_w, channels = sums.shape
    typed = powers.astype(x.dtype)
    for row in range(*share(batch * out_d * out_h, part, parts)):
        n = row // (out_d * out_h)
        od = (row // out_h) % out_d
        oh = row % out_h
        placeholder = scratch(channels, np.float64)
        for ow in range(out_w):
            totals = sums[n, od, oh, ow]
            totals[:] = 0.0
            log_totals = log_sums[n, od, oh, ow] if with_log else placeholder
            log_totals[:] = 0.0
            unusual = 0.0
            for d in range(start[0, od], stop[0, od]):
                for h in range(start[1, oh], stop[1, oh]):
                    for w in range(start[2, ow], stop[2, ow]):
                        unusual += _pixel_sums(x[n, d, h, w], typed, eps, kind, totals,
                                               log_totals, with_log)
            if unusual:
                # Redo this window's logarithms exactly.
                log_totals[:] = 0.0
                for d in range(start[0, od], stop[0, od]):
                    for h in range(start[1, oh], stop[1, oh]):
                        for w in range(start[2, ow], stop[2, ow]):
                            values = x[n, d, h, w]
                            for c in range(channels):
                                log_totals[c] += _exact_log_sum(values[c:c + 1], typed[c],
                                                                eps, kind)


# --------------------------------------------------------------------------
# The input's gradient: grad_x = [x >= eps] * share * p * c ** (p - 1), ``share``
# each element's sum of its windows' (d loss / d window mean) / window size:
# per plane or pixel row (whole-plane windows, ``shares`` of extent 1 along the
# spatial axis) or per element (the average backward's gather).
# --------------------------------------------------------------------------


@njit(inline="always")
def _grad_rows(x, shares, powers, first, eps, kind, out, broadcast, general):
    for i in range(x.shape[0]):
        values, row_shares, row_out = x[i], shares[i], out[i]
        p = x.dtype.type(powers[(first + i) % powers.size])
        for j in range(values.size):
            value = values[j]
            share = row_shares[0] if broadcast else row_shares[j]
            slope = _slope(_clamp(value, eps), p, kind, general)
            # A select, not a product with the mask: NaN inputs get 0, as torch's
            # clamp backward gives them.
            row_out[j] = share * slope if value >= eps else 0


@njit(**HELPER_JIT_OPTIONS)
def _planes_grad(x, shares, powers, first, eps, kind, out):
    """:func:`_grad_rows` over a block of planes, with the broadcast of ``shares``
    and a general p resolved outside the loops."""
    if shares.shape[1] == 1:
        if kind == 0:
            _grad_rows(x, shares, powers, first, eps, kind, out, True, True)
        else:
            _grad_rows(x, shares, powers, first, eps, kind, out, True, False)
    elif kind == 0:
        _grad_rows(x, shares, powers, first, eps, kind, out, False, True)
    else:
        _grad_rows(x, shares, powers, first, eps, kind, out, False, False)


@parallel_kernel
def gem_grad_channels_first(part, parts, x, shares, powers, eps, kind, grad, chunks):
    """``x`` and ``grad`` (planes, size); ``shares`` (planes, size or 1)."""
    planes = x.shape[0]
    per_chunk = (planes + chunks - 1) // chunks
    for chunk in range(*share(chunks, part, parts)):
        first = chunk * per_chunk
        last = int_min(planes, first + per_chunk)
        _planes_grad(x[first:last], shares[first:last], powers, first, eps, kind,
                     grad[first:last])


@njit(inline="always")
def _grad_channels(values, shares, powers, eps, kind, out, general):
    for c in range(values.size):
        value = values[c]
        slope = _slope(_clamp(value, eps), powers[c], kind, general)
        out[c] = shares[c] * slope if value >= eps else 0


@parallel_kernel
def gem_grad_channels_last(part, parts, x, shares, powers, eps, kind, grad):
    """``x`` and ``grad`` (N, pixels, C); ``shares`` (N, pixels or 1, C)."""
    batch, pixels, channels = x.shape
    typed = powers.astype(x.dtype)
    broadcast = shares.shape[1] == 1
    for task in range(*share(batch * pixels, part, parts)):
        n, i = task // pixels, task % pixels
        row = shares[n, 0 if broadcast else i]
        if kind == 0:
            _grad_channels(x[n, i], row, typed, eps, kind, grad[n, i], True)
        else:
            _grad_channels(x[n, i], row, typed, eps, kind, grad[n, i], False)


# --------------------------------------------------------------------------
# Host drivers.
# --------------------------------------------------------------------------


def _chunks(items: int, work: int) -> int:
    """Tasks for ``items`` planes: one for a serial launch, else enough to balance
    the threads (as :func:`fastpool.cpu.pooling._task_count`)."""
    if runs_serially(work):
        return 1
    return max(1, min(items, 16 * get_num_threads()))


def power_kind(p) -> int:
    """1-4 when every p is that integer (multiplied out), else 0."""
    values = np.unique(np.atleast_1d(np.asarray(p, np.float64)))
    if values.size == 1 and values[0] in (1.0, 2.0, 3.0, 4.0):
        return int(values[0])
    return 0


def window_sums(x: np.ndarray, table: WindowTable, channels_last: bool, powers: np.ndarray,
                eps: float, with_log: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Each window's sum of ``max(x, eps) ** p`` (and of its product with the
    logarithm, given ``with_log``), float64 in the output's canonical shape."""
    kind = power_kind(powers)
    eps = x.dtype.type(eps)
    powers = np.ascontiguousarray(powers, np.float64)
    if channels_last:
        out_shape = (x.shape[0], *table.out_shape, x.shape[4])
        powers = np.broadcast_to(powers, (x.shape[4],)).copy()
    else:
        out_shape = (x.shape[0], *table.out_shape)
    sums = np.empty(out_shape, np.float64)
    # Without the logarithms, a placeholder: one specialisation serves both.
    log_sums = np.empty(out_shape if with_log else (1,) * len(out_shape), np.float64)
    work = x.size * (2 if with_log else 1)
    if not channels_last and table.is_whole_plane(x.shape[1:4]):
        launch(gem_sums_planes, x.reshape(x.shape[0], -1), powers, eps, kind,
               sums.reshape(-1), log_sums.reshape(-1), with_log, _chunks(x.shape[0], work),
               work=work)
    else:
        kernel = gem_sums_channels_last if channels_last else gem_sums_channels_first
        launch(kernel, x, table.start, table.stop, powers, eps, kind, sums, log_sums,
               with_log, work=work)
    return sums, log_sums if with_log else None


def window_sizes(table: WindowTable, channels_last: bool) -> np.ndarray:
    """Each output's window size, broadcastable against the canonical output."""
    out_d, out_h, out_w = table.out_shape
    sizes = (table.divisor[0, :out_d, None, None] * table.divisor[1, None, :out_h, None]
             * table.divisor[2, None, None, :out_w])
    return sizes[..., None] if channels_last else sizes


def input_grad(x: np.ndarray, shares: np.ndarray, channels_last: bool, powers: np.ndarray,
               eps: float) -> np.ndarray:
    """``[x >= eps] * shares * p * max(x, eps) ** (p - 1)`` for canonical ``x``, with
    ``shares`` per element or (whole-plane windows) per plane, in x's dtype."""
    kind = power_kind(powers)
    grad = np.empty(x.shape, x.dtype)
    powers = np.ascontiguousarray(powers, np.float64)
    shares = shares.astype(x.dtype, copy=False)
    if channels_last:
        batch, channels = x.shape[0], x.shape[-1]
        powers = np.broadcast_to(powers, (channels,)).copy()
        pixels = x.size // max(batch * channels, 1)
        rows = (batch, pixels, channels)
        launch(gem_grad_channels_last, x.reshape(rows),
               np.ascontiguousarray(shares).reshape(batch, -1, channels), powers,
               x.dtype.type(eps), kind, grad.reshape(rows), work=2 * x.size)
    else:
        planes = x.shape[0]
        launch(gem_grad_channels_first, x.reshape(planes, -1),
               np.ascontiguousarray(shares).reshape(planes, -1), powers, x.dtype.type(eps),
               kind, grad.reshape(planes, -1), _chunks(planes, 2 * x.size), work=2 * x.size)
    return grad


def roots(means: np.ndarray, p) -> np.ndarray:
    """``means ** (1/p)`` (p broadcast against ``means``).  NumPy's general power
    costs ~30 ns an element, most of a global forward's finishing; for the usual
    p the root functions agree with it to an ulp or two (1/p is itself rounded)."""
    if isinstance(p, float) and p in _ROOTS:
        return _ROOTS[p](means)
    return means ** (1.0 / p)


_ROOTS = {1.0: lambda m: m, 2.0: np.sqrt, 3.0: np.cbrt, 4.0: lambda m: np.sqrt(np.sqrt(m))}


__all__ = ["window_sums", "window_sizes", "input_grad", "power_kind", "roots"]
