import os

# Small blocks, so that the simulator's small inputs still span several blocks.
os.environ.setdefault("FASTPOOL_CUDA_THREADS_PER_BLOCK", "32")
