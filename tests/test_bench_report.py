"""The benchmark's own logic, on synthetic data: the noise estimate from /proc/stat
samples, the spread of timings, the table's rows, the Markdown and the chart.  No
kernel is timed here (bench/test_bench.py times them under pytest-benchmark)."""

import dataclasses
import json

import numpy as np
import pytest

from bench import noise, report
from bench.cases import FULL, QUICK, Case
from bench.runner import Measurement, spread

STAT = """cpu  {u} 0 {s} {i} 10 0 5 {st} 0 0
cpu0 {u0} 0 {s0} 500 5 0 2 0 0 0
cpu1 {u1} 0 100 {i1} 5 0 3 {st} 0 0
intr 12345 0 0
ctxt 999
"""


def stat(u0=1000, u1=2000, s0=100, i1=500, st=0):
    return STAT.format(u=u0 + u1, s=s0 + 100, i=500 + i1, st=st, u0=u0, u1=u1, s0=s0,
                       i1=i1)


def test_parse_proc_stat_sums_the_chosen_cpus():
    both = noise.parse_proc_stat(stat())
    assert both == noise.CpuTicks(busy=3000 + 200 + 5 + 0, total=3205 + 1000 + 10, cpus=2)
    one = noise.parse_proc_stat(stat(st=7), cpus={1})
    # user 2000 + system 100 + softirq 3 + steal 7; idle 500 and iowait 5 are not busy
    assert one == noise.CpuTicks(busy=2110, total=2615, cpus=1)
    assert noise.parse_proc_stat("intr 1 2 3\n") is None
    assert noise.parse_proc_stat(stat(), cpus={7}) is None


def test_other_load_flags_other_processes_not_our_own_threads():
    before = noise.parse_proc_stat(stat())
    # 2 s of wall time on 2 CPUs; the machine was busy 3.9 s and we used 3.8 s of it.
    quiet = noise.parse_proc_stat(stat(u0=1000 + 195, u1=2000 + 195))
    result = noise.other_load(before, quiet, own_seconds=3.8, wall_seconds=2.0)
    assert result["other_cores"] == pytest.approx(0.05)
    assert not result["flagged"]
    # Someone else kept one core busy for the whole row.
    busy = noise.parse_proc_stat(stat(u0=1000 + 195, u1=2000 + 195, i1=500 - 200))
    busy = dataclasses.replace(busy, busy=busy.busy + 200)
    result = noise.other_load(before, busy, own_seconds=3.8, wall_seconds=2.0)
    assert result["other_cores"] == pytest.approx(1.05)
    assert result["flagged"]
    # Hypervisor steal counts as taken from us too.
    stolen = noise.parse_proc_stat(stat(u0=1000 + 100, u1=2000 + 100, st=80))
    assert noise.other_load(before, stolen, 1.9, 1.0)["flagged"]


def test_other_load_allows_one_tick_per_cpu_on_a_short_row():
    before = noise.parse_proc_stat(stat())
    after = noise.parse_proc_stat(stat(u0=1001, u1=2001))  # 2 ticks = 20 ms
    result = noise.other_load(before, after, own_seconds=0.0, wall_seconds=0.02)
    assert result["other_cores"] == pytest.approx(1.0)  # the raw estimate says a core...
    assert not result["flagged"]  # ...but that is within the counters' granularity
    assert noise.other_load(None, after, 0.0, 1.0) is None
    assert noise.other_load(before, after, 0.0, 0.0) is None


def test_watch_reads_the_file_and_skips_gracefully_without_it(tmp_path):
    path = tmp_path / "stat"
    path.write_text(stat())
    with noise.Watch(str(path)) as watch:
        sum(range(10000))
    assert watch.result == {"other_cores": 0.0, "flagged": False} or \
        watch.result is None  # None only when no CPU of our affinity set is listed
    with noise.Watch(str(tmp_path / "missing")) as watch:
        pass
    assert watch.result is None


