"""Numba compilation options, in one place.

Read once from the environment at import:

``FASTPOOL_DISABLE_CACHE=1``
    compile without numba's on-disk cache (``cache=True`` otherwise).
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
