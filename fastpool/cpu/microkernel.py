"""A register-blocked GEMM micro-kernel: the convolution's arithmetic at the core's peak.

:func:`multiply_tile` adds ``A @ B`` to a tile of ``C``, :data:`TILE_ROWS` rows by
:func:`tile_columns` columns, keeping the whole tile in vector registers while it
runs down the shared depth: each step loads one row of ``B`` (a few vectors),
broadcasts one value of ``A`` per tile row, and issues one fused multiply-add per
register.  That is BLAS's innermost loop (OpenBLAS's and BLIS's micro-kernels),
and what oneDNN's convolutions run; written in plain numba loops, LLVM keeps the
tile in memory (the loop's stores might alias the loads), and the multiply-adds
ran at 5-9 GFLOP/s against this kernel's 260 (one core of the Zen 5 benchmark
machine, float32).  So the loop is written as LLVM IR, through a numba
intrinsic: vectors of the host's widest registers, the tile's accumulators as
loop-carried values (which LLVM allocates to registers), ``llvm.fmuladd`` for
the multiply-add.

The tile's shape fits the register file: with 512-bit registers (AVX-512, 32 of
them) 6 rows by 4 vectors, 24 accumulators; with 256-bit or 128-bit ones (16
registers) 6 rows by 2 vectors, 12 accumulators; the rest hold ``B``'s row and
the broadcast.  Operands are addressed as element offsets into any C-contiguous
array, so callers pass their arrays as they are and walk them with offsets:

* ``C[r, j]`` at ``c_at + r*c_row + j``,
* ``A[r, k]`` at ``a_at + r*a_row + k`` (a row's depth is contiguous),
* ``B[k, j]`` at ``b_at + k*b_row + j`` (a row's columns are contiguous).

The caller keeps every one of those elements inside its array (the kernel
reads and writes the whole tile, so callers pad their scratch to whole tiles).
Sums run in the arrays' dtype, each ``C`` element's in order of ``k``.
"""

from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as llvm
from llvmlite import ir
from numba import config, types
from numba.core.typing import signature
from numba.extending import intrinsic

# Rows of a tile: the broadcasts per depth step that each ``B`` vector serves.
TILE_ROWS = 6


def _vector_bytes() -> int:
    """The widest vector registers numba compiles for: 64 bytes with AVX-512, 32
    with AVX, else 16 (SSE, NEON)."""
    if config.CPU_FEATURES:
        features = config.CPU_FEATURES
    elif config.CPU_NAME in (None, "host"):
        features = llvm.get_host_cpu_features().flatten()
    else:  # a named target (a portable cache): its features are not the host's
        features = ""
    if "+avx512f" in features:
        return 64
    return 32 if "+avx" in features else 16


VECTOR_BYTES = _vector_bytes()
# Vectors across a tile: 24 accumulators in AVX-512's 32 registers, else 12 of 16.
TILE_VECTORS = 4 if VECTOR_BYTES == 64 else 2


def tile_columns(itemsize: int, vectors: int = TILE_VECTORS) -> int:
    """Columns of a tile of ``vectors`` vectors (a whole tile's by default) for
    elements of ``itemsize`` bytes (64 float32 or 32 float64 with AVX-512, 16 or 8
    with AVX)."""
    return vectors * VECTOR_BYTES // itemsize


