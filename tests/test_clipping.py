"""Gradient clipping (API.md 2.1): float64 references, optax/torch, properties."""

from __future__ import annotations

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
from tests.cases import make_tree

NP_ORD = {1: 1, 2: 2, math.inf: np.inf}


def _update(tx: optax.GradientTransformation, updates: Any, params: Any = None) -> Any:
    return tx.update(updates, tx.init(params), params)[0]


def _np_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _float_tree(seed: int, scale: float = 3.0) -> dict[str, Any]:
    tree = make_tree(seed, scale=scale)
    return {k: v for k, v in tree.items() if k not in ("step", "frozen")}


def _np_norm(tree: Any, ord: float) -> float:
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    return float(np.linalg.norm(flat, NP_ORD[ord]))


# --- clip_by_value ------------------------------------------------------------


def test_clip_by_value_matches_numpy_and_optax() -> None:
    tree = _float_tree(0)
    got = _update(nox.clip_by_value(0.7), tree)
    want = jax.tree.map(lambda x: np.clip(x, -0.7, 0.7), _np_tree(tree))
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got, _update(optax.clip(0.7), tree), rtol=1e-6)


def test_clip_by_value_keeps_nan_and_clips_complex_parts() -> None:
    got = _update(nox.clip_by_value(1.0), {"a": jnp.array([jnp.nan, -jnp.inf, 0.5])})
    np.testing.assert_array_equal(np.asarray(got["a"]), [np.nan, -1.0, 0.5])
    z = _update(
        nox.clip_by_value(1.0), {"z": jnp.array([3 - 0.5j, -2j], jnp.complex64)}
    )
    np.testing.assert_array_equal(np.asarray(z["z"]), np.array([1 - 0.5j, -1j]))


