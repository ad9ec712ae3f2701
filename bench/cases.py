"""The benchmark table: pooling ops on shapes from real networks.

One table feeds the report (``python -m bench``) and the pytest-benchmark tests
(``bench/test_bench.py``).  Shapes are channels-first ``(N, C, *spatial)``;
channels-last runs use the same values laid out ``(N, *spatial, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    """One op with its arguments on one input shape."""

    op: str  # fastpool / torch.nn.functional family name without the "{nd}d"
    shape: tuple[int, ...]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tag: str = ""

    @property
    def nd(self) -> int:
        return len(self.shape) - 2

    @property
    def name(self) -> str:
        return f"{self.op}{self.nd}d"

    @property
    def label(self) -> str:
        params = ", ".join([*map(str, self.args), *(f"{k}={v}" for k, v in self.kwargs.items())])
        return f"{self.name}({params})"

    @property
    def layouts(self) -> tuple[bool, ...]:
        # torch has no channels-last memory format for 3-D tensors.
        return (False,) if self.nd == 1 else (False, True)

    def make_input(self, channels_last: bool, seed: int = 0) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal(self.shape, dtype=np.float32)
        if self.op == "lp_pool":
            np.abs(x, out=x)  # keep the p-th powers real for every norm_type
        return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x


FULL = [
    Case("max_pool", (32, 64, 112, 112), (3, 2, 1), tag="resnet-stem"),
    Case("max_pool", (32, 128, 112, 112), (2, 2), tag="vgg"),
    Case("avg_pool", (32, 128, 112, 112), (2, 2), tag="vgg"),
    Case("max_pool", (1, 64, 56, 56), (2, 2), tag="small-batch"),
    Case("avg_pool", (1, 64, 56, 56), (2, 2), tag="small-batch"),
    Case("lp_pool", (32, 64, 56, 56), (2, 2, 2), tag="lp"),
    Case("max_pool", (16, 64, 16000), (4, 4), tag="audio"),
    Case("avg_pool", (16, 64, 16000), (4, 4), tag="audio"),
    Case("max_pool", (4, 32, 16, 112, 112), (2,), tag="video"),
    Case("avg_pool", (4, 32, 16, 112, 112), (2,), tag="video"),
    Case("max_pool", (8, 64, 56, 56), (7, 1, 3), tag="large-kernel"),
    Case("avg_pool", (8, 64, 56, 56), (7, 1, 3), tag="large-kernel"),
    Case("adaptive_avg_pool", (32, 512, 14, 14), (7,), tag="adaptive"),
    Case("adaptive_max_pool", (32, 512, 14, 14), (7,), tag="adaptive"),
    Case("adaptive_avg_pool", (32, 256, 13, 17), (7,), tag="adaptive-uneven"),
    Case("adaptive_max_pool", (32, 256, 13, 17), (7,), tag="adaptive-uneven"),
    Case("adaptive_avg_pool", (64, 2048, 7, 7), (1,), tag="global"),
    # Strided convolution, the learnable alternative to pooling (no speed bar):
    # args are (out_channels, kernel_size, stride, padding).
    Case("strided_conv", (8, 64, 56, 56), (64, 3, 2, 1), tag="strided-conv"),
]

QUICK = [
    Case("max_pool", (8, 64, 56, 56), (3, 2, 1), tag="resnet-stem"),
    Case("avg_pool", (8, 64, 56, 56), (2, 2), tag="vgg"),
    Case("max_pool", (4, 32, 4000), (4, 4), tag="audio"),
    Case("max_pool", (2, 16, 8, 56, 56), (2,), tag="video"),
    Case("avg_pool", (2, 64, 28, 28), (7, 1, 3), tag="large-kernel"),
    Case("adaptive_avg_pool", (8, 256, 13, 17), (7,), tag="adaptive-uneven"),
    Case("strided_conv", (2, 16, 28, 28), (16, 3, 2, 1), tag="strided-conv"),
]
