"""Compile cost per op: the first call in a fresh process, with an empty on-disk
cache (cold: numba compiles) and with the cache the cold run left (warm: numba
loads the machine code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

OPS = {
    "max_pool2d": "fastpool.max_pool2d(x, 3, 2, 1)",
    "max_pool2d(indices)": "fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)",
    "avg_pool2d": "fastpool.avg_pool2d(x, 2)",
    "lp_pool2d": "fastpool.lp_pool2d(abs(x), 2, 2)",
    "adaptive_max_pool2d": "fastpool.adaptive_max_pool2d(x, 3)",
    "max_pool2d_backward": "fastpool.max_pool2d_backward(g, i, x.shape)",
    "avg_pool2d_backward": "fastpool.avg_pool2d_backward(g, x.shape, 2)",
}

_SCRIPT = """
import time, numpy as np
start = time.perf_counter()
import fastpool
x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
g = np.ones((2, 4, 4, 4), np.float32)
i = np.zeros((2, 4, 4, 4), np.int64)
imported = time.perf_counter()
{call}
print(time.perf_counter() - imported)
"""


def first_call_seconds(call: str, cache_dir: str) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    env.pop("FASTPOOL_DISABLE_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format(call=call)], env=env,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def compile_costs(ops=OPS) -> dict:
    """{op: {"cold": seconds, "warm": seconds}} for the first call of each op."""
    costs = {}
    for name, call in ops.items():
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = first_call_seconds(call, cache_dir)
            warm = first_call_seconds(call, cache_dir)
        costs[name] = {"cold": cold, "warm": warm}
    return costs


if __name__ == "__main__":
    print(json.dumps(compile_costs(), indent=2))
