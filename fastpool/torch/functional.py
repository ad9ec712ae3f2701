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
          [13., 15.]]]], grad_fn=<GeneratedBackwardFor_fastpool_max_pool2d_defaultBackward>)
>>> y.sum().backward()
>>> x.grad[0, 0]
tensor([[0., 0., 0., 0.],
        [0., 1., 0., 1.],
        [0., 0., 0., 0.],
        [0., 1., 0., 1.]])
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from fastpool import _gem
from fastpool._params import (
    ConvWindow,
    Layout,
    SlidingWindow,
    check_bool,
    check_divisor_override,
    check_norm_type,
    fractional_output_shape,
    int_tuple,
    unpool_output_shape,
)
from fastpool.torch import _ops

FAMILIES = ("max_pool", "avg_pool", "lp_pool", "adaptive_max_pool", "adaptive_avg_pool",
            "global_max_pool", "global_avg_pool", "min_pool", "adaptive_min_pool",
            "global_min_pool", "max_unpool", "gem_pool", "global_pool")
# Families whose functions exist in 2-D and 3-D only (as in torch).
_NDS = {"fractional_max_pool": (2, 3)}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTEGERS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_channels_last(t: torch.Tensor) -> bool:
    """A batched 4-D/5-D tensor stored channels-last (and not also channels-first)."""
    return _ops.is_channels_last(t, t.dim() - 2)


def _to_numpy(t: torch.Tensor, channels_last: bool):
    """A zero-copy view for fastpool: NumPy for CPU tensors; CUDA tensors pass as
    themselves (fastpool reads their ``__cuda_array_interface__``)."""
    t = t.detach()
    t = t.movedim(1, -1) if channels_last else t
    return t.numpy() if t.device.type == "cpu" else t


def _to_tensor(array, channels_last: bool) -> torch.Tensor:
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    return t.movedim(-1, 1) if channels_last else t


_stream = _ops._stream


# Modes that take the integer types and bool as well as the float types.
_EXTREMES = ("max", "min", "max unpooling")


def _check_input(input, mode: str, name: str, label: str = "input") -> None:
    """fastpool's TypeErrors, raised before any op is traced or run."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype in _FLOATS or (mode in _EXTREMES and input.dtype in _INTEGERS):
        return
    floats = "float16, bfloat16, float32 and float64"
    supported = f"{floats}, the integer types and bool" if mode in _EXTREMES else floats
    what = {"conv": "convolution", "max unpooling": mode}.get(mode, f"{mode} pooling")
    raise TypeError(f"{name}: {label} dtype {input.dtype} is not supported; {what} "
                    f"takes {supported}")


def _check_shape(input, nd: int, name: str) -> None:
    Layout.of(tuple(input.shape), nd, False, name, strict=True)


_FUNCTIONS = _ops.FUNCTIONS


def _apply(name: str, *args, values_only: bool = False):
    """``torch.ops.fastpool.<name>`` of ``args`` (its tensors, then its parameters as
    one tuple), as its autograd.Function applies it: that Function where torch.func's
    transforms, forward-mode AD or a trace (torch.compile, torch.export) may run; else
    the op itself, whose own autograd formula is the Function's; or, with no autograd
    to record and nothing to see the op's call, its implementation.  (A small call
    took 80 us through the Function, 25 of them in Function.apply's binding of its
    arguments by inspect.signature, 35 us through the op, torch's own 3-5 us.)
    ``values_only``: a
    max or min pooling whose caller wants no indices: called directly, it computes
    none (its indices come back None), in up to half the time."""
    # (Under forward-mode AD, the op would drop a dual tensor's tangent where the
    # Function says it has no forward derivative.)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or \
            forward_ad._current_level >= 0:
        return _FUNCTIONS[name].apply(*args)
    *tensors, params = args
    if _undispatched(tensors):
        only = {"values_only": True} if values_only else {}  # (the max and min ops')
        return _ops.IMPLS[name](*tensors, *params, **only)
    return _ops.op(name)(*tensors, *params)


def _undispatched(tensors) -> bool:
    """Whether an op may skip torch's dispatcher: plain strided CPU or CUDA tensors
    (no negative bit or zero tensor, which the dispatcher resolves), none requiring
    a gradient (or grad mode off), and no torch function or dispatch mode
    (FakeTensorMode, FlopCounterMode), profiler or torch.jit.trace that would see the
    op."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)
                              or t.device.type not in _DEVICES
                              or t.layout is not torch.strided or t.is_neg()
                              or t._is_zerotensor()):
            return False
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch.autograd._profiler_enabled()
            and torch._C._get_tracing_state() is None
            and not torch._C._is_torch_function_mode_enabled())


