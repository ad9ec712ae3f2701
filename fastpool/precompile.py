"""Compile fastpool's CPU kernels ahead of time, into numba's on-disk cache.

The Numba kernels compile on the first call of each op, dtype and layout (seconds
each) and are cached on disk, so later processes load them instead.  This fills
that cache in one go, for Docker images and CI::

    python -m fastpool.precompile                        # every group, float32 and float64
    python -m fastpool.precompile --ops max,avg --dtypes float32
    python -m fastpool.precompile --list                 # the groups

It calls the public ops on tiny inputs, one call per kernel specialisation worth
having: a row of ``CASES`` names its group, what it compiles and the calls, and
runs for each dtype and layout asked for.  The specialisations are decided by types
alone (see ``fastpool/cpu/pooling.py``): the dtype; the layout (4-D channels-first
or 5-D channels-last canonical arrays, which serve 1-D, 2-D and 3-D alike, so the
rows use 2-D); max pooling with or without indices; direct or separable kernels
(windows of 9 elements or more); float32 or float64 sums (float32 windows of more
than 64 elements sum in float64); whole-plane kernels (global pooling,
channels-first; float32 planes sum in float32 blocks whatever their size); Lp
powers or plain averages; the backward kernels (max's scatter, or its
channels-last gather from 32 channels on for one-element windows; the sums'
gather, row by row or in blocks of small planes); for the channels-first kernels
without indices, the sweep over the interior windows: one build per (stride,
kernel) pair of 2x2 or 2x3, 3x3 and 4x4 (stride x window, along W), one for
stride 1, one for the other strides (see ``fastpool.cpu.kernels.interior_sweep``);
and for the channels-last ones, the register window: one build per window of
rows x columns 1x1 to 1x4, 2x2, 3x3 and 4x2 (2x2x2), one for the others (see
``fastpool.cpu.kernels.register_window``).  Other sizes and padding are run-time
values and compile nothing new.

``import fastpool`` does not import this module.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import time
from typing import NamedTuple

__all__ = ["precompile", "plan", "cache_location", "GROUPS", "CASES", "DTYPES", "LAYOUTS",
           "main"]


class Case(NamedTuple):
    """One row of the table: ``forward`` (then, for float dtypes, ``backward``) is run
    with ``x`` an input of ``size`` x ``size`` pixels and ``channels`` channels in the
    row's dtype and layout.  ``ints``: integer and bool dtypes take the forward too.
    ``layouts``: the layouts it runs in.  ``tile_widths``: run once for each width of
    the convolutions' tiles instead, with ``x`` and ``w`` (``(C, C, 3, 3)``) of
    channels that fill it (its builds are per width: see
    :func:`fastpool.cpu.microkernel.tile_vectors`)."""

    group: str
    what: str
    forward: str
    backward: str | None = None
    size: int = 8
    channels: int = 4
    ints: bool = False
    layouts: tuple = ("first", "last")
    tile_widths: bool = False


# In the calls: every public function of fastpool, with channels_last bound to the
# row's layout; ``x`` the input, ``ones`` numpy.ones_like, ``w`` a (3, C, 3, 3) weight,
# ``b`` a bias, ``i0`` int64 zero indices of x's shape and ``widths`` the channels that fill
# each width of a convolution tile.  The forward call sets ``y``
# (and ``i``).
_LAST = ("last",)
CASES: tuple[Case, ...] = (
    # Channels-first rows of over 8 outputs run the row kernels, narrower ones a block
    # of planes at a time in vector lanes; max pooling's rows of under 16 outputs fold
    # rows first (so its sweeps want rows of 16 outputs and more).
    Case("max", "direct", "y = max_pool2d(x, 3, 2, 1)", size=32, ints=True),
    Case("max", "direct, with indices; backward scatter",
         "y, i = max_pool2d(x, 3, 2, 1, return_indices=True)",
         "max_pool2d_backward(ones(y), i, x.shape)", ints=True),
    Case("max", "backward gather (channels-last, >= 32 channels, one-element windows)",
         "y, i = max_pool2d(x, 1, 2, return_indices=True)",
         "max_pool2d_backward(ones(y), i, x.shape, kernel_size=1, stride=2)", channels=32,
         layouts=_LAST),
    Case("max", "direct, the other interior sweeps (stride x window 2x2, 3x3, 4x4, "
         "stride 1, other strides)", "y = max_pool2d(x, 2); y = max_pool2d(x, 3, 3); "
         "y = max_pool2d(x, 4, 4); y = max_pool2d(x, 3, 1, 1); y = max_pool2d(x, 5, 4, 1)",
         size=64, ints=True, layouts=("first",)),
    Case("max", "rows first (channels-first rows of 9 to 15 outputs)",
         "y = max_pool2d(x, 3, 2, 1)", size=20, ints=True, layouts=("first",)),
    Case("max", "channels-first small planes, in blocks of planes",
         "y = max_pool2d(x, 3, 2, 1)", ints=True, layouts=("first",)),
    Case("max", "channels-last register windows (rows x columns 1x1 to 1x4, 2x2, 4x2 "
         "as 2x2x2; the direct row's 3x3)",
         "y = max_pool2d(x, 1); y = max_pool2d(x, (1, 2)); y = max_pool2d(x, (1, 3)); "
         "y = max_pool2d(x, (1, 4)); y = max_pool2d(x, 2); y = max_pool2d(x, (4, 2))",
         ints=True, layouts=_LAST),
    Case("max", "separable", "y = max_pool2d(x, 5, 1)", size=16, ints=True),
    Case("max", "separable, with indices", "y, i = max_pool2d(x, 5, 1, return_indices=True)",
         size=16, ints=True),
    Case("avg", "direct; backward", "y = avg_pool2d(x, 2)",
         "avg_pool2d_backward(ones(y), x.shape, 2)", size=20),
    Case("avg", "direct, float64 sums (windows over 64 elements); backward",
         "y = avg_pool2d(x, 9)", "avg_pool2d_backward(ones(y), x.shape, 9)", size=18),
    Case("avg", "direct, float64 sums, rows of over 8 outputs", "y = avg_pool2d(x, 9)",
         size=81, layouts=("first",)),
    Case("avg", "channels-first small planes, in blocks of planes (float32 sums)",
         "y = avg_pool2d(x, 2)", layouts=("first",)),
    Case("avg", "backward row by row (channels-first planes over 4 KiB of sums)",
         "y = avg_pool2d(x, 2); z = avg_pool2d(x, 9)",
         "avg_pool2d_backward(ones(y), x.shape, 2); avg_pool2d_backward(ones(z), x.shape, 9)",
         size=33, layouts=("first",)),
    Case("avg", "direct, the other interior sweeps (stride x window 2x3, 3x3, 4x4, "
         "stride 1)", "y = avg_pool2d(x, 3, 2, 1); y = avg_pool2d(x, 3, 3); "
         "y = avg_pool2d(x, 4, 4); y = avg_pool2d(x, 3, 1, 1)", size=40, layouts=("first",)),
    Case("avg", "channels-last register windows (as max's, 3x3 included)",
         "y = avg_pool2d(x, 1); y = avg_pool2d(x, (1, 2)); y = avg_pool2d(x, (1, 3)); "
         "y = avg_pool2d(x, (1, 4)); y = avg_pool2d(x, 3, 2, 1); y = avg_pool2d(x, (4, 2))",
         layouts=_LAST),
    Case("avg", "separable", "y = avg_pool2d(x, 5, 1)", size=16),
    Case("avg", "separable, float64 sums", "y = avg_pool2d(x, 9, 1)", size=20),
    # L2 norms (norm_type 2) compile builds of their own, p a constant: each lp row
    # runs p = 2 and p = 3 (any other p's builds).
    Case("lp", "direct; backward", "y = lp_pool2d(x, 2, 2); y = lp_pool2d(x, 3, 2)",
         "lp_pool2d_backward(ones(y), x, 2, 2); lp_pool2d_backward(ones(y), x, 3, 2)",
         size=20),
    Case("lp", "channels-first small planes, in blocks of planes",
         "y = lp_pool2d(x, 2, 2); y = lp_pool2d(x, 3, 2)", layouts=("first",)),
    Case("lp", "backward row by row (channels-first planes over 4 KiB of sums)",
         "y = lp_pool2d(x, 2, 2); y = lp_pool2d(x, 3, 2)",
         "lp_pool2d_backward(ones(y), x, 2, 2); lp_pool2d_backward(ones(y), x, 3, 2)", size=33,
         layouts=("first",)),
    # Sweeps and register windows are built per window and stride: the common 3x3
    # ones, and channels-last windows without a register build of their own (4x4).
    Case("lp", "3x3 windows, stride 2 and 1; generic channels-last windows; backward",
         "y = lp_pool2d(x, 2, 3, 2); y = lp_pool2d(x, 3, 3, 2); y = lp_pool2d(x, 2, 3, 1); "
         "y = lp_pool2d(x, 2, 4, 4)",
         "lp_pool2d_backward(ones(y), x, 2, 4, 4); "
         "lp_pool2d_backward(ones(lp_pool2d(x, 2, 3, 2)), x, 2, 3, 2); "
         "lp_pool2d_backward(ones(lp_pool2d(x, 3, 3, 2)), x, 3, 3, 2)", size=20),
    Case("lp", "separable", "y = lp_pool2d(x, 2, 5, 1); y = lp_pool2d(x, 3, 5, 1)", size=16),
    Case("lp", "whole-plane windows", "y = lp_pool2d(x, 2, 8); y = lp_pool2d(x, 3, 8)",
         layouts=("first",)),
    Case("adaptive", "max", "y = adaptive_max_pool2d(x, (3, 9))", size=20, ints=True),
    Case("adaptive", "max, with indices; backward scatter",
         "y, i = adaptive_max_pool2d(x, 3, return_indices=True)",
         "adaptive_max_pool2d_backward(ones(y), i, x.shape)", ints=True),
    Case("adaptive", "max backward gather (channels-last, >= 32 channels, one-element "
         "windows)", "y, i = adaptive_max_pool2d(x, 8, return_indices=True)",
         "adaptive_max_pool2d_backward(ones(y), i, x.shape)", channels=32, layouts=_LAST),
    Case("adaptive", "avg; backward", "y = adaptive_avg_pool2d(x, (3, 9))",
         "adaptive_avg_pool2d_backward(ones(y), x.shape)", size=20),
    Case("adaptive", "avg, float64 sums; backward", "y = adaptive_avg_pool2d(x, 2)",
         "adaptive_avg_pool2d_backward(ones(y), x.shape)", size=18),
    Case("adaptive", "avg, float64 sums, rows of over 8 outputs",
         "y = adaptive_avg_pool2d(x, (2, 9))", size=81, layouts=("first",)),
    Case("global", "max", "y = global_max_pool2d(x)", ints=True),
    Case("global", "max, with indices; backward scatter",
         "y, i = global_max_pool2d(x, return_indices=True)",
         "global_max_pool2d_backward(ones(y), i, x.shape)", ints=True),
    Case("global", "avg; backward", "y = global_avg_pool2d(x)",
         "global_avg_pool2d_backward(ones(y), x.shape)"),
    Case("min", "sliding, with and without indices; backward",
         "y = min_pool2d(x, 3, 2, 1); y, i = min_pool2d(x, 3, 2, 1, return_indices=True)",
         "min_pool2d_backward(ones(y), i, x.shape)", size=32, ints=True),
    Case("min", "channels-first small planes, in blocks of planes",
         "y = min_pool2d(x, 3, 2, 1)", ints=True, layouts=("first",)),
    Case("min", "separable", "y = min_pool2d(x, 5, 1)", size=16, ints=True),
    Case("min", "adaptive and global",
         "y = adaptive_min_pool2d(x, (3, 9)); y = global_min_pool2d(x)", size=20,
         ints=True),
    Case("unpool", "forward; backward", "y = max_unpool2d(x, i0, 2)",
         "max_unpool2d_backward(ones(y), i0)", ints=True),
    Case("fractional", "forward; backward scatter",
         "y, i = fractional_max_pool2d(x, 2, output_size=4, return_indices=True, seed=0)",
         "fractional_max_pool2d_backward(ones(y), i, x.shape)", ints=True),
    # GeM's fused kernels take p (integer or not, shared or per channel) at run time.
    Case("gem", "global (whole-plane kernels channels-first); backward",
         "y = gem_pool2d(x)", "gem_pool2d_backward(ones(y), x)"),
    Case("gem", "sliding windows; backward (and the average backward's gather)",
         "y = gem_pool2d(x, kernel_size=2)", "gem_pool2d_backward(ones(y), x, kernel_size=2)"),
    Case("conv", "overlapping windows, tiles of each width; backward",
         "y = strided_conv2d(x, w, 2, 1, bias=b)", "strided_conv2d_backward(ones(y), x, w, 2, 1)",
         tile_widths=True),
    # Windows apart along H: the forward's tasks copy a channels-first input's rows
    # (a build of their own); the backward runs the builds above.
    Case("conv", "windows apart along H (2x2, stride 2), tiles of each width",
         "y = strided_conv2d(x, w[:, :, :2, :2], 2)", layouts=("first",), tile_widths=True),
    # Pixels of fewer channels than a vector's lanes (an image's 3: stems, patch
    # embeddings) take a window row's values as the gradients' columns (the input's)
    # and rows (the weight's): 2x2 to 20x20 windows fill 1 to 4 vectors of the input
    # gradient's tiles (of float32; 4x4 windows fill float64's 2), a 7x7 stem's filters
    # (``widths``: as many as fill each tile width) the weight gradient's.
    Case("conv", "stems and patch embeddings of 3 channels; backward",
         "y = strided_conv2d(x, np.ones((8, 3, 2, 2), x.dtype), 2)",
         "for k in (2, 4, 8, 16, 20): wk = np.ones((8, 3, k, k), x.dtype); "
         "strided_conv2d_backward(ones(strided_conv2d(x, wk, k)), x, wk, k)\n"
         "for f in widths: wf = np.ones((f, 3, 7, 7), x.dtype); "
         "strided_conv2d_backward(ones(strided_conv2d(x, wf, 2, 3)), x, wf, 2, 3)\n"
         # A first layer's backward, without the input's gradient (fastpool.torch asks
         # for none): the weight gradient's copies by the forward's copy kernel.
         "strided_conv2d_backward(ones(strided_conv2d(x, wf, 2, 3)), x, wf, 2, 3, "
         "output_mask=(False, True, True))",
         size=40, channels=3),
)

# Group: what its kernels serve (the --list text).
GROUPS: dict[str, str] = {
    "max": "max_pool{1,2,3}d and its backward: direct and separable kernels, with and "
           "without indices, backward scatter and channels-last gather",
    "avg": "avg_pool{1,2,3}d and its backward: direct and separable, float32 and "
           "float64 sums (lp_pool with norm_type=1 runs these)",
    "lp": "lp_pool{1,2,3}d and its backward (norm_type=inf runs the max kernels)",
    "adaptive": "adaptive_{max,avg}_pool{1,2,3}d and their backward",
    "global": "global_{max,avg}_pool{1,2,3}d and their backward (whole-plane kernels)",
    "min": "min pooling: sliding, adaptive and global (max's kernels, reversed order)",
    "unpool": "max_unpool{1,2,3}d and its backward",
    "fractional": "fractional_max_pool{2,3}d and its backward",
    "gem": "gem_pool{1,2,3}d and its backward (fused kernels, and the average backward)",
    "conv": "strided_conv{1,2,3}d and its backward",
}

# The CPU kernels' dtypes.  float16 and bfloat16 (fastpool.torch's half tensors, GeM's
# float16 arrays) are computed in float32 on the CPU: the float32 kernels serve them.
_FLOATS = ("float32", "float64")
_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
_IN_FLOAT32 = ("float16", "bfloat16")
DTYPES: tuple[str, ...] = _FLOATS + _IN_FLOAT32 + _INTS
DEFAULT_DTYPES = _FLOATS
LAYOUTS: dict[str, str] = {"first": "channels-first", "last": "channels-last"}
_LAYOUT_ALIASES = {"first": "first", "last": "last", "channels_first": "first",
                   "channels-first": "first", "channels_last": "last",
                   "channels-last": "last", "cf": "first", "cl": "last"}

assert set(GROUPS) == {case.group for case in CASES}


def _names(value, known, what: str, aliases=None) -> list[str]:
    """A comma-separated string or a sequence of names, validated, in order, once each."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        name = str(item).strip()
        if not name:
            continue
        name = (aliases or {}).get(name.lower(), name)
        if name not in known:
            raise ValueError(f"unknown {what} {item!r} (choose from {', '.join(known)})")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no {what} given (choose from {', '.join(known)})")
    return names


