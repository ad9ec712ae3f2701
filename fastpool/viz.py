"""Pictures of pooling, drawn from fastpool's own window tables and kernels.

Needs matplotlib (and Pillow for GIFs): ``pip install "fastpool[viz]"``.
Importing this module does not import matplotlib; each function does, when called.

- :func:`plot_pooling`: a 2-D input as a grid of numbers, the padding as a hatched
  ring, each window outlined in its own colour, beside the pooled output in the same
  colours.
- :func:`animate_pooling`: a GIF of the window sliding over the input, the
  chosen element (max) or the window (average) highlighted, the output filling in.
- :func:`plot_feature_hierarchy`: an image pooled again and again, max against
  average, every level drawn at the same size.

Every picture is reproducible: the same call writes the same bytes (no timestamps
or version strings in the files, no randomness).
"""

from __future__ import annotations

import colorsys
import functools
import importlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

import fastpool
from fastpool._params import SlidingWindow, adaptive_output_shape, adaptive_table

_MODES = ("max", "avg", "lp", "adaptive_max", "adaptive_avg")
_INSTALL_HINT = 'pip install "fastpool[viz]"'
# PNG text chunks matplotlib would otherwise write ("Software: Matplotlib version...")
# make the bytes depend on the installed version; drop them.
_PNG_METADATA = {"Software": None}
# The grid (padding included) is drawn at most this many inches wide or high, and a
# cell at most _MAX_CELL inches: a 128x128 input gives a 6-inch panel, not a 64-inch one.
_MAX_PANEL = 6.0
_MAX_CELL = 0.5
# Cells smaller than this (inches) are too small for their numbers to be legible.
_MIN_LABELLED_CELL = 0.3
_TITLE_SIZE = 10.0  # points
# Animations with at least this many frames show a progress bar (when tqdm is there).
_PROGRESS_FRAMES = 100


def _require(module: str, what: str):
    """Import a plotting dependency, or fail with the install command of the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"fastpool.viz needs {what}: {_INSTALL_HINT}") from error


def _figure(figsize):
    """A figure without pyplot: no global state, no display needed, the Agg
    renderer whatever the session's backend, and notebooks still show it."""
    # The top-level package first: a submodule already in sys.modules would be
    # returned even when matplotlib itself is unimportable.
    _require("matplotlib", "matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _savefig(figure, path: str, dpi: int) -> None:
    """Save a PNG whose bytes depend only on the picture."""
    figure.savefig(path, dpi=dpi, metadata=_PNG_METADATA)


@dataclass(frozen=True)
class _Pooling:
    """One 2-D pooling, ready to draw.

    Window ``(oh, ow)`` covers rows ``top[oh]:bottom[oh]`` and columns
    ``left[ow]:right[ow]`` of the padded input, in input coordinates (padding
    cells are negative or past the edge), so windows reaching into the padding
    are drawn reaching into it.
    """

    x: np.ndarray
    out: np.ndarray
    mode: str
    padding: tuple[int, int]
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    argmax: np.ndarray | None  # flat input index of each max window's choice

    @property
    def pad_label(self) -> str:
        """What the padding holds, as the kernels see it."""
        return "\N{MINUS SIGN}\N{INFINITY}" if self.mode == "max" else "0"

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.x.shape[0] + 2 * self.padding[0], self.x.shape[1] + 2 * self.padding[1])

    def overlapping(self) -> bool:
        """Whether neighbouring windows share cells (their outlines would coincide)."""
        return bool((self.bottom[:-1] > self.top[1:]).any()
                    or (self.right[:-1] > self.left[1:]).any())


