"""fastpool.torch in modern PyTorch: registered ops, torch.compile, export, dynamic
shapes, torch.func, double backward, opcheck, scripting and errors.

Compiles are slow on small machines: the compiled models here are few and small.
"""

import pytest
import torch
import torch._dynamo.testing
from numpy.testing import assert_allclose

import fastpool.torch  # noqa: F401  (registers the ops)
from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn

NDS = (1, 2, 3)
SIZES = {1: (9,), 2: (7, 8), 3: (5, 6, 7)}
# (op family, forward parameters, backward parameters after grad, x[, indices])
OPS = {
    "max_pool": lambda nd: ([[3] * nd, [2] * nd, [1] * nd, [1] * nd, True],),
    "avg_pool": lambda nd: ([[3] * nd, [2] * nd, [1] * nd, False, False, None],),
    "lp_pool": lambda nd: ([2.0, [2] * nd, [2] * nd, True],),
    "adaptive_max_pool": lambda nd: ([[3] * nd],),
    "adaptive_avg_pool": lambda nd: ([[2] * nd],),
}


def _net(pooling):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), pooling.MaxPool2d(3, 2, 1), torch.nn.ReLU(),
        pooling.AvgPool2d(2, ceil_mode=True), pooling.LPPool2d(2, 2),
        pooling.AdaptiveMaxPool2d((3, 2)), pooling.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def _run(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (grad,) = torch.autograd.grad((y * torch.arange(y.numel()).reshape(y.shape)).sum(), x)
    return y.detach(), grad


def test_ops_are_registered():
    names = set(torch._C._dispatch_get_all_op_names())
    for family in OPS:
        for nd in NDS:
            assert f"fastpool::{family}{nd}d" in names
            assert f"fastpool::{family}{nd}d_backward" in names


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    model = _net(fnn)
    x = torch.randn(2, 3, 21, 19, generator=torch.Generator().manual_seed(1))
    want = _run(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = _run(compiled, x)
    for g, w in zip(got, want):
        assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    want_torch = _run(_net(torch.nn), x)
    for g, w in zip(got, want_torch):
        assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-5)


def test_export_runs():
    model = _net(fnn)
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    assert "torch.ops.fastpool.max_pool2d.default" in str(program.graph_module.code)
    assert torch.equal(program.module()(x), model(x))


def test_dynamic_shapes_compile_once():
    model = torch.nn.Sequential(
        fnn.MaxPool2d(3, 2, 1), fnn.AvgPool2d(2, ceil_mode=True), fnn.LPPool2d(2, 2),
        fnn.AdaptiveMaxPool2d((None, 2)), fnn.AdaptiveAvgPool2d((1, 2)))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    # Batch, channels and the two spatial sizes all distinct: Dynamo gives equal sizes
    # one symbol and would recompile when they diverge.
    for shape in [(2, 3, 21, 17), (4, 5, 30, 25), (6, 7, 45, 33)]:
        x = torch.randn(shape, requires_grad=True)
        got = _run(compiled, x)
        want = _run(model, x)
        for g, w in zip(got, want):
            assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_func_grad_and_vmap():
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    grad = torch.func.grad(lambda t: FF.max_pool2d(t, 3, 2, 1).pow(2).sum())(x)
    want = torch.func.grad(lambda t: torch.nn.functional.max_pool2d(t, 3, 2, 1).pow(2).sum())(x)
    assert torch.equal(grad, want)
    batch = torch.randn(4, 2, 3, 8, 9, dtype=torch.float64)
    for function, reference in [
            (lambda t: FF.avg_pool2d(t, 2), lambda t: torch.nn.functional.avg_pool2d(t, 2)),
            (lambda t: FF.adaptive_max_pool2d(t, 3, return_indices=True),
             lambda t: torch.nn.functional.adaptive_max_pool2d(t, 3, return_indices=True))]:
        for inputs in (batch, batch[:, 0]):  # batched and unbatched inputs
            got, want = torch.func.vmap(function)(inputs), reference(inputs.flatten(0, 1))
            for g, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
                assert torch.allclose(g.flatten(0, 1), w.reshape(g.flatten(0, 1).shape))
    # per-sample gradients: vmap of grad
    per_sample = torch.func.vmap(torch.func.grad(lambda t: FF.lp_pool2d(t, 2, 2).sum()))(batch)
    assert per_sample.shape == batch.shape
    jac = torch.func.jacrev(lambda t: FF.global_avg_pool2d(t))(x[:1, :1])
    assert_allclose(jac.sum().item(), 1.0)


DOUBLE = [
    ("max_pool", lambda t, nd: getattr(FF, f"max_pool{nd}d")(t, 3, 2, 1, ceil_mode=True)),
    ("avg_pool", lambda t, nd: getattr(FF, f"avg_pool{nd}d")(t, 3, 2, 1,
                                                               count_include_pad=False)),
    ("adaptive_max_pool", lambda t, nd: getattr(FF, f"adaptive_max_pool{nd}d")(t, 3)),
    ("adaptive_avg_pool", lambda t, nd: getattr(FF, f"adaptive_avg_pool{nd}d")(t, 3)),
    ("global_max_pool", lambda t, nd: getattr(FF, f"global_max_pool{nd}d")(t)),
    ("global_avg_pool", lambda t, nd: getattr(FF, f"global_avg_pool{nd}d")(t, keepdims=True)),
]


@pytest.mark.parametrize("nd", NDS)
@pytest.mark.parametrize("family, function", DOUBLE, ids=[d[0] for d in DOUBLE])
def test_gradgradcheck(family, function, nd):
    size = {1: (7,), 2: (5, 6), 3: (4, 5, 5)}[nd]
    n = 2 * 2 * int(torch.tensor(size).prod())
    x = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    x = (x.reshape((2, 2) + size) / 7 + 0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: function(t, nd), (x,))


def test_lp_double_backward_says_so():
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(FF.lp_pool2d(x, 2, 2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="no double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("nd", NDS)
def test_opcheck(nd):
    generator = torch.Generator().manual_seed(nd)
    for channels_last in (False, True) if nd > 1 else (False,):
        x = torch.rand((2, 3) + SIZES[nd], generator=generator, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if nd == 2
                             else torch.channels_last_3d)
        for family, params in OPS.items():
            (params,) = params(nd)
            forward = getattr(torch.ops.fastpool, f"{family}{nd}d")
            torch.library.opcheck(forward, (x.requires_grad_(), *params))
            result = forward(x.detach(), *params)
            out, extra = (result[0], [result[1]]) if isinstance(result, tuple) else (result, [])
            grad = torch.rand(out.shape, generator=generator, dtype=torch.float64)
            backward_params = [] if family.startswith("adaptive") else params
            backward = getattr(torch.ops.fastpool, f"{family}{nd}d_backward")
            # Lp's backward has no backward of its own: check it without gradients.
            grad.requires_grad_(family != "lp_pool")
            torch.library.opcheck(backward, (grad, x.detach(), *extra, *backward_params))


def test_outputs_never_alias_the_input():
    x = torch.rand(1, 1, 3, 3)
    for out in (FF.adaptive_avg_pool2d(x, 3), FF.max_pool2d(x, 1), FF.avg_pool2d(x, 1)):
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_script_says_to_use_export():
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(fnn.MaxPool2d(2))
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(torch.nn.Sequential(fnn.GlobalAvgPool2d()))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bad_dtypes_raise_fastpool_errors(compiled):
    def run(function, x):
        if compiled:
            torch._dynamo.reset()
            function = torch.compile(function, backend="eager")
        return function(x)

    with pytest.raises(TypeError, match=r"avg_pool2d: input dtype torch.complex64"):
        run(lambda t: FF.avg_pool2d(t, 2), torch.zeros(1, 1, 4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"adaptive_avg_pool1d: input dtype torch.bool"):
        run(fnn.AdaptiveAvgPool1d(2), torch.zeros(1, 1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"max_pool2d: input dtype torch.complex128"):
        run(fnn.MaxPool2d(2), torch.zeros(1, 1, 4, 4, dtype=torch.complex128))
    with pytest.raises(ValueError, match="too small"):
        run(fnn.MaxPool2d(5), torch.zeros(1, 1, 4, 4))


def test_bad_dtype_under_fullgraph_names_the_op():
    # fullgraph=True turns any exception raised while tracing into Dynamo's Unsupported;
    # fastpool's message is in it.
    compiled = torch.compile(lambda t: FF.avg_pool2d(t, 2), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"avg_pool2d: input dtype torch.complex64"):
        compiled(torch.zeros(1, 1, 4, 4, dtype=torch.complex64))



def test_strided_conv_ops():
    for nd in NDS:
        names = set(torch._C._dispatch_get_all_op_names())
        assert {f"fastpool::strided_conv{nd}d", f"fastpool::strided_conv{nd}d_backward"} <= names
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 8, generator=generator, dtype=torch.float64)
    weight = torch.rand(4, 3, 2, 2, generator=generator, dtype=torch.float64)
    bias = torch.rand(4, generator=generator, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        torch.library.opcheck(torch.ops.fastpool.strided_conv2d,
                              (xl.requires_grad_(), weight.requires_grad_(), bias, [2, 2],
                               [1, 0]))
        grad = torch.rand(2, 4, 5, 4, generator=generator, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fastpool.strided_conv2d_backward,
                              (grad, xl.detach(), weight.detach(), [2, 2], [1, 0]))
        for mask in ([False, True, True], [True, False, False]):
            torch.library.opcheck(torch.ops.fastpool.strided_conv2d_backward,
                                  (grad, xl.detach(), weight.detach(), [2, 2], [1, 0], mask))
    model = torch.nn.Sequential(fnn.StridedConv2d(3, 4, 2), torch.nn.ReLU(),
                                fnn.StridedConv2d(4, 2, 3, stride=1, padding=1)).double()
    want = _run(model, x)
    torch._dynamo.reset()
    got = _run(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    reference = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=(1, 0))
    torch.testing.assert_close(FF.strided_conv2d(x, weight, 2, (1, 0), bias), reference)
