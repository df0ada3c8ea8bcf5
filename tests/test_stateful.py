"""The stateful companions of API.md section 5, step by step against NumPy.

Each rule is re-implemented in plain float64 NumPy (``_Ref*`` below) and
driven over one sequence of norms with spikes, a NaN and an infinity; the
transform's output and state must follow it at every step. Then: ring-buffer
wrap-around, ``optax.tree.get`` on ``record_norms``, small training runs
with an injected gradient spike, and errors. What every transform shares (no
recompilation, dtypes, skipped leaves, ``inject_hyperparams``,
meta-gradients) is in the battery (``test_battery.py`` over ``cases.py``);
ZClip has its own module, ``test_zclip.py``, against the authors' code.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox

_SHAPES = {"a": (3,), "b": (2, 4)}


def _tree_with_norm(norm: float, seed: int, dtype: Any = jnp.float32) -> Any:
    """A tree of the given global L2 norm (NaN/inf: one element set to it)."""
    rng = np.random.default_rng(seed)
    tree = {k: rng.normal(size=s) for k, s in _SHAPES.items()}
    total = math.sqrt(sum(float(np.sum(x**2)) for x in tree.values()))
    if math.isfinite(norm):
        tree = {k: x * (norm / total) for k, x in tree.items()}
    else:
        tree["b"][1, 2] = norm
    return {k: jnp.asarray(x, dtype) for k, x in tree.items()}


def _np_norm(tree: Any) -> float:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return math.sqrt(sum(float(np.sum(x**2)) for x in leaves))


def _sequence(n: int, seed: int) -> list[float]:
    """Log-normal norms around 1 with spikes, a NaN and an infinity."""
    rng = np.random.default_rng(seed)
    norms = list(np.exp(rng.normal(0.0, 0.3, size=n)))
    for i, factor in ((3, 40.0), (n // 2, 1e3), (n // 2 + 1, 30.0), (n - 3, 1e2)):
        norms[i] *= factor
    norms[n // 3] = math.nan
    norms[2 * n // 3] = math.inf
    return [float(x) for x in norms]


def _assert_scaled(out: Any, updates: Any, scale: float) -> None:
    """``out == scale * updates`` (every element NaN for a NaN scale)."""
    for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(updates), strict=True):
        got = np.asarray(got, np.float64)
        if math.isnan(scale):
            assert np.all(np.isnan(got)), got
        else:
            np.testing.assert_allclose(
                got, scale * np.asarray(x, np.float64), rtol=2e-5, atol=1e-30
            )


def _jitted(tx: optax.GradientTransformation) -> Any:
    """``tx.update`` under jit; fails if traced more than once."""
    chex.clear_trace_counter()
    return jax.jit(chex.assert_max_traces(tx.update, n=1))


# ---------------------------------------------------------------------------
# Plain NumPy references, float64.
# ---------------------------------------------------------------------------


class _RefAutoClip:
    def __init__(self, percentile: float, history: int) -> None:
        self.p = percentile
        self.norms: collections.deque[float] = collections.deque(maxlen=history)

    def step(self, x: float) -> float:
        if not math.isfinite(x):
            return math.nan
        self.norms.append(x)
        threshold = float(np.percentile(list(self.norms), self.p))
        return min(1.0, threshold / x)


class _RefSkip:
    def __init__(self, window: int, k: float) -> None:
        self.k = k
        self.norms: collections.deque[float] = collections.deque(maxlen=window)
        self.skipped = 0

    def step(self, x: float) -> bool:
        """Whether the step is skipped."""
        if len(self.norms) == self.norms.maxlen:
            limit = np.mean(self.norms) + self.k * np.std(self.norms)
            if not x <= limit:
                self.skipped += 1
                return True
        if math.isfinite(x):
            self.norms.append(x)
        return False


def _ring(values: list[float], size: int) -> np.ndarray:
    """The ring buffer holding the last ``size`` of ``values``, in slot order."""
    ring = np.zeros(size)
    for i, v in enumerate(values):
        ring[i % size] = v
    return ring


# ---------------------------------------------------------------------------
# record_norms.
# ---------------------------------------------------------------------------


def _scale_by_value() -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by the extra argument ``value`` and the params."""

    def update(
        updates: Any, state: Any, params: Any = None, *, value: Any = 1.0
    ) -> tuple[Any, Any]:
        out = jax.tree.map(lambda u, p: u * p * value, updates, params)
        return out, state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def test_record_norms_values_params_and_extra_args() -> None:
    g = _tree_with_norm(5.0, seed=0)
    params = jax.tree.map(lambda x: jnp.full_like(x, 2.0), g)
    tx = nox.record_norms(_scale_by_value())
    state = tx.init(params)
    assert state.input_norm.dtype == jnp.float32
    assert state.input_norm.shape == ()
    assert float(state.input_norm) == 0.0
    assert float(state.output_norm) == 0.0
    out, state = _jitted(tx)(g, state, params, value=jnp.float32(3.0))
    chex.assert_trees_all_close(out, jax.tree.map(lambda x: 6 * x, g), rtol=1e-6)
    np.testing.assert_allclose(float(state.input_norm), 5.0, rtol=1e-6)
    np.testing.assert_allclose(float(state.output_norm), 30.0, rtol=1e-6)
    assert state.inner_state == optax.EmptyState()


