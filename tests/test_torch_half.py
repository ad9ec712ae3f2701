"""fastpool.torch on float16 and bfloat16 tensors, and under CPU autocast."""

import pytest
import torch
import torch.nn.functional as TF

from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn

CASES = [
    ("max_pool", (3, 2, 1), {}),
    ("avg_pool", (3, 2, 1), dict(count_include_pad=False)),
    ("lp_pool", (2, 2), {}),
    ("adaptive_max_pool", (3,), {}),
    ("adaptive_avg_pool", (3,), {}),
]
SIZES = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("family, args, kwargs", CASES, ids=[c[0] for c in CASES])
def test_half_matches_torch_in_float32_rounded_once(family, args, kwargs, nd, dtype):
    # torch's own CPU avg_pool3d has no half kernels and its bf16 adaptive_avg_pool3d
    # accumulates in bf16: the oracle is torch in float32, rounded once to ``dtype``.
    x = torch.rand((2, 3) + SIZES[nd], generator=torch.Generator().manual_seed(nd)) + 0.1
    x_half = x.to(dtype).requires_grad_()
    x32 = x_half.detach().float().requires_grad_()
    got = getattr(FF, f"{family}{nd}d")(x_half, *args, **kwargs)
    want = getattr(TF, f"{family}{nd}d")(x32, *args, **kwargs)
    # Max pooling is exact; sums may differ from torch's by a float32 rounding, which can
    # flip one rounding to ``dtype``: torch's default tolerance for ``dtype``.
    check = torch.equal if "max" in family else lambda a, b: torch.testing.assert_close(
        a, b) is None
    assert got.dtype == dtype
    assert check(got.detach(), want.detach().to(dtype))
    grad = torch.rand(want.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got.backward(grad)
    want.backward(grad.float())
    assert x_half.grad.dtype == dtype
    assert check(x_half.grad, x32.grad.to(dtype))


def _net(pooling):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), pooling.MaxPool2d(3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), pooling.AvgPool2d(2),
        pooling.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def test_autocast_bfloat16_matches_torch():
    x = torch.randn(4, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, pooling in (("torch", torch.nn), ("fastpool", fnn)):
        net = _net(pooling)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        results[name] = out.float(), net[0].weight.grad
    (out, grad), (want, want_grad) = results["fastpool"], results["torch"]
    # bfloat16 has 8 bits of mantissa: agreement to a few of its rounding steps.
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, want_grad, rtol=5e-2, atol=5e-2)
