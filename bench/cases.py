"""Benchmark cases: (name, fastpool call, torch call) on shapes from real networks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    """One op on one input shape; ``shape`` is channels-first (N, C, *spatial)."""

    op: str
    shape: tuple[int, ...]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def nd(self) -> int:
        return len(self.shape) - 2

    @property
    def label(self) -> str:
        params = ", ".join([*map(str, self.args), *(f"{k}={v}" for k, v in self.kwargs.items())])
        return f"{self.op}{self.nd}d({params})"

    def make_input(self, channels_last: bool, seed: int = 0) -> np.ndarray:
        x = np.random.default_rng(seed).standard_normal(self.shape, dtype=np.float32)
        return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x


QUICK = [
    Case("max_pool", (8, 64, 56, 56), (3, 2, 1)),
    Case("avg_pool", (8, 64, 56, 56), (2, 2)),
    Case("max_pool", (4, 32, 4000), (4, 4)),
    Case("max_pool", (2, 16, 8, 56, 56), (2,)),
    Case("adaptive_avg_pool", (8, 256, 14, 14), (7,)),
]
