"""clip_spectral_norm (API.md section 7): SVD references, convergence, state, errors.

The references are ``numpy.linalg.svd`` in float64 on the matrices that the
unit convention reads out of each leaf. The 8-device sharding check runs this
module as a worker in a subprocess (``python -m tests.test_spectral OUT``)
with ``--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from norm_optax._spectral import INIT_ITERS, ClipSpectralNormState, clip_spectral_norm
from tests.cases import normal_tree

Tree = dict[str, Any]
ROOT = Path(__file__).resolve().parent.parent


def _update(
    tx: optax.GradientTransformation,
    updates: Tree,
    params: Tree,
) -> tuple[Tree, Any]:
    """``(new params, new state)`` after ``init`` and one update, both jitted.

    (Eager use is the doctest's.)
    """
    out, state = jax.jit(tx.update)(updates, jax.jit(tx.init)(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
    return optax.apply_updates(params, out), state


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)


# --------------------------------------------------------------------------
# float64 references: the matrices of a leaf and their SVD.
# --------------------------------------------------------------------------


def _as_matrices(x: np.ndarray, stack: int, rows: tuple[int, ...]) -> np.ndarray:
    """``(*stack, fan_in, units)``: the row axes first, then the others."""
    cols = [a for a in range(stack, x.ndim) if a not in rows]
    moved = np.transpose(x, (*range(stack), *rows, *cols))
    fan_in = int(np.prod([x.shape[a] for a in rows]))
    return moved.reshape(*x.shape[:stack], fan_in, -1)


def _np_sigma(x: np.ndarray, stack: int, rows: tuple[int, ...]) -> np.ndarray:
    """The largest singular value of every matrix, ``(*stack,)``."""
    return np.linalg.svd(_as_matrices(x, stack, rows), compute_uv=False)[..., 0]


def _np_clip(x: np.ndarray, c: float, stack: int, rows: tuple[int, ...]) -> np.ndarray:
    sigma = _np_sigma(x, stack, rows)
    scale = np.minimum(1.0, c / np.where(sigma > 0, sigma, 1.0))
    return x * scale.reshape(scale.shape + (1,) * (x.ndim - stack))


# name: (shape, axis, stack_axes, the row axes of the reference)
LAYOUTS: dict[str, tuple[tuple[int, ...], Any, int, tuple[int, ...]]] = {
    "dense": ((48, 16), None, 0, (0,)),
    "conv_hwio": ((3, 3, 4, 8), None, 0, (0, 1, 2)),
    "out_first_oihw": ((8, 4, 3, 3), "out_first", 0, (1, 2, 3)),
    "axis0_of_3d": ((12, 5, 4), 0, 0, (0,)),
    "all_rows": ((6, 5), (0, 1), 0, (0, 1)),  # (30, 1): sigma = Frobenius
    "stacked_dense": ((3, 24, 10), None, 1, (1,)),
    "stacked_out_first": ((2, 6, 5, 3), "out_first", 1, (2, 3)),
}


def _layer_scales(shape: tuple[int, ...], stack: int) -> np.ndarray:
    """Stack index 1 is small (inside the bound), the others are clipped."""
    scales = np.ones(shape[:stack])
    if stack:
        scales.reshape(-1)[1 % scales.size] = 0.01
    return scales.reshape(scales.shape + (1,) * (len(shape) - stack))


def test_matches_svd_reference() -> None:
    """Every layout at once (one tree, per-leaf ``axis`` and ``stack_axes``)."""
    rng = np.random.default_rng(0)
    p, u = {}, {}
    for name, (shape, _, stack, _) in LAYOUTS.items():
        p[name] = rng.standard_normal(shape) * _layer_scales(shape, stack)
        u[name] = 0.1 * rng.standard_normal(shape) * _layer_scales(shape, stack)
    p["small"], u["small"] = 0.01 * np.eye(4), np.zeros((4, 4))  # inside
    p["bias"], u["bias"] = np.ones(5), np.ones(5)
    axis = {name: layout[1] for name, layout in LAYOUTS.items()}
    stack_axes = {name: layout[2] for name, layout in LAYOUTS.items()}
    axis |= {"small": None, "bias": None}
    stack_axes |= {"small": 0, "bias": 0}
    c = 2.0
    tx = clip_spectral_norm(c, num_iters=100, axis=axis, stack_axes=stack_axes)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    updates = {k: jnp.asarray(v, jnp.float32) for k, v in u.items()}
    new, state = _update(tx, updates, params)
    for name, (_, _, stack, rows) in LAYOUTS.items():
        x = _f64(params[name] + updates[name])
        want = _np_clip(x, c, stack, rows)
        np.testing.assert_allclose(
            _f64(new[name]), want, rtol=1e-5, atol=1e-6, err_msg=name
        )
        np.testing.assert_allclose(
            _f64(state.sigma[name]), _np_sigma(x, stack, rows), rtol=1e-5, err_msg=name
        )
    out, _ = jax.jit(tx.update)(updates, jax.jit(tx.init)(params), params)
    # Inside the bound, or not a matrix: the new params are those of the
    # updates, bit for bit.
    new_out = optax.apply_updates(params, out)
    new_u = optax.apply_updates(params, updates)
    for name in ("small", "bias"):
        chex.assert_trees_all_equal(new_out[name], new_u[name])
    for name in ("stacked_dense", "stacked_out_first"):  # layer 1 is inside
        np.testing.assert_array_equal(new_out[name][1], new_u[name][1])


def test_state_layout_and_vectors_are_the_top_singular_vectors() -> None:
    rng = np.random.default_rng(1)
    params = {
        "dense": jnp.asarray(rng.standard_normal((20, 6)), jnp.float32),
        "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 5)), jnp.float32),
        "stacked": jnp.asarray(rng.standard_normal((4, 7, 3)), jnp.float32),
        "bias": jnp.ones(6),
        "ints": jnp.arange(3),
    }
    stack_axes = {k: int(k == "stacked") for k in params}
    state = jax.jit(clip_spectral_norm(1.0, stack_axes=stack_axes).init)(params)
    assert isinstance(state, ClipSpectralNormState)
    shapes = {"dense": (6,), "conv": (5,), "stacked": (4, 3)}
    layouts: dict[str, tuple[int, tuple[int, ...]]] = {
        "dense": (0, (0,)),
        "conv": (0, (0, 1, 2)),
        "stacked": (1, (1,)),
    }
    for name, shape in shapes.items():
        chex.assert_shape(state.vectors[name], shape)
        chex.assert_type(state.vectors[name], jnp.float32)
        chex.assert_shape(state.sigma[name], shape[:-1])
        chex.assert_type(state.sigma[name], jnp.float32)
        stack, rows = layouts[name]
        matrices = _as_matrices(_f64(params[name]), stack, rows)
        right = np.linalg.svd(matrices)[2][..., 0, :]  # top right singular vectors
        overlap = np.abs(np.sum(right * _f64(state.vectors[name]), axis=-1))
        np.testing.assert_allclose(overlap, 1.0, rtol=1e-5)
    assert state.vectors["bias"] is None
    assert state.sigma["bias"] is None
    assert state.vectors["ints"] is None


def test_complex_leaves_match_svd() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 4)) + 1j * rng.standard_normal((10, 4))
    params = {"w": jnp.asarray(x, jnp.complex64)}
    zeros = {"w": jnp.zeros_like(params["w"])}
    c = 1.0
    new, state = _update(clip_spectral_norm(c), zeros, params)
    x64 = _f64(params["w"])
    np.testing.assert_allclose(_f64(new["w"]), _np_clip(x64, c, 0, (0,)), rtol=1e-5)
    chex.assert_type(state.vectors["w"], jnp.complex64)
    chex.assert_type(state.sigma["w"], jnp.float32)


def test_stacked_leaf_equals_the_layers_as_separate_leaves() -> None:
    rng = np.random.default_rng(3)
    p = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)
    u = jnp.asarray(0.3 * rng.standard_normal((3, 16, 8)), jnp.float32)
    stacked = clip_spectral_norm(2.0, num_iters=2, stack_axes=1)
    new, state = _update(stacked, {"w": u}, {"w": p})
    tx = clip_spectral_norm(2.0, num_iters=2)
    update = jax.jit(tx.update)
    for layer in range(3):
        params = {"w": p[layer]}
        out, single_state = update({"w": u[layer]}, tx.init(params), params)
        single = optax.apply_updates(params, out)
        chex.assert_trees_all_close(new["w"][layer], single["w"], rtol=1e-6)
        chex.assert_trees_all_close(
            state.vectors["w"][layer], single_state.vectors["w"], rtol=1e-6
        )
        chex.assert_trees_all_close(
            state.sigma["w"][layer], single_state.sigma["w"], rtol=1e-6
        )


# --------------------------------------------------------------------------
# Convergence (the claim of API.md section 7) and the state.
# --------------------------------------------------------------------------


def _run(
    tx: optax.GradientTransformation,
    params: Tree,
    steps: int,
    step_updates: Callable[[int], Tree],
) -> tuple[Tree, Any, Tree]:
    """``steps`` jitted updates: the new params, state and last ``p + u``."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    x = params
    for k in range(steps):
        u = step_updates(k)
        x = jax.tree.map(jnp.add, params, u)
        out, state = update(u, state, params)
        params = optax.apply_updates(params, out)
    return params, state, x


def test_converges_as_api_md_states() -> None:
    """50 steps of num_iters=1 on a 256x128 Gaussian: sigma <= max * (1 + 1e-3)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    zeros = {"w": jnp.zeros_like(w)}
    tx = clip_spectral_norm(1.0)
    new, _, _ = _run(tx, {"w": w}, 50, lambda k: zeros)
    sigma = _np_sigma(_f64(new["w"]), 0, (0,))
    assert sigma <= 1.0 + 1e-3, sigma
    assert sigma >= 1.0 - 1e-3, sigma  # the bound is active: clipped onto it
    # Slowly moving: an SGD-sized random step each time.
    steps = [
        {"w": jnp.asarray(1e-3 * rng.standard_normal((256, 128)), jnp.float32)}
        for _ in range(50)
    ]
    new, _, _ = _run(tx, {"w": w}, 50, lambda k: steps[k])
    assert _np_sigma(_f64(new["w"]), 0, (0,)) <= 1.0 + 1e-3


def test_sigma_in_the_state_matches_svd() -> None:
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    tx = clip_spectral_norm(float("inf"))  # never clips: the state follows w
    state = tx.init({"w": w})
    np.testing.assert_allclose(
        float(state.sigma["w"]), _np_sigma(_f64(w), 0, (0,)), rtol=1e-5
    )
    u = {"w": jnp.asarray(1e-3 * rng.standard_normal((64, 32)), jnp.float32)}
    _, state, x = _run(tx, {"w": w}, 10, lambda k: u)
    np.testing.assert_allclose(
        float(state.sigma["w"]), _np_sigma(_f64(x["w"]), 0, (0,)), rtol=1e-5
    )


def test_init_runs_power_iterations_on_the_params() -> None:
    """``init`` alone gives a converged estimate (INIT_ITERS steps)."""
    assert INIT_ITERS >= 64
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    state = clip_spectral_norm(1.0).init({"w": w})
    np.testing.assert_allclose(
        float(state.sigma["w"]), _np_sigma(_f64(w), 0, (0,)), rtol=1e-5
    )


def test_no_recompilation_across_steps() -> None:
    params = normal_tree(0, {"w": (8, 4), "conv": (3, 3, 2, 4), "b": (4,)})
    tx = clip_spectral_norm(0.5, num_iters=2)
    chex.clear_trace_counter()
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    state = tx.init(params)
    for seed in range(1, 5):
        out, state = update(
            normal_tree(seed, {"w": (8, 4), "conv": (3, 3, 2, 4), "b": (4,)}),
            state,
            params,
        )
        params = optax.apply_updates(params, out)


# --------------------------------------------------------------------------
# Zero, NaN and infinite matrices; gradients.
# --------------------------------------------------------------------------


def test_zero_matrix_gives_no_nan() -> None:
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = clip_spectral_norm(1.0, num_iters=2)
    state = tx.init(params)
    assert float(state.sigma["w"]) == 0.0
    assert bool(jnp.all(jnp.isfinite(state.vectors["w"])))
    out, new_state = jax.jit(tx.update)(zeros, state, params)
    chex.assert_trees_all_equal(out, zeros)
    chex.assert_tree_all_finite(new_state)
    # Its vector is kept (nothing to learn from a zero matrix).
    chex.assert_trees_all_equal(new_state.vectors, state.vectors)

    def loss(u: Tree, bound: jax.Array) -> jax.Array:
        tx = clip_spectral_norm(bound, num_iters=2)
        out, _ = tx.update(u, state, params)
        new = optax.apply_updates(params, out)
        return jnp.sum(new["w"] ** 2) + jnp.sum(new["b"] ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(zeros, jnp.asarray(1.0))
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_updates_give_nan(bad: float) -> None:
    params = normal_tree(6, {"w": (6, 4), "b": (4,)})
    updates = normal_tree(7, {"w": (6, 4), "b": (4,)})
    updates["w"] = updates["w"].at[0, 0].set(bad)
    tx = clip_spectral_norm(100.0)  # far above sigma: only the NaN rule acts
    state = tx.init(params)
    update = jax.jit(tx.update)
    out, new_state = update(updates, state, params)
    assert bool(jnp.all(jnp.isnan(out["w"])))  # the whole matrix, never zeros
    assert bool(jnp.all(jnp.isfinite(out["b"])))
    assert bool(jnp.isnan(new_state.sigma["w"]))
    # The vector is kept, so one broken step does not poison the next ones.
    chex.assert_trees_all_equal(new_state.vectors, state.vectors)
    good = normal_tree(8, {"w": (6, 4), "b": (4,)})
    out, _ = update(good, new_state, params)
    chex.assert_tree_all_finite(out)


def test_nan_params_give_nan() -> None:
    params = normal_tree(9, {"w": (5, 3)})
    tx = clip_spectral_norm(1.0)
    state = tx.init(params)
    bad = {"w": params["w"].at[1, 1].set(jnp.nan)}
    out, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, bad)
    assert bool(jnp.all(jnp.isnan(out["w"])))


def test_meta_gradients_match_the_exact_spectral_norm() -> None:
    """With converged vectors the gradient is that of the SVD's sigma."""
    rng = np.random.default_rng(10)
    params = {"w": jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)}
    u0 = {"w": jnp.asarray(0.01 * rng.standard_normal((12, 5)), jnp.float32)}
    state = clip_spectral_norm(1.0).init(params)

    def loss(u: Tree, bound: jax.Array) -> jax.Array:
        tx = clip_spectral_norm(bound, num_iters=64)
        out, _ = tx.update(u, state, params)
        new = optax.apply_updates(params, out)["w"]
        return jnp.sum(new * jnp.arange(60.0).reshape(12, 5))

    def exact(u: Tree, bound: jax.Array) -> jax.Array:
        x = params["w"] + u["w"]
        sigma = jnp.linalg.norm(x, ord=2)
        new = x * jnp.minimum(1.0, bound / sigma)
        return jnp.sum(new * jnp.arange(60.0).reshape(12, 5))

    bound = jnp.asarray(1.0)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(u0, bound)
    want = jax.jit(jax.grad(exact, argnums=(0, 1)))(u0, bound)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    assert float(got[1]) != 0.0


