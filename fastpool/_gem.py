"""Generalized-mean (GeM) pooling, composed from average pooling on the back end.

``gem = mean(clamp(x, min=eps) ** p) ** (1/p)`` over each window (Radenovic et
al.): p = 1 is average pooling, large p approaches max pooling.  The window
means run on fastpool's average-pooling kernels (adaptive windows, or sliding
ones when a kernel size is given), through the same dispatch as every op; the
element-wise powers around them are NumPy's, so GeM runs on the host back ends.
"""

from __future__ import annotations

import numbers

import numpy as np

from fastpool import _dispatch
from fastpool._params import Layout, check_dtype

_HALF = np.dtype(np.float16)


def _check_p(p: object, channels: int, op: str) -> np.ndarray | float:
    """p as a positive float, or a positive float per channel."""
    if isinstance(p, numbers.Real) and not isinstance(p, bool):
        if not p > 0 or not np.isfinite(p):
            raise ValueError(f"{op}: p must be positive and finite, got {p!r}")
        return float(p)
    values = np.asarray(p, dtype=np.float64) if not isinstance(p, (str, bytes)) else None
    if values is None or values.shape != (channels,):
        raise TypeError(f"{op}: p must be a positive float or one per channel (shape "
                        f"({channels},)), got {p!r}")
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError(f"{op}: every p must be positive and finite, got {p!r}")
    return values


def _check_eps(eps: object, op: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    return float(eps)


class _GeM:
    """One GeM call's validated arguments, the input as computed and its window means."""

    def __init__(self, x, nd, p, eps, output_size, kernel_size, stride, op, channels_last,
                 backend):
        impl = _dispatch._backend(backend, x, op)
        if impl.__name__.startswith("fastpool.cuda"):
            raise ValueError(f"{op}: GeM pooling runs on the host back ends ('cpu', 'numpy'); "
                             f"copy the array to the host first")
        array = impl.asarray(x, op, "x")
        dtype = np.dtype(array.dtype)
        if dtype.newbyteorder("=") != _HALF:
            check_dtype(dtype, "avg", op, impl.FLOAT_DTYPES)
        self.dtype = dtype.newbyteorder("=")
        # float16 is computed in float32 and rounded once at the end (never in float16).
        self.compute = np.float32 if self.dtype == _HALF else self.dtype
        self.x = np.asarray(array, self.compute)
        self.layout = Layout.of(self.x.shape, nd, channels_last, op, strict=True)
        channel_axis = -1 if channels_last else -nd - 1
        self.p = _check_p(p, self.x.shape[channel_axis], op)
        self.eps = _check_eps(eps, op)
        self.nd, self.op, self.channels_last, self.backend = nd, op, channels_last, backend
        self.output_size, self.kernel_size, self.stride = output_size, kernel_size, stride
        self.p_shape = (-1,) + (1,) * (0 if channels_last else nd)
        self.clamped = np.maximum(self.x, self.eps)
        self.powered = self.clamped ** self._p()
        self.mean = self.pool(self.powered)

    def _p(self):
        """p, broadcastable against the input (and the output)."""
        return self.p if isinstance(self.p, float) else self.p.reshape(self.p_shape).astype(
            self.compute)

    def pool(self, values: np.ndarray) -> np.ndarray:
        """Window means of ``values`` on the back end's average-pooling kernels."""
        kw = dict(op=self.op, channels_last=self.channels_last, backend=self.backend)
        if self.kernel_size is None:
            return _dispatch.adaptive_pool(values, "avg", self.nd, self.output_size,
                                           strict=True, **kw)
        return _dispatch.sliding_pool(values, "avg", self.nd, self.kernel_size, self.stride,
                                      strict=True, **kw)

    def pool_backward(self, grad: np.ndarray) -> np.ndarray:
        kw = dict(op=self.op, channels_last=self.channels_last, backend=self.backend)
        if self.kernel_size is None:
            return _dispatch.adaptive_avg_backward(grad, self.x.shape, self.nd, **kw)
        return _dispatch.sliding_backward(grad, self.x.shape, "avg", self.nd,
                                          self.kernel_size, self.stride, **kw)

    def result(self) -> np.ndarray:
        return self.mean ** (1.0 / self._p())


def gem_pool(x, nd: int, p, eps, output_size, kernel_size, stride, *, op: str,
             channels_last=False, backend=None):
    """GeM pooling over the trailing ``nd`` spatial axes (see :mod:`fastpool._gem`)."""
    gem = _GeM(x, nd, p, eps, output_size, kernel_size, stride, op, channels_last, backend)
    return gem.result().astype(gem.dtype)


def gem_pool_backward(grad_output, x, nd: int, p, eps, output_size, kernel_size, stride, *,
                      op: str, channels_last=False, backend=None):
    """Gradients of :func:`gem_pool` for ``x`` and for ``p`` (a float, or one per channel)."""
    gem = _GeM(x, nd, p, eps, output_size, kernel_size, stride, op, channels_last, backend)
    y = gem.result()
    grad = np.asarray(grad_output, gem.compute)
    if grad.shape != y.shape:
        raise ValueError(f"{op}: grad_output has shape {grad.shape}, but the forward op on "
                         f"this input gives {y.shape}")
    p = gem._p()
    with np.errstate(divide="ignore", invalid="ignore"):
        # y = m ** (1/p), m the window mean of c ** p, c = max(x, eps):
        # dy/dm = y / (p m); dm/dc = mean-backward of p c ** (p - 1); dc/dx = [x >= eps]
        # (torch's clamp passes the gradient at eps itself).
        grad_mean = grad * y / (p * gem.mean)
        grad_x = gem.pool_backward(grad_mean) * (p * gem.powered / gem.clamped)
        grad_x = np.where(gem.x >= gem.eps, grad_x, 0)
        # dy/dp = y (mean(c ** p ln c) / (p m) - ln m / p ** 2)
        log_mean = gem.pool(gem.powered * np.log(gem.clamped))
        grad_p = grad * y * (log_mean / (p * gem.mean) - np.log(gem.mean) / p ** 2)
    if isinstance(gem.p, float):
        grad_p = grad_p.sum(dtype=np.float64)
    else:
        channel_axis = grad_p.ndim - 1 if channels_last else grad_p.ndim - nd - 1
        axes = tuple(a for a in range(grad_p.ndim) if a != channel_axis)
        grad_p = grad_p.sum(axis=axes, dtype=np.float64)
    return grad_x.astype(gem.dtype), np.asarray(grad_p).astype(gem.compute)[()]
