"""Kernels compile lazily and a second process loads them from numba's disk cache."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, numpy as np, fastpool
from fastpool.cpu import kernels, runtime
x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
fastpool.max_pool2d(x, 2)
fastpool.avg_pool2d(x, 2)
fastpool.avg_pool2d(x, 2, channels_last=True)
fastpool.adaptive_avg_pool2d(x, 1)
# Calls this small run the kernels' serial twins (see tests/test_plan_cache.py for a
# parallel kernel and its twin side by side).
stats = {name: runtime.serial_twin(getattr(kernels, name)).stats for name in
         ("max_pool_channels_first", "sum_pool_channels_first", "sum_pool_channels_last",
          "plane_sum")}
print(json.dumps({name: [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
                  for name, s in stats.items()}))
"""


@pytest.mark.slow
def test_second_process_loads_kernels_from_disk_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("FASTPOOL_DISABLE_CACHE", None)

    def run():
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = run()
    assert all(misses >= 1 and hits == 0 for hits, misses in cold.values()), cold
    warm = run()
    assert all(hits >= 1 and misses == 0 for hits, misses in warm.values()), warm
