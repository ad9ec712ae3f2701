"""The dispatch layer between the public functions and the back ends.

Validates arguments (through :mod:`fastpool._params`), picks a back end from
the ``backend`` argument or the input's type, canonicalises the input array
(C-contiguous, native byte order, 4-D or 5-D) and reshapes the back end's
result to the caller's layout.  Back ends export ``max_pool`` and ``sum_pool``
with the same signatures; they are imported on first use.

Pooling calls and their gradients are *planned*: everything that follows from
the arguments, the input's shape and dtype and the back end (the validated
parameters, the window table, the shapes, the kernel and its non-array
arguments) is worked out once into a plan, which then only canonicalises,
launches and reshapes.  Calls with NumPy arrays on the host back ends keep
their plans in :data:`PLANS`, so a repeated small call skips straight to the
kernel; see :func:`_call`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fastpool._params import (
    COMBINED_MODES,
    EXTREMES,
    GLOBAL_MODES,
    ConvWindow,
    Layout,
    SlidingWindow,
    WindowTable,
    adaptive_output_shape,
    adaptive_table,
    arguments_key,
    check_backend,
    check_bool,
    check_divisor_override,
    check_dtype,
    check_mode,
    check_norm_type,
    check_output_mask,
    fractional_output_shape,
    fractional_starts,
    memoised_by_arguments,
    padding_as_written,
    unpool_output_shape,
)
from fastpool._threads import get_num_threads

_BACKEND_MODULES = {"cpu": "fastpool.cpu", "numpy": "fastpool.reference",
                    "cuda": "fastpool.cuda"}


def _on_gpu(x: object) -> bool:
    # numba's simulator arrays lack __cuda_array_interface__; recognise them by type.
    return hasattr(x, "__cuda_array_interface__") or type(x).__module__.startswith(
        "numba.cuda")


@functools.cache
def _backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def _backend(name: str | None, x: object, op: str, stream=None):
    name = check_backend(name, op)
    if name is None:
        name = "cuda" if _on_gpu(x) else "cpu"
    impl = _backend_module(name)
    if name == "cuda":
        return impl.require(op)
    if stream is not None:
        raise ValueError(f"{op}: stream={stream!r} is only used by the cuda back end; the "
                         f"{name!r} back end runs on the host (pass stream=None)")
    if _on_gpu(x):
        raise ValueError(f"{op}: backend={name!r} runs on the host, but the input is a GPU "
                         f"array ({type(x).__name__}); use backend='cuda' or None")
    return impl


def _lowest(dtype: np.dtype):
    """The value that loses every max comparison: torch's initial maximum."""
    return -np.inf if dtype.kind == "f" or dtype.name == "bfloat16" else np.iinfo(dtype).min


def _wrap(impl, result, like):
    """The result as the input's kind of array (numba, CuPy, torch or NumPy)."""
    if isinstance(result, tuple):
        return tuple(None if r is None else impl.wrap(r, like) for r in result)
    return impl.wrap(result, like)


# --------------------------------------------------------------------------
# Call plans and their cache
# --------------------------------------------------------------------------


class PlanCache:
    """A bounded map from a call's key to its plan, shared by every thread, that
    evicts the least recently *stored* plan not used since it was stored or last
    spared (the "second chance" approximation of LRU).

    A hit is one lookup in a plain dict and one store into its entry, which
    marks it used: no reordering, no lock (each is a single, atomic operation
    on a builtin), as a small call costs little more than the lookup.  Plans
    are immutable and their arrays read-only, so threads share them freely.
    Stores, and the evictions that follow them, hold the lock, which is made
    anew in a forked child, where another thread of the parent may have held it.
    """

    def __init__(self, size: int):
        self.size = size
        # key -> [plan, used since stored or spared], in the order of storing.
        self.entries: dict = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._new_lock)

    def get(self, key):
        """The plan under ``key``, or None; TypeError for an unhashable key."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        entry[1] = True
        return entry[0]

    def put(self, key, plan) -> None:
        entries = self.entries
        with self._lock:
            if key not in entries:  # else another thread stored its plan first
                # Each used entry is spared once (unmarked, moved to the back), so
                # this ends within two passes even if every entry was used.
                while entries and len(entries) >= self.size:
                    oldest = next(iter(entries))
                    entry = entries.pop(oldest)
                    if entry[1]:
                        entry[1] = False
                        entries[oldest] = entry
            entries[key] = [plan, False]

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def plans(self) -> list:
        """The cached plans, oldest stored (or spared) first."""
        return [entry[0] for entry in list(self.entries.values())]

    def __len__(self) -> int:
        return len(self.entries)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()


# Enough for every layer of a large network, forward and backward, at a few
# input shapes; a plan holds its window table and a few closures.
PLAN_CACHE_SIZE = 512
PLANS = PlanCache(PLAN_CACHE_SIZE)

_HOST_BACKENDS = ("cpu", "numpy")


def _call(build: Callable, arrays: tuple, backend, stream, arguments: tuple):
    """Run a planned call: ``build(arrays, backend, stream, *arguments)`` validates
    everything and returns the plan and the arrays as its back end takes them;
    the plan, called with those arrays and the stream, returns the result, which
    is then wrapped as the first array's kind.

    Calls whose arrays are all NumPy arrays (or None), on the default or a host
    back end, without a stream, look their plan up in :data:`PLANS` first, keyed
    on ``build``, the arguments (by value and type), the back end and each
    array's shape and dtype: everything a plan is computed from, but for the
    thread count that a parallel CPU plan splits its work for, which is checked
    on a hit (small calls run serially, whatever the count).  Their arrays need
    no resolving and their results no wrapping, so every check that can fail is
    in the plan's build, and a call that fails stores nothing and fails again
    the same way.  Checks of array *values* (indices inside the plane, say) run
    in the plan, every call.  Other calls (GPU arrays, lists, torch tensors,
    streams) build their plan each time, in the order the checks have always run.
    """
    if stream is None and (backend is None or (
            type(backend) is str and backend in _HOST_BACKENDS)):
        first = arrays[0]
        if type(first) is np.ndarray and (len(arrays) == 1 or all(
                type(array) is np.ndarray or array is None for array in arrays[1:])):
            try:
                key = (build, backend, arguments_key(arguments), first.shape, first.dtype)
                if len(arrays) > 1:  # the key's tuple is built in C for one array
                    key += tuple(None if array is None else (array.shape, array.dtype)
                                 for array in arrays[1:])
                plan = PLANS.get(key)
            except TypeError:  # an unhashable argument: plan without the cache
                key = plan = None
            if plan is not None and plan.threads is not None and \
                    plan.threads != get_num_threads():
                plan = None  # planned for another thread count: plan afresh
            if plan is None:
                plan, _ = build(arrays, backend, stream, *arguments)
                if key is not None:
                    PLANS.put(key, plan)
            return plan(*arrays)  # the host back ends' results are NumPy arrays
    plan, arrays_of_impl = build(arrays, backend, stream, *arguments)
    return _wrap(plan.impl, plan(*arrays_of_impl, stream), arrays[0])


def _unplanned(function: Callable, *arguments) -> Callable:
    """A back end's function without a planned form, with its arguments after the
    arrays fixed: the runner of a plan, taking the arrays and the stream."""
    def run(*arrays_and_stream):
        return function(*arrays_and_stream[:-1], *arguments, stream=arrays_and_stream[-1])

    return run


@dataclass(frozen=True, slots=True)
class _PoolPlan:
    """A forward pooling call, planned for one input shape and dtype on one back end."""

    impl: object
    picks: bool  # max or min pooling: pool returns (values, indices)
    reverses: bool  # min pooling (max pooling of the order-reversed input)
    canonical_shape: tuple  # the input as the kernels take it
    result_shape: tuple  # the caller's layout of the result
    empty: bool  # no batch or channel elements: nothing to launch
    dtype: np.dtype  # the input's, in native byte order
    with_indices: bool
    of_absolute: bool  # pool |x| (lp_pool with norm_type=inf: max pooling of |x|)
    as_bytes: bool  # bool input, pooled as uint8
    pool: Callable | None  # canonical array -> values (and indices, for max)
    threads: int | None  # the thread count pool splits its work for; None: any
    # Neither empty, nor of |x|, nor of bytes, nor reversed: the canonical input
    # goes to pool as it is (tested first: small calls are mostly this).
    plain: bool = False

    def __call__(self, array, stream=None):
        impl = self.impl
        if self.plain:
            result = self.pool(impl.canonical(array, self.canonical_shape, stream), stream)
        elif self.empty:
            out = impl.empty(self.result_shape, self.dtype, stream)
            return (out, impl.empty(self.result_shape, np.int64, stream)) \
                if self.with_indices else out
        else:
            result = self._pool_transformed(array, stream)
        shape = self.result_shape
        if not self.picks:
            return result.reshape(shape)
        out, indices = result
        return (out.reshape(shape), indices.reshape(shape)) if self.with_indices else \
            out.reshape(shape)

    def _pool_transformed(self, array, stream):
        """pool's canonical result of |x|, of bool input or of min pooling."""
        impl = self.impl
        if self.of_absolute:
            array = impl.absolute(array, stream)
        canonical = impl.canonical(array, self.canonical_shape, stream)
        if not self.picks:
            return self.pool(canonical, stream)
        if self.as_bytes:
            canonical = canonical.view(np.uint8)
        # Min pooling is max pooling under an order-reversing bijection of the dtype
        # (negation for floats, bitwise not for integers: exact at every extreme,
        # unsigned included, where -max(-x) is not), so NaN still wins, ties keep the
        # first element and the padding is the dtype's highest value.
        if self.reverses:
            canonical = impl.reverse_order(canonical, stream)
        out, indices = self.pool(canonical, stream)
        if self.reverses:
            out = impl.reverse_order(out, stream)
        if self.as_bytes:
            out = out.view(np.bool_)
        return out, indices


