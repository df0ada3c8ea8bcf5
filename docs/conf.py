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

import base64
import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import Any

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
myst_enable_extensions = [
    "colon_fence",
    "dollarmath",
    "amsmath",
    "deflist",
    "substitution",
]
myst_heading_anchors = 3
nb_execution_mode = "off"  # rendered from the committed outputs
nb_merge_streams = True
nb_render_markdown_format = "myst"  # the notebooks print Markdown tables

# --- autodoc, autosummary, napoleon -----------------------------------------
autosummary_generate = True
autosummary_imported_members = True
# Type hints in the signatures, with the aliases of norm_optax._types kept
# as their names (Mask, Axis, ...) rather than expanded into long unions.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_type_aliases = {
    name: name for name in ("Axis", "Mask", "PyTree", "Scalar", "StackAxes", "Schedule")
}
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
    # The optional plotting helpers' matplotlib types.
    (r"py:.*", r"(matplotlib(\..*)?|Axes|AxesImage|Figure)"),
    (r"py:.*", r"(Any|Callable|NamedTuple|Sequence|int|float|bool|str|None)"),
    # The argument types' aliases: each Args section says what they accept.
    (r"py:.*", r"(norm_optax\._types\.)?(Axis|Mask|PyTree|Scalar|StackAxes|Schedule)"),
    (r"py:.*", r"(ArrayLike|Array|ArrayTree|Params|Updates|Numeric)"),
    (r"py:.*", r"TypeAliasForwardRef"),
]

# --- HTML --------------------------------------------------------------------
html_theme = "furo"
html_title = f"norm_optax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
REPOSITORY = "https://github.com/norm-optax/norm_optax"
html_theme_options = {
    "source_repository": REPOSITORY,
    "source_branch": "main",
    "source_directory": "docs/",
}


def _source_buttons(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """Points the "view/edit this page" buttons at files the repository has.

    The generated API pages have no source file of their own (their text is
    the docstring: the [source] link next to the signature shows it), so they
    get no buttons; a notebook page points at ``notebooks/``, not at the
    git-ignored copy this build makes in ``docs/notebooks/``.
    """
    if pagename.startswith("api/_autosummary/"):
        context["theme_top_of_page_buttons"] = []
    elif pagename.startswith("notebooks/"):
        path = f"notebooks/{pagename.rpartition('/')[2]}.ipynb"
        context["theme_source_view_link"] = f"{REPOSITORY}/blob/main/{path}?plain=true"
        context["theme_source_edit_link"] = f"{REPOSITORY}/edit/main/{path}"


# --- Lists generated from the code --------------------------------------------
# A page that lists "the functions that take X" writes {{ takes_X }} (a MyST
# substitution), so the list is always the code's: a new public function that
# takes the argument appears there without an edit.


def _public_functions() -> dict[str, Any]:
    """Full name -> object, for every public function (masks included)."""
    found = {}
    for module in (norm_optax, norm_optax.masks):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                found[f"{module.__name__}.{name}"] = obj
    return found


def names_taking(argument: str) -> list[str]:
    """The public functions whose signature has ``argument``, top level first."""
    return [
        name
        for name, obj in _public_functions().items()
        if argument in inspect.signature(obj).parameters
    ]


def _role(name: str) -> str:
    """A link to ``norm_optax.x`` shown as ``x`` (``masks.y`` for a mask)."""
    shown = name.removeprefix("norm_optax.")
    return f"{{func}}`{shown} <{name}>`"


def _as_prose(names: list[str]) -> str:
    roles = [_role(name) for name in names]
    if len(roles) < 2:
        return "".join(roles)
    return ", ".join(roles[:-1]) + f" and {roles[-1]}"


myst_substitutions = {
    f"takes_{argument}": _as_prose(names_taking(argument))
    for argument in ("stack_axes", "axis_name", "axis", "mask")
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
    app.connect("html-page-context", _source_buttons)


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


def _thumbnails() -> None:
    """The first plot of each notebook's stored outputs, for the gallery.

    Written to ``docs/images/notebooks/NAME.png`` (git-ignored), so a new
    notebook gets its thumbnail from its own outputs: ``gallery.md`` needs
    only its card.
    """
    target = DOCS / "images" / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        images = [
            output["data"]["image/png"]
            for cell in cells
            if cell["cell_type"] == "code"
            for output in cell.get("outputs", [])
            if "image/png" in output.get("data", {})
        ]
        thumbnail = target / f"{notebook.stem}.png"
        if not images:
            logger.warning("notebook %s has no plot for its thumbnail", notebook.name)
            continue
        data = images[0]
        png = base64.b64decode("".join(data) if isinstance(data, list) else data)
        if not thumbnail.exists() or thumbnail.read_bytes() != png:
            thumbnail.write_bytes(png)


_copy_notebooks()
_thumbnails()
# Generated afresh by autosummary on every build, so that a name taken off a
# topic page leaves no stale page behind.
shutil.rmtree(DOCS / "api" / "_autosummary", ignore_errors=True)
