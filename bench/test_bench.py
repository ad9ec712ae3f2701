"""pytest-benchmark tests from the same table as the report.

    python -m pytest bench --benchmark-enable --benchmark-group-by=group

Each case is benchmarked for fastpool, the NumPy reference and torch, grouped
by ``op|shape|layout|direction`` so that pytest-benchmark compares them side by
side.  The main test run does not collect this folder; with the default
``--benchmark-disable`` each benchmark runs once as a smoke test.
"""

import pytest

from bench.cases import FULL, QUICK
from bench.runner import BACKENDS, _backward, _forward

CASES = [pytest.param(case, channels_last, direction,
                      id=f"{case.tag}-{case.label}-{'cl' if channels_last else 'cf'}-{direction}")
         for case in (FULL if __import__("os").environ.get("FASTPOOL_BENCH_FULL") else QUICK)
         for channels_last in case.layouts for direction in ("forward", "backward")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, channels_last, direction", CASES)
def test_pooling(benchmark, case, channels_last, direction, backend):
    import torch

    import fastpool
    torch.set_num_threads(fastpool.get_num_threads())
    benchmark.group = (f"{case.label}|{'x'.join(map(str, case.shape))}|"
                       f"{'cl' if channels_last else 'cf'}|{direction}")
    x = case.make_input(channels_last)
    calls, _ = (_forward if direction == "forward" else _backward)(case, x, channels_last)
    benchmark(calls[backend])