def test_gradient_with_a_traced_loop_count() -> None:
    """``num_iters`` traced (a while loop): reverse mode still works."""
    params = normal_tree(11, {"w": (6, 4)})
    state = clip_spectral_norm(1.0).init(params)

    def loss(u: Tree, count: jax.Array) -> jax.Array:
        tx = clip_spectral_norm(0.5, num_iters=count)
        out, _ = tx.update(u, state, params)
        return jnp.sum(jnp.square(optax.apply_updates(params, out)["w"]))

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads = jax.jit(jax.grad(loss))(zeros, jnp.asarray(3, jnp.int32))
    chex.assert_tree_all_finite(grads)
    assert float(jnp.max(jnp.abs(grads["w"]))) > 0


def test_vmap_matches_a_loop() -> None:
    shapes = {"w": (6, 4), "b": (4,)}
    params = [normal_tree(20 + i, shapes) for i in range(3)]
    updates = [normal_tree(30 + i, shapes, scale=2.0) for i in range(3)]
    tx = clip_spectral_norm(1.0, num_iters=2)
    states = [tx.init(p) for p in params]

    def stacked(trees: list[Any]) -> Any:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    out, new_states = jax.jit(jax.vmap(tx.update))(
        stacked(updates), stacked(states), stacked(params)
    )
    update = jax.jit(tx.update)
    for i in range(3):
        want, want_state = update(updates[i], states[i], params[i])
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], out), want, rtol=1e-6
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], new_states), want_state, rtol=1e-6
        )


