"""The CPU back end's specialised paths against torch: channels-last windows
folded a run of columns at a time, and whole-plane maxima kept in lanes."""

import functools

import numpy as np
import pytest

import fastpool

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("size", [1, 15, 16, 17, 47, 130])
@pytest.mark.parametrize("fill", ["ties", "nan", "lowest"])
def test_plane_max_lanes_match_the_sequential_fold(size, fill):
    rng = np.random.default_rng(size)
    x = rng.integers(-2, 3, (1, 6, size)).astype(np.float32)
    if fill == "nan":
        x[rng.random(x.shape) < 0.1] = np.nan
    elif fill == "lowest":
        x[:, ::2] = -np.inf
    for return_indices in (False, True):
        got = fastpool.adaptive_max_pool1d(x, 1, return_indices=return_indices)
        want = F.adaptive_max_pool1d(torch.from_numpy(x), 1, return_indices=return_indices)
        if return_indices:
            np.testing.assert_array_equal(got[1], want[1].numpy())
            got, want = got[0], want[0]
        np.testing.assert_array_equal(got, want.numpy())



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 17, 49, 300])
def test_plane_max_values_keep_the_folds_bits(dtype, size):
    """Whole-plane maxima without positions (integer order keys): torch's values and
    its signs of zero (the first zero of a zero maximum), NaN and inf included."""
    rng = np.random.default_rng(size)
    x = rng.integers(-3, 1, (2, 8, size)).astype(dtype)
    x[0, 0] = np.where(rng.random(size) < 0.5, -0.0, 0.0)  # zeros of both signs
    x[0, 1] = -2
    # +0 first, then -0 where a 16-lane fold puts it in another lane: +0 is kept.
    x[0, 1, min(1, size - 1)], x[0, 1, -1] = 0.0, -0.0
    x[0, 2] = -np.inf
    x[0, 3, rng.random(size) < 0.3] = np.nan
    x[0, 4, -1] = np.inf
    x[1] = np.where(x[1] == 0, -0.0, x[1])
    got = fastpool.adaptive_max_pool1d(x, 1)
    want = F.adaptive_max_pool1d(torch.from_numpy(x), 1).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert got.dtype == want.dtype


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.bool_])
def test_plane_max_values_of_integers(dtype):
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype) if dtype is not np.bool_ else np.iinfo(np.uint8)
    x = rng.integers(max(info.min, -1000), min(info.max, 1000), (3, 4, 53),
                     endpoint=True).astype(dtype)
    x[0, 0] = 0 if dtype is np.bool_ else info.min  # the running maximum's start
    got = fastpool.adaptive_max_pool1d(x, 1)
    np.testing.assert_array_equal(got, x.max(axis=-1, keepdims=True))
    assert got.dtype == x.dtype


def test_plane_averages_sum_blocks_in_float32():
    """Float32 whole-plane averages longer than a block: within torch's rounding of
    the float64 answer, and the same bits at every thread count and for dask."""
    from fastpool.cpu import kernels

    rng = np.random.default_rng(7)
    size = 3 * kernels.PLANE_SUM_BLOCK + 5
    x = (rng.standard_normal((4, 16, size)) + 3).astype(np.float32)
    x[0, 1, 7] = np.nan
    x[1, 2, 9] = np.inf
    want = F.adaptive_avg_pool1d(torch.from_numpy(x).double(), 1).numpy()
    got = fastpool.adaptive_avg_pool1d(x, 1)
    np.testing.assert_allclose(got, want, rtol=2e-7)
    threads = fastpool.get_num_threads()
    try:
        for n in (1, 2):
            fastpool.set_num_threads(n)
            np.testing.assert_array_equal(fastpool.adaptive_avg_pool1d(x, 1), got)
    finally:
        fastpool.set_num_threads(threads)


WINDOWS = [(2,), (3, 2, 1), (3, 1, 1), (4, 4), (5, 1, 2)]


@pytest.mark.parametrize("op, args", [("max", a) for a in WINDOWS + [(2, 2, 0, 2),
                                                                     (3, 2, 1, 1, True)]]
                         + [(op, a) for op in ("avg", "lp") for a in WINDOWS])
