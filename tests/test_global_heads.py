"""timm's global heads, avgmax and catavgmax (fastpool.global_pool{1,2,3}d), against
timm's formulas written in torch: values and autograd gradients, both layouts, every
host back end (the CUDA back end: tests/cuda/test_cuda_new_ops.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose

import fastpool
from fastpool.torch import functional as TF
from fastpool.torch import nn as TN

_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def timm_head(t, mode, nd):
    """timm's adaptive_avgmax_pool / adaptive_catavgmax_pool (output_size 1)."""
    avg, top = _AVG[nd](t, 1), _MAX[nd](t, 1)
    return 0.5 * (avg + top) if mode == "avgmax" else torch.cat([avg, top], 1)


def _to_layout(a, channels_last):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if channels_last else a


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["avgmax", "catavgmax"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("keepdims", [False, True])
def test_heads_match_timm_values_and_gradients(backend, channels_last, mode, nd, keepdims):
    rng = np.random.default_rng(nd)
    x = rng.standard_normal((2, 3) + (5, 4, 3)[:nd])
    t = torch.tensor(x, requires_grad=True)
    ref = timm_head(t, mode, nd)
    g = torch.tensor(rng.standard_normal(tuple(ref.shape)))
    (want_grad,) = torch.autograd.grad(ref, t, g)
    want = _to_layout(ref.detach().numpy(), channels_last)
    grad = _to_layout(g.numpy(), channels_last)
    if not keepdims:
        want, grad = want.reshape(want.shape[0], -1), grad.reshape(grad.shape[0], -1)
    xin = _to_layout(x, channels_last)
    kw = dict(channels_last=channels_last, backend=backend)
    out, indices = getattr(fastpool, f"global_pool{nd}d")(xin, mode, keepdims,
                                                          return_indices=True, **kw)
    assert out.shape == want.shape and indices.shape[-1 if channels_last else 1] == 3
    assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    got = getattr(fastpool, f"global_pool{nd}d_backward")(grad, indices, xin.shape, mode,
                                                          **kw)
    assert_allclose(got, _to_layout(want_grad.numpy(), channels_last), rtol=1e-12,
                    atol=1e-14)


@pytest.mark.parametrize("mode", ["avg", "max", "min"])
def test_plain_modes_are_the_named_functions(mode):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert_allclose(fastpool.global_pool2d(x, mode),
                    getattr(fastpool, f"global_{mode}_pool2d")(x))


def test_float32_unbatched_and_the_generic_result():
    x = np.random.default_rng(1).standard_normal((3, 6, 5)).astype(np.float32)
    out = fastpool.global_pool2d(x, "catavgmax")
    assert out.shape == (6,) and out.dtype == np.float32
    assert_allclose(out, np.concatenate([x.mean((1, 2)), x.max((1, 2))]), rtol=1e-6)
    assert_allclose(fastpool.global_pool2d(x, "avgmax"),
                    0.5 * (x.mean((1, 2)) + x.max((1, 2))), rtol=1e-6)


def test_empty_batch():
    x = np.zeros((0, 3, 4, 4), np.float32)
    out, idx = fastpool.global_pool2d(x, "catavgmax", return_indices=True)
    assert out.shape == (0, 6)
    grad = fastpool.global_pool2d_backward(out, idx, x.shape, "catavgmax")
    assert grad.shape == x.shape


def test_errors():
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="global_pool2d: mode must be one of"):
        fastpool.global_pool2d(x, "lp")
    with pytest.raises(TypeError):
        fastpool.global_pool2d(x.astype(np.int32), "avgmax")  # the average needs floats
    out, idx = fastpool.global_pool2d(x, "catavgmax", return_indices=True)
    with pytest.raises(ValueError, match="global_pool2d_backward: grad_output has shape"):
        fastpool.global_pool2d_backward(out[:, :3], idx, x.shape, "catavgmax")
    with pytest.raises(ValueError, match="mode must be one of"):
        TN.GlobalPool2d("sum")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["avgmax", "catavgmax"])
def test_torch_functional_and_module_match_timm(channels_last, mode):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ref = timm_head(x, mode, 2)
    module = TN.GlobalPool2d(mode, keepdims=True)
    out = module(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0])
    assert module.feat_mult() == (2 if mode == "catavgmax" else 1)
    flat = TF.global_pool2d(x, mode)
    torch.testing.assert_close(flat, ref.flatten(1))
    assert TF.global_pool1d(torch.randn(3, 7), mode).shape == (
        (6,) if mode == "catavgmax" else (3,))
