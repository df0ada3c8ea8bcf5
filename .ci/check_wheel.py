"""Checks what a built wheel holds: ``python .ci/check_wheel.py dist/*.whl``.

The package with its ``py.typed`` marker and its metadata, nothing else: no
tests, notebooks, benchmarks or docs. The version in the file name is
``norm_optax.__version__`` of the checkout (the single source of it).
"""

from __future__ import annotations

import ast
import pathlib
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("tests/", "notebooks/", "benchmarks/", "docs/", ".ci/")


def source_version() -> str:
    """``__version__`` as written in norm_optax/__init__.py."""
    tree = ast.parse((ROOT / "norm_optax" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise SystemExit("norm_optax/__init__.py sets no __version__")


def check(wheel: pathlib.Path) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    version = source_version()
    problems = []
    if not wheel.name.startswith(f"norm_optax-{version}-"):
        problems.append(f"{wheel.name}: expected version {version} in the name")
    if "norm_optax/py.typed" not in names:
        problems.append("norm_optax/py.typed is missing")
    if "norm_optax/__init__.py" not in names:
        problems.append("norm_optax/__init__.py is missing")
    for name in names:
        top = name.split("/")[0]
        if name.startswith(FORBIDDEN) or any(f"/{f}" in name for f in FORBIDDEN):
            problems.append(f"{name}: tests, notebooks, benchmarks or docs")
        elif top != "norm_optax" and not top.endswith(".dist-info"):
            problems.append(f"{name}: outside the package")
    return problems


def main() -> None:
    wheels = [pathlib.Path(arg) for arg in sys.argv[1:]]
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel, got {wheels}")
    problems = check(wheels[0])
    if problems:
        raise SystemExit("wheel check failed:\n  " + "\n  ".join(problems))
    count = len(zipfile.ZipFile(wheels[0]).namelist())
    print(f"wheel check: {wheels[0].name} holds the package only ({count} files)")


if __name__ == "__main__":
    main()
