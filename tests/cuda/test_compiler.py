"""Every CUDA kernel specialisation the public API launches compiles for real.

Under the simulator (CI: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``)
this runs the public API over a grid of calls (every op, forward and backward,
every accepted dtype, both layouts, 1-D to 3-D, with and without indices) and
records the ``(kernel, argument types)`` of every launch through
``fastpool.cuda.backend.launch_hook``, so the list cannot drift from the API.
A separate process without the simulator (``compile_kernels.py``) compiles
each distinct specialisation with NVVM for sm_80 and sm_90 and assembles the
PTX with ``ptxas -v``.  No GPU is needed.  Fails on a compile error, an
unresolved extern (numba-cuda's C++ half-precision shim), a register spill, a
stack frame, a forward kernel over 64 registers, or a 64-bit division or
remainder (``div``/``rem`` ``.s64``/``.u64``) anywhere in the PTX of a 32-bit index
specialisation (``narrow=True``).  Prints the table (``-s``).
"""

import inspect
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import config, typeof, types
from numba.np.numpy_support import from_dtype

import fastpool
from fastpool.cuda import backend, kernels

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM,
                                reason="records launches under the CUDA simulator")

# Every forward kernel: pooling (max, min through the order-reversing maps, sum and Lp,
# fractional, unpooling), GeM's element-wise steps and the convolution.  The bar: at
# most 64 registers in both index widths (4 blocks of 256 threads an SM), with no
# spills (checked for every kernel).  Lp's general pow and the 64-bit convolution
# meet it under the kernels' register cap (kernels._REGISTER_CAP, launch bounds in
# the PTX), which ptxas honours without spilling.
FORWARD_KERNELS = {"max_pool", "sum_pool", "conv_forward", "fractional_max_pool",
                   "unpool_claim", "unpool_write", "gem_powers", "gem_root", "absolute",
                   "negate", "invert", "fill"}
MAX_FORWARD_REGISTERS = 64
DIVISION_64 = re.compile(r"\b(?:div|rem)\.[su]64\b")


def _narrow_argument(row) -> str | None:
    """The type of the row's ``narrow`` argument ("bool": the 32-bit index
    specialisation, "none": the 64-bit one), None for kernels without one."""
    kernel = getattr(kernels, row["kernel"])
    parameters = list(inspect.signature(getattr(kernel, "py_func", None)
                                        or kernel.fn).parameters)
    return row["argtypes"][parameters.index("narrow")] if "narrow" in parameters else None


ROOT = Path(__file__).resolve().parents[2]


def _numba_type(value):
    """The numba type a real launch gives ``value`` (numba.cuda's typeof)."""
    if value is None:
        return types.none
    if isinstance(value, (bool, np.bool_)):
        return types.boolean
    if isinstance(value, tuple):
        return types.UniTuple(_numba_type(value[0]), len(value))
    if hasattr(value, "shape") and hasattr(value, "dtype") and not np.isscalar(value):
        assert value.is_c_contiguous(), "kernels take C-contiguous arrays"
        return types.Array(from_dtype(np.dtype(value.dtype)), len(value.shape), "C")
    return typeof(value)


def _dtypes(mode):
    floats = [np.float16, backend.BFLOAT16, np.float32, np.float64]
    if mode != "max":
        return floats
    return floats + [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                     np.uint64, np.bool_]


def _input(nd, channels_last, dtype):
    shape = (2, 2) + (5,) * nd
    x = np.random.default_rng(0).integers(0, 4, shape).astype(np.float32)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x.astype(dtype)


def _grad(shape, dtype):
    grad = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return grad.astype(dtype if np.dtype(dtype) in backend.FLOAT_DTYPES else np.float32)


