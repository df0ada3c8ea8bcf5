"""The documentation site: every public name has a page, every link resolves.

Fast checks run by default:

* every name in ``norm_optax.__all__`` and ``norm_optax.masks.__all__`` is
  listed on a topic page of ``docs/api/`` (adding a public name means adding
  one line to an ``autosummary`` list there), and nothing listed is stale;
* every ``python`` code block of the guides and API pages runs as written;
* the lists that drift: the API index names every public name, the Stateful
  page every transform with a state, the README and the home page's gallery
  every notebook (and the README says how many); user-facing text never
  cites the internal contract file.

``test_site_builds`` (marked ``docs``, left out of the default run; ``.ci/run``
runs it as its own step, with the ``docs`` extra installed) builds the site
with ``-W --keep-going`` into a temporary folder, so any Sphinx warning
(a broken cross-reference, a missing page, a docstring that does not parse)
fails it, then checks the result: each public name has its page in the
object inventory, every relative link and anchor of every page exists, every
link into the repository (the "view/edit this page" buttons) names a tracked
file, the lists generated from the signatures name every function that takes
the argument, no page cites the internal contract file, the
maths is there for MathJax and the notebooks are rendered with their outputs.
"""

from __future__ import annotations

import html.parser
import importlib
import inspect
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
# Pages whose code is run elsewhere (the migration guide, by test_migrating).
NOT_RUN = {"guides/migrating.md"}
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPOSITORY = "https://github.com/norm-optax/norm_optax"
# The internal contract file: the docs say what it says, never cite it.
INTERNAL = re.compile(r"API\.md|module notes")
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve"


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


def public_functions_taking(argument: str) -> list[str]:
    """Full names of the public functions whose signature has ``argument``."""
    return sorted(
        name
        for name in public_names()
        if inspect.isfunction(obj := _resolve(name))
        and argument in inspect.signature(obj).parameters
    )


def _resolve(name: str) -> object:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_api_index_names_every_public_name() -> None:
    text = (API / "index.md").read_text()
    missing = sorted(
        name
        for name in public_names()
        if not re.search(rf"\b{re.escape(name.rpartition('.')[2])}\b", text)
    )
    assert not missing, (
        f"docs/api/index.md does not name {missing}: add them to its table"
    )


def test_stateful_page_lists_every_transform_with_a_state() -> None:
    from tests.cases import CASES

    stateful = {case.factory.__name__ for case in CASES if not case.stateless}
    text = (API / "stateful.md").read_text()
    missing = sorted(name for name in stateful if not re.search(rf"\b{name}\b", text))
    assert stateful, "tests/cases.py has no stateful case"
    assert not missing, (
        f"transforms with a state that docs/api/stateful.md does not name: {missing}"
    )


def test_every_notebook_is_in_the_readme_and_the_gallery() -> None:
    count = len(NOTEBOOKS)
    readme = (ROOT / "README.md").read_text()
    documentation = readme.partition("## Documentation")[2].partition("\n## ")[0]
    said = re.findall(rf"\b({NUMBERS.replace(' ', '|')}|\d+) notebooks", documentation)
    assert said == [NUMBERS.split()[count]], (
        f"README's Documentation section says {said} notebooks; there are {count}"
    )
    gallery = (DOCS / "gallery.md").read_text()
    for notebook in NOTEBOOKS:
        assert f"notebooks/{notebook.stem}.ipynb" in readme, notebook.name
        assert f"notebooks/{notebook.stem}" in gallery, (
            f"{notebook.name} has no card in docs/gallery.md"
        )


def test_readme_scaling_out_names_every_function_taking_axis_name() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.partition("## Scaling out")[2].partition("\n## ")[0]
    missing = [
        name
        for name in public_functions_taking("axis_name")
        if f"`{name.rpartition('.')[2]}`" not in section
    ]
    assert not missing, f"README's Scaling out does not name {missing}"


def test_user_facing_text_never_cites_the_internal_contract() -> None:
    texts = [
        *DOCS.rglob("*.md"),
        *(ROOT / "norm_optax").rglob("*.py"),
        *NOTEBOOKS,
        ROOT / "notebooks" / "build.py",
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
    ]
    cited = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in texts
        if "_build" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not cited, "say what the contract says instead:\n" + "\n".join(cited)


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
# Pages whose blocks train a model in each framework or build meshes: run by
# the slow step of .ci/run, so that the default run stays short.
SLOW_PAGES = {"getting_started.md", "scaling_out.md"}


@pytest.mark.standard_promotion  # the pages' code runs as users run it
@pytest.mark.parametrize(
    ("page", "index", "code"),
    [
        pytest.param(*block, marks=[pytest.mark.slow] if block[0] in SLOW_PAGES else [])
        for block in BLOCKS
    ],
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
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        for key in ("href", "src"):
            link = values.get(key)
            if link and not re.match(r"^([a-z]+:|//|#$)", link):
                self.links.append(link)
            elif link and link.startswith("https://"):
                self.external.append(link)


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

    # Links into the repository (view/edit buttons, links to source files)
    # must name a file that a clone has: tracked, not a build output.
    into_repo = {
        (page.relative_to(out).as_posix(), link)
        for page, parsed in pages.items()
        for link in parsed.external
        if link.startswith(REPOSITORY + "/")
    }
    assert into_repo, "no page links into the repository: the buttons are gone"
    missing_files = []
    for page_name, link in sorted(into_repo):
        match = re.match(rf"{REPOSITORY}/(?:blob|edit|tree)/[^/]+/([^?#]*)", link)
        if match is None:
            continue  # the repository's home, its issues, ...
        path = ROOT / urllib.parse.unquote(match.group(1))
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False
        )
        if not path.exists() or ignored.returncode == 0:
            missing_files.append(f"{page_name}: {link}")
    assert not missing_files, "links to files a clone does not have:\n" + "\n".join(
        missing_files
    )

    citing = [
        path.relative_to(out).as_posix()
        for path in out.rglob("*")
        if path.suffix in {".html", ".txt", ".js", ".md", ".ipynb"}
        and INTERNAL.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not citing, f"pages that cite the internal contract: {citing}"

    # The lists generated from the signatures (conf.py's substitutions).
    for html_page, argument in (
        ("layouts.html", "stack_axes"),
        ("layouts.html", "axis"),
        ("guides/large_models.html", "stack_axes"),
        ("guides/large_models.html", "axis_name"),
        ("api/masks.html", "stack_axes"),
    ):
        linked = pages[out / html_page].links
        for name in public_functions_taking(argument):
            assert any(link.endswith(f"#{name}") for link in linked), (
                f"{html_page} does not link {name}, which takes {argument}"
            )

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