_DEVICES = ("cpu", "cuda")


def _window(name, nd, kernel_size, stride, padding, dilation, ceil_mode) -> SlidingWindow:
    # Memoised in eager mode only: Dynamo cannot guard on the keys of the memo.
    build = SlidingWindow._from_args if torch.compiler.is_compiling() else \
        SlidingWindow.from_args
    window = build(name, nd, kernel_size, stride, padding, dilation, ceil_mode)
    if not window.is_torch_style:
        raise ValueError(f"{name}: fastpool.torch takes torch's int padding (at most half "
                         f"the kernel), got padding={padding!r}; 'same', 'valid' and "
                         f"(before, after) pairs run on arrays through fastpool.{name}")
    return window


def _pads(window: SlidingWindow) -> list[int]:
    """The symmetric int padding of a torch-style window, as the ops' schemas take it."""
    return [before for before, _ in window.padding]


def _sliding(name, nd, input, family, window, params, values_only=False):
    _check_shape(input, nd, name)
    window.output_shape(name, tuple(input.shape[-nd:]))  # the "input too small" error, here
    return _apply(f"{family}{nd}d", input, tuple(params), values_only=values_only)


def _max_pool(nd: int, reduction: str = "max"):
    name = f"{reduction}_pool{nd}d"

    def max_pool(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                 ceil_mode: bool = False, return_indices: bool = False):
        _check_input(input, reduction, name)
        w = _window(name, nd, kernel_size, stride, padding, dilation, ceil_mode)
        return_indices = check_bool(return_indices, "return_indices", name)
        out, indices = _sliding(name, nd, input, f"{reduction}_pool", w, [
            list(w.kernel_size), list(w.stride), _pads(w), list(w.dilation),
            w.ceil_mode], values_only=not return_indices)
        return (out, indices) if return_indices else out

    return max_pool


def _avg_pool(nd: int):
    name = f"avg_pool{nd}d"

    def avg_pool(input: torch.Tensor, kernel_size, stride=None, padding=0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override=None) -> torch.Tensor:
        _check_input(input, "avg", name)
        w = _window(name, nd, kernel_size, stride, padding, 1, ceil_mode)
        return _sliding(name, nd, input, "avg_pool", w, [
            list(w.kernel_size), list(w.stride), _pads(w), w.ceil_mode,
            check_bool(count_include_pad, "count_include_pad", name),
            check_divisor_override(divisor_override, name)])

    return avg_pool


def _lp_pool(nd: int):
    name = f"lp_pool{nd}d"

    def lp_pool(input: torch.Tensor, norm_type: float, kernel_size, stride=None,
                ceil_mode: bool = False) -> torch.Tensor:
        _check_input(input, "lp", name)
        w = _window(name, nd, kernel_size, stride, 0, 1, ceil_mode)
        return _sliding(name, nd, input, "lp_pool", w, [
            check_norm_type(norm_type, name), list(w.kernel_size), list(w.stride),
            w.ceil_mode])

    return lp_pool


def _adaptive(family: str, nd: int, name: str, input, output_size, values_only=False):
    mode = family.split("_")[1]  # adaptive_<mode>_pool
    _check_input(input, mode, name)
    _check_shape(input, nd, name)
    sizes = int_tuple(output_size, nd, "output_size", name, allow_none=True)
    if any(s is not None and s <= 0 for s in sizes):
        raise ValueError(f"{name}: output_size must be positive, got {sizes}")
    spatial = input.shape[-nd:]
    resolved = [spatial[i] if s is None else s for i, s in enumerate(sizes)]
    return _apply(f"adaptive_{mode}_pool{nd}d", input, (resolved,), values_only=values_only)