def tile_vectors(channels: int, itemsize: int) -> int:
    """The vectors across a tile (1 to :data:`TILE_VECTORS`) that sum ``channels``
    columns fastest: the fewest vectors of columns, padding included, then the
    widest tile.  A whole tile over 16 or 32 float32 channels summed three quarters
    or half zeros; a one-vector tile counts as 4/3 of its vectors, its 6
    accumulators too few for the multiply-adds in flight (8, on two FMA pipes)."""

    def cost(vectors):
        padded = -(-channels // tile_columns(itemsize, vectors)) * vectors
        return (padded * (4 if vectors == 1 else 3), -vectors)

    return min(range(1, TILE_VECTORS + 1), key=cost)


@intrinsic
def multiply_tile(typingctx, rows, c, c_at, c_row, a, a_at, a_row, a_step, b, b_at, b_row,
                  depth, blocks, a_block, b_block, vectors):
    """Add ``A @ B`` to a tile of ``C``: for ``r < rows``, ``j <`` the tile's columns,
    ``C[r, j] += A[t, r, k] * B[t, k, j]`` summed over ``t < blocks``, then
    ``k < depth``, in that order.

    ``rows``: up to :data:`TILE_ROWS` (more count as that many); a tile of fewer rows,
    the tail of a row of outputs, runs two rows at a time, then one (see
    ``_emit_tail``), whose multiply-adds are only the rows'.  The arrays share one
    float dtype; the other arguments are integers, element offsets and strides
    (see the module): ``C[r, j]`` at ``c_at + r*c_row + j``, ``A[t, r, k]`` at
    ``a_at + t*a_block + r*a_row + k*a_step``, ``B[t, k, j]`` at
    ``b_at + t*b_block + k*b_row + j``.  ``vectors``: the tile's width in vectors, a
    constant of the caller (a literal int, 1 to :data:`TILE_VECTORS`): its columns
    are :func:`tile_columns`.
    """
    arrays = (c, a, b)
    integers = (rows, c_at, c_row, a_at, a_row, a_step, b_at, b_row, depth, blocks, a_block,
                b_block)
    if not (all(isinstance(kind, types.Array) and kind.dtype == c.dtype for kind in arrays)
            and c.dtype in (types.float32, types.float64)
            and all(isinstance(kind, types.Integer) for kind in integers)
            and isinstance(vectors, types.IntegerLiteral)
            and 1 <= vectors.literal_value <= TILE_VECTORS):
        return None
    width = vectors.literal_value
    sig = signature(types.void, rows, c, c_at, c_row, a, a_at, a_row, a_step, b, b_at, b_row,
                    depth, blocks, a_block, b_block, vectors)

    def codegen(context, builder, sig, args):
        index = context.get_value_type(types.intp)
        integer = [context.cast(builder, args[i], sig.args[i], types.intp)
                   for i in (0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14)]
        rows, c_at, c_row, a_at, a_row, a_step, b_at, b_row, depth, blocks, a_block, b_block = \
            integer

        def start(i, at):
            array = context.make_array(sig.args[i])(context, builder, args[i])
            return builder.gep(array.data, [at])

        operands = _Operands(start(1, c_at), c_row, start(4, a_at), a_row, a_step,
                             start(8, b_at), b_row, depth, blocks, a_block, b_block)
        after = builder.append_basic_block("tile.after")
        any_work = builder.and_(builder.icmp_signed(">", rows, index(0)), builder.and_(
            builder.icmp_signed(">", depth, index(0)), builder.icmp_signed(">", blocks, index(0))))
        with builder.if_then(builder.not_(any_work)):
            builder.branch(after)
        full = builder.append_basic_block(f"tile.rows{TILE_ROWS}")
        tail = builder.append_basic_block("tile.tail")
        builder.cbranch(builder.icmp_signed(">=", rows, index(TILE_ROWS)), full, tail)
        builder.position_at_end(full)
        _emit_tile(context, builder, c.dtype, TILE_ROWS, width, operands)
        builder.branch(after)
        builder.position_at_end(tail)
        _emit_tail(context, builder, c.dtype, rows, width, operands, after)
        builder.position_at_end(after)
        return context.get_dummy_value()

    return sig, codegen


class _Operands(NamedTuple):
    """The tile's operands in LLVM values: pointers to ``C[0, 0]``, ``A[0, 0, 0]`` and
    ``B[0, 0, 0]``, and the strides and counts (``intp``)."""

    c: object
    c_row: object
    a: object
    a_row: object
    a_step: object
    b: object
    b_row: object
    depth: object
    blocks: object
    a_block: object
    b_block: object


def _emit_tail(context, builder, dtype, rows, width, operands, after):
    """The tile of fewer than :data:`TILE_ROWS` rows (``rows``, positive), from the
    current block, then a branch to ``after``: pairs of rows, then a last row.

    Each row count compiled a variant of its own, 70% of the convolution kernels'
    first-call compile; two rows hold as many accumulators as the core keeps
    multiply-adds in flight (8 vectors, or 4 on 16-register cores), so a tail runs
    nearly as fast in pairs.  Each element's sum runs as in a full tile."""
    index = context.get_value_type(types.intp)
    entry = builder.block
    pairs = builder.append_basic_block("tile.pairs")
    pair = builder.append_basic_block("tile.pair")
    last = builder.append_basic_block("tile.last_row")
    builder.branch(pairs)

    def from_row(row):
        """``operands`` for the tile whose row 0 is row ``row``."""
        return operands._replace(c=builder.gep(operands.c, [builder.mul(row, operands.c_row)]),
                                 a=builder.gep(operands.a, [builder.mul(row, operands.a_row)]))

    builder.position_at_end(pairs)  # row: the first row not yet summed
    row = builder.phi(index)
    row.add_incoming(index(0), entry)
    builder.cbranch(builder.icmp_signed(">=", builder.sub(rows, row), index(2)), pair, last)
    builder.position_at_end(pair)
    _emit_tile(context, builder, dtype, 2, width, from_row(row))
    row.add_incoming(builder.add(row, index(2)), builder.block)
    builder.branch(pairs)
    builder.position_at_end(last)
    single = builder.append_basic_block("tile.row")
    builder.cbranch(builder.icmp_signed("<", row, rows), single, after)
    builder.position_at_end(single)
    _emit_tile(context, builder, dtype, 1, width, from_row(row))
    builder.branch(after)


def _not_unrolled(module):
    """A loop's ``llvm.loop`` metadata (a node that names itself first) that keeps
    LLVM from unrolling it.

    LLVM unrolled the tile's depth loop 4 times, each of the tile's three row
    counts: a third of a convolution kernel's machine code, 0.1-0.4 s of its
    compile, for no speed a run could measure (a step is 12 to 24 multiply-adds)."""
    disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    # A node of its own, made as add_metadata makes one but not from its cache: the
    # cache would hand every loop (and any later empty node) the one node named here.
    loop = ir.values.MDValue(module, (), name=str(len(module.metadata)))
    loop.operands = (loop, disable)
    return loop


def _emit_tile(context, builder, dtype, rows, width, operands):
    """The loops of a tile of ``rows`` rows by ``width`` vectors, from the current block
    (where the depth and blocks are known to be positive) to a block left current
    for the caller."""
    index = context.get_value_type(types.intp)
    itemsize = dtype.bitwidth // 8
    lanes = VECTOR_BYTES // itemsize
    vector = ir.VectorType(context.get_value_type(dtype), lanes)
    o = operands

    def vector_at(pointer, offset):
        return builder.bitcast(builder.gep(pointer, [offset]), vector.as_pointer())

    name = f"llvm.fmuladd.v{lanes}f{dtype.bitwidth}"
    fmuladd = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(vector, [vector] * 3), name)
    c_vectors = [[vector_at(o.c, builder.add(builder.mul(o.c_row, index(r)), index(v * lanes)))
                  for v in range(width)] for r in range(rows)]
    initial = [[builder.load(at, align=itemsize) for at in row] for row in c_vectors]
    entry = builder.block
    block_loop = builder.append_basic_block("tile.block")
    depth_loop = builder.append_basic_block("tile.depth")
    latch = builder.append_basic_block("tile.next_block")
    done = builder.append_basic_block("tile.done")
    builder.branch(block_loop)

    def join(phis, values, block):
        """Give each accumulator's phi its value from ``block``."""
        for phi_row, value_row in zip(phis, values):
            for phi, value in zip(phi_row, value_row):
                phi.add_incoming(value, block)

    def phis(values, block):
        """A phi per accumulator, first given ``values`` from ``block``."""
        made = [[builder.phi(vector) for _ in range(width)] for _ in range(rows)]
        join(made, values, block)
        return made

    def close_loop(counter, entered_from, sums, values, limit, loop, after):
        """End the current block, the last of a loop over ``counter`` (a phi, 0 on
        entry from ``entered_from``): step the counter, give the loop's accumulator
        phis ``sums`` their next ``values``, and branch back to ``loop`` while the
        counter is below ``limit``, else to ``after``."""
        block = builder.block
        following = builder.add(counter, index(1))
        counter.add_incoming(index(0), entered_from)
        counter.add_incoming(following, block)
        join(sums, values, block)
        branch = builder.cbranch(builder.icmp_signed("<", following, limit), loop, after)
        branch.set_metadata("llvm.loop", _not_unrolled(builder.module))

    # The accumulators are the loops' phis, so they live in registers; the updated
    # sums of the depth loop close both loops (added below).
    builder.position_at_end(block_loop)
    t = builder.phi(index)
    block_sums = phis(initial, entry)
    a_t = builder.gep(o.a, [builder.mul(t, o.a_block)])
    b_t = builder.gep(o.b, [builder.mul(t, o.b_block)])
    a_rows = [builder.gep(a_t, [builder.mul(o.a_row, index(r))]) for r in range(rows)]
    builder.branch(depth_loop)

    # One depth step: a row of B, a broadcast per tile row, a multiply-add per register.
    builder.position_at_end(depth_loop)
    k = builder.phi(index)
    sums = phis(block_sums, block_loop)
    b_k = builder.gep(b_t, [builder.mul(k, o.b_row)])
    b_vectors = [builder.load(vector_at(b_k, index(v * lanes)), align=itemsize)
                 for v in range(width)]
    a_k = builder.mul(k, o.a_step)
    first_lane = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    updated = []
    for r in range(rows):
        value = builder.load(builder.gep(a_rows[r], [a_k]))
        lane = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                      ir.IntType(32)(0))
        splat = builder.shuffle_vector(lane, ir.Constant(vector, ir.Undefined), first_lane)
        updated.append([builder.call(fmuladd, [splat, b_vectors[v], sums[r][v]])
                        for v in range(width)])
    close_loop(k, block_loop, sums, updated, o.depth, depth_loop, latch)

    builder.position_at_end(latch)
    close_loop(t, entry, block_sums, updated, o.blocks, block_loop, done)

    builder.position_at_end(done)
    for value_row, at_row in zip(updated, c_vectors):
        for value, at in zip(value_row, at_row):
            builder.store(value, at, align=itemsize)


