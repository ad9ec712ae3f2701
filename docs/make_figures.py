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


if __name__ == "__main__":
    main()
