"""Pictures of pooling, drawn from fastpool's own window tables and kernels.

Needs matplotlib (and Pillow for GIFs): ``pip install "fastpool[viz]"``.

- :func:`plot_pooling`: a small 2-D input as a grid of numbers, each window
  outlined in its own colour, beside the pooled output in the same colours.
- :func:`animate_pooling`: a GIF of the window sliding over the input, the
  chosen element (max) or the window (average) highlighted, the output filling in.
- :func:`plot_feature_hierarchy`: an image pooled again and again, max against
  average, every level drawn at the same size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import fastpool
from fastpool._params import SlidingWindow, WindowTable, adaptive_output_shape, adaptive_table

_MODES = ("max", "avg", "lp", "adaptive_max", "adaptive_avg")


def _figure(figsize, **subplots):
    """A figure and its axes, without pyplot: no global state, no display needed,
    and notebooks still show the returned figure."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("fastpool.viz needs matplotlib: pip install 'fastpool[viz]'") \
            from error
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(**subplots)


def _rectangle(xy, width, height, **style):
    from matplotlib.patches import Rectangle
    return Rectangle(xy, width, height, **style)


def _side_by_side(x: np.ndarray, out: np.ndarray):
    return _figure((2 + 0.5 * (x.shape[1] + out.shape[1]), 1.2 + 0.5 * x.shape[0]),
                   nrows=1, ncols=2,
                   gridspec_kw={"width_ratios": [x.shape[1], max(out.shape[1], 1)]})


def _windows(x: np.ndarray, mode: str, kernel_size, stride, padding, output_size,
             norm_type):
    """The window table and the pooled output of a 2-D ``x``."""
    op = "viz"
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be a 2-D array (one plane), got shape {x.shape}")
    if mode not in _MODES:
        raise ValueError(f"{op}: mode must be one of {_MODES}, got {mode!r}")
    if mode.startswith("adaptive"):
        if output_size is None:
            raise ValueError(f"{op}: mode={mode!r} needs output_size")
        out_spatial = adaptive_output_shape(op, 2, output_size, x.shape)
        table = adaptive_table(x.shape, out_spatial)
        out = fastpool.adaptive_pool(x, mode.split("_")[1], out_spatial)
    else:
        if kernel_size is None:
            raise ValueError(f"{op}: mode={mode!r} needs kernel_size")
        window = SlidingWindow.from_args(op, 2, kernel_size, stride, padding)
        table = window.table(op, x.shape, "valid")
        size = tuple(np.broadcast_to(np.atleast_1d(kernel_size), 2))
        out = fastpool.pool(x, mode, size, stride, padding,
                            norm_type=norm_type if mode == "lp" else None)
    return table, out


def _cells(table: WindowTable, oh: int, ow: int):
    """(row range, column range) of output (oh, ow)'s window, padding excluded."""
    return (range(table.start[1, oh], table.stop[1, oh], table.step[1]),
            range(table.start[2, ow], table.stop[2, ow], table.step[2]))


def _grid(ax, values: np.ndarray, title: str, fmt: str) -> None:
    rows, cols = values.shape
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="0.8", linewidth=0.8)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    for (r, c), value in np.ndenumerate(values):
        ax.text(c, r, format(value, fmt), ha="center", va="center", fontsize=8)


def _outline(ax, rows: range, cols: range, color, width: float = 2.0, inset: float = 0.0):
    if len(rows) and len(cols):
        ax.add_patch(_rectangle((cols.start - 0.5 + inset, rows.start - 0.5 + inset),
                               cols[-1] - cols.start + 1 - 2 * inset,
                               rows[-1] - rows.start + 1 - 2 * inset,
                               fill=False, edgecolor=color, linewidth=width))


def plot_pooling(x: np.ndarray, mode: str = "max", kernel_size: int | Sequence[int] = 2,
                 stride=None, padding=0, *, output_size=None, norm_type=None,
                 path: str | None = None, dpi: int = 100, fmt: str = ".2g"):
    """Draw a 2-D input, its pooling windows and the pooled output.

    Parameters
    ----------
    x : numpy.ndarray
        A small 2-D array (one plane).
    mode : {"max", "avg", "lp", "adaptive_max", "adaptive_avg"}
        The pooling to draw.
    kernel_size, stride, padding : int or tuple of 2 ints
        The sliding window (ignored by the adaptive modes).
    output_size : int or tuple of 2 ints, optional
        The adaptive modes' output size.
    norm_type : float, optional
        The power of "lp".
    path : str, optional
        Where to save a PNG.
    dpi : int, default 100
        Resolution of the saved PNG.
    fmt : str, default ".2g"
        Number format of the cell labels.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from fastpool.viz import plot_pooling
    >>> figure = plot_pooling(np.arange(16.0).reshape(4, 4), "max", 2)
    >>> len(figure.axes)
    2
    """
    from matplotlib import colormaps

    x = np.asarray(x, dtype=np.float64)
    table, out = _windows(x, mode, kernel_size, stride, padding, output_size, norm_type)
    colors = colormaps["tab10"]
    figure, (left, right) = _side_by_side(x, out)
    _grid(left, x, f"input {x.shape[0]}x{x.shape[1]}", fmt)
    _grid(right, out, f"{mode} output {out.shape[0]}x{out.shape[1]}", fmt)
    for k, (oh, ow) in enumerate(np.ndindex(*out.shape)):
        color = colors(k % 10)
        rows, cols = _cells(table, oh, ow)
        _outline(left, rows, cols, color, inset=0.04 * (k % 4))
        right.add_patch(_rectangle((ow - 0.5, oh - 0.5), 1, 1, color=color, alpha=0.35))
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure


def animate_pooling(x: np.ndarray, mode: str = "max", kernel_size: int | Sequence[int] = 2,
                    stride=None, padding=0, *, path: str, output_size=None, norm_type=None,
                    fps: int = 2, dpi: int = 80, fmt: str = ".2g") -> int:
    """Write a GIF of the window sliding over ``x`` and the output filling in.

    One frame per output element: its window is outlined, the element a max
    window picks (or the whole window of an average) is shaded, and the output
    shows every value computed so far.

    Parameters
    ----------
    x, mode, kernel_size, stride, padding, output_size, norm_type
        As in :func:`plot_pooling`.
    path : str
        Where to write the GIF (Pillow writer).
    fps : int, default 2
        Frames per second.
    dpi : int, default 80
        Resolution of the frames.
    fmt : str, default ".2g"
        Number format of the cell labels.

    Returns
    -------
    int
        The number of frames written.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from fastpool.viz import animate_pooling
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     animate_pooling(np.arange(16.0).reshape(4, 4), "max", 2,
    ...                     path=os.path.join(folder, "max.gif"))
    4
    """
    from matplotlib.animation import FuncAnimation, PillowWriter

    x = np.asarray(x, dtype=np.float64)
    table, out = _windows(x, mode, kernel_size, stride, padding, output_size, norm_type)
    argmax = None
    if "max" in mode and not mode.startswith("adaptive"):
        size = tuple(np.broadcast_to(np.atleast_1d(kernel_size), 2))
        _, argmax = fastpool.pool(x, "max", size, stride, padding, return_indices=True)
    elif mode == "adaptive_max":
        _, argmax = fastpool.adaptive_pool(x, "max", out.shape, return_indices=True)
    positions = list(np.ndindex(*out.shape))
    figure, (left, right) = _side_by_side(x, out)

    def draw(frame: int):
        left.clear()
        right.clear()
        oh, ow = positions[frame]
        shown = np.full(out.shape, np.nan)
        for k in range(frame + 1):
            shown[positions[k]] = out[positions[k]]
        _grid(left, x, f"input, window {frame + 1}/{len(positions)}", fmt)
        _grid(right, np.nan_to_num(shown, nan=0.0), f"{mode} output", fmt)
        for text, value in zip(right.texts, shown.ravel()):
            text.set_visible(not np.isnan(value))
        rows, cols = _cells(table, oh, ow)
        if argmax is not None:
            r, c = divmod(int(argmax[oh, ow]), x.shape[1])
            left.add_patch(_rectangle((c - 0.5, r - 0.5), 1, 1, color="tab:red", alpha=0.4))
        elif len(rows) and len(cols):
            left.add_patch(_rectangle((cols.start - 0.5, rows.start - 0.5),
                                      cols[-1] - cols.start + 1, rows[-1] - rows.start + 1,
                                      color="tab:blue", alpha=0.2))
        _outline(left, rows, cols, "tab:red" if argmax is not None else "tab:blue")
        right.add_patch(_rectangle((ow - 0.5, oh - 0.5), 1, 1, color="tab:orange",
                                   alpha=0.4))
        return []

    animation = FuncAnimation(figure, draw, frames=len(positions), blit=False)
    animation.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
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
        Where to save a PNG.
    dpi : int, default 100
        Resolution of the saved PNG.
    panel : float, default 1.8
        Size of each panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
        Two rows (max, average) of ``levels + 1`` panels.

    Examples
    --------
    >>> from fastpool.viz import plot_feature_hierarchy
    >>> figure = plot_feature_hierarchy(levels=2)
    >>> len(figure.axes)
    6
    """
    image = sample_image() if image is None else np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"plot_feature_hierarchy: image must be 2-D, got shape {image.shape}")
    figure, axes = _figure((panel * (levels + 1), 2 * panel + 0.4), nrows=2,
                           ncols=levels + 1, squeeze=False)
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
        figure.savefig(path, dpi=dpi)
    return figure
