"""CPU kernels written once, serial, over a share of their tasks.

A kernel's Python function takes ``(part, parts, *arguments)`` and runs part
``part`` of ``parts`` near-equal contiguous shares of its tasks (output rows,
planes, channel blocks; :func:`share` splits them).  :func:`parallel_kernel`
compiles that function once, with ``parallel=False``, and returns a
:class:`TaskKernel`:

* ``kernel.serial(*arguments)`` runs every task in this thread (one share of one);
* ``kernel(*arguments)`` runs one share per numba thread: a launcher hands numba's
  threading layer (on tbb, its task group) a loop that calls the serial build's
  machine code through its address (see ``_launch``); one parallel launch runs at a
  time, and a fork waits for it.

Why not ``@njit(parallel=True)`` on each kernel: numba's parfor passes compile a
``prange`` body a second time, as a gufunc with everything inlined into it, and
small calls want a ``parallel=False`` build of the same source as well, so each
kernel compiled twice.  A call through an address does not link the kernel
into the launcher either (a call of the dispatcher would: LLVM optimises and
emits the kernel's code again there).  So a kernel compiles once, and a small
launcher per argument types.  A cold parallel first call of
average pooling compiled for 5.4 s as a ``parallel=True`` kernel (7.8 s in a
process that ran it serially too), and compiles for 1.3 s as a task kernel,
whatever the process runs.

The kernels compile through :class:`_KernelCompiler`, numba's pipeline with one
more pass, :class:`_PruneKnownBranches` (each build compiles only the code its
optional arguments, None or given, and its :class:`Constant` arguments reach), and
a lowering into a library whose LLVM function passes run at O1
(:class:`_LightlyPreoptimisedLibrary`); the launchers through
:class:`_LauncherCompiler`, whose library skips the module passes as well
(:class:`_LauncherLibrary`).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading

import numpy as np
from llvmlite import binding, ir
from numba import get_num_threads, njit, typeof, types
from numba.core import cgutils, cpu, options
from numba.core import config as numba_config
from numba.core import ir as numba_ir
from numba.core.analysis import dead_branch_prune
from numba.core.codegen import CPUCodegen, JITCodeLibrary
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_lock import global_compiler_lock
from numba.core.compiler_machinery import FunctionPass, register_pass
from numba.core.imputils import impl_ret_borrowed
from numba.core.typed_passes import NativeLowering
from numba.core.typing import signature
from numba.core.typing.typeof import typeof_impl
from numba.core.untyped_passes import InlineInlinables
from numba.extending import intrinsic
from numba.misc.llvm_pass_timings import PassTimingsCollection
from numba.np.arrayobj import get_itemsize, populate_array

from fastpool._config import CPU_JIT_OPTIONS

# The kernels' arrays do not overlap: each kernel writes only outputs and scratch
# that fastpool allocated for the call, and reads its inputs.  numba's flag for that
# (each array argument's data pointer ``noalias`` to LLVM, which then vectorises
# loops that read one array and write another without run-time overlap checks) is
# what its parfor passes set on a ``parallel=True`` kernel's loop body when they find
# no aliases; njit has no option for it, so fastpool maps one.  Without it the
# channels-last backward gather did not vectorise (tests/test_cpu_paths.py).
cpu.CPUTargetOptions.noalias = options.TargetOptions.Mapping("noalias")


class Constant(int):
    """An int argument that kernels compile as a constant: each value gets a build of
    its own (typed as numba's integer literal), where the branches on it are
    decided before lowering (see :class:`_PruneKnownBranches`).  fastpool's L2 norms
    take ``power`` so (``fastpool.cpu.pooling.SQUARE``): their loops compile to
    ``x * x`` alone, and vectorise (a 32x64x56x56 2x2 L2 pool, channels-first:
    3.6 -> 1.7 ms)."""

    def __repr__(self):
        return f"Constant({int(self)})"

    __str__ = int.__repr__  # in messages, the number


@typeof_impl.register(Constant)
def _typeof_constant(value, context):
    return types.literal(int(value))


class _NeverNone:
    """An argument type that is never None, as numba's branch pruning reads a
    literal's (its ``literal_type``: something that is not None)."""

    literal_type = object()


_NEVER_NONE = _NeverNone()
_NOT_NONE_TYPES = (types.Array, types.Number, types.Boolean, types.BaseTuple)


@register_pass(mutates_CFG=True, analysis_only=False)
class _PruneKnownBranches(FunctionPass):
    """Prune branches on ``argument is None`` for arguments of a type that is never
    None, as numba prunes them for arguments typed None.

    The kernels take optional arguments (an Lp ``power``, a ``grad`` for the Lp
    backward's coefficients) and test them with ``is None``; numba decides those
    tests before typing only where the argument *is* None (or a literal), so each
    build with the argument given typed and compiled the code for None as well
    (the channels-last Lp forward compiled the averages' register-window fold, a
    third of its first call).  Run after inlining, so that the tests in inlined
    helpers go too.

    Integer-literal arguments (:class:`Constant` ones, and the literals helpers are
    typed with) become constants of the IR first, so that the tests of their values
    go as well (an L2 norm's ``power == 2.0``: 0.2 s of the first call of
    lp_pool2d_backward)."""

    _name = "fastpool_prune_known_branches"

    def __init__(self):
        FunctionPass.__init__(self)

    def run_pass(self, state):
        _constant_arguments(state.func_ir, state.args)
        dead_branch_prune(state.func_ir, tuple(
            _NEVER_NONE if isinstance(t, _NOT_NONE_TYPES) else t for t in state.args))
        return True


def _constant_arguments(function_ir, argument_types) -> None:
    """Make each integer-literal argument (a :class:`Constant`, or a literal a helper
    was typed with) a constant of the IR where its variable has no other definition:
    numba's branch pruning then decides the tests on it (``power == 2.0``), in the
    kernel and in the helpers inlined into it, before typing and lowering.  (A
    variable assigned again keeps its argument: pruning it by the argument's value
    would drop the branch the other value takes.)"""
    for block in function_ir.blocks.values():
        for statement in block.body:
            if not (isinstance(statement, numba_ir.Assign)
                    and isinstance(statement.value, numba_ir.Arg)
                    and isinstance(argument_types[statement.value.index], types.IntegerLiteral)):
                continue
            definitions = function_ir._definitions[statement.target.name]
            if len(definitions) == 1 and definitions[0] is statement.value:
                value = argument_types[statement.value.index].literal_value
                statement.value = numba_ir.Const(value, statement.value.loc)
                definitions[0] = statement.value


class _LightlyPreoptimisedLibrary(JITCodeLibrary):
    """numba's code library, running its per-function LLVM passes at O1.

    numba optimises each function of a new module with LLVM's O3 function pipeline,
    then the whole module, linked, with the O3 module pipeline, which simplifies and
    vectorises the functions again.  A helper's loops (an interior sweep) were then
    vectorised twice: in the helper's own module, and again once inlined into its
    kernel.  At O1 the first round only cleans numba's IR up for the second
    (skipping it made kernels up to 5x slower): max_pool2d 3x3 stride 2 channels-
    first (32x64x112x112, two threads) runs in 2.15-2.25 ms instead of 2.6-2.7; the
    benchmark suite's other rows moved by no more than its noise (geomean of the
    time ratios 0.99 over two full runs each), and cold first calls by 0-0.1 s.
    (The register-window row functions keep numba's passes: at O1 the channels-last
    3x3 stride-2 max ran 15% slower.)"""

    def _optimize_functions(self, ll_module):
        if not _NEW_PASS_MANAGER:  # numba before 0.62, or its internals moved
            return super()._optimize_functions(ll_module)
        ll_module.data_layout = self._codegen._data_layout
        for function in ll_module.functions:
            manager, builder = self._codegen._function_pass_manager(
                opt=min(1, numba_config.OPT))
            with self._recorded_timings.record(f"Function passes on {function.name!r}",
                                               builder):
                manager.run(function, builder)


class _LauncherLibrary(_LightlyPreoptimisedLibrary):
    """A :class:`_LightlyPreoptimisedLibrary` without the module passes, for the
    launchers: glue that runs once a call (unbox the arguments, pack them, hand the
    shares to the threading layer), whose O3 module passes were half of the LLVM
    time of a build (0.06 of 0.12 s, and a first call builds one per kernel it
    runs).  A tiny call takes as long either way (4.1-4.2 us)."""

    def _optimize_final_module(self):
        pass


def _uses_new_pass_manager() -> bool:
    """Whether numba's codegen has the LLVM new-pass-manager API that
    :class:`_LightlyPreoptimisedLibrary` calls (numba 0.62 on): a function pass
    manager built from keywords alone, and timings recorded with its builder."""
    try:
        managers = inspect.signature(CPUCodegen._function_pass_manager).parameters
        records = inspect.signature(PassTimingsCollection.record).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "llvm_module" not in managers and len(records) >= 3


_NEW_PASS_MANAGER = _uses_new_pass_manager()


@register_pass(mutates_CFG=True, analysis_only=False)
class _KernelLowering(NativeLowering):
    """numba's lowering into a :class:`_LightlyPreoptimisedLibrary`."""

    _name = "fastpool_native_lowering"
    library_class = _LightlyPreoptimisedLibrary

    def run_pass(self, state):
        if state.library is None:  # as NativeLowering makes it
            state.library = state.targetctx.codegen().create_library(
                state.func_id.func_qualname)
            state.library.enable_object_caching()
        if type(state.library) is JITCodeLibrary:
            state.library.__class__ = self.library_class
        return super().run_pass(state)


@register_pass(mutates_CFG=True, analysis_only=False)
class _LauncherLowering(_KernelLowering):
    """numba's lowering into a :class:`_LauncherLibrary`."""

    _name = "fastpool_launcher_lowering"
    library_class = _LauncherLibrary


class _KernelCompiler(CompilerBase):
    """numba's nopython pipeline, pruning :class:`_PruneKnownBranches`' branches too, and
    lowering through :class:`_KernelLowering` (its ``lowering``)."""

    lowering = _KernelLowering

    def define_pipelines(self):
        pipeline = DefaultPassBuilder.define_nopython_pipeline(self.state)
        pipeline.add_pass_after(_PruneKnownBranches, InlineInlinables)
        pipeline.passes = [(self.lowering if kind is NativeLowering else kind, said)
                           for kind, said in pipeline.passes]
        pipeline.finalize()
        return [pipeline]


class _LauncherCompiler(_KernelCompiler):
    """:class:`_KernelCompiler` lowering through :class:`_LauncherLowering`."""

    lowering = _LauncherLowering


# A kernel is called only through its address (see the launcher below): numba's
# wrappers for calls from Python and C (a twentieth of a second a build) go.
KERNEL_JIT_OPTIONS = {**CPU_JIT_OPTIONS, "parallel": False, "noalias": True,
                      "pipeline_class": _KernelCompiler, "no_cpython_wrapper": True,
                      "no_cfunc_wrapper": True}
# The kernels' helpers that are functions of their own (not inlined), called only
# from compiled code: compiled as the kernels are (see _LightlyPreoptimisedLibrary),
# without the wrappers.
HELPER_JIT_OPTIONS = {**KERNEL_JIT_OPTIONS, "noalias": False}
# The same for the implementations of ``overload``s (their jit_options).
OVERLOAD_JIT_OPTIONS = {"error_model": CPU_JIT_OPTIONS["error_model"],
                        "pipeline_class": _KernelCompiler}


@njit(inline="always")
def share(tasks, part, parts):
    """The tasks ``[first, last)`` of part ``part`` of ``parts``: near-equal
    contiguous shares of ``range(tasks)``, as numba's ``prange`` splits them."""
    return tasks * part // parts, tasks * (part + 1) // parts


@intrinsic
def reshaped(typingctx, array, shape):
    """``array.reshape(shape)`` for a C-contiguous array: a view (of its data, owned
    as ``array`` is) of ``shape``, an int or a tuple of ints, one of them -1 at most
    (the size left); ValueError where the sizes do not match, as NumPy's.

    numba's ``reshape`` checks its shape in a function it compiles the first time a
    process compiles one (``normalize_reshape_value``, with its ``enumerate`` and
    exceptions: a sixth of a second of every cold first call, of a kernel's few)."""
    sizes = [shape] if isinstance(shape, types.Integer) else list(shape)
    if not (isinstance(array, types.Array) and array.layout == "C"
            and sizes and all(isinstance(size, types.Integer) for size in sizes)):
        return None
    result = array.copy(ndim=len(sizes), layout="C")

    def codegen(context, builder, sig, args):
        source = context.make_array(sig.args[0])(context, builder, args[0])
        values = [args[1]] if isinstance(shape, types.Integer) else \
            cgutils.unpack_tuple(builder, args[1], len(sizes))
        values = [context.cast(builder, value, size, types.intp)
                  for value, size in zip(values, sizes)]
        intp = context.get_value_type(types.intp)
        known, unknown = intp(1), intp(0)  # the product of the sizes given, the -1s
        for value in values:
            negative = builder.icmp_signed("<", value, intp(0))
            known = builder.mul(known, builder.select(negative, intp(1), value))
            unknown = builder.add(unknown, builder.zext(negative, intp))
        count = source.nitems
        left = builder.select(builder.icmp_signed("==", known, intp(0)), intp(0),
                              builder.sdiv(count, builder.select(
                                  builder.icmp_signed("==", known, intp(0)), intp(1), known)))
        values = [builder.select(builder.icmp_signed("<", value, intp(0)), left, value)
                  for value in values]
        total = intp(1)
        for value in values:
            total = builder.mul(total, value)
        wrong = builder.or_(builder.icmp_signed(">", unknown, intp(1)),
                            builder.icmp_signed("!=", total, count))
        with builder.if_then(wrong, likely=False):
            context.call_conv.return_user_exc(
                builder, ValueError, ("total size of new array must be unchanged",))
        strides = [source.itemsize]
        for value in reversed(values[1:]):
            strides.insert(0, builder.mul(strides[0], value))
        view = context.make_array(sig.return_type)(context, builder)
        populate_array(view, data=source.data,
                       shape=cgutils.pack_array(builder, values, ty=intp),
                       strides=cgutils.pack_array(builder, strides, ty=intp),
                       itemsize=source.itemsize, meminfo=source.meminfo,
                       parent=source.parent)
        return impl_ret_borrowed(context, builder, sig.return_type, view._getvalue())

    return signature(result, array, shape), codegen


def _integer_extreme(typingctx, a, b, predicate):
    """The signature and codegen of ``a`` where ``a <predicate> b`` else ``b``, for two
    integers, in their unified type; None for other types."""
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None
    kind = typingctx.unify_types(a, b)
    if not isinstance(kind, types.Integer):  # (int64 and uint64 unify to float64)
        return None

    def codegen(context, builder, sig, args):
        a_value, b_value = (context.cast(builder, value, given, kind)
                            for value, given in zip(args, sig.args))
        compare = builder.icmp_signed if kind.signed else builder.icmp_unsigned
        return builder.select(compare(predicate, a_value, b_value), a_value, b_value)

    return signature(kind, a, b), codegen


# ``min`` and ``max`` of two integers, for kernels: numba's are overloads, and each
# process's first compile of one (of an int64 pair) compiles an implementation of
# its own, a fiftieth of a second in every cold first call.
@intrinsic
def int_min(typingctx, a, b):
    """The smaller of two integers (``min(a, b)``)."""
    return _integer_extreme(typingctx, a, b, "<=")


@intrinsic
def int_max(typingctx, a, b):
    """The larger of two integers (``max(a, b)``)."""
    return _integer_extreme(typingctx, a, b, ">=")


@intrinsic
def scratch(typingctx, shape, dtype):
    """``np.empty(shape, dtype)`` (C order) for a kernel's scratch, allocated inline.

    numba's ``np.empty`` compiles an implementation of its own for every shape and
    dtype a kernel asks for (a twentieth of a second each, several in a kernel's
    cold first call); this allocates as that implementation does, in the kernel's
    own code (:func:`_allocate`).  ``shape``: an int or a tuple of
    ints (a negative one raises ValueError, as np.empty's); ``dtype``: a numeric NumPy
    scalar type (``np.int64``, ``type(zero)``) or an array's ``dtype``."""
    element = getattr(dtype, "instance_type", getattr(dtype, "dtype", None))
    if not isinstance(element, types.Number):
        return None
    sizes = [shape] if isinstance(shape, types.Integer) else list(shape)
    if not all(isinstance(size, types.Integer) for size in sizes):
        return None
    array = types.Array(element, len(sizes), "C")

    def codegen(context, builder, sig, args):
        values = [args[0]] if isinstance(shape, types.Integer) else \
            cgutils.unpack_tuple(builder, args[0], len(sizes))
        values = [context.cast(builder, value, size, types.intp)
                  for value, size in zip(values, sizes)]
        negative = cgutils.false_bit
        for value in values:
            negative = builder.or_(negative, builder.icmp_signed("<", value, value.type(0)))
        with builder.if_then(negative, likely=False):  # as np.empty
            context.call_conv.return_user_exc(builder, ValueError,
                                              ("negative dimensions not allowed",))
        return _allocate(context, builder, array, values)._getvalue()

    return signature(array, shape, dtype), codegen


@njit(inline="always")
def zeroed(shape, dtype):
    """``np.zeros(shape, dtype)`` for a kernel's scratch (see :func:`scratch`: numba's
    ``np.zeros`` compiles an implementation of its own in each cold process)."""
    array = scratch(shape, dtype)
    values = reshaped(array, -1)
    for i in range(values.size):
        values[i] = 0
    return array


def _allocate(context, builder, array_type, sizes):
    """A new C-order array of ``array_type`` and ``sizes`` (intp values), as numba's
    ``_empty_nd_impl`` makes it (the same checks and errors), but allocated through
    numba's runtime directly: ``_empty_nd_impl`` calls the allocator through a
    function it compiles (``_ol_array_allocate``, a thirtieth of a second of every
    cold first call)."""
    intp = context.get_value_type(types.intp)
    itemsize = intp(get_itemsize(context, array_type))
    count, overflow = intp(1), cgutils.false_bit
    for size in sizes:
        product = builder.smul_with_overflow(count, size)
        count = builder.extract_value(product, 0)
        overflow = builder.or_(overflow, builder.extract_value(product, 1))
    strides = [itemsize] if sizes else []
    for size in reversed(sizes[1:]):
        strides.insert(0, builder.mul(strides[0], size))
    product = builder.smul_with_overflow(count, itemsize)
    overflow = builder.or_(overflow, builder.extract_value(product, 1))
    with builder.if_then(overflow, likely=False):
        context.call_conv.return_user_exc(
            builder, ValueError, ("array is too big; `arr.size * arr.dtype.itemsize` is "
                                  "larger than the maximum possible size.",))
    meminfo = context.nrt.meminfo_alloc_aligned(  # raises MemoryError on NULL
        builder, builder.extract_value(product, 0),
        context.get_preferred_array_alignment(array_type.dtype))
    data = context.nrt.meminfo_data(builder, meminfo)
    array = context.make_array(array_type)(context, builder)
    populate_array(array, data=builder.bitcast(data, array.data.type),
                   shape=cgutils.pack_array(builder, sizes, ty=intp),
                   strides=cgutils.pack_array(builder, strides, ty=intp),
                   itemsize=itemsize, meminfo=meminfo)
    return array


# A parallel launch runs the kernel's serial build on each numba thread through the
# launcher, ``_launch`` (``_launch_counting``): a ``parallel=False`` build per argument
# types, which stores the kernel's address and arguments in a record on its stack,
# emits a *share function* that reads that record and calls the kernel for one share,
# and hands a loop over shares to numba's threading layer (``numba_parallel_for``,
# the entry point of numba's parallel ufuncs and ``prange`` loops; tbb, workqueue and
# omp each split ``dimensions[0]`` into chunks and call the loop once a chunk, its
# ``args[0]`` advanced to the chunk's first element) or, on tbb, to the task group
# numba's tbbpool keeps (see ``_layer_entry_points``).
#
# No ``prange`` loop, then: numba's parfor passes compiled one per kernel signature (a
# third of a second each; one generic driver over addresses still cost a fifth of a
# second of each process's first call), and a launcher compiles in a twentieth.  The
# launchers pass no owners of the arrays (see ``_unowned``).

_INT64 = ir.IntType(64)
_BYTES = ir.IntType(8).as_pointer()
_SHARE_FUNCTION_TYPE = ir.FunctionType(ir.VoidType(), [_INT64, _INT64, _BYTES,
                                                       _INT64.as_pointer()])
# numba's ufunc inner loop: void loop(char **args, intp *dimensions, intp *steps, void *data)
_LOOP_FUNCTION_TYPE = ir.FunctionType(ir.VoidType(), [
    _BYTES.as_pointer(), _INT64.as_pointer(), _INT64.as_pointer(), _BYTES])
# void numba_parallel_for(loop, args, dimensions, steps, data, inner_ndim, array_count,
#                         num_threads)
_PARALLEL_FOR_TYPE = ir.FunctionType(ir.VoidType(), [_BYTES] * 5 + [_INT64] * 2 +
                                     [ir.IntType(32)])
# The loop's data: the share function, the share count, the record, the results.
_LOOP_DATA_TYPE = ir.LiteralStructType([_INT64] * 4)
_RESULT_BYTES = 16  # a share's (count, failed) row of ``results``


def _record_type(context, arguments):
    """The launcher's record: the kernel's address, then its arguments."""
    return ir.LiteralStructType([_INT64, context.get_value_type(arguments)])


def _pack(builder, struct_type, fields):
    """A ``struct_type`` value of ``fields``."""
    value = struct_type(ir.Undefined)
    for i, field in enumerate(fields):
        value = builder.insert_value(value, field, i)
    return value


def _internal_function(module, function_type, name):
    """A new function of ``module`` (or None when it has one of that name)."""
    if name in module.globals:
        return None
    function = ir.Function(module, function_type, name)
    function.linkage = "internal"
    return function


def _share_function(context, module, returns, arguments):
    """Emit (once per module) the share function for a kernel returning ``returns``
    (none or int64) of ``arguments`` (a tuple type): it calls the kernel at the
    record's address with ``(part, parts, *arguments)`` and writes ``out[0]``, the
    kernel's count (0 for none), and ``out[1]``, 1 when it raised, else 0."""
    name = "".join(c if c.isalnum() else "_" for c in f"{returns}_{arguments}")
    function = _internal_function(module, _SHARE_FUNCTION_TYPE, "fastpool_share_" + name)
    if function is None:
        return module.globals["fastpool_share_" + name]
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    part, parts, record, out = function.args
    record = builder.load(builder.bitcast(record, _record_type(context, arguments)
                                          .as_pointer()))
    address, packed = builder.extract_value(record, 0), builder.extract_value(record, 1)
    kernel_types = (types.int64, types.int64) + tuple(arguments.types)
    values = [part, parts] + [builder.extract_value(packed, i)
                              for i in range(len(arguments))]
    kernel = builder.inttoptr(
        address, context.call_conv.get_function_type(returns, kernel_types).as_pointer())
    status, value = context.call_conv.call_function(builder, kernel, returns,
                                                    kernel_types, values)
    builder.store(value if returns == types.int64 else _INT64(0), out)
    builder.store(builder.zext(status.is_error, _INT64), builder.gep(out, [_INT64(1)]))
    builder.ret_void()
    return function


def _loop_function(module):
    """Emit (once per module) the threading layer's loop: shares ``[first, first +
    dimensions[0])``, where ``first`` is ``args[0]``'s row of ``results``."""
    function = _internal_function(module, _LOOP_FUNCTION_TYPE, "fastpool_share_loop")
    if function is None:
        return module.globals["fastpool_share_loop"]
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    args, dimensions, _, data = function.args
    data = builder.load(builder.bitcast(data, _LOOP_DATA_TYPE.as_pointer()))
    share, parts, record, results = (builder.extract_value(data, i) for i in range(4))
    share = builder.inttoptr(share, _SHARE_FUNCTION_TYPE.as_pointer())
    offset = builder.sub(builder.ptrtoint(builder.load(args), _INT64), results)
    first = builder.udiv(offset, _INT64(_RESULT_BYTES))
    with cgutils.for_range(builder, builder.load(dimensions)) as loop:
        part = builder.add(first, loop.index)
        out = builder.add(results, builder.mul(part, _INT64(_RESULT_BYTES)))
        builder.call(share, [part, parts, builder.inttoptr(record, _BYTES),
                             builder.inttoptr(out, _INT64.as_pointer())])
    builder.ret_void()
    return function


# tbbpool's void add_task(loop, args, dimensions, steps, data) and void synchronize().
_ADD_TASK_TYPE = ir.FunctionType(ir.VoidType(), [_BYTES] * 5)
_SYNCHRONIZE_TYPE = ir.FunctionType(ir.VoidType(), [])


def _run_as_tasks(builder, loop, loop_operands, parts, add_task, synchronize):
    """Call the loop for shares 1 .. parts - 1 as tasks of tbb's task group (one
    share each: its ``args[0]``, its row of ``results``), for share 0 in this
    thread, and wait for the group."""
    results_args, _, steps, data = loop_operands
    results = builder.load(results_args)
    one = cgutils.alloca_once_value(builder, _INT64(1))
    task_args = builder.alloca(_BYTES, size=parts)
    add_task = builder.inttoptr(add_task, _ADD_TASK_TYPE.as_pointer())
    with cgutils.for_range_slice(builder, _INT64(1), parts, _INT64(1)) as (part, _):
        args = builder.gep(task_args, [part])
        builder.store(builder.gep(results, [builder.mul(part, _INT64(_RESULT_BYTES))]), args)
        builder.call(add_task, [builder.bitcast(value, _BYTES)
                                for value in (loop, args, one, steps, data)])
    builder.call(loop, [results_args, one, steps, data])
    builder.call(builder.inttoptr(synchronize, _SYNCHRONIZE_TYPE.as_pointer()), [])


def _unowned(context, builder, arguments, packed):
    """``packed`` (a value of the tuple type ``arguments``) with each array's owner
    (its meminfo, and the parent object) dropped.

    The kernel then takes views of its arrays without reference counting: numba's
    reference counts are atomic, and the kernels' row views of an argument, on every
    thread, incremented and decremented its one count, a cache line the threads took
    from each other (a batch-1 max pooling ran 2x slower on two threads than on
    one).  numba's own parallel loops see their arrays so too.  The caller holds the
    arrays for the call."""
    values = []
    for i, kind in enumerate(arguments.types):
        value = builder.extract_value(packed, i)
        if isinstance(kind, types.Array):
            array = context.make_array(kind)(context, builder, value)
            array.meminfo = cgutils.get_null_value(array.meminfo.type)
            array.parent = cgutils.get_null_value(array.parent.type)
            value = array._getvalue()
        values.append(value)
    return context.make_tuple(builder, arguments, values)


def _launch_intrinsic(returns):
    """An intrinsic that runs the kernel at address ``kernel`` (returning ``returns``)
    on ``parts`` shares and gives ``(count, failed)``: the sum of the kernel's counts
    (0 for none) and how many shares raised.  ``layer``, three addresses: through
    tbb's task group given ``add_task`` and ``synchronize`` (the second and third),
    else through ``numba_parallel_for`` given it (the first), one share per numba
    thread; all 0: every share in this thread (which needs no threading layer).
    Each share writes its pair into its row of a ``(parts, 2)`` array on the
    launcher's stack."""

    @intrinsic
    def launch_shares(typingctx, layer, kernel, parts, arguments):
        result = types.UniTuple(types.int64, 2)

        def codegen(context, builder, sig, args):
            layer_value, kernel_value, parts_value, packed = args
            parallel_for_value, add_task_value, synchronize_value = (
                builder.extract_value(layer_value, i) for i in range(3))
            parts_value = context.cast(builder, parts_value, parts, types.int64)
            record_type = _record_type(context, arguments)
            record = cgutils.alloca_once(builder, record_type)
            packed = _unowned(context, builder, arguments, packed)
            builder.store(_pack(builder, record_type, [kernel_value, packed]), record)
            results_data = builder.alloca(_INT64, size=builder.mul(parts_value, _INT64(2)))
            data = cgutils.alloca_once(builder, _LOOP_DATA_TYPE)
            share = _share_function(context, builder.module, returns, arguments)
            fields = [builder.ptrtoint(share, _INT64), parts_value,
                      builder.ptrtoint(record, _INT64),
                      builder.ptrtoint(results_data, _INT64)]
            builder.store(_pack(builder, _LOOP_DATA_TYPE, fields), data)
            loop_args = cgutils.alloca_once_value(builder,
                                                  builder.bitcast(results_data, _BYTES))
            dimensions = cgutils.alloca_once_value(builder, parts_value)
            steps = cgutils.alloca_once_value(builder, _INT64(_RESULT_BYTES))
            loop = _loop_function(builder.module)
            loop_operands = [loop_args, dimensions, steps, builder.bitcast(data, _BYTES)]
            by_tasks = builder.icmp_unsigned("!=", add_task_value, _INT64(0))
            in_this_thread = builder.icmp_unsigned("==", parallel_for_value, _INT64(0))
            with builder.if_else(by_tasks) as (tasks, others):
                with tasks:
                    _run_as_tasks(builder, loop, loop_operands, parts_value, add_task_value,
                                  synchronize_value)
                with others:
                    with builder.if_else(in_this_thread) as (serial, parallel):
                        with serial:
                            builder.call(loop, loop_operands)
                        with parallel:
                            function = builder.inttoptr(parallel_for_value,
                                                        _PARALLEL_FOR_TYPE.as_pointer())
                            builder.call(function, [
                                builder.bitcast(value, _BYTES)
                                for value in [loop, *loop_operands]] + [
                                _INT64(0), _INT64(1),
                                builder.trunc(parts_value, ir.IntType(32))])
            sums = cgutils.alloca_once_value(builder, ir.Constant(
                ir.ArrayType(_INT64, 2), [0, 0]))
            with cgutils.for_range(builder, builder.mul(parts_value, _INT64(2))) as entry:
                at = builder.gep(sums, [_INT64(0), builder.and_(entry.index, _INT64(1))])
                value = builder.load(builder.gep(results_data, [entry.index]))
                builder.store(builder.add(builder.load(at), value), at)
            pair = builder.load(sums)
            return context.make_tuple(builder, result, [builder.extract_value(pair, 0),
                                                        builder.extract_value(pair, 1)])

        return signature(result, layer, kernel, parts, arguments), codegen

    return launch_shares


_launch_shares = _launch_intrinsic(types.none)
_launch_counting_shares = _launch_intrinsic(types.int64)
_LAUNCHER_JIT_OPTIONS = {**CPU_JIT_OPTIONS, "parallel": False, "no_cfunc_wrapper": True,
                         "pipeline_class": _LauncherCompiler}


@njit(**_LAUNCHER_JIT_OPTIONS)
def _launch(layer, kernel, parts, arguments):
    return _launch_shares(layer, kernel, parts, arguments)


@njit(**_LAUNCHER_JIT_OPTIONS)
def _launch_counting(layer, kernel, parts, arguments):
    return _launch_counting_shares(layer, kernel, parts, arguments)


# The launchers' ``layer``: the addresses of (numba_parallel_for, add_task, synchronize)
# to call, 0 where not; all 0: every share in this thread.
_IN_THIS_THREAD = (0, 0, 0)
_entry_points: tuple | None = None  # (parallel_for's layer, the launches' layer)
# One parallel launch at a time: tbb's task group is one for the process (its wait
# waits for every task in it), and a fork waits for the launch in flight (see
# _reset_after_fork).  Concurrent launches from several threads would each want
# every thread anyway.
_parallel_launch_lock = threading.Lock()


def _layer_entry_points() -> tuple:
    """The launchers' ``layer`` for numba's ``parallel_for``, and the one parallel
    launches use: tbb's task group on tbb (parallel_for's on the other layers, and
    in a child forked from a process that started tbb; this thread's in a child
    whose copy of tbb cannot be trusted, see :func:`runs_in_one_thread`), starting
    fastpool's threading layer (:func:`fastpool.cpu.runtime.threading_layer`) the
    first time.

    tbb's ``parallel_for`` builds a ``task_arena`` per call, which the worker threads
    must find and join: a launch of a small kernel on two threads took 8-12 us more
    than on one.  ``add_task`` and ``synchronize`` (numba's tbbpool exports them) run
    tasks of one task group in the calling thread's arena, which the workers stay
    in between launches: 2-3 us (channels-last 2x2 average pooling of a 1x64x56x56
    batch: 18-21 us a call through parallel_for, 12.5 through the task group,
    torch 13.6)."""
    global _entry_points
    if _entry_points is None and _forked_from_running_tbb:
        from fastpool.cpu.runtime import logger

        logger.warning(
            "fastpool: this process was forked while another thread of its parent ran "
            "tbb's parallel code (or from a thread other than the one that started tbb), "
            "so its copy of tbb's threads cannot be trusted and fastpool's kernels run on "
            "one thread in it. Fork before starting threads that call fastpool, or use the "
            "'spawn' or 'forkserver' start method")
        _entry_points = (_IN_THIS_THREAD, _IN_THIS_THREAD)
    if _entry_points is None:
        from fastpool.cpu.runtime import threading_layer

        layer = threading_layer()
        address = binding.address_of_symbol("numba_parallel_for")
        if not address:
            raise RuntimeError("fastpool: numba's threading layer has no "
                               "numba_parallel_for (an incompatible numba?)")
        parallel_for = (address, 0, 0)
        task_group = parallel_for
        if layer == "tbb":
            tbbpool = sys.modules["numba.np.ufunc.tbbpool"]
            task_group = (0, tbbpool.add_task, tbbpool.synchronize)
        _entry_points = parallel_for, task_group
    return _entry_points


def _type_key(value):
    """What numba's type of an argument depends on, found cheaply (numba.typeof
    takes microseconds an argument)."""
    if isinstance(value, np.ndarray):
        flags = value.flags
        return (value.dtype, value.ndim, flags.c_contiguous, flags.f_contiguous,
                flags.aligned, flags.writeable)
    if isinstance(value, np.generic):
        return value.dtype
    if isinstance(value, Constant):
        return Constant, int(value)
    return type(value)  # (a tuple's elements are not looked into: none holds a Constant)


_kernels: list = []


class TaskKernel:
    """A kernel over shares of its tasks, run serially or on numba's threads.

    Parameters
    ----------
    function : callable
        The kernel's Python function, ``function(part, parts, *arguments)``, with
        no default arguments.
    counts : bool
        Whether the kernel returns a count (an int, summed over the shares)
        rather than None.

    Attributes
    ----------
    body : numba.core.registry.CPUDispatcher
        The kernel's numba dispatcher.  Its builds have no Python wrapper (see
        ``KERNEL_JIT_OPTIONS``): run them through :meth:`serial`, calling the
        instance or :meth:`run_shares`, never by calling ``body``.
    """

    def __init__(self, function, counts: bool = False):
        self.body = njit(**KERNEL_JIT_OPTIONS)(function)
        self.counts = counts
        self._launcher = _launch_counting if counts else _launch
        self._addresses: dict = {}
        self._lock = threading.Lock()
        self._has_constants = False  # a build took a Constant argument
        self.__doc__, self.__name__ = function.__doc__, function.__name__
        self.__qualname__ = function.__qualname__
        _kernels.append(self)

    def serial(self, *arguments):
        """Run every task in this thread."""
        return self.run_shares(1, arguments)

    def __call__(self, *arguments):
        """Run one share of the tasks per numba thread (``numba.get_num_threads()``)."""
        return self.run_shares(get_num_threads(), arguments)

    def run_shares(self, parts: int, arguments: tuple, address: int | None = None):
        """Run ``parts`` shares of the tasks, one per numba thread (or, for one share,
        in this thread); ``address``: the :meth:`address` for these arguments' types,
        when the caller knows it."""
        address = address or self.address(arguments)
        if self._has_constants:
            # The launcher passes a Constant's value as the int it is (the builds take it
            # as their constant): numba types a Constant argument in microseconds a
            # call, an int in nanoseconds (a tiny channels-last L2 pool: 113 -> 56 us).
            arguments = tuple(int(a) if type(a) is Constant else a for a in arguments)
        if parts <= 1:
            count, failed = self._launcher(_IN_THIS_THREAD, address, parts, arguments)
        else:
            layer = _layer_entry_points()[1]
            with _parallel_launch_lock:
                _launching_threads.add(threading.get_native_id())
                count, failed = self._launcher(layer, address, parts, arguments)
        if failed:
            raise RuntimeError(f"fastpool: the CPU kernel {self.__name__} raised in "
                               f"{failed} of its {parts} shares (out of memory?)")
        return count if self.counts else None

    def address(self, arguments) -> int:
        """The address of the serial build's machine code for these arguments'
        types, compiling it (or loading it from numba's cache) the first time."""
        key = tuple(map(_type_key, arguments))
        found = self._addresses.get(key)
        if found is None:
            with self._lock:
                kernel_types = (types.int64, types.int64) + tuple(map(typeof, arguments))
                if any(isinstance(kind, types.IntegerLiteral) for kind in kernel_types):
                    self._has_constants = True
                self.body.compile(kernel_types)
                compiled = self.body.overloads[kernel_types]
                returns = compiled.signature.return_type
                if returns != (types.int64 if self.counts else types.none):
                    raise TypeError(f"fastpool: the CPU kernel {self.__name__} returns "
                                    f"{returns}, not {'an int64' if self.counts else 'None'}")
                found = self._addresses[key] = compiled.library.get_pointer_to_function(
                    compiled.fndesc.llvm_func_name)
        return found

    def dispatchers(self) -> list:
        """The numba dispatchers this kernel runs: its serial build, then its
        parallel launches' launcher (shared by every kernel)."""
        return [self.body, self._launcher]


# Threads (their native ids) that made a parallel launch: on tbb each holds a share
# of tbb's scheduler until it exits.
_launching_threads: set = set()
# Whether this process is a child forked while tbb's workers outlived the fork (its
# copy of tbb cannot be trusted), and whether the fork in progress leaves one so.
_forked_from_running_tbb = False
_fork_leaves_running_tbb = False


def _live_threads() -> set:
    """The native ids of this process's threads: from /proc on Linux (a joined
    thread leaves it only once its exit, and tbb's release in it, is done), else
    those of the threads ``threading`` knows."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return {thread.native_id for thread in threading.enumerate()}


def _tbb_workers_survive_fork() -> bool:
    """Whether numba's fork handler will fail to stop tbb's worker threads before
    the fork in progress.  It stops them only when forking from the thread that
    started tbb, and only when no other live thread has run tbb code (else tbb warns
    "Unable to join threads to shut down before fork(). This can break
    multithreading in child processes."): a child's copy of tbb, taken from workers
    mid-flight, may hang its first parallel launch (1 in 10 children in the
    "fork-during-launch" scenario of tests/test_concurrency.py).  Only fastpool's
    own launches are known here (and, where fastpool did not start numba's layer,
    the main thread is taken for the one that did)."""
    if "numba.np.ufunc.tbbpool" not in sys.modules:
        return False
    from fastpool.cpu.runtime import layer_start_thread

    here = threading.get_native_id()
    _launching_threads.intersection_update(_live_threads())
    return threading.get_ident() != layer_start_thread() or bool(_launching_threads - {here})


def _before_fork() -> None:
    # The launch in flight ends first, then any numba compile in flight (its lock,
    # copied held, would hang the child's first compile or cache load).
    global _fork_leaves_running_tbb
    _parallel_launch_lock.acquire()
    global_compiler_lock.acquire()
    _fork_leaves_running_tbb = _forked_from_running_tbb or _tbb_workers_survive_fork()


def _after_fork_in_parent() -> None:
    global_compiler_lock.release()
    _parallel_launch_lock.release()


def _reset_after_fork() -> None:
    # A thread of the parent may have held a kernel's lock (compiling it) when the
    # process forked: the child's copy would stay locked for good.  The parallel
    # launch lock the forking thread held (_parallel_launch_lock).  A child of a
    # process that started tbb launches through parallel_for: a task of tbb's task
    # group may still have been queued at the fork (the one numba's start runs),
    # which no thread of the child would run, and the child's first launch through
    # the group would wait for it forever.  Where tbb's workers outlived the fork
    # (_tbb_workers_survive_fork), the child runs every share in its own thread.
    global _parallel_launch_lock, _entry_points, _forked_from_running_tbb
    global_compiler_lock.release()  # this thread's, taken in _before_fork
    for kernel in _kernels:
        kernel._lock = threading.Lock()
    _parallel_launch_lock = threading.Lock()
    _launching_threads.clear()
    _forked_from_running_tbb = _fork_leaves_running_tbb
    if _forked_from_running_tbb:
        _entry_points = None  # its first parallel launch says so (_layer_entry_points)
    elif "numba.np.ufunc.tbbpool" in sys.modules:
        if _entry_points is None:
            _layer_entry_points()
        _entry_points = (_entry_points[0], _entry_points[0])


def runs_in_one_thread() -> bool:
    """Whether this process runs parallel launches' shares in its own thread: a child
    forked while tbb's worker threads outlived the fork (another live thread of the
    parent had run tbb code, or the fork came from a thread other than the one that
    started tbb), whose copy of tbb cannot be trusted."""
    return _forked_from_running_tbb


# A fork waits for the parallel launch in flight in another thread, and holds new
# ones until it is done: forked while tbb's workers ran a launch (through either of
# its entry points), a child's first parallel launch hung (tests/test_concurrency.py,
# "fork-during-launch"; numba's own tbb layer does the same).
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_reset_after_fork)


def parallel_kernel(function=None, *, counts: bool = False):
    """Make ``function(part, parts, *arguments)`` a :class:`TaskKernel` (a decorator).

    A kernel splits its tasks with :func:`share`; fastpool's
    :func:`fastpool.cpu.kernels.plane_broadcast` reads::

        @parallel_kernel
        def plane_broadcast(part, parts, grad_out, grad_in, factor):
            planes, size = grad_in.shape
            for plane in range(*share(planes, part, parts)):
                ...

    Examples
    --------
    >>> import numpy as np
    >>> from fastpool.cpu.kernels import plane_broadcast
    >>> grad_out, grad_in = np.array([1.0, 2.0]), np.empty((2, 3))
    >>> plane_broadcast.serial(grad_out, grad_in, 0.5)  # every task, in this thread
    >>> plane_broadcast(grad_out, grad_in, 0.5)  # a share per numba thread
    >>> grad_in
    array([[0.5, 0.5, 0.5],
           [1. , 1. , 1. ]])
    """
    if function is None:
        return lambda function: TaskKernel(function, counts)
    return TaskKernel(function, counts)


def task_kernels() -> list:
    """Every :class:`TaskKernel` made in this process."""
    return list(_kernels)
