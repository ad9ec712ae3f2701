"""Host drivers of the CUDA back end: arrays, allocation and kernel launches.

Implements the back-end interface of :mod:`fastpool._dispatch` (the same
names as :mod:`fastpool.cpu` and :mod:`fastpool._host`) on numba device
arrays.  Inputs with ``__cuda_array_interface__`` are viewed without a copy;
results go back to the caller's kind of array (numba, CuPy, torch; NumPy
input is copied in and out).
"""

from __future__ import annotations

import collections
import threading
import weakref

import numpy as np
from numba import cuda

from fastpool import _config
from fastpool._config import CUDA_MAX_THREADS_PER_BLOCK
from fastpool._params import WindowTable
from fastpool.cuda import kernels

try:  # NumPy has no bfloat16; ml_dtypes provides the host type (as JAX and torch use)
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with the cuda extra
    BFLOAT16 = None

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)) + (
    (BFLOAT16,) if BFLOAT16 is not None else ())
# The __cuda_array_interface__ typestr of bfloat16 (torch's, ml_dtypes' dtype.str).
_BF16_TYPESTR = "<V2"


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------


class Bfloat16Array:
    """A bfloat16 device array: numba has no bfloat16 arrays, so its bits travel as a
    uint16 device array (``bits``) and kernels widen them to float32 in registers.

    Exposes ``__cuda_array_interface__`` with typestr ``<V2`` (torch's bfloat16)."""

    def __init__(self, bits):
        self.bits = bits

    dtype = BFLOAT16

    @property
    def shape(self):
        return self.bits.shape

    @property
    def size(self):
        return self.bits.size

    @property
    def ndim(self):
        return self.bits.ndim

    @property
    def strides(self):
        return self.bits.strides

    @property
    def stream(self):
        return getattr(self.bits, "stream", 0)

    def is_c_contiguous(self):
        return self.bits.is_c_contiguous()

    def reshape(self, *shape):
        return Bfloat16Array(self.bits.reshape(*shape))

    def __getitem__(self, item):
        return Bfloat16Array(self.bits[item])

    def copy_to_host(self, stream=0):
        return self.bits.copy_to_host(stream=stream).view(BFLOAT16)

    @property
    def __cuda_array_interface__(self):
        interface = dict(self.bits.__cuda_array_interface__)
        interface["typestr"] = _BF16_TYPESTR
        return interface


def _is_device_array(x: object) -> bool:
    return cuda.devicearray.is_cuda_ndarray(x) or isinstance(x, Bfloat16Array)


def _library(x: object) -> str:
    return type(x).__module__.split(".")[0]


def _bits(array):
    """The numba array a kernel takes, and its ``half`` marker: None for all but the
    half types, False for float16, True for bfloat16 (given as its uint16 bits)."""
    if isinstance(array, Bfloat16Array):
        return array.bits, True
    return array, (False if np.dtype(array.dtype) == np.float16 else None)


def _compute_zero(dtype):
    """0 in the type kernels compute in: float32 for float16, bfloat16 and float32
    (torch's accumulate type on the GPU), float64 for float64, the dtype itself for
    integers (exact)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.float64(0)
    if dtype.kind == "f" or dtype == BFLOAT16:
        return np.float32(0)
    return dtype.type(0)


def _stream_of(stream, *arrays):
    """``stream``, or else the stream the first input was produced on (a
    ``__cuda_array_interface__`` v3 stream, imported without a host sync)."""
    if stream is not None:
        return stream
    for array in arrays:
        if array is not None:
            return getattr(array, "stream", 0) or 0
    return 0


def asarray(x: object, op: str, name: str = "x", stream=None):
    """A numba device array for ``x``: a view of GPU input, a copy of host input.

    GPU input is imported without a host synchronisation: kernels then launch on
    the producer's stream (``__cuda_array_interface__`` v3) or on ``stream``."""
    if _is_device_array(x):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        library = _library(x)
        if library == "torch" and not x.is_contiguous():
            x = x.contiguous()
        elif library == "cupy" and not x.flags.c_contiguous:
            import cupy
            x = cupy.ascontiguousarray(x)
        interface = x.__cuda_array_interface__
        if interface["typestr"] == _BF16_TYPESTR:
            if BFLOAT16 is None:
                raise TypeError(f"{op}: {name} is bfloat16, which needs the ml_dtypes "
                                f"package: pip install ml_dtypes")
            interface = {**interface, "typestr": "<u2"}
            return Bfloat16Array(cuda.from_cuda_array_interface(interface, owner=x,
                                                                 sync=False))
        return cuda.from_cuda_array_interface(interface, owner=x, sync=False)
    from fastpool import _host
    host = _host.asarray(x, op, name)
    host = _host.canonical(host, host.shape)
    if host.dtype == BFLOAT16:
        return Bfloat16Array(cuda.to_device(host.view(np.uint16), stream=stream or 0))
    return cuda.to_device(host, stream=stream or 0)


