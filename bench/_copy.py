"""The bandwidth yardstick: a multi-threaded copy, compiled like fastpool's kernels."""

from fastpool.cpu.tasks import parallel_kernel, share


@parallel_kernel
def parallel_copy(part, parts, source, target):
    for i in range(*share(source.size, part, parts)):
        target[i] = source[i]
