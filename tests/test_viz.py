"""fastpool.viz: pictures of the expected size, frames, windows, padding and values;
the same bytes every time; a clear message without the viz extra.

Every input here is small: these tests check what is drawn, not how fast.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastpool import viz

EXTRA = 'pip install "fastpool[viz]"'
X4 = np.arange(16.0).reshape(4, 4)


def _collection(ax, gid):
    """The collection of ``ax`` with this gid: cell labels ("values", "padding"),
    window outlines ("windows")."""
    found = [c for c in ax.collections if c.get_gid() == gid]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.parametrize("mode, kwargs, outputs", [
    ("max", dict(kernel_size=2), 4),
    ("avg", dict(kernel_size=3, stride=1, padding=1), 16),
    ("lp", dict(kernel_size=2, norm_type=2), 4),
    ("adaptive_max", dict(output_size=3), 9),
    ("adaptive_avg", dict(output_size=(2, 3)), 6),
])
def test_plot_and_animate(mode, kwargs, outputs, tmp_path):
    figure = viz.plot_pooling(X4, mode, path=str(tmp_path / "p.png"), dpi=50, **kwargs)
    width, height = (figure.get_size_inches() * 50).round().astype(int)
    with Image.open(tmp_path / "p.png") as png:
        assert png.format == "PNG" and png.size == (width, height)
        assert np.asarray(png.convert("L")).std() > 0  # not a blank canvas
    frames = viz.animate_pooling(X4, mode, path=str(tmp_path / "a.gif"), dpi=40, **kwargs)
    assert frames == outputs
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == outputs
        pictures = []
        for k in range(gif.n_frames):
            gif.seek(k)
            pictures.append(np.asarray(gif.convert("RGB")))
    # Every frame moves the window on and fills one more output cell.
    assert all((a != b).any() for a, b in zip(pictures, pictures[1:]))


@pytest.mark.parametrize("mode, kwargs, expected, centres", [
    ("max", dict(kernel_size=2), ["5", "7", "13", "15"], [[0, 0], [1, 0], [0, 1], [1, 1]]),
    ("avg", dict(kernel_size=2), ["2.5", "4.5", "10", "12"], [[0, 0], [1, 0], [0, 1], [1, 1]]),
    ("adaptive_avg", dict(output_size=(1, 2)), ["6.5", "8.5"], [[0, 0], [1, 0]]),
])
def test_cells_show_their_values(mode, kwargs, expected, centres):
    left, right = viz.plot_pooling(X4, mode, **kwargs).axes
    values = _collection(right, "values")
    assert values.cell_labels == expected
    assert np.array_equal(values.get_offsets(), centres)  # (x, y): column, then row
    assert _collection(left, "values").cell_labels == [format(v, ".2g") for v in X4.ravel()]


@pytest.mark.parametrize("mode, pad_label", [("max", "−∞"), ("avg", "0")])
def test_padding_ring(mode, pad_label):
    left, _ = viz.plot_pooling(X4, mode, 3, 2, padding=1).axes
    # The grid grows by the padding, the ring's 20 cells hold the pad value ...
    assert left.get_xlim() == (-1.5, 4.5) and left.get_ylim() == (4.5, -1.5)
    ring = _collection(left, "padding")
    assert ring.cell_labels == [pad_label] * 20
    offsets = {tuple(xy) for xy in ring.get_offsets().astype(int)}
    assert offsets == {(c, r) for r in range(-1, 5) for c in range(-1, 5)
                       if r in (-1, 4) or c in (-1, 4)}
    # ... and is hatched.
    assert any(patch.get_hatch() for patch in left.patches)
    # The first window reaches into the padding: its outline starts left of column 0.
    assert _collection(left, "windows").get_segments()[0][:, 0].min() < -0.5


def test_no_padding_no_ring():
    left, _ = viz.plot_pooling(X4, "max", 2).axes
    assert _collection(left, "padding") is None and not left.patches
    assert left.get_xlim() == (-0.5, 3.5)


def test_windows_have_distinct_colours():
    x = np.random.default_rng(0).random((6, 6))
    left, right = viz.plot_pooling(x, "adaptive_max", output_size=4).axes
    outlines = _collection(left, "windows")
    assert len(outlines.get_segments()) == 16
    assert len(np.unique(outlines.get_colors().round(3), axis=0)) == 16  # none repeats
    # Output cells are outlined in their window's colour.
    assert np.array_equal(_collection(right, "outputs").get_colors(), outlines.get_colors())
    # Each outline surrounds its window: adaptive output 0 reads rows/columns 0..1.
    box = outlines.get_segments()[0]
    assert -0.5 <= box[:, 0].min() < 0 and 1 < box[:, 0].max() <= 1.5


def test_large_input_is_a_few_artists():
    """A 64x64 input is an image and one collection of outlines, not a patch or a
    text per cell (what made 128x128 take seconds); labels are left out."""
    left, right = viz.plot_pooling(np.random.default_rng(0).random((64, 64)), "max", 2).axes
    assert len(left.images) == 1 and len(right.images) == 1
    assert len(left.collections) == 1
    assert len(_collection(left, "windows").get_segments()) == 32 * 32
    assert not left.patches and not left.texts
    assert _collection(left, "values") is None and _collection(right, "values") is None


def test_show_values_overrides_the_default():
    left, right = viz.plot_pooling(X4, "max", 2, show_values=False).axes
    assert _collection(left, "values") is None and _collection(right, "values") is None
    left, _ = viz.plot_pooling(np.zeros((32, 32)), "max", 2, show_values=True).axes
    assert len(_collection(left, "values").cell_labels) == 32 * 32


def test_feature_hierarchy(tmp_path):
    figure = viz.plot_feature_hierarchy(levels=3, path=str(tmp_path / "h.png"), dpi=40)
    assert len(figure.axes) == 8
    with Image.open(tmp_path / "h.png") as png:
        assert png.size == tuple((figure.get_size_inches() * 40).round().astype(int))
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[:4] == ["input 128x128", "max 64x64", "max 32x32", "max 16x16"]
    assert titles[4:] == ["input 128x128", "avg 64x64", "avg 32x32", "avg 16x16"]


def test_progress_bar_is_optional(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("tqdm") is not None:
        viz.animate_pooling(X4, "max", 2, path=str(tmp_path / "bar.gif"), progress=True)
        assert "animate_pooling" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed
    assert viz.animate_pooling(X4, "max", 2, path=str(tmp_path / "a.gif"), progress=True) == 4
    assert capsys.readouterr().err == ""


def test_same_bytes_every_time(tmp_path):
    x = np.random.default_rng(1).random((5, 5))
    for name in ("a", "b"):
        viz.plot_pooling(x, "max", 3, 2, 1, path=str(tmp_path / f"{name}.png"), dpi=40)
        viz.animate_pooling(x, "avg", 3, 2, 1, path=str(tmp_path / f"{name}.gif"), dpi=30)
    for suffix in ("png", "gif"):
        assert (tmp_path / f"a.{suffix}").read_bytes() == (tmp_path / f"b.{suffix}").read_bytes()
    # No version string (or date) in the PNG: the bytes do not follow the installation.
    png = (tmp_path / "a.png").read_bytes()
    assert b"Software" not in png and b"atplotlib" not in png


def test_same_bytes_in_another_process(tmp_path):
    """A fresh interpreter (other hash seed, cold caches) writes the same PNG: what
    make_figures.py relies on to leave git clean."""
    script = textwrap.dedent(f"""
        from fastpool import viz
        viz.plot_feature_hierarchy(levels=2, path={str(tmp_path / "other.png")!r}, dpi=30)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1],
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    viz.plot_feature_hierarchy(levels=2, path=str(tmp_path / "here.png"), dpi=30)
    assert (tmp_path / "other.png").read_bytes() == (tmp_path / "here.png").read_bytes()


