"""The documentation site builds with warnings as errors.

The pages' own examples run as doctests in the main test run (pytest's
``--doctest-glob='*.md'`` over docs/), as do the docstrings' examples.
"""

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


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