def _adaptive_max_pool(nd: int, reduction: str = "max"):
    name = f"adaptive_{reduction}_pool{nd}d"

    def adaptive_max_pool(input: torch.Tensor, output_size, return_indices: bool = False):
        return_indices = check_bool(return_indices, "return_indices", name)
        out, indices = _adaptive(f"adaptive_{reduction}_pool", nd, name, input, output_size,
                                 values_only=not return_indices)
        return (out, indices) if return_indices else out

    return adaptive_max_pool


def _adaptive_avg_pool(nd: int):
    name = f"adaptive_avg_pool{nd}d"

    def adaptive_avg_pool(input: torch.Tensor, output_size) -> torch.Tensor:
        return _adaptive("adaptive_avg_pool", nd, name, input, output_size)

    return adaptive_avg_pool


def _squeeze(t: torch.Tensor, nd: int) -> torch.Tensor:
    return t.reshape(t.shape[:-nd])


def _global_max_pool(nd: int, reduction: str = "max"):
    name = f"global_{reduction}_pool{nd}d"

    def global_max_pool(input: torch.Tensor, keepdims: bool = False,
                        return_indices: bool = False):
        keepdims = check_bool(keepdims, "keepdims", name)
        return_indices = check_bool(return_indices, "return_indices", name)
        out, indices = _adaptive(f"adaptive_{reduction}_pool", nd, name, input, 1,
                                 values_only=not return_indices)
        if not keepdims:
            out = _squeeze(out, nd)
            indices = None if indices is None else _squeeze(indices, nd)
        return (out, indices) if return_indices else out

    return global_max_pool


def _global_avg_pool(nd: int):
    name = f"global_avg_pool{nd}d"

    def global_avg_pool(input: torch.Tensor, keepdims: bool = False) -> torch.Tensor:
        keepdims = check_bool(keepdims, "keepdims", name)
        out = _adaptive("adaptive_avg_pool", nd, name, input, 1)
        return out if keepdims else _squeeze(out, nd)

    return global_avg_pool


def _global_pool(nd: int):
    """timm's global heads over fastpool's global average and maximum (autograd through
    torch's own mean, cat and the two ops' registered formulas)."""
    name = f"global_pool{nd}d"

    def global_pool(input: torch.Tensor, mode: str = "avg",
                    keepdims: bool = False) -> torch.Tensor:
        keepdims = check_bool(keepdims, "keepdims", name)
        if mode in ("avg", "max", "min"):
            return globals()[f"global_{mode}_pool{nd}d"](input, keepdims)
        if mode not in ("avgmax", "catavgmax"):
            raise ValueError(f"{name}: mode must be one of ('avg', 'max', 'min', 'avgmax', "
                             f"'catavgmax'), got {mode!r}")
        avg = globals()[f"global_avg_pool{nd}d"](input, keepdims)
        top = globals()[f"global_max_pool{nd}d"](input, keepdims)
        if mode == "avgmax":
            return 0.5 * (avg + top)
        return torch.cat([avg, top], dim=0 if input.dim() == nd + 1 else 1)

    return global_pool


def _min_pool(nd: int):
    return _max_pool(nd, "min")


def _adaptive_min_pool(nd: int):
    return _adaptive_max_pool(nd, "min")


def _global_min_pool(nd: int):
    return _global_max_pool(nd, "min")


def _check_indices(indices, like: torch.Tensor, name: str) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name}: indices must be a torch.Tensor, got "
                        f"{type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise ValueError(f"{name}: indices must be int64 (as returned by max pooling with "
                         f"return_indices=True), got dtype {indices.dtype}")
    if indices.shape != like.shape or indices.device != like.device:
        raise ValueError(f"{name}: indices (shape {tuple(indices.shape)}, on "
                         f"{indices.device}) must have the input's shape "
                         f"{tuple(like.shape)} and device {like.device}")


