"""The CUDA back end against the CPU back end (itself checked against torch).

Runs under numba's CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1 python -m
pytest tests/cuda``; the README's test command does this) and un-simulated on a
GPU (``FASTPOOL_TEST_CUDA=1 python -m pytest tests/cuda``).  The simulator runs
kernels as Python, so shapes are small and blocks are capped at 32 threads
(``FASTPOOL_CUDA_THREADS_PER_BLOCK``, set in conftest) so that inputs still span
several blocks.
"""

import numpy as np
import pytest
from numba import cuda
from numpy.testing import assert_allclose, assert_array_equal

import fastpool
import fastpool.cuda

ND_SIZES = {1: (9,), 2: (6, 7), 3: (4, 5, 5)}
TOL = {np.dtype(np.float16): dict(rtol=2e-3, atol=2e-3),
       np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
       np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13)}


def _input(nd, channels_last, dtype=np.float32, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    shape = (2, 3) + ND_SIZES[nd]
    x = rng.integers(-3, 4, shape) if ties else rng.standard_normal(shape)
    x = x.astype(dtype)
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x


def _host(result):
    if isinstance(result, tuple):
        return tuple(_host(r) for r in result)
    return result.copy_to_host() if hasattr(result, "copy_to_host") else result


def _compare(got, want, exact):
    got, want = _host(got), want
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            assert_array_equal(g, w)
        else:
            assert_allclose(g, w, **TOL[g.dtype])


def test_is_available_under_the_simulator_or_a_gpu():
    from fastpool._config import CUDA_MAX_THREADS_PER_BLOCK
    assert fastpool.cuda.is_available()
    assert CUDA_MAX_THREADS_PER_BLOCK == 32


FORWARD = [
    ("max_pool", (3, 2, 1), dict(return_indices=True), True),
    ("max_pool", (2, 1, 1, 2), dict(ceil_mode=True, return_indices=True), True),
    ("avg_pool", (3, 2, 1), dict(ceil_mode=True, count_include_pad=False), False),
    ("avg_pool", (2,), dict(divisor_override=3), False),
    ("lp_pool", (2, 2), dict(ceil_mode=True), False),
    ("lp_pool", (float("inf"), 2), {}, False),
    ("adaptive_max_pool", (3,), dict(return_indices=True), True),
    ("adaptive_avg_pool", (4,), {}, False),
    ("global_max_pool", (), dict(return_indices=True), True),
    ("global_avg_pool", (), dict(keepdims=True), False),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("op, args, kwargs, exact", FORWARD,
                         ids=[f"{f[0]}-{i}" for i, f in enumerate(FORWARD)])
def test_forward_matches_cpu(op, args, kwargs, exact, nd, channels_last):
    x = _input(nd, channels_last, ties=exact)
    function = getattr(fastpool, f"{op}{nd}d")
    want = function(x, *args, channels_last=channels_last, **kwargs)
    _compare(function(cuda.to_device(x), *args, channels_last=channels_last, **kwargs),
             want, exact)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.uint8, np.int32])
def test_dtypes(dtype):
    x = _input(2, False, dtype=np.float64, ties=True)
    x = (x + 3).astype(dtype)
    out = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True, backend="cuda")
    want = fastpool.max_pool2d(x.astype(np.float64), 3, 2, 1, return_indices=True)
    assert out[0].dtype == dtype
    assert_array_equal(out[0].astype(np.float64), want[0])
    assert_array_equal(out[1], want[1])
    if np.dtype(dtype).kind == "f":
        avg = fastpool.avg_pool2d(x, 3, 2, 1, backend="cuda")
        assert avg.dtype == dtype
        assert_allclose(avg, fastpool.avg_pool2d(x.astype(np.float64), 3, 2, 1),
                        **TOL[np.dtype(dtype)])


def test_nan_and_inf_follow_torch():
    x = _input(2, False, ties=True)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 2, 2] = np.inf
    x[1, 0, :2, :2] = -np.inf
    for op in ("max_pool2d", "avg_pool2d"):
        kwargs = dict(return_indices=True) if op == "max_pool2d" else {}
        _compare(getattr(fastpool, op)(x, 2, backend="cuda", **kwargs),
                 getattr(fastpool, op)(x, 2, **kwargs), exact=op == "max_pool2d")


