"""Turning measurements into the table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import math
import platform

import fastpool
from bench.noise import THRESHOLD_CORES
from bench.runner import Measurement, spread

SPEEDUP_BASIS = ("ratio of the minima: the other library's fastest timed sample / "
                 "fastpool's")


def legend(repeats: int | None = None) -> list[str]:
    """What the table's columns mean: printed above it and written into the Markdown."""
    runs = f"{repeats} timed samples" if repeats else "the timed samples"
    return [
        f"times in ms: min / median / max of {runs} after a warm-up call, a sample "
        "being one call or, for calls under 2 ms, the mean of a batch of them lasting "
        "about 2 ms (NumPy: one call, no warm-up)",
        "layout: cf = channels-first (N, C, *spatial), cl = channels-last "
        "(N, *spatial, C); dir: fwd = forward, bwd = backward (the input's gradient)",
        f"vs torch, vs numpy: speed-up, {SPEEDUP_BASIS}; > 1 = fastpool faster, "
        "< 1 = slower",
        "GB/s: bytes fastpool's kernels read + write per second (at its minimum time); "
        "memcpy: GB/s of a parallel copy of as many bytes, timed in the same run; "
        "copy%: fastpool's GB/s as % of memcpy's",
        "noise: cores' worth of CPU other processes used while the row ran (/proc/stat); "
        f"'!' = over {THRESHOLD_CORES:g} of a core, the row's times are suspect",
    ]


def widths(items) -> dict:
    """Column widths for the op and shape of these rows or cases (the table is printed
    row by row, so they are fixed from the list of jobs up front; the tag comes last)."""
    widths = {"op": 2, "shape": 5}
    for item in items:
        op, shape = (item["op"], item["shape"]) if isinstance(item, dict) \
            else (item.label, item.shape)
        widths["op"] = max(widths["op"], len(op))
        widths["shape"] = max(widths["shape"], len("x".join(map(str, shape))))
    return widths


_DEFAULT_WIDTHS = {"op": 30, "shape": 18}


def columns(width: dict | None = None) -> str:
    """The printed table's header, aligned with :func:`format_row` for the same widths."""
    w = {k: v + 2 for k, v in (width or _DEFAULT_WIDTHS).items()}
    return (f"{'op':<{w['op']}}{'shape':<{w['shape']}}{'lay':<4}{'dir':<3}"
            f"{'fastpool min/med/max':>21}{'torch min/med/max':>21}{'numpy':>8}"
            f"{'vs torch':>9}{'vs numpy':>9}{'GB/s':>6}{'memcpy':>7}{'copy%':>6}{'noise':>7}"
            "  tag")


COLUMNS = columns()


def _ms(value: float | None, width: int = 6) -> str:
    """About four significant digits of a time in ms, right-aligned."""
    if value is None:
        return f"{'-':>{width}}"
    digits = 3 if value < 1 else 2 if value < 100 else 1 if value < 1000 else 0
    return f"{value:{width}.{digits}f}"


def _layout(r: dict) -> str:
    return "cl" if r["layout"] == "channels-last" else "cf"


def _direction(r: dict) -> str:
    return "fwd" if r["direction"] == "forward" else "bwd"


def noise_cell(r: dict, width: int = 7) -> str:
    noise = r.get("noise")
    if not noise:
        return f"{'-':>{width}}"
    text = f"{noise['other_cores']:.2f}" + ("!" if noise["flagged"] else " ")
    return f"{text:>{width}}"


def row(m: Measurement, copy_rate: float) -> dict:
    s = m.seconds
    rate = m.nbytes / s["fastpool"]
    spreads = {k: {key: (v * 1e3 if key != "n" else v) for key, v in spread(t).items()}
               for k, t in (m.samples or {k: [v] for k, v in s.items()}).items()}
    medians = {k: v["median"] for k, v in spreads.items()}
    return {
        "op": m.case.label, "shape": list(m.case.shape), "tag": m.case.tag,
        "layout": m.layout, "direction": m.direction,
        "ms": {k: v * 1e3 for k, v in s.items()},
        "speedup_vs_torch": s["torch"] / s["fastpool"] if "torch" in s else None,
        "speedup_vs_numpy": s["numpy"] / s["fastpool"] if "numpy" in s else None,
        "gb_per_s": rate / 1e9, "copy_gb_per_s": copy_rate / 1e9,
        "percent_of_copy": 100 * rate / copy_rate,
        # Added: the spread of every back end's timed calls (ms), the speed-up from the
        # medians for comparison, and the other processes' load while the row ran.
        "spread_ms": spreads,
        "speedup_vs_torch_median": medians["torch"] / medians["fastpool"]
        if "torch" in medians else None,
        "noise": m.noise,
    }


