"""fastpool.torch: same results and gradients as torch's pooling, modules, training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from numpy.testing import assert_allclose, assert_array_equal

from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn
from fastpool.torch.functional import _to_numpy

# (family, args per nd, kwargs): a few option mixes per family; the full option sweep of
# the kernels is in test_forward.py and test_backward.py.
CASES = [
    ("max_pool", (3, 2, 1), {}),
    ("max_pool", (2,), dict(dilation=2, ceil_mode=True, stride=1)),
    ("avg_pool", (3, 2, 1), dict(ceil_mode=True, count_include_pad=False)),
    ("avg_pool", (2,), {}),
    ("lp_pool", (2, 3, 2), dict(ceil_mode=True)),
    ("lp_pool", (1, 2), {}),
    ("adaptive_max_pool", (3,), {}),
    ("adaptive_avg_pool", (4,), {}),
]
SIZES = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}


def _input(nd, batched, channels_last, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(((2,) if batched else ()) + (3,) + SIZES[nd], generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if nd == 2
                         else torch.channels_last_3d)
    return x.requires_grad_()


def _torch_reference(family, nd):
    return getattr(TF, f"{family}{nd}d")


# torch has channels-last memory formats for 4-D and 5-D tensors only.
LAYOUTS = [pytest.param(nd, layout, id=f"{nd}d-{layout}") for nd in (1, 2, 3)
           for layout in ("cf-batched", "cf-unbatched", "cl-batched")
           if not (nd == 1 and layout.startswith("cl"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nd, layout", LAYOUTS)
@pytest.mark.parametrize("family, args, kwargs", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_functional_matches_torch_forward_and_backward(family, args, kwargs, nd, layout,
                                                       dtype):
    channels_last = layout.startswith("cl")
    x = _input(nd, layout.endswith("-batched"), channels_last, dtype)
    x_ref = x.detach().clone().requires_grad_()
    got = getattr(FF, f"{family}{nd}d")(x, *args, **kwargs)
    want = _torch_reference(family, nd)(x_ref, *args, **kwargs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                         atol=1e-13)
    assert got.shape == want.shape and got.dtype == want.dtype
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last if nd == 2
                                 else torch.channels_last_3d)
    assert_allclose(got.detach().numpy(), want.detach().numpy(), **tol)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got.backward(grad)
    want.backward(grad)
    assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), **tol)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_indices_match_torch(nd):
    x = _input(nd, True, nd > 1)
    out, idx = FF.max_pool2d(x, 3, 2, 1, return_indices=True) if nd == 2 else getattr(
        FF, f"max_pool{nd}d")(x, 2, return_indices=True)
    want, want_idx = TF.max_pool2d(x, 3, 2, 1, return_indices=True) if nd == 2 else getattr(
        TF, f"max_pool{nd}d")(x, 2, return_indices=True)
    assert_array_equal(idx.numpy(), want_idx.numpy())
    assert idx.dtype == torch.int64 and not idx.requires_grad
    a_out, a_idx = getattr(FF, f"adaptive_max_pool{nd}d")(x, 3, return_indices=True)
    assert_array_equal(a_idx.numpy(), getattr(TF, f"adaptive_max_pool{nd}d")(
        x, 3, return_indices=True)[1].numpy())


GRADCHECK = [(family, args, kwargs) for family, args, kwargs in CASES] + [
    ("global_max_pool", (), {}), ("global_avg_pool", (), dict(keepdims=True)),
    ("lp_pool", (float("inf"), 2), {}),
]


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("family, args, kwargs", GRADCHECK,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(GRADCHECK)])
def test_gradcheck(family, args, kwargs, nd):
    size = {1: (7,), 2: (5, 6), 3: (4, 5, 5)}[nd]
    # Distinct values spaced well apart: max pooling is differentiable there.
    x = torch.randperm(2 * 2 * int(np.prod(size)), generator=torch.Generator().manual_seed(0))
    x = (x.to(torch.float64).reshape((2, 2) + size) / 7 + 0.5).requires_grad_()
    function = getattr(FF, f"{family}{nd}d")
    assert torch.autograd.gradcheck(lambda t: function(t, *args, **kwargs), (x,))


def test_import_fastpool_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, fastpool; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "False"


def test_eager_calls_do_not_import_torch_dynamo():
    """An eager process's first fastpool op (forward and backward) does not import
    torch._dynamo, which torch.library.custom_op's implementations did at their first
    call: 1.2 s of that call."""
    import subprocess
    import sys
    code = ("import sys, torch; from fastpool.torch import functional as F, nn\n"
            "x = torch.rand(2, 3, 8, 8, requires_grad=True)\n"
            "F.max_pool2d(x, 2).sum().backward()\n"
            "nn.StridedConv2d(3, 4, 2)(x).sum().backward()\n"
            "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "False"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["cf", "cl"])
def test_calls_without_autograd_compute_no_indices(monkeypatch, layout):
    """A max or min pooling that no autograd records and whose caller wants no indices
    computes none (up to half its time: a ResNet stem's 3x3 stride-2 max pooling,
    32x64x112x112, took 7.8 ms against 16.5 with them), with torch's results; indices
    asked for, or needed by autograd, are computed."""
    import fastpool.cpu
    from fastpool import _dispatch

    asked = []
    plan = fastpool.cpu.plan_max_pool
    monkeypatch.setattr(fastpool.cpu, "plan_max_pool",
                        lambda *args: asked.append(args[-1]) or plan(*args))
    monkeypatch.setattr(_dispatch, "PLANS", _dispatch.PlanCache(8))  # every call plans
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        torch.testing.assert_close(FF.max_pool2d(x, 3, 2, 1), TF.max_pool2d(x, 3, 2, 1))
        torch.testing.assert_close(FF.adaptive_max_pool2d(x, 4), TF.adaptive_max_pool2d(x, 4))
        torch.testing.assert_close(FF.global_max_pool2d(x), x.amax((2, 3)))
        torch.testing.assert_close(FF.min_pool2d(x, 2), -TF.max_pool2d(-x, 2))
    assert asked == [False] * 4
    asked.clear()
    out, indices = FF.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert_array_equal(indices.numpy(), TF.max_pool2d(x, 3, 2, 1, return_indices=True)[1])
    needs_grad = x[..., :-1].clone().requires_grad_()  # another shape: another plan
    FF.max_pool2d(needs_grad, 3, 2, 1).sum().backward()
    assert asked == [True, True]


class _Seen(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops torch dispatches in its block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (the shape checks)
def test_ops_are_seen_by_dispatch_modes_the_profiler_and_tracing():
    """Calls that skip torch's dispatcher (no autograd to record) still reach a
    dispatch mode (FakeTensorMode, FlopCounterMode), the profiler or torch.jit.trace
    as the op."""
    x = torch.randn(1, 2, 6, 6)
    with _Seen() as seen:
        FF.avg_pool2d(x, 2)
    assert "fastpool.avg_pool2d.default" in seen.ops

    class FunctionsSeen(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    seen.ops.clear()
    with FunctionsSeen():
        FF.max_pool2d(x, 2)
    assert "fastpool.max_pool2d.default" in seen.ops
    with torch.profiler.profile() as profile:
        FF.avg_pool2d(x, 2)
    assert "fastpool::avg_pool2d" in {event.name for event in profile.events()}
    model = torch.nn.Sequential(fnn.MaxPool2d(2), fnn.AvgPool2d(2))
    traced = torch.jit.trace(model, x)  # records the ops, not constants
    other = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(traced(other), model(other))


def test_calls_without_autograd_keep_torch_semantics():
    """The calls that skip torch's dispatcher leave it the tensors it must see: a
    dual tensor of forward-mode AD (its tangent would be dropped: torch says the op
    has no forward derivative), a tensor with the negative bit set (resolved)."""
    import torch.autograd.forward_ad as forward_ad

    x = torch.randn(1, 1, 4, 4)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError):
        FF.avg_pool2d(forward_ad.make_dual(x, torch.ones_like(x)), 2)
    negated = torch.randn(1, 1, 4, 4, dtype=torch.complex64).conj().imag
    assert negated.is_neg()
    torch.testing.assert_close(FF.max_pool2d(negated, 2), TF.max_pool2d(negated, 2))


@pytest.mark.parametrize("call", ["functional", "op"])
def test_max_pool_backward_makes_no_gradient_for_the_indices(call):
    """Autograd fills a gradient of zeros for an output that got none (the indices)
    unless told not to: 0.45 ms of a 1 ms backward of an 8x32x64x64 max pooling."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = (FF.max_pool2d(x, 2) if call == "functional" else
           torch.ops.fastpool.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[0])
    ones = torch.ones_like(out)
    with _Seen() as seen:
        grad, = torch.autograd.grad(out, x, ones)
    assert seen.ops == ["fastpool.max_pool2d_backward.default"]
    torch.testing.assert_close(grad, torch.autograd.grad(TF.max_pool2d(x, 2), x,
                                                         torch.ones_like(out))[0])


