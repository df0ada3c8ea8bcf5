"""The proximal steps of API.md section 7: group lasso, elastic net, schedules.

float64 NumPy references for ``prox_group_l1`` (block soft thresholding per
unit, every unit convention and stack axes) and ``prox_elastic_net`` (the
closed form), then hypothesis properties (non-expansive, idempotent at a zero
coefficient, a unit inside the threshold becomes exactly zero, elastic net at
``l2 = 0`` is ``prox_l1``), exact zeros after ``optax.apply_updates`` in every
dtype, and ``learning_rate`` given as an optax schedule against
``optax.inject_hyperparams`` with the same schedule.
"""

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


def _params_and_updates(dtype: Any = jnp.float32) -> tuple[Tree, Tree]:
    shapes = {
        "dense": {"kernel": (6, 4), "bias": (4,)},
        "conv": {"kernel": (3, 3, 2, 5)},
        "stack": {"kernel": (3, 4, 6)},
    }
    return normal_tree(0, shapes, dtype), normal_tree(1, shapes, dtype, 0.3)


def _update(tx: optax.GradientTransformation, u: Tree, p: Tree) -> Tree:
    out, _ = jax.jit(tx.update)(u, tx.init(p), p)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, u)
    return out


def _np_group_prox(x: np.ndarray, tau: float, axes: tuple[int, ...]) -> np.ndarray:
    norm = np.sqrt(np.sum(x**2, axis=axes, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norm > 0, np.maximum(0.0, 1.0 - tau / norm), 1.0)
    return x * scale


def _np_elastic(x: np.ndarray, l1: float, l2: float, lr: float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - lr * l1, 0.0) / (1.0 + lr * l2)


# (axis, stack_axes, the reduced axes of each leaf in float64)
LAYOUTS: list[tuple[str, Any, Any, dict[str, tuple[int, ...]]]] = [
    (
        "flax",
        None,
        None,
        {
            "dense/kernel": (0,),
            "dense/bias": (0,),
            "conv/kernel": (0, 1, 2),
            "stack/kernel": (0, 1),
        },
    ),
    (
        "out_first",
        "out_first",
        None,
        {
            "dense/kernel": (1,),
            "dense/bias": (0,),
            "conv/kernel": (1, 2, 3),
            "stack/kernel": (1, 2),
        },
    ),
    (
        "stacked",
        None,
        nox.masks.by_path("^stack/"),
        {
            "dense/kernel": (0,),
            "dense/bias": (0,),
            "conv/kernel": (0, 1, 2),
            "stack/kernel": (1,),
        },
    ),
]


@pytest.mark.parametrize(
    ("axis", "stack_axes", "axes"),
    [lay[1:] for lay in LAYOUTS],
    ids=[lay[0] for lay in LAYOUTS],
)
@pytest.mark.parametrize(
    "dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__
)
def test_group_prox_matches_float64_reference(
    axis: Any, stack_axes: Any, axes: dict[str, tuple[int, ...]], dtype: Any
) -> None:
    params, updates = _params_and_updates(dtype)
    coeff, lr = 0.8, 0.5
    tx = nox.prox_group_l1(coeff, lr, axis, stack_axes=stack_axes)
    new = optax.apply_updates(params, _update(tx, updates, params))
    eps = float(jnp.finfo(dtype).eps)
    for path, reduced in axes.items():
        group, name = path.split("/")
        p = np.asarray(params[group][name], np.float64)
        x = p + np.asarray(updates[group][name], np.float64)
        want = _np_group_prox(x, coeff * lr, reduced)
        got = np.asarray(new[group][name], np.float64)
        scale = np.max(np.abs(x))
        np.testing.assert_allclose(got, want, atol=4 * eps * scale, err_msg=path)
        # Whole units that are zero in the reference are exactly zero.
        zero_units = np.all(want == 0, axis=reduced)
        assert np.all(np.all(got == 0, axis=reduced)[zero_units]), path


def test_group_prox_zeroes_whole_units_exactly() -> None:
    """Units whose norm is at most lr * coeff become exactly 0, and only those."""
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(8, 6)).astype(np.float32)
    kernel[:, [1, 4]] *= 0.05  # two weak output features
    params = {"kernel": jnp.asarray(kernel)}
    norms = np.linalg.norm(kernel, axis=0)
    tau = float(np.sort(norms)[2] * 0.999)  # between the 2nd and 3rd norms
    tx = nox.prox_group_l1(coeff=tau, learning_rate=1.0)
    new = optax.apply_updates(
        params, _update(tx, {"kernel": jnp.zeros((8, 6))}, params)
    )
    zero = np.all(np.asarray(new["kernel"]) == 0.0, axis=0)
    np.testing.assert_array_equal(zero, norms <= tau)
    assert zero.sum() == 2