def _three(r: dict, backend: str) -> str:
    """min, median and max of a back end's times, 3 + 3 x 6 characters."""
    spread_ms = r.get("spread_ms", {}).get(backend)
    if spread_ms is None:  # rows from before the spread was recorded: the minimum only
        return f"   {_ms(r['ms'].get(backend))}{'':12}"
    return "   " + "".join(_ms(spread_ms[k]) for k in ("min", "median", "max"))


def format_row(r: dict, width: dict | None = None) -> str:
    w = {k: v + 2 for k, v in (width or _DEFAULT_WIDTHS).items()}

    def ratio(value):
        return f"{value:8.2f}x" if value is not None else " " * 8 + "-"

    return (f"{r['op']:<{w['op']}}{'x'.join(map(str, r['shape'])):<{w['shape']}}"
            f"{_layout(r):<4}{_direction(r):<3}{_three(r, 'fastpool')}{_three(r, 'torch')}"
            f"{_ms(r['ms'].get('numpy'), 8)}"
            f"{ratio(r['speedup_vs_torch'])}{ratio(r['speedup_vs_numpy'])}"
            f"{r['gb_per_s']:6.1f}{r['copy_gb_per_s']:7.1f}{r['percent_of_copy']:5.0f}%"
            f"{noise_cell(r)}  {r['tag']}").rstrip()


def geometric_mean(values) -> float:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def summary(rows: list[dict]) -> list[str]:
    """Geometric means and the worst case over the pooling rows (the convolution rows,
    compute-bound products against torch's oneDNN kernels, are summarised apart)."""
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
                     f"at {worst['speedup_vs_torch']:.2f}x"
                     + (f" ({worst['tag']})" if worst.get("tag") else ""))
    if convolutions:
        lines.append(f"strided convolution (direct, register-blocked micro-kernel): geometric-mean "
                     f"{geometric_mean([r['speedup_vs_torch'] for r in convolutions]):.2f}x "
                     f"of torch over {len(convolutions)} rows")
    return lines + noise_summary(rows + convolutions)


def noise_summary(rows: list[dict]) -> list[str]:
    """One line on the machine's quiet: a warning naming how many rows were flagged."""
    measured = [r for r in rows if r.get("noise")]
    if not rows:
        return []
    if not measured:
        return ["noise: not measured (no /proc/stat on this system)"]
    flagged = [r for r in measured if r["noise"]["flagged"]]
    if not flagged:
        # Not the largest raw estimate: a row shorter than a few clock ticks reads one
        # tick of other work as up to every core, which is why it is not flagged.
        return [f"noise: no row flagged (other processes used under {THRESHOLD_CORES:g} "
                "of a core during every row, beyond the counters' one-tick granularity)"]
    worst = max(r["noise"]["other_cores"] for r in flagged)
    return [f"WARNING: noisy run: {len(flagged)} of {len(measured)} rows flagged '!' (other "
            f"processes used over {THRESHOLD_CORES:g} of a core while they ran, up to "
            f"{worst:.2f} cores); rerun them on a quieter machine before trusting them"]


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
        json.dump({"machine": machine(), "rows": rows, "compile_seconds": compile_costs,
                   "speedup_basis": SPEEDUP_BASIS,
                   "noise_threshold_cores": THRESHOLD_CORES}, handle, indent=1)


_COLOURS = {"forward": "#3b7dd8", "backward": "#e0823d"}
_HATCHES = {"channels-first": "", "channels-last": "////"}


def _op_family(r: dict) -> str:
    return r["op"].split("(", 1)[0]


