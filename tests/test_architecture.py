"""The floors of the package (docs/architecture.md), checked on its imports.

* techniques never import each other: everything two of them share lives on
  a lower floor;
* the longest import chain among package modules (``__init__``, the demo and
  the examples aside) is at most four modules, e.g.
  ``_clipping -> _transform -> _norms -> _sharding``, below the optimizers;
* the optimizers (``_alias``: ``muon``, ``scion``) sit one floor above the
  techniques, as optax keeps ``alias.py`` above ``transforms/``: they import
  techniques and lower floors, never each other, and nothing imports them,
  so they lengthen the longest chain by exactly one module (five);
* the public ``norms`` module shows only public names.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import norm_optax
import norm_optax.norms

PACKAGE = pathlib.Path(norm_optax.__file__).parent
TECHNIQUES = {
    "_clipping",
    "_projection",
    "_balls",
    "_decay",
    "_prox",
    "_spectral",
    "_stateful",
    "_zclip",
    "_telemetry",
    "plotting",
    "masks",
    "_lmo",
}
# Optimizers: recipes of optax.chain calls over the techniques, one floor
# above them (docs/architecture.md).
ALIASES = {"_alias"}
FLOORS = {
    "_types": 0,
    "_sharding": 0,
    "_norms": 1,
    "_numerics": 1,
    "_domains": 1,
    "_layout": 1,
    "_polar": 1,
    "norms": 2,
    "_transform": 2,
}


def _modules() -> dict[str, pathlib.Path]:
    return {
        path.stem: path
        for path in PACKAGE.glob("*.py")
        if path.stem not in ("__init__", "__main__")
    }


@functools.cache
def imports_of(name: str) -> frozenset[str]:
    """The package modules ``name`` imports (``from norm_optax import x`` too)."""
    tree = ast.parse(_modules()[name].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "norm_optax":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("norm_optax."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("norm_optax."):
                    found.add(alias.name.split(".")[1])
    return frozenset(found & set(_modules()))


def longest_chain(name: str) -> tuple[str, ...]:
    chains = [longest_chain(dep) for dep in imports_of(name)]
    return (name, *max(chains, key=len, default=()))


def test_every_module_is_on_a_known_floor() -> None:
    known = TECHNIQUES | ALIASES | set(FLOORS)
    assert set(_modules()) <= known, set(_modules()) - known


def test_techniques_never_import_each_other() -> None:
    for name in TECHNIQUES & set(_modules()):
        assert not imports_of(name) & TECHNIQUES, (name, imports_of(name))


def test_lower_floors_import_only_lower_floors() -> None:
    for name, floor in FLOORS.items():
        for dep in imports_of(name):
            assert FLOORS[dep] < floor, f"{name} (floor {floor}) imports {dep}"


def test_longest_import_chain_is_at_most_four_modules() -> None:
    chains = [longest_chain(name) for name in set(_modules()) - ALIASES]
    longest = max(chains, key=len)
    assert len(longest) <= 4, " -> ".join(longest)
    assert len(longest) == 4  # the floors are really used


def test_optimizers_sit_one_floor_above_the_techniques() -> None:
    """``_alias`` imports techniques and lower floors; nothing imports it.

    The optimizer floor adds exactly one module to the longest chain.
    """
    for name in ALIASES & set(_modules()):
        assert imports_of(name) <= TECHNIQUES | set(FLOORS), imports_of(name)
        assert imports_of(name) & TECHNIQUES  # built on the techniques
    for name in set(_modules()) - ALIASES:
        assert not imports_of(name) & ALIASES, (name, imports_of(name))
    longest = max((longest_chain(name) for name in _modules()), key=len)
    assert len(longest) <= 5, " -> ".join(longest)


def test_public_norms_module_shows_only_public_names() -> None:
    public = {n for n in vars(norm_optax.norms) if not n.startswith("_")}
    imported = {"annotations", "Any", "jax"}  # from __future__, typing, jax
    assert set(norm_optax.norms.__all__) == {
        "global_norm",
        "leaf_norms",
        "unit_norms",
        "orthogonalize",
    }
    assert public - imported == set(norm_optax.norms.__all__)
