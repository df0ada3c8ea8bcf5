"""Sphinx configuration of the norm_optax documentation.

Build it from the repository root (with ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Sources are Markdown (MyST). The API reference is generated from the
docstrings: each topic page under ``api/`` holds one ``autosummary`` list,
and a public name is documented by adding one line to it. The notebooks are
copied from ``notebooks/`` at build time and rendered from their committed
outputs (``nb_execution_mode = "off"``; the tests execute them).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout, also without an editable install

from sphinx.application import Sphinx  # noqa: E402
from sphinx.environment import BuildEnvironment  # noqa: E402
from sphinx.util import logging  # noqa: E402

import norm_optax  # noqa: E402

logger = logging.getLogger(__name__)

project = "norm_optax"
author = "norm_optax developers"
copyright = "norm_optax developers"
release = norm_optax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_design",
]

# .rst first: autosummary writes its generated stubs with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_templates",
    "Thumbs.db",
    ".DS_Store",
    "README.md",
    # Reused by guides/large_models.md through {include}, not a page itself.
    "scaling_out.md",
]

# --- MyST and MyST-NB --------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # rendered from the committed outputs
nb_merge_streams = True
nb_render_markdown_format = "myst"  # the notebooks print Markdown tables

# --- autodoc, autosummary, napoleon -----------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # the Args sections say what each argument is
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

# Every reference to a norm_optax object must resolve (a broken one is a
# warning, so an error under -W); references into other libraries are left
# as code, since the build reaches no other site for their inventories.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(optax|jax|jnp|lax|numpy|np|chex|flax|nnx|equinox|eqx)(\..*)?"),
    (r"py:.*", r"(typing|collections|re|math|functools)(\..*)?"),
    (r"py:.*", r"(Any|Callable|NamedTuple|Sequence|int|float|bool|str|None)"),
]

# --- HTML --------------------------------------------------------------------
html_theme = "furo"
html_title = f"norm_optax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "source_repository": "https://github.com/norm-optax/norm_optax",
    "source_branch": "main",
    "source_directory": "docs/",
}


def _public_names() -> dict[str, str]:
    """Every public object's full name -> the module that defines it."""
    names = {}
    for module, exported in (
        (norm_optax, norm_optax.__all__),
        (norm_optax.masks, norm_optax.masks.__all__),
    ):
        for name in exported:
            obj = getattr(module, name)
            if name != "__version__" and obj is not norm_optax.masks:
                names[f"{module.__name__}.{name}"] = obj.__module__
    return names


def _check_every_name_has_a_page(app: Sphinx, env: BuildEnvironment) -> None:
    """Warns (an error under -W) for each public name that has no page."""
    documented = set(getattr(env.get_domain("py"), "objects", {}))
    for name, module in sorted(_public_names().items()):
        if name not in documented:
            logger.warning(
                "public name %s (defined in %s) has no page: add a line %r to "
                "the autosummary list of its topic page in docs/api/",
                name,
                module,
                name.rpartition(".")[2],
            )


def setup(app: Sphinx) -> None:
    app.connect("env-check-consistency", _check_every_name_has_a_page)


def _copy_notebooks() -> None:
    """Mirrors ``notebooks/*.ipynb`` into ``docs/notebooks/`` (git-ignored)."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)


_copy_notebooks()
# Generated afresh by autosummary on every build, so that a name taken off a
# topic page leaves no stale page behind.
shutil.rmtree(DOCS / "api" / "_autosummary", ignore_errors=True)
