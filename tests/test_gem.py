"""GeM pooling against its formula written with torch ops and autograd (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastpool
from tests.oracle import to_channels_first, to_channels_last

BACKENDS = ["cpu", "numpy"]
ND_SIZES = {1: (9,), 2: (6, 7), 3: (4, 5, 6)}


def torch_gem(x, p, eps, nd, output_size=1, kernel_size=None, stride=None):
    """GeM written with torch ops: mean(clamp(x, eps) ** p) ** (1/p)."""
    powered = x.clamp(min=eps) ** p
    if kernel_size is None:
        mean = getattr(F, f"adaptive_avg_pool{nd}d")(powered, output_size)
    else:
        mean = getattr(F, f"avg_pool{nd}d")(powered, kernel_size, stride)
    return mean ** (1 / p)


def _case(nd, per_channel, rng):
    x = rng.standard_normal((2, 3, *ND_SIZES[nd]))  # negatives are clamped to eps
    p = rng.uniform(1.5, 4.0, 3) if per_channel else 3.0
    return x, p


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("windows", [{}, dict(output_size=2), dict(kernel_size=2, stride=1)],
                         ids=["global", "adaptive", "sliding"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["p", "p-per-channel"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gem_forward_and_gradients_match_torch(nd, windows, per_channel, channels_last,
                                               backend):
    rng = np.random.default_rng(nd)
    x, p = _case(nd, per_channel, rng)
    eps = 1e-3
    tx = torch.from_numpy(x).requires_grad_()
    tp = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    want = torch_gem(tx, tp.reshape(-1, *(1,) * nd) if per_channel else tp, eps, nd,
                     **windows)
    grad = rng.standard_normal(want.shape)
    want.backward(torch.from_numpy(grad))
    data = np.ascontiguousarray(to_channels_last(x, nd)) if channels_last else x
    g = np.ascontiguousarray(to_channels_last(grad, nd)) if channels_last else grad
    kw = dict(channels_last=channels_last, backend=backend, **windows)
    out = getattr(fastpool, f"gem_pool{nd}d")(data, p, eps, **kw)
    grad_x, grad_p = getattr(fastpool, f"gem_pool{nd}d_backward")(g, data, p, eps, **kw)
    if channels_last:
        out, grad_x = to_channels_first(out, nd), to_channels_first(grad_x, nd)
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grad_p, tp.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gem_corners(backend):
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((2, 3, 5, 6))) + 0.1
    # p = 1 is the average; large p approaches the max
    np.testing.assert_allclose(fastpool.gem_pool2d(x, 1.0, backend=backend),
                               fastpool.adaptive_avg_pool2d(x, 1, backend=backend), rtol=1e-12)
    largest = fastpool.adaptive_max_pool2d(x, 1, backend=backend)
    for p in (10.0, 50.0, 100.0):  # max * (1/n) ** (1/p) <= gem <= max, n = 30
        gem = fastpool.gem_pool2d(x, p, backend=backend)
        assert (gem <= largest * (1 + 1e-12)).all()
        assert (gem >= largest * (1 / 30) ** (1 / p) * (1 - 1e-12)).all()
    # all values below eps: the result is eps, the input gets no gradient, p does (0)
    low = -np.ones((1, 2, 3, 3))
    np.testing.assert_allclose(fastpool.gem_pool2d(low, 3.0, 1e-6, backend=backend), 1e-6)
    grad_x, grad_p = fastpool.gem_pool2d_backward(np.ones((1, 2, 1, 1)), low, 3.0, 1e-6,
                                                  backend=backend)
    assert not grad_x.any() and abs(grad_p) < 1e-12
    # float16 input: computed in float32, returned in float16
    half = x.astype(np.float16)
    out = fastpool.gem_pool2d(half, 3.0, backend=backend)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, torch_gem(torch.from_numpy(half.astype(np.float32)), 3.0,
                                              1e-6, 2).numpy().astype(np.float16), rtol=1e-3)


def test_gem_gradcheck_in_float64():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.05
    p = torch.tensor(2.5, dtype=torch.float64)

    class GeM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            ctx.save_for_backward(x, p)
            return torch.from_numpy(fastpool.gem_pool2d(x.numpy(), float(p)))

        @staticmethod
        def backward(ctx, grad):
            x, p = ctx.saved_tensors
            gx, gp = fastpool.gem_pool2d_backward(grad.numpy(), x.numpy(), float(p))
            return torch.from_numpy(gx), torch.tensor(float(gp), dtype=torch.float64)

    assert torch.autograd.gradcheck(GeM.apply, (x.requires_grad_(), p.requires_grad_()))


@pytest.mark.parametrize("call, error, pattern", [
    (lambda x: fastpool.gem_pool2d(x, 0.0), ValueError, r"gem_pool2d: p must be positive.*0\.0"),
    (lambda x: fastpool.gem_pool2d(x, [1.0, 2.0]), TypeError, r"p must be .*shape \(3,\)"),
    (lambda x: fastpool.gem_pool2d(x, [1.0, -2.0, 1.0]), ValueError, r"every p must be"),
    (lambda x: fastpool.gem_pool2d(x, 3.0, eps=0), ValueError, r"eps must be a positive"),
    (lambda x: fastpool.gem_pool2d(x.astype(np.int32)), TypeError, r"dtype int32"),
    (lambda x: fastpool.gem_pool2d_backward(np.ones((1, 3, 2, 2)), x), ValueError,
     r"grad_output has shape \(1, 3, 2, 2\)"),
], ids=range(6))
def test_gem_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(np.ones((1, 3, 4, 4)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("windows, p", [
    ({}, 3.0), ({}, 1.0), (dict(output_size=(2, 3)), 7.5),
    (dict(kernel_size=(2, 3), stride=(1, 2)), [1.0, 2.0, 4.0, 2.5]),
], ids=["global-p3", "global-p1", "adaptive-large-p", "sliding-per-channel"])
def test_gem_fused_kernels_in_float32_match_torch(channels_last, windows, p):
    """The CPU back end's fused kernels (float32; integer p multiplied out, general
    and per-channel powers, negatives clamped) against torch's formula in float64."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 7, 8)).astype(np.float32)  # negatives clamped to eps
    eps = 1e-2
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    tp = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    want = torch_gem(tx, tp.reshape(-1, 1, 1) if tp.dim() else tp, eps, 2, **windows)
    grad = rng.standard_normal(want.shape).astype(np.float32)
    want.backward(torch.from_numpy(grad.astype(np.float64)))
    data = np.ascontiguousarray(to_channels_last(x, 2)) if channels_last else x
    g = np.ascontiguousarray(to_channels_last(grad, 2)) if channels_last else grad
    kw = dict(channels_last=channels_last, **windows)
    out = fastpool.gem_pool2d(data, p, eps, **kw)
    grad_x, grad_p = fastpool.gem_pool2d_backward(g, data, p, eps, **kw)
    assert out.dtype == grad_x.dtype == np.float32
    if channels_last:
        out, grad_x = to_channels_first(out, 2), to_channels_first(grad_x, 2)
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=2e-6)
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad_p, tp.grad.numpy(), rtol=2e-5, atol=1e-6)
    if p == 1.0:
        avg = fastpool.adaptive_avg_pool2d(np.maximum(data, np.float32(eps)), 1, **kw)
        np.testing.assert_allclose(fastpool.gem_pool2d(data, p, eps, **kw), avg, rtol=1e-6)
    half = fastpool.gem_pool2d(data.astype(np.float16), p, eps, **kw)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), fastpool.gem_pool2d(
        data.astype(np.float16).astype(np.float32), p, eps, **kw), rtol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("windows", [{}, dict(kernel_size=4, stride=1)],
                         ids=["global", "sliding"])