def test_channels_last_column_runs(op, args):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 11, 20)).astype(np.float32)
    if op == "max":
        x[0, 3, 4, 5] = np.nan
        x[1, :, :, 3] = 0.5  # ties
    t = torch.from_numpy(x).movedim(-1, 1)
    if op == "max":
        got = fastpool.max_pool2d(x, *args, return_indices=True, channels_last=True)
        want = F.max_pool2d(t, *args, return_indices=True)
        np.testing.assert_array_equal(got[0], want[0].movedim(1, -1).numpy())
        np.testing.assert_array_equal(got[1], want[1].movedim(1, -1).numpy())
        np.testing.assert_array_equal(fastpool.max_pool2d(x, *args, channels_last=True),
                                      got[0])
        return
    if op == "lp":
        x, t = np.abs(x), t.abs()
        got = fastpool.lp_pool2d(x, 2, *args[:2], channels_last=True)
        want = F.lp_pool2d(t, 2, *args[:2])
    else:
        got = fastpool.avg_pool2d(x, *args, channels_last=True)
        want = F.avg_pool2d(t, *args)
    np.testing.assert_allclose(got, want.movedim(1, -1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["adaptive_avg", "avg", "lp"])
def test_long_window_rows_summed_in_lanes(op):
    """Window rows of 16 or more contiguous elements are summed in vector lanes
    (channels-first): the same values as torch, NaN and inf included, and the same
    bits at every thread count."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8, 10, 70)).astype(np.float32)  # parallel launches
    if op == "lp":
        x = np.abs(x)
    x[0, 0, 1, 3] = np.nan
    x[0, 1, 2, 40] = np.inf
    calls = {"adaptive_avg": lambda m, t: m.adaptive_avg_pool2d(t, (2, 3)),
             "avg": lambda m, t: m.avg_pool2d(t, (2, 20), (1, 7)),
             "lp": lambda m, t: m.lp_pool2d(t, 2.0, (2, 20), (1, 7))}
    want = calls[op](F, torch.from_numpy(x)).numpy()
    got = calls[op](fastpool, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isnan(got[0, 0]).any() and np.isinf(got[0, 1]).any()
    threads = fastpool.get_num_threads()
    fastpool.set_num_threads(1)
    try:
        np.testing.assert_array_equal(calls[op](fastpool, x), got)
    finally:
        fastpool.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 16])  # channel blocks of one image; whole images
@pytest.mark.parametrize("args", [(5, 1, 2), (7, 2, 3), (5, 1, 2, 1, True), (6, 1, 0, 1)])
def test_separable_channels_last_max_values(batch, args):
    """The separable channels-last max (windows of 9+ elements), values only: its W
    pass runs the forward's row sweep, its H pass folds whole rows; NaN wins."""
    rng = np.random.default_rng(batch)
    x = rng.integers(-3, 4, (batch, 11, 13, 40)).astype(np.float32)  # ties
    x[0, 2, 3, 5] = np.nan
    want = F.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), *args)
    got = fastpool.max_pool2d(x, *args, channels_last=True)
    np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_max_backward_in_position_bands(batch):
    """The channels-last max scatter splits an image's positions into bands when
    there are fewer images than threads: torch's gradients (ties, overlapping
    windows), and an index outside the plane still reported once."""
    rng = np.random.default_rng(batch)
    x = rng.integers(-2, 3, (batch, 24, 20, 64)).astype(np.float32)  # N, H, W, C
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    y = F.max_pool2d(xt, 3, 2, 1)
    grad = torch.from_numpy(rng.standard_normal(y.shape).astype(np.float32))
    y.backward(grad)
    threads = fastpool.get_num_threads()
    fastpool.set_num_threads(2)
    try:
        _, indices = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True, channels_last=True)
        g = grad.permute(0, 2, 3, 1).numpy()
        got = fastpool.max_pool2d_backward(g, indices, x.shape, kernel_size=3, stride=2,
                                           padding=1, channels_last=True)
        np.testing.assert_allclose(got, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-6,
                                   atol=1e-6)
        indices[0, 3, 4, 5] = 24 * 20  # one past the plane
        with pytest.raises(ValueError, match="max_pool2d_backward"):
            fastpool.max_pool2d_backward(g, indices, x.shape, kernel_size=3, stride=2,
                                         padding=1, channels_last=True)
    finally:
        fastpool.set_num_threads(threads)


ROWS_FIRST_CALLS = {
    "adaptive_max": lambda m, t: m.adaptive_max_pool2d(t, (3, 5)),
    "adaptive_avg": lambda m, t: m.adaptive_avg_pool2d(t, (4, 7)),
    "max_wide_stride": lambda m, t: m.max_pool2d(t, (3, 2), (2, 5), (1, 1), (2, 1), True),
    "avg_wide_stride": lambda m, t: m.avg_pool2d(t, (3, 4), (2, 5), (1, 2), True, False),
    "lp_wide_stride": lambda m, t: m.lp_pool2d(t, 3.0, (2, 5), (2, 5)),
    "max_3d": lambda m, t: m.max_pool3d(t, (2, 2, 3), (1, 2, 6)),
    "avg_3d": lambda m, t: m.avg_pool3d(t, (3, 2, 2), (1, 2, 3), 1),
}


