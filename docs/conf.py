"""Sphinx configuration: numpydoc API reference, MyST pages, the PyData theme.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(tests/test_docs.py does this).  Figures: ``python docs/make_figures.py``.
"""

import fastpool

project = "fastpool"
author = "the fastpool developers"
copyright = "2026, fastpool developers"  # as in LICENSE (BSD-3-Clause)
release = version = fastpool.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "benchmarks.json"]
myst_enable_extensions = ["colon_fence"]
autosummary_generate = True
# numpydoc sections carry the types; signatures stay short.
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# No intersphinx: the docs build offline (CI has no network).

html_theme = "pydata_sphinx_theme"
html_title = f"fastpool {release}"
html_static_path = ["_static"]
html_theme_options = {"navigation_depth": 2, "show_toc_level": 2}