def _max_unpool(nd: int):
    name = f"max_unpool{nd}d"

    def max_unpool(input: torch.Tensor, indices: torch.Tensor, kernel_size, stride=None,
                   padding=0, output_size=None) -> torch.Tensor:
        _check_input(input, "max unpooling", name)
        _check_shape(input, nd, name)
        _check_indices(indices, input, name)
        kernel = int_tuple(kernel_size, nd, "kernel_size", name)
        strides = kernel if stride is None else int_tuple(stride, nd, "stride", name)
        pads = int_tuple(padding, nd, "padding", name)
        sizes = unpool_output_shape(name, nd, tuple(input.shape[-nd:]), kernel, strides,
                                    pads, output_size)
        return _apply(name, input, indices, (list(kernel), list(strides), list(pads),
                                             list(sizes)))

    return max_unpool


def _fractional_max_pool(nd: int):
    name = f"fractional_max_pool{nd}d"

    def fractional_max_pool(input: torch.Tensor, kernel_size, output_size=None,
                            output_ratio=None, return_indices: bool = False,
                            _random_samples: torch.Tensor | None = None):
        _check_input(input, "fractional max", name)
        _check_shape(input, nd, name)
        return_indices = check_bool(return_indices, "return_indices", name)
        kernel, sizes = fractional_output_shape(name, nd, tuple(input.shape[-nd:]),
                                                kernel_size, output_size, output_ratio)
        batch = 1 if input.dim() == nd + 1 else input.size(0)
        channels = input.size(-nd - 1)
        if _random_samples is None:  # torch's draw, so torch.manual_seed reproduces it
            samples = torch.rand(batch, channels, nd, dtype=input.dtype, device=input.device)
        else:
            samples = _random_samples
            if not isinstance(samples, torch.Tensor):
                raise TypeError(f"{name}: _random_samples must be a torch.Tensor, got "
                                f"{type(samples).__name__}")
            if (samples.dim() != 3 or samples.size(0) < batch
                    or tuple(samples.shape[1:]) != (channels, nd)):
                raise ValueError(f"{name}: _random_samples must have shape (N, C, {nd}) with "
                                 f"N >= {batch} and C = {channels}, got "
                                 f"{tuple(samples.shape)}")
            if samples.dtype != input.dtype or samples.device != input.device:
                raise TypeError(f"{name}: _random_samples must have the input's dtype "
                                f"{input.dtype} and device {input.device} (as torch "
                                f"requires), got {samples.dtype} on {samples.device}")
            samples = samples[:batch]
        out, indices = _apply(name, input, (list(kernel), list(sizes), samples.detach()))
        return (out, indices) if return_indices else out

    return fractional_max_pool


def _gem_pool(nd: int):
    name = f"gem_pool{nd}d"

    def gem_pool(input: torch.Tensor, p=3.0, eps: float = 1e-6, output_size=1, *,
                 kernel_size=None, stride=None) -> torch.Tensor:
        _check_input(input, "GeM", name)
        _check_shape(input, nd, name)
        eps = _gem._check_eps(eps, name)
        channels = input.size(-nd - 1)
        if isinstance(p, torch.Tensor):
            if p.dtype not in _FLOATS:
                raise TypeError(f"{name}: p must be a float tensor, got dtype {p.dtype}")
            if p.device != input.device:
                raise ValueError(f"{name}: p is on {p.device} but the input on {input.device}")
            if p.shape == (1,):  # a learned scalar, as retrieval models hold it
                p = p.reshape(())
            elif p.dim() != 0 and tuple(p.shape) != (channels,):
                raise TypeError(f"{name}: p must be a positive float or one per channel "
                                f"(shape ({channels},)), got a tensor of shape "
                                f"{tuple(p.shape)}")
        else:
            # A float p stays a CPU scalar beside a CUDA input (reading it needs no
            # device sync); p per channel goes with the input, as a tensor p must.
            p = _gem._check_p(p, channels, name)
            p = torch.tensor(p, dtype=torch.float64,
                             device="cpu" if isinstance(p, float) else input.device)
        if kernel_size is None:
            sizes = int_tuple(output_size, nd, "output_size", name, allow_none=True)
            if any(s is not None and s <= 0 for s in sizes):
                raise ValueError(f"{name}: output_size must be positive, got {sizes}")
            spatial = input.shape[-nd:]
            params = (eps, [spatial[i] if s is None else s for i, s in enumerate(sizes)],
                      None, None)
        else:
            w = SlidingWindow._from_args(name, nd, kernel_size, stride, 0, 1, False)
            params = (eps, [], list(w.kernel_size), list(w.stride))
            _ops.gem_out_spatial(nd, input, *params[1:])  # the "input too small" error
        return _apply(name, input, p, params)

    return gem_pool


