"""Hypothesis sweep: cpu == numpy reference == torch on random shapes and options."""

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

import fastpool
from fastpool._params import pooling_output_size
from tests.oracle import fastpool_op, to_channels_last, torch_grad, torch_pool

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def sliding_problems(draw, dilation):
    nd = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd))
    kernel = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    stride = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    padding = [draw(st.integers(0, k // 2)) for k in kernel]
    dil = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)) if dilation else [1] * nd
    ceil_mode = draw(st.booleans())
    assume(all(pooling_output_size(n, k, p, s, d, ceil_mode) >= 1
               for n, k, p, s, d in zip(sizes, kernel, padding, stride, dil)))
    channels_last = draw(st.booleans())
    batched = draw(st.booleans())
    shape = ((draw(st.integers(1, 2)),) if batched else ()) + (draw(st.integers(1, 3)),)
    seed = draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).integers(-4, 5, shape + tuple(sizes)).astype(np.float64)
    if channels_last:
        x = np.ascontiguousarray(to_channels_last(x, nd))
    kwargs = dict(kernel_size=tuple(kernel), stride=tuple(stride), padding=tuple(padding),
                  ceil_mode=ceil_mode, channels_last=channels_last)
    if dilation:
        kwargs["dilation"] = tuple(dil)
    return nd, x, kwargs


@SETTINGS
@given(sliding_problems(dilation=True), st.sampled_from([np.float32, np.float64, np.int16]))
def test_max_pool_property(problem, dtype):
    nd, x, kwargs = problem
    x = x.astype(dtype)
    want = torch_pool("max_pool", nd, x, return_indices=True, **kwargs)
    for backend in ("cpu", "numpy"):
        got = fastpool_op("max_pool", nd)(x, return_indices=True, backend=backend, **kwargs)
        assert_array_equal(got[0], want[0])
        assert_array_equal(got[1], want[1])


@SETTINGS
@given(sliding_problems(dilation=False), st.booleans(), st.sampled_from([None, 1, 5]))
def test_avg_pool_property(problem, count_include_pad, divisor_override):
    nd, x, kwargs = problem
    # torch's avg_pool3d alone refuses an unpadded input smaller than the kernel even
    # where the padded one has windows; fastpool pools it like the 1-D and 2-D ops.
    spatial = x.shape[-nd - 1:-1] if kwargs["channels_last"] else x.shape[-nd:]
    assume(nd < 3 or all(n >= k for n, k in zip(spatial, kwargs["kernel_size"])))
    want = torch_pool("avg_pool", nd, x, count_include_pad=count_include_pad,
                      divisor_override=divisor_override, **kwargs)
    for backend in ("cpu", "numpy"):
        got = fastpool_op("avg_pool", nd)(x, count_include_pad=count_include_pad,
                                          divisor_override=divisor_override,
                                          backend=backend, **kwargs)
        assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Invariant: over the same windows, max >= avg >= min.
    if kwargs["padding"] == (0,) * nd and divisor_override is None:
        top = fastpool_op("max_pool", nd)(x, **kwargs)
        bottom = -fastpool_op("max_pool", nd)(-x, **kwargs)
        assert np.all(top >= got - 1e-12) and np.all(got >= bottom - 1e-12)


@SETTINGS
@given(st.integers(1, 3), st.data())
def test_adaptive_property(nd, data):
    sizes = tuple(data.draw(st.lists(st.integers(1, 12), min_size=nd, max_size=nd)))
    out = tuple(data.draw(st.lists(st.integers(1, 14), min_size=nd, max_size=nd)))
    channels_last = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).standard_normal((2, 3) + sizes)
    if channels_last:
        x = np.ascontiguousarray(to_channels_last(x, nd))
    want_max = torch_pool("adaptive_max_pool", nd, x, out, return_indices=True,
                          channels_last=channels_last)
    want_avg = torch_pool("adaptive_avg_pool", nd, x, out, channels_last=channels_last)
    for backend in ("cpu", "numpy"):
        kw = dict(channels_last=channels_last, backend=backend)
        got = fastpool_op("adaptive_max_pool", nd)(x, out, True, **kw)
        assert_array_equal(got[0], want_max[0])
        assert_array_equal(got[1], want_max[1])
        assert_allclose(fastpool_op("adaptive_avg_pool", nd)(x, out, **kw), want_avg,
                        rtol=1e-12, atol=1e-13)
    # Invariants: global == adaptive to 1; divisible adaptive == plain pooling.
    glob = fastpool_op("global_avg_pool", nd)(x, keepdims=True, channels_last=channels_last)
    assert_allclose(glob, fastpool_op("adaptive_avg_pool", nd)(x, 1, channels_last=channels_last))
    factor = tuple(max(1, n // 2) for n in sizes)
    if all(n % f == 0 for n, f in zip(sizes, factor)):
        plain = fastpool_op("max_pool", nd)(x, factor, channels_last=channels_last)
        adaptive = fastpool_op("adaptive_max_pool", nd)(
            x, tuple(n // f for n, f in zip(sizes, factor)), channels_last=channels_last)
        assert_array_equal(plain, adaptive)


def test_fastpool_namespace_is_complete():
    for family in ("max_pool", "avg_pool", "lp_pool", "adaptive_max_pool",
                   "adaptive_avg_pool", "global_max_pool", "global_avg_pool"):
        for nd in (1, 2, 3):
            assert callable(getattr(fastpool, f"{family}{nd}d"))


@SETTINGS
@given(sliding_problems(dilation=False), st.sampled_from(["max", "avg"]))
def test_backward_property(problem, mode):
    nd, x, kwargs = problem
    spatial = x.shape[-nd - 1:-1] if kwargs["channels_last"] else x.shape[-nd:]
    assume(nd < 3 or all(n >= k for n, k in zip(spatial, kwargs["kernel_size"])))
    x = x + np.random.default_rng(x.size).random(x.shape)  # break ties
    op = f"{mode}_pool"
    if mode == "max":
        out, indices = fastpool_op(op, nd)(x, return_indices=True, **kwargs)
    else:
        out = fastpool_op(op, nd)(x, **kwargs)
    # Small integers: every sum below is exact, whatever the order of additions.
    grad = np.random.default_rng(7).integers(-3, 4, out.shape).astype(np.float64)
    want = torch_grad(op, nd, x, grad, **kwargs)
    backward = getattr(fastpool, f"{op}{nd}d_backward")
    kw = {k: v for k, v in kwargs.items() if k not in ("channels_last", "dilation")}
    for backend in ("cpu", "numpy"):
        if mode == "max":
            got = backward(grad, indices, x.shape, channels_last=kwargs["channels_last"],
                           backend=backend)
            # Invariant: max pooling's backward scatters exactly sum(grad_output).
            assert got.sum() == grad.sum()
            assert_array_equal(got, want)
        else:
            got = backward(grad, x.shape, **kw, channels_last=kwargs["channels_last"],
                           backend=backend)
            assert_allclose(got, want, rtol=1e-12, atol=1e-12)