@pytest.mark.parametrize("op", sorted(ROWS_FIRST_CALLS))
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_first_channels_first(op, threads, monkeypatch):
    """Channels-first windows whose W axis no vector sweep covers (adaptive tables,
    wide strides, narrow outputs) fold their D/H rows first: torch's values, NaN
    winning a max, padding, dilation and ceil_mode included, at any thread count."""
    from fastpool import _dispatch
    from fastpool.cpu import pooling

    chosen = []
    rows_first = pooling._rows_first
    monkeypatch.setattr(pooling, "_rows_first", lambda *a: chosen.append(rows_first(*a))
                        or chosen[-1])
    monkeypatch.setattr(_dispatch, "PLANS", _dispatch.PlanCache(8))
    monkeypatch.setattr(pooling, "PLANE_BLOCK_FORWARD_MAX_OUT_W", 0)  # row by row
    rng = np.random.default_rng(7)
    shape = (2, 48, 3, 11, 17) if op.endswith("3d") else (2, 48, 11, 17)  # parallel launches
    x = rng.integers(-3, 4, shape).astype(np.float32)  # ties
    if op.startswith("lp"):
        x = np.abs(x)
    else:
        x[0, 1, ..., 2, 1] = x[0, 1, ..., 5, 4] = x[0, 1, ..., 7, 5] = np.nan  # in windows
    want = ROWS_FIRST_CALLS[op](F, torch.from_numpy(x)).numpy()
    previous = fastpool.get_num_threads()
    fastpool.set_num_threads(threads)
    try:
        got = ROWS_FIRST_CALLS[op](fastpool, x)
    finally:
        fastpool.set_num_threads(previous)
    assert chosen == [True]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if not op.startswith("lp"):
        assert np.isnan(got[0, 1]).any()


PLANE_BLOCK_CALLS = {
    "max": lambda m, t: m.max_pool2d(t, 3, 2, 1),
    "max_dilated_ceil": lambda m, t: m.max_pool2d(t, 2, 2, 1, 2, True),
    "max_3d": lambda m, t: m.max_pool3d(t, (2, 2, 3), (1, 2, 2)),
    "adaptive_max": lambda m, t: m.adaptive_max_pool2d(t, (3, 5)),
    "avg": lambda m, t: m.avg_pool2d(t, 2),
    "avg_pad_exclude": lambda m, t: m.avg_pool2d(t, 3, 2, 1, count_include_pad=False),
    "avg_wide_stride": lambda m, t: m.avg_pool2d(t, (3, 4), (2, 5), (1, 2), True, False),
    "avg_3d": lambda m, t: m.avg_pool3d(t, (3, 2, 2), (1, 2, 3), 1),
    "adaptive_avg": lambda m, t: m.adaptive_avg_pool2d(t, (4, 7)),
    "lp": lambda m, t: m.lp_pool2d(t, 3.0, (2, 3), (2, 3)),
}


