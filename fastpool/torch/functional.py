"""torch.nn.functional's pooling functions on fastpool's kernels, with autograd.

Each function has the signature of the fastpool function of the same name, with
``input`` for ``x`` and without ``channels_last`` and ``backend``: the layout
comes from the tensor's memory format and the back end from its device.

>>> import torch
>>> from fastpool.torch import functional as F
>>> x = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_()
>>> y = F.max_pool2d(x, 2)
>>> y
tensor([[[[ 5.,  7.],
          [13., 15.]]]], grad_fn=<PoolFunctionBackward>)
>>> y.sum().backward()
>>> x.grad[0, 0]
tensor([[0., 0., 0., 0.],
        [0., 1., 0., 1.],
        [0., 0., 0., 0.],
        [0., 1., 0., 1.]])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

import fastpool

FAMILIES = ("max_pool", "avg_pool", "lp_pool", "adaptive_max_pool", "adaptive_avg_pool",
            "global_max_pool", "global_avg_pool")
_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _is_channels_last(t: torch.Tensor) -> bool:
    """A batched 4-D/5-D tensor stored channels-last (and not also channels-first)."""
    memory_format = _MEMORY_FORMATS.get(t.dim())
    return (memory_format is not None and t.size(1) > 1
            and t.is_contiguous(memory_format=memory_format) and not t.is_contiguous())


def _to_numpy(t: torch.Tensor, channels_last: bool):
    """A zero-copy view for fastpool: NumPy for CPU tensors; CUDA tensors pass as
    themselves (fastpool reads their ``__cuda_array_interface__``)."""
    t = t.detach()
    t = t.movedim(1, -1) if channels_last else t
    return t.numpy() if t.device.type == "cpu" else t


def _to_tensor(array, channels_last: bool) -> torch.Tensor:
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    return t.movedim(-1, 1) if channels_last else t


def _stream(t: torch.Tensor):
    """torch's current CUDA stream as a numba stream, so launches queue behind torch's."""
    if t.device.type != "cuda":
        return None
    from numba import cuda
    return cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)


@dataclass(frozen=True)
class PoolOp:
    """One call of a fastpool op: family, spatial dims and keyword arguments."""

    family: str
    nd: int
    arguments: tuple

    @property
    def returns_indices(self) -> bool:
        return "max" in self.family

    def forward(self, x, channels_last: bool, stream=None):
        function = getattr(fastpool, f"{self.family}{self.nd}d")
        extra = {"return_indices": True} if self.returns_indices else {}
        return function(x, **dict(self.arguments), **extra, channels_last=channels_last,
                        stream=stream)

    def backward(self, grad, x, indices, channels_last: bool, stream=None):
        function = getattr(fastpool, f"{self.family}{self.nd}d_backward")
        arguments = dict(self.arguments)
        kw = dict(channels_last=channels_last, stream=stream)
        if self.family == "max_pool":  # the window lets a GPU gather instead of scatter
            window = {k: arguments[k] for k in ("kernel_size", "stride", "padding",
                                                "dilation", "ceil_mode")}
            return function(grad, indices, x.shape, **window, **kw)
        if self.returns_indices:
            return function(grad, indices, x.shape, **kw)
        if self.family == "lp_pool":
            return function(grad, x, arguments.pop("norm_type"), **arguments, **kw)
        arguments.pop("output_size", None)
        arguments.pop("keepdims", None)
        return function(grad, x.shape, **arguments, **kw)


class PoolFunction(torch.autograd.Function):
    """Forward and backward of any fastpool op on a CPU tensor."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, op: PoolOp):
        channels_last = _is_channels_last(input)
        x = _to_numpy(input, channels_last)
        result = op.forward(x, channels_last, _stream(input))
        ctx.op, ctx.channels_last = op, channels_last
        if op.returns_indices:
            out, indices = result
            ctx.indices = indices
            ctx.save_for_backward(input)
            indices_tensor = _to_tensor(indices, channels_last)
            ctx.mark_non_differentiable(indices_tensor)
            return _to_tensor(out, channels_last), indices_tensor
        ctx.save_for_backward(input)
        return _to_tensor(result, channels_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, *unused):
        (input,) = ctx.saved_tensors
        x = _to_numpy(input, ctx.channels_last)
        grad = _to_numpy(grad_output, ctx.channels_last)
        grad_in = ctx.op.backward(grad, x, getattr(ctx, "indices", None), ctx.channels_last,
                                  _stream(input))
        return _to_tensor(grad_in, ctx.channels_last), None


