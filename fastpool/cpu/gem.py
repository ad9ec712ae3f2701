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
pow does, and 0 otherwise (a general power).  Sums accumulate in float64; the
powers are taken in the compute dtype, so they overflow where torch's do.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastpool._config import CPU_JIT_OPTIONS
from fastpool._params import WindowTable
from fastpool._threads import get_num_threads
from fastpool.cpu.runtime import launch, runs_serially

_SERIAL_JIT_OPTIONS = {**CPU_JIT_OPTIONS, "parallel": False}


# --------------------------------------------------------------------------
# A natural logarithm that vectorises.  numba calls libm's log one element at a
# time (no SVML here), ~20 cycles each: most of a backward.  This is fdlibm's
# log (error below 1 ulp) for positive normal numbers, in float64, written with
# bit operations and selects only; callers count the other inputs (0,
# subnormals, inf, NaN) and redo those windows with np.log.
# --------------------------------------------------------------------------


@intrinsic
def _bits_of(typingctx, value):
    """The bits of a float64 as an int64."""
    if value != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _float_of(typingctx, bits):
    """The float64 whose bits are the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LG1, _LG2, _LG3, _LG4 = (6.666666666666735130e-01, 3.999999999940941908e-01,
                          2.857142874366239149e-01, 2.222219843214978396e-01)
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01
_TWO52 = 4503599627370496.0  # 2 ** 52: its low mantissa bits hold an exponent field
_SMALLEST_NORMAL = 2.2250738585072014e-308
_LARGEST = 1.7976931348623157e308


@njit(inline="always")
def _fast_log(value):
    """ln(value) for a positive normal float64."""
    bits = _bits_of(value)
    # value = 2**k * m, m in [sqrt(2)/2, sqrt(2)); the exponent field (k + 1023)
    # read as a float by placing it in the mantissa of 2**52 (no int-to-float
    # conversion, which AVX2 lacks for int64).
    mantissa = _float_of((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    # (The mask makes the shift a logical one, which AVX2 has for int64 lanes.)
    k = _float_of(((bits >> 52) & 0x7FF) | 0x4330000000000000) - (_TWO52 + 1023.0)
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


@njit(inline="always")
def _unusual(value):
    """1 where :func:`_fast_log` does not apply (0, subnormal, inf, NaN), else 0."""
    return 0 if (value >= _SMALLEST_NORMAL) & (value <= _LARGEST) else 1


# --------------------------------------------------------------------------
# Element terms.  The power of kind k (1-4 multiplied out, 0 general) and the
# gradient factor p * c ** (p - 1), resolved per loop by the ``kind`` branches
# around it, so the loops themselves stay branch-free.
# --------------------------------------------------------------------------


@njit(inline="always")
def _clamp(value, eps):
    # NaN stays NaN, as torch's clamp(min=eps) keeps it.
    return eps if value < eps else value


@njit(inline="always")
def _power(c, p, kind):
    if kind == 1:
        return c
    if kind == 2:
        return c * c
    if kind == 3:
        return c * c * c
    if kind == 4:
        square = c * c
        return square * square
    return c ** p


@njit(inline="always")
def _slope(c, p, kind):
    """d(c ** p)/dc = p * c ** (p - 1), as torch's pow backward computes it."""
    if kind == 1:
        return p
    if kind == 2:
        return p * c
    if kind == 3:
        return p * (c * c)
    if kind == 4:
        return p * (c * c * c)
    return p * c ** (p - 1)


@njit(inline="always")
def _sum_run(values, p, eps, kind, with_log):
    """(sum of c ** p, sum of c ** p * ln c, unusual count) over a contiguous run."""
    total, log_total, unusual = 0.0, 0.0, 0
    for i in range(values.size):
        c = _clamp(values[i], eps)
        powered = _power(c, p, kind)
        total += powered
        if with_log:
            wide = np.float64(c)
            log_total += powered * _fast_log(wide)
            unusual += _unusual(wide)
    return total, log_total, unusual


