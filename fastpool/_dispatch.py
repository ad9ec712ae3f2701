"""The dispatch layer between the public functions and the back ends.

Validates arguments (through :mod:`fastpool._params`), picks a back end from
the ``backend`` argument or the input's type, canonicalises the input array
(C-contiguous, native byte order, 4-D or 5-D) and reshapes the back end's
result to the caller's layout.  Back ends export ``max_pool`` and ``sum_pool``
with the same signatures; they are imported on first use.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass

import numpy as np

from fastpool._params import (
    FLOAT_DTYPES,
    Layout,
    SlidingWindow,
    WindowTable,
    adaptive_output_shape,
    adaptive_table,
    check_backend,
    check_bool,
    check_divisor_override,
    check_dtype,
    check_mode,
    check_norm_type,
)

_BACKEND_MODULES = {"cpu": "fastpool.cpu", "numpy": "fastpool.reference"}


def _backend(name: str | None, x: object, op: str):
    name = check_backend(name, op)
    on_gpu = hasattr(x, "__cuda_array_interface__")
    if name == "cuda" or (name is None and on_gpu):
        raise ValueError(f"{op}: the CUDA back end is not available in this version of "
                         f"fastpool (backend={name!r}, input {type(x).__name__}); use "
                         f"backend='cpu' with a host array")
    return importlib.import_module(_BACKEND_MODULES[name or "cpu"])


def _host_array(x: object, op: str, name: str = "x") -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        array = np.asarray(x)
    except Exception as error:  # torch tensors needing grad, ragged lists, ...
        raise TypeError(f"{op}: {name} must be an array or a nested sequence of numbers, "
                        f"got {type(x).__name__} ({error})") from error
    if array.dtype == object:
        raise TypeError(f"{op}: {name} must be an array or a nested sequence of numbers, "
                        f"got {type(x).__name__}")
    return array


def _lowest(dtype: np.dtype):
    """The value that loses every max comparison: torch's initial maximum."""
    return -np.inf if dtype.kind == "f" else np.iinfo(dtype).min


def _canonical(array: np.ndarray, layout: Layout) -> np.ndarray:
    dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
    canonical = np.ascontiguousarray(array.reshape(layout.canonical_shape()), dtype=dtype)
    return canonical.view(np.uint8) if dtype == np.bool_ else canonical


def _run(impl, mode: str, layout: Layout, array: np.ndarray, table: WindowTable, *,
         power: float = 1.0, with_indices: bool = False):
    out_spatial = table.out_shape[3 - len(layout.spatial):]
    result_shape = layout.result_shape(out_spatial)
    if layout.is_empty():
        out = np.empty(result_shape, array.dtype.newbyteorder("="))
        return (out, np.empty(result_shape, np.int64)) if with_indices else out
    canonical = _canonical(array, layout)
    if mode == "max":
        out, indices = impl.max_pool(canonical, table, layout.channels_last,
                                     _lowest(canonical.dtype), with_indices)
        out = out.view(np.bool_) if array.dtype == np.bool_ else out
    else:
        out, indices = impl.sum_pool(canonical, table, layout.channels_last, power), None
    out = out.reshape(result_shape)
    return (out, indices.reshape(result_shape)) if with_indices else out


@dataclass(frozen=True)
class _SlidingOp:
    """A validated sliding-window op: the window, the reduction and its divisor rule."""

    op: str
    mode: str
    window: SlidingWindow
    power: float = 1.0
    divisor: str | int = "valid"

    @classmethod
    def from_args(cls, op, mode, nd, kernel_size, stride, padding, dilation, ceil_mode,
                  norm_type=None, count_include_pad=True, divisor_override=None):
        mode = check_mode(mode, op)
        window = SlidingWindow.from_args(op, nd, kernel_size, stride, padding, dilation,
                                         ceil_mode)
        count_include_pad = check_bool(count_include_pad, "count_include_pad", op)
        divisor_override = check_divisor_override(divisor_override, op)
        if mode != "max" and any(d != 1 for d in window.dilation):
            raise ValueError(f"{op}: dilation={window.dilation} is only supported by max "
                             f"pooling")
        if mode != "avg" and divisor_override is not None:
            raise ValueError(f"{op}: divisor_override={divisor_override} is only supported "
                             f"by avg pooling")
        if mode == "lp":
            if any(p != 0 for p in window.padding):
                raise ValueError(f"{op}: padding={window.padding} is not supported by lp "
                                 f"pooling")
            return cls(op, mode, window, check_norm_type(norm_type, op), "padded")
        if norm_type is not None:
            raise ValueError(f"{op}: norm_type={norm_type!r} is only used by lp pooling")
        if mode == "avg":
            return cls(op, mode, window, 1.0,
                       divisor_override or ("padded" if count_include_pad else "valid"))
        return cls(op, mode, window)

    @property
    def is_max_of_abs(self) -> bool:
        """torch computes lp_pool with norm_type=inf as max pooling of |x|."""
        return self.mode == "lp" and math.isinf(self.power)

    def table(self, layout: Layout) -> WindowTable:
        # torch's lp_pool: avg_pool(x**p) * prod(kernel_size), then the p-th root.
        scale = math.prod(self.window.kernel_size) if self.mode == "lp" else 1.0
        return self.window.table(self.op, layout.spatial, self.divisor, scale=scale)


