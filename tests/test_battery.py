"""One battery of tests run over every stateless transform in ``cases.py``.

The contract of API.md section 2 that every transform shares: stateless,
jit == eager, vmap, finite (meta-)gradients at zero updates, every dtype kept,
``optax.inject_hyperparams`` under jit, empty trees, skipped leaves passed
through, and no recompilation across calls.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox
from tests.cases import CASES, Case, make_tree
from tests.conftest import rtol, to_f64
from tests.test_api import STATELESS_TRANSFORMS

each_case = pytest.mark.parametrize("case", CASES, ids=str)


def _apply(
    case: Case,
    updates: Any,
    params: Any,
    tx: optax.GradientTransformation | None = None,
) -> Any:
    tx = case.make() if tx is None else tx
    state = tx.init(params)
    out, new_state = tx.update(updates, state, params if case.needs_params else None)
    chex.assert_trees_all_equal_structs(state, new_state)
    return out


def _inputs(dtype: Any = jnp.float32, seed: int = 0) -> tuple[Any, Any]:
    return make_tree(seed, dtype), make_tree(seed + 100, dtype, scale=1.0)


def _inexact(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


@each_case
def test_state_is_empty(case: Case) -> None:
    updates, params = _inputs()
    tx = case.make()
    assert tx.init(params) == optax.EmptyState()
    _, state = tx.update(updates, tx.init(params), params)
    assert state == optax.EmptyState()


@each_case
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_structure_dtype_and_skipped_leaves(case: Case, jit: bool) -> None:
    updates, params = _inputs()
    tx = case.make()
    update = jax.jit(tx.update) if jit else tx.update
    out, _ = update(updates, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
    assert out["frozen"] is None
    assert out["step"] is updates["step"] or int(out["step"]) == 7
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _inexact(out))


@each_case
def test_jit_matches_eager(case: Case) -> None:
    updates, params = _inputs(seed=3)
    tx = case.make()
    eager = tx.update(updates, tx.init(params), params)[0]
    jitted = jax.jit(tx.update)(updates, tx.init(params), params)[0]
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


@each_case
def test_changes_something(case: Case) -> None:
    """The inputs are large enough that every transform is active on them."""
    updates, params = _inputs(seed=4)
    out = _apply(case, updates, params)
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(_inexact(out), _inexact(updates), strict=True)
    ]
    assert max(diffs) > 1e-3


@pytest.mark.parametrize(
    "dtype",
    [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64],
    ids=lambda d: d.__name__,
)
@each_case
def test_dtypes_match_float64_reference(case: Case, dtype: Any) -> None:
    with jax.enable_x64(True):
        updates, params = _inputs(dtype, seed=5)
        out = _apply(case, updates, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
        ref = _apply(
            case,
            jax.tree.map(jnp.asarray, to_f64(updates)),
            jax.tree.map(jnp.asarray, to_f64(params)),
        )
    for got, want in zip(
        _inexact(to_f64(out)), _inexact(jax.tree.map(np.asarray, ref)), strict=True
    ):
        scale = float(np.max(np.abs(want), initial=1.0))
        np.testing.assert_allclose(
            got, want, rtol=rtol(dtype), atol=rtol(dtype) * scale
        )


@each_case
def test_vmap_matches_loop(case: Case) -> None:
    batch = [_inputs(seed=s) for s in range(3)]
    updates = jax.tree.map(lambda *xs: jnp.stack(xs), *[u for u, _ in batch])
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for _, p in batch])
    tx = case.make()

    def one(u: Any, p: Any) -> Any:
        return tx.update(u, tx.init(p), p if case.needs_params else None)[0]

    updates = {k: v for k, v in updates.items() if k not in ("step", "frozen")}
    params = {k: v for k, v in params.items() if k not in ("step", "frozen")}
    batched = jax.vmap(one)(updates, params)
    for i in range(3):
        single = one(
            jax.tree.map(lambda x, i=i: x[i], updates),
            jax.tree.map(lambda x, i=i: x[i], params),
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], batched), single, rtol=1e-5, atol=1e-6
        )


@each_case
def test_grad_at_zero_updates_is_finite(case: Case) -> None:
    _, params = _inputs()
    zeros = jax.tree.map(
        lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x,
        params,
    )
    inexact_zeros = {k: v for k, v in zeros.items() if k not in ("step", "frozen")}
    inexact_params = {k: v for k, v in params.items() if k not in ("step", "frozen")}

    def total(u: Any, hyper: dict[str, jax.Array]) -> jax.Array:
        tx = case.make(**hyper)
        out, _ = tx.update(u, tx.init(inexact_params), inexact_params)
        return jnp.sum(jnp.stack([jnp.sum(x) for x in jax.tree.leaves(out)]))

    hyper = {
        name: jnp.asarray(case.kwargs.get(name, 1e-3), jnp.float32)
        for name in case.hyper
    }
    grads = jax.grad(total, argnums=(0, 1))(inexact_zeros, hyper)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))), grads
    # Second order too: the gradient of the gradient norm (meta-gradients).
    hessian_vector = jax.grad(lambda u: nox.global_norm(jax.grad(total)(u, hyper)))(
        inexact_zeros
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(hessian_vector))


@each_case
@pytest.mark.standard_promotion
def test_inject_hyperparams_under_jit(case: Case) -> None:
    updates, params = _inputs(seed=6)
    updates = {k: v for k, v in updates.items() if k != "step"}
    params = {k: v for k, v in params.items() if k != "step"}
    injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
    state = injected.init(params)
    for name in case.hyper:
        if name in case.kwargs:
            assert name in state.hyperparams
    out, _ = jax.jit(injected.update)(updates, state, params)
    direct = _apply(case, updates, params)
    chex.assert_trees_all_close(out, direct, rtol=1e-6, atol=1e-6)


@each_case
def test_empty_and_skipped_only_trees(case: Case) -> None:
    for tree in ({}, {"step": jnp.asarray(3, jnp.int32), "frozen": None}, [None]):
        out = _apply(case, tree, tree)
        chex.assert_trees_all_equal(out, tree)


@each_case
def test_no_recompilation_across_calls(case: Case) -> None:
    tx = case.make()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(u: Any, p: Any) -> Any:
        return tx.update(u, tx.init(p), p)[0]

    chex.clear_trace_counter()
    for seed in range(3):
        updates, params = _inputs(seed=seed)
        step(updates, params)


@each_case
@pytest.mark.standard_promotion
def test_chains_with_an_optimizer(case: Case) -> None:
    updates, params = _inputs(seed=7)
    params = {k: v for k, v in params.items() if k != "step"}
    updates = {k: v for k, v in updates.items() if k != "step"}
    tx = optax.chain(case.make(), optax.adamw(1e-2))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        out, state = step(updates, state, params)
        params = optax.apply_updates(params, out)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _inexact(params))


def test_every_public_transform_is_registered() -> None:
    registered = {c.factory.__name__ for c in CASES}
    assert set(STATELESS_TRANSFORMS) <= registered, (
        set(STATELESS_TRANSFORMS) - registered
    )