@njit(inline="always")
def _planes_sums_of_kind(x, powers, first, eps, kind, sums, log_sums, with_log):
    for i in range(x.shape[0]):
        values = x[i]
        p = x.dtype.type(powers[(first + i) % powers.size])
        total, log_total, unusual = _sum_run(values, p, eps, kind, with_log)
        sums[i] = total
        if with_log:
            log_sums[i] = _exact_log_sum(values, p, eps, kind) if unusual else log_total


# Reassociation lets LLVM vectorise the sums over each run (in its own order, as
# torch sums in its own); NaN and inf still propagate.  A run is a whole plane or
# a window's span of one input row.
@njit(**{**_SERIAL_JIT_OPTIONS, "fastmath": CPU_JIT_OPTIONS["fastmath"] or {"reassoc"}})
def _planes_sums(x, powers, first, eps, kind, sums, log_sums, with_log):
    """Sums over each row of ``x`` (runs, length) of p = ``powers[(first + row) %
    powers.size]``, with ``kind`` and ``with_log`` resolved outside the loops: one
    copy per case, each free of branches (compiled once per dtype, called once per
    block of runs rather than inlined into every kernel)."""
    if with_log:
        if kind == 3:
            _planes_sums_of_kind(x, powers, first, eps, 3, sums, log_sums, True)
        elif kind == 2:
            _planes_sums_of_kind(x, powers, first, eps, 2, sums, log_sums, True)
        elif kind == 4:
            _planes_sums_of_kind(x, powers, first, eps, 4, sums, log_sums, True)
        elif kind == 1:
            _planes_sums_of_kind(x, powers, first, eps, 1, sums, log_sums, True)
        else:
            _planes_sums_of_kind(x, powers, first, eps, 0, sums, log_sums, True)
    elif kind == 3:
        _planes_sums_of_kind(x, powers, first, eps, 3, sums, log_sums, False)
    elif kind == 2:
        _planes_sums_of_kind(x, powers, first, eps, 2, sums, log_sums, False)
    elif kind == 4:
        _planes_sums_of_kind(x, powers, first, eps, 4, sums, log_sums, False)
    elif kind == 1:
        _planes_sums_of_kind(x, powers, first, eps, 1, sums, log_sums, False)
    else:
        _planes_sums_of_kind(x, powers, first, eps, 0, sums, log_sums, False)


@njit(**_SERIAL_JIT_OPTIONS)
def _exact_log_sum(values, p, eps, kind):
    """sum of c ** p * ln c over a run with np.log: runs holding unusual values."""
    total = 0.0
    for i in range(values.size):
        c = _clamp(values[i], eps)
        total += _power(c, p, kind) * np.log(np.float64(c))
    return total


@njit(inline="always")
def _channel_run(values, powers, eps, kind, totals):
    """Add one pixel's channels' c ** p to the running sums."""
    for c in range(values.size):
        totals[c] += _power(_clamp(values[c], eps), powers[c], kind)
    return 0


@njit(inline="always")
def _channel_run_log(values, powers, eps, kind, totals, log_totals):
    """:func:`_channel_run`, adding c ** p ln c to ``log_totals`` too; returns the
    count of unusual values (see :func:`_unusual`)."""
    unusual = 0
    for c in range(values.size):
        clamped = _clamp(values[c], eps)
        powered = _power(clamped, powers[c], kind)
        totals[c] += powered
        wide = np.float64(clamped)
        log_totals[c] += powered * _fast_log(wide)
        unusual += _unusual(wide)
    return unusual