def _pooling(x, mode: str, kernel_size, stride, padding, output_size,
             norm_type) -> _Pooling:
    """Validate the arguments and pool ``x`` with fastpool."""
    op = "viz"
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be a 2-D array (one plane), got shape {x.shape}")
    if mode not in _MODES:
        raise ValueError(f"{op}: mode must be one of {_MODES}, got {mode!r}")
    argmax = None
    if mode.startswith("adaptive"):
        if output_size is None:
            raise ValueError(f"{op}: mode={mode!r} needs output_size")
        out_spatial = adaptive_output_shape(op, 2, output_size, x.shape)
        table = adaptive_table(x.shape, out_spatial)
        reduction = mode.split("_")[1]
        out = fastpool.adaptive_pool(x, reduction, out_spatial)
        if reduction == "max":
            argmax = fastpool.adaptive_pool(x, "max", out_spatial, return_indices=True)[1]
        (oh, ow), pads = out.shape, (0, 0)
        top, bottom = table.start[1, :oh], table.stop[1, :oh]
        left, right = table.start[2, :ow], table.stop[2, :ow]
    else:
        if kernel_size is None:
            raise ValueError(f"{op}: mode={mode!r} needs kernel_size")
        window = SlidingWindow.from_args(op, 2, kernel_size, stride, padding)
        pairs = window.pads(x.shape)
        if any(before != after for before, after in pairs):
            raise ValueError(f"{op}: the picture draws symmetric padding only, got "
                             f"padding={padding!r}")
        size, pads = window.kernel_size, tuple(before for before, _ in pairs)
        out = fastpool.pool(x, mode, size, window.stride, pads,
                            norm_type=norm_type if mode == "lp" else None)
        if mode == "max":
            argmax = fastpool.pool(x, "max", size, window.stride, pads,
                                   return_indices=True)[1]
        starts = [np.arange(n) * s - p for n, s, p in zip(out.shape, window.stride, pads)]
        top, left = starts
        bottom, right = top + size[0], left + size[1]
    return _Pooling(x, out, mode, tuple(pads), np.asarray(top), np.asarray(bottom),
                    np.asarray(left), np.asarray(right), argmax)


def _window_colors(count: int) -> np.ndarray:
    """``count`` distinct RGB colours, neighbours in raster order far apart.

    Up to 10, matplotlib's "tab10"; beyond, hues spread by the golden angle (no
    two alike, consecutive ones nearly opposite) in two brightnesses.
    """
    from matplotlib import colormaps

    if count <= 10:
        return np.asarray(colormaps["tab10"].colors)[:count]
    golden = (np.sqrt(5) - 1) / 2
    return np.array([colorsys.hsv_to_rgb((k * golden) % 1.0, 0.9, 0.85 if k % 2 else 0.6)
                     for k in range(count)])


def _tints(colors: np.ndarray, alpha: float) -> np.ndarray:
    """``colors`` seen at ``alpha`` over white (an opaque image is cheaper to draw)."""
    return 1.0 - alpha * (1.0 - colors)


def _greys(values: np.ndarray, low: float, high: float, light: bool) -> np.ndarray:
    """RGB greys for ``values`` from ``low`` to ``high``: black to white, as an image,
    or (``light``) white to pale grey, darker for larger values, under black numbers
    that stay legible.  Non-finite values are white."""
    finite = np.isfinite(values)
    span = high - low if high > low else 1.0
    # Clipped: an Lp output can exceed the input's largest value.
    level = np.clip(np.where(finite, (np.where(finite, values, low) - low) / span, 1.0), 0, 1)
    if light:
        level = np.where(finite, 1.0 - 0.3 * level, 1.0)
    return np.repeat(level[..., None], 3, axis=-1)


def _value_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


@dataclass(frozen=True)
class _Layout:
    """Cell scale and panel placement shared by :func:`plot_pooling` and
    :func:`animate_pooling`.

    The panels are placed by hand, in inches, rather than by ``tight_layout``:
    that would measure every cell label, which costs more than drawing them.
    """

    cell: float  # inches per cell
    show_values: bool
    fontsize: float
    linewidth: float

    # Margins (inches): around the figure, between the panels, above them (titles),
    # and the narrowest a panel's column may be (its title must fit).
    MARGIN = 0.2
    GAP = 0.4
    TITLE = 0.45
    MIN_COLUMN = 1.9

    @classmethod
    def of(cls, pooling: _Pooling, show_values: bool | None) -> _Layout:
        cells = max(*pooling.padded_shape, *pooling.out.shape)
        cell = min(_MAX_CELL, _MAX_PANEL / cells)
        if show_values is None:
            show_values = cell >= _MIN_LABELLED_CELL
        return cls(cell, bool(show_values), fontsize=min(8.0, 18.0 * cell),
                   linewidth=float(np.clip(4.0 * cell, 0.4, 2.0)))

    def figure(self, pooling: _Pooling):
        """A figure with the padded input on the left and the output on the right,
        both at ``cell`` inches per cell, top-aligned under their titles."""
        sizes = [(rows * self.cell, cols * self.cell)
                 for rows, cols in (pooling.padded_shape, pooling.out.shape)]
        columns = [max(width, self.MIN_COLUMN) for _, width in sizes]
        panels_height = max(height for height, _ in sizes)
        width = 2 * self.MARGIN + self.GAP + sum(columns)
        height = self.MARGIN + self.TITLE + panels_height
        figure = _figure((width, height))
        axes, column_left = [], self.MARGIN
        for (panel_height, panel_width), column in zip(sizes, columns):
            left = column_left + (column - panel_width) / 2
            bottom = self.MARGIN + panels_height - panel_height
            axes.append(figure.add_axes((left / width, bottom / height,
                                         panel_width / width, panel_height / height)))
            column_left += column + self.GAP
        return figure, axes