@pytest.mark.parametrize("norm_type", [1.0, 0.5, 2.0, float("inf")])
def test_lp_corner_values_follow_the_cpu_back_end(norm_type):
    # Zero windows, NaN and -inf: torch's chain rule (checked on the CPU in
    # tests/test_corners.py) gives 0 at a zero or NaN window for p = 1 and at NaN for
    # p = inf, and pow(-inf, 0.5) is NaN.
    nan, inf = np.nan, np.inf
    x = np.array([[[0, 0, 1, nan, -3, 2, -inf, 4, inf, -inf, -0.0, 0.0]]])
    grad = np.linspace(-1, 2, 6).reshape(1, 1, 6)
    for backend_result in ("forward", "backward"):
        def call(backend):
            if backend_result == "forward":
                return fastpool.lp_pool1d(x, norm_type, 2, backend=backend)
            return fastpool.lp_pool1d_backward(grad, x, norm_type, 2, backend=backend)
        assert_allclose(_host(call("cuda")), call("cpu"), rtol=1e-12, atol=0)


def _backward_case(op, nd, channels_last, x, args, kwargs):
    function = getattr(fastpool, f"{op}{nd}d")
    backward = getattr(fastpool, f"{op}{nd}d_backward")
    kw = dict(channels_last=channels_last)
    if "max" in op:
        out, indices = function(x, *args, return_indices=True, **kw, **kwargs)
        grad = np.random.default_rng(1).standard_normal(out.shape).astype(x.dtype)
        return lambda backend: backward(grad, indices, x.shape, backend=backend, **kw)
    out = function(x, *args, **kw, **kwargs)
    grad = np.random.default_rng(1).standard_normal(out.shape).astype(x.dtype)
    if op == "lp_pool":
        return lambda backend: backward(grad, x, *args, backend=backend, **kw, **kwargs)
    if op == "avg_pool":
        return lambda backend: backward(grad, x.shape, *args, backend=backend, **kw, **kwargs)
    return lambda backend: backward(grad, x.shape, backend=backend, **kw)