def exercise():
    """Call every public CUDA entry point once per dtype, layout and rank."""
    f = fastpool
    for nd in (1, 2, 3):
        for cl in (False, True):
            kw = dict(channels_last=cl, backend="cuda")
            for dtype in _dtypes("max"):
                x = _input(nd, cl, dtype)
                for op, args in ((f"max_pool{nd}d", (3, 2, 1)),
                                 (f"adaptive_max_pool{nd}d", (2,)),
                                 (f"global_max_pool{nd}d", ()),
                                 (f"min_pool{nd}d", (3, 2, 1)),
                                 (f"adaptive_min_pool{nd}d", (2,)),
                                 (f"global_min_pool{nd}d", ())):
                    getattr(f, op)(x, *args, **kw)
                    out, idx = getattr(f, op)(x, *args, return_indices=True, **kw)
                    grad = _grad(out.shape, dtype)
                    backward = getattr(f, f"{op}_backward")
                    backward(grad, idx, x.shape, **kw)
                    if op.startswith(("max", "min")):
                        window = dict(kernel_size=3, stride=2, padding=1)
                        backward(grad, idx, x.shape, **window, **kw)
                    if op.startswith("max_pool"):
                        # launches are skipped: valid indices from the host, not idx
                        zeros = np.zeros(out.shape, np.int64)
                        restored = getattr(f, f"max_unpool{nd}d")(
                            np.zeros(out.shape, x.dtype), zeros, 3, 2, 1, **kw)
                        getattr(f, f"max_unpool{nd}d_backward")(
                            _grad(restored.shape, dtype), zeros, **kw)
                if nd > 1:
                    getattr(f, f"fractional_max_pool{nd}d")(x, 2, 2, seed=0, **kw)
            for dtype in _dtypes("avg"):
                x = _input(nd, cl, dtype)
                for args in ((3, 2, 1), (2,)):
                    out = getattr(f, f"avg_pool{nd}d")(x, *args, **kw)
                    getattr(f, f"avg_pool{nd}d_backward")(_grad(out.shape, dtype), x.shape,
                                                          *args, **kw)
                # p = 1 runs as a sum, 2 as squares, inf as max pooling of |x|; 3 takes
                # the general pow path (a specialisation of its own).
                for norm_type in (1.0, 2.0, 3.0, float("inf")):
                    out = getattr(f, f"lp_pool{nd}d")(x, norm_type, 2, **kw)
                    getattr(f, f"lp_pool{nd}d_backward")(_grad(out.shape, dtype), x,
                                                         norm_type, 2, **kw)
                out = getattr(f, f"adaptive_avg_pool{nd}d")(x, 2, **kw)
                getattr(f, f"adaptive_avg_pool{nd}d_backward")(_grad(out.shape, dtype),
                                                               x.shape, **kw)
                out = getattr(f, f"global_avg_pool{nd}d")(x, **kw)
                getattr(f, f"global_avg_pool{nd}d_backward")(_grad(out.shape, dtype),
                                                             x.shape, **kw)
                for p, size in ((3.0, {}), ([2.0, 4.0], dict(kernel_size=2))):  # GeM
                    out = getattr(f, f"gem_pool{nd}d")(x, p, channels_last=cl,
                                                       backend="cuda", **size)
                    getattr(f, f"gem_pool{nd}d_backward")(_grad(out.shape, dtype), x, p,
                                                          channels_last=cl, backend="cuda",
                                                          **size)
                for mode in ("avgmax", "catavgmax"):  # timm's heads: pair sums, row copies
                    out, idx = getattr(f, f"global_pool{nd}d")(x, mode, return_indices=True,
                                                               **kw)
                    getattr(f, f"global_pool{nd}d_backward")(_grad(out.shape, dtype), idx,
                                                             x.shape, mode, **kw)
                if not cl:  # channels-last convolution is host-only
                    w = np.ones((2, 2) + (2,) * nd, dtype)
                    b = np.ones(2, dtype)
                    out = getattr(f, f"strided_conv{nd}d")(x, w, 2, 1, b, **kw)
                    getattr(f, f"strided_conv{nd}d")(x, w, 2, 1, **kw)
                    getattr(f, f"strided_conv{nd}d_backward")(_grad(out.shape, dtype), x, w,
                                                              2, 1, **kw)


