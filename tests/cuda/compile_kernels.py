"""Compile recorded CUDA kernel specialisations for real: NVVM to PTX, then ptxas.

Run by tests/cuda/test_compiler.py in a process *without* the simulator
(``NUMBA_ENABLE_CUDASIM`` unset); no GPU is needed::

    python tests/cuda/compile_kernels.py launches.pkl report.json

``launches.pkl`` holds a list of ``(kernel name, tuple of numba types)``, the
specialisations the public API launched (recorded under the simulator).  Each
is compiled with ``numba.cuda.compile_ptx`` for every ``--cc`` (default 8.0 and
9.0) and the PTX assembled on its own with ``ptxas -arch=sm_XY -v`` (whole
program, so an extern left for a linked library, such as numba-cuda's C++
half-precision shim, is an error).  ``report.json`` lists, per kernel,
signature and architecture: registers, spill bytes, stack, errors, and the
PTX.  Prints a table; the exit status is 0 even on failures (the test judges).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CCS = ((8, 0), (9, 0))


def ptxas_path() -> str | None:
    """ptxas from the nvidia-cuda-nvcc wheel (numba-cuda[cu12]), or from PATH."""
    try:
        import nvidia.cuda_nvcc
        for root in nvidia.cuda_nvcc.__path__:
            candidate = Path(root) / "bin" / "ptxas"
            if candidate.exists():
                return str(candidate)
    except ImportError:
        pass
    return shutil.which("ptxas")


def parse_ptxas(text: str) -> dict:
    registers = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.findall(r"(\d+) bytes stack frame", text)
    return {
        "registers": max(map(int, registers)) if registers else None,
        "spill_stores": sum(int(s) for s, _ in spills),
        "spill_loads": sum(int(load) for _, load in spills),
        "stack": max(map(int, stack)) if stack else 0,
    }


class _DeviceOfLowestCC:
    """Stands in for the current GPU where there is none: numba-cuda compiles a
    device function that is not inlined at the numba IR level (``forceinline``:
    LLVM inlines it) for the current device's compute capability.  The kernel's
    PTX for each architecture comes from the linked module regardless."""

    compute_capability = min(CCS)


def _without_a_gpu() -> None:
    from numba.cuda import cudadrv, dispatcher

    try:
        cudadrv.driver.driver.cuCtxGetCurrent()
    except Exception:  # no driver: compile for the lowest architecture asked for
        dispatcher.get_current_device = _DeviceOfLowestCC


def to_ptx(kernel, argtypes) -> dict:
    """PTX of the kernel ``kernel`` for ``argtypes``, per architecture of CCS.

    numba types and lowers once (numba-cuda's internal ``_compile_pyfunc_with_fixup``,
    as ``compile_ptx`` does) and NVVM then runs once per architecture; falls back
    to ``compile_ptx`` per architecture where that internal is missing."""
    from numba import cuda

    # The kernel's own launch bounds (a register cap, see kernels.LAUNCH_BOUNDS) go
    # into the PTX, so ptxas allocates registers as for the real launch.
    bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup
        library, _ = _compile_pyfunc_with_fixup(kernel.py_func, argtypes, device=False,
                                                cc=min(CCS), abi="numba",
                                                launch_bounds=bounds)
    except ImportError:
        return {cc: cuda.compile_ptx(kernel.py_func, argtypes, cc=cc, launch_bounds=bounds)[0]
                for cc in CCS}
    ptx = {}
    for cc in CCS:
        codes = library.get_asm_strs(cc=cc)
        assert len(codes) == 1, "one PTX module per kernel"
        ptx[cc] = codes[0]
    return ptx


def assemble(ptx: str, cc, ptxas: str, workdir: Path, tag: str) -> dict:
    result = {"cc": f"sm_{cc[0]}{cc[1]}", "error": None}
    path = workdir / f"{tag}_{result['cc']}.ptx"
    path.write_text(ptx)
    result["ptx_file"] = str(path)
    run = subprocess.run([ptxas, f"-arch={result['cc']}", "-v", str(path), "-o", os.devnull],
                         capture_output=True, text=True)
    text = run.stdout + run.stderr
    result.update(parse_ptxas(text))
    if run.returncode != 0:
        result["error"] = f"ptxas: {text.strip()[-2000:]}"
    return result


def compile_launches(numbered, ptxas: str | None, keep: str) -> list[dict]:
    """Rows for the (number, (kernel name, argtypes)) in ``numbered``."""
    from fastpool.cuda import kernels

    _without_a_gpu()
    rows = []
    for number, (name, argtypes) in numbered:
        kernel = getattr(kernels, name)
        signature = ", ".join(str(t) for t in argtypes)
        try:
            ptx = to_ptx(kernel, argtypes)
        except Exception as error:  # typing or lowering failure
            ptx, failure = {}, f"NVVM: {type(error).__name__}: {error}"[:2000]
        for cc in CCS:
            if cc in ptx and ptxas:
                row = assemble(ptx[cc], cc, ptxas, Path(keep), f"{number:03d}_{name}")
            else:
                row = {"cc": f"sm_{cc[0]}{cc[1]}",
                       "error": failure if cc not in ptx else "ptxas not found"}
            row.update(kernel=name, signature=signature,
                       argtypes=[str(t) for t in argtypes])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source, target = Path(argv[0]), Path(argv[1])
    keep = Path(argv[2]) if len(argv) > 2 else Path(tempfile.mkdtemp(prefix="fastpool-ptx-"))
    keep.mkdir(parents=True, exist_ok=True)
    assert not os.environ.get("NUMBA_ENABLE_CUDASIM"), "run without the simulator"
    ptxas = ptxas_path()
    launches = list(enumerate(pickle.loads(source.read_bytes())))
    # Lowering (numba's typing) is most of the time: split the launches over up to
    # FASTPOOL_COMPILE_WORKERS processes (default 2, the CI machine's cores).
    workers = max(1, min(int(os.environ.get("FASTPOOL_COMPILE_WORKERS", "2")),
                         os.cpu_count() or 1, len(launches)))
    if workers == 1:
        rows = compile_launches(launches, ptxas, str(keep))
    else:
        import concurrent.futures
        import multiprocessing
        chunks = [launches[k::workers] for k in range(workers)]
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(compile_launches, chunks, [ptxas] * workers,
                                  [str(keep)] * workers))
        rows = sorted((row for part in parts for row in part),
                      key=lambda row: (row.get("ptx_file") or "", row["kernel"]))
    target.write_text(json.dumps(rows, indent=1))
    print(f"{'kernel':24} {'arch':6} {'regs':>4} {'spill st/ld':>11}  signature")
    for row in rows:
        spills = f"{row.get('spill_stores', '-')}/{row.get('spill_loads', '-')}"
        print(f"{row['kernel']:24} {row['cc']:6} {row.get('registers') or '-':>4} "
              f"{spills:>11}  {row['signature'][:150]}"
              + (f"\n    ERROR {row['error'][:300]}" if row["error"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