def _pool_plan(impl, mode: str, layout: Layout, dtype, table: WindowTable, *,
               power: float | None = None, with_indices: bool = False,
               of_absolute: bool = False) -> _PoolPlan:
    """The plan of pooling ``layout``'s input of ``dtype`` over ``table``."""
    dtype = np.dtype(dtype).newbyteorder("=")
    result_shape = layout.result_shape(table.out_shape[3 - len(layout.spatial):])
    as_bytes = dtype == np.bool_
    pool = None
    if not layout.is_empty():
        canonical = layout.canonical_shape()
        kernel_dtype = np.dtype(np.uint8) if as_bytes else dtype
        if mode in EXTREMES:
            arguments = (table, layout.channels_last, _lowest(kernel_dtype), with_indices)
            planner, function = getattr(impl, "plan_max_pool", None), impl.max_pool
        else:
            arguments = (table, layout.channels_last, power)
            planner, function = getattr(impl, "plan_sum_pool", None), impl.sum_pool
        pool = planner(canonical, kernel_dtype, *arguments) if planner else \
            _unplanned(function, *arguments)
    reverses = mode == "min"
    return _PoolPlan(impl, mode in EXTREMES, reverses, layout.canonical_shape(),
                     result_shape, layout.is_empty(), dtype, with_indices, of_absolute,
                     as_bytes, pool, getattr(pool, "threads", None),
                     not (layout.is_empty() or of_absolute or as_bytes or reverses))


@dataclass(frozen=True)
class _SlidingOp:
    """A validated sliding-window op: the window, the reduction and its divisor rule."""

    op: str
    mode: str
    window: SlidingWindow
    power: float | None = None  # Lp's norm_type; None for max and average
    divisor: str | int = "valid"

    @classmethod
    def from_args(cls, op, mode, nd, kernel_size, stride, padding, dilation, ceil_mode,
                  norm_type=None, count_include_pad=True, divisor_override=None):
        return memoised_by_arguments(cls._from_args, _SLIDING_OPS, (
            op, mode, nd, kernel_size, stride, padding, dilation, ceil_mode, norm_type,
            count_include_pad, divisor_override))

    @classmethod
    def _from_args(cls, op, mode, nd, kernel_size, stride, padding, dilation, ceil_mode,
                   norm_type, count_include_pad, divisor_override):
        mode = check_mode(mode, op)
        window = SlidingWindow.from_args(op, nd, kernel_size, stride, padding, dilation,
                                         ceil_mode)
        count_include_pad = check_bool(count_include_pad, "count_include_pad", op)
        divisor_override = check_divisor_override(divisor_override, op)
        if mode not in EXTREMES and any(d != 1 for d in window.dilation):
            raise ValueError(f"{op}: dilation={window.dilation} is only supported by max "
                             f"and min pooling")
        if mode != "avg" and divisor_override is not None:
            raise ValueError(f"{op}: divisor_override={divisor_override} is only supported "
                             f"by avg pooling")
        if mode == "lp":
            # torch's lp_pool has no padding; the TensorFlow/Flax forms pad with zeros.
            if window.is_torch_style and any(before for before, _ in window.padding):
                raise ValueError(f"{op}: padding={padding_as_written(window.padding)} is not "
                                 f"supported by lp pooling "
                                 f"(only 'valid', 'same' or (before, after) pairs are)")
            return cls(op, mode, window, check_norm_type(norm_type, op), "padded")
        if norm_type is not None:
            raise ValueError(f"{op}: norm_type={norm_type!r} is only used by lp pooling")
        if mode == "avg":
            return cls(op, mode, window, None,
                       divisor_override or ("padded" if count_include_pad else "valid"))
        return cls(op, mode, window)

    @property
    def is_max_of_abs(self) -> bool:
        """torch computes lp_pool with norm_type=inf as max pooling of |x|."""
        return self.mode == "lp" and math.isinf(self.power)

    @property
    def forward_power(self) -> float | None:
        """The power of the forward's window sums: None for a plain sum, which is also
        Lp with p = 1 (its backward still needs p, for torch's chain rule at 0 and NaN)."""
        return None if self.power == 1.0 else self.power

    def table(self, layout: Layout) -> WindowTable:
        # torch's lp_pool: avg_pool(x**p) * prod(kernel_size), then the p-th root.
        scale = math.prod(self.window.kernel_size) if self.mode == "lp" else 1.0
        return self.window.table(self.op, layout.spatial, self.divisor, scale=scale)


