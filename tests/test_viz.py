"""fastpool.viz writes pictures of the expected size and frame count."""

import numpy as np
import pytest
from PIL import Image

from fastpool import viz


@pytest.mark.parametrize("mode, kwargs, outputs", [
    ("max", dict(kernel_size=2), 4),
    ("avg", dict(kernel_size=3, stride=1, padding=1), 16),
    ("lp", dict(kernel_size=2, norm_type=2), 4),
    ("adaptive_max", dict(output_size=3), 9),
    ("adaptive_avg", dict(output_size=(2, 3)), 6),
])
def test_plot_and_animate(mode, kwargs, outputs, tmp_path):
    x = np.arange(16.0).reshape(4, 4)
    figure = viz.plot_pooling(x, mode, path=str(tmp_path / "p.png"), dpi=50, **kwargs)
    width, height = (figure.get_size_inches() * 50).round().astype(int)
    with Image.open(tmp_path / "p.png") as png:
        assert png.format == "PNG" and png.size == (width, height)
        assert np.asarray(png.convert("L")).std() > 0  # not a blank canvas
    frames = viz.animate_pooling(x, mode, path=str(tmp_path / "a.gif"), dpi=40, **kwargs)
    assert frames == outputs
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == outputs


def test_feature_hierarchy(tmp_path):
    figure = viz.plot_feature_hierarchy(levels=3, path=str(tmp_path / "h.png"), dpi=40)
    assert len(figure.axes) == 8
    with Image.open(tmp_path / "h.png") as png:
        assert png.size == tuple((figure.get_size_inches() * 40).round().astype(int))
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[:4] == ["input 128x128", "max 64x64", "max 32x32", "max 16x16"]
    assert titles[4:] == ["input 128x128", "avg 64x64", "avg 32x32", "avg 16x16"]


@pytest.mark.parametrize("call, pattern", [
    (lambda: viz.plot_pooling(np.zeros(4), "max", 2), "2-D"),
    (lambda: viz.plot_pooling(np.zeros((4, 4)), "median", 2), "mode"),
    (lambda: viz.plot_pooling(np.zeros((4, 4)), "adaptive_max"), "output_size"),
    (lambda: viz.plot_feature_hierarchy(np.zeros((2, 2, 2))), "2-D"),
])
def test_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
