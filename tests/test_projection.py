"""Weight projection (API.md 2.2): references, rounding, properties, errors."""

from __future__ import annotations

import functools
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
from flax import nnx

import norm_optax as nox
from tests.cases import normal_tree

Tree = dict[str, Any]
NpProject = Callable[[Tree], Tree]

_NOT_SCALAR = {"kernel": True, "conv": True, "bias": True, "scalar": False}


def _tree(seed: int, dtype: Any = jnp.float32, scale: float = 1.0) -> Tree:
    shapes = {"kernel": (6, 3), "conv": (3, 3, 2, 4), "bias": (3,), "scalar": ()}
    return normal_tree(seed, shapes, dtype, scale)


def _new_params(tx: optax.GradientTransformation, updates: Tree, params: Tree) -> Tree:
    out, _ = tx.update(updates, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
    return optax.apply_updates(params, out)


def _f64(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x).astype(np.float64), tree)


# --------------------------------------------------------------------------
# float64 NumPy references.
# --------------------------------------------------------------------------


def _unit_axes(x: np.ndarray, axis: Any) -> tuple[int, ...]:
    if axis is not None:
        return tuple(np.atleast_1d(axis) % max(x.ndim, 1))
    return tuple(range(x.ndim - 1)) if x.ndim >= 2 else tuple(range(x.ndim))


def _np_unitwise(
    desired: Callable[[np.ndarray], np.ndarray], axis: Any = None
) -> NpProject:
    def project(tree: Tree) -> Tree:
        def leaf(x: np.ndarray) -> np.ndarray:
            n = np.sqrt(np.sum(x**2, axis=_unit_axes(x, axis), keepdims=True))
            safe = np.where(n > 0, n, 1.0)
            return x * np.where(n > 0, desired(n) / safe, 1.0)

        return jax.tree.map(leaf, tree)

    return project


def _except_scalar(project: NpProject) -> NpProject:
    """``project`` on every leaf but the masked-out ``scalar``."""

    def masked(tree: Tree) -> Tree:
        rest = project({k: v for k, v in tree.items() if k != "scalar"})
        return {**rest, "scalar": tree["scalar"]}

    return masked


def _np_l2_ball(radius: float) -> NpProject:
    def project(tree: Tree) -> Tree:
        n = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(tree)))
        return jax.tree.map(lambda x: x * min(1.0, radius / n), tree)

    return project


def np_l1_ball(tree: Tree, radius: float) -> Tree:
    """Reference by bisection on theta (no sorting): sum max(|x| - t, 0) = r."""
    v = np.concatenate([np.abs(x).ravel() for x in jax.tree.leaves(tree)])
    if v.sum() <= radius:
        return tree
    lo, hi = 0.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > radius:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return jax.tree.map(lambda x: np.sign(x) * np.maximum(np.abs(x) - theta, 0), tree)


REFERENCES: list[tuple[str, Callable[[], optax.GradientTransformation], NpProject]] = [
    (
        "clip_weights",
        lambda: nox.clip_weights(1.5),
        lambda t: jax.tree.map(lambda x: np.clip(x, -1.5, 1.5), t),
    ),
    (
        "project_linf_ball",
        lambda: nox.project_linf_ball(0.75),
        lambda t: jax.tree.map(lambda x: np.clip(x, -0.75, 0.75), t),
    ),
    (
        "non_negative",
        nox.non_negative,
        lambda t: jax.tree.map(lambda x: np.maximum(x, 0), t),
    ),
    ("max_norm", lambda: nox.max_norm(2.0), _np_unitwise(lambda n: np.minimum(n, 2.0))),
    (
        "max_norm_axis0_masked",
        lambda: nox.max_norm(2.0, axis=0, mask=_NOT_SCALAR),
        _except_scalar(_np_unitwise(lambda n: np.minimum(n, 2.0), axis=0)),
    ),
    (
        "unit_norm_axis_tuple_masked",
        lambda: nox.unit_norm(axis=(-1,), mask=_NOT_SCALAR),
        _except_scalar(_np_unitwise(np.ones_like, axis=-1)),
    ),
    ("unit_norm", nox.unit_norm, _np_unitwise(np.ones_like)),
    (
        "min_max_norm",
        lambda: nox.min_max_norm(3.0, 4.0),
        _np_unitwise(lambda n: np.clip(n, 3.0, 4.0)),
    ),
    (
        "min_max_norm_rate",
        lambda: nox.min_max_norm(3.0, 4.0, rate=0.25),
        _np_unitwise(lambda n: 0.25 * np.clip(n, 3.0, 4.0) + 0.75 * n),
    ),
    ("project_l2_ball", lambda: nox.project_l2_ball(3.0), _np_l2_ball(3.0)),
    ("project_l1_ball", lambda: nox.project_l1_ball(4.0), lambda t: np_l1_ball(t, 4.0)),
]


