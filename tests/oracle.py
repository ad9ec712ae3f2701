"""PyTorch as the oracle: each fastpool op, forward and backward, computed by torch.

Channels-last inputs are moved to channels-first for torch and back, so the
oracle never depends on torch's own memory-format handling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import fastpool


def to_channels_first(x: np.ndarray, nd: int) -> np.ndarray:
    return np.moveaxis(x, -1, -nd - 1)


def to_channels_last(x: np.ndarray, nd: int) -> np.ndarray:
    return np.moveaxis(x, -nd - 1, -1)


def _torch_input(x: np.ndarray) -> torch.Tensor:
    if x.dtype.kind in "iub":
        # torch lacks adaptive max pooling on integer types and all pooling on some of
        # them; float64 holds the tests' integer values exactly, ties included.
        x = x.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(x))


def _avg_pool(nd, x, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
    if nd == 1:  # torch's avg_pool1d has no divisor_override: go through 2-D.
        def pair(v, fill=1):
            return None if v is None else (fill, v if isinstance(v, int) else v[0])
        out = F.avg_pool2d(x.unsqueeze(-2), pair(kernel_size), pair(stride) or pair(kernel_size),
                           pair(padding, 0), ceil_mode, count_include_pad, divisor_override)
        return out.squeeze(-2)
    return getattr(F, f"avg_pool{nd}d")(x, kernel_size, stride, padding, ceil_mode,
                                        count_include_pad, divisor_override)


def _torch_forward(op: str, nd: int, t: torch.Tensor, *args, **kwargs):
    """torch's op on a channels-first tensor; global ops keep their size-1 axes."""
    if op == "avg_pool":
        return _avg_pool(nd, t, *args, **kwargs)
    if op.startswith("global_"):
        kwargs.pop("keepdims", None)
        return getattr(F, f"adaptive_{op[7:]}{nd}d")(t, 1, **kwargs)
    return getattr(F, f"{op}{nd}d")(t, *args, **kwargs)


def _to_layout(a: np.ndarray, nd: int, channels_last: bool, squeeze: bool) -> np.ndarray:
    if channels_last:
        a = to_channels_last(a, nd)
    if squeeze:
        a = a.reshape(a.shape[:-nd - 1] + a.shape[-1:] if channels_last else a.shape[:-nd])
    return a


def torch_pool(op: str, nd: int, x: np.ndarray, *args, channels_last: bool = False,
               **kwargs):
    """torch's result for ``fastpool.<op>{nd}d(x, *args, **kwargs)`` as NumPy."""
    t = _torch_input(to_channels_first(x, nd) if channels_last else x)
    return_indices = kwargs.get("return_indices", False)
    squeeze = op.startswith("global_") and not kwargs.get("keepdims", False)
    result = _torch_forward(op, nd, t, *args, **kwargs)
    arrays = []
    for position, r in enumerate(result if return_indices else (result,)):
        a = _to_layout(r.numpy(), nd, channels_last, squeeze)
        if position == 0 and x.dtype.kind in "iub":
            # An empty (dilated) window gives torch's initial maximum, the dtype's lowest.
            lowest = 0 if x.dtype.kind == "b" else np.iinfo(x.dtype).min
            a = np.where(np.isneginf(a), lowest, a).astype(x.dtype)
        arrays.append(a if position == 1 else a.astype(x.dtype))
    return tuple(arrays) if return_indices else arrays[0]


def torch_grad(op: str, nd: int, x: np.ndarray, grad_output: np.ndarray, *args,
               channels_last: bool = False, **kwargs) -> np.ndarray:
    """torch autograd's gradient of ``fastpool.<op>{nd}d(x, ...)`` for ``grad_output``."""
    t = _torch_input(to_channels_first(x, nd) if channels_last else x).requires_grad_()
    result = _torch_forward(op, nd, t, *args, **kwargs)
    result = result[0] if kwargs.get("return_indices") else result
    grad = grad_output
    if channels_last:
        shape = tuple(result.shape)
        result_channels_last = shape[:-nd - 1] + shape[-nd:] + shape[-nd - 1:-nd]
        grad = to_channels_first(grad.reshape(result_channels_last), nd)
    result.backward(torch.from_numpy(np.ascontiguousarray(grad)).reshape(result.shape))
    g = t.grad.numpy()
    return to_channels_last(g, nd) if channels_last else g


def fastpool_op(op: str, nd: int):
    return getattr(fastpool, f"{op}{nd}d")
