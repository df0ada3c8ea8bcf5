"""One battery of tests run over every transform in ``cases.py``.

The contract of API.md sections 2-7 that every transform shares, stateless
and stateful alike (a stateful case runs ``case.steps`` updates with its
state threaded, so the checks see its statistics after warm-up): jit ==
eager, vmap, finite (meta-)gradients at zero updates, every dtype kept and
close to a float64 run, ``optax.inject_hyperparams`` under jit, empty trees,
skipped leaves passed through, extra keyword arguments to ``update``
accepted and ignored (optax's ``GradientTransformationExtraArgs``
convention), a state whose structure, shapes and dtypes never change, and
no recompilation across calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox
from tests.cases import CASES, Case, make_tree, step_updates
from tests.conftest import rtol, to_f64
from tests.test_api import TRANSFORMS


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.slow] if case.variant else []
    if case.standard_promotion:  # built on optax's AdamW (see conftest.py)
        marks.append(pytest.mark.standard_promotion)
    return marks


each_case = pytest.mark.parametrize(
    "case", [pytest.param(c, marks=_marks(c)) for c in CASES], ids=str
)


def _repeat(case: Case) -> bool:
    """A stacked or out-first case: the same transform as its plain case."""
    return "stacked" in case.name or "out_first" in case.name


# The transformations of a transform (vmap, grad, inject_hyperparams) run on
# every plain case in the default run; on the stacked and out-first repeats in
# the slow step.
each_plain_case = pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=_marks(c) + ([pytest.mark.slow] if _repeat(c) else []))
        for c in CASES
    ],
    ids=str,
)


def _run(
    case: Case,
    updates: Any,
    params: Any,
    tx: optax.GradientTransformation | None = None,
    update: Any = None,
    **extra: Any,
) -> tuple[Any, Any]:
    """``case.steps`` updates from ``init(params)``: the last output, the state."""
    tx = case.make() if tx is None else tx
    update = tx.update if update is None else update
    state = tx.init(params)
    out = updates
    for step in range(case.steps):
        new_state: Any
        out, new_state = update(
            step_updates(updates, step),
            state,
            params if case.needs_params else None,
            **extra,
        )
        chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
        state = new_state
    return out, state


def _apply(case: Case, updates: Any, params: Any, **kw: Any) -> Any:
    return _run(case, updates, params, **kw)[0]


def _inputs(dtype: Any = jnp.float32, seed: int = 0) -> tuple[Any, Any]:
    return make_tree(seed, dtype), make_tree(seed + 100, dtype, scale=1.0)


def _inexact(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _drop(tree: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k not in keys}


@each_case
def test_state(case: Case) -> None:
    updates, params = _inputs()
    tx = case.make()
    _out, state = _run(case, updates, params)
    if case.stateless:
        assert tx.init(params) == optax.EmptyState()
        assert state == optax.EmptyState()
    else:
        assert tx.init(params) != optax.EmptyState()
        chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


@each_case
def test_structure_dtype_skipped_leaves_and_jit_matches_eager(case: Case) -> None:
    updates, params = _inputs(seed=3)
    tx = case.make()
    eager = _apply(case, updates, params, tx=tx)
    jitted = _apply(case, updates, params, tx=tx, update=jax.jit(tx.update))
    for out in (eager, jitted):
        chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
        assert out["frozen"] is None
        assert out["step"] is updates["step"] or int(out["step"]) == 7
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in _inexact(out))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


@each_case
def test_extra_keyword_arguments_are_accepted_and_ignored(case: Case) -> None:
    updates, params = _inputs(seed=2)
    plain = _apply(case, updates, params)
    # Inside optax.chain, which passes them to every member ...
    tx = optax.chain(case.make(), optax.identity())
    chained = _apply(case, updates, params, tx=tx, value=jnp.float32(1.0), other="x")
    chex.assert_trees_all_equal(plain, chained)
    # ... and directly.
    direct = case.make()
    p = params if case.needs_params else None
    first, _ = direct.update(updates, direct.init(params), p, value=1.0, other="x")
    one_step = dataclasses.replace(case, steps=1)
    chex.assert_trees_all_equal(first, _apply(one_step, updates, params))


@each_case
def test_changes_something(case: Case) -> None:
    """The inputs are large enough that every transform is active on them."""
    updates, params = _inputs(seed=4)
    out = _apply(case, updates, params)
    last = step_updates(updates, case.steps - 1)
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(_inexact(out), _inexact(last), strict=True)
    ]
    assert max(diffs) > 1e-3


# float32 in the default run, the other dtypes in the slow step (bfloat16
# bounds are checked in the default run below, with the dtype pairs).
@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(jnp.float16, marks=pytest.mark.slow),
        pytest.param(jnp.bfloat16, marks=pytest.mark.slow),
        jnp.float32,
        pytest.param(jnp.float64, marks=pytest.mark.slow),
    ],
    ids=lambda d: d.__name__,
)
@each_case
def test_dtypes_match_float64_reference(case: Case, dtype: Any) -> None:
    with jax.enable_x64(True):
        updates, params = _inputs(dtype, seed=5)
        out = _apply(case, updates, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
        if dtype == jnp.float64:
            return  # that run is the float64 reference itself
        ref = _apply(
            case,
            jax.tree.map(jnp.asarray, to_f64(updates)),
            jax.tree.map(jnp.asarray, to_f64(params)),
        )
    # Statistics kept in a state are float32 whatever the leaf dtype.
    tolerance = max(rtol(dtype), 0.0 if case.stateless else 1e-5)
    for got, want in zip(
        _inexact(to_f64(out)), _inexact(jax.tree.map(np.asarray, ref)), strict=True
    ):
        scale = float(np.max(np.abs(want), initial=1.0))
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * scale)


@each_plain_case
def test_vmap_matches_loop(case: Case) -> None:
    batch = [_inputs(seed=s) for s in range(3)]
    updates = jax.tree.map(lambda *xs: jnp.stack(xs), *[u for u, _ in batch])
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for _, p in batch])
    updates, params = _drop(updates, "step", "frozen"), _drop(params, "step", "frozen")

    def one(u: Any, p: Any) -> Any:
        return _apply(case, u, p)

    batched = jax.vmap(one)(updates, params)
    for i in (0, 2):  # the first and the last example
        single = one(
            jax.tree.map(lambda x, i=i: x[i], updates),
            jax.tree.map(lambda x, i=i: x[i], params),
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], batched), single, rtol=1e-5, atol=1e-6
        )


def _meta_objective(case: Case) -> tuple[Any, Any, dict[str, jax.Array]]:
    """Zero updates, ``sum(update(u))`` after a warm-up, and the hyper-parameters."""
    updates, params = _inputs()
    updates, params = _drop(updates, "step", "frozen"), _drop(params, "step", "frozen")
    zeros = jax.tree.map(jnp.zeros_like, params)

    def total(u: Any, hyper: dict[str, jax.Array]) -> jax.Array:
        tx = case.make(**hyper)
        state = tx.init(params)
        p = params if case.needs_params else None
        for step in range(case.steps - 1):  # warm up on ordinary updates
            _, state = tx.update(step_updates(updates, step), state, p)
        out, _ = tx.update(u, state, p)
        return jnp.sum(jnp.stack([jnp.sum(x) for x in jax.tree.leaves(out)]))

    hyper = {
        name: jnp.asarray(case.kwargs.get(name, 1e-3), jnp.float32)
        for name in case.hyper
    }
    return zeros, total, hyper


@each_plain_case
def test_grad_at_zero_updates_is_finite(case: Case) -> None:
    zeros, total, hyper = _meta_objective(case)
    grads = jax.grad(total, argnums=(0, 1))(zeros, hyper)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))), grads


@each_case
@pytest.mark.slow  # second-order: slow to compile; .ci/run runs the slow tests
def test_second_order_meta_gradient_at_zero_updates_is_finite(case: Case) -> None:
    """The gradient of the gradient norm, as meta-learning of a threshold needs."""
    zeros, total, hyper = _meta_objective(case)
    hessian_vector = jax.grad(lambda u: nox.global_norm(jax.grad(total)(u, hyper)))(
        zeros
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(hessian_vector))


@each_plain_case
@pytest.mark.standard_promotion
def test_inject_hyperparams_under_jit(case: Case) -> None:
    updates, params = _inputs(seed=6)
    updates, params = _drop(updates, "step"), _drop(params, "step")
    injected = optax.inject_hyperparams(case.factory, static_args=case.static)(
        **case.kwargs
    )
    for name in case.hyper:
        if name in case.kwargs:
            assert name in injected.init(params).hyperparams
    out = _apply(case, updates, params, tx=injected, update=jax.jit(injected.update))
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
    def update(u: Any, state: Any, p: Any) -> Any:
        return tx.update(u, state, p)

    chex.clear_trace_counter()
    for seed in range(2):
        updates, params = _inputs(seed=seed)
        _run(case, updates, params, tx=tx, update=update)


@each_case
@pytest.mark.standard_promotion
def test_chains_with_an_optimizer(case: Case) -> None:
    updates, params = _inputs(seed=7)
    updates, params = _drop(updates, "step"), _drop(params, "step")
    tx = optax.chain(case.make(), optax.adamw(1e-2))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(3):
        out, state = step(step_updates(updates, t), state, params)
        params = optax.apply_updates(params, out)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _inexact(params))


def test_every_public_transform_is_registered() -> None:
    registered = {c.factory.__name__ for c in CASES}
    assert set(TRANSFORMS) <= registered, set(TRANSFORMS) - registered


# --------------------------------------------------------------------------
# Every dtype pair: the bound holds after optax.apply_updates.
# --------------------------------------------------------------------------

# (params, updates): the update keeps its own dtype, so it is chosen in it.
DTYPE_PAIRS = [
    (jnp.float32, jnp.float32),
    (jnp.float32, jnp.bfloat16),
    (jnp.float32, jnp.float16),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float16),
    (jnp.bfloat16, jnp.float32),
    (jnp.float64, jnp.float32),
]


def _unit_norms64(x: np.ndarray) -> np.ndarray:
    with jax.enable_x64(True):
        return np.asarray(nox.unit_norms(jnp.asarray(x, jnp.float64)))


def _soft64(x: np.ndarray, tau: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - tau, 0)


# ``check(new, x, grid)``: float64 NumPy lists of the new parameters, of the
# exact ``p + u`` and of the spacing of the values ``p + u'`` can reach
# (``eps`` of the coarser dtype times ``|p| + |x|``), per inexact leaf. Bounds
# are exact. A prox (no bound) lands within that spacing of its target.


def _bound_checks() -> dict[str, Any]:
    def box(m: float) -> Any:
        return lambda new, x, grid: max(np.max(np.abs(a)) for a in new) <= m

    def units(lo: float, hi: float) -> Any:
        def check(new: list[np.ndarray], x: list[np.ndarray], grid: Any) -> bool:
            ok = True
            for a, b in zip(new, x, strict=True):
                n, start = _unit_norms64(a), _unit_norms64(b)
                ok &= bool(np.all(n <= hi))
                ok &= bool(np.all(n[start > 0] >= lo))  # a lower bound too
            return ok

        return check

    def unit(new: list[np.ndarray], x: list[np.ndarray], grid: Any) -> bool:
        return all(np.all(np.abs(_unit_norms64(a) - 1) <= 2**-6) for a in new)

    def l2(new: list[np.ndarray], x: list[np.ndarray], grid: Any) -> bool:
        return float(np.sqrt(sum(np.sum(a**2) for a in new))) <= 2.0

    def l1(new: list[np.ndarray], x: list[np.ndarray], grid: Any) -> bool:
        # With updates narrower than the params, an exact 0 is reachable only
        # where ``-p`` is representable in the update's dtype: the elements
        # the ball zeroes keep a residual of at most half that spacing.
        total = float(sum(np.sum(np.abs(a)) for a in new))
        residual = sum(np.sum(g) for g in grid["narrow"])
        return total <= 5.0 + residual

    def soft(tau: float, decay: float = 1.0) -> Any:
        def check(new: list[np.ndarray], x: list[np.ndarray], grid: Any) -> bool:
            return all(
                np.all(np.abs(a - _soft64(b, tau) / decay) <= g)
                for a, b, g in zip(new, x, grid["any"], strict=True)
            )

        return check

    def group(tau: float) -> Any:
        def check(new: list[np.ndarray], x: list[np.ndarray], grid: Any) -> bool:
            ok = True
            for a, b, g in zip(new, x, grid["any"], strict=True):
                n, start = _unit_norms64(a), _unit_norms64(b)
                want = np.maximum(start - tau, 0)
                ok &= bool(np.all(np.abs(n - want) <= _unit_norms64(g)))
            return ok

        return check

    return {
        "clip_weights": box(1.0),
        "project_linf_ball": box(1.0),
        "non_negative": lambda new, x, grid: min(np.min(a) for a in new) >= 0,
        "max_norm": units(0.0, 1.0),
        "min_max_norm": units(0.5, 2.0),
        "unit_norm": unit,
        "project_l2_ball": l2,
        "project_l1_ball": l1,
        "prox_l1": soft(0.5),
        "prox_elastic_net": soft(0.5, 1.5),
        "prox_group_l1": group(1.0),
    }


BOUND_CHECKS = _bound_checks()
_DEFAULT_PAIRS = [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)]


@pytest.mark.standard_promotion  # optax.apply_updates promotes mixed dtypes
@pytest.mark.parametrize(
    ("p_dtype", "u_dtype"),
    [
        # Two pairs in the default run, the others in the slow step.
        pytest.param(p, u, marks=() if (p, u) in _DEFAULT_PAIRS else pytest.mark.slow)
        for p, u in DTYPE_PAIRS
    ],
    ids=[f"{p.__name__}-{u.__name__}" for p, u in DTYPE_PAIRS],
)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in BOUND_CHECKS], ids=str)
def test_bound_holds_after_apply_updates_for_every_dtype_pair(
    case: Case, p_dtype: Any, u_dtype: Any
) -> None:
    check = BOUND_CHECKS[case.name]
    with jax.enable_x64(p_dtype == jnp.float64):
        tx = case.make()
        update = jax.jit(tx.update)
        # Far outside the set, then a small step from inside it.
        for p_scale, u_scale in ((1.0, 1.0), (0.2, 0.02)):
            params = jax.tree.map(
                lambda x, s=p_scale: (x * s).astype(p_dtype),
                _drop(make_tree(3), "step", "frozen"),
            )
            updates = jax.tree.map(
                lambda x, s=u_scale: (x * s).astype(u_dtype),
                _drop(make_tree(4, scale=1.0), "step", "frozen"),
            )
            out, _ = update(updates, tx.init(params), params)
            chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
            new = optax.apply_updates(params, out)
            chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
            new64 = [np.asarray(a, np.float64) for a in jax.tree.leaves(new)]
            x64 = [
                np.asarray(p, np.float64) + np.asarray(u, np.float64)
                for p, u in zip(
                    jax.tree.leaves(params), jax.tree.leaves(updates), strict=True
                )
            ]
            assert all(np.all(np.isfinite(a)) for a in new64)
            eps_p, eps_u = (float(jnp.finfo(d).eps) for d in (p_dtype, u_dtype))
            p64 = [np.abs(np.asarray(p, np.float64)) for p in jax.tree.leaves(params)]
            grid = {
                "any": [
                    max(eps_p, eps_u) * (a + np.abs(b))
                    for a, b in zip(p64, x64, strict=True)
                ],
                "narrow": [eps_u / 2 * a if eps_u > eps_p else 0 * a for a in p64],
            }
            assert check(new64, x64, grid), (case.name, p_scale, new64)
