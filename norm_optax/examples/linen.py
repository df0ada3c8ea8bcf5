"""Gradient clipping with Flax Linen and ``flax.training.train_state.TrainState``.

The same training step as the NNX demo, written the Linen way: the clipping
transform goes first in the chain, before AdamW::

    tx = optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    state = state.apply_gradients(grads=grads)

Run it with ``python -m norm_optax.examples.linen`` (needs flax).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training.train_state import TrainState

import norm_optax as nox

__all__ = ["MLP", "create_state", "make_tx", "synthetic_data", "train", "train_step"]


class MLP(nn.Module):
    """A small ReLU MLP."""

    features: Sequence[int] = (64, 64, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.features[:-1]:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.features[-1])(x)


def make_tx(
    max_norm: float = 1.0, learning_rate: float = 1e-3
) -> optax.GradientTransformation:
    """Clip the global gradient norm to ``max_norm``, then AdamW."""
    return optax.chain(nox.clip_by_global_norm(max_norm), optax.adamw(learning_rate))


def synthetic_data(
    key: jax.Array, n: int = 256, dim: int = 8
) -> tuple[jax.Array, jax.Array]:
    """A regression problem with large targets (so early gradients are large)."""
    k_x, k_w = jax.random.split(key)
    x = jax.random.normal(k_x, (n, dim))
    w = 10.0 * jax.random.normal(k_w, (dim, 1))
    return x, jnp.sin(x) @ w


def create_state(
    key: jax.Array, x: jax.Array, tx: optax.GradientTransformation
) -> TrainState:
    """A ``TrainState`` for :class:`MLP` with optimizer ``tx``."""
    model = MLP()
    params = model.init(key, x[:1])["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def train_step(
    state: TrainState, x: jax.Array, y: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step; returns the new state and the loss and pre-clip gradient norm."""

    def loss_fn(params: Any) -> jax.Array:
        prediction = state.apply_fn({"params": params}, x)
        return jnp.mean((prediction - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    metrics = {"loss": loss, "grad_norm": nox.global_norm(grads)}
    return state.apply_gradients(grads=grads), metrics


def train(
    steps: int = 200, seed: int = 0, learning_rate: float = 1e-2
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains the MLP for ``steps`` full-batch steps; returns state and metrics."""
    k_data, k_init = jax.random.split(jax.random.PRNGKey(seed))
    x, y = synthetic_data(k_data)
    state = create_state(k_init, x, make_tx(1.0, learning_rate))
    history = []
    for _ in range(steps):
        state, metrics = train_step(state, x, y)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


if __name__ == "__main__":
    _, history = train()
    for i in range(0, len(history), 20):
        h = history[i]
        print(f"step {i:4d}  loss {h['loss']:10.4f}  grad norm {h['grad_norm']:9.3f}")
