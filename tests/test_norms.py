"""The norm primitives (API.md section 1) against float64 NumPy references."""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import norm_optax as nox
from tests.cases import normal_tree

ORDS = [1, 2, math.inf]
NP_ORD = {1: 1, 2: 2, math.inf: np.inf}


def np_global_norm(leaves: list[np.ndarray], ord: float) -> float:
    if not leaves:
        return 0.0
    flat = np.concatenate([np.ravel(np.asarray(x, np.complex128)) for x in leaves])
    return float(np.linalg.norm(flat, NP_ORD[ord]))


def random_tree(seed: int, dtype: Any = np.float32) -> dict[str, Any]:
    shapes = {"kernel": (7, 5), "bias": (5,), "conv": (3, 3, 2, 4), "scalar": ()}
    return normal_tree(seed, shapes, dtype)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_global_norm_matches_numpy(ord: float, jit: bool) -> None:
    tree = random_tree(0)
    fn = jax.jit(nox.global_norm, static_argnums=1) if jit else nox.global_norm
    got = fn(tree, ord)
    want = np_global_norm([np.asarray(x) for x in jax.tree.leaves(tree)], ord)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert got.dtype == jnp.float32
    assert got.shape == ()


@pytest.mark.parametrize("ord", ["inf", "INF", jnp.inf, float("inf"), np.inf, 2.0, 1.0])
def test_accepted_ord_spellings(ord: Any) -> None:
    x = {"a": jnp.array([3.0, -4.0])}
    expected = {2.0: 5.0, 1.0: 7.0}.get(ord if not isinstance(ord, str) else 0.0, 4.0)
    assert float(nox.global_norm(x, ord)) == expected


@pytest.mark.parametrize("ord", [3, 0, -1, 0.5, -math.inf, "fro", "nuc", True])
def test_unknown_ord_raises_naming_value(ord: Any) -> None:
    with pytest.raises(ValueError, match=r"ord must be 1, 2 or inf") as info:
        nox.global_norm({"a": jnp.ones(2)}, ord)
    assert repr(ord) in str(info.value)
    with pytest.raises(ValueError, match="ord"):
        nox.unit_norms(jnp.ones((2, 2)), ord=ord)
    with pytest.raises(ValueError, match="ord"):
        nox.leaf_norms({"a": jnp.ones(2)}, ord=ord)


@pytest.mark.parametrize("ord", [None, [2], object()])
def test_wrong_type_of_ord_raises_type_error(ord: Any) -> None:
    with pytest.raises(TypeError, match="ord"):
        nox.global_norm({"a": jnp.ones(2)}, ord)


def test_traced_ord_selects_at_run_time() -> None:
    tree = random_tree(1)
    fn = jax.jit(nox.global_norm)
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    for ord, value in [(1, 1), (2, 2), (math.inf, np.inf)]:
        got = fn(tree, jnp.asarray(value, jnp.float32))
        np.testing.assert_allclose(float(got), np_global_norm(leaves, ord), rtol=1e-6)
    # A traced value that is not a valid ord gives NaN, never a plausible number.
    assert np.isnan(float(fn(tree, jnp.asarray(3, jnp.int32))))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (jnp.float16, jnp.float32),
        (jnp.bfloat16, jnp.float32),
        (jnp.float32, jnp.float32),
        (jnp.float64, jnp.float64),
        (jnp.complex64, jnp.float32),
        (jnp.complex128, jnp.float64),
    ],
)
def test_result_dtype_is_float32_or_wider(x64: None, dtype: Any, expected: Any) -> None:
    del x64
    tree = {"a": jnp.ones(3, dtype), "b": jnp.ones(2, jnp.float32)}
    for ord in ORDS:
        assert nox.global_norm(tree, ord).dtype == expected
        assert nox.leaf_norms(tree, ord)["a"].dtype == expected
        assert nox.unit_norms(tree["a"], ord=ord).dtype == expected