class _Task(NamedTuple):
    case: Case
    dtype: str  # the kernels' dtype
    layout: str  # "first" or "last"

    def label(self) -> str:
        return f"{self.case.group}: {self.case.what} ({self.dtype}, {LAYOUTS[self.layout]})"


def plan(ops=None, dtypes=None, layouts=None) -> list[_Task]:
    """The calls :func:`precompile` makes, in order, grouped by op group."""
    groups = _names(GROUPS if ops is None else ops, tuple(GROUPS), "op group")
    asked = _names(DEFAULT_DTYPES if dtypes is None else dtypes, DTYPES, "dtype")
    kernel_dtypes = list(dict.fromkeys("float32" if d in _IN_FLOAT32 else d for d in asked))
    layouts = _names(tuple(LAYOUTS) if layouts is None else layouts, tuple(LAYOUTS), "layout",
                     _LAYOUT_ALIASES)
    tasks = []
    for group in groups:
        for case in (c for c in CASES if c.group == group):
            for dtype in kernel_dtypes:
                if dtype in _INTS and not case.ints:
                    continue
                tasks += [_Task(case, dtype, la) for la in layouts if la in case.layouts]
    return tasks


class Report(NamedTuple):
    """What a run did: seconds per group, the kernel specialisations it left in this
    process (``compiled`` by numba, ``loaded`` from its cache) and the cache directory
    (with the rule numba chose it by)."""

    seconds: dict
    calls: int
    compiled: int
    loaded: int
    cache_dir: str | None
    cache_rule: str