@pytest.mark.standard_promotion
def test_record_norms_readable_with_tree_get_inside_chain() -> None:
    g = _tree_with_norm(10.0, seed=1)
    tx = optax.chain(
        nox.record_norms(nox.clip_by_global_norm(2.0)), optax.sgd(0.1, momentum=0.9)
    )
    state = tx.init(g)
    np.testing.assert_array_equal(optax.tree.get(state, "input_norm"), 0.0)
    for _ in range(2):
        _, state = jax.jit(tx.update)(g, state, g)
    input_norm = optax.tree.get(state, "input_norm")
    output_norm = optax.tree.get(state, "output_norm")
    assert input_norm.dtype == jnp.float32
    np.testing.assert_allclose(float(input_norm), _np_norm(g), rtol=1e-6)
    np.testing.assert_allclose(float(output_norm), 2.0, rtol=1e-6)


def test_record_norms_float64_updates_record_float32(x64: None) -> None:
    del x64
    g = _tree_with_norm(3.0, seed=2, dtype=jnp.float64)
    tx = nox.record_norms(optax.identity())
    out, state = tx.update(g, tx.init(g))
    assert state.input_norm.dtype == jnp.float32
    chex.assert_trees_all_equal(out, g)


# ---------------------------------------------------------------------------
# autoclip.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percentile", "history"), [(25.0, 8), (10.0, 1000), (100.0, 3)]
)
def test_autoclip_follows_numpy_step_by_step(percentile: float, history: int) -> None:
    tx = nox.autoclip(percentile, history)
    update = _jitted(tx)
    ref = _RefAutoClip(percentile, history)
    state = tx.init(None)
    seen: list[float] = []
    for t, target in enumerate(_sequence(30, seed=history)):
        g = _tree_with_norm(target, seed=t)
        x = _np_norm(g)
        out, state = update(g, state)
        _assert_scaled(out, g, ref.step(x))
        if math.isfinite(x):
            seen.append(x)
        assert int(state.num_norms) == min(len(seen), history)
        assert int(state.next_slot) == len(seen) % history
        np.testing.assert_allclose(state.norms, _ring(seen, history), rtol=1e-6)


def test_autoclip_ring_buffer_wraps() -> None:
    tx = nox.autoclip(50.0, history=4)
    state = tx.init(None)
    for step in range(1, 11):
        out, state = tx.update({"w": jnp.array([float(step)])}, state)
        last = list(range(max(1, step - 3), step + 1))
        # The newest norm is the largest: clipped to the median of the last 4.
        np.testing.assert_allclose(out["w"], [np.percentile(last, 50.0)], rtol=1e-6)
    np.testing.assert_array_equal(state.norms, [9.0, 10.0, 7.0, 8.0])
    assert int(state.num_norms) == 4
    assert int(state.next_slot) == 2


