"""NumPy reference implementations of the back-end interface.

Same signatures as :mod:`fastpool.cpu.pooling`.  Each window offset
``(jd, jh, jw)`` is visited in scan order; for every output it gathers the
input element at that offset (if the window has one) from all outputs at once.
"""

from __future__ import annotations

import itertools

import numpy as np

from fastpool._params import WindowTable


def _axis_offsets(table: WindowTable, axis: int, size: int):
    """For each offset j along ``axis``: input positions and which outputs have one."""
    n_out = table.out_shape[axis]
    start, stop = table.start[axis, :n_out], table.stop[axis, :n_out]
    step = int(table.step[axis])
    count = np.maximum((stop - start + step - 1) // step, 0)
    offsets = []
    for j in range(int(count.max(initial=0))):
        position = start + j * step
        offsets.append((np.minimum(position, size - 1), j < count))
    return offsets


def _window_offsets(x: np.ndarray, table: WindowTable, channels_last: bool):
    """Yield (gathered values, valid mask, flat spatial index) for each offset."""
    depth, height, width = x.shape[1:4]
    per_axis = [_axis_offsets(table, axis, size)
                for axis, size in enumerate((depth, height, width))]
    for (pd, vd), (ph, vh), (pw, vw) in itertools.product(*per_axis):
        d, h, w = pd[:, None, None], ph[None, :, None], pw[None, None, :]
        valid = vd[:, None, None] & vh[None, :, None] & vw[None, None, :]
        flat = (d * height + h) * width + w
        if channels_last:
            yield x[:, d, h, w, :], valid[..., None], flat[..., None]
        else:
            yield x[:, d, h, w], valid, flat


def _expand(grid: np.ndarray, channels_last: bool) -> np.ndarray:
    return grid[..., None] if channels_last else grid


def max_pool(x: np.ndarray, table: WindowTable, channels_last: bool, lowest,
             with_indices: bool, stream=None) -> tuple[np.ndarray, np.ndarray | None]:
    n_d, n_h, n_w = table.out_shape
    shape = (x.shape[0], n_d, n_h, n_w, *x.shape[4:])
    best = np.full(shape, lowest, dtype=x.dtype)
    height, width = x.shape[2:4]
    first = ((table.start[0, :n_d, None, None] * height + table.start[1, None, :n_h, None])
             * width + table.start[2, None, None, :n_w])
    best_at = np.broadcast_to(_expand(first, channels_last), shape).copy()
    for values, valid, flat in _window_offsets(x, table, channels_last):
        # torch's update rule: strictly greater, or NaN.
        take = valid & ((values > best) | (values != values))
        best = np.where(take, values, best)
        best_at = np.where(take, flat, best_at)
    return best, (best_at.astype(np.int64) if with_indices else None)


def _raise_to(values: np.ndarray, power: float | None) -> np.ndarray:
    """``values ** power`` in float64 as torch's pow computes it (square roots for
    +-0.5, which differ from pow at -inf and -0.0); power None is the identity."""
    values = np.asarray(values, np.float64)
    if power is None:
        return values
    if power == 0.5:  # torch takes sqrt and rsqrt for these: NaN at -inf, unlike pow
        return np.sqrt(values)
    if power == -0.5:
        return 1.0 / np.sqrt(values)
    return values ** power


def sum_pool(x: np.ndarray, table: WindowTable, channels_last: bool,
             power: float | None, stream=None) -> np.ndarray:
    n_d, n_h, n_w = table.out_shape
    total = np.zeros((x.shape[0], n_d, n_h, n_w, *x.shape[4:]), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for values, valid, _ in _window_offsets(x, table, channels_last):
            total += np.where(valid, _raise_to(values, power), 0.0)
        divisor = (table.divisor[0, :n_d, None, None] * table.divisor[1, None, :n_h, None]
                   * table.divisor[2, None, None, :n_w])
        mean = total * (table.scale / _expand(divisor, channels_last))
        result = mean if power is None else _raise_to(mean, 1.0 / power)
    return result.astype(x.dtype)


def max_backward(grad_out: np.ndarray, indices: np.ndarray, input_shape: tuple,
                 channels_last: bool, table: WindowTable | None = None,
                 stream=None) -> tuple[np.ndarray, int]:
    batch, spatial = input_shape[0], int(np.prod(input_shape[1:4]))
    channels = input_shape[4] if channels_last else 1
    grad_in = np.zeros((batch, spatial, channels), grad_out.dtype)
    grad = grad_out.reshape(batch, -1, channels)
    at = indices.reshape(batch, -1, channels)
    inside = (at >= 0) & (at < spatial)
    n, _, c = np.nonzero(inside)
    np.add.at(grad_in, (n, at[inside], c), grad[inside])
    return grad_in.reshape(input_shape), int((~inside).sum())


def sum_backward(grad_out: np.ndarray, x: np.ndarray | None, table: WindowTable,
                 channels_last: bool, input_shape: tuple, power: float | None,
                 stream=None) -> np.ndarray:
    n_d, n_h, n_w = table.out_shape
    divisor = _expand(table.divisor[0, :n_d, None, None] * table.divisor[1, None, :n_h, None]
                      * table.divisor[2, None, None, :n_w], channels_last)
    grad = grad_out.astype(np.float64)
    source = np.zeros(input_shape) if x is None else x
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if power is None:
            per_output = grad * table.scale / divisor
        else:
            # torch's chain rule through (sign(m) * relu(|m|) * K) ** (1/p), m = avg(x**p)
            window_sum = np.zeros(grad.shape)
            for values, valid, _ in _window_offsets(source, table, channels_last):
                window_sum += np.where(valid, _raise_to(values, power), 0.0)
            mean = window_sum / divisor
            scaled = grad / power * _raise_to(mean * table.scale, 1.0 / power - 1.0) * table.scale
            per_output = np.where(mean == 0, 0.0, scaled * np.sign(np.nan_to_num(mean))
                                  ** 2) / divisor
        grad_in = np.zeros(input_shape)
        positions = np.indices(input_shape[:1] + table.out_shape
                               + tuple(input_shape[4:]), sparse=True)
        for values, valid, flat in _window_offsets(source, table, channels_last):
            factor = 1.0 if power is None else power * _raise_to(values, power - 1)
            contribution = np.where(valid, per_output * factor, 0.0)
            depth, height, width = input_shape[1:4]
            d, rest = np.divmod(np.broadcast_to(flat, contribution.shape), height * width)
            h, w = np.divmod(rest, width)
            index = (np.broadcast_to(positions[0], contribution.shape), d, h, w)
            if channels_last:
                index += (np.broadcast_to(positions[-1], contribution.shape),)
            np.add.at(grad_in, index, contribution)
    return grad_in.astype(grad_out.dtype)


def _as_batch_inputs_channels(array: np.ndarray, channels_last: bool) -> np.ndarray:
    return array.reshape(array.shape[0], -1, array.shape[-1] if channels_last else 1)


def max_unpool(x: np.ndarray, indices: np.ndarray, size: int, channels_last: bool,
               stream=None) -> tuple[np.ndarray, int]:
    values = _as_batch_inputs_channels(x, channels_last)
    at = _as_batch_inputs_channels(indices, channels_last)
    out = np.zeros((values.shape[0], size, values.shape[2]), x.dtype)
    inside = (at >= 0) & (at < size)
    n, q, c = np.nonzero(inside)
    # The last input in scan order wins: keep each target's last writer explicitly
    # (NumPy does not promise an order for duplicate fancy-index assignments).
    target = (n * size + at[n, q, c]) * values.shape[2] + c
    _, last_from_end = np.unique(target[::-1], return_index=True)
    keep = len(target) - 1 - last_from_end
    out[n[keep], at[n, q, c][keep], c[keep]] = values[n[keep], q[keep], c[keep]]
    shape = (x.shape[0], size, *x.shape[2:]) if channels_last else (x.shape[0], size)
    return out.reshape(shape), int((~inside).sum())


def max_unpool_backward(grad_out: np.ndarray, indices: np.ndarray,
                        stream=None) -> tuple[np.ndarray, int]:
    inside = (indices >= 0) & (indices < grad_out.shape[1])
    gathered = np.take_along_axis(grad_out, np.where(inside, indices, 0), axis=1)
    return np.where(inside, gathered, 0).astype(grad_out.dtype), int((~inside).sum())


def fractional_max_pool(x: np.ndarray, starts: np.ndarray, kernel: np.ndarray,
                        out_shape: tuple, lowest, stream=None):
    batch, depth, height, width, channels = x.shape
    n = np.arange(batch).reshape(-1, 1, 1, 1, 1)
    c = np.arange(channels).reshape(1, 1, 1, 1, -1)
    positions = [np.arange(size).reshape([-1 if a == axis else 1 for a in range(5)])
                 for axis, size in enumerate(out_shape, start=1)]
    d0, h0, w0 = (starts[n, c, row, o] for row, o in enumerate(positions))
    best = np.full((batch, *out_shape, channels), lowest, x.dtype)
    best_at = np.broadcast_to((d0 * height + h0) * width + w0, best.shape)
    for jd, jh, jw in itertools.product(*(range(int(k)) for k in kernel)):
        d, h, w = d0 + jd, h0 + jh, w0 + jw
        values = x[n, d, h, w, c]
        take = (values > best) | (values != values)
        best = np.where(take, values, best)
        best_at = np.where(take, (d * height + h) * width + w, best_at)
    return best, best_at.astype(np.int64)
