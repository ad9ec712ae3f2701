"""Bad input raises ValueError or TypeError naming the argument and the value."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastpool
import fastpool.cuda

X1 = np.zeros((2, 3, 8), np.float32)
X2 = np.zeros((2, 3, 8, 8), np.float32)
X3 = np.zeros((1, 2, 4, 4, 4), np.float32)

# (call, exception, regex the message must match)
BAD_CALLS = [
    # wrong ndim for the op
    (lambda: fastpool.max_pool2d(np.zeros((8, 8)), 2), ValueError, r"max_pool2d.*\(8, 8\)"),
    (lambda: fastpool.max_pool1d(X3, 2), ValueError, r"max_pool1d.*\(1, 2, 4, 4, 4\)"),
    (lambda: fastpool.avg_pool3d(X2[0], 2), ValueError, r"avg_pool3d.*\(3, 8, 8\)"),
    (lambda: fastpool.adaptive_avg_pool2d(np.float32(1.0), 1), ValueError, r"shape \(\)"),
    (lambda: fastpool.global_max_pool2d(np.zeros(5)), ValueError, r"shape \(5,\)"),
    (lambda: fastpool.pool(np.zeros(5), "max", (2, 2)), ValueError, r"pool.*\(5,\)"),
    (lambda: fastpool.max_pool2d(X2[0, 0], 2, channels_last=True), ValueError, r"\(8, 8\)"),
    # kernel, stride, dilation <= 0; negative or excessive padding
    (lambda: fastpool.max_pool2d(X2, 0), ValueError, r"kernel_size.*\(0, 0\)"),
    (lambda: fastpool.max_pool2d(X2, (2, -1)), ValueError, r"kernel_size.*\(2, -1\)"),
    (lambda: fastpool.avg_pool1d(X1, 2, 0), ValueError, r"stride.*\(0,\)"),
    (lambda: fastpool.max_pool3d(X3, 2, dilation=0), ValueError, r"dilation.*\(0, 0, 0\)"),
    (lambda: fastpool.max_pool2d(X2, 3, padding=-1), ValueError, r"padding.*\(-1, -1\)"),
    (lambda: fastpool.max_pool2d(X2, 3, padding=2), ValueError,
     r"padding=\(2, 2\).*kernel_size=\(3, 3\)"),
    (lambda: fastpool.avg_pool1d(X1, 2, padding=2), ValueError, r"padding=\(2,\)"),
    # output size < 1
    (lambda: fastpool.max_pool2d(X2, 9), ValueError, r"output size \(0, 0\)"),
    (lambda: fastpool.max_pool1d(X1, 4, dilation=3), ValueError, r"output size \(0,\)"),
    # tuples of the wrong length, non-integer sizes
    (lambda: fastpool.max_pool2d(X2, (2, 2, 2)), ValueError, r"kernel_size.*\(2, 2, 2\)"),
    (lambda: fastpool.avg_pool3d(X3, 2, (1, 2)), ValueError, r"stride.*\(1, 2\)"),
    (lambda: fastpool.max_pool2d(X2, 2.5), TypeError, r"kernel_size.*2\.5"),
    (lambda: fastpool.max_pool2d(X2, (2, 2.0)), TypeError, r"kernel_size.*2\.0"),
    (lambda: fastpool.max_pool2d(X2, "2"), TypeError, r"kernel_size.*'2'"),
    (lambda: fastpool.max_pool2d(X2, True), TypeError, r"kernel_size.*True"),
    (lambda: fastpool.avg_pool2d(X2, 2, padding=None), TypeError, r"padding.*None"),
    (lambda: fastpool.max_pool2d(X2, 2, ceil_mode="yes"), TypeError, r"ceil_mode.*'yes'"),
    (lambda: fastpool.max_pool2d(X2, 2, channels_last=1), TypeError, r"channels_last.*1"),
    # unknown mode or backend; options of another mode
    (lambda: fastpool.pool(X2, "median", (2, 2)), ValueError, r"mode.*'median'"),
    (lambda: fastpool.pool(X2, "max", 2), TypeError, r"kernel_size.*2"),
    (lambda: fastpool.max_pool2d(X2, 2, backend="gpu"), ValueError, r"backend.*'gpu'"),
    (lambda: fastpool.max_pool2d(X2, 2, backend="cuda"), ValueError, r"backend='cuda'"),
    (lambda: fastpool.adaptive_pool(X2, "lp", (2, 2)), ValueError, r"mode.*'lp'"),
    (lambda: fastpool.pool(X2, "avg", (2, 2), dilation=2), ValueError, r"dilation=\(2, 2\)"),
    (lambda: fastpool.pool(X2, "avg", (2, 2), return_indices=True), ValueError,
     r"return_indices=True"),
    (lambda: fastpool.pool(X2, "max", (2, 2), divisor_override=2), ValueError,
     r"divisor_override=2"),
    (lambda: fastpool.pool(X2, "lp", (2, 2), padding=1, norm_type=2), ValueError,
     r"padding=\(1, 1\)"),
    (lambda: fastpool.pool(X2, "max", (2, 2), norm_type=2), ValueError, r"norm_type=2"),
    # norm_type <= 0, divisor_override 0
    (lambda: fastpool.lp_pool2d(X2, 0, 2), ValueError, r"norm_type.*0"),
    (lambda: fastpool.lp_pool1d(X1, -1.5, 2), ValueError, r"norm_type.*-1\.5"),
    (lambda: fastpool.lp_pool1d(X1, -float("inf"), 2), ValueError, r"norm_type.*-inf"),
    (lambda: fastpool.lp_pool1d(X1, float("nan"), 2), ValueError, r"norm_type.*nan"),
    (lambda: fastpool.lp_pool1d(X1, "2", 2), TypeError, r"norm_type.*'2'"),
    (lambda: fastpool.pool(X2, "lp", (2, 2)), TypeError, r"norm_type.*None"),
    (lambda: fastpool.avg_pool2d(X2, 2, divisor_override=0), ValueError, r"divisor_override.*0"),
    (lambda: fastpool.avg_pool2d(X2, 2, divisor_override=1.5), TypeError,
     r"divisor_override.*1\.5"),
    # output_size <= 0, wrong length
    (lambda: fastpool.adaptive_avg_pool2d(X2, 0), ValueError, r"output_size.*\(0, 0\)"),
    (lambda: fastpool.adaptive_max_pool1d(X1, -2), ValueError, r"output_size.*\(-2,\)"),
    (lambda: fastpool.adaptive_max_pool3d(X3, (2, 2)), ValueError, r"output_size.*\(2, 2\)"),
    (lambda: fastpool.adaptive_avg_pool2d(X2, (2, "a")), TypeError, r"output_size.*'a'"),
    (lambda: fastpool.adaptive_avg_pool2d(X2, 2, return_indices=True), TypeError,
     r"return_indices"),
    # empty spatial axes
    (lambda: fastpool.max_pool2d(np.zeros((1, 1, 0, 4)), 1), ValueError, r"\(1, 1, 0, 4\)"),
    # dtypes
    (lambda: fastpool.avg_pool2d(X2.astype(np.int32), 2), TypeError, r"dtype int32"),
    (lambda: fastpool.max_pool2d(X2.astype(np.float16), 2), TypeError, r"dtype float16"),
    (lambda: fastpool.max_pool2d(X2.astype(np.complex64), 2), TypeError, r"dtype complex64"),
    (lambda: fastpool.lp_pool2d(X2.astype(bool), 2, 2), TypeError, r"dtype bool"),
    (lambda: fastpool.adaptive_avg_pool2d(X2.astype(np.uint8), 2), TypeError, r"dtype uint8"),
    (lambda: fastpool.max_pool1d(np.array([["a", "b"]]), 1), TypeError, r"dtype <U1"),
    # non-array input
    (lambda: fastpool.max_pool2d(None, 2), TypeError, r"x must be an array.*NoneType"),
    (lambda: fastpool.max_pool1d({"a": 1}, 2), TypeError, r"x must be an array.*dict"),
    (lambda: fastpool.max_pool1d([[1.0, 2.0], [3.0]], 1), TypeError, r"x must be an array.*list"),
    (lambda: fastpool.global_avg_pool2d(X2, keepdims="no"), TypeError, r"keepdims.*'no'"),
    # sizes beyond int32 (torch's limit too) name the op and argument, not OverflowError
    (lambda: fastpool.max_pool2d(X2, 2, stride=2**70), ValueError,
     r"max_pool2d: stride .*1180591620717411303424"),
    (lambda: fastpool.avg_pool1d(X1, 2**40), ValueError,
     r"avg_pool1d: kernel_size .*1099511627776"),
    (lambda: fastpool.max_pool3d(X3, 2, dilation=(1, 1, -2**63)), ValueError,
     r"max_pool3d: dilation .*-9223372036854775808"),
    (lambda: fastpool.adaptive_max_pool2d(X2, (2, 2**31)), ValueError,
     r"adaptive_max_pool2d: output_size .*2147483648"),
    # a CUDA stream given to a host back end is a mistake, not silently ignored
    (lambda: fastpool.max_pool2d(X2, 2, stream=object()), ValueError,
     r"max_pool2d: stream=<object.* host"),
    (lambda: fastpool.avg_pool2d_backward(X2[:, :, :4, :4], X2.shape, 2, stream=1),
     ValueError, r"avg_pool2d_backward: stream=1 .* host"),
    (lambda: fastpool.strided_conv1d(X1, np.ones((1, 3, 2), np.float32), stream=1),
     ValueError, r"strided_conv1d: stream=1"),
]


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("call, error, pattern", BAD_CALLS,
                         ids=[f"bad-{i}" for i in range(len(BAD_CALLS))])
def test_bad_calls_raise_clear_errors(call, error, pattern, backend, monkeypatch):
    # Route every call through the chosen back end (the default is "cpu").
    from fastpool import _dispatch
    monkeypatch.setattr(_dispatch, "_BACKEND_MODULES",
                        {**_dispatch._BACKEND_MODULES, "cpu": _dispatch._BACKEND_MODULES[backend]})
    with pytest.raises(error, match=pattern):
        call()


def test_gpu_array_without_a_gpu_is_a_clear_error():
    # This test process has no GPU and no simulator: the CUDA back end says so.
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (1, 1, 4), "typestr": "<f4", "version": 3}

    with pytest.raises(ValueError, match="backend='cuda' needs"):
        fastpool.max_pool1d(FakeDeviceArray(), 2)
    with pytest.raises(ValueError, match="runs on the host"):
        fastpool.max_pool1d(FakeDeviceArray(), 2, backend="cpu")
    assert fastpool.cuda.is_available() is False


def test_set_num_threads_takes_numpy_integers():
    try:
        fastpool.set_num_threads(np.int64(1))
        assert fastpool.get_num_threads() == 1
        assert type(fastpool.get_num_threads()) is int
    finally:
        fastpool.set_num_threads(None)


def _run_without(module: str, code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import module`` fails."""
    program = f"import sys; sys.modules[{module!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("simulator", ["0", "1"])
def test_cuda_backend_without_numba_cuda_names_the_extra(simulator):
    # numba 0.68 still ships a deprecated numba.cuda of its own: without numba-cuda it
    # imports, and once said "no GPU, try NUMBA_ENABLE_CUDASIM=1", which then failed.
    done = _run_without("numba_cuda", """
import numpy as np, fastpool, fastpool.cuda
assert fastpool.cuda.is_available() is False
try:
    fastpool.max_pool2d(np.zeros((1, 1, 4, 4)), 2, backend="cuda")
except ValueError as error:
    print(error)
""", NUMBA_ENABLE_CUDASIM=simulator)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max_pool2d: backend='cuda' needs the numba-cuda package" in done.stdout
    assert 'pip install "fastpool[cuda]"' in done.stdout


def test_fastpool_torch_without_torch_names_the_extra():
    done = _run_without("torch", "import fastpool.torch")
    assert done.returncode != 0
    assert 'ImportError: fastpool.torch needs PyTorch, which is not installed: pip install ' \
        '"fastpool[torch]"' in done.stderr