@pytest.mark.parametrize("q", [1.0, 10.0, 33.3, 50.0, 90.0, 99.9, 100.0])
def test_threshold_of_partial_buffer_is_numpy_percentile(q: float) -> None:
    """Before the ring fills, the threshold is the percentile of what it holds."""
    rng = np.random.default_rng(int(q * 10))
    norms = rng.exponential(size=9).astype(np.float32)
    tx = nox.autoclip(q, history=16)
    update = _jitted(tx)
    state = tx.init(None)
    for count in range(1, 10):
        # A norm far above the others is clipped to the percentile exactly.
        probe, _ = update({"w": jnp.array([100.0])}, state)
        seen = np.append(norms[: count - 1], 100.0).astype(np.float64)
        want = np.percentile(seen, q)
        np.testing.assert_allclose(float(probe["w"][0]), want, rtol=1e-6)
        _, state = update({"w": jnp.array([norms[count - 1]])}, state)


def test_autoclip_nonfinite_norm_does_not_enter_buffer() -> None:
    tx = nox.autoclip(50.0, history=4)
    state = tx.init(None)
    _, state = tx.update({"w": jnp.array([2.0])}, state)
    out, new_state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    assert bool(jnp.all(jnp.isnan(out["w"])))
    chex.assert_trees_all_equal(new_state, state)
    out, _ = tx.update({"w": jnp.array([jnp.inf])}, new_state)
    assert bool(jnp.isnan(out["w"][0]))


# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# skip_on_spike.
# ---------------------------------------------------------------------------


def test_skip_on_spike_follows_numpy_step_by_step() -> None:
    inner = optax.trace(decay=0.5)
    tx = nox.skip_on_spike(inner, window=6, num_sigma=3.0)
    update = _jitted(tx)
    ref = _RefSkip(6, 3.0)
    g0 = _tree_with_norm(1.0, seed=0)
    state = tx.init(g0)
    norms = _sequence(40, seed=7)
    skips = []
    for t, target in enumerate(norms):
        g = _tree_with_norm(target, seed=200 + t)
        skipped = ref.step(_np_norm(g))
        out, new_state = update(g, state)
        if skipped:
            skips.append(t)
            chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, g))
            chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
        else:
            want, want_inner = inner.update(g, state.inner_state)
            chex.assert_trees_all_equal(out, want)
            chex.assert_trees_all_equal(new_state.inner_state, want_inner)
        assert int(new_state.num_skipped) == ref.skipped
        assert int(new_state.num_norms) == len(ref.norms)
        valid = np.sort(np.asarray(new_state.norms)[: int(new_state.num_norms)])
        np.testing.assert_allclose(valid, np.sort(list(ref.norms)), rtol=1e-6)
        state = new_state
    # The spike during warm-up (step 3) passed; later spikes, NaN (13) and
    # inf (26) included, were skipped.
    assert 3 not in skips
    assert {13, 20, 26, 37} <= set(skips), skips


def test_skip_on_spike_nonfinite_during_warmup_passes_through() -> None:
    tx = nox.skip_on_spike(optax.identity(), window=2, num_sigma=0.0)
    state = tx.init(None)
    for x in (1.0, math.nan, math.inf, 1.0):
        out, state = tx.update({"w": jnp.array([x])}, state)
        np.testing.assert_array_equal(out["w"], [x])  # never skipped in warm-up
    assert int(state.num_norms) == 2
    assert int(state.num_skipped) == 0
    np.testing.assert_array_equal(state.norms, [1.0, 1.0])
    out, state = tx.update({"w": jnp.array([math.nan])}, state)
    np.testing.assert_array_equal(out["w"], [0.0])  # warm now: skipped
    assert int(state.num_skipped) == 1


