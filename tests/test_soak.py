"""Soak: 40,000 mixed calls from 8 Python threads in one long-running process.

The calls are drawn, with a fixed seed, from a table of call recipes: every
op family (max, avg, Lp, adaptive, global pooling, strided convolution), their
backward functions, 1-D to 3-D, channels-first and -last, several dtypes, a
few on the NumPy reference back end, on tiny arrays of several hundred
distinct shapes.  The soak checks that

* every threaded result is bit-identical to the serial result of its recipe;
* the process's resident memory stays flat (within 5%) between a sample after
  the first 10% of the calls and one at the end;
* no kernel is compiled again once warm, and every memoisation cache in
  fastpool stays within its bound, although the recipes use more window
  tables than the table caches hold (so they evict while threads run).

It runs in a fresh interpreter (``python -m tests.test_soak``), so that the
threading layer is picked as for a user and the memory figures are the
soak's own.  The other tests here feed each cache more distinct keys than its
bound, in this process.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastpool
from fastpool import _dispatch, _params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each of the 1200 recipes is drawn about 33 times: enough for every kernel, cache and
# buffer to be shared by threads many times over (100,000 calls took 42 s of a CI
# run's 15 minutes for no more coverage).
CALLS = 40_000
THREADS = 8
WARM_FRACTION = 0.1
RSS_TOLERANCE = 0.05

# The bounds of fastpool's memoisation caches (checked against the code below).
WINDOW_SPECS_BOUND = 1024  # _params._WINDOWS and _dispatch._SLIDING_OPS
TABLE_CACHE_BOUND = 256  # _params._sliding_table and _params.adaptive_table
PLAN_CACHE_BOUND = 512  # _dispatch.PLANS, whose plans hold window tables too


# --------------------------------------------------------------------------
# The recipes
# --------------------------------------------------------------------------


def _spatial(rng, nd: int) -> tuple[int, ...]:
    high = {1: 25, 2: 11, 3: 7}[nd]
    return tuple(int(s) for s in rng.integers(3, high, nd))


def _array(rng, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    low = 0 if dtype.kind == "u" else -100
    return rng.integers(low, low + 200, shape).astype(dtype)


def _input(rng, nd: int, dtype, channels_last: bool, channels=None):
    channels = channels or int(rng.integers(1, 5))
    spatial = _spatial(rng, nd)
    batch = (int(rng.integers(1, 3)),) if rng.random() < 0.7 else ()
    shape = batch + ((*spatial, channels) if channels_last else (channels, *spatial))
    return _array(rng, shape, dtype), spatial


def _window(rng, nd: int, spatial, dilation: bool):
    kernel = tuple(int(rng.integers(1, min(4, s) + 1)) for s in spatial)
    stride = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    dil = tuple(int(rng.integers(1, 3)) if dilation else 1 for _ in range(nd))
    # Keep every axis's dilated window inside the input.
    dil = tuple(d if (k - 1) * d < s else 1 for k, d, s in zip(kernel, dil, spatial))
    padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel)
    return kernel, stride, padding, dil, bool(rng.random() < 0.4)


def _grad_like(rng, out: np.ndarray, dtype) -> np.ndarray:
    return rng.standard_normal(out.shape).astype(dtype)


def _recipe_max(rng, nd, channels_last, backend):
    dtype = rng.choice([np.float32, np.float64, np.uint8, np.int16])
    wide = channels_last and rng.random() < 0.2  # the gathering backward takes >= 32
    x, spatial = _input(rng, nd, dtype, channels_last, 32 if wide else None)
    kernel, stride, padding, dilation, ceil_mode = _window(rng, nd, spatial, True)
    kw = dict(channels_last=channels_last, backend=backend)
    forward = getattr(fastpool, f"max_pool{nd}d")
    args = (x, kernel, stride, padding, dilation, ceil_mode)
    recipes = [(forward, args, dict(kw, return_indices=bool(rng.random() < 0.5)))]
    out, indices = forward(*args, return_indices=True, **kw)
    grad = _grad_like(rng, out, rng.choice([np.float32, np.float64]))
    window = (dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                   ceil_mode=ceil_mode) if rng.random() < 0.6 else {})
    recipes.append((getattr(fastpool, f"max_pool{nd}d_backward"),
                    (grad, indices, x.shape), dict(kw, **window)))
    return recipes


def _recipe_avg(rng, nd, channels_last, backend):
    x, spatial = _input(rng, nd, rng.choice([np.float32, np.float64]), channels_last)
    kernel, stride, padding, _, ceil_mode = _window(rng, nd, spatial, False)
    count_include_pad = bool(rng.random() < 0.5)
    divisor = None if rng.random() < 0.7 else int(rng.integers(1, 7))
    kw = dict(channels_last=channels_last, backend=backend)
    args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    forward = getattr(fastpool, f"avg_pool{nd}d")
    out = forward(x, *args, **kw)
    grad = _grad_like(rng, out, x.dtype)
    return [(forward, (x, *args), kw),
            (getattr(fastpool, f"avg_pool{nd}d_backward"), (grad, x.shape, *args), kw)]


def _recipe_lp(rng, nd, channels_last, backend):
    x, spatial = _input(rng, nd, rng.choice([np.float32, np.float64]), channels_last)
    kernel, stride, _, _, ceil_mode = _window(rng, nd, spatial, False)
    # Random normal input: no window sums to exactly 0 (norm_type 1's open backward
    # bug) and there is no NaN (norm_type inf's); positive for a fractional power.
    norm_type = float(rng.choice([1.0, 2.0, 3.5, np.inf]))
    if norm_type == 3.5:
        x = np.abs(x) + x.dtype.type(0.1)
    kw = dict(channels_last=channels_last, backend=backend)
    forward = getattr(fastpool, f"lp_pool{nd}d")
    out = forward(x, norm_type, kernel, stride, ceil_mode, **kw)
    grad = _grad_like(rng, out, x.dtype)
    return [(forward, (x, norm_type, kernel, stride, ceil_mode), kw),
            (getattr(fastpool, f"lp_pool{nd}d_backward"),
             (grad, x, norm_type, kernel, stride, ceil_mode), kw)]


def _recipe_adaptive(rng, nd, channels_last, backend):
    mode = "max" if rng.random() < 0.5 else "avg"
    dtypes = [np.float32, np.float64] + ([np.uint8, np.int16] if mode == "max" else [])
    x, spatial = _input(rng, nd, rng.choice(dtypes), channels_last)
    output_size = tuple(int(rng.integers(1, s + 3)) for s in spatial)
    kw = dict(channels_last=channels_last, backend=backend)
    forward = getattr(fastpool, f"adaptive_{mode}_pool{nd}d")
    backward = getattr(fastpool, f"adaptive_{mode}_pool{nd}d_backward")
    if mode == "max":
        out, indices = forward(x, output_size, True, **kw)
        grad = _grad_like(rng, out, rng.choice([np.float32, np.float64]))
        return [(forward, (x, output_size, bool(rng.random() < 0.5)), kw),
                (backward, (grad, indices, x.shape), kw)]
    grad = _grad_like(rng, forward(x, output_size, **kw), x.dtype)
    return [(forward, (x, output_size), kw), (backward, (grad, x.shape), kw)]


def _recipe_global(rng, nd, channels_last, backend):
    mode = "max" if rng.random() < 0.5 else "avg"
    dtypes = [np.float32, np.float64] + ([np.uint8, np.bool_] if mode == "max" else [])
    x, _ = _input(rng, nd, rng.choice(dtypes), channels_last)
    keepdims = bool(rng.random() < 0.5)
    kw = dict(channels_last=channels_last, backend=backend)
    forward = getattr(fastpool, f"global_{mode}_pool{nd}d")
    backward = getattr(fastpool, f"global_{mode}_pool{nd}d_backward")
    if mode == "max":
        out, indices = forward(x, keepdims, True, **kw)
        grad = _grad_like(rng, out, rng.choice([np.float32, np.float64]))
        return [(forward, (x, keepdims, bool(rng.random() < 0.5)), kw),
                (backward, (grad, indices, x.shape), kw)]
    grad = _grad_like(rng, forward(x, keepdims, **kw), x.dtype)
    return [(forward, (x, keepdims), kw), (backward, (grad, x.shape), kw)]


def _recipe_conv(rng, nd, channels_last, backend):
    dtype = rng.choice([np.float32, np.float64])
    x, spatial = _input(rng, nd, dtype, channels_last)
    c_in = x.shape[-1] if channels_last else x.shape[-nd - 1]
    kernel = tuple(int(rng.integers(1, min(3, s) + 1)) for s in spatial)
    weight = _array(rng, (int(rng.integers(1, 4)), c_in, *kernel), dtype)
    stride = tuple(int(rng.integers(1, 4)) for _ in range(nd))
    padding = tuple(int(rng.integers(0, 2)) for _ in range(nd))
    bias = _array(rng, weight.shape[:1], dtype) if rng.random() < 0.5 else None
    kw = dict(channels_last=channels_last, backend=backend)
    forward = getattr(fastpool, f"strided_conv{nd}d")
    out = forward(x, weight, stride, padding, bias, **kw)
    grad = _grad_like(rng, out, dtype)
    return [(forward, (x, weight, stride, padding, bias), kw),
            (getattr(fastpool, f"strided_conv{nd}d_backward"),
             (grad, x, weight, stride, padding), kw)]


FAMILIES = [_recipe_max, _recipe_avg, _recipe_lp, _recipe_adaptive, _recipe_global,
            _recipe_conv]


def recipes(groups: int = 600, seed: int = 16) -> list:
    """``(function, args, kwargs)`` triples, forward and backward of each group.

    About 5% of the groups run on the NumPy reference back end.  The inputs are
    built here, once, and shared (read-only) by every thread.
    """
    rng = np.random.default_rng(seed)
    table = []
    for group in range(groups):
        family = FAMILIES[group % len(FAMILIES)]
        nd = int(rng.integers(1, 4))
        backend = "numpy" if rng.random() < 0.05 else None
        table.extend(family(rng, nd, bool(rng.random() < 0.5), backend))
    return table


# --------------------------------------------------------------------------
# Figures: memory, caches, compiled kernels
# --------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cache_sizes() -> dict:
    """Every memoisation cache in fastpool: {name: [size, bound]}."""
    sizes = {
        "_params._WINDOWS": [len(_params._WINDOWS), WINDOW_SPECS_BOUND],
        "_dispatch._SLIDING_OPS": [len(_dispatch._SLIDING_OPS), WINDOW_SPECS_BOUND],
        "_dispatch.PLANS": [len(_dispatch.PLANS), PLAN_CACHE_BOUND],
    }
    for name, cached in (("_params._sliding_table", _params._sliding_table),
                         ("_params.adaptive_table", _params.adaptive_table),
                         ("_dispatch._backend_module", _dispatch._backend_module)):
        info = cached.cache_info()
        sizes[name] = [info.currsize, info.maxsize]
    sizes["_dispatch._backend_module"][1] = len(_dispatch._BACKEND_MODULES)
    # WindowTable.covering_outputs memoises per table and input shape; a table is
    # built for one input shape, so each holds at most one entry.
    tables = [o for o in gc.get_objects() if type(o) is _params.WindowTable]
    sizes["WindowTable._covering (most in one table)"] = [
        max((len(t.__dict__.get("_covering", {})) for t in tables), default=0), 1]
    sizes["live WindowTable objects"] = [len(tables), None]
    return sizes


def compiled_signatures() -> int:
    """How many specialisations of fastpool's CPU kernels numba holds."""
    from fastpool.cpu import tasks

    return sum(len(dispatcher.signatures) for kernel in tasks.task_kernels()
               for dispatcher in kernel.dispatchers())


