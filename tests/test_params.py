"""The shape rules of fastpool._params against torch, exhaustively on small sizes."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastpool._params import SlidingWindow, adaptive_table, pooling_output_size


def _torch_output_length(size, kernel, stride, pad, dilation, ceil_mode):
    x = torch.zeros(1, 1, size)
    try:
        return F.max_pool1d(x, kernel, stride, pad, dilation, ceil_mode).shape[-1]
    except RuntimeError:
        return None


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_output_size_matches_torch(ceil_mode):
    for size, kernel, stride, dilation in itertools.product(
            range(1, 10), range(1, 5), range(1, 5), range(1, 4)):
        for pad in range(kernel // 2 + 1):
            want = _torch_output_length(size, kernel, stride, pad, dilation, ceil_mode)
            got = pooling_output_size(size, kernel, pad, stride, dilation, ceil_mode)
            assert (got if got >= 1 else None) == want, (size, kernel, stride, pad, dilation)


def test_window_table_covers_exactly_the_unpadded_window():
    window = SlidingWindow.from_args("t", 1, 3, 2, 1, 2, True)
    table = window.table("t", (9,), "valid")
    for o in range(table.out_shape[2]):
        origin = o * 2 - 1
        want = [i for i in range(origin, origin + 5, 2) if 0 <= i < 9]
        got = list(range(table.start[2, o], table.stop[2, o], table.step[2]))
        assert got == want
        assert table.divisor[2, o] == len(want)


def test_adaptive_windows_follow_torch_rule():
    table = adaptive_table((13,), (7,))
    starts = [int(np.floor(i * 13 / 7)) for i in range(7)]
    stops = [int(np.ceil((i + 1) * 13 / 7)) for i in range(7)]
    assert table.start[2, :7].tolist() == starts
    assert table.stop[2, :7].tolist() == stops
    assert table.out_shape == (1, 1, 7)