def canonical(array, shape: tuple, stream=None):
    if not array.is_c_contiguous():
        raise ValueError(f"fastpool's CUDA back end needs C-contiguous device arrays, got "
                         f"shape {array.shape} with strides {array.strides}; copy it first "
                         f"(torch tensors and CuPy arrays are copied automatically)")
    return array.reshape(shape)


def empty(shape: tuple, dtype, stream=None):
    if np.dtype(dtype) == BFLOAT16:
        return Bfloat16Array(cuda.device_array(shape, np.uint16, stream=stream or 0))
    return cuda.device_array(shape, np.dtype(dtype), stream=stream or 0)


def zeros(shape: tuple, dtype, stream=None):
    array = empty(shape, dtype, stream)
    if array.size:
        flat, _ = _bits(array.reshape(array.size))
        _configure(kernels.fill, flat.size, stream)(flat, flat.dtype.type(0))
    return array


def absolute(array, stream=None):
    stream = _stream_of(stream, array)
    source = canonical(array, (array.size,))
    out = empty(source.shape, source.dtype, stream)
    if out.size:
        bits, bf16 = _bits(source)
        _configure(kernels.absolute, out.size, stream)(
            bits, _bits(out)[0], _compute_zero(source.dtype), bf16)
    return out.reshape(array.shape)


def reverse_order(array, stream=None):
    """An order-reversing bijection of the dtype (see fastpool._host.reverse_order):
    negation for the float types (half ones through float32), bitwise not otherwise."""
    stream = _stream_of(stream, array)
    source = canonical(array, (array.size,))
    out = empty(source.shape, source.dtype, stream)
    if out.size:
        bits, half = _bits(source)
        if half is not None or np.dtype(source.dtype).kind == "f":
            _configure(kernels.negate, out.size, stream)(
                bits, _bits(out)[0], _compute_zero(source.dtype), half)
        else:
            _configure(kernels.invert, out.size, stream)(source, out)
    return out.reshape(array.shape)


def times_sign(values, x, stream=None):
    stream = _stream_of(stream, values)
    flat = canonical(values, (values.size,))
    if flat.size:
        bits, bf16 = _bits(flat)
        _configure(kernels.times_sign, flat.size, stream)(
            bits, _bits(canonical(x, (x.size,)))[0], _compute_zero(flat.dtype), bf16)
    return values


def scaled_sum(a, b, scale: float, stream=None):
    """``scale * (a + b)`` (0.5: timm's avgmax head), half types computed in float32."""
    stream = _stream_of(stream, a)
    flat_a = canonical(a, (a.size,))
    out = empty(flat_a.shape, flat_a.dtype, stream)
    if out.size:
        bits, bf16 = _bits(flat_a)
        zero = _compute_zero(flat_a.dtype)
        _configure(kernels.scaled_sum, out.size, stream)(
            bits, _bits(canonical(b, (b.size,)))[0], _bits(out)[0], zero + scale, zero, bf16)
    return out.reshape(a.shape)


def _copy_rows(source, out, width, source_offset, out_offset, stream):
    rows = source.shape[0]
    if rows * width:
        bits, out_bits = _bits(canonical(source, (source.size,)))[0], \
            _bits(canonical(out, (out.size,)))[0]
        _configure(kernels.copy_rows, rows * width, stream)(
            bits, out_bits, width, source.shape[1], source_offset, out.shape[1], out_offset,
            _narrow(bits, out_bits))


