"""The public pooling functions, with torch.nn.functional's names and semantics.

Each 1-D/2-D/3-D family is made once by a factory: the functions differ only
in how many trailing axes they pool, so one definition and one docstring
template serve all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Union

import numpy as np
from numpy.typing import ArrayLike

from fastpool import _dispatch, _gem

Size = Union[int, Sequence[int]]
OptionalSize = Union[int, None, Sequence[Union[int, None]]]
Backend = Literal["cpu", "numpy", "cuda"]
Result = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]

_SHAPES = {
    1: ("L", "(N, C, L)", "(C, L)"),
    2: ("H, W", "(N, C, H, W)", "(C, H, W)"),
    3: ("D, H, W", "(N, C, D, H, W)", "(C, D, H, W)"),
}

_COMMON_KEYWORDS = """\
channels_last : bool, default False
    Input and output laid out as ``(N, *spatial, C)`` (or ``(*spatial, C)``)
    instead of ``(N, C, *spatial)``.
backend : {None, "cpu", "numpy", "cuda"}, default None
    None picks by the input: host arrays (and anything ``np.asarray`` takes)
    run on "cpu", the Numba kernels; GPU arrays (``__cuda_array_interface__``:
    numba, CuPy, torch) on "cuda"; "numpy" is the pure-NumPy reference.
stream : numba CUDA stream, optional
    The stream the CUDA back end launches on (the host back ends refuse one)."""

_PARAMETERS = {
    "x": "x : array_like\n    Input of shape {batched} or {unbatched}.",
    "kernel_size": "kernel_size : int or tuple of {nd} ints\n    Window size.",
    "stride": ("stride : int or tuple of {nd} ints, optional\n"
               "    Window step; defaults to kernel_size."),
    "padding": ("padding : int, tuple of {nd} ints, 'valid', 'same' or {nd} pairs, default 0\n"
                "    Implicit padding. An int pads both sides (torch's form, at most half\n"
                "    the kernel size). TensorFlow's and Flax's forms: ``'valid'`` (none),\n"
                "    ``'same'`` (``ceil(in / stride)`` outputs; the total padding split\n"
                "    with the extra element after) and ``((before, after), ...)`` per\n"
                "    axis, each side at most the effective kernel size minus one.\n"
                "    Averages count the padding as ``count_include_pad`` says: with\n"
                "    ``'same'``, False is TensorFlow/Keras's average pooling and True\n"
                "    Flax's."),
    "dilation": ("dilation : int or tuple of {nd} ints, default 1\n"
                 "    Spacing between window elements."),
    "ceil_mode": ("ceil_mode : bool, default False\n    Round the output size up, keeping a "
                  "partial last window\n    when it starts inside the input or the left "
                  "padding."),
    "return_indices": ("return_indices : bool, default False\n    Also return the flat (int64) "
                       "index of each maximum within\n    its input plane."),
    "count_include_pad": ("count_include_pad : bool, default True\n    Count padding elements "
                          "in the divisor."),
    "divisor_override": ("divisor_override : int, optional\n    Divide every window sum by this "
                         "instead of the window size."),
    "norm_type": "norm_type : float\n    The power p > 0 of the Lp norm.",
    "output_size": ("output_size : int or tuple of {nd} ints (or None)\n    Output spatial size; "
                    "a None entry keeps that input size."),
    "keepdims": ("keepdims : bool, default False\n    Keep the pooled axes, with size 1."),
}

_RETURNS = {
    "values": "out : numpy.ndarray\n    Pooled values, C-contiguous, with the input's dtype.",
    "indices": ("out, indices : numpy.ndarray\n    Pooled values and, with return_indices, "
                "the int64 indices\n    of the maxima (same shape)."),
}


def _doc(summary: str, params: Sequence[str], nd: int, torch_name: str, example: str,
         returns: str = "values", see_also: str | None = None) -> str:
    spatial, batched, unbatched = _SHAPES[nd]
    fields = {"nd": nd, "batched": batched, "unbatched": unbatched, "spatial": spatial}
    parameters = "\n".join(_PARAMETERS[p].format(**fields) for p in params)
    shape = "1, " * nd  # the example input is (1, ..., 1, 6): only the last axis is pooled
    kernel = "2" if nd == 1 else "(" + "1, " * (nd - 1) + "2)"
    return f"""{summary.format(**fields)}

Parameters
----------
{parameters}
{_COMMON_KEYWORDS}

Returns
-------
{_RETURNS[returns]}

Raises
------
ValueError
    For shapes or parameters that do not fit (the message names the argument).
TypeError
    For an unsupported dtype or a non-integer size.