# --------------------------------------------------------------------------
# The soak (in a fresh interpreter)
# --------------------------------------------------------------------------


def _fingerprint(result) -> tuple:
    """Shape, dtype and bytes of each array of a result: equal means bit-identical."""
    arrays = result if isinstance(result, tuple) else (result,)
    return tuple((a.shape, a.dtype.str, np.ascontiguousarray(a).tobytes()) for a in arrays)


def soak(calls: int = CALLS, threads: int = THREADS) -> dict:
    from fastpool.cpu import runtime

    started = time.perf_counter()
    table = recipes()
    expected = [_fingerprint(function(*args, **kwargs)) for function, args, kwargs in table]
    serial_s = time.perf_counter() - started
    per_thread = calls // threads
    draws = [np.random.default_rng([16, t]).integers(0, len(table), per_thread)
             for t in range(threads)]
    mismatches: list = []
    errors: list = []

    def worker(t: int, begin: int, end: int) -> None:
        try:
            for k in draws[t][begin:end].tolist():
                function, args, kwargs = table[k]
                if _fingerprint(function(*args, **kwargs)) != expected[k]:
                    mismatches.append(k)
        except BaseException as error:  # report, do not hang the soak
            errors.append(f"{type(error).__name__}: {error}")

    def phase(begin: int, end: int) -> None:
        pool = [threading.Thread(target=worker, args=(t, begin, end)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()

    # Ten phases of 10% of the calls each; the threads join between phases, and the
    # figures are taken then (RSS after every phase, to show its course).
    bounds = [round(per_thread * i * WARM_FRACTION) for i in range(int(1 / WARM_FRACTION) + 1)]
    threads_started = time.perf_counter()
    rss = []
    for begin, end in zip(bounds, bounds[1:]):
        phase(begin, end)
        gc.collect()
        rss.append(rss_bytes())
        if begin == 0:
            figures = {"signatures_warm": compiled_signatures(), "caches_warm": cache_sizes()}
    figures.update(rss_warm=rss[0], rss_end=rss[-1], rss_mib=[round(r / 2**20, 1) for r in rss],
                   signatures_end=compiled_signatures(), caches_end=cache_sizes())
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:"))
    figures.update(
        calls=per_thread * threads, threads=threads, recipes=len(table),
        layer=runtime.threading_layer(), numba_threads=fastpool.get_num_threads(),
        serial_s=round(serial_s, 2),
        threaded_s=round(time.perf_counter() - threads_started, 2),
        rss_peak=int(peak.split()[1]) * 1024,
        mismatches=sorted(set(mismatches)), errors=errors[:10],
        table_cache_misses={name: cached.cache_info().misses for name, cached in (
            ("_sliding_table", _params._sliding_table),
            ("adaptive_table", _params.adaptive_table))})
    return figures


def _run_soak(calls: int, env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    if not env_extra:
        env.pop("NUMBA_THREADING_LAYER", None)
    done = subprocess.run([sys.executable, "-m", "tests.test_soak", str(calls)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# The default layer (tbb, installed with the test extra) takes the full soak; the
# workqueue layer, where fastpool serialises launches behind a lock, a shorter one.
LAYERS = {"default": ({}, CALLS, "tbb"),
          "workqueue": ({"NUMBA_THREADING_LAYER": "workqueue"}, CALLS // 6, "workqueue")}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(LAYERS))
def test_soak_threads_bit_identical_flat_memory_bounded_caches(config):
    env_extra, calls, layer = LAYERS[config]
    figures = _run_soak(calls, env_extra)
    print(json.dumps(figures, indent=1))  # the figures, with pytest -s or on failure
    assert figures["layer"] == layer
    assert figures["calls"] == calls - calls % THREADS and figures["threads"] == THREADS
    assert not figures["errors"], figures["errors"]
    assert not figures["mismatches"], f"recipes whose threaded results differ: " \
                                      f"{figures['mismatches']}"
    assert figures["signatures_end"] == figures["signatures_warm"], "kernels recompiled"
    growth = figures["rss_end"] / figures["rss_warm"] - 1
    assert growth <= RSS_TOLERANCE, (
        f"RSS grew {growth:.1%} after warm-up: {figures['rss_warm'] >> 20} MiB -> "
        f"{figures['rss_end'] >> 20} MiB")
    for name, (size, bound) in figures["caches_end"].items():
        assert bound is None or size <= bound, f"{name}: {size} entries, bound {bound}"
    # The sliding-table cache was full and evicting while the threads ran.
    assert figures["caches_end"]["_params._sliding_table"][0] == TABLE_CACHE_BOUND
    assert figures["table_cache_misses"]["_sliding_table"] > 2 * TABLE_CACHE_BOUND
    # Live tables: those the two table caches and the plans hold, plus a few in flight
    # or in recipes.
    assert figures["caches_end"]["live WindowTable objects"][0] <= \
        2 * TABLE_CACHE_BOUND + PLAN_CACHE_BOUND + 64


# --------------------------------------------------------------------------
# Each cache, fed more distinct keys than its bound (in this process)
# --------------------------------------------------------------------------


def test_cache_bounds_match_the_code():
    assert _params._sliding_table.cache_info().maxsize == TABLE_CACHE_BOUND
    assert _params.adaptive_table.cache_info().maxsize == TABLE_CACHE_BOUND
    assert _dispatch.PLANS.size == PLAN_CACHE_BOUND


def test_table_caches_stay_bounded_under_new_shapes():
    """A server pooling ever new input shapes: more shapes than the bound."""
    before = {name: size for name, (size, _) in cache_sizes().items()}
    x = np.zeros(TABLE_CACHE_BOUND + 40, np.float32)
    for n in range(4, TABLE_CACHE_BOUND + 40):
        row = x[:n].reshape(1, 1, n)
        fastpool.avg_pool1d(row, 3, 2)
        fastpool.adaptive_avg_pool1d(row, 3)
        fastpool.max_pool1d_backward(*_max_and_grad(row), row.shape, kernel_size=2,
                                     channels_last=False)
    sizes = cache_sizes()
    for name in ("_params._sliding_table", "_params.adaptive_table"):
        size, bound = sizes[name]
        assert size == bound == TABLE_CACHE_BOUND, (name, size, bound)
    assert sizes["_dispatch.PLANS"][0] == PLAN_CACHE_BOUND
    assert sizes["WindowTable._covering (most in one table)"][0] <= 1
    gc.collect()
    assert len([o for o in gc.get_objects() if type(o) is _params.WindowTable]) <= \
        2 * TABLE_CACHE_BOUND + PLAN_CACHE_BOUND + before["live WindowTable objects"]


def _max_and_grad(row):
    out, indices = fastpool.max_pool1d(row, 2, return_indices=True)
    return np.ones_like(out), indices


def test_argument_caches_stay_bounded_under_new_arguments():
    """More distinct argument sets than the bound: the spec caches stop growing."""
    row = np.zeros((1, 1, 4), np.float32)
    for stride in range(1, WINDOW_SPECS_BOUND + 50):
        fastpool.max_pool1d(row, 1, stride)
        fastpool.lp_pool1d(row, 2, 1, stride)
    assert len(_params._WINDOWS) <= WINDOW_SPECS_BOUND
    assert len(_dispatch._SLIDING_OPS) <= WINDOW_SPECS_BOUND
    # Past the bound, specs are validated afresh and results are unchanged.
    assert fastpool.max_pool1d(row + 1, 1, WINDOW_SPECS_BOUND + 100).tolist() == [[[1.0]]]


if __name__ == "__main__":
    print(json.dumps(soak(int(sys.argv[1]) if len(sys.argv) > 1 else CALLS)))