def chart_layout(rows: list[dict]):
    """Rows grouped by op (first-seen order), cases within a group in first-seen order,
    and each case's bars (fwd cf, fwd cl, bwd cf, bwd cl) side by side.

    Returns ``(bars, cases, groups)``: ``bars`` is ``[(y, row)]``, ``cases`` is
    ``[(y_centre, label)]`` and ``groups`` is ``[(name, y_top, y_bottom)]``."""
    families: dict = {}
    for r in rows:
        case = (r.get("tag", ""), r["op"], tuple(r["shape"]))
        families.setdefault(_op_family(r), {}).setdefault(case, []).append(r)
    order = {(d, lay): i for i, (d, lay) in enumerate(
        (d, lay) for d in ("forward", "backward") for lay in ("channels-first",
                                                                "channels-last"))}
    # The convolutions (no speed bar, a different kind of op) go last.
    names = sorted(families, key=lambda name: name.startswith("strided_conv"))
    bars, cases, groups, y = [], [], [], 0.0
    for name in names:
        family = families[name]
        top = y
        y += 1.4  # a row of its own for the group's title
        for (tag, op, shape), members in family.items():
            members = sorted(members, key=lambda r: order.get((r["direction"], r["layout"]), 9))
            first = y
            for r in members:
                bars.append((y, r))
                y += 1
            label = f"{op} {'x'.join(map(str, shape))}" + (f"\n{tag}" if tag else "")
            cases.append(((first + y - 1) / 2, label))
            y += 0.6  # a gap between cases
        groups.append((name, top, y))
        y += 0.4
    return bars, cases, groups