def concat_rows(a, b, stream=None):
    """Two (rows, C) arrays side by side: (rows, 2C), ``a`` first."""
    stream = _stream_of(stream, a)
    rows, width = a.shape
    out = empty((rows, 2 * width), a.dtype, stream)
    _copy_rows(a, out, width, 0, 0, stream)
    _copy_rows(b, out, width, 0, width, stream)
    return out


def split_rows(array, stream=None):
    """The inverse of :func:`concat_rows`: (rows, 2C) as two (rows, C) arrays."""
    stream = _stream_of(stream, array)
    rows, width = array.shape[0], array.shape[1] // 2
    halves = (empty((rows, width), array.dtype, stream),
              empty((rows, width), array.dtype, stream))
    for offset, half in zip((0, width), halves):
        _copy_rows(array, half, width, offset, 0, stream)
    return halves


def wrap(result, like: object):
    """``result`` (a numba device array) as the kind of array ``like`` is."""
    if _is_device_array(like):
        return result
    library = _library(like)
    if library == "torch":
        import torch
        if isinstance(result, Bfloat16Array):
            return torch.as_tensor(result.bits.view(np.int16),
                                   device=like.device).view(torch.bfloat16)
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

# Called as hook(kernel, arguments) before every launch when set; the launch is
# skipped if it returns False.  The compiler check (tests/cuda/test_compiler.py)
# records the specialisations the API launches with it.
launch_hook = None


