"""Quick benchmark: fastpool (cpu) against the NumPy reference and PyTorch.

Run ``python -m bench`` (forward and backward) or ``python -m bench --direction
forward``.  Times are the best of several runs after a warm-up call (which
also compiles), with torch limited to numba's thread count.  Backward is timed
against torch autograd's backward of the same op (``torch.autograd.grad``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastpool
from bench.cases import QUICK, Case


def best_time(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def _torch_forward(case: Case, x: np.ndarray, channels_last: bool, requires_grad=False):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x)
    if channels_last:
        t = t.movedim(-1, 1)  # NCHW view with channels-last strides: torch's own format
    t.requires_grad_(requires_grad)
    function = getattr(F, f"{case.op}{case.nd}d")
    return t, lambda: function(t, *case.args, **case.kwargs)


def _forward_calls(case: Case, x: np.ndarray, channels_last: bool) -> dict:
    function = getattr(fastpool, f"{case.op}{case.nd}d")
    calls = {backend: (lambda b=backend: function(
        x, *case.args, channels_last=channels_last, backend=b, **case.kwargs))
        for backend in ("cpu", "numpy")}
    calls["torch"] = _torch_forward(case, x, channels_last)[1]
    return calls


def _backward_calls(case: Case, x: np.ndarray, channels_last: bool) -> dict:
    import torch

    forward = getattr(fastpool, f"{case.op}{case.nd}d")
    backward = getattr(fastpool, f"{case.op}{case.nd}d_backward")
    kw = dict(channels_last=channels_last)
    if "max" in case.op:
        out, indices = forward(x, *case.args, return_indices=True, **kw)
    else:
        out = forward(x, *case.args, **kw)
    grad = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    if "max" in case.op:
        arguments = (grad, indices, x.shape)
    elif case.op == "lp_pool":
        arguments = (grad, x, *case.args)
    elif case.op == "avg_pool":
        arguments = (grad, x.shape, *case.args)
    else:
        arguments = (grad, x.shape)
    calls = {backend: (lambda b=backend: backward(*arguments, backend=b, **kw))
             for backend in ("cpu", "numpy")}
    t, torch_forward = _torch_forward(case, x, channels_last, requires_grad=True)
    y = torch_forward()
    g = torch.from_numpy(grad)
    g = g.movedim(-1, 1) if channels_last else g
    calls["torch"] = lambda: torch.autograd.grad(y, t, g, retain_graph=True)
    return calls


def run(cases, repeats: int, directions) -> list[dict]:
    import torch

    torch.set_num_threads(fastpool.get_num_threads())
    rows = []
    for case in cases:
        for direction in directions:
            for channels_last in (False, True):
                if channels_last and case.nd == 1:
                    continue
                x = case.make_input(channels_last)
                make = _forward_calls if direction == "forward" else _backward_calls
                calls = make(case, x, channels_last)
                timings = {name: best_time(call, repeats if name != "numpy"
                                           else max(1, repeats // 3))
                           for name, call in calls.items()}
                rows.append(dict(case=case.label, shape=case.shape, direction=direction,
                                 layout="channels-last" if channels_last else "channels-first",
                                 **timings))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--direction", choices=("forward", "backward", "both"),
                        default="both")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for fastpool and torch alike (default: all cores)")
    args = parser.parse_args(argv)
    fastpool.set_num_threads(args.threads)
    directions = ("forward", "backward") if args.direction == "both" else (args.direction,)
    print(f"fastpool {fastpool.__version__}, {fastpool.get_num_threads()} threads, float32; "
          "times in ms (best of runs)")
    header = (f"{'op':<28}{'shape (N, C, *spatial)':<22}{'dir':<5}{'layout':<8}"
              f"{'fastpool':>9}{'numpy':>9}{'torch':>9}{'vs torch':>10}{'vs numpy':>10}")
    print(header)
    print("-" * len(header))
    for row in run(QUICK, args.repeats, directions):
        print(f"{row['case']:<28}{str(row['shape']):<22}{row['direction'][:3]:<5}"
              f"{'cl' if row['layout'] == 'channels-last' else 'cf':<8}"
              f"{row['cpu'] * 1e3:9.2f}{row['numpy'] * 1e3:9.1f}{row['torch'] * 1e3:9.2f}"
              f"{row['torch'] / row['cpu']:9.2f}x{row['numpy'] / row['cpu']:9.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