def _grid_axes(ax, rows: range, cols: range, title: str, lines: bool) -> None:
    """Set ``ax`` up as a grid of unit cells centred on integer ``(col, row)``,
    with lines between the cells (one artist) when they are large enough."""
    from matplotlib.collections import LineCollection

    ax.set_xlim(cols.start - 0.5, cols.stop - 0.5)
    ax.set_ylim(rows.stop - 0.5, rows.start - 0.5)
    ax.set_title(title, fontsize=_TITLE_SIZE)
    ax.set_xticks([])
    ax.set_yticks([])
    if lines:
        xs = np.arange(cols.start, cols.stop + 1) - 0.5
        ys = np.arange(rows.start, rows.stop + 1) - 0.5
        segments = [[(x, ys[0]), (x, ys[-1])] for x in xs] + \
            [[(xs[0], y), (xs[-1], y)] for y in ys]
        ax.add_collection(LineCollection(segments, colors="0.75", linewidths=0.6, zorder=1),
                          autolim=False)


def _glyphs(text: str, fontsize: float):
    """``text`` as a path in points, centred on the origin horizontally and on the
    middle of a digit vertically (so that every label shares one baseline), in
    matplotlib's current default font."""
    from matplotlib import rcParams

    return _glyphs_in(text, fontsize, tuple(rcParams["font.family"]))


@functools.lru_cache(maxsize=4096)  # a grid repeats few strings; a TextPath costs ~1 ms
def _glyphs_in(text: str, fontsize: float, family: tuple[str, ...]):
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    if not text:  # TextPath cannot make an empty path
        return Path(np.zeros((0, 2)))
    font = FontProperties(family=list(family), size=fontsize)
    path = TextPath((0, 0), text, prop=font)
    digit = TextPath((0, 0), "0", prop=font).vertices
    # The control points' bounds (Path.get_extents, exact for curves, is ~10x slower).
    shift = np.array([(path.vertices[:, 0].min() + path.vertices[:, 0].max()) / 2,
                      (digit[:, 1].min() + digit[:, 1].max()) / 2])
    return Path(path.vertices - shift, path.codes)


def _labels(ax, strings: Sequence[str], centers: np.ndarray, fontsize: float, *,
            gid: str, color="black"):
    """``strings[k]`` centred on ``centers[k]`` (data coordinates, x then y).

    The labels are glyph outlines in one PathCollection: a single artist, drawn
    in one call, where a Text per cell would cost about a millisecond each (and
    as much again to lay the figure out).  Its gid is ``gid``; its
    ``cell_labels`` attribute lists the strings.
    """
    from matplotlib.collections import PathCollection
    from matplotlib.transforms import IdentityTransform

    # Glyphs in points, scaled by the sizes (as scatter's markers), placed at data
    # offsets; without the explicit transform the axes would scale them as data.
    labels = PathCollection([_glyphs(text, fontsize) for text in strings], sizes=[1.0],
                            offsets=np.asarray(centers, dtype=float).reshape(-1, 2),
                            offset_transform=ax.transData, facecolors=color,
                            edgecolors="none", linewidths=0, zorder=2,
                            transform=IdentityTransform())
    labels.set_gid(gid)
    labels.cell_labels = list(strings)
    ax.add_collection(labels, autolim=False)
    return labels


def _value_labels(ax, values: np.ndarray, fmt: str, fontsize: float):
    """Each value of a grid, formatted with ``fmt``, on its cell (gid "values")."""
    rows, cols = np.indices(values.shape).reshape(2, -1)
    return _labels(ax, [format(value, fmt) for value in values.ravel()],
                   np.column_stack([cols, rows]), fontsize, gid="values")