def _grid(n: int) -> tuple[int, int]:
    """Blocks and threads per block for ``n`` elements, from the shape: small outputs
    get small blocks; grid-stride loops cover what the block cap leaves."""
    threads = min(CUDA_MAX_THREADS_PER_BLOCK, max(32, -(-n // 32) * 32))
    blocks = min(-(-n // threads), 32 * _multiprocessors())
    return max(blocks, 1), threads


def _multiprocessors() -> int:
    device = cuda.get_current_device()
    return getattr(device, "MULTIPROCESSOR_COUNT", 1)


def _configure(kernel, n: int, stream):
    """``kernel`` configured for ``n`` elements on ``stream``."""
    blocks, threads = _grid(n)
    configured = kernel[blocks, threads, stream or 0]
    if launch_hook is None:
        return configured

    def launch(*arguments):
        if launch_hook(kernel, arguments) is not False:
            configured(*arguments)
    return launch


# Window tables live on the device once per (host table, device): the host tables
# are memoised (fastpool._params), so a repeated call uploads nothing.  Bounded;
# entries hold a weak reference to their host table and its staging copy in pinned
# memory (the upload is asynchronous, on the first caller's stream).
_DEVICE_TABLES: collections.OrderedDict = collections.OrderedDict()
_DEVICE_TABLES_SIZE = 256
_DEVICE_TABLES_LOCK = threading.Lock()


def _upload(arrays, stream):
    staged = []
    for array in arrays:
        pinned = cuda.pinned_array(array.shape, array.dtype)
        pinned[...] = array
        staged.append((pinned, cuda.to_device(pinned, stream=stream or 0)))
    return staged


def _cached(owner, part, arrays_of, stream):
    """The device copies of ``arrays_of()``, kept per (owner, part, device); an owner of
    None keys on ``part`` alone (which then holds the values themselves)."""
    device = getattr(cuda.get_current_device(), "id", 0)
    key = (None if owner is None else id(owner), part, device)
    with _DEVICE_TABLES_LOCK:
        entry = _DEVICE_TABLES.get(key)
        if entry is not None and entry[0]() is owner:
            _DEVICE_TABLES.move_to_end(key)
            return entry[1]
    staged = _upload(arrays_of(), stream)
    arrays = tuple(device_array for _, device_array in staged)
    with _DEVICE_TABLES_LOCK:
        _DEVICE_TABLES[key] = ((lambda: None) if owner is None else weakref.ref(owner),
                               arrays, staged)
        while len(_DEVICE_TABLES) > _DEVICE_TABLES_SIZE:
            _DEVICE_TABLES.popitem(last=False)
    return arrays


def _to_device(table: WindowTable, stream):
    """start, stop, step and divisor of ``table`` on the current device."""
    return _cached(table, "window", lambda: (table.start, table.stop, table.step,
                                             table.divisor), stream)


def _covering(table: WindowTable, in_spatial: tuple, stream):
    """``table.covering_outputs(in_spatial)`` on the current device."""
    return _cached(table, ("covering", tuple(in_spatial)),
                   lambda: table.covering_outputs(tuple(in_spatial)), stream)


def _accumulator_zero(dtype):
    """Averages accumulate in float32 for half and float32 input, float64 for float64."""
    return _compute_zero(dtype)


def _five_d(array, channels_last: bool):
    return array if channels_last else array.reshape(array.shape + (1,))


def _flat(array):
    return array.reshape(array.size)


_INT32_LIMIT = 2**31 - 1


def _narrow(*arrays):
    """The kernels' index specialisation: True (32-bit index arithmetic) when every
    array of the launch has at most 2**31 - 1 elements (torch's
    canUse32BitIndexMath), None (64-bit) otherwise."""
    return True if all(a.size <= _INT32_LIMIT for a in arrays if a is not None) else None


def max_pool(x, table: WindowTable, channels_last: bool, lowest, with_indices: bool,
             stream=None):
    stream = _stream_of(stream, x)
    x5 = _five_d(x, channels_last)
    shape = (x5.shape[0], *table.out_shape, x5.shape[4])
    out = empty(shape, x.dtype, stream)
    indices = empty(shape if with_indices else (1,) * 5, np.int64, stream)
    start, stop, step, _ = _to_device(table, stream)
    zero = _compute_zero(x.dtype)
    bits, bf16 = _bits(x5)
    lowest = zero.dtype.type(-np.inf) if zero.dtype.kind == "f" else zero.dtype.type(lowest)
    _configure(kernels.max_pool, out.size, stream)(
        _flat(bits), _flat(_bits(out)[0]), _flat(indices), _triple(x5.shape), _triple(shape), start,
        stop, step, lowest, with_indices, zero, bf16, _narrow(x5, out))
    canonical_shape = shape if channels_last else shape[:4]
    return out.reshape(canonical_shape), (indices.reshape(canonical_shape) if with_indices
                                          else None)


def sum_pool(x, table: WindowTable, channels_last: bool, power: float | None, stream=None):
    stream = _stream_of(stream, x)
    x5 = _five_d(x, channels_last)
    shape = (x5.shape[0], *table.out_shape, x5.shape[4])
    out = empty(shape, x.dtype, stream)
    start, stop, step, _ = _to_device(table, stream)
    bits, bf16 = _bits(x5)
    # Divisors, scale and powers in the accumulate type (torch's on the GPU).
    zero = _accumulator_zero(x.dtype)
    divisor, = _cached(table, ("divisor", zero.dtype.str),
                       lambda: (table.divisor.astype(zero.dtype),), stream)
    # Lp's p = 2 (the usual one) runs a specialisation without pow: squares, then
    # torch's square root (see kernels._term and kernels._root).
    square = True if power == 2.0 else None
    general = None if power is None or square else zero.dtype.type(power)
    _configure(kernels.sum_pool, out.size, stream)(
        _flat(bits), _flat(_bits(out)[0]), _triple(x5.shape), _triple(shape), start, stop, step,
        divisor, zero.dtype.type(table.scale), general, square, zero, bf16, _narrow(x5, out))
    return out.reshape(shape if channels_last else shape[:4])


def sum_backward(grad_out, x, table: WindowTable, channels_last: bool, input_shape: tuple,
                 power: float | None, stream=None):
    stream = _stream_of(stream, grad_out, x)
    grad5 = _five_d(grad_out, channels_last)
    in5 = input_shape if channels_last else input_shape + (1,)
    zero = _accumulator_zero(grad_out.dtype)
    coefficient = empty(grad5.shape, zero.dtype, stream)
    start, stop, step, divisor = _to_device(table, stream)
    lp = None if power is None else float(power)
    grad_bits, bf16 = _bits(grad5)
    x5 = coefficient if x is None else _bits(_five_d(x, channels_last))[0]
    _configure(kernels.output_coefficients, grad5.size, stream)(
        _flat(grad_bits), _flat(x5), _flat(coefficient), _triple(in5), _triple(grad5.shape),
        start, stop, step, divisor, table.scale, lp, zero, bf16,
        _narrow(grad5, x5, coefficient))
    grad_in = empty(in5, grad_out.dtype, stream)
    first, last = _covering(table, in5[1:4], stream)
    in_bits = _bits(grad_in)[0]
    _configure(kernels.sum_backward, grad_in.size, stream)(
        coefficient, x5 if x is not None else in_bits, in_bits, first, last, start, stop,
        step, lp, zero, bf16, _narrow(coefficient, grad_in))
    return grad_in.reshape(input_shape)


def max_backward(grad_out, indices, input_shape: tuple, channels_last: bool,
                 table: WindowTable | None = None, stream=None):
    """Gather (given the window table, when every index lies in its own window) or
    one ordered scatter per plane; never atomics, and no host synchronisation: the
    choice is made on the device (a flag that the gather and the scatter read).

    Returns the gradient and the count of indices outside the plane, from the
    device's flag copied back (a host synchronisation) so that such indices raise as
    on the CPU; 0 without the copy under ``FASTPOOL_CUDA_CHECK_INDICES=0``."""
    stream = _stream_of(stream, grad_out, indices)
    in5 = input_shape if channels_last else input_shape + (1,)
    plane = in5[1] * in5[2] * in5[3]
    grad5 = _five_d(grad_out, channels_last)
    idx5 = _five_d(indices, channels_last)
    zero = _accumulator_zero(grad_out.dtype)
    grad_bits, bf16 = _bits(grad5)
    flag = zeros((1,), np.int32, stream)
    grad_in = empty(in5, grad_out.dtype, stream)
    in_bits = _bits(grad_in)[0]
    if table is not None:
        start, stop, step, _ = _to_device(table, stream)
        _configure(kernels.flag_outside_window, idx5.size, stream)(
            idx5, start, stop, step, in5[1], in5[2], in5[3], flag, _narrow(idx5, grad_in))
        first, last = _covering(table, in5[1:4], stream)
        _configure(kernels.max_backward, grad_in.size, stream)(
            grad_bits, idx5, in_bits, first, last, start, stop, step, zero, bf16, flag,
            _narrow(grad5, grad_in))
        when = 1  # the scatter below runs only if the flag was raised
    else:
        when = 0  # no window: always scatter
    # Without the window, or with indices that are not this window's maxima: scatter
    # them, as torch would, flagging those outside the plane.
    outside = zeros((1,), np.int32, stream)
    scattered = in_bits.reshape((in5[0], plane, in5[4]))
    # Sums in the compute type: in place when that is the gradient's own dtype.
    total = scattered if bf16 is None and zero.dtype == grad_out.dtype else \
        empty(scattered.shape, zero.dtype, stream)
    flat_shape = (in5[0], grad5.size // (in5[0] * in5[4]) if grad5.size else 0, in5[4])
    _configure(kernels.max_backward_by_plane, in5[0] * in5[4], stream)(
        grad_bits.reshape(flat_shape), idx5.reshape(flat_shape),
        scattered, total, outside, zero, bf16, flag, when, _narrow(grad5, grad_in))
    return grad_in.reshape(input_shape), _outside_count(outside, stream)


def _triple(values) -> tuple:
    return tuple(int(v) for v in values)


def conv(x, weight, bias, out_shape, stride, pad, stream=None):
    stream = _stream_of(stream, x)
    out = empty(out_shape, x.dtype, stream)
    x_bits, bf16 = _bits(x)
    _configure(kernels.conv_forward, out.size, stream)(
        _flat(x_bits), _flat(_bits(weight)[0]), _bits(bias)[0], _flat(_bits(out)[0]),
        _triple(x.shape), _triple(weight.shape), _triple(out.shape), _triple(stride),
        _triple(pad), _accumulator_zero(x.dtype), bf16, _narrow(x, weight, out))
    return out


def conv_backward(grad, x, weight, stride, pad, stream=None, output_mask=(True, True)):
    """(grad_input, grad_weight), each None where ``output_mask`` says."""
    stream = _stream_of(stream, grad, x)
    zero = _accumulator_zero(grad.dtype)
    grad_bits, bf16 = _bits(grad)
    grad_in = grad_weight = None
    if output_mask[0]:
        grad_in = empty(x.shape, grad.dtype, stream)
        _configure(kernels.conv_backward_input, grad_in.size, stream)(
            grad_bits, _bits(weight)[0], _bits(grad_in)[0], _triple(stride), _triple(pad),
            zero, bf16, _narrow(grad, weight, grad_in))
    if output_mask[1]:
        grad_weight = empty(weight.shape, grad.dtype, stream)
        _configure(kernels.conv_backward_weight, grad_weight.size, stream)(
            grad_bits, _bits(x)[0], _bits(grad_weight)[0], _triple(stride), _triple(pad),
            zero, bf16, _narrow(grad, x))
    return grad_in, grad_weight


def conv_bias_grad(grad, stream=None):
    stream = _stream_of(stream, grad)
    grad_bias = empty((grad.shape[1],), grad.dtype, stream)
    grad_bits, bf16 = _bits(grad)
    _configure(kernels.conv_bias_grad, grad_bias.size, stream)(
        grad_bits, _bits(grad_bias)[0], _accumulator_zero(grad.dtype), bf16)
    return grad_bias


def _as_three_d(array):
    return array.reshape(array.shape[0], array.shape[1],
                         array.shape[2] if len(array.shape) == 3 else 1)


def max_unpool(x, indices, size: int, channels_last: bool, stream=None):
    """Scatter canonical ``x`` to planes of ``size``: (out, indices outside the plane).
    Values are copied, never computed on, so the raw bits serve every dtype."""
    stream = _stream_of(stream, x, indices)
    x3, idx3 = _as_three_d(_bits(x)[0]), _as_three_d(indices)
    shape = (x3.shape[0], size, x3.shape[2])
    winner = empty(shape, np.int64, stream)
    _configure(kernels.fill, winner.size, stream)(winner.reshape(winner.size), -1)
    out = zeros(shape, x.dtype, stream)
    outside = zeros((1,), np.int64, stream)  # on the device: no upload from the host
    narrow = _narrow(idx3, winner, out)
    _configure(kernels.unpool_claim, idx3.size, stream)(idx3, winner, outside, narrow)
    _configure(kernels.unpool_write, x3.size, stream)(x3, idx3, winner, _bits(out)[0], narrow)
    result = out if channels_last else out.reshape(shape[:2])
    return result, _outside_count(outside, stream)


def _outside_count(outside, stream) -> int:
    """The count of indices outside their plane, for the caller to raise on as the CPU
    does: read back from the device (a host synchronisation, on the launch's stream)
    only while ``FASTPOOL_CUDA_CHECK_INDICES`` is on, as for the max backward's check;
    0 without the copy otherwise."""
    if not _config.CUDA_CHECK_INDICES:
        return 0
    return int(outside.copy_to_host(stream=stream or 0)[0])


def max_unpool_backward(grad_out, indices, stream=None):
    """Gather canonical (batch, size, C) ``grad_out`` at (batch, inputs, C) ``indices``."""
    stream = _stream_of(stream, grad_out, indices)
    grad_in = empty(indices.shape, grad_out.dtype, stream)
    outside = zeros((1,), np.int64, stream)
    _configure(kernels.unpool_backward, grad_in.size, stream)(
        _bits(grad_out)[0], indices, _bits(grad_in)[0], outside,
        _narrow(grad_out, indices, grad_in))
    return grad_in, _outside_count(outside, stream)


def fractional_max_pool(x, starts, kernel, out_shape: tuple, lowest, stream=None):
    """See fastpool.cpu.pooling.fractional_max_pool."""
    stream = _stream_of(stream, x)
    shape = (x.shape[0], *out_shape, x.shape[4])
    out, indices = empty(shape, x.dtype, stream), empty(shape, np.int64, stream)
    zero = _compute_zero(x.dtype)
    bits, half = _bits(x)
    lowest = zero.dtype.type(-np.inf) if zero.dtype.kind == "f" else zero.dtype.type(lowest)
    # The window sizes travel as a tuple (no upload).  The window starts are this
    # call's random samples, drawn on the host, so they are copied, on the stream
    # (from pageable memory: the driver stages them, without waiting on the device).
    _configure(kernels.fractional_max_pool, out.size, stream)(
        _flat(bits), _flat(_bits(out)[0]), _flat(indices), _triple(x.shape), _triple(shape),
        cuda.to_device(np.ascontiguousarray(starts, np.int64), stream=stream or 0),
        _triple(kernel), lowest, zero, half, _narrow(bits, out))
    return out, indices


# --------------------------------------------------------------------------
# Generalized-mean (GeM) pooling's element-wise steps (fastpool._gem composes them
# with the average-pooling kernels).  Arrays are C-contiguous in the caller's layout;
# ``plane`` is the elements per channel plane (1 channels-last), ``p`` a host array of
# one power per channel or one for all.
# --------------------------------------------------------------------------


def compute_dtype(dtype) -> np.dtype:
    """The dtype GeM computes in: float32 for the half types, else the dtype."""
    return np.dtype(_compute_zero(dtype).dtype)


def _flat_bits(array):
    return _bits(canonical(array, (array.size,)))


def _powers(p, dtype, stream):
    """GeM's powers on the current device, uploaded once per value (the calls of a
    forward and backward, and of every step while p stays fixed, share one copy)."""
    values = np.ascontiguousarray(p, dtype=compute_dtype(dtype))
    values.flags.writeable = False
    key = (values.dtype.str, values.tobytes())
    return _cached(None, ("powers", key), lambda: (values,), stream)[0]


def gem_powers(x, p, plane: int, eps: float, with_log: bool, stream=None):
    """``max(x, eps) ** p`` in the compute type (and, with_log, times ``log max(x, eps)``)."""
    stream = _stream_of(stream, x)
    dtype = compute_dtype(x.dtype)
    powered = cuda.device_array(x.shape, dtype, stream=stream or 0)
    logged = cuda.device_array(x.shape if with_log else (1,), dtype, stream=stream or 0)
    if x.size:
        bits, half = _flat_bits(x)
        zero = _compute_zero(x.dtype)
        _configure(kernels.gem_powers, x.size, stream)(
            bits, _powers(p, x.dtype, stream), plane, len(p), zero + eps,
            powered.reshape(x.size), logged.reshape(logged.size), with_log, zero, half,
            _narrow(x))
    return powered, (logged if with_log else None)


def gem_root(mean, p, plane: int, dtype, stream=None):
    """``mean ** (1 / p)``, rounded to ``dtype`` (the input's)."""
    stream = _stream_of(stream, mean)
    out = empty(mean.shape, dtype, stream)
    if out.size:
        _configure(kernels.gem_root, out.size, stream)(
            canonical(mean, (mean.size,)), _powers(p, dtype, stream), plane, len(p),
            _flat_bits(out)[0], _bits(out)[1], _narrow(mean))
    return out


def gem_output_grads(grad, mean, log_mean, p, plane: int, dtype, stream=None):
    """The window means' gradient and the per-element terms of p's gradient."""
    stream = _stream_of(stream, mean)
    grad_mean = cuda.device_array(mean.shape, mean.dtype, stream=stream or 0)
    grad_p = cuda.device_array(mean.shape, mean.dtype, stream=stream or 0)
    if mean.size:
        bits, half = _flat_bits(grad)
        _configure(kernels.gem_output_grads, mean.size, stream)(
            bits, canonical(mean, (mean.size,)), canonical(log_mean, (log_mean.size,)),
            _powers(p, dtype, stream), plane, len(p), grad_mean.reshape(mean.size),
            grad_p.reshape(mean.size), _compute_zero(grad.dtype), half, _narrow(grad, mean))
    return grad_mean, grad_p


def gem_input_grad(pooled, x, powered, p, plane: int, eps: float, stream=None):
    """The input's gradient from the window means' gradient spread over the input."""
    stream = _stream_of(stream, x)
    grad_x = empty(x.shape, x.dtype, stream)
    if x.size:
        bits, half = _flat_bits(x)
        zero = _compute_zero(x.dtype)
        _configure(kernels.gem_input_grad, x.size, stream)(
            canonical(pooled, (pooled.size,)), bits, canonical(powered, (powered.size,)),
            _powers(p, x.dtype, stream), plane, len(p), zero + eps,
            _flat_bits(grad_x)[0], zero, half, _narrow(x))
    return grad_x


def to_host(array, stream=None):
    """A NumPy copy of ``array``, read after the work queued on ``stream`` (or the
    array's own stream) has finished."""
    stream = _stream_of(stream, array)
    host = array.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()  # an asynchronous copy on a stream: wait before reading
    return host
