"""Input handling: strides, byte order, read-only, empty, lists, the generic entries."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import fastpool
from tests.conftest import make_input

BACKENDS = ("cpu", "numpy")


def _views(x):
    """The same values as ``x`` in awkward memory layouts."""
    doubled = np.repeat(x, 2, axis=-1)
    big_endian = x.astype(x.dtype.newbyteorder(">"))
    read_only = x.copy()
    read_only.flags.writeable = False
    return {
        "strided": doubled[..., ::2],
        "fortran": np.asfortranarray(x),
        "negative-strides": x[..., ::-1, :][..., ::-1, :],
        "big-endian": big_endian,
        "read-only": read_only,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_any_strides_byte_order_and_read_only(backend, channels_last, rng):
    x = make_input(rng, 2, (9, 10), channels_last=channels_last, ties=True)
    kwargs = dict(channels_last=channels_last, backend=backend)
    want_max = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True, **kwargs)
    want_avg = fastpool.avg_pool2d(x, 3, 2, 1, **kwargs)
    for name, view in _views(x).items():
        before = view.copy()
        got = fastpool.max_pool2d(view, 3, 2, 1, return_indices=True, **kwargs)
        assert_array_equal(got[0], want_max[0], err_msg=name)
        assert_array_equal(got[1], want_max[1], err_msg=name)
        assert got[0].flags.c_contiguous and got[0].dtype.isnative, name
        assert_allclose(fastpool.avg_pool2d(view, 3, 2, 1, **kwargs), want_avg, rtol=1e-6,
                        err_msg=name)
        assert_array_equal(view, before, err_msg=f"{name}: input was written")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, channels_last, want", [
    ((0, 3, 8, 8), False, (0, 3, 4, 4)),
    ((2, 0, 8, 8), False, (2, 0, 4, 4)),
    ((0, 8, 8, 3), True, (0, 4, 4, 3)),
    ((2, 8, 8, 0), True, (2, 4, 4, 0)),
])
def test_empty_batch_or_channels(shape, channels_last, want, backend):
    x = np.zeros(shape, np.float32)
    out, idx = fastpool.max_pool2d(x, 2, return_indices=True, channels_last=channels_last,
                                   backend=backend)
    assert out.shape == idx.shape == want and out.dtype == np.float32
    assert idx.dtype == np.int64
    assert fastpool.avg_pool2d(x, 2, channels_last=channels_last).shape == want
    assert fastpool.adaptive_avg_pool2d(x, 3, channels_last=channels_last).shape == (
        want[:1] + ((3, 3, want[3]) if channels_last else (want[1], 3, 3)))


def test_python_lists_are_converted():
    x = [[[1.0, 5.0, 2.0, 0.0]]]
    assert_array_equal(fastpool.max_pool1d(x, 2), np.array([[[5.0, 2.0]]]))
    assert fastpool.max_pool1d(x, 2).dtype == np.float64


def test_size_one_spatial_axes(rng):
    x = make_input(rng, 3, (1, 1, 5), dtype=np.float64)
    out = fastpool.max_pool3d(x, (1, 1, 2))
    assert_array_equal(out[..., 0, 0, :], np.maximum(x[..., 0, 0, 0:4:2], x[..., 0, 0, 1:5:2]))


GENERIC_MODES = [
    ("max", dict(padding=1), lambda img: fastpool.max_pool2d(img, 3, 2, 1, ceil_mode=True)),
    ("avg", dict(padding=1, count_include_pad=False),
     lambda img: fastpool.avg_pool2d(img, 3, 2, 1, True, count_include_pad=False)),
    ("lp", dict(norm_type=2), lambda img: fastpool.lp_pool2d(img, 2, 3, 2, ceil_mode=True)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, kwargs, named", GENERIC_MODES, ids=[m[0] for m in GENERIC_MODES])
def test_generic_pool_on_plain_image_and_stacks(mode, kwargs, named, backend, rng):
    img = rng.standard_normal((9, 12))
    got = fastpool.pool(img, mode, (3, 3), 2, ceil_mode=True, backend=backend, **kwargs)
    assert_allclose(got, named(img[None])[0], rtol=1e-12)
    stack = rng.standard_normal((2, 3, 4, 9, 12))
    got = fastpool.pool(stack, mode, (3, 3), 2, ceil_mode=True, backend=backend, **kwargs)
    assert_allclose(got, named(stack.reshape(24, 9, 12)).reshape(got.shape), rtol=1e-12)


def test_generic_pool_channels_last_and_indices(rng):
    images = rng.integers(0, 255, (4, 10, 10, 3)).astype(np.uint8)
    out, idx = fastpool.pool(images, "max", (2, 2), channels_last=True, return_indices=True)
    want, want_idx = fastpool.max_pool2d(images, 2, channels_last=True, return_indices=True)
    assert_array_equal(out, want)
    assert_array_equal(idx, want_idx)


def test_generic_adaptive_pool(rng):
    x = rng.standard_normal((2, 3, 4, 13, 17))
    got = fastpool.adaptive_pool(x, "avg", (None, 7))
    want = fastpool.adaptive_avg_pool2d(x.reshape(6, 4, 13, 17), (13, 7))
    assert_allclose(got, want.reshape(2, 3, 4, 13, 7), rtol=1e-12)
    out, idx = fastpool.adaptive_pool(x, "max", (5,), return_indices=True)
    assert out.shape == idx.shape == (2, 3, 4, 13, 5)
    assert_array_equal(np.take_along_axis(x, idx, -1), out)


def test_import_compiles_nothing():
    import subprocess
    import sys
    code = ("import sys, fastpool; fastpool.max_pool1d; "
            "print(sorted(m for m in sys.modules if m.startswith(('numba', 'fastpool.cpu'))))")
    printed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True).stdout.strip()
    assert printed == "[]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_equal_to_padded_input(backend, rng):
    import torch
    x = rng.standard_normal((2, 3, 4, 6))
    # padded input (4 + 2*2, 6 + 2*3) == kernel (8, 12): a single window.
    got, idx = fastpool.max_pool2d(x, (8, 12), 1, (2, 3), return_indices=True, backend=backend)
    want, want_idx = torch.nn.functional.max_pool2d(torch.from_numpy(x), (8, 12), 1, (2, 3),
                                                    return_indices=True)
    assert got.shape == (2, 3, 1, 1)
    assert_array_equal(got, want.numpy())
    assert_array_equal(idx, want_idx.numpy())
    avg = fastpool.avg_pool2d(x, (8, 12), 1, (2, 3), backend=backend)
    assert_allclose(avg, torch.nn.functional.avg_pool2d(torch.from_numpy(x), (8, 12), 1,
                                                        (2, 3)).numpy(), rtol=1e-12)


@pytest.mark.slow
def test_plane_of_more_than_2_31_elements():
    side = 46341  # side**2 = 2_147_488_281 > 2**31
    x = np.zeros((1, 1, side, side), np.uint8)
    flat = x.reshape(-1)
    row, col = side - 1, 45000
    beyond = [row * side + col, side * side - 1]
    assert min(beyond) > 2**31
    flat[beyond[0]] = 200
    flat[beyond[1]] = 250
    value, index = fastpool.global_max_pool2d(x, return_indices=True)
    assert value[0, 0] == 250 and index[0, 0] == beyond[1]
    # Windows starting on rows 0 and side - 1 only, to keep the output small.
    out, idx = fastpool.max_pool2d(x, (1, 2), (side - 1, 2), ceil_mode=True,
                                   return_indices=True)
    assert out.shape == (1, 1, 2, 23171)
    assert out[0, 0, 1, col // 2] == 200 and idx[0, 0, 1, col // 2] == beyond[0]
    assert idx.dtype == np.int64 and idx[0, 0, 1, -1] == beyond[1]
    grad = np.ones(value.shape, np.float32)
    back = fastpool.global_max_pool2d_backward(grad, index, x.shape)
    assert back.reshape(-1)[beyond[1]] == 1 and back.sum() == 1