def precompile(ops=None, dtypes=None, progress=True, *, layouts=None) -> dict:
    """Compile (or load) fastpool's CPU kernels into numba's on-disk cache.

    Parameters
    ----------
    ops : str or sequence of str, optional
        Op groups (``GROUPS``; a comma-separated string also works); all by
        default.
    dtypes : str or sequence of str, optional
        Input dtypes (``DTYPES``); float32 and float64 by default.  Integer and
        bool dtypes compile the max-family forward kernels; float16 and bfloat16 are
        computed in float32 on the CPU, so they compile the float32 kernels.
    progress : bool, default True
        Show progress on stderr: a tqdm bar on a terminal when tqdm is installed,
        else a line per step.
    layouts : str or sequence of str, optional
        ``"first"`` and/or ``"last"`` (channels-first, channels-last); both by default.

    Returns
    -------
    dict
        Seconds per op group, in the order run.

    Raises
    ------
    ValueError
        For an unknown group, dtype or layout.
    RuntimeError
        When numba's cache is off (``FASTPOOL_DISABLE_CACHE=1``), or when a call fails.
    """
    return _run(plan(ops, dtypes, layouts), progress).seconds


def _kernels() -> list:
    """fastpool's cached CPU kernels in this process, as numba dispatchers: each
    task kernel's build and the launcher that runs it."""
    from fastpool.cpu import conv, gem, kernels, tasks  # noqa: F401  (their kernels)
    found = {id(dispatcher): dispatcher for kernel in tasks.task_kernels()
             for dispatcher in kernel.dispatchers()}  # the launchers are shared
    return [dispatcher for dispatcher in found.values() if dispatcher.stats.cache_path]