def _draw_input(ax, pooling: _Pooling, layout: _Layout, fmt: str, title: str) -> None:
    """The input as an image (one artist), the padding as a hatched ring with the pad
    value in each of its cells, and the values as numbers when legible."""
    from matplotlib.patches import Rectangle

    x, (pad_rows, pad_cols) = pooling.x, pooling.padding
    (rows, cols), lines = x.shape, layout.show_values
    _grid_axes(ax, range(-pad_rows, rows + pad_rows), range(-pad_cols, cols + pad_cols),
               title, lines)
    if pad_rows or pad_cols:
        # A hatched sheet under the whole padded grid; the input image covers its middle.
        ax.add_patch(Rectangle((-pad_cols - 0.5, -pad_rows - 0.5), cols + 2 * pad_cols,
                               rows + 2 * pad_rows, facecolor="0.94", edgecolor="0.8",
                               hatch="///", linewidth=0, zorder=0))
        if layout.show_values:
            ring = np.ones(pooling.padded_shape, bool)
            ring[pad_rows:pad_rows + rows, pad_cols:pad_cols + cols] = False
            ring_rows, ring_cols = np.nonzero(ring)
            _labels(ax, [pooling.pad_label] * ring_rows.size,
                    np.column_stack([ring_cols - pad_cols, ring_rows - pad_rows]),
                    # larger: the infinity sign is small beside digits
                    1.25 * layout.fontsize, gid="padding", color="0.2")
    low, high = _value_range(x)
    ax.imshow(_greys(x, low, high, light=layout.show_values), interpolation="nearest",
              extent=(-0.5, cols - 0.5, rows - 0.5, -0.5), zorder=0.5)
    if layout.show_values:
        _value_labels(ax, x, fmt, layout.fontsize)


def _boxes(top, bottom, left, right, inset, colors, linewidth: float):
    """Outlines of the cell ranges ``top:bottom`` by ``left:right`` (arrays, one box
    each), drawn ``inset`` cells inside them, as one LineCollection: one artist
    however many boxes."""
    from matplotlib.collections import LineCollection

    x0, x1 = left - 0.5 + inset, right - 0.5 - inset
    y0, y1 = top - 0.5 + inset, bottom - 0.5 - inset
    corners = np.stack([np.stack(xy, axis=-1) for xy in
                        [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]], axis=1)
    return LineCollection(corners, colors=colors, linewidths=linewidth, zorder=3,
                          joinstyle="miter")


def _window_outlines(pooling: _Pooling, colors, linewidth: float):
    """Every window's outline, in raster order of the outputs.

    Where windows overlap, neighbours are inset by different amounts (by the
    parity of their output row and column), so that edges they share run side by
    side instead of on top of each other.
    """
    oh, ow = np.indices(pooling.out.shape).reshape(2, -1)
    stagger = 2 * (oh % 2) + ow % 2 if pooling.overlapping() else np.zeros_like(oh)
    outlines = _boxes(pooling.top[oh], pooling.bottom[oh], pooling.left[ow],
                      pooling.right[ow], 0.06 + 0.05 * stagger, colors, linewidth)
    outlines.set_gid("windows")
    return outlines