# --- clip_by_norm ---------------------------------------------------------------


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_clip_by_norm_matches_numpy(ord: float) -> None:
    tree = _float_tree(1)
    got = _update(nox.clip_by_norm(1.5, ord=ord), tree)

    def reference(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(np.ravel(x), NP_ORD[ord])
        return x * min(1.0, 1.5 / norm)

    chex.assert_trees_all_close(got, jax.tree.map(reference, _np_tree(tree)), rtol=1e-6)


def test_clip_by_norm_nan_leaf_becomes_nan_others_kept() -> None:
    tree = {"bad": jnp.array([1.0, jnp.nan]), "good": jnp.array([0.3, 0.4])}
    got = _update(nox.clip_by_norm(1.0), tree)
    assert bool(jnp.all(jnp.isnan(got["bad"])))
    chex.assert_trees_all_close(got["good"], tree["good"])


# --- clip_by_global_norm --------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.5, 5.0, 1e3])
def test_clip_by_global_norm_matches_optax(max_norm: float) -> None:
    for seed in range(3):
        tree = _float_tree(seed)
        got = jax.jit(_update, static_argnums=0)(
            nox.clip_by_global_norm(max_norm), tree
        )
        want = _update(optax.clip_by_global_norm(max_norm), tree)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_clip_by_global_norm_matches_numpy(ord: float) -> None:
    tree = _float_tree(2)
    np_tree = _np_tree(tree)
    norm = _np_norm(np_tree, ord)
    got = _update(nox.clip_by_global_norm(0.25 * norm, ord=ord), tree)
    want = jax.tree.map(lambda x: 0.25 * x, np_tree)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    assert float(nox.global_norm(got, ord)) == pytest.approx(0.25 * norm, rel=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize(
    "tx",
    [
        nox.clip_by_global_norm(1.0),
        nox.clip_by_global_norm(1.0, ord=1),
        nox.clip_by_global_norm(1.0, ord="inf"),
        nox.normalize_by_global_norm(),
    ],
)
def test_non_finite_global_norm_makes_everything_nan(
    bad: float, tx: optax.GradientTransformation
) -> None:
    tree = _float_tree(3)
    tree["dense"]["bias"] = tree["dense"]["bias"].at[1].set(bad)
    out = jax.jit(tx.update)(tree, tx.init(None))[0]
    for leaf in jax.tree.leaves(out):
        assert bool(jnp.all(jnp.isnan(leaf))), out  # never zeros
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)


@pytest.mark.standard_promotion
def test_nan_step_is_skipped_by_apply_if_finite() -> None:
    params = {"w": jnp.ones(3)}
    tx = optax.apply_if_finite(
        optax.chain(nox.clip_by_global_norm(1.0), optax.sgd(0.1)), 3
    )
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
    chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
    assert int(state.notfinite_count) == 1


def test_inject_hyperparams_as_written_in_the_api() -> None:
    tx = optax.inject_hyperparams(nox.clip_by_global_norm)(max_norm=1.0)
    tree = _float_tree(4)
    state = tx.init(tree)
    out, state = jax.jit(tx.update)(tree, state)
    assert float(nox.global_norm(out)) == pytest.approx(1.0, rel=1e-6)
    # The threshold can be changed between steps without recompiling.
    state.hyperparams["max_norm"] = jnp.asarray(0.5)
    out, _ = jax.jit(tx.update)(tree, state)
    assert float(nox.global_norm(out)) == pytest.approx(0.5, rel=1e-6)


# --- normalize_by_global_norm ---------------------------------------------------


def test_normalize_by_global_norm() -> None:
    tree = _float_tree(5, scale=1e-3)
    out = _update(nox.normalize_by_global_norm(3.0), tree)
    assert float(nox.global_norm(out)) == pytest.approx(3.0, rel=1e-6)
    scale = 3.0 / _np_norm(_np_tree(tree), 2)
    chex.assert_trees_all_close(
        out, jax.tree.map(lambda x: scale * x, _np_tree(tree)), rtol=1e-6
    )
    zeros = jax.tree.map(jnp.zeros_like, tree)
    chex.assert_trees_all_equal(
        _update(nox.normalize_by_global_norm(3.0), zeros), zeros
    )


# --- adaptive_clip --------------------------------------------------------------


def test_adaptive_clip_matches_optax_and_numpy() -> None:
    grads, params = _float_tree(6), _float_tree(7, scale=1.0)
    got = _update(nox.adaptive_clip(0.05), grads, params)
    want = _update(optax.adaptive_grad_clip(0.05), grads, params)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)

    def reference(g: np.ndarray, p: np.ndarray) -> np.ndarray:
        axes = tuple(range(g.ndim - 1)) if g.ndim >= 2 else tuple(range(g.ndim))
        g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
        p_norm = np.sqrt(np.sum(p**2, axis=axes, keepdims=True))
        bound = 0.05 * np.maximum(p_norm, 1e-3)
        return g * np.minimum(1.0, bound / g_norm)

    chex.assert_trees_all_close(
        got, jax.tree.map(reference, _np_tree(grads), _np_tree(params)), rtol=1e-6
    )


def test_adaptive_clip_axis_mask_and_errors() -> None:
    grads, params = _float_tree(8), _float_tree(9, scale=1.0)
    # Units along axis 0 of the dense kernel (rows) when asked.
    got = _update(
        nox.adaptive_clip(
            0.01,
            axis=1,
            mask={
                "dense": {"kernel": True, "bias": False},
                "conv": False,
                "scale": False,
            },
        ),
        grads,
        params,
    )
    g, p = np.asarray(grads["dense"]["kernel"]), np.asarray(params["dense"]["kernel"])
    rows = g * np.minimum(
        1.0,
        0.01
        * np.linalg.norm(p, axis=1, keepdims=True)
        / np.linalg.norm(g, axis=1, keepdims=True),
    )
    np.testing.assert_allclose(np.asarray(got["dense"]["kernel"]), rows, rtol=1e-6)
    chex.assert_trees_all_equal(got["conv"], grads["conv"])
    chex.assert_trees_all_equal(got["dense"]["bias"], grads["dense"]["bias"])

    tx = nox.adaptive_clip(0.01)
    with pytest.raises(ValueError, match="adaptive_clip needs the current parameters"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ValueError, match=r"structure of params does not match") as info:
        tx.update(grads, tx.init(params), {"dense": params["dense"]})
    assert "updates:" in str(info.value)
    with pytest.raises(ValueError, match=r"structure of mask"):
        nox.adaptive_clip(0.01, mask={"dense": True, "other": False}).update(
            grads, optax.EmptyState(), params
        )
    with pytest.raises(
        ValueError, match=r"out of range for shape \(3,\) of the leaf at dense/bias"
    ):
        nox.adaptive_clip(0.01, axis=1).update(grads, optax.EmptyState(), params)