def _counts(dispatchers) -> tuple[int, int]:
    """(cache misses, cache hits) summed over ``dispatchers``: specialisations compiled
    (and saved), and loaded from the cache."""
    misses = hits = 0
    for dispatcher in dispatchers:
        stats = dispatcher.stats
        misses += sum(stats.cache_misses.values())
        hits += sum(stats.cache_hits.values())
    return misses, hits


def cache_location() -> tuple[str | None, str]:
    """Where numba caches fastpool's CPU kernels, and why there: ``NUMBA_CACHE_DIR``,
    the package's ``__pycache__``, or numba's user-wide cache directory (when the
    package directory is not writable).  Imports numba, compiles nothing."""
    from numba.core import config

    from fastpool._config import CPU_JIT_OPTIONS
    from fastpool.cpu import kernels
    if not CPU_JIT_OPTIONS["cache"]:
        return None, "off (FASTPOOL_DISABLE_CACHE is set)"
    path = kernels.plane_max.body.stats.cache_path
    in_tree = os.path.join(os.path.dirname(os.path.abspath(kernels.__file__)), "__pycache__")
    if config.CACHE_DIR and os.path.abspath(path).startswith(
            os.path.abspath(config.CACHE_DIR) + os.sep):
        return path, "NUMBA_CACHE_DIR"
    if os.path.abspath(path) == in_tree:
        return path, "the package's __pycache__"
    return path, "numba's user-wide cache directory (the package directory is not writable)"


