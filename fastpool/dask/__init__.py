"""fastpool on dask arrays: pooling arrays larger than memory, on one machine or a cluster.

Every forward op of :mod:`fastpool` has a lazy twin here, with the same name,
arguments and semantics: a dask array in, a dask array out (and lazy int64
indices into the whole spatial plane with ``return_indices``).  The result
equals the in-memory op on the computed array, for every chunking.  Each output
block is one task that reads its own input block plus, where windows overlap,
a one-sided halo from the next block(s); see :func:`plan` and the user guide
page ``docs/dask.md``.  Needs the ``dask`` extra: ``pip install fastpool[dask]``.

>>> import numpy as np, dask.array as da, fastpool.dask
>>> x = da.from_array(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), chunks=2)
>>> y = fastpool.dask.max_pool2d(x, 2)
>>> y.chunks
((1,), (1,), (1, 1), (1, 1))
>>> y.compute()
array([[[[ 5.,  7.],
         [13., 15.]]]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fastpool.dask import _backward, _core, _gem, _global
from fastpool.dask._plan import AxisPlan, Plan

__all__ = [
    "plan", "Plan", "AxisPlan", "pyramid", "pool", "adaptive_pool", "kernel_threads",
    *(f"{name}{nd}d" for name in ("max_pool", "avg_pool", "lp_pool", "min_pool",
                                  "adaptive_max_pool", "adaptive_avg_pool",
                                  "adaptive_min_pool", "global_max_pool", "global_avg_pool",
                                  "global_min_pool", "global_pool", "gem_pool")
      for nd in (1, 2, 3)),
    *(f"{name}{nd}d_backward" for name in ("max_pool", "avg_pool", "lp_pool",
                                           "adaptive_max_pool", "adaptive_avg_pool",
                                           "global_max_pool", "global_avg_pool")
      for nd in (1, 2, 3)),
]

kernel_threads = _core.kernel_threads

_CHUNKING = """align : {"input", "output"}, default "input"
    "input": output chunks follow the input chunks (output ``o`` belongs to the
    block where its window starts); "output": regular output chunks (of
    ``out_chunks``, by default the first input chunk divided by the stride), as
    Zarr writers need.
out_chunks : int or tuple, optional
    Output chunk size per pooled axis (an int, or per axis an int or a tuple of
    chunk sizes); implies align="output"."""

_TAIL = """channels_last : bool, default False
    Input and output laid out as ``(N, *spatial, C)``.
backend : {None, "cpu", "numpy", "cuda"}, default None
    None runs each block on the back end its type picks: NumPy blocks on the
    CPU kernels, CuPy (``__cuda_array_interface__``) blocks on the CUDA ones."""


def _doc(name: str, summary: str, signature: str, example: str, chunking: bool = True) -> str:
    return f"""{summary}

Lazy twin of :func:`fastpool.{name}` on a dask array, with the same arguments
({signature}) and the same result on the computed array.

Parameters
----------
x : dask.array.Array
    Input, any chunking (known chunk sizes).
*args, **kwargs
    As :func:`fastpool.{name}`.
{_CHUNKING if chunking else _GLOBAL_CHUNKING}
{_TAIL}

Returns
-------
out : dask.array.Array, or (out, indices) with return_indices
    Lazy result; ``out._meta`` is of the input's array type.

Raises
------
TypeError
    When ``x`` is not a dask array, or for an unsupported dtype.
ValueError
    For unknown (NaN) chunk sizes, and as :func:`fastpool.{name}` does.