# --- construction errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "name", "value"),
    [
        (nox.clip_by_value, "max_delta", -1.0),
        (nox.clip_by_value, "max_delta", float("nan")),
        (nox.clip_by_norm, "max_norm", -0.5),
        (nox.clip_by_global_norm, "max_norm", -1.0),
        (nox.clip_by_global_norm, "max_norm", float("nan")),
        (nox.normalize_by_global_norm, "norm", -2.0),
        (nox.adaptive_clip, "clipping", -0.1),
        (nox.adaptive_clip, "clipping", jnp.asarray(-0.1)),
    ],
)
def test_bad_threshold_raises_at_construction(
    factory: Any, name: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=name) as info:
        factory(value)
    assert repr(value) in str(info.value)


def test_bad_eps_and_ord_and_types_raise() -> None:
    with pytest.raises(ValueError, match="eps"):
        nox.adaptive_clip(0.1, eps=-1.0)
    for factory in (nox.clip_by_norm, nox.clip_by_global_norm):
        with pytest.raises(ValueError, match=r"ord must be 1, 2 or inf .*3"):
            factory(1.0, ord=3)
    with pytest.raises(TypeError, match="max_norm"):
        nox.clip_by_global_norm("1.0")
    with pytest.raises(TypeError, match="max_delta"):
        nox.clip_by_value(None)


# --- torch, where the semantics match ------------------------------------------


def test_matches_torch_clip_grad() -> None:
    torch = pytest.importorskip("torch")
    tree = _float_tree(10)
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    for max_norm, norm_type in [(1.0, 2.0), (2.0, 1.0), (0.3, math.inf)]:
        params = [torch.nn.Parameter(torch.zeros(x.shape)) for x in leaves]
        for p, x in zip(params, leaves, strict=True):
            p.grad = torch.tensor(x)
        torch.nn.utils.clip_grad_norm_(
            params, max_norm, norm_type=norm_type, foreach=True
        )
        ord = {2.0: 2, 1.0: 1, math.inf: math.inf}[norm_type]
        got = jax.tree.leaves(_update(nox.clip_by_global_norm(max_norm, ord=ord), tree))
        for g, p in zip(got, params, strict=True):
            # torch adds 1e-6 to the norm; compare at that resolution.
            np.testing.assert_allclose(
                np.asarray(g), p.grad.numpy(), rtol=1e-5, atol=1e-6
            )
    params = [torch.nn.Parameter(torch.zeros(x.shape)) for x in leaves]
    for p, x in zip(params, leaves, strict=True):
        p.grad = torch.tensor(x)
    torch.nn.utils.clip_grad_value_(params, 0.4)
    for g, p in zip(
        jax.tree.leaves(_update(nox.clip_by_value(0.4), tree)), params, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(g), p.grad.numpy())


# --- properties -----------------------------------------------------------------

finite_vectors = hnp.arrays(
    np.float32,
    st.integers(1, 12),
    elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
)