def test_modules_are_drop_in():
    pairs = [
        (fnn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)),
        (fnn.MaxPool1d(2, return_indices=True), torch.nn.MaxPool1d(2, return_indices=True)),
        (fnn.MaxPool3d((1, 2, 2), dilation=(1, 2, 1)), torch.nn.MaxPool3d((1, 2, 2),
                                                                          dilation=(1, 2, 1))),
        (fnn.AvgPool1d(3, 2, 1), torch.nn.AvgPool1d(3, 2, 1)),
        (fnn.AvgPool2d(3, 1, 1, count_include_pad=False, divisor_override=2),
         torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False, divisor_override=2)),
        (fnn.AvgPool3d(2, ceil_mode=True), torch.nn.AvgPool3d(2, ceil_mode=True)),
        (fnn.LPPool1d(2, 3), torch.nn.LPPool1d(2, 3)),
        (fnn.LPPool2d(1.5, 2, ceil_mode=True), torch.nn.LPPool2d(1.5, 2, ceil_mode=True)),
        (fnn.LPPool3d(3, 2), torch.nn.LPPool3d(3, 2)),
        (fnn.AdaptiveMaxPool1d(4), torch.nn.AdaptiveMaxPool1d(4)),
        (fnn.AdaptiveMaxPool2d((3, None), return_indices=True),
         torch.nn.AdaptiveMaxPool2d((3, None), return_indices=True)),
        (fnn.AdaptiveMaxPool3d(2), torch.nn.AdaptiveMaxPool3d(2)),
        (fnn.AdaptiveAvgPool1d(5), torch.nn.AdaptiveAvgPool1d(5)),
        (fnn.AdaptiveAvgPool2d(1), torch.nn.AdaptiveAvgPool2d(1)),
        (fnn.AdaptiveAvgPool3d((2, 3, None)), torch.nn.AdaptiveAvgPool3d((2, 3, None))),
    ]
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs)
        assert isinstance(ours, type(theirs))
        nd = int(type(ours).__name__[-2])
        x = torch.rand((2, 3) + SIZES[nd], dtype=torch.float64) + 0.1
        got, want = ours(x), theirs(x)
        for g, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
            assert_allclose(g.numpy(), w.numpy(), rtol=1e-12)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_global_modules(nd):
    x = torch.rand((2, 3) + SIZES[nd])
    assert repr(getattr(fnn, f"GlobalAvgPool{nd}d")()) == f"GlobalAvgPool{nd}d(keepdims=False)"
    assert_allclose(getattr(fnn, f"GlobalAvgPool{nd}d")()(x).numpy(),
                    x.mean(dim=tuple(range(2, 2 + nd))).numpy(), rtol=1e-6)
    assert_allclose(getattr(fnn, f"GlobalMaxPool{nd}d")(keepdims=True)(x).numpy(),
                    x.amax(dim=tuple(range(2, 2 + nd)), keepdim=True).numpy())


