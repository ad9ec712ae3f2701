"""Half precision, integer types and host synchronisation of the CUDA back end.

float16 and bfloat16 (``ml_dtypes.bfloat16`` on the host; bits in uint16 on the
device) are computed in float32 and rounded once on the store, as torch does:
results match the CPU back end run on the float32 input, rounded once to the
half type, to within one unit in the last place (the CPU's accumulation order
and float64 window arithmetic may round the other way at a tie).  Runs under
the simulator (which handles bfloat16 the same way: it is only uint16 there).
"""

import numpy as np
import pytest
from numba import cuda
from numpy.testing import assert_allclose, assert_array_equal

import fastpool
from fastpool.cuda import backend
from tests.cuda.test_cuda import BACKWARD, FORWARD, _host, _input

BF16 = backend.BFLOAT16
HALF = [np.dtype(np.float16), BF16]
# One unit in the last place at 1.0 (10 and 7 fraction bits).
ULP = {np.dtype(np.float16): 2.0**-10, BF16: 2.0**-7}


def _close_to_rounded(got, want32, dtype, exact=False):
    got = _host(got)
    assert got.dtype == dtype
    rounded = want32.astype(dtype).astype(np.float32)
    if exact:
        assert_array_equal(got.astype(np.float32), rounded)
    else:
        assert_allclose(got.astype(np.float32), rounded, rtol=ULP[dtype], atol=ULP[dtype] / 8)


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("op, args, kwargs, exact", FORWARD,
                         ids=[f"{f[0]}-{i}" for i, f in enumerate(FORWARD)])
def test_half_forward_matches_cpu_on_float32(op, args, kwargs, exact, channels_last, dtype):
    x = _input(2, channels_last, ties=exact).astype(dtype)
    function = getattr(fastpool, f"{op}2d")
    want = function(x.astype(np.float32), *args, channels_last=channels_last, **kwargs)
    got = function(x, *args, channels_last=channels_last, backend="cuda", **kwargs)
    if isinstance(want, tuple):
        _close_to_rounded(got[0], want[0], dtype, exact=True)
        assert_array_equal(_host(got[1]), want[1])
    else:
        _close_to_rounded(got, want, dtype, exact)


def _backward(op, x, grad, indices, args, kwargs, backend):
    backward = getattr(fastpool, f"{op}2d_backward")
    if "max" in op:
        return backward(grad, indices, x.shape, backend=backend)
    if op == "lp_pool":
        return backward(grad, x, *args, backend=backend, **kwargs)
    if op == "avg_pool":
        return backward(grad, x.shape, *args, backend=backend, **kwargs)
    return backward(grad, x.shape, backend=backend)


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
@pytest.mark.parametrize("op, args, kwargs", BACKWARD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BACKWARD)])
def test_half_backward_matches_cpu_on_float32(op, args, kwargs, dtype):
    x = _input(2, False, dtype=np.float32)
    if op == "lp_pool" and args[0] == 2:
        x = np.abs(x) + 0.1
    x32 = x.astype(dtype).astype(np.float32)  # the half input, exactly
    forward = getattr(fastpool, f"{op}2d")
    if "max" in op:
        out, indices = forward(x32, *args, return_indices=True, **kwargs)
    else:
        out, indices = forward(x32, *args, **kwargs), None
    grad = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    want = _backward(op, x32, grad.astype(np.float32), indices, args, kwargs, "cpu")
    got = _backward(op, x32.astype(dtype), grad, indices, args, kwargs, "cuda")
    _close_to_rounded(got, want, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_half_conv_matches_cpu_on_float32(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 7)).astype(dtype)
    w = rng.standard_normal((4, 3, 2, 2)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    f32 = [a.astype(np.float32) for a in (x, w, b)]
    want = fastpool.strided_conv2d(f32[0], f32[1], 2, 1, f32[2])
    got = fastpool.strided_conv2d(x, w, 2, 1, b, backend="cuda")
    _close_to_rounded(got, want, dtype)
    grad = rng.standard_normal(want.shape).astype(dtype)
    wants = fastpool.strided_conv2d_backward(grad.astype(np.float32), f32[0], f32[1], 2, 1)
    gots = fastpool.strided_conv2d_backward(grad, x, w, 2, 1, backend="cuda")
    for g, w32 in zip(gots, wants):
        _close_to_rounded(g, w32, dtype)


def test_half_max_backward_accumulates_in_float32():
    # 2048 + 1 + 1 in float16 is 2048 twice over (ties to even); float32 sums to 2050.
    x = np.zeros((1, 1, 3), np.float16)
    grad = np.array([[[2048, 1, 1]]], np.float16)
    indices = np.zeros((1, 1, 3), np.int64)
    got = fastpool.adaptive_max_pool1d_backward(grad, indices, x.shape, backend="cuda")
    assert got[0, 0, 0] == np.float16(2050)


def test_bfloat16_round_trips_and_rounds_to_nearest_even():
    values = np.array([1.0, 1 + 2**-7, -np.inf, np.nan, -0.0, 3.0e38, -2.5], np.float32)
    x = values.astype(BF16).reshape(1, 1, -1)
    out = fastpool.max_pool1d(x, 1, backend="cuda")
    assert out.dtype == BF16
    assert_array_equal(out.view(np.uint16), x.view(np.uint16))
    # Means exactly halfway between two bfloat16 values round to the even one.
    pairs = np.array([[[1.0, 1 + 2**-7, 1 + 2**-7, 1 + 2**-6]]], np.float32).astype(BF16)
    mean = fastpool.avg_pool1d(pairs, 2, backend="cuda").astype(np.float32)
    assert_array_equal(mean, [[[1.0, 1 + 2**-6]]])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                   np.int64, np.uint64, np.bool_])
