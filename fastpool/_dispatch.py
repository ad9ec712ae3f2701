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

import numpy as np

from fastpool._params import (
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


def _host_array(x: object, op: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        array = np.asarray(x)
    except Exception as error:  # torch tensors needing grad, ragged lists, ...
        raise TypeError(f"{op}: x must be an array or a nested sequence of numbers, got "
                        f"{type(x).__name__} ({error})") from error
    if array.dtype == object:
        raise TypeError(f"{op}: x must be an array or a nested sequence of numbers, got "
                        f"{type(x).__name__}")
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


def sliding_pool(x, mode, nd, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode=False, *, op: str, strict: bool, norm_type=None,
                 count_include_pad=True, divisor_override=None, return_indices=False,
                 channels_last=False, backend=None):
    """Max, average or Lp pooling over the trailing ``nd`` spatial axes."""
    mode = check_mode(mode, op)
    window = SlidingWindow.from_args(op, nd, kernel_size, stride, padding, dilation,
                                     ceil_mode)
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    count_include_pad = check_bool(count_include_pad, "count_include_pad", op)
    divisor_override = check_divisor_override(divisor_override, op)
    if mode != "max" and any(d != 1 for d in window.dilation):
        raise ValueError(f"{op}: dilation={window.dilation} is only supported by max pooling")
    if mode != "max" and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max pooling")
    if mode != "avg" and divisor_override is not None:
        raise ValueError(f"{op}: divisor_override={divisor_override} is only supported by "
                         f"avg pooling")
    if mode == "lp":
        power = check_norm_type(norm_type, op)
        if any(p != 0 for p in window.padding):
            raise ValueError(f"{op}: padding={window.padding} is not supported by lp pooling")
    elif norm_type is not None:
        raise ValueError(f"{op}: norm_type={norm_type!r} is only used by lp pooling")
    else:
        power = 1.0

    impl = _backend(backend, x, op)
    array = _host_array(x, op)
    check_dtype(array.dtype, mode, op)
    layout = Layout.of(array.shape, nd, channels_last, op, strict)
    if mode == "lp":
        # torch's lp_pool: avg_pool(x**p) * prod(kernel_size), then the p-th root.
        table = window.table(op, layout.spatial, "padded", scale=math.prod(window.kernel_size))
    elif mode == "avg":
        divisor = divisor_override or ("padded" if count_include_pad else "valid")
        table = window.table(op, layout.spatial, divisor)
    else:
        table = window.table(op, layout.spatial, "valid")
    return _run(impl, mode, layout, array, table, power=power, with_indices=return_indices)


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