# --------------------------------------------------------------------------
# inject_hyperparams, dtypes, masks, small leaves.
# --------------------------------------------------------------------------


def test_inject_hyperparams_traces_max_value_and_num_iters() -> None:
    shapes = {"w": (16, 8), "b": (8,)}
    params = normal_tree(12, shapes)
    updates = normal_tree(13, shapes)
    injected = optax.inject_hyperparams(
        clip_spectral_norm, static_args=("axis", "stack_axes", "mask")
    )(max_value=1.0, num_iters=1, axis=None, stack_axes=0, mask=None)
    chex.clear_trace_counter()
    update = jax.jit(chex.assert_max_traces(injected.update, n=1))
    state = injected.init(params)
    inner = state.inner_state
    for max_value, num_iters in ((1.0, 1), (0.5, 3), (2.0, 7)):
        for name, value in (("max_value", max_value), ("num_iters", num_iters)):
            # The same type (weak or not): no retrace.
            state.hyperparams[name] = jnp.full_like(state.hyperparams[name], value)
        out, new_state = update(updates, state, params)
        plain = clip_spectral_norm(max_value, num_iters=num_iters)
        want, want_inner = plain.update(updates, inner, params)
        chex.assert_trees_all_close(out, want, rtol=1e-6)
        chex.assert_trees_all_close(new_state.inner_state, want_inner, rtol=1e-6)
    # A traced value outside its domain gives NaN, never a plausible update.
    for name, bad in (("max_value", -1.0), ("num_iters", 0)):
        bad_state = injected.init(params)
        bad_state.hyperparams[name] = jnp.full_like(state.hyperparams[name], bad)
        out, _ = update(updates, bad_state, params)
        assert bool(jnp.all(jnp.isnan(out["w"])))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=str)
