"""Every pair of docs/guides/norm_geometry.md runs, both sides, and they agree.

The guide's code blocks are named ``geo-<section>-setup`` (the inputs a
section shares) and ``geo-<section>-<pair>-peer`` / ``-nox`` (the two sides
of a pair), as in the migration guide. Each side runs in a fresh namespace
after the section's setup; then the pair's comparison below checks that
both computed the same numbers. The optax pairs always run, the PyTorch and
Keras pairs where those libraries are installed (Keras on its JAX backend).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import pytest

from tests.guide_pairs import (
    Namespace,
    check_both_sides_agree,
    check_every_pair_is_compared,
    read_blocks,
    same,
)

GUIDE = (
    pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "norm_geometry.md"
)
BLOCKS = read_blocks(GUIDE, "geo")


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
    check_every_pair_is_compared(BLOCKS, COMPARE)


@pytest.mark.standard_promotion  # optax and the guide run as users run them
@pytest.mark.parametrize("pair", sorted(COMPARE))
def test_both_sides_agree(pair: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_both_sides_agree(BLOCKS, COMPARE, pair, "norm_geometry.md geo", monkeypatch)