def test_skip_on_spike_limit_uses_population_std_and_is_strict() -> None:
    tx = nox.skip_on_spike(optax.identity(), window=2, num_sigma=1.0)
    state = tx.init(None)
    for x in (1.0, 3.0):  # mean 2, numpy.std 1: the limit is exactly 3
        _, state = tx.update({"w": jnp.array([x])}, state)
    out, after = tx.update({"w": jnp.array([3.0])}, state)  # not above: kept
    np.testing.assert_array_equal(out["w"], [3.0])
    assert int(after.num_skipped) == 0
    out, after = tx.update({"w": jnp.array([3.2])}, state)  # ddof=1 would keep it
    np.testing.assert_array_equal(out["w"], [0.0])
    assert int(after.num_skipped) == 1
    chex.assert_trees_all_equal(after.norms, state.norms)


def test_record_norms_around_skip_on_spike_sees_skipped_steps() -> None:
    tx = nox.record_norms(nox.skip_on_spike(optax.identity(), window=2))
    state = tx.init(None)
    for x in (1.0, 1.1, 50.0):
        _, state = tx.update({"w": jnp.array([x])}, state)
    np.testing.assert_allclose(float(optax.tree.get(state, "input_norm")), 50.0)
    assert float(optax.tree.get(state, "output_norm")) == 0.0
    assert int(optax.tree.get(state, "num_skipped")) == 1


def test_skip_on_spike_passes_params_and_extra_args() -> None:
    g = _tree_with_norm(1.0, seed=3)
    params = jax.tree.map(lambda x: jnp.full_like(x, 2.0), g)
    tx = nox.skip_on_spike(_scale_by_value(), window=2)
    out, _ = jax.jit(tx.update)(g, tx.init(params), params, value=jnp.float32(3.0))
    chex.assert_trees_all_close(out, jax.tree.map(lambda x: 6 * x, g), rtol=1e-6)


def test_skip_on_spike_under_vmap() -> None:
    tx = nox.skip_on_spike(optax.trace(decay=0.9), window=2, num_sigma=1.0)
    trees = [[_tree_with_norm(x, seed=s) for s in range(3)] for x in (1.0, 1.5, 1e3)]
    g0 = trees[0][0]
    state = jax.vmap(tx.init)(jax.tree.map(lambda *xs: jnp.stack(xs), g0, g0))
    for step in trees:
        batch = jax.tree.map(lambda *xs: jnp.stack(xs[:2]), *step)
        out, state = jax.vmap(tx.update)(batch, state)
    np.testing.assert_array_equal(state.num_skipped, [1, 1])
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(out))


# ---------------------------------------------------------------------------
# Training runs with an injected spike.
# ---------------------------------------------------------------------------


def _linear_problem() -> tuple[Any, Any, jax.Array, Any]:
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    ys = xs @ jnp.array([1.0, -2.0, 0.5]) + 0.3
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}

    def loss(p: Any) -> jax.Array:
        return jnp.mean((xs @ p["w"] + p["b"] - ys) ** 2)

    return params, jax.grad(loss), loss(params), jax.jit(loss)


@pytest.mark.standard_promotion
def test_training_spike_is_skipped_and_adam_state_untouched() -> None:
    params, grad, loss0, loss = _linear_problem()
    tx = nox.skip_on_spike(optax.adam(5e-2), window=8, num_sigma=6.0)
    state = tx.init(params)
    step = _jitted(tx)
    for t in range(40):
        g = grad(params)
        if t == 25:
            g = jax.tree.map(lambda x: x * 1e4, g)
            before = state
        updates, state = step(g, state, params)
        if t == 25:
            chex.assert_trees_all_equal(state.inner_state, before.inner_state)
            assert all(
                float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates)
            )
            mu = optax.tree.get(state, "mu")
            chex.assert_trees_all_equal(mu, optax.tree.get(before, "mu"))
            chex.assert_trees_all_equal(
                optax.tree.get(state, "nu"), optax.tree.get(before, "nu")
            )
        params = optax.apply_updates(params, updates)
    assert int(state.num_skipped) == 1
    assert int(optax.tree.get(state, "count")) == 39  # Adam's own step count
    assert float(loss(params)) < 0.1 * float(loss0)


# ---------------------------------------------------------------------------
# No recompilation, inject_hyperparams, dtypes, errors.
# ---------------------------------------------------------------------------


