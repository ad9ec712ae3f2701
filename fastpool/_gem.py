"""Generalized-mean (GeM) pooling: ``mean(max(x, eps) ** p) ** (1/p)`` per window.

Radenovic et al.'s head: p = 1 is average pooling, large p approaches max
pooling.  Windows are adaptive (the global window by default), or sliding ones
when a kernel size is given, from the same window tables as every op.  The CPU
back end runs fused kernels (:mod:`fastpool.cpu.gem`): one pass over the input
gives every window's sums, clamp, power and (for p's gradient) logarithm
included, and one more the input's gradient.  The NumPy reference back end
composes NumPy's element-wise steps around its average pooling, and the CUDA
back end its ``gem_*`` kernels around its own (the half types in float32).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fastpool import _dispatch
from fastpool._params import (
    Layout,
    adaptive_output_shape,
    adaptive_table,
    check_bool,
    check_dtype,
)

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


def _raised(values: np.ndarray, p) -> np.ndarray:
    """``values ** p``, with the usual integer p multiplied out as torch's pow does:
    NumPy's general power costs ~8 ns an element, ten times a multiply, and was
    most of a GeM forward."""
    if isinstance(p, float) and p in (1.0, 2.0, 3.0, 4.0):
        squared = values * values
        return {1.0: values, 2.0: squared, 3.0: squared * values, 4.0: squared * squared}[p]
    return values ** p


def _check_eps(eps: object, op: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    return float(eps)


class _GeM:
    """One GeM call's validated arguments, the input as computed and its window means."""

    def __init__(self, x, nd, p, eps, output_size, kernel_size, stride, op, channels_last,
                 backend):
        impl = _dispatch._backend(backend, x, op)
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
        # The CPU back end's fused kernels; the reference back end composes NumPy steps.
        self.fused = getattr(impl, "gem_window_sums", None) is not None
        self.impl = impl
        if self.fused:
            self.table = self._table()
            return
        self.clamped = np.maximum(self.x, self.eps)
        self.powered = _raised(self.clamped, self._p())
        self.mean = self.pool(self.powered)

    def _table(self):
        """The window table, from the rules average pooling applies to the same
        arguments (and with its errors)."""
        spatial = self.layout.spatial
        if self.kernel_size is None:
            out_spatial = adaptive_output_shape(self.op, self.nd, self.output_size, spatial)
            return adaptive_table(spatial, out_spatial)
        spec = _dispatch._SlidingOp.from_args(self.op, "avg", self.nd, self.kernel_size,
                                              self.stride, 0, 1, False)
        return spec.table(self.layout)

    def result_shape(self) -> tuple:
        return self.layout.result_shape(self.table.out_shape[3 - self.nd:])

    def _canonical_p(self):
        """p broadcastable against the canonical output: channels-first planes are
        (batch, channel) pairs, channel-major within each batch row."""
        if isinstance(self.p, float):
            return self.p
        if self.channels_last:
            return self.p
        planes = math.prod(self.layout.batch_shape)
        return np.tile(self.p, planes // self.p.size).reshape(-1, 1, 1, 1)

    def fused_means(self, with_log: bool):
        """(canonical input, window means, means of c ** p ln c or None), float64."""
        canonical = np.ascontiguousarray(self.x).reshape(self.layout.canonical_shape())
        powers = np.atleast_1d(np.asarray(self.p, np.float64))
        sums, log_sums = self.impl.gem_window_sums(canonical, self.table,
                                                   self.channels_last, powers, self.eps,
                                                   with_log)
        sizes = self.impl.gem_window_sizes(self.table, self.channels_last)
        sums /= sizes
        if log_sums is not None:
            log_sums /= sizes
        return canonical, sums, log_sums

    def fused_result(self) -> np.ndarray:
        if self.layout.is_empty():
            return np.empty(self.result_shape(), self.dtype)
        _, means, _ = self.fused_means(False)
        out = self.impl.gem_roots(means, self._canonical_p())
        return out.astype(self.dtype, copy=False).reshape(self.result_shape())

    def fused_backward(self, grad_output, with_grad_p: bool = True) -> tuple:
        """(grad_x in the input's dtype, grad_p as float64: a sum, or one per channel;
        None without ``with_grad_p``, which skips the logarithms)."""
        grad = np.asarray(grad_output, self.compute)
        shape = self.result_shape()
        if grad.shape != shape:
            raise ValueError(f"{self.op}: grad_output has shape {grad.shape}, but the "
                             f"forward op on this input gives {shape}")
        if self.layout.is_empty():
            zero = 0.0 if isinstance(self.p, float) else np.zeros(self.p.shape)
            return np.zeros(self.x.shape, self.dtype), zero if with_grad_p else None
        canonical, means, log_means = self.fused_means(with_grad_p)
        p = self._canonical_p()
        y = self.impl.gem_roots(means, p)
        grad = grad.reshape(means.shape)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # y = m ** (1/p), m the window mean of c ** p, c = max(x, eps):
            # dy/dm = y / (p m); dm/dc = mean-backward of p c ** (p - 1); dc/dx =
            # [x >= eps] (torch's clamp passes the gradient at eps itself); and
            # dy/dp = y (mean(c ** p ln c) / (p m) - ln m / p ** 2).
            grad_y = grad * y
            grad_mean = grad_y / (p * means)
            grad_p = None if log_means is None else \
                grad_y * (log_means / (p * means) - np.log(means) / p ** 2)
        if self.table.is_whole_plane(canonical.shape[1:4]):
            shares = grad_mean / self.impl.gem_window_sizes(self.table, self.channels_last)
        else:
            shares = self.pool_backward(grad_mean.reshape(shape)).reshape(canonical.shape)
        grad_x = self.impl.gem_input_grad(canonical, shares, self.channels_last,
                                          np.atleast_1d(np.asarray(self.p, np.float64)),
                                          self.eps)
        return grad_x.astype(self.dtype, copy=False).reshape(self.x.shape), \
            None if grad_p is None else self._sum_p(grad_p)

    def _sum_p(self, terms: np.ndarray):
        """p's gradient from its per-output terms (canonical): a sum, or one per channel."""
        if isinstance(self.p, float):
            return terms.sum(dtype=np.float64)
        channels = self.p.size
        if self.channels_last:
            return terms.reshape(-1, channels).sum(axis=0, dtype=np.float64)
        return terms.reshape(-1, channels, terms[0].size).sum(axis=(0, 2), dtype=np.float64)

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


def _on_device(x, backend, op, stream=None):
    """The CUDA back end's module when GeM runs there, else None (a stream given
    for a host back end is refused there, as for every op)."""
    impl = _dispatch._backend(backend, x, op, stream)
    return impl if not getattr(impl, "host_only", False) else None


class _DeviceGeM:
    """GeM on the CUDA back end: the element-wise steps in its ``gem_*`` kernels, the
    window means on its average-pooling kernels (as :class:`_GeM` on the host)."""

    def __init__(self, impl, x, nd, p, eps, output_size, kernel_size, stride, op,
                 channels_last, stream=None, with_log=False):
        # Every launch goes on the caller's stream (each back-end function falls back
        # to the input's stream, as in the dispatch, when it is None).
        self.stream = stream
        array = impl.asarray(x, op, "x", stream)
        check_dtype(np.dtype(array.dtype), "avg", op, impl.FLOAT_DTYPES)
        self.impl, self.dtype = impl, np.dtype(array.dtype).newbyteorder("=")
        self.compute = impl.compute_dtype(self.dtype)
        shape = tuple(array.shape)
        self.x = impl.canonical(array, shape, self.stream)
        self.layout = Layout.of(shape, nd, channels_last, op, strict=True)
        self.p = _check_p(p, shape[-1 if channels_last else -nd - 1], op)
        self.powers = np.atleast_1d(np.asarray(self.p, np.float64))
        self.eps = _check_eps(eps, op)
        self.nd, self.op, self.channels_last = nd, op, channels_last
        self.output_size, self.kernel_size, self.stride = output_size, kernel_size, stride
        self.plane = 1 if channels_last else math.prod(self.layout.spatial)
        self.powered, self.logged = impl.gem_powers(self.x, self.powers, self.plane,
                                                    self.eps, with_log, self.stream)
        self.mean = self.pool(self.powered)
        self.out_plane = 1 if channels_last else math.prod(tuple(self.mean.shape)[-nd:])

    def pool(self, values):
        kw = dict(op=self.op, channels_last=self.channels_last, backend="cuda",
                  stream=self.stream)
        if self.kernel_size is None:
            return _dispatch.adaptive_pool(values, "avg", self.nd, self.output_size,
                                           strict=True, **kw)
        return _dispatch.sliding_pool(values, "avg", self.nd, self.kernel_size, self.stride,
                                      strict=True, **kw)

    def pool_backward(self, grad):
        kw = dict(op=self.op, channels_last=self.channels_last, backend="cuda",
                  stream=self.stream)
        shape = tuple(self.x.shape)
        if self.kernel_size is None:
            return _dispatch.adaptive_avg_backward(grad, shape, self.nd, **kw)
        return _dispatch.sliding_backward(grad, shape, "avg", self.nd, self.kernel_size,
                                          self.stride, **kw)


def _sum_grad_p(grad_p: np.ndarray, p, nd: int, channels_last: bool):
    """p's gradient from its per-output terms: a sum, or one per channel."""
    if isinstance(p, float):
        return grad_p.sum(dtype=np.float64)
    channel_axis = grad_p.ndim - 1 if channels_last else grad_p.ndim - nd - 1
    axes = tuple(a for a in range(grad_p.ndim) if a != channel_axis)
    return grad_p.sum(axis=axes, dtype=np.float64)


def gem_pool(x, nd: int, p, eps, output_size, kernel_size, stride, *, op: str,
             channels_last=False, backend=None, stream=None):
    """GeM pooling over the trailing ``nd`` spatial axes (see :mod:`fastpool._gem`)."""
    device = _on_device(x, backend, op, stream)
    if device is not None:
        gem = _DeviceGeM(device, x, nd, p, eps, output_size, kernel_size, stride, op,
                         channels_last, stream)
        out = device.gem_root(gem.mean, gem.powers, gem.out_plane, gem.dtype, gem.stream)
        return device.wrap(out, x)
    gem = _GeM(x, nd, p, eps, output_size, kernel_size, stride, op, channels_last, backend)
    if gem.fused:
        return gem.fused_result()
    return gem.result().astype(gem.dtype)


def _device_backward(device, grad_output, x, nd, p, eps, output_size, kernel_size, stride,
                     op, channels_last, stream):
    gem = _DeviceGeM(device, x, nd, p, eps, output_size, kernel_size, stride, op,
                     channels_last, stream, with_log=True)
    grad = device.asarray(grad_output, op, "grad_output", gem.stream)
    if tuple(grad.shape) != tuple(gem.mean.shape):
        raise ValueError(f"{op}: grad_output has shape {tuple(grad.shape)}, but the forward "
                         f"op on this input gives {tuple(gem.mean.shape)}")
    grad = device.canonical(grad, tuple(grad.shape), gem.stream)
    grad_mean, grad_p = device.gem_output_grads(grad, gem.mean, gem.pool(gem.logged),
                                                gem.powers, gem.out_plane, gem.dtype,
                                                gem.stream)
    grad_x = device.gem_input_grad(gem.pool_backward(grad_mean), gem.x, gem.powered,
                                   gem.powers, gem.plane, gem.eps, gem.stream)
    # p's gradient is returned on the host (a scalar or C values): its copy is the
    # one synchronisation of a GeM backward on the GPU.
    grad_p = _sum_grad_p(device.to_host(grad_p, gem.stream), gem.p, nd, channels_last)
    return device.wrap(grad_x, x), np.asarray(grad_p).astype(gem.compute)[()]


def gem_pool_backward(grad_output, x, nd: int, p, eps, output_size, kernel_size, stride, *,
                      op: str, channels_last=False, backend=None, stream=None,
                      need_grad_p=True):
    """Gradients of :func:`gem_pool` for ``x`` and for ``p`` (a float, or one per channel).

    ``need_grad_p=False`` (for callers whose p takes no gradient) skips p's
    gradient, None then: on the CPU back end that skips the logarithms, most of a
    backward's arithmetic.  The public ``gem_pool{nd}d_backward`` always asks for it.
    """
    need_grad_p = check_bool(need_grad_p, "need_grad_p", op)
    device = _on_device(x, backend, op, stream)
    if device is not None:
        grad_x, grad_p = _device_backward(device, grad_output, x, nd, p, eps, output_size,
                                          kernel_size, stride, op, channels_last, stream)
        return grad_x, grad_p if need_grad_p else None
    gem = _GeM(x, nd, p, eps, output_size, kernel_size, stride, op, channels_last, backend)
    if gem.fused:
        grad_x, grad_p = gem.fused_backward(grad_output, need_grad_p)
        return grad_x, None if grad_p is None else np.asarray(grad_p).astype(gem.compute)[()]
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
        if not need_grad_p:
            return grad_x.astype(gem.dtype), None
        # dy/dp = y (mean(c ** p ln c) / (p m) - ln m / p ** 2)
        log_mean = gem.pool(gem.powered * np.log(gem.clamped))
        grad_p = grad * y * (log_mean / (p * gem.mean) - np.log(gem.mean) / p ** 2)
    grad_p = _sum_grad_p(grad_p, gem.p, nd, channels_last)
    return grad_x.astype(gem.dtype), np.asarray(grad_p).astype(gem.compute)[()]
