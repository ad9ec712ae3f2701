"""Strided convolution on the CPU: Numba kernels and their drivers.

Canonical arrays: input ``(N, C_in, D, H, W)``, weight ``(C_out, C_in, KD, KH,
KW)``, output ``(N, C_out, OD, OH, OW)``; 1-D and 2-D run with size-1 axes.
Sums accumulate in float64.  Every kernel owns disjoint outputs (output rows,
input rows, weight planes), so results are race-free and deterministic.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastpool._config import CPU_JIT_OPTIONS
from fastpool.cpu.runtime import launch


@njit(inline="always")
def _split4(row, second, third, fourth):
    """(i, j, k, m) of row = ((i*second + j)*third + k)*fourth + m."""
    last = row % fourth
    row //= fourth
    k = row % third
    row //= third
    return row // second, row % second, k, last


@njit(**CPU_JIT_OPTIONS)
def conv_forward(x, weight, bias, out, stride, pad):
    batch, c_out, out_d, out_h, out_w = out.shape
    c_in, depth, height, width = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    k_d, k_h, k_w = weight.shape[2], weight.shape[3], weight.shape[4]
    for row in prange(batch * c_out * out_d * out_h):
        n, co, od, oh = _split4(row, c_out, out_d, out_h)
        for ow in range(out_w):
            total = np.float64(bias[co])
            for ci in range(c_in):
                for kd in range(k_d):
                    d = od * stride[0] - pad[0] + kd
                    if d < 0 or d >= depth:
                        continue
                    for kh in range(k_h):
                        h = oh * stride[1] - pad[1] + kh
                        if h < 0 or h >= height:
                            continue
                        for kw in range(k_w):
                            w = ow * stride[2] - pad[2] + kw
                            if 0 <= w < width:
                                total += np.float64(x[n, ci, d, h, w]) * weight[co, ci, kd, kh, kw]
            out[n, co, od, oh, ow] = total


@njit(inline="always")
def _source(position, pad, kernel_offset, stride, size):
    """The output index whose window puts ``kernel_offset`` on ``position``, or -1."""
    t = position + pad - kernel_offset
    if t < 0 or t % stride != 0 or t // stride >= size:
        return -1
    return t // stride


@njit(**CPU_JIT_OPTIONS)
def conv_backward_input(grad, weight, grad_in, stride, pad):
    """Gather: each input element sums grad * weight over the outputs it fed."""
    batch, c_in, depth, height, width = grad_in.shape
    c_out, out_d, out_h, out_w = grad.shape[1], grad.shape[2], grad.shape[3], grad.shape[4]
    k_d, k_h, k_w = weight.shape[2], weight.shape[3], weight.shape[4]
    for row in prange(batch * c_in * depth * height):
        n, ci, d, h = _split4(row, c_in, depth, height)
        for w in range(width):
            total = 0.0
            for co in range(c_out):
                for kd in range(k_d):
                    od = _source(d, pad[0], kd, stride[0], out_d)
                    if od < 0:
                        continue
                    for kh in range(k_h):
                        oh = _source(h, pad[1], kh, stride[1], out_h)
                        if oh < 0:
                            continue
                        for kw in range(k_w):
                            ow = _source(w, pad[2], kw, stride[2], out_w)
                            if ow >= 0:
                                total += np.float64(grad[n, co, od, oh, ow]) * \
                                    weight[co, ci, kd, kh, kw]
            grad_in[n, ci, d, h, w] = total


@njit(**CPU_JIT_OPTIONS)
def conv_backward_weight(grad, x, grad_weight, stride, pad):
    """Each weight element sums grad * input over the batch and the outputs."""
    c_out, c_in, k_d, k_h, k_w = grad_weight.shape
    batch, out_d, out_h, out_w = grad.shape[0], grad.shape[2], grad.shape[3], grad.shape[4]
    depth, height, width = x.shape[2], x.shape[3], x.shape[4]
    for task in prange(c_out * c_in * k_d * k_h):
        co, ci, kd, kh = _split4(task, c_in, k_d, k_h)
        for kw in range(k_w):
            total = 0.0
            for n in range(batch):
                for od in range(out_d):
                    d = od * stride[0] - pad[0] + kd
                    if d < 0 or d >= depth:
                        continue
                    for oh in range(out_h):
                        h = oh * stride[1] - pad[1] + kh
                        if h < 0 or h >= height:
                            continue
                        for ow in range(out_w):
                            w = ow * stride[2] - pad[2] + kw
                            if 0 <= w < width:
                                total += np.float64(grad[n, co, od, oh, ow]) * x[n, ci, d, h, w]
            grad_weight[co, ci, kd, kh, kw] = total


def _work(grad_or_out, weight) -> int:
    """About the multiply-adds of a convolution, or of either of its gradients."""
    return grad_or_out.size * (weight.size // max(weight.shape[0], 1))


def conv(x, weight, bias, out_shape, stride, pad, stream=None):
    out = np.empty(out_shape, x.dtype)
    launch(conv_forward, x, weight, bias, out, stride, pad, work=_work(out, weight))
    return out


def conv_backward(grad, x, weight, stride, pad, stream=None):
    grad_in = np.empty(x.shape, grad.dtype)
    grad_weight = np.empty(weight.shape, grad.dtype)
    work = _work(grad, weight)
    launch(conv_backward_input, grad, weight, grad_in, stride, pad, work=work)
    launch(conv_backward_weight, grad, x, grad_weight, stride, pad, work=work)
    return grad_in, grad_weight