def write_chart(path, rows) -> None:
    """A horizontal bar per row from 1.0x to its speed-up over torch, log x-axis: bars to
    the left of the line are slower than torch, to the right faster.  Colour is the
    direction, hatching the layout; cases are grouped by op under a title each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    rows = [r for r in rows if r.get("speedup_vs_torch")]
    bars, cases, groups = chart_layout(rows)
    height = max(3.0, 0.16 * (bars[-1][0] if bars else 0) + 2.2)
    figure, axes = plt.subplots(figsize=(11, height))
    speedups = [r["speedup_vs_torch"] for _, r in bars]
    low = min(speedups + [1.0]) / 1.8
    high = max(speedups + [1.0]) * 3.0  # room for the value labels
    for y, r in bars:
        value = r["speedup_vs_torch"]
        axes.barh(y, value - 1.0, left=1.0, height=0.85, color=_COLOURS[r["direction"]],
                  hatch=_HATCHES[r["layout"]], edgecolor="white", linewidth=0.4)
        flagged = bool(r.get("noise") and r["noise"].get("flagged"))
        text = f"{value:.2f}x" + (" !" if flagged else "")
        axes.text(value * (1.04 if value >= 1 else 1 / 1.04), y, text, va="center",
                  ha="left" if value >= 1 else "right", fontsize=6)
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    decades = math.log10(high / low)  # label 1-2-5 steps while they fit
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0, 3.0) if decades <= 4.5 else (1.0,)
    axes.xaxis.set_major_locator(LogLocator(subs=subs))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.axvline(1.0, color="black", linewidth=1.2, zorder=3)
    axes.set_yticks([c[0] for c in cases], [c[1] for c in cases], fontsize=6.5)
    axes.tick_params(axis="y", length=0)
    axes.set_ylim(bars[-1][0] + 1 if bars else 1, -0.5)
    across = blended_transform_factory(axes.transAxes, axes.transData)
    for index, (name, top, bottom) in enumerate(groups):
        if index:
            axes.axhline(top - 0.2, color="grey", linewidth=0.6)
        axes.text(0.005, top + 0.5, name, transform=across, fontsize=8, fontweight="bold",
                  va="center", ha="left", zorder=4,
                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    up = blended_transform_factory(axes.transData, axes.transAxes)
    axes.text(1.0 / 1.03, 1.005, "\u2190 slower than torch", ha="right", va="bottom",
              fontsize=8, color="dimgrey", transform=up)
    axes.text(1.03, 1.005, "faster than torch \u2192", ha="left", va="bottom", fontsize=8,
              color="dimgrey", transform=up)
    axes.grid(axis="x", which="major", color="lightgrey", linewidth=0.5)
    axes.set_axisbelow(True)
    axes.set_xlabel("speed-up over torch: torch's fastest call / fastpool's (log scale; "
                    "> 1 = fastpool faster)")
    axes.set_title(f"fastpool {fastpool.__version__} vs torch, float32, "
                   f"{fastpool.get_num_threads()} threads", fontsize=10, pad=16)
    handles = [Patch(facecolor=_COLOURS[d], hatch=_HATCHES[lay], edgecolor="white",
                     label=f"{d}, {lay}")
               for d in ("forward", "backward") for lay in ("channels-first", "channels-last")]
    if any(r.get("noise") and r["noise"].get("flagged") for r in rows):
        handles.append(Patch(color="none", label="! = noisy row (other processes busy)"))
    # Below the axis, where it can hide no bar.
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7,
                  frameon=False)
    figure.tight_layout(rect=(0, 0.35 / height, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def repeats_of(rows: list[dict]) -> int | None:
    counts = [r["spread_ms"]["fastpool"]["n"] for r in rows
              if r.get("spread_ms", {}).get("fastpool")]
    return max(counts) if counts else None


def _markdown_spread(r: dict, backend: str) -> str:
    spread_ms = r.get("spread_ms", {}).get(backend)
    if spread_ms is None:
        value = r["ms"].get(backend)
        return "-" if value is None else _ms(value).strip()
    return " / ".join(_ms(spread_ms[k]).strip() for k in ("min", "median", "max"))


# The dask benchmark is its own command (arrays of gigabytes, generated lazily); its
# figures live with the chunking advice they depend on.
DASK_SECTION = (
    "The dask path (a 2-D average pyramid and a 3-D max pool on arrays of 0.25-2 GB "
    "generated lazily; throughput, peak memory at two sizes, and the ratio to in-memory "
    "fastpool) is timed by `python -m bench.dask --sizes 0.25,1,2 --in-memory-limit 1 "
    "--repeats 2`; its figures and how chunking moves them are in "
    "[the dask guide's benchmark section](dask.md).")


def dask_figures(path) -> list[str]:
    """The figures of the dask guide's "## Benchmark" section (dask.md beside the
    markdown written), so that this page carries them too; none without it."""
    from pathlib import Path

    guide = Path(path).with_name("dask.md")
    if not guide.exists():
        return []
    text = guide.read_text().split("\n## Benchmark\n", 1)
    if len(text) < 2:
        return []
    return ["", text[1].split("\n## ", 1)[0].strip()]


def write_markdown(path, rows, compile_costs, command: str, chart: str | None) -> None:
    """docs/benchmarks.md: the machine, the command, the summary and the full table."""
    info = machine()
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {info['processor']} ({info['machine']}, "
        f"{info['cores']} cores), {info['threads']} threads for fastpool and torch alike, "
        f"Python {info['python']}, "
        f"numba {info['numba']}, fastpool {info['fastpool']}. float32. Every back end is "
        "timed in the same run, row by row, so the speed-ups compare times taken seconds "
        "apart. Speed-ups are computed from the minima (noise on a shared machine only "
        "adds time, so the fastest call is the least disturbed); the median and maximum "
        "show how much the times spread. The machine is shared: rows marked `!` ran while "
        "other processes took CPU time, and even unmarked rows drift, so trust the ratios "
        "more than the milliseconds.",
        "",
        "How to read the table:",
        "",
        *[f"- {line}".replace("*", "\\*") for line in legend(repeats_of(rows))],
        "- tag: the network and layer the shape comes from",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary(rows)],
        "",
    ]
    if chart:
        lines += [f"![speed-up over torch]({chart})", ""]
    lines += ["## Full table", "",
              "| tag | op | shape | layout | dir | fastpool ms (min / med / max) "
              "| torch ms (min / med / max) | numpy ms | vs torch | vs numpy | GB/s "
              "| memcpy GB/s | copy% | noise |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        vs_numpy = f"{r['speedup_vs_numpy']:.1f}x" if r["speedup_vs_numpy"] else "-"
        numpy = f"{ms['numpy']:.1f}" if "numpy" in ms else "-"
        lines.append(
            f"| {r.get('tag', '')} | {r['op']} | {'x'.join(map(str, r['shape']))} | "
            f"{_layout(r)} | {_direction(r)} | {_markdown_spread(r, 'fastpool')} | "
            f"{_markdown_spread(r, 'torch')} | {numpy} | {r['speedup_vs_torch']:.2f}x | "
            f"{vs_numpy} | {r['gb_per_s']:.1f} | {r['copy_gb_per_s']:.1f} | "
            f"{r['percent_of_copy']:.0f}% | {noise_cell(r).strip() or '-'} |")
    if compile_costs:
        lines += ["", "## Compile cost (first call in a fresh process)", "",
                  "On an 8x32x32x32 float32 input, large enough for the kernels to run on "
                  "every thread (`python -m bench.compile_cost`).", "",
                  "| op | empty cache (compiles) | warm on-disk cache |", "|---|---:|---:|"]
        lines += [f"| {name} | {c['cold']:.2f} s | {c['warm']:.3f} s |"
                  for name, c in compile_costs.items()]
    lines += ["", "## Out of core: fastpool.dask", "", DASK_SECTION, *dask_figures(path)]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