@pytest.mark.parametrize("op", sorted(PLANE_BLOCK_CALLS))
@pytest.mark.parametrize("threads, planes", [(1, 100), (2, 100), (2, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_first_small_planes_in_plane_blocks(op, threads, planes, dtype, monkeypatch):
    """Channels-first forwards with narrow output rows run blocks of planes in vector
    lanes (a last block partial): torch's values, NaN winning a max, and for sums the
    row kernels' order, the same bits."""
    from fastpool import _dispatch
    from fastpool.cpu import pooling, tasks

    launched = []
    run_shares = tasks.TaskKernel.run_shares

    def recording(kernel, parts, arguments, address=None):
        launched.append(kernel.__name__)
        return run_shares(kernel, parts, arguments, address)

    monkeypatch.setattr(tasks.TaskKernel, "run_shares", recording)
    monkeypatch.setattr(_dispatch, "PLANS", _dispatch.PlanCache(8))
    rng = np.random.default_rng(5)
    shape = (1, planes, 3, 11, 13) if op.endswith("3d") else (1, planes, 11, 13)
    x = rng.integers(-3, 4, shape).astype(dtype)  # ties
    if op.startswith("lp"):
        x = np.abs(x)
    elif op.startswith("max") or op.startswith("adaptive_max"):
        x[0, 1, ..., 5, 5] = x[0, 3, ..., 3, 7] = np.nan  # inside dilated windows too
    else:
        x += rng.standard_normal(shape).astype(dtype)  # sums that round
    want = PLANE_BLOCK_CALLS[op](F, torch.from_numpy(x)).numpy()
    previous = fastpool.get_num_threads()
    fastpool.set_num_threads(threads)
    try:
        got = PLANE_BLOCK_CALLS[op](fastpool, x)
        monkeypatch.setattr(pooling, "PLANE_BLOCK_FORWARD_MAX_OUT_W", 0)
        monkeypatch.setattr(_dispatch, "PLANS", _dispatch.PlanCache(8))
        row_by_row = PLANE_BLOCK_CALLS[op](fastpool, x)
    finally:
        fastpool.set_num_threads(previous)
    assert any(name.endswith("plane_blocks") for name in launched), launched
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if op.startswith("max") or op.startswith("adaptive_max"):
        np.testing.assert_array_equal(got, row_by_row)
    else:  # the same bits, not just equal values
        bits = np.uint32 if dtype == np.float32 else np.uint64
        np.testing.assert_array_equal(got.view(bits), row_by_row.view(bits))
    if op.startswith("max") or op.startswith("adaptive_max"):
        assert np.isnan(got[0, 1]).any() and np.isnan(got[0, 3]).any()


def test_channels_first_small_planes_of_integers_and_bools_in_plane_blocks():
    x = np.random.default_rng(3).integers(0, 255, (2, 40, 9, 10)).astype(np.uint8)
    for values in (x, x > 200, x.astype(np.int64) - 128):
        want = F.max_pool2d(torch.from_numpy(values.astype(np.float32)), 3, 2, 1).numpy()
        got = fastpool.max_pool2d(values, 3, 2, 1)
        assert got.dtype == values.dtype
        np.testing.assert_array_equal(got, want.astype(values.dtype))


def test_adaptive_tables_sweep_the_axes_their_output_divides():
    """Along an axis whose size the output size divides, adaptive windows are the
    sliding ones of kernel = stride: their table has that interior, and the kernels
    that sweep it keep torch's averages and maxima (NaN winning, ties)."""
    from fastpool._params import adaptive_table

    table = adaptive_table((14, 13), (7, 7))
    assert table.interior[1].tolist() == [0, 7, 2, 0, 2]
    assert table.interior[2].tolist() == [0, 0, 1, 0, 0]  # 13 / 7: no regular windows
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (3, 40, 60, 28)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan
    for size in [(6, 7), (2, 2), (60, 28), (5, 3), (1, 14)]:
        for name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            want = getattr(F, name)(torch.from_numpy(x), size).numpy()
            got = getattr(fastpool, name)(x, size)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


# Channels-last windows folded whole: each register variant (rows x columns: 1x1 to
# 1x4, 2x2, 3x3, 4x2) and the scratch path (wider windows, dilation, padding and
# ceil_mode's clipped edges), in 1-D, 2-D and 3-D.
WHOLE_WINDOW_CALLS = {
    "1d_k1s2": (1, lambda m, t, op: op(m, 1)(t, 1, 2)),
    "1d_k2": (1, lambda m, t, op: op(m, 1)(t, 2)),
    "1d_k3s2p1": (1, lambda m, t, op: op(m, 1)(t, 3, 2, 1)),
    "1d_k4": (1, lambda m, t, op: op(m, 1)(t, 4)),
    "2d_k1s2": (2, lambda m, t, op: op(m, 2)(t, 1, 2)),
    "2d_k2": (2, lambda m, t, op: op(m, 2)(t, 2)),
    "2d_k3s1p1": (2, lambda m, t, op: op(m, 2)(t, 3, 1, 1)),
    "2d_k3s2_ceil": (2, lambda m, t, op: op(m, 2)(t, 3, 2, 0, ceil_mode=True)),
    "2d_k2x5": (2, lambda m, t, op: op(m, 2)(t, (2, 5), (1, 3), (1, 2))),
    "3d_k2": (3, lambda m, t, op: op(m, 3)(t, 2)),
    "3d_k1x2x3": (3, lambda m, t, op: op(m, 3)(t, (1, 2, 3), (1, 2, 2))),
}


@pytest.mark.parametrize("name", sorted(WHOLE_WINDOW_CALLS))
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("batch", [1, 5])
def test_channels_last_windows_folded_whole(name, mode, batch):
    """Channels-last forward windows folded whole, in registers or a scratch vector:
    torch's values (NaN wins a max; ties, +0.0 against -0.0 included, keep the first
    in scan order), and the same bits at 1 and 2 threads."""
    nd, call = WHOLE_WINDOW_CALLS[name]
    rng = np.random.default_rng(nd * 10 + batch)
    spatial = {1: (23,), 2: (9, 14), 3: (5, 6, 7)}[nd]
    x = rng.integers(-2, 3, (batch, 13, *spatial)).astype(np.float32)  # ties; 13 channels
    x[x == 0] = np.where(rng.random(np.count_nonzero(x == 0)) < 0.5, -0.0, 0.0)
    x[0, 3].flat[0] = np.nan  # in a window of every case
    if mode == "max":
        x[(rng.random(x.shape) < 0.3) & (x == 2)] = 0.0  # more zero ties
        x[x > 0] = -0.0

    def op(module, dims):
        return getattr(module, f"{mode}_pool{dims}d")

    def op_channels_last(module, dims):
        return functools.partial(op(module, dims), channels_last=True)

    want = call(F, torch.from_numpy(x), op).movedim(1, -1).numpy()
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    threads = fastpool.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            fastpool.set_num_threads(n)
            got.append(call(fastpool, xl, op_channels_last))
    finally:
        fastpool.set_num_threads(threads)
    if mode == "max":
        np.testing.assert_array_equal(got[0], want)
        np.testing.assert_array_equal(np.signbit(got[0]), np.signbit(want))
    else:
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)
    assert np.isnan(got[0][0]).any()
    np.testing.assert_array_equal(got[1], got[0])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["2d_batch1", "2d_dilated", "3d"])
def test_separable_channels_last_max_by_rows(case, threads):
    """The separable channels-last max without positions splits rows, not channel
    blocks: torch's maxima, NaN winning and +0.0/-0.0 ties keeping the first in scan
    order, a batch of one image over every thread."""
    rng = np.random.default_rng(4)
    shape = {"2d_batch1": (1, 24, 20, 21), "2d_dilated": (3, 24, 15, 17),
             "3d": (2, 24, 7, 8, 9)}[case]
    x = rng.integers(-2, 1, shape).astype(np.float32)
    x[x == 0] = np.where(rng.random(np.count_nonzero(x == 0)) < 0.5, -0.0, 0.0)
    x[0, 1].flat[17] = np.nan
    calls = {"2d_batch1": lambda m, t, **k: m.max_pool2d(t, 5, 1, 2, **k),
             "2d_dilated": lambda m, t, **k: m.max_pool2d(t, 3, 1, 1, 2, True, **k),
             "3d": lambda m, t, **k: m.max_pool3d(t, 3, 1, 1, **k)}
    want = calls[case](F, torch.from_numpy(x)).movedim(1, -1).numpy()
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    previous = fastpool.get_num_threads()
    fastpool.set_num_threads(threads)
    try:
        got = calls[case](fastpool, xl, channels_last=True)
    finally:
        fastpool.set_num_threads(previous)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert np.isnan(got[0]).any()



# (id, spatial size, the torch forward, fastpool's backward of (grad, x))
SMALL_PLANE_SUMS = [
    ("adaptive_avg2d", (14, 14), lambda t: F.adaptive_avg_pool2d(t, 7),
     lambda g, x: fastpool.adaptive_avg_pool2d_backward(g, x.shape)),
    ("adaptive_avg2d-uneven", (13, 17), lambda t: F.adaptive_avg_pool2d(t, (7, 5)),
     lambda g, x: fastpool.adaptive_avg_pool2d_backward(g, x.shape)),
    ("avg2d-ceil-valid", (9, 11),
     lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False),
     lambda g, x: fastpool.avg_pool2d_backward(g, x.shape, 3, 2, 1, ceil_mode=True,
                                               count_include_pad=False)),
    ("avg1d", (40,), lambda t: F.avg_pool1d(t, 5, 1, 2),
     lambda g, x: fastpool.avg_pool1d_backward(g, x.shape, 5, 1, 2)),
    ("avg3d-override", (4, 6, 7),
     lambda t: F.avg_pool3d(t, (2, 3, 3), (1, 2, 1), 1, divisor_override=5),
     lambda g, x: fastpool.avg_pool3d_backward(g, x.shape, (2, 3, 3), (1, 2, 1), 1,
                                               divisor_override=5)),
    ("lp2d-ceil", (12, 10), lambda t: F.lp_pool2d(t, 2.0, 3, 2, ceil_mode=True),
     lambda g, x: fastpool.lp_pool2d_backward(g, x, 2.0, 3, 2, ceil_mode=True)),
    ("lp3d", (5, 6, 4), lambda t: F.lp_pool3d(t, 3.0, 2, 1),
     lambda g, x: fastpool.lp_pool3d_backward(g, x, 3.0, 2, 1)),
]