def _namespace(layout: str) -> dict:
    """The public functions with ``channels_last`` bound to ``layout``."""
    import fastpool
    channels_last = layout == "last"
    namespace = {}
    for name in fastpool.__all__:
        function = getattr(fastpool, name)
        if callable(function) and "channels_last" in inspect.signature(function).parameters:
            function = functools.partial(function, channels_last=channels_last)
        namespace[name] = function
    return namespace


def _both_builds():
    """Run the loop body twice: every CPU launch parallel, then every one serial.

    Small calls run a kernel serially, large ones in parallel (see
    :func:`fastpool.cpu.runtime.launch`), and some plans choose another kernel or
    build for each (the channels-first sum backward's plane blocks, for one): the
    tiny inputs here would otherwise compile the serial choices alone.  Plans
    remember the build they chose, so the plan cache is emptied before and after
    each pass."""
    from fastpool import _dispatch
    from fastpool.cpu import runtime
    limit = runtime.SERIAL_WORK_LIMIT
    try:
        for forced in (0, 1 << 62):
            runtime.SERIAL_WORK_LIMIT = forced
            _dispatch.PLANS.clear()
            yield forced
    finally:
        runtime.SERIAL_WORK_LIMIT = limit
        _dispatch.PLANS.clear()


def _tile_channels(dtype) -> list:
    """The channels that fill a convolution tile of each width, for ``dtype``."""
    from fastpool.cpu.microkernel import TILE_VECTORS, tile_columns
    return [tile_columns(dtype.itemsize, v) for v in range(1, TILE_VECTORS + 1)]