@pytest.mark.parametrize(
    ("name", "make", "reference"), REFERENCES, ids=[r[0] for r in REFERENCES]
)
def test_matches_float64_reference(
    x64: None,
    name: str,
    make: Callable[[], optax.GradientTransformation],
    reference: NpProject,
) -> None:
    del name
    params = _tree(0, jnp.float64)
    updates = _tree(1, jnp.float64, scale=3.0)
    tx = make()
    new = _new_params(tx, updates, params)
    want = reference(_f64(jax.tree.map(lambda p, u: p + u, params, updates)))
    chex.assert_trees_all_close(_f64(new), want, rtol=1e-12, atol=1e-12)
    # jit gives the same numbers.
    jitted, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    chex.assert_trees_all_close(
        _f64(optax.apply_updates(params, jitted)), want, rtol=1e-12, atol=1e-12
    )


def test_l1_ball_is_sparse_and_on_the_sphere(x64: None) -> None:
    params = _tree(2, jnp.float64)
    updates = _tree(3, jnp.float64, scale=3.0)
    new = _new_params(nox.project_l1_ball(2.0), updates, params)
    leaves = [np.asarray(x) for x in jax.tree.leaves(new)]
    assert sum(np.abs(x).sum() for x in leaves) == pytest.approx(2.0, rel=1e-12)
    assert sum(int(np.sum(x == 0)) for x in leaves) > 10  # exact zeros


