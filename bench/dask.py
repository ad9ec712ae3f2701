"""fastpool.dask's benchmark: a 2-D pyramid and a 3-D max pool on 256 MB to GB inputs.

``python -m bench.dask`` runs it with dask's threaded scheduler.  Each case is
timed on an input held in memory (``da.from_array``) while it fits under
``--in-memory-limit``, against in-memory fastpool on the same array: dask stores
its results into NumPy arrays (``da.store``: what a user does to get the result
in memory; ``dask.compute`` would concatenate the blocks once more at the end),
and the runs alternate so that all see the same load on a shared machine (the
ratio: minimum over minimum, and median over median; the ratio to stored: the
same against the in-memory op whose results are then copied into the same
arrays, the same sink; the CPU s ratio: median process CPU time, all threads,
over the in-memory op's).
Then a lazily generated input of every size is pooled into a sink that drops
the blocks (so nothing of the size of the array is held): throughput in GB/s of
input and the process's peak memory above its baseline, which should stay a
small multiple of the chunk size times the threads whatever the size.

``--chunking slabs`` (the default) cuts the input along its outermost pooled
axis only, in blocks of about 64 MiB: blocks of an in-memory array are then
contiguous views that the kernels read where they lie.  ``--chunking tiles``
cuts every pooled axis (2048 x 2048 and 64 x 256 x 512 blocks), as image stores
often do: each block of an in-memory array is then a strided view, which the
kernels (contiguous input only) need copied first.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import fastpool

GB = 1e9


class _Peak:
    """Peak memory allocated (NumPy arrays included) while in the block, from
    tracemalloc: unlike the resident size it is not inflated by freed memory the
    allocator keeps."""

    def __enter__(self):
        import tracemalloc

        tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        import tracemalloc

        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    @property
    def above_base(self) -> float:
        return (self.peak - self.base) / 2**20


class _Sink:
    """A ``da.store`` target that drops what it is given."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = shape, dtype, len(shape)

    def __setitem__(self, key, value):
        pass


def _lazy(shape, chunks, seed=0):
    """A float32 dask array of ``shape`` whose blocks are copies of one random block."""
    import dask.array as da

    template = np.random.default_rng(seed).standard_normal(chunks).astype(np.float32)

    def block(block_info=None):
        shape_ = block_info[None]["chunk-shape"]
        return template[tuple(slice(0, s) for s in shape_)].copy()

    return da.map_blocks(block, chunks=da.core.normalize_chunks(chunks, shape),
                         dtype=np.float32, meta=np.empty((0,) * len(shape), np.float32))


