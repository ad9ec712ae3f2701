"""fastpool never takes the process down: threads, fork, spawn, forkserver.

Each scenario runs in a fresh interpreter, so that the threading layer is
chosen as it is for a user: tbb when installed, workqueue otherwise, or the
layer the user asked numba for.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest

import fastpool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "default": ({}, [], "tbb"),
    "no-tbb": ({}, ["--no-tbb"], "workqueue"),
    "workqueue": ({"NUMBA_THREADING_LAYER": "workqueue"}, [], "workqueue"),
    # Asked for by name, tbb runs too (numba alone did not find the wheel's library).
    "tbb-requested": ({"NUMBA_THREADING_LAYER": "tbb"}, [], "tbb"),
}


@pytest.mark.parametrize("scenario", ["threads", "fork", "spawn", "forkserver",
                                      "fork-during-launch", "fork-from-thread"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_scenario(scenario, config):
    env_extra, args, layer = CONFIGS[config]
    env = {**os.environ, **env_extra}
    env.pop("NUMBA_THREADING_LAYER", None) if not env_extra else None
    done = subprocess.run([sys.executable, "-m", "tests.concurrency_scenarios", scenario,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # The last line; tbb may warn first that it could not stop its workers before a
    # fork (another thread had run them), whose child then launches on one thread.
    assert done.stdout.splitlines()[-1].split() == [layer, "ok"], done.stdout


def test_set_num_threads_applies_in_every_thread():
    # Large enough for a parallel launch (small calls run serially, on no threads).
    x = np.random.default_rng(0).standard_normal((4, 8, 64, 64))
    seen = []

    def worker():
        fastpool.max_pool2d(x, 2)
        seen.append(numba.get_num_threads())

    try:
        fastpool.set_num_threads(1)
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen == [1]
        assert fastpool.get_num_threads() == 1
    finally:
        fastpool.set_num_threads(None)
    assert fastpool.get_num_threads() == numba.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize("bad, error", [(0, ValueError), (10**6, ValueError),
                                        (1.5, TypeError), ("2", TypeError)])
def test_set_num_threads_rejects_bad_values(bad, error):
    with pytest.raises(error, match="set_num_threads"):
        fastpool.set_num_threads(bad)


def test_a_fork_waits_for_a_numba_compile_in_flight():
    # numba's compiler lock, copied held into a child, hung the child's first compile
    # or cache load (fastpool.cpu.tasks._before_fork).
    from numba.core.compiler_lock import global_compiler_lock

    import fastpool.cpu.tasks  # noqa: F401  (its fork hooks)

    holding, done = threading.Event(), threading.Event()

    def compile_in_flight():
        with global_compiler_lock:
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=compile_in_flight)
    thread.start()
    holding.wait()
    timer = threading.Timer(0.3, done.set)
    timer.start()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if global_compiler_lock._lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
        thread.join()
        timer.cancel()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


OMP_FORK_CHILD = """
import multiprocessing, numba, numpy as np, fastpool
x = np.random.default_rng(0).standard_normal((4, 8, 64, 64))  # large: a parallel launch
fastpool.max_pool2d(x, 2)  # the parent runs a parallel kernel on omp
assert numba.threading_layer() == "omp", numba.threading_layer()

def work(i):
    return float(fastpool.max_pool2d(x, 2).sum())

def small_work(i):  # small calls run serially, on no threads: fine in the child
    return float(fastpool.max_pool2d(x[:1, :2, :8, :8], 2).sum())

with multiprocessing.get_context("fork").Pool(2) as pool:
    assert pool.map(small_work, range(2)) == [small_work(0)] * 2
    try:
        pool.map(work, range(2))
    except RuntimeError as error:
        print(error)
"""


def test_fork_after_omp_raises_in_the_child_instead_of_hanging():
    # GNU OpenMP's parallel code never returns in a child forked after the parent used
    # it (the map hung forever); fastpool notes the omp parent at fork and refuses.
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp"}
    done = subprocess.run([sys.executable, "-c", OMP_FORK_CHILD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forked from one running numba's 'omp' threading layer" in done.stdout
    assert "'spawn'" in done.stdout and "fastpool[tbb]" in done.stdout


def test_a_slow_first_launch_logs_once_that_fastpool_is_compiling(monkeypatch, caplog):
    import time

    from fastpool.cpu import runtime

    monkeypatch.setattr(runtime, "_launched", set())
    monkeypatch.setattr(runtime, "_noticed", threading.Event())
    monkeypatch.setattr(runtime, "COMPILE_NOTICE_DELAY", 0.05)

    class StandIn:  # a kernel whose first launch takes ``seconds`` (as one compiling)
        def __init__(self, seconds):
            self.seconds = seconds

        def run_shares(self, parts, arguments, address=None):
            time.sleep(self.seconds)
            return self.seconds

    with caplog.at_level("WARNING", logger="fastpool"):
        assert runtime.launch(StandIn(0)) == 0  # a fast first launch says nothing
        time.sleep(0.2)
        assert caplog.records == []
        assert runtime.launch(StandIn(1.0)) == 1.0
        assert runtime.launch(StandIn(1.0)) == 1.0  # it says so once per process
    messages = [r.getMessage() for r in caplog.records if r.name == "fastpool"]
    assert len(messages) == 1 and "fastpool is compiling CPU kernels" in messages[0]


def test_a_fork_while_a_kernel_compiles_leaves_the_child_able_to_compile():
    # A parent thread held a kernel's compile lock (and per_constants' build lock)
    # when the process forked: the child's first call that needed them hung.
    from fastpool.cpu import kernels

    kernel = kernels.plane_broadcast
    grad_out, grad_in = np.ones(2), np.empty((2, 3))
    with kernel._lock, kernels._built_lock:
        pid = os.fork()
        if pid == 0:  # the child: a new argument type needs the lock, then a build
            code = 1
            try:
                kernel.address((grad_out.astype(np.float32), grad_in.astype(np.float32),
                                0.5))
                kernels.max_pool_channels_first((3, 3))
                code = 0
            finally:
                os._exit(code)
    for _ in range(600):  # up to 60 s: the child compiles one kernel
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on a lock held at the fork")
    assert os.waitstatus_to_exitcode(status) == 0
