"""Quick benchmark: fastpool (cpu) against the NumPy reference and PyTorch.

Run ``python -m bench``.  Times are the best of several runs after a warm-up
call (which also compiles), with torch limited to numba's thread count.
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


def _torch_call(case: Case, x: np.ndarray, channels_last: bool):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x)
    if channels_last:
        t = t.movedim(-1, 1)  # NCHW view with channels-last strides: torch's own format
    function = getattr(F, f"{case.op}{case.nd}d")
    return lambda: function(t, *case.args, **case.kwargs)


def run(cases, repeats: int) -> list[dict]:
    import numba
    import torch

    torch.set_num_threads(numba.get_num_threads())
    rows = []
    for case in cases:
        for channels_last in (False, True):
            if channels_last and case.nd == 1:
                continue
            x = case.make_input(channels_last)
            function = getattr(fastpool, f"{case.op}{case.nd}d")
            timings = {
                backend: best_time(lambda b=backend: function(
                    x, *case.args, channels_last=channels_last, backend=b, **case.kwargs),
                    repeats if backend == "cpu" else max(1, repeats // 3))
                for backend in ("cpu", "numpy")
            }
            timings["torch"] = best_time(_torch_call(case, x, channels_last), repeats)
            rows.append(dict(case=case.label, shape=case.shape,
                             layout="channels-last" if channels_last else "channels-first",
                             **timings))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import numba
    print(f"fastpool {fastpool.__version__}, {numba.get_num_threads()} threads, float32, "
          "forward; times in ms (best of runs)")
    header = (f"{'op':<34}{'shape (N, C, *spatial)':<24}{'layout':<16}{'fastpool':>9}"
              f"{'numpy':>9}{'torch':>9}{'vs torch':>10}{'vs numpy':>10}")
    print(header)
    print("-" * len(header))
    for row in run(QUICK, args.repeats):
        print(f"{row['case']:<34}{str(row['shape']):<24}{row['layout']:<16}"
              f"{row['cpu'] * 1e3:9.2f}{row['numpy'] * 1e3:9.1f}{row['torch'] * 1e3:9.2f}"
              f"{row['torch'] / row['cpu']:9.2f}x{row['numpy'] / row['cpu']:9.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