See Also
--------
{see_also or f"{torch_name} : the PyTorch equivalent, which this matches exactly."}

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.array([1., 5., 2., 0., 3., 4.], dtype=np.float32).reshape({shape}6)
{example.format(kernel=kernel, nd=nd)}
"""


# Min pooling has no torch op; it equals torch's -max_pool(-x) on floats.
_MIN_NOTE = ("\n\nA NaN wins, ties keep the first element in scan order, and padding\n"
             "is the dtype's highest value; exact for unsigned integers and the\n"
             "most negative integer too (unlike ``-max(-x)``).")


def _see_also_min(torch_name: str) -> str:
    return f"{torch_name} : torch's max pooling; ``-{torch_name}(-x)`` equals this on floats."


def _max_pool(nd: int, reduction: str = "max") -> Callable[..., Result]:
    name = f"{reduction}_pool{nd}d"

    def max_pool(x: ArrayLike, kernel_size: Size, stride: Size | None = None,
                 padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
                 return_indices: bool = False, *, channels_last: bool = False,
                 backend: Backend | None = None, stream: object = None) -> Result:
        return _dispatch.sliding_pool(
            x, reduction, nd, kernel_size, stride, padding, dilation, ceil_mode, op=name,
            strict=True, return_indices=return_indices, channels_last=channels_last,
            backend=backend, stream=stream)

    torch_name = f"torch.nn.functional.max_pool{nd}d"
    max_pool.__doc__ = _doc(
        f"{{nd}}-D {reduction} pooling over the trailing spatial axes ({{spatial}})."
        + (_MIN_NOTE if reduction == "min" else ""),
        ["x", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
        nd, torch_name,
        f">>> fastpool.{reduction}_pool{{nd}}d(x, {{kernel}}).ravel()\n"
        + ("array([5., 2., 4.], dtype=float32)" if reduction == "max"
           else "array([1., 0., 3.], dtype=float32)"),
        returns="indices", see_also=_see_also_min(torch_name) if reduction == "min" else None)
    return _named(max_pool, name)


def _avg_pool(nd: int) -> Callable[..., np.ndarray]:
    name = f"avg_pool{nd}d"

    def avg_pool(x: ArrayLike, kernel_size: Size, stride: Size | None = None,
                 padding: Size = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None, *, channels_last: bool = False,
                 backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.sliding_pool(
            x, "avg", nd, kernel_size, stride, padding, 1, ceil_mode, op=name, strict=True,
            count_include_pad=count_include_pad, divisor_override=divisor_override,
            channels_last=channels_last, backend=backend, stream=stream)

    avg_pool.__doc__ = _doc(
        "{nd}-D average pooling over the trailing spatial axes ({spatial}).",
        ["x", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
         "divisor_override"],
        nd, f"torch.nn.functional.{name}",
        ">>> fastpool.avg_pool{nd}d(x, {kernel}).ravel()\n"
        "array([3. , 1. , 3.5], dtype=float32)")
    return _named(avg_pool, name)


def _lp_pool(nd: int) -> Callable[..., np.ndarray]:
    name = f"lp_pool{nd}d"

    def lp_pool(x: ArrayLike, norm_type: float, kernel_size: Size, stride: Size | None = None,
                ceil_mode: bool = False, *, channels_last: bool = False,
                backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.sliding_pool(
            x, "lp", nd, kernel_size, stride, 0, 1, ceil_mode, op=name, strict=True,
            norm_type=norm_type, channels_last=channels_last, backend=backend, stream=stream)

    lp_pool.__doc__ = _doc(
        "{nd}-D power-average (Lp) pooling: ``sum(x**p) ** (1/p)`` over each window.\n\n"
        "As in torch, this is computed as ``(avg_pool(x**p) * prod(kernel_size)) ** (1/p)``,\n"
        "so a partial ceil_mode window is rescaled to the full kernel size.",
        ["x", "norm_type", "kernel_size", "stride", "ceil_mode"],
        nd, f"torch.nn.functional.{name}",
        ">>> fastpool.lp_pool{nd}d(x, 1, {kernel}).ravel()\n"
        "array([6., 2., 7.], dtype=float32)")
    return _named(lp_pool, name)


def _adaptive_max_pool(nd: int, reduction: str = "max") -> Callable[..., Result]:
    name = f"adaptive_{reduction}_pool{nd}d"

    def adaptive_max_pool(x: ArrayLike, output_size: OptionalSize,
                          return_indices: bool = False, *, channels_last: bool = False,
                          backend: Backend | None = None, stream: object = None) -> Result:
        return _dispatch.adaptive_pool(
            x, reduction, nd, output_size, op=name, strict=True,
            return_indices=return_indices, channels_last=channels_last, backend=backend,
            stream=stream)

    torch_name = f"torch.nn.functional.adaptive_max_pool{nd}d"
    adaptive_max_pool.__doc__ = _doc(
        f"{{nd}}-D adaptive {reduction} pooling to a given output size.\n\n"
        "Output ``i`` of an axis of input size ``n`` and output size ``m`` covers\n"
        "``[floor(i*n/m), ceil((i+1)*n/m))``." + (_MIN_NOTE if reduction == "min" else ""),
        ["x", "output_size", "return_indices"], nd, torch_name,
        f">>> fastpool.adaptive_{reduction}_pool{{nd}}d(x, {{kernel}}).ravel()\n"
        + ("array([5., 4.], dtype=float32)" if reduction == "max"
           else "array([1., 0.], dtype=float32)"),
        returns="indices", see_also=_see_also_min(torch_name) if reduction == "min" else None)
    return _named(adaptive_max_pool, name)


def _adaptive_avg_pool(nd: int) -> Callable[..., np.ndarray]:
    name = f"adaptive_avg_pool{nd}d"

    def adaptive_avg_pool(x: ArrayLike, output_size: OptionalSize, *,
                          channels_last: bool = False,
                          backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.adaptive_pool(
            x, "avg", nd, output_size, op=name, strict=True, channels_last=channels_last,
            backend=backend, stream=stream)

    adaptive_avg_pool.__doc__ = _doc(
        "{nd}-D adaptive average pooling to a given output size.\n\n"
        "Output ``i`` of an axis of input size ``n`` and output size ``m`` covers\n"
        "``[floor(i*n/m), ceil((i+1)*n/m))``.",
        ["x", "output_size"], nd, f"torch.nn.functional.{name}",
        ">>> fastpool.adaptive_avg_pool{nd}d(x, {kernel}).ravel()\n"
        "array([2.6666667, 2.3333333], dtype=float32)")
    return _named(adaptive_avg_pool, name)


def _global_max_pool(nd: int, reduction: str = "max") -> Callable[..., Result]:
    name = f"global_{reduction}_pool{nd}d"

    def global_max_pool(x: ArrayLike, keepdims: bool = False, return_indices: bool = False,
                        *, channels_last: bool = False,
                        backend: Backend | None = None, stream: object = None) -> Result:
        return _dispatch.global_pool(
            x, reduction, nd, op=name, keepdims=keepdims, return_indices=return_indices,
            channels_last=channels_last, backend=backend, stream=stream)

    torch_name = f"torch.nn.functional.adaptive_max_pool{nd}d"
    extreme = "Maximum" if reduction == "max" else "Minimum"
    global_max_pool.__doc__ = _doc(
        f"{extreme} of each {{nd}}-D plane: {{batched}} -> (N, C), {{unbatched}} -> (C,)."
        + (_MIN_NOTE if reduction == "min" else ""),
        ["x", "keepdims", "return_indices"], nd, torch_name,
        f">>> fastpool.global_{reduction}_pool{{nd}}d(x)\n"
        + ("array([5.], dtype=float32)" if reduction == "max" else "array([0.], dtype=float32)"),
        returns="indices", see_also=_see_also_min(torch_name) if reduction == "min" else None)
    return _named(global_max_pool, name)


def _global_avg_pool(nd: int) -> Callable[..., np.ndarray]:
    name = f"global_avg_pool{nd}d"

    def global_avg_pool(x: ArrayLike, keepdims: bool = False, *, channels_last: bool = False,
                        backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.global_pool(x, "avg", nd, op=name, keepdims=keepdims,
                                     channels_last=channels_last, backend=backend, stream=stream)

    global_avg_pool.__doc__ = _doc(
        "Mean of each {nd}-D plane: {batched} -> (N, C), {unbatched} -> (C,).",
        ["x", "keepdims"], nd, f"torch.nn.functional.adaptive_avg_pool{nd}d",
        ">>> fastpool.global_avg_pool{nd}d(x)\narray([2.5], dtype=float32)")
    return _named(global_avg_pool, name)


def _global_pool(nd: int) -> Callable[..., Result]:
    name = f"global_pool{nd}d"

    def global_pool(x: ArrayLike,
                    mode: Literal["avg", "max", "min", "avgmax", "catavgmax"] = "avg",
                    keepdims: bool = False, return_indices: bool = False, *,
                    channels_last: bool = False, backend: Backend | None = None,
                    stream: object = None) -> Result:
        return _dispatch.global_pool(
            x, mode, nd, op=name, keepdims=keepdims, return_indices=return_indices,
            channels_last=channels_last, backend=backend, stream=stream)

    global_pool.__doc__ = _doc(
        "Global pooling of each {nd}-D plane by ``mode``, timm's heads included.\n\n"
        "``mode`` is \"avg\", \"max\", \"min\" (as ``global_<mode>_pool{nd}d``),\n"
        "\"avgmax\" (``0.5 * (avg + max)``, timm's ``adaptive_avgmax_pool``) or\n"
        "\"catavgmax\" (the average's channels, then the maximum's: 2C channels,\n"
        "timm's ``adaptive_catavgmax_pool``).  Compositions of the global average\n"
        "and maximum on every back end; return_indices gives the maximum's indices\n"
        "(C channels), which :func:`global_pool{nd}d_backward` takes.",
        ["x", "keepdims", "return_indices"], nd,
        f"torch.nn.functional.adaptive_avg_pool{nd}d",
        ">>> fastpool.global_pool{nd}d(x, \"avgmax\")\narray([3.75], dtype=float32)\n"
        ">>> fastpool.global_pool{nd}d(x, \"catavgmax\")\narray([2.5, 5. ], dtype=float32)",
        returns="indices",
        see_also="timm.layers.adaptive_avgmax_pool : the timm heads this matches.")
    return _named(global_pool, name)


def _global_pool_backward(nd: int) -> Callable[..., np.ndarray]:
    name = f"global_pool{nd}d_backward"

    def global_pool_backward(grad_output: ArrayLike, indices: ArrayLike | None,
                             input_shape: Sequence[int],
                             mode: Literal["avg", "max", "min", "avgmax", "catavgmax"] = "avg",
                             *, channels_last: bool = False, backend: Backend | None = None,
                             stream: object = None) -> np.ndarray:
        common = dict(channels_last=channels_last, backend=backend, stream=stream)
        if mode == "avg":
            return _dispatch.adaptive_avg_backward(grad_output, input_shape, nd, op=name,
                                                   squeezed=True, **common)
        if mode in ("max", "min"):
            return _dispatch.max_backward(grad_output, indices, input_shape, nd, op=name,
                                          kind="global", **common)
        return _dispatch.global_combined_backward(grad_output, indices, input_shape, mode, nd,
                                                  op=name, **common)

    global_pool_backward.__doc__ = _backward_doc(
        f"global_pool{nd}d", ["grad_output", "indices", "input_shape"], nd,
        ">>> out, i = fastpool.global_pool{nd}d(x, \"avgmax\", return_indices=True)\n"
        ">>> fastpool.global_pool{nd}d_backward(np.ones_like(out), i, x.shape, "
        "\"avgmax\").ravel().round(4)\n"
        "array([0.0833, 0.5833, 0.0833, 0.0833, 0.0833, 0.0833])").replace(
        "Parameters\n----------\n",
        "Parameters\n----------\nmode : {\"avg\", \"max\", \"min\", \"avgmax\", "
        "\"catavgmax\"}\n    The forward's mode (after input_shape; indices may be None "
        "for \"avg\").\n")
    return _named(global_pool_backward, name)


_BACKWARD_PARAMETERS = {
    "grad_output": ("grad_output : array_like\n    Gradient of the loss with respect to the "
                    "forward output\n    (float32 or float64)."),
    "indices": ("indices : array_like of int64\n    The indices the forward op returned with "
                "return_indices=True."),
    "input_shape": "input_shape : tuple of ints\n    Shape of the forward input.",
    "x": "x : array_like\n    The forward input.",
    "window": ("kernel_size, stride, padding, dilation, ceil_mode : optional\n    The forward "
               "call's window, keyword-only.  Optional: with it the\n    CUDA back end "
               "gathers each input's gradient from the windows that\n    cover it; without "
               "it, it adds plane by plane (both deterministic)."),
}


def _backward_doc(forward: str, params: Sequence[str], nd: int, example: str) -> str:
    parameters = "\n".join(_BACKWARD_PARAMETERS.get(p) or _PARAMETERS[p].format(nd=nd)
                           for p in params)
    return f"""Gradient of :func:`{forward}` with respect to its input.