# XLA:CPU flushes subnormals to zero, so they are left out.
_VALUES = st.floats(-5.0, 5.0, allow_nan=False, allow_subnormal=False, width=64)
_KERNELS = hnp.arrays(np.float64, (4, 3), elements=_VALUES)


def _group64(x: np.ndarray, coeff: float, lr: float) -> np.ndarray:
    tx = nox.prox_group_l1(coeff, lr)
    with jax.enable_x64(True):
        p = {"w": jnp.zeros((4, 3), jnp.float64)}
        out, _ = tx.update({"w": jnp.asarray(x)}, tx.init(p), p)
        return np.asarray(out["w"])


@hypothesis.given(_KERNELS, _KERNELS, st.floats(0.0, 3.0))
def test_group_prox_is_non_expansive(x: np.ndarray, y: np.ndarray, tau: float) -> None:
    px, py = _group64(x, tau, 1.0), _group64(y, tau, 1.0)
    assert np.linalg.norm(px - py) <= np.linalg.norm(x - y) * (1 + 1e-12) + 1e-12


@hypothesis.given(_KERNELS)
def test_group_prox_is_the_identity_at_zero_coefficient(x: np.ndarray) -> None:
    np.testing.assert_array_equal(_group64(x, 0.0, 1.0), x)


# (A positive threshold: at 0 the step is the identity, checked above.)
@hypothesis.given(_KERNELS, st.floats(0.01, 3.0), st.floats(0.1, 2.0))
def test_group_prox_unit_inside_the_threshold_is_zero(
    x: np.ndarray, coeff: float, lr: float
) -> None:
    out = _group64(x, coeff, lr)
    norms = np.linalg.norm(x, axis=0)
    assert np.all(out[:, norms <= coeff * lr] == 0.0)
    np.testing.assert_allclose(out, _np_group_prox(x, coeff * lr, (0,)), atol=1e-12)


def _elastic64(x: np.ndarray, l1: float, l2: float, lr: float) -> np.ndarray:
    tx = nox.prox_elastic_net(l1, l2, lr)
    with jax.enable_x64(True):
        p = {"w": jnp.zeros(x.shape, jnp.float64)}
        out, _ = tx.update({"w": jnp.asarray(x)}, tx.init(p), p)
        return np.asarray(out["w"])


@hypothesis.given(
    _KERNELS, st.floats(0.0, 2.0), st.floats(0.0, 5.0), st.floats(0.0, 2.0)
)
def test_elastic_net_is_the_closed_form(
    x: np.ndarray, l1: float, l2: float, lr: float
) -> None:
    np.testing.assert_allclose(
        _elastic64(x, l1, l2, lr), _np_elastic(x, l1, l2, lr), rtol=1e-14, atol=1e-14
    )


@hypothesis.given(_KERNELS, st.floats(0.0, 2.0), st.floats(0.1, 2.0))
def test_elastic_net_at_zero_l2_is_prox_l1(x: np.ndarray, l1: float, lr: float) -> None:
    tx = nox.prox_l1(l1, lr)
    with jax.enable_x64(True):
        p = {"w": jnp.zeros(x.shape, jnp.float64)}
        want, _ = tx.update({"w": jnp.asarray(x)}, tx.init(p), p)
    np.testing.assert_array_equal(_elastic64(x, l1, 0.0, lr), np.asarray(want["w"]))