INSIDE = (
    lambda: nox.clip_weights(1.0),
    lambda: nox.max_norm(1.0),
    lambda: nox.min_max_norm(0.0, 1.0),
    lambda: nox.project_l2_ball(10.0),
    lambda: nox.project_l1_ball(100.0),
    lambda: nox.project_linf_ball(1.0),
    lambda: nox.non_negative(),
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_inside_the_set_the_new_params_are_those_of_the_updates(
    dtype: Any, x64: None
) -> None:
    # float32/float64: the update is t - p corrected by one step of its grid,
    # so fl(p + u') == fl(p + u) bit for bit, also where |u| > |p| with
    # opposite signs (fl(x - p) is then inexact and the step is needed).
    del x64
    params = _tree(4, dtype, scale=0.01)
    updates = _tree(5, dtype, scale=0.01)
    if dtype == jnp.float32:  # every kind of sum: u >> p, u << p, cancelling
        rows = jnp.logspace(-4, 0, 6, dtype=dtype)[:, None]
        params["kernel"] = params["kernel"] * rows
        updates["conv"] = -params["conv"] * 0.999 + updates["conv"] * 1e-4
        # x = fl(p + u) = -2^-12 exactly, and fl(x - p) rounds on the coarser
        # grid below it: fl(p + fl(x - p)) != x without the step.
        p_bias = [6.1464045e-5, 7.06211e-5, 1.2803313e-5]
        u_bias = [-3.0560468e-4, -3.1476174e-4, -2.5694395e-4]
        params["bias"] = jnp.asarray(p_bias, dtype)
        updates["bias"] = jnp.asarray(u_bias, dtype)
    params["scalar"] = jnp.abs(params["scalar"])
    updates["scalar"] = jnp.abs(updates["scalar"])  # (inside the orthant)
    expected = optax.apply_updates(params, updates)
    for make in INSIDE:
        tx = make()
        if make is INSIDE[-1]:  # non_negative: on the positive leaf only
            tx = nox.non_negative(mask={k: k == "scalar" for k in params})
        out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
        chex.assert_trees_all_equal(optax.apply_updates(params, out), expected)


def test_inside_the_set_half_precision_updates_pass_unchanged() -> None:
    # Where the update's dtype is not the params' accumulation dtype, the
    # update itself is returned where the target is p + u.
    params = _tree(4, jnp.bfloat16, scale=0.01)
    updates = _tree(5, jnp.bfloat16, scale=0.01)
    for make in (INSIDE[0], INSIDE[1], INSIDE[3]):
        tx = make()
        out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
        chex.assert_trees_all_equal(out, updates)


def test_zero_unit_stays_zero() -> None:
    params = {"kernel": jnp.zeros((3, 2))}
    updates = {"kernel": jnp.zeros((3, 2)).at[:, 1].set(2.0)}
    for tx, norm in ((nox.unit_norm(), 1.0), (nox.min_max_norm(1.0, 2.0), 2.0)):
        new = _new_params(tx, updates, params)["kernel"]
        np.testing.assert_array_equal(new[:, 0], 0.0)
        assert float(jnp.linalg.norm(new[:, 1])) == pytest.approx(norm, rel=1e-6)


# --------------------------------------------------------------------------
# The constraint holds after optax.apply_updates, in every dtype.
# --------------------------------------------------------------------------

# ``check(new, eps, near)``: ``near`` is True after a small step from inside the
# set. From far outside (``|p| >> |P(p + u)|``) ``fl(p + u')`` can only land on
# a grid of spacing ulp(p): projections then round toward zero, so upper
# bounds hold, but a lower bound (unit_norm, min_max_norm) is only checked
# after small steps.
Check = Callable[[Tree, float, bool], None]


def _unit_norms_f64(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(x**2, axis=_unit_axes(x, None)))


def _check_box(bound: float) -> Check:
    def check(new: Tree, eps: float, near: bool) -> None:
        del near
        # ``bound`` itself is rounded to the dtype: one rounding of tolerance.
        assert max(np.max(np.abs(x)) for x in new.values()) <= bound * (1 + eps)

    return check


def _check_units(low: float, high: float) -> Check:
    def check(new: Tree, eps: float, near: bool) -> None:
        for x in new.values():
            n = _unit_norms_f64(x)
            assert np.all(n <= high * (1 + eps)), (n, high)
            if near:
                assert np.all(n >= low * (1 - eps)), (n, low)

    return check


def _check_unit_equality(value: float) -> Check:
    """An equality lands to nearest: a few roundings either side, no bias."""

    def check(new: Tree, eps: float, near: bool) -> None:
        del near
        for x in new.values():
            n = _unit_norms_f64(x)
            assert np.all(np.abs(n - value) <= 4 * eps * value), (n, value)

    return check


def _check_global(ord: int, radius: float) -> Check:
    def check(new: Tree, eps: float, near: bool) -> None:
        del near
        if ord == 1:
            total = sum(np.abs(x).sum() for x in new.values())
        else:
            total = np.sqrt(sum(np.sum(x**2) for x in new.values()))
        assert total <= radius * (1 + eps), (total, radius)

    return check


def _check_non_negative(new: Tree, eps: float, near: bool) -> None:
    del eps, near
    assert min(np.min(x) for x in new.values()) >= 0


CONSTRAINTS: list[tuple[str, optax.GradientTransformation, Check]] = [
    ("clip_weights", nox.clip_weights(1.5), _check_box(1.5)),
    ("clip_weights_0.1", nox.clip_weights(0.1), _check_box(0.1)),
    ("project_linf_ball", nox.project_linf_ball(0.75), _check_box(0.75)),
    ("non_negative", nox.non_negative(), _check_non_negative),
    ("max_norm", nox.max_norm(1.0), _check_units(0.0, 1.0)),
    ("max_norm_0.3", nox.max_norm(0.3), _check_units(0.0, 0.3)),
    ("unit_norm", nox.unit_norm(), _check_unit_equality(1.0)),
    ("min_max_norm", nox.min_max_norm(2.0, 3.0), _check_units(2.0, 3.0)),
    ("project_l2_ball", nox.project_l2_ball(3.0), _check_global(2, 3.0)),
    ("project_l1_ball", nox.project_l1_ball(5.0), _check_global(1, 5.0)),
]


def _big_tree(seed: int, dtype: Any, scale: float) -> Tree:
    shapes = {"kernel": (64, 8), "conv": (3, 3, 4, 4), "bias": (8,), "emb": (5, 40)}
    return normal_tree(seed, shapes, dtype, scale)


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(jnp.float16, marks=pytest.mark.slow),
        pytest.param(jnp.bfloat16, marks=pytest.mark.slow),
        jnp.float32,
    ],
    ids=str,
)
@pytest.mark.parametrize(
    ("name", "tx", "check"), CONSTRAINTS, ids=[c[0] for c in CONSTRAINTS]
)
def test_constraint_holds_after_apply_updates(
    name: str, tx: optax.GradientTransformation, check: Check, dtype: Any
) -> None:
    del name
    eps = float(jnp.finfo(dtype).eps)
    update = jax.jit(tx.update)
    # Far outside the set, and a realistic step from parameters inside it.
    params = _big_tree(0, dtype, scale=2.0)
    for seed, scale in ((1, 3.0), (2, 0.01), (3, 100.0)):
        updates = _big_tree(seed, dtype, scale)
        out, _ = update(updates, tx.init(params), params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
        new = optax.apply_updates(params, out)
        check(_f64(new), eps, scale < 1)
        params = new


# --------------------------------------------------------------------------
# Hypothesis properties: idempotent, non-expansive, exact L1 projection.
# --------------------------------------------------------------------------

_VALUES = st.floats(-10.0, 10.0, allow_nan=False, width=64)
_TREES = st.fixed_dictionaries(
    {
        "w": hnp.arrays(np.float64, (4, 3), elements=_VALUES),
        "b": hnp.arrays(np.float64, (5,), elements=_VALUES),
    }
)

CONVEX: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clip_weights": lambda: nox.clip_weights(1.0),
    "non_negative": nox.non_negative,
    "max_norm": lambda: nox.max_norm(2.0),
    "project_l2_ball": lambda: nox.project_l2_ball(3.0),
    "project_l1_ball": lambda: nox.project_l1_ball(4.0),
    "project_linf_ball": lambda: nox.project_linf_ball(1.5),
}
ALL = {
    **CONVEX,
    "unit_norm": nox.unit_norm,
    "min_max_norm": lambda: nox.min_max_norm(1.0, 2.0),
}


