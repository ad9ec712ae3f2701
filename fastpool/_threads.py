"""How many threads fastpool's CPU kernels use, process-wide.

numba's own ``set_num_threads`` is per calling thread; fastpool keeps one
process-wide setting and applies it in whichever thread launches a kernel.
"""

from __future__ import annotations

import contextvars
import functools
import numbers
import os
import threading
from contextlib import contextmanager

_num_threads: int | None = None
_local = threading.local()  # a per-thread cap (fastpool.dask's tasks set it)
# A caller's default for its own calls (fastpool.torch: torch's thread count), used
# while set_num_threads has not been called.
_default: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastpool_threads",
                                                                       default=None)


@functools.cache  # numba fixes its pool size when it starts; so do we
def _available_threads() -> int:
    # numba.config.NUMBA_NUM_THREADS without importing numba at fastpool import.
    value = os.environ.get("NUMBA_NUM_THREADS")
    return int(value) if value else (len(os.sched_getaffinity(0))
                                     if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Set the number of threads the CPU kernels use (all cores by default).

    Applies to calls from every Python thread, and to the benchmark suite.

    Parameters
    ----------
    n : int
        Between 1 and the number of threads numba was started with
        (``NUMBA_NUM_THREADS``, by default the number of cores).

    Examples
    --------
    >>> import fastpool
    >>> fastpool.set_num_threads(1)
    >>> fastpool.get_num_threads()
    1
    >>> fastpool.set_num_threads(None)  # back to the default: all cores
    """
    global _num_threads
    if n is None:
        _num_threads = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: n must be an int or None, got {n!r}")
    n = int(n)  # NumPy integers too, as everywhere else in fastpool
    limit = _available_threads()
    if not 1 <= n <= limit:
        raise ValueError(f"set_num_threads: n must be between 1 and {limit} "
                         f"(NUMBA_NUM_THREADS), got {n}")
    _num_threads = n


def get_num_threads() -> int:
    """The number of threads the CPU kernels use.

    Examples
    --------
    >>> import fastpool
    >>> fastpool.get_num_threads() >= 1
    True
    """
    if _num_threads is not None:
        threads = _num_threads
    else:
        default = _default.get()
        threads = min(default, _available_threads()) if default else _available_threads()
    cap = getattr(_local, "cap", None)
    return threads if cap is None else max(1, min(threads, cap))


@contextmanager
def thread_cap(n: int | None):
    """Cap the kernels launched from this Python thread at ``n`` threads."""
    previous, _local.cap = getattr(_local, "cap", None), n
    try:
        yield
    finally:
        _local.cap = previous


@contextmanager
def default_threads(n: int):
    """Within this block (in this thread or task), use ``n`` threads unless
    set_num_threads was called."""
    token = _default.set(max(1, int(n)))
    try:
        yield
    finally:
        _default.reset(token)
