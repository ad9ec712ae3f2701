"""Host drivers of the CUDA back end: arrays, allocation and kernel launches.

Implements the back-end interface of :mod:`fastpool._dispatch` (the same
names as :mod:`fastpool.cpu` and :mod:`fastpool._host`) on numba device
arrays.  Inputs with ``__cuda_array_interface__`` are viewed without a copy;
results go back to the caller's kind of array (numba, CuPy, torch; NumPy
input is copied in and out).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from fastpool._config import CUDA_MAX_THREADS_PER_BLOCK
from fastpool._params import WindowTable
from fastpool.cuda import kernels

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------


def _is_device_array(x: object) -> bool:
    return cuda.devicearray.is_cuda_ndarray(x)


def _library(x: object) -> str:
    return type(x).__module__.split(".")[0]


def asarray(x: object, op: str, name: str = "x", stream=None):
    """A numba device array for ``x``: a view of GPU input, a copy of host input."""
    if _is_device_array(x):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        library = _library(x)
        if library == "torch" and not x.is_contiguous():
            x = x.contiguous()
        elif library == "cupy" and not x.flags.c_contiguous:
            import cupy
            x = cupy.ascontiguousarray(x)
        return cuda.as_cuda_array(x)
    from fastpool import _host
    host = _host.asarray(x, op, name)
    return cuda.to_device(_host.canonical(host, host.shape), stream=stream or 0)


def canonical(array, shape: tuple, stream=None):
    if not array.is_c_contiguous():
        raise ValueError(f"fastpool's CUDA back end needs C-contiguous device arrays, got "
                         f"shape {array.shape} with strides {array.strides}; copy it first "
                         f"(torch tensors and CuPy arrays are copied automatically)")
    return array.reshape(shape)


def empty(shape: tuple, dtype, stream=None):
    return cuda.device_array(shape, np.dtype(dtype), stream=stream or 0)


def zeros(shape: tuple, dtype, stream=None):
    array = empty(shape, dtype, stream)
    if array.size:
        flat = array.reshape(array.size)
        _configure(kernels.fill, flat.size, stream)(flat, np.dtype(dtype).type(0))
    return array


def _elementwise(kernel, array, stream=None):
    source = canonical(array, (array.size,))
    out = empty(source.shape, source.dtype, stream)
    if out.size:
        _configure(kernel, out.size, stream)(source, out)
    return out.reshape(array.shape)


def absolute(array, stream=None):
    return _elementwise(kernels.absolute, array, stream)


def reverse_order(array, stream=None):
    """An order-reversing bijection of the dtype (see fastpool._host.reverse_order)."""
    kernel = kernels.negate if np.dtype(array.dtype).kind == "f" else kernels.invert
    return _elementwise(kernel, array, stream)


def times_sign(values, x, stream=None):
    flat = canonical(values, (values.size,))
    if flat.size:
        _configure(kernels.times_sign, flat.size, stream)(flat, canonical(x, (x.size,)))
    return values


def wrap(result, like: object):
    """``result`` (a numba device array) as the kind of array ``like`` is."""
    if _is_device_array(like):
        return result
    library = _library(like)
    if library == "torch":
        import torch
        return torch.as_tensor(result, device=like.device)
    if library == "cupy":
        import cupy
        return cupy.asarray(result)
    if hasattr(like, "__cuda_array_interface__"):
        return result
    return result.copy_to_host()


# --------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------


def _grid(n: int) -> tuple[int, int]:
    """Blocks and threads per block for ``n`` elements, from the shape: small outputs
    get small blocks; grid-stride loops cover what the block cap leaves."""
    threads = min(CUDA_MAX_THREADS_PER_BLOCK, max(32, -(-n // 32) * 32))
    device = cuda.get_current_device()
    multiprocessors = getattr(device, "MULTIPROCESSOR_COUNT", 1)
    blocks = min(-(-n // threads), 32 * multiprocessors)
    return max(blocks, 1), threads


def _configure(kernel, n: int, stream):
    """``kernel`` configured for ``n`` elements on ``stream``."""
    blocks, threads = _grid(n)
    return kernel[blocks, threads, stream or 0]


def _to_device(table: WindowTable, stream):
    return tuple(cuda.to_device(a, stream=stream or 0)
                 for a in (table.start, table.stop, table.step, table.divisor))


def _accumulator_zero(dtype) -> np.floating:
    """Averages accumulate in float32 for float16/float32 input, float64 for float64."""
    return np.float64(0) if np.dtype(dtype) == np.float64 else np.float32(0)


def _five_d(array, channels_last: bool):
    return array if channels_last else array.reshape(array.shape + (1,))


def max_pool(x, table: WindowTable, channels_last: bool, lowest, with_indices: bool,
             stream=None):
    x5 = _five_d(x, channels_last)
    shape = (x5.shape[0], *table.out_shape, x5.shape[4])
    out = empty(shape, x.dtype, stream)
    indices = empty(shape if with_indices else (1,) * 5, np.int64, stream)
    start, stop, step, _ = _to_device(table, stream)
    _configure(kernels.max_pool, out.size, stream)(
        x5, out, indices, start, stop, step, np.dtype(x.dtype).type(lowest), with_indices)
    canonical_shape = shape if channels_last else shape[:4]
    return out.reshape(canonical_shape), (indices.reshape(canonical_shape) if with_indices
                                          else None)


def sum_pool(x, table: WindowTable, channels_last: bool, power: float | None, stream=None):
    x5 = _five_d(x, channels_last)
    shape = (x5.shape[0], *table.out_shape, x5.shape[4])
    out = empty(shape, x.dtype, stream)
    start, stop, step, divisor = _to_device(table, stream)
    _configure(kernels.sum_pool, out.size, stream)(
        x5, out, start, stop, step, divisor, table.scale,
        None if power is None else float(power), _accumulator_zero(x.dtype))
    return out.reshape(shape if channels_last else shape[:4])


def sum_backward(grad_out, x, table: WindowTable, channels_last: bool, input_shape: tuple,
                 power: float | None, stream=None):
    grad5 = _five_d(grad_out, channels_last)
    in5 = input_shape if channels_last else input_shape + (1,)
    zero = _accumulator_zero(grad_out.dtype)
    coefficient = empty(grad5.shape, np.dtype(type(zero)), stream)
    start, stop, step, divisor = _to_device(table, stream)
    lp = None if power is None else float(power)
    x5 = coefficient if x is None else _five_d(x, channels_last)
    _configure(kernels.output_coefficients, grad5.size, stream)(
        grad5, x5, coefficient, start, stop, step, divisor, table.scale, lp, zero)
    grad_in = empty(in5, grad_out.dtype, stream)
    first, last = (cuda.to_device(a, stream=stream or 0)
                   for a in table.covering_outputs(in5[1:4]))
    _configure(kernels.sum_backward, grad_in.size, stream)(
        coefficient, x5 if x is not None else grad_in, grad_in, first, last, start, stop,
        step, lp, zero)
    return grad_in.reshape(input_shape)


def max_backward(grad_out, indices, input_shape: tuple, channels_last: bool,
                 table: WindowTable | None = None, stream=None):
    """Gather (given the window table, when every index lies in its own window) or
    one ordered scatter per plane; never atomics."""
    in5 = input_shape if channels_last else input_shape + (1,)
    plane = in5[1] * in5[2] * in5[3]
    grad5 = _five_d(grad_out, channels_last)
    idx5 = _five_d(indices, channels_last)
    if table is not None:
        start, stop, step, _ = _to_device(table, stream)
        flag = cuda.to_device(np.zeros(1, np.int32), stream=stream or 0)
        _configure(kernels.flag_outside_window, idx5.size, stream)(
            idx5, start, stop, step, in5[2], in5[3], flag)
        if not flag.copy_to_host()[0]:  # bound to stream; pageable copies wait for it
            grad_in = empty(in5, grad_out.dtype, stream)
            first, last = (cuda.to_device(a, stream=stream or 0)
                           for a in table.covering_outputs(in5[1:4]))
            _configure(kernels.max_backward, grad_in.size, stream)(
                grad5, idx5, grad_in, first, last, start, stop, step,
                _accumulator_zero(grad_out.dtype) if grad_out.dtype != np.float16
                else np.float16(0))
            return grad_in.reshape(input_shape), 0
    # Without the window, or with indices that are not this window's maxima: scatter
    # them, as torch would, counting those outside the plane.
    outside = cuda.to_device(np.zeros(1, np.int32), stream=stream or 0)
    grad_in = zeros((in5[0], plane, in5[4]), grad_out.dtype, stream)
    flat_shape = (in5[0], grad5.size // (in5[0] * in5[4]) if grad5.size else 0, in5[4])
    _configure(kernels.max_backward_by_plane, in5[0] * in5[4], stream)(
        grad5.reshape(flat_shape), idx5.reshape(flat_shape), grad_in, outside)
    return grad_in.reshape(input_shape), int(outside.copy_to_host()[0])


def conv(x, weight, bias, out_shape, stride, pad, stream=None):
    out = empty(out_shape, x.dtype, stream)
    _configure(kernels.conv_forward, out.size, stream)(
        x, weight, bias, out, cuda.to_device(stride, stream=stream or 0),
        cuda.to_device(pad, stream=stream or 0), _accumulator_zero(x.dtype))
    return out


def conv_backward(grad, x, weight, stride, pad, stream=None):
    stride_d, pad_d = (cuda.to_device(a, stream=stream or 0) for a in (stride, pad))
    zero = _accumulator_zero(grad.dtype)
    grad_in = empty(x.shape, grad.dtype, stream)
    _configure(kernels.conv_backward_input, grad_in.size, stream)(
        grad, weight, grad_in, stride_d, pad_d, zero)
    grad_weight = empty(weight.shape, grad.dtype, stream)
    _configure(kernels.conv_backward_weight, grad_weight.size, stream)(
        grad, x, grad_weight, stride_d, pad_d, zero)
    return grad_in, grad_weight


def conv_bias_grad(grad, stream=None):
    grad_bias = empty((grad.shape[1],), grad.dtype, stream)
    _configure(kernels.conv_bias_grad, grad_bias.size, stream)(
        grad, grad_bias, _accumulator_zero(grad.dtype))
    return grad_bias


def _as_three_d(array):
    return array.reshape(array.shape[0], array.shape[1],
                         array.shape[2] if len(array.shape) == 3 else 1)


def max_unpool(x, indices, size: int, channels_last: bool, stream=None):
    """Scatter canonical ``x`` to planes of ``size``: (out, indices outside the plane)."""
    x3, idx3 = _as_three_d(x), _as_three_d(indices)
    shape = (x3.shape[0], size, x3.shape[2])
    winner = empty(shape, np.int64, stream)
    _configure(kernels.fill, winner.size, stream)(winner.reshape(winner.size), -1)
    out = zeros(shape, x.dtype, stream)
    outside = cuda.to_device(np.zeros(1, np.int64), stream=stream or 0)
    _configure(kernels.unpool_claim, idx3.size, stream)(idx3, winner, outside)
    _configure(kernels.unpool_write, x3.size, stream)(x3, idx3, winner, out)
    result = out if channels_last else out.reshape(shape[:2])
    return result, int(outside.copy_to_host()[0])


def max_unpool_backward(grad_out, indices, stream=None):
    """Gather canonical (batch, size, C) ``grad_out`` at (batch, inputs, C) ``indices``."""
    grad_in = empty(indices.shape, grad_out.dtype, stream)
    outside = cuda.to_device(np.zeros(1, np.int64), stream=stream or 0)
    _configure(kernels.unpool_backward, grad_in.size, stream)(grad_out, indices, grad_in,
                                                              outside)
    return grad_in, int(outside.copy_to_host()[0])


def fractional_max_pool(x, starts, kernel, out_shape: tuple, lowest, stream=None):
    """See fastpool.cpu.pooling.fractional_max_pool."""
    shape = (x.shape[0], *out_shape, x.shape[4])
    out, indices = empty(shape, x.dtype, stream), empty(shape, np.int64, stream)
    _configure(kernels.fractional_max_pool, out.size, stream)(
        x, out, indices, cuda.to_device(starts, stream=stream or 0),
        cuda.to_device(kernel, stream=stream or 0), np.dtype(x.dtype).type(lowest))
    return out, indices