@pytest.mark.parametrize("size, forward, backward", [case[1:] for case in SMALL_PLANE_SUMS],
                         ids=[case[0] for case in SMALL_PLANE_SUMS])
def test_small_plane_sum_backward_in_plane_blocks(size, forward, backward, monkeypatch):
    """Channels-first sum backward over small planes gathers blocks of planes in
    vector lanes (74 planes: a last block partly idle): torch's gradients, and the
    same bits at every thread count and block size as the row by row kernel."""
    from fastpool import _dispatch
    from fastpool.cpu import pooling, runtime

    rng = np.random.default_rng(len(size))
    x = np.abs(rng.standard_normal((2, 37, *size))).astype(np.float32) + 0.1
    xt = torch.from_numpy(x).requires_grad_(True)
    y = forward(xt)
    grad = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(torch.from_numpy(grad))

    def run():
        _dispatch.PLANS.clear()
        return backward(grad, x)

    threads = fastpool.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 0)  # the parallel kernels
        got = run()
        np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
        fastpool.set_num_threads(1)
        monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 2**62)  # serially, in one share
        assert run().tobytes() == got.tobytes()
        monkeypatch.setattr(pooling, "PLANE_BLOCK", 5)
        assert run().tobytes() == got.tobytes()
        monkeypatch.setattr(pooling, "PLANE_BLOCK_MAX_BYTES", 0)  # row by row
        assert run().tobytes() == got.tobytes()
    finally:
        fastpool.set_num_threads(threads)


