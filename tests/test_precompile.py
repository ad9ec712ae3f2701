"""python -m fastpool.precompile: its command line, its plan and its Python API.

The runs compile one small group (unpool, float64); the kernels may already be in
numba's cache, so these check what the command says, not how long it takes.
"""

import os
import re
import subprocess
import sys

import pytest

from fastpool import precompile as pc


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastpool.precompile", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_list_names_every_group():
    done = run("--list")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert listed == list(pc.GROUPS)
    assert "max_unpool2d(x, i0, 2)" in run("--list", "-v").stdout


def test_unknown_group_is_an_argparse_error():
    done = run("--ops", "max,maxx")
    assert done.returncode == 2
    assert "argument --ops: unknown op group 'maxx' (choose from max, avg," in done.stderr, \
        done.stderr


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float32,float8"], "argument --dtypes: unknown dtype 'float8'"),
    (["--layouts", "sideways"], "argument --layouts: unknown layout 'sideways'"),
    (["--ops", "avg", "--dtypes", "int64"], "nothing to compile"),
])
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        pc.main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_compiles_one_group_into_numba_cache_dir(tmp_path):
    done = run("--ops", "unpool", "--dtypes", "float64", "--layouts", "last",
               env={"NUMBA_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    # Progress without a terminal: a line per step, on stderr.
    assert "[1/1] unpool: forward; backward (float64, channels-last)" in done.stderr
    summary = done.stdout
    assert "fastpool.precompile: 1 call in" in summary, summary
    compiled = re.search(r"left (\d+) kernel specialisations in numba's cache \((\d+) "
                         r"compiled now, 0 already cached\)", summary)
    assert compiled and int(compiled[1]) == int(compiled[2]) > 0, summary
    assert "  unpool " in summary and "  max " not in summary
    assert f"numba's cache: {tmp_path}" in summary and "(NUMBA_CACHE_DIR)" in summary
    assert any(name.endswith(".nbi") for _, _, names in os.walk(tmp_path) for name in names)


def test_refuses_when_the_cache_is_off():
    done = run("--ops", "unpool", env={"FASTPOOL_DISABLE_CACHE": "1"})
    assert done.returncode == 1 and "FASTPOOL_DISABLE_CACHE" in done.stderr, done.stderr


def test_import_fastpool_does_not_import_it():
    code = "import sys, fastpool; print('fastpool.precompile' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_python_api_returns_seconds_per_group(capsys):
    seconds = pc.precompile(ops="unpool", dtypes=["float64"], progress=False)
    assert list(seconds) == ["unpool"] and seconds["unpool"] >= 0
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="unknown op group 'nope'"):
        pc.precompile(ops=["nope"])


def test_plan():
    full = pc.plan()
    assert {task.case.group for task in full} == set(pc.GROUPS)
    assert {task.dtype for task in full} == {"float32", "float64"}
    # Half types run on the float32 kernels; integer dtypes on the max-family ones.
    assert pc.plan(dtypes="float16,bfloat16,float32") == pc.plan(dtypes="float32")
    ints = pc.plan(dtypes="int64")
    assert ints and all(task.case.ints for task in ints)
    assert {task.case.group for task in ints} == {"max", "adaptive", "global", "min",
                                                  "unpool", "fractional"}
    # --layouts keeps the rows to the layouts asked for; some rows are channels-last only.
    last = pc.plan(layouts="channels_last")
    assert {task.layout for task in last} == {"last"}
    assert {task.case for task in last} == {c for c in pc.CASES if "last" in c.layouts}
    assert {task.case for task in pc.plan(layouts="first")} == \
        {c for c in pc.CASES if "first" in c.layouts}

def test_cases_call_public_functions():
    import fastpool
    for case in pc.CASES:
        assert case.group in pc.GROUPS
        assert case.forward.startswith("y")
        called = set(re.findall(r"\b(\w+)\(", f"{case.forward}; {case.backward or ''}"))
        assert called - {"ones", "copy"} <= set(fastpool.__all__), case
