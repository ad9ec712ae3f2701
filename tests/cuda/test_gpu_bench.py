"""What of the GPU benchmark can be checked without a GPU: the command line, the
result rows, the Markdown summaries and the session collector, on fake data."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_command_line_selects_the_gpu_benchmark(monkeypatch):
    import bench.__main__ as entry
    from bench import gpu

    seen = {}
    monkeypatch.setattr(gpu, "main", lambda args, cases: seen.update(args=args, cases=cases))
    entry.main(["--backend", "cuda", "--filter", "max_pool2d", "--dtype", "bfloat16",
                "--direction", "forward"])
    assert seen["cases"] and all(c.name == "max_pool2d" for c in seen["cases"])
    assert seen["args"].dtypes == ("bfloat16",)
    assert seen["args"].directions == ("forward",)
    assert seen["args"].json == "bench-gpu-results.json"


def test_rows_and_markdown_on_fake_timings():
    from bench import gpu
    from bench.cases import QUICK

    case = QUICK[0]
    row = gpu.row(case, True, "forward", "float32", {"fastpool": 1e-3, "torch": 2e-3},
                  nbytes=2_000_000_000, peak=4.0e12)
    assert row["fastpool_GBps"] == pytest.approx(2000)
    assert row["fastpool_peak_pct"] == pytest.approx(50)
    assert row["torch_peak_pct"] == pytest.approx(25)
    assert row["speedup_vs_torch"] == pytest.approx(2)
    text = gpu.markdown([row, gpu.row(case, False, "backward", "bfloat16",
                                      {"fastpool": 1e-3, "torch": 1e-3}, 10, None)], "H200")
    assert "| channels-last | forward | float32 | 1.000 | 2000 | 50 | 2.000 | 1000 | 25 | 2.00 |" \
        in text
    assert "Geometric mean speed-up over torch: 1.41x over 2 cases." in text


def test_session_summary_on_fake_results(tmp_path):
    from bench import gpu_summary

    (tmp_path / "steps.jsonl").write_text(
        '{"step": "tests", "rc": 0, "seconds": 100}\n'
        '{"step": "sanitizer-memcheck", "rc": 0, "seconds": 90}\n'
        '{"step": "bench", "rc": 1, "seconds": 5}\n')
    (tmp_path / "tests.log").write_text("....\n===== 300 passed in 99.0s =====\n")
    (tmp_path / "device.log").write_text("NVIDIA H200 cc (9, 0)")
    (tmp_path / "bench.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": []}))
    session = gpu_summary.main([str(tmp_path)])
    assert not session["ok"]  # the benchmark step failed
    assert session["steps"][0]["summary"] == "300 passed in 99.0s"
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | 0 | 100 | 300 passed in 99.0s |" in summary
    assert "Overall: FAILED" in summary
    assert json.loads((tmp_path / "session.json").read_text())["device"].startswith("NVIDIA")


def test_session_script_parses():
    script = ROOT / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