def test_fp16_large_values_do_not_overflow() -> None:
    for value in (300.0, 60000.0, 65504.0):
        tree = {
            "a": jnp.full((4,), value, jnp.float16),
            "b": jnp.asarray([value], jnp.float16),
        }
        got = float(nox.global_norm(tree))
        want = math.sqrt(5) * float(np.float16(value))
        assert math.isfinite(got)
        assert abs(got - want) / want < 1e-3
    # optax accumulates in the leaf dtype and overflows here.
    assert not math.isfinite(
        float(optax.tree.norm({"a": jnp.full((4,), 60000.0, jnp.float16)}))
    )


def test_fp16_tiny_values_do_not_underflow() -> None:
    x = jnp.full((1000,), 1e-4, jnp.float16)
    got = float(nox.global_norm({"x": x}))
    want = math.sqrt(1000) * float(np.float16(1e-4))
    assert got > 0
    assert abs(got - want) / want < 1e-3


@pytest.mark.parametrize("ord", ORDS)
def test_ten_million_bf16_values_within_1e3(ord: float) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(10**7).astype(np.float32)
    x = jnp.asarray(values, jnp.bfloat16)
    reference = np.asarray(x).astype(np.float64)  # the bf16-rounded inputs
    got = float(jax.jit(nox.global_norm, static_argnums=1)({"x": x}, ord))
    want = float(np.linalg.norm(reference, NP_ORD[ord]))
    assert abs(got - want) / want < 1e-3


def test_complex_uses_modulus(x64: None) -> None:
    del x64
    z = jnp.asarray([3 + 4j, -1j, 0], jnp.complex128)
    assert float(nox.global_norm({"z": z})) == pytest.approx(math.sqrt(26.0))
    assert float(nox.global_norm({"z": z}, 1)) == pytest.approx(6.0)
    assert float(nox.global_norm({"z": z}, "inf")) == pytest.approx(5.0)


def test_skipped_leaves_and_empty_trees() -> None:
    tree = {
        "w": jnp.array([3.0, 4.0]),
        "none": None,
        "masked": optax.MaskedNode(),
        "step": jnp.asarray(100, jnp.int32),
        "flag": jnp.asarray(True),
        "tangent": np.zeros((3,), jax.dtypes.float0),
    }
    assert float(nox.global_norm(tree)) == 5.0
    norms = nox.leaf_norms(tree)
    assert float(norms["w"]) == 5.0
    assert norms["none"] is None
    assert isinstance(norms["masked"], optax.MaskedNode)
    assert norms["step"] is None
    assert norms["flag"] is None
    assert norms["tangent"] is None
    empties: list[Any] = [
        {},
        [],
        None,
        {"a": None},
        {"step": jnp.asarray(1, jnp.int32)},
    ]
    for empty in empties:
        for ord in ORDS:
            value = nox.global_norm(empty, ord)
            assert float(value) == 0.0
            assert value.dtype == jnp.float32


def test_python_float_leaves_take_part() -> None:
    assert float(nox.global_norm({"a": 3.0, "b": [4.0]})) == 5.0