Examples
--------
>>> import numpy as np, dask.array as da, fastpool, fastpool.dask
{example}
"""


_GLOBAL_CHUNKING = """split_every : int, default 16
    How many partials (one per block) each combine step of the tree reduction
    takes."""

_EXAMPLE_SLIDING = """>>> x = da.random.default_rng(0).standard_normal((2, 3, {shape}),
...                                             chunks=(1, 3, {chunk}))
>>> y = fastpool.dask.{name}(x, {args})
>>> np.array_equal(y.compute(), fastpool.{name}(x.compute(), {args}))
True"""


def _sliding(nd: int, mode: str) -> Callable:
    name = f"{mode}_pool{nd}d"
    shape = ", ".join(["9"] * nd)
    chunk = ", ".join(["4"] * nd)
    if mode in ("max", "min"):
        def op(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, channels_last=False, backend=None, stream=None,
               align="input", out_chunks=None):
            return _core.sliding_pool(x, mode, nd, kernel_size, stride, padding, dilation,
                                      ceil_mode, op=name, strict=True,
                                      return_indices=return_indices,
                                      channels_last=channels_last, backend=backend,
                                      align=align, out_chunks=out_chunks)
        args, sig = "3, 2, 1", "kernel_size, stride, padding, dilation, ceil_mode, return_indices"
    elif mode == "avg":
        def op(x, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, *, channels_last=False,
               backend=None, stream=None, align="input", out_chunks=None):
            return _core.sliding_pool(x, "avg", nd, kernel_size, stride, padding, 1,
                                      ceil_mode, op=name, strict=True,
                                      count_include_pad=count_include_pad,
                                      divisor_override=divisor_override,
                                      channels_last=channels_last, backend=backend,
                                      align=align, out_chunks=out_chunks)
        args, sig = "3, 2, 1", ("kernel_size, stride, padding, ceil_mode, count_include_pad, "
                                "divisor_override")
    else:
        def op(x, norm_type, kernel_size, stride=None, ceil_mode=False, *,
               channels_last=False, backend=None, stream=None, align="input",
               out_chunks=None):
            return _core.sliding_pool(x, "lp", nd, kernel_size, stride, 0, 1, ceil_mode,
                                      op=name, strict=True, norm_type=norm_type,
                                      channels_last=channels_last, backend=backend,
                                      align=align, out_chunks=out_chunks)
        args, sig = "2, 3", "norm_type, kernel_size, stride, ceil_mode"
    op.__doc__ = _doc(name, f"Lazy {nd}-D {mode} pooling of a dask array.", sig,
                      _EXAMPLE_SLIDING.format(shape=shape, chunk=chunk, name=name, args=args))
    return _named(op, name)


def _adaptive(nd: int, mode: str) -> Callable:
    name = f"adaptive_{mode}_pool{nd}d"
    if mode in ("max", "min"):
        def op(x, output_size, return_indices=False, *, channels_last=False, backend=None,
               stream=None, align="input", out_chunks=None):
            return _core.adaptive_pool(x, mode, nd, output_size, op=name, strict=True,
                                       return_indices=return_indices,
                                       channels_last=channels_last, backend=backend,
                                       align=align, out_chunks=out_chunks)
        sig = "output_size, return_indices"
    else:
        def op(x, output_size, *, channels_last=False, backend=None, stream=None,
               align="input", out_chunks=None):
            return _core.adaptive_pool(x, "avg", nd, output_size, op=name, strict=True,
                                       channels_last=channels_last, backend=backend,
                                       align=align, out_chunks=out_chunks)
        sig = "output_size"
    op.__doc__ = _doc(name, f"Lazy {nd}-D adaptive {mode} pooling of a dask array.", sig,
                      _EXAMPLE_SLIDING.format(shape=", ".join(["9"] * nd),
                                              chunk=", ".join(["4"] * nd), name=name,
                                              args="4"))
    return _named(op, name)


def _global_op(nd: int, mode: str) -> Callable:
    name = f"global_{mode}_pool{nd}d"
    if mode in ("max", "min"):
        def op(x, keepdims=False, return_indices=False, *, channels_last=False, backend=None,
               stream=None, split_every=None):
            return _global.global_pool(x, mode, nd, op=name, keepdims=keepdims,
                                       return_indices=return_indices,
                                       channels_last=channels_last, backend=backend,
                                       split_every=split_every)
        sig, check = "keepdims, return_indices", "np.array_equal"
    else:
        def op(x, keepdims=False, *, channels_last=False, backend=None, stream=None,
               split_every=None):
            return _global.global_pool(x, "avg", nd, op=name, keepdims=keepdims,
                                       channels_last=channels_last, backend=backend,
                                       split_every=split_every)
        sig, check = "keepdims", "np.allclose"
    example = (f">>> x = da.random.default_rng(0).standard_normal((2, 3, {', '.join(['9'] * nd)}),"
               f" chunks=(1, 3, {', '.join(['4'] * nd)}))\n"
               f">>> y = fastpool.dask.{name}(x)\n>>> y.shape\n(2, 3)\n"
               f">>> {check}(y.compute(), fastpool.{name}(x.compute()))\nTrue")
    summary = (f"Lazy {mode} of each {nd}-D plane of a dask array, as a tree reduction.\n\n"
               + ("Ties and NaN follow torch across block boundaries: a NaN wins, and among\n"
                  "equal extremes the first in the plane's scan order." if mode != "avg" else
                  "Block sums are float64 and added in a tree, so the last bits may differ\n"
                  "from the in-memory op's (which sums each plane in one pass)."))
    op.__doc__ = _doc(name, summary, sig, example, chunking=False)
    return _named(op, name)


def _global_pool_op(nd: int) -> Callable:
    name = f"global_pool{nd}d"

    def op(x, mode="avg", keepdims=False, return_indices=False, *, channels_last=False,
           backend=None, stream=None, split_every=None):
        return _global.global_pool_mode(x, mode, nd, op=name, keepdims=keepdims,
                                        return_indices=return_indices,
                                        channels_last=channels_last, backend=backend,
                                        split_every=split_every)
    spatial = ", ".join(["9"] * nd)
    example = (f">>> x = da.random.default_rng(0).standard_normal((2, 3, {spatial}), "
               f"chunks=(1, 3, {', '.join(['4'] * nd)}))\n"
               f">>> y = fastpool.dask.{name}(x, \"catavgmax\")\n>>> y.shape\n(2, 6)\n"
               f">>> np.allclose(y.compute(), fastpool.{name}(x.compute(), \"catavgmax\"))\n"
               f"True")
    summary = (f"Lazy global pooling of each {nd}-D plane by ``mode``, timm's heads included.\n\n"
               "``mode`` is \"avg\", \"max\", \"min\" (as ``global_<mode>_pool``), "
               "\"avgmax\"\n(``0.5 * (avg + max)``) or \"catavgmax\" (the average's "
               "channels, then the\nmaximum's); return_indices gives the maximum's.  The "
               "average is a tree of\nfloat64 block sums, so its last bits (and avgmax's) may "
               "differ from the\nin-memory op's.")
    op.__doc__ = _doc(name, summary, "mode, keepdims, return_indices", example, chunking=False)
    return _named(op, name)


def _gem_op(nd: int) -> Callable:
    name = f"gem_pool{nd}d"

    def op(x, p=3.0, eps=1e-6, output_size=1, *, kernel_size=None, stride=None,
           channels_last=False, backend=None):
        return _gem.gem_pool(x, nd, p, eps, output_size, kernel_size, stride, op=name,
                             channels_last=channels_last, backend=backend)
    spatial = ", ".join(["9"] * nd)
    example = (f">>> x = da.random.default_rng(0).random((2, 3, {spatial}), "
               f"chunks=(1, 3, {', '.join(['4'] * nd)}))\n"
               f">>> y = fastpool.dask.{name}(x, p=[1.0, 2.5, 3.0], kernel_size=3, stride=2)\n"
               f">>> np.allclose(y.compute(), fastpool.{name}(x.compute(), "
               f"p=[1.0, 2.5, 3.0], kernel_size=3, stride=2))\nTrue")
    op.__doc__ = f"""Lazy {nd}-D generalized-mean (GeM) pooling of a dask array.

