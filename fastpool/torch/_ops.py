"""fastpool's pooling kernels registered with torch as custom operators.

Each op is a custom operator of ``torch.library`` in the ``fastpool`` namespace
(``torch.ops.fastpool.max_pool2d``, ``torch.ops.fastpool.max_pool2d_backward``,
...), with

- one implementation for CPU and CUDA tensors, which calls fastpool's kernels on
  zero-copy views (NumPy for CPU tensors; CUDA tensors on torch's current
  stream), computing float16 and bfloat16 in float32;
- a fake (meta) implementation from fastpool's own shape rules (``_params``), so
  torch.compile, torch.export and dynamic shapes trace through without running
  a kernel;
- an autograd formula (``register_autograd``) whose backward is the
  ``*_backward`` op; the backward ops of max, average and adaptive pooling are
  linear in ``grad``, and their own backward is the forward's gather or window
  sum, so double backward works;
- a vmap rule that folds the vmapped dimension into the batch dimension.

Parameters arrive normalised (``fastpool.torch.functional`` validates them with
fastpool's messages before calling an op): lists of ints for the window, the
resolved output size for adaptive pooling.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

import fastpool
from fastpool import _threads
from fastpool._params import ConvWindow, SlidingWindow

NAMESPACE = "fastpool"
HALF = (torch.float16, torch.bfloat16)
_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


class Family(NamedTuple):
    """A pooling family's ops: ``<family><nd>d(x, *params)`` and
    ``<family><nd>d_backward(grad, x[, indices][, *params])``."""

    params: str  # the forward's parameters after x, as schema text
    with_indices: bool  # the forward also returns indices (and backward takes them)
    nds: tuple = (1, 2, 3)
    # The backward op takes the forward's parameters (adaptive and fractional pooling
    # read everything off grad and the indices).
    backward_params: bool = True
    # Names by which fastpool's function takes the parameters (None: positionally).
    keywords: tuple | None = None


_WINDOW = "int[] kernel_size, int[] stride, int[] padding"
_MAX_WINDOW = f"{_WINDOW}, int[] dilation, bool ceil_mode"
FAMILIES = {
    "max_pool": Family(_MAX_WINDOW, True),
    "avg_pool": Family(
        f"{_WINDOW}, bool ceil_mode, bool count_include_pad, int? divisor_override", False),
    "lp_pool": Family("float norm_type, int[] kernel_size, int[] stride, bool ceil_mode",
                      False),
    "adaptive_max_pool": Family("SymInt[] output_size", True, backward_params=False),
    "adaptive_avg_pool": Family("SymInt[] output_size", False, backward_params=False),
    "min_pool": Family(_MAX_WINDOW, True),
    "adaptive_min_pool": Family("SymInt[] output_size", True, backward_params=False),
    # The samples (N, C, nd) are drawn by the caller (fastpool.torch.functional, from
    # torch's generator), so the op is deterministic.
    "fractional_max_pool": Family("int[] kernel_size, SymInt[] output_size, Tensor samples",
                                  True, nds=(2, 3), backward_params=False,
                                  keywords=("kernel_size", "output_size", "_random_samples")),
}
# Families whose backward op is not linear in grad: no double backward.
_FIRST_ORDER = ("lp_pool", "gem_pool")
_SLIDING_EXTREMES = ("max_pool", "min_pool")


def is_channels_last(t: torch.Tensor, nd: int) -> bool:
    """A batched 4-D/5-D tensor stored channels-last (and not also channels-first)."""
    memory_format = _MEMORY_FORMATS.get(t.dim())
    return (memory_format is not None and t.dim() == nd + 2 and t.size(1) > 1
            and t.is_contiguous(memory_format=memory_format) and not t.is_contiguous())


def _host(t: torch.Tensor, channels_last: bool):
    """A zero-copy view for fastpool (halves converted to float32): NumPy for CPU
    tensors; CUDA tensors pass as themselves (fastpool reads their
    ``__cuda_array_interface__``)."""
    t = t.detach()
    if t.dtype in HALF:
        t = t.float()
    t = t.movedim(1, -1) if channels_last else t
    return t.numpy() if t.device.type == "cpu" else t


def _host_shape(t: torch.Tensor, channels_last: bool) -> tuple[int, ...]:
    shape = tuple(t.shape)
    return (shape[0], *shape[2:], shape[1]) if channels_last else shape


def _tensor(array, channels_last: bool, dtype: torch.dtype, like: torch.Tensor):
    """fastpool's result as a tensor in the input's layout and ``dtype``; never a view
    of ``like`` (a custom op's output must not alias its input)."""
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(array)
    t = t.movedim(-1, 1) if channels_last else t
    if t.dtype != dtype:
        t = t.to(dtype)  # keeps the channels-last strides
    else:
        start, size = like.untyped_storage().data_ptr(), like.untyped_storage().nbytes()
        if start <= t.data_ptr() < start + max(size, 1):
            t = t.clone()
    return t


def _empty(shape, channels_last: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty tensor with the shape, dtype and strides the implementation returns."""
    shape = tuple(shape)
    if channels_last:
        return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype,
                           device=device).movedim(-1, 1)
    return torch.empty(shape, dtype=dtype, device=device)


def _stream(t: torch.Tensor):
    """torch's current CUDA stream as a numba stream, so launches queue behind torch's."""
    if t.device.type != "cuda":
        return None
    from numba import cuda
    return cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)


@contextlib.contextmanager
def _torch_threads():
    """Run fastpool's CPU kernels on torch's intra-op thread count, unless
    ``fastpool.set_num_threads`` was called (see docs/torch.md)."""
    with _threads.default_threads(torch.get_num_threads()):
        yield


def out_spatial(family: str, nd: int, x: torch.Tensor, params) -> tuple:
    """The output's spatial shape, by fastpool's shape rules (works on symbolic sizes;
    not memoised: Dynamo cannot guard on the memo's keys)."""
    name = f"{family}{nd}d"
    spatial = tuple(x.shape[-nd:])
    if family.startswith("adaptive"):
        return tuple(params[0])
    if family == "fractional_max_pool":
        return tuple(params[1])
    if family == "lp_pool":
        _, kernel, stride, ceil_mode = params
        window = SlidingWindow._from_args(name, nd, tuple(kernel), tuple(stride), 0, 1,
                                          ceil_mode)
    else:
        kernel, stride, padding = (tuple(p) for p in params[:3])
        dilation, ceil_mode = ((tuple(params[3]), params[4]) if family in _SLIDING_EXTREMES
                               else (1, params[3]))
        window = SlidingWindow._from_args(name, nd, kernel, stride, padding, dilation,
                                          ceil_mode)
    return window.output_shape(name, spatial)


# --------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------


def _forward_impl(family: str, nd: int):
    function = getattr(fastpool, f"{family}{nd}d")
    spec = FAMILIES[family]
    with_indices = spec.with_indices

    # values_only (not in the schema: fastpool.torch's functions call this directly
    # when no autograd needs the indices): the maxima alone, the indices None.
    def impl(x, *params, values_only=False):
        cl = is_channels_last(x, nd)
        extra = {"return_indices": True} if with_indices and not values_only else {}
        params = [_host(p, False) if isinstance(p, torch.Tensor) else p for p in params]
        if spec.keywords:
            extra.update(zip(spec.keywords, params))
            params = []
        with _torch_threads():
            result = function(_host(x, cl), *params, **extra, channels_last=cl,
                              stream=_stream(x))
        if with_indices and values_only:
            return _tensor(result, cl, x.dtype, x), None
        if with_indices:
            out, indices = result
            return (_tensor(out, cl, x.dtype, x), _tensor(indices, cl, torch.int64, x))
        return _tensor(result, cl, x.dtype, x)

    return impl


def _forward_fake(family: str, nd: int):
    with_indices = FAMILIES[family].with_indices

    def fake(x, *params):
        cl = is_channels_last(x, nd)
        shape = (*x.shape[:-nd], *out_spatial(family, nd, x, params))
        out = _empty(shape, cl, x.dtype, x.device)
        return (out, _empty(shape, cl, torch.int64, x.device)) if with_indices else out

    return fake


def _backward_impl(family: str, nd: int):
    function = getattr(fastpool, f"{family}{nd}d_backward")
    with_indices = FAMILIES[family].with_indices

    def impl(grad, x, *rest):
        cl = is_channels_last(x, nd)
        g, stream = _host(grad, cl), _stream(x)
        with _torch_threads():
            if family in _SLIDING_EXTREMES:
                indices, kernel, stride, padding, dilation, ceil_mode = rest
                result = function(g, _host(indices, cl), _host_shape(x, cl),
                                  kernel_size=kernel, stride=stride, padding=padding,
                                  dilation=dilation, ceil_mode=ceil_mode, channels_last=cl,
                                  stream=stream)
            elif with_indices:
                result = function(g, _host(rest[0], cl), _host_shape(x, cl),
                                  channels_last=cl, stream=stream)
            elif family == "lp_pool":
                result = function(g, _host(x, cl), *rest, channels_last=cl, stream=stream)
            else:
                result = function(g, _host_shape(x, cl), *rest, channels_last=cl,
                                  stream=stream)
        return _tensor(result, cl, x.dtype, grad)

    return impl


def _backward_fake(family: str, nd: int):
    def fake(grad, x, *rest):
        return _empty(x.shape, is_channels_last(x, nd), x.dtype, x.device)

    return fake


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------


def op(name: str):
    """The OpOverload ``torch.ops.fastpool.<name>.default``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def gather(grad_input: torch.Tensor, indices: torch.Tensor, nd: int) -> torch.Tensor:
    """Max pooling's forward applied to a gradient: each output reads its argmax."""
    flat = grad_input.flatten(-nd).gather(-1, indices.flatten(-nd))
    return flat.reshape(indices.shape)


# The formulas registered on the ops themselves (register_autograd): autograd of a
# direct torch.ops.fastpool call, torch.library.opcheck, AOTAutograd.


def setup_forward(family: str, nd: int):
    def setup_context(ctx, inputs, output):
        x, *params = inputs
        ctx.n_params = len(params)
        ctx.params = params if FAMILIES[family].backward_params else []
        if FAMILIES[family].with_indices:
            _without_index_gradients(ctx, output)
            ctx.save_for_backward(x, output[1])
        else:
            ctx.save_for_backward(x)

    return setup_context


def _without_index_gradients(ctx, output) -> None:
    """The indices take no gradient, and none is made up for them: autograd fills
    one with zeros otherwise (the indices' size in int64: 0.45 ms of a 1 ms max
    pooling backward of 8x32x64x64).  The backward then gets None for an unused
    output, and gives None."""
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def backward_forward(family: str, nd: int):
    """The backward of a forward op: its ``*_backward`` op."""
    name = f"{family}{nd}d_backward"

    def backward(ctx, grad, *unused):
        if grad is None:  # (see _without_index_gradients)
            return (None, *(None for _ in range(ctx.n_params)))
        saved = ctx.saved_tensors
        grad_input = op(name)(grad, *saved, *ctx.params)
        return (grad_input, *(None for _ in range(ctx.n_params)))

    return backward


def _setup_backward(family: str, nd: int):
    def setup_context(ctx, inputs, output):
        grad, x, *rest = inputs
        ctx.n_inputs = len(inputs)
        with_indices = FAMILIES[family].with_indices
        ctx.params = rest[1:] if with_indices else rest
        ctx.out_spatial = list(grad.shape[-nd:])
        ctx.save_for_backward(rest[0] if with_indices else None)

    return setup_context


def _refuse_double_backward(family: str, nd: int) -> None:
    if family in _FIRST_ORDER:
        raise NotImplementedError(
            f"fastpool: {family}{nd}d has no double backward (its backward is not "
            f"linear in the gradient); max, min, average, adaptive, global, fractional "
            f"and unpooling have one")


def _backward_backward(family: str, nd: int):
    """The backward of a ``*_backward`` op with respect to ``grad`` (the op is linear
    in it): the forward's gather for max, the forward itself for averages."""

    def backward(ctx, grad_grad):
        _refuse_double_backward(family, nd)
        (indices,) = ctx.saved_tensors
        if FAMILIES[family].with_indices:
            result = gather(grad_grad, indices, nd)
        elif family == "adaptive_avg_pool":
            result = op(f"{family}{nd}d")(grad_grad, ctx.out_spatial)
        else:
            result = op(f"{family}{nd}d")(grad_grad, *ctx.params)
        return (result, *(None for _ in range(ctx.n_inputs - 1)))

    return backward


# --------------------------------------------------------------------------
# autograd.Functions that fastpool.torch applies: torch.func's transforms need a
# Function with its own setup_context (an op's register_autograd is not enough
# there), and each backward goes through the next Function, so double backward
# works under autograd and torch.func alike.  The parameters come as one tuple:
# Dynamo matches forward's arity to the call's.
# --------------------------------------------------------------------------


def _forward_function(family: str, nd: int) -> type:
    name = f"{family}{nd}d"
    with_indices = FAMILIES[family].with_indices
    backward_params = FAMILIES[family].backward_params

    def forward(x, params):
        return op(name)(x, *params)

    def setup_context(ctx, inputs, output):
        x, params = inputs
        ctx.params = params if backward_params else ()
        if with_indices:
            _without_index_gradients(ctx, output)
            ctx.save_for_backward(x, output[1])
        else:
            ctx.save_for_backward(x)

    def backward(ctx, grad, *unused):
        if grad is None:  # (see _without_index_gradients)
            return None, None
        x, *indices = ctx.saved_tensors
        return FUNCTIONS[f"{name}_backward"].apply(
            grad, x, indices[0] if indices else None, ctx.params), None

    return _function_type(name, forward, setup_context, backward)


def _backward_function(family: str, nd: int) -> type:
    name = f"{family}{nd}d_backward"

    def forward(grad, x, indices, params):
        if indices is None:
            return op(name)(grad, x, *params)
        return op(name)(grad, x, indices, *params)

    def setup_context(ctx, inputs, output):
        grad, x, indices, params = inputs
        ctx.params = params
        ctx.out_spatial = list(grad.shape[-nd:])
        ctx.save_for_backward(indices)

    def backward(ctx, grad_grad):
        _refuse_double_backward(family, nd)
        (indices,) = ctx.saved_tensors
        if indices is not None:
            result = gather(grad_grad, indices, nd)
        elif family == "adaptive_avg_pool":
            result = FUNCTIONS[f"{family}{nd}d"].apply(grad_grad, (ctx.out_spatial,))
        else:
            result = FUNCTIONS[f"{family}{nd}d"].apply(grad_grad, ctx.params)
        return result, None, None, None

    return _function_type(name, forward, setup_context, backward)


def _function_type(name, forward, setup_context, backward) -> type:
    stem = "".join(w[:1].upper() + w[1:] for w in name.split("_"))
    return type(f"{stem}Function", (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context), "backward": staticmethod(backward),
        "__module__": __name__, "__qualname__": f"{stem}Function"})


FUNCTIONS: dict = {}
for _family, _spec in FAMILIES.items():
    for _nd in _spec.nds:
        FUNCTIONS[f"{_family}{_nd}d"] = _forward_function(_family, _nd)
        FUNCTIONS[f"{_family}{_nd}d_backward"] = _backward_function(_family, _nd)


# --------------------------------------------------------------------------
# vmap: fold the vmapped dimension into the batch dimension
# --------------------------------------------------------------------------


def _vmap_rule(name: str, nd: int, n_outputs: int, samples: int | None = None):
    """Fold the vmapped dimension into the batch dimension.  ``samples``: the position
    of a per-batch (N, C, nd) tensor argument, whose leading N is folded whether or
    not the input is batched."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        batched = None
        moved = []
        for i, (arg, dim) in enumerate(zip(args, in_dims)):
            if isinstance(arg, torch.Tensor):
                arg = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
                if batched is None:
                    batched = arg.dim() - 1 == nd + 2  # (B, N, C, *spatial)
                if batched or i == samples:
                    arg = arg.flatten(0, 1)
            moved.append(arg)
        result = op_defs[name](*moved)
        if batched:
            result = tuple(r.unflatten(0, (size, -1)) for r in result) if n_outputs > 1 \
                else result.unflatten(0, (size, -1))
        return result, ((0,) * n_outputs if n_outputs > 1 else 0)

    return rule


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------

op_defs: dict = {}
IMPLS: dict = {}  # each op's implementation, which fastpool.torch's functions may call
# The ops' library.  Not torch.library.custom_op: its implementations import
# torch._dynamo at their first call (to run under torch._dynamo.disable), 1.2 s of
# an eager process's first fastpool op; these are torch.library's own registrations,
# as custom_op makes them, without that wrapper (dynamo does not trace into an op's
# implementation: it calls the op).
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _define(name: str, schema: str, impl, fake, *, autograd=None, vmap=None,
            device_types=("cpu", "cuda")):
    """Register ``torch.ops.fastpool.<name>``: its implementation, fake (meta)
    implementation, autograd formula ((backward, setup_context); without one, a
    backward through the op raises) and, where given, vmap rule."""
    qualified = f"{NAMESPACE}::{name}"
    _LIBRARY.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    for device in device_types:
        _LIBRARY.impl(name, impl, _DISPATCH_KEYS[device])
    IMPLS[name] = impl
    torch.library.register_fake(qualified, fake, lib=_LIBRARY)
    # An op without an autograd kernel would have torch's fallback, which warns and
    # gives zeros: a wrong second derivative.
    backward, setup_context = autograd or (_no_derivative(name), None)
    torch.library.register_autograd(qualified, backward, setup_context=setup_context,
                                    lib=_LIBRARY)
    if vmap is not None:
        torch.library.register_vmap(qualified, vmap, lib=_LIBRARY)
    op_defs[name] = op(name)
    return op_defs[name]


def _no_derivative(name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"fastpool: torch.ops.{NAMESPACE}.{name} has no derivative (fastpool's strided "
            f"convolution has first derivatives only)")

    return backward


def _register() -> None:
    for family, spec in FAMILIES.items():
        params, with_indices = spec.params, spec.with_indices
        samples = 3 if family == "fractional_max_pool" else None  # x, kernel, size, samples
        for nd in spec.nds:
            name = f"{family}{nd}d"
            outputs = "(Tensor, Tensor)" if with_indices else "Tensor"
            _define(name, f"(Tensor x, {params}) -> {outputs}", _forward_impl(family, nd),
                    _forward_fake(family, nd),
                    autograd=(backward_forward(family, nd), setup_forward(family, nd)),
                    vmap=_vmap_rule(name, nd, 1 + with_indices, samples))
            signature = ", ".join(p for p in ("Tensor grad, Tensor x",
                                              "Tensor indices" if with_indices else "",
                                              params if spec.backward_params else "") if p)
            _define(f"{name}_backward", f"({signature}) -> Tensor", _backward_impl(family, nd),
                    _backward_fake(family, nd),
                    autograd=(_backward_backward(family, nd), _setup_backward(family, nd)),
                    vmap=_vmap_rule(f"{name}_backward", nd, 1))


_register()


# --------------------------------------------------------------------------
# Max unpooling: max_unpool<nd>d(x, indices, window, output_size), whose backward
# max_unpool<nd>d_backward(grad, indices, window) gathers grad at the indices; that is
# linear in grad, and its own backward is the unpooling again (to grad's size).
# --------------------------------------------------------------------------

_UNPOOL_WINDOW = "int[] kernel_size, int[] stride, int[] padding"


def _unpool_ops(nd: int):
    name = f"max_unpool{nd}d"
    forward_function = getattr(fastpool, name)
    backward_function = getattr(fastpool, f"{name}_backward")

    def impl(x, indices, kernel_size, stride, padding, output_size):
        cl = is_channels_last(x, nd)
        with _torch_threads():
            out = forward_function(_host(x, cl), _host(indices, cl), kernel_size, stride,
                                   padding, output_size, channels_last=cl, stream=_stream(x))
        return _tensor(out, cl, x.dtype, x)

    def fake(x, indices, kernel_size, stride, padding, output_size):
        return _empty((*x.shape[:-nd], *output_size), is_channels_last(x, nd), x.dtype,
                      x.device)

    # The gradient takes the layout of the indices (those of the pooled input).
    def backward_impl(grad, indices, *window):
        cl = is_channels_last(indices, nd)
        with _torch_threads():
            out = backward_function(_host(grad, cl), _host(indices, cl), channels_last=cl,
                                    stream=_stream(grad))
        return _tensor(out, cl, grad.dtype, grad)

    def backward_fake(grad, indices, *window):
        return _empty(indices.shape, is_channels_last(indices, nd), grad.dtype, grad.device)

    def setup_context(ctx, inputs, output):
        x, indices, *params = inputs
        ctx.window = params[:3]
        ctx.save_for_backward(indices)

    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return op(f"{name}_backward")(grad, indices, *ctx.window), None, None, None, None, None

    def setup_backward(ctx, inputs, output):
        grad, indices, *window = inputs
        ctx.window, ctx.out_spatial = window, list(grad.shape[-nd:])
        ctx.save_for_backward(indices)

    def backward_backward(ctx, grad_grad):
        (indices,) = ctx.saved_tensors
        return op(name)(grad_grad, indices, *ctx.window, ctx.out_spatial), None, None, None, None

    return (impl, fake, backward_impl, backward_fake, (backward, setup_context),
            (backward_backward, setup_backward))


def _unpool_function(nd: int) -> type:
    name = f"max_unpool{nd}d"

    def forward(x, indices, params):
        return op(name)(x, indices, *params)

    def setup_context(ctx, inputs, output):
        x, indices, params = inputs
        ctx.window = params[:3]
        ctx.save_for_backward(indices)

    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return FUNCTIONS[f"{name}_backward"].apply(grad, indices, ctx.window), None, None

    return _function_type(name, forward, setup_context, backward)


def _unpool_backward_function(nd: int) -> type:
    name = f"max_unpool{nd}d"

    def forward(grad, indices, window):
        return op(f"{name}_backward")(grad, indices, *window)

    def setup_context(ctx, inputs, output):
        grad, indices, window = inputs
        ctx.params = (*window, list(grad.shape[-nd:]))
        ctx.save_for_backward(indices)

    def backward(ctx, grad_grad):
        (indices,) = ctx.saved_tensors
        return FUNCTIONS[name].apply(grad_grad, indices, ctx.params), None, None

    return _function_type(f"{name}_backward", forward, setup_context, backward)


def _register_unpool() -> None:
    for nd in (1, 2, 3):
        name = f"max_unpool{nd}d"
        impl, fake, backward_impl, backward_fake, autograd, autograd_backward = \
            _unpool_ops(nd)
        _define(name, f"(Tensor x, Tensor indices, {_UNPOOL_WINDOW}, SymInt[] output_size) "
                      f"-> Tensor", impl, fake, autograd=autograd, vmap=_vmap_rule(name, nd, 1))
        _define(f"{name}_backward", f"(Tensor grad, Tensor indices, {_UNPOOL_WINDOW}) -> Tensor",
                backward_impl, backward_fake, autograd=autograd_backward,
                vmap=_vmap_rule(f"{name}_backward", nd, 1))
        FUNCTIONS[name] = _unpool_function(nd)
        FUNCTIONS[f"{name}_backward"] = _unpool_backward_function(nd)


_register_unpool()


# --------------------------------------------------------------------------
# Generalized-mean (GeM) pooling: gem_pool<nd>d(x, p, eps, output_size, kernel_size,
# stride), p a 0-d tensor or one per channel; the backward op returns the gradients
# for x and p and has no backward of its own.  CPU tensors run fastpool's fused GeM
# kernels, CUDA tensors the CUDA back end's (on torch's current stream).
# --------------------------------------------------------------------------

_GEM = "float eps, SymInt[] output_size, int[]? kernel_size, int[]? stride"


def gem_out_spatial(nd: int, x: torch.Tensor, output_size, kernel_size, stride) -> tuple:
    """GeM's output spatial shape: adaptive (``output_size``, resolved) without a
    kernel, sliding windows (no padding) with one."""
    if kernel_size is None:
        return tuple(output_size)
    name = f"gem_pool{nd}d"
    window = SlidingWindow._from_args(name, nd, tuple(kernel_size), tuple(stride), 0, 1,
                                      False)
    return window.output_shape(name, tuple(x.shape[-nd:]))


def _gem_p(p: torch.Tensor):
    """p as fastpool takes it: a float, or float64 values per channel (on the host:
    the CUDA back end uploads its own copy of the powers)."""
    return float(p) if p.dim() == 0 else p.detach().to("cpu", torch.float64).numpy()


def _gem_ops(nd: int):
    name = f"gem_pool{nd}d"
    forward_function = getattr(fastpool, name)
    backward_function = getattr(fastpool, f"{name}_backward")

    def arguments(x, p, eps, output_size, kernel_size, stride):
        return dict(p=_gem_p(p), eps=eps, output_size=output_size if kernel_size is None
                    else 1, kernel_size=kernel_size, stride=stride,
                    channels_last=is_channels_last(x, nd), stream=_stream(x))

    def impl(x, p, *params):
        kw = arguments(x, p, *params)
        with _torch_threads():
            out = forward_function(_host(x, kw["channels_last"]), **kw)
        return _tensor(out, kw["channels_last"], x.dtype, x)

    def fake(x, p, eps, output_size, kernel_size, stride):
        spatial = gem_out_spatial(nd, x, output_size, kernel_size, stride)
        return _empty((*x.shape[:-nd], *spatial), is_channels_last(x, nd), x.dtype, x.device)

    def backward_impl(grad, x, p, eps, output_size, kernel_size, stride, with_grad_p=True):
        kw = arguments(x, p, eps, output_size, kernel_size, stride)
        cl = kw["channels_last"]
        with _torch_threads():
            grad_x, grad_p = backward_function(_host(grad, cl), _host(x, cl), **kw,
                                               need_grad_p=with_grad_p)
        # A fixed p's gradient (never used by autograd) is zeros: skipping it skips
        # the logarithms.
        grad_p = torch.zeros_like(p) if grad_p is None else \
            torch.tensor(grad_p, dtype=p.dtype, device=p.device).reshape(p.shape)
        return _tensor(grad_x, cl, x.dtype, grad), grad_p

    def backward_fake(grad, x, p, eps, output_size, kernel_size, stride, with_grad_p=True):
        return _empty(x.shape, is_channels_last(x, nd), x.dtype, x.device), p.new_empty(p.shape)

    def setup_context(ctx, inputs, output):
        x, p, *params = inputs
        ctx.params = params
        ctx.save_for_backward(x, p)

    def backward(ctx, grad):
        x, p = ctx.saved_tensors
        grad_x, grad_p = op(f"{name}_backward")(grad, x, p, *ctx.params,
                                                ctx.needs_input_grad[1])
        return (grad_x, grad_p, *(None for _ in ctx.params))

    def setup_backward(ctx, inputs, output):
        pass

    def backward_backward(ctx, *grads):
        _refuse_double_backward("gem_pool", nd)

    return (impl, fake, backward_impl, backward_fake, (backward, setup_context),
            (backward_backward, setup_backward))


def _gem_vmap_rule(nd: int, backward: bool):
    """vmap of a GeM op: the vmapped dimension joins the channel dimension, p becoming
    one per (slice, channel); so p may be shared or vmapped, and the backward's grad_p
    comes back per slice."""
    name = f"gem_pool{nd}d{'_backward' if backward else ''}"
    n_tensors = 3 if backward else 2  # ([grad,] x, p)

    def rule(info, in_dims, *args):
        size = info.batch_size
        *spatial, p = (a.movedim(d, 0) if d is not None else a.expand(size, *a.shape)
                       for a, d in zip(args[:n_tensors], in_dims[:n_tensors]))
        unbatched = spatial[-1].dim() - 1 == nd + 1  # (B, C, *spatial)
        spatial = [t.unsqueeze(1) if unbatched else t for t in spatial]  # (B, N, C, ...)
        channels = spatial[-1].shape[2]
        scalar_p = p.dim() == 1
        p = (p[:, None].expand(size, channels) if scalar_p else p).flatten()
        result = op_defs[name](*(t.transpose(0, 1).flatten(1, 2) for t in spatial), p,
                               *args[n_tensors:])
        out = (result[0] if backward else result).unflatten(1, (size, channels))
        out = out.transpose(0, 1)
        out = out.squeeze(1) if unbatched else out
        if not backward:
            return out, 0
        grad_p = result[1].reshape(size, channels)
        return (out, grad_p.sum(1) if scalar_p else grad_p), (0, 0)

    return rule


def _gem_function(nd: int) -> type:
    name = f"gem_pool{nd}d"

    def forward(x, p, params):
        return op(name)(x, p, *params)

    def setup_context(ctx, inputs, output):
        x, p, params = inputs
        ctx.params = params
        ctx.save_for_backward(x, p)

    def backward(ctx, grad):
        x, p = ctx.saved_tensors
        grad_x, grad_p = FUNCTIONS[f"{name}_backward"].apply(
            grad, x, p, (*ctx.params, ctx.needs_input_grad[1]))
        return grad_x, grad_p, None

    return _function_type(name, forward, setup_context, backward)


def _gem_backward_function(nd: int) -> type:
    name = f"gem_pool{nd}d_backward"

    def forward(grad, x, p, params):
        return op(name)(grad, x, p, *params)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        _refuse_double_backward("gem_pool", nd)

    return _function_type(name, forward, setup_context, backward)


def _register_gem() -> None:
    for nd in (1, 2, 3):
        name = f"gem_pool{nd}d"
        impl, fake, backward_impl, backward_fake, autograd, autograd_backward = _gem_ops(nd)
        _define(name, f"(Tensor x, Tensor p, {_GEM}) -> Tensor", impl, fake,
                autograd=autograd, vmap=_gem_vmap_rule(nd, False))
        _define(f"{name}_backward", f"(Tensor grad, Tensor x, Tensor p, {_GEM}, "
                                    f"bool with_grad_p=True) "
                                    f"-> (Tensor, Tensor)", backward_impl, backward_fake,
                autograd=autograd_backward, vmap=_gem_vmap_rule(nd, True))
        FUNCTIONS[name] = _gem_function(nd)
        FUNCTIONS[f"{name}_backward"] = _gem_backward_function(nd)


_register_gem()


# --------------------------------------------------------------------------
# Strided convolution
# --------------------------------------------------------------------------


def _conv_channels_last(x: torch.Tensor, nd: int) -> bool:
    # The channels-last convolution kernels run on the host; a GPU tensor goes
    # channels-first.
    return is_channels_last(x, nd) and x.device.type == "cpu"


def conv_out_shape(nd: int, x: torch.Tensor, weight: torch.Tensor, stride, padding) -> tuple:
    """The caller's shape of a strided convolution's result (symbolic sizes welcome)."""
    name = f"strided_conv{nd}d"
    window = ConvWindow.from_args(name, nd, tuple(stride), tuple(padding))
    spatial = window.output_shape(name, tuple(x.shape[-nd:]), tuple(weight.shape[-nd:]))
    if weight.dim() == nd:  # a plain image and filter
        return spatial
    return (*x.shape[:-nd - 1], weight.shape[0], *spatial)


def _conv_impl(nd: int):
    function = getattr(fastpool, f"strided_conv{nd}d")

    def impl(x, weight, bias, stride, padding):
        cl = _conv_channels_last(x, nd)
        if x.device.type != "cpu":
            x = x.contiguous()
        with _torch_threads():
            out = function(_host(x, cl), _host(weight, False), stride, padding,
                           None if bias is None else _host(bias, False), channels_last=cl,
                           stream=_stream(x))
        return _tensor(out, cl, x.dtype, x)

    def fake(x, weight, bias, stride, padding):
        return _empty(conv_out_shape(nd, x, weight, stride, padding),
                      _conv_channels_last(x, nd), x.dtype, x.device)

    return impl, fake


def _conv_backward_impl(nd: int):
    function = getattr(fastpool, f"strided_conv{nd}d_backward")

    # The gradients output_mask leaves out come back empty (a custom op returns
    # tensors), and autograd hands None on.  (torch's dispatcher leaves out trailing
    # arguments equal to their defaults: the functions keep them.)
    def impl(grad, x, weight, stride, padding, output_mask=(True, True, True)):
        cl = _conv_channels_last(x, nd)
        if x.device.type != "cpu":
            grad, x = grad.contiguous(), x.contiguous()
        with _torch_threads():
            grad_in, grad_weight, grad_bias = function(
                _host(grad, cl), _host(x, cl), _host(weight, False), stride, padding,
                output_mask=tuple(output_mask), channels_last=cl, stream=_stream(x))
        return (x.new_empty(0) if grad_in is None else _tensor(grad_in, cl, x.dtype, grad),
                *(weight.new_empty(0) if result is None else
                  _tensor(result, False, weight.dtype, weight)
                  for result in (grad_weight, grad_bias)))

    def fake(grad, x, weight, stride, padding, output_mask=(True, True, True)):
        channels = weight.shape[0] if weight.dim() == nd + 2 else 1
        wants_input, wants_weight, wants_bias = output_mask
        return (_empty(x.shape, _conv_channels_last(x, nd), x.dtype, x.device)
                if wants_input else x.new_empty(0),
                weight.new_empty(weight.shape if wants_weight else (0,)),
                weight.new_empty((channels,) if wants_bias else (0,)))

    return impl, fake


def _conv_function(nd: int) -> type:
    name = f"strided_conv{nd}d"

    def forward(x, weight, bias, params):
        return op(name)(x, weight, bias, *params)

    def setup_context(ctx, inputs, output):
        x, weight, bias, params = inputs
        ctx.params, ctx.has_bias = params, bias is not None
        ctx.save_for_backward(x, weight)

    def backward(ctx, grad):
        return *_conv_gradients(ctx, grad, name), None

    return _function_type(name, forward, setup_context, backward)


def _conv_gradients(ctx, grad, name: str) -> tuple:
    """(grad_input, grad_weight, grad_bias) of the convolution ``name``, each None
    unless autograd wants it: the backward op is asked for those alone, as torch's
    own convolution backward is (a first layer's input, the data, needs none; a
    frozen layer's weight neither)."""
    x, weight = ctx.saved_tensors
    wants_x, wants_weight, wants_bias = ctx.needs_input_grad[:3]
    mask = [bool(wants_x), bool(wants_weight), bool(wants_bias and ctx.has_bias)]
    grads = op(f"{name}_backward")(grad, x, weight, *ctx.params, mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


def _register_conv() -> None:
    for nd in (1, 2, 3):
        name = f"strided_conv{nd}d"

        def setup_context(ctx, inputs, output):
            x, weight, bias, *params = inputs
            ctx.params, ctx.has_bias = params, bias is not None
            ctx.save_for_backward(x, weight)

        def conv_backward(ctx, grad, name=name):
            return *_conv_gradients(ctx, grad, name), None, None

        _define(name, "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding) "
                      "-> Tensor", *_conv_impl(nd), autograd=(conv_backward, setup_context))
        _define(f"{name}_backward", "(Tensor grad, Tensor x, Tensor weight, int[] stride, "
                                    "int[] padding, bool[3] output_mask=[True, True, True]) "
                                    "-> (Tensor, Tensor, Tensor)",
                *_conv_backward_impl(nd))
        FUNCTIONS[name] = _conv_function(nd)


_register_conv()
