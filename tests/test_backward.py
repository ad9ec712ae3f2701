"""Every backward op against torch autograd and the NumPy reference."""

import numba
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import fastpool
from tests.conftest import make_input
from tests.oracle import fastpool_op, torch_grad
from tests.test_forward import (
    _adaptive_table,
    _lp_table,
    _per_nd,
    _table,
    assert_matches,
    batching,
    float_dtypes,
    layouts,
)

BACKENDS = ("cpu", "numpy")


def check_backward(op, nd, x, forward_args, backward, *, channels_last, exact=False,
                   **forward_kwargs):
    """Compare ``backward(grad_output, backend)`` with torch autograd for a random grad."""
    out = fastpool_op(op, nd)(x, *forward_args, channels_last=channels_last,
                              **forward_kwargs)
    out = out[0] if isinstance(out, tuple) else out
    grad_output = np.random.default_rng(1).standard_normal(out.shape).astype(x.dtype)
    want = torch_grad(op, nd, x, grad_output, *forward_args, channels_last=channels_last,
                      **forward_kwargs)
    assert want.shape == x.shape
    for backend in BACKENDS:
        assert_matches(backward(grad_output, backend), want.astype(grad_output.dtype), backend,
                       exact)


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, kwargs", _table(op_dilation=True))
def test_max_pool_backward(nd, size, kwargs, dtype, channels_last, batched, rng):
    # Distinct values: the gradient of a tie is torch's choice, tested in forward.
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    _, indices = fastpool_op("max_pool", nd)(x, return_indices=True,
                                             channels_last=channels_last, **kwargs)
    backward = getattr(fastpool, f"max_pool{nd}d_backward")
    plane = np.prod(x.shape[-nd - 1:-1] if channels_last else x.shape[-nd:])
    if (indices >= plane).any():
        # A dilated window holding no input element: torch's index points past the
        # plane (and its backward writes there); fastpool refuses it.
        for backend in BACKENDS:
            with pytest.raises(ValueError, match="outside"):
                backward(np.ones(indices.shape, dtype), indices, x.shape,
                         channels_last=channels_last, backend=backend)
        return
    check_backward("max_pool", nd, x, (), lambda g, backend: backward(
        g, indices, x.shape, channels_last=channels_last, backend=backend),
        channels_last=channels_last, exact=dtype == np.float64, **kwargs)


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, kwargs", _table(op_dilation=False))
@pytest.mark.parametrize("avg_kwargs", [
    dict(), dict(count_include_pad=False), dict(divisor_override=3)],
    ids=["include-pad", "exclude-pad", "divisor-3"])