_SLIDING_OPS: dict = {}


def sliding_pool(x, mode, nd, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode=False, *, op: str, strict: bool, norm_type=None,
                 count_include_pad=True, divisor_override=None, return_indices=False,
                 channels_last=False, backend=None, stream=None):
    """Max, average or Lp pooling over the trailing ``nd`` spatial axes."""
    return _call(_sliding_plan, (x,), backend, stream, (
        op, strict, mode, nd, kernel_size, stride, padding, dilation, ceil_mode, norm_type,
        count_include_pad, divisor_override, return_indices, channels_last))


def _sliding_plan(arrays, backend, stream, op, strict, mode, nd, kernel_size, stride, padding,
                  dilation, ceil_mode, norm_type, count_include_pad, divisor_override,
                  return_indices, channels_last):
    (x,) = arrays
    spec = _SlidingOp.from_args(op, mode, nd, kernel_size, stride, padding, dilation,
                                ceil_mode, norm_type, count_include_pad, divisor_override)
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if spec.mode not in EXTREMES and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max and min "
                         f"pooling")
    impl = _backend(backend, x, op, stream)
    array = impl.asarray(x, op, "x", stream)
    check_dtype(np.dtype(array.dtype), spec.mode, op, impl.FLOAT_DTYPES)
    layout = Layout.of(tuple(array.shape), nd, channels_last, op, strict)
    if spec.is_max_of_abs:
        plan = _pool_plan(impl, "max", layout, array.dtype, spec.table(layout),
                          of_absolute=True)
    else:
        plan = _pool_plan(impl, spec.mode, layout, array.dtype, spec.table(layout),
                          power=spec.forward_power, with_indices=return_indices)
    return plan, (array,)


def adaptive_pool(x, mode, nd, output_size, *, op: str, strict: bool, return_indices=False,
                  channels_last=False, backend=None, stream=None):
    """Adaptive max or average pooling to ``output_size`` over ``nd`` spatial axes."""
    return _call(_adaptive_plan, (x,), backend, stream, (
        op, strict, mode, nd, output_size, return_indices, channels_last, None))


def _adaptive_plan(arrays, backend, stream, op, strict, mode, nd, output_size, return_indices,
                   channels_last, keepdims):
    """Adaptive pooling's plan; global pooling's too (``keepdims`` a bool, not None)."""
    (x,) = arrays
    if keepdims is not None:
        keepdims = check_bool(keepdims, "keepdims", op)
    if mode not in ("max", "min", "avg"):
        raise ValueError(f"{op}: mode must be 'max', 'min' or 'avg', got {mode!r}")
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    if mode not in EXTREMES and return_indices:
        raise ValueError(f"{op}: return_indices=True is only supported by max and min "
                         f"pooling")
    impl = _backend(backend, x, op, stream)
    array = impl.asarray(x, op, "x", stream)
    check_dtype(np.dtype(array.dtype), mode, op, impl.FLOAT_DTYPES)
    layout = Layout.of(tuple(array.shape), nd, channels_last, op, strict)
    out_spatial = adaptive_output_shape(op, nd, output_size, layout.spatial)
    table = adaptive_table(layout.spatial, out_spatial)
    plan = _pool_plan(impl, mode, layout, array.dtype, table, with_indices=return_indices)
    if keepdims is False:  # global pooling's (N, C) result: the pooled axes dropped
        shape = plan.result_shape
        plan = dataclasses.replace(plan, result_shape=shape[:-nd - 1] + shape[-1:]
                                   if channels_last else shape[:-nd])
    return plan, (array,)


def global_pool(x, mode, nd, *, op: str, keepdims=False, return_indices=False,
                channels_last=False, backend=None, stream=None):
    """Pool each plane to one value: ``(N, C)``, or ``(N, C, 1, ...)`` with keepdims.

    ``mode`` is one of GLOBAL_MODES; "avgmax" and "catavgmax" (timm's heads) compose the
    global average and maximum, and their indices are the maximum's."""
    keepdims = check_bool(keepdims, "keepdims", op)
    if mode not in GLOBAL_MODES:
        raise ValueError(f"{op}: mode must be one of {GLOBAL_MODES}, got {mode!r}")
    if mode not in COMBINED_MODES:
        return _call(_adaptive_plan, (x,), backend, stream, (
            op, True, mode, nd, 1, return_indices, channels_last, keepdims))
    impl, result = _global_combined(x, mode, nd, op, return_indices, channels_last, backend,
                                    stream)
    if not keepdims:
        def squeeze(r):
            return r.reshape(r.shape[:-nd - 1] + r.shape[-1:] if channels_last else
                             r.shape[:-nd])
        result = tuple(map(squeeze, result)) if return_indices else squeeze(result)
    return _wrap(impl, result, x)


def _adaptive(x, mode, nd, output_size, op, strict, return_indices, channels_last, backend,
              stream):
    """The back end used and the adaptive pooling's result, not yet wrapped as the
    input's kind (for compositions of several results)."""
    plan, arrays = _adaptive_plan((x,), backend, stream, op, strict, mode, nd, output_size,
                                  return_indices, channels_last, None)
    return plan.impl, plan(*arrays, stream)


def _rows(layout: Layout) -> tuple[int, int]:
    """The (rows, channels) view of a global result (keepdims or not)."""
    if layout.channels_last:
        return math.prod(layout.batch_shape), layout.channels
    return math.prod(layout.batch_shape[:-1]), layout.batch_shape[-1]


def _doubled_channels(shape: tuple, layout: Layout) -> tuple:
    """``shape`` (a global result's) with twice the channels: catavgmax's result."""
    axis = len(shape) - 1 if layout.channels_last else len(layout.batch_shape) - 1
    return shape[:axis] + (2 * shape[axis],) + shape[axis + 1:]