def test_dtypes_are_kept_and_the_bound_holds(dtype: Any) -> None:
    shapes = {"w": (32, 8), "conv": (3, 3, 2, 4), "b": (8,)}
    params = normal_tree(14, shapes, dtype, scale=2.0)
    tx = clip_spectral_norm(1.5, num_iters=2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    chex.assert_type(state.vectors["w"], jnp.float32)
    chex.assert_type(state.sigma["conv"], jnp.float32)
    eps = float(jnp.finfo(dtype).eps)

    def check(params: Tree, tol: float) -> None:
        for name, rows in (("w", (0,)), ("conv", (0, 1, 2))):
            sigma = _np_sigma(_f64(params[name]), 0, rows)
            assert sigma <= 1.5 * (1 + tol), (name, sigma)
            assert sigma >= 1.5 * (1 - 8 * eps - tol), (name, sigma)  # active

    # From the converged init, far outside: rounding toward zero keeps the
    # bound (p + u' lands on a grid of spacing ulp(p), see _projection).
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, state = update(zeros, state, params)
    params = optax.apply_updates(params, out)
    check(params, 1e-5)
    for seed in (15, 16, 17):  # small steps: the estimate follows
        updates = normal_tree(seed, shapes, dtype, scale=1e-4)
        out, state = update(updates, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
        chex.assert_type(state.vectors["w"], jnp.float32)
        chex.assert_type(state.sigma["w"], jnp.float32)
        params = optax.apply_updates(params, out)
        chex.assert_trees_all_equal_dtypes(params, updates)
    check(params, 1e-3)


def test_mask_leaves_pass_unchanged_and_have_no_state() -> None:
    shapes = {"w": (6, 4), "v": (5, 3), "b": (4,)}
    params = normal_tree(18, shapes, scale=3.0)
    updates = normal_tree(19, shapes)
    mask = {"w": True, "v": False, "b": True}
    tx = clip_spectral_norm(0.5, num_iters=32, mask=mask)
    new, state = _update(tx, updates, params)
    chex.assert_trees_all_equal(new["v"], params["v"] + updates["v"])
    assert state.vectors["v"] is None
    assert state.sigma["v"] is None
    assert _np_sigma(_f64(new["w"]), 0, (0,)) <= 0.5 * (1 + 1e-5)
    # A callable mask gives the same.
    by_fn = clip_spectral_norm(0.5, 32, mask=lambda p: {k: k != "v" for k in p})
    chex.assert_trees_all_close(_update(by_fn, updates, params)[0], new)


def test_leaves_with_fewer_than_two_layer_axes_pass_through() -> None:
    params = {
        "bias": jnp.full(4, 3.0),
        "scalar": jnp.asarray(5.0),
        "stacked_bias": jnp.full((3, 4), 7.0),
        "stacked_kernel": jnp.full((3, 4, 2), 7.0),
        "int": jnp.arange(3),
    }
    updates = jax.tree.map(jnp.ones_like, params)
    stack_axes = {k: int(k.startswith("stacked")) for k in params}
    tx = clip_spectral_norm(1.0, stack_axes=stack_axes)
    out, state = jax.jit(tx.update)(updates, tx.init(params), params)
    for name in ("bias", "scalar", "stacked_bias", "int"):
        chex.assert_trees_all_equal(out[name], updates[name])
        assert state.vectors[name] is None
    chex.assert_shape(state.vectors["stacked_kernel"], (3, 2))
    assert not bool(jnp.all(out["stacked_kernel"] == updates["stacked_kernel"]))


def test_optax_chain_and_extra_args() -> None:
    params = normal_tree(21, {"w": (8, 4)})
    grads = normal_tree(22, {"w": (8, 4)})
    tx = optax.chain(optax.sgd(0.1), clip_spectral_norm(1.0, num_iters=32))
    state = tx.init(params)
    out, _ = tx.update(grads, state, params, loss=jnp.asarray(1.0))
    new = optax.apply_updates(params, out)
    assert _np_sigma(_f64(new["w"]), 0, (0,)) <= 1.0 + 1e-5


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_value": -1.0}, ValueError, r"max_value must be >= 0.*-1\.0"),
        ({"max_value": float("nan")}, ValueError, r"max_value.*nan"),
        ({"max_value": "1"}, TypeError, "max_value"),
        ({"max_value": 1.0, "num_iters": 0}, ValueError, r"num_iters.*integer >= 1.*0"),
        ({"max_value": 1.0, "num_iters": 1.5}, ValueError, r"num_iters.*1\.5"),
        ({"max_value": 1.0, "num_iters": -2}, ValueError, r"num_iters.*-2"),
        ({"max_value": 1.0, "num_iters": True}, TypeError, "num_iters"),
        ({"max_value": 1.0, "axis": "rows"}, ValueError, r"axis.*'rows'"),
    ],
)
def test_bad_arguments_raise_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        clip_spectral_norm(**kwargs)