@njit(**_SERIAL_JIT_OPTIONS)
def _pixel_sums(values, powers, eps, kind, totals, log_totals):
    """:func:`_channel_run` (or, given ``log_totals``, :func:`_channel_run_log`) with
    ``kind`` resolved outside the loop."""
    if log_totals is None:
        if kind == 3:
            return _channel_run(values, powers, eps, 3, totals)
        if kind == 2:
            return _channel_run(values, powers, eps, 2, totals)
        if kind == 4:
            return _channel_run(values, powers, eps, 4, totals)
        if kind == 1:
            return _channel_run(values, powers, eps, 1, totals)
        return _channel_run(values, powers, eps, 0, totals)
    if kind == 3:
        return _channel_run_log(values, powers, eps, 3, totals, log_totals)
    if kind == 2:
        return _channel_run_log(values, powers, eps, 2, totals, log_totals)
    if kind == 4:
        return _channel_run_log(values, powers, eps, 4, totals, log_totals)
    if kind == 1:
        return _channel_run_log(values, powers, eps, 1, totals, log_totals)
    return _channel_run_log(values, powers, eps, 0, totals, log_totals)


# --------------------------------------------------------------------------
# Window sums.  ``sums`` (and ``log_sums`` unless None: the forward compiles
# without the logarithms) are float64, output-shaped.
# --------------------------------------------------------------------------


@njit(**CPU_JIT_OPTIONS)
def gem_sums_planes(x, powers, eps, kind, sums, log_sums, chunks):
    """Whole-plane windows (global GeM, channels-first): ``x`` (planes, size), in
    ``chunks`` tasks of whole planes (a call per plane costs more than a small
    plane's arithmetic)."""
    planes = x.shape[0]
    per_chunk = (planes + chunks - 1) // chunks
    for chunk in prange(chunks):
        first = chunk * per_chunk
        last = min(planes, first + per_chunk)
        if log_sums is None:
            _planes_sums(x[first:last], powers, first, eps, kind, sums[first:last],
                         sums[first:last], False)
        else:
            _planes_sums(x[first:last], powers, first, eps, kind, sums[first:last],
                         log_sums[first:last], True)


