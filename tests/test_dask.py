"""fastpool.dask: lazy results equal in-memory fastpool (and torch) for every chunking."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

da = pytest.importorskip("dask.array")
import dask  # noqa: E402
from dask.array.utils import assert_eq  # noqa: E402

import fastpool  # noqa: E402
import fastpool.dask as fd  # noqa: E402
from fastpool._params import pooling_output_size  # noqa: E402
from tests.oracle import to_channels_last, torch_pool  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def chunking(draw, shape):
    """Random (often irregular) chunks for every axis."""
    chunks = []
    for size in shape:
        cuts = draw(st.sets(st.integers(1, size - 1), max_size=min(size - 1, 4))) \
            if size > 1 else set()
        bounds = [0, *sorted(cuts), size]
        chunks.append(tuple(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    return tuple(chunks)


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(["max", "avg", "lp", "min", "adaptive_max", "adaptive_avg",
                                 "adaptive_min", "global_max", "global_avg", "global_min"]))
    nd = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 11 if nd < 3 else 7), min_size=nd, max_size=nd))
    kwargs, args = {}, ()
    if kind in ("max", "avg", "lp", "min"):
        kernel = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
        stride = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
        padding = [draw(st.integers(0, k // 2)) for k in kernel] if kind != "lp" else [0] * nd
        dilation = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)) \
            if kind in ("max", "min") else [1] * nd
        ceil_mode = draw(st.booleans())
        assume(all(pooling_output_size(n, k, p, s, d, ceil_mode) >= 1
                   for n, k, p, s, d in zip(sizes, kernel, padding, stride, dilation)))
        kwargs = dict(kernel_size=tuple(kernel), stride=tuple(stride), ceil_mode=ceil_mode)
        if kind != "lp":
            kwargs["padding"] = tuple(padding)
        if kind in ("max", "min"):
            kwargs["dilation"] = tuple(dilation)
            kwargs["return_indices"] = draw(st.booleans())
        if kind == "avg":
            kwargs["count_include_pad"] = draw(st.booleans())
            kwargs["divisor_override"] = draw(st.sampled_from([None, 3]))
        if kind == "lp":
            args = (draw(st.sampled_from([1.0, 2.0, 3.0, float("inf")])),)
    elif kind.startswith("adaptive"):
        args = (tuple(draw(st.one_of(st.none(), st.integers(1, n + 2))) for n in sizes),)
        if kind in ("adaptive_max", "adaptive_min"):
            kwargs["return_indices"] = draw(st.booleans())
    else:
        kwargs["keepdims"] = draw(st.booleans())
        if kind in ("global_max", "global_min"):
            kwargs["return_indices"] = draw(st.booleans())
    channels_last = draw(st.booleans())
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), *sizes)
    dtype = np.float64 if kind.endswith("avg") or kind == "lp" else draw(
        st.sampled_from([np.float32, np.float64, np.int16]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Small integers: plenty of ties between windows and across blocks.
    x = rng.integers(-3, 4, shape).astype(dtype)
    if dtype != np.int16 and draw(st.booleans()):
        x = rng.standard_normal(shape).astype(dtype)
        if kind.endswith(("max", "min")) and draw(st.booleans()):
            x.flat[rng.integers(0, x.size, 2)] = np.nan
    if channels_last:
        x = np.ascontiguousarray(to_channels_last(x, nd))
    kwargs["channels_last"] = channels_last
    chunks = draw(chunking(x.shape))
    align = draw(st.sampled_from(["input", "input", "output"])) if not kind.startswith(
        "global") else None
    # Blocks of da.from_array are strided views (joined by copying); blocks that a
    # store or a generator makes are contiguous, and a halo'd block then runs on
    # the block itself plus rim pieces: draw both.
    contiguous = draw(st.booleans())
    return kind, nd, x, chunks, args, kwargs, align, contiguous


def _call(module, kind, nd, x, args, kwargs, align=None):
    name = f"{kind}_pool{nd}d"
    extra = {} if align is None or module is fastpool else {"align": align}
    return getattr(module, name)(x, *args, **kwargs, **extra)


@SETTINGS
@given(problems())
def test_dask_equals_in_memory_and_torch(problem):
    kind, nd, x, chunks, args, kwargs, align, contiguous = problem
    expected = _call(fastpool, kind, nd, x, args, kwargs)
    source = da.from_array(x, chunks=chunks)
    if contiguous:
        source = source.map_blocks(np.copy)
    lazy = _call(fd, kind, nd, source, args, kwargs, align)
    expected = expected if isinstance(expected, tuple) else (expected,)
    lazy = lazy if isinstance(lazy, tuple) else (lazy,)
    with dask.config.set(scheduler="sync"):
        for want, got in zip(expected, lazy):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert type(got._meta) is np.ndarray
            assert_eq(got, want, check_graph=False)  # chunk shapes and meta too
            computed = got.compute()
            if kind == "global_avg":  # a tree of float64 block sums
                assert_allclose(computed, want, rtol=1e-13, atol=1e-13)
            else:
                assert_array_equal(computed, want)
    if x.dtype == np.float64 and not np.isnan(x).any() and kind != "lp" and \
            not kind.endswith("min"):  # torch has no min pooling: fastpool is the oracle
        if kind.startswith("adaptive"):  # torch's 1-D ops take no None sizes
            spatial = x.shape[-nd - 1:-1] if kwargs["channels_last"] else x.shape[-nd:]
            args = (tuple(n if o is None else o for o, n in zip(args[0], spatial)),)
        try:
            reference = torch_pool(f"{kind}_pool", nd, x, *args, **kwargs)
        except RuntimeError:  # torch rejects windows larger than the input
            return
        reference = reference if isinstance(reference, tuple) else (reference,)
        assert_allclose(expected[0], reference[0], rtol=1e-12, atol=1e-12)
        if len(reference) == 2:
            assert_array_equal(expected[1], reference[1])


@st.composite
def backward_problems(draw):
    kind = draw(st.sampled_from(["max", "avg", "adaptive_max", "adaptive_avg", "global_max",
                                 "global_avg"]))
    nd = draw(st.integers(1, 2))
    sizes = draw(st.lists(st.integers(2, 10), min_size=nd, max_size=nd))
    forward, backward = {}, {}
    if kind in ("max", "avg"):
        kernel = draw(st.integers(1, 4))
        stride = draw(st.integers(1, 3))
        padding = draw(st.integers(0, kernel // 2))
        ceil_mode = draw(st.booleans())
        assume(all(pooling_output_size(n, kernel, padding, stride, 1, ceil_mode) >= 1
                   for n in sizes))
        window = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
        forward.update(window)
        if kind == "max":
            backward.update(window)
        else:
            backward.update(window, count_include_pad=draw(st.booleans()))
            forward["count_include_pad"] = backward["count_include_pad"]
    elif kind.startswith("adaptive"):
        forward["output_size"] = tuple(draw(st.integers(1, n)) for n in sizes)
    channels_last = draw(st.booleans())
    shape = (2, 2, *sizes)
    x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(-3, 4, shape)
    x = x.astype(np.float64)
    if channels_last:
        x = np.ascontiguousarray(to_channels_last(x, nd))
    return kind, nd, x, draw(chunking(x.shape)), forward, backward, channels_last


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backward_problems())
def test_dask_backward_equals_in_memory(problem):
    kind, nd, x, chunks, forward, backward, channels_last = problem
    name = f"{kind}_pool{nd}d"
    lazy_x = da.from_array(x, chunks=chunks)
    with_indices = kind.endswith("max")
    extra = {"return_indices": True} if with_indices else {}
    lazy = getattr(fd, name)(lazy_x, **forward, **extra, channels_last=channels_last)
    eager = getattr(fastpool, name)(x, **forward, **extra, channels_last=channels_last)
    out = lazy[0] if with_indices else lazy
    grad = da.from_array(np.random.default_rng(1).standard_normal(out.shape), chunks=out.chunks)
    if with_indices:
        got = getattr(fd, f"{name}_backward")(grad, lazy[1], x.shape, **backward,
                                             channels_last=channels_last)
        want = getattr(fastpool, f"{name}_backward")(grad.compute(), eager[1], x.shape,
                                                     channels_last=channels_last)
    elif kind == "avg":
        got = fd.__dict__[f"{name}_backward"](grad, x.shape, **backward,
                                               channels_last=channels_last)
        want = getattr(fastpool, f"{name}_backward")(grad.compute(), x.shape, **backward,
                                                     channels_last=channels_last)
    else:
        got = getattr(fd, f"{name}_backward")(grad, x.shape, channels_last=channels_last)
        want = getattr(fastpool, f"{name}_backward")(grad.compute(), x.shape,
                                                     channels_last=channels_last)
    with dask.config.set(scheduler="sync"):
        assert_eq(got, want, check_graph=False)
        assert_array_equal(got.compute(), want)


def test_global_max_nan_and_ties_across_blocks():
    x = np.zeros((1, 2, 6, 6), np.float32)
    x[0, 0, 1, 1] = x[0, 0, 4, 4] = 5  # a tie: the first in scan order wins
    x[0, 1, 0, 5] = x[0, 1, 5, 0] = np.nan  # NaNs win; torch keeps the last
    x[0, 1, 3, 3] = 9
    lazy = fd.global_max_pool2d(da.from_array(x, chunks=(1, 1, 2, 3)), return_indices=True)
    want = fastpool.global_max_pool2d(x, return_indices=True)
    with dask.config.set(scheduler="sync"):
        for got, expected in zip(lazy, want):
            assert_array_equal(got.compute(), expected)
    assert lazy[1].compute().tolist() == [[7, 30]]


def test_plan_is_a_map_without_halo_and_halo_otherwise():
    x = da.zeros((2, 3, 64, 48), chunks=(1, 3, 16, 12))
    plan = fd.plan(x, "max_pool2d", 2)
    assert plan.is_map and all(a.halo == 0 for a in plan.axes)
    y = fd.max_pool2d(x, 2)
    assert y.chunks[2:] == ((8,) * 4, (6,) * 4)
    assert not any("rechunk" in name for name in y.dask.layers)
    plan = fd.plan(x, "avg_pool2d", 3, 2, 1)
    assert not plan.is_map and plan.axes[0].halo == 1
    assert plan.axes[0].out_chunks == (8, 8, 8, 8)
    # chunks that are not multiples of the stride: irregular output chunks, no rechunk
    y = fd.max_pool2d(da.zeros((1, 1, 30, 30), chunks=7), 2)
    assert y.chunks[2] == (4, 3, 4, 3, 1) and not any("rechunk" in n for n in y.dask.layers)
    # align="output": regular output chunks
    y = fd.max_pool2d(da.zeros((1, 1, 30, 30), chunks=7), 2, align="output")
    assert y.chunks[2] == (4, 4, 4, 3)
    assert "halo" in repr(fd.plan(x, "avg_pool2d", 3, 2, 1))


def test_chunks_smaller_than_window_and_halo():
    x = np.random.default_rng(3).standard_normal((1, 1, 23, 19))
    lazy = da.from_array(x, chunks=(1, 1, 1, 2))
    for args in [(5, 1, 2), (7, 3, 3, 2, True)]:
        got, idx = fd.max_pool2d(lazy, *args, return_indices=True)
        want, want_idx = fastpool.max_pool2d(x, *args, return_indices=True)
        with dask.config.set(scheduler="sync"):
            assert_array_equal(got.compute(), want)
            assert_array_equal(idx.compute(), want_idx)


def test_pyramid_levels_equal_repeated_pooling():
    x = np.random.default_rng(4).standard_normal((3, 40, 36)).astype(np.float32)
    levels = fd.pyramid(da.from_array(x, chunks=(1, 16, 16)), 4, mode="avg", nd=2,
                        chunks=16)
    assert [lv.shape for lv in levels] == [(3, 40, 36), (3, 20, 18), (3, 10, 9), (3, 5, 4)]
    want = x
    with dask.config.set(scheduler="sync"):
        for level in levels[1:]:
            want = fastpool.avg_pool2d(want, 2)
            assert_array_equal(level.compute(), want)
            assert all(len(set(c[:-1])) <= 1 for c in level.chunks)  # regular, for Zarr
    # by default a per-block map: each level's blocks are the previous level's, halved
    levels = fd.pyramid(da.from_array(x, chunks=(1, 16, 16)), 3, nd=2)
    assert levels[2].chunks[1:] == ((4, 4, 2), (4, 4, 1))
    with dask.config.set(scheduler="sync"):
        assert_array_equal(levels[2].compute(), fastpool.avg_pool2d(want_2 := fastpool.avg_pool2d(
            x, 2), 2))
    del want_2


def test_dask_errors_name_op_argument_and_value():
    with pytest.raises(TypeError, match=r"max_pool2d: x must be a dask array, got ndarray"):
        fd.max_pool2d(np.zeros((1, 1, 4, 4)), 2)
    x = da.zeros((1, 1, 8, 8), chunks=4)
    unknown = x[x[..., 0, 0] > -1] if False else da.from_array(np.zeros((8, 1, 4, 4)),
                                                               chunks=4)
    unknown = unknown[unknown[:, 0, 0, 0] > -1]
    with pytest.raises(ValueError, match=r"avg_pool2d: x has unknown chunk sizes"):
        fd.avg_pool2d(unknown, 2)
    with pytest.raises(ValueError, match=r"max_pool2d: out_chunks .* got \(3, 3\)"):
        fd.max_pool2d(x, 2, out_chunks=((3, 3), 2))
    with pytest.raises(ValueError, match=r"max_pool2d: align must be one of .* 'middle'"):
        fd.max_pool2d(x, 2, align="middle")
    with pytest.raises(ValueError, match=r"max_pool2d: padding must be at most half"):
        fd.max_pool2d(x, 2, padding=2)
    with pytest.raises(TypeError, match=r"avg_pool2d: input dtype int64 is not supported"):
        fd.avg_pool2d(x.astype(np.int64), 2)
    with pytest.raises(ValueError, match=r"global_max_pool2d: split_every must be"):
        fd.global_max_pool2d(x, split_every=1)
    with pytest.raises(TypeError, match=r"max_pool2d_backward: grad_output must be a dask"):
        fd.max_pool2d_backward(np.zeros((1, 1, 4, 4)), x, (1, 1, 8, 8))


def test_indices_above_2_to_the_31():
    # A lazy (1, 1, 65536, 32769) plane: 2**31 + 65536 elements, never materialised.
    height, width = 65536, 32769

    def block(block_info=None):
        (h0, h1), (w0, w1) = block_info[None]["array-location"][2:]
        h = np.arange(h0, h1, dtype=np.int64)[:, None]
        w = np.arange(w0, w1, dtype=np.int64)[None, :]
        return (((h * 7919 + w * 104729) % 1009).astype(np.float32))[None, None]

    x = da.map_blocks(block, chunks=((1,), (1,), (4096,) * 16, (8192,) * 4 + (1,)),
                      dtype=np.float32)
    out, idx = fd.max_pool2d(x, 3, 2, 1, return_indices=True)
    region = (slice(None), slice(None), slice(-512, None), slice(-256, None))
    with dask.config.set(scheduler="sync"):
        got, got_idx = dask.compute(out[region], idx[region])
    # The in-memory op on the corresponding input region (odd start: padding 1).
    h0, w0 = 2 * (out.shape[2] - 512) - 1, 2 * (out.shape[3] - 256) - 1
    piece = block({None: {"array-location": [(0, 1), (0, 1), (h0, height), (w0, width)]}})
    want, local = fastpool.max_pool2d(piece, 3, 2, 0, ceil_mode=True, return_indices=True)
    want, local = want[..., :512, :256], local[..., :512, :256]
    expected_idx = (local // piece.shape[3] + h0) * width + local % piece.shape[3] + w0
    assert_array_equal(got, want)
    assert_array_equal(got_idx, expected_idx)
    assert got_idx.max() > 2**31


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_threaded_scheduler_caps_kernel_threads(layer, tmp_path):
    """Kernels in dask's worker threads get cores // threads numba threads each, and
    run under every threading layer (workqueue in a fresh process)."""
    if layer == "default":
        seen = []
        original = fd.kernel_threads

        x = da.random.default_rng(0).standard_normal((4, 2, 64, 64), chunks=(1, 2, 32, 32))
        with dask.config.set(scheduler="threads", num_workers=2):
            got = fd.avg_pool2d(x, 3, 2, 1).compute()
            seen = x.map_blocks(lambda b: np.full(b.shape, original(), np.int8),
                                dtype=np.int8).compute()
        assert_array_equal(got, fastpool.avg_pool2d(x.compute(scheduler="sync"), 3, 2, 1))
        assert seen.max() == max(1, fastpool.get_num_threads() // 2)
        return
    import subprocess
    import sys
    script = (
        "import numpy as np, dask, dask.array as da, fastpool, fastpool.dask as fd, numba\n"
        # Blocks large enough that their kernels run in parallel on workqueue too.
        "x = da.random.default_rng(0).standard_normal((8, 16, 128, 128), "
        "chunks=(1, 16, 128, 128))\n"
        "with dask.config.set(scheduler='threads', num_workers=4):\n"
        "    got = fd.max_pool2d(x, 3, 2, 1).compute()\n"
        "assert np.array_equal(got, fastpool.max_pool2d(x.compute(), 3, 2, 1))\n"
        "print(numba.threading_layer())\n")
    env = {**__import__("os").environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "workqueue"


def test_min_pooling_through_pool_equals_in_memory():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 17, 19)).astype(np.uint8)
    d = da.from_array(x, chunks=(1, 2, 6, 7))
    out, indices = fastpool.dask.pool(d, "min", (3, 3), 2, 1, return_indices=True)
    want, want_indices = fastpool.pool(x, "min", (3, 3), 2, 1, return_indices=True)
    np.testing.assert_array_equal(out.compute(), want)
    np.testing.assert_array_equal(indices.compute(), want_indices)


def _live_input_blocks(y, x) -> int:
    """Most input blocks held at once when y's graph runs one task at a time in
    dask.order's order, with the single final task dask.compute adds."""
    from dask._task_spec import convert_legacy_graph
    from dask.core import get_deps
    from dask.order import order

    dsk = dict(y.__dask_graph__())
    dsk["finalize"] = (list, list(y.__dask_keys__()))  # one leaf, as compute and store
    dsk = convert_legacy_graph(dsk)
    deps, dependents = get_deps(dsk)
    left = {k: len(v) for k, v in dependents.items()}
    held = most = 0
    for key in sorted(dsk, key=order(dsk).get):
        held += isinstance(key, tuple) and key[0] == x.name
        most = max(most, held)
        for dep in deps[key]:
            left[dep] -= 1
            held -= left[dep] == 0 and isinstance(dep, tuple) and dep[0] == x.name
    return most


