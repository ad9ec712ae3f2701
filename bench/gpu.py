"""The GPU benchmark: fastpool's CUDA back end against torch's CUDA pooling.

``python -m bench --backend cuda`` times every suite case (``--full`` for the
whole table) forward and backward on the GPU, with torch CUDA tensors in and
out for both libraries.  Each timing is the median of ``--repeats`` CUDA-event
timings of one call, with the L2 cache flushed (a write over twice its size)
before each, so both read their inputs from HBM.  Reports GB/s (the bytes the
op must read and write, over the time) and the percentage of the device's
peak memory bandwidth, from its memory clock and bus width.

Writes JSON (``--json``) and, with ``--markdown``, a summary table.
"""

from __future__ import annotations

import json
import statistics

import numpy as np

from bench.cases import Case


def peak_bandwidth(device=None) -> float | None:
    """Peak DRAM bandwidth in bytes/s: 2 (double data rate) x memory clock x bus width.

    From numba's device attributes (the memory clock in kHz, the bus in bits)."""
    from numba import cuda

    device = device or cuda.get_current_device()
    try:
        clock_khz = device.MEMORY_CLOCK_RATE
        bus_bits = device.GLOBAL_MEMORY_BUS_WIDTH
    except Exception:  # the simulator has neither
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def _l2_bytes() -> int:
    from numba import cuda
    return int(getattr(cuda.get_current_device(), "L2_CACHE_SIZE", 64 << 20))


def time_cuda(call, repeats: int, flush) -> float:
    """Median seconds of ``call`` over ``repeats`` CUDA-event timings, L2 flushed first."""
    import torch

    call()  # warm-up (compiles)
    torch.cuda.synchronize()
    times = []
    for _ in range(max(repeats, 1)):
        flush()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _torch_input(case: Case, channels_last: bool, dtype):
    import torch

    x = torch.from_numpy(case.make_input(False)).to("cuda", dtype)
    if channels_last:  # fastpool takes (N, *spatial, C) contiguous; torch a view of it
        x_fast = x.movedim(1, -1).contiguous()
        return x_fast, x_fast.movedim(-1, 1)
    return x, x


def calls(case: Case, channels_last: bool, direction: str, dtype):
    """{"fastpool": call, "torch": call} and the bytes each call must move."""
    import torch
    import torch.nn.functional as F

    import fastpool

    x_fast, x_torch = _torch_input(case, channels_last, dtype)
    kw = dict(channels_last=channels_last)
    size = x_fast.element_size()
    if case.op == "strided_conv":
        out_channels, kernel, stride, padding = case.args
        weight = torch.randn((out_channels, case.shape[1]) + (kernel,) * case.nd,
                             device="cuda", dtype=dtype) / 10
        if channels_last:
            raise NotImplementedError("channels-last convolution runs on the host only")
        conv = getattr(fastpool, case.name)
        torch_conv = getattr(F, f"conv{case.nd}d")
        out = conv(x_fast, weight, stride, padding)
        if direction == "forward":
            return ({"fastpool": lambda: conv(x_fast, weight, stride, padding),
                     "torch": lambda: torch_conv(x_torch, weight, None, stride, padding)},
                    (x_fast.numel() + weight.numel() + out.numel()) * size)
        grad = torch.randn_like(out)
        backward = getattr(fastpool, f"{case.name}_backward")
        t, tw = x_torch.detach().requires_grad_(), weight.detach().requires_grad_()
        y = torch_conv(t, tw, None, stride, padding)
        return ({"fastpool": lambda: backward(grad, x_fast, weight, stride, padding),
                 "torch": lambda: torch.autograd.grad(y, (t, tw), grad, retain_graph=True)},
                (grad.numel() + 2 * x_fast.numel() + 2 * weight.numel()) * size)
    forward = getattr(fastpool, case.name)
    torch_forward = getattr(F, case.name)
    is_max = "max" in case.op
    if direction == "forward":
        out = forward(x_fast, *case.args, **kw, **case.kwargs)
        return ({"fastpool": lambda: forward(x_fast, *case.args, **kw, **case.kwargs),
                 "torch": lambda: torch_forward(x_torch, *case.args, **case.kwargs)},
                (x_fast.numel() + out.numel()) * size)
    backward = getattr(fastpool, f"{case.name}_backward")
    result = forward(x_fast, *case.args, return_indices=True, **kw, **case.kwargs) if is_max \
        else forward(x_fast, *case.args, **kw, **case.kwargs)
    out = result[0] if is_max else result
    grad = torch.randn_like(out)
    window = {} if is_max else dict(case.kwargs)  # ceil_mode, count_include_pad, ...
    if case.op == "max_pool":
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        window = {**dict(zip(names, case.args)), **case.kwargs}
    shape = tuple(x_fast.shape)
    if is_max:
        arguments = (grad, result[1], shape)
        nbytes = grad.numel() * size + result[1].numel() * 8 + x_fast.numel() * size
    elif case.op == "lp_pool":
        arguments = (grad, x_fast, *case.args)
        nbytes = (grad.numel() + 2 * x_fast.numel()) * size
    elif case.op == "avg_pool":
        arguments = (grad, shape, *case.args)
        nbytes = (grad.numel() + x_fast.numel()) * size
    else:
        arguments = (grad, shape)
        nbytes = (grad.numel() + x_fast.numel()) * size
    t = x_torch.detach().requires_grad_()
    y = torch_forward(t, *case.args, **case.kwargs)
    y = y[0] if isinstance(y, tuple) else y
    g = grad.movedim(-1, 1) if channels_last else grad
    return ({"fastpool": lambda: backward(*arguments, **kw, **window),
             "torch": lambda: torch.autograd.grad(y, t, g, retain_graph=True)}, nbytes)


