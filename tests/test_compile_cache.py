"""Kernels compile lazily and a second process loads them from numba's disk cache."""

import pytest

from tests.conftest import run_on_disk_cache

SCRIPT = """
import json, numpy as np, fastpool
from fastpool.cpu import kernels, runtime
# rows of 20 outputs: narrower ones fold maxima rows first, sweeping nothing
x = np.random.default_rng(0).standard_normal((2, 3, 8, 40)).astype(np.float32)
fastpool.max_pool2d(x, 2)
fastpool.avg_pool2d(x, 2)
fastpool.avg_pool2d(x, 2, channels_last=True)
fastpool.adaptive_avg_pool2d(x, 1)
# Calls this small run the kernels serially, their parallel=False builds alone (see
# tests/test_plan_cache.py for a build and its launcher side by side).
# The channels-first kernels are built per interior sweep (2x2 windows, stride 2);
# numba caches such closures by their cells' contents.
built = {"max_pool_channels_first": kernels.max_pool_channels_first((2, 2)),
         "sum_pool_channels_first": kernels.sum_pool_channels_first((2, 2)),
         "sum_pool_channels_last": kernels.sum_pool_channels_last((2, 2)),
         "plane_sum": kernels.plane_sum}
stats = {name: kernel.body.stats for name, kernel in built.items()}
print(json.dumps({name: [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
                  for name, s in stats.items()}))
"""


@pytest.mark.slow
def test_second_process_loads_kernels_from_disk_cache(tmp_path):
    def run():
        return run_on_disk_cache(SCRIPT, tmp_path)

    cold = run()
    assert all(misses >= 1 and hits == 0 for hits, misses in cold.values()), cold
    warm = run()
    assert all(hits >= 1 and misses == 0 for hits, misses in warm.values()), warm


SWEEPS_SCRIPT = """
import json, numpy as np, fastpool
from numba.core import event
from fastpool.cpu import kernels, runtime
x = np.random.default_rng(0).standard_normal((2, 3, 8, 40)).astype(np.float32)
compiled = []
class Compiles(event.Listener):
    def on_start(self, ev):
        dispatcher = ev.data["dispatcher"]
        compiled.append(getattr(dispatcher, "py_func", dispatcher).__qualname__)
    def on_end(self, ev):
        pass
with event.install_listener("numba:compile", Compiles()):
    fastpool.max_pool2d(x, 3, 2, 1)
    fastpool.max_pool2d(x, 2)
    fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    fastpool.avg_pool2d_backward(np.ones((2, 3, 4, 20), np.float32), x.shape, 2)
    fastpool.fractional_max_pool2d(x, 2, output_size=3, return_indices=True, seed=0)
    fastpool.max_pool2d(np.ones((8, 16, 32, 32), np.float32), 2)  # parallel: its launcher too
builds = {str(sweep): kernels.max_pool_channels_first(sweep)
          for sweep in [(2, 3), (2, 2), kernels.NO_SWEEP]}
print(json.dumps({"built": len(kernels.built_kernels()), "compiled": compiled,
                  "cache": {name: [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
                            for name, s in ((n, k.body.stats)
                                            for n, k in builds.items())}}))
"""


@pytest.mark.slow
def test_kernels_built_per_interior_sweep_load_from_disk_cache(tmp_path):
    # Each sweep's build of a channels-first kernel is its own closure, cached on
    # disk under its cells' values: a second process loads every one.
    def run():
        return run_on_disk_cache(SWEEPS_SCRIPT, tmp_path)

    cold = run()
    # max's (2, 3) build, with and without indices (two signatures), its (2, 2) one,
    # and the no-sweep build made after the calls (none of them ran it).
    assert cold["built"] == 3, cold
    assert cold["cache"] == {"(2, 3)": [0, 2], "(2, 2)": [0, 1], "(-1, -1)": [0, 0]}, cold
    # Numba's checked array assignment compiles its error message's string formatting
    # (seconds of a first call); the kernels and launchers copy element by element.
    assert not [name for name in cold["compiled"] if "shape_context" in name], cold["compiled"]
    warm = run()
    assert warm["cache"] == {"(2, 3)": [2, 0], "(2, 2)": [1, 0], "(-1, -1)": [0, 0]}, warm
    assert warm["compiled"] == [], warm["compiled"]


FIRST_CALL_SCRIPT = """
import collections, importlib.util, json, sys, numpy as np, fastpool
from numba.core import event
x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 8, 40))).astype(np.float32)
compiled = collections.Counter()
class Compiles(event.Listener):
    def on_start(self, ev):
        dispatcher = ev.data["dispatcher"]
        name = getattr(dispatcher, "py_func", dispatcher).__qualname__
        compiled[name + str(ev.data["args"])] += 1
    def on_end(self, ev):
        pass
with event.install_listener("numba:compile", Compiles()):
    y = fastpool.lp_pool2d(x, 2, 2)
    fastpool.lp_pool2d_backward(np.ones_like(y), x, 2, 2)
    fastpool.avg_pool2d(x, 2)
linalg_after_pooling = "scipy.linalg" in sys.modules
import numba.np.arraymath
blas = numba.np.arraymath._HAVE_BLAS
if importlib.util.find_spec("scipy") is not None:
    import scipy.linalg.cython_blas
    blas = blas and len(scipy.linalg.cython_blas.__pyx_capi__) > 0
    import scipy.linalg
    blas = blas and scipy.linalg.blas.find_best_blas_type is not None
print(json.dumps({"twice": [name for name, count in compiled.items() if count > 1],
                  "linalg": linalg_after_pooling, "blas": bool(blas)}))
"""


@pytest.mark.slow
def test_first_calls_compile_each_function_once_without_scipy_linalg(tmp_path):
    # numba compiles an @overload once per caller's compile flags, so the Lp
    # helpers (called from kernels, sweeps and the fast-math _contiguous_sum) are
    # functions: each compiles once per signature.  And numba's BLAS check at its
    # first compile loads scipy.linalg.cython_blas alone (see fastpool.cpu.runtime),
    # not the whole scipy.linalg, which a later import still gets whole.
    result = run_on_disk_cache(FIRST_CALL_SCRIPT, tmp_path)
    assert result["twice"] == [], result["twice"]
    assert not result["linalg"]
    assert result["blas"]
