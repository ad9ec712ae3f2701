"""The documentation says what is true: its examples run and the site builds.

- ``pycon`` blocks of docs/*.md run as doctests in the main test run (pytest's
  ``--doctest-glob='*.md'`` over docs/), as do the docstrings' examples.
- ``python`` blocks of README.md and docs/*.md run here: the blocks of one page in
  order, in one namespace (a later block may use an earlier block's names).  A page
  whose examples use the CUDA back end runs in a subprocess on numba's CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is imported).
- The README's test command is the one CI runs (.ci/run), after .ci/wheel-smoke.
- The API reference lists every public function.
- The documentation site builds with warnings as errors.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# ``` fences with their info string, and the blocks they open.
_FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
# Info strings a page may use; anything else (say "py") would silently not run.
_KNOWN = {"python", "pycon", "bash", "dockerfile", "{eval-rst}", "{toctree}"}
# Doctests run only from docs/ (pytest's testpaths); README.md has none.
_DOCTEST_PAGES = {p for p in PAGES if p.parent == DOCS}


def fenced_blocks(page):
    """(info string, first line number of the code, code) of each fenced block of a
    page (a path) or of a text."""
    text = page.read_text() if isinstance(page, Path) else page
    for match in _FENCE.finditer(text):
        yield match[1], text.count("\n", 0, match.start(2)) + 1, match[2]


def python_blocks(page: Path):
    return [(line, code) for info, line, code in fenced_blocks(page) if info == "python"]


def _uses_cuda(blocks) -> bool:
    return any(re.search(r"\bcuda\b", code) for _, code in blocks)


# Runs blocks given as JSON [[filename, first_line, code], ...] in one namespace; each
# block is compiled padded to its line in the page, so a traceback names the page's line.
_RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for filename, line, code in json.loads(sys.stdin.read()):
    exec(compile("\\n" * (line - 1) + code, filename, "exec"), namespace)
"""


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_fences_are_known(page):
    for info, line, _ in fenced_blocks(page):
        assert info in _KNOWN, f"{page.name}:{line}: a ```{info} block is neither run nor known"
        if info == "pycon":
            assert page in _DOCTEST_PAGES, f"{page.name}:{line}: pycon here is not doctested"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    blocks = [[str(page), line, code] for line, code in python_blocks(page)]
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    if not _uses_cuda(python_blocks(page)):
        namespace = {"__name__": "__main__"}
        for filename, line, code in blocks:
            exec(compile("\n" * (line - 1) + code, filename, "exec"), namespace)
        return
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks),
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    after = readme.split("**Run the test suite**", 1)[1]
    command = next(code for info, _, code in fenced_blocks(after) if info == "bash")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == command.strip(), "README's test command is not .ci/run's last line"
    assert "bash .ci/wheel-smoke" in ci, ".ci/run no longer checks the wheel"


def test_api_reference_lists_every_public_function():
    import fastpool
    listed = set(re.findall(r"^ {3}(\S+)$", (DOCS / "api.md").read_text(), re.M))
    assert set(fastpool.__all__) - {"__version__"} <= listed


def test_docs_build_without_warnings(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    for page in ("index", "getting-started", "user-guide", "tutorial", "api", "benchmarks",
                 "generated/fastpool.max_pool2d", "generated/fastpool.strided_conv2d",
                 "generated/fastpool.viz.plot_pooling"):
        assert (tmp_path / "html" / f"{page}.html").stat().st_size > 1000