@pytest.mark.parametrize(
    ("shape", "axis", "expected_shape"),
    [
        ((), None, ()),
        ((6,), None, (1,)),
        ((5, 3), None, (1, 3)),
        ((3, 3, 2, 4), None, (1, 1, 1, 4)),
        ((5, 3), 1, (5, 1)),
        ((5, 3), -1, (5, 1)),
        ((3, 3, 2, 4), (0, 1), (1, 1, 2, 4)),
        ((3, 3, 2, 4), (), (3, 3, 2, 4)),
    ],
)
@pytest.mark.parametrize("ord", ORDS)
def test_unit_norms_match_numpy(
    shape: tuple[int, ...], axis: Any, expected_shape: tuple[int, ...], ord: float
) -> None:
    x = np.random.default_rng(2).standard_normal(shape)
    got = nox.unit_norms(jnp.asarray(x, jnp.float32), axis=axis, ord=ord)
    assert got.shape == expected_shape
    if axis is None:
        axes = (
            tuple(range(len(shape) - 1))
            if len(shape) >= 2
            else tuple(range(len(shape)))
        )
    else:
        axes = (axis,) if isinstance(axis, int) else axis
    if ord == 2:
        want = np.sqrt(np.sum(x**2, axis=axes, keepdims=True))
    elif ord == 1:
        want = np.sum(np.abs(x), axis=axes, keepdims=True)
    else:
        want = np.max(np.abs(x), axis=axes, keepdims=True, initial=0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_unit_norms_axis_out_of_range_names_shape(axis: Any) -> None:
    with pytest.raises(ValueError, match=r"out of range for shape \(5, 3\)"):
        nox.unit_norms(jnp.ones((5, 3)), axis=axis)


def test_unit_norms_rejects_integer_arrays() -> None:
    with pytest.raises(TypeError, match="inexact"):
        nox.unit_norms(jnp.ones((2, 2), jnp.int32))


@pytest.mark.parametrize("ord", ORDS)
def test_gradient_is_zero_at_zero_and_finite_everywhere(ord: float) -> None:
    zeros = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4, jnp.bfloat16)}
    grads = jax.grad(nox.global_norm)(zeros, ord)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, zeros))
    unit_grad = jax.grad(lambda x: jnp.sum(nox.unit_norms(x, ord=ord)))(
        jnp.zeros((3, 2))
    )
    chex.assert_trees_all_equal(unit_grad, jnp.zeros((3, 2)))
    # Some units zero, others not; infinite entries: still finite gradients.
    x = jnp.array([[0.0, 1.0], [0.0, -2.0]])
    assert bool(
        jnp.all(
            jnp.isfinite(jax.grad(lambda x: jnp.sum(nox.unit_norms(x, ord=ord)))(x))
        )
    )
    inf = {"a": jnp.array([jnp.inf, 1.0])}
    assert all(
        bool(jnp.all(jnp.isfinite(g)))
        for g in jax.tree.leaves(jax.grad(nox.global_norm)(inf, ord))
    )


@pytest.mark.parametrize("ord", ORDS)
def test_gradient_matches_autodiff_away_from_kinks(ord: float) -> None:
    x = jnp.asarray(np.random.default_rng(3).standard_normal(12), jnp.float32)
    got = jax.grad(lambda x: nox.global_norm({"x": x}, ord))(x)
    want = jax.grad(lambda x: jnp.linalg.norm(x, NP_ORD[ord]))(x)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    unit = jax.grad(lambda x: jnp.sum(nox.unit_norms(x.reshape(4, 3), ord=ord)))(x)
    unit_want = jax.grad(
        lambda x: jnp.sum(jnp.linalg.norm(x.reshape(4, 3), NP_ORD[ord], axis=0))
    )(x)
    chex.assert_trees_all_close(unit, unit_want, rtol=1e-6, atol=1e-7)


def test_complex_gradient_matches_autodiff() -> None:
    z = jnp.asarray([1 + 2j, -0.5j, 3.0], jnp.complex64)
    got = jax.grad(lambda z: nox.global_norm({"z": z}))(z)
    want = jax.grad(lambda z: jnp.sqrt(jnp.sum(jnp.abs(z) ** 2)))(z)
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_vmap_per_example_and_axis_name_over_a_vmap_axis_raises() -> None:
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 6)), jnp.float32)
    per_row = jax.vmap(nox.global_norm)({"x": x})
    np.testing.assert_allclose(
        np.asarray(per_row), np.linalg.norm(np.asarray(x), axis=1), rtol=1e-6
    )
    # A vmap axis does not record which values vary over it (an unbatched
    # leaf would be counted once per example): raise rather than guess.
    for ord in ORDS:
        with pytest.raises(ValueError, match="check_vma=True"):
            jax.vmap(
                lambda row, o=ord: nox.global_norm({"x": row}, o, axis_name="i"),
                axis_name="i",
            )(x)
    with pytest.raises(ValueError, match="cannot be told from a sharded one"):
        jax.vmap(
            lambda row: nox.clip_by_global_norm(1.0, axis_name="i").update(row, None),
            axis_name="i",
        )(x)


