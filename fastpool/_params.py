"""Argument normalisation and output-shape rules, shared by every op and back end.

This module is fastpool's single copy of PyTorch's pooling shape rules
(``aten/src/ATen/native/Pool.h`` for sliding windows, ``AdaptivePooling.h``
for adaptive ones).  It turns user arguments into validated, frozen
parameter objects and then into a :class:`WindowTable`: for each spatial axis
and each output position, the first input position a window reads, the end of
its range, the step between reads and the averaging divisor.  Every back end
receives that table and a canonical array, so kernels contain arithmetic and
never re-derive or re-check a shape rule.

Arrays are canonicalised to three spatial axes ``(D, H, W)``: 1-D pooling is
run with ``D = H = 1`` and 2-D pooling with ``D = 1``, each padded axis having
a kernel, stride and dilation of 1 and no padding.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CANONICAL_SPATIAL_DIMS = 3
MODES = ("max", "min", "avg", "lp")
# Global pooling also takes timm's two heads, compositions of the global average and
# maximum: "avgmax" (their mean) and "catavgmax" (both, concatenated on the channels).
GLOBAL_MODES = ("max", "min", "avg", "avgmax", "catavgmax")
COMBINED_MODES = ("avgmax", "catavgmax")
EXTREMES = ("max", "min")  # the modes that pick an element (any dtype, indices)
BACKENDS = ("cpu", "numpy", "cuda")

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


MAX_WINDOW_INT = 2**31 - 1  # the largest kernel_size, stride, padding, dilation, output_size


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_tuple(
    value: object, n: int, name: str, op: str, *, allow_none: bool = False
) -> tuple:
    """Expand an int, or a sequence of 1 or ``n`` ints, into an ``n``-tuple.

    Entries may be None where ``allow_none`` (adaptive output sizes).  A
    one-element sequence is broadcast, as torch does.
    """
    expected = f"an int or a sequence of {n} ints"
    if _is_int(value) or (allow_none and value is None):
        items: Sequence = (value,) * n
    elif isinstance(value, (tuple, list)):
        if len(value) == 1:
            items = tuple(value) * n
        elif len(value) == n:
            items = value
        else:
            raise ValueError(
                f"{op}: {name} must be {expected}, got {value!r} of length {len(value)}"
            )
    else:
        raise TypeError(f"{op}: {name} must be {expected}, got {value!r} of type "
                        f"{type(value).__name__}")
    for item in items:
        if not (_is_int(item) or (allow_none and item is None)):
            raise TypeError(f"{op}: {name} must be {expected}, got {value!r} "
                            f"(entry {item!r} is a {type(item).__name__})")
        if item is not None and not -MAX_WINDOW_INT <= item <= MAX_WINDOW_INT:
            # torch downcasts these to int32 too; beyond it the int64 window tables
            # would overflow.
            raise ValueError(f"{op}: {name} entries must lie within +-(2**31 - 1), got "
                             f"{value!r}")
    return tuple(None if item is None else int(item) for item in items)


def _check_positive(values: tuple, name: str, op: str) -> None:
    if any(v is not None and v <= 0 for v in values):
        raise ValueError(f"{op}: {name} must be positive, got {values}")


def check_bool(value: object, name: str, op: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    return bool(value)


def check_output_mask(value: object, op: str) -> tuple[bool, bool, bool]:
    """A convolution backward's ``output_mask``, as torch's convolution_backward
    takes it: three bools, whether to compute (grad_input, grad_weight, grad_bias)."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{op}: output_mask must be a tuple of three bools (grad_input, "
                        f"grad_weight, grad_bias), got {value!r}")
    if len(value) != 3:
        raise ValueError(f"{op}: output_mask must have three bools (grad_input, "
                         f"grad_weight, grad_bias), got {value!r}")
    if not all(isinstance(item, (bool, np.bool_)) for item in value):
        raise TypeError(f"{op}: output_mask must hold bools, got {value!r}")
    return tuple(bool(item) for item in value)


# --------------------------------------------------------------------------
# Sliding windows (max, avg, lp)
# --------------------------------------------------------------------------


Pads = tuple  # per axis, a (before, after) pair of ints


