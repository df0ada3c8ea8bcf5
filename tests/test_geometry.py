"""Norm geometry (API.md section 8): ``orthogonalize`` and ``scale_by_lmo``.

References are float64 NumPy: the SVD polar factor, and the Newton--Schulz
recurrence run step by step. The shared battery (tests/cases.py) covers the
transform contract (jit, vmap, dtypes, grads, ``inject_hyperparams``).
"""

from __future__ import annotations

import math
from typing import Any

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox
from norm_optax import _polar

STANDARD = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def np_polar(m: np.ndarray) -> np.ndarray:
    """The exact polar factor ``U Vᵀ`` of a matrix, float64, with the rank cut-off."""
    u, s, vh = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    keep = s > max(m.shape) * np.finfo(np.float64).eps * s[0] if s.size else s
    return (u * keep) @ vh


def np_newton_schulz(
    m: np.ndarray, steps: int, coeffs: list[tuple[float, float, float]], s: float
) -> np.ndarray:
    """API.md 8.1's recurrence, in float64, step by step."""
    x = np.asarray(m, np.float64)
    wide = x.shape[0] > x.shape[1]
    if wide:
        x = x.T
    x = x / (np.linalg.norm(x) * (1 + s) + 1e-7)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if wide else x


def gaussian(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def kept_singular_values(out: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Singular values of ``out`` on the directions where ``m``'s are >= 5% of max.

    The polar factor shares ``m``'s singular vectors: project ``out`` on them.
    """
    u, s, vh = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    proj = u.T @ np.asarray(out, np.float64) @ vh.T
    diag = np.diag(proj)
    return diag[s >= 0.05 * s[0]]


# ---------------------------------------------------------------------------
# orthogonalize: references and accuracy.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_svd_matches_float64_polar_factor(shape: tuple[int, int]) -> None:
    m = gaussian(shape)
    out = nox.orthogonalize(jnp.asarray(m, jnp.float32), method="svd")
    assert out.dtype == jnp.float32
    assert out.shape == shape
    np.testing.assert_allclose(out, np_polar(m), atol=2e-5)


@pytest.mark.parametrize(
    ("coeffs", "table", "safety", "shape"),
    [
        ("standard", [STANDARD], 0.0, (12, 7)),
        ("polar_express", POLAR_EXPRESS, 0.02, (7, 12)),
    ],
)
def test_newton_schulz_matches_float64_recurrence(
    x64: Any, coeffs: str, table: Any, safety: float, shape: tuple[int, int]
) -> None:
    m = gaussian(shape, seed=1)
    for steps in (1, 3, 7):
        ref = np_newton_schulz(m, steps, table, safety)
        out64 = nox.orthogonalize(jnp.asarray(m), ns_steps=steps, ns_coeffs=coeffs)
        assert out64.dtype == jnp.float64
        np.testing.assert_allclose(out64, ref, rtol=1e-10, atol=1e-12)
        out32 = nox.orthogonalize(
            jnp.asarray(m, jnp.float32), ns_steps=steps, ns_coeffs=coeffs
        )
        assert out32.dtype == jnp.float32
        np.testing.assert_allclose(out32, ref, atol=5e-5)


def test_user_coefficients_tuple_and_sequence(x64: Any) -> None:
    m = gaussian((6, 10), seed=2)
    one = (2.0, -1.5, 0.5)
    np.testing.assert_allclose(
        nox.orthogonalize(jnp.asarray(m), ns_steps=4, ns_coeffs=one),
        np_newton_schulz(m, 4, [one], 0.0),
        rtol=1e-10,
    )
    seq = [STANDARD, one]
    np.testing.assert_allclose(
        nox.orthogonalize(jnp.asarray(m), ns_steps=4, ns_coeffs=seq),
        np_newton_schulz(m, 4, seq, 0.0),
        rtol=1e-10,
    )


ACCURACY_SHAPES = [
    pytest.param((256, 128), marks=pytest.mark.slow),
    pytest.param((768, 3072), marks=pytest.mark.slow),
    pytest.param((3072, 768), marks=pytest.mark.slow),
    (64, 64),
]


@pytest.mark.parametrize("shape", ACCURACY_SHAPES)
def test_accuracy_ranges_on_gaussian_matrices(shape: tuple[int, int]) -> None:
    m = gaussian(shape, seed=3)
    x = jnp.asarray(m, jnp.float32)
    standard = kept_singular_values(np.asarray(nox.orthogonalize(x)), m)
    assert standard.min() >= 0.68, standard.min()
    assert standard.max() <= 1.21, standard.max()
    polar = nox.orthogonalize(x, ns_coeffs="polar_express")
    express = kept_singular_values(np.asarray(polar), m)
    assert express.min() >= 0.85, express.min()
    assert express.max() <= 1.15, express.max()
    exact = np.linalg.svd(
        np.asarray(nox.orthogonalize(x, method="svd")), compute_uv=False
    )
    np.testing.assert_allclose(exact, 1.0, atol=1e-5)


def test_svd_rank_cutoff_drops_null_directions() -> None:
    m = gaussian((8, 3), seed=4) @ gaussian((3, 6), seed=5)  # rank 3
    out = nox.orthogonalize(jnp.asarray(m, jnp.float32), method="svd")
    s = np.linalg.svd(np.asarray(out), compute_uv=False)
    np.testing.assert_allclose(s[:3], 1.0, atol=1e-5)
    np.testing.assert_allclose(s[3:], 0.0, atol=1e-5)


@pytest.mark.parametrize("method", ["newton_schulz", "svd"])
def test_nan_matrix_only_and_zero_matrix(method: str) -> None:
    x = jnp.asarray(gaussian((3, 4, 5)), jnp.float32)
    x = x.at[1, 2, 3].set(jnp.inf).at[2].set(0.0)
    out = nox.orthogonalize(x, method=method, stack_axes=1)
    assert bool(jnp.all(jnp.isfinite(out[0])))
    assert bool(jnp.all(jnp.isnan(out[1])))
    assert bool(jnp.all(out[2] == 0))
    nan = nox.orthogonalize(x.at[0, 0, 0].set(jnp.nan), method=method, stack_axes=1)
    assert bool(jnp.all(jnp.isnan(nan[0])))


def test_gradient_is_finite_at_zero() -> None:
    def loss(x: jax.Array) -> jax.Array:
        return jnp.sum(nox.orthogonalize(x) * jnp.arange(12.0).reshape(3, 4))

    grad = jax.grad(loss)(jnp.zeros((3, 4)))
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32_and_casts_back(dtype: Any) -> None:
    m = gaussian((10, 6), seed=6)
    out = nox.orthogonalize(jnp.asarray(m, dtype), method="svd")
    assert out.dtype == dtype
    ref = np_polar(np.asarray(jnp.asarray(m, dtype).astype(jnp.float32)))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=1e-2)


# ---------------------------------------------------------------------------
# Layouts: the matrix of a leaf.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["newton_schulz", "svd"])
def test_stacked_equals_per_layer(method: str) -> None:
    x = jnp.asarray(gaussian((3, 6, 4), seed=7), jnp.float32)
    out = nox.orthogonalize({"k": x}, method=method, stack_axes=1)["k"]
    for i in range(3):
        np.testing.assert_allclose(
            out[i], nox.orthogonalize(x[i], method=method), rtol=1e-5, atol=1e-6
        )


def test_out_first_is_the_transposed_flax_layout() -> None:
    x = jnp.asarray(gaussian((2, 6, 4), seed=8), jnp.float32)  # (L, in, out)
    flax = nox.orthogonalize(x, stack_axes=1)
    torch = nox.orthogonalize(jnp.swapaxes(x, 1, 2), axis="out_first", stack_axes=1)
    np.testing.assert_allclose(jnp.swapaxes(torch, 1, 2), flax, rtol=1e-5, atol=1e-6)


def test_conv_kernel_is_fan_in_by_fan_out() -> None:
    k = jnp.asarray(gaussian((3, 3, 2, 5), seed=9), jnp.float32)  # (H, W, I, O)
    out = nox.orthogonalize(k, method="svd")
    np.testing.assert_allclose(
        out.reshape(18, 5), np_polar(np.asarray(k).reshape(18, 5)), atol=2e-5
    )
    # PyTorch layout (O, I, H, W): the same matrix, rows permuted.
    torch = jnp.transpose(k, (3, 2, 0, 1))
    out_t = nox.orthogonalize(torch, method="svd", axis="out_first")
    np.testing.assert_allclose(jnp.transpose(out_t, (2, 3, 1, 0)), out, atol=2e-5)


def test_explicit_axis_names_the_fan_in_axes() -> None:
    x = jnp.asarray(gaussian((4, 3, 5), seed=10), jnp.float32)
    out = nox.orthogonalize(x, method="svd", axis=(0, 2))  # fan_in 4*5, fan_out 3
    m = np.transpose(np.asarray(x), (0, 2, 1)).reshape(20, 3)
    ref = np.transpose(np_polar(m).reshape(4, 5, 3), (0, 2, 1))
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_tree_passes_none_and_non_inexact_leaves() -> None:
    tree = {"w": jnp.eye(3), "n": None, "step": jnp.asarray(3, jnp.int32)}
    out = nox.orthogonalize(tree)
    assert out["n"] is None
    assert out["step"] is tree["step"]


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_vector_leaf_raises_naming_path_and_shape() -> None:
    with pytest.raises(ValueError, match=r"layers/bias.*\(4, 3\)"):
        nox.orthogonalize(
            {"layers": {"bias": jnp.ones((4, 3)), "k": jnp.ones((4, 3, 3))}},
            stack_axes=1,
        )
    with pytest.raises(ValueError, match=r"\(5,\)"):
        nox.orthogonalize(jnp.ones(5))
    # An Equinox conv bias (out, 1, 1) has three axes but is a vector: the
    # message says why, not "fewer than two non-stack axes".
    with pytest.raises(ValueError, match=r"conv/bias.*\(4, 1, 1\).*broadcast bias"):
        nox.orthogonalize({"conv": {"bias": jnp.ones((4, 1, 1))}})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "qr"},
        {"ns_coeffs": "cubic"},
        {"ns_coeffs": (1.0, 2.0)},
        {"ns_steps": 0},
        {"ns_steps": 2.5},
        {"ns_steps": 2.0},
        {"ns_steps": True},
    ],
)
def test_bad_options_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        nox.orthogonalize(jnp.eye(3), **kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        nox.scale_by_lmo(**kwargs)


# ---------------------------------------------------------------------------
# scale_by_lmo.
# ---------------------------------------------------------------------------


def apply(tx: optax.GradientTransformation, updates: Any) -> Any:
    return tx.update(updates, tx.init(updates))[0]


def test_each_norm_gives_its_direction() -> None:
    rng = np.random.default_rng(11)
    u = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    flat = np.asarray(u)
    n2 = np.linalg.norm(flat)
    expected = {
        "frobenius": flat / n2,
        "rms": math.sqrt(24) * flat / n2,
        "sign": np.sign(flat),
        "unit": flat / np.linalg.norm(flat, axis=0, keepdims=True),
        "spectral": np_newton_schulz(flat, 5, [STANDARD], 0.0),
    }
    for name, ref in expected.items():
        out = apply(nox.scale_by_lmo(name, radius=0.5), {"w": u})["w"]
        np.testing.assert_allclose(out, 0.5 * ref, rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
    ("dims_scale", "k"),
    [
        (None, 1.0),
        ("muon", math.sqrt(max(1, 12 / 3))),
        ("spectral", math.sqrt(12 / 3)),
        ("rms", 0.2 * math.sqrt(12)),
    ],
)
def test_dims_scale(dims_scale: str | None, k: float) -> None:
    u = {"w": jnp.asarray(gaussian((3, 12)), jnp.float32), "b": jnp.ones(12)}
    out = apply(nox.scale_by_lmo("frobenius", dims_scale=dims_scale), u)
    np.testing.assert_allclose(
        out["w"], k * u["w"] / jnp.linalg.norm(u["w"]), rtol=1e-5
    )
    # k is 1 on leaves that are not matrices.
    np.testing.assert_allclose(out["b"], u["b"] / jnp.linalg.norm(u["b"]), rtol=1e-6)


def test_auto_stacked_kernel_and_bias_per_layer() -> None:
    kernel = jnp.asarray(gaussian((3, 5, 4), seed=12), jnp.float32)
    bias = jnp.asarray(gaussian((3, 4), seed=13), jnp.float32)
    out = apply(nox.scale_by_lmo(stack_axes=1), {"k": kernel, "b": bias})
    for i in range(3):
        one = apply(nox.scale_by_lmo(), {"k": kernel[i], "b": bias[i]})
        np.testing.assert_allclose(out["k"][i], one["k"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["b"][i], one["b"], rtol=1e-6)


@pytest.mark.parametrize("norm", ["spectral", "frobenius", "rms", "sign", "unit"])
def test_zero_layer_gives_zeros_and_nan_poisons_the_layer(norm: str) -> None:
    x = jnp.asarray(gaussian((3, 4, 5), seed=14), jnp.float32)
    x = x.at[0].set(0.0).at[1, 0, 0].set(jnp.nan)
    x = x.at[2, :, 1].set(0.0)  # a zero unit in a finite layer
    out = apply(nox.scale_by_lmo(norm, stack_axes=1), {"w": x})["w"]
    assert bool(jnp.all(out[0] == 0))
    assert bool(jnp.all(jnp.isnan(out[1])))
    assert bool(jnp.all(jnp.isfinite(out[2])))
    inf = apply(nox.scale_by_lmo(norm), {"w": x[2].at[3, 4].set(-jnp.inf)})["w"]
    assert bool(jnp.all(jnp.isnan(inf)))


def test_norm_tree_callable_none_and_mask() -> None:
    u = {"a": jnp.asarray(gaussian((4, 3)), jnp.float32), "b": jnp.arange(1.0, 4.0)}
    out = apply(nox.scale_by_lmo({"a": "sign", "b": None}), u)
    np.testing.assert_array_equal(out["a"], jnp.sign(u["a"]))
    assert out["b"] is u["b"]
    call = apply(nox.scale_by_lmo(lambda t: {"a": None, "b": "sign"}), u)
    assert call["a"] is u["a"]
    np.testing.assert_array_equal(call["b"], jnp.ones(3))
    masked = apply(nox.scale_by_lmo("sign", mask={"a": False, "b": True}), u)
    assert masked["a"] is u["a"]


def test_spectral_on_a_vector_raises_naming_path_and_shape() -> None:
    tx = nox.scale_by_lmo("spectral", stack_axes=1)
    with pytest.raises(ValueError, match=r"bias.*\(2, 3\).*fewer than two"):
        apply(tx, {"bias": jnp.ones((2, 3))})
    flat = nox.scale_by_lmo("spectral")
    with pytest.raises(ValueError, match=r"bias.*\(3, 1\).*broadcast bias"):
        apply(flat, {"bias": jnp.ones((3, 1))})


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_radius_out_of_domain_raises_at_construction(bad: float) -> None:
    with pytest.raises(ValueError, match="radius"):
        nox.scale_by_lmo(radius=bad)
    with pytest.raises(ValueError, match="radius"):
        nox.scale_by_lmo(radius={"w": 1.0, "b": bad})


def test_radius_tree_and_callable() -> None:
    u = {"w": jnp.ones((2, 2)), "b": jnp.ones(4)}
    out = apply(nox.scale_by_lmo("sign", radius={"w": 2.0, "b": 3.0}), u)
    np.testing.assert_array_equal(out["w"], 2.0 * jnp.ones((2, 2)))
    np.testing.assert_array_equal(out["b"], 3.0 * jnp.ones(4))
    call = apply(nox.scale_by_lmo("sign", radius=lambda t: {"w": 0.5, "b": 4.0}), u)
    np.testing.assert_array_equal(call["b"], 4.0 * jnp.ones(4))
    with pytest.raises(ValueError, match="radius"):
        apply(nox.scale_by_lmo("sign", radius=lambda t: -1.0), u)


def test_traced_radius_out_of_domain_gives_nan() -> None:
    tx = optax.inject_hyperparams(nox.scale_by_lmo)(radius=1.0)
    u = {"w": jnp.ones((2, 2))}
    state = tx.init(u)
    state.hyperparams["radius"] = jnp.asarray(-1.0)
    out, _ = jax.jit(tx.update)(u, state)
    assert bool(jnp.all(jnp.isnan(out["w"])))


@pytest.mark.slow  # (the battery's grad test covers the default case)
def test_meta_gradient_at_zero_is_finite() -> None:
    for norm in ("frobenius", "rms", "unit", "spectral"):

        def loss(u: jax.Array, norm: str = norm) -> jax.Array:
            out = apply(nox.scale_by_lmo(norm), {"w": u})["w"]
            return jnp.sum(out * jnp.arange(6.0).reshape(2, 3))

        grad = jax.grad(loss)(jnp.zeros((2, 3)))
        assert bool(jnp.all(jnp.isfinite(grad))), norm


def test_polar_helpers_round_trip() -> None:
    x = jnp.arange(2.0 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for stack, axes in [(0, (0, 1, 2)), (1, (2,)), (1, (1, 3)), (2, (2,))]:
        m = _polar.to_matrices(x, stack, axes)
        fan_in, fan_out = _polar.fans(x.shape, stack, axes)
        assert m.shape[1:] == (fan_in, fan_out)
        np.testing.assert_array_equal(_polar.from_matrices(m, x.shape, stack, axes), x)


# ---------------------------------------------------------------------------
# Properties: d(u) lies on the unit sphere of its norm, <u, d(u)> is the dual
# norm of u, and the polar factor is idempotent (float64, SVD for spectral).
# ---------------------------------------------------------------------------

small_matrices = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    # Zeros and magnitudes in [1e-3, 10]: a layer whose sum of squares
    # underflows counts as zero (the norms' documented range).
    elements=st.one_of(st.just(0.0), st.floats(1e-3, 10), st.floats(-10, -1e-3)),
)


def _own_and_dual(name: str, u: np.ndarray) -> tuple[float, float]:
    """The norm of ``u`` (own) and its dual norm, float64."""
    if name == "spectral":
        s = np.linalg.svd(u, compute_uv=False)
        return float(s[0]), float(s.sum())
    if name == "frobenius":
        return float(np.linalg.norm(u)), float(np.linalg.norm(u))
    if name == "rms":
        return float(np.linalg.norm(u) / math.sqrt(u.size)), float(
            math.sqrt(u.size) * np.linalg.norm(u)
        )
    if name == "sign":
        return float(np.abs(u).max()), float(np.abs(u).sum())
    units = np.linalg.norm(u, axis=0)  # "unit": one unit per column
    return float(units.max()), float(units.sum())


@pytest.mark.slow
@hypothesis.given(
    u=small_matrices,
    name=st.sampled_from(["spectral", "frobenius", "rms", "sign", "unit"]),
)
def test_property_unit_norm_and_dual_norm(u: np.ndarray, name: str) -> None:
    with jax.enable_x64(True):
        tx = nox.scale_by_lmo(name, method="svd")
        d = np.asarray(apply(tx, {"w": jnp.asarray(u)})["w"])
    own, _ = _own_and_dual(name, d)
    if name == "unit":  # every nonzero unit has norm 1
        units = np.linalg.norm(d, axis=0)
        nonzero = np.linalg.norm(u, axis=0) > 0
        np.testing.assert_allclose(units[nonzero], 1.0, rtol=1e-9)
        np.testing.assert_array_equal(units[~nonzero], 0.0)
    elif np.any(u != 0):
        np.testing.assert_allclose(own, 1.0, rtol=1e-9)
    else:
        np.testing.assert_array_equal(d, 0.0)
    _, dual = _own_and_dual(name, u)
    np.testing.assert_allclose(np.vdot(u, d), dual, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@hypothesis.given(u=small_matrices)
def test_property_polar_factor_is_idempotent(u: np.ndarray) -> None:
    with jax.enable_x64(True):
        once = nox.orthogonalize(jnp.asarray(u), method="svd")
        twice = nox.orthogonalize(once, method="svd")
    np.testing.assert_allclose(twice, once, atol=1e-9)


def test_traced_ns_steps_runs_that_many_steps() -> None:
    x = jnp.asarray(gaussian((6, 4), seed=15), jnp.float32)
    traced = jax.jit(lambda n: nox.orthogonalize(x, ns_steps=n))(3)
    np.testing.assert_allclose(traced, nox.orthogonalize(x, ns_steps=3), atol=1e-6)
    tx = optax.inject_hyperparams(nox.scale_by_lmo)(radius=1.0)
    state = tx.init({"w": x})
    assert "ns_steps" in state.hyperparams  # injected: it arrives traced
    out, _ = jax.jit(tx.update)({"w": x}, state)
    np.testing.assert_allclose(
        out["w"], apply(nox.scale_by_lmo(), {"w": x})["w"], atol=1e-6
    )