def plot_pooling(x: np.ndarray, mode: str = "max", kernel_size: int | Sequence[int] = 2,
                 stride=None, padding=0, *, output_size=None, norm_type=None,
                 path: str | None = None, dpi: int = 100, fmt: str = ".2g",
                 show_values: bool | None = None):
    """Draw a 2-D input, its pooling windows and the pooled output.

    The input is drawn in greys, any padding as a hatched ring of cells holding the
    pad value (−∞ for max, 0 for average), and each window outlined in its own
    colour, the same colour as the output cell it produces.  Overlapping windows
    are inset by different amounts so that their shared edges stay apart.

    Parameters
    ----------
    x : numpy.ndarray
        A 2-D array (one plane).  Up to about 20x20 every cell shows its value;
        larger inputs are drawn as an image (a 128x128 input takes well under a
        second).
    mode : {"max", "avg", "lp", "adaptive_max", "adaptive_avg"}
        The pooling to draw.
    kernel_size, stride, padding : int or tuple of 2 ints
        The sliding window (ignored by the adaptive modes).
    output_size : int or tuple of 2 ints, optional
        The adaptive modes' output size.
    norm_type : float, optional
        The power of "lp".
    path : str, optional
        Where to save a PNG (the same call always writes the same bytes).
    dpi : int, default 100
        Resolution of the saved PNG.
    fmt : str, default ".2g"
        Number format of the cell labels.
    show_values : bool, optional
        Write each cell's value (the pad value in padding cells) on it; by
        default only when the cells are large enough to read.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ImportError
        Without matplotlib; the message names the extra to install.

    Notes
    -----
    Each layer is one artist, whatever the size of the grid: the cells are an
    image, the window outlines one collection (gid ``"windows"``, and
    ``"outputs"`` for the output cells' outlines), and the numbers glyph outlines
    in one collection per panel (gid ``"values"``, ``"padding"`` for the pad
    values) whose ``cell_labels`` attribute lists them in row-major order.

    Examples
    --------
    >>> import numpy as np
    >>> from fastpool.viz import plot_pooling
    >>> figure = plot_pooling(np.arange(16.0).reshape(4, 4), "max", 3, 2, padding=1)
    >>> left, right = figure.axes
    >>> [c.cell_labels for c in right.collections if c.get_gid() == "values"]
    [['5', '7', '13', '15']]
    >>> [set(c.cell_labels) for c in left.collections if c.get_gid() == "padding"]
    [{'−∞'}]
    """
    pooling = _pooling(x, mode, kernel_size, stride, padding, output_size, norm_type)
    layout = _Layout.of(pooling, show_values)
    figure, (left, right) = layout.figure(pooling)
    (rows, cols), (out_rows, out_cols) = pooling.x.shape, pooling.out.shape
    padded = f", padding {pooling.padding[0]}x{pooling.padding[1]}" \
        if any(pooling.padding) else ""
    _draw_input(left, pooling, layout, fmt, f"input {rows}x{cols}{padded}")
    colors = _window_colors(pooling.out.size)
    left.add_collection(_window_outlines(pooling, colors, layout.linewidth))
    _grid_axes(right, range(out_rows), range(out_cols),
               f"{mode} output {out_rows}x{out_cols}", layout.show_values)
    if layout.show_values:
        right.imshow(_tints(colors, 0.35).reshape(out_rows, out_cols, 3),
                     interpolation="nearest")
        oh, ow = np.indices(pooling.out.shape).reshape(2, -1)
        outputs = _boxes(oh, oh + 1, ow, ow + 1, 0.08, colors, layout.linewidth)
        outputs.set_gid("outputs")
        right.add_collection(outputs)
        _value_labels(right, pooling.out, fmt, layout.fontsize)
    else:  # too many windows for colours to link them: show the pooled image itself
        right.imshow(_greys(pooling.out, *_value_range(pooling.x), light=False),
                     interpolation="nearest")
    if path is not None:
        _savefig(figure, path, dpi)
    return figure


def _progress(frames: Iterable[int], total: int, show: bool | None):
    """``frames``, behind a tqdm progress bar when asked for (by default for long
    animations) and tqdm is installed; tqdm is optional, so without it no bar."""
    if show is None:
        show = total >= _PROGRESS_FRAMES
    if not show:
        return frames
    try:
        from tqdm import tqdm
    except ImportError:
        return frames
    return tqdm(frames, total=total, desc="animate_pooling", unit="frame", leave=False)


def _write_gif(frames: Iterator, path: str, fps: int) -> None:
    """Write RGB frames, as they come, as a looping GIF.

    One palette, made from the first frame, which already holds every colour
    (the output cells take the input's greys), and no dithering: the bytes depend
    only on the pixels.  Frames are indexed as they come, so no RGB frame is kept.
    """
    from PIL import Image

    first = next(frames)
    palette = first.quantize(colors=255, method=Image.Quantize.FASTOCTREE)
    indexed = (frame.quantize(palette=palette, dither=Image.Dither.NONE)
               for frame in itertools.chain([first], frames))
    next(indexed).save(path, save_all=True, append_images=indexed,
                       duration=round(1000 / fps), loop=0)


