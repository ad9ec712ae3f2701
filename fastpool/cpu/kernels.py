"""Numba CPU kernels over canonical arrays.

Channels-first kernels take ``x`` of shape ``(planes, D, H, W)``; channels-last
kernels take ``(batch, D, H, W, C)`` and run their innermost loop over the
contiguous channel axis.  Windows come from a :class:`fastpool._params.WindowTable`
(``start``, ``stop``, ``step``, ``divisor``), so one kernel per op and layout
serves 1-D, 2-D and 3-D, sliding and adaptive pooling alike.

Work is split over output rows ``(plane or batch, od, oh)``: each row is
written by exactly one thread.  Sums accumulate in float64.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastpool._config import CPU_JIT_OPTIONS


@njit(inline="always")
def _row_coords(row, out_d, out_h):
    plane = row // (out_d * out_h)
    rest = row - plane * (out_d * out_h)
    od = rest // out_h
    return plane, od, rest - od * out_h


@njit(**CPU_JIT_OPTIONS)
def max_pool_channels_first(x, out, indices, start, stop, step, lowest, with_indices):
    planes, out_d, out_h, out_w = out.shape
    height, width = x.shape[2], x.shape[3]
    step_d, step_h, step_w = step[0], step[1], step[2]
    for row in prange(planes * out_d * out_h):
        plane, od, oh = _row_coords(row, out_d, out_h)
        d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
        for ow in range(out_w):
            w0, w1 = start[2, ow], stop[2, ow]
            best = lowest
            best_at = (d0 * height + h0) * width + w0
            for d in range(d0, d1, step_d):
                for h in range(h0, h1, step_h):
                    base = (d * height + h) * width
                    for w in range(w0, w1, step_w):
                        value = x[plane, d, h, w]
                        # torch's update: a NaN always wins, ties keep the first.
                        if value > best or value != value:
                            best = value
                            best_at = base + w
            out[plane, od, oh, ow] = best
            if with_indices:
                indices[plane, od, oh, ow] = best_at


@njit(**CPU_JIT_OPTIONS)
def max_pool_channels_last(x, out, indices, start, stop, step, lowest, with_indices):
    batch, out_d, out_h, out_w, channels = out.shape
    height, width = x.shape[2], x.shape[3]
    step_d, step_h, step_w = step[0], step[1], step[2]
    for row in prange(batch * out_d * out_h):
        n, od, oh = _row_coords(row, out_d, out_h)
        d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
        for ow in range(out_w):
            w0, w1 = start[2, ow], stop[2, ow]
            best = out[n, od, oh, ow]
            best[:] = lowest
            if with_indices:
                best_at = indices[n, od, oh, ow]
                best_at[:] = (d0 * height + h0) * width + w0
            for d in range(d0, d1, step_d):
                for h in range(h0, h1, step_h):
                    for w in range(w0, w1, step_w):
                        values = x[n, d, h, w]
                        if with_indices:
                            at = (d * height + h) * width + w
                            for c in range(channels):
                                value = values[c]
                                if value > best[c] or value != value:
                                    best[c] = value
                                    best_at[c] = at
                        else:
                            for c in range(channels):
                                value = values[c]
                                if value > best[c] or value != value:
                                    best[c] = value


@njit(inline="always")
def _finish_sum(total, factor, power):
    """Window sum -> average (power 1) or Lp norm, as torch's lp_pool computes it."""
    mean = total * factor
    if power != 1.0:
        return mean ** (1.0 / power)
    return mean


@njit(**CPU_JIT_OPTIONS)
def sum_pool_channels_first(x, out, start, stop, step, divisor, scale, power):
    planes, out_d, out_h, out_w = out.shape
    step_d, step_h, step_w = step[0], step[1], step[2]
    for row in prange(planes * out_d * out_h):
        plane, od, oh = _row_coords(row, out_d, out_h)
        d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
        row_divisor = divisor[0, od] * divisor[1, oh]
        for ow in range(out_w):
            w0, w1 = start[2, ow], stop[2, ow]
            total = 0.0
            for d in range(d0, d1, step_d):
                for h in range(h0, h1, step_h):
                    for w in range(w0, w1, step_w):
                        value = np.float64(x[plane, d, h, w])
                        if power != 1.0:
                            value = value ** power
                        total += value
            factor = scale / (row_divisor * divisor[2, ow])
            out[plane, od, oh, ow] = _finish_sum(total, factor, power)


@njit(**CPU_JIT_OPTIONS)
def sum_pool_channels_last(x, out, start, stop, step, divisor, scale, power):
    batch, out_d, out_h, out_w, channels = out.shape
    step_d, step_h, step_w = step[0], step[1], step[2]
    for row in prange(batch * out_d * out_h):
        n, od, oh = _row_coords(row, out_d, out_h)
        d0, d1, h0, h1 = start[0, od], stop[0, od], start[1, oh], stop[1, oh]
        row_divisor = divisor[0, od] * divisor[1, oh]
        total = np.empty(channels, np.float64)
        for ow in range(out_w):
            w0, w1 = start[2, ow], stop[2, ow]
            total[:] = 0.0
            for d in range(d0, d1, step_d):
                for h in range(h0, h1, step_h):
                    for w in range(w0, w1, step_w):
                        values = x[n, d, h, w]
                        if power != 1.0:
                            for c in range(channels):
                                total[c] += np.float64(values[c]) ** power
                        else:
                            for c in range(channels):
                                total[c] += values[c]
            factor = scale / (row_divisor * divisor[2, ow])
            result = out[n, od, oh, ow]
            for c in range(channels):
                result[c] = _finish_sum(total[c], factor, power)
