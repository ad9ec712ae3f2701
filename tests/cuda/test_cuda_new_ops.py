"""Padding forms and min pooling on the CUDA back end, against the CPU back end (itself
checked against JAX in tests/test_padding.py and torch in tests/test_min_pool.py)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import fastpool


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


@pytest.mark.parametrize("padding", ["same", ((0, 2), (1, 0))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_and_pairs_follow_the_cpu(padding, channels_last):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = dict(channels_last=channels_last)
    out, indices = fastpool.max_pool2d(x, 3, 2, padding, return_indices=True, **kw)
    got = fastpool.max_pool2d(x, 3, 2, padding, return_indices=True, backend="cuda", **kw)
    assert_array_equal(_host(got[0]), out)
    assert_array_equal(_host(got[1]), indices)
    grad = np.random.default_rng(1).standard_normal(out.shape)
    assert_array_equal(
        _host(fastpool.max_pool2d_backward(grad, indices, x.shape, kernel_size=3, stride=2,
                                           padding=padding, backend="cuda", **kw)),
        fastpool.max_pool2d_backward(grad, indices, x.shape, **kw))
    for include in (False, True):
        want = fastpool.avg_pool2d(x, 3, 2, padding, count_include_pad=include, **kw)
        got = fastpool.avg_pool2d(x, 3, 2, padding, count_include_pad=include,
                                  backend="cuda", **kw)
        assert_allclose(_host(got), want, rtol=1e-12)
        assert_allclose(
            _host(fastpool.avg_pool2d_backward(grad, x.shape, 3, 2, padding,
                                               count_include_pad=include, backend="cuda",
                                               **kw)),
            fastpool.avg_pool2d_backward(grad, x.shape, 3, 2, padding,
                                         count_include_pad=include, **kw), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int16, np.bool_])
@pytest.mark.parametrize("channels_last", [False, True])
def test_min_pool_follows_the_cpu(dtype, channels_last):
    rng = np.random.default_rng(2)
    if dtype == np.bool_:
        x = rng.integers(0, 2, (2, 3, 6, 7)).astype(dtype)
    elif np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        x = rng.choice(np.array([info.min, 0, info.max], dtype), (2, 3, 6, 7))
    else:
        x = rng.integers(-3, 4, (2, 3, 6, 7)).astype(dtype)
        x[0, 0, 1, 1] = np.nan
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = dict(channels_last=channels_last, return_indices=True)
    for call in (lambda b: fastpool.min_pool2d(x, 3, 2, 1, backend=b, **kw),
                 lambda b: fastpool.adaptive_min_pool2d(x, (4, 3), backend=b, **kw),
                 lambda b: fastpool.global_min_pool2d(x, backend=b, **kw)):
        got, want = call("cuda"), call(None)
        assert_array_equal(_host(got[0]), want[0])
        assert_array_equal(_host(got[1]), want[1])


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_unpool_follows_the_cpu(nd, channels_last):
    rng = np.random.default_rng(nd)
    x = rng.integers(-3, 4, (1, 2) + (4,) * nd).astype(np.float32)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = dict(channels_last=channels_last)
    pool = getattr(fastpool, f"max_pool{nd}d")
    unpool = getattr(fastpool, f"max_unpool{nd}d")
    backward = getattr(fastpool, f"max_unpool{nd}d_backward")
    out, indices = pool(x, 3, 1, 1, return_indices=True, **kw)  # overlapping: duplicates
    want = unpool(out, indices, 3, 1, 1, **kw)
    assert_array_equal(_host(unpool(out, indices, 3, 1, 1, backend="cuda", **kw)), want)
    grad = rng.standard_normal(want.shape).astype(np.float32)
    assert_array_equal(_host(backward(grad, indices, backend="cuda", **kw)),
                       backward(grad, indices, **kw))
    with pytest.raises(ValueError, match=r"indices\[0\] .* is 999"):
        bad = indices.copy()
        bad.flat[0] = 999
        unpool(out, bad, 3, 1, 1, backend="cuda", **kw)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fractional_max_pool_follows_the_cpu(nd, channels_last):
    rng = np.random.default_rng(nd)
    x = rng.integers(-3, 4, (1, 2) + (6,) * nd).astype(np.float32)
    samples = rng.random((1, 2, nd)).astype(np.float32)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    pool = getattr(fastpool, f"fractional_max_pool{nd}d")
    kw = dict(output_size=3, return_indices=True, _random_samples=samples,
              channels_last=channels_last)
    got, want = pool(x, 2, backend="cuda", **kw), pool(x, 2, **kw)
    assert_array_equal(_host(got[0]), want[0])
    assert_array_equal(_host(got[1]), want[1])


@pytest.mark.parametrize("mode", ["avgmax", "catavgmax"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_global_heads_follow_the_cpu(mode, channels_last, dtype):
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 4)).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = dict(channels_last=channels_last)
    host = x.astype(np.float64) if dtype == np.float16 else x
    out, indices = fastpool.global_pool2d(host, mode, return_indices=True, **kw)
    got, got_indices = fastpool.global_pool2d(x, mode, return_indices=True, backend="cuda",
                                              **kw)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == np.float16 else dict(rtol=1e-6)
    assert_allclose(_host(got).astype(np.float64), out, **tol)
    assert_array_equal(_host(got_indices), indices)
    grad = np.random.default_rng(3).standard_normal(out.shape)
    want = fastpool.global_pool2d_backward(grad, indices, x.shape, mode, **kw)
    got = fastpool.global_pool2d_backward(grad.astype(np.float32 if dtype == np.float16
                                                      else dtype), indices, x.shape, mode,
                                          backend="cuda", **kw)
    assert_allclose(_host(got).astype(np.float64), want, rtol=1e-5, atol=1e-6)


def _gem_dtypes():
    from fastpool.cuda import backend
    return [np.float64, np.float32, np.float16] + (
        [backend.BFLOAT16] if backend.BFLOAT16 is not None else [])


@pytest.mark.parametrize("window", [{}, {"output_size": (2, 1)}, {"kernel_size": 2}],
                         ids=["global", "adaptive", "sliding"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", _gem_dtypes(), ids=lambda d: np.dtype(d).name)
def test_gem_follows_the_cpu(window, per_channel, channels_last, dtype):
    """GeM on the CUDA back end (its gem_* kernels around the average pooling) against
    the host back end on the same values in float64; half types computed in float32."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((2, 3, 5, 4)))
    x[0, 0, 0, :2] = (0.0, 1e-7)  # below eps: clamped, no gradient
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    x = x.astype(dtype)
    host = x.astype(np.float64)
    p = np.array([1.5, 3.0, 5.0]) if per_channel else 3.0
    kw = dict(channels_last=channels_last, **window)
    want = fastpool.gem_pool2d(host, p, **kw)
    got = fastpool.gem_pool2d(x, p, backend="cuda", **kw)
    got = _host(got)
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    half = np.dtype(dtype).itemsize == 2
    tol = dict(rtol=2e-2 if np.dtype(dtype).name == "bfloat16" else 2e-3) if half else \
        dict(rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert_allclose(got.astype(np.float64), want, **tol)
    grad = rng.standard_normal(want.shape)
    want_x, want_p = fastpool.gem_pool2d_backward(grad, host, p, **kw)
    got_x, got_p = fastpool.gem_pool2d_backward(grad.astype(dtype), x, p, backend="cuda",
                                                **kw)
    got_x = _host(got_x)
    assert got_x.dtype == np.dtype(dtype) and got_x[0, 0, 0, 0] == 0
    scale = np.abs(want_x).max()
    assert_allclose(got_x.astype(np.float64), want_x, rtol=tol["rtol"],
                    atol=tol["rtol"] * scale)
    assert np.shape(got_p) == np.shape(want_p)
    assert_allclose(got_p, want_p, rtol=tol["rtol"] * 10, atol=tol["rtol"] * 10)


def test_gem_keeps_device_arrays_on_the_device():
    from numba import cuda
    x = cuda.to_device(np.abs(np.random.default_rng(6).standard_normal((2, 3, 4, 4))))
    out = fastpool.gem_pool2d(x)  # no backend: a GPU array picks the CUDA back end
    assert not isinstance(out, np.ndarray) and out.shape == (2, 3, 1, 1)
    grad_x, grad_p = fastpool.gem_pool2d_backward(np.ones((2, 3, 1, 1)), x)
    assert not isinstance(grad_x, np.ndarray) and np.ndim(grad_p) == 0
    with pytest.raises(ValueError, match="runs on the host"):
        fastpool.gem_pool2d(x, backend="cpu")


def test_gem_launches_on_the_callers_stream(monkeypatch):
    """Every GeM launch, forward and backward, goes on the stream the caller gives
    (fastpool.torch passes torch's current stream), and the host back ends refuse one."""
    from numba import cuda

    from fastpool.cuda import backend
    streams, configure = [], backend._configure

    def recording(kernel, n, stream):
        streams.append(stream)
        return configure(kernel, n, stream)

    monkeypatch.setattr(backend, "_configure", recording)
    host = np.abs(np.random.default_rng(7).standard_normal((2, 3, 4, 4)))
    stream = cuda.stream()
    x = cuda.to_device(host, stream=stream)
    out = fastpool.gem_pool2d(x, p=2.5, stream=stream)
    grad_x, grad_p = fastpool.gem_pool2d_backward(np.ones((2, 3, 1, 1)), x, p=2.5,
                                                  stream=stream)
    assert len(streams) >= 6 and all(s is stream for s in streams)
    want_x, want_p = fastpool.gem_pool2d_backward(np.ones((2, 3, 1, 1)), host, p=2.5)
    assert_allclose(out.copy_to_host(), fastpool.gem_pool2d(host, p=2.5), rtol=1e-12)
    assert_allclose(grad_x.copy_to_host(), want_x, rtol=1e-12)
    assert_allclose(grad_p, want_p, rtol=1e-12)
    with pytest.raises(ValueError, match="stream"):
        fastpool.gem_pool2d(host, stream=stream)