def animate_pooling(x: np.ndarray, mode: str = "max", kernel_size: int | Sequence[int] = 2,
                    stride=None, padding=0, *, path: str, output_size=None, norm_type=None,
                    fps: int = 2, dpi: int = 80, fmt: str = ".2g",
                    show_values: bool | None = None, progress: bool | None = None) -> int:
    """Write a GIF of the window sliding over ``x`` and the output filling in.

    One frame per output element: its window is outlined, the element a max
    window picks (or the whole window of an average) is shaded, and the output
    shows every value computed so far.  The still parts are drawn once; each
    frame redraws only the window, its highlight and the new output cell, so a
    16x16 input (64 frames at kernel 2) takes well under a second.

    Parameters
    ----------
    x, mode, kernel_size, stride, padding, output_size, norm_type, show_values
        As in :func:`plot_pooling`.
    path : str
        Where to write the GIF (the same call always writes the same bytes).
    fps : int, default 2
        Frames per second.
    dpi : int, default 80
        Resolution of the frames.
    fmt : str, default ".2g"
        Number format of the cell labels.
    progress : bool, optional
        Show a progress bar (needs tqdm; without it, none); by default from
        100 frames on.

    Returns
    -------
    int
        The number of frames written.

    Raises
    ------
    ImportError
        Without matplotlib or Pillow; the message names the extra to install.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from fastpool.viz import animate_pooling
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     animate_pooling(np.arange(16.0).reshape(4, 4), "max", 2,
    ...                     path=os.path.join(folder, "max.gif"))
    4
    """
    pooling = _pooling(x, mode, kernel_size, stride, padding, output_size, norm_type)
    layout = _Layout.of(pooling, show_values)
    figure, (left, right) = layout.figure(pooling)
    _require("PIL", "Pillow")
    from matplotlib.patches import Rectangle
    from PIL import Image

    out, cols = pooling.out, pooling.x.shape[1]
    positions = list(np.ndindex(*out.shape))
    _draw_input(left, pooling, layout, fmt, "")
    _grid_axes(right, range(out.shape[0]), range(out.shape[1]), f"{mode} output",
               layout.show_values)

    # Drawn by hand, frame by frame ("animated" keeps them out of the still picture):
    # the window, the element it picks (max) or its area (average), the output cell
    # it fills, the frame counter, and each output cell's shade and value.
    picks = pooling.argmax is not None
    color = "tab:red" if picks else "tab:blue"
    line = max(layout.linewidth, 1.0)
    window = Rectangle((0, 0), 1, 1, fill=False, edgecolor=color, linewidth=line, zorder=4)
    chosen = Rectangle((0, 0), 1, 1, facecolor=color, alpha=0.4 if picks else 0.2, zorder=2)
    current = Rectangle((0, 0), 1, 1, fill=False, edgecolor="tab:orange", linewidth=line,
                        zorder=4)
    # The title counts the frames; as glyph outlines it costs a fifth of a Text's
    # redraw, which was half of all the time spent on a frame.
    title_y = -pooling.padding[0] - 0.5 - 0.15 / layout.cell  # 0.15 in above the grid
    counter = _labels(left, [""], [[(cols - 1) / 2, title_y]], _TITLE_SIZE, gid="counter")
    counter.set_clip_on(False)
    shades = _greys(out, *_value_range(pooling.x), light=layout.show_values)
    done = Rectangle((0, 0), 1, 1, linewidth=0, zorder=1)
    left.add_patch(window)
    left.add_patch(chosen)
    right.add_patch(current)
    right.add_patch(done)
    values = _value_labels(right, out, fmt, layout.fontsize) if layout.show_values else None
    for artist in (window, chosen, current, counter, done, values):
        if artist is not None:
            artist.set_animated(True)

    figure.set_dpi(dpi)  # the frames are the canvas's pixels: draw at their resolution
    canvas = figure.canvas
    canvas.draw()

    def frames():
        """Each frame's picture: the still one, plus this frame's artists."""
        for frame in _progress(range(len(positions)), len(positions), progress):
            oh, ow = positions[frame]
            # Output cells done so far stay in the still picture: redraw only the new one.
            done.set_bounds(ow - 0.5, oh - 0.5, 1, 1)
            done.set_facecolor(shades[oh, ow])
            right.draw_artist(done)
            if values is not None:
                values.set_offsets(np.array([[ow, oh]], dtype=float))
                values.set_paths([_glyphs(values.cell_labels[frame], layout.fontsize)])
                right.draw_artist(values)
            still = canvas.copy_from_bbox(figure.bbox)
            top, bottom = pooling.top[oh], pooling.bottom[oh]
            start, stop = pooling.left[ow], pooling.right[ow]
            window.set_bounds(start - 0.5, top - 0.5, stop - start, bottom - top)
            if picks:
                row, col = divmod(int(pooling.argmax[oh, ow]), cols)
                chosen.set_bounds(col - 0.5, row - 0.5, 1, 1)
            else:
                chosen.set_bounds(start - 0.5, top - 0.5, stop - start, bottom - top)
            current.set_bounds(ow - 0.5, oh - 0.5, 1, 1)
            counter.set_paths([_glyphs(f"input, window {frame + 1}/{len(positions)}",
                                       _TITLE_SIZE)])
            for ax, artist in ((left, chosen), (left, window), (left, counter), (right, current)):
                ax.draw_artist(artist)
            # A copy (the canvas is drawn over next), unpacked straight to RGB.
            picture = Image.frombytes("RGB", canvas.get_width_height(),
                                      canvas.buffer_rgba(), "raw", "RGBX")
            canvas.restore_region(still)
            yield picture

    _write_gif(frames(), path, fps)
    return len(positions)


