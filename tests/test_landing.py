"""Landing a projection in every precision: the bound holds, as close as it can.

The reproducers of the issue "Projections: right in every precision" (they
failed before the landing was redesigned), the unit-norm-aware landing at
large scale (units ~64 and ~1000 times over their bound, bfloat16 and
float16), the window a unit that starts within twice its bound ends in, and
the rule for non-finite inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox
from norm_optax._numerics import next_float

# ``eps`` of the rule for units that start within twice their bound.
EPS = {
    jnp.dtype(jnp.bfloat16): 2.0**-7,
    jnp.dtype(jnp.float16): 2.0**-10,
    jnp.dtype(jnp.float32): 8 * 2.0**-23,
}


def _norms(x: jax.Array) -> np.ndarray:
    """Unit norms (one per column) in float64, from the stored values."""
    a = np.asarray(x, np.float64)
    return np.sqrt(np.sum(a**2, axis=0))


def _sgd_then(transform: optax.GradientTransformation) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.uniform(k1, (256, 64), maxval=0.2)}  # float32
    grads = {"w": jax.random.normal(k2, (256, 64)).astype(jnp.bfloat16)}
    tx = optax.chain(optax.sgd(0.1), transform)
    u, _ = tx.update(grads, tx.init(params), params)
    assert u["w"].dtype == jnp.bfloat16  # the update keeps its dtype
    return optax.apply_updates(params, u)


# --------------------------------------------------------------------------
# The reproducers.
# --------------------------------------------------------------------------


@pytest.mark.standard_promotion
def test_float32_params_bfloat16_updates_non_negative() -> None:
    new = _sgd_then(nox.non_negative())["w"]
    assert float(new.min()) >= 0  # was -0.000487, 1634 entries < 0


@pytest.mark.standard_promotion
def test_float32_params_bfloat16_updates_clip_weights() -> None:
    new = _sgd_then(nox.clip_weights(0.1))["w"]
    assert float(jnp.max(jnp.abs(new))) <= np.float32(0.1)  # was 0.100943


@pytest.mark.standard_promotion
def test_float32_params_bfloat16_updates_max_norm() -> None:
    new = _sgd_then(nox.max_norm(0.5))["w"]
    assert np.max(_norms(new)) <= 0.5  # was 0.500384


@pytest.mark.standard_promotion
def test_one_element_float32_param_bfloat16_update() -> None:
    params = {"w": jnp.array([0.15], jnp.float32)}
    tx = nox.clip_weights(0.2)
    u, _ = tx.update({"w": jnp.array([0.0625], jnp.bfloat16)}, tx.init(params), params)
    new = float(optax.apply_updates(params, u)["w"][0])
    assert 0.2 - 2**-9 <= new <= np.float32(0.2)  # was 0.20004883


def test_float16_unit_far_outside_is_not_zeroed() -> None:
    p = {"k": jnp.full((4, 2), 1000.0, jnp.float16)}
    u, _ = nox.max_norm(1.0).update(jax.tree.map(jnp.zeros_like, p), None, p)
    new = optax.apply_updates(p, u)["k"]  # was all 0.0
    np.testing.assert_array_equal(_norms(new), [1.0, 1.0])  # 0.5 is reachable


# --------------------------------------------------------------------------
# Unit-norm-aware landing at large scale.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("over", [64, pytest.param(1000, marks=pytest.mark.slow)])
def test_large_moves_land_near_the_bound(dtype: Any, over: int) -> None:
    """A ``(4096, 8)`` kernel whose units are ~``over`` times their bound."""
    eps = EPS[jnp.dtype(dtype)]
    scale = over / 64  # N(0, 1) columns of 4096 have norms ~64
    p = {"k": (scale * jax.random.normal(jax.random.key(1), (4096, 8))).astype(dtype)}
    zeros = jax.tree.map(jnp.zeros_like, p)
    for tx, low, high in (
        (nox.max_norm(1.0), 1 - 2 * eps, 1.0),
        (nox.unit_norm(), 1 - 2 * eps, 1 + 2 * eps),
    ):
        u, _ = jax.jit(tx.update)(zeros, tx.init(p), p)
        n = _norms(optax.apply_updates(p, u)["k"])
        assert np.all(n > 0), n  # never zeroed
        if dtype == jnp.bfloat16 and over == 1000:
            # p + u' reaches nothing nonzero within about 2^-9 |p| of 0: the
            # few elements whose grid comes near their target carry the unit.
            assert np.all(n <= 1.0 if high == 1.0 else 1.1), n
            continue
        # bfloat16 (4096, 8) after max_norm(1.0) was 0.843-0.849 before.
        assert np.all(n >= low), (n, low)
        assert np.all(n <= high), (n, high)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=str)
def test_units_within_twice_the_bound_end_in_the_window(dtype: Any) -> None:
    """Start at 1-2x the bound: ``[b(1 - 2eps), b]``; lower bounds, unit_norm too."""
    eps = EPS[jnp.dtype(dtype)]
    key = jax.random.key(2)
    direction = jax.random.normal(key, (300, 16))
    direction = direction / jnp.linalg.norm(direction, axis=0, keepdims=True)
    factor = jnp.linspace(1.01, 2.0, 16)[None, :]
    b = 0.75
    p = {"k": (direction * (b * factor)).astype(dtype)}
    zeros = jax.tree.map(jnp.zeros_like, p)
    u, _ = nox.max_norm(b).update(zeros, None, p)
    n = _norms(optax.apply_updates(p, u)["k"])
    assert np.all(n <= b), n
    assert np.all(n >= b * (1 - 2 * eps)), n
    # A lower bound from within half of it: [a, a(1 + 2eps)].
    a = 2 * b
    tx = nox.min_max_norm(a, 10.0)
    u, _ = tx.update(zeros, None, p)
    n = _norms(optax.apply_updates(p, u)["k"])
    assert np.all(n >= a), n
    assert np.all(n <= a * (1 + 2 * eps)), n
    u, _ = nox.unit_norm().update(zeros, None, p)
    n = _norms(optax.apply_updates(p, u)["k"])
    assert np.all(np.abs(n - 1) <= 2 * eps), n


# --------------------------------------------------------------------------
# Non-finite inputs: never a plausible finite parameter.
# --------------------------------------------------------------------------

PROJECTIONS = {
    "clip_weights": nox.clip_weights(1.0),
    "project_linf_ball": nox.project_linf_ball(1.0),
    "non_negative": nox.non_negative(),
    "prox_l1": nox.prox_l1(0.1, 1.0),
    "prox_elastic_net": nox.prox_elastic_net(0.1, 0.1, 1.0),
    "max_norm": nox.max_norm(1.0),
    "unit_norm": nox.unit_norm(),
    "min_max_norm": nox.min_max_norm(0.5, 1.0),
    "prox_group_l1": nox.prox_group_l1(0.1, 1.0),
}


@pytest.mark.parametrize("name", list(PROJECTIONS))
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", ["update", "param"])
def test_non_finite_input_becomes_nan(name: str, bad: float, where: str) -> None:
    tx = PROJECTIONS[name]
    params = {"w": jnp.full((3, 2), 0.5)}
    updates = {"w": jnp.full((3, 2), 0.25)}
    target = updates if where == "update" else params
    target["w"] = target["w"].at[0, 0].set(bad)
    u, _ = tx.update(updates, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, u)["w"])
    assert np.isnan(new[0, 0])  # the element itself
    assert np.all(np.isfinite(new[:, 1]))  # the other unit is untouched


@pytest.mark.parametrize(
    "dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64], ids=str
)
def test_next_float_equals_nextafter(dtype: Any, x64: None) -> None:
    # The landing's one step on a float's grid (±1 on the bits) against
    # jnp.nextafter, both directions, a static and a traced direction,
    # over 60 decades, signed zeros and ±1; NaN stays NaN.
    del x64
    rng = np.random.default_rng(0)
    values = rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)
    x = np.concatenate([values, [0.0, -0.0, 1.0, -1.0]])
    v = jnp.asarray(x).astype(dtype)
    finite = np.asarray(jnp.isfinite(v))
    for down in (True, False):
        want = jnp.nextafter(v, jnp.full_like(v, -jnp.inf if down else jnp.inf))
        static = jax.jit(lambda v, down=down: next_float(v, down))(v)
        traced = jax.jit(next_float)(v, jnp.full(v.shape, down))
        expected = np.asarray(want[finite], np.float64)
        for got in (static, traced):
            np.testing.assert_array_equal(np.asarray(got[finite], np.float64), expected)
    assert bool(jnp.isnan(next_float(jnp.asarray(jnp.nan, dtype), True)))


def _landing_reference(p: np.ndarray, x: np.ndarray, t: np.ndarray, bound: bool):
    """The same-dtype landing as specified, in NumPy: one rounding per op."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = t - p
        new = p + v
        if bound:  # kept: onto t; moved: onto the side it came from
            wrong = ((new > t) & (t <= x)) | ((new < t) & (t >= x))
        else:  # to nearest: only where t is p + u itself
            wrong = (t == x) & ((new > t) | (new < t))
        toward = np.where(new > t, -np.inf, np.inf).astype(v.dtype)
        return np.where(wrong, np.nextafter(v, toward), v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
@pytest.mark.parametrize("landing", ["bound", "nearest"])
def test_same_dtype_landing_matches_its_specification(
    dtype: Any, landing: Any, x64: None
) -> None:
    # The landing for params and updates of one dtype steps the bits of
    # ``t - p`` by one where the new parameter misses; against NumPy's
    # nextafter on values over 25 decades, cancellation (u ~ -p), sums on a
    # power of two, moved and kept elements, zeros of both signs, infinities
    # and NaN. (No subnormal values: XLA:CPU flushes them to zero, NumPy does
    # not.)
    del x64
    from norm_optax._numerics import land

    rng = np.random.default_rng(0)
    n = 20_000

    def spread() -> np.ndarray:
        return rng.standard_normal(n) * 10.0 ** rng.uniform(-20, 5, n)

    p, u = spread().astype(dtype), spread().astype(dtype)
    cancel = rng.random(n) < 0.2
    u[cancel] = (-p[cancel] * (1 + 1e-6 * rng.standard_normal(cancel.sum()))).astype(
        dtype
    )
    # Sums on a power of two of either sign, |u| a few times |p| with the
    # opposite sign: there fl(p + fl(x - p)) misses x (u rounded from x - p
    # for a p with more bits than the dtype holds).
    if np.finfo(np.longdouble).nmant <= np.finfo(dtype).nmant:
        pytest.skip("needs a long double wider than the dtype (x86: 80-bit)")
    m = n // 4
    sign = rng.choice([-1.0, 1.0], m)
    more_bits = 1 + rng.uniform(0, 1, m).astype(np.longdouble) * 2.0**-40
    exact_p = -sign * rng.uniform(1e-5, 1e-4, m).astype(np.longdouble) * more_bits
    power = sign * np.exp2(rng.integers(-14, -9, m).astype(np.longdouble))
    p[:m], u[:m] = exact_p.astype(dtype), (power - exact_p).astype(dtype)
    special = rng.integers(0, 40, n)
    for code, value in enumerate([0.0, -0.0, np.inf, -np.inf, np.nan]):
        p[special == code] = value
        u[special == code + 5] = value
    with np.errstate(invalid="ignore", over="ignore"):
        x = (p + u).astype(dtype)
    scale = rng.uniform(0.5, 1.0, n).astype(dtype)
    t = np.where(rng.random(n) < 0.5, x, np.clip(x, -0.1, 0.1) * scale).astype(dtype)
    t[rng.random(n) < 0.05] = 0.0
    tiny = np.finfo(dtype).tiny
    for a in (p, u, x, t):
        assert not np.any((a != 0) & (np.abs(a) < tiny))  # no subnormals
    want = _landing_reference(p, x, t, landing == "bound")
    args = [jnp.asarray(a) for a in (p, u, x, t)]
    got = np.asarray(jax.jit(lambda p, u, x, t: land(p, u, x, t, landing))(*args))
    bits = f"u{got.itemsize}"
    with np.errstate(invalid="ignore"):
        corrected = (want != t - p) & ~np.isnan(want)
        naive = p + (t - p)
    for side in (naive > t, naive < t):  # corrections both ways are checked
        assert np.count_nonzero(corrected & side) > 0
    np.testing.assert_array_equal(got.view(bits), want.view(bits))