@pytest.mark.parametrize("missing", ["matplotlib", "PIL"])
def test_missing_extra_names_it(missing, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    calls = [lambda: viz.animate_pooling(X4, "max", 2, path=str(tmp_path / "a.gif"))]
    if missing == "matplotlib":
        calls += [lambda: viz.plot_pooling(X4, "max", 2),
                  lambda: viz.plot_feature_hierarchy(levels=1)]
    for call in calls:
        with pytest.raises(ImportError, match=r'pip install "fastpool\[viz\]"'):
            call()


def test_import_does_not_import_matplotlib():
    script = "import sys, fastpool.viz; print(sorted(m for m in sys.modules if 'matplotlib' in m))"
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                            text=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"


def test_photograph_for_the_docs():
    pytest.importorskip("skimage")
    spec = importlib.util.spec_from_file_location(
        "make_figures", Path(__file__).parents[1] / "docs" / "make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    photo = make_figures.photograph(64)
    assert photo.shape == (64, 64) and 0 <= photo.min() < photo.max() <= 1


@pytest.mark.parametrize("call, pattern", [
    (lambda: viz.plot_pooling(np.zeros(4), "max", 2), "2-D"),
    (lambda: viz.plot_pooling(np.zeros((4, 4)), "median", 2), "mode"),
    (lambda: viz.plot_pooling(np.zeros((4, 4)), "adaptive_max"), "output_size"),
    (lambda: viz.plot_feature_hierarchy(np.zeros((2, 2, 2))), "2-D"),
])
def test_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