@pytest.mark.parametrize("args", [(1, 2, 0), (1, (2, 3), 0), (2, 2, 0)])
def test_channels_last_max_backward_gather_path(args, monkeypatch):
    """Small batches of single-element windows that skip inputs (FPN's
    max_pool2d(1, 2)) gather; 2x2 windows scatter: both give torch's gradients, a
    NaN gradient reaching only its own maximum, and the same bits at every thread
    count."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 13, 17, 48)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    y = F.max_pool2d(xt, *args)
    grad = rng.standard_normal(y.shape).astype(np.float32)
    grad[0, 5, 1, 2] = np.nan
    y.backward(torch.from_numpy(grad))
    _, indices = fastpool.max_pool2d(x, *args, return_indices=True, channels_last=True)
    g = np.ascontiguousarray(grad.transpose(0, 2, 3, 1))
    window = dict(zip(("kernel_size", "stride", "padding"), args))
    from fastpool import _dispatch
    from fastpool.cpu import runtime

    threads = fastpool.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 0)  # the parallel kernels
        got = fastpool.max_pool2d_backward(g, indices, x.shape, channels_last=True, **window)
        np.testing.assert_array_equal(got, xt.grad.permute(0, 2, 3, 1).numpy())
        assert np.isnan(got).sum() == 1
        fastpool.set_num_threads(1)
        monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 2**62)  # serially, in one share
        _dispatch.PLANS.clear()
        again = fastpool.max_pool2d_backward(g, indices, x.shape, channels_last=True,
                                             **window)
        assert again.tobytes() == got.tobytes()
    finally:
        fastpool.set_num_threads(threads)


@pytest.mark.parametrize("op", ["adaptive_avg_pool2d", "adaptive_max_pool2d"])
def test_plane_reductions_weigh_their_vector_reads(op, monkeypatch):
    """A batch-1 global head (1280 planes of 7x7) is planned serially: its reads run
    in vector lanes, faster than a thread wake-up; forced parallel, the same bits."""
    from fastpool import _dispatch
    from fastpool.cpu import runtime

    x = np.random.default_rng(8).standard_normal((1, 1280, 7, 7)).astype(np.float32)
    got = getattr(fastpool, op)(x, 1)
    (plan,) = _dispatch.PLANS.plans()
    assert plan.threads is None
    monkeypatch.setattr(runtime, "SERIAL_WORK_LIMIT", 0)
    _dispatch.PLANS.clear()
    np.testing.assert_array_equal(getattr(fastpool, op)(x, 1), got)
    (plan,) = _dispatch.PLANS.plans()
    assert plan.threads == fastpool.get_num_threads()


@pytest.mark.parametrize("size", range(1, 10))
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_channels_last_window_groups(size, mode):
    """Channels-last windows of 1 to 9 rows or columns, folded up to 4 rows or
    columns at a time (5 as 3 + 2, never a lone fold after the first): torch's
    values, NaN winning and +0.0/-0.0 ties keeping the first in scan order, through
    the direct (1 x size, size x 1), separable (size x size) and whole-row paths."""
    rng = np.random.default_rng(size)
    x = rng.integers(-2, 1, (2, 24, 13, 14)).astype(np.float32)
    x[x == 0] = np.where(rng.random(np.count_nonzero(x == 0)) < 0.5, -0.0, 0.0)
    x[0, 5].flat[40] = np.nan
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    pool = getattr(F, f"{mode}_pool2d")
    for kernel in ((1, size), (size, 1), (size, size)):
        want = pool(torch.from_numpy(x), kernel, 1, (kernel[0] // 2, kernel[1] // 2))
        got = getattr(fastpool, f"{mode}_pool2d")(xl, kernel, 1,
                                                  (kernel[0] // 2, kernel[1] // 2),
                                                  channels_last=True)
        want = want.movedim(1, -1).numpy()
        if mode == "max":
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert np.isnan(got[0]).any()


def test_channels_last_global_pool_runs_serially():
    """A channels-last call with one output row (global pooling) has one task for
    the direct kernels: its plan runs it serially however large the work."""
    from fastpool import _dispatch

    x = np.random.default_rng(0).standard_normal((1, 16, 16, 512)).astype(np.float32)
    _dispatch.PLANS.clear()
    got = fastpool.adaptive_avg_pool2d(x, 1, channels_last=True)
    (plan,) = _dispatch.PLANS.plans()
    assert plan.threads is None
    want = F.adaptive_avg_pool2d(torch.from_numpy(x).movedim(-1, 1), 1)
    np.testing.assert_allclose(got, want.movedim(1, -1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_size, window", [
    ((1, 1), (1, 1)), ((1, 3), (1, 3)), (2, (2, 2)), (3, (3, 3)), ((4, 2), (4, 2)),
    ((2, 3), (0, 0)), (5, (0, 0))])
def test_channels_last_kernels_built_per_register_window(kernel_size, window):
    """A channels-last direct kernel compiles the register fold of its own window
    shape only (rows x columns; (0, 0): none), and its clipped edge windows
    (padding, ceil mode) in the scratch vector: torch's values either way."""
    from fastpool.cpu import kernels

    assert kernels.register_window((1, *np.broadcast_to(kernel_size, 2))) == window
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 11, 10)).astype(np.float32)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    padding = tuple(k // 2 for k in np.broadcast_to(kernel_size, 2))
    for mode in ("max", "avg"):
        want = getattr(F, f"{mode}_pool2d")(torch.from_numpy(x), kernel_size, 2, padding,
                                            ceil_mode=True).movedim(1, -1).numpy()
        got = getattr(fastpool, f"{mode}_pool2d")(xl, kernel_size, 2, padding,
                                                  ceil_mode=True, channels_last=True)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    built = {key for key in kernels._built if key[0].endswith("_pool_channels_last")}
    assert ("max_pool_channels_last", *window) in built
    assert ("sum_pool_channels_last", *window) in built


def test_kernels_compile_with_their_arrays_distinct():
    """Task kernels are compiled with numba's noalias flag (fastpool.cpu.tasks), as
    the loop bodies of parallel=True kernels were: LLVM may then keep one array's
    values in registers across another's stores, and vectorise without run-time
    overlap checks.  Without the flag only numba's own return and exception
    pointers are noalias."""
    import numba

    from fastpool.cpu import kernels, tasks

    grad = np.ones((2, 4, 4, 16), np.float32)
    fastpool.avg_pool2d_backward(grad, (2, 8, 8, 16), 2, channels_last=True)
    kernel = kernels.sum_backward_channels_last.body
    # A fresh build of the same function and options (cached code cannot be inspected).
    build = numba.njit(**{**tasks.KERNEL_JIT_OPTIONS, "cache": False})(kernel.py_func)
    signature = kernel.signatures[0]
    build.compile(signature)
    definition = next(line for line in build.inspect_llvm(signature).splitlines()
                      if line.startswith("define") and "sum_backward_channels_last" in line
                      and "cpython" not in line)
    arrays = sum(isinstance(argument, numba.types.Array) for argument in signature)
    assert definition.count("noalias") >= 2 + arrays, definition


@pytest.mark.parametrize("window, stride, padding", [
    ((10, 10), 10, 0),    # 100 elements: runs of 64 columns' sums span window rows
    ((3, 150), 150, 0),   # window rows longer than a run: flushed within a row
    ((9, 9), 5, 4),       # padded windows, included and excluded from the divisor
])
def test_channels_last_float32_averages_of_large_windows(window, stride, padding):
    """Windows over 64 elements sum float32 runs of up to 64 columns in float32 and
    the runs in float64: within float32 rounding of the exact average (float64 of
    the same input), and torch's."""
    rng = np.random.default_rng(sum(window))
    x = rng.standard_normal((2, 5, 31, 300)).astype(np.float32) + 100
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    for count_include_pad in (True, False):
        kw = dict(count_include_pad=count_include_pad)
        got = fastpool.avg_pool2d(nhwc, window, stride, padding, channels_last=True, **kw)
        exact = fastpool.avg_pool2d(x.astype(np.float64), window, stride, padding, **kw)
        np.testing.assert_allclose(np.moveaxis(got, -1, 1), exact, rtol=2e-6, atol=0)
        want = F.avg_pool2d(torch.from_numpy(x), window, stride, padding, **kw).numpy()
        np.testing.assert_allclose(np.moveaxis(got, -1, 1), want, rtol=1e-5)
    got = fastpool.adaptive_avg_pool2d(nhwc, (2, 3), channels_last=True)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1),
                               fastpool.adaptive_avg_pool2d(x.astype(np.float64), (2, 3)),
                               rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", [(1, 30, 31, 40), (1, 6, 30, 31, 40)], ids=["2d", "3d"])
