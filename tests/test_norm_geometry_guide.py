"""Every pair of docs/guides/norm_geometry.md runs, both sides, and they agree.

The guide's code blocks are named ``geo-<section>-setup`` (the inputs a
section shares) and ``geo-<section>-<pair>-peer`` / ``-nox`` (the two sides
of a pair), as in the migration guide. Each side runs in a fresh namespace
after the section's setup; then the pair's comparison below checks that
both computed the same numbers. The optax pairs always run, the PyTorch and
Keras pairs where those libraries are installed (Keras on its JAX backend).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

GUIDE = (
    pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "norm_geometry.md"
)
BLOCK = re.compile(
    r"```\{code-block\} python\n:name: geo-([a-z0-9-]+)\n\n(.*?)```", re.S
)
BLOCKS = dict(BLOCK.findall(GUIDE.read_text()))
PEERS = {"optax": "optax", "torch": "torch", "keras": "keras"}

Namespace = dict[str, Any]


def close(actual: Any, expected: Any, rtol: float, atol: float) -> None:
    actual = jax.tree.map(np.asarray, actual)
    expected = jax.tree.map(np.asarray, expected)
    assert str(jax.tree.structure(actual)) == str(jax.tree.structure(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def same(name: str, **tolerances: float) -> Callable[[Namespace, Namespace], None]:
    def compare(peer: Namespace, nox: Namespace) -> None:
        close(nox[name], peer[name], **tolerances)

    return compare


def compare_torch_muon(peer: Namespace, nox: Namespace) -> None:
    """PyTorch runs Newton-Schulz in bfloat16: the steps agree to ~1%."""
    start = peer["weights"]
    for key, value in peer["new"].items():
        ours = np.asarray(nox["new"][key], np.float64)
        theirs = np.asarray(value, np.float64)
        step = np.abs(theirs - start[key]).max()
        assert step > 1e-3, key  # both moved
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.02 * step, err_msg=key)


COMPARE: dict[str, Callable[[Namespace, Namespace], None]] = {
    "optax-flat": same("new", rtol=1e-5, atol=1e-6),
    "optax-stacked": same("stacked", rtol=1e-5, atol=1e-6),
    "torch-muon": compare_torch_muon,
    # Keras puts AdamW's epsilon outside the bias correction: 1e-7 apart.
    "keras-muon": same("new", rtol=1e-5, atol=1e-6),
}


def test_every_pair_of_the_guide_is_compared() -> None:
    pairs = {name[: -len("-peer")] for name in BLOCKS if name.endswith("-peer")}
    assert pairs == set(COMPARE), sorted(pairs ^ set(COMPARE))
    for pair in pairs:
        assert f"{pair}-nox" in BLOCKS, f"{pair} has no norm_optax side"
    for section in {pair.split("-")[0] for pair in pairs}:
        assert f"{section}-setup" in BLOCKS, f"section {section} has no setup"


def run(pair: str, side: str) -> Namespace:
    section = pair.split("-")[0]
    namespace: Namespace = {}
    for name in (f"{section}-setup", f"{pair}-{side}"):
        exec(compile(BLOCKS[name], f"norm_geometry.md geo-{name}", "exec"), namespace)
    return namespace


@pytest.mark.standard_promotion  # optax and the guide run as users run them
@pytest.mark.parametrize("pair", sorted(COMPARE))
def test_both_sides_agree(pair: str, monkeypatch: pytest.MonkeyPatch) -> None:
    section = pair.split("-")[0]
    if section == "keras":
        monkeypatch.setitem(os.environ, "KERAS_BACKEND", "jax")
    pytest.importorskip(PEERS[section])
    COMPARE[pair](run(pair, "peer"), run(pair, "nox"))
