"""The notebooks' install cell: what it installs, and that it keeps the jax
a runtime has (a Colab TPU runtime's jaxlib must not be replaced)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib
from types import ModuleType
from typing import Any

import pytest

import norm_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_build() -> ModuleType:
    """``notebooks/build.py``, imported from its path."""
    spec = importlib.util.spec_from_file_location(
        "norm_optax_notebooks_build_install", ROOT / "notebooks" / "build.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build()


@pytest.fixture(scope="module")
def cell() -> dict[str, Any]:
    """The namespace of the cell's plain-Python part, executed."""
    namespace: dict[str, Any] = {}
    exec(compile(BUILD.INSTALL_LOGIC, "install cell", "exec"), namespace)
    return namespace


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_nothing_to_install_when_importable(cell: dict[str, Any]) -> None:
    assert cell["requirements"](True, "0.10.2", "0.10.2") == []
    assert cell["requirements"](True, None, None) == []


@pytest.mark.parametrize(
    ("jax", "jaxlib"),
    [
        ("0.10.2", "0.10.2"),
        ("0.9.0", "0.9.0"),  # the lowest supported: kept
        ("0.9.2", "0.9.2"),
        ("0.10.0.dev20260101", "0.10.0.dev20260101"),
    ],
)
def test_a_supported_jax_is_pinned_to_what_is_installed(
    cell: dict[str, Any], jax: str, jaxlib: str
) -> None:
    assert cell["requirements"](False, jax, jaxlib) == [
        cell["PACKAGE"],
        f"jax=={jax}",
        f"jaxlib=={jaxlib}",
    ]


def test_jax_without_a_separate_jaxlib_is_still_pinned(cell: dict[str, Any]) -> None:
    assert cell["requirements"](False, "0.9.0", None) == [
        cell["PACKAGE"],
        "jax==0.9.0",
    ]


@pytest.mark.parametrize("jax", ["0.8.1", "0.7.2", "0.4.38"])
def test_an_unsupported_jax_is_left_to_pip(
    cell: dict[str, Any], jax: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cell["requirements"](False, jax, jax) == [cell["PACKAGE"]]
    assert f"jax {jax} is older than norm_optax supports" in capsys.readouterr().out


def test_no_jax_installed_lets_pip_choose(cell: dict[str, Any]) -> None:
    assert cell["requirements"](False, None, None) == [cell["PACKAGE"]]


def test_installed_reads_distribution_versions(cell: dict[str, Any]) -> None:
    import jax

    assert cell["installed"]("jax") == jax.__version__
    assert cell["installed"]("no-such-distribution-here") is None


def test_jax_min_is_the_declared_lower_bound(cell: dict[str, Any]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (jax,) = [r for r in pyproject["project"]["dependencies"] if r.startswith("jax>=")]
    assert cell["JAX_MIN"] == _version(jax.removeprefix("jax>="))


def test_package_is_the_release_tag_with_the_examples_extra(
    cell: dict[str, Any],
) -> None:
    tag = BUILD.RELEASE_TAG
    assert cell["PACKAGE"] == (
        f"norm-optax[examples] @ git+https://github.com/{BUILD.REPO}@{tag}"
    )
    match = re.fullmatch(r"v(\d+\.\d+\.\d+)", tag)
    assert match is not None
    # The notebooks are executed with the release they pin: never older than
    # the package they are built from.
    assert _version(match[1]) >= _version(norm_optax.__version__)
    # The README's install-from-source line names the same tag.
    assert f"@{tag}" in (ROOT / "README.md").read_text()


def test_every_notebook_runs_the_install_cell_first() -> None:
    for name in BUILD.NOTEBOOKS:
        code = [source for kind, source in BUILD.cells(name) if kind == "code"]
        assert code[0] == BUILD.INSTALL, name


def test_the_cell_is_valid_ipython() -> None:
    transform = pytest.importorskip("IPython.core.inputtransformer2")
    python = transform.TransformerManager().transform_cell(BUILD.INSTALL)
    assert "run_line_magic('pip', 'install -q {args}')" in python
    compile(python, "install cell", "exec")


# Runs the whole cell in IPython (in a subprocess: a shell changes global
# state) with norm_optax not importable and a %pip that records its line.
_RUN_IN_IPYTHON = """
import importlib.util, json, sys
from IPython.core.interactiveshell import InteractiveShell

spec = importlib.util.spec_from_file_location("build", sys.argv[1])
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name == "norm_optax" else find_spec(name, *a)
)
shell = InteractiveShell(history_length=0)
lines = []
shell.register_magic_function(lines.append, "line", "pip")
result = shell.run_cell(build.INSTALL)
print(json.dumps({"success": result.success, "lines": lines}))
"""


def test_the_cell_pins_the_running_jax_in_ipython(
    cell: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    pytest.importorskip("IPython")
    out = subprocess.run(
        [sys.executable, "-c", _RUN_IN_IPYTHON, str(BUILD.__file__)],
        capture_output=True,
        text=True,
        env={**os.environ, "IPYTHONDIR": str(tmp_path)},
        check=True,
        timeout=120,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["success"]
    jax, jaxlib = (importlib.metadata.version(d) for d in ("jax", "jaxlib"))
    assert result["lines"] == [
        f"install -q '{cell['PACKAGE']}' jax=={jax} jaxlib=={jaxlib}"
    ]
