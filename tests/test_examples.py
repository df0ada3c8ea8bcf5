"""The Flax Linen example: ``TrainState`` with clipping before AdamW."""

from __future__ import annotations

import jax
import optax
import pytest

import norm_optax as nox
from norm_optax.examples import linen

pytestmark = pytest.mark.standard_promotion  # runs optax.adamw


def test_loss_decreases() -> None:
    _, history = linen.train(steps=40, learning_rate=1e-2)
    losses = [h["loss"] for h in history]
    assert all(map(jax.numpy.isfinite, losses))
    assert losses[-1] < 0.5 * losses[0]


def test_clipped_update_norm_is_bounded() -> None:
    # The example's chain, with the clip wrapped in record_norms to read the
    # pre- and post-clip norms from the TrainState's optimizer state.
    tx = optax.chain(nox.record_norms(nox.clip_by_global_norm(1.0)), optax.adamw(1e-2))
    k_data, k_init = jax.random.split(jax.random.PRNGKey(0))
    x, y = linen.synthetic_data(k_data)
    state = linen.create_state(k_init, x, tx)
    for _ in range(5):
        state, metrics = linen.train_step(state, x, y)
        raw = float(optax.tree.get(state.opt_state, "input_norm"))
        clipped = float(optax.tree.get(state.opt_state, "output_norm"))
        assert raw == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)
        assert raw > 1.0  # the clip is active on this problem
        assert clipped == pytest.approx(1.0, rel=1e-5)


def test_make_tx_is_the_documented_chain() -> None:
    params = {"w": jax.numpy.full((3,), 10.0)}
    grads = {"w": jax.numpy.full((3,), 100.0)}
    tx = linen.make_tx(1.0, 1e-3)
    updates, _ = tx.update(grads, tx.init(params), params)
    # After clipping, AdamW's first step is -lr * sign(g) (+ the decay term).
    expected = -1e-3 * (1.0 + 1e-4 * 10.0)
    assert float(updates["w"][0]) == pytest.approx(expected, rel=1e-3)