def _run_task(task: _Task, namespaces: dict) -> None:
    import numpy as np
    dtype = np.dtype(task.dtype)
    channel_counts = _tile_channels(dtype) if task.case.tile_widths else [task.case.channels]
    for channels in channel_counts:
        _run_case(task, namespaces, channels)


def _run_case(task: _Task, namespaces: dict, channels: int) -> None:
    import numpy as np
    case, layout = task.case, task.layout
    rng = np.random.default_rng(0)
    shape = (2, channels, case.size, case.size)
    dtype = np.dtype(task.dtype)
    filters = channels if case.tile_widths else 3
    if dtype.kind == "f":
        x = rng.standard_normal(shape).astype(dtype)
    else:
        x = rng.integers(0, 2 if dtype.kind == "b" else 100, shape).astype(dtype)
    if layout == "last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    if layout not in namespaces:
        namespaces[layout] = _namespace(layout)
    scope = {**namespaces[layout], "np": np, "x": x, "ones": np.ones_like,
             "w": np.ones((filters, channels, 3, 3), dtype), "b": np.ones(filters, dtype),
             "i0": np.zeros(x.shape, np.int64), "widths": _tile_channels(dtype)}
    try:
        for _ in _both_builds():
            exec(case.forward, scope)
            if case.backward and dtype.kind == "f":
                exec(case.backward, scope)
    except Exception as error:
        raise RuntimeError(f"fastpool.precompile: {task.label()} failed: "
                           f"{type(error).__name__}: {error}") from error


