"""The machinery of the guides' tested pairs (migration, norm geometry).

A guide's code blocks are named ``<prefix>-<section>-setup`` (the inputs a
section shares) and ``<prefix>-<section>-<pair>-peer`` / ``-nox`` (the two
sides of a pair). Each side runs in a fresh namespace after its section's
setup; a comparison per pair then checks that both computed the same numbers.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import pytest

Namespace = dict[str, Any]
Compare = Callable[[Namespace, Namespace], None]
PEERS = {"optax": "optax", "torch": "torch", "keras": "keras"}


def read_blocks(guide: pathlib.Path, prefix: str) -> dict[str, str]:
    """``{name: source}`` of the guide's ``{code-block} python`` blocks."""
    block = re.compile(
        rf"```\{{code-block\}} python\n:name: {prefix}-([a-z0-9-]+)\n\n(.*?)```", re.S
    )
    return dict(block.findall(guide.read_text()))


def close(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Trees (or arrays, tensors, scalars) equal to float32 rounding."""
    actual = jax.tree.map(np.asarray, actual)
    expected = jax.tree.map(np.asarray, expected)
    assert str(jax.tree.structure(actual)) == str(jax.tree.structure(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def same(*names: str, **tolerances: float) -> Compare:
    """Compares the variables ``names`` of the two sides."""

    def compare(peer: Namespace, nox: Namespace) -> None:
        for name in names:
            close(nox[name], peer[name], **tolerances)

    return compare


def check_every_pair_is_compared(
    blocks: Mapping[str, str], compare: Mapping[str, Compare]
) -> None:
    """Every pair of the guide has a comparison, two sides and a setup."""
    pairs = {name[: -len("-peer")] for name in blocks if name.endswith("-peer")}
    assert pairs == set(compare), (
        f"pairs in the guide without a comparison here: {sorted(pairs - set(compare))}"
        f"; comparisons without a pair: {sorted(set(compare) - pairs)}"
    )
    for pair in pairs:
        assert f"{pair}-nox" in blocks, f"{pair} has no norm_optax side"
    for section in {pair.split("-")[0] for pair in pairs}:
        assert f"{section}-setup" in blocks, f"section {section} has no setup"


def run(blocks: Mapping[str, str], pair: str, side: str, label: str) -> Namespace:
    """One side of ``pair`` after its section's setup, in a fresh namespace."""
    section = pair.split("-")[0]
    namespace: Namespace = {}
    for name in (f"{section}-setup", f"{pair}-{side}"):
        exec(compile(blocks[name], f"{label}-{name}", "exec"), namespace)
    return namespace


def check_both_sides_agree(
    blocks: Mapping[str, str],
    compare: Mapping[str, Compare],
    pair: str,
    label: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs both sides of ``pair`` (skipped without its peer) and compares them."""
    section = pair.split("-")[0]
    if section == "keras":
        monkeypatch.setitem(os.environ, "KERAS_BACKEND", "jax")
    pytest.importorskip(PEERS[section])
    compare[pair](run(blocks, pair, "peer", label), run(blocks, pair, "nox", label))
