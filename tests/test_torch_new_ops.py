"""fastpool.torch's min pooling, max unpooling, fractional max pooling and GeM: against
torch's own functions (unpooling, fractional with the same samples, min as -max(-x)) and
a plain-torch GeM, forward and gradients; modules and convert; torch.compile, export,
torch.func and opcheck.  The kernels' option sweeps are in test_min_pool.py,
test_unpool.py, test_fractional.py and test_gem.py."""

import pytest
import torch
import torch.nn.functional as TF

import fastpool.torch
from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn

SIZES = {1: (12,), 2: (8, 10), 3: (6, 5, 8)}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def _input(shape, channels_last=False, dtype=torch.float64, seed=0, positive=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x = x.abs() + 0.1 if positive else x
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST[len(shape) - 2])
    return x.requires_grad_()


def _grad_like(t, seed=1):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)


def _forward_backward(function, *inputs):
    """function's output and the gradients of a random weighting of it."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = function(*inputs)
    value = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(value, inputs, _grad_like(value))
    return out, grads


LAYOUTS = [pytest.param(nd, layout, id=f"{nd}d-{layout}") for nd in (1, 2, 3)
           for layout in ("batched", "unbatched", "channels-last")
           if not (nd == 1 and layout == "channels-last")]


def _shape(nd, layout):
    return ((2,) if layout != "unbatched" else ()) + (3,) + SIZES[nd]


# --------------------------------------------------------------------------
# Min pooling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nd, layout", LAYOUTS)
def test_min_pool_is_torch_negated_max(nd, layout):
    x = _input(_shape(nd, layout), layout == "channels-last")
    cases = [
        (lambda t: getattr(FF, f"min_pool{nd}d")(t, 3, 2, 1, ceil_mode=True,
                                                 return_indices=True),
         lambda t: getattr(TF, f"max_pool{nd}d")(-t, 3, 2, 1, ceil_mode=True,
                                                 return_indices=True)),
        (lambda t: getattr(FF, f"adaptive_min_pool{nd}d")(t, 3, return_indices=True),
         lambda t: getattr(TF, f"adaptive_max_pool{nd}d")(-t, 3, return_indices=True)),
    ]
    for ours, theirs in cases:
        (out, idx), (grad,) = _forward_backward(ours, x)
        (want, want_idx), (want_grad,) = _forward_backward(
            lambda t: (lambda r: (-r[0], r[1]))(theirs(t)), x)
        assert torch.equal(out, want) and torch.equal(idx, want_idx)
        assert torch.equal(grad, want_grad)
    out, idx = getattr(FF, f"global_min_pool{nd}d")(x, return_indices=True)
    assert torch.equal(out, x.detach().flatten(-nd).amin(-1))
    assert getattr(fnn, f"GlobalMinPool{nd}d")(keepdims=True)(x).shape == x.shape[:-nd] + (1,) * nd


def test_min_pool_modules_and_integers():
    pool = fnn.MinPool2d(3, 2, 1, return_indices=True)
    assert repr(pool) == repr(torch.nn.MaxPool2d(3, 2, 1)).replace("Max", "Min")
    assert not isinstance(pool, torch.nn.MaxPool2d)
    x = torch.randint(-5, 5, (2, 3, 7, 9), generator=torch.Generator().manual_seed(0))
    out, idx = pool(x)
    want, want_idx = TF.max_pool2d(-x.double(), 3, 2, 1, return_indices=True)
    assert out.dtype == torch.int64 and torch.equal(out, (-want).long())
    assert torch.equal(idx, want_idx)
    assert torch.equal(fnn.AdaptiveMinPool1d(4)(x[0].float()),
                       -TF.adaptive_max_pool1d(-x[0].float(), 4))
    with pytest.raises(TypeError, match="min_pool2d: input dtype torch.complex64"):
        FF.min_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.complex64), 2)


# --------------------------------------------------------------------------
# Max unpooling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nd, layout", LAYOUTS)
def test_max_unpool_matches_torch(nd, layout):
    # Odd sizes: pooling (3, 2, 1) then unpooling gives the input's size back.
    shape = _shape(nd, layout)[:-nd] + {1: (11,), 2: (7, 9), 3: (5, 3, 7)}[nd]
    x = _input(shape, layout == "channels-last")
    pooled, indices = getattr(TF, f"max_pool{nd}d")(x.detach(), 3, 2, 1, return_indices=True)
    # torch takes output_size with nd or nd + 2 entries (batch and channels first)
    full = x.shape if layout != "unbatched" else x.shape[-nd:]
    for output_size in (None, tuple(s + 1 for s in shape[-nd:]), full):
        def ours(t):
            return getattr(FF, f"max_unpool{nd}d")(t, indices, 3, 2, 1, output_size)

        def theirs(t):
            return getattr(TF, f"max_unpool{nd}d")(t, indices, 3, 2, 1, output_size)

        out, (grad,) = _forward_backward(ours, pooled)
        want, (want_grad,) = _forward_backward(theirs, pooled)
        assert out.shape == want.shape and torch.equal(out, want)
        assert torch.equal(grad, want_grad)  # the gather at the indices
    ours, theirs = (getattr(module, f"MaxUnpool{nd}d")(3, 2, 1) for module in (fnn, torch.nn))
    assert repr(ours) == repr(theirs) and isinstance(ours, type(theirs))
    assert torch.equal(ours(pooled, indices, output_size=full),
                       theirs(pooled, indices, output_size=full))


def test_max_unpool_round_trip_of_fastpool_indices_and_errors():
    x = torch.randint(0, 100, (2, 3, 8, 8), dtype=torch.int32)
    pooled, indices = FF.max_pool2d(x, 2, return_indices=True)
    out = fnn.MaxUnpool2d(2)(pooled, indices)
    assert out.dtype == torch.int32
    assert torch.equal(out, TF.max_unpool2d(pooled.double(), indices, 2).int())
    with pytest.raises(ValueError, match="max_unpool2d: output_size"):
        FF.max_unpool2d(pooled, indices, 2, output_size=(12, 8))
    with pytest.raises(ValueError, match="indices must be int64"):
        FF.max_unpool2d(pooled, indices.int(), 2)
    with pytest.raises(ValueError, match="input's shape"):
        FF.max_unpool2d(pooled, indices[:1], 2)


# --------------------------------------------------------------------------
# Fractional max pooling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("layout", ["batched", "unbatched", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fractional_matches_torch(nd, layout, dtype):
    x = _input(_shape(nd, layout), layout == "channels-last", dtype)
    batch = 1 if layout == "unbatched" else 2
    samples = torch.rand(batch + 1, 3, nd, generator=torch.Generator().manual_seed(3),
                         dtype=dtype)  # more rows than needed, as torch allows
    for sizing in (dict(output_size=3), dict(output_ratio=(0.5,) * nd)):  # torch 2-D wants a tuple
        def ours(t):
            return getattr(FF, f"fractional_max_pool{nd}d")(
                t, 2, return_indices=True, _random_samples=samples, **sizing)

        def theirs(t):
            return getattr(TF, f"fractional_max_pool{nd}d")(
                t, 2, return_indices=True, _random_samples=samples, **sizing)

        (out, idx), (grad,) = _forward_backward(ours, x)
        (want, want_idx), (want_grad,) = _forward_backward(theirs, x)
        assert torch.equal(out, want) and torch.equal(idx, want_idx)
        assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("nd", [2, 3])
def test_fractional_draws_samples_as_torch_does(nd):
    x = _input((2, 3) + SIZES[nd])
    torch.manual_seed(7)
    ours = getattr(FF, f"fractional_max_pool{nd}d")(x, 2, output_ratio=(0.5,) * nd)
    torch.manual_seed(7)
    want = getattr(TF, f"fractional_max_pool{nd}d")(x, 2, output_ratio=(0.5,) * nd)
    assert torch.equal(ours, want)
    module = getattr(fnn, f"FractionalMaxPool{nd}d")(2, output_size=3, return_indices=True)
    theirs = getattr(torch.nn, f"FractionalMaxPool{nd}d")(2, output_size=3,
                                                          return_indices=True)
    torch.manual_seed(8)
    got = module(x)
    torch.manual_seed(8)
    for g, w in zip(got, theirs(x)):
        assert torch.equal(g, w)
    with pytest.raises(TypeError, match="_random_samples must have the input's dtype"):
        getattr(FF, f"fractional_max_pool{nd}d")(x, 2, output_size=3,
                                                 _random_samples=torch.rand(2, 3, nd))
    with pytest.raises(TypeError, match="fractional max pooling takes"):
        getattr(FF, f"fractional_max_pool{nd}d")(x.detach().long(), 2, output_size=3)


# --------------------------------------------------------------------------
# GeM
# --------------------------------------------------------------------------


def _gem_oracle(x, p, eps, nd, kernel_size=None):
    """The plain-torch formula."""
    if isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() > 1:
        p = p.reshape((-1,) + (1,) * nd)
    powered = x.clamp(min=eps).pow(p)
    if kernel_size is None:
        mean = powered.mean(tuple(range(-nd, 0)), keepdim=True)
    else:
        mean = getattr(TF, f"avg_pool{nd}d")(powered, kernel_size)
    return mean.pow(1 / p)


@pytest.mark.parametrize("nd, layout", LAYOUTS)
@pytest.mark.parametrize("p_kind", ["float", "scalar", "per-channel"])
def test_gem_matches_plain_torch(nd, layout, p_kind):
    x = _input(_shape(nd, layout), layout == "channels-last")
    with torch.no_grad():
        x[..., 0] = -1.0  # below eps: clamped, no gradient
    p = {"float": 2.5, "scalar": torch.tensor(2.5, dtype=torch.float64),
         "per-channel": torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64)}[p_kind]
    inputs = [x] + ([p] if isinstance(p, torch.Tensor) else [])
    for kernel_size in (None, 2):
        def ours(t, *q):
            return getattr(FF, f"gem_pool{nd}d")(t, *(q or [p]), eps=1e-3,
                                                 kernel_size=kernel_size)

        def theirs(t, *q):
            return _gem_oracle(t, *(q or [p]), 1e-3, nd, kernel_size)

        out, grads = _forward_backward(ours, *inputs)
        want, want_grads = _forward_backward(theirs, *inputs)
        assert out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_gem_gradcheck_and_no_double_backward():
    x = _input((2, 3, 5, 4), positive=True)
    for p in (torch.tensor(3.0, dtype=torch.float64),
              torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)):
        p.requires_grad_()
        assert torch.autograd.gradcheck(lambda t, q: FF.gem_pool2d(t, q, output_size=(2, 1)),
                                        (x, p))
    (grad,) = torch.autograd.grad(FF.gem_pool2d(x).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="gem_pool2d has no double backward"):
        grad.sum().backward()


def test_gem_module_learns_p():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), fnn.GeM(),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    gem = model[2]
    assert fnn.GeM is fnn.GeneralizedMeanPooling is fnn.GeneralizedMeanPooling2d is fnn.GeM2d
    assert repr(gem) == "GeM2d(p=3, eps=1e-06)"
    assert isinstance(gem.p, torch.nn.Parameter) and gem.p.shape == (1,)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.p", "4.weight", "4.bias"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(4, 3, 8, 8)
    loss = TF.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert gem.p.grad is not None and gem.p.grad.shape == (1,)
    optimizer.step()
    assert gem.p.item() != 3.0
    per_channel = fnn.GeneralizedMeanPooling3d(p=2.0, per_channel=4, output_size=(1, 2, 1))
    assert repr(per_channel) == ("GeM3d(per_channel=4, eps=1e-06, "
                                 "output_size=(1, 2, 1))")
    y = per_channel(torch.rand(2, 4, 3, 4, 5))
    assert y.shape == (2, 4, 1, 2, 1)
    y.sum().backward()
    assert per_channel.p.grad.shape == (4,)
    with pytest.raises(ValueError, match="per_channel"):
        fnn.GeM(per_channel=0)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_gem_modules_by_the_issue_names(nd):
    cls = getattr(fnn, f"GeM{nd}d")
    assert cls is getattr(fnn, f"GeneralizedMeanPooling{nd}d")
    x = torch.rand((2, 3) + (4,) * nd) + 0.1
    learned = cls()
    assert [name for name, _ in learned.named_parameters()] == ["p"]
    fixed = cls(p=2.0, learn_p=False)
    assert list(fixed.parameters()) == [] and list(fixed.state_dict()) == ["p"]
    assert repr(fixed) == f"GeM{nd}d(p=2, eps=1e-06, learn_p=False)"
    torch.testing.assert_close(fixed(x), FF.__dict__[f"gem_pool{nd}d"](x, 2.0))
    assert not fixed(x).requires_grad
    # per_channel: False (one p) or the channel count C
    shared = cls(per_channel=False)
    assert shared.p.shape == (1,)
    per_channel = cls(p=2.5, per_channel=3)
    assert per_channel.p.shape == (3,)
    y = per_channel(x.requires_grad_(True))
    assert y.shape == (2, 3) + (1,) * nd
    torch.testing.assert_close(y, FF.__dict__[f"gem_pool{nd}d"](x, [2.5, 2.5, 2.5]))
    y.sum().backward()
    assert per_channel.p.grad.shape == (3,) and x.grad.shape == x.shape
    fixed_per_channel = cls(per_channel=3, learn_p=False)
    assert list(fixed_per_channel.parameters()) == []
    assert fixed_per_channel.p.shape == (3,)
    with pytest.raises(ValueError, match="needs the number of channels"):
        cls(per_channel=True)
    with pytest.raises(TypeError, match="learn_p must be a bool"):
        cls(learn_p=1)


def test_gem_errors():
    x = torch.rand(1, 3, 4, 4)
    # Not an error any more: GeM is registered for every device (CUDA included); a
    # meta tensor gets its shape from the fake implementation, as every op's does.
    assert FF.gem_pool2d(x.to("meta"), [1.0, 2.0, 3.0]).shape == (1, 3, 1, 1)
    with pytest.raises(TypeError, match=r"one per channel \(shape \(3,\)\)"):
        FF.gem_pool2d(x, torch.ones(2))
    with pytest.raises(ValueError, match="eps"):
        FF.gem_pool2d(x, eps=0)
    with pytest.raises(ValueError, match="p must be positive"):
        FF.gem_pool2d(x, p=-1.0)
    with pytest.raises(ValueError, match="every p must be positive"):
        FF.gem_pool2d(x, torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(TypeError, match="GeM pooling takes"):
        FF.gem_pool2d(x.int())


# --------------------------------------------------------------------------
# convert, torch.compile, export, torch.func, opcheck
# --------------------------------------------------------------------------


def test_convert_swaps_unpool_and_fractional():
    samples = torch.rand(1, 2, 2)
    model = torch.nn.ModuleList([torch.nn.MaxUnpool2d(2), torch.nn.MaxUnpool1d(3, 1),
                                 torch.nn.FractionalMaxPool2d(2, 3, _random_samples=samples),
                                 torch.nn.FractionalMaxPool3d(2, output_ratio=0.5)])
    fast = fastpool.torch.convert(model)
    assert [type(m).__module__ for m in fast] == ["fastpool.torch.nn"] * 4
    assert [type(m).__name__ for m in fast] == [type(m).__name__ for m in model]
    x = torch.rand(1, 2, 6, 6)
    assert torch.equal(fast[2](x), model[2](x))
    fast.load_state_dict(model.state_dict())


def _all_new_ops(x, p):
    pooled, indices = FF.max_pool2d(x, 2, return_indices=True)
    unpooled = FF.max_unpool2d(pooled, indices, 2, output_size=x.shape[-2:])
    samples = torch.full((x.shape[0], x.shape[1], 2), 0.25, dtype=x.dtype)
    fractional = FF.fractional_max_pool2d(unpooled, 2, output_size=3,
                                          _random_samples=samples)
    return (FF.gem_pool2d(fractional.abs() + 0.1, p).sum()
            + FF.min_pool2d(x, 2).sum() + FF.adaptive_min_pool2d(x, 2).sum())


def test_compile_fullgraph_and_export():
    x = _input((2, 3, 8, 8))
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    want = _all_new_ops(x, p)
    want_grads = torch.autograd.grad(want, (x, p))
    torch._dynamo.reset()
    # Dynamo traces every op through its fake kernel (no graph break); the AOT side of
    # the registrations is opcheck's (test_opcheck).
    compiled = torch.compile(_all_new_ops, fullgraph=True, backend="eager")
    got = compiled(x, p)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, (x, p)), want_grads):
        torch.testing.assert_close(g, w)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gem = fnn.GeM(per_channel=3)

        def forward(self, t):
            return self.gem(fnn.MinPool2d(2)(t) + 1)

    net = Net().double()
    program = torch.export.export(net, (x.detach(),))
    code = str(program.graph_module.code)
    assert "fastpool.gem_pool2d.default" in code and "fastpool.min_pool2d.default" in code
    torch.testing.assert_close(program.module()(x.detach()), net(x.detach()))


def test_func_vmap_and_per_sample_gradients():
    batch = _input((4, 2, 3, 8, 8), positive=True).detach()
    samples = torch.rand(4, 2, 3, 2, dtype=torch.float64)
    got = torch.func.vmap(lambda t, s: FF.fractional_max_pool2d(t, 2, 3, _random_samples=s))(
        batch, samples)
    want = torch.stack([TF.fractional_max_pool2d(b, 2, 3, _random_samples=s)
                        for b, s in zip(batch, samples)])
    assert torch.equal(got, want)
    pooled, indices = TF.max_pool2d(batch.flatten(0, 1), 2, return_indices=True)
    got = torch.func.vmap(lambda t, i: FF.max_unpool2d(t, i, 2))(
        pooled.unflatten(0, (4, 2)), indices.unflatten(0, (4, 2)))
    assert torch.equal(got.flatten(0, 1), TF.max_unpool2d(pooled, indices, 2))
    # GeM: p shared, p one per vmapped slice, per-sample gradients for p.
    p = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    ps = torch.tensor([1.5, 2.5, 3.5, 4.5], dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda t: FF.gem_pool2d(t, p))(batch),
                               _gem_oracle(batch, p, 1e-6, 2))
    torch.testing.assert_close(torch.func.vmap(FF.gem_pool2d)(batch[:, 0], ps),
                               torch.stack([_gem_oracle(b, q, 1e-6, 2)
                                            for b, q in zip(batch[:, 0], ps)]))
    per_sample = torch.func.vmap(torch.func.grad(lambda q, t: FF.gem_pool2d(t, q).sum()),
                                 in_dims=(None, 0))(p, batch)
    want = torch.stack([torch.func.grad(lambda q: _gem_oracle(b, q, 1e-6, 2).sum())(p)
                        for b in batch])
    torch.testing.assert_close(per_sample, want)


def test_double_backward():
    # Distinct values spaced well apart: the extremes are differentiable there.
    x = torch.randperm(2 * 6 * 4, generator=torch.Generator().manual_seed(0))
    x = (x.to(torch.float64).reshape(1, 2, 6, 4) / 7 + 0.5).requires_grad_()
    pooled, indices = TF.max_pool2d(x.detach(), 2, return_indices=True)
    samples = torch.rand(1, 2, 2, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    for function in (lambda t: FF.min_pool2d(t, 3, 2, 1), lambda t: FF.adaptive_min_pool2d(t, 3),
                     lambda t: FF.fractional_max_pool2d(t, 2, output_size=2,
                                                        _random_samples=samples)):
        assert torch.autograd.gradgradcheck(function, (x,))
    assert torch.autograd.gradgradcheck(lambda t: FF.max_unpool2d(t, indices, 2),
                                        (pooled.requires_grad_(),))


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 6, generator=g, dtype=torch.float64)
    samples = torch.rand(2, 3, 2, generator=g, dtype=torch.float64)
    p = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    window = [[3, 3], [2, 2], [1, 1], [1, 1], True]
    gem = [1e-6, [2, 1], None, None]

    def check(name, *args):
        torch.library.opcheck(getattr(torch.ops.fastpool, name), args)

    def grad_of(t):
        return torch.rand(t.shape, generator=g, dtype=torch.float64)

    # The families' generic registration (opchecked in both layouts for max pooling
    # in test_torch_compile.py) with min pooling's and fractional pooling's parameters.
    check("min_pool2d", x.requires_grad_(), *window)
    out, indices = torch.ops.fastpool.min_pool2d(x, *window)
    check("min_pool2d_backward", grad_of(out), x.detach(), indices, *window)
    check("adaptive_min_pool2d", x, [3, 2])
    check("fractional_max_pool2d", x, [2, 2], [3, 3], samples)
    out, indices = torch.ops.fastpool.fractional_max_pool2d(x, [2, 2], [3, 3], samples)
    check("fractional_max_pool2d_backward", grad_of(out), x.detach(), indices)
    # Unpooling and GeM, with their own fake kernels: channels-last too.
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.detach().contiguous(memory_format=layout)
        pooled, indices = torch.ops.fastpool.max_pool2d(x, *window)
        check("max_unpool2d", pooled.requires_grad_(), indices, [3, 3], [2, 2], [1, 1], [8, 6])
        check("max_unpool2d_backward", grad_of(x).requires_grad_(), indices, [3, 3], [2, 2],
              [1, 1])
        check("gem_pool2d", x.requires_grad_(), p.requires_grad_(), *gem)
    check("gem_pool2d", x, p[0].detach().requires_grad_(), 1e-6, [], [2, 2], [2, 1])
    out = torch.ops.fastpool.gem_pool2d(x, p, *gem)
    check("gem_pool2d_backward", grad_of(out), x.detach(), p.detach(), *gem)


def test_gem_with_a_fixed_p_skips_p_gradient(monkeypatch):
    """A p that takes no gradient (learn_p=False, a float) asks the backward for none,
    which skips its logarithms; x's gradient is still torch's."""
    from fastpool import _gem
    asked, backward = [], _gem.gem_pool_backward

    def spy(*args, **kwargs):
        asked.append(kwargs["need_grad_p"])
        return backward(*args, **kwargs)

    monkeypatch.setattr(_gem, "gem_pool_backward", spy)
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    fnn.GeM(p=2.5, learn_p=False)(x).sum().backward()
    want = torch.autograd.grad(x.clamp(min=1e-6).pow(2.5).mean((2, 3)).pow(1 / 2.5).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    learned = fnn.GeM(p=2.5)
    learned(x).sum().backward()
    assert asked == [False, True] and learned.p.grad is not None
    assert fastpool.gem_pool2d_backward(torch.ones(2, 3, 1, 1).numpy(), x.detach().numpy(),
                                        need_grad_p=False)[1] is None