def _global_combined(x, mode, nd, op, return_indices, channels_last, backend, stream):
    """timm's avgmax (0.5 * (avg + max)) or catavgmax (avg then max on the channel axis)
    from the global average and maximum (keepdims shapes; not yet wrapped)."""
    return_indices = check_bool(return_indices, "return_indices", op)
    impl, avg = _adaptive(x, "avg", nd, 1, op, True, False, channels_last, backend, stream)
    _, (top, indices) = _adaptive(x, "max", nd, 1, op, True, True, channels_last, backend,
                                  stream)
    layout = Layout.of(tuple(avg.shape), nd, channels_last, op, strict=True)
    if mode == "avgmax":
        out = impl.scaled_sum(avg, top, 0.5, stream) if avg.size else avg
    else:
        rows, channels = _rows(layout)
        out = impl.concat_rows(impl.canonical(avg, (rows, channels), stream),
                               impl.canonical(top, (rows, channels), stream), stream)
        out = out.reshape(_doubled_channels(tuple(avg.shape), layout))
    return impl, ((out, indices) if return_indices else out)


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


def _grad_array(impl, grad_output: object, op: str, stream=None):
    grad = impl.asarray(grad_output, op, "grad_output", stream)
    if np.dtype(grad.dtype).newbyteorder("=") not in impl.FLOAT_DTYPES:
        raise TypeError(f"{op}: grad_output dtype {grad.dtype} is not supported; gradients "
                        f"are float32 or float64")
    return grad


def _check_grad_shape(grad: np.ndarray, want: tuple, op: str, name: str = "grad_output"):
    if grad.shape != tuple(want):
        raise ValueError(f"{op}: {name} has shape {grad.shape}, but the forward op on this "
                         f"input_shape gives {tuple(want)}")


@dataclass(frozen=True, slots=True)
class _MaxBackwardPlan:
    """Max pooling's gradient, planned for one gradient shape and dtype."""

    impl: object
    op: str
    input_shape: tuple
    spatial: tuple  # the input's spatial shape, which indices address
    empty: bool
    out_shape: tuple  # the gradient as the kernels take it
    backward: Callable | None  # canonical grad, indices -> (grad_input, indices outside)
    threads: int | None  # the thread count backward splits its work for; None: any

    def __call__(self, grad, indices, stream=None):
        impl = self.impl
        if self.empty:
            return impl.zeros(self.input_shape, grad.dtype, stream)
        grad_in, outside = self.backward(impl.canonical(grad, self.out_shape, stream),
                                         impl.canonical(indices, self.out_shape, stream),
                                         stream)
        if outside:
            raise ValueError(f"{self.op}: indices hold {outside} values outside [0, "
                             f"{math.prod(self.spatial)}), the positions of input_shape's "
                             f"spatial plane {self.spatial}")
        return grad_in.reshape(self.input_shape)


def _max_backward_plan(impl, grad, layout: Layout, input_shape: tuple, op: str,
                       table: WindowTable | None) -> _MaxBackwardPlan:
    """The plan for a gradient of ``grad``'s shape and dtype (indices already checked)."""
    out_shape = layout.canonical_out_shape(grad.shape[len(layout.batch_shape):][
        : len(layout.spatial)])
    backward = None
    if not layout.is_empty():
        arguments = (layout.canonical_shape(), layout.channels_last, table)
        planner = getattr(impl, "plan_max_backward", None)
        backward = planner(out_shape, np.dtype(grad.dtype).newbyteorder("="), *arguments) \
            if planner else _unplanned(impl.max_backward, *arguments)
    return _MaxBackwardPlan(impl, op, input_shape, layout.spatial, layout.is_empty(),
                            out_shape, backward, getattr(backward, "threads", None))


def _max_indices(impl, grad, indices: object, op: str, stream=None):
    """``indices`` as the back end's array, checked against ``grad``."""
    indices = impl.asarray(indices, op, "indices", stream)
    if np.dtype(indices.dtype).newbyteorder("=") != np.int64:
        raise ValueError(f"{op}: indices must be int64 (as returned by the forward op with "
                         f"return_indices=True), got dtype {indices.dtype}")
    if indices.shape != grad.shape:
        raise ValueError(f"{op}: indices has shape {indices.shape} but grad_output has "
                         f"shape {grad.shape}")
    return indices


def max_backward(grad_output, indices, input_shape, nd, *, op: str, kind="sliding",
                 window=None, channels_last=False, backend=None, stream=None):
    """Gradient of max pooling; ``kind`` is "sliding", "adaptive" or "global".

    ``window`` (the forward call's kernel_size, stride, padding, dilation and
    ceil_mode) is optional for sliding windows; back ends that gather use it.
    """
    return _call(_max_backward_call_plan, (grad_output, indices), backend, stream, (
        op, nd, kind, window, input_shape, channels_last))


def _max_backward_call_plan(arrays, backend, stream, op, nd, kind, window, input_shape,
                            channels_last):
    grad_output, indices = arrays
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op, stream)
    input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    grad = _grad_array(impl, grad_output, op, stream)
    if kind == "global":
        grad = _unsqueeze_global(impl, grad, layout, op, stream=stream)
        indices = _unsqueeze_global(impl, impl.asarray(indices, op, "indices", stream),
                                    layout, op, "indices", stream)
    fixed = layout.batch_shape + ((layout.channels,) if channels_last else ())
    spatial = grad.shape[len(layout.batch_shape):][:nd]
    if (grad.ndim != len(input_shape) or len(spatial) != nd or min(spatial) < 1
            or layout.result_shape(spatial) != grad.shape):
        raise ValueError(f"{op}: grad_output has shape {grad.shape}, which does not fit "
                         f"input_shape {input_shape} (batch and channel axes {fixed})")
    # Adaptive windows follow from the shapes; a GPU back end gathers through them.
    if kind != "sliding":
        table = adaptive_table(layout.spatial, tuple(spatial))
    elif window is not None:
        table = SlidingWindow.from_args(op, nd, *window).table(op, layout.spatial, "valid")
        _check_grad_shape(grad, layout.result_shape(table.out_shape[3 - nd:]), op)
    else:
        table = None
    indices = _max_indices(impl, grad, indices, op, stream)
    return _max_backward_plan(impl, grad, layout, input_shape, op, table), (grad, indices)


def _unsqueeze_global(impl, array, layout: Layout, op: str, name="grad_output",
                      stream=None):
    keepdims = layout.result_shape((1,) * len(layout.spatial))
    flat = layout.batch_shape + ((layout.channels,) if layout.channels_last else ())
    if array.shape == flat:
        return impl.canonical(array, keepdims, stream)
    if array.shape != keepdims:
        raise ValueError(f"{op}: {name} has shape {array.shape}, but the forward op on this "
                         f"input_shape gives {flat} (or {keepdims} with keepdims)")
    return array