# (p's gradient for a small p takes the difference of nearly equal terms: float32's
# tolerance allows for that; a wrong logarithm of the subnormal is off by far more.)
@pytest.mark.parametrize("dtype, eps, rtol", [(np.float64, 1e-310, 1e-9),
                                              (np.float32, 1e-40, 2e-3)], ids=["f64", "f32"])
def test_gem_unusual_values_take_the_exact_logarithm(channels_last, windows, dtype, eps,
                                                     rtol):
    """The fused kernels' fast logarithm covers positive normal numbers; windows with
    a subnormal (an eps below the normal range) take np.log: with a small p, whose
    powers of subnormals are not negligible."""
    rng = np.random.default_rng(6)
    x = (np.abs(rng.standard_normal((2, 3, 5, 5))) + 0.5).astype(dtype)
    x[0, 1, 1, 1] = x[1, 2, 2, 3] = -1.0  # clamped to the subnormal eps
    eps = float(dtype(eps))  # as fastpool computes it
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    tp = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    want = torch_gem(tx, tp, eps, 2, **windows)
    grad = rng.standard_normal(want.shape).astype(dtype)
    want.backward(torch.from_numpy(grad.astype(np.float64)))
    data = np.ascontiguousarray(to_channels_last(x, 2)) if channels_last else x
    g = np.ascontiguousarray(to_channels_last(grad, 2)) if channels_last else grad
    kw = dict(channels_last=channels_last, **windows)
    grad_x, grad_p = fastpool.gem_pool2d_backward(g, data, 0.01, eps, **kw)
    grad_x = to_channels_first(grad_x, 2) if channels_last else grad_x
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(grad_p, tp.grad.numpy(), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gem_backward_without_grad_p_skips_it(backend):
    """The internal need_grad_p=False (for callers whose p takes no gradient) gives the
    same grad_x and None for p."""
    from fastpool import _gem

    x = np.random.default_rng(8).standard_normal((2, 3, 5, 4)).astype(np.float32)
    grad = np.ones((2, 3, 2, 2), np.float32)
    args = (grad, x, 2, 3.0, 1e-3, 2, None, None)
    kw = dict(op="gem_pool2d", backend=backend)
    grad_x, grad_p = _gem.gem_pool_backward(*args, **kw)
    alone, none = _gem.gem_pool_backward(*args, need_grad_p=False, **kw)
    assert none is None and grad_p is not None
    np.testing.assert_array_equal(alone, grad_x)
