"""Numba compilation options, in one place.

Read once from the environment at import:

``FASTPOOL_DISABLE_CACHE=1``
    compile without numba's on-disk cache (``cache=True`` otherwise).
``FASTPOOL_CUDA_CHECK_INDICES=0``
    let the GPU max backward skip its index check (a host synchronisation; below).
``FASTPOOL_FASTMATH=1``
    let LLVM reorder float arithmetic.  Off by default: results then match
    PyTorch's bit for bit in max pooling and to rounding in averages.
"""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


CPU_JIT_OPTIONS: dict = {
    "parallel": True,
    "nogil": True,
    "cache": not _flag("FASTPOOL_DISABLE_CACHE"),
    "fastmath": _flag("FASTPOOL_FASTMATH"),
    "error_model": "numpy",
}

# numba-cuda kernels; its simulator (NUMBA_ENABLE_CUDASIM=1) ignores the cache.
CUDA_JIT_OPTIONS: dict = {"cache": not _flag("FASTPOOL_DISABLE_CACHE")}

# Max pooling's backward and max unpooling (forward and backward) on the GPU copy
# back a device count (a host synchronisation) to raise on indices outside the
# plane, as the host back ends do: bad input is never a silent wrong answer by
# default.
# FASTPOOL_CUDA_CHECK_INDICES=0 skips it: such indices are then dropped, and no
# forward or backward call synchronises with the host.
CUDA_CHECK_INDICES = os.environ.get("FASTPOOL_CUDA_CHECK_INDICES", "1").strip().lower() \
    not in ("0", "false", "no", "off")

# Threads per block for CUDA launches: the most a launch uses; small outputs get
# fewer (a multiple of the warp size).  Tests lower it so that tiny inputs span
# several blocks.
CUDA_MAX_THREADS_PER_BLOCK = int(os.environ.get("FASTPOOL_CUDA_THREADS_PER_BLOCK", "256"))