@functools.cache
def _projector(name: str) -> Callable[[Tree], Tree]:
    """P(x), as the new params from zero params and updates ``x`` (jitted, x64)."""
    tx = ALL[name]()

    @jax.jit
    def project(x: Tree) -> Tree:
        zeros = jax.tree.map(jnp.zeros_like, x)
        out, _ = tx.update(x, tx.init(zeros), zeros)
        return optax.apply_updates(zeros, out)

    return project


def _project(name: str, x: Tree) -> Tree:
    with jax.enable_x64(True):
        return _f64(_projector(name)(jax.tree.map(jnp.asarray, x)))


def _distance(a: Tree, b: Tree) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


@pytest.mark.parametrize("name", list(ALL))
@hypothesis.given(x=_TREES)
def test_projection_is_idempotent(name: str, x: Tree) -> None:
    once = _project(name, x)
    twice = _project(name, once)
    chex.assert_trees_all_close(twice, once, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CONVEX))
@hypothesis.given(x=_TREES, y=_TREES)
def test_convex_projection_is_non_expansive(name: str, x: Tree, y: Tree) -> None:
    gap = _distance(_project(name, x), _project(name, y))
    assert gap <= _distance(x, y) * (1 + 1e-12) + 1e-12


@hypothesis.given(x=_TREES, radius=st.floats(0.0, 50.0))
def test_l1_projection_equals_bisection_reference(x: Tree, radius: float) -> None:
    with jax.enable_x64(True):
        got = _f64(_l1_projector()(x, jnp.asarray(radius, jnp.float64)))
    chex.assert_trees_all_close(got, np_l1_ball(x, radius), rtol=1e-9, atol=1e-9)


@functools.cache
def _l1_projector() -> Callable[[Tree, jax.Array], Tree]:
    @jax.jit
    def project(x: Tree, radius: jax.Array) -> Tree:
        tx = nox.project_l1_ball(radius)  # a traced radius, as under inject
        zeros = jax.tree.map(jnp.zeros_like, x)
        return tx.update(x, tx.init(zeros), zeros)[0]

    return project


# --------------------------------------------------------------------------
# NaN, errors, training with nnx.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_nan_params_or_updates_give_nan(name: str) -> None:
    tx = ALL[name]()
    params = _tree(6)
    updates = _tree(7, scale=3.0)
    bad = {**updates, "kernel": updates["kernel"].at[0, 0].set(jnp.nan)}
    out, _ = tx.update(bad, tx.init(params), params)
    assert bool(jnp.isnan(out["kernel"][0, 0]))
    bad_params = {**params, "kernel": params["kernel"].at[0, 0].set(jnp.nan)}
    out, _ = tx.update(updates, tx.init(params), bad_params)
    assert bool(jnp.isnan(out["kernel"][0, 0]))


