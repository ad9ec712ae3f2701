"""The CPU back end's pool of large output buffers (fastpool._memory)."""

import numpy as np
import pytest

import fastpool
from fastpool import _memory

SHAPE = (2, 16, 128, 128)  # 2 MiB of float32 output from avg_pool2d(x, 1): pooled


def _address(array):
    return array.__array_interface__["data"][0]


@pytest.fixture
def x():
    fastpool.empty_cache()
    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


def test_a_freed_output_is_reused_and_a_live_one_never(x):
    first = fastpool.avg_pool2d(x, 1)
    address = _address(first)
    second = fastpool.avg_pool2d(x, 1)  # first still alive: another buffer
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, x)
    del first
    third = fastpool.avg_pool2d(2 * x, 1)
    assert _address(third) == address  # first's buffer, free again
    np.testing.assert_array_equal(second, x)
    np.testing.assert_array_equal(third, 2 * x)


def test_a_view_keeps_its_buffer_busy(x):
    out = fastpool.max_pool2d(x, 1)
    view, address = out[1, 3], _address(out)
    del out
    again = fastpool.max_pool2d(-x, 1)
    assert _address(again) != address
    np.testing.assert_array_equal(view, x[1, 3])


def test_torch_tensors_keep_their_buffer_busy(x):
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(fastpool.avg_pool2d(x, 1))
    again = fastpool.avg_pool2d(-x, 1)
    assert _address(again) != tensor.data_ptr()
    np.testing.assert_array_equal(tensor.numpy(), x)


def test_backward_gradients_are_pooled_too(x):
    out, indices = fastpool.max_pool2d(x, 2, return_indices=True)
    grad = fastpool.max_pool2d_backward(np.ones_like(out), indices, x.shape)
    address = _address(grad)
    assert grad.sum() == out.size
    del grad
    again = fastpool.max_pool2d_backward(np.full_like(out, 2), indices, x.shape)
    assert _address(again) == address and again.sum() == 2 * out.size  # zeroed anew


def test_empty_cache_releases_free_buffers_only(x):
    kept = fastpool.avg_pool2d(x, 1)
    freed = fastpool.avg_pool2d(x, 1)
    del freed
    assert fastpool.empty_cache() == kept.nbytes
    assert fastpool.empty_cache() == 0
    np.testing.assert_array_equal(kept, x)
    del kept
    assert fastpool.empty_cache() == x.nbytes


def test_the_pool_stays_within_its_bytes(x, monkeypatch):
    monkeypatch.setattr(_memory, "CACHE_BYTES", 5 * x.nbytes)
    outs = [fastpool.avg_pool2d(x, 1) for _ in range(7)]  # 2 beyond the pool: unpooled
    assert _memory._held == 5 * x.nbytes
    del outs
    half = fastpool.avg_pool2d(x, (1, 2))  # another size: room made by dropping free ones
    assert _memory._held <= 5 * x.nbytes and half.nbytes in _memory._buffers
    big = np.zeros((1, 1, 1024, 1024), np.float32)  # over a quarter of the pool
    assert _address(fastpool.avg_pool2d(big, 1)) not in {
        _address(b) for bucket in _memory._buffers.values() for b in bucket}
