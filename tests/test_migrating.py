"""Every pair of docs/guides/migrating.md runs, both sides, and they agree.

The guide's code blocks are named ``mig-<section>-setup`` (the inputs a
section shares) and ``mig-<section>-<pair>-peer`` / ``-nox`` (the two sides
of a pair). Each side runs in a fresh namespace after the section's setup;
then the pair's comparison below checks that both computed the same numbers.
The optax pairs always run; the PyTorch and Keras ones where those libraries
are installed (Keras on its JAX backend).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

from tests.guide_pairs import (
    Namespace,
    check_both_sides_agree,
    check_every_pair_is_compared,
    close,
    read_blocks,
    same,
)

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "migrating.md"
BLOCKS = read_blocks(GUIDE, "mig")


def torch_to_flax(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"0.weight": (out, in) tensor}`` -> ``{"0": {"kernel": (in, out)}}``."""
    arrays = {k: np.asarray(v.detach().numpy()) for k, v in tree.items()}
    return {
        i: {"kernel": arrays[f"{i}.weight"].T, "bias": arrays[f"{i}.bias"]}
        for i in ("0", "1")
    }


def compare_torch_clipped(peer: Namespace, nox: Namespace) -> None:
    # torch divides by norm + 1e-6: equal to that resolution.
    close(nox["clipped"], torch_to_flax(peer["clipped"]), rtol=2e-6)


def compare_torch_clip_norm(peer: Namespace, nox: Namespace) -> None:
    close(nox["norm"], peer["norm"].item(), rtol=1e-6)
    compare_torch_clipped(peer, nox)


def compare_spectral(peer: Namespace, nox: Namespace) -> None:
    assert peer["sigma"] == pytest.approx(1.0, rel=1e-2)
    assert nox["sigma"] == pytest.approx(1.0, rel=1e-2)
    assert nox["sigma"] <= 1.0 + 1e-3


def compare_torch_new(peer: Namespace, nox: Namespace) -> None:
    close(nox["new"], torch_to_flax(peer["new"]), rtol=1e-5, atol=1e-6)


def compare_keras_clipping(peer: Namespace, nox: Namespace) -> None:
    for name in ("by_norm", "by_value", "by_global_norm"):
        kernel, bias = peer[name]
        close(nox[name], {"kernel": kernel, "bias": bias})


def compare_keras_regularizers(peer: Namespace, nox: Namespace) -> None:
    same("l1", "l2", "l1_l2", rtol=1e-5)(peer, nox)
    # The decay transforms add the gradient of the Keras penalty.
    keras = pytest.importorskip("keras")
    penalty = keras.regularizers.L1L2(l1=1e-3, l2=1e-2)
    w = nox["params"]["kernel"]
    expected = jax.grad(lambda k: penalty(k))(w)
    zeros = jax.tree.map(np.zeros_like, nox["params"])
    tx = nox["tx"]
    decays = tx.update(zeros, tx.init(nox["params"]), nox["params"])[0]
    close(decays["kernel"], -0.1 * expected, rtol=1e-5)  # then SGD(0.1)
    close(decays["bias"], np.zeros_like(decays["bias"]))


COMPARE: dict[str, Callable[[Namespace, Namespace], None]] = {
    "optax-clip-by-global-norm": same("updates", rtol=1e-6),
    "optax-adaptive-grad-clip": same("updates", rtol=1e-6),
    "optax-decayed-weights": same("updates", rtol=1e-6),
    # nox lands a projection in float32 rounded toward zero: one ulp apart.
    "optax-projections": same("l2", "l1", "linf", "nonneg", rtol=1e-6),
    "torch-clip-grad-norm": compare_torch_clip_norm,
    "torch-clip-grad-value": compare_torch_clipped,
    "torch-spectral-norm": compare_spectral,
    "torch-weight-decay-groups": compare_torch_new,
    "keras-clipping": compare_keras_clipping,
    # Keras divides by norm + 1e-7.
    "keras-constraints": same(
        "max_norm", "unit_norm", "min_max_norm", "non_neg", rtol=1e-6
    ),
    "keras-regularizers": compare_keras_regularizers,
}


def test_every_pair_of_the_guide_is_compared() -> None:
    check_every_pair_is_compared(BLOCKS, COMPARE)


@pytest.mark.standard_promotion  # optax and the guide run as users run them
@pytest.mark.parametrize("pair", sorted(COMPARE))
def test_both_sides_agree(pair: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_both_sides_agree(BLOCKS, COMPARE, pair, "migrating.md mig", monkeypatch)