Deterministic: every thread owns whole planes of the result, so the
same inputs give bit-identical gradients at any thread count.

Parameters
----------
{parameters}
{_COMMON_KEYWORDS}

Returns
-------
grad_input : numpy.ndarray
    Of the input's shape and grad_output's dtype.

Raises
------
ValueError
    When grad_output, indices or input_shape do not fit the forward op.

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.array([1., 5., 2., 0., 3., 4.]).reshape({"1, " * nd}6)
{example.format(nd=nd, kernel="2" if nd == 1 else "(" + "1, " * (nd - 1) + "2)")}
"""


def _max_pool_backward(nd: int, forward: str) -> Callable[..., np.ndarray]:
    name = f"{forward}{nd}d_backward"

    if forward in ("max_pool", "min_pool"):
        def max_pool_backward(grad_output: ArrayLike, indices: ArrayLike,
                              input_shape: Sequence[int], *, kernel_size: Size | None = None,
                              stride: Size | None = None, padding: Size = 0,
                              dilation: Size = 1, ceil_mode: bool = False,
                              channels_last: bool = False, backend: Backend | None = None,
                              stream: object = None) -> np.ndarray:
            window = None if kernel_size is None else (kernel_size, stride, padding,
                                                       dilation, ceil_mode)
            return _dispatch.max_backward(grad_output, indices, input_shape, nd, op=name,
                                          kind="sliding", window=window,
                                          channels_last=channels_last, backend=backend,
                                          stream=stream)
    else:
        def max_pool_backward(grad_output: ArrayLike, indices: ArrayLike,
                              input_shape: Sequence[int], *, channels_last: bool = False,
                              backend: Backend | None = None,
                              stream: object = None) -> np.ndarray:
            return _dispatch.max_backward(grad_output, indices, input_shape, nd, op=name,
                                          kind=forward.split("_")[0],  # adaptive, global
                                          channels_last=channels_last, backend=backend,
                                          stream=stream)

    call, expected = {
        "max_pool": ("{kernel}, return_indices=True", "[0., 1., 1., 0., 0., 1.]"),
        "adaptive_max_pool": ("{kernel}, return_indices=True", "[0., 1., 0., 0., 0., 1.]"),
        "global_max_pool": ("return_indices=True", "[0., 1., 0., 0., 0., 0.]"),
        "min_pool": ("{kernel}, return_indices=True", "[1., 0., 0., 1., 1., 0.]"),
        "adaptive_min_pool": ("{kernel}, return_indices=True", "[1., 0., 0., 1., 0., 0.]"),
        "global_min_pool": ("return_indices=True", "[0., 0., 0., 1., 0., 0.]"),
    }[forward]
    window_params = ["window"] if forward in ("max_pool", "min_pool") else []
    max_pool_backward.__doc__ = _backward_doc(
        f"{forward}{nd}d", ["grad_output", "indices", "input_shape", *window_params], nd,
        f">>> out, idx = fastpool.{forward}{{nd}}d(x, {call})\n"
        f">>> fastpool.{name}(np.ones_like(out), idx, x.shape).ravel()\n"
        f"array({expected})")
    return _named(max_pool_backward, name)


def _avg_pool_backward(nd: int) -> Callable[..., np.ndarray]:
    name = f"avg_pool{nd}d_backward"

    def avg_pool_backward(grad_output: ArrayLike, input_shape: Sequence[int],
                          kernel_size: Size, stride: Size | None = None, padding: Size = 0,
                          ceil_mode: bool = False, count_include_pad: bool = True,
                          divisor_override: int | None = None, *,
                          channels_last: bool = False,
                          backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.sliding_backward(
            grad_output, input_shape, "avg", nd, kernel_size, stride, padding, ceil_mode,
            op=name, count_include_pad=count_include_pad, divisor_override=divisor_override,
            channels_last=channels_last, backend=backend, stream=stream)

    avg_pool_backward.__doc__ = _backward_doc(
        f"avg_pool{nd}d", ["grad_output", "input_shape", "kernel_size", "stride", "padding",
                           "ceil_mode", "count_include_pad", "divisor_override"], nd,
        f">>> g = np.ones_like(fastpool.avg_pool{{nd}}d(x, {{kernel}}))\n"
        f">>> fastpool.{name}(g, x.shape, {{kernel}}).ravel()\n"
        "array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])")
    return _named(avg_pool_backward, name)


def _lp_pool_backward(nd: int) -> Callable[..., np.ndarray]:
    name = f"lp_pool{nd}d_backward"

    def lp_pool_backward(grad_output: ArrayLike, x: ArrayLike, norm_type: float,
                         kernel_size: Size, stride: Size | None = None,
                         ceil_mode: bool = False, *, channels_last: bool = False,
                         backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.sliding_backward(
            grad_output, None, "lp", nd, kernel_size, stride, 0, ceil_mode, op=name, x=x,
            norm_type=norm_type, channels_last=channels_last, backend=backend, stream=stream)

    lp_pool_backward.__doc__ = _backward_doc(
        f"lp_pool{nd}d", ["grad_output", "x", "norm_type", "kernel_size", "stride",
                          "ceil_mode"], nd,
        f">>> g = np.ones_like(fastpool.lp_pool{{nd}}d(x, 1, {{kernel}}))\n"
        f">>> fastpool.{name}(g, x, 1, {{kernel}}).ravel()\n"
        "array([1., 1., 1., 1., 1., 1.])")
    return _named(lp_pool_backward, name)


def _avg_backward_of(nd: int, forward: str) -> Callable[..., np.ndarray]:
    name = f"{forward}{nd}d_backward"

    def avg_backward(grad_output: ArrayLike, input_shape: Sequence[int], *,
                     channels_last: bool = False,
                     backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.adaptive_avg_backward(
            grad_output, input_shape, nd, op=name, squeezed=forward == "global_avg_pool",
            channels_last=channels_last, backend=backend, stream=stream)

    call = "{kernel}" if forward == "adaptive_avg_pool" else ""
    avg_backward.__doc__ = _backward_doc(
        f"{forward}{nd}d", ["grad_output", "input_shape"], nd,
        f">>> g = np.ones_like(fastpool.{forward}{{nd}}d(x{', ' if call else ''}{call}))\n"
        f">>> fastpool.{name}(g, x.shape).ravel().round(4)\n"
        + ("array([0.3333, 0.3333, 0.3333, 0.3333, 0.3333, 0.3333])"
           if call else "array([0.1667, 0.1667, 0.1667, 0.1667, 0.1667, 0.1667])"))
    return _named(avg_backward, name)


def _strided_conv(nd: int) -> Callable[..., np.ndarray]:
    name = f"strided_conv{nd}d"
    spatial, batched, unbatched = _SHAPES[nd]

    def strided_conv(x: ArrayLike, weight: ArrayLike, stride: Size = 2, padding: Size = 0,
                     bias: ArrayLike | None = None, *, channels_last: bool = False,
                     backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.conv(x, weight, nd, stride, padding, bias, op=name,
                              channels_last=channels_last, backend=backend, stream=stream)

    example = {1: ("np.array([1., 2., 3., 4., 5.])", "np.array([1., -1.])", "array([-1., -1.])"),
               2: ("np.arange(16.0).reshape(4, 4)", "np.array([[1., 0.], [0., -1.]])",
                   "array([[-5., -5.],\n       [-5., -5.]])"),
               3: ("np.arange(27.0).reshape(3, 3, 3)", "np.ones((1, 1, 2))",
                   "array([[[ 1.],\n        [13.]],\n<BLANKLINE>\n       [[37.],\n"
                   "        [49.]]])")}[nd]
    strided_conv.__doc__ = f"""{nd}-D strided convolution: learnable downsampling.

