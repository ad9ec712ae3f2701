"""Collect a GPU session's results (bench/gpu_session.sh) into one JSON and Markdown.

    python -m bench.gpu_summary gpu-session

Reads ``steps.jsonl`` (each step's exit status and time), ``device.log``, the
benchmark's ``bench.json`` and the pytest summary lines of each step's log;
writes ``session.json`` and ``summary.md`` in the same folder.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _tail_summary(log: Path) -> str:
    """The last pytest summary line ("12 passed, 1 failed in 3.2s") or the log's tail."""
    if not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error)", line):
            return line.strip("= ")
    return lines[-1] if lines else ""


def collect(folder: Path) -> dict:
    steps = []
    if (folder / "steps.jsonl").exists():
        for line in (folder / "steps.jsonl").read_text().splitlines():
            if line.strip():
                step = json.loads(line)
                step["summary"] = _tail_summary(folder / f"{step['step']}.log")
                steps.append(step)
    bench = json.loads((folder / "bench.json").read_text()) \
        if (folder / "bench.json").exists() else None
    device = (folder / "device.log").read_text().strip() \
        if (folder / "device.log").exists() else ""
    return {"device": device, "steps": steps, "bench": bench,
            "ok": bool(steps) and all(s.get("rc") in (0, None) for s in steps)}


def markdown(session: dict) -> str:
    from bench.gpu import markdown as bench_markdown

    lines = [f"# GPU session: {session['device'] or 'unknown device'}", "",
             f"Overall: {'OK' if session['ok'] else 'FAILED'}", "",
             "| step | exit status | seconds | summary |", "|---|---:|---:|---|"]
    for step in session["steps"]:
        rc = "skipped" if step.get("skipped") else step.get("rc")
        lines.append(f"| {step['step']} | {rc} | {step.get('seconds', '')} | "
                     f"{step.get('summary') or step.get('skipped', '')} |")
    text = "\n".join(lines) + "\n"
    if session["bench"]:
        text += "\n" + bench_markdown(session["bench"]["rows"], session["bench"]["device"])
    return text


def main(argv=None) -> dict:
    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    session = collect(folder)
    (folder / "session.json").write_text(json.dumps(session, indent=1))
    (folder / "summary.md").write_text(markdown(session))
    print(f"wrote {folder / 'session.json'} and {folder / 'summary.md'}")
    return session


if __name__ == "__main__":
    main()