def test_integer_max_pool_and_backward(dtype):
    x = _input(3, True, dtype=np.float64, ties=True)
    x = (x + 3).astype(dtype)
    out, idx = fastpool.max_pool3d(x, 2, 1, 1, return_indices=True, channels_last=True,
                                   backend="cuda")
    want, want_idx = fastpool.max_pool3d(x, 2, 1, 1, return_indices=True, channels_last=True)
    assert out.dtype == want.dtype
    assert_array_equal(out, want)
    assert_array_equal(idx, want_idx)


def test_window_tables_upload_once(monkeypatch):
    x = cuda.to_device(_input(2, False))
    fastpool.avg_pool2d(x, 3, 2, 1)  # uploads its table
    uploads = []
    real = backend.cuda.to_device
    monkeypatch.setattr(backend.cuda, "to_device",
                        lambda *a, **k: uploads.append(a) or real(*a, **k))
    fastpool.avg_pool2d(x, 3, 2, 1)
    out, idx = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    fastpool.max_pool2d_backward(out, idx, x.shape, kernel_size=3, stride=2, padding=1)
    fastpool.max_pool2d_backward(out, idx, x.shape, kernel_size=3, stride=2, padding=1)
    # max_pool2d's table is new (another window rule), its covering table too: at most
    # one upload of each, none on the repeated calls.
    assert len(uploads) <= 6
    uploads.clear()
    fastpool.max_pool2d_backward(out, idx, x.shape, kernel_size=3, stride=2, padding=1)
    fastpool.avg_pool2d(x, 3, 2, 1)
    assert uploads == []


@pytest.mark.parametrize("foreign", [False, True])
def test_max_backward_does_not_copy_to_the_host(monkeypatch, foreign):
    # The gather-or-scatter choice is made on the device: with the index check off
    # (the default outside tests), a backward call copies nothing back.
    monkeypatch.setattr(backend._config, "CUDA_CHECK_INDICES", False)
    x = _input(2, False, dtype=np.float64)
    out, idx = fastpool.max_pool2d(x, 2, 2, return_indices=True)
    if foreign:
        idx = np.random.default_rng(5).integers(0, 42, idx.shape)
    grad = np.random.default_rng(2).standard_normal(out.shape)
    want = fastpool.max_pool2d_backward(grad, idx, x.shape, backend="numpy")
    grad_d, idx_d = cuda.to_device(grad), cuda.to_device(idx)
    array_type = type(grad_d)

    def refuse(*args, **kwargs):
        raise AssertionError("copy_to_host during a backward call")

    real = array_type.copy_to_host
    monkeypatch.setattr(array_type, "copy_to_host", refuse)
    got = fastpool.max_pool2d_backward(grad_d, idx_d, x.shape, kernel_size=2, stride=2)
    monkeypatch.setattr(array_type, "copy_to_host", real)
    assert_array_equal(got.copy_to_host(), want)


def test_unpool_and_gem_neither_upload_nor_copy_back(monkeypatch):
    # Unpooling's outside-the-plane counter starts on the device and is read back
    # only under the index check (as the max backward's); GeM's powers are uploaded
    # once per value, so a repeated call moves nothing between host and device.
    monkeypatch.setattr(backend._config, "CUDA_CHECK_INDICES", False)
    x = cuda.to_device(_input(2, False))
    out, idx = fastpool.max_pool2d(x, 2, 2, return_indices=True)
    size = dict(output_size=x.shape[2:])
    want = fastpool.max_unpool2d(out.copy_to_host(), idx.copy_to_host(), 2, 2, **size,
                                 backend="numpy")
    fastpool.gem_pool2d(x, 3.0)
    moves = []
    real_upload = backend.cuda.to_device
    monkeypatch.setattr(backend.cuda, "to_device",
                        lambda *a, **k: moves.append("upload") or real_upload(*a, **k))
    array_type = type(x)
    real_copy = array_type.copy_to_host
    monkeypatch.setattr(array_type, "copy_to_host",
                        lambda self, *a, **k: moves.append("copy") or real_copy(self, *a, **k))
    restored = fastpool.max_unpool2d(out, idx, 2, 2, **size)
    grad = fastpool.max_unpool2d_backward(restored, idx)
    fastpool.gem_pool2d(x, 3.0)
    assert moves == []
    monkeypatch.setattr(array_type, "copy_to_host", real_copy)
    assert_array_equal(restored.copy_to_host(), want)
    assert_array_equal(grad.copy_to_host(), out.copy_to_host())
