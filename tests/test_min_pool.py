"""Min pooling: torch's -max_pool(-x) on floats (values and indices), and a direct
NumPy minimum over sliding_window_view for integers at their extremes, where
-max(-x) is wrong."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

import fastpool
from tests.oracle import to_channels_first, to_channels_last

BACKENDS = ["cpu", "numpy"]
ND_SIZES = {1: (11,), 2: (7, 9), 3: (5, 6, 7)}


def _torch_min(nd, x, *args, adaptive=False, **kwargs):
    t = -torch.from_numpy(np.ascontiguousarray(x))
    name = f"adaptive_max_pool{nd}d" if adaptive else f"max_pool{nd}d"
    out, indices = getattr(F, name)(t, *args, return_indices=True, **kwargs)
    return (-out).numpy(), indices.numpy()


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=2,
                                    padding=1, ceil_mode=True),
                                    dict(kernel_size=2, stride=1, padding=1, dilation=2)],
                         ids=["k2", "k3s2p1ceil", "dilated"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_min_pool_matches_torch_negated_max(nd, kwargs, channels_last, backend):
    rng = np.random.default_rng(nd)
    x = rng.integers(-3, 4, (2, 3, *ND_SIZES[nd])).astype(np.float64)  # ties
    x[0, 0].flat[1] = np.nan
    x[1, 2].flat[2] = -np.inf
    want, want_indices = _torch_min(nd, x, **kwargs)
    data = np.ascontiguousarray(to_channels_last(x, nd)) if channels_last else x
    out, indices = getattr(fastpool, f"min_pool{nd}d")(
        data, **kwargs, return_indices=True, channels_last=channels_last, backend=backend)
    if channels_last:
        out, indices = to_channels_first(out, nd), to_channels_first(indices, nd)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(indices, want_indices)
    grad = rng.standard_normal(want.shape)
    t = torch.from_numpy(x).requires_grad_()
    (-getattr(F, f"max_pool{nd}d")(-t, **kwargs)).backward(torch.from_numpy(grad))
    got = getattr(fastpool, f"min_pool{nd}d_backward")(
        to_channels_last(grad, nd) if channels_last else grad, indices if not channels_last
        else to_channels_last(indices, nd), data.shape, channels_last=channels_last,
        backend=backend)
    np.testing.assert_array_equal(to_channels_first(got, nd) if channels_last else got,
                                  t.grad.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_and_global_min_match_torch(backend):
    x = np.random.default_rng(0).integers(-3, 4, (2, 3, 7, 10)).astype(np.float32)
    want, want_indices = _torch_min(2, x, (3, 4), adaptive=True)
    out, indices = fastpool.adaptive_min_pool2d(x, (3, 4), return_indices=True,
                                                backend=backend)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(indices, want_indices)
    want, want_indices = _torch_min(2, x, 1, adaptive=True)
    out, indices = fastpool.global_min_pool2d(x, return_indices=True, backend=backend)
    np.testing.assert_array_equal(out, want[..., 0, 0])
    np.testing.assert_array_equal(indices, want_indices[..., 0, 0])
    grad = np.ones_like(out)
    got = fastpool.global_min_pool2d_backward(grad, indices, x.shape, backend=backend)
    assert got.sum() == grad.sum() and got.reshape(2, 3, -1).argmax(-1).tolist() == \
        indices.tolist()
    assert np.array_equal(fastpool.pool(x, "min", (2, 2), backend=backend),
                          fastpool.min_pool2d(x, 2, backend=backend))
    assert np.array_equal(fastpool.adaptive_pool(x, "min", (1, 1), backend=backend)[..., 0, 0],
                          fastpool.global_min_pool2d(x, backend=backend))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint64, np.int8, np.int32,
                                   np.int64, np.bool_])
@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_extremes_are_exact(dtype, backend):
    info = np.iinfo(dtype) if dtype != np.bool_ else None
    values = [0, 1] if info is None else [info.min, info.min + 1, 0, info.max - 1, info.max]
    rng = np.random.default_rng(1)
    x = rng.choice(np.array(values, dtype=dtype), (2, 3, 12))
    for kernel, stride in [(2, 2), (3, 1), (5, 3)]:
        want = sliding_window_view(x, kernel, axis=-1)[..., ::stride, :].min(-1)
        got, indices = fastpool.min_pool1d(x, kernel, stride, return_indices=True,
                                           backend=backend)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.take_along_axis(x, indices, -1), want)
    # padding is the dtype's highest value: it never wins
    padded = fastpool.min_pool1d(x, 3, 1, 1, backend=backend)
    np.testing.assert_array_equal(padded[..., 0], x[..., :2].min(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zeros_and_nan(backend):
    x = np.array([[[-0.0, 0.0, 0.0, -0.0, np.nan, 1.0]]])
    out, indices = fastpool.min_pool1d(x, 2, return_indices=True, backend=backend)
    assert np.signbit(out[0, 0, :2]).tolist() == [True, False]  # ties keep the first
    assert np.isnan(out[0, 0, 2]) and indices.tolist() == [[[0, 2, 4]]]


def test_min_rejects_what_max_rejects():
    with pytest.raises(TypeError, match=r"min_pool2d: input dtype complex64"):
        fastpool.min_pool2d(np.zeros((1, 1, 2, 2), np.complex64), 2)
    with pytest.raises(ValueError, match=r"adaptive_pool: mode must be 'max', 'min' or 'avg'"):
        fastpool.adaptive_pool(np.zeros((2, 2)), "lp", (1, 1))