def sample_image(size: int = 128) -> np.ndarray:
    """A synthetic grey-level image with edges, textures and shapes (no download).

    Examples
    --------
    >>> from fastpool.viz import sample_image
    >>> sample_image(64).shape
    (64, 64)
    """
    y, x = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 12 * (x + 0.3 * y))
    disc = ((x - 0.3) ** 2 + (y - 0.35) ** 2 < 0.04).astype(float)
    square = ((np.abs(x - 0.72) < 0.14) & (np.abs(y - 0.68) < 0.14)).astype(float)
    checker = ((np.floor(x * 16) + np.floor(y * 16)) % 2) * (y > 0.8)
    return (0.25 * stripes * (x < 0.55) + disc + 0.8 * square + 0.6 * checker).astype(
        np.float32)


def plot_feature_hierarchy(image: np.ndarray | None = None, levels: int = 4,
                           kernel_size: int = 2, *, path: str | None = None,
                           dpi: int = 100, panel: float = 1.8):
    """Pool an image again and again, max against average, all at one display size.

    Parameters
    ----------
    image : numpy.ndarray, optional
        A 2-D grey-level image; by default :func:`sample_image`.
    levels : int, default 4
        How many times to pool.
    kernel_size : int, default 2
        The (square) window and stride of each pooling.
    path : str, optional
        Where to save a PNG (the same call always writes the same bytes).
    dpi : int, default 100
        Resolution of the saved PNG.
    panel : float, default 1.8
        Size of each panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
        Two rows (max, average) of ``levels + 1`` panels.

    Raises
    ------
    ImportError
        Without matplotlib; the message names the extra to install.

    Examples
    --------
    >>> from fastpool.viz import plot_feature_hierarchy
    >>> figure = plot_feature_hierarchy(levels=2)
    >>> len(figure.axes)
    6
    """
    # Pooled in float64, where sums of float32 pixels are exact whatever order a
    # kernel adds them in: the grey levels, and so the PNG, never depend on it.
    image = sample_image() if image is None else np.asarray(image)
    image = image.astype(np.float64)
    if image.ndim != 2:
        raise ValueError(f"plot_feature_hierarchy: image must be 2-D, got shape {image.shape}")
    figure = _figure((panel * (levels + 1), 2 * panel + 0.4))
    axes = figure.subplots(nrows=2, ncols=levels + 1, squeeze=False)
    for row, mode in enumerate(("max", "avg")):
        level = image
        for column in range(levels + 1):
            ax = axes[row, column]
            ax.imshow(level, cmap="gray", interpolation="nearest", vmin=image.min(),
                      vmax=image.max())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{mode} {level.shape[0]}x{level.shape[1]}" if column else
                         f"input {level.shape[0]}x{level.shape[1]}", fontsize=9)
            if min(level.shape) >= kernel_size:
                level = fastpool.pool(level, mode, (kernel_size, kernel_size))
    figure.tight_layout()
    if path is not None:
        _savefig(figure, path, dpi)
    return figure
