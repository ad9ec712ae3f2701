"""fastpool's benchmark report: fastpool (cpu) against the NumPy reference and torch.

``python -m bench`` runs the quick set (a few seconds once the kernels are
compiled and cached); ``--full`` runs the whole suite (layers of ResNet, DenseNet,
Inception, YOLO, SSD, PSPNet, 3D U-Net, C3D, PointNet, M5, ...).  Each case is
timed forward and backward, channels-first and channels-last, for every back end
in the same run, with torch given fastpool's thread count.  Prints a table (the
min / median / max of each library's timed samples (short calls in batches),
speed-ups from the minima, and
a noise flag where other processes took CPU time during the row), and writes
JSON and a PNG chart.
``--backend cuda`` times the CUDA back end against torch's CUDA pooling instead
(bench/gpu.py: CUDA events, L2 flushed, GB/s and % of peak bandwidth).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import fastpool
from bench import report
from bench.cases import FULL, QUICK
from bench.runner import BACKENDS, copy_bandwidth, kernel_cache_is_cold, measure


def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, file=sys.stderr, leave=False, unit="case")
    except ImportError:
        return None


def _say(progress, line: str) -> None:
    """Print above the progress bar (tqdm's write keeps the bar on the last line)."""
    if progress is not None:
        progress.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the whole suite")
    parser.add_argument("--filter", default="", help="regex on 'op shape' (e.g. 'max_pool2d')")
    parser.add_argument("--direction", choices=("forward", "backward", "both"),
                        default="both")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for fastpool and torch alike (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--json", default="bench-results.json")
    parser.add_argument("--png", default="bench-results.png")
    parser.add_argument("--markdown", default=None,
                        help="also write the report as Markdown (docs/benchmarks.md)")
    parser.add_argument("--compile-cost", action="store_true",
                        help="also time each op's first call, cold and warm cache")
    parser.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU benchmark against torch's CUDA pooling")
    parser.add_argument("--dtype", action="append", choices=("float32", "float16",
                                                             "bfloat16"),
                        help="--backend cuda: dtypes to time (repeatable; float32)")
    args = parser.parse_args(argv)
    args.directions = ("forward", "backward") if args.direction == "both" else \
        (args.direction,)
    args.dtypes = tuple(args.dtype or ("float32",))
    if args.backend == "cuda":
        return _cuda(args)

    import torch
    fastpool.set_num_threads(args.threads)
    torch.set_num_threads(fastpool.get_num_threads())
    directions = ("forward", "backward") if args.direction == "both" else (args.direction,)
    pattern = re.compile(args.filter)
    jobs = [(case, channels_last, direction)
            for case in (FULL if args.full else QUICK)
            if pattern.search(f"{case.label} {'x'.join(map(str, case.shape))} {case.tag}")
            for direction in directions for channels_last in case.layouts]
    backends = tuple(b for b in BACKENDS if not (args.no_numpy and b == "numpy"))

    print(f"fastpool {fastpool.__version__} against torch {torch.__version__}: "
          f"{fastpool.get_num_threads()} threads for both, float32")
    for line in report.legend(args.repeats):
        print(f"  {line}")
    rows = []
    progress = _progress(len(jobs))
    noticed = []

    def compiling(seconds: float) -> None:
        if not noticed:
            noticed.append(seconds)
            _say(progress, f"(a first call took {seconds:.1f} s: numba compiles each kernel "
                           "on first use and caches it on disk for later runs; the warm-up "
                           "call keeps it out of the times)")

    if jobs and kernel_cache_is_cold():
        noticed.append(0.0)
        _say(progress, "first run: compiling kernels (cached for later runs)..."
             if not os.environ.get("FASTPOOL_DISABLE_CACHE") else
             "compiling kernels (FASTPOOL_DISABLE_CACHE is set: every run compiles)...")
    width = report.widths([case for case, _, _ in jobs])
    _say(progress, report.columns(width))
    for case, channels_last, direction in jobs:
        m = measure(case, channels_last, direction, args.repeats, backends, compiling)
        rows.append(report.row(m, copy_bandwidth(m.nbytes)))
        if progress is not None:
            progress.update()
        _say(progress, report.format_row(rows[-1], width))
    if progress is not None:
        progress.close()
    for line in report.summary(rows):
        print(line)
    costs = None
    if args.compile_cost:
        from bench.compile_cost import compile_costs
        costs = compile_costs()
        for name, cost in costs.items():
            print(f"first call of {name}: {cost['cold']:.2f} s cold cache, "
                  f"{cost['warm']:.3f} s warm cache")
    report.write_json(args.json, rows, costs)
    chart = None
    try:
        report.write_chart(args.png, rows)
        chart = args.png
        print(f"wrote {args.json} and {args.png}")
    except ImportError:
        print(f"wrote {args.json} (install matplotlib for the chart)")
    if args.markdown:
        relative = os.path.relpath(chart, os.path.dirname(args.markdown) or ".") if chart \
            else None
        command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
        report.write_markdown(args.markdown, rows, costs, command.strip(), relative)
        print(f"wrote {args.markdown}")
    return rows


def _cuda(args) -> list[dict]:
    from bench import gpu

    pattern = re.compile(args.filter)
    cases = [case for case in (FULL if args.full else QUICK)
             if pattern.search(f"{case.label} {'x'.join(map(str, case.shape))} {case.tag}")]
    if args.json == "bench-results.json":
        args.json = "bench-gpu-results.json"
    return gpu.main(args, cases)


if __name__ == "__main__":
    main()