def test_update_time_errors_name_the_leaf() -> None:
    params = {"layer": {"kernel": jnp.ones((2, 3, 4))}}
    tx = clip_spectral_norm(1.0)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.init(None)
    with pytest.raises(ValueError, match=r"stack axis.*\(2, 3, 4\).*layer/kernel"):
        clip_spectral_norm(1.0, axis=0, stack_axes=1).init(params)
    with pytest.raises(ValueError, match=r"out of range.*\(2, 3, 4\).*layer/kernel"):
        clip_spectral_norm(1.0, axis=3).init(params)
    with pytest.raises(ValueError, match=r"(?s)mask.*updates: PyTreeDef"):
        clip_spectral_norm(1.0, mask={"a": True}).init(params)


# --------------------------------------------------------------------------
# Hypothesis properties.
# --------------------------------------------------------------------------

# No values near underflow, so that scaling by 2**k is exact.
_ENTRIES = st.one_of(
    st.just(0.0),
    st.floats(2.0**-10, 10.0, width=32),
    st.floats(-10.0, -(2.0**-10), width=32),
)
_BOUNDS = st.one_of(st.just(0.0), st.floats(2.0**-10, 20.0))
_MATRICES = hnp.arrays(np.float32, (7, 4), elements=_ENTRIES)