def sliding_pool(x, mode, nd, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode=False, *, op: str, strict: bool, norm_type=None,
                 count_include_pad=True, divisor_override=None, return_indices=False,
                 channels_last=False, backend=None):
    """Max, average or Lp pooling over the trailing ``nd`` spatial axes."""
    spec = _SlidingOp.from_args(op, mode, nd, kernel_size, stride, padding, dilation,
                                ceil_mode, norm_type, count_include_pad, divisor_override)
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if spec.mode != "max" and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max pooling")
    impl = _backend(backend, x, op)
    array = _host_array(x, op)
    check_dtype(array.dtype, spec.mode, op)
    layout = Layout.of(array.shape, nd, channels_last, op, strict)
    if spec.is_max_of_abs:
        return _run(impl, "max", layout, np.abs(array), spec.table(layout))
    return _run(impl, spec.mode, layout, array, spec.table(layout), power=spec.power,
                with_indices=return_indices)


def adaptive_pool(x, mode, nd, output_size, *, op: str, strict: bool, return_indices=False,
                  channels_last=False, backend=None):
    """Adaptive max or average pooling to ``output_size`` over ``nd`` spatial axes."""
    if mode not in ("max", "avg"):
        raise ValueError(f"{op}: mode must be 'max' or 'avg', got {mode!r}")
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if mode != "max" and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max pooling")
    impl = _backend(backend, x, op)
    array = _host_array(x, op)
    check_dtype(array.dtype, mode, op)
    layout = Layout.of(array.shape, nd, channels_last, op, strict)
    out_spatial = adaptive_output_shape(op, nd, output_size, layout.spatial)
    table = adaptive_table(layout.spatial, out_spatial)
    return _run(impl, mode, layout, array, table, with_indices=return_indices)


def global_pool(x, mode, nd, *, op: str, keepdims=False, return_indices=False,
                channels_last=False, backend=None):
    """Pool each plane to one value: ``(N, C)``, or ``(N, C, 1, ...)`` with keepdims."""
    keepdims = check_bool(keepdims, "keepdims", op)
    result = adaptive_pool(x, mode, nd, 1, op=op, strict=True, return_indices=return_indices,
                           channels_last=channels_last, backend=backend)
    if keepdims:
        return result
    spatial_axes = tuple(range(-nd - 1, -1) if channels_last else range(-nd, 0))
    if return_indices:
        return tuple(r.squeeze(spatial_axes) for r in result)
    return result.squeeze(spatial_axes)


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------


def _input_shape(input_shape: object, op: str) -> tuple[int, ...]:
    if not isinstance(input_shape, (tuple, list)) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0
            for s in input_shape):
        raise TypeError(f"{op}: input_shape must be a tuple of non-negative ints, got "
                        f"{input_shape!r}")
    return tuple(int(s) for s in input_shape)


def _grad_array(grad_output: object, op: str) -> np.ndarray:
    grad = _host_array(grad_output, op, name="grad_output")
    if grad.dtype.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(f"{op}: grad_output dtype {grad.dtype} is not supported; gradients "
                        f"are float32 or float64")
    return grad


def _check_grad_shape(grad: np.ndarray, want: tuple, op: str, name: str = "grad_output"):
    if grad.shape != tuple(want):
        raise ValueError(f"{op}: {name} has shape {grad.shape}, but the forward op on this "
                         f"input_shape gives {tuple(want)}")


def _native(array: np.ndarray, shape: tuple) -> np.ndarray:
    dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
    return np.ascontiguousarray(array.reshape(shape), dtype=dtype)


def _max_backward(impl, grad: np.ndarray, indices: object, layout: Layout,
                  input_shape: tuple, op: str) -> np.ndarray:
    indices = _host_array(indices, op, name="indices")
    if indices.dtype.newbyteorder("=") != np.int64:
        raise ValueError(f"{op}: indices must be int64 (as returned by the forward op with "
                         f"return_indices=True), got dtype {indices.dtype}")
    if indices.shape != grad.shape:
        raise ValueError(f"{op}: indices has shape {indices.shape} but grad_output has "
                         f"shape {grad.shape}")
    if layout.is_empty():
        return np.zeros(input_shape, grad.dtype.newbyteorder("="))
    out_shape = layout.canonical_out_shape(grad.shape[len(layout.batch_shape):][
        : len(layout.spatial)])
    grad_in, outside = impl.max_backward(_native(grad, out_shape), _native(indices, out_shape),
                                         layout.canonical_shape(), layout.channels_last)
    if outside:
        plane = math.prod(layout.spatial)
        raise ValueError(f"{op}: indices hold {outside} values outside [0, {plane}), the "
                         f"positions of input_shape's spatial plane {layout.spatial}")
    return grad_in.reshape(input_shape)