def test_banded_max_backward_with_the_window_takes_every_index(shape):
    """A batch of one, channels-last, with the window given: each thread's band of
    positions scans only the outputs whose windows reach it.  Indices from the
    forward land there; indices from elsewhere in the plane (not from this forward)
    are still all taken, by a rescan of every output, and the gradient matches the
    NumPy reference."""
    nd = len(shape) - 2
    rng = np.random.default_rng(nd)
    x = rng.standard_normal(shape).astype(np.float32)
    window = dict(kernel_size=3, stride=2, padding=1)
    out, indices = getattr(fastpool, f"max_pool{nd}d")(x, **window, channels_last=True,
                                                       return_indices=True)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    backward = getattr(fastpool, f"max_pool{nd}d_backward")
    plane = int(np.prod(shape[1:-1]))
    for chosen in (indices, rng.integers(0, plane, indices.shape)):
        got = backward(grad, chosen, x.shape, channels_last=True, **window)
        want = backward(grad, chosen, x.shape, channels_last=True, backend="numpy")
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    wrong = indices.copy()
    wrong.flat[7] = plane
    with pytest.raises(ValueError, match="outside"):
        backward(grad, wrong, x.shape, channels_last=True, **window)


@pytest.mark.parametrize("kernel, stride, padding", [
    (2, 2, 0), (3, 2, 1), (3, 1, 1), (4, 4, 0), (5, 3, 2), (7, 1, 3), (3, 3, 0)])