@jax.jit
def _clipped(w: jax.Array, bound: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New params and sigma estimate from params ``w`` and zero updates."""
    tx = clip_spectral_norm(bound, num_iters=4)
    params = {"w": w}
    new, state = _update(tx, {"w": jnp.zeros_like(w)}, params)
    return new["w"], state.sigma["w"]


@hypothesis.given(w=_MATRICES, bound=_BOUNDS, k=st.integers(-6, 6))
def test_scaling_by_a_power_of_two_commutes(
    w: np.ndarray, bound: float, k: int
) -> None:
    two_k = 2.0**k
    base, sigma = _clipped(jnp.asarray(w), jnp.asarray(bound, jnp.float32))
    scaled, scaled_sigma = _clipped(
        jnp.asarray(w * two_k), jnp.asarray(bound * two_k, jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(scaled), np.asarray(base) * two_k)
    np.testing.assert_array_equal(np.asarray(scaled_sigma), np.asarray(sigma) * two_k)


@hypothesis.given(w=_MATRICES, bound=_BOUNDS)
def test_the_bound_holds_and_matrices_inside_are_untouched(
    w: np.ndarray, bound: float
) -> None:
    new, _ = _clipped(jnp.asarray(w), jnp.asarray(bound, jnp.float32))
    sigma_in = _np_sigma(_f64(w), 0, (0,))
    sigma_out = _np_sigma(_f64(new), 0, (0,))
    # After INIT_ITERS + 4 steps the estimate is within 1e-3 of sigma even
    # for the worst spectrum (sigma_2 / sigma_1 close to 1).
    assert sigma_out <= bound * (1 + 1e-3) + 1e-30
    assert sigma_out <= sigma_in * (1 + 1e-6)
    if sigma_in < bound * (1 - 1e-3):
        np.testing.assert_array_equal(np.asarray(new), w)


# --------------------------------------------------------------------------
# Sharding: 8 emulated CPU devices in a subprocess.
# --------------------------------------------------------------------------

# name: (shape, stack_axes, mesh shape, mesh axis names, partition spec)
SHARDED: dict[
    str, tuple[tuple[int, ...], int, tuple[int, ...], tuple[str, ...], tuple[Any, ...]]
] = {
    "rows": ((256, 128), 0, (8,), ("x",), ("x", None)),
    "units": ((256, 128), 0, (8,), ("x",), (None, "x")),
    "layers": ((4, 64, 32), 1, (4, 2), ("layer", "model"), ("layer",)),
    "layers_and_units": (
        (4, 64, 32),
        1,
        (4, 2),
        ("layer", "model"),
        ("layer", None, "model"),
    ),
}


# Explicit mesh axes (jax.make_mesh's default): every layout; Auto axes (the
# shardings given to jax.jit), one leaf sharded on its rows and one on its
# layers and units; a mesh mixing both (only the Explicit axis is typed).
MODES = {
    "Explicit": list(SHARDED),
    "Auto": ["rows", "layers_and_units"],
    "Mixed": ["layers_and_units"],  # layer axis Explicit, model axis Auto
}


def _collectives(hlo: str, shape: tuple[int, ...]) -> dict[str, int]:
    counts = {
        name: len(re.findall(rf"\s{name}(?:-start)?\(", hlo))
        for name in ("all-reduce", "all-gather", "all-to-all", "collective-permute")
    }
    whole = f"[{','.join(map(str, shape))}]"
    counts["whole-leaf all-gather"] = sum(
        1
        for line in hlo.splitlines()
        if re.search(r"\sall-gather(?:-start)?\(", line)
        and whole in line.split("all-gather")[0]
    )
    return counts


def _unsharded(shape: tuple[int, ...], stack: int) -> tuple[Tree, Tree, Any, Any]:
    """Params, updates, and the unsharded result and state, for one shape."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    updates = {"w": jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)}
    tx = clip_spectral_norm(1.0, num_iters=2, stack_axes=stack)
    state = jax.jit(tx.init)(params)
    want, want_state = jax.jit(tx.update)(updates, state, params)
    return params, updates, want, want_state


def _close(got: jax.Array, want: jax.Array) -> float:
    """``max |got - want| / (1e-6 + 1e-5 |want|)``: at most 1 when close."""
    err = np.abs(_f64(got) - _f64(want)) / (1e-6 + 1e-5 * np.abs(_f64(want)))
    return float(np.max(err))


def _sharded_case(name: str, mode: str, reference: Any) -> dict[str, Any]:
    from jax.sharding import NamedSharding, PartitionSpec

    shape, stack, mesh_shape, names, spec = SHARDED[name]
    params, updates, want, want_state = reference
    tx = clip_spectral_norm(1.0, num_iters=2, stack_axes=stack)

    explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    axis_types = {
        "Explicit": (explicit,) * len(names),
        "Auto": (auto,) * len(names),
        "Mixed": (explicit, auto),
    }[mode]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=axis_types)
    sharding = {"w": NamedSharding(mesh, PartitionSpec(*spec))}
    sparams = jax.device_put(params, sharding)
    supdates = jax.device_put(updates, sharding)
    state = jax.jit(tx.init)(sparams)
    in_shardings = None
    if mode == "Auto":
        state_sharding = jax.tree.map(lambda a: a.sharding, state)
        in_shardings = (sharding, state_sharding, sharding)
    exe = (
        jax.jit(tx.update, in_shardings=in_shardings)
        .lower(supdates, state, sparams)
        .compile()
    )
    got, got_state = exe(supdates, state, sparams)
    case = {
        "rel_err": _close(got["w"], want["w"]),
        "sigma_rel_err": _close(got_state.sigma["w"], want_state.sigma["w"]),
        "same_sharding": bool(
            got["w"].sharding.is_equivalent_to(sharding["w"], len(shape))
        ),
        **_collectives(exe.as_text() or "", shape),
    }
    if name == "rows" and mode == "Explicit":
        # init outside jit too
        eager = tx.init(sparams).sigma["w"]
        case["eager_init_rel_err"] = _close(eager, state.sigma["w"])
    return case