BACKWARD = [
    ("max_pool", (3, 2, 1), {}), ("max_pool", (2, 1), dict(dilation=2)),
    ("avg_pool", (3, 1, 1), dict(count_include_pad=False)), ("avg_pool", (2,), {}),
    ("lp_pool", (2, 3, 1), {}), ("lp_pool", (1, 2), dict(ceil_mode=True)),
    ("lp_pool", (float("inf"), 2), {}),
    ("adaptive_max_pool", (4,), {}), ("adaptive_avg_pool", (4,), {}),
    ("global_max_pool", (), {}), ("global_avg_pool", (), {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("op, args, kwargs", BACKWARD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BACKWARD)])
def test_backward_matches_cpu_and_is_deterministic(op, args, kwargs, nd, channels_last,
                                                   dtype):
    x = _input(nd, channels_last, dtype=dtype)
    if op == "lp_pool" and args[0] == 2:
        x = np.abs(x) + 0.1
    call = _backward_case(op, nd, channels_last, x, args, kwargs)
    got = call("cuda")
    _compare(got, call("cpu"), exact="max" in op and dtype == np.float64)
    assert got.tobytes() == call("cuda").tobytes()


def test_numba_device_arrays_stay_on_device():
    x = _input(2, False)
    d = cuda.to_device(x)
    out = fastpool.avg_pool2d(d, 2)
    assert cuda.devicearray.is_cuda_ndarray(out)
    grad = fastpool.avg_pool2d_backward(out, x.shape, 2)
    assert cuda.devicearray.is_cuda_ndarray(grad)
    assert_allclose(grad.copy_to_host(), fastpool.avg_pool2d_backward(
        out.copy_to_host(), x.shape, 2), rtol=1e-6)


def test_stream_keyword():
    stream = cuda.stream()
    x = _input(2, True)
    out = fastpool.max_pool2d(cuda.to_device(x, stream=stream), 2, channels_last=True,
                              stream=stream)
    stream.synchronize()
    assert_array_equal(out.copy_to_host(), fastpool.max_pool2d(x, 2, channels_last=True))


def test_empty_batch():
    x = np.zeros((0, 3, 4, 4), np.float32)
    out, idx = fastpool.max_pool2d(x, 2, return_indices=True, backend="cuda")
    assert out.shape == idx.shape == (0, 3, 2, 2)


CUDA_BAD_CALLS = [
    (lambda d: fastpool.max_pool2d(d, 0), ValueError, r"kernel_size.*\(0, 0\)"),
    (lambda d: fastpool.max_pool2d(d, 3, padding=2), ValueError, "padding"),
    (lambda d: fastpool.avg_pool1d(d, 2), ValueError, r"avg_pool1d.*shape \(2, 3, 6, 7\)"),
    (lambda d: fastpool.adaptive_avg_pool2d(d, 0), ValueError, "output_size"),
    (lambda d: fastpool.lp_pool2d(d, -1, 2), ValueError, "norm_type"),
    (lambda d: fastpool.max_pool2d(d, 2, backend="cpu"), ValueError, "runs on the host"),
    (lambda d: fastpool.max_pool2d(d[:, :, ::2], 2), ValueError, "C-contiguous"),
    (lambda d: fastpool.max_pool2d_backward(d, d, (2, 3, 6, 7)), ValueError,
     "indices must be int64"),
    (lambda d: fastpool.avg_pool2d_backward(d, (2, 3, 6, 7), 2), ValueError,
     "grad_output has shape"),
]


@pytest.mark.parametrize("call, error, pattern", CUDA_BAD_CALLS,
                         ids=[f"bad-{i}" for i in range(len(CUDA_BAD_CALLS))])
def test_bad_calls(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(cuda.to_device(_input(2, False)))


def test_out_of_range_indices_are_refused():
    x = _input(2, False)
    out, idx = fastpool.adaptive_max_pool2d(x, 3, True)
    with pytest.raises(ValueError, match="outside"):
        fastpool.adaptive_max_pool2d_backward(out, idx + 100, x.shape, backend="cuda")
    with pytest.raises(ValueError, match="outside"):
        fastpool.max_pool2d_backward(out, idx + 100, x.shape, backend="cuda")


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_max_backward_with_foreign_indices_scatters(channels_last):
    # In-plane indices outside their own window: the gather would drop them.
    x = _input(2, channels_last, dtype=np.float64)
    window = dict(kernel_size=2, stride=2)
    out, idx = fastpool.max_pool2d(x, return_indices=True, channels_last=channels_last,
                                   **window)
    plane = np.prod(x.shape[1:3] if channels_last else x.shape[2:])
    foreign = np.random.default_rng(5).integers(0, plane, idx.shape)
    grad = np.random.default_rng(2).standard_normal(out.shape)
    want = fastpool.max_pool2d_backward(grad, foreign, x.shape, channels_last=channels_last,
                                        backend="numpy")
    got = fastpool.max_pool2d_backward(grad, foreign, x.shape, channels_last=channels_last,
                                       backend="cuda", **window)
    assert_array_equal(got, want)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_sliding_max_backward_gathers_with_the_window(nd, channels_last):
    x = _input(nd, channels_last, dtype=np.float64)
    window = dict(kernel_size=3, stride=1, padding=1, dilation=1, ceil_mode=False)
    function = getattr(fastpool, f"max_pool{nd}d")
    backward = getattr(fastpool, f"max_pool{nd}d_backward")
    out, idx = function(x, return_indices=True, channels_last=channels_last, **window)
    grad = np.random.default_rng(2).standard_normal(out.shape)
    want = backward(grad, idx, x.shape, channels_last=channels_last)
    got = backward(grad, idx, x.shape, channels_last=channels_last, backend="cuda", **window)
    assert_array_equal(got, want)
    with pytest.raises(ValueError, match="grad_output has shape"):
        backward(grad, idx, x.shape, channels_last=channels_last, backend="cuda",
                 **{**window, "stride": 2})


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_strided_conv_matches_cpu(nd):
    rng = np.random.default_rng(nd)
    x = rng.standard_normal((2, 3) + ND_SIZES[nd]).astype(np.float32)
    w = rng.standard_normal((4, 3) + (2,) * nd).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    conv = getattr(fastpool, f"strided_conv{nd}d")
    backward = getattr(fastpool, f"strided_conv{nd}d_backward")
    want = conv(x, w, 2, 1, b)
    assert_allclose(conv(x, w, 2, 1, b, backend="cuda"), want, rtol=1e-5, atol=1e-5)
    grad = rng.standard_normal(want.shape).astype(np.float32)
    got = backward(grad, x, w, 2, 1, backend="cuda")
    for g, c in zip(got, backward(grad, x, w, 2, 1)):
        assert_allclose(g, c, rtol=1e-4, atol=1e-5)
    assert all(a.tobytes() == b.tobytes()
               for a, b in zip(got, backward(grad, x, w, 2, 1, backend="cuda")))