Cross-correlation with torch.nn.functional.conv{nd}d's semantics (no kernel
flip, ``groups=1``, ``dilation=1``), with a default stride of 2.  Input
{batched} or {unbatched} with weight ``(C_out, C_in, *kernel)``; or a plain
{nd}-D array with a {nd}-D filter, giving a plain {nd}-D result.

Parameters
----------
x : array_like
    Input, float32 or float64 (float16 too on the GPU).
weight : array_like
    ``(C_out, C_in, *kernel)``, or a {nd}-D filter for a {nd}-D input; the
    input's dtype.
stride : int or tuple of {nd} ints, default 2
    Step of the filter.
padding : int or tuple of {nd} ints, default 0
    Zero padding on both sides.
bias : array_like, optional
    ``(C_out,)``, added to every output of that channel.
{_COMMON_KEYWORDS}

Returns
-------
out : numpy.ndarray
    ``(N, C_out, *out_spatial)``, output size ``(in + 2*padding - kernel) // stride + 1``.

Raises
------
ValueError
    For shapes that do not fit (the message names the argument).
TypeError
    For an unsupported dtype or mismatched input and weight dtypes.

See Also
--------
torch.nn.functional.conv{nd}d : the PyTorch equivalent.
strided_conv{nd}d_backward : its gradients.

