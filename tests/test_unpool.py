"""max_unpool against torch's F.max_unpool{1,2,3}d: default and explicit output sizes,
the round trip through max pooling, deterministic duplicates, the backward gather."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastpool
from tests.oracle import to_channels_first, to_channels_last

BACKENDS = ["cpu", "numpy"]
ND_SIZES = {1: (10,), 2: (7, 8), 3: (5, 6, 4)}


def _torch_unpool(nd, x, indices, *args, **kwargs):
    return getattr(F, f"max_unpool{nd}d")(torch.from_numpy(x), torch.from_numpy(indices),
                                          *args, **kwargs).numpy()


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("window", [dict(kernel_size=2), dict(kernel_size=3, stride=2,
                                    padding=1)], ids=["k2", "k3s2p1"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_matches_torch(nd, window, channels_last, batched, backend):
    rng = np.random.default_rng(nd)
    x = rng.standard_normal((2, 3, *ND_SIZES[nd]))
    t = torch.from_numpy(x)
    out, indices = getattr(F, f"max_pool{nd}d")(t, **window, return_indices=True)
    out, indices = out.numpy(), indices.numpy()
    want = _torch_unpool(nd, out, indices, **window, output_size=x.shape[-nd:])
    grad = rng.standard_normal(want.shape)
    t_out = torch.from_numpy(out).requires_grad_()
    getattr(F, f"max_unpool{nd}d")(t_out, torch.from_numpy(indices), **window,
                                   output_size=x.shape[-nd:]).backward(torch.from_numpy(grad))
    if not batched:
        out, indices, want, grad = out[0], indices[0], want[0], grad[0]
    kw = dict(channels_last=channels_last, backend=backend)
    if channels_last:
        out, indices, grad = (np.ascontiguousarray(to_channels_last(a, nd))
                              for a in (out, indices, grad))
    got = getattr(fastpool, f"max_unpool{nd}d")(out, indices, **window,
                                               output_size=ND_SIZES[nd], **kw)
    got_grad = getattr(fastpool, f"max_unpool{nd}d_backward")(grad, indices, **kw)
    if channels_last:
        got, got_grad = to_channels_first(got, nd), to_channels_first(got_grad, nd)
    np.testing.assert_array_equal(got, want)
    want_grad = t_out.grad.numpy()
    np.testing.assert_array_equal(got_grad, want_grad if batched else want_grad[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_size_rule(backend):
    out, indices = fastpool.max_pool2d(np.ones((1, 2, 6, 6)), 2, return_indices=True)
    assert fastpool.max_unpool2d(out, indices, 2, backend=backend).shape == (1, 2, 6, 6)
    # explicit sizes within (default - stride, default + stride), nd or nd + 2 entries
    for size in [(5, 7), (1, 2, 7, 5)]:
        got = fastpool.max_unpool2d(out, indices, 2, output_size=size, backend=backend)
        want = _torch_unpool(2, out, indices, 2, output_size=size)
        np.testing.assert_array_equal(got, want)
    for bad in [(4, 6), (8, 6)]:
        with pytest.raises(ValueError, match=r"max_unpool2d: output_size .* strictly "
                                             r"between \(4, 4\) and \(8, 8\)"):
            fastpool.max_unpool2d(out, indices, 2, output_size=bad, backend=backend)
    with pytest.raises(ValueError, match=r"output_size must have 2 or 4 entries"):
        fastpool.max_unpool2d(out, indices, 2, output_size=(6, 6, 6), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_keep_the_last_input(backend):
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    indices = np.array([[[2, 0, 2, 0]]])
    want = np.array([[[4.0, 0.0, 3.0, 0.0]]])
    for threads in (1, None):
        try:
            fastpool.set_num_threads(threads)
            got = fastpool.max_unpool1d(x, indices, 1, backend=backend)
        finally:
            fastpool.set_num_threads(None)
        np.testing.assert_array_equal(got, want)
    # channels-last with duplicates spread over a larger batch
    big = np.random.default_rng(0).standard_normal((4, 16, 8))
    idx = np.random.default_rng(1).integers(0, 3, big.shape)
    got = fastpool.max_unpool1d(big, idx, 2, output_size=(32,), channels_last=True,
                                backend=backend)
    for n, c in np.ndindex(4, 8):
        for target in range(3):
            writers = np.flatnonzero(idx[n, :, c] == target)
            expected = big[n, writers[-1], c] if len(writers) else 0.0
            assert got[n, target, c] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_and_bool_values(backend):
    x = np.array([[[7, 255, 0]]], np.uint8)
    indices = np.array([[[1, 2, 5]]])
    got = fastpool.max_unpool1d(x, indices, 2, backend=backend)
    np.testing.assert_array_equal(got, [[[0, 7, 255, 0, 0, 0]]])
    assert got.dtype == np.uint8
    got = fastpool.max_unpool1d(x.astype(bool), indices, 2, backend=backend)
    assert got.dtype == bool and got.tolist() == [[[False, True, True, False, False, False]]]


@pytest.mark.parametrize("call, error, pattern", [
    (lambda o, i: fastpool.max_unpool1d(o, np.where(i == i.max(), 6, i), 2), ValueError,
     r"max_unpool1d: indices\[2\] .* is 6, outside the output plane \[0, 6\)"),
    (lambda o, i: fastpool.max_unpool1d(o, np.where(i == i.min(), -1, i), 2), ValueError,
     r"is -1, outside"),
    (lambda o, i: fastpool.max_unpool1d(o, i.astype(np.int32), 2), ValueError,
     r"indices must be int64"),
    (lambda o, i: fastpool.max_unpool1d(o, i[..., :2], 2), ValueError,
     r"indices has shape \(1, 1, 2\)"),
    (lambda o, i: fastpool.max_unpool1d(o.astype(np.complex64), i, 2), TypeError,
     r"dtype complex64"),
    (lambda o, i: fastpool.max_unpool1d_backward(np.ones((1, 1, 6)), np.where(i == i.min(), 9, i)),
     ValueError, r"max_unpool1d_backward: indices\[.\] .* is 9"),
    (lambda o, i: fastpool.max_unpool1d_backward(np.ones((1, 1, 6)), np.where(i == i.max(), -1, i)),
     ValueError, r"max_unpool1d_backward: indices\[.\] .* is -1"),
    (lambda o, i: fastpool.max_unpool1d_backward(np.ones((1, 2, 6)), i), ValueError,
     r"do not fit grad_output of shape \(1, 2, 6\)"),
], ids=range(8))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_unpool_calls(call, error, pattern, backend, monkeypatch):
    from fastpool import _dispatch
    monkeypatch.setattr(_dispatch, "_BACKEND_MODULES",
                        {**_dispatch._BACKEND_MODULES, "cpu": _dispatch._BACKEND_MODULES[backend]})
    out, indices = fastpool.max_pool1d(np.array([[[1.0, 5.0, 2.0, 0.0, 3.0, 4.0]]]), 2,
                                       return_indices=True)
    with pytest.raises(error, match=pattern):
        call(out, indices)


@pytest.mark.parametrize("channels", [None, 3], ids=["cf", "cl"])
def test_backward_kernels_count_and_zero_every_index_outside(channels):
    """The gather runs to the first index outside the plane and on after it: each
    one outside gives 0 and is counted, runs of them and one at the end included."""
    import importlib
    kernels = importlib.import_module("fastpool.cpu.kernels")
    rng = np.random.default_rng(0)
    shape = (4, 9) if channels is None else (4, 9, channels)
    grad_out = rng.standard_normal((4, 6) + shape[2:])
    indices = rng.integers(0, 6, shape)
    indices[0, 0], indices[1, 3:5], indices[2, -1], indices[3, ::2] = -1, 6, 99, -7
    outside = indices < 0
    outside |= indices >= 6
    got = np.full(shape, np.nan)
    kernel = kernels.unpool_backward_channels_first if channels is None else \
        kernels.unpool_backward
    count = kernel.serial(grad_out, indices, got)
    want = np.take_along_axis(grad_out, np.clip(indices, 0, 5), axis=1)
    np.testing.assert_array_equal(got, np.where(outside, 0, want))
    assert count == outside.sum()