# ---------------------------------------------------------------------------
# Half precision: no underflow or overflow of the squares (bfloat16 has
# float32's exponent range; the fast pass squares in float32, a rescaled pass
# runs only when that sum is out of range).
# ---------------------------------------------------------------------------


def _f64(x: jax.Array) -> np.ndarray:
    return np.asarray(x.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("value", [1e-19, 1e-25, 1e-30, 1e20, 1e30])
def test_bf16_tiny_and_huge_values_keep_their_norm(value: float) -> None:
    x = jnp.asarray(
        value * np.random.default_rng(5).uniform(0.5, 2.0, (3, 8, 4)), jnp.bfloat16
    )
    ref = _f64(x)
    l2 = functools.partial(np.linalg.norm, ord=None)
    checks = {
        "global": (
            nox.global_norm({"x": x, "y": x[0]}),
            l2(np.concatenate([ref.ravel(), ref[0].ravel()])),
        ),
        "leaf": (nox.leaf_norms({"x": x})["x"], l2(ref.ravel())),
        "stacked": (
            nox.leaf_norms({"x": x}, stack_axes=1)["x"],
            np.sqrt(np.sum(ref**2, axis=(1, 2))),
        ),
        "unit": (
            nox.unit_norms(x),
            np.sqrt(np.sum(ref**2, axis=(0, 1), keepdims=True)),
        ),
        "unit[stack=1]": (
            nox.unit_norms(x, stack_axes=1),
            np.sqrt(np.sum(ref**2, axis=1, keepdims=True)),
        ),
    }
    for name, (got, want) in checks.items():
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=1e-5, err_msg=name
        )


def test_bf16_rescue_keeps_zero_nan_and_inf() -> None:
    bf16 = jnp.bfloat16
    assert float(nox.global_norm(jnp.zeros((5,), bf16))) == 0.0
    assert np.all(np.asarray(nox.unit_norms(jnp.zeros((3, 2), bf16))) == 0.0)
    tiny_and_nan = jnp.asarray([1e-30, jnp.nan], bf16)
    assert math.isnan(float(nox.global_norm(tiny_and_nan)))
    assert float(nox.global_norm(jnp.asarray([1e-30, jnp.inf], bf16))) == math.inf
    # Above float32's range the true norm is infinite in the float32 result.
    assert float(nox.global_norm(jnp.full((4,), 3e38, bf16))) == math.inf


def test_bf16_tiny_gradient_is_finite_and_zero_at_zero() -> None:
    x = jnp.full((4,), 1e-25, jnp.bfloat16)
    got = jax.grad(lambda x: nox.global_norm({"x": x}))(x)
    np.testing.assert_allclose(_f64(got), np.full(4, 0.5), rtol=1e-2)
    unit = jax.grad(lambda x: jnp.sum(nox.unit_norms(x.reshape(2, 2))))(x)
    np.testing.assert_allclose(_f64(unit), np.full(4, math.sqrt(0.5)), rtol=1e-2)
    zero = jax.grad(lambda x: nox.global_norm({"x": x}))(jnp.zeros(4, jnp.bfloat16))
    assert np.all(_f64(zero) == 0)