@pytest.mark.parametrize("args", [(3, 2, 1), (3, 2, 0), (2, 2, 0)])
def test_halo_graph_reads_few_blocks_and_memory_is_independent_of_the_size(args):
    """Each output task depends on at most 2 input blocks per pooled axis (its own
    block, halo slices of the neighbours); and dask.order keeps a bounded number
    of input blocks in memory however deep the array (no compute: graph only)."""
    held = []
    for depth in (4, 8, 16):
        x = da.zeros((1, 1, 4 * depth, 16, 16), dtype=np.float32, chunks=(1, 1, 4, 8, 8))
        y = fd.max_pool3d(x, *args)
        dsk = dict(y.__dask_graph__())
        from dask.core import get_dependencies

        outputs = [k for k in dsk if isinstance(k, tuple) and k[0] == y.name]
        for key in outputs:
            # input blocks read, directly or through their halo-cutting task
            sources = {dep[1:] for dep in get_dependencies(dsk, key)
                       if dep[0] == x.name or "halo" in dep[0]}
            assert len(sources) <= 2 ** 3
        assert not any("rechunk" in n or "overlap" in n for n in y.dask.layers)
        held.append(_live_input_blocks(y, x))
    assert held[0] == held[1] == held[2] <= 12, held


@pytest.mark.parametrize("name, nd, args, kwargs", [
    ("max_pool3d", 3, (3, 2, 1), dict(return_indices=True)),
    # dilated windows starting in the padding: starts not in order (2, 0, 1, ...)
    ("max_pool1d", 1, (3, 1, 1, 3), dict(return_indices=True)),
    ("max_pool2d", 2, ((3, 2), (2, 1), 1, (2, 1), True), dict(return_indices=True,
                                                              channels_last=True)),
    ("avg_pool2d", 2, (3, 2, 1, True, False), {}),
    ("avg_pool3d", 3, ((3, 2, 3), 1, (1, 0, 1)), dict(divisor_override=5)),
    ("lp_pool2d", 2, (2.0, 3, 2, True), {}),
    ("adaptive_max_pool2d", 2, ((5, 7), True), {}),
    ("adaptive_avg_pool3d", 3, ((3, 4, 5),), {}),
])
def test_contiguous_blocks_run_in_place_and_equal_in_memory(name, nd, args, kwargs):
    """Contiguous blocks (as a store or generator makes them) are pooled where they
    lie, only the rims that read halos joined: the same values and indices."""
    import fastpool.dask._core as core

    shape = (2, 3) + (13, 17, 15)[3 - nd:]
    x = np.random.default_rng(5).integers(-4, 5, shape).astype(np.float64)
    if kwargs.get("channels_last"):
        x = np.ascontiguousarray(to_channels_last(x, nd))
    chunks = tuple((1, 1) if s == 2 else (2, 1) if s == 3 else (6, 4, s - 10)
                   for s in x.shape)
    lazy = da.from_array(x, chunks=chunks).map_blocks(np.copy)
    runs = []
    split = core.PoolTask._run_split

    def counted(self, blocks):
        result = split(self, blocks)
        runs.append(result is not None)
        return result

    core.PoolTask._run_split = counted
    try:
        got = getattr(fd, name)(lazy, *args, **kwargs)
        want = getattr(fastpool, name)(x, *args, **kwargs)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        with dask.config.set(scheduler="sync"):
            for g, w in zip(got, want):
                assert_eq(g, w, check_graph=False)
    finally:
        core.PoolTask._run_split = split
    assert any(runs)  # the in-place path ran


