"""L1/L2 decay (API.md 2.3): references, AdamW equivalence, prox_l1 zeros, errors."""

from __future__ import annotations

from collections.abc import Callable
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

import norm_optax as nox
from tests.cases import normal_tree

Tree = dict[str, Any]


def _tree(seed: int, dtype: Any = jnp.float32, scale: float = 1.0) -> Tree:
    shapes = {"dense": {"kernel": (5, 3), "bias": (3,)}, "scale": ()}
    return normal_tree(seed, shapes, dtype, scale)


def _f64(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x).astype(np.float64), tree)


def _update(tx: optax.GradientTransformation, updates: Tree, params: Tree) -> Tree:
    out, state = tx.update(updates, tx.init(params), params)
    assert state == optax.EmptyState()
    chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
    return out


def _np_soft_threshold(x: np.ndarray, tau: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - tau, 0.0)


# --------------------------------------------------------------------------
# float64 references, every dtype.
# --------------------------------------------------------------------------

REFERENCES: list[
    tuple[str, optax.GradientTransformation, Callable[..., np.ndarray]]
] = [
    ("add_l2_decay", nox.add_l2_decay(0.3), lambda g, p: g + 0.3 * p),
    ("add_l1_decay", nox.add_l1_decay(0.3), lambda g, p: g + 0.3 * np.sign(p)),
    (
        "prox_l1",
        nox.prox_l1(0.5, learning_rate=2.0),
        lambda u, p: _np_soft_threshold(p + u, 1.0) - p,
    ),
]


@pytest.mark.parametrize(
    "dtype",
    [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64],
    ids=lambda d: jnp.dtype(d).name,
)
@pytest.mark.parametrize(
    ("name", "tx", "reference"), REFERENCES, ids=[r[0] for r in REFERENCES]
)
def test_matches_float64_reference(
    name: str, tx: optax.GradientTransformation, reference: Any, dtype: Any
) -> None:
    del name
    with jax.enable_x64(True):
        updates, params = _tree(0, dtype, scale=3.0), _tree(1, dtype)
        out = _update(tx, updates, params)
    want = jax.tree.map(reference, _f64(updates), _f64(params))
    eps = float(jnp.finfo(dtype).eps)
    # One rounding of the result, relative to the largest magnitude involved.
    for got, w, u, p in zip(
        jax.tree.leaves(_f64(out)),
        jax.tree.leaves(want),
        jax.tree.leaves(_f64(updates)),
        jax.tree.leaves(_f64(params)),
        strict=True,
    ):
        bound = 2 * eps * (np.abs(w) + np.abs(u) + np.abs(p))
        assert np.all(np.abs(got - w) <= bound), (got, w)


def test_half_precision_is_computed_in_float32() -> None:
    """``g + coeff * p`` for fp16 values whose product underflows in fp16."""
    g = {"w": jnp.asarray([1e-4], jnp.float16)}
    p = {"w": jnp.asarray([60000.0], jnp.float16)}
    out = _update(nox.add_l2_decay(1e-8), g, p)["w"]
    want = np.float16(np.float32(1e-4) + np.float32(1e-8) * np.float32(60000.0))
    assert out.dtype == jnp.float16
    assert float(out[0]) == float(want)


# --------------------------------------------------------------------------
# Equivalences: AdamW, loss-side penalties.
# --------------------------------------------------------------------------


@pytest.mark.standard_promotion
@pytest.mark.parametrize("masked", [False, True], ids=["all", "matrices_only"])
def test_decoupled_l2_decay_equals_adamw(masked: bool) -> None:
    lr, wd = 1e-2, 0.1
    mask = nox.masks.matrices_only if masked else None
    ours = optax.chain(
        optax.scale_by_adam(), nox.add_l2_decay(wd, mask=mask), optax.scale(-lr)
    )
    reference = optax.adamw(lr, weight_decay=wd, mask=mask)
    params_a = params_b = _tree(2)
    state_a, state_b = ours.init(params_a), reference.init(params_b)
    for step in range(5):
        grads = _tree(10 + step, scale=3.0)
        ua, state_a = ours.update(grads, state_a, params_a)
        ub, state_b = reference.update(grads, state_b, params_b)
        chex.assert_trees_all_close(ua, ub, rtol=1e-6, atol=1e-9)
        params_a = optax.apply_updates(params_a, ua)
        params_b = optax.apply_updates(params_b, ub)
    chex.assert_trees_all_close(params_a, params_b, rtol=1e-6)


