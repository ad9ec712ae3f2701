"""Corner values against torch: zero windows, NaN, +-inf, signed zeros, cancelling sums.

Each row is pooled by every 1-D op family, forward and backward, on both host back
ends and layouts, in float32 and float64, and compared with torch's result and its
autograd gradient: torch's chain rules decide what a gradient is at 0, at NaN and
at inf (``sign(NaN) = 0``, relu's gradient at 0 is 0, pow(-inf, 0.5) is NaN).
"""

import numpy as np
import pytest

import fastpool
from tests.oracle import fastpool_op, torch_grad, torch_pool

inf, nan = np.inf, np.nan
ROWS = {
    "zeros": [0, 0, 0, 0, 0, 0],
    "nan": [1, nan, -3, 2, nan, nan],
    "inf": [inf, -inf, 1, inf, -inf, -inf],
    "mixed": [-0.0, 0.0, nan, inf, -inf, 5],
    "signed-zeros": [-0.0, 0.0, 0.0, -0.0, -1, -1],
    "cancelling": [1, -1, 2, -2, 3, -3],
}
OPS = [
    ("max_pool", (2,), {}),
    ("max_pool", (3,), dict(stride=1, padding=1)),
    ("max_pool", (2,), dict(stride=1, dilation=2, ceil_mode=True)),
    ("avg_pool", (2,), {}),
    ("avg_pool", (3,), dict(stride=2, padding=1, count_include_pad=False, ceil_mode=True)),
    ("lp_pool", (1.0, 2), {}),
    ("lp_pool", (2.0, 2), {}),
    ("lp_pool", (3.0, 3), dict(stride=2, ceil_mode=True)),
    ("lp_pool", (0.5, 2), {}),
    ("lp_pool", (1.5, 2), {}),
    ("lp_pool", (inf, 2), {}),
    ("adaptive_max_pool", (4,), {}),
    ("adaptive_avg_pool", (4,), {}),
    ("global_max_pool", (), {}),
    ("global_avg_pool", (), {}),
]


def _fastpool_grad(op, x, grad, args, kwargs, **options):
    backward = getattr(fastpool, f"{op}1d_backward")
    if "max" in op:
        _, indices = fastpool_op(op, 1)(x, *args, return_indices=True, **kwargs, **options)
        return backward(grad, indices, x.shape, **options)
    if op == "lp_pool":
        return backward(grad, x, *args, **kwargs, **options)
    if op != "avg_pool":  # adaptive and global: the shapes say it all
        return backward(grad, x.shape, **options)
    return backward(grad, x.shape, *args, **kwargs, **options)


@pytest.mark.parametrize("op, args, kwargs", OPS,
                         ids=[f"{op}{args}{kwargs}" for op, args, kwargs in OPS])
@pytest.mark.parametrize("row", list(ROWS))
def test_corner_values_match_torch(op, args, kwargs, row):
    for dtype in (np.float32, np.float64):
        x = np.array(ROWS[row], dtype)[None, None, :].repeat(2, axis=1)  # (1, 2, 6)
        for channels_last in (False, True):
            if channels_last:
                x = np.ascontiguousarray(np.moveaxis(x, -2, -1))
            want = torch_pool(op, 1, x, *args, channels_last=channels_last, **kwargs)
            grad = np.linspace(-1, 2, want.size).reshape(want.shape).astype(dtype)
            want_grad = torch_grad(op, 1, x, grad, *args, channels_last=channels_last,
                                   **kwargs)
            for backend in ("cpu", "numpy"):
                options = dict(channels_last=channels_last, backend=backend)
                where = f"{dtype.__name__} channels_last={channels_last} {backend}"
                got = fastpool_op(op, 1)(x, *args, **kwargs, **options)
                if "max" in op:
                    np.testing.assert_array_equal(got, want, err_msg=where)
                else:
                    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=where)
                got_grad = _fastpool_grad(op, x, grad, args, kwargs, **options)
                np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6,
                                           err_msg=where)


def test_lp_norm_1_gradient_of_a_zero_window_is_zero():
    # torch.nn.LPPool1d(1, 2) on zeros: the gradient goes through relu(|sum|) at 0.
    x = np.zeros((1, 1, 4))
    for backend in ("cpu", "numpy"):
        grad = fastpool.lp_pool1d_backward(np.ones((1, 1, 2)), x, 1, 2, backend=backend)
        np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_lp_norm_inf_gradient_at_nan_is_zero():
    # torch: max_pool(|x|) backward times sign(x), and torch's sign(NaN) is 0.
    x = np.array([[[1, nan, -3, 2]]])
    for backend in ("cpu", "numpy"):
        grad = fastpool.lp_pool1d_backward(np.ones((1, 1, 2)), x, inf, 2, backend=backend)
        np.testing.assert_array_equal(grad, [[[0, 0, -1, 0]]])
