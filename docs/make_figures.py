"""Regenerate the documentation's figures with fastpool itself.

    python docs/make_figures.py

Writes PNGs and a GIF into docs/_static/figures (committed, so the docs build
needs no plotting step).
"""

from pathlib import Path

import numpy as np

from fastpool import viz

FIGURES = Path(__file__).parent / "_static" / "figures"


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(3).integers(0, 10, (6, 6)).astype(float)
    viz.plot_pooling(x, "max", 3, 2, 1, path=str(FIGURES / "max_pool.png"), dpi=90)
    viz.plot_pooling(x, "avg", 2, path=str(FIGURES / "avg_pool.png"), dpi=90)
    viz.plot_pooling(x, "lp", 2, norm_type=2, path=str(FIGURES / "lp_pool.png"), dpi=90)
    viz.plot_pooling(x, "adaptive_max", output_size=4, path=str(FIGURES / "adaptive.png"),
                     dpi=90)
    viz.animate_pooling(x, "max", 3, 2, 1, path=str(FIGURES / "max_pool.gif"), dpi=70)
    viz.plot_feature_hierarchy(levels=4, path=str(FIGURES / "hierarchy.png"), dpi=90)
    downsampling(FIGURES / "downsampling.png")


def downsampling(path) -> None:
    """One image halved four ways: max, average, and two strided convolutions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import fastpool

    image = viz.sample_image(128)
    edges = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], np.float32)
    blur = np.full((2, 2), 0.25, np.float32)
    panels = [
        ("input 128x128", image),
        ("max_pool2d(2)", fastpool.pool(image, "max", (2, 2))),
        ("avg_pool2d(2)", fastpool.pool(image, "avg", (2, 2))),
        ("strided_conv2d, box filter", fastpool.strided_conv2d(image, blur)),
        ("strided_conv2d, edge filter", fastpool.strided_conv2d(image, edges, padding=1)),
    ]
    figure = Figure(figsize=(2.0 * len(panels), 2.3))
    FigureCanvasAgg(figure)
    for ax, (title, panel) in zip(figure.subplots(1, len(panels)), panels):
        ax.imshow(panel, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