IRREGULAR = (1, (2, 1), (5, 3, 5), (4, 7))  # batch, channels and two spatial axes


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_global_pool_modes_and_min_ops_equal_in_memory(dtype):
    """global_pool{n}d's five modes, and the min ops' values and indices (NaN,
    ties across blocks: small integers), equal the in-memory ops."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, (2, 3, 13, 11)).astype(dtype)
    if dtype == np.float32:
        x[0, 1, 7, 3] = np.nan
    lazy = da.from_array(x, chunks=IRREGULAR)
    floats = dtype == np.float32
    cases = [("min_pool2d", (3, 2, 1), dict(return_indices=True, dilation=(1, 2))),
             ("adaptive_min_pool2d", ((5, 4), True), {}),
             ("global_min_pool2d", (True, True), {})]
    for mode in ("max", "min") + (("avg", "avgmax", "catavgmax") if floats else ()):
        cases.append(("global_pool2d", (mode, mode == "avg", mode != "avg"), {}))
    with dask.config.set(scheduler="sync"):
        for name, args, kwargs in cases:
            got = getattr(fd, name)(lazy, *args, **kwargs)
            want = getattr(fastpool, name)(x, *args, **kwargs)
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape, name
                if "avg" in str(args):  # float64 block sums: to rounding
                    assert_allclose(g.compute(), w, rtol=1e-6)
                else:
                    assert_eq(g, w, check_graph=False)


@pytest.mark.parametrize("window", [dict(kernel_size=3, stride=2), dict(output_size=(4, 3)),
                                    dict()])
@pytest.mark.parametrize("p", [3.0, 2.5, (1.0, 2.0, 3.5)])
def test_gem_pool_equals_in_memory(window, p):
    x = np.abs(np.random.default_rng(4).standard_normal((2, 3, 13, 11))).astype(np.float32)
    x[0, 0, :2] = 0  # below eps
    got = fd.gem_pool2d(da.from_array(x, chunks=IRREGULAR), p, **window)
    want = fastpool.gem_pool2d(x, p, **window)
    with dask.config.set(scheduler="sync"):
        assert got.dtype == want.dtype
        # to an ulp: the in-memory CPU op is one fused kernel, the dask op a
        # composition (and one mean per plane a tree of float64 block sums)
        assert_eq(got, want, check_graph=False, rtol=3e-7, atol=0)
        if p == (1.0, 2.0, 3.5) and window.get("kernel_size"):
            half = x.astype(np.float16)
            last = np.ascontiguousarray(to_channels_last(half, 2))
            got = fd.gem_pool2d(da.from_array(last, chunks=(1, (5, 8), (3, 8), 2)), p,
                                channels_last=True, **window)
            assert_eq(got, fastpool.gem_pool2d(last, p, channels_last=True, **window),
                      check_graph=False)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, float("inf")])
def test_lp_pool_backward_equals_in_memory(norm_type):
    rng = np.random.default_rng(6)
    x = rng.integers(-3, 4, (2, 3, 13, 11)).astype(np.float64)
    lazy = da.from_array(x, chunks=IRREGULAR)
    with dask.config.set(scheduler="sync"):
        for args in [(3, 2), ((3, 2), 1, True)]:
            y = fastpool.lp_pool2d(x, norm_type, *args)
            grad = rng.standard_normal(y.shape)
            got = fd.lp_pool2d_backward(da.from_array(grad, chunks=(1, 3, 3, 2)), lazy,
                                        norm_type, *args)
            want = fastpool.lp_pool2d_backward(grad, x, norm_type, *args)
            assert got.chunks == lazy.chunks
            assert_eq(got, want, check_graph=False)


def test_new_ops_errors_name_op_and_argument():
    x = da.ones((1, 3, 8, 8), chunks=4)
    with pytest.raises(ValueError, match="gem_pool2d.*p must be positive"):
        fd.gem_pool2d(x, -1.0)
    with pytest.raises(TypeError, match="gem_pool2d.*p must be a positive float or one per"):
        fd.gem_pool2d(x, [1.0, 2.0])
    with pytest.raises(ValueError, match="gem_pool2d.*eps"):
        fd.gem_pool2d(x, eps=0)
    with pytest.raises(TypeError, match="gem_pool2d.*x must be a dask array"):
        fd.gem_pool2d(np.ones((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="global_pool2d.*mode must be one of"):
        fd.global_pool2d(x, "median")
    with pytest.raises(TypeError, match="lp_pool2d_backward.*x must be a dask array"):
        fd.lp_pool2d_backward(fd.lp_pool2d(x, 2.0, 2), np.ones((1, 3, 8, 8)), 2.0, 2)
    with pytest.raises(TypeError, match="lp_pool2d_backward.*x dtype int64"):
        fd.lp_pool2d_backward(fd.lp_pool2d(x, 2.0, 2), x.astype(np.int64), 2.0, 2)
    with pytest.raises(ValueError, match="lp_pool2d_backward: grad_output has shape"):
        fd.lp_pool2d_backward(x, x, 2.0, 2)
