"""Was the machine quiet while a row was timed?

Linux counts, per CPU, the clock ticks spent busy in ``/proc/stat``.  Read before
and after a row, the busy ticks of the CPUs this process may run on, less the CPU
time this process used meanwhile (``time.process_time``: all its threads, so
fastpool's and torch's workers count as ours), is what *other* processes (and the
hypervisor, through the ``steal`` column) took from us.  Divided by the row's wall
time it is a number of cores: 0.25 means other work kept a quarter of one core busy.

The counters move in ticks (``SC_CLK_TCK``, usually 100 per second) per CPU, so a
row shorter than a few ticks cannot be judged finely; :func:`other_load` allows one
tick per CPU of slack before it flags a row.  Elsewhere than Linux (no
``/proc/stat``) nothing is measured and nothing is flagged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

#: Flag a row when other processes used more than this many cores on average.
THRESHOLD_CORES = 0.25

# /proc/stat's per-CPU columns: user nice system idle iowait irq softirq steal guest
# guest_nice.  Busy is every column but idle and iowait; guest time is already part
# of user and nice, so it is not added twice.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
_IDLE_COLUMNS = (3, 4)


@dataclass(frozen=True)
class CpuTicks:
    """Busy and total ticks summed over a set of CPUs, at one moment."""

    busy: int
    total: int
    cpus: int


def parse_proc_stat(text: str, cpus=None) -> CpuTicks | None:
    """The busy and total ticks of ``cpus`` (CPU numbers; all of them when None: the
    aggregate ``cpu`` line) from the text of ``/proc/stat``; None if it has none."""
    aggregate = None
    busy = total = count = 0
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *fields = line.split()
        values = [int(v) for v in fields[:10]]
        values += [0] * (10 - len(values))
        ticks = (sum(values[i] for i in _BUSY_COLUMNS),
                 sum(values[i] for i in _BUSY_COLUMNS + _IDLE_COLUMNS))
        if name == "cpu":
            aggregate = ticks
        elif cpus is None or int(name[3:]) in cpus:
            busy, total, count = busy + ticks[0], total + ticks[1], count + 1
    if cpus is None:
        return None if aggregate is None else CpuTicks(*aggregate, max(count, 1))
    return CpuTicks(busy, total, count) if count else None


def read_proc_stat(path: str = "/proc/stat", cpus=None) -> CpuTicks | None:
    try:
        with open(path) as handle:
            return parse_proc_stat(handle.read(), cpus)
    except (OSError, ValueError):
        return None


def other_load(before: CpuTicks | None, after: CpuTicks | None, own_seconds: float,
               wall_seconds: float, ticks_per_second: float = 100,
               threshold: float = THRESHOLD_CORES) -> dict | None:
    """Cores other processes kept busy between two samples, and whether that is noise.

    ``own_seconds`` is the CPU time this process used between the samples,
    ``wall_seconds`` the time between them.  Returns ``{"other_cores": float,
    "flagged": bool}``, or None when either sample is missing.  ``other_cores`` is
    the estimate, between 0 and the CPU count (a row shorter than a tick can
    otherwise read as dozens of cores); the flag allows one tick per CPU of counter
    granularity before comparing with ``threshold``.
    """
    if before is None or after is None or wall_seconds <= 0:
        return None
    busy_seconds = (after.busy - before.busy) / ticks_per_second
    other = busy_seconds - own_seconds
    slack = after.cpus / ticks_per_second
    return {"other_cores": min(max(other, 0.0) / wall_seconds, float(after.cpus)),
            "flagged": (other - slack) / wall_seconds > threshold}


def _allowed_cpus():
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


class Watch:
    """Measures :func:`other_load` over a ``with`` block (``.result`` afterwards)."""

    def __init__(self, path: str = "/proc/stat", threshold: float = THRESHOLD_CORES):
        self.path, self.threshold, self.result = path, threshold, None
        self.cpus = _allowed_cpus()
        try:
            self.hz = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.hz = 100

    def __enter__(self):
        self._before = read_proc_stat(self.path, self.cpus)
        self._own, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        own, wall = time.process_time() - self._own, time.perf_counter() - self._wall
        after = read_proc_stat(self.path, self.cpus)
        self.result = other_load(self._before, after, own, wall, self.hz, self.threshold)
        return False