def test_half_precision_clip_matches_float32() -> None:
    tx = nox.autoclip(50.0, history=4)
    s16, s32 = tx.init(None), tx.init(None)
    for t, x in enumerate([1.0, 2.0, 3.0, 1e3]):
        g32 = _tree_with_norm(x, seed=t)
        g16 = jax.tree.map(lambda a: a.astype(jnp.float16), g32)
        out16, s16 = tx.update(g16, s16)
        out32, s32 = tx.update(jax.tree.map(lambda a: a.astype(jnp.float32), g16), s32)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a: a.astype(jnp.float32), out16), out32, rtol=2e-3
        )


@pytest.mark.standard_promotion
def test_inject_hyperparams_skip_on_spike() -> None:
    g = _tree_with_norm(1.0, seed=0)
    injected = optax.inject_hyperparams(nox.skip_on_spike, static_args=("window",))(
        optax.sgd(1.0), window=2, num_sigma=3.0
    )
    direct = nox.skip_on_spike(optax.sgd(1.0), window=2, num_sigma=3.0)
    s_inj, s_dir = injected.init(g), direct.init(g)
    assert "num_sigma" in s_inj.hyperparams
    for t, x in enumerate([1.0, 1.2, 100.0, 1.1]):  # the third step is a spike
        gt = _tree_with_norm(x, seed=t)
        out_inj, s_inj = jax.jit(injected.update)(gt, s_inj)
        out_dir, s_dir = direct.update(gt, s_dir)
        chex.assert_trees_all_close(out_inj, out_dir, rtol=1e-6)
    assert int(optax.tree.get(s_inj, "num_skipped")) == 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nox.autoclip(percentile=0.0), "percentile"),
        (lambda: nox.autoclip(percentile=100.5), "percentile"),
        (lambda: nox.autoclip(percentile=math.nan), "percentile"),
        (lambda: nox.autoclip(history=0), "history"),
        (lambda: nox.skip_on_spike(optax.sgd(1.0), window=1), "window"),
        (lambda: nox.skip_on_spike(optax.sgd(1.0), num_sigma=-1.0), "num_sigma"),
        (lambda: nox.skip_on_spike(optax.sgd(1.0), num_sigma=math.nan), "num_sigma"),
    ],
)
def test_bad_arguments_raise_value_error(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "got" in str(info.value)


@pytest.mark.parametrize("bad", [2.5, "8", True, None])
def test_sizes_must_be_ints(bad: Any) -> None:
    with pytest.raises(TypeError, match="history"):
        nox.autoclip(history=bad)
    with pytest.raises(TypeError, match="window"):
        nox.skip_on_spike(optax.sgd(1.0), window=bad)


# ---------------------------------------------------------------------------
# Issue 17: a transform where a transform belongs; two record_norms.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name", "hint"),
    [
        (lambda: nox.record_norms(optax.adam), "record_norms", "the function adam"),
        (lambda: nox.skip_on_spike(lambda g: g), "skip_on_spike", "call it"),
        (lambda: nox.record_norms(None), "record_norms", "got None"),
    ],
    ids=["uncalled_factory", "function", "none"],
)
def test_inner_that_is_not_a_transform_raises_type_error(
    make: Any, name: str, hint: str
) -> None:
    with pytest.raises(TypeError, match=rf"{name}: inner must be an optax") as info:
        make()
    assert hint in str(info.value)


@pytest.mark.standard_promotion
def test_two_record_norms_in_one_chain_are_read_by_path() -> None:
    tx = optax.chain(
        nox.record_norms(nox.clip_by_global_norm(1.0)),
        nox.record_norms(optax.sgd(0.1)),
    )
    g = {"w": jnp.array([3.0, 4.0])}
    _, state = jax.jit(tx.update)(g, tx.init(g))
    with pytest.raises(KeyError):
        optax.tree.get(state, "input_norm")  # ambiguous, as optax says
    found = optax.tree.get_all_with_path(state, "input_norm")
    assert [float(v) for _, v in found] == [5.0, 1.0]  # chain order
    # The docstring says how (and its example runs with the doctests).
    doc = nox.record_norms.__doc__ or ""
    assert "optax.tree.get_all_with_path" in doc
    assert "KeyError" in doc