def test_coupled_l2_decay_is_the_gradient_of_l2_penalty() -> None:
    coeff = 0.25
    params, grads = _tree(3), _tree(4)
    penalty_grad = jax.grad(lambda p: coeff * nox.l2_penalty(p))(params)
    want = jax.tree.map(jnp.add, grads, penalty_grad)
    chex.assert_trees_all_close(
        _update(nox.add_l2_decay(coeff), grads, params), want, rtol=1e-6
    )
    chex.assert_trees_all_close(jax.grad(nox.l2_penalty)(params), params, rtol=1e-6)


def test_l1_decay_is_the_gradient_of_l1_penalty() -> None:
    coeff = 0.25
    params = {**_tree(5), "zero": jnp.zeros(2)}
    grads = {**_tree(6), "zero": jnp.ones(2)}
    penalty_grad = jax.grad(lambda p: coeff * nox.l1_penalty(p))(params)
    want = jax.tree.map(jnp.add, grads, penalty_grad)
    out = _update(nox.add_l1_decay(coeff), grads, params)
    chex.assert_trees_all_close(out, want, rtol=1e-6)
    np.testing.assert_array_equal(out["zero"], 1.0)  # sign(0) = 0


def test_penalties_match_numpy(x64: None) -> None:
    tree = {**_tree(7, jnp.float64), "step": jnp.asarray(3, jnp.int32), "none": None}
    leaves = [np.asarray(x) for x in jax.tree.leaves(_tree(7, jnp.float64))]
    assert float(nox.l2_penalty(tree)) == pytest.approx(
        0.5 * sum(np.sum(x**2) for x in leaves), rel=1e-12
    )
    assert float(nox.l1_penalty(tree)) == pytest.approx(
        sum(np.sum(np.abs(x)) for x in leaves), rel=1e-12
    )
    assert float(nox.l2_penalty({})) == 0.0
    grads = jax.grad(lambda t: nox.l2_penalty(t) + nox.l1_penalty(t))(
        {"w": jnp.zeros(3)}
    )
    np.testing.assert_array_equal(grads["w"], 0.0)  # finite at zero


def test_half_precision_penalty_does_not_overflow() -> None:
    tree = {"w": jnp.full((4,), 60000.0, jnp.float16)}
    value = nox.l2_penalty(tree)
    assert value.dtype == jnp.float32
    assert float(value) == pytest.approx(0.5 * 4 * 60000.0**2, rel=1e-6)


# --------------------------------------------------------------------------
# prox_l1: the closed-form soft threshold, exact zeros.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=str)
def test_prox_l1_gives_exact_zeros_after_apply_updates(dtype: Any) -> None:
    tau = 0.5
    params, updates = _tree(8, dtype, scale=2.0), _tree(9, dtype, scale=0.5)
    tx = jax.jit(nox.prox_l1(coeff=0.25, learning_rate=2.0).update)
    out, _ = tx(updates, optax.EmptyState(), params)
    new = optax.apply_updates(params, out)
    x = jax.tree.map(
        lambda p, u: np.asarray(p, np.float64) + np.asarray(u), params, updates
    )
    eps = float(jnp.finfo(dtype).eps)
    zeros = 0
    for got, xi, p in zip(
        jax.tree.leaves(_f64(new)),
        jax.tree.leaves(x),
        jax.tree.leaves(_f64(params)),
        strict=True,
    ):
        # Where |p + u| <= tau (away from the kink by more than rounding), the
        # new parameter is exactly 0.
        dead = np.abs(xi) < tau * (1 - 4 * eps)
        np.testing.assert_array_equal(got[dead], 0.0)
        zeros += int(dead.sum())
        # Elsewhere, the soft threshold within one rounding of the grid of p.
        want = _np_soft_threshold(xi, tau)
        grid = 2 * eps * (np.abs(p) + np.abs(xi))
        assert np.all(np.abs(got - want) <= grid)
        assert np.all(np.abs(got) <= np.abs(want) + 1e-30 + grid)
    assert zeros > 0


