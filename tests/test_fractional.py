"""Fractional max pooling: with torch's ``_random_samples`` the values and indices equal
torch's bit for bit; the backward scatter equals torch's autograd."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastpool
from tests.oracle import to_channels_first, to_channels_last

BACKENDS = ["cpu", "numpy"]
SIZES = {2: (11, 13), 3: (8, 9, 8)}


def _torch(nd, x, kernel, samples, **kwargs):
    t = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    out, indices = getattr(F, f"fractional_max_pool{nd}d")(
        t, kernel, return_indices=True, _random_samples=torch.from_numpy(samples), **kwargs)
    return t, out, indices


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizing", [dict(output_size=4), dict(output_ratio=0.5),
                                    dict(output_size=1), dict(tight=True, kernel=3)],
                         ids=["out4", "ratio", "out1", "k-tight"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_bit_for_bit(nd, dtype, sizing, channels_last, backend):
    sizing = dict(sizing)
    kernel = sizing.pop("kernel", 2)
    if sizing.pop("tight", False):  # the largest windows torch allows: k = in - out + 1
        sizing["output_size"] = tuple(n - kernel + (1 if nd == 2 else 0) for n in SIZES[nd])
    if "output_ratio" in sizing:
        sizing["output_ratio"] = (sizing["output_ratio"],) * nd  # torch wants a tuple
    rng = np.random.default_rng(nd)
    x = rng.integers(-4, 5, (2, 3, *SIZES[nd])).astype(dtype)  # ties
    x[0, 1].flat[5] = np.nan
    samples = rng.random((3, 3, nd)).astype(dtype)  # a larger batch than the input
    samples[0, 0] = 0.9999999 if dtype == np.float64 else np.float32(0.9999999)
    t, out, indices = _torch(nd, x, kernel, samples, **sizing)
    grad = rng.standard_normal(out.shape).astype(dtype)
    out.backward(torch.from_numpy(grad))
    data = np.ascontiguousarray(to_channels_last(x, nd)) if channels_last else x
    kw = dict(channels_last=channels_last, backend=backend)
    got, got_indices = getattr(fastpool, f"fractional_max_pool{nd}d")(
        data, kernel, **sizing, return_indices=True, _random_samples=samples, **kw)
    grad_in = getattr(fastpool, f"fractional_max_pool{nd}d_backward")(
        to_channels_last(grad, nd) if channels_last else grad, got_indices, data.shape, **kw)
    if channels_last:
        got, got_indices, grad_in = (to_channels_first(a, nd)
                                     for a in (got, got_indices, grad_in))
    np.testing.assert_array_equal(got, out.detach().numpy())
    np.testing.assert_array_equal(got_indices, indices.numpy())
    np.testing.assert_array_equal(grad_in, t.grad.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_alpha_and_unbatched_input(backend):
    x = np.random.default_rng(0).standard_normal((3, 9, 9))
    samples = np.random.default_rng(1).random((1, 3, 2))
    # in - k = 8, out - 1 = 4: alpha is exactly 2
    _, out, indices = _torch(2, x, 1, samples, output_size=5)
    got, got_indices = fastpool.fractional_max_pool2d(x, 1, 5, return_indices=True,
                                                      _random_samples=samples, backend=backend)
    np.testing.assert_array_equal(got, out.detach().numpy())
    np.testing.assert_array_equal(got_indices, indices.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan_and_all_minus_inf_windows(backend):
    x = np.full((1, 1, 4, 4), -np.inf)
    x[0, 0, :2, :2] = np.nan
    samples = np.full((1, 1, 2), 0.3)
    _, out, indices = _torch(2, x, 2, samples, output_size=2)
    got, got_indices = fastpool.fractional_max_pool2d(x, 2, 2, return_indices=True,
                                                      _random_samples=samples, backend=backend)
    np.testing.assert_array_equal(got, out.detach().numpy())
    np.testing.assert_array_equal(got_indices, indices.numpy())


def test_seed_draws_reproducible_samples():
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10))
    a = fastpool.fractional_max_pool2d(x, 2, output_ratio=0.7, seed=7)
    b = fastpool.fractional_max_pool2d(x, 2, output_ratio=0.7,
                                       seed=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    samples = np.random.default_rng(7).random((2, 3, 2))
    np.testing.assert_array_equal(a, fastpool.fractional_max_pool2d(
        x, 2, output_ratio=0.7, _random_samples=samples))
    assert not np.array_equal(a, fastpool.fractional_max_pool2d(x, 2, output_ratio=0.7,
                                                                seed=8))


@pytest.mark.parametrize("call, error, pattern", [
    (lambda x: fastpool.fractional_max_pool2d(x, 2), ValueError,
     r"fractional_max_pool2d: give output_size or output_ratio"),
    (lambda x: fastpool.fractional_max_pool2d(x, 5, output_size=5), ValueError,
     r"kernel_size 5 is too large for output size 5 on axis 0 of input size 8"),
    (lambda x: fastpool.fractional_max_pool2d(x, 2, output_ratio=0.1), ValueError,
     r"output size \(0, 0\)"),
    (lambda x: fastpool.fractional_max_pool2d(x, 2, output_ratio=1.5), ValueError,
     r"output_ratio must be a float or 2 floats in \(0, 1\), got 1\.5"),
    (lambda x: fastpool.fractional_max_pool2d(x, 2, 3, _random_samples=np.zeros((1, 3, 2))),
     ValueError, r"_random_samples must have shape \(N, C, 2\) with N >= 2 and C = 3"),
    (lambda x: fastpool.fractional_max_pool2d(x, 2, 3, _random_samples=np.zeros(
        (2, 3, 2), np.float32)), TypeError, r"input's dtype float64"),
    (lambda x: fastpool.fractional_max_pool2d(x, 2, 3, _random_samples=np.ones((2, 3, 2))),
     ValueError, r"must lie in \[0, 1\)"),
], ids=range(7))
def test_bad_fractional_calls(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(np.zeros((2, 3, 8, 8)))


def test_three_d_windows_must_fit_strictly_as_in_torch():
    x = np.zeros((1, 1, 7, 7, 7))
    with pytest.raises(ValueError, match=r"needs output \+ kernel - 1 < input, as torch"):
        fastpool.fractional_max_pool3d(x, 3, output_size=5)
    assert fastpool.fractional_max_pool2d(x[..., 0], 3, output_size=5, seed=0).shape == \
        (1, 1, 5, 5)  # in 2-D, out + k - 1 == in is allowed


def test_channels_last_channel_blocks_match_torch(monkeypatch):
    """Channels-last pools blocks of channels transposed into a scratch: blocks of 16
    and a remainder (40 channels, the scratch lowered to fit 16 planes), in parallel
    and serial launches."""
    from fastpool.cpu import pooling, runtime

    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, (2, 40, 9, 11)).astype(np.float64)  # ties
    x[1, 17].flat[[4, 30]] = np.nan
    samples = rng.random((2, 40, 2))
    monkeypatch.setattr(pooling, "FRACTIONAL_SCRATCH_BYTES", 16 * x[0, 0].nbytes)
    _, out, indices = _torch(2, x, 3, samples, output_size=(4, 5))
    data = np.ascontiguousarray(to_channels_last(x, 2))
    for serial_limit in (0, 1 << 30):
        monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", serial_limit)
        got, got_indices = fastpool.fractional_max_pool2d(
            data, 3, (4, 5), return_indices=True, _random_samples=samples, channels_last=True)
        np.testing.assert_array_equal(to_channels_first(got, 2), out.detach().numpy())
        np.testing.assert_array_equal(to_channels_first(got_indices, 2), indices.numpy())