class _Progress:
    """A tqdm bar on a terminal (when tqdm is installed), else one line per step."""

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.show, self.bar = total, 0, show, None
        if show and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="fastpool.precompile", unit="step")

    def step(self, task: _Task, seconds: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{task.case.group}, {task.dtype}", refresh=False)
            self.bar.update()
        elif self.show:
            print(f"[{self.done}/{self.total}] {task.label()}: {seconds:.1f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(tasks: list[_Task], progress: bool = True) -> Report:
    from fastpool._config import CPU_JIT_OPTIONS
    if not CPU_JIT_OPTIONS["cache"]:
        raise RuntimeError("fastpool.precompile: FASTPOOL_DISABLE_CACHE is set, so numba's "
                           "on-disk cache is off and nothing compiled would be kept; unset it")
    before = _counts(_kernels())  # imports numba and the kernels before the clock starts
    namespaces: dict = {}
    seconds: dict = {}
    bar = _Progress(len(tasks), progress)
    # fastpool's "compiling kernels" notice says what this run says already.
    logger = logging.getLogger("fastpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for task in tasks:
            start = time.perf_counter()
            _run_task(task, namespaces)
            took = time.perf_counter() - start
            seconds[task.case.group] = seconds.get(task.case.group, 0.0) + took
            bar.step(task, took)
    finally:
        logger.setLevel(level)
        bar.close()
    after = _counts(_kernels())  # with the kernels built during the run
    compiled, loaded = after[0] - before[0], after[1] - before[1]
    return Report(seconds, len(tasks), compiled, loaded, *cache_location())


def _parser() -> argparse.ArgumentParser:
    def listed(known, what, aliases=None):
        def parse(value):
            try:
                return _names(value, known, what, aliases)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        parse.__name__ = what  # argparse names it in "invalid ... value" errors
        return parse

    parser = argparse.ArgumentParser(
        prog="python -m fastpool.precompile",
        description="Compile fastpool's CPU kernels into numba's on-disk cache, so that "
                    "first calls in later processes load them instead of compiling "
                    "(for Docker images and CI).",
        epilog="The cache goes where numba puts it: NUMBA_CACHE_DIR when set, else the "
               "package's __pycache__ when writable, else numba's user-wide cache "
               "directory. It holds machine code for this CPU and numba version.")
    parser.add_argument("--ops", type=listed(tuple(GROUPS), "op group"), default=None,
                        metavar="GROUP[,GROUP...]",
                        help="op groups to compile (default: all; --list shows them)")
    parser.add_argument("--dtypes", type=listed(DTYPES, "dtype"), default=None,
                        metavar="DTYPE[,DTYPE...]",
                        help=f"input dtypes (default: {','.join(DEFAULT_DTYPES)}; also "
                             f"{', '.join(_IN_FLOAT32)} (computed by the float32 kernels) "
                             f"and {', '.join(_INTS)} (max-family forward kernels))")
    parser.add_argument("--layouts", type=listed(tuple(LAYOUTS), "layout", _LAYOUT_ALIASES),
                        default=None, metavar="LAYOUT[,LAYOUT...]",
                        help="first and/or last: channels-first, channels-last "
                             "(default: both)")
    parser.add_argument("--list", action="store_true",
                        help="list the op groups (with -v, their calls) and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --list, show each group's calls")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or progress lines")
    return parser


def _list(verbose: bool) -> None:
    width = max(map(len, GROUPS))
    for group, text in GROUPS.items():
        print(f"{group:<{width}}  {text}")
        if verbose:
            for case in (c for c in CASES if c.group == group):
                calls = case.forward + (f"; {case.backward}" if case.backward else "")
                print(f"{'':<{width}}    {case.what}: {calls}")


def main(argv=None) -> int:
    """The command line: ``python -m fastpool.precompile --help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        _list(args.verbose)
        return 0
    tasks = plan(args.ops, args.dtypes, args.layouts)
    if not tasks:
        parser.error(f"nothing to compile: the op groups {','.join(args.ops or GROUPS)} have "
                     f"no kernels for dtypes {','.join(args.dtypes or DEFAULT_DTYPES)} "
                     f"(integer and bool dtypes run the max-family groups only)")
    start = time.perf_counter()
    try:
        report = _run(tasks, not args.no_progress)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    calls = f"{report.calls} call{'s' * (report.calls != 1)}"
    print(f"fastpool.precompile: {calls} in {total:.1f} s left "
          f"{report.compiled + report.loaded} kernel specialisations in numba's cache "
          f"({report.compiled} compiled now, {report.loaded} already cached)")
    for group, seconds in report.seconds.items():
        print(f"  {group:<10} {seconds:7.1f} s")
    print(f"numba's cache: {report.cache_dir} ({report.cache_rule})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
