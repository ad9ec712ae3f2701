"""Launching CPU kernels safely from threads and forked processes.

numba runs ``parallel=True`` code on a process-wide *threading layer*, chosen
at the first parallel launch.  The layers differ in what they survive:

========== ========================= ==============================
layer      several Python threads    a forked child (DataLoader)
========== ========================= ==============================
tbb        safe                      safe
workqueue  aborts the process        safe
omp (GNU)  safe                      hangs in the child
========== ========================= ==============================

fastpool's choice, made once before its first launch:

1. If numba's layer is already running (other numba code launched first) or
   the user chose one (``NUMBA_THREADING_LAYER``), keep it.
2. Otherwise use ``tbb`` when the ``tbb`` package is installed (the ``tbb``
   extra).  Its wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, where the
   loader does not look, so fastpool loads it by path first.
3. Otherwise use ``workqueue``, which is fork-safe.

Whenever the layer in use is ``workqueue``, fastpool serialises its own
launches with a lock (re-created in forked children), so concurrent calls from
several threads wait instead of aborting.  With ``omp`` (GNU OpenMP), parallel
code in a child forked after the parent ran some never returns: a documented
limit of GNU OpenMP.  fastpool notes at fork time that the parent runs ``omp``
and raises :class:`RuntimeError` in such a child instead of hanging.

Small calls skip all of that: a launch whose work (about the element reads it
makes) is below :data:`SERIAL_WORK_LIMIT` (:data:`WORKQUEUE_WORK_FACTOR` times that
on workqueue, whose launches cost more) runs the kernel serially in the calling
thread (every task in one share, see :mod:`fastpool.cpu.tasks`), which needs no
threading layer, thread count or lock.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from contextlib import nullcontext
from importlib import metadata

import numba

from fastpool import _threads

logger = logging.getLogger("fastpool")


def _load_numba_registries() -> None:
    """Import numba's NumPy registries without importing ``scipy.linalg``.

    numba's first compile or cache load in a process imports
    ``numba.np.arraymath``, which checks for BLAS by importing
    ``scipy.linalg.cython_blas``: with it, the whole ``scipy.linalg`` package,
    a quarter of a second of every process's first call, though pooling never
    calls BLAS.  Here the check finds that extension module loaded alone (a few
    milliseconds; numba still registers its BLAS-backed functions), and it leaves
    ``sys.modules`` as it was: a numba BLAS call (none in fastpool) imports
    ``scipy.linalg`` itself when it first runs.  Nothing to do when scipy is
    absent or either module is already imported."""
    name = "scipy.linalg.cython_blas"
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    try:
        import scipy
        spec = importlib.machinery.PathFinder.find_spec(
            "cython_blas", [os.path.join(path, "linalg") for path in scipy.__path__])
    except (ImportError, AttributeError):
        spec = None
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        import numba.np.arraymath  # noqa: F401  (numba's own check, as it would run)
        return
    spec.name = name
    blas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blas)
    sys.modules[name] = blas
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if sys.modules.get(name) is blas:
            del sys.modules[name]


_load_numba_registries()

_setup_lock = threading.Lock()
_launch_lock: threading.Lock | None = None
_layer: str | None = None
# The thread that started numba's layer, where fastpool started it (None: the main
# thread, numba's usual): numba's tbb layer stops its workers at a fork from it only.
_layer_thread: int | None = None

_TBB_LIBRARIES = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")


def _tbb_library():
    """The tbb wheel's shared library (a ``PackagePath``), or None without one."""
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return None
    return next((file for file in files if file.name in _TBB_LIBRARIES), None)