@hypothesis.given(
    p=hnp.arrays(np.float32, (7,), elements=st.floats(-4, 4, width=32)),
    u=hnp.arrays(np.float32, (7,), elements=st.floats(-4, 4, width=32)),
    tau=st.floats(0.0, 3.0, width=32),
)
def test_prox_l1_is_the_closed_form(p: np.ndarray, u: np.ndarray, tau: float) -> None:
    tx = nox.prox_l1(coeff=tau, learning_rate=1.0)
    out, _ = tx.update({"w": jnp.asarray(u)}, tx.init(None), {"w": jnp.asarray(p)})
    new = np.asarray(optax.apply_updates({"w": jnp.asarray(p)}, out)["w"], np.float64)
    x = np.asarray(p, np.float64) + np.asarray(u, np.float64)
    want = _np_soft_threshold(x, float(np.float32(tau)))
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(new, want, rtol=0, atol=2 * eps * (np.abs(p).max() + 8))
    # Exact zeros wherever the closed form is zero, and the sign is kept.
    np.testing.assert_array_equal(new[want == 0], 0.0)
    assert np.all(new * want >= 0)


def test_prox_l1_with_zero_threshold_is_the_identity() -> None:
    params, updates = _tree(11), _tree(12)
    out = _update(nox.prox_l1(0.0, 1.0), updates, params)
    chex.assert_trees_all_equal(  # the new params: those of the updates
        optax.apply_updates(params, out), optax.apply_updates(params, updates)
    )


def test_prox_l1_drives_a_lasso_to_a_sparse_solution() -> None:
    """Proximal gradient (ISTA) on a lasso recovers the sparse support."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((50, 10)), jnp.float32)
    truth = jnp.zeros(10).at[jnp.array([1, 6])].set(jnp.array([3.0, -2.0]))
    b = a @ truth
    lr = 0.005
    tx = optax.chain(optax.sgd(lr), nox.prox_l1(coeff=5.0, learning_rate=lr))
    params = {"x": jnp.zeros(10)}
    state = tx.init(params)

    @jax.jit
    def step(params: Tree, state: Any) -> tuple[Tree, Any]:
        grads = jax.grad(lambda p: 0.5 * jnp.sum((a @ p["x"] - b) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(300):
        params, state = step(params, state)
    x = np.asarray(params["x"])
    assert set(np.flatnonzero(x)) == {1, 6}
    np.testing.assert_allclose(x[[1, 6]], [3.0, -2.0], atol=0.2)


def test_nan_gives_nan() -> None:
    params, updates = _tree(13), _tree(14)
    bad = {**params, "scale": jnp.asarray(jnp.nan)}
    for tx in (nox.add_l2_decay(0.1), nox.add_l1_decay(0.1), nox.prox_l1(0.1, 1.0)):
        assert bool(jnp.isnan(_update(tx, updates, bad)["scale"]))
        assert bool(jnp.isnan(_update(tx, bad, params)["scale"]))


# --------------------------------------------------------------------------
# Masks and errors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: nox.add_l2_decay(0.5, mask=m),
        lambda m: nox.add_l1_decay(0.5, mask=m),
        lambda m: nox.prox_l1(0.5, 1.0, mask=m),
    ],
    ids=["add_l2_decay", "add_l1_decay", "prox_l1"],
)
def test_masked_out_leaves_are_unchanged(make: Any) -> None:
    params, updates = _tree(15), _tree(16)
    out = _update(make(nox.masks.matrices_only), updates, params)
    assert out["dense"]["bias"] is updates["dense"]["bias"]
    assert out["scale"] is updates["scale"]
    assert not np.allclose(out["dense"]["kernel"], updates["dense"]["kernel"])


@pytest.mark.parametrize(
    "tx",
    [nox.add_l2_decay(0.1), nox.add_l1_decay(0.1), nox.prox_l1(0.1, 1.0)],
    ids=["add_l2_decay", "add_l1_decay", "prox_l1"],
)
def test_missing_params_and_mismatched_trees_raise(tx: Any) -> None:
    updates = _tree(0)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(updates, tx.init(None))
    with pytest.raises(ValueError, match=r"(?s)params.*updates: PyTreeDef.*params: Py"):
        tx.update(updates, tx.init(None), {"dense": updates["dense"]})


def test_mask_structure_mismatch_names_both() -> None:
    tx = nox.add_l2_decay(0.1, mask={"dense": True})
    updates = _tree(0)
    with pytest.raises(
        ValueError, match=r"(?s)mask.*updates: PyTreeDef.*mask: PyTreeDef"
    ):
        tx.update(updates, tx.init(updates), updates)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nox.add_l2_decay(-1e-4), "coeff"),
        (lambda: nox.add_l1_decay(-1.0), "coeff"),
        (lambda: nox.add_l2_decay(float("nan")), "coeff"),
        (lambda: nox.prox_l1(-0.1, 1.0), "coeff"),
        (lambda: nox.prox_l1(0.1, -1.0), "learning_rate"),
    ],
)
def test_negative_coefficients_raise(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
