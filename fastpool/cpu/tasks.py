"""CPU kernels written once, serial, over a share of their tasks.

A kernel's Python function takes ``(part, parts, *arguments)`` and runs part
``part`` of ``parts`` near-equal contiguous shares of its tasks (output rows,
planes, channel blocks; :func:`share` splits them).  :func:`parallel_kernel`
compiles that function once, with ``parallel=False``, and returns a
:class:`TaskKernel`:

* ``kernel.serial(*arguments)`` runs every task in this thread (one share of one);
* ``kernel(*arguments)`` runs one share per numba thread: a ``prange`` driver
  calls the serial build's machine code through its address.

Why not ``@njit(parallel=True)`` on each kernel: numba's parfor passes compile a
``prange`` body a second time, as a gufunc with everything inlined into it, and
small calls want a ``parallel=False`` build of the same source as well, so each
kernel compiled twice.  A call through an address does not link the kernel
into the driver either (a call of the dispatcher would: LLVM optimises and
emits the kernel's code again there).  So a kernel compiles once, and the
drivers, generic over the kernels, once per argument types.  A cold parallel
first call of average pooling compiled for 5.4 s as a ``parallel=True`` kernel
(7.8 s in a process that ran it serially too), and compiles for 3.5 s as a task
kernel, whatever the process runs.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from numba import get_num_threads, njit, prange, typeof, types
from numba.core import cpu, options
from numba.core.typing import signature
from numba.extending import intrinsic

from fastpool._config import CPU_JIT_OPTIONS

# The kernels' arrays do not overlap: each kernel writes only outputs and scratch
# that fastpool allocated for the call, and reads its inputs.  numba's flag for that
# (each array argument's data pointer ``noalias`` to LLVM, which then vectorises
# loops that read one array and write another without run-time overlap checks) is
# what its parfor passes set on a ``parallel=True`` kernel's loop body when they find
# no aliases; njit has no option for it, so fastpool maps one.  Without it the
# channels-last backward gather did not vectorise (tests/test_cpu_paths.py).
cpu.CPUTargetOptions.noalias = options.TargetOptions.Mapping("noalias")
KERNEL_JIT_OPTIONS = {**CPU_JIT_OPTIONS, "parallel": False, "noalias": True}


@njit(inline="always")
def share(tasks, part, parts):
    """The tasks ``[first, last)`` of part ``part`` of ``parts``: near-equal
    contiguous shares of ``range(tasks)``, as numba's ``prange`` splits them."""
    return tasks * part // parts, tasks * (part + 1) // parts


def _share_call(returns):
    """An intrinsic that calls the numba-compiled kernel at ``address`` (an int)
    with ``(part, parts, *arguments)``, for a kernel returning ``returns`` (none or
    int64), and gives ``(count, failed)``: the kernel's count (0 for none) and 1
    when it raised (numba's status), else 0."""

    @intrinsic
    def call_share(typingctx, address, part, parts, arguments):
        kernel_types = (types.int64, types.int64) + tuple(arguments.types)
        result = types.UniTuple(types.int64, 2)

        def codegen(context, builder, sig, args):
            address_value, part_value, parts_value, packed = args
            values = [context.cast(builder, part_value, part, types.int64),
                      context.cast(builder, parts_value, parts, types.int64)]
            values += [builder.extract_value(packed, i) for i in range(len(arguments))]
            function_type = context.call_conv.get_function_type(returns, kernel_types)
            function = builder.inttoptr(address_value, function_type.as_pointer())
            status, value = context.call_conv.call_function(builder, function, returns,
                                                            kernel_types, values)
            count = value if returns == types.int64 else context.get_constant(types.int64, 0)
            failed = builder.zext(status.is_error, context.get_value_type(types.int64))
            return context.make_tuple(builder, result, [count, failed])

        return signature(result, address, part, parts, arguments), codegen

    return call_share


_call_share = _share_call(types.none)
_call_count_share = _share_call(types.int64)


# The drivers.  Each share writes its (count, failed) pair into ``results``, summed
# after the loop: a prange reduction cost each launch 2 us more.  (Element by
# element: numba's checked row assignment compiles its error message's string
# formatting, 3 s.)
@njit(**CPU_JIT_OPTIONS)
def _run_shares(address, parts, arguments, results):
    for part in prange(parts):
        count, failed = _call_share(address, part, parts, arguments)
        results[part, 0], results[part, 1] = count, failed
    return _sum_pairs(results, parts)


@njit(**CPU_JIT_OPTIONS)
def _count_shares(address, parts, arguments, results):
    for part in prange(parts):
        count, failed = _call_count_share(address, part, parts, arguments)
        results[part, 0], results[part, 1] = count, failed
    return _sum_pairs(results, parts)


@njit(inline="always")
def _sum_pairs(results, parts):
    total = failed = 0
    for part in range(parts):
        total += results[part, 0]
        failed += results[part, 1]
    return total, failed


def _type_key(value):
    """What numba's type of an argument depends on, found cheaply (numba.typeof
    takes microseconds an argument)."""
    if isinstance(value, np.ndarray):
        flags = value.flags
        return (value.dtype, value.ndim, flags.c_contiguous, flags.f_contiguous,
                flags.aligned, flags.writeable)
    if isinstance(value, np.generic):
        return value.dtype
    return type(value)


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
    """

    def __init__(self, function, counts: bool = False):
        self.body = njit(**KERNEL_JIT_OPTIONS)(function)
        self.counts = counts
        self._addresses: dict = {}
        self._lock = threading.Lock()
        self.__doc__, self.__name__ = function.__doc__, function.__name__
        self.__qualname__ = function.__qualname__
        _kernels.append(self)

    def serial(self, *arguments):
        """Run every task in this thread."""
        return self.body(0, 1, *arguments)

    def __call__(self, *arguments):
        """Run one share of the tasks per numba thread (``numba.get_num_threads()``)."""
        return self.run_shares(get_num_threads(), arguments)

    def run_shares(self, parts: int, arguments: tuple, address: int | None = None):
        """Run ``parts`` shares of the tasks on numba's threads; ``address``: the
        :meth:`address` for these arguments' types, when the caller knows it."""
        count, failed = (_count_shares if self.counts else _run_shares)(
            address or self.address(arguments), parts, arguments,
            np.empty((parts, 2), np.int64))
        if failed:
            raise RuntimeError(f"fastpool: the CPU kernel {self.__name__} raised in "
                               f"{failed} of its parallel shares (out of memory?)")
        return count if self.counts else None

    def address(self, arguments) -> int:
        """The address of the serial build's machine code for these arguments'
        types, compiling it (or loading it from numba's cache) the first time."""
        key = tuple(map(_type_key, arguments))
        found = self._addresses.get(key)
        if found is None:
            with self._lock:
                kernel_types = (types.int64, types.int64) + tuple(map(typeof, arguments))
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
        """The numba dispatchers this kernel runs: its serial build, then the
        drivers (shared by every kernel)."""
        return [self.body, _count_shares if self.counts else _run_shares]


def _reset_after_fork() -> None:
    # A thread of the parent may have held a kernel's lock (compiling it) when the
    # process forked: the child's copy would stay locked for good.
    for kernel in _kernels:
        kernel._lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


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