@dataclass(frozen=True, slots=True)
class _SumBackwardPlan:
    """The gradient of average (or Lp) pooling, planned for one gradient shape and dtype."""

    impl: object
    input_shape: tuple
    empty: bool
    out_shape: tuple  # the gradient as the kernels take it
    canonical_shape: tuple  # the input (Lp's x) as the kernels take it
    backward: Callable | None  # canonical grad, x (or None) -> canonical grad_input
    threads: int | None  # the thread count backward splits its work for; None: any

    def __call__(self, grad, x=None, stream=None):
        impl = self.impl
        if self.empty:
            return impl.zeros(self.input_shape, grad.dtype, stream)
        grad_in = self.backward(
            impl.canonical(grad, self.out_shape, stream),
            None if x is None else impl.canonical(x, self.canonical_shape, stream), stream)
        return grad_in.reshape(self.input_shape)


def _sum_backward_plan(impl, grad, layout: Layout, table: WindowTable, power: float | None,
                       input_shape: tuple, op: str) -> _SumBackwardPlan:
    out_spatial = table.out_shape[3 - len(layout.spatial):]
    _check_grad_shape(grad, layout.result_shape(out_spatial), op)
    out_shape = layout.canonical_out_shape(out_spatial)
    canonical = layout.canonical_shape()
    backward = None
    if not layout.is_empty():
        arguments = (table, layout.channels_last, canonical, power)
        planner = getattr(impl, "plan_sum_backward", None)
        backward = planner(out_shape, np.dtype(grad.dtype).newbyteorder("="), *arguments) \
            if planner else _unplanned(impl.sum_backward, *arguments)
    return _SumBackwardPlan(impl, input_shape, layout.is_empty(), out_shape, canonical,
                            backward, getattr(backward, "threads", None))


def _sum_backward(impl, grad, x, layout: Layout, table: WindowTable, power: float | None,
                  input_shape: tuple, op: str, stream=None):
    """The gradient of a window sum over ``table``, planned and run at once."""
    return _sum_backward_plan(impl, grad, layout, table, power, input_shape, op)(
        grad, x, stream)


@dataclass(frozen=True, slots=True)
class _AbsMaxBackwardPlan:
    """lp_pool with norm_type=inf is max pooling of |x|: its gradient runs that forward
    for the indices, then max pooling's backward, times sign(x)."""

    forward: _PoolPlan
    backward: _MaxBackwardPlan

    @property
    def impl(self):
        return self.forward.impl

    @property
    def threads(self) -> int | None:
        return self.forward.threads if self.forward.threads is not None else \
            self.backward.threads

    def __call__(self, grad, x, stream=None):
        _, indices = self.forward(x, stream)
        return self.impl.times_sign(self.backward(grad, indices, stream), x, stream)


def sliding_backward(grad_output, input_shape, mode, nd, kernel_size, stride=None,
                     padding=0, ceil_mode=False, *, op: str, x=None, norm_type=None,
                     count_include_pad=True, divisor_override=None, channels_last=False,
                     backend=None, stream=None):
    """Gradient of avg or lp pooling (lp needs the forward input ``x``)."""
    return _call(_sliding_backward_plan, (grad_output, x), backend, stream, (
        op, mode, nd, kernel_size, stride, padding, ceil_mode, input_shape, norm_type,
        count_include_pad, divisor_override, channels_last))


def _sliding_backward_plan(arrays, backend, stream, op, mode, nd, kernel_size, stride,
                           padding, ceil_mode, input_shape, norm_type, count_include_pad,
                           divisor_override, channels_last):
    grad_output, x = arrays
    spec = _SlidingOp.from_args(op, mode, nd, kernel_size, stride, padding, 1, ceil_mode,
                                norm_type, count_include_pad, divisor_override)
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op, stream)
    grad = _grad_array(impl, grad_output, op, stream)
    if spec.mode == "lp":
        x = impl.asarray(x, op, "x", stream)
        check_dtype(np.dtype(x.dtype), "lp", op, impl.FLOAT_DTYPES)
        input_shape = tuple(x.shape)
    else:
        input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    table = spec.table(layout)
    if spec.is_max_of_abs:
        forward = _pool_plan(impl, "max", layout, x.dtype, table, with_indices=True,
                             of_absolute=True)
        _check_grad_shape(grad, forward.result_shape, op)
        plan = _AbsMaxBackwardPlan(forward, _max_backward_plan(impl, grad, layout,
                                                               input_shape, op, table))
    else:
        plan = _sum_backward_plan(impl, grad, layout, table, spec.power, input_shape, op)
    return plan, (grad, x)


def adaptive_avg_backward(grad_output, input_shape, nd, *, op: str, squeezed=False,
                          channels_last=False, backend=None, stream=None):
    """Gradient of adaptive (or, with ``squeezed``, global) average pooling."""
    return _call(_adaptive_avg_backward_plan, (grad_output, None), backend, stream, (
        op, nd, squeezed, input_shape, channels_last))


def _adaptive_avg_backward_plan(arrays, backend, stream, op, nd, squeezed, input_shape,
                                channels_last):
    grad_output, _ = arrays
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op, stream)
    input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    grad = _grad_array(impl, grad_output, op, stream)
    if squeezed:
        grad = _unsqueeze_global(impl, grad, layout, op, stream=stream)
    spatial = grad.shape[len(layout.batch_shape):][:nd]
    if len(spatial) != nd or min(spatial) < 1:
        _check_grad_shape(grad, layout.result_shape((1,) * nd), op)
    table = adaptive_table(layout.spatial, tuple(spatial))
    return _sum_backward_plan(impl, grad, layout, table, None, input_shape, op), (grad, None)


