"""The CUDA back end: numba.cuda kernels (the ``numba-cuda`` package, extra ``cuda``).

``fastpool.cuda.is_available()`` tells whether it can run here.  Importing this
package imports nothing from numba; the kernels compile on first use.  Without
a GPU, ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported) runs the
kernels on numba's CUDA simulator.
"""

from __future__ import annotations

import importlib


def is_available() -> bool:
    """Whether numba-cuda is installed and sees a GPU (or its simulator is on).

    Examples
    --------
    >>> import fastpool.cuda
    >>> isinstance(fastpool.cuda.is_available(), bool)
    True
    """
    if not _numba_cuda_installed():
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reports itself here
        return False


def _numba_cuda_installed() -> bool:
    """Whether the numba-cuda package is importable.

    numba itself still ships a deprecated ``numba.cuda`` that imports without it,
    but cannot run fastpool's kernels (not even on the simulator).
    """
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def require(op: str):
    """The back end's implementation module, or a clear error naming what is missing."""
    if not _numba_cuda_installed():
        raise ValueError(f"{op}: backend='cuda' needs the numba-cuda package, which is not "
                         f'installed: pip install "fastpool[cuda]"')
    from numba import cuda

    if not cuda.is_available():
        raise ValueError(f"{op}: backend='cuda' needs an NVIDIA GPU with a working CUDA "
                         f"driver, and numba found none (set NUMBA_ENABLE_CUDASIM=1 to run "
                         f"on numba's simulator)")
    return importlib.import_module("fastpool.cuda.backend")
