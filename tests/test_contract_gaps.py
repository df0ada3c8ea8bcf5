"""The four contract gaps of 0.1 that the shared mechanisms close (API.md 2-3).

Each gap has a test here that fails on 0.1.0 and passes on the shared floors:

* a non-finite norm is never "within the limit", an infinite threshold
  included (section 2.1);
* an infinite ``coeff`` or ``learning_rate`` is rejected at construction
  (section 3);
* a pytree of bools whose nodes are callable is a mask tree (section 2.4);
* ``unit_norm`` lands its equality constraint to nearest (no bias).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox

INF = math.inf

# Every clip or projection that scales by a norm, with an infinite threshold.
INFINITE_THRESHOLD: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clip_by_global_norm": lambda: nox.clip_by_global_norm(INF),
    "clip_by_global_norm_l1": lambda: nox.clip_by_global_norm(INF, ord=1),
    "clip_by_global_norm_inf": lambda: nox.clip_by_global_norm(INF, ord="inf"),
    "clip_by_norm": lambda: nox.clip_by_norm(INF),
    "clip_by_norm_stacked": lambda: nox.clip_by_norm(INF, stack_axes=1),
    "adaptive_clip": lambda: nox.adaptive_clip(INF),
    "max_norm": lambda: nox.max_norm(INF),
    "min_max_norm": lambda: nox.min_max_norm(0.0, INF),
    "project_l2_ball": lambda: nox.project_l2_ball(INF),
    "project_l1_ball": lambda: nox.project_l1_ball(INF),
}


@pytest.mark.parametrize("bad", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(INFINITE_THRESHOLD))
def test_non_finite_norm_is_never_within_an_infinite_limit(
    name: str, bad: float
) -> None:
    tx = INFINITE_THRESHOLD[name]()
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((3, 2))}
    updates = {"w": jnp.ones((3, 2)).at[0, 0].set(bad), "b": jnp.ones((3, 2))}
    out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    # The unit, leaf or tree whose norm is non-finite is NaN everywhere.
    if name in ("max_norm", "min_max_norm", "adaptive_clip"):
        broken = out["w"][:, 0]  # the unit (column) holding the bad value
    elif name == "clip_by_norm_stacked":
        broken = out["w"][0]  # its own layer only
        assert bool(jnp.all(jnp.isfinite(out["w"][1:])))
    elif name == "clip_by_norm":
        broken = out["w"]
    else:
        broken = jnp.concatenate([out["w"].ravel(), out["b"].ravel()])
    assert bool(jnp.all(jnp.isnan(broken))), out


@pytest.mark.parametrize(
    "make",
    [
        lambda v: nox.add_l2_decay(v),
        lambda v: nox.add_l1_decay(v),
        lambda v: nox.prox_l1(v, 0.1),
        lambda v: nox.prox_l1(0.1, v),
        lambda v: nox.prox_group_l1(v, 0.1),
        lambda v: nox.prox_group_l1(0.1, v),
        lambda v: nox.prox_elastic_net(v, 0.1, 0.1),
        lambda v: nox.prox_elastic_net(0.1, v, 0.1),
        lambda v: nox.prox_elastic_net(0.1, 0.1, v),
    ],
)
@pytest.mark.parametrize("value", [INF, -INF, math.nan, -1.0])
def test_infinite_coeff_or_learning_rate_is_rejected(
    make: Callable[[float], Any], value: float
) -> None:
    with pytest.raises(ValueError, match=r"must be finite and >= 0, got"):
        make(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CallableLayer:
    """A pytree node that is callable, like an Equinox module."""

    kernel: Any
    bias: Any

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel + self.bias


def test_callable_pytree_of_bools_is_a_mask_tree() -> None:
    params = CallableLayer(jnp.ones((2, 3)), jnp.ones(3))
    updates = CallableLayer(jnp.ones((2, 3)), jnp.ones(3))
    mask = nox.masks.matrices_only(params)
    assert isinstance(mask, CallableLayer)
    assert callable(mask)
    for tx in (nox.add_l2_decay(1.0, mask=mask), nox.max_norm(0.5, mask=mask)):
        out, _ = tx.update(updates, tx.init(params), params)
        chex.assert_trees_all_equal(out.bias, updates.bias)  # masked out
        assert not np.allclose(out.kernel, updates.kernel)  # selected


def test_callable_pytree_of_bools_is_a_mask_tree_for_equinox() -> None:
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, 4, depth=1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = nox.masks.matrices_only(params)
    tx = nox.add_l2_decay(1.0, mask=mask)
    grads = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(grads, tx.init(params), params)
    for layer, got in zip(params.layers, out.layers, strict=True):
        chex.assert_trees_all_equal(got.weight, layer.weight)  # decayed: 0 + p
        chex.assert_trees_all_equal(got.bias, jnp.zeros_like(layer.bias))


def keras_example_array() -> np.ndarray:
    """Keras' ``constraints_test.get_example_array`` (weights in [-50, 50))."""
    rng = np.random.RandomState(3537)
    array = rng.random_sample((100, 100)) * 100.0 - 50.0
    array[0, 0] = 0.0
    return array


def test_unit_norm_lands_to_nearest_on_the_keras_array() -> None:
    params = {"w": jnp.asarray(keras_example_array(), jnp.float32)}
    tx = nox.unit_norm(axis=0)  # Keras UnitNorm(axis=0): one unit per column
    u, _ = tx.update({"w": jnp.zeros((100, 100))}, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, u)["w"], np.float64)
    norms = np.sqrt(np.sum(new**2, axis=0))
    # Units shrink ~290x; the new weights sit on the grid of the old ones
    # (ulp(50) ~ 3.8e-6), so a few float32 roundings of that grid, no bias.
    assert np.max(np.abs(norms - 1)) <= 3e-6, np.max(np.abs(norms - 1))
    assert np.min(norms) < 1 < np.max(norms)  # both sides: rounded to nearest
    assert abs(np.mean(norms) - 1) <= 5e-7


# ---------------------------------------------------------------------------
# Issue 17: gradients at a Python float; an infinite target norm.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: nox.project_l2_ball(1.0), lambda: nox.project_l1_ball(1.0)],
    ids=["project_l2_ball", "project_l1_ball"],
)
def test_grad_of_a_projection_at_a_python_float(make: Any) -> None:
    tx = make()

    def moved(x: Any) -> Any:
        updates, _ = tx.update(0.0, optax.EmptyState(), x)
        return optax.apply_updates(x, updates)

    # Inside the ball the projection is the identity: derivative 1.
    assert float(jax.grad(moved)(0.0)) == 1.0
    assert float(jax.grad(moved)(0.5)) == 1.0


@pytest.mark.parametrize("bad", [INF, -INF, math.nan, -1.0])
def test_normalize_by_global_norm_needs_a_finite_norm(bad: float) -> None:
    with pytest.raises(ValueError, match=r"norm must be finite and >= 0, got"):
        nox.normalize_by_global_norm(bad)