def max_backward(grad_output, indices, input_shape, nd, *, op: str, squeezed=False,
                 channels_last=False, backend=None):
    """Gradient of max pooling (sliding, adaptive or, with ``squeezed``, global)."""
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op)
    input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    grad = _grad_array(grad_output, op)
    if squeezed:
        grad = _unsqueeze_global(grad, layout, op)
        indices = _unsqueeze_global(_host_array(indices, op, name="indices"), layout, op,
                                    "indices")
    fixed = layout.batch_shape + ((layout.channels,) if channels_last else ())
    spatial = grad.shape[len(layout.batch_shape):][:nd]
    if (grad.ndim != len(input_shape) or len(spatial) != nd or min(spatial) < 1
            or layout.result_shape(spatial) != grad.shape):
        raise ValueError(f"{op}: grad_output has shape {grad.shape}, which does not fit "
                         f"input_shape {input_shape} (batch and channel axes {fixed})")
    return _max_backward(impl, grad, indices, layout, input_shape, op)


def _unsqueeze_global(array: np.ndarray, layout: Layout, op: str, name="grad_output"):
    keepdims = layout.result_shape((1,) * len(layout.spatial))
    flat = layout.batch_shape + ((layout.channels,) if layout.channels_last else ())
    if array.shape == flat:
        return array.reshape(keepdims)
    if array.shape != keepdims:
        raise ValueError(f"{op}: {name} has shape {array.shape}, but the forward op on this "
                         f"input_shape gives {flat} (or {keepdims} with keepdims)")
    return array


def _sum_backward(impl, grad: np.ndarray, x: np.ndarray | None, layout: Layout,
                  table: WindowTable, power: float, input_shape: tuple, op: str):
    _check_grad_shape(grad, layout.result_shape(table.out_shape[3 - len(layout.spatial):]),
                      op)
    dtype = grad.dtype.newbyteorder("=")
    if layout.is_empty():
        return np.zeros(input_shape, dtype)
    canonical = layout.canonical_shape()
    grad_in = impl.sum_backward(
        _native(grad, layout.canonical_out_shape(table.out_shape[3 - len(layout.spatial):])),
        None if x is None else _native(x, canonical).astype(dtype, copy=False), table,
        layout.channels_last, canonical, power)
    return grad_in.reshape(input_shape)


def sliding_backward(grad_output, input_shape, mode, nd, kernel_size, stride=None,
                     padding=0, ceil_mode=False, *, op: str, x=None, norm_type=None,
                     count_include_pad=True, divisor_override=None, channels_last=False,
                     backend=None):
    """Gradient of avg or lp pooling (lp needs the forward input ``x``)."""
    spec = _SlidingOp.from_args(op, mode, nd, kernel_size, stride, padding, 1, ceil_mode,
                                norm_type, count_include_pad, divisor_override)
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op)
    grad = _grad_array(grad_output, op)
    if spec.mode == "lp":
        x = _host_array(x, op)
        check_dtype(x.dtype, "lp", op)
        input_shape = x.shape
    else:
        input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    table = spec.table(layout)
    if spec.is_max_of_abs:
        magnitude = np.abs(x)
        _, indices = _run(impl, "max", layout, magnitude, table, with_indices=True)
        _check_grad_shape(grad, indices.shape, op)
        grad_in = _max_backward(impl, grad, indices, layout, input_shape, op)
        return grad_in * np.sign(x).astype(grad_in.dtype)
    return _sum_backward(impl, grad, x, layout, table, spec.power, input_shape, op)


def adaptive_avg_backward(grad_output, input_shape, nd, *, op: str, squeezed=False,
                          channels_last=False, backend=None):
    """Gradient of adaptive (or, with ``squeezed``, global) average pooling."""
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op)
    input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    grad = _grad_array(grad_output, op)
    if squeezed:
        grad = _unsqueeze_global(grad, layout, op)
    spatial = grad.shape[len(layout.batch_shape):][:nd]
    if len(spatial) != nd or min(spatial) < 1:
        _check_grad_shape(grad, layout.result_shape((1,) * nd), op)
    table = adaptive_table(layout.spatial, tuple(spatial))
    return _sum_backward(impl, grad, None, layout, table, 1.0, input_shape, op)
