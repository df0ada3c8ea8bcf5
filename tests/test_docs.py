"""The documentation site: every public name has a page, every link resolves.

Two fast checks run by default:

* every name in ``norm_optax.__all__`` and ``norm_optax.masks.__all__`` is
  listed on a topic page of ``docs/api/`` (adding a public name means adding
  one line to an ``autosummary`` list there), and nothing listed is stale;
* every ``python`` code block of the guides and API pages runs as written.

``test_site_builds`` (marked ``docs``, left out of the default run; ``.ci/run``
runs it as its own step, with the ``docs`` extra installed) builds the site
with ``-W --keep-going`` into a temporary folder, so any Sphinx warning
(a broken cross-reference, a missing page, a docstring that does not parse)
fails it, then checks the result: each public name has its page in the
object inventory, every relative link and anchor of every page exists, the
maths is there for MathJax and the notebooks are rendered with their outputs.
"""

from __future__ import annotations

import html.parser
import importlib
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

import norm_optax
import norm_optax.plotting

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
# Names in __all__ that are not objects with a page of their own.
NOT_OBJECTS = {"__version__", "masks"}
# Pages whose code is run elsewhere (the migration guide, by test_migrating)
# or is made of fragments (scaling_out.md continues the README's examples).
NOT_RUN = {"guides/migrating.md", "scaling_out.md"}


def public_names() -> set[str]:
    """Fully qualified public names: ``norm_optax.x`` and ``norm_optax.masks.y``."""
    top = {f"norm_optax.{n}" for n in norm_optax.__all__ if n not in NOT_OBJECTS}
    masks = {f"norm_optax.masks.{n}" for n in norm_optax.masks.__all__}
    plotting = {f"norm_optax.plotting.{n}" for n in norm_optax.plotting.__all__}
    return top | masks | plotting


def listed_names() -> dict[str, str]:
    """Every ``autosummary`` entry of ``docs/api/*.md``: full name -> page."""
    listed: dict[str, str] = {}
    for page in sorted(API.glob("*.md")):
        module = "norm_optax"
        for line in page.read_text().splitlines():
            directive = re.match(r"\.\. currentmodule:: (\S+)", line.strip())
            if directive:
                module = directive.group(1)
            elif re.match(r"^   [A-Za-z_]\w*$", line):
                listed[f"{module}.{line.strip()}"] = page.name
    return listed


def where_defined(name: str) -> str:
    module, _, attr = name.rpartition(".")
    obj = getattr(importlib.import_module(module), attr)
    return getattr(obj, "__module__", module)


def test_every_public_name_is_on_a_topic_page() -> None:
    listed = listed_names()
    missing = sorted(public_names() - set(listed))
    stale = sorted(set(listed) - public_names())
    problems = [
        f"  {name} (defined in {where_defined(name)}): add a line "
        f"'{name.rpartition('.')[2]}' to the autosummary list of its topic "
        "page in docs/api/"
        for name in missing
    ] + [
        f"  {name}, listed on docs/api/{listed[name]}, is not public" for name in stale
    ]
    assert not problems, "public names without a page:\n" + "\n".join(problems)


def code_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        relative = page.relative_to(DOCS).as_posix()
        if relative in NOT_RUN or relative.startswith("_build/"):
            continue
        found = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
        blocks += [(relative, i, code) for i, code in enumerate(found)]
    return blocks


BLOCKS = code_blocks()


@pytest.mark.standard_promotion  # the pages' code runs as users run it
@pytest.mark.parametrize(
    ("page", "index", "code"),
    BLOCKS,
    ids=[f"{page}:{index}" for page, index, _ in BLOCKS],
)
def test_page_code_runs(page: str, index: int, code: str) -> None:
    exec(compile(code, f"docs/{page} block {index}", "exec"), {})


class _Links(html.parser.HTMLParser):
    """Collects the ids and the relative ``href``/``src`` of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        for key in ("href", "src"):
            link = values.get(key)
            if link and not re.match(r"^([a-z]+:|//|#$)", link):
                self.links.append(link)


@pytest.mark.docs
def test_site_builds(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path / "html"
    build = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q"),
            *("-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, f"the docs build warned:\n{build.stderr}"

    from sphinx.util.inventory import InventoryFile

    with open(out / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", lambda base, uri: uri)
    documented = {
        name: entry[2] if isinstance(entry, tuple) else entry.uri
        for role, entries in inventory.items()
        if role.startswith("py:")
        for name, entry in entries.items()
    }
    missing = sorted(public_names() - set(documented))
    assert not missing, f"public names without a page in the built site: {missing}"
    for name in public_names():
        page = out / documented[name].partition("#")[0]
        assert page.is_file(), f"{name}: its page {page} was not written"

    pages = {p: _parse(p) for p in out.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            url = urllib.parse.urlsplit(link)
            target = (page.parent / urllib.parse.unquote(url.path)).resolve()
            if url.path == "":
                target = page
            if not target.exists():
                broken.append(f"{page.relative_to(out)}: {link} (no such file)")
            elif url.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if url.fragment not in ids:
                    broken.append(f"{page.relative_to(out)}: {link} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))

    clip = (out / documented["norm_optax.adaptive_clip"].partition("#")[0]).read_text()
    assert 'class="math' in clip
    assert "mathjax" in clip.lower()
    assert "\\lambda" in clip  # the docstring's maths, left for MathJax
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        rendered = (out / "notebooks" / f"{notebook.stem}.html").read_text()
        assert "<img" in rendered, f"{notebook.name}: no output image rendered"


def _parse(page: pathlib.Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser
