"""fastpool.dask on every scheduler, and out of core on a small dask.distributed cluster."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

import fastpool  # noqa: E402
import fastpool.dask as fd  # noqa: E402

# Worker memory limit and on-disk input size of the out-of-core test.  A worker
# process holds about 210 MiB once numba and the kernels are loaded; with spilling
# off it pauses at 80% of its limit, so each has about 200 MiB for data: the 1 GiB
# input is 2x a worker's whole limit and 5x its room for data.  (Measured peak:
# about 330 MiB per worker.)
WORKER_MEMORY = 512 * 2**20
INPUT_SHAPE = (1, 1, 16384, 16384)  # float32: 1 GiB
INPUT_CHUNKS = (1, 1, 512, 1024)  # 2 MiB


def _values(block_info=None):
    """Deterministic values from global coordinates (ties included), made lazily."""
    (h0, h1), (w0, w1) = block_info[None]["array-location"][2:]
    h = np.arange(h0, h1, dtype=np.int64)[:, None]
    w = np.arange(w0, w1, dtype=np.int64)[None, :]
    return ((h * 7919 + w * 104729) % 1009).astype(np.float32)[None, None]


@pytest.fixture(scope="module")
def cluster():
    # No spilling to disk: holding too much would pause or kill a worker instead.
    with dask.config.set({"distributed.worker.memory.spill": False,
                          "distributed.worker.memory.target": False}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit=WORKER_MEMORY, dashboard_address=None,
                                  silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        yield cluster, client


def test_same_results_on_every_scheduler(cluster):
    _, client = cluster
    x = da.random.default_rng(5).standard_normal((2, 3, 40, 36), chunks=(1, 2, 9, 10))
    x0 = x.compute(scheduler="sync")
    want_max, want_idx = fastpool.max_pool2d(x0, 3, 2, 1, return_indices=True)
    want_avg = fastpool.avg_pool2d(x0, 3, 2, 1, count_include_pad=False)
    want_gmax = fastpool.global_max_pool2d(x0, return_indices=True)
    lazy = (*fd.max_pool2d(x, 3, 2, 1, return_indices=True),
            fd.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
            *fd.global_max_pool2d(x, return_indices=True))
    want = (want_max, want_idx, want_avg, *want_gmax)
    for scheduler in ("sync", "threads", "processes", client):
        if isinstance(scheduler, str):
            got = dask.compute(*lazy, scheduler=scheduler)
        else:
            got = scheduler.compute(list(lazy), sync=True)
        for g, w in zip(got, want):
            assert_array_equal(g, w)


def test_out_of_core_zarr_to_zarr(cluster, tmp_path):
    zarr = pytest.importorskip("zarr")
    local_cluster, client = cluster
    workers = set(client.scheduler_info()["workers"])
    source = da.map_blocks(_values, chunks=tuple((c,) * (s // c) for s, c in
                                                 zip(INPUT_SHAPE, INPUT_CHUNKS)),
                           dtype=np.float32)
    assert source.nbytes >= 2 * WORKER_MEMORY
    # Uncompressed Zarr arrays: the test times the pooling, not zstd.
    store = zarr.create_array(str(tmp_path / "in.zarr"), shape=source.shape,
                              chunks=INPUT_CHUNKS, dtype=np.float32, compressors=None)
    client.compute(da.store(source, store, lock=False, compute=False), sync=True)
    x = da.from_zarr(str(tmp_path / "in.zarr"))
    out = fd.max_pool2d(x, 3, 2, 1, align="output")
    assert out.chunks[2] == (256,) * 32  # regular: a Zarr writer's chunks
    target = zarr.create_array(str(tmp_path / "out.zarr"), shape=out.shape,
                               chunks=(1, 1, 256, 512), dtype=np.float32, compressors=None)
    client.compute(da.store(out, target, lock=False, compute=False), sync=True)
    # No worker was killed (a restarted worker gets a new address) ...
    assert set(client.scheduler_info()["workers"]) == workers
    # ... and the output matches the in-memory op on the corresponding region.
    written = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    for oh, ow in [(0, 0), (3000, 4000), (8191, 8191)]:
        h0, w0 = max(2 * oh - 1, 0), max(2 * ow - 1, 0)
        h1, w1 = min(2 * oh + 64, INPUT_SHAPE[2]), min(2 * ow + 64, INPUT_SHAPE[3])
        piece = _values({None: {"array-location": [(0, 1), (0, 1), (h0, h1), (w0, w1)]}})
        pad_h, pad_w = int(oh == 0), int(ow == 0)
        want = fastpool.pool(np.pad(piece, ((0, 0), (0, 0), (pad_h, 0), (pad_w, 0)),
                                    constant_values=-np.inf), "max", (3, 3), 2)
        got = np.asarray(written[:, :, oh:oh + want.shape[2], ow:ow + want.shape[3]])
        assert_array_equal(got, want[:, :, :got.shape[2], :got.shape[3]])
