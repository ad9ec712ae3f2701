"""Timing fastpool, the NumPy reference and torch on the same arrays.

Every measurement keeps all ``repeats`` timed samples made after a warm-up call
(which also compiles; the NumPy reference: one call, no warm-up), a sample being
one call or, for calls under 2 ms, the mean of a batch of them: the report
shows their minimum, median and maximum and computes speed-ups from the minima
(the least disturbed run of each; noise on a shared machine only ever adds
time).  Times of different back ends are taken in the same run, so the
speed-ups are ratios of times measured seconds apart; absolute times on a shared
machine drift.  Each row also records how much CPU
other processes took while it ran (bench/noise.py).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

import fastpool
from bench.cases import Case
from bench.noise import Watch

BACKENDS = ("fastpool", "numpy", "torch")

# Seconds each library's samples wait for the other's threads to go idle (libgomp
# spins some 300 thousand rounds before it sleeps).
SETTLE_SECONDS = 0.03


@dataclass
class Measurement:
    case: Case
    channels_last: bool
    direction: str
    seconds: dict  # back end -> best (minimum) time
    nbytes: int  # bytes read plus written by fastpool's kernels
    samples: dict = field(default_factory=dict)  # back end -> every timed sample, s per call
    noise: dict | None = None  # bench.noise.other_load over the row, None off Linux
    warmup: dict = field(default_factory=dict)  # back end -> seconds of the first call

    @property
    def layout(self) -> str:
        return "channels-last" if self.channels_last else "channels-first"


# Calls shorter than this are timed in batches, each sample the mean of enough calls
# to last about this long (timeit's practice): one call of tens of microseconds is
# within the jitter of the clock, the scheduler and a thread wake-up, and the
# minimum of five such calls swung a batch-1 row between 0.5x and 1.0x of torch.
MIN_SAMPLE_SECONDS = 2e-3
MAX_BATCH = 1000


def sample_times(call, repeats: int, warm_up: bool = True) -> tuple[float, list[float]]:
    """The warm-up call's seconds (0 without one) and the seconds per call of
    ``repeats`` timed samples after it: with a warm-up, one more call sizes the
    batches of short calls (:data:`MIN_SAMPLE_SECONDS`), each sample their mean."""
    warmup, batch = 0.0, 1
    if warm_up:
        start = time.perf_counter()
        call()
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        if once < MIN_SAMPLE_SECONDS:
            batch = min(MAX_BATCH, math.ceil(MIN_SAMPLE_SECONDS / max(once, 1e-7)))
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for _ in range(batch):
            call()
        times.append((time.perf_counter() - start) / batch)
    return warmup, times


def best_time(call, repeats: int) -> float:
    return min(sample_times(call, repeats)[1])


def spread(times) -> dict:
    """min, quartiles, median and max of a list of times (same unit), and the count."""
    times = sorted(times)
    if len(times) > 1:
        q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = median = q3 = times[0]
    return {"min": times[0], "q1": q1, "median": median, "q3": q3, "max": times[-1],
            "n": len(times)}


def _unpool_indices(case: Case, channels_last: bool) -> np.ndarray:
    """Valid indices for unpooling the case's input: one position per (non-overlapping,
    kernel = stride) window of the output, drawn at random within it."""
    kernel = case.args[0]
    rng = np.random.default_rng(3)
    spatial = case.shape[2:]
    out_spatial = tuple(kernel * s for s in spatial)
    flat = np.zeros(case.shape, np.int64)
    for axis, size in enumerate(spatial):
        position = (np.arange(size) * kernel).reshape((-1,) + (1,) * (len(spatial) - axis - 1))
        offset = rng.integers(0, kernel, case.shape)
        flat = flat * out_spatial[axis] + position + offset
    return np.ascontiguousarray(np.moveaxis(flat, 1, -1)) if channels_last else flat


def _extras(case: Case, channels_last: bool) -> dict:
    """The op's other inputs, NumPy arrays in the case's layout: (array, spatial) per
    keyword, spatial ones laid out like x (torch gets them channels-first views)."""
    if case.op == "max_unpool":
        return {"indices": (_unpool_indices(case, channels_last), True)}
    if case.op == "fractional_max_pool":
        samples = np.random.default_rng(4).random(case.shape[:2] + (case.nd,), np.float32)
        return {"_random_samples": (samples, False)}
    return {}


def _torch_gem(F, t, case: Case):
    """GeM as models write it: mean(clamp(x, eps) ** p) ** (1 / p) over each plane."""
    p, eps = case.args
    pool = getattr(F, f"adaptive_avg_pool{case.nd}d")
    return pool(t.clamp(min=eps).pow(p), 1).pow(1.0 / p)


# torch's equivalent of each op that torch.nn.functional has under another name or
# with other inputs: (F, input tensor, case, extra tensors by keyword) -> output.
_TORCH_OPS = {
    "min_pool": lambda F, t, case, e: -getattr(F, f"max_pool{case.nd}d")(
        -t, *case.args, **case.kwargs),
    "max_unpool": lambda F, t, case, e: getattr(F, case.name)(
        t, e["indices"], *case.args, **case.kwargs),
    "fractional_max_pool": lambda F, t, case, e: getattr(F, case.name)(
        t, *case.args, _random_samples=e["_random_samples"], **case.kwargs),
    "gem_pool": lambda F, t, case, e: _torch_gem(F, t, case),
}


def _torch_function(case: Case, x: np.ndarray, channels_last: bool, requires_grad=False,
                    extras=None):
    import torch
    import torch.nn.functional as F

    def as_torch(a, spatial=True):
        t = torch.from_numpy(a)
        # an NCHW view with channels-last strides: torch's own format
        return t.movedim(-1, 1) if channels_last and spatial else t

    t = as_torch(x)
    t.requires_grad_(requires_grad)
    tensors = {k: as_torch(a, spatial) for k, (a, spatial) in (extras or {}).items()}
    if case.op in _TORCH_OPS:
        special = _TORCH_OPS[case.op]
        return t, lambda: special(F, t, case, tensors)
    function = getattr(F, case.name)
    return t, lambda: function(t, *case.args, **case.kwargs)


def _conv_weight(case: Case) -> np.ndarray:
    out_channels, kernel = case.args[:2]
    shape = (out_channels, case.shape[1]) + (kernel,) * case.nd
    return np.random.default_rng(2).standard_normal(shape, dtype=np.float32) / 10


def _conv_calls(case: Case, x: np.ndarray, channels_last: bool, direction: str):
    """fastpool's strided convolution against torch's conv{nd}d (weights shared)."""
    import torch
    import torch.nn.functional as F

    weight = _conv_weight(case)
    stride, padding = case.args[2:]
    kw = dict(channels_last=channels_last)
    t = torch.from_numpy(x)
    t = t.movedim(-1, 1) if channels_last else t
    tw = torch.from_numpy(weight)
    torch_conv = getattr(F, f"conv{case.nd}d")
    out = getattr(fastpool, case.name)(x, weight, stride, padding, **kw)
    if direction == "forward":
        calls = {name: (lambda b=backend: getattr(fastpool, case.name)(
            x, weight, stride, padding, backend=b, **kw))
            for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
        calls["torch"] = lambda: torch_conv(t, tw, None, stride, padding)
        return calls, x.nbytes + weight.nbytes + out.nbytes
    grad = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    calls = {name: (lambda b=backend: getattr(fastpool, f"{case.name}_backward")(
        grad, x, weight, stride, padding, backend=b, **kw))
        for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
    t.requires_grad_(True)
    tw.requires_grad_(True)
    y = torch_conv(t, tw, None, stride, padding)
    g = torch.from_numpy(grad)
    g = g.movedim(-1, 1) if channels_last else g
    calls["torch"] = lambda: torch.autograd.grad(y, (t, tw), g, retain_graph=True)
    return calls, grad.nbytes + 2 * x.nbytes + 2 * weight.nbytes


def _fastpool_inputs(case: Case, x: np.ndarray, extras: dict) -> tuple[tuple, dict]:
    """fastpool's forward arguments before case.args, and extra keywords."""
    if case.op == "max_unpool":
        return (x, extras["indices"][0]), {}
    if case.op == "fractional_max_pool":
        return (x,), {"_random_samples": extras["_random_samples"][0]}
    return (x,), {}


