"""Prints pip constraints that pin the declared lower bounds exactly.

    python .ci/lower_bounds.py [EXTRA ...] > lowest.txt
    pip install -e ".[examples]" -c lowest.txt

Reads ``pyproject.toml``: every requirement of ``dependencies`` and of the
named optional-dependency groups that has a ``>=`` bound becomes
``name==bound``, so that pip installs the lowest versions the project says
it supports (and fails if they cannot be installed together). The
lowest-versions step of ``.ci/run`` uses it; the constraints always follow
``pyproject.toml``, never a second list.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"

# name, optional [extras], then a ">=" bound among the specifiers.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")
LOWER = re.compile(r">=\s*([0-9][^,;\s]*)")


def lower_bound(requirement: str) -> str | None:
    """``"name==X"`` for a requirement with ``>=X``, else ``None``."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    name, specifiers = match.groups()
    bound = LOWER.search(specifiers.split(";")[0])
    return None if bound is None else f"{name}=={bound.group(1)}"


def constraints(extras: list[str], pyproject: pathlib.Path = PYPROJECT) -> list[str]:
    """The ``name==bound`` lines of the dependencies and the given extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}  # name -> bound; the highest where named twice
    for requirement in requirements:
        line = lower_bound(requirement)
        if line is not None:
            name, bound = line.split("==")
            if name not in pins or _key(bound) > _key(pins[name]):
                pins[name] = bound
    return [f"{name}=={bound}" for name, bound in pins.items()]


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


if __name__ == "__main__":
    print("\n".join(constraints(sys.argv[1:])))