def _worker(out: str) -> None:
    results: dict[str, Any] = {"devices": jax.device_count()}
    references = {
        shape: _unsharded(shape, stack) for shape, stack, *_ in SHARDED.values()
    }
    for mode, names in MODES.items():
        for name in names:
            shape = SHARDED[name][0]
            try:
                case = _sharded_case(name, mode, references[shape])
            except Exception as error:  # recorded, so the test names the case
                case = {"error": f"{type(error).__name__}: {error}"}
            results[f"{mode}/{name}"] = case
    Path(out).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("spectral") / "sharded.json"
    env = dict(os.environ)
    # LLVM optimisation level 0 only makes the CPU code compile faster; the
    # HLO passes that place the collectives run as usual (as in
    # tests/test_distributed.py).
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_spectral", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(json.loads(out.read_text()))


@pytest.mark.slow  # an 8-device subprocess
@pytest.mark.parametrize(
    ("mode", "name"), [(mode, name) for mode, names in MODES.items() for name in names]
)
def test_sharded_leaves_are_never_gathered(
    sharded: dict[str, Any], mode: str, name: str
) -> None:
    assert sharded["devices"] == 8
    case = sharded[f"{mode}/{name}"]
    assert "error" not in case, case["error"]
    assert case["rel_err"] <= 1.0  # allclose(rtol=1e-5, atol=1e-6)
    assert case["sigma_rel_err"] <= 1.0
    assert case["same_sharding"]
    assert case.get("eager_init_rel_err", 0.0) <= 1.0
    assert case["whole-leaf all-gather"] == 0
    assert case["all-gather"] == 0
    assert case["all-to-all"] == case["collective-permute"] == 0
    # num_iters=2: per step one all-reduce of a vector (the contraction over
    # the sharded axis) and one of a scalar (the norm of the sharded vector).
    assert case["all-reduce"] == (0 if name == "layers" else 4)


if __name__ == "__main__":
    _worker(sys.argv[1])