def test_contiguous_tensors_are_not_copied():
    x = torch.rand(2, 3, 8, 8)
    assert _to_numpy(x, False).ctypes.data == x.data_ptr()
    xc = x.contiguous(memory_format=torch.channels_last)
    assert _to_numpy(xc, True).ctypes.data == xc.data_ptr()


def test_bad_input_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        FF.max_pool2d(np.zeros((1, 1, 4, 4)), 2)
    with pytest.raises(ValueError, match="padding"):
        FF.max_pool2d(torch.zeros(1, 1, 4, 4), 2, padding=2)
    with pytest.raises(TypeError, match="dtype"):
        FF.avg_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.int32), 2)


def _make_net(pooling):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), pooling.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), pooling.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 5)).double()


def test_small_cnn_trains_identically():
    data = torch.rand(8, 3, 20, 20, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    target = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    nets = {name: _make_net(module) for name, module in (("torch", torch.nn),
                                                         ("fastpool", fnn))}
    losses = {name: [] for name in nets}
    for name, net in nets.items():
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(20):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(data), target)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert_allclose(losses["fastpool"], losses["torch"], rtol=1e-10)
    assert losses["torch"][-1] < losses["torch"][0]
    for ours, theirs in zip(nets["fastpool"].parameters(), nets["torch"].parameters()):
        assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-9, atol=1e-12)
