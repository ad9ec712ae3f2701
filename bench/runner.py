"""Timing fastpool, the NumPy reference and torch on the same arrays.

Every measurement is the best of ``repeats`` runs after a warm-up call (which
also compiles).  Times of different back ends are taken in the same run, so
the speed-ups are ratios of times measured minutes apart at most; absolute
times on a shared machine drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

import fastpool
from bench.cases import Case

BACKENDS = ("fastpool", "numpy", "torch")


@dataclass
class Measurement:
    case: Case
    channels_last: bool
    direction: str
    seconds: dict  # back end -> best time
    nbytes: int  # bytes read plus written by fastpool's kernels

    @property
    def layout(self) -> str:
        return "channels-last" if self.channels_last else "channels-first"


def best_time(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def _torch_function(case: Case, x: np.ndarray, channels_last: bool, requires_grad=False):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x)
    if channels_last:
        t = t.movedim(-1, 1)  # an NCHW view with channels-last strides: torch's own format
    t.requires_grad_(requires_grad)
    function = getattr(F, case.name)
    return t, lambda: function(t, *case.args, **case.kwargs)


def _conv_weight(case: Case) -> np.ndarray:
    out_channels, kernel = case.args[:2]
    shape = (out_channels, case.shape[1]) + (kernel,) * case.nd
    return np.random.default_rng(2).standard_normal(shape, dtype=np.float32) / 10


def _conv_calls(case: Case, x: np.ndarray, channels_last: bool, direction: str):
    """fastpool's strided convolution against torch's conv{nd}d (weights shared)."""
    import torch
    import torch.nn.functional as F

    weight = _conv_weight(case)
    stride, padding = case.args[2:]
    kw = dict(channels_last=channels_last)
    t = torch.from_numpy(x)
    t = t.movedim(-1, 1) if channels_last else t
    tw = torch.from_numpy(weight)
    torch_conv = getattr(F, f"conv{case.nd}d")
    out = getattr(fastpool, case.name)(x, weight, stride, padding, **kw)
    if direction == "forward":
        calls = {name: (lambda b=backend: getattr(fastpool, case.name)(
            x, weight, stride, padding, backend=b, **kw))
            for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
        calls["torch"] = lambda: torch_conv(t, tw, None, stride, padding)
        return calls, x.nbytes + weight.nbytes + out.nbytes
    grad = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    calls = {name: (lambda b=backend: getattr(fastpool, f"{case.name}_backward")(
        grad, x, weight, stride, padding, backend=b, **kw))
        for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
    t.requires_grad_(True)
    tw.requires_grad_(True)
    y = torch_conv(t, tw, None, stride, padding)
    g = torch.from_numpy(grad)
    g = g.movedim(-1, 1) if channels_last else g
    calls["torch"] = lambda: torch.autograd.grad(y, (t, tw), g, retain_graph=True)
    return calls, grad.nbytes + 2 * x.nbytes + 2 * weight.nbytes


def _forward(case: Case, x: np.ndarray, channels_last: bool):
    if case.op == "strided_conv":
        return _conv_calls(case, x, channels_last, "forward")
    function = getattr(fastpool, case.name)
    calls = {name: (lambda b=backend: function(x, *case.args, channels_last=channels_last,
                                               backend=b, **case.kwargs))
             for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
    calls["torch"] = _torch_function(case, x, channels_last)[1]
    out = calls["fastpool"]()
    return calls, x.nbytes + out.nbytes


def _backward(case: Case, x: np.ndarray, channels_last: bool):
    import torch

    if case.op == "strided_conv":
        return _conv_calls(case, x, channels_last, "backward")
    forward = getattr(fastpool, case.name)
    backward = getattr(fastpool, f"{case.name}_backward")
    kw = dict(channels_last=channels_last)
    is_max = "max" in case.op
    result = forward(x, *case.args, return_indices=is_max, **kw) if is_max else \
        forward(x, *case.args, **kw)
    out = result[0] if is_max else result
    grad = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    window = {}
    if case.op == "max_pool":  # the optional window lets the kernels gather
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        window = {**dict(zip(names, case.args)), **case.kwargs}
    if is_max:
        arguments, nbytes = (grad, result[1], x.shape), grad.nbytes + result[1].nbytes
    elif case.op == "lp_pool":
        arguments, nbytes = (grad, x, *case.args), grad.nbytes + x.nbytes
    elif case.op == "avg_pool":
        arguments, nbytes = (grad, x.shape, *case.args), grad.nbytes
    else:
        arguments, nbytes = (grad, x.shape), grad.nbytes
    calls = {name: (lambda b=backend: backward(*arguments, backend=b, **kw, **window))
             for name, backend in (("fastpool", "cpu"), ("numpy", "numpy"))}
    t, torch_forward = _torch_function(case, x, channels_last, requires_grad=True)
    y = torch_forward()
    y = y[0] if isinstance(y, tuple) else y
    g = torch.from_numpy(grad)
    g = g.movedim(-1, 1) if channels_last else g
    calls["torch"] = lambda: torch.autograd.grad(y, t, g, retain_graph=True)
    return calls, nbytes + x.nbytes


def measure(case: Case, channels_last: bool, direction: str, repeats: int,
            backends=BACKENDS) -> Measurement:
    x = case.make_input(channels_last)
    calls, nbytes = (_forward if direction == "forward" else _backward)(case, x, channels_last)
    seconds = {}
    for name in backends:
        # The reference is slow by design: fewer repeats keep the suite short.
        seconds[name] = best_time(calls[name], repeats if name != "numpy" else 1)
    return Measurement(case, channels_last, direction, seconds, nbytes)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second (read plus written) of a parallel copy moving ``nbytes``: the
    yardstick for a kernel that reads and writes that many bytes."""
    from bench._copy import parallel_copy

    source = np.ones(max(nbytes // 2 // 4, 1), np.float32)
    target = np.empty_like(source)
    from fastpool.cpu.runtime import launch

    seconds = best_time(lambda: launch(parallel_copy, source, target), repeats)
    return 2 * source.nbytes / seconds
