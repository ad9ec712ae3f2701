"""Every forward op against torch (the oracle) and the NumPy reference.

Each test computes the op with every host back end and checks it against
torch: exact for max values and indices, rtol 1e-5 (float32) or 1e-12
(float64) for averages, in both layouts, batched and unbatched, 1-D to 3-D.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from tests.conftest import make_input
from tests.oracle import fastpool_op, torch_pool

BACKENDS = ("cpu", "numpy")
NDS = (1, 2, 3)
TOLERANCE = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
             np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13)}


def _per_nd(values, nd):
    return tuple(values[-nd:])


def sliding_cases(nd, *, dilation):
    """(input size, kwargs) rows of the sweep table, for ``nd`` spatial axes."""
    cases = [
        ("k2", 8, dict(kernel_size=2)),
        ("k3s2p1", 9, dict(kernel_size=3, stride=2, padding=1)),
        ("ceil-partial-window", 10, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
        ("ceil-drops-window-in-padding", 5,
         dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
        ("kernel-equals-input", 5, dict(kernel_size=5)),
        ("padding-half-kernel", 7, dict(kernel_size=4, stride=3, padding=2)),
        ("stride-over-kernel", 10, dict(kernel_size=2, stride=3)),
        ("kernel-1", 4, dict(kernel_size=1)),
        ("anisotropic", _per_nd((7, 9, 8), nd),
         dict(kernel_size=_per_nd((3, 2, 4), nd), stride=_per_nd((2, 1, 3), nd),
              padding=_per_nd((1, 0, 2), nd), ceil_mode=True)),
    ]
    if dilation:
        cases += [
            ("dilation-2", 11, dict(kernel_size=3, stride=1, padding=1, dilation=2)),
            ("dilation-ceil", 9, dict(kernel_size=2, stride=2, dilation=2, ceil_mode=True)),
            # The window (-1, 2) holds no element of a size-2 input: torch gives -inf.
            ("dilation-empty-window", 2, dict(kernel_size=2, stride=1, padding=1, dilation=3)),
        ]
    return cases


def _table(op_dilation):
    return [pytest.param(nd, size, kwargs, id=f"{nd}d-{name}")
            for nd in NDS for name, size, kwargs in sliding_cases(nd, dilation=op_dilation)]


layouts = pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
batching = pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
float_dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64],
                                       ids=["f32", "f64"])


def assert_matches(got, want, backend, exact):
    """Same shape and dtype, C-contiguous, and equal (exact) or within TOLERANCE."""
    assert got.shape == want.shape, backend
    assert got.dtype == want.dtype, backend
    assert got.flags.c_contiguous, backend
    if exact:
        assert_array_equal(got, want, err_msg=backend)
    else:
        assert_allclose(got, want, err_msg=backend, **TOLERANCE[got.dtype])


def check_all_backends(op, nd, x, *args, exact, **kwargs):
    expected = torch_pool(op, nd, x, *args, **kwargs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for backend in BACKENDS:
        result = fastpool_op(op, nd)(x, *args, backend=backend, **kwargs)
        result = result if isinstance(result, tuple) else (result,)
        assert len(result) == len(expected)
        for got, want in zip(result, expected):
            assert_matches(got, want, backend, exact)


@layouts
@batching
@pytest.mark.parametrize("nd, size, kwargs", _table(op_dilation=True))
def test_max_pool(nd, size, kwargs, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, ties=True)
    check_all_backends("max_pool", nd, x, exact=True, return_indices=True,
                       channels_last=channels_last, **kwargs)
    check_all_backends("max_pool", nd, x, exact=True, channels_last=channels_last, **kwargs)


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, kwargs", _table(op_dilation=False))
@pytest.mark.parametrize("avg_kwargs", [
    dict(), dict(count_include_pad=False), dict(divisor_override=3),
    dict(divisor_override=-2, count_include_pad=False)],
    ids=["include-pad", "exclude-pad", "divisor-3", "divisor-neg"])
def test_avg_pool(nd, size, kwargs, avg_kwargs, dtype, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    check_all_backends("avg_pool", nd, x, exact=False, channels_last=channels_last,
                       **kwargs, **avg_kwargs)


def _lp_table():
    rows = []
    for nd in NDS:
        for name, size, kwargs in sliding_cases(nd, dilation=False):
            if not kwargs.get("padding"):
                kwargs = {k: v for k, v in kwargs.items() if k != "padding"}
                rows.append(pytest.param(nd, size, kwargs, id=f"{nd}d-{name}"))
    return rows


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, kwargs", _lp_table())
@pytest.mark.parametrize("norm_type", [1, 2, 3, 1.5])
def test_lp_pool(nd, size, kwargs, norm_type, dtype, channels_last, batched, rng):
    # Mixed signs: at norm_type 1 a negative sum survives, at 1.5 and 3 it gives NaN.
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    check_all_backends("lp_pool", nd, x, norm_type, exact=False,
                       channels_last=channels_last, **kwargs)


ADAPTIVE_CASES = [
    ("divisible", 8, 4), ("non-divisible", 13, 7), ("larger-than-input", 5, 8),
    ("to-1", 7, 1), ("same", 6, 6),
]


def _adaptive_table():
    rows = [pytest.param(nd, size, out, id=f"{nd}d-{name}")
            for nd in NDS for name, size, out in ADAPTIVE_CASES]
    rows += [pytest.param(nd, _per_nd((5, 9, 6), nd), _per_nd((None, 4, 5), nd),
                          id=f"{nd}d-none-keeps-size") for nd in (2, 3)]
    rows += [pytest.param(nd, _per_nd((11, 6, 13), nd), _per_nd((3, 4, 5), nd),
                          id=f"{nd}d-anisotropic") for nd in (2, 3)]
    return rows


@layouts
@batching
@pytest.mark.parametrize("nd, size, output_size", _adaptive_table())
def test_adaptive_max_pool(nd, size, output_size, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, ties=True)
    check_all_backends("adaptive_max_pool", nd, x, output_size, exact=True,
                       return_indices=True, channels_last=channels_last)


@layouts
@batching
@float_dtypes
@pytest.mark.parametrize("nd, size, output_size", _adaptive_table())
def test_adaptive_avg_pool(nd, size, output_size, dtype, channels_last, batched, rng):
    x = make_input(rng, nd, size, batched=batched, channels_last=channels_last, dtype=dtype)
    check_all_backends("adaptive_avg_pool", nd, x, output_size, exact=False,
                       channels_last=channels_last)


@layouts
@batching
@pytest.mark.parametrize("nd", NDS)
@pytest.mark.parametrize("keepdims", [False, True], ids=["flat", "keepdims"])
def test_global_pools(nd, keepdims, channels_last, batched, rng):
    x = make_input(rng, nd, _per_nd((5, 6, 7), nd), batched=batched,
                   channels_last=channels_last, dtype=np.float64)
    check_all_backends("global_max_pool", nd, x, exact=True, keepdims=keepdims,
                       return_indices=True, channels_last=channels_last)
    check_all_backends("global_avg_pool", nd, x, exact=False, keepdims=keepdims,
                       channels_last=channels_last)
    want = (2, 3) if batched else (3,)
    assert fastpool_op("global_avg_pool", nd)(x, channels_last=channels_last).shape == want


INTEGER_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                  np.uint64, np.bool_]


@layouts
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: np.dtype(d).name)
def test_max_on_integer_dtypes(dtype, channels_last, rng):
    x = make_input(rng, 2, (7, 9), channels_last=channels_last, dtype=dtype)
    kwargs = dict(return_indices=True, channels_last=channels_last)
    check_all_backends("max_pool", 2, x, 3, 2, 1, exact=True, **kwargs)
    check_all_backends("max_pool", 2, x, 2, 1, 1, 2, True, exact=True, **kwargs)
    check_all_backends("adaptive_max_pool", 2, x, (3, 4), exact=True, **kwargs)
    check_all_backends("global_max_pool", 2, x, exact=True, **kwargs)


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint64], ids=str)
def test_max_integer_extremes(dtype, rng):
    info = np.iinfo(dtype)
    x = rng.choice(np.array([info.min, info.max, 0, 1], dtype), size=(2, 3, 6, 6))
    for backend in BACKENDS:
        out, idx = __import__("fastpool").max_pool2d(x, 3, 1, 1, return_indices=True,
                                                     backend=backend)
        # Every window is non-empty, so the result is the true window maximum.
        windows = np.lib.stride_tricks.sliding_window_view(
            np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=info.min),
            (3, 3), axis=(2, 3))
        assert_array_equal(out, windows.max(axis=(-2, -1)))
        assert_array_equal(np.take_along_axis(x.reshape(2, 3, -1), idx.reshape(2, 3, -1), -1),
                           out.reshape(2, 3, -1))


@layouts
@pytest.mark.parametrize("nd", NDS)
def test_nan_and_inf(nd, channels_last, rng):
    x = make_input(rng, nd, _per_nd((7, 8, 9), nd), channels_last=channels_last, ties=True)
    special = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=x.shape)
    x = np.where(rng.random(x.shape) < 0.15, special, x).astype(np.float32)
    kw = dict(channels_last=channels_last)
    check_all_backends("max_pool", nd, x, 3, 2, 1, exact=True, return_indices=True, **kw)
    check_all_backends("max_pool", nd, x, 2, 1, 0, 2, exact=True, return_indices=True, **kw)
    # Without indices, interior windows take the vectorised sweep.
    check_all_backends("max_pool", nd, x, 3, 1, 1, exact=True, **kw)
    check_all_backends("max_pool", nd, x, 2, 1, 0, 2, exact=True, **kw)
    check_all_backends("adaptive_max_pool", nd, x, 3, exact=True, return_indices=True, **kw)
    check_all_backends("global_max_pool", nd, x, exact=True, return_indices=True, **kw)
    check_all_backends("avg_pool", nd, x, 3, 2, 1, exact=False, **kw)
    check_all_backends("adaptive_avg_pool", nd, x, 3, exact=False, **kw)
    check_all_backends("lp_pool", nd, x, 2, 2, exact=False, **kw)


def test_all_minus_inf_window_keeps_first_index():
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    x[0, 0, 3, 3] = 1.0
    for backend in BACKENDS:
        out, idx = __import__("fastpool").max_pool2d(x, 2, return_indices=True,
                                                     backend=backend)
        assert_array_equal(out[0, 0], [[-np.inf, -np.inf], [-np.inf, 1.0]])
        assert_array_equal(idx[0, 0], [[0, 2], [8, 15]])


# (kernel, stride, dilation): the constant-stride interior sweeps of the
# channels-first kernels, their stride-1 sweep (also dilated) and the generic one.
INTERIOR_SWEEPS = [(2, 2, 1), (3, 2, 1), (3, 3, 1), (4, 4, 1), (3, 1, 1), (6, 1, 1),
                   (3, 1, 2), (5, 4, 1), (2, 3, 2)]


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("kernel, stride, dilation", INTERIOR_SWEEPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
@pytest.mark.parametrize("separable", [False, True], ids=["direct", "separable"])
def test_interior_sweeps(nd, kernel, stride, dilation, dtype, separable, rng, monkeypatch):
    # Padding 1 and a ragged end leave edge windows on both sides of the interior;
    # ties, NaN and -inf check torch's max rules inside the vectorised sweeps.
    from fastpool.cpu import pooling
    monkeypatch.setattr(pooling, "SEPARABLE_MIN_WINDOW", 1 if separable else 10**9)
    x = make_input(rng, nd, 23, ties=True, dtype=dtype)
    if x.dtype.kind == "f":
        x[rng.random(x.shape) < 0.05] = np.nan
        x[rng.random(x.shape) < 0.05] = -np.inf
    kwargs = dict(kernel_size=kernel, stride=stride, padding=1, dilation=dilation)
    check_all_backends("max_pool", nd, x, exact=True, **kwargs)
    if dilation == 1 and x.dtype.kind == "f":
        y = make_input(rng, nd, 23, dtype=dtype)
        kwargs.pop("dilation")
        check_all_backends("avg_pool", nd, y, exact=False, **kwargs)
        kwargs.pop("padding")
        check_all_backends("lp_pool", nd, np.abs(y), 2, exact=False, **kwargs)


@pytest.fixture
def separable_everywhere(monkeypatch):
    """Route every window through the separable CPU kernels (normally large ones only)."""
    from fastpool.cpu import pooling
    monkeypatch.setattr(pooling, "SEPARABLE_MIN_WINDOW", 1)


@layouts
@pytest.mark.parametrize("nd, size, kwargs", _table(op_dilation=True))
def test_separable_kernels(nd, size, kwargs, channels_last, rng, separable_everywhere):
    x = make_input(rng, nd, size, channels_last=channels_last, ties=True)
    kw = dict(channels_last=channels_last, backend="cpu", **kwargs)
    want = torch_pool("max_pool", nd, x, return_indices=True, channels_last=channels_last,
                      **kwargs)
    got = fastpool_op("max_pool", nd)(x, return_indices=True, **kw)
    assert_array_equal(got[0], want[0])
    assert_array_equal(got[1], want[1])
    if "dilation" not in kwargs:
        y = make_input(rng, nd, size, channels_last=channels_last, dtype=np.float64)
        assert_allclose(fastpool_op("avg_pool", nd)(y, **kw),
                        torch_pool("avg_pool", nd, y, channels_last=channels_last, **kwargs),
                        **TOLERANCE[y.dtype])
    if "dilation" not in kwargs and not kwargs.get("padding"):
        lp_kwargs = {k: v for k, v in kwargs.items() if k != "padding"}
        y = np.abs(make_input(rng, nd, size, channels_last=channels_last, dtype=np.float64))
        assert_allclose(fastpool_op("lp_pool", nd)(y, 3, channels_last=channels_last,
                                                   backend="cpu", **lp_kwargs),
                        torch_pool("lp_pool", nd, y, 3, channels_last=channels_last,
                                   **lp_kwargs), **TOLERANCE[y.dtype])


@layouts
@pytest.mark.parametrize("nd, size, output_size", _adaptive_table())
def test_separable_adaptive_and_nan(nd, size, output_size, channels_last, rng,
                                    separable_everywhere):
    x = make_input(rng, nd, size, channels_last=channels_last, ties=True)
    x = np.where(rng.random(x.shape) < 0.1, np.nan, x).astype(np.float32)
    x = np.where(rng.random(x.shape) < 0.1, -np.inf, x).astype(np.float32)
    kw = dict(channels_last=channels_last)
    want = torch_pool("adaptive_max_pool", nd, x, output_size, return_indices=True, **kw)
    got = fastpool_op("adaptive_max_pool", nd)(x, output_size, True, backend="cpu", **kw)
    assert_array_equal(got[0], want[0])
    assert_array_equal(got[1], want[1])
    assert_allclose(fastpool_op("adaptive_avg_pool", nd)(x, output_size, backend="cpu", **kw),
                    torch_pool("adaptive_avg_pool", nd, x, output_size, **kw), rtol=1e-5,
                    atol=1e-6)
