"""The dispatch layer's plan cache and the CPU back end's serial kernel path.

A repeated call reuses its plan (validated parameters, window table, kernel and
its arguments) and must give what the first call gave; a call that differs in
anything a plan depends on must get its own plan; bad input must fail every
time, as it does with no plans cached; small calls run the kernels serially,
which must agree with their parallel launches bit for bit.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from numba import njit, types
from numpy.testing import assert_array_equal

import fastpool
from fastpool import _dispatch
from fastpool._params import ConvWindow, Layout
from fastpool.cpu import kernels, runtime, tasks
from tests.conftest import run_on_disk_cache

RNG = np.random.default_rng(7)
X = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
X_CL = np.ascontiguousarray(X.transpose(0, 2, 3, 1))
X3 = RNG.standard_normal((2, 3, 5, 6, 7))
X_U8 = RNG.integers(0, 255, (2, 3, 9, 8)).astype(np.uint8)
X_BOOL = RNG.random((1, 2, 6, 6)) < 0.3
OUT, IDX = fastpool.max_pool2d(X, 3, 2, 1, return_indices=True)
GRAD = RNG.standard_normal(OUT.shape).astype(np.float32)
OUT_CL, IDX_CL = fastpool.max_pool2d(X_CL, 2, return_indices=True, channels_last=True)
GRAD_CL = RNG.standard_normal(OUT_CL.shape).astype(np.float32)
GRAD_AVG = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
_, IDX_ADAPTIVE = fastpool.adaptive_max_pool2d(X, 3, True)
_, IDX_GLOBAL = fastpool.global_max_pool2d(X, False, True)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)
GRAD_CONV = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
GRAD_CONV_CL = np.ascontiguousarray(GRAD_CONV.transpose(0, 2, 3, 1))

# One call per plan family, layout and path through the dispatch layer.
CALLS = {
    "max": lambda: fastpool.max_pool2d(X, 2),
    "max-indices": lambda: fastpool.max_pool2d(X, 3, 2, 1, return_indices=True),
    "max-cl": lambda: fastpool.max_pool2d(X_CL, 2, channels_last=True),
    "max-3d": lambda: fastpool.max_pool3d(X3, 2, 1, dilation=2, ceil_mode=True),
    "min-u8": lambda: fastpool.min_pool2d(X_U8, 3, 2, 1, return_indices=True),
    "max-bool": lambda: fastpool.max_pool2d(X_BOOL, 2),
    "max-list-args": lambda: fastpool.max_pool2d(X, [3, 3], [2, 1], [1, 0]),
    "max-numpy-ints": lambda: fastpool.max_pool2d(X, np.int64(2), (np.int32(2), 1)),
    "avg": lambda: fastpool.avg_pool2d(X, 2),
    "avg-cl": lambda: fastpool.avg_pool2d(X_CL, 3, 2, 1, count_include_pad=False,
                                          channels_last=True),
    "avg-same": lambda: fastpool.avg_pool2d(X, 3, 2, "same"),
    "avg-divisor": lambda: fastpool.avg_pool3d(X3, 2, divisor_override=3),
    "lp": lambda: fastpool.lp_pool2d(np.abs(X), 2, 3, 2),
    "lp-inf": lambda: fastpool.lp_pool2d(X, float("inf"), 2),
    "adaptive-avg": lambda: fastpool.adaptive_avg_pool2d(X, 1),
    "adaptive-avg-cl": lambda: fastpool.adaptive_avg_pool2d(X_CL, (3, None),
                                                            channels_last=True),
    "adaptive-max": lambda: fastpool.adaptive_max_pool2d(X, 3, True),
    "global-max": lambda: fastpool.global_max_pool2d(X, False, True),
    "global-avg-keepdims": lambda: fastpool.global_avg_pool3d(X3, True),
    "unbatched": lambda: fastpool.max_pool2d(X[0], 2),
    "empty": lambda: fastpool.max_pool2d(X[:0], 2, return_indices=True),
    "reference": lambda: fastpool.avg_pool2d(X, 3, 1, 1, backend="numpy"),
    "max-backward": lambda: fastpool.max_pool2d_backward(GRAD, IDX, X.shape),
    "max-backward-window": lambda: fastpool.max_pool2d_backward(
        GRAD, IDX, X.shape, kernel_size=3, stride=2, padding=1),
    "max-backward-cl": lambda: fastpool.max_pool2d_backward(GRAD_CL, IDX_CL, X_CL.shape,
                                                            channels_last=True),
    "adaptive-max-backward": lambda: fastpool.adaptive_max_pool2d_backward(
        np.ones(IDX_ADAPTIVE.shape), IDX_ADAPTIVE, X.shape),
    "global-max-backward": lambda: fastpool.global_max_pool2d_backward(
        np.ones(IDX_GLOBAL.shape, np.float32), IDX_GLOBAL, X.shape),
    "avg-backward": lambda: fastpool.avg_pool2d_backward(GRAD_AVG, X.shape, 2),
    "avg-backward-cl": lambda: fastpool.avg_pool2d_backward(
        GRAD_AVG.transpose(0, 2, 3, 1).copy(), X_CL.shape, 2, channels_last=True),
    "lp-backward": lambda: fastpool.lp_pool2d_backward(GRAD_AVG, np.abs(X), 2, 2),
    "lp-inf-backward": lambda: fastpool.lp_pool2d_backward(GRAD_AVG, X, float("inf"), 2),
    "adaptive-avg-backward": lambda: fastpool.adaptive_avg_pool2d_backward(
        np.ones((2, 3, 3, 3)), X.shape),
    "global-avg-backward": lambda: fastpool.global_avg_pool2d_backward(
        np.ones((2, 3), np.float32), X.shape),
    "conv": lambda: fastpool.strided_conv2d(X, W, 2, 1),
    "conv-cl-bias": lambda: fastpool.strided_conv2d(X_CL, W, 2, 1, BIAS, channels_last=True),
    "conv-plain-1d": lambda: fastpool.strided_conv1d(X[0, 0, 0], W[0, 0, 0], 2),
    "conv-reference-cl": lambda: fastpool.strided_conv2d(X_CL, W, 2, 1, channels_last=True,
                                                         backend="numpy"),
    "conv-backward": lambda: fastpool.strided_conv2d_backward(GRAD_CONV, X, W, 2, 1),
    "conv-backward-cl": lambda: fastpool.strided_conv2d_backward(GRAD_CONV_CL, X_CL, W, 2, 1,
                                                                 channels_last=True),
}


def _arrays(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def assert_same(got, want):
    got, want = _arrays(got), _arrays(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_array_equal(g, w)


def test_repeated_calls_reuse_their_plan_and_match_the_first(monkeypatch):
    first = {name: call() for name, call in CALLS.items()}
    assert len(_dispatch.PLANS) == len(CALLS)
    # A hit validates nothing: count the layout checks, which every build makes.
    layouts = []
    real_layout, real_window = Layout.of, ConvWindow.from_args
    monkeypatch.setattr(Layout, "of",
                        lambda *args, **kw: layouts.append(args) or real_layout(*args, **kw))
    monkeypatch.setattr(ConvWindow, "from_args",  # the convolutions' first check
                        lambda *args: layouts.append(args) or real_window(*args))
    for _ in range(3):
        for name, call in CALLS.items():
            assert_same(call(), first[name])
    assert layouts == [] and len(_dispatch.PLANS) == len(CALLS)
    # And the first results are the unplanned ones: the NumPy reference agrees.
    assert_same(fastpool.max_pool2d(X, 3, 2, 1, return_indices=True, backend="numpy"),
                first["max-indices"])


def test_a_call_that_differs_in_anything_gets_its_own_plan():
    want = fastpool.max_pool2d(X, 2)
    variants = {
        "shape": (lambda: fastpool.max_pool2d(X[:, :, :6], 2), X[:, :, :6], {}),
        "dtype": (lambda: fastpool.max_pool2d(X.astype(np.float64), 2),
                  X.astype(np.float64), {}),
        "byte order": (lambda: fastpool.max_pool2d(X.astype(">f4"), 2), X.astype(">f4"), {}),
        "layout": (lambda: fastpool.max_pool2d(X, 2, channels_last=True), X,
                   {"channels_last": True}),
        "kernel": (lambda: fastpool.max_pool2d(X, 3), X, {"kernel_size": 3}),
        "stride": (lambda: fastpool.max_pool2d(X, 2, 1), X, {"stride": 1}),
        "indices": (lambda: fastpool.max_pool2d(X, 2, return_indices=True), X,
                    {"return_indices": True}),
        "ceil": (lambda: fastpool.max_pool2d(X[..., :7], 2, ceil_mode=True), X[..., :7],
                 {"ceil_mode": True}),
        "back end": (lambda: fastpool.max_pool2d(X, 2, backend="numpy"), X, {}),
    }
    for name, (call, x, kw) in variants.items():
        reference = fastpool.max_pool2d(x, kw.pop("kernel_size", 2), backend="numpy", **kw)
        for _ in range(2):
            assert_same(call(), reference)
    assert_same(fastpool.max_pool2d(X, 2), want)
    # A non-contiguous view of the same shape and dtype shares the plan, and is copied.
    view = np.asfortranarray(X)
    assert_same(fastpool.max_pool2d(view, 2), want)


@pytest.mark.skipif(fastpool.get_num_threads() == 1, reason="one thread only")
def test_parallel_plans_follow_the_thread_count():
    x = RNG.standard_normal((8, 16, 40, 40)).astype(np.float32)  # parallel-sized
    threads = fastpool.get_num_threads()
    want = fastpool.avg_pool2d(x, 3, 2, 1)
    small = fastpool.avg_pool2d(X, 3, 2, 1)
    plans = _dispatch.PLANS.plans()
    assert sorted(plan.threads or 0 for plan in plans) == [0, threads]
    try:
        fastpool.set_num_threads(1)
        assert_same(fastpool.avg_pool2d(x, 3, 2, 1), want)
        assert_same(fastpool.avg_pool2d(X, 3, 2, 1), small)
        # The parallel plan was made afresh for one thread; the serial one kept.
        assert sorted(plan.threads or 0 for plan in _dispatch.PLANS.plans()) == [0, 1]
        assert [p for p in _dispatch.PLANS.plans() if not p.threads] == \
            [p for p in plans if not p.threads]
    finally:
        fastpool.set_num_threads(None)


BAD_AFTER_GOOD = [
    # (good call, bad call of the same op, error, message)
    (lambda: fastpool.max_pool2d(X, 2), lambda: fastpool.max_pool2d(X, 2.0),
     TypeError, "kernel_size"),
    (lambda: fastpool.max_pool2d(X, 1), lambda: fastpool.max_pool2d(X, True),
     TypeError, "kernel_size"),
    (lambda: fastpool.max_pool2d(X, (2, 2)), lambda: fastpool.max_pool2d(X, (2.0, 2)),
     TypeError, "kernel_size"),
    (lambda: fastpool.max_pool2d(X, 2, channels_last=True),
     lambda: fastpool.max_pool2d(X, 2, channels_last=1), TypeError, "channels_last"),
    (lambda: fastpool.max_pool2d(X, 2, np.int64(2)),
     lambda: fastpool.max_pool2d(X, 2, np.float64(2)), TypeError, "stride"),
    (lambda: fastpool.max_pool2d(X, 2, return_indices=np.True_),
     lambda: fastpool.max_pool2d(X, 2, return_indices=np.int8(1)), TypeError,
     "return_indices"),
    (lambda: fastpool.max_pool2d(X, 2), lambda: fastpool.max_pool2d(X[:, :, :1], 2),
     ValueError, "too small"),
    (lambda: fastpool.max_pool2d(X, 2), lambda: fastpool.max_pool2d(X[None], 2),
     ValueError, "expected a 3-D or 4-D input"),
    (lambda: fastpool.avg_pool2d(X, 2), lambda: fastpool.avg_pool2d(X_U8, 2),
     TypeError, "dtype uint8"),
    (lambda: fastpool.avg_pool2d(X, 2), lambda: fastpool.avg_pool2d(X, 2, backend="gpu"),
     ValueError, "backend"),
    (lambda: fastpool.avg_pool2d(X, 2), lambda: fastpool.avg_pool2d(X, 2, stream="s"),
     ValueError, "stream"),
    (lambda: fastpool.avg_pool2d(X, 2), lambda: fastpool.avg_pool2d(X, 2, divisor_override=0),
     ValueError, "divisor_override"),
    (lambda: fastpool.adaptive_avg_pool2d(X, 1), lambda: fastpool.adaptive_avg_pool2d(X, 0),
     ValueError, "output_size"),
    (lambda: fastpool.global_avg_pool2d(X), lambda: fastpool.global_avg_pool2d(X, 1),
     TypeError, "keepdims"),
    (lambda: fastpool.max_pool2d_backward(GRAD, IDX, X.shape),
     lambda: fastpool.max_pool2d_backward(GRAD, IDX.astype(np.int32), X.shape),
     ValueError, "int64"),
    (lambda: fastpool.max_pool2d_backward(GRAD, IDX, X.shape),
     lambda: fastpool.max_pool2d_backward(GRAD, IDX, (2, 4, 8, 8)), ValueError, "not fit"),
    # Indices outside the plane: a check of values, made on every call.
    (lambda: fastpool.max_pool2d_backward(GRAD, IDX, X.shape),
     lambda: fastpool.max_pool2d_backward(GRAD, IDX + 64, X.shape), ValueError, "outside"),
    (lambda: fastpool.max_pool2d_backward(GRAD_CL, IDX_CL, X_CL.shape, channels_last=True),
     lambda: fastpool.max_pool2d_backward(GRAD_CL, IDX_CL - 1, X_CL.shape,
                                          channels_last=True), ValueError, "outside"),
    (lambda: fastpool.avg_pool2d_backward(GRAD_AVG, X.shape, 2),
     lambda: fastpool.avg_pool2d_backward(GRAD_AVG, X.shape, 3), ValueError, "grad_output"),
    (lambda: fastpool.strided_conv2d(X, W, 2, 1),
     lambda: fastpool.strided_conv2d(X, W[:, :2], 2, 1), ValueError, "input channels"),
    (lambda: fastpool.strided_conv2d(X, W, 2, 1),
     lambda: fastpool.strided_conv2d(X, W.astype(np.float64), 2, 1), TypeError, "dtype"),
    (lambda: fastpool.strided_conv2d(X, W, 2, 1, BIAS),
     lambda: fastpool.strided_conv2d(X, W, 2, 1, BIAS[:3]), ValueError, "bias"),
    (lambda: fastpool.strided_conv2d_backward(GRAD_CONV, X, W, 2, 1),
     lambda: fastpool.strided_conv2d_backward(GRAD_CONV, X, W, 1, 1), ValueError,
     "grad_output"),
]


@pytest.mark.parametrize("good, bad, error, pattern", BAD_AFTER_GOOD,
                         ids=[f"bad-{i}" for i in range(len(BAD_AFTER_GOOD))])
def test_bad_input_after_good_input_still_raises(good, bad, error, pattern):
    with pytest.raises(error, match=pattern) as uncached:
        bad()  # nothing cached yet: the message as it always was
    good()
    good()
    for _ in range(2):
        with pytest.raises(error, match=pattern) as cached:
            bad()
        assert str(cached.value) == str(uncached.value)
    good()


def test_list_arguments_are_cached_and_unhashable_ones_are_not():
    want = fastpool.max_pool2d(X, 2, padding=((0, 0), (1, 1)), backend="numpy")
    before = len(_dispatch.PLANS)
    for _ in range(2):
        assert_same(fastpool.max_pool2d(X, 2, padding=[[0, 0], [1, 1]]), want)
    with pytest.raises(TypeError, match="kernel_size"):
        fastpool.max_pool2d(X, {2: 2})
    assert len(_dispatch.PLANS) == before + 1  # the list of lists keys fine; the dict not


def test_the_cache_keeps_recently_used_plans_within_its_bound(monkeypatch):
    monkeypatch.setattr(_dispatch.PLANS, "size", 4)
    rows = [np.zeros((1, 1, n), np.float32) for n in range(2, 9)]
    fastpool.max_pool1d(rows[0], 1)
    for row in rows[1:]:
        fastpool.max_pool1d(row, 1)
        fastpool.max_pool1d(rows[0], 1)  # used after every store: never evicted
        assert len(_dispatch.PLANS) <= 4
    builds = []  # every build checks the layout; a hit checks nothing
    real_layout = Layout.of
    monkeypatch.setattr(Layout, "of",
                        lambda *args, **kw: builds.append(args) or real_layout(*args, **kw))
    for row in (rows[0], *rows[-3:]):  # the used plan and the latest stores stay
        fastpool.max_pool1d(row, 1)
    assert builds == []
    fastpool.max_pool1d(rows[1], 1)  # an early store, never used again: evicted
    assert builds and len(_dispatch.PLANS) == 4


def test_the_cache_evicts_the_oldest_unused_plan():
    cache = _dispatch.PlanCache(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A" and cache.get("c") == "C" and cache.get("z") is None
    cache.put("d", "D")  # b, the one plan not used since stored, goes
    assert cache.get("b") is None and len(cache) == 3
    for key in "acd":
        assert cache.get(key) == key.upper()
    # Every plan used: each is spared once, then the oldest of them goes, never the
    # one just stored.
    cache.put("e", "E")
    assert sorted(cache.entries) == ["a", "d", "e"]
    assert [cache.get(key) for key in "ade"] == ["A", "D", "E"]
    cache.clear()
    assert len(cache) == 0 and cache.plans() == []


def test_cached_tables_are_read_only():
    table = _dispatch._SlidingOp.from_args("t", "avg", 2, 3, 2, 1, 1, False).table(
        Layout.of((1, 1, 9, 9), 2, False, "t", True))
    first, last = table.covering_outputs((1, 9, 9))
    for array in (table.start, table.stop, table.step, table.divisor, table.interior, first,
                  last):
        assert not array.flags.writeable


def test_threads_share_the_cache_while_it_evicts(monkeypatch):
    monkeypatch.setattr(_dispatch.PLANS, "size", 6)  # fewer plans than the calls need
    calls = list(CALLS.values())
    expected = [call() for call in calls]
    failures, errors = [], []

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(calls) * 4) % len(calls)
        try:
            for k in order:
                result = calls[k]()
                if not all(np.array_equal(a, b, equal_nan=True)
                           for a, b in zip(_arrays(result), _arrays(expected[k]))):
                    failures.append(k)
                with pytest.raises(TypeError, match="kernel_size"):
                    fastpool.max_pool2d(X, 2.0)
        except BaseException as error:
            errors.append(repr(error))

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors and not failures
    assert len(_dispatch.PLANS) <= 6


# --------------------------------------------------------------------------
# The serial path
# --------------------------------------------------------------------------


def _every_cpu_op():
    """Results of calls that reach every CPU kernel (moderate sizes, channels-first and
    -last, separable and direct, scatter and gather)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 13, 12)).astype(np.float32)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    wide_cl = rng.standard_normal((2, 7, 6, 40))  # >= 32 channels: the gathering backward
    x3 = rng.standard_normal((2, 2, 5, 6, 7))
    results = {}
    for name, inp, kw in (("cf", x, {}), ("cl", x_cl, {"channels_last": True})):
        out, idx = fastpool.max_pool2d(inp, 3, 2, 1, return_indices=True, **kw)
        results[f"max-{name}"] = (out, idx)
        results[f"max-values-{name}"] = fastpool.max_pool2d(inp, 3, 2, 1, **kw)
        results[f"separable-max-{name}"] = fastpool.max_pool2d(inp, 5, 1, 2,
                                                               return_indices=True, **kw)
        results[f"separable-avg-{name}"] = fastpool.avg_pool2d(inp, 5, 1, 2, **kw)
        results[f"avg-{name}"] = fastpool.avg_pool2d(inp, 3, 2, 1, ceil_mode=True, **kw)
        results[f"lp-{name}"] = fastpool.lp_pool2d(np.abs(inp), 2.5, 3, 2, **kw)
        results[f"adaptive-{name}"] = fastpool.adaptive_max_pool2d(inp, (4, 5), True, **kw)
        results[f"global-{name}"] = (fastpool.global_avg_pool2d(inp, **kw),
                                     *fastpool.global_max_pool2d(inp, False, True, **kw))
        grad = rng.standard_normal(out.shape).astype(np.float32)
        results[f"max-backward-{name}"] = fastpool.max_pool2d_backward(grad, idx, inp.shape,
                                                                       **kw)
        results[f"avg-backward-{name}"] = fastpool.avg_pool2d_backward(grad, inp.shape, 3, 2,
                                                                       1, **kw)
        lp_grad = rng.standard_normal(results[f"lp-{name}"].shape).astype(np.float32)
        results[f"lp-backward-{name}"] = fastpool.lp_pool2d_backward(lp_grad, np.abs(inp), 2.0,
                                                                     3, 2, **kw)
        results[f"global-backward-{name}"] = fastpool.global_avg_pool2d_backward(
            np.ones(inp.shape[:2] if name == "cf" else inp.shape[::3], np.float32),
            inp.shape, **kw)
        results[f"unpool-{name}"] = fastpool.max_unpool2d(out, idx, 3, 2, 1, (13, 12), **kw)
        results[f"unpool-backward-{name}"] = fastpool.max_unpool2d_backward(
            results[f"unpool-{name}"], idx, **kw)
    out, idx = fastpool.max_pool2d(wide_cl, 2, return_indices=True, channels_last=True)
    results["gather-backward"] = fastpool.max_pool2d_backward(
        out, idx, wide_cl.shape, kernel_size=2, channels_last=True)
    results["avg-3d"] = fastpool.avg_pool3d(x3, 2, 1, 1, count_include_pad=False)
    results["fractional"] = fastpool.fractional_max_pool2d(x, 2, (5, 6), return_indices=True,
                                                           seed=1)
    weight = rng.standard_normal((3, 5, 3, 3)).astype(np.float32)
    results["conv"] = fastpool.strided_conv2d(x, weight, 2, 1)
    results["conv-backward"] = fastpool.strided_conv2d_backward(
        np.ones_like(results["conv"]), x, weight, 2, 1)
    return results