def test_normalize_and_unit_norm_of_a_1e_25_bf16_tree() -> None:
    g = {"w": jnp.asarray([[1e-25, -2e-25], [3e-25, 0.0]], jnp.bfloat16)}
    tx = nox.normalize_by_global_norm(1.0)
    out, _ = tx.update(g, tx.init(g))
    assert float(nox.global_norm(out)) == pytest.approx(1.0, rel=1e-2)  # bf16 grid
    # unit_norm (a projection) rescales each unit (column) of p + u to norm 1.
    proj = nox.unit_norm()
    params = {"w": jnp.asarray([[1e-25, 0.0], [-1e-25, 4e-26]], jnp.bfloat16)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = proj.update(zeros, proj.init(params), params)
    new = optax.apply_updates(params, u)["w"]
    np.testing.assert_allclose(np.linalg.norm(_f64(new), axis=0), [1.0, 1.0], rtol=1e-2)


def test_bf16_rescue_stays_a_branch_under_vmap() -> None:
    # The rescue's predicate is reduced over the batch, so vmap keeps the
    # lax.cond (a batched predicate would make a select running both passes).
    batch = jnp.ones((3, 5), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(jax.vmap(nox.global_norm))(batch))
    assert "cond[" in jaxpr
    got = jax.vmap(nox.global_norm)(batch.at[1].multiply(1e-30))
    np.testing.assert_allclose(
        np.asarray(got, np.float64), [5**0.5, 5**0.5 * 1e-30, 5**0.5], rtol=1e-2
    )


_MANTISSAS = hnp.arrays(
    np.float64, (4, 3), elements=st.floats(-1.0, 1.0).filter(lambda v: abs(v) > 0.01)
)


@given(mantissas=_MANTISSAS, exponent=st.floats(-30.0, 30.0))
def test_property_bf16_leaf_and_unit_norms_within_1e3_of_float64(
    mantissas: np.ndarray, exponent: float
) -> None:
    x = jnp.asarray(mantissas * 10.0**exponent, jnp.bfloat16)
    _check_leaf_and_unit_norms(x)


@given(mantissas=_MANTISSAS, exponent=st.floats(-7.0, math.log10(6e4)))
def test_property_f16_leaf_and_unit_norms_within_1e3_of_float64(
    mantissas: np.ndarray, exponent: float
) -> None:
    x = jnp.asarray(mantissas * 10.0**exponent, jnp.float16)
    _check_leaf_and_unit_norms(x)


@functools.cache
def _leaf_and_unit_norms() -> Any:
    return jax.jit(lambda x: (nox.leaf_norms({"x": x})["x"], nox.unit_norms(x)))


def _check_leaf_and_unit_norms(x: jax.Array) -> None:
    ref = _f64(x)
    leaf, unit = _leaf_and_unit_norms()(x)
    np.testing.assert_allclose(float(leaf), np.linalg.norm(ref.ravel()), rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(unit, np.float64),
        np.sqrt(np.sum(ref**2, axis=0, keepdims=True)),
        rtol=1e-3,
    )


@given(
    arrays=st.lists(
        hnp.arrays(
            np.float32,
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
            elements=st.floats(-1e4, 1e4, width=32),
        ),
        min_size=0,
        max_size=4,
    ),
    ord=st.sampled_from(ORDS),
)
def test_property_equals_norm_of_concatenation(
    arrays: list[np.ndarray], ord: float
) -> None:
    got = float(nox.global_norm([jnp.asarray(a) for a in arrays], ord))
    want = np_global_norm(arrays, ord)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-30)


@given(
    a=hnp.arrays(np.float32, (6,), elements=st.floats(-100, 100, width=32)),
    b=hnp.arrays(np.float32, (6,), elements=st.floats(-100, 100, width=32)),
    c=st.floats(-10, 10),
    ord=st.sampled_from(ORDS),
)
def test_property_norm_axioms(
    a: np.ndarray, b: np.ndarray, c: float, ord: float
) -> None:
    na, nb = (
        float(nox.global_norm(jnp.asarray(a), ord)),
        float(nox.global_norm(jnp.asarray(b), ord)),
    )
    nab = float(nox.global_norm(jnp.asarray(a + b), ord))
    assert nab <= (na + nb) * (1 + 1e-5) + 1e-6  # triangle inequality
    nca = float(nox.global_norm(jnp.asarray(np.float32(c) * a), ord))
    assert nca == pytest.approx(
        abs(np.float32(c)) * na, rel=1e-5, abs=1e-5
    )  # homogeneity