Examples
--------
>>> import numpy as np, fastpool
>>> fastpool.{name}({example[0]}, {example[1]})
{example[2]}
"""
    return _named(strided_conv, name)


def _strided_conv_backward(nd: int) -> Callable[..., tuple]:
    name = f"strided_conv{nd}d_backward"

    def strided_conv_backward(grad_output: ArrayLike, x: ArrayLike, weight: ArrayLike,
                              stride: Size = 2, padding: Size = 0, *,
                              output_mask: Sequence[bool] = (True, True, True),
                              channels_last: bool = False, backend: Backend | None = None,
                              stream: object = None) -> tuple:
        return _dispatch.conv_backward(grad_output, x, weight, nd, stride, padding, op=name,
                                       channels_last=channels_last, output_mask=output_mask,
                                       backend=backend, stream=stream)

    strided_conv_backward.__doc__ = f"""Gradients of :func:`strided_conv{nd}d`.

On the CPU both gradients are gathers: each input-gradient row and each
tile of the weight gradient is summed by one thread in a fixed order, so
the results are race-free and bit-identical from run to run, at any thread
count.

Parameters
----------
grad_output : array_like
    Gradient of the loss with respect to the convolution's output.
x, weight : array_like
    The forward call's input and weight.
stride, padding : int or tuple of {nd} ints
    The forward call's stride (default 2) and padding.
output_mask : tuple of 3 bools, optional
    Which of (grad_input, grad_weight, grad_bias) to compute, as torch's
    ``convolution_backward`` takes it; the others come back as None.  A
    network's first layer needs no grad_input (its input is the data), a
    frozen layer no grad_weight: each skipped gradient is a third of the work.
{_COMMON_KEYWORDS}

Returns
-------
grad_input, grad_weight, grad_bias : numpy.ndarray or None
    Shaped like ``x``, ``weight`` and ``(C_out,)``; None where ``output_mask``
    says.

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.arange(5.0).reshape({(1,) * (nd - 1) + (5,)})
>>> w = np.array([1., -1.]).reshape({(1,) * (nd - 1) + (2,)})
>>> g = np.ones({(1,) * (nd - 1) + (2,)})
>>> [a.ravel().tolist() for a in fastpool.{name}(g, x, w)]
[[1.0, -1.0, 1.0, -1.0, 0.0], [2.0, 4.0], [2.0]]
>>> fastpool.{name}(g, x, w, output_mask=(False, True, False))[0] is None
True
"""
    return _named(strided_conv_backward, name)


def _fractional_max_pool(nd: int) -> Callable[..., Result]:
    name = f"fractional_max_pool{nd}d"
    spatial, batched, unbatched = _SHAPES[nd]

    def fractional_max_pool(x: ArrayLike, kernel_size: Size,
                            output_size: Size | None = None,
                            output_ratio: float | Sequence[float] | None = None,
                            return_indices: bool = False, _random_samples: ArrayLike = None,
                            *, seed: int | np.random.Generator | None = None,
                            channels_last: bool = False, backend: Backend | None = None,
                            stream: object = None) -> Result:
        return _dispatch.fractional_max_pool(
            x, nd, kernel_size, output_size, output_ratio, op=name,
            return_indices=return_indices, samples=_random_samples, seed=seed,
            channels_last=channels_last, backend=backend, stream=stream)

    samples = "(N, C, 2)" if nd == 2 else "(N, C, 3)"
    order = "sample 0 drives W and sample 1 H" if nd == 2 else "samples 0, 1, 2 drive T, H, W"
    fractional_max_pool.__doc__ = f"""{nd}-D fractional max pooling (Graham, 2014), as in torch.