def _cases(chunking):
    """(name, chunks for a shape, shape for a size, dask op, in-memory op) per case."""
    import fastpool.dask as fd

    def shape_2d(size):
        side = max(1, round((size * GB / 4) ** 0.5 / 2048)) * 2048
        return (1, side, side)

    def shape_3d(size):
        side = 1024
        depth = max(64, round(size * GB / 4 / side**2 / 64) * 64)
        return (1, 1, depth, side, side)

    def slab_2d(shape):
        # about 64 MiB of whole rows, a multiple of 8 rows (the pyramid's 2 ** 3)
        rows = max(8, (64 * 2**20 // (4 * shape[2])) // 8 * 8)
        return (1, rows, shape[2])

    if chunking == "slabs":
        chunks_2d, chunks_3d = slab_2d, (lambda shape: (1, 1, 16, 1024, 1024))
    else:
        chunks_2d, chunks_3d = (lambda shape: (1, 2048, 2048)), (
            lambda shape: (1, 1, 64, 256, 512))
    return [
        ("pyramid2d(avg, 4 levels)", chunks_2d, shape_2d,
         lambda x: fd.pyramid(x, 4, "avg", nd=2)[1:], lambda x: _pyramid_in_memory(x, 4)),
        ("max_pool3d(3, 2, 1)", chunks_3d, shape_3d,
         lambda x: [fd.max_pool3d(x, 3, 2, 1)], lambda x: [fastpool.max_pool3d(x, 3, 2, 1)]),
    ]


def _pyramid_in_memory(x, levels):
    out = []
    for _ in range(levels - 1):
        x = fastpool.avg_pool2d(x, 2)
        out.append(x)
    return out


def _best(function, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _alternating(functions, repeats):
    """Each function's wall times and process CPU times (all threads), the
    functions run in turn ``repeats`` times (so that a shared machine's load falls
    on all of them alike).  The CPU time is the work done, which other processes'
    load disturbs less than the wall time."""
    times = [[] for _ in functions]
    cpu = [[] for _ in functions]
    for _ in range(repeats):
        for function, row, cpu_row in zip(functions, times, cpu):
            start, start_cpu = time.perf_counter(), time.process_time()
            function()
            row.append(time.perf_counter() - start)
            cpu_row.append(time.process_time() - start_cpu)
    return times, cpu


def _in_memory_stored(memory_op, x, targets):
    """The in-memory op's results copied into ``targets``: the same sink as
    :func:`_stored`'s, as a user writing into existing arrays does."""
    for target, output in zip(targets, memory_op(x)):
        target[...] = output
    return targets


def _stored(outputs, targets):
    """``outputs`` computed into the NumPy arrays ``targets``, as a user gets them
    in memory (``dask.compute`` would concatenate the blocks once more at the
    end).  The targets are allocated once per case and reused, so that neither
    side's times include first-touch page faults of the sink."""
    import dask.array as da

    da.store(outputs, targets, lock=False)
    return targets


def main(argv=None) -> list[dict]:
    import dask
    import dask.array as da

    parser = argparse.ArgumentParser(prog="python -m bench.dask", description=__doc__)
    parser.add_argument("--sizes", default="0.25,1,4",
                        help="input sizes in GB (default 0.25,1,4)")
    parser.add_argument("--in-memory-limit", type=float, default=1.0,
                        help="largest size (GB) also run in memory for the ratio")
    parser.add_argument("--threads", type=int, default=None,
                        help="dask threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunking", choices=("slabs", "tiles"), default="slabs",
                        help="blocks of about 64 MiB along the outermost pooled axis "
                             "(default), or 2-D/3-D tiles")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    threads = args.threads or fastpool.get_num_threads()
    print(f"fastpool.dask: threaded scheduler, {threads} dask threads on "
          f"{fastpool.get_num_threads()} cores, float32, {args.chunking}; times min / median "
          f"of {args.repeats}")
    print("| case | input | chunk | in memory s | in memory, stored s | dask (from memory) s "
          "| ratio | ratio to stored | CPU s ratio | dask (lazy input) s | GB/s "
          "| peak MiB allocated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    with dask.config.set(scheduler="threads", num_workers=threads):
        for name, chunks_of, shape_of, dask_op, memory_op in _cases(args.chunking):
            # warm up the kernels and the graph code
            small_shape = shape_of(0.25)
            small_chunks = chunks_of(small_shape)
            small = _lazy(tuple(min(c * 2, s) for c, s in zip(small_chunks, small_shape)),
                          small_chunks)
            dask.compute(*dask_op(small))
            for size in sizes:
                shape = shape_of(size)
                chunks = chunks_of(shape)
                nbytes = int(np.prod(shape)) * 4
                chunk_mb = int(np.prod(chunks)) * 4 / 2**20
                t_mem = t_from = t_mem_stored = ratio = stored_ratio = cpu_ratio = None
                if size <= args.in_memory_limit:
                    x = _lazy(shape, chunks).compute()
                    lazy_x = da.from_array(x, chunks=chunks)
                    targets = [np.empty(o.shape, o.dtype) for o in memory_op(x)]
                    _stored(dask_op(lazy_x), targets)
                    (t_mem, t_mem_stored, t_from), (cpu_mem, _, cpu_from) = _alternating(
                        [lambda: memory_op(x), lambda: _in_memory_stored(memory_op, x, targets),
                         lambda: _stored(dask_op(lazy_x), targets)], args.repeats)
                    ratio = (min(t_from) / min(t_mem),
                             float(np.median(t_from) / np.median(t_mem)))
                    stored_ratio = (min(t_from) / min(t_mem_stored),
                                    float(np.median(t_from) / np.median(t_mem_stored)))
                    cpu_ratio = float(np.median(cpu_from) / np.median(cpu_mem))
                    del x, lazy_x, targets
                lazy = _lazy(shape, chunks)
                outputs = dask_op(lazy)
                sinks = [_Sink(o.shape, o.dtype) for o in outputs]
                with _Peak() as peak:
                    t_lazy = _best(lambda: da.store(outputs, sinks, lock=False),
                                   args.repeats)
                row = dict(case=name, shape=shape, gb=nbytes / GB, chunk_mb=chunk_mb,
                           in_memory_s=t_mem, from_memory_s=t_from, ratio=ratio,
                           cpu_ratio=cpu_ratio, in_memory_stored_s=t_mem_stored,
                           stored_ratio=stored_ratio,
                           lazy_s=t_lazy, gb_per_s=nbytes / GB / t_lazy,
                           peak_mib=peak.above_base)
                rows.append(row)

                def pair(times):
                    return "-" if times is None else \
                        f"{min(times):.3f} / {float(np.median(times)):.3f}"

                def ratios(pair_):
                    return "-" if pair_ is None else f"{pair_[0]:.2f}x / {pair_[1]:.2f}x"

                print(f"| {name} | {row['gb']:.2f} GB {'x'.join(map(str, shape))} | "
                      f"{chunk_mb:.0f} MiB | {pair(t_mem)} | {pair(t_mem_stored)} | "
                      f"{pair(t_from)} | {ratios(ratio)} | {ratios(stored_ratio)}"
                      + f" | {fmt(cpu_ratio, '.2f')}{'' if cpu_ratio is None else 'x'}"
                      + f" | {t_lazy:.3f} | {row['gb_per_s']:.2f} | "
                      f"{row['peak_mib']:.0f} |", flush=True)
    print("Lazy inputs are generated block by block (a copy of one random block), which "
          "the lazy times include.", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
