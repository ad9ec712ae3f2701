"""examples/pooling_experiments.py runs (its --quick mode) and reports what it says."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


def test_pooling_experiments_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pooling_experiments.py"), "--quick",
         "--figure", "hierarchy.png"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for row in ("max + GAP", "avg + GAP", "strided conv + GAP", "max + GeM",
                "hand-written (unfold + amax)", "torch.nn.MaxPool2d"):
        assert row in out
    rows = re.findall(r"^\S.* \+ \S+ +(\d+) +([0-9.]+) +([0-9.]+)$", out, re.M)
    accuracies = [float(row[1]) for row in rows]
    assert len(accuracies) == 4 and max(accuracies) > 0.3  # better than chance (0.1)
    assert (tmp_path / "hierarchy.png").stat().st_size > 1000
