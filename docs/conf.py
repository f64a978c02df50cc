"""Sphinx configuration for the ntk_diag docs (MyST Markdown + autodoc)."""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "ntk_diag"
author = "ntk_diag authors"
copyright = "2025, ntk_diag authors"  # pylint: disable=redefined-builtin
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# `$…$`, `$$…$$` and `\begin{…}` environments in Markdown, `:::` fences,
# definition lists, and anchors for headings so pages can link to
# `page.md#section`.
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}

# The hook imports CLU, which imports TensorFlow; mock it where it is absent.
autodoc_mock_imports = [
    name for name in ("tensorflow", "tensorflow_datasets")
    if importlib.util.find_spec(name) is None
]

html_theme = "alabaster"
html_title = "ntk_diag"