def block_lanes(itemsize: int) -> int:
    """The side of :func:`transpose_block`'s square: a vector's lanes (16 float32 with
    AVX-512, 8 with AVX)."""
    return VECTOR_BYTES // itemsize


@intrinsic
def transpose_block(typingctx, source, s_at, s_row, target, t_at, t_row):
    """Copy a square block, ``L`` by ``L`` (:func:`block_lanes`), transposed:
    ``target[t_at + j*t_row + i] = source[s_at + i*s_row + j]`` for ``i, j < L``.

    A channels-first to channels-last copy stores each value ``C`` apart, a lane at a
    time; this loads ``L`` rows as vectors, transposes them in registers and stores
    ``L`` vectors: ``log2(L)`` rounds of two-vector shuffles, each swapping the
    off-diagonal ``b`` by ``b`` blocks of every ``2b`` by ``2b`` block (``b`` = 1, 2,
    4, ...), after which the value of row ``i``, column ``j`` is at row ``j``, column
    ``i``.  Both arrays share one float dtype; the offsets and strides are elements
    (the caller keeps the block inside both arrays)."""
    if not (isinstance(source, types.Array) and isinstance(target, types.Array)
            and source.dtype == target.dtype
            and source.dtype in (types.float32, types.float64)
            and all(isinstance(kind, types.Integer) for kind in (s_at, s_row, t_at, t_row))):
        return None
    sig = signature(types.void, source, s_at, s_row, target, t_at, t_row)

    def codegen(context, builder, sig, args):
        dtype = sig.args[0].dtype
        itemsize = dtype.bitwidth // 8
        lanes = block_lanes(itemsize)
        vector = ir.VectorType(context.get_value_type(dtype), lanes)
        s_at, s_row, t_at, t_row = (context.cast(builder, args[i], sig.args[i], types.intp)
                                    for i in (1, 2, 4, 5))

        def start(i, at):
            array = context.make_array(sig.args[i])(context, builder, args[i])
            return builder.gep(array.data, [at])

        def vector_at(pointer, row, step):
            at = builder.gep(pointer, [builder.mul(step, s_row.type(row))])
            return builder.bitcast(at, vector.as_pointer())

        source_start, target_start = start(0, s_at), start(3, t_at)
        rows = [builder.load(vector_at(source_start, i, s_row), align=itemsize)
                for i in range(lanes)]
        block = 1
        while block < lanes:
            swapped = list(rows)
            for i in range(lanes):
                if i & block:
                    continue
                upper, lower = rows[i], rows[i + block]
                # Row i keeps its columns whose bit `block` is clear and takes row
                # i + block's ones below them; row i + block the reverse.
                keep = [p if not p & block else lanes + p - block for p in range(lanes)]
                take = [lanes + p if p & block else p + block for p in range(lanes)]
                swapped[i] = builder.shuffle_vector(upper, lower, ir.Constant(
                    ir.VectorType(ir.IntType(32), lanes), keep))
                swapped[i + block] = builder.shuffle_vector(upper, lower, ir.Constant(
                    ir.VectorType(ir.IntType(32), lanes), take))
            rows, block = swapped, block * 2
        for j, value in enumerate(rows):
            builder.store(value, vector_at(target_start, j, t_row), align=itemsize)
        return context.get_dummy_value()

    return sig, codegen