def _load_tbb() -> bool:
    """Load the tbb wheel's shared library by path; True when numba can then use it."""
    library = _tbb_library()
    if library is None:
        return False
    try:
        ctypes.CDLL(str(library.locate()), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        from numba.np.ufunc import tbbpool  # noqa: F401  (fails if unusable)
    except (OSError, ImportError):
        return False
    return True


# numba's layer names that try tbb first (the others: omp, workqueue).
_TBB_FIRST = ("tbb", "safe", "threadsafe", "forksafe")


def _requested_layer() -> str:
    """The layer the user asked numba for (NUMBA_THREADING_LAYER or numba.config), or
    'default'."""
    return os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER


def _start_threading_layer() -> str:
    global _layer_thread
    from numba.np.ufunc import parallel

    if not parallel._is_initialized:
        _layer_thread = threading.get_ident()
        requested = _requested_layer()
        if requested == "default":
            numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "workqueue"
        elif requested in _TBB_FIRST:
            _load_tbb()  # numba's own search does not look where the wheel put it
    try:
        parallel._launch_threads()
    except ValueError:  # the layer asked for could not be loaded
        if parallel._is_initialized:
            raise
        numba.config.THREADING_LAYER = "workqueue"
        parallel._launch_threads()
    return numba.threading_layer()


# Set in a child forked from a process whose numba threading layer was GNU OpenMP.
_forked_from_omp = False


def _runs_omp() -> bool:
    """Whether numba's threading layer has started in this process, on omp."""
    from numba.np.ufunc import parallel

    return parallel._is_initialized and numba.threading_layer() == "omp"


def layer_start_thread() -> int:
    """The ident of the thread that started numba's threading layer (the main
    thread's where fastpool did not start it)."""
    return threading.main_thread().ident if _layer_thread is None else _layer_thread


def _reset_after_fork() -> None:
    global _launch_lock, _setup_lock, _forked_from_omp, _layer_thread
    # numba's tbb layer restarts in the forking thread where it could stop its
    # workers; where not, the child launches on one thread and never forks tbb again.
    if _layer_thread is not None:
        _layer_thread = threading.get_ident()
    _setup_lock = threading.Lock()
    if _launch_lock is not None:
        _launch_lock = threading.Lock()
    _forked_from_omp = _forked_from_omp or _runs_omp()


os.register_at_fork(after_in_child=_reset_after_fork)


def threading_layer() -> str:
    """Start (once) and return the numba threading layer fastpool runs on."""
    global _layer, _launch_lock
    if _layer is None:
        with _setup_lock:
            if _layer is None:
                layer = _start_threading_layer()
                _launch_lock = threading.Lock() if layer == "workqueue" else None
                _layer = layer
    return _layer


# The thread count this Python thread last gave numba (numba's setting is per
# thread): asking numba each call costs more than a small kernel's setup.
_applied = threading.local()


def launch(kernel, *args, work: int | None = None, address: int | None = None):
    """Run a kernel in parallel with fastpool's thread count, safely for this
    layer; or, when ``work`` (about the element reads the call makes) is small
    (:func:`runs_serially`), a task kernel (:mod:`fastpool.cpu.tasks`) serially in
    this thread (which is safe anywhere, a child forked from an ``omp`` parent
    included)."""
    if work is not None and runs_serially(work):
        return _run_serial(kernel, args)
    if _forked_from_omp:
        raise RuntimeError(
            "fastpool: this process was forked from one running numba's 'omp' threading "
            "layer (GNU OpenMP), whose parallel code hangs in a forked child. Use the tbb "
            "layer (pip install \"fastpool[tbb]\"; unset NUMBA_THREADING_LAYER) or "
            "NUMBA_THREADING_LAYER=workqueue, or start worker processes with the 'spawn' "
            "or 'forkserver' method (multiprocessing, or DataLoader's "
            "multiprocessing_context)")
    if _layer is None:
        threading_layer()
    wanted = _threads.get_num_threads()
    if getattr(_applied, "threads", None) != wanted:
        numba.set_num_threads(wanted)
        _applied.threads = wanted
    if _launch_lock is None and kernel in _launched:  # the common case, without a with
        return kernel.run_shares(wanted, args, address)
    with _launch_lock or nullcontext():
        if kernel in _launched:
            return kernel.run_shares(wanted, args, address)
        with _compile_notice():
            result = kernel.run_shares(wanted, args, address)
        _launched.add(kernel)
        return result


# Below this much work a parallel launch costs more than it saves: a launch on tbb
# takes 2-3 us (fastpool.cpu.tasks), and more when a worker thread is slow to join,
# while a serial channels-first kernel reads an element in about half a nanosecond
# (channels-last ones, vectorised across channels, several a nanosecond).  Measured
# on 2 threads, whole calls (serial against parallel plan): the parallel plan wins
# from 12-16 thousand reads for channels-first average and max pooling, from 30-60
# thousand for channels-last ones and max pooling's backward; this limit is between.
SERIAL_WORK_LIMIT = 32768
# workqueue's launches cost more: it wakes its sleeping threads twice a launch (to
# set their thread counts, then to run), 57 us for two threads where tbb's spinning
# workers take 3 us (a trivial kernel, 2 cores).  Its threads pay for themselves from
# about 8 times the work.
WORKQUEUE_WORK_FACTOR = 8


def runs_serially(work: int) -> bool:
    """Whether a launch of ``work`` element reads runs the kernel serially."""
    if work < SERIAL_WORK_LIMIT:
        return True
    return work < SERIAL_WORK_LIMIT * WORKQUEUE_WORK_FACTOR and _expected_layer() == "workqueue"


_expected: str | None = None


def _expected_layer() -> str:
    """The threading layer fastpool runs on, or will run on (as
    :func:`_start_threading_layer` chooses it), without starting it: small calls
    start none."""
    global _expected
    if _layer is not None:
        return _layer
    if _expected is None:
        from numba.np.ufunc import parallel

        if parallel._is_initialized:
            return numba.threading_layer()
        chosen = _requested_layer()
        if chosen == "default" or chosen in _TBB_FIRST:  # as _start_threading_layer
            chosen = "workqueue" if _tbb_library() is None else "tbb"
        _expected = chosen
    return _expected


def bind(kernel, *tail, work: int, serial: bool | None = None):
    """``kernel`` with its trailing non-array arguments fixed and its build chosen
    once from ``work``, as :func:`launch` would choose it (or, given ``serial``, as
    that says): a planned call's launcher, taking the array arguments."""
    in_parallel = not (runs_serially(work) if serial is None else serial)
    address = None  # the kernel's, for these arguments' types (known after a launch)

    def run(*arrays):
        nonlocal address
        arguments = arrays + tail
        if address is not None:
            if in_parallel:
                return launch(kernel, *arguments, address=address)
            return kernel.run_shares(1, arguments, address)
        result = launch(kernel, *arguments) if in_parallel else \
            _run_serial(kernel, arguments)
        address = kernel.address(arguments)
        return result

    return run


def _run_serial(kernel, args):
    """Run a task kernel serially in this thread; its first serial launch may
    compile (and say so)."""
    if (kernel, "serial") in _launched:
        return kernel.serial(*args)
    with _compile_notice():
        result = kernel.serial(*args)
    _launched.add((kernel, "serial"))
    return result


# Kernels launched at least once in this process; a first launch may compile.
_launched: set = set()
_noticed = threading.Event()
COMPILE_NOTICE_DELAY = 1.0  # seconds a first launch runs before fastpool says why


class _compile_notice:
    """Log once per process, while a first launch is still running after
    :data:`COMPILE_NOTICE_DELAY` seconds, that fastpool is compiling kernels: a
    first call takes seconds, and a silent one looks like a hang."""

    def __enter__(self):
        self._timer = None
        if not _noticed.is_set():
            self._timer = threading.Timer(COMPILE_NOTICE_DELAY, self._log)
            self._timer.daemon = True
            self._timer.start()

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()

    @staticmethod
    def _log():
        if not _noticed.is_set():
            _noticed.set()
            logger.warning(
                "fastpool is compiling CPU kernels for this call (a few seconds for the "
                "first call of each op, dtype and layout; numba caches them on disk, so "
                "later processes load them in well under a second)")