Windows of ``kernel_size`` start at pseudo-random positions fixed by one sample
``u`` in [0, 1) per (batch, channel) and axis: with ``alpha = (in - k) / (out - 1)``
(in the input's precision), window ``i < out - 1`` starts at
``int((i + u) * alpha) - int(u * alpha)`` and the last at ``in - k``; {order}.

Parameters
----------
x : array_like
    Input of shape {batched} or {unbatched}.
kernel_size : int or tuple of {nd} ints
    Window size.
output_size : int or tuple of {nd} ints, optional
    Output spatial size; or give
output_ratio : float or tuple of {nd} floats in (0, 1), optional
    Output size as ``int(in * ratio)``.
return_indices : bool, default False
    Also return the flat (int64) index of each maximum within its plane.
_random_samples : array_like, optional
    The samples, shape {samples} (N at least the batch size) in the input's dtype:
    with torch's, the result equals torch's bit for bit.
seed : int or numpy.random.Generator, optional
    Without samples, they are drawn from ``numpy.random.default_rng(seed)``.
{_COMMON_KEYWORDS}

Returns
-------
{_RETURNS["indices"]}

See Also
--------
torch.nn.functional.{name} : the PyTorch equivalent.
fractional_max_pool{nd}d_backward : its gradient (a deterministic scatter).

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.arange({8 ** nd}.0).reshape(1, 1, {"8, " * (nd - 1)}8)
>>> fastpool.{name}(x, 2, output_size=4, seed=0).shape
{(1, 1) + (4,) * nd}
"""
    return _named(fractional_max_pool, name)


def _fractional_max_pool_backward(nd: int) -> Callable[..., np.ndarray]:
    name = f"fractional_max_pool{nd}d_backward"

    def fractional_max_pool_backward(grad_output: ArrayLike, indices: ArrayLike,
                                     input_shape: Sequence[int], *,
                                     channels_last: bool = False,
                                     backend: Backend | None = None,
                                     stream: object = None) -> np.ndarray:
        # Windows are per plane: no shared table to gather through, so a scatter.
        return _dispatch.max_backward(grad_output, indices, input_shape, nd, op=name,
                                      kind="sliding", channels_last=channels_last,
                                      backend=backend, stream=stream)

    fractional_max_pool_backward.__doc__ = _backward_doc(
        f"fractional_max_pool{nd}d", ["grad_output", "indices", "input_shape"], nd,
        f">>> cube = np.arange({2 ** nd}.0).reshape(1, 1, {', '.join(['2'] * nd)})\n"
        f">>> out, idx = fastpool.fractional_max_pool{{nd}}d(cube, 1, 1, seed=0, "
        "return_indices=True)  # one window, at in - k\n"
        f">>> fastpool.{name}(np.ones_like(out), idx, cube.shape).ravel()\n"
        f"array([{'0., ' * (2 ** nd - 1)}1.])")
    return _named(fractional_max_pool_backward, name)


def _max_unpool(nd: int) -> Callable[..., np.ndarray]:
    name = f"max_unpool{nd}d"
    spatial, batched, unbatched = _SHAPES[nd]

    def max_unpool(x: ArrayLike, indices: ArrayLike, kernel_size: Size,
                   stride: Size | None = None, padding: Size = 0,
                   output_size: Sequence[int] | None = None, *, channels_last: bool = False,
                   backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _dispatch.max_unpool(x, indices, nd, kernel_size, stride, padding, output_size,
                                    op=name, channels_last=channels_last, backend=backend,
                                    stream=stream)

    kernel = "2" if nd == 1 else "(" + "1, " * (nd - 1) + "2)"
    max_unpool.__doc__ = f"""Partial inverse of :func:`max_pool{nd}d`: each value back at its index.

The output is zero except ``out[plane][indices] = x``. Among duplicate indices
(overlapping windows) the last input in scan order wins, on every back end and
at any thread count (torch's result depends on thread timing there).

Parameters
----------
x : array_like
    Pooled input of shape {batched} or {unbatched}: any dtype max pooling takes.
indices : array_like of int64
    The flat indices :func:`max_pool{nd}d` returned with ``return_indices=True``.
kernel_size, stride, padding : int or tuple of {nd} ints
    The pooling call's window (stride defaults to kernel_size).
output_size : sequence of {nd} or {nd + 2} ints, optional
    The output's spatial size; by default ``(in - 1) * stride + kernel - 2 * padding``
    per axis, and any other choice must lie strictly within ``stride`` of it.
{_COMMON_KEYWORDS}

Returns
-------
out : numpy.ndarray
    With the input's dtype.

Raises
------
ValueError
    For an output_size out of range, or an index outside the output plane (named).

See Also
--------
torch.nn.functional.max_unpool{nd}d : the PyTorch equivalent.

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.array([1., 5., 2., 0., 3., 4.]).reshape({"1, " * nd}6)
>>> out, idx = fastpool.max_pool{nd}d(x, {kernel}, return_indices=True)
>>> fastpool.max_unpool{nd}d(out, idx, {kernel}).ravel()
array([0., 5., 2., 0., 0., 4.])
"""
    return _named(max_unpool, name)


def _max_unpool_backward(nd: int) -> Callable[..., np.ndarray]:
    name = f"max_unpool{nd}d_backward"

    def max_unpool_backward(grad_output: ArrayLike, indices: ArrayLike, *,
                            channels_last: bool = False, backend: Backend | None = None,
                            stream: object = None) -> np.ndarray:
        return _dispatch.max_unpool_backward(grad_output, indices, nd, op=name,
                                             channels_last=channels_last, backend=backend,
                                             stream=stream)

    max_unpool_backward.__doc__ = _backward_doc(
        f"max_unpool{nd}d", ["grad_output", "indices"], nd,
        ">>> out, idx = fastpool.max_pool{nd}d(x, {kernel}, return_indices=True)\n"
        f">>> g = np.arange(6.0).reshape(x.shape)\n"
        f">>> fastpool.{name}(g, idx).ravel()\n"
        "array([1., 2., 5.])")
    return _named(max_unpool_backward, name)


def _gem_pool(nd: int) -> Callable[..., np.ndarray]:
    name = f"gem_pool{nd}d"
    spatial, batched, unbatched = _SHAPES[nd]

    def gem_pool(x: ArrayLike, p: float | ArrayLike = 3.0, eps: float = 1e-6,
                 output_size: OptionalSize = 1, *, kernel_size: Size | None = None,
                 stride: Size | None = None, channels_last: bool = False,
                 backend: Backend | None = None, stream: object = None) -> np.ndarray:
        return _gem.gem_pool(x, nd, p, eps, output_size, kernel_size, stride, op=name,
                             channels_last=channels_last, backend=backend, stream=stream)

    gem_pool.__doc__ = f"""{nd}-D generalized-mean (GeM) pooling: ``mean(max(x, eps)**p)**(1/p)``.

The retrieval and fine-grained-recognition head of Radenovic et al.: p = 1 is
average pooling, large p approaches max pooling. Global by default
(``output_size=1``), adaptive for other output sizes, sliding windows when
``kernel_size`` is given. Computed in the input's precision, float16 in float32,
by the formula as written (as torch code would), so ``x ** p`` overflows to inf for
large values and large p.

Parameters
----------
x : array_like
    Input of shape {batched} or {unbatched}; float16, float32 or float64.
p : float or array_like of C floats, default 3.0
    The power, one for all channels or one per channel (all positive).
eps : float, default 1e-6
    Values below eps count as eps (so the powers and logarithms are defined).
output_size : int or tuple of {nd} ints (or None), default 1
    Adaptive output size, as :func:`adaptive_avg_pool{nd}d`; unused with kernel_size.
kernel_size, stride : int or tuple of {nd} ints, optional
    Sliding windows instead of adaptive ones (stride defaults to kernel_size).
channels_last : bool, default False
    Input and output laid out as ``(N, *spatial, C)``.
backend : {{None, "cpu", "numpy", "cuda"}}, default None
    "cpu" runs fused kernels (clamp, power and window sums in one pass); "numpy"
    composes NumPy steps around its average pooling; GPU arrays run on "cuda"
    (element-wise kernels around its average pooling, the half types in float32).
stream : numba CUDA stream, optional
    The stream the CUDA back end launches on (default: the input's own stream, from
    its ``__cuda_array_interface__``; the host back ends refuse one).

Returns
-------
out : numpy.ndarray
    The pooled values, with the input's dtype (the input's kind of array on "cuda").

See Also
--------
gem_pool{nd}d_backward : gradients for x and for p.

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.array([1., 5., 2., 2., 3., 5.]).reshape({"1, " * nd}6)
>>> fastpool.gem_pool{nd}d(x, p=1.0).ravel()  # the average
array([3.])
>>> np.round(fastpool.gem_pool{nd}d(x, p=50.0).ravel(), 2)  # approaching the max, 5
array([4.89])
"""
    return _named(gem_pool, name)


def _gem_pool_backward(nd: int) -> Callable[..., tuple]:
    name = f"gem_pool{nd}d_backward"

    def gem_pool_backward(grad_output: ArrayLike, x: ArrayLike, p: float | ArrayLike = 3.0,
                          eps: float = 1e-6, output_size: OptionalSize = 1, *,
                          kernel_size: Size | None = None, stride: Size | None = None,
                          channels_last: bool = False, backend: Backend | None = None,
                          stream: object = None, need_grad_p: bool = True) -> tuple:
        return _gem.gem_pool_backward(grad_output, x, nd, p, eps, output_size, kernel_size,
                                      stride, op=name, channels_last=channels_last,
                                      backend=backend, stream=stream,
                                      need_grad_p=need_grad_p)

    gem_pool_backward.__doc__ = f"""Gradients of :func:`gem_pool{nd}d` for its input and for p.

Parameters
----------
grad_output : array_like
    Gradient of the loss with respect to the forward output.
x, p, eps, output_size, kernel_size, stride, channels_last, backend, stream
    The forward call's arguments.
need_grad_p : bool, default True
    False when p is fixed: grad_p is then None, and the CPU back end skips the
    logarithms, most of a backward's arithmetic.

Returns
-------
grad_input : numpy.ndarray
    Of the input's shape and dtype (0 where x < eps, as torch's clamp); on "cuda",
    the input's kind of array.
