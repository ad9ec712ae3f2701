"""Hypothesis sweep: cpu == numpy reference == torch on random shapes and options."""

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

import fastpool
from fastpool._params import pooling_output_size
from tests.oracle import (
    fastpool_op,
    to_channels_first,
    to_channels_last,
    torch_grad,
    torch_pool,
)
from tests.test_conv import _torch as conv_torch

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def sliding_problems(draw, dilation, padding=True, wide=False):
    """(nd, x, kwargs): small-integer float64 input, channels-first or -last.

    Without ``padding`` the window has none (as lp pooling needs); ``wide``
    sometimes gives 32 channels, which the gathering max backward needs.
    """
    nd = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd))
    kernel = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    stride = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    padding = [draw(st.integers(0, k // 2)) if padding else 0 for k in kernel]
    dil = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)) if dilation else [1] * nd
    ceil_mode = draw(st.booleans())
    assume(all(pooling_output_size(n, k, p, s, d, ceil_mode) >= 1
               for n, k, p, s, d in zip(sizes, kernel, padding, stride, dil)))
    channels_last = draw(st.booleans())
    batched = draw(st.booleans())
    channels = 32 if wide and draw(st.booleans()) else draw(st.integers(1, 3))
    shape = ((draw(st.integers(1, 2)),) if batched else ()) + (channels,)
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
    # A dilated window wholly in the padding has no element: its index is a convention,
    # and torch's two kernels differ (channels-first: the window's first position at or
    # after 0, fastpool's choice; channels-last: another), and with one channel the
    # oracle's tensor can look channels-last to torch.  Compare the others.
    whole = np.isfinite(fastpool_op("max_pool", nd)(x.astype(np.float64), **kwargs))
    for backend in ("cpu", "numpy"):
        got = fastpool_op("max_pool", nd)(x, return_indices=True, backend=backend, **kwargs)
        assert_array_equal(got[0], want[0])
        assert_array_equal(got[1][whole], want[1][whole])


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
            # Invariant: linear in grad_output.
            other = np.random.default_rng(8).integers(-3, 4, out.shape).astype(np.float64)
            combined = backward(2 * grad - 3 * other, x.shape, **kw,
                                channels_last=kwargs["channels_last"], backend=backend)
            assert_allclose(combined, 2 * got - 3 * backward(
                other, x.shape, **kw, channels_last=kwargs["channels_last"], backend=backend),
                rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# Every other op family: lp, adaptive and global backward, strided convolution,
# and the layout invariant for every op.
# --------------------------------------------------------------------------

FEW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ("cpu", "numpy")


def _spatial(x, nd, channels_last):
    return x.shape[-nd - 1:-1] if channels_last else x.shape[-nd:]


def _continuous(x):
    """Break ties and keep every window sum away from 0: lp_pool's backward with
    norm_type=1 on a window summing to exactly 0 is an open bug (fastpool passes
    grad_output, torch gives 0), and so is norm_type=inf with NaN in a window."""
    return x + np.random.default_rng(x.size).uniform(0.05, 0.95, x.shape)


def _grads(out, seed=7):
    """Two small-integer gradients of out's shape and float dtype (float64 for an
    integer out): sums of them are exact."""
    rng = np.random.default_rng(seed)
    dtype = out.dtype if out.dtype.kind == "f" else np.float64
    return [rng.integers(-3, 4, out.shape).astype(dtype) for _ in range(2)]


def _lp_kwargs(kwargs, nd):
    """kwargs less padding; ints in 1-D, which is all torch's lp_pool1d takes."""
    return {k: v[0] if nd == 1 and isinstance(v, tuple) else v
            for k, v in kwargs.items() if k != "padding"}


@FEW
@given(sliding_problems(dilation=False, padding=False),
       st.sampled_from([1.0, 2.0, 3.0, 1.5, np.inf]))
def test_lp_pool_property(problem, norm_type):
    nd, x, kwargs = problem
    kw = _lp_kwargs(kwargs, nd)
    # torch's lp_pool3d (an avg_pool3d) refuses an input smaller than the kernel.
    assume(nd < 3 or all(n >= k for n, k in zip(_spatial(x, nd, kw["channels_last"]),
                                                 kw["kernel_size"])))
    if norm_type % 1:
        x = np.abs(x)  # a fractional power of a negative number is NaN
    want = torch_pool("lp_pool", nd, x, norm_type, **kw)
    for backend in BACKENDS:
        got = fastpool_op("lp_pool", nd)(x, norm_type, backend=backend, **kw)
        assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Invariant: p=inf is max pooling of |x|, bit for bit.
    if np.isinf(norm_type):
        assert_array_equal(got, fastpool_op("max_pool", nd)(np.abs(x), **kw))
    # Invariant: p=1 on non-negative input is sum pooling: avg * kernel volume.
    if norm_type == 1:
        total = fastpool_op("lp_pool", nd)(np.abs(x), 1, **kw)
        avg = fastpool_op("avg_pool", nd)(np.abs(x), **kw)
        assert_allclose(total, avg * np.prod(kw["kernel_size"]), rtol=1e-13, atol=1e-13)


@FEW
@given(sliding_problems(dilation=False, padding=False),
       st.sampled_from([1.0, 2.0, 3.0, 1.5, np.inf]))
def test_lp_backward_property(problem, norm_type):
    nd, x, kwargs = problem
    kw = _lp_kwargs(kwargs, nd)
    assume(nd < 3 or all(n >= k for n, k in zip(_spatial(x, nd, kw["channels_last"]),
                                                 kw["kernel_size"])))
    x = _continuous(np.abs(x) if norm_type in (1.5, 3.0) else x)
    out = fastpool_op("lp_pool", nd)(x, norm_type, **kw)
    g1, g2 = _grads(out)
    want = torch_grad("lp_pool", nd, x, g1, norm_type, **kw)
    backward = getattr(fastpool, f"lp_pool{nd}d_backward")
    for backend in BACKENDS:
        got = backward(g1, x, norm_type, backend=backend, **kw)
        assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # Invariant: linear in grad_output.
    combined = backward(2 * g1 - 3 * g2, x, norm_type, **kw)
    assert_allclose(combined, 2 * got - 3 * backward(g2, x, norm_type, **kw),
                    rtol=1e-10, atol=1e-10)


@FEW
@given(sliding_problems(dilation=True, wide=True), st.booleans())
def test_max_backward_dilation_and_window_property(problem, pass_window):
    """Dilated windows; with the forward's window passed, channels-last inputs of 32
    channels take the gathering kernel."""
    nd, x, kwargs = problem
    x = _continuous(x)
    out, indices = fastpool_op("max_pool", nd)(x, return_indices=True, **kwargs)
    # A dilated window can lie wholly in the padding: torch's backward then writes out
    # of bounds (heap corruption), and fastpool's rejects the indices (see the next
    # test); both are kept away from here.
    assume(np.isfinite(out).all())
    grad, _ = _grads(out)
    want = torch_grad("max_pool", nd, x, grad, **kwargs)
    window = {k: v for k, v in kwargs.items() if k != "channels_last"} if pass_window else {}
    for backend in BACKENDS:
        got = getattr(fastpool, f"max_pool{nd}d_backward")(
            grad, indices, x.shape, channels_last=kwargs["channels_last"], backend=backend,
            **window)
        assert got.sum() == grad.sum()
        assert_array_equal(got, want)


@st.composite
def adaptive_problems(draw):
    nd = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 10), min_size=nd, max_size=nd)))
    out = tuple(draw(st.lists(st.integers(1, 12), min_size=nd, max_size=nd)))
    channels_last = draw(st.booleans())
    batched = draw(st.booleans())
    shape = ((draw(st.integers(1, 2)),) if batched else ()) + (draw(st.integers(1, 3)),)
    x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape + sizes)
    if channels_last:
        x = np.ascontiguousarray(to_channels_last(x, nd))
    return nd, x, out, channels_last


