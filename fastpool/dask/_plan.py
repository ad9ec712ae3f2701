"""Chunk plans: which input blocks (and which parts of them) each output block reads.

Along a pooled axis of input size ``n`` cut at block boundaries
``b_0 = 0 < b_1 < ... < b_m = n``, output ``o`` reads the input range
``[start[o], stop[o])`` of the op's whole-axis :class:`~fastpool._params.WindowTable`.
An output chunk ``[o0, o1)`` therefore reads ``[min start, max stop)``: its
own block plus, where windows overlap (kernel > stride, or padding), a
one-sided halo from the block(s) after it.  Nothing is rechunked: every output
block is one task that slices the input blocks it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALIGNS = ("input", "output")


@dataclass(frozen=True)
class AxisPlan:
    """The plan along one pooled axis.

    Attributes
    ----------
    axis : int
        The axis of the input array.
    size, out_size : int
        Input and output lengths.
    in_chunks, out_chunks : tuple of int
        Input and output chunk sizes.
    ranges : tuple of (int, int)
        Per output chunk, the input range ``[lo, hi)`` its windows read
        (``hi`` may pass ``size`` by one where a dilated window lies wholly in
        the padding: that element is never read).
    outputs : tuple of (int, int)
        Per output chunk, its output range ``[o0, o1)``.
    """

    axis: int
    size: int
    out_size: int
    in_chunks: tuple
    out_chunks: tuple
    ranges: tuple
    outputs: tuple

    @property
    def bounds(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.in_chunks)]).astype(np.int64)

    def blocks(self, chunk: int) -> list[tuple[int, int, int]]:
        """The input blocks output chunk ``chunk`` reads: (block, first, stop) local."""
        lo, hi = self.ranges[chunk]
        hi = min(hi, self.size)
        bounds = self.bounds
        first = int(np.searchsorted(bounds, lo, "right")) - 1
        parts = []
        block = first
        while block < len(self.in_chunks) and bounds[block] < hi:
            a, b = max(lo, bounds[block]), min(hi, bounds[block + 1])
            if b > a:
                parts.append((block, int(a - bounds[block]), int(b - bounds[block])))
            block += 1
        return parts

    @property
    def halo(self) -> int:
        """The most input elements an output chunk reads from blocks other than the one
        it reads most from (0: a plain per-block map along this axis)."""
        most = 0
        for chunk, (lo, hi) in enumerate(self.ranges):
            parts = self.blocks(chunk)
            read = min(hi, self.size) - lo
            most = max(most, read - max(b - a for _, a, b in parts))
        return most

    @property
    def is_map(self) -> bool:
        """Output chunk i reads from input block i only."""
        return len(self.out_chunks) == len(self.in_chunks) and all(
            [p[0] for p in self.blocks(i)] == [i] for i in range(len(self.out_chunks)))


@dataclass(frozen=True)
class Plan:
    """A chunk plan: one :class:`AxisPlan` per pooled axis (see :func:`fastpool.dask.plan`)."""

    op: str
    axes: tuple

    @property
    def is_map(self) -> bool:
        """True when every output block reads exactly its own input block: no data
        moves between blocks."""
        return all(a.is_map for a in self.axes)

    @property
    def tasks(self) -> int:
        return math.prod(len(a.out_chunks) for a in self.axes)

    def __repr__(self) -> str:
        lines = [f"Plan({self.op}: {'per-block map, no halo' if self.is_map else 'halo'})"]
        for a in self.axes:
            merged = len(a.in_chunks) - len(a.out_chunks)
            lines.append(
                f"  axis {a.axis}: {a.size} -> {a.out_size}; input chunks {_short(a.in_chunks)}"
                f" -> output chunks {_short(a.out_chunks)}; halo {a.halo}"
                + (f"; {merged} input blocks without outputs of their own" if merged > 0
                   else ""))
        return "\n".join(lines)


def _short(chunks: tuple) -> str:
    return str(chunks) if len(chunks) <= 6 else (
        f"({', '.join(map(str, chunks[:3]))}, ..., {', '.join(map(str, chunks[-2:]))})"
        f" [{len(chunks)}]")


def output_chunks(op: str, axis: int, size: int, in_chunks: tuple, anchor: np.ndarray,
                  align: str, out_chunk) -> tuple:
    """Output chunk sizes along one axis.

    ``anchor[o]`` is output ``o``'s place on the input axis (``o * stride`` for
    sliding windows: where the window starts, not counting the padding).
    align="input": output ``o`` belongs to the input block holding
    ``clip(anchor[o], 0, size-1)``; blocks that hold no anchor get no output
    chunk (their data reach the neighbours as halo).  align="output": regular
    chunks of ``out_chunk`` outputs (default: the first input chunk divided by
    the mean step between anchors, rounded).
    """
    n_out = len(anchor)
    if align == "input":
        bounds = np.cumsum(in_chunks)[:-1]
        owner = np.searchsorted(bounds, np.clip(anchor, 0, size - 1), "right")
        counts = np.bincount(owner, minlength=len(in_chunks))
        return tuple(int(c) for c in counts if c)
    if out_chunk is None:
        step = max((anchor[-1] - anchor[0]) / (n_out - 1), 1.0) if n_out > 1 else 1.0
        out_chunk = max(1, round(in_chunks[0] / step))
    if isinstance(out_chunk, (tuple, list)):  # explicit chunk sizes
        if sum(out_chunk) != n_out or any(int(c) <= 0 for c in out_chunk):
            raise ValueError(f"{op}: out_chunks for axis {axis} must be positive and sum to "
                             f"the output size {n_out}, got {tuple(out_chunk)}")
        return tuple(int(c) for c in out_chunk)
    full, rest = divmod(n_out, out_chunk)
    return (out_chunk,) * full + ((rest,) if rest else ())


def axis_plan(axis: int, size: int, in_chunks: tuple, start: np.ndarray, stop: np.ndarray,
              out_chunks: tuple) -> AxisPlan:
    """The input range of every output chunk, from the whole axis's window table."""
    ranges, outputs = [], []
    o0 = 0
    for count in out_chunks:
        o1 = o0 + count
        lo = int(start[o0:o1].min())
        hi = int(max(stop[o0:o1].max(), start[o0:o1].max() + 1))
        lo = min(lo, size - 1)
        ranges.append((lo, min(hi, size + 1)))
        outputs.append((o0, o1))
        o0 = o1
    return AxisPlan(axis, size, o0, tuple(in_chunks), tuple(out_chunks), tuple(ranges),
                    tuple(outputs))