@pytest.mark.parametrize(
    "dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__
)
def test_elastic_net_exact_zeros_and_reference_in_every_dtype(dtype: Any) -> None:
    params, updates = _params_and_updates(dtype)
    l1, l2, lr = 0.6, 2.0, 0.5
    new = optax.apply_updates(
        params, _update(nox.prox_elastic_net(l1, l2, lr), updates, params)
    )
    eps = float(jnp.finfo(dtype).eps)
    for p, u, got in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(updates),
        jax.tree.leaves(new),
        strict=True,
    ):
        x = np.asarray(p, np.float64) + np.asarray(u, np.float64)
        want = _np_elastic(x, l1, l2, lr)
        got64 = np.asarray(got, np.float64)
        np.testing.assert_allclose(got64, want, atol=4 * eps * np.max(np.abs(x)))
        assert np.all(got64[want == 0] == 0.0)  # exact zeros
        assert np.all(np.abs(got64) <= np.abs(x))  # never pushed outward


# --------------------------------------------------------------------------
# learning_rate as an optax schedule.
# --------------------------------------------------------------------------

SCHEDULED: list[
    tuple[str, Callable[..., optax.GradientTransformation], dict[str, Any]]
] = [
    ("prox_l1", nox.prox_l1, {"coeff": 0.3}),
    ("prox_group_l1", nox.prox_group_l1, {"coeff": 0.3}),
    ("prox_elastic_net", nox.prox_elastic_net, {"l1": 0.3, "l2": 0.5}),
]


@pytest.mark.standard_promotion
@pytest.mark.parametrize(
    ("name", "factory", "kwargs"), SCHEDULED, ids=[s[0] for s in SCHEDULED]
)
def test_schedule_follows_inject_hyperparams_with_the_same_schedule(
    name: str,
    factory: Callable[..., optax.GradientTransformation],
    kwargs: dict[str, Any],
) -> None:
    del name
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, 3, 8, 0.1)
    ours = factory(learning_rate=schedule, **kwargs)
    injected = optax.inject_hyperparams(factory)(learning_rate=schedule, **kwargs)
    params, updates = _params_and_updates()
    s_ours, s_inj = ours.init(params), injected.init(params)
    assert isinstance(s_ours, nox.ScheduleState)
    assert int(s_ours.count) == 0
    step_ours, step_inj = jax.jit(ours.update), jax.jit(injected.update)
    for t in range(8):
        u = jax.tree.map(lambda x, t=t: x * (1 + 0.1 * t), updates)
        out_ours, s_ours = step_ours(u, s_ours, params)
        out_inj, s_inj = step_inj(u, s_inj, params)
        chex.assert_trees_all_close(out_ours, out_inj, rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, out_ours)
        assert int(optax.tree.get(s_ours, "count")) == t + 1


def test_schedule_out_of_domain_gives_nan_not_zeros() -> None:
    """A schedule that goes negative is caught at run time (its values are traced)."""
    tx = nox.prox_l1(0.5, learning_rate=lambda count: 1.0 - count.astype(jnp.float32))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    out, state = tx.update({"w": jnp.zeros(3)}, state, params)  # lr 1: fine
    assert bool(jnp.all(jnp.isfinite(out["w"])))
    out, state = tx.update({"w": jnp.zeros(3)}, state, params)  # lr 0: identity
    chex.assert_trees_all_equal(out["w"], jnp.zeros(3))
    out, _ = tx.update({"w": jnp.zeros(3)}, state, params)  # lr -1: NaN
    assert bool(jnp.all(jnp.isnan(out["w"])))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nox.prox_group_l1(-1.0, 0.1), "coeff"),
        (lambda: nox.prox_group_l1(0.1, float("nan")), "learning_rate"),
        (lambda: nox.prox_elastic_net(-0.1, 0.1, 0.1), "l1"),
        (lambda: nox.prox_elastic_net(0.1, float("inf"), 0.1), "l2"),
        (lambda: nox.prox_group_l1(0.1, 0.1, axis="rows"), "axis"),
        (lambda: nox.prox_l1(0.1, "fast"), "learning_rate"),
    ],
)
def test_bad_arguments_name_the_argument(make: Callable[[], Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match) as info:
        make()
    assert "got" in str(info.value)


def test_stacked_axis_named_by_axis_is_an_error_naming_the_leaf() -> None:
    tx = nox.prox_group_l1(0.1, 0.1, axis=0, stack_axes=1)
    params = {"layers": {"kernel": jnp.ones((3, 4, 2))}}
    with pytest.raises(
        ValueError,
        match=r"stack axis 0 of shape \(3, 4, 2\) of the leaf at layers/kernel",
    ):
        tx.update(params, tx.init(params), params)