@njit(**CPU_JIT_OPTIONS)
def gem_sums_channels_first(x, start, stop, powers, eps, kind, sums, log_sums):
    """Window sums over ``x`` (planes, D, H, W) into (planes, out_d, out_h, out_w);
    windows read whole runs of W (GeM has no dilation)."""
    planes, out_d, out_h, out_w = sums.shape
    rows = planes * out_d * out_h
    for row in prange(rows):
        plane = row // (out_d * out_h)
        od = (row // out_h) % out_d
        oh = row % out_h
        one_p = powers[plane % powers.size:plane % powers.size + 1]
        run_sums, run_logs = np.empty(1), np.empty(1)
        for ow in range(out_w):
            w0, w1 = start[2, ow], stop[2, ow]
            total, log_total = 0.0, 0.0
            for d in range(start[0, od], stop[0, od]):
                for h in range(start[1, oh], stop[1, oh]):
                    run = x[plane, d, h:h + 1, w0:w1]
                    _planes_sums(run, one_p, 0, eps, kind, run_sums, run_logs,
                                 log_sums is not None)
                    total += run_sums[0]
                    log_total += run_logs[0]
            sums[plane, od, oh, ow] = total
            if log_sums is not None:
                log_sums[plane, od, oh, ow] = log_total


@njit(**CPU_JIT_OPTIONS)
def gem_sums_channels_last(x, start, stop, powers, eps, kind, sums, log_sums):
    """Window sums over ``x`` (N, D, H, W, C) into (N, out_d, out_h, out_w, C),
    accumulated a pixel at a time across the contiguous channels; ``powers`` has
    one p per channel."""
    batch, out_d, out_h, out_w, channels = sums.shape
    rows = batch * out_d * out_h
    typed = powers.astype(x.dtype)
    for row in prange(rows):
        n = row // (out_d * out_h)
        od = (row // out_h) % out_d
        oh = row % out_h
        for ow in range(out_w):
            totals = sums[n, od, oh, ow]
            totals[:] = 0.0
            unusual = 0
            if log_sums is None:
                for d in range(start[0, od], stop[0, od]):
                    for h in range(start[1, oh], stop[1, oh]):
                        for w in range(start[2, ow], stop[2, ow]):
                            _pixel_sums(x[n, d, h, w], typed, eps, kind, totals, None)
                continue
            log_totals = log_sums[n, od, oh, ow]
            log_totals[:] = 0.0
            for d in range(start[0, od], stop[0, od]):
                for h in range(start[1, oh], stop[1, oh]):
                    for w in range(start[2, ow], stop[2, ow]):
                        unusual += _pixel_sums(x[n, d, h, w], typed, eps, kind, totals,
                                               log_totals)
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
def _grad_rows(x, shares, powers, first, eps, kind, out, broadcast):
    for i in range(x.shape[0]):
        values, row_shares, row_out = x[i], shares[i], out[i]
        p = x.dtype.type(powers[(first + i) % powers.size])
        for j in range(values.size):
            value = values[j]
            share = row_shares[0] if broadcast else row_shares[j]
            # A select, not a product with the mask: NaN inputs get 0, as torch's
            # clamp backward gives them.
            row_out[j] = share * _slope(_clamp(value, eps), p, kind) if value >= eps else 0


@njit(**_SERIAL_JIT_OPTIONS)
def _planes_grad(x, shares, powers, first, eps, kind, out):
    """:func:`_grad_rows` over a block of planes, with ``kind`` and the broadcast of
    ``shares`` resolved outside the loops."""
    if shares.shape[1] == 1:
        if kind == 3:
            _grad_rows(x, shares, powers, first, eps, 3, out, True)
        elif kind == 2:
            _grad_rows(x, shares, powers, first, eps, 2, out, True)
        else:
            _grad_rows(x, shares, powers, first, eps, kind, out, True)
    elif kind == 3:
        _grad_rows(x, shares, powers, first, eps, 3, out, False)
    elif kind == 2:
        _grad_rows(x, shares, powers, first, eps, 2, out, False)
    else:
        _grad_rows(x, shares, powers, first, eps, kind, out, False)


@njit(**CPU_JIT_OPTIONS)
def gem_grad_channels_first(x, shares, powers, eps, kind, grad, chunks):
    """``x`` and ``grad`` (planes, size); ``shares`` (planes, size or 1)."""
    planes = x.shape[0]
    per_chunk = (planes + chunks - 1) // chunks
    for chunk in prange(chunks):
        first = chunk * per_chunk
        last = min(planes, first + per_chunk)
        _planes_grad(x[first:last], shares[first:last], powers, first, eps, kind,
                     grad[first:last])


@njit(inline="always")
def _pixel_grad(values, shares, powers, eps, kind, out):
    for c in range(values.size):
        value = values[c]
        clamped = _clamp(value, eps)
        out[c] = shares[c] * _slope(clamped, powers[c], kind) if value >= eps else 0


@njit(**CPU_JIT_OPTIONS)
def gem_grad_channels_last(x, shares, powers, eps, kind, grad):
    """``x`` and ``grad`` (N, pixels, C); ``shares`` (N, pixels or 1, C)."""
    batch, pixels, channels = x.shape
    typed = powers.astype(x.dtype)
    broadcast = shares.shape[1] == 1
    for task in prange(batch * pixels):
        n, i = task // pixels, task % pixels
        row = shares[n, 0 if broadcast else i]
        if kind == 3:
            _pixel_grad(x[n, i], row, typed, eps, 3, grad[n, i])
        else:
            _pixel_grad(x[n, i], row, typed, eps, kind, grad[n, i])


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
    log_sums = np.empty(out_shape, np.float64) if with_log else None
    work = x.size * (2 if with_log else 1)
    if not channels_last and table.is_whole_plane(x.shape[1:4]):
        launch(gem_sums_planes, x.reshape(x.shape[0], -1), powers, eps, kind,
               sums.reshape(-1), None if log_sums is None else log_sums.reshape(-1),
               _chunks(x.shape[0], work), work=work)
    elif channels_last:
        launch(gem_sums_channels_last, x, table.start, table.stop, powers, eps, kind, sums,
               log_sums, work=work)
    else:
        launch(gem_sums_channels_first, x, table.start, table.stop, powers, eps, kind, sums,
               log_sums, work=work)
    return sums, log_sums


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
