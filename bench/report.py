"""Turning measurements into the table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import math
import platform

import fastpool
from bench.runner import Measurement

COLUMNS = (f"{'op':<30}{'shape':<22}{'layout':<7}{'dir':<5}{'fastpool':>10}{'numpy':>10}"
           f"{'torch':>10}{'vs torch':>10}{'vs numpy':>10}{'GB/s':>7}{'copy':>7}{'% copy':>8}")


def row(m: Measurement, copy_rate: float) -> dict:
    s = m.seconds
    rate = m.nbytes / s["fastpool"]
    return {
        "op": m.case.label, "shape": list(m.case.shape), "tag": m.case.tag,
        "layout": m.layout, "direction": m.direction,
        "ms": {k: v * 1e3 for k, v in s.items()},
        "speedup_vs_torch": s["torch"] / s["fastpool"] if "torch" in s else None,
        "speedup_vs_numpy": s["numpy"] / s["fastpool"] if "numpy" in s else None,
        "gb_per_s": rate / 1e9, "copy_gb_per_s": copy_rate / 1e9,
        "percent_of_copy": 100 * rate / copy_rate,
    }


def format_row(r: dict) -> str:
    ms = r["ms"]

    def cell(key, width, digits):
        return f"{ms[key]:{width}.{digits}f}" if key in ms else " " * (width - 1) + "-"

    def ratio(value):
        return f"{value:9.2f}x" if value is not None else " " * 9 + "-"

    return (f"{r['op']:<30}{'x'.join(map(str, r['shape'])):<22}"
            f"{'cl' if r['layout'] == 'channels-last' else 'cf':<7}{r['direction'][:3]:<5}"
            f"{cell('fastpool', 10, 2)}{cell('numpy', 10, 1)}{cell('torch', 10, 2)}"
            f"{ratio(r['speedup_vs_torch'])}{ratio(r['speedup_vs_numpy'])}"
            f"{r['gb_per_s']:7.1f}{r['copy_gb_per_s']:7.1f}{r['percent_of_copy']:7.0f}%")


def geometric_mean(values) -> float:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def summary(rows: list[dict]) -> list[str]:
    """Geometric means and the worst case over the pooling rows (the convolution rows,
    im2col and BLAS against torch's oneDNN kernels, are summarised apart)."""
    lines = []
    convolutions = [r for r in rows if r["op"].startswith("strided_conv")]
    rows = [r for r in rows if not r["op"].startswith("strided_conv")]
    for layout in ("channels-first", "channels-last"):
        for direction in ("forward", "backward"):
            chosen = [r["speedup_vs_torch"] for r in rows
                      if r["layout"] == layout and r["direction"] == direction]
            if chosen:
                lines.append(f"geometric-mean speed-up over torch, {layout} {direction}: "
                             f"{geometric_mean(chosen):.2f}x over {len(chosen)} cases")
    if rows:
        worst = min(rows, key=lambda r: r["speedup_vs_torch"] or float("inf"))
        lines.append(f"worst case: {worst['op']} {worst['layout']} {worst['direction']} "
                     f"at {worst['speedup_vs_torch']:.2f}x")
    if convolutions:
        lines.append(f"strided convolution (im2col + BLAS GEMM): geometric-mean "
                     f"{geometric_mean([r['speedup_vs_torch'] for r in convolutions]):.2f}x "
                     f"of torch over {len(convolutions)} rows")
    return lines


def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import os

    import numba
    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": _processor(), "cores": os.cpu_count(),
            "threads": fastpool.get_num_threads(), "numba": numba.__version__,
            "fastpool": fastpool.__version__}


def write_json(path, rows, compile_costs) -> None:
    with open(path, "w") as handle:
        json.dump({"machine": machine(), "rows": rows, "compile_seconds": compile_costs},
                  handle, indent=1)


def write_chart(path, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {'x'.join(map(str, r['shape']))} "
              f"{'cl' if r['layout'] == 'channels-last' else 'cf'} {r['direction'][:3]}"
              for r in rows]
    speedups = [r["speedup_vs_torch"] for r in rows]
    colors = [{"forward": "#3b7dd8", "backward": "#e0823d"}[r["direction"]] for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    axes.barh(range(len(rows)), speedups, color=colors)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xscale("log")
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("speed-up over torch (time_torch / time_fastpool, log scale)")
    axes.set_title(f"fastpool {fastpool.__version__} vs torch, float32, "
                   f"{fastpool.get_num_threads()} threads (blue forward, orange backward)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_markdown(path, rows, compile_costs, command: str, chart: str | None) -> None:
    """docs/benchmarks.md: the machine, the command, the summary and the full table."""
    info = machine()
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {info['processor']} ({info['machine']}, "
        f"{info['cores']} cores), {info['threads']} threads for fastpool and torch alike, "
        f"Python {info['python']}, "
        f"numba {info['numba']}, fastpool {info['fastpool']}. float32. Times are the best "
        "of several runs after a warm-up (the NumPy reference: one run). Speed-ups are "
        "`time_torch / time_fastpool` and `time_numpy / time_fastpool` from the same run; "
        "GB/s counts the bytes fastpool's kernels read plus write, and `% copy` compares "
        "that with a parallel copy of the same number of bytes timed in the same run. "
        "The machine is shared and noisy: trust the ratios more than the milliseconds.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary(rows)],
        "",
    ]
    if chart:
        lines += [f"![speed-up over torch]({chart})", ""]
    lines += ["## Full table", "",
              "| op | shape | layout | dir | fastpool ms | numpy ms | torch ms | vs torch "
              "| vs numpy | GB/s | copy GB/s | % copy |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        vs_numpy = f"{r['speedup_vs_numpy']:.1f}x" if r["speedup_vs_numpy"] else "-"
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | "
            f"{'cl' if r['layout'] == 'channels-last' else 'cf'} | {r['direction']} | "
            f"{ms['fastpool']:.2f} | {ms.get('numpy', float('nan')):.1f} | "
            f"{ms['torch']:.2f} | {r['speedup_vs_torch']:.2f}x | {vs_numpy} | "
            f"{r['gb_per_s']:.1f} | {r['copy_gb_per_s']:.1f} | {r['percent_of_copy']:.0f}% |")
    if compile_costs:
        lines += ["", "## Compile cost (first call in a fresh process)", "",
                  "| op | empty cache (compiles) | warm on-disk cache |", "|---|---:|---:|"]
        lines += [f"| {name} | {c['cold']:.2f} s | {c['warm']:.3f} s |"
                  for name, c in compile_costs.items()]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