def test_serial_launches_agree_with_the_parallel_ones(monkeypatch):
    monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 0)  # every launch parallel
    _dispatch.PLANS.clear()
    parallel = _every_cpu_op()
    monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 2**62)  # every launch serial
    _dispatch.PLANS.clear()
    serial = _every_cpu_op()
    for name in parallel:
        assert_same(serial[name], parallel[name])
    # One parallel=False build per kernel serves both launches: a parallel launch
    # runs it through its address from a launcher shared by the kernels, which hands
    # numba's threading layer a loop over the shares (no prange loop compiled).
    kernel = kernels.max_pool_channels_first(kernels.NO_SWEEP)
    assert kernels.max_pool_channels_first(kernels.NO_SWEEP) is kernel
    launched = [kernel for kernel in tasks.task_kernels() if kernel._addresses]
    assert len(launched) >= 20
    for kernel in launched:
        body, launcher = kernel.dispatchers()
        assert body.targetoptions["parallel"] is False
        assert launcher.targetoptions["parallel"] is False
        assert body.signatures and launcher.signatures


def test_serial_launches_need_no_threading_layer():
    # A fresh interpreter whose calls are all small starts no numba threads.
    code = ("import numpy as np, fastpool\n"
            "from numba.np.ufunc import parallel\n"
            "x = np.ones((1, 4, 8, 8), np.float32)\n"
            "fastpool.max_pool2d(x, 2); fastpool.avg_pool2d_backward(x[..., ::2, ::2], "
            "x.shape, 2)\n"
            "print(parallel._is_initialized)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split()[-1] == "False"


@pytest.mark.parametrize("layer, serial", [("workqueue", True), ("tbb", False)])
def test_medium_calls_run_serially_on_workqueue(layer, serial):
    # workqueue wakes its threads for 57 us a launch (tbb: 3 us): a call of 200
    # thousand reads runs faster serially there, in parallel on tbb.
    code = ("import numpy as np, fastpool, numba\n"
            "from numba.np.ufunc import parallel\n"
            "fastpool.avg_pool2d(np.ones((1, 64, 56, 56), np.float32), 2)\n"
            "print(parallel._is_initialized)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "NUMBA_THREADING_LAYER": layer})
    assert done.stdout.split()[-1] == str(not serial)


DISK_CACHE_SCRIPT = """
import json, numpy as np, fastpool
from fastpool.cpu import kernels
fastpool.max_pool2d(np.ones((1, 1, 2, 64), np.float32), 2)  # serial (rows of 32 outputs)
fastpool.max_pool2d(np.ones((4, 8, 64, 64), np.float32), 2)  # parallel
kernel = kernels.max_pool_channels_first((2, 2))  # the build for 2x2 windows, stride 2
builds = dict(zip(["kernel", "launcher"], kernel.dispatchers()))
print(json.dumps({name: [sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()),
                         k.targetoptions["parallel"]] for name, k in builds.items()}))
"""


@pytest.mark.slow
def test_kernel_and_launcher_have_their_own_disk_cache_entries(tmp_path):
    def run():
        return run_on_disk_cache(DISK_CACHE_SCRIPT, tmp_path)

    # The serial launch compiled the kernel; the parallel one, its launcher only.
    cold = run()
    assert cold == {"kernel": [0, 1, False], "launcher": [0, 1, False]}, cold
    indexes = sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")
                     if "max_pool_channels_first" in p.name or "tasks._" in p.name)
    assert indexes == ["kernels.max_pool_channels_first.locals.max_pool_channels_first",
                       "tasks._launch"], indexes
    warm = run()  # each loads its own machine code, compiling nothing
    assert warm == {"kernel": [1, 0, False], "launcher": [1, 0, False]}, warm


def test_work_estimates_take_empty_operands():
    x = np.ones((1, 2, 5, 5), np.float32)
    assert fastpool.strided_conv2d(x, np.ones((0, 2, 3, 3), np.float32), 1).shape == \
        (1, 0, 3, 3)
    assert fastpool.max_pool2d(np.ones((0, 2, 4, 4)), 2).shape == (0, 2, 2, 2)


BUILDS_SCRIPT = """
import json, numpy as np, fastpool
from fastpool import _dispatch
from fastpool.cpu import runtime
x = np.random.default_rng(0).standard_normal((2, 3, 9, 40)).astype(np.float32)
calls = {{"3x3": lambda: fastpool.max_pool2d(x, 3, 2, 1),
          "2x2": lambda: fastpool.max_pool2d(x, 2, 2)}}
runtime.SERIAL_WORK_LIMIT = 2**62  # serial calls: the builds load, found by numba itself
for name in {names!r}:
    calls[name]()
runtime.SERIAL_WORK_LIMIT = 0  # parallel launches: each kernel found by its symbol
_dispatch.PLANS.clear()
print(json.dumps({{name: calls[name]().tolist() for name in {names!r}}}))
"""


@pytest.mark.slow
def test_builds_compiled_by_two_processes_run_their_own_code(tmp_path):
    """Two builds of one kernel (the 3x3 and 2x2 sweeps), each compiled by a process
    of its own, then both loaded from the disk cache by a third before it launches
    either in parallel: numba numbered them alike, and the third process ran one
    build's code for both (wrong maxima) until each build's name carried its
    constants."""
    first = run_on_disk_cache(BUILDS_SCRIPT.format(names=["3x3"]), tmp_path)
    second = run_on_disk_cache(BUILDS_SCRIPT.format(names=["2x2"]), tmp_path)
    both = run_on_disk_cache(BUILDS_SCRIPT.format(names=["3x3", "2x2"]), tmp_path)
    assert both == {**first, **second}


@njit
def _only_without_power(x):
    return x + 1.0


@njit
def _only_with_power(x):
    return x + 2.0


def _optional_power(part, parts, x, out, power):
    for i in range(*tasks.share(x.size, part, parts)):
        if power is None:
            out[i] = _only_without_power(x[i])
        else:
            out[i] = _only_with_power(x[i]) * power


def _optional_power_kernel_run_with_power():
    """A task kernel of _optional_power compiled without the disk cache (which would
    load its helpers' code), run serially with a power: (kernel, x, out)."""
    kernel = tasks.parallel_kernel(_optional_power)
    kernel.body = njit(**{**tasks.KERNEL_JIT_OPTIONS, "cache": False})(_optional_power)
    x, out = np.arange(4.0), np.empty(4)
    kernel.serial(x, out, 3.0)
    np.testing.assert_array_equal(out, (x + 2.0) * 3.0)
    return kernel, x, out


def test_kernel_builds_compile_only_the_branches_their_none_arguments_reach():
    # numba decides ``power is None`` before typing only where power *is* None: a
    # build with power given typed and compiled the other branch's helper too.
    kernel, x, out = _optional_power_kernel_run_with_power()
    assert _only_with_power.signatures and not _only_without_power.signatures
    kernel.run_shares(2, (x, out, None))
    np.testing.assert_array_equal(out, x + 1.0)


def test_kernels_and_their_helpers_run_llvm_function_passes_at_o1():
    # tasks._LightlyPreoptimisedLibrary: the kernels' compiler lowers into it (a numba
    # change in how lowering makes its library would silently undo it).
    kernel, x, out = _optional_power_kernel_run_with_power()
    helper = njit(**{**tasks.HELPER_JIT_OPTIONS, "cache": False})(_only_with_power.py_func)
    helper.compile((types.float64,))
    for dispatcher in (kernel.body, helper):
        (compiled,) = dispatcher.overloads.values()
        assert isinstance(compiled.library, tasks._LightlyPreoptimisedLibrary)


@tasks.parallel_kernel(counts=True)
def _scratch_size(part, parts, length):
    values = tasks.scratch(length, np.float64)
    values[:] = 1.0
    return int(values.sum())


@tasks.parallel_kernel(counts=True)
def _scratch_in_c_order(part, parts, shape):
    """How many values of a scratch of ``shape``, written by index, lie where C order
    puts them."""
    values = tasks.scratch(shape, np.int64)
    a, b, c = values.shape
    for i in range(a):
        for j in range(b):
            for k in range(c):
                values[i, j, k] = (i * b + j) * c + k
    flat, found = values.reshape(-1), 0
    for at in range(flat.size):
        found += flat[at] == at
    return found


def test_scratch_allocates_as_np_empty_and_refuses_negative_sizes():
    assert _scratch_size.serial(3) == 3
    assert _scratch_size.serial(0) == 0
    with pytest.raises(RuntimeError, match="_scratch_size raised"):
        _scratch_size.serial(-1)
    with pytest.raises(RuntimeError, match="_scratch_size raised"):  # bytes overflow
        _scratch_size.serial(2**61)
    assert _scratch_in_c_order.serial((3, 4, 5)) == 60
    assert _scratch_in_c_order.serial((2, 0, 7)) == 0
    assert _scratch_scalar.serial(2.5) == 5
    assert _zeroed_sum.serial((3, 4)) == 0 and _zeroed_sum.serial(5) == 0


@tasks.parallel_kernel(counts=True)
def _zeroed_sum(part, parts, shape):
    """The sum of a zeroed scratch of ``shape`` (after dirtying the allocator)."""
    dirty = tasks.scratch(64, np.float64)
    for i in range(64):
        dirty[i] = 1.0
    values = tasks.reshaped(tasks.zeroed(shape, np.float64), -1)
    total = 0.0
    for i in range(values.size):
        total += values[i]
    return int(total)


@tasks.parallel_kernel(counts=True)
def _scratch_scalar(part, parts, value):
    """A 0-d scratch holds one value."""
    held = tasks.scratch((), np.float64)
    held[()] = value
    return int(held[()] * 2)


@tasks.parallel_kernel(counts=True)
def _reshaped_views(part, parts, x, columns, out):
    """``out``: ``x`` (2-D) viewed as ``(-1, columns)`` then flat, written through the
    views; counts the elements the flat view sees where NumPy's reshape puts them."""
    rows = tasks.reshaped(x, (-1, columns))
    flat, found = tasks.reshaped(rows, -1), 0
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            found += flat[i * columns + j] == rows[i, j]
            out[i, j] = rows[i, j] + 1
    return found + 1000 * rows.shape[0]


def test_reshaped_views_as_numpy_and_refuses_sizes_that_do_not_match():
    x = np.arange(24.0).reshape(4, 6)
    out = np.zeros((8, 3))
    assert _reshaped_views.serial(x, 3, out) == 8000 + 24
    assert_array_equal(out, x.reshape(-1, 3) + 1)
    for columns in (5, 0, -1):  # 24 is no multiple of 5; no -1 twice, no size 0
        with pytest.raises(RuntimeError, match="_reshaped_views raised"):
            _reshaped_views.serial(x, columns, out)


@tasks.parallel_kernel(counts=True)
def _count_or_raise(part, parts, x, fail):
    """Counts its share's tasks; raises (numba's status) in share ``fail``."""
    first, last = tasks.share(x.size, part, parts)
    if part == fail:
        raise ValueError("share failed")
    return last - first


@pytest.mark.parametrize("through", ["launch layer", "parallel_for"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_parallel_launches_sum_the_shares_and_report_kernels_that_raised(parts, through,
                                                                         monkeypatch):
    # On tbb a launch runs its shares as tasks of numba's task group; a child forked
    # from a tbb process through parallel_for: both sum and report alike.
    parallel_for, layer = tasks._layer_entry_points()
    if through == "parallel_for":
        monkeypatch.setattr(tasks, "_entry_points", (parallel_for, parallel_for))
    _sum_the_shares_and_report_kernels_that_raised(parts)


def test_launchers_skip_the_module_passes_and_still_launch(monkeypatch):
    # tasks._LauncherLibrary: the launchers' compiler lowers into it.
    launcher = njit(**{**tasks._LAUNCHER_JIT_OPTIONS, "cache": False})(
        tasks._launch_counting.py_func)
    monkeypatch.setattr(_count_or_raise, "_launcher", launcher)
    _sum_the_shares_and_report_kernels_that_raised(2)
    (compiled,) = launcher.overloads.values()
    assert isinstance(compiled.library, tasks._LauncherLibrary)


def _sum_the_shares_and_report_kernels_that_raised(parts):
    x = np.empty(10)
    assert _count_or_raise.run_shares(parts, (x, -1)) == 10
    with pytest.raises(RuntimeError, match="_count_or_raise raised in 1 of its"):
        _count_or_raise.run_shares(parts, (x, parts - 1))
    no_tasks = np.empty(0)
    assert _count_or_raise.run_shares(parts, (no_tasks, -1)) == 0
