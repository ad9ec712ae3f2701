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
import re
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

# ``--more``: other layouts, dimensions and ops (``xl``: x channels-last).
MORE_OPS = {
    "max_pool2d(channels_last)": "fastpool.max_pool2d(xl, 3, 2, 1, channels_last=True)",
    "avg_pool2d(channels_last)": "fastpool.avg_pool2d(xl, 2, channels_last=True)",
    "lp_pool2d(channels_last)": "fastpool.lp_pool2d(abs(xl), 2, 2, channels_last=True)",
    "max_pool1d": "fastpool.max_pool1d(x[0], 3, 2, 1)",
    "avg_pool3d": "fastpool.avg_pool3d(x, 2)",
    "adaptive_avg_pool2d": "fastpool.adaptive_avg_pool2d(x, 3)",
    "global_avg_pool2d": "fastpool.global_avg_pool2d(x)",
    "lp_pool2d_backward": "fastpool.lp_pool2d_backward(g, abs(x), 2, 2)",
    "strided_conv2d": "fastpool.strided_conv2d(x, w, 2, 1)",
    "strided_conv2d_backward": "fastpool.strided_conv2d_backward(g, x, w[:32], 2, 1)",
}

# An input the size of a layer's (a batch of 8 feature maps of 32 channels of 32x32):
# large enough that each call runs its kernels on every thread, as users' calls do
# (a tiny one runs them in the calling thread, which compiles less).
_SCRIPT = """
import json, time, numpy as np
import fastpool
x = np.random.default_rng(0).standard_normal((8, 32, 32, 32)).astype(np.float32)
xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
g = np.ones((8, 32, 16, 16), np.float32)
i = np.zeros((8, 32, 16, 16), np.int64)
w = np.ones((64, 32, 3, 3), np.float32)
wall, cpu = time.perf_counter(), time.process_time()
{call}
print(json.dumps({{"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}}))
"""


def first_call_cost(call: str, cache_dir: str) -> dict:
    """{"wall": s, "cpu": s} of ``call``, the first of a fresh process (which has
    imported fastpool, not numba) with numba's cache in ``cache_dir``; CPU seconds
    are the process's, over all its threads."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format(call=call)],
                          env=_env(cache_dir), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_call_seconds(call: str, cache_dir: str) -> float:
    """Wall seconds of :func:`first_call_cost`."""
    return first_call_cost(call, cache_dir)["wall"]


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


def compile_costs(ops=OPS, progress=False) -> dict:
    """{op: {"cold": s, "warm": s, "cold_cpu": s, "warm_cpu": s}} for the first call
    of each op: wall and CPU seconds, with an empty cache, then the one it left."""
    costs = {}
    for name, call in ops.items():
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = first_call_cost(call, cache_dir)
            warm = first_call_cost(call, cache_dir)
        costs[name] = {"cold": cold["wall"], "warm": warm["wall"],
                       "cold_cpu": cold["cpu"], "warm_cpu": warm["cpu"]}
        if progress:
            print(f"{name:<28} cold {cold['wall']:5.2f} s wall {cold['cpu']:5.2f} s CPU, "
                  f"warm {warm['wall']:5.2f} s wall {warm['cpu']:5.2f} s CPU",
                  file=sys.stderr, flush=True)
    return costs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.compile_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="?", const="", default=None, metavar="G,G",
                        help="time fastpool.precompile's op groups (all, or these)")
    parser.add_argument("--precompile", action="store_true",
                        help="time python -m fastpool.precompile with its defaults")
    parser.add_argument("--more", action="store_true",
                        help="also channels-last, 1-D, 3-D, adaptive, global and Lp "
                             "backward first calls")
    parser.add_argument("--filter", default="", metavar="REGEX",
                        help="only the ops whose names match")
    args = parser.parse_args()
    if args.groups is not None:
        print(json.dumps(group_costs([g for g in args.groups.split(",") if g]), indent=2))
    if args.precompile:
        print(json.dumps(precompile_cost(), indent=2))
    if args.groups is None and not args.precompile:
        ops = {**OPS, **(MORE_OPS if args.more else {})}
        ops = {name: call for name, call in ops.items() if re.search(args.filter, name)}
        print(json.dumps(compile_costs(ops, progress=True), indent=2))