@pytest.mark.parametrize("fill", ["ties", "nan"])
def test_channels_first_max_with_indices_sweeps_the_interior(kernel, stride, padding, fill):
    """Max pooling with indices sweeps the windows inside each row with their
    positions (vectorised across outputs): torch's values and indices, ties to the
    first and NaN winning, the sweeps at both ends of a row and between them."""
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.integers(-2, 3, (2, 3, 9, 53)).astype(np.float32)
    if fill == "nan":
        x[rng.random(x.shape) < 0.05] = np.nan
    got, got_at = fastpool.max_pool2d(x, kernel, stride, padding, return_indices=True)
    want, want_at = F.max_pool2d(torch.from_numpy(x), kernel, stride, padding,
                                 return_indices=True)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(got_at, want_at.numpy())


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, kernel, stride", [
    ((2, 3, 13, 11), 2, 2), ((2, 5, 28, 28), 7, 7), ((1, 17, 9, 30), 3, 1),
    ((2, 4, 6, 40), (1, 20), 4), ((2, 3, 8, 8), 8, 8), ((2, 3, 40), 3, 2),
    ((1, 2, 5, 6, 7), 2, 2),
], ids=["2x2", "7x7", "3x3-stride-1", "1x20", "whole-plane", "1d", "3d"])
def test_l2_norms_are_a_build_of_their_own_with_the_same_results(monkeypatch, shape, kernel,
                                                                 stride, dtype, channels_last):
    """L2 pooling (norm_type 2) runs builds that take p as a constant (pooling.SQUARE):
    the same bits as the builds that take it at run time, forward and backward, and
    torch's results."""
    from fastpool import _dispatch
    from fastpool.cpu import pooling
    from fastpool.cpu.tasks import Constant

    nd = len(shape) - 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    want = getattr(torch.nn.functional, f"lp_pool{nd}d")(torch.from_numpy(x), 2, kernel,
                                                        stride).numpy()
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    forward = getattr(fastpool, f"lp_pool{nd}d")
    backward = getattr(fastpool, f"lp_pool{nd}d_backward")

    def both():
        _dispatch.PLANS.clear()
        y = forward(x, 2, kernel, stride, channels_last=channels_last)
        return y, backward(np.cos(y), x, 2, kernel, stride, channels_last=channels_last)

    assert pooling._kernel_power(2) is pooling.SQUARE and type(pooling.SQUARE) is Constant
    assert type(pooling._kernel_power(3)) is float and pooling._kernel_power(None) is None
    constant = both()
    got = np.moveaxis(constant[0], -1, 1) if channels_last else constant[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(pooling, "_kernel_power", lambda p: None if p is None else float(p))
    at_run_time = both()
    _dispatch.PLANS.clear()
    for a, b in zip(constant, at_run_time):
        np.testing.assert_array_equal(a, b)


def test_a_constant_argument_assigned_again_is_not_pruned_by_its_value():
    """A Constant argument is a constant of the kernel's IR only while nothing
    assigns its variable again: a branch on the other value stays."""
    from fastpool.cpu.tasks import Constant, parallel_kernel

    @parallel_kernel
    def pick(part, parts, out, p):
        if out[0] > 0:
            p = 3
        out[1] = 1.0 if p == 2 else 2.0

    for first, want in ((1.0, 2.0), (-1.0, 1.0)):
        out = np.array([first, 0.0])
        pick.serial(out, Constant(2))
        assert out[1] == want