def global_combined_backward(grad_output, indices, input_shape, mode, nd, *, op: str,
                             channels_last=False, backend=None, stream=None):
    """Gradient of the avgmax / catavgmax global heads: 0.5 * (the average's gradient +
    the maximum's) for avgmax; catavgmax's gradient splits into the average's channels
    and the maximum's.  ``indices`` are the forward's (the maximum's)."""
    if mode not in COMBINED_MODES:
        raise ValueError(f"{op}: mode must be one of {COMBINED_MODES}, got {mode!r}")
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op, stream)
    input_shape = _input_shape(input_shape, op)
    layout = Layout.of(input_shape, nd, channels_last, op, strict=True)
    grad = _grad_array(impl, grad_output, op, stream)
    keepdims = layout.result_shape((1,) * nd)
    flat = layout.batch_shape + ((layout.channels,) if channels_last else ())
    if mode == "avgmax":
        grad_avg = grad_max = grad
    else:
        if grad.shape not in (_doubled_channels(keepdims, layout),
                              _doubled_channels(flat, layout)):
            raise ValueError(f"{op}: grad_output has shape {grad.shape}, but the forward op "
                             f"on this input_shape gives {_doubled_channels(flat, layout)} "
                             f"(or {_doubled_channels(keepdims, layout)} with keepdims)")
        rows, channels = _rows(layout)
        if rows * channels == 0:
            return _wrap(impl, impl.zeros(input_shape, grad.dtype, stream), grad_output)
        grad_avg, grad_max = impl.split_rows(
            impl.canonical(grad, (rows, 2 * channels), stream), stream)
        grad_avg = impl.canonical(grad_avg, keepdims, stream)
        grad_max = impl.canonical(grad_max, keepdims, stream)
    from_avg = adaptive_avg_backward(grad_avg, input_shape, nd, op=op, squeezed=True,
                                     channels_last=channels_last, backend=backend,
                                     stream=stream)
    from_max = max_backward(grad_max, indices, input_shape, nd, op=op, kind="global",
                            channels_last=channels_last, backend=backend, stream=stream)
    from_avg = impl.asarray(from_avg, op, stream=stream)
    from_max = impl.asarray(from_max, op, stream=stream)
    if mode == "avgmax":
        result = impl.scaled_sum(from_avg, from_max, 0.5, stream) if from_avg.size else from_avg
    else:  # the two halves touch the input independently: their gradients add
        result = impl.scaled_sum(from_avg, from_max, 1.0, stream) if from_avg.size else from_avg
    return _wrap(impl, result, grad_output)


# --------------------------------------------------------------------------
# Fractional max pooling
# --------------------------------------------------------------------------


def _fractional_samples(samples, seed, layout: Layout, nd: int, dtype: np.dtype, op: str):
    """(batch, C, nd) samples in [0, 1): the caller's (torch's ``_random_samples``, whose
    first ``batch`` rows are used), or drawn from ``numpy.random.default_rng(seed)``."""
    batch = math.prod(layout.batch_shape[:-1]) if not layout.channels_last else \
        math.prod(layout.batch_shape)
    channels = layout.channels if layout.channels_last else layout.batch_shape[-1]
    # The input's float type (torch's rule); float32 for the half types, whose samples
    # NumPy cannot draw; float64 for integers.
    precision = dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else \
        np.dtype(np.float64 if dtype.kind in "iub" else np.float32)
    if samples is None:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return rng.random((batch, channels, nd), dtype=precision)
    samples = np.asarray(samples.cpu() if hasattr(samples, "cpu") else samples)
    if samples.ndim != 3 or samples.shape[0] < batch or samples.shape[1:] != (channels, nd):
        raise ValueError(f"{op}: _random_samples must have shape (N, C, {nd}) with N >= "
                         f"{batch} and C = {channels}, got {samples.shape}")
    if samples.dtype != precision:
        raise TypeError(f"{op}: _random_samples must have the input's dtype {precision} "
                        f"(as torch requires), got {samples.dtype}")
    if not ((samples >= 0) & (samples < 1)).all():
        raise ValueError(f"{op}: _random_samples must lie in [0, 1)")
    return samples[:batch]


def fractional_max_pool(x, nd, kernel_size, output_size=None, output_ratio=None, *,
                        op: str, return_indices=False, samples=None, seed=None,
                        channels_last=False, backend=None, stream=None):
    """torch's fractional max pooling: windows of ``kernel_size`` at pseudo-random
    starts fixed by one sample per (batch, channel) and axis."""
    channels_last = check_bool(channels_last, "channels_last", op)
    return_indices = check_bool(return_indices, "return_indices", op)
    impl = _backend(backend, x, op, stream)
    array = impl.asarray(x, op, "x", stream)
    dtype = np.dtype(array.dtype).newbyteorder("=")
    check_dtype(dtype, "max", op, impl.FLOAT_DTYPES)
    layout = Layout.of(tuple(array.shape), nd, channels_last, op, strict=True)
    kernel, out_spatial = fractional_output_shape(op, nd, layout.spatial, kernel_size,
                                                  output_size, output_ratio)
    samples = _fractional_samples(samples, seed, layout, nd, dtype, op)
    result_shape = layout.result_shape(out_spatial)
    if layout.is_empty():
        out = impl.empty(result_shape, dtype, stream)
        result = (out, impl.empty(result_shape, np.int64, stream)) if return_indices else out
        return _wrap(impl, result, x)
    starts = fractional_starts(samples, layout.spatial, out_spatial, kernel)
    pad = (1,) * (3 - nd)
    canonical = layout.canonical_shape()
    if not channels_last:  # one plane per (batch, channel): (planes, D, H, W, 1)
        canonical = (*canonical, 1)
        starts = starts.reshape(canonical[0], 1, *starts.shape[2:])
    canonical = impl.canonical(array, canonical, stream)
    if dtype == np.bool_:
        canonical = canonical.view(np.uint8)
    out, indices = impl.fractional_max_pool(
        canonical, starts, np.array(pad + kernel, np.int64), pad + out_spatial,
        _lowest(np.dtype(canonical.dtype)), stream=stream)
    out = out.view(np.bool_) if dtype == np.bool_ else out
    result = (out.reshape(result_shape), indices.reshape(result_shape))
    return _wrap(impl, result if return_indices else result[0], x)


# --------------------------------------------------------------------------
# Max unpooling
# --------------------------------------------------------------------------


def _unpool_indices(impl, indices, want_shape: tuple, op: str, stream=None):
    indices = impl.asarray(indices, op, "indices", stream)
    if np.dtype(indices.dtype).newbyteorder("=") != np.int64:
        raise ValueError(f"{op}: indices must be int64 (as returned by max pooling with "
                         f"return_indices=True), got dtype {indices.dtype}")
    if tuple(indices.shape) != tuple(want_shape):
        raise ValueError(f"{op}: indices has shape {tuple(indices.shape)}, but the pooled "
                         f"input has shape {tuple(want_shape)}")
    return indices


def _refuse_outside(indices, size: int, op: str) -> None:
    """Name the first index outside ``[0, size)`` (an error path: copies GPU indices)."""
    flat = np.asarray(indices.copy_to_host() if hasattr(indices, "copy_to_host") else
                      indices).reshape(-1)
    first = int(np.flatnonzero((flat < 0) | (flat >= size))[0])
    raise ValueError(f"{op}: indices[{first}] (flat position) is {int(flat[first])}, outside "
                     f"the output plane [0, {size})")