@given(
    g=finite_vectors,
    h=finite_vectors,
    max_norm=st.floats(1e-3, 1e3),
    ord=st.sampled_from([1, 2, math.inf]),
)
def test_property_clip_by_global_norm(
    g: np.ndarray, h: np.ndarray, max_norm: float, ord: float
) -> None:
    tree = {"g": jnp.asarray(g), "h": jnp.asarray(h)}
    out = _update(nox.clip_by_global_norm(max_norm, ord=ord), tree)
    norm_in = _np_norm(_np_tree(tree), ord)
    norm_out = float(nox.global_norm(out, ord))
    assert norm_out <= max_norm * (1 + 1e-5)  # the bound
    if norm_in <= max_norm:  # identity below the threshold
        chex.assert_trees_all_equal(out, tree)
    else:  # direction kept: out = c * in with c in (0, 1]
        flat_in = np.concatenate([g, h]).astype(np.float64)
        flat_out = np.concatenate([np.asarray(out["g"]), np.asarray(out["h"])]).astype(
            np.float64
        )
        np.testing.assert_allclose(
            flat_out, flat_in * (max_norm / norm_in), rtol=1e-5, atol=1e-30
        )


@given(
    g=finite_vectors,
    max_norm=st.floats(1e-3, 1e3),
    ord=st.sampled_from([1, 2, math.inf]),
)
def test_property_clip_by_norm_bound_and_identity(
    g: np.ndarray, max_norm: float, ord: float
) -> None:
    out = _update(nox.clip_by_norm(max_norm, ord=ord), {"g": jnp.asarray(g)})["g"]
    norm_in = float(np.linalg.norm(g.astype(np.float64), NP_ORD[ord]))
    assert float(nox.global_norm(out, ord)) <= max_norm * (1 + 1e-5)
    if norm_in <= max_norm:
        np.testing.assert_array_equal(np.asarray(out), g)


@given(g=finite_vectors, max_delta=st.floats(0, 1e3))
def test_property_clip_by_value_bound(g: np.ndarray, max_delta: float) -> None:
    out = np.asarray(_update(nox.clip_by_value(max_delta), {"g": jnp.asarray(g)})["g"])
    bound = float(np.float32(max_delta))
    assert np.all(np.abs(out) <= bound)
    inside = np.abs(g) <= bound
    np.testing.assert_array_equal(out[inside], g[inside])


# ---------------------------------------------------------------------------
# Half precision on CPU: the norm and the scale each read the 16-bit leaf.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_clip_is_exact_within_and_scaled_once(dtype: Any) -> None:
    rng = np.random.default_rng(7)
    g = {"w": jnp.asarray(rng.standard_normal((16, 8)), dtype)}
    norm = float(nox.global_norm(g))
    step = jax.jit(lambda g, m: nox.clip_by_global_norm(m).update(g, None)[0])
    within = step(g, jnp.float32(2 * norm))["w"]
    assert within.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(within).view(np.uint16), np.asarray(g["w"]).view(np.uint16)
    )
    clipped = step(g, jnp.float32(0.5))["w"]
    scale = np.float32(0.5) / np.float32(norm)
    want = (g["w"].astype(jnp.float32) * scale).astype(dtype)
    np.testing.assert_array_equal(
        np.asarray(clipped, np.float32), np.asarray(want, np.float32)
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU codegen")
def test_bf16_clip_writes_no_float32_copy_on_cpu() -> None:
    # Reduced (the norm) and scaled (the clip) in one computation, the two
    # converts to float32 were merged and XLA:CPU wrote a float32 copy of the
    # leaf for the reduction: five times the traffic of reading it. (A leaf
    # this large is reduced by YNNPACK; XLA:CPU squares small ones apart.)
    g = {"w": jnp.zeros((256, 96), jnp.bfloat16), "b": jnp.zeros((96,), jnp.bfloat16)}
    tx = nox.clip_by_global_norm(1.0)
    hlo = jax.jit(lambda g: tx.update(g, None)[0]).lower(g).compile().as_text()
    assert hlo is not None
    entry = hlo[hlo.index("\nENTRY") :]
    assert "f32[256,96]" not in entry
