"""Regenerate the documentation's figures with fastpool itself.

    python docs/make_figures.py

Writes PNGs and a GIF into docs/_static/figures (committed, so the docs build
needs no plotting step).  Needs the ``docs`` extra (matplotlib, Pillow and
scikit-image, whose sample photograph ships inside the package: no download).

The output is reproducible: fixed data, fixed seeds, the Agg renderer, fixed dpi
and no version or date in the files, so running it twice leaves git clean.
"""

from pathlib import Path

import matplotlib
import numpy as np

import fastpool
from fastpool import viz
from fastpool.viz import _savefig

matplotlib.use("Agg")  # the same renderer on every machine, no display needed

FIGURES = Path(__file__).parent / "_static" / "figures"


def main(folder: Path = FIGURES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(3).integers(0, 10, (6, 6)).astype(float)
    viz.plot_pooling(x, "max", 3, 2, 1, path=str(folder / "max_pool.png"), dpi=90)
    viz.plot_pooling(x, "avg", 2, path=str(folder / "avg_pool.png"), dpi=90)
    viz.plot_pooling(x, "lp", 2, norm_type=2, path=str(folder / "lp_pool.png"), dpi=90)
    viz.plot_pooling(x, "adaptive_max", output_size=4, path=str(folder / "adaptive.png"),
                     dpi=90)
    viz.animate_pooling(x, "max", 3, 2, 1, path=str(folder / "max_pool.gif"), dpi=70)
    viz.plot_feature_hierarchy(levels=4, path=str(folder / "hierarchy.png"), dpi=90)
    downsampling(folder / "downsampling.png")


def photograph(size: int = 128) -> np.ndarray:
    """scikit-image's "camera" (512x512, shipped with the package), averaged down to
    ``size`` x ``size`` by fastpool, grey levels in [0, 1]."""
    from skimage.data import camera

    image = camera().astype(np.float64) / 255
    factor = image.shape[0] // size
    return fastpool.pool(image, "avg", (factor, factor))


def downsampling(path) -> None:
    """Two images (synthetic, photograph) halved four ways: max, average, and two
    strided convolutions."""
    # In float64, where these sums of float32 pixels are exact in any order: the
    # pixels cannot depend on how a kernel happens to add them up.
    edges = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    blur = np.full((2, 2), 0.25)
    rows = [("synthetic", viz.sample_image(128).astype(np.float64)),
            ("photograph", photograph(128).astype(np.float64))]
    titles = ["input 128x128", "max_pool2d(2)", "avg_pool2d(2)",
              "strided_conv2d, box filter", "strided_conv2d, edge filter"]
    figure = viz._figure((2.0 * len(titles), 2.1 * len(rows) + 0.2))
    axes = figure.subplots(len(rows), len(titles), squeeze=False)
    for row, (name, image) in zip(axes, rows):
        panels = [image, fastpool.pool(image, "max", (2, 2)), fastpool.pool(image, "avg", (2, 2)),
                  fastpool.strided_conv2d(image, blur),
                  fastpool.strided_conv2d(image, edges, padding=1)]
        for ax, title, panel in zip(row, titles, panels):
            ax.imshow(panel, cmap="gray", interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, fontsize=9)
    figure.tight_layout()
    _savefig(figure, path, dpi=90)


if __name__ == "__main__":
    main()
