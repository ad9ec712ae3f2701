import os

# Small blocks, so that the simulator's small inputs still span several blocks.
os.environ.setdefault("FASTPOOL_CUDA_THREADS_PER_BLOCK", "32")
# The out-of-range index tests need the GPU back end's (synchronising) index check.
os.environ.setdefault("FASTPOOL_CUDA_CHECK_INDICES", "1")
