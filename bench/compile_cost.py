"""Compile cost per op: the first call in a fresh process, with an empty on-disk
cache (cold: numba compiles) and with the cache the cold run left (warm: numba
loads the machine code).

``--groups`` times each op group of ``python -m fastpool.precompile`` instead (float32,
channels-first, each in an empty cache), and ``--precompile`` the whole command with
its defaults, cold and warm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

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


_GROUP_SCRIPT = """
import json, time
from fastpool.precompile import _kernels, precompile
_kernels()  # numba and the kernels imported before the clocks start
wall, cpu = time.perf_counter(), time.process_time()
precompile(ops={group!r}, dtypes=["float32"], layouts=["first"], progress=False)
print(json.dumps({{"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}}))
"""


def _env(cache_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    env.pop("FASTPOOL_DISABLE_CACHE", None)
    return env


def group_costs(groups=None) -> dict:
    """{group: {"wall": s, "cpu": s}}: compiling each op group of fastpool.precompile
    (float32, channels-first) in a fresh process with an empty cache (imports excluded).
    Groups share kernels, so these overlap: each is what that group alone costs."""
    from fastpool.precompile import GROUPS
    costs = {}
    for group in groups or GROUPS:
        with tempfile.TemporaryDirectory() as cache_dir:
            done = subprocess.run([sys.executable, "-c", _GROUP_SCRIPT.format(group=group)],
                                  env=_env(cache_dir), capture_output=True, text=True,
                                  check=True)
        costs[group] = json.loads(done.stdout.strip().splitlines()[-1])
        print(group, costs[group], file=sys.stderr, flush=True)
    return costs


def precompile_cost(args=()) -> dict:
    """{"cold": {...}, "warm": {...}}: wall and CPU seconds (the child's, numba's
    compile threads included) of ``python -m fastpool.precompile *args`` with an empty
    cache, then with the cache that run left."""
    costs = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for run in ("cold", "warm"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "fastpool.precompile",
                                   "--no-progress", *args], env=_env(cache_dir),
                                  capture_output=True, text=True, check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            costs[run] = {"wall": time.perf_counter() - start,
                          "cpu": (after.ru_utime + after.ru_stime) -
                                 (before.ru_utime + before.ru_stime),
                          "summary": done.stdout}
            print(done.stdout, file=sys.stderr, flush=True)
    return costs


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
    parser = argparse.ArgumentParser(prog="python -m bench.compile_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="?", const="", default=None, metavar="G,G",
                        help="time fastpool.precompile's op groups (all, or these)")
    parser.add_argument("--precompile", action="store_true",
                        help="time python -m fastpool.precompile with its defaults")
    args = parser.parse_args()
    if args.groups is not None:
        print(json.dumps(group_costs([g for g in args.groups.split(",") if g]), indent=2))
    if args.precompile:
        print(json.dumps(precompile_cost(), indent=2))
    if args.groups is None and not args.precompile:
        print(json.dumps(compile_costs(), indent=2))
