"""Thread and process scenarios, run in a fresh interpreter by test_concurrency.py.

Usage: python -m tests.concurrency_scenarios SCENARIO [--no-tbb]
Prints the threading layer and "ok" when every result matches the serial one.
"""

import sys
import threading

import numpy as np

import fastpool


def _calls():
    """A mix of ops, dtypes, layouts and shapes, with fixed inputs."""
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((4, 8, 33, 35)).astype(np.float32)
    x64 = rng.standard_normal((2, 6, 9, 17, 19))
    xu8 = rng.integers(0, 255, (3, 40, 41, 5)).astype(np.uint8)
    g = rng.standard_normal((4, 8, 17, 18)).astype(np.float32)
    return [
        lambda: fastpool.max_pool2d(x32, 3, 2, 1, return_indices=True),
        lambda: fastpool.avg_pool3d(x64, 3, 2, 1, ceil_mode=True),
        lambda: fastpool.max_pool2d(xu8, 2, channels_last=True),
        lambda: fastpool.lp_pool2d(x32, 2, 3, 2, ceil_mode=True),
        lambda: fastpool.adaptive_avg_pool3d(x64, (4, 5, 6)),
        lambda: fastpool.adaptive_max_pool2d(xu8, 7, channels_last=True),
        lambda: fastpool.avg_pool2d_backward(g, x32.shape, 3, 2, 1),
        lambda: fastpool.global_avg_pool2d(x32),
    ]


def _same(a, b):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(np.array_equal(p, q, equal_nan=True) for p, q in zip(a, b))


def threads(calls, expected, rounds=5):
    failures = []

    def worker(i):
        for r in range(rounds):
            k = (i + r) % len(calls)
            if not _same(calls[k](), expected[k]):
                failures.append(k)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures, failures


def _child(k):
    from fastpool.cpu import tasks

    return _calls()[k](), tasks.runs_in_one_thread()


def processes(calls, expected, method, one_thread=False):
    """Children forked by the main thread, with no other thread running tbb, keep
    their parallel launches; ``one_thread``: whether the children run theirs in
    their own thread."""
    import multiprocessing

    with multiprocessing.get_context(method).Pool(4) as pool:
        results = pool.map(_child, range(len(calls)))
    assert all(_same(r, e) for (r, _), e in zip(results, expected))
    assert all(in_one == one_thread for _, in_one in results), results


def fork_from_thread(calls, expected):
    """Fork worker processes from a thread other than the one that started tbb,
    whose fork handler then leaves tbb's workers running: the children run their
    launches in their own thread."""
    from fastpool.cpu import runtime

    failed = []

    def fork_workers():
        try:
            processes(calls, expected, "fork", runtime.threading_layer() == "tbb")
        except BaseException as error:
            failed.append(error)

    thread = threading.Thread(target=fork_workers)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def fork_during_launch(rounds=3):
    """Fork while another thread launches parallel kernels: the child launches too,
    and must not hang.  On tbb, whose workers that thread keeps from stopping at the
    fork (a child's copy of them hung 1 child in 10), the child runs its launches
    in its own thread."""
    import os
    import signal
    import time

    from fastpool.cpu import kernels, runtime, tasks

    kernel = kernels.max_backward_channels_first
    planes, outputs = 4, 1_000_000
    grad, at = np.ones((planes, outputs)), np.zeros((planes, outputs), np.int64)
    small = (np.ones((4, 10)), np.zeros((4, 10), np.int64), np.empty((4, 5)))
    kernel.run_shares(2, small)  # compiled (or loaded) before the thread starts
    stop, launched = False, threading.Event()

    def launches():
        grad_in = np.empty((planes, 64))
        while not stop:
            kernel.run_shares(2, (grad, at, grad_in))
            launched.set()

    thread = threading.Thread(target=launches, daemon=True)
    thread.start()
    launched.wait()
    try:
        for _ in range(rounds):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:  # the child: one parallel launch, then out
                status = 1
                try:
                    signal.alarm(60)
                    kernel.run_shares(2, small)
                    on_tbb = runtime.threading_layer() == "tbb"
                    status = 0 if tasks.runs_in_one_thread() == on_tbb else 2
                finally:
                    os._exit(status)
            deadline = time.time() + 90
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.time() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise AssertionError("a child forked during a launch hung")
                time.sleep(0.02)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop = True
        thread.join()


def main(scenario, no_tbb):
    from fastpool.cpu import runtime

    if no_tbb:
        runtime._load_tbb = lambda: False
    calls = _calls()
    expected = [call() for call in calls]  # the parent uses the kernels before forking
    if scenario == "threads":
        threads(calls, expected)
    elif scenario == "fork-during-launch":
        fork_during_launch()
    elif scenario == "fork-from-thread":
        fork_from_thread(calls, expected)
    else:
        processes(calls, expected, scenario)
    print(runtime.threading_layer(), "ok")


if __name__ == "__main__":
    main(sys.argv[1], "--no-tbb" in sys.argv)