@pytest.mark.parametrize("name", list(ALL))
def test_missing_params_raises(name: str) -> None:
    tx = ALL[name]()
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(_tree(0), tx.init(None))


@pytest.mark.parametrize("name", list(ALL))
def test_mask_structure_mismatch_names_both(name: str) -> None:
    masked: dict[str, Callable[[Any], optax.GradientTransformation]] = {
        "clip_weights": lambda m: nox.clip_weights(1.0, mask=m),
        "non_negative": lambda m: nox.non_negative(mask=m),
        "max_norm": lambda m: nox.max_norm(1.0, mask=m),
        "project_l2_ball": lambda m: nox.project_l2_ball(1.0, mask=m),
        "project_l1_ball": lambda m: nox.project_l1_ball(1.0, mask=m),
        "project_linf_ball": lambda m: nox.project_linf_ball(1.0, mask=m),
        "unit_norm": lambda m: nox.unit_norm(mask=m),
        "min_max_norm": lambda m: nox.min_max_norm(1.0, 2.0, mask=m),
    }
    tx = masked[name]({"a": True})
    params = _tree(0)
    with pytest.raises(
        ValueError, match=r"(?s)mask.*updates: PyTreeDef.*mask: PyTreeDef"
    ):
        tx.update(params, tx.init(params), params)


def test_params_structure_mismatch_names_both() -> None:
    tx = nox.max_norm(1.0)
    params = _tree(0)
    with pytest.raises(ValueError, match=r"(?s)params.*updates: PyTreeDef.*params: Py"):
        tx.update(params, tx.init(params), {"kernel": params["kernel"]})


def test_axis_out_of_range_names_leaf_path_and_shape() -> None:
    tx = nox.max_norm(1.0, axis=1)
    params = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    with pytest.raises(ValueError, match=r"\(3,\).*layer/bias"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match=r"\(3,\).*layer/bias"):
        nox.unit_norm(axis=(0, 1)).update(params, optax.EmptyState(), params)