_DOCS = {
    "min_pool": "the arguments and result of torch.nn.functional's ``max_pool{nd}d``, "
                "with the minimum (torch has no min pooling)",
    "adaptive_min_pool": "the arguments and result of torch.nn.functional's "
                         "``adaptive_max_pool{nd}d``, with the minimum",
    "global_min_pool": "the minimum of each plane, as ``global_max_pool{nd}d``",
    "global_pool": "the arguments of ``fastpool.global_pool{nd}d`` (no return_indices): "
                   "``mode`` 'avg', 'max', 'min', 'avgmax' (timm's ``0.5 * (avg + max)``) "
                   "or 'catavgmax' (timm's ``torch.cat([avg, max], 1)``), composed from "
                   "``global_avg_pool{nd}d`` and ``global_max_pool{nd}d``",
    "gem_pool": "the arguments of ``fastpool.gem_pool{nd}d`` (CPU and CUDA tensors); ``p`` is a "
                "float, a sequence of one float per channel, or a tensor (0-d, shape (1,) "
                "or (C,)) that receives a gradient",
    "fractional_max_pool": "same arguments and result as torch.nn.functional's function "
                           "of the same name; without ``_random_samples`` they are drawn "
                           "with ``torch.rand`` as torch draws them, so ``torch.manual_seed`` "
                           "reproduces torch's result",
}


def _make(family: str, nd: int):
    function = globals()[f"_{family}"](nd)
    function.__name__ = function.__qualname__ = f"{family}{nd}d"
    about = _DOCS.get(family, "same arguments and result as torch.nn.functional's function "
                              "of the same name").format(nd=nd)
    function.__doc__ = (f"``fastpool.{family}{nd}d`` on torch tensors, autograd-aware.\n\n"
                        f"{about[0].upper()}{about[1:]}; runs "
                        f"``torch.ops.fastpool.{function.__name__}`` (see docs/torch.md).")
    return function


for _family in (*FAMILIES, *_NDS):
    for _nd in _NDS.get(_family, (1, 2, 3)):
        globals()[f"{_family}{_nd}d"] = _make(_family, _nd)


def _make_conv(nd: int):
    name = f"strided_conv{nd}d"

    def strided_conv(input: torch.Tensor, weight: torch.Tensor, stride=2, padding=0,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        for label, value in (("input", input), ("weight", weight), ("bias", bias)):
            if value is not None:
                _check_input(value, "conv", name, label)
        if weight.dtype != input.dtype:
            raise TypeError(f"{name}: weight dtype {weight.dtype} differs from input dtype "
                            f"{input.dtype}")
        window = ConvWindow.from_args(name, nd, stride, padding)
        params = (list(window.stride), list(window.padding))
        _ops.conv_out_shape(nd, input, weight, *params)  # shape errors, here
        return _apply(name, input, weight, bias, params)

    strided_conv.__name__ = strided_conv.__qualname__ = f"strided_conv{nd}d"
    strided_conv.__doc__ = (f"``fastpool.strided_conv{nd}d`` on torch tensors, "
                            f"autograd-aware (gradients for input, weight and bias).")
    return strided_conv


strided_conv1d, strided_conv2d, strided_conv3d = (_make_conv(nd) for nd in (1, 2, 3))

__all__ = [f"{family}{nd}d" for family in (*FAMILIES, *_NDS)
           for nd in _NDS.get(family, (1, 2, 3))] + [
    "strided_conv1d", "strided_conv2d", "strided_conv3d"]