def record_launches(monkeypatch):
    """The distinct (kernel name, argument types) of the launches of :func:`exercise`.

    The launches themselves are skipped (only their types matter, and the
    simulator is slow): results hold garbage, and the index check is off."""
    names = {id(value): name for name, value in vars(kernels).items()}
    launches = {}

    def hook(kernel, arguments):
        name = names[id(kernel)]
        argtypes = tuple(_numba_type(a) for a in arguments)
        launches.setdefault((name, argtypes), None)
        # Arrays of 2**31 elements or more take the 64-bit index specialisation
        # (narrow=None): too big to exercise, so derived from each launch here.
        parameters = list(inspect.signature(getattr(kernel, "py_func", None)
                                            or kernel.fn).parameters)
        if "narrow" in parameters:
            at = parameters.index("narrow")
            wide = argtypes[:at] + (types.none,) + argtypes[at + 1:]
            launches.setdefault((name, wide), None)
        return False

    monkeypatch.setattr(backend._config, "CUDA_CHECK_INDICES", False)
    monkeypatch.setattr(backend, "launch_hook", hook)
    exercise()
    return list(launches)


def _print_register_summary(rows):
    """The most registers and spill bytes per kernel, index width and architecture."""
    summary = {}
    for row in rows:
        width = {"bool": "32", "none": "64"}.get(_narrow_argument(row), "-")
        key = (row["kernel"], width, row["cc"])
        registers, spills = summary.get(key, (0, 0))
        summary[key] = (max(registers, row.get("registers") or 0),
                        spills + (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0))
    print(f"{'kernel':24} {'index':>5} {'arch':6} {'regs':>4} {'spills':>6}")
    for (kernel, width, cc), (registers, spills) in sorted(summary.items()):
        print(f"{kernel:24} {width:>5} {cc:6} {registers:>4} {spills:>6}")


def test_every_launched_specialisation_compiles_without_spills(tmp_path, monkeypatch):
    launches = record_launches(monkeypatch)
    assert {name for name, _ in launches} >= {
        "max_pool", "sum_pool", "output_coefficients", "sum_backward", "max_backward",
        "max_backward_by_plane", "flag_outside_window", "fill", "absolute", "times_sign",
        "conv_forward", "conv_backward_input", "conv_backward_weight", "conv_bias_grad",
        "scaled_sum", "copy_rows", "gem_powers", "gem_root", "gem_output_grads",
        "gem_input_grad"} | FORWARD_KERNELS
    (tmp_path / "launches.pkl").write_bytes(pickle.dumps(launches))
    # Without the simulator, and with the default block size (conftest's small blocks
    # would change the kernels' launch bounds, and so their register cap).
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "FASTPOOL_CUDA_THREADS_PER_BLOCK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_kernels.py")),
         str(tmp_path / "launches.pkl"), str(tmp_path / "report.json"), str(tmp_path / "ptx")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    assert len(rows) == 2 * len(launches)
    narrow_rows = [row for row in rows if _narrow_argument(row) == "bool"]
    assert narrow_rows and all(row.get("ptx_file") for row in narrow_rows), \
        "no 32-bit specialisation's PTX to scan"
    _print_register_summary(rows)
    problems = []
    for row in rows:
        where = f"{row['kernel']} {row['cc']} ({row['signature']})"
        if row["error"]:
            problems.append(f"{where}: {row['error']}")
        elif row["spill_stores"] or row["spill_loads"] or row["stack"]:
            problems.append(f"{where}: spills {row['spill_stores']}/{row['spill_loads']} "
                            f"bytes, stack {row['stack']} bytes")
        elif row["kernel"] in FORWARD_KERNELS and row["registers"] > MAX_FORWARD_REGISTERS:
            problems.append(f"{where}: {row['registers']} registers "
                            f"(at most {MAX_FORWARD_REGISTERS})")
        if _narrow_argument(row) == "bool" and row.get("ptx_file"):
            # The 32-bit index specialisation does all its index arithmetic in 32 bits:
            # a 64-bit division (numba's int32 promotion, a signed modulo, a trip
            # count) is the slow path it exists to avoid.
            found = DIVISION_64.findall(Path(row["ptx_file"]).read_text())
            if found:
                problems.append(f"{where}: 64-bit division in the 32-bit specialisation: "
                                f"{sorted(set(found))} x{len(found)}")
    assert not problems, "\n".join(problems)
