"""fastpool for PyTorch: autograd-aware functions and drop-in ``nn`` modules.

``fastpool.torch.functional`` has torch.nn.functional's pooling names and
signatures (max, average, Lp, adaptive and fractional max pooling, max
unpooling) plus fastpool's min pooling and generalized-mean (GeM) pooling;
``fastpool.torch.nn`` has torch.nn's pooling modules (subclasses of torch's own,
so constructors, reprs and ``isinstance`` checks are unchanged) plus
``Global{Max,Avg,Min}Pool{1,2,3}d``, ``MinPool{1,2,3}d``,
``AdaptiveMinPool{1,2,3}d``, ``GlobalPool{1,2,3}d`` (timm's avgmax and catavgmax
heads) and ``GeM{1,2,3}d`` (alias ``GeneralizedMeanPooling{1,2,3}d``, with a learnable
or fixed p).  CPU tensors reach
the Numba kernels through zero-copy NumPy views and CUDA tensors the CUDA
kernels through ``__cuda_array_interface__``, launched on torch's current
stream; ``torch.channels_last`` and ``torch.channels_last_3d`` tensors use the
channels-last kernels.

Every op is registered with torch (``torch.ops.fastpool.*``), so models using
these modules work with torch.compile, torch.export, torch.func and double
backward; ``convert(model)`` swaps a model's torch.nn pooling modules for
fastpool's.  See docs/torch.md.

Importing this module imports torch; ``import fastpool`` does not.
"""

try:
    import torch  # noqa: F401
except ImportError as error:
    raise ImportError('fastpool.torch needs PyTorch, which is not installed: '
                      'pip install "fastpool[torch]"') from error

from fastpool.torch import functional, nn  # noqa: E402
from fastpool.torch.nn import convert  # noqa: E402

__all__ = ["functional", "nn", "convert"]