_EXTREMES = ("max_pool", "adaptive_max_pool", "min_pool", "fractional_max_pool")
_GATHERING = ("max_pool", "min_pool")  # their backward takes the window, to gather


def _forward(case: Case, x: np.ndarray, channels_last: bool):
    if case.op == "strided_conv":
        return _conv_calls(case, x, channels_last, "forward")
    function = getattr(fastpool, case.name)
    extras = _extras(case, channels_last)
    inputs, extra_kw = _fastpool_inputs(case, x, extras)
    calls = {name: (lambda b=backend: function(*inputs, *case.args,
                                               channels_last=channels_last, backend=b,
                                               **case.kwargs, **extra_kw))
             for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
    calls["torch"] = _torch_function(case, x, channels_last, extras=extras)[1]
    out = calls["fastpool"]()
    return calls, x.nbytes + out.nbytes + sum(a.nbytes for a, _ in extras.values())


def _backward(case: Case, x: np.ndarray, channels_last: bool):
    import torch

    if case.op == "strided_conv":
        return _conv_calls(case, x, channels_last, "backward")
    forward = getattr(fastpool, case.name)
    backward = getattr(fastpool, f"{case.name}_backward")
    kw = dict(channels_last=channels_last)
    extras = _extras(case, channels_last)
    inputs, extra_kw = _fastpool_inputs(case, x, extras)
    is_max = case.op in _EXTREMES
    result = forward(*inputs, *case.args, return_indices=is_max, **kw, **case.kwargs,
                     **extra_kw) if is_max else \
        forward(*inputs, *case.args, **kw, **case.kwargs, **extra_kw)
    out = result[0] if is_max else result
    grad = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    window = {} if is_max else dict(case.kwargs)  # ceil_mode, count_include_pad, ...
    if case.op in _GATHERING:  # the optional window lets the kernels gather
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        window = {**dict(zip(names, case.args)), **case.kwargs}
    if is_max:
        arguments, nbytes = (grad, result[1], x.shape), grad.nbytes + result[1].nbytes
    elif case.op == "max_unpool":
        indices = extras["indices"][0]
        arguments, nbytes, window = (grad, indices), grad.nbytes + indices.nbytes, {}
    elif case.op in ("lp_pool", "gem_pool"):
        arguments, nbytes = (grad, x, *case.args), grad.nbytes + x.nbytes
    elif case.op == "avg_pool":
        arguments, nbytes = (grad, x.shape, *case.args), grad.nbytes
    else:
        arguments, nbytes = (grad, x.shape), grad.nbytes
    calls = {name: (lambda b=backend: backward(*arguments, backend=b, **kw, **window))
             for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
    t, torch_forward = _torch_function(case, x, channels_last, requires_grad=True,
                                       extras=extras)
    y = torch_forward()
    y = y[0] if isinstance(y, tuple) else y
    g = torch.from_numpy(grad)
    g = g.movedim(-1, 1) if channels_last else g
    calls["torch"] = lambda: torch.autograd.grad(y, t, g, retain_graph=True)
    return calls, nbytes + x.nbytes


class _CompileEvents:
    """Counts numba's compilations (not its loads from the on-disk cache) in a ``with``
    block: ``.count``, None where numba's event API is missing."""

    def __enter__(self):
        self.count, self._recorder = None, None
        try:
            from numba.core import event
            self._recorder = event.install_recorder("numba:compile")
            self._listener = self._recorder.__enter__()
        except Exception:
            self._recorder = None
        return self

    def __exit__(self, *exc):
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self.count = len(self._listener.buffer)
        return False


def measure(case: Case, channels_last: bool, direction: str, repeats: int,
            backends=BACKENDS, on_slow_first_call=None) -> Measurement:
    """Time one row.  ``on_slow_first_call(seconds)``, if given, is called when
    fastpool's first calls of the row (setting it up, the warm-up) took over a second
    and numba compiled meanwhile (a load from its on-disk cache is no compile)."""
    x = case.make_input(channels_last)
    with _CompileEvents() as compiles:
        start = time.perf_counter()
        calls, nbytes = (_forward if direction == "forward" else _backward)(
            case, x, channels_last)
        setup = time.perf_counter() - start
        samples, warmup = {}, {}
        with Watch() as watch:
            for name in backends:
                # Each library starts on quiet cores: after a call torch's OpenMP workers
                # spin for milliseconds in case more work comes (as numba's do), and
                # on 2 cores they took the next library's samples' cores (a 15 us
                # channels-last average timed at 23 us right after torch's rows).
                time.sleep(SETTLE_SECONDS)
                # The reference is slow by design, and pure NumPy (nothing to compile):
                # one call without a warm-up keeps the suite short.
                reference = name == "numpy"
                warmup[name], samples[name] = sample_times(
                    calls[name], 1 if reference else repeats, warm_up=not reference)
    first = setup + warmup.get("fastpool", 0.0)
    if on_slow_first_call is not None and first > 1.0 and compiles.count != 0:
        on_slow_first_call(first)
    seconds = {name: min(times) for name, times in samples.items()}
    return Measurement(case, channels_last, direction, seconds, nbytes, samples,
                       watch.result, warmup)


def kernel_cache_is_cold() -> bool:
    """Whether numba's on-disk cache holds none of fastpool's CPU kernels (a fresh
    clone, a cleared cache or FASTPOOL_DISABLE_CACHE=1): the first calls will compile.

    Asks numba where each kernel's cache index lives and whether it loads for the
    current source; False whenever it cannot tell (numba's internals moved)."""
    try:
        from numba.core.registry import CPUDispatcher

        from fastpool.cpu import kernels
        dispatchers = [f for f in vars(kernels).values() if isinstance(f, CPUDispatcher)]
        caches = [d._cache for d in dispatchers if getattr(d, "_cache", None) is not None]
        files = [c._cache_file for c in caches if hasattr(c, "_cache_file")]
        if not files:
            return bool(dispatchers)  # njit without cache=True: everything compiles
        return not any(f._load_index() for f in files)
    except Exception:
        return False


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second (read plus written) of a parallel copy moving ``nbytes``: the
    yardstick for a kernel that reads and writes that many bytes."""
    from bench._copy import parallel_copy

    source = np.ones(max(nbytes // 2 // 4, 1), np.float32)
    target = np.empty_like(source)
    from fastpool.cpu.runtime import launch

    seconds = best_time(lambda: launch(parallel_copy, source, target), repeats)
    return 2 * source.nbytes / seconds