def test_avg_pool_backward(nd, size, kwargs, avg_kwargs, dtype, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    backward = getattr(fastpool, f"avg_pool{nd}d_backward")
    check_backward("avg_pool", nd, x, (), lambda g, backend: backward(
        g, x.shape, channels_last=channels_last, backend=backend, **kwargs, **avg_kwargs),
        channels_last=channels_last, **kwargs, **avg_kwargs)


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, kwargs", _lp_table())
@pytest.mark.parametrize("norm_type", [1, 2, 3, 1.5, float("inf")])
def test_lp_pool_backward(nd, size, kwargs, norm_type, dtype, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    if norm_type in (1.5, 3):
        x = np.abs(x) + 0.1  # away from the NaNs of negative powers
    backward = getattr(fastpool, f"lp_pool{nd}d_backward")
    check_backward("lp_pool", nd, x, (norm_type,), lambda g, backend: backward(
        g, x, norm_type, channels_last=channels_last, backend=backend, **kwargs),
        channels_last=channels_last, **kwargs)


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, output_size", _adaptive_table())
def test_adaptive_backward(nd, size, output_size, dtype, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    kw = dict(channels_last=channels_last)
    check_backward("adaptive_avg_pool", nd, x, (output_size,), lambda g, backend: getattr(
        fastpool, f"adaptive_avg_pool{nd}d_backward")(g, x.shape, backend=backend, **kw), **kw)
    _, indices = fastpool_op("adaptive_max_pool", nd)(x, output_size, True, **kw)
    check_backward("adaptive_max_pool", nd, x, (output_size,), lambda g, backend: getattr(
        fastpool, f"adaptive_max_pool{nd}d_backward")(g, indices, x.shape, backend=backend,
                                                      **kw), **kw)


@layouts
@batching
@pytest.mark.parametrize("nd", (1, 2, 3))
@pytest.mark.parametrize("keepdims", [False, True], ids=["flat", "keepdims"])
def test_global_backward(nd, keepdims, channels_last, batched, rng):
    x = make_input(rng, nd, _per_nd((5, 6, 7), nd), batched=batched,
                   channels_last=channels_last, dtype=np.float64)
    kw = dict(channels_last=channels_last)
    check_backward("global_avg_pool", nd, x, (), lambda g, backend: getattr(
        fastpool, f"global_avg_pool{nd}d_backward")(g, x.shape, backend=backend, **kw),
        keepdims=keepdims, **kw)
    _, indices = fastpool_op("global_max_pool", nd)(x, keepdims, True, **kw)
    check_backward("global_max_pool", nd, x, (), lambda g, backend: getattr(
        fastpool, f"global_max_pool{nd}d_backward")(g, indices, x.shape, backend=backend,
                                                    **kw), keepdims=keepdims, **kw)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_backward_is_deterministic_across_runs_and_thread_counts(channels_last, rng):
    # Heavily overlapping windows: every input element receives many contributions.
    x = make_input(rng, 2, (23, 29), channels_last=channels_last, channels=40)
    grad = rng.standard_normal(fastpool.avg_pool2d(x, 7, 1, 3, channels_last=channels_last)
                               .shape).astype(np.float32)
    _, idx = fastpool.adaptive_max_pool2d(x, (19, 21), True, channels_last=channels_last)
    max_grad = rng.standard_normal(idx.shape).astype(np.float32)
    kw = dict(channels_last=channels_last)
    calls = [
        lambda: fastpool.avg_pool2d_backward(grad, x.shape, 7, 1, 3, **kw),
        lambda: fastpool.lp_pool2d_backward(grad[..., :17, :23, :] if channels_last else
                                            grad[..., :17, :23], x, 2, 7, 1, **kw),
        lambda: fastpool.adaptive_max_pool2d_backward(max_grad, idx, x.shape, **kw),
        lambda: fastpool.adaptive_avg_pool2d_backward(max_grad, x.shape, **kw),
    ]
    previous = numba.get_num_threads()
    try:
        for call in calls:
            first = call()
            assert_array_equal(call(), first)
            numba.set_num_threads(1)
            assert first.tobytes() == call().tobytes()
            numba.set_num_threads(previous)
    finally:
        numba.set_num_threads(previous)


BAD_BACKWARD_CALLS = [
    (lambda x, g, i: fastpool.max_pool2d_backward(g[..., :1], i, x.shape), ValueError,
     "indices has shape"),
    (lambda x, g, i: fastpool.max_pool2d_backward(g, i.astype(np.int32), x.shape), ValueError,
     "indices must be int64"),
    (lambda x, g, i: fastpool.max_pool2d_backward(g, i + 1000, x.shape), ValueError,
     "outside"),
    (lambda x, g, i: fastpool.max_pool2d_backward(g, i, (2, 3, 8)), ValueError,
     r"\(2, 3, 8\)"),
    (lambda x, g, i: fastpool.max_pool2d_backward(g.astype(np.int32), i, x.shape), TypeError,
     "grad_output dtype int32"),
    (lambda x, g, i: fastpool.max_pool2d_backward(g, i, "shape"), TypeError, "input_shape"),
    (lambda x, g, i: fastpool.avg_pool2d_backward(g, x.shape, 3), ValueError,
     r"grad_output has shape \(2, 3, 4, 4\).*\(2, 3, 2, 2\)"),
    (lambda x, g, i: fastpool.avg_pool2d_backward(g, x.shape, 2, padding=3), ValueError,
     "padding"),
    (lambda x, g, i: fastpool.lp_pool2d_backward(g, x, 0, 2), ValueError, "norm_type"),
    (lambda x, g, i: fastpool.lp_pool2d_backward(g, x[..., :6], 2, 2), ValueError,
     "grad_output has shape"),
    (lambda x, g, i: fastpool.adaptive_avg_pool2d_backward(g[0], x.shape), ValueError,
     "grad_output"),
    (lambda x, g, i: fastpool.global_avg_pool2d_backward(g, x.shape), ValueError,
     r"\(2, 3\)"),
    (lambda x, g, i: fastpool.global_max_pool2d_backward(g[:, :, 0, 0], i, x.shape),
     ValueError, "indices"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, pattern", BAD_BACKWARD_CALLS,
                         ids=[f"bad-{i}" for i in range(len(BAD_BACKWARD_CALLS))])
def test_bad_backward_calls(call, error, pattern, backend, monkeypatch):
    from fastpool import _dispatch
    monkeypatch.setattr(_dispatch, "_BACKEND_MODULES",
                        {**_dispatch._BACKEND_MODULES, "cpu": _dispatch._BACKEND_MODULES[backend]})
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out, idx = fastpool.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(error, match=pattern):
        call(x, out, idx)


def test_empty_batch_backward():
    x = np.zeros((0, 3, 8, 8), np.float32)
    out, idx = fastpool.max_pool2d(x, 2, return_indices=True)
    assert fastpool.max_pool2d_backward(out, idx, x.shape).shape == x.shape
    assert fastpool.avg_pool2d_backward(out, x.shape, 2).shape == x.shape


@pytest.mark.parametrize("nd, size, kwargs", _table(op_dilation=True))
def test_channels_last_max_backward_gather(nd, size, kwargs, rng, monkeypatch):
    # The gather kernel normally serves many channels and little overlap only.
    from fastpool.cpu import pooling
    monkeypatch.setattr(pooling, "GATHER_MIN_CHANNELS", 1)
    monkeypatch.setattr(pooling, "GATHER_MAX_COVER", 10**6)
    monkeypatch.setattr(pooling, "GATHER_MAX_WINDOW", 10**6)
    monkeypatch.setattr(pooling, "GATHER_MAX_BATCH_PER_THREAD", 10**6)
    x = make_input(rng, nd, size, channels_last=True, dtype=np.float64)
    _, indices = fastpool_op("max_pool", nd)(x, return_indices=True, channels_last=True,
                                             **kwargs)
    plane = np.prod(x.shape[-nd - 1:-1])
    grad = np.random.default_rng(3).standard_normal(indices.shape)
    backward = getattr(fastpool, f"max_pool{nd}d_backward")
    window = {"kernel_size": kwargs["kernel_size"], **{k: v for k, v in kwargs.items()
                                                        if k != "kernel_size"}}
    if (indices >= plane).any():
        with pytest.raises(ValueError, match="outside"):
            backward(grad, indices, x.shape, channels_last=True, backend="cpu", **window)
        return
    got = backward(grad, indices, x.shape, channels_last=True, backend="cpu", **window)
    assert_array_equal(got, torch_grad("max_pool", nd, x, grad, channels_last=True, **kwargs))


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_max_backward_with_foreign_indices_scatters_like_torch(channels_last, rng,
                                                              monkeypatch):
    # Indices inside the plane but not in their own window (not this forward's):
    # the gather would drop them, so the kernels scatter as torch's backward does.
    from fastpool.cpu import pooling
    monkeypatch.setattr(pooling, "GATHER_MIN_CHANNELS", 1)
    monkeypatch.setattr(pooling, "GATHER_MAX_WINDOW", 10**6)
    monkeypatch.setattr(pooling, "GATHER_MAX_BATCH_PER_THREAD", 10**6)
    x = make_input(rng, 2, 8, channels_last=channels_last, dtype=np.float64)
    window = dict(kernel_size=2, stride=2)
    out, indices = fastpool.max_pool2d(x, return_indices=True, channels_last=channels_last,
                                       **window)
    foreign = rng.integers(0, 64, indices.shape)
    grad = rng.standard_normal(out.shape)
    want = fastpool.max_pool2d_backward(grad, foreign, x.shape, channels_last=channels_last,
                                        backend="numpy")
    for kw in (window, {}):
        got = fastpool.max_pool2d_backward(grad, foreign, x.shape,
                                           channels_last=channels_last, backend="cpu", **kw)
        assert_array_equal(got, want)