def row(case: Case, channels_last: bool, direction: str, dtype_name: str, seconds: dict,
        nbytes: int, peak: float | None) -> dict:
    """One result: times, GB/s and % of peak bandwidth per library."""
    result = {"op": case.label, "tag": case.tag, "shape": list(case.shape),
              "layout": "channels-last" if channels_last else "channels-first",
              "direction": direction, "dtype": dtype_name, "bytes": nbytes,
              "peak_GBps": None if peak is None else peak / 1e9}
    for name, value in seconds.items():
        result[f"{name}_ms"] = value * 1e3
        result[f"{name}_GBps"] = nbytes / value / 1e9 if value else None
        result[f"{name}_peak_pct"] = (100 * nbytes / value / peak) if value and peak else None
    if seconds.get("fastpool") and seconds.get("torch"):
        result["speedup_vs_torch"] = seconds["torch"] / seconds["fastpool"]
    return result


def markdown(rows: list[dict], device: str) -> str:
    """A Markdown summary table of :func:`row` results."""
    lines = [f"# fastpool GPU benchmark ({device})", "",
             "| op | shape | layout | dir | dtype | fastpool ms | GB/s | % peak | torch ms "
             "| GB/s | % peak | speed-up |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    for r in rows:
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | "
            f"{r['direction']} | {r['dtype']} | {fmt(r.get('fastpool_ms'), '.3f')} | "
            f"{fmt(r.get('fastpool_GBps'), '.0f')} | {fmt(r.get('fastpool_peak_pct'), '.0f')} | "
            f"{fmt(r.get('torch_ms'), '.3f')} | {fmt(r.get('torch_GBps'), '.0f')} | "
            f"{fmt(r.get('torch_peak_pct'), '.0f')} | {fmt(r.get('speedup_vs_torch'), '.2f')} |")
    speedups = [r["speedup_vs_torch"] for r in rows if r.get("speedup_vs_torch")]
    if speedups:
        lines += ["", f"Geometric mean speed-up over torch: "
                      f"{float(np.exp(np.mean(np.log(speedups)))):.2f}x over {len(speedups)} "
                      f"cases."]
    return "\n".join(lines) + "\n"


def main(args, cases) -> list[dict]:
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    peak = peak_bandwidth()
    flush_buffer = torch.empty(2 * _l2_bytes() // 4 + 1, dtype=torch.float32, device="cuda")

    def flush():
        flush_buffer.fill_(1.0)
    device = torch.cuda.get_device_name()
    print(f"fastpool CUDA against torch {torch.__version__} on {device}; peak "
          f"{'?' if peak is None else f'{peak / 1e9:.0f}'} GB/s; median of {args.repeats} "
          f"CUDA-event timings, L2 flushed")
    rows = []
    for case in cases:
        for direction in args.directions:
            for channels_last in case.layouts:
                for dtype_name in args.dtypes:
                    try:
                        functions, nbytes = calls(case, channels_last, direction,
                                                  dtypes[dtype_name])
                    except NotImplementedError:
                        continue
                    seconds = {name: time_cuda(f, args.repeats, flush)
                               for name, f in functions.items()}
                    rows.append(row(case, channels_last, direction, dtype_name, seconds,
                                    nbytes, peak))
                    r = rows[-1]
                    print(f"{case.label:40} {r['layout']:15} {direction:8} {dtype_name:8} "
                          f"fastpool {r['fastpool_ms']:8.3f} ms "
                          f"({r['fastpool_GBps'] or 0:6.0f} GB/s)  torch "
                          f"{r['torch_ms']:8.3f} ms", flush=True)
    with open(args.json, "w") as f:
        json.dump({"device": device, "peak_GBps": None if peak is None else peak / 1e9,
                   "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, device))
    print(f"wrote {args.json}" + (f" and {args.markdown}" if args.markdown else ""))
    return rows