def test_spread_of_timings():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["min"], s["q1"], s["median"], s["q3"], s["max"], s["n"]) == \
        (1.0, 2.0, 3.0, 4.0, 5.0, 5)
    assert spread([2.0]) == {"min": 2.0, "q1": 2.0, "median": 2.0, "q3": 2.0, "max": 2.0,
                             "n": 1}


def _measurement(case, channels_last=False, direction="forward", fast=(1e-3, 2e-3, 4e-3),
                 torch=(3e-3, 3e-3, 9e-3), flagged=False):
    samples = {"fastpool": list(fast), "torch": list(torch), "numpy": [0.1]}
    return Measurement(case, channels_last, direction,
                       {k: min(v) for k, v in samples.items()}, nbytes=10**6,
                       samples=samples,
                       noise={"other_cores": 0.6 if flagged else 0.01, "flagged": flagged})


def _rows():
    case_a = Case("max_pool", (2, 3, 8, 8), (2,), tag="net-a")
    case_b = Case("avg_pool", (2, 3, 8, 8), (3, 1, 1), {"count_include_pad": False},
                  tag="net-b-pool-branch")
    rows = []
    for case in (case_a, case_b):
        for direction in ("forward", "backward"):
            for channels_last in (False, True):
                slow = case is case_b and direction == "backward"
                rows.append(report.row(_measurement(
                    case, channels_last, direction,
                    fast=(5e-3, 6e-3, 7e-3) if slow else (1e-3, 2e-3, 4e-3),
                    flagged=channels_last and slow), copy_rate=2e9))
    return rows


def test_row_keeps_the_old_keys_and_adds_the_spread_and_noise():
    r = _rows()[0]
    assert {"op", "shape", "tag", "layout", "direction", "ms", "speedup_vs_torch",
            "speedup_vs_numpy", "gb_per_s", "copy_gb_per_s", "percent_of_copy"} <= set(r)
    assert r["ms"]["fastpool"] == pytest.approx(1.0)  # the minimum, in ms
    assert r["speedup_vs_torch"] == pytest.approx(3.0)  # ratio of the minima
    assert r["speedup_vs_torch_median"] == pytest.approx(1.5)  # 3 ms / 2 ms
    assert r["spread_ms"]["fastpool"] == {"min": 1.0, "q1": 1.5, "median": 2.0, "q3": 3.0,
                                          "max": 4.0, "n": 3}
    assert r["noise"] == {"other_cores": 0.01, "flagged": False}
    assert r["gb_per_s"] == pytest.approx(1.0)
    assert r["percent_of_copy"] == pytest.approx(50)
    json.dumps(r)


def noise_cell_text(r):
    return f"{r['noise']['other_cores']:.2f}"


def test_table_lines_line_up_and_flag_noise():
    rows = _rows()
    width = report.widths(rows)
    header = report.columns(width)
    lines = [report.format_row(r, width) for r in rows]
    for r, line in zip(rows, lines):  # every column lines up, the tag last
        assert line[header.index("tag"):] == r["tag"]
        assert line[:header.index("noise") + 5].rstrip("! ").endswith(noise_cell_text(r))
    assert lines[0].split()[:4] == ["max_pool2d(2)", "2x3x8x8", "cf", "fwd"]
    assert lines[0].split()[4:11] == ["1.00", "2.00", "4.00", "3.00", "3.00", "9.00", "100.0"]
    assert "3.00x" in lines[0]
    assert "0.60!  net-b-pool-branch" in lines[-1]  # the flagged row
    assert lines[0].endswith("0.01   net-a")
    assert report.widths(QUICK)["op"] == max(len(c.label) for c in QUICK)
    text = "\n".join(report.legend(5))
    for needle in ("cf = channels-first", "cl = channels-last", "fwd = forward",
                   "bwd = backward", "> 1 = fastpool faster", "copy%", "min / median / max",
                   "ratio of the minima"):
        assert needle in text


