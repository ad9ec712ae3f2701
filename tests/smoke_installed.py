"""Smoke test of an installed fastpool: the wheel in a fresh environment with only its
runtime dependencies (numba, numpy), run from outside the source tree.

    .ci/wheel-smoke              # builds sdist and wheel, installs the wheel, runs this

Checks that fastpool is imported from the environment's site-packages, calls every
public function once (forward and backward, tiny float32 arrays, forward results
against the NumPy reference), that ``python -m fastpool.precompile --list`` runs, and
that the optional parts, with their extras absent, fail with an error naming the extra
to install.  Prints one line per failed check and exits 1 if any failed.  Not a pytest
module (pytest imports it for doctests only).
"""

import sys
import sysconfig
from pathlib import Path


def _run_ops(fastpool, np, check):
    rng = np.random.default_rng(0)
    called = set()

    def call(name, *args, **kwargs):
        called.add(name)
        return getattr(fastpool, name)(*args, **kwargs)

    def forward(name, x, *args, **kwargs):
        out = call(name, x, *args, **kwargs)
        ref = getattr(fastpool, name)(x, *args, backend="numpy", **kwargs)
        for got, want in zip(out, ref) if isinstance(out, tuple) else [(out, ref)]:
            check(np.allclose(got, want, rtol=1e-5, atol=1e-6), f"{name}: differs from numpy")
        return out

    for nd in (1, 2, 3):
        x = rng.standard_normal((1, 2) + (4,) * nd).astype(np.float32)
        y = forward(f"avg_pool{nd}d", x, 2)
        call(f"avg_pool{nd}d_backward", np.ones_like(y), x.shape, 2)
        y = forward(f"lp_pool{nd}d", x, 2, 2)
        call(f"lp_pool{nd}d_backward", np.ones_like(y), x, 2, 2)
        y = forward(f"adaptive_avg_pool{nd}d", x, 3)
        call(f"adaptive_avg_pool{nd}d_backward", np.ones_like(y), x.shape)
        for extreme in ("max", "min"):
            y, idx = forward(f"{extreme}_pool{nd}d", x, 2, return_indices=True)
            call(f"{extreme}_pool{nd}d_backward", np.ones_like(y), idx, x.shape)
            if extreme == "max":
                restored = call(f"max_unpool{nd}d", y, idx, 2)
                check(restored.shape == x.shape, f"max_unpool{nd}d: shape")
                call(f"max_unpool{nd}d_backward", restored, idx)
            y, idx = forward(f"adaptive_{extreme}_pool{nd}d", x, 3, return_indices=True)
            call(f"adaptive_{extreme}_pool{nd}d_backward", np.ones_like(y), idx, x.shape)
            y, idx = forward(f"global_{extreme}_pool{nd}d", x, return_indices=True)
            call(f"global_{extreme}_pool{nd}d_backward", np.ones_like(y), idx, x.shape)
        if nd > 1:
            y, idx = forward(f"fractional_max_pool{nd}d", x, 2, output_size=2, seed=0,
                             return_indices=True)
            call(f"fractional_max_pool{nd}d_backward", np.ones_like(y), idx, x.shape)
        y = forward(f"gem_pool{nd}d", x)
        call(f"gem_pool{nd}d_backward", np.ones_like(y), x)
        y = forward(f"global_avg_pool{nd}d", x)
        call(f"global_avg_pool{nd}d_backward", np.ones_like(y), x.shape)
        y, idx = forward(f"global_pool{nd}d", x, "catavgmax", return_indices=True)
        call(f"global_pool{nd}d_backward", np.ones_like(y), idx, x.shape, "catavgmax")
        w = rng.standard_normal((3, 2) + (2,) * nd).astype(np.float32)
        y = forward(f"strided_conv{nd}d", x, w)
        grads = call(f"strided_conv{nd}d_backward", np.ones_like(y), x, w)
        check(grads[0].shape == x.shape and grads[1].shape == w.shape,
              f"strided_conv{nd}d_backward: gradient shapes")

    x = rng.standard_normal((3, 4, 4)).astype(np.float32)
    forward("pool", x, "avg", (2, 2))
    forward("adaptive_pool", x, "max", (3, 3))
    call("set_num_threads", 1)
    check(call("get_num_threads") == 1, "get_num_threads after set_num_threads(1)")
    call("set_num_threads", None)
    out = forward("avg_pool2d", np.zeros((1, 1, 1024, 1024), np.float32), 1)  # pooled
    nbytes = out.nbytes
    del out
    check(call("empty_cache") >= nbytes, "empty_cache releases a freed output's buffer")
    missed = set(fastpool.__all__) - called - {"__version__"}
    check(not missed, f"public functions not called by the smoke test: {sorted(missed)}")


def _check_precompile_command(check):
    """The wheel ships ``python -m fastpool.precompile`` (listing its groups compiles
    nothing)."""
    import subprocess
    listed = subprocess.run([sys.executable, "-m", "fastpool.precompile", "--list"],
                            capture_output=True, text=True)
    check(listed.returncode == 0 and listed.stdout.startswith("max "),
          f"python -m fastpool.precompile --list failed: {listed.stderr[-1000:]}")


def _error_names_extra(check, what, extra, action):
    try:
        action()
    except Exception as error:  # noqa: BLE001 - any error is fine if it names the extra
        check(f"fastpool[{extra}]" in str(error),
              f"{what}: the {type(error).__name__} does not name fastpool[{extra}]: {error}")
    else:
        check(False, f"{what}: no error without the {extra} extra")


def main() -> int:
    failures = []

    def check(ok, message):
        if not ok:
            failures.append(message)
            print("FAILED:", message, flush=True)

    import numpy as np

    import fastpool

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(fastpool.__file__).resolve()
    check(site in where.parents, f"fastpool imported from {where}, not from {site}")
    print(f"fastpool {fastpool.__version__} from {where.parent}", flush=True)

    _run_ops(fastpool, np, check)
    _check_precompile_command(check)

    def import_torch_adapter():
        import fastpool.torch  # noqa: F401

    def plot():
        import fastpool.viz
        fastpool.viz.plot_pooling(np.zeros((4, 4)), "max", 2)

    x = np.zeros((1, 1, 4, 4), np.float32)
    for module, extra, what, action in [
            ("torch", "torch", "import fastpool.torch", import_torch_adapter),
            ("matplotlib", "viz", "fastpool.viz.plot_pooling", plot),
            ("numba_cuda", "cuda", 'backend="cuda"',
             lambda: fastpool.max_pool2d(x, 2, backend="cuda"))]:
        try:
            __import__(module)
        except ImportError:
            _error_names_extra(check, what, extra, action)
        else:
            print(f"skipped {what}: {module} is installed", flush=True)

    print(f"smoke test: {len(failures)} failed check(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