def max_unpool(x, indices, nd, kernel_size, stride=None, padding=0, output_size=None, *,
               op: str, channels_last=False, backend=None, stream=None):
    """torch's max_unpool: a zero plane per (batch, channel) with ``x`` scattered to its
    ``indices``; among duplicate indices the last input in scan order wins."""
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, x, op, stream)
    array = impl.asarray(x, op, "x", stream)
    dtype = np.dtype(array.dtype).newbyteorder("=")
    check_dtype(dtype, "max", op, impl.FLOAT_DTYPES)
    layout = Layout.of(tuple(array.shape), nd, channels_last, op, strict=True)
    indices = _unpool_indices(impl, indices, array.shape, op, stream)
    out_spatial = unpool_output_shape(op, nd, layout.spatial, kernel_size, stride, padding,
                                      output_size)
    if layout.is_empty():
        return _wrap(impl, impl.zeros(layout.result_shape(out_spatial), dtype, stream), x)
    batch, inputs = math.prod(layout.batch_shape), math.prod(layout.spatial)
    shape = (batch, inputs, layout.channels) if channels_last else (batch, inputs)
    canonical = impl.canonical(array, shape, stream)
    if dtype == np.bool_:
        canonical = canonical.view(np.uint8)
    size = math.prod(out_spatial)
    out, outside = impl.max_unpool(canonical, impl.canonical(indices, shape, stream), size,
                                   channels_last, stream=stream)
    if outside:
        _refuse_outside(indices, size, op)
    out = out.view(np.bool_) if dtype == np.bool_ else out
    return _wrap(impl, out.reshape(layout.result_shape(out_spatial)), x)


def max_unpool_backward(grad_output, indices, nd, *, op: str, channels_last=False,
                        backend=None, stream=None):
    """Gradient of :func:`max_unpool`: grad_output gathered at ``indices`` (torch's rule)."""
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, grad_output, op, stream)
    grad = _grad_array(impl, grad_output, op, stream)
    out_layout = Layout.of(tuple(grad.shape), nd, channels_last, op, strict=True)
    index_array = impl.asarray(indices, op, "indices", stream)
    layout = Layout.of(tuple(index_array.shape), nd, channels_last, op, strict=True)
    if (layout.batch_shape, layout.channels) != (out_layout.batch_shape, out_layout.channels):
        raise ValueError(f"{op}: indices of shape {tuple(index_array.shape)} do not fit "
                         f"grad_output of shape {tuple(grad.shape)} (batch and channel axes "
                         f"differ)")
    indices = _unpool_indices(impl, index_array, index_array.shape, op, stream)
    if layout.is_empty():
        return _wrap(impl, impl.zeros(tuple(indices.shape), grad.dtype, stream), grad_output)
    batch, channels = math.prod(layout.batch_shape), layout.channels or 1
    size = math.prod(out_layout.spatial)
    grad_in, outside = impl.max_unpool_backward(
        impl.canonical(grad, (batch, size, channels), stream),
        impl.canonical(indices, (batch, math.prod(layout.spatial), channels), stream),
        stream=stream)
    if outside:
        _refuse_outside(indices, size, op)
    return _wrap(impl, grad_in.reshape(tuple(indices.shape)), grad_output)


# --------------------------------------------------------------------------
# Strided convolution
# --------------------------------------------------------------------------


def _conv_layout(op: str, nd: int, x, weight, bias, channels_last: bool):
    """Canonical 5-D shapes of a convolution's input, weight and output, checked."""
    xs, ws = tuple(x.shape), tuple(weight.shape)
    if len(xs) == nd and len(ws) == nd:  # a plain image and a plain filter
        kind, x5, w5 = "plain", (1, 1, *xs), (1, 1, *ws)
    elif len(ws) == nd + 2 and len(xs) in (nd + 1, nd + 2):
        kind = "batched" if len(xs) == nd + 2 else "unbatched"
        batched = xs if kind == "batched" else (1, *xs)
        if channels_last:
            batched = (batched[0], batched[-1], *batched[1:-1])
        x5, w5 = batched, ws
    else:
        raise ValueError(f"{op}: expected input (N, C_in, *spatial) or (C_in, *spatial) with "
                         f"weight (C_out, C_in, *kernel), or a {nd}-D input with a {nd}-D "
                         f"filter; got input shape {xs} and weight shape {ws}")
    if x5[1] != w5[1]:
        raise ValueError(f"{op}: weight of shape {ws} expects {w5[1]} input channels, but the "
                         f"input of shape {xs} has {x5[1]}")
    if bias is not None and tuple(bias.shape) != (w5[0],):
        raise ValueError(f"{op}: bias must have shape ({w5[0]},), got {tuple(bias.shape)}")
    pad = (1,) * (3 - nd)
    return kind, (x5[0], x5[1], *pad, *x5[2:]), (w5[0], w5[1], *pad, *w5[2:])


def _conv_result_shape(batch: int, channels: int, spatial: tuple, kind: str,
                       channels_last: bool) -> tuple:
    """The caller's shape of a convolution result (or its gradient)."""
    if kind == "plain":
        return tuple(spatial)
    shape = (batch, *spatial, channels) if channels_last else (batch, channels, *spatial)
    return shape[1:] if kind == "unbatched" else shape


def _conv_result(array, kind: str, channels_last: bool, nd: int, native: bool):
    """From the back end's canonical 5-D array back to the caller's layout.

    ``native``: the back end computed channels-last itself, so ``array`` is
    ``(N, D, H, W, C)`` already; else it is ``(N, C, D, H, W)``.
    """
    if native:
        array = array.reshape(array.shape[:1] + array.shape[4 - nd:])
    else:
        array = array.reshape(array.shape[:2] + array.shape[5 - nd:])
        if channels_last and kind != "plain":
            array = np.ascontiguousarray(np.moveaxis(array, 1, -1))
    if kind == "plain":
        return array[0, 0]
    return array[0] if kind == "unbatched" else array


def _channels_last_native(impl, kind: str, channels_last: bool) -> bool:
    """Whether ``impl`` takes channels-last arrays as they are (``conv_channels_last``:
    the CPU back end, whose GEMMs work in either layout) rather than transposed."""
    return channels_last and kind != "plain" and getattr(impl, "conv_channels_last", False)


def _conv_inputs(op, nd, x, weight, bias, stride, padding, channels_last, backend, stream):
    """The checked inputs of a convolution call: its window, back end, kind of call
    (see :func:`_conv_layout`), the arrays as the back end takes them (not yet
    canonical), the layout and whether the back end computes it natively, and the
    canonical 5-D shapes of the input (in the back end's layout) and weight."""
    window = ConvWindow.from_args(op, nd, stride, padding)
    channels_last = check_bool(channels_last, "channels_last", op)
    impl = _backend(backend, x, op, stream)
    array = impl.asarray(x, op, "x", stream)
    weights = impl.asarray(weight, op, "weight", stream)
    biases = None if bias is None else impl.asarray(bias, op, "bias", stream)
    for name, value in (("input", array), ("weight", weights), ("bias", biases)):
        if value is not None:
            check_dtype(np.dtype(value.dtype), "conv", op, impl.FLOAT_DTYPES, name)
    if np.dtype(weights.dtype) != np.dtype(array.dtype):
        raise TypeError(f"{op}: weight dtype {weights.dtype} differs from input dtype "
                        f"{array.dtype}")
    kind, x5, w5 = _conv_layout(op, nd, array, weights, biases, channels_last)
    native = _channels_last_native(impl, kind, channels_last)
    if native:
        x5 = (x5[0], *x5[2:], x5[1])
    elif channels_last and kind != "plain" and not hasattr(impl, "host_only"):
        raise ValueError(f"{op}: channels_last convolution runs on the host back ends only")
    return window, impl, kind, (array, weights, biases), channels_last, native, x5, w5