def test_summary_warns_about_a_noisy_run():
    rows = _rows()
    lines = report.summary(rows)
    assert lines[-1].startswith("WARNING: noisy run: 1 of 8 rows flagged")
    quiet = [{**r, "noise": {"other_cores": 0.0, "flagged": False}} for r in rows]
    assert report.summary(quiet)[-1].startswith("noise: no row flagged")
    # A row shorter than a tick reads up to every core without being flagged: the
    # summary of a quiet run does not quote that raw figure as the worst load.
    quiet[0]["noise"] = {"other_cores": 2.0, "flagged": False}
    assert "2.00" not in report.summary(quiet)[-1]
    unmeasured = [{**r, "noise": None} for r in rows]
    assert report.summary(unmeasured)[-1] == \
        "noise: not measured (no /proc/stat on this system)"


def test_markdown_and_json(tmp_path):
    rows = _rows()
    report.write_markdown(tmp_path / "b.md", rows, None, "python -m bench", "b.png")
    text = (tmp_path / "b.md").read_text()
    assert "- vs torch, vs numpy: speed-up, ratio of the minima" in text
    assert "| net-a | max_pool2d(2) | 2x3x8x8 | cf | fwd | 1.00 / 2.00 / 4.00 | " \
           "3.00 / 3.00 / 9.00 | 100.0 | 3.00x | 100.0x |" in text
    assert "0.60! |" in text
    report.write_json(tmp_path / "b.json", rows, None)
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"machine", "rows", "compile_seconds", "speedup_basis"} <= set(data)


def test_markdown_carries_the_dask_guides_figures(tmp_path):
    """docs/benchmarks.md repeats the dask guide's benchmark section (its own command
    writes the figures there); without a guide beside it, just the pointer."""
    report.write_markdown(tmp_path / "b.md", _rows(), None, "python -m bench", None)
    assert "python -m bench.dask" in (tmp_path / "b.md").read_text()
    assert "| 1.26x |" not in (tmp_path / "b.md").read_text()
    (tmp_path / "dask.md").write_text("# dask\n\n## Benchmark\n\n| case | ratio |\n"
                                      "|---|---|\n| pyramid | 1.26x |\n\n## Limits\n\nnone\n")
    report.write_markdown(tmp_path / "b.md", _rows(), None, "python -m bench", None)
    text = (tmp_path / "b.md").read_text()
    assert "| pyramid | 1.26x |" in text and "## Limits" not in text