grad_p : numpy scalar, numpy.ndarray or None
    A scalar for a scalar p, one value per channel for per-channel p (on the host
    for every back end); None with ``need_grad_p=False``.

Examples
--------
>>> import numpy as np, fastpool
>>> x = np.array([1., 3.]).reshape({"1, " * nd}2)
>>> g = np.ones_like(fastpool.gem_pool{nd}d(x, p=1.0))
>>> grad_x, grad_p = fastpool.gem_pool{nd}d_backward(g, x, p=1.0)
>>> grad_x.ravel()
array([0.5, 0.5])
"""
    return _named(gem_pool_backward, name)


def _named(function: Callable, name: str) -> Callable:
    function.__name__ = function.__qualname__ = name
    function.__module__ = "fastpool"
    return function


max_pool1d, max_pool2d, max_pool3d = (_max_pool(nd) for nd in (1, 2, 3))
avg_pool1d, avg_pool2d, avg_pool3d = (_avg_pool(nd) for nd in (1, 2, 3))
lp_pool1d, lp_pool2d, lp_pool3d = (_lp_pool(nd) for nd in (1, 2, 3))
adaptive_max_pool1d, adaptive_max_pool2d, adaptive_max_pool3d = (
    _adaptive_max_pool(nd) for nd in (1, 2, 3))
adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_avg_pool3d = (
    _adaptive_avg_pool(nd) for nd in (1, 2, 3))
global_max_pool1d, global_max_pool2d, global_max_pool3d = (
    _global_max_pool(nd) for nd in (1, 2, 3))
global_avg_pool1d, global_avg_pool2d, global_avg_pool3d = (
    _global_avg_pool(nd) for nd in (1, 2, 3))
global_pool1d, global_pool2d, global_pool3d = (_global_pool(nd) for nd in (1, 2, 3))
global_pool1d_backward, global_pool2d_backward, global_pool3d_backward = (
    _global_pool_backward(nd) for nd in (1, 2, 3))
min_pool1d, min_pool2d, min_pool3d = (_max_pool(nd, "min") for nd in (1, 2, 3))
adaptive_min_pool1d, adaptive_min_pool2d, adaptive_min_pool3d = (
    _adaptive_max_pool(nd, "min") for nd in (1, 2, 3))
global_min_pool1d, global_min_pool2d, global_min_pool3d = (
    _global_max_pool(nd, "min") for nd in (1, 2, 3))


max_pool1d_backward, max_pool2d_backward, max_pool3d_backward = (
    _max_pool_backward(nd, "max_pool") for nd in (1, 2, 3))
adaptive_max_pool1d_backward, adaptive_max_pool2d_backward, adaptive_max_pool3d_backward = (
    _max_pool_backward(nd, "adaptive_max_pool") for nd in (1, 2, 3))
global_max_pool1d_backward, global_max_pool2d_backward, global_max_pool3d_backward = (
    _max_pool_backward(nd, "global_max_pool") for nd in (1, 2, 3))
min_pool1d_backward, min_pool2d_backward, min_pool3d_backward = (
    _max_pool_backward(nd, "min_pool") for nd in (1, 2, 3))
adaptive_min_pool1d_backward, adaptive_min_pool2d_backward, adaptive_min_pool3d_backward = (
    _max_pool_backward(nd, "adaptive_min_pool") for nd in (1, 2, 3))
global_min_pool1d_backward, global_min_pool2d_backward, global_min_pool3d_backward = (
    _max_pool_backward(nd, "global_min_pool") for nd in (1, 2, 3))
avg_pool1d_backward, avg_pool2d_backward, avg_pool3d_backward = (
    _avg_pool_backward(nd) for nd in (1, 2, 3))
lp_pool1d_backward, lp_pool2d_backward, lp_pool3d_backward = (
    _lp_pool_backward(nd) for nd in (1, 2, 3))
adaptive_avg_pool1d_backward, adaptive_avg_pool2d_backward, adaptive_avg_pool3d_backward = (
    _avg_backward_of(nd, "adaptive_avg_pool") for nd in (1, 2, 3))
global_avg_pool1d_backward, global_avg_pool2d_backward, global_avg_pool3d_backward = (
    _avg_backward_of(nd, "global_avg_pool") for nd in (1, 2, 3))


fractional_max_pool2d, fractional_max_pool3d = (_fractional_max_pool(nd) for nd in (2, 3))
fractional_max_pool2d_backward, fractional_max_pool3d_backward = (
    _fractional_max_pool_backward(nd) for nd in (2, 3))
max_unpool1d, max_unpool2d, max_unpool3d = (_max_unpool(nd) for nd in (1, 2, 3))
max_unpool1d_backward, max_unpool2d_backward, max_unpool3d_backward = (
    _max_unpool_backward(nd) for nd in (1, 2, 3))
gem_pool1d, gem_pool2d, gem_pool3d = (_gem_pool(nd) for nd in (1, 2, 3))
gem_pool1d_backward, gem_pool2d_backward, gem_pool3d_backward = (
    _gem_pool_backward(nd) for nd in (1, 2, 3))

strided_conv1d, strided_conv2d, strided_conv3d = (_strided_conv(nd) for nd in (1, 2, 3))
strided_conv1d_backward, strided_conv2d_backward, strided_conv3d_backward = (
    _strided_conv_backward(nd) for nd in (1, 2, 3))


def _spatial_dims(kernel_or_output: object, name: str, op: str) -> int:
    if not isinstance(kernel_or_output, (tuple, list)) or not 1 <= len(kernel_or_output) <= 3:
        raise TypeError(f"{op}: {name} must be a tuple of 1 to 3 sizes, one per pooled axis, "
                        f"got {kernel_or_output!r}")
    return len(kernel_or_output)


def pool(x: ArrayLike, mode: Literal["max", "min", "avg", "lp"], kernel_size: Sequence[int],
         stride: Size | None = None, padding: Size = 0, dilation: Size = 1,
         ceil_mode: bool = False, *, norm_type: float | None = None,
         count_include_pad: bool = True, divisor_override: int | None = None,
         return_indices: bool = False, channels_last: bool = False,
         backend: Backend | None = None, stream: object = None) -> Result:
    """Sliding-window pooling over the trailing ``len(kernel_size)`` axes.

    The generic entry under every ``max_pool*``, ``avg_pool*`` and ``lp_pool*``
    function.  Every axis before the pooled ones is a batch axis, so a plain
    2-D image, or a stack of images of any rank, works directly.

    Parameters
    ----------
    x : array_like
        Input; its trailing ``len(kernel_size)`` axes are pooled (the axes
        before the last one when ``channels_last``).
    mode : {"max", "min", "avg", "lp"}
        The reduction over each window.
    kernel_size : tuple of 1 to 3 ints
        Window size; its length sets how many axes are pooled.
    stride, padding, dilation : optional
        As in :func:`max_pool2d`; dilation is for "max" and "min" only. "lp" takes padding
        only as ``'valid'``, ``'same'`` or (before, after) pairs (zeros).
    ceil_mode : bool, default False
        Round the output size up (see :func:`max_pool2d`).
    norm_type : float, optional
        The power p of "lp" pooling (required for it).
    count_include_pad, divisor_override : optional
        Divisor rules of "avg" pooling (see :func:`avg_pool2d`).
    return_indices : bool, default False
        With "max" or "min", also return flat indices of the extremes.
    GENERIC_TAIL

    See Also
    --------
    max_pool2d, min_pool2d, avg_pool2d, lp_pool2d : the torch-named entry points.

    Examples
    --------
    >>> import numpy as np, fastpool
    >>> img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    >>> fastpool.pool(img, "max", (2, 2))
    array([[ 5,  7],
           [13, 15]], dtype=uint8)
    >>> fastpool.pool(img.astype(np.float64), "avg", (2, 2), stride=(1, 2)).shape
    (3, 2)
    >>> fastpool.pool(img, "max", (3, 3), stride=2, padding="same")  # TensorFlow's rule
    array([[10, 11],
           [14, 15]], dtype=uint8)
    """
    op = "pool"
    nd = _spatial_dims(kernel_size, "kernel_size", op)
    return _dispatch.sliding_pool(
        x, mode, nd, kernel_size, stride, padding, dilation, ceil_mode, op=op, strict=False,
        norm_type=norm_type, count_include_pad=count_include_pad,
        divisor_override=divisor_override, return_indices=return_indices,
        channels_last=channels_last, backend=backend, stream=stream)


def adaptive_pool(x: ArrayLike, mode: Literal["max", "min", "avg"],
                  output_size: Sequence[int | None], *, return_indices: bool = False,
                  channels_last: bool = False, backend: Backend | None = None,
                  stream: object = None) -> Result:
    """Adaptive pooling over the trailing ``len(output_size)`` axes.

    The generic entry under the ``adaptive_*`` and ``global_*`` functions;
    every axis before the pooled ones is a batch axis.

    Parameters
    ----------
    x : array_like
        Input; its trailing ``len(output_size)`` axes are pooled (the axes
        before the last one when ``channels_last``).
    mode : {"max", "min", "avg"}
        The reduction over each window.
    output_size : tuple of 1 to 3 ints or None
        Output size per pooled axis; None keeps that input size.
    return_indices : bool, default False
        With "max" or "min", also return flat indices of the extremes.
    GENERIC_TAIL

    See Also
    --------
    adaptive_max_pool2d, adaptive_min_pool2d, adaptive_avg_pool2d : the torch-named entry points.

    Examples
    --------
    >>> import numpy as np, fastpool
    >>> img = np.arange(20, dtype=np.float64).reshape(4, 5)
    >>> fastpool.adaptive_pool(img, "avg", (2, None))
    array([[ 2.5,  3.5,  4.5,  5.5,  6.5],
           [12.5, 13.5, 14.5, 15.5, 16.5]])
    """
    op = "adaptive_pool"
    nd = _spatial_dims(output_size, "output_size", op)
    return _dispatch.adaptive_pool(x, mode, nd, output_size, op=op, strict=False,
                                   return_indices=return_indices,
                                   channels_last=channels_last, backend=backend, stream=stream)


_GENERIC_TAIL = """channels_last : bool, default False
        The last axis is channels, not pooled.
    backend : {None, "cpu", "numpy", "cuda"}, default None
        None picks by the input type: host arrays run on "cpu", GPU arrays on "cuda".
    stream : numba CUDA stream, optional
        The stream the CUDA back end launches on.

    Returns
    -------
    out : numpy.ndarray, or (out, indices) with return_indices"""
for _generic in (pool, adaptive_pool):
    _generic.__doc__ = _generic.__doc__.replace("GENERIC_TAIL", _GENERIC_TAIL)