def test_leaf_shape_mismatch_names_path() -> None:
    tx = nox.clip_weights(1.0)
    with pytest.raises(ValueError, match="at w have shape"):
        tx.update({"w": jnp.ones(3)}, tx.init(None), {"w": jnp.ones(4)})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nox.clip_weights(-1.0), "max_value"),
        (lambda: nox.clip_weights(float("nan")), "max_value"),
        (lambda: nox.max_norm(-0.5), "max_value"),
        (lambda: nox.project_l2_ball(-1.0), "radius"),
        (lambda: nox.project_l1_ball(float("nan")), "radius"),
        (lambda: nox.project_linf_ball(-2.0), "radius"),
        (lambda: nox.min_max_norm(-1.0, 2.0), "min_value"),
        (lambda: nox.min_max_norm(3.0, 2.0), "min_value.*max_value"),
        (lambda: nox.min_max_norm(1.0, 2.0, rate=1.5), "rate"),
        (lambda: nox.min_max_norm(1.0, 2.0, rate=-0.1), "rate"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(
    make: Callable[[], Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_complex_leaves_are_scaled_by_modulus() -> None:
    x = jnp.array([[3.0 + 4.0j], [0.0 + 0.0j]], jnp.complex64)
    params = {"w": jnp.zeros_like(x)}
    new = _new_params(nox.max_norm(1.0), {"w": x}, params)["w"]
    np.testing.assert_allclose(np.asarray(new).ravel(), [0.6 + 0.8j, 0.0], rtol=1e-6)
    with pytest.raises(TypeError, match="complex"):
        nox.non_negative().update({"w": x}, optax.EmptyState(), params)


@pytest.mark.standard_promotion
def test_nnx_training_keeps_unit_norms_bounded() -> None:
    class MLP(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.out(jax.nn.relu(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    tx = optax.chain(optax.adam(1e-2), nox.max_norm(2.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    y = 5.0 * jnp.sum(x, axis=1, keepdims=True)  # large targets push the norms up

    @nnx.jit
    def step(model: Any, optimizer: Any) -> jax.Array:
        def loss_fn(model: Any) -> jax.Array:
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(100)]
    assert losses[-1] < losses[0]
    eps = float(jnp.finfo(jnp.float32).eps)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        norms = _unit_norms_f64(np.asarray(leaf, np.float64))
        assert np.all(norms <= 2.0 * (1 + eps)), norms
    kernel = np.asarray(model.hidden.kernel[...], np.float64)
    assert np.max(_unit_norms_f64(kernel)) > 1.9  # the constraint was active


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=str)
def test_meta_gradients_are_finite_in_half_precision(dtype: Any) -> None:
    """Rounding toward the set (``nextafter``) stays out of differentiation."""
    params = _tree(8, dtype)
    zeros = jax.tree.map(jnp.zeros_like, params)
    factories: list[tuple[Callable[..., optax.GradientTransformation], str]] = [
        (nox.clip_weights, "max_value"),
        (nox.project_linf_ball, "radius"),
        (nox.project_l1_ball, "radius"),
        (nox.project_l2_ball, "radius"),
        (nox.max_norm, "max_value"),
    ]
    for factory, name in factories:

        def total(
            u: Tree, bound: jax.Array, factory: Any = factory, name: str = name
        ) -> Any:
            tx = factory(**{name: bound})
            out, _ = tx.update(u, tx.init(params), params)
            new = optax.apply_updates(params, out)
            return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in new.values())

        grads = jax.jit(jax.grad(total, argnums=(0, 1)))(zeros, jnp.asarray(0.5))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        # d||P(p)||^2 / d(bound) is nonzero: the bound is active on these params.
        assert float(grads[1]) != 0.0


def _np_duchi(tree: Tree, radius: float) -> Tree:
    """The sort-based algorithm of Duchi et al. 2008, in NumPy."""
    v = np.sort(np.concatenate([np.abs(x).ravel() for x in tree.values()]))[::-1]
    if v.sum() <= radius:
        return tree
    csum = np.cumsum(v)
    k = np.arange(1, v.size + 1)
    rho = k[v * k > csum - radius].max()
    theta = (csum[rho - 1] - radius) / rho
    return {k: np.sign(x) * np.maximum(np.abs(x) - theta, 0) for k, x in tree.items()}


@pytest.mark.parametrize("kind", ["geometric", "ties", "one_large", "many"], ids=str)
def test_l1_ball_matches_sort_based_algorithm(x64: None, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "geometric":  # the support shrinks by one per Newton step
        w = 2.0 ** -np.arange(40.0) * rng.choice([-1, 1], 40)
    elif kind == "ties":
        w = np.repeat([3.0, -2.0, 1.0, -1.0], 10)
    elif kind == "one_large":
        w = np.concatenate([[100.0], rng.standard_normal(50)])
    else:
        w = rng.standard_normal(5000)
    x = {"a": w[: w.size // 2].reshape(-1, 1), "b": w[w.size // 2 :]}
    for radius in (0.5, 1.0, 7.0, 0.5 * np.abs(w).sum()):
        got = _project_with(nox.project_l1_ball(radius), x)
        chex.assert_trees_all_close(got, _np_duchi(x, radius), rtol=1e-10, atol=1e-12)


def _project_with(tx: optax.GradientTransformation, x: Tree) -> Tree:
    zeros = jax.tree.map(jnp.zeros_like, x)
    out, _ = tx.update(x, tx.init(zeros), zeros)
    return _f64(optax.apply_updates(zeros, out))


def test_l1_ball_neither_sorts_nor_gathers_the_leaves() -> None:
    """The threshold needs only scalar reductions (no all-gather when sharded)."""
    params = _tree(0)
    tx = nox.project_l1_ball(1.0)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert "sort" not in jaxpr
    assert "concatenate" not in jaxpr


@pytest.mark.standard_promotion
def test_inject_hyperparams_with_static_axis_and_mask() -> None:
    injected = optax.inject_hyperparams(nox.max_norm, static_args=("axis", "mask"))(
        max_value=1.0, axis=(0,), mask=nox.masks.matrices_only
    )
    params, updates = _tree(0), _tree(1, scale=3.0)
    state = injected.init(params)
    assert set(state.hyperparams) == {"max_value"}
    out, _ = jax.jit(injected.update)(updates, state, params)
    direct = nox.max_norm(1.0, axis=(0,), mask=nox.masks.matrices_only)
    want, _ = direct.update(updates, direct.init(params), params)
    chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["bias"], updates["bias"])