def test_chart_groups_by_op_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows()
    bars, cases, groups = report.chart_layout(rows)
    assert [g[0] for g in groups] == ["max_pool2d", "avg_pool2d"]
    assert len(cases) == 2 and len(bars) == 8
    assert [(r["direction"], r["layout"]) for _, r in bars[:4]] == [
        ("forward", "channels-first"), ("forward", "channels-last"),
        ("backward", "channels-first"), ("backward", "channels-last")]
    path = tmp_path / "chart.png"
    report.write_chart(path, rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    image = imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 800


def test_suite_cases_name_their_network_and_are_distinct():
    keys = [(c.tag, c.label, c.shape) for c in FULL]
    assert len(set(keys)) == len(keys)
    assert all(c.tag for c in FULL + QUICK)
    assert len([c for c in FULL if any(ch.isdigit() for ch in c.tag)]) >= 10


@pytest.mark.parametrize("case", [c for c in FULL if c.kwargs], ids=lambda c: c.tag)
def test_keyword_cases_backward_matches_torch(case):
    """The runner passes a case's keywords (ceil_mode, count_include_pad) to the
    forward and backward calls of both libraries, on a small input of the same kind."""
    torch = pytest.importorskip("torch")
    from bench.runner import _backward, _forward

    small = dataclasses.replace(case, shape=(2, 3) + (9,) * case.nd)
    for channels_last in small.layouts:
        x = small.make_input(channels_last)
        calls, _ = _forward(small, x, channels_last)
        expected = calls["torch"]()
        expected = expected.movedim(1, -1) if channels_last else expected
        np.testing.assert_allclose(calls["fastpool"](), expected.numpy(), rtol=1e-5,
                                   atol=1e-6)
        calls, _ = _backward(small, x, channels_last)
        (grad,) = calls["torch"]()
        grad = grad.movedim(1, -1) if channels_last else grad
        np.testing.assert_allclose(calls["fastpool"](), grad.numpy(), rtol=1e-5, atol=1e-6)
        assert torch.is_tensor(grad)


def test_compile_events_count_compiles_not_calls():
    """The "compiling" note rests on numba's compile events: a call that compiles counts,
    a later call of the same signature does not."""
    from numba import njit

    from bench.runner import _CompileEvents

    add_one = njit(lambda a: a + 1)
    with _CompileEvents() as events:
        add_one(1)
    assert events.count >= 1
    with _CompileEvents() as events:
        add_one(2)
    assert events.count == 0


@pytest.mark.parametrize("case", [
    Case("min_pool", (2, 3, 9, 9), (3, 2, 1)),
    Case("max_unpool", (2, 3, 5, 4), (2, 2)),
    Case("fractional_max_pool", (2, 3, 12, 12), (3,), {"output_size": 5}),
    Case("gem_pool", (2, 3, 7, 7), (3.0, 1e-6)),
], ids=lambda case: case.op)
@pytest.mark.parametrize("channels_last", [False, True])
def test_new_ops_rows_time_what_torch_computes(case, channels_last):
    """The rows of the newer ops call torch equivalents that give fastpool's results."""
    pytest.importorskip("torch")
    from bench.runner import _backward, _forward
    assert any(row.op == case.op for row in FULL)
    x = case.make_input(channels_last)

    def first(value):
        value = value[0] if isinstance(value, tuple) else value
        value = value.detach().numpy() if hasattr(value, "detach") else value
        return value

    def ours_and_torch(direction):
        calls, _ = (_forward if direction == "forward" else _backward)(case, x,
                                                                      channels_last)
        theirs = first(calls["torch"]())
        return first(calls["fastpool"]()), (np.moveaxis(theirs, 1, -1) if channels_last
                                             else theirs)
    for direction in ("forward", "backward"):
        ours, theirs = ours_and_torch(direction)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_other_load_of_a_row_shorter_than_a_tick_stays_within_the_cpus():
    from bench.noise import CpuTicks, other_load

    # One tick (10 ms) of other work during a 0.2 ms row read as 50 cores.
    load = other_load(CpuTicks(100, 1000, 2), CpuTicks(101, 1002, 2), own_seconds=0.0,
                      wall_seconds=0.0002)
    assert load["other_cores"] == 2.0


def test_copy_yardstick_copies_with_plain_vector_moves():
    """The copy that rows are compared against runs at memcpy's speed: indices LLVM
    cannot prove non-negative made its loop masked gathers and scatters (numba's
    wraparound select), a third of the speed, and every row's copy% three times too
    high."""
    import platform
    import re

    from numba import njit

    from bench._copy import parallel_copy
    from fastpool.cpu.tasks import KERNEL_JIT_OPTIONS

    source = np.arange(1000, dtype=np.float32)
    target = np.zeros_like(source)
    parallel_copy(source, target)
    np.testing.assert_array_equal(target, source)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    fresh = njit(**{**KERNEL_JIT_OPTIONS, "cache": False})(parallel_copy.body.py_func)
    fresh.compile(parallel_copy.body.signatures[0])  # (its builds have no Python wrapper)
    assembly = "\n".join(fresh.inspect_asm().values())
    assert not re.search(r"\t\w*(gather|scatter)", assembly)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_the_torch_model_benchmark_compares_like_with_like(layout):
    """bench.torch_model times one model on fastpool's layers and on torch's: the
    same weights and inputs, and the same outputs and gradients, in either layout."""
    torch = pytest.importorskip("torch")
    from bench.torch_model import small_cnn

    runs = []
    for torch_layers in (False, True):
        model, x, y = small_cnn(layout, torch_layers)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    (ours, our_grads), (theirs, their_grads) = runs
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert len(our_grads) == len(their_grads) == 6
    for got, want in zip(our_grads, their_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