@FEW
@given(adaptive_problems())
def test_adaptive_backward_property(problem):
    nd, x, out_size, channels_last = problem
    kw = dict(channels_last=channels_last)
    out, indices = fastpool_op("adaptive_max_pool", nd)(x, out_size, True, **kw)
    g1, g2 = _grads(out)
    want_max = torch_grad("adaptive_max_pool", nd, x, g1, out_size, **kw)
    want_avg = torch_grad("adaptive_avg_pool", nd, x, g1, out_size, **kw)
    max_backward = getattr(fastpool, f"adaptive_max_pool{nd}d_backward")
    avg_backward = getattr(fastpool, f"adaptive_avg_pool{nd}d_backward")
    for backend in BACKENDS:
        got = max_backward(g1, indices, x.shape, backend=backend, **kw)
        assert got.sum() == g1.sum()
        assert_array_equal(got, want_max)
        got = avg_backward(g1, x.shape, backend=backend, **kw)
        assert_allclose(got, want_avg, rtol=1e-12, atol=1e-13)
    # Invariant: avg backward is linear in grad_output.
    assert_allclose(avg_backward(2 * g1 - 3 * g2, x.shape, **kw),
                    2 * got - 3 * avg_backward(g2, x.shape, **kw), rtol=1e-12, atol=1e-12)
    # Invariant: over the same windows, max >= avg >= min.
    avg = fastpool_op("adaptive_avg_pool", nd)(x, out_size, **kw)
    bottom = -fastpool_op("adaptive_max_pool", nd)(-x, out_size, **kw)
    assert np.all(out >= avg - 1e-12) and np.all(avg >= bottom - 1e-12)
    # Invariant: divisible adaptive avg == plain avg pooling (max is checked above).
    sizes = _spatial(x, nd, channels_last)
    factor = tuple(max(1, n // 2) for n in sizes)
    if all(n % f == 0 for n, f in zip(sizes, factor)):
        plain = fastpool_op("avg_pool", nd)(x, factor, **kw)
        adaptive = fastpool_op("adaptive_avg_pool", nd)(
            x, tuple(n // f for n, f in zip(sizes, factor)), **kw)
        assert_allclose(plain, adaptive, rtol=1e-13, atol=1e-14)


@FEW
@given(adaptive_problems(), st.booleans())
def test_global_property(problem, keepdims):
    nd, x, _, channels_last = problem
    assume(x.ndim == nd + 2)  # global pooling wants (N, C, *spatial)
    kw = dict(channels_last=channels_last)
    want_max = torch_pool("global_max_pool", nd, x, keepdims=keepdims, return_indices=True,
                          **kw)
    want_avg = torch_pool("global_avg_pool", nd, x, keepdims=keepdims, **kw)
    for backend in BACKENDS:
        got = fastpool_op("global_max_pool", nd)(x, keepdims, True, backend=backend, **kw)
        assert_array_equal(got[0], want_max[0])
        assert_array_equal(got[1], want_max[1])
        avg = fastpool_op("global_avg_pool", nd)(x, keepdims, backend=backend, **kw)
        assert_allclose(avg, want_avg, rtol=1e-12, atol=1e-13)
    # Invariant: global == adaptive to 1 (keepdims), for max, its indices and avg.
    adaptive = fastpool_op("adaptive_max_pool", nd)(x, 1, True, **kw)
    global_keep = fastpool_op("global_max_pool", nd)(x, True, True, **kw)
    assert_array_equal(global_keep[0], adaptive[0])
    assert_array_equal(global_keep[1], adaptive[1])
    assert_array_equal(fastpool_op("global_avg_pool", nd)(x, True, **kw),
                       fastpool_op("adaptive_avg_pool", nd)(x, 1, **kw))
    # Backward: torch, the sum invariant of max and the linearity of avg.
    g1, g2 = _grads(got[0])
    max_backward = getattr(fastpool, f"global_max_pool{nd}d_backward")
    avg_backward = getattr(fastpool, f"global_avg_pool{nd}d_backward")
    want_max = torch_grad("global_max_pool", nd, x, g1, keepdims=keepdims, **kw)
    want_avg = torch_grad("global_avg_pool", nd, x, g1, keepdims=keepdims, **kw)
    for backend in BACKENDS:
        grad_in = max_backward(g1, got[1], x.shape, backend=backend, **kw)
        assert grad_in.sum() == g1.sum()
        assert_array_equal(grad_in, want_max)
        grad_in = avg_backward(g1, x.shape, backend=backend, **kw)
        assert_allclose(grad_in, want_avg, rtol=1e-12, atol=1e-13)
    assert_allclose(avg_backward(2 * g1 - 3 * g2, x.shape, **kw),
                    2 * grad_in - 3 * avg_backward(g2, x.shape, **kw), rtol=1e-12, atol=1e-12)


@st.composite
def conv_problems(draw):
    nd = draw(st.integers(1, 3))
    stride = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    padding = tuple(draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd)))
    kernel = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    sizes = tuple(draw(st.integers(max(1, k - 2 * p), 9)) for k, p in zip(kernel, padding))
    c_in, c_out, batch = (draw(st.integers(1, 3)) for _ in range(3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(-4, 5, (batch, c_in) + sizes).astype(np.float64)
    weight = rng.integers(-3, 4, (c_out, c_in) + kernel).astype(np.float64)
    bias = rng.integers(-3, 4, c_out).astype(np.float64)
    return nd, x, weight, bias, stride, padding


@FEW
@given(conv_problems())
def test_strided_conv_property(problem):
    nd, x, weight, bias, stride, padding = problem
    forward = getattr(fastpool, f"strided_conv{nd}d")
    backward = getattr(fastpool, f"strided_conv{nd}d_backward")
    out = forward(x, weight, stride, padding, bias)
    g1, g2 = _grads(out)
    want = conv_torch(nd, x, weight, bias, stride, padding, g1)
    # Small integers throughout: every sum is exact, whatever the order.
    for backend in BACKENDS:
        got = (forward(x, weight, stride, padding, bias, backend=backend),
               *backward(g1, x, weight, stride, padding, backend=backend))
        for g, w in zip(got, want):
            assert_array_equal(g, w)
    # Invariants: backward is linear in grad_output; the bias gradient sums it.
    combined = backward(2 * g1 - 3 * g2, x, weight, stride, padding)
    for c, a, b in zip(combined, got[1:], backward(g2, x, weight, stride, padding)):
        assert_array_equal(c, 2 * a - 3 * b)
    assert_array_equal(got[3], g1.sum(axis=(0, *range(2, 2 + nd))))
    # Invariant: channels-last == channels-first, transposed.
    last = np.ascontiguousarray(to_channels_last(x, nd))
    assert_array_equal(forward(last, weight, stride, padding, bias, channels_last=True),
                       to_channels_last(out, nd))
    grads = backward(np.ascontiguousarray(to_channels_last(g1, nd)), last, weight, stride,
                     padding, channels_last=True)
    assert_array_equal(grads[0], to_channels_last(got[1], nd))
    assert_array_equal(grads[1], got[2])
    assert_array_equal(grads[2], got[3])


def _layout_calls(nd, x, kwargs, layout_of):
    """Every op, forward and backward, on x (channels-first) in one layout:
    ``layout_of(a)`` moves a channels-first array to that layout."""
    window = {k: kwargs[k] for k in ("kernel_size", "stride", "padding", "ceil_mode")}
    lp_window = _lp_kwargs(window, nd)
    cl = layout_of.channels_last
    xl = layout_of(x)
    kw = dict(channels_last=cl)
    results = {}
    out, indices = fastpool_op("max_pool", nd)(xl, return_indices=True, **window, **kw)
    results["max_pool"] = (out, indices)
    grad = layout_of(_grads(layout_of.back(out))[0])
    results["max_pool_backward"] = getattr(fastpool, f"max_pool{nd}d_backward")(
        grad, indices, xl.shape, **kw)
    results["max_pool_backward(window)"] = getattr(fastpool, f"max_pool{nd}d_backward")(
        grad, indices, xl.shape, **window, **kw)
    dilated = dict(window, dilation=kwargs["dilation"])
    out, indices = fastpool_op("max_pool", nd)(xl, return_indices=True, **dilated, **kw)
    results["max_pool(dilated)"] = (out, indices)
    if np.isfinite(out).all():  # no window wholly in the padding (an open bug)
        results["max_pool_backward(dilated)"] = getattr(fastpool, f"max_pool{nd}d_backward")(
            layout_of(_grads(layout_of.back(out))[0]), indices, xl.shape, **dilated, **kw)
    out = fastpool_op("avg_pool", nd)(xl, **window, **kw)
    results["avg_pool"] = out
    results["avg_pool_backward"] = getattr(fastpool, f"avg_pool{nd}d_backward")(
        layout_of(_grads(layout_of.back(out))[0]), xl.shape, **window, **kw)
    if all(p == 0 for p in window["padding"]):
        for p in (2.0, np.inf):
            out = fastpool_op("lp_pool", nd)(xl, p, **lp_window, **kw)
            results[f"lp_pool({p})"] = out
            results[f"lp_pool_backward({p})"] = getattr(fastpool, f"lp_pool{nd}d_backward")(
                layout_of(_grads(layout_of.back(out))[0]), xl, p, **lp_window, **kw)
    sizes = kwargs["kernel_size"]  # an adaptive output size that fits no window grid
    out, indices = fastpool_op("adaptive_max_pool", nd)(xl, sizes, True, **kw)
    results["adaptive_max_pool"] = (out, indices)
    results["adaptive_max_pool_backward"] = getattr(
        fastpool, f"adaptive_max_pool{nd}d_backward")(
        layout_of(_grads(layout_of.back(out))[0]), indices, xl.shape, **kw)
    out = fastpool_op("adaptive_avg_pool", nd)(xl, sizes, **kw)
    results["adaptive_avg_pool"] = out
    results["adaptive_avg_pool_backward"] = getattr(
        fastpool, f"adaptive_avg_pool{nd}d_backward")(
        layout_of(_grads(layout_of.back(out))[0]), xl.shape, **kw)
    if x.ndim == nd + 2:
        out, indices = fastpool_op("global_max_pool", nd)(xl, True, True, **kw)
        results["global_max_pool"] = (out, indices)
        results["global_max_pool_backward"] = getattr(
            fastpool, f"global_max_pool{nd}d_backward")(
            layout_of(_grads(layout_of.back(out))[0]), indices, xl.shape, **kw)
        out = fastpool_op("global_avg_pool", nd)(xl, True, **kw)
        results["global_avg_pool"] = out
        results["global_avg_pool_backward"] = getattr(
            fastpool, f"global_avg_pool{nd}d_backward")(
            layout_of(_grads(layout_of.back(out))[0]), xl.shape, **kw)
    return {name: tuple(map(layout_of.back, r)) if isinstance(r, tuple) else layout_of.back(r)
            for name, r in results.items()}


class _Layout:
    def __init__(self, nd, channels_last):
        self.nd, self.channels_last = nd, channels_last

    def __call__(self, a):
        return np.ascontiguousarray(to_channels_last(a, self.nd)) if self.channels_last else a

    def back(self, a):
        return to_channels_first(a, self.nd) if self.channels_last else a


@FEW
@given(sliding_problems(dilation=True, wide=True), st.sampled_from([np.float64, np.float32]))
def test_channels_last_equals_channels_first_property(problem, dtype):
    """Every op, forward and backward: channels-last == channels-first transposed
    (max results and indices bit for bit, sums to rounding)."""
    nd, x, kwargs = problem
    if kwargs["channels_last"]:
        x = to_channels_first(x, nd)
    x = _continuous(x).astype(dtype)
    tolerance = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else \
        dict(rtol=2e-6, atol=1e-6)
    first = _layout_calls(nd, x, kwargs, _Layout(nd, False))
    last = _layout_calls(nd, x, kwargs, _Layout(nd, True))
    assert first.keys() == last.keys()
    for name, want in first.items():
        got = last[name]
        if "max" in name or "inf" in name:
            for g, w in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                assert_array_equal(g, w, err_msg=name)
        else:
            assert_allclose(got, want, **tolerance, err_msg=name)