@dataclass(frozen=True)
class SlidingWindow:
    """Validated sliding-window parameters, one entry per pooled axis.

    ``padding`` holds a ``(before, after)`` pair per axis, or ``"same"``, which
    depends on the input size and is resolved by :meth:`pads`.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[Pads, ...] | str
    dilation: tuple[int, ...]
    ceil_mode: bool

    @classmethod
    def from_args(cls, op: str, nd: int, kernel_size, stride=None, padding=0,
                  dilation=1, ceil_mode=False) -> SlidingWindow:
        """Validate and normalise (memoised on the arguments and their types)."""
        return memoised_by_arguments(cls._from_args, _WINDOWS,
                                     (op, nd, kernel_size, stride, padding, dilation, ceil_mode))

    @classmethod
    def _from_args(cls, op: str, nd: int, kernel_size, stride=None, padding=0,
                   dilation=1, ceil_mode=False) -> SlidingWindow:
        kernel = int_tuple(kernel_size, nd, "kernel_size", op)
        _check_positive(kernel, "kernel_size", op)
        # torch treats stride=None and an empty stride list as "same as kernel".
        if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
            strides = kernel
        else:
            strides = int_tuple(stride, nd, "stride", op)
            _check_positive(strides, "stride", op)
        dilations = int_tuple(dilation, nd, "dilation", op)
        _check_positive(dilations, "dilation", op)
        ceil_mode = check_bool(ceil_mode, "ceil_mode", op)
        pads = _padding(padding, nd, kernel, dilations, op)
        if isinstance(padding, str) and ceil_mode:
            raise ValueError(f"{op}: ceil_mode=True does not combine with "
                             f"padding={padding!r}; pass explicit (before, after) pairs")
        return cls(kernel, strides, pads, dilations, ceil_mode)

    def pads(self, in_spatial: tuple[int, ...]) -> tuple[Pads, ...]:
        """The (before, after) padding of each axis for input of this spatial size.

        ``"same"`` is TensorFlow's rule: ``ceil(in / stride)`` outputs, the total
        padding they need split with the extra element after.
        """
        if self.padding != "same":
            return self.padding  # type: ignore[return-value]
        pads = []
        for size, k, s, d in zip(in_spatial, self.kernel_size, self.stride, self.dilation):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)

    def output_shape(self, op: str, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        out = tuple(
            pooling_output_size(size, k, p, s, d, self.ceil_mode)
            for size, k, p, s, d in zip(in_spatial, self.kernel_size, self.pads(in_spatial),
                                        self.stride, self.dilation)
        )
        if any(o < 1 for o in out):
            raise ValueError(f"{op}: input spatial size {tuple(in_spatial)} is too small "
                             f"for kernel_size={self.kernel_size}, "
                             f"dilation={self.dilation}, "
                             f"padding={padding_as_written(self.padding)!r}: "
                             f"calculated output size {out}")
        return out

    def table(self, op: str, in_spatial: tuple[int, ...], divisor: str | int = "padded",
              scale: float = 1.0) -> WindowTable:
        """Window table for input of spatial shape ``in_spatial`` (memoised: a
        training loop asks for the same few tables over and over).

        ``divisor`` is "padded" (count the padding, as count_include_pad=True),
        "valid" (count only input elements) or a nonzero int divisor_override.
        """
        in_spatial = tuple(in_spatial)
        self.output_shape(op, in_spatial)  # raises with this op's name
        table = _sliding_table(self, in_spatial, divisor, scale)
        if not self.is_torch_style and table.has_empty_window:
            raise ValueError(f"{op}: padding={padding_as_written(self.padding)!r} leaves a "
                             f"window of kernel_size={self.kernel_size}, dilation="
                             f"{self.dilation} wholly in the padding of input size "
                             f"{in_spatial}")
        return table

    @property
    def is_torch_style(self) -> bool:
        """Symmetric padding of at most half the kernel, as torch allows."""
        return self.padding != "same" and all(
            before == after <= k // 2 for (before, after), k in zip(self.padding,
                                                                    self.kernel_size))

    def _build_table(self, in_spatial: tuple[int, ...], divisor: str | int,
                     scale: float) -> WindowTable:
        out_spatial = self.output_shape("table", in_spatial)
        per_axis = list(zip(in_spatial, out_spatial, self.kernel_size, self.stride,
                            self.pads(in_spatial), self.dilation))
        axes = [_sliding_axis(*axis, divisor) for axis in per_axis]
        if _is_int(divisor):
            # divisor_override replaces the whole window's count: put it on one axis.
            axes = [(a[0], a[1], a[2], np.ones_like(a[3])) for a in axes]
            last = axes[-1]
            axes[-1] = (last[0], last[1], last[2], np.full_like(last[3], float(divisor)))
        interior = [_interior(*axis) for axis in per_axis]
        return WindowTable.from_axes(axes, out_spatial, scale, interior)


def _padding(padding: object, nd: int, kernel: tuple, dilation: tuple, op: str
             ) -> tuple[Pads, ...] | str:
    """``padding`` as (before, after) pairs per axis, or "same".

    torch's symmetric ints may pad at most half the kernel; "same" and explicit
    pairs (TensorFlow's and Flax's forms) up to the effective kernel minus one
    per side (a window wholly in the padding is refused per input size).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            return "same"
        raise ValueError(f"{op}: padding must be an int, a sequence of {nd} ints, 'valid', "
                         f"'same' or {nd} (before, after) pairs, got {padding!r}")
    if isinstance(padding, (tuple, list)) and padding and all(
            isinstance(p, (tuple, list)) for p in padding):
        if len(padding) != nd or any(len(p) != 2 for p in padding):
            raise ValueError(f"{op}: padding given as pairs needs {nd} (before, after) "
                             f"pairs, got {padding!r}")
        flat = int_tuple([v for p in padding for v in p], 2 * nd, "padding", op)
        pairs = tuple(zip(flat[::2], flat[1::2]))
        if any(v < 0 for v in flat):
            raise ValueError(f"{op}: padding must be non-negative, got {pairs}")
        effective = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
        if any(max(p) > e - 1 for p, e in zip(pairs, effective)):
            raise ValueError(f"{op}: padding may be at most the effective kernel size minus "
                             f"one per side ({tuple(e - 1 for e in effective)}), got {pairs}")
        return pairs
    pads = int_tuple(padding, nd, "padding", op)
    if any(p < 0 for p in pads):
        raise ValueError(f"{op}: padding must be non-negative, got {pads}")
    # Pool.h checks both pad <= effective_kernel // 2 and pad <= kernel // 2;
    # the second is the binding one.
    if any(p > k // 2 for p, k in zip(pads, kernel)):
        raise ValueError(f"{op}: padding must be at most half of kernel_size, "
                         f"got padding={pads} and kernel_size={kernel}")
    return tuple((p, p) for p in pads)


def padding_as_written(padding) -> object:
    """Padding as the user would write it: ints when symmetric."""
    if padding == "same" or any(before != after for before, after in padding):
        return padding
    return tuple(before for before, _ in padding)


def _interior(size, n_out, kernel, stride, pads, dilation):
    """[lo, hi, stride, offset, kernel]: outputs ``lo <= o < hi`` have whole windows
    inside the input, reading ``o*stride + offset + j*dilation`` for j < kernel."""
    before = pads[0]
    lo = min(n_out, -(-before // stride))
    hi = max(lo, min(n_out, (size - 1 - (kernel - 1) * dilation + before) // stride + 1))
    return (lo, hi, stride, -before, kernel)


def _typed_key(value):
    """A hashable key that tells 1 from True and (1,) from [1]."""
    kind = type(value)
    if kind is tuple or kind is list:
        kinds = tuple(map(type, value))
        if tuple in kinds or list in kinds:
            return kind, tuple(map(_typed_key, value))
        return kind, kinds, tuple(value)  # flat: its items' types, made in C, and the items
    hash(value)
    return kind, value


_SEQUENCES = (tuple, list)
_SEQUENCE_KINDS = frozenset(_SEQUENCES)


def arguments_key(arguments: tuple) -> tuple:
    """A hashable key for a tuple of user arguments that tells 1 from True and 1.0,
    and (1,) from [1], at any depth: equal keys mean arguments that validate alike.

    Raises TypeError, here or when hashed, for an unhashable argument.  The key
    holds the arguments' types, then (when some arguments are tuples of scalars,
    as shapes and kernel sizes are) their items' types, then the arguments; lists
    and deeper nesting take :func:`_typed_key`.  It is built on every call, so
    the common cases stay in C as far as they can.  (Not marshal, which would be
    quicker: it encodes NumPy scalars and arrays as their raw bytes, so np.True_
    would key like np.int8(1).)
    """
    kinds = tuple(map(type, arguments))
    if _SEQUENCE_KINDS.isdisjoint(kinds):  # hashes the types: quicker than two scans
        return kinds, arguments
    if list not in kinds:
        item_kinds = []
        for value, kind in zip(arguments, kinds):
            if kind is tuple:
                item_kinds += map(type, value)
        if tuple not in item_kinds and list not in item_kinds:
            # Equal arguments have their tuples at the same places and of the same
            # lengths, so equal item types, in order, give each item its type.
            return kinds, tuple(item_kinds), arguments
    return kinds, tuple([_typed_key(value) if kind in _SEQUENCES else value
                         for value, kind in zip(arguments, kinds)])


def memoised_by_arguments(build, cache: dict, arguments: tuple):
    """``build(*arguments)``, remembered per typed argument tuple: a training loop
    validates the same few argument sets over and over.  Failures are not cached."""
    try:
        key = arguments_key(arguments)
        result = cache.get(key)
    except TypeError:  # an unhashable oddity: validate without the cache
        return build(*arguments)
    if result is None:
        result = build(*arguments)
        if len(cache) < 1024:
            cache[key] = result
    return result


_WINDOWS: dict = {}


@functools.lru_cache(maxsize=256)
def _sliding_table(window: SlidingWindow, in_spatial: tuple[int, ...], divisor: str | int,
                   scale: float) -> WindowTable:
    return window._build_table(in_spatial, divisor, scale)


def pooling_output_size(size: int, kernel: int, pad, stride: int, dilation: int,
                        ceil_mode: bool) -> int:
    """torch's ``pooling_output_shape``: windows that fit, ceil_mode rounding up.

    ``pad`` is an int (both sides, as torch) or a (before, after) pair.  In
    ceil mode the last window must still start inside the input or the
    padding before it, otherwise it is dropped.
    """
    before, after = (pad, pad) if _is_int(pad) else pad
    span = size + before + after - dilation * (kernel - 1) - 1 + (
        stride - 1 if ceil_mode else 0)
    out = span // stride + 1  # floor division, as torch's div_rtn
    if ceil_mode and (out - 1) * stride >= size + before:
        out -= 1
    return out


def _sliding_axis(size, n_out, kernel, stride, pads, dilation, divisor):
    before, after = pads
    origin = np.arange(n_out, dtype=np.int64) * stride - before
    # First position at or after 0 on the dilation grid of each window.
    start = origin + (np.maximum(-origin, 0) + dilation - 1) // dilation * dilation
    stop = np.minimum(origin + (kernel - 1) * dilation + 1, size)
    if divisor == "padded":
        # torch counts window positions inside the padded extent (avg_pool's pool_size).
        count = np.minimum(origin + kernel, size + after) - origin
    else:
        count = np.maximum((stop - start + dilation - 1) // dilation, 0)
    return start, stop, dilation, count.astype(np.float64)


def unpool_output_shape(op: str, nd: int, in_spatial: tuple[int, ...], kernel_size, stride,
                        padding, output_size) -> tuple[int, ...]:
    """torch's ``max_unpool`` size rule: ``(in - 1) * stride + kernel - 2 * padding`` per
    axis, or ``output_size`` (``nd`` or ``nd + 2`` entries), each strictly within
    ``stride`` of that default."""
    kernel = int_tuple(kernel_size, nd, "kernel_size", op)
    _check_positive(kernel, "kernel_size", op)
    strides = kernel if stride is None else int_tuple(stride, nd, "stride", op)
    _check_positive(strides, "stride", op)
    pads = int_tuple(padding, nd, "padding", op)
    if any(p < 0 for p in pads):
        raise ValueError(f"{op}: padding must be non-negative, got {pads}")
    default = tuple((size - 1) * s + k - 2 * p
                    for size, k, s, p in zip(in_spatial, kernel, strides, pads))
    if output_size is None:
        sizes = default
    else:
        if isinstance(output_size, (tuple, list)) and len(output_size) == nd + 2:
            output_size = tuple(output_size)[2:]
        if not isinstance(output_size, (tuple, list)) or len(output_size) != nd:
            raise ValueError(f"{op}: output_size must have {nd} or {nd + 2} entries, got "
                             f"{output_size!r}")
        sizes = int_tuple(output_size, nd, "output_size", op)
        for size, want, s in zip(sizes, default, strides):
            if not want - s < size < want + s:
                raise ValueError(f"{op}: output_size {sizes} must lie strictly between "
                                 f"{tuple(d - s for d, s in zip(default, strides))} and "
                                 f"{tuple(d + s for d, s in zip(default, strides))} "
                                 f"(the default {default} +- stride)")
    if any(size < 1 for size in sizes):
        raise ValueError(f"{op}: the output size {sizes} (from input spatial size "
                         f"{tuple(in_spatial)}) must be positive")
    return sizes


def fractional_output_shape(op: str, nd: int, in_spatial: tuple[int, ...], kernel_size,
                            output_size, output_ratio) -> tuple[tuple, tuple]:
    """(kernel, output size) of torch's fractional max pooling: ``output_size``, or
    ``int(in * output_ratio)`` per axis; every window must fit (``out + k - 1 <= in``)."""
    kernel = int_tuple(kernel_size, nd, "kernel_size", op)
    _check_positive(kernel, "kernel_size", op)
    if output_size is not None:
        sizes = int_tuple(output_size, nd, "output_size", op)
    elif output_ratio is not None:
        ratios = (output_ratio,) * nd if isinstance(output_ratio, numbers.Real) else \
            tuple(output_ratio) if isinstance(output_ratio, (tuple, list)) else None
        if ratios is None or len(ratios) != nd or not all(
                isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r < 1
                for r in ratios):
            raise ValueError(f"{op}: output_ratio must be a float or {nd} floats in (0, 1), "
                             f"got {output_ratio!r}")
        sizes = tuple(int(size * r) for size, r in zip(in_spatial, ratios))
    else:
        raise ValueError(f"{op}: give output_size or output_ratio")
    if any(o < 1 for o in sizes):
        raise ValueError(f"{op}: output size {sizes} (for input spatial size "
                         f"{tuple(in_spatial)}) must be positive")
    # torch's own checks: out + k - 1 <= in in 2-D, but < in in 3-D.
    strict = nd == 3
    for axis, (size, k, o) in enumerate(zip(in_spatial, kernel, sizes)):
        if o + k - 1 > size - strict:
            raise ValueError(f"{op}: kernel_size {k} is too large for output size {o} on "
                             f"axis {axis} of input size {size} (needs output + kernel - 1 "
                             f"{'<' if strict else '<='} input, as torch)")
    return kernel, sizes


def fractional_starts(samples: np.ndarray, in_spatial: tuple[int, ...],
                      out_spatial: tuple[int, ...], kernel: tuple[int, ...]) -> np.ndarray:
    """Window starts per (batch, channel), canonical axis (D, H, W) and output position:
    torch's ``generate_intervals``, in the samples' precision (alpha in float32 for
    float32 input, as torch computes it).  ``samples`` is (batch, C, nd); sample 0
    drives W and sample 1 H in 2-D, and T, H, W in order in 3-D."""
    nd = len(in_spatial)
    order = (1, 0) if nd == 2 else tuple(range(nd))  # which sample drives each axis
    batch, channels = samples.shape[:2]
    starts = np.zeros((batch, channels, CANONICAL_SPATIAL_DIMS, max(out_spatial)), np.int64)
    for axis, (size, n_out, k) in enumerate(zip(in_spatial, out_spatial, kernel)):
        row = CANONICAL_SPATIAL_DIMS - nd + axis
        if n_out > 1:
            u = samples[:, :, order[axis], None]
            alpha = (samples.dtype.type(size - k) / samples.dtype.type(n_out - 1))
            i = np.arange(n_out - 1, dtype=samples.dtype)
            starts[:, :, row, :n_out - 1] = (((i + u) * alpha).astype(np.int64)
                                            - (u * alpha).astype(np.int64))
        starts[:, :, row, n_out - 1] = size - k
    return starts


# --------------------------------------------------------------------------
# Adaptive windows
# --------------------------------------------------------------------------


def adaptive_output_shape(op: str, nd: int, output_size, in_spatial: tuple[int, ...]
                          ) -> tuple[int, ...]:
    """Resolve ``output_size`` (None entries keep the input size) and check it."""
    sizes = int_tuple(output_size, nd, "output_size", op, allow_none=True)
    _check_positive(sizes, "output_size", op)
    return tuple(size if o is None else o for o, size in zip(sizes, in_spatial))


@functools.lru_cache(maxsize=256)
def adaptive_table(in_spatial: tuple[int, ...], out_spatial: tuple[int, ...]) -> WindowTable:
    """AdaptivePooling.h: window i spans [floor(i*in/out), ceil((i+1)*in/out)).

    Along an axis whose size the output size divides, those are the sliding
    windows of kernel = stride = size / out: the table says so (their interior), so
    that the kernels sweep them as they sweep ``avg_pool2d(x, k)``'s."""
    axes, interior = [], []
    for size, n_out in zip(in_spatial, out_spatial):
        i = np.arange(n_out, dtype=np.int64)
        start = i * size // n_out
        stop = -(-(i + 1) * size // n_out)
        axes.append((start, stop, 1, (stop - start).astype(np.float64)))
        kernel = size // n_out
        interior.append(_interior(size, n_out, kernel, kernel, (0, 0), 1)
                        if size % n_out == 0 else (0, 0, 1, 0, 0))
    return WindowTable.from_axes(axes, out_spatial, 1.0, interior)


# --------------------------------------------------------------------------
# The table every back end consumes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowTable:
    """Where each output element reads, per canonical axis (D, H, W).

    Output ``(od, oh, ow)`` reads the input positions ``d`` in
    ``range(start[0, od], stop[0, od], step[0])`` and likewise for ``h`` (row 1)
    and ``w`` (row 2); padding is already excluded.  Averages divide the window
    sum by ``divisor[0, od] * divisor[1, oh] * divisor[2, ow]`` and multiply by
    ``scale``.  A max window that is empty (only possible with dilation) keeps
    torch's result: the lowest value, with index at ``start``.
    """

    out_shape: tuple[int, int, int]
    start: np.ndarray  # (3, max_out) int64
    stop: np.ndarray  # (3, max_out) int64
    step: np.ndarray  # (3,) int64
    divisor: np.ndarray  # (3, max_out) float64
    scale: float
    # Per axis [lo, hi, stride, offset, kernel]: outputs lo <= o < hi read whole,
    # regularly spaced windows (sliding tables, and adaptive ones along axes the
    # output size divides; empty otherwise).
    interior: np.ndarray  # (3, 5) int64

    def __post_init__(self):
        # Tables are memoised and shared by every call and thread that uses them
        # (and held by cached call plans); kernels only read them.
        for array in (self.start, self.stop, self.step, self.divisor, self.interior):
            array.flags.writeable = False

    @functools.cached_property
    def window_sizes(self) -> tuple[int, int, int]:
        """Per axis, the most input positions any window reads."""
        sizes = []
        for axis, n_out in enumerate(self.out_shape):
            span = self.stop[axis, :n_out] - self.start[axis, :n_out]
            sizes.append(int(np.max((span + self.step[axis] - 1) // self.step[axis],
                                    initial=0)))
        return tuple(sizes)

    def is_whole_plane(self, in_spatial: tuple[int, int, int]) -> bool:
        """One output whose window is the whole input plane (global pooling)."""
        return (self.out_shape == (1, 1, 1) and not self.start[:, 0].any()
                and tuple(self.stop[:, 0]) == tuple(in_spatial) and (self.step == 1).all())

    @functools.cached_property
    def has_empty_window(self) -> bool:
        """Whether some window reads no input position (only padding)."""
        return any(bool((self.stop[axis, :n] <= self.start[axis, :n]).any())
                   for axis, n in enumerate(self.out_shape))

    @property
    def max_window_size(self) -> int:
        """The most input elements any window reads."""
        return math.prod(self.window_sizes)

    def covering_outputs(self, in_spatial: tuple[int, int, int]):
        """Per axis and input position ``i``, the range ``[first, last)`` of outputs
        whose windows may hold ``i`` (windows start and stop in non-decreasing
        order along every axis); gathering backward kernels loop over it and
        check the step.  Memoised per input shape."""
        cache = self.__dict__.setdefault("_covering", {})
        if (cover := cache.get(in_spatial)) is None:
            cover = cache[in_spatial] = self._covering_outputs(in_spatial)
        return cover

    def max_cover(self, in_spatial: tuple[int, int, int]) -> int:
        """The most outputs whose windows may hold one input element."""
        first, last = self.covering_outputs(in_spatial)
        return int(np.prod((last - first).max(axis=1, initial=0)))

    def _covering_outputs(self, in_spatial: tuple[int, int, int]):
        first = np.zeros((3, max(in_spatial)), np.int64)
        last = np.zeros((3, max(in_spatial)), np.int64)
        for axis, size in enumerate(in_spatial):
            n_out = self.out_shape[axis]
            position = np.arange(size)
            first[axis, :size] = np.searchsorted(self.stop[axis, :n_out], position, "right")
            last[axis, :size] = np.searchsorted(self.start[axis, :n_out], position, "right")
        first.flags.writeable = last.flags.writeable = False  # shared, as the table is
        return first, last

    @classmethod
    def from_axes(cls, axes, out_spatial, scale, interior=None) -> WindowTable:
        pad = CANONICAL_SPATIAL_DIMS - len(axes)
        regular = np.zeros((3, 5), np.int64)
        regular[:, 2] = 1
        for row, axis_interior in enumerate(interior or (), start=pad):
            regular[row] = axis_interior
        unit = (np.zeros(1, np.int64), np.ones(1, np.int64), 1, np.ones(1))
        axes = [unit] * pad + list(axes)
        out_shape = (1,) * pad + tuple(out_spatial)
        width = max(out_shape)
        start = np.zeros((3, width), np.int64)
        stop = np.zeros((3, width), np.int64)
        divisor = np.ones((3, width), np.float64)
        for row, (a_start, a_stop, _, a_div) in enumerate(axes):
            n = len(a_start)
            start[row, :n], stop[row, :n], divisor[row, :n] = a_start, a_stop, a_div
        step = np.array([a[2] for a in axes], np.int64)
        return cls(out_shape, start, stop, step, divisor, float(scale), regular)


# --------------------------------------------------------------------------
# Array layout and dtype
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How an input's axes split into batch, spatial and channel axes.

    Channels-first: ``(*batch, *spatial)``, where batch includes the channel
    axis.  Channels-last: ``(*batch, *spatial, C)``.
    """

    batch_shape: tuple[int, ...]
    spatial: tuple[int, ...]
    channels: int | None

    @classmethod
    def of(cls, shape: tuple[int, ...], nd: int, channels_last: bool, op: str,
           strict: bool) -> Layout:
        """Split ``shape``; ``strict`` applies torch's rule of (C, *spatial) or
        (N, C, *spatial) input, otherwise any number of leading axes is batch."""
        trailing = nd + int(channels_last)
        ndim = len(shape)
        if strict and ndim not in (nd + 1, nd + 2):
            spatial = "L" if nd == 1 else "*spatial"
            form = (f"(N, {spatial}, C) or ({spatial}, C)" if channels_last
                    else f"(N, C, {spatial}) or (C, {spatial})")
            raise ValueError(f"{op}: expected a {nd + 1}-D or {nd + 2}-D input {form} "
                             f"with {nd} spatial ax{'i' if nd == 1 else 'e'}s, "
                             f"got shape {tuple(shape)}")
        if ndim < trailing:
            raise ValueError(f"{op}: input of shape {tuple(shape)} has fewer than the "
                             f"{trailing} axes that {nd}-D pooling"
                             f"{' with channels_last' if channels_last else ''} needs")
        if channels_last:
            batch, spatial = shape[: ndim - trailing], shape[ndim - trailing:-1]
            channels = shape[-1]
        else:
            batch, spatial, channels = shape[: ndim - nd], shape[ndim - nd:], None
        if any(s == 0 for s in spatial):
            raise ValueError(f"{op}: spatial axes must be non-empty, got input shape "
                             f"{tuple(shape)}")
        return cls(tuple(batch), tuple(spatial), channels)

    @property
    def channels_last(self) -> bool:
        return self.channels is not None

    def canonical_shape(self) -> tuple[int, ...]:
        spatial = (1,) * (CANONICAL_SPATIAL_DIMS - len(self.spatial)) + self.spatial
        tail = (self.channels,) if self.channels_last else ()
        return (math.prod(self.batch_shape), *spatial, *tail)

    def result_shape(self, out_spatial: tuple[int, ...]) -> tuple[int, ...]:
        tail = (self.channels,) if self.channels_last else ()
        return (*self.batch_shape, *out_spatial, *tail)

    def canonical_out_shape(self, out_spatial: tuple[int, ...]) -> tuple[int, ...]:
        return Layout(self.batch_shape, tuple(out_spatial), self.channels).canonical_shape()

    def is_empty(self) -> bool:
        return math.prod(self.batch_shape) == 0 or self.channels == 0


def check_dtype(dtype: np.dtype, mode: str, op: str, floats=FLOAT_DTYPES,
                name: str = "input") -> None:
    """max and min accept the back end's float types (``floats``), integers and
    bool; averages and convolution ("conv") accept the float types."""
    dtype = dtype.newbyteorder("=")
    if dtype in floats or (mode in EXTREMES and dtype.kind in "iub"):
        return
    names = [f.name for f in floats]
    supported = (f"{', '.join(names)}, the integer types and bool" if mode in EXTREMES
                 else " and ".join(names))
    what = "convolution" if mode == "conv" else f"{mode} pooling"
    raise TypeError(f"{op}: {name} dtype {dtype} is not supported; {what} takes {supported}")


def check_mode(mode: object, op: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def check_norm_type(norm_type: object, op: str) -> float:
    if not isinstance(norm_type, numbers.Real) or isinstance(norm_type, bool):
        raise TypeError(f"{op}: norm_type must be a real number, got {norm_type!r}")
    value = float(norm_type)
    if not value > 0:
        raise ValueError(f"{op}: norm_type must be positive, got {norm_type!r}")
    return value


def check_divisor_override(divisor_override: object, op: str) -> int | None:
    if divisor_override is None:
        return None
    if not _is_int(divisor_override):
        raise TypeError(f"{op}: divisor_override must be None or an int, got "
                        f"{divisor_override!r}")
    if divisor_override == 0:
        raise ValueError(f"{op}: divisor_override must be nonzero, got 0")
    return int(divisor_override)


def check_backend(backend: object, op: str) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Strided convolution (torch.nn.functional.conv{1,2,3}d, groups=1, dilation=1)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvWindow:
    """Validated stride and padding of a convolution over ``nd`` axes."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]

    @classmethod
    def from_args(cls, op: str, nd: int, stride, padding) -> ConvWindow:
        strides = int_tuple(stride, nd, "stride", op)
        _check_positive(strides, "stride", op)
        pads = int_tuple(padding, nd, "padding", op)
        if any(p < 0 for p in pads):
            raise ValueError(f"{op}: padding must be non-negative, got {pads}")
        return cls(strides, pads)

    def output_shape(self, op: str, in_spatial: tuple[int, ...],
                     kernel: tuple[int, ...]) -> tuple[int, ...]:
        """torch's rule: floor((in + 2*padding - kernel) / stride) + 1."""
        out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in
                    zip(in_spatial, kernel, self.stride, self.padding))
        if any(o < 1 for o in out):
            raise ValueError(f"{op}: input spatial size {tuple(in_spatial)} with "
                             f"padding={self.padding} is smaller than the kernel {kernel}: "
                             f"calculated output size {out}")
        return out

    def canonical(self) -> tuple[np.ndarray, np.ndarray]:
        """Stride and padding padded to the three canonical axes, as int64 arrays."""
        pad = CANONICAL_SPATIAL_DIMS - len(self.stride)
        return (np.array((1,) * pad + self.stride, np.int64),
                np.array((0,) * pad + self.padding, np.int64))
