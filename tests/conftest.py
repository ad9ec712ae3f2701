import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.oracle import to_channels_last


@pytest.fixture(autouse=True)
def no_cached_plans():
    """Start every test with an empty plan cache: plans freeze the CPU back end's
    tuning constants (SEPARABLE_MIN_WINDOW, GATHER_*, SERIAL_WORK_LIMIT, ...) when
    built, and tests monkeypatch those."""
    from fastpool import _dispatch

    _dispatch.PLANS.clear()


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


def make_input(rng, nd, size, *, batched=True, channels_last=False, dtype=np.float32,
               ties=False, channels=3):
    """A random input of spatial shape ``size`` (int or per-axis tuple), laid out as asked."""
    spatial = (size,) * nd if isinstance(size, int) else tuple(size)
    shape = ((2,) if batched else ()) + (channels,) + spatial
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        x = rng.integers(-3, 4, shape) if ties else rng.standard_normal(shape)
    elif dtype.kind == "b":
        x = rng.integers(0, 2, shape)
    else:
        low = 0 if dtype.kind == "u" else -60
        x = rng.integers(low, low + 120, shape)
    x = x.astype(dtype)
    return np.ascontiguousarray(to_channels_last(x, nd)) if channels_last else x


# tests/cuda runs in its own pytest invocation: under numba's CUDA simulator
# (NUMBA_ENABLE_CUDASIM=1, which must be set before numba is imported) or, with
# FASTPOOL_TEST_CUDA=1, on a real GPU.  The main invocation leaves it out.
if not (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("FASTPOOL_TEST_CUDA")):
    collect_ignore = ["cuda"]


def run_on_disk_cache(script: str, cache_dir) -> object:
    """Run ``script`` in a fresh Python process on numba's disk cache in ``cache_dir``
    (the on-disk cache enabled); the JSON its last output line prints."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    env.pop("FASTPOOL_DISABLE_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