Lazy twin of :func:`fastpool.{name}` (``mean(max(x, eps) ** p) ** (1/p)`` over
each window), with the same arguments and result to the last bits: sliding
windows (with ``kernel_size``; their halos as average pooling's), adaptive
windows (``output_size``), or one mean per plane (``output_size=1``, the
default), a tree reduction of float64 block sums (as
:func:`global_avg_pool{nd}d`).  The in-memory CPU op fuses clamp, power and
window sum in one kernel; here NumPy raises each block and the average pooling
takes the means, so results may differ by an ulp.

Parameters
----------
x : dask.array.Array
    Input, float16, float32 or float64, any chunking (known chunk sizes).
p : float or sequence of C floats, default 3.0
    The power, one for all channels or one per channel (all positive).
eps : float, default 1e-6
    Values below eps count as eps.
output_size : int or tuple, default 1
    Adaptive output size; unused with kernel_size.
kernel_size, stride : int or tuple, optional
    Sliding windows instead of adaptive ones (stride defaults to kernel_size).
{_TAIL}

Returns
-------
out : dask.array.Array
    Lazy result with the input's dtype.

Raises
------
TypeError
    When ``x`` is not a dask array, for an unsupported dtype, or a ``p`` of the
    wrong shape.
ValueError
    For unknown (NaN) chunk sizes, a non-positive ``p`` or ``eps``, and as
    :func:`fastpool.{name}` does.

Examples
--------
>>> import numpy as np, dask.array as da, fastpool, fastpool.dask
{example}
"""
    return _named(op, name)


def _named(function: Callable, name: str) -> Callable:
    function.__name__ = function.__qualname__ = name
    function.__module__ = "fastpool.dask"
    return function


def pool(x, mode, kernel_size: Sequence[int], stride=None, padding=0, dilation=1,
         ceil_mode=False, *, norm_type=None, count_include_pad=True, divisor_override=None,
         return_indices=False, channels_last=False, backend=None, stream=None,
         align="input", out_chunks=None):
    """Lazy sliding-window pooling over the trailing ``len(kernel_size)`` axes.

    The dask twin of :func:`fastpool.pool` (same arguments); every axis before
    the pooled ones is a batch axis.

    Parameters
    ----------
    x : dask.array.Array
        Input.
    mode, kernel_size, stride, padding, dilation, ceil_mode, norm_type, \
count_include_pad, divisor_override, return_indices, channels_last, backend
        As :func:`fastpool.pool`.
    align, out_chunks : optional
        Output chunking (see :func:`max_pool2d`).

    Returns
    -------
    out : dask.array.Array, or (out, indices) with return_indices

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastpool.dask
    >>> img = da.arange(64, dtype=np.float64, chunks=16).reshape(8, 8)
    >>> fastpool.dask.pool(img, "avg", (2, 2)).compute()[0]
    array([ 4.5,  6.5,  8.5, 10.5])
    """
    op = "pool"
    nd = _spatial_dims(kernel_size, "kernel_size", op)
    return _core.sliding_pool(x, mode, nd, kernel_size, stride, padding, dilation, ceil_mode,
                              op=op, strict=False, norm_type=norm_type,
                              count_include_pad=count_include_pad,
                              divisor_override=divisor_override,
                              return_indices=return_indices, channels_last=channels_last,
                              backend=backend, align=align, out_chunks=out_chunks)


def adaptive_pool(x, mode, output_size, *, return_indices=False, channels_last=False,
                  backend=None, stream=None, align="input", out_chunks=None):
    """Lazy adaptive pooling over the trailing ``len(output_size)`` axes.

    The dask twin of :func:`fastpool.adaptive_pool` (same arguments).

    Parameters
    ----------
    x : dask.array.Array
        Input.
    mode, output_size, return_indices, channels_last, backend
        As :func:`fastpool.adaptive_pool`.
    align, out_chunks : optional
        Output chunking (see :func:`max_pool2d`).

    Returns
    -------
    out : dask.array.Array, or (out, indices) with return_indices

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastpool.dask
    >>> img = da.arange(20, dtype=np.float64, chunks=5).reshape(4, 5)
    >>> fastpool.dask.adaptive_pool(img, "avg", (2, None)).compute()
    array([[ 2.5,  3.5,  4.5,  5.5,  6.5],
           [12.5, 13.5, 14.5, 15.5, 16.5]])
    """
    op = "adaptive_pool"
    nd = _spatial_dims(output_size, "output_size", op)
    return _core.adaptive_pool(x, mode, nd, output_size, op=op, strict=False,
                               return_indices=return_indices, channels_last=channels_last,
                               backend=backend, align=align, out_chunks=out_chunks)


def _spatial_dims(value, name, op):
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        raise TypeError(f"fastpool.dask.{op}: {name} must be a tuple of 1 to 3 sizes, one per "
                        f"pooled axis, got {value!r}")
    return len(value)


def plan(x, op: str, *args, **kwargs) -> Plan:
    """The chunk plan of ``fastpool.dask.<op>(x, *args, **kwargs)``, without building it.

    Shows, per pooled axis, the input and output chunks and the halo: how many
    elements an output block reads past the input block it starts in (0 where
    windows do not overlap and the op is a plain per-block map).

    Parameters
    ----------
    x : dask.array.Array
        The input.
    op : str
        A sliding or adaptive op's name, e.g. "max_pool2d", "adaptive_avg_pool3d",
        "pool" or "adaptive_pool".
    *args, **kwargs
        The op's arguments.

    Returns
    -------
    Plan
        With ``axes`` (one :class:`AxisPlan` each) and ``is_map``.

    Examples
    --------
    >>> import dask.array as da, fastpool.dask
    >>> x = da.zeros((1, 1, 64, 64), chunks=(1, 1, 16, 16))
    >>> fastpool.dask.plan(x, "max_pool2d", 2).is_map
    True
    >>> p = fastpool.dask.plan(x, "max_pool2d", 3, stride=2, padding=1)
    >>> p.is_map, p.axes[0].out_chunks, p.axes[0].halo
    (False, (8, 8, 8, 8), 1)
    """
    function = globals().get(op)
    if op not in __all__ or op.startswith(("global_", "gem_")) or op.endswith("_backward") or \
            not callable(function) or op in ("plan", "pyramid", "kernel_threads"):
        raise ValueError(f"fastpool.dask.plan: op must name a sliding or adaptive op, got "
                         f"{op!r}")
    _core.planning.active = True
    try:
        return function(x, *args, **kwargs)
    finally:
        _core.planning.active = False


def pyramid(x, levels: int, mode: str = "avg", factor: int = 2, *, nd: int | None = None,
            channels_last: bool = False, ceil_mode: bool = False, chunks=None) -> list:
    """A multiscale pyramid: each level pooled from the previous one.

    Parameters
    ----------
    x : dask.array.Array
        Level 0, the full-resolution array.
    levels : int
        Number of levels returned, including ``x`` itself (at least 1).
    mode : {"avg", "max"}, default "avg"
        The reduction of each ``factor``-sized window.
    factor : int, default 2
        Downsampling factor on every pooled axis.
    nd : int, optional
        How many trailing axes (before channels with ``channels_last``) are
        pooled; default ``min(3, x.ndim)``.
    channels_last : bool, default False
        The last axis is channels, not pooled.
    ceil_mode : bool, default False
        Keep a partial last window on axes not divisible by ``factor``.
    chunks : int or tuple, optional
        Output chunk size of every level on the pooled axes (clipped to the
        level's size): regular chunks of that size on every level, each task
        joining several blocks of the level above.  Default: each level keeps
        the blocks of the one above, halved (a plain per-block map, no data
        movement; regular when the input's chunks are multiples of
        ``factor ** (levels - 1)``).

    Returns
    -------
    list of dask.array.Array
        ``[x, x / factor, x / factor**2, ...]``, ready for ``to_zarr``.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastpool.dask
    >>> x = da.ones((64, 48), dtype=np.float32, chunks=16)
    >>> [level.shape for level in fastpool.dask.pyramid(x, 3)]
    [(64, 48), (32, 24), (16, 12)]
    >>> fastpool.dask.pyramid(x, 3)[2].chunks
    ((4, 4, 4, 4), (4, 4, 4))
    >>> fastpool.dask.pyramid(x, 3, chunks=16)[2].chunks
    ((16,), (12,))
    """
    import dask.array as da

    if not isinstance(x, da.Array):
        raise TypeError(f"fastpool.dask.pyramid: x must be a dask array, got "
                        f"{type(x).__name__}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"fastpool.dask.pyramid: levels must be an int >= 1, got {levels!r}")
    if mode not in ("avg", "max"):
        raise ValueError(f"fastpool.dask.pyramid: mode must be 'avg' or 'max', got {mode!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"fastpool.dask.pyramid: factor must be a positive int, got "
                         f"{factor!r}")
    nd = min(3, x.ndim - int(channels_last)) if nd is None else nd
    axes = _core.pooled_axes(x.ndim, nd, channels_last)
    if isinstance(chunks, int):
        chunks = (chunks,) * nd
    result = [x]
    for _ in range(levels - 1):
        prev = result[-1]
        from fastpool._params import pooling_output_size

        out = [pooling_output_size(prev.shape[a], factor, 0, factor, 1, ceil_mode)
               for a in axes]
        if min(out) < 1:
            raise ValueError(f"fastpool.dask.pyramid: level {len(result)} of shape "
                             f"{prev.shape} is smaller than factor={factor}; ask for fewer "
                             f"levels")
        size = None if chunks is None else tuple(min(c, o) for c, o in zip(chunks, out))
        result.append(pool(prev, mode, (factor,) * nd, ceil_mode=ceil_mode,
                           channels_last=channels_last, out_chunks=size))
    return result


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------

_BACKWARD_DOC = """Gradient of :func:`fastpool.dask.{forward}` on dask arrays (lazy).

Same arguments as :func:`fastpool.{name}`; each block of the input gradient
reads the gradient blocks whose windows reach it.

Parameters
----------
grad_output : dask.array.Array
    Gradient with respect to the forward output.
{params}
chunks : int or tuple, optional
    Chunks of the pooled axes of the result; by default those of the forward
    input that align="input" maps to ``grad_output``'s chunks.
{tail}

Returns
-------
grad_input : dask.array.Array
    Of ``input_shape``, grad_output's dtype.

Examples
--------
>>> import numpy as np, dask.array as da, fastpool, fastpool.dask
>>> x = da.random.default_rng(1).standard_normal((1, 2, {shape}), chunks=(1, 1, {chunk}))
{example}
"""


def _backward_of(nd: int, forward: str) -> Callable:
    name = f"{forward}{nd}d_backward"
    shape, chunk = ", ".join(["8"] * nd), ", ".join(["4"] * nd)
    if forward == "max_pool":
        def op(grad_output, indices, input_shape, *, kernel_size=None, stride=None,
               padding=0, dilation=1, ceil_mode=False, channels_last=False, backend=None,
               stream=None, chunks=None):
            return _backward.max_pool_backward(
                grad_output, indices, input_shape, nd, op=name, kernel_size=kernel_size,
                stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode,
                channels_last=channels_last, backend=backend, chunks=chunks)
        params = ("indices : dask.array.Array\n    The forward's int64 indices.\n"
                  "input_shape : tuple of int\n    The forward input's shape.\n"
                  "kernel_size, stride, padding, dilation, ceil_mode : optional\n"
                  "    The forward's window.  Without it every block reads all gradient\n"
                  "    blocks of its planes (correct, but no longer local).")
        example = (f">>> y, idx = fastpool.dask.max_pool{nd}d(x, 2, return_indices=True)\n"
                   f">>> g = fastpool.dask.{name}(da.ones_like(y), idx, x.shape, kernel_size=2)\n"
                   f">>> y0, i0 = fastpool.max_pool{nd}d(x.compute(), 2, return_indices=True)\n"
                   f">>> np.array_equal(g.compute(), fastpool.{name}(np.ones_like(y0), i0, "
                   f"x.shape))\nTrue")
    elif forward in ("adaptive_max_pool", "global_max_pool"):
        squeezed = forward == "global_max_pool"

        def op(grad_output, indices, input_shape, *, channels_last=False, backend=None,
               stream=None, chunks=None):
            return _backward.adaptive_max_pool_backward(
                grad_output, indices, input_shape, nd, op=name, channels_last=channels_last,
                backend=backend, chunks=chunks, squeezed=squeezed)
        params = ("indices : dask.array.Array\n    The forward's int64 indices.\n"
                  "input_shape : tuple of int\n    The forward input's shape.")
        call = "3, return_indices=True" if not squeezed else "return_indices=True"
        example = (f">>> y, idx = fastpool.dask.{forward}{nd}d(x, {call})\n"
                   f">>> g = fastpool.dask.{name}(da.ones_like(y), idx, x.shape)\n"
                   f">>> y0, i0 = fastpool.{forward}{nd}d(x.compute(), {call})\n"
                   f">>> np.array_equal(g.compute(), fastpool.{name}(np.ones_like(y0), i0, "
                   f"x.shape))\nTrue")
    elif forward == "lp_pool":
        def op(grad_output, x, norm_type, kernel_size, stride=None, ceil_mode=False, *,
               channels_last=False, backend=None, stream=None):
            return _backward.lp_pool_backward(
                grad_output, x, norm_type, nd, kernel_size, stride, ceil_mode, op=name,
                channels_last=channels_last, backend=backend)
        params = ("x : dask.array.Array\n    The forward input (its blocks are the "
                  "result's).\n"
                  "norm_type, kernel_size, stride, ceil_mode\n    The forward's arguments.")
        example = (f">>> y = fastpool.dask.lp_pool{nd}d(x, 2.0, 3, 2)\n"
                   f">>> g = fastpool.dask.{name}(da.ones_like(y), x, 2.0, 3, 2)\n"
                   f">>> np.array_equal(g.compute(), fastpool.{name}(np.ones(y.shape), "
                   f"x.compute(), 2.0, 3, 2))\nTrue")
    elif forward == "avg_pool":
        def op(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, *, channels_last=False,
               backend=None, stream=None, chunks=None):
            return _backward.avg_pool_backward(
                grad_output, input_shape, nd, kernel_size, stride, padding, ceil_mode,
                count_include_pad, divisor_override, op=name, channels_last=channels_last,
                backend=backend, chunks=chunks)
        params = ("input_shape : tuple of int\n    The forward input's shape.\n"
                  "kernel_size, stride, padding, ceil_mode, count_include_pad, "
                  "divisor_override\n    The forward's arguments.")
        example = (f">>> y = fastpool.dask.avg_pool{nd}d(x, 3, 2, 1)\n"
                   f">>> g = fastpool.dask.{name}(da.ones_like(y), x.shape, 3, 2, 1)\n"
                   f">>> np.array_equal(g.compute(), fastpool.{name}(np.ones(y.shape), "
                   f"x.shape, 3, 2, 1))\nTrue")
    else:
        squeezed = forward == "global_avg_pool"

        def op(grad_output, input_shape, *, channels_last=False, backend=None, stream=None,
               chunks=None):
            return _backward.adaptive_avg_pool_backward(
                grad_output, input_shape, nd, op=name, channels_last=channels_last,
                backend=backend, chunks=chunks, squeezed=squeezed)
        params = "input_shape : tuple of int\n    The forward input's shape."
        call = "3" if not squeezed else ""
        example = (f">>> y = fastpool.dask.{forward}{nd}d(x{', ' if call else ''}{call})\n"
                   f">>> g = fastpool.dask.{name}(da.ones_like(y), x.shape)\n"
                   f">>> np.array_equal(g.compute(), fastpool.{name}(np.ones(y.shape), "
                   f"x.shape))\nTrue")
    op.__doc__ = _BACKWARD_DOC.format(forward=f"{forward}{nd}d", name=name, params=params,
                                      tail=_TAIL.replace("Input and output", "Arrays"),
                                      shape=shape, chunk=chunk, example=example)
    return _named(op, name)


max_pool1d, max_pool2d, max_pool3d = (_sliding(nd, "max") for nd in (1, 2, 3))
avg_pool1d, avg_pool2d, avg_pool3d = (_sliding(nd, "avg") for nd in (1, 2, 3))
lp_pool1d, lp_pool2d, lp_pool3d = (_sliding(nd, "lp") for nd in (1, 2, 3))
min_pool1d, min_pool2d, min_pool3d = (_sliding(nd, "min") for nd in (1, 2, 3))
adaptive_min_pool1d, adaptive_min_pool2d, adaptive_min_pool3d = (
    _adaptive(nd, "min") for nd in (1, 2, 3))
global_min_pool1d, global_min_pool2d, global_min_pool3d = (
    _global_op(nd, "min") for nd in (1, 2, 3))
global_pool1d, global_pool2d, global_pool3d = (_global_pool_op(nd) for nd in (1, 2, 3))
gem_pool1d, gem_pool2d, gem_pool3d = (_gem_op(nd) for nd in (1, 2, 3))
lp_pool1d_backward, lp_pool2d_backward, lp_pool3d_backward = (
    _backward_of(nd, "lp_pool") for nd in (1, 2, 3))
adaptive_max_pool1d, adaptive_max_pool2d, adaptive_max_pool3d = (
    _adaptive(nd, "max") for nd in (1, 2, 3))
adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_avg_pool3d = (
    _adaptive(nd, "avg") for nd in (1, 2, 3))
global_max_pool1d, global_max_pool2d, global_max_pool3d = (
    _global_op(nd, "max") for nd in (1, 2, 3))
global_avg_pool1d, global_avg_pool2d, global_avg_pool3d = (
    _global_op(nd, "avg") for nd in (1, 2, 3))
max_pool1d_backward, max_pool2d_backward, max_pool3d_backward = (
    _backward_of(nd, "max_pool") for nd in (1, 2, 3))
avg_pool1d_backward, avg_pool2d_backward, avg_pool3d_backward = (
    _backward_of(nd, "avg_pool") for nd in (1, 2, 3))
adaptive_max_pool1d_backward, adaptive_max_pool2d_backward, adaptive_max_pool3d_backward = (
    _backward_of(nd, "adaptive_max_pool") for nd in (1, 2, 3))
adaptive_avg_pool1d_backward, adaptive_avg_pool2d_backward, adaptive_avg_pool3d_backward = (
    _backward_of(nd, "adaptive_avg_pool") for nd in (1, 2, 3))
global_max_pool1d_backward, global_max_pool2d_backward, global_max_pool3d_backward = (
    _backward_of(nd, "global_max_pool") for nd in (1, 2, 3))
global_avg_pool1d_backward, global_avg_pool2d_backward, global_avg_pool3d_backward = (
    _backward_of(nd, "global_avg_pool") for nd in (1, 2, 3))

del np