def _make(family: str, nd: int):
    base = getattr(fastpool, f"{family}{nd}d")
    parameters = [p for name, p in inspect.signature(base).parameters.items()
                  if name not in ("channels_last", "backend", "stream")]
    parameters[0] = parameters[0].replace(name="input", annotation=torch.Tensor)
    signature = inspect.Signature(parameters)

    def function(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        input = arguments.pop("input")
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{family}{nd}d: input must be a torch.Tensor, got "
                            f"{type(input).__name__}")
        return_indices = arguments.pop("return_indices", False)
        result = PoolFunction.apply(input, PoolOp(family, nd, tuple(arguments.items())))
        if "max" in family and not return_indices:
            return result[0]
        return result

    function.__signature__ = signature
    function.__name__ = function.__qualname__ = f"{family}{nd}d"
    function.__doc__ = (f"``fastpool.{family}{nd}d`` on torch tensors, autograd-aware.\n\n"
                        f"Same arguments and result as torch.nn.functional's function of the "
                        f"same name.")
    return function


for _family in FAMILIES:
    for _nd in (1, 2, 3):
        globals()[f"{_family}{_nd}d"] = _make(_family, _nd)


class ConvFunction(torch.autograd.Function):
    """Forward and backward of fastpool's strided convolution on tensors."""

    @staticmethod
    def forward(ctx, input, weight, bias, nd, stride, padding):
        # The channels-last kernels run on the host; a GPU tensor goes channels-first.
        channels_last = _is_channels_last(input) and input.device.type == "cpu"
        if input.device.type != "cpu":
            input = input.contiguous()
        function = getattr(fastpool, f"strided_conv{nd}d")
        out = function(_to_numpy(input, channels_last), _to_numpy(weight, False), stride,
                       padding, None if bias is None else _to_numpy(bias, False),
                       channels_last=channels_last, stream=_stream(input))
        ctx.save_for_backward(input, weight)
        ctx.nd, ctx.stride, ctx.padding, ctx.channels_last = nd, stride, padding, channels_last
        ctx.has_bias = bias is not None
        return _to_tensor(out, channels_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        if input.device.type != "cpu":
            grad_output = grad_output.contiguous()
        function = getattr(fastpool, f"strided_conv{ctx.nd}d_backward")
        grad_in, grad_weight, grad_bias = function(
            _to_numpy(grad_output, ctx.channels_last), _to_numpy(input, ctx.channels_last),
            _to_numpy(weight, False), ctx.stride, ctx.padding,
            channels_last=ctx.channels_last, stream=_stream(input))
        return (_to_tensor(grad_in, ctx.channels_last), _to_tensor(grad_weight, False),
                _to_tensor(grad_bias, False) if ctx.has_bias else None, None, None, None)


def _make_conv(nd: int):
    def strided_conv(input: torch.Tensor, weight: torch.Tensor, stride=2, padding=0,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        return ConvFunction.apply(input, weight, bias, nd, stride, padding)

    strided_conv.__name__ = strided_conv.__qualname__ = f"strided_conv{nd}d"
    strided_conv.__doc__ = (f"``fastpool.strided_conv{nd}d`` on torch tensors, "
                            f"autograd-aware (gradients for input, weight and bias).")
    return strided_conv


strided_conv1d, strided_conv2d, strided_conv3d = (_make_conv(nd) for nd in (1, 2, 3))

__all__ = [f"{family}{nd}d" for family in FAMILIES for nd in (1, 2, 3)] + [
    "strided_conv1d", "strided_conv2d", "strided_conv3d"]