def _conv_shape(batch: int, channels: int, spatial: tuple, nd: int, native: bool) -> tuple:
    """A canonical 5-D shape of a convolution result, in the back end's layout."""
    spatial = (*((1,) * (3 - nd)), *spatial)
    return (batch, *spatial, channels) if native else (batch, channels, *spatial)


@dataclass(frozen=True, slots=True, eq=False)  # array fields: plans compare as objects
class _ConvPlan:
    """A convolution, planned for one set of input, weight and bias shapes and
    dtypes on one back end: called with those arrays (and a stream), it returns
    the output in the caller's layout."""

    impl: object
    nd: int
    kind: str  # see _conv_layout
    channels_last: bool
    native: bool  # the back end computes channels-last as it is
    x_shape: tuple  # the canonical input, in the back end's layout
    w_shape: tuple  # the canonical weight
    out_shape: tuple  # the canonical output (or output gradient), likewise
    stride: np.ndarray
    pad: np.ndarray
    threads = None  # the back ends split the work at each call

    def canonical_input(self, x, shape: tuple, stream):
        """``x`` (or a gradient of its layout) as the back end takes it, ``shape``."""
        if self.channels_last and self.kind != "plain" and not self.native:
            x = np.moveaxis(x if self.kind == "batched" else x[None], -1, 1)
        return self.impl.canonical(x, shape, stream)

    def layout(self) -> dict:
        return {"channels_last": True} if self.native else {}

    def __call__(self, x, weight, bias, stream=None):
        impl = self.impl
        x5 = self.canonical_input(x, self.x_shape, stream)
        w5 = impl.canonical(weight, self.w_shape, stream)
        if bias is None:
            bias = impl.zeros((self.w_shape[0],), x5.dtype, stream)
        out = impl.conv(x5, w5, bias, self.out_shape, self.stride, self.pad, stream=stream,
                        **self.layout())
        return _conv_result(out, self.kind, self.channels_last, self.nd, self.native)


@dataclass(frozen=True, slots=True, eq=False)
class _ConvBackwardPlan(_ConvPlan):
    """A convolution's gradients, planned as :class:`_ConvPlan`: called with the
    output's gradient, the input and the weight, it returns (grad_input,
    grad_weight, grad_bias)."""

    weight_shape: tuple = ()  # the caller's
    output_mask: tuple = (True, True, True)  # which of the three to compute

    def __call__(self, grad, x, weight, stream=None):
        impl = self.impl
        wants_input, wants_weight, wants_bias = self.output_mask
        grad5 = self.canonical_input(grad, self.out_shape, stream)
        grad_in = grad_weight = grad_bias = None
        if wants_input or wants_weight:
            grad_in, grad_weight = impl.conv_backward(
                grad5, self.canonical_input(x, self.x_shape, stream),
                impl.canonical(weight, self.w_shape, stream), self.stride, self.pad,
                stream=stream, output_mask=(wants_input, wants_weight), **self.layout())
        if wants_bias:
            grad_bias = impl.conv_bias_grad(grad5, stream, **self.layout())
        return (None if grad_in is None else
                _conv_result(grad_in, self.kind, self.channels_last, self.nd, self.native),
                None if grad_weight is None else grad_weight.reshape(self.weight_shape),
                grad_bias)


def _conv_plan_fields(op, nd, x, weight, bias, stride, padding, channels_last, backend,
                      stream):
    """The fields of a :class:`_ConvPlan` for these arguments, checked, and the
    arrays as the back end takes them."""
    window, impl, kind, arrays, channels_last, native, x5, w5 = _conv_inputs(
        op, nd, x, weight, bias, stride, padding, channels_last, backend, stream)
    spatial = x5[4 - nd:4] if native else x5[5 - nd:]
    out_spatial = window.output_shape(op, spatial, w5[5 - nd:])
    out_shape = _conv_shape(x5[0], w5[0], out_spatial, nd, native)
    stride3, pad3 = window.canonical()
    stride3.flags.writeable = pad3.flags.writeable = False  # plans are shared
    return (impl, nd, kind, channels_last, native, x5, w5, out_shape, stride3, pad3), arrays


def _build_conv(arrays, backend, stream, nd, stride, padding, channels_last, op):
    fields, impl_arrays = _conv_plan_fields(op, nd, *arrays, stride, padding, channels_last,
                                            backend, stream)
    return _ConvPlan(*fields), impl_arrays


def _build_conv_backward(arrays, backend, stream, nd, stride, padding, channels_last,
                         output_mask, op):
    grad_output, x, weight = arrays
    fields, (array, weights, _) = _conv_plan_fields(op, nd, x, weight, None, stride, padding,
                                                    channels_last, backend, stream)
    plan = _ConvBackwardPlan(*fields, weight_shape=tuple(weights.shape),
                             output_mask=check_output_mask(output_mask, op))
    impl, kind, x5, w5 = plan.impl, plan.kind, plan.x_shape, plan.w_shape
    grad = _grad_array(impl, grad_output, op, stream)
    spatial = plan.out_shape[4 - nd:4] if plan.native else plan.out_shape[5 - nd:]
    _check_grad_shape(grad, _conv_result_shape(x5[0], w5[0], spatial, kind, channels_last),
                      op)
    return plan, (grad, array, weights)


def conv(x, weight, nd, stride=2, padding=0, bias=None, *, op: str, channels_last=False,
         backend=None, stream=None):
    """Strided cross-correlation, torch.nn.functional.conv{nd}d's semantics."""
    return _call(_build_conv, (x, weight, bias), backend, stream,
                 (nd, stride, padding, channels_last, op))


def conv_backward(grad_output, x, weight, nd, stride=2, padding=0, *, op: str,
                  channels_last=False, output_mask=(True, True, True), backend=None,
                  stream=None):
    """Gradients of :func:`conv`: (grad_input, grad_weight, grad_bias), None where
    ``output_mask`` is False."""
    return _call(_build_conv_backward, (grad_output, x, weight), backend, stream,
                 (nd, stride, padding, channels_last, output_mask, op))
