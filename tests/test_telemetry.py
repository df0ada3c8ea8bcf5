"""Per-layer norm statistics (API.md section 9): record_layer_norms, layer_norms_dict.

References are computed in float64 NumPy, layer by layer. The battery case
(``tests/cases.py``) adds jit/vmap/dtype/inject_hyperparams checks; the
8-device checks (same numbers sharded, no all-gather, one all-reduce however
many leaves) are in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import norm_optax as nox

FIELDS = ("input_norms", "output_norms", "param_norms", "update_ratios")


def _tree(seed: int, scale: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shapes = {
        "layers": {"kernel": (4, 3, 5), "bias": (4, 5)},
        "head": {"kernel": (5, 2), "bias": (2,)},
    }
    tree = jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    return {**tree, "step": jnp.asarray(3, jnp.int32), "frozen": None}


def _ref_norms(tree: Any, stacks: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-layer float64 norms, keyed by path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(k.key) for k in path)
        x = np.asarray(leaf, np.float64)
        if not np.issubdtype(np.asarray(leaf).dtype, np.floating):
            continue
        s = stacks.get(name, 0)
        out[name] = np.sqrt(np.sum(x**2, axis=tuple(range(s, x.ndim))))
    return out


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


STACKS = {"layers/kernel": 1, "layers/bias": 1}
STACK_FORMS = {
    "tree": {
        "layers": {"kernel": 1, "bias": 1},
        "head": {"kernel": 0, "bias": 0},
        "step": 0,
        "frozen": None,
    },
    "callable": nox.masks.by_path("^layers/"),
}


@pytest.mark.parametrize("form", sorted(STACK_FORMS))
def test_per_layer_norms_match_float64_reference(form: str) -> None:
    grads, params = _tree(0), _tree(1, scale=0.5)
    tx = nox.record_layer_norms(
        nox.clip_by_global_norm(1.0), stack_axes=STACK_FORMS[form]
    )
    out, state = tx.update(grads, tx.init(params), params)
    want_in = _ref_norms(grads, STACKS)
    want_out = _ref_norms(out, STACKS)
    want_p = _ref_norms(params, STACKS)
    for field, want in [
        ("input_norms", want_in),
        ("output_norms", want_out),
        ("param_norms", want_p),
        ("update_ratios", {k: want_out[k] / want_p[k] for k in want_p}),
    ]:
        got = getattr(state, field)
        assert got["step"] is None
        assert got["frozen"] is None
        flat = _flat(got)
        assert set(flat) == set(want)
        for name, value in want.items():
            assert flat[name].dtype == np.float32
            assert flat[name].shape == value.shape, (field, name)
            np.testing.assert_allclose(flat[name], value, rtol=1e-6)
    for field, tree in [("input_norm", grads), ("output_norm", out)]:
        total = math.sqrt(
            sum(float(np.sum(v**2)) for v in _ref_norms(tree, {}).values())
        )
        value = optax.tree.get(state, field)
        assert value.shape == ()
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, total, rtol=1e-6)


def test_int_stack_axes_and_two_stack_axes() -> None:
    grads = {"a": jnp.arange(24.0).reshape(2, 3, 4), "b": jnp.ones((2, 5))}
    state = nox.record_layer_norms(optax.identity(), stack_axes=1).update(
        grads, nox.record_layer_norms(optax.identity(), stack_axes=1).init(grads)
    )[1]
    np.testing.assert_allclose(
        state.input_norms["a"], np.sqrt(np.sum(np.arange(24.0).reshape(2, 12) ** 2, 1))
    )
    np.testing.assert_allclose(state.input_norms["b"], [math.sqrt(5)] * 2)
    tx = nox.record_layer_norms(optax.identity(), stack_axes={"a": 2, "b": 1})
    state = tx.update(grads, tx.init(grads))[1]
    want = np.sqrt(np.sum(np.arange(24.0).reshape(2, 3, 4) ** 2, axis=2))
    np.testing.assert_allclose(state.input_norms["a"], want, rtol=1e-6)
    logged = nox.layer_norms_dict(state.input_norms, prefix="g/")
    assert list(logged) == [f"g/a/{i}/{j}" for i in range(2) for j in range(3)] + [
        "g/b/0",
        "g/b/1",
    ]
    assert logged["g/a/1/2"] == pytest.approx(want[1, 2], rel=1e-6)
    with pytest.raises(ValueError, match="b"):
        nox.record_layer_norms(optax.identity(), stack_axes=3).init(grads)


def test_init_gives_zeros_of_the_recorded_shapes_and_dtypes() -> None:
    params = _tree(1)
    tx = nox.record_layer_norms(nox.zclip(), stack_axes=STACK_FORMS["callable"])
    init = tx.init(params)
    for field in FIELDS:
        tree = getattr(init, field)
        assert tree["frozen"] is None
        assert tree["step"] is None
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))
    assert float(init.input_norm) == 0.0
    assert float(init.output_norm) == 0.0
    _, state = tx.update(_tree(0), init, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(init, state)
    assert state.input_norms["layers"]["kernel"].shape == (4,)
    assert state.input_norms["head"]["kernel"].shape == ()


def test_without_params_param_norms_and_ratios_are_nan() -> None:
    grads = _tree(0)
    tx = nox.record_layer_norms(nox.clip_by_global_norm(1.0), stack_axes=1)
    _, state = tx.update(grads, tx.init(grads))
    for field in ("param_norms", "update_ratios"):
        leaves = jax.tree.leaves(getattr(state, field))
        assert leaves
        assert all(bool(jnp.all(jnp.isnan(x))) for x in leaves)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(grads))
    assert all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.input_norms)
    )


def test_nan_and_inf_in_one_layer_show_only_there() -> None:
    grads = _tree(0)
    kernel = grads["layers"]["kernel"].at[2, 0, 0].set(jnp.nan)
    bias = grads["layers"]["bias"].at[1, 3].set(jnp.inf)
    bad = {**grads, "layers": {"kernel": kernel, "bias": bias}}
    tx = nox.record_layer_norms(optax.identity(), stack_axes=STACK_FORMS["callable"])
    _, clean = tx.update(grads, tx.init(grads), grads)
    _, state = tx.update(bad, tx.init(grads), grads)
    got_k = np.asarray(state.input_norms["layers"]["kernel"])
    got_b = np.asarray(state.input_norms["layers"]["bias"])
    assert np.isnan(got_k[2])
    assert np.isposinf(got_b[1])
    clean_k = np.asarray(clean.input_norms["layers"]["kernel"])
    clean_b = np.asarray(clean.input_norms["layers"]["bias"])
    np.testing.assert_array_equal(np.delete(got_k, 2), np.delete(clean_k, 2))
    np.testing.assert_array_equal(np.delete(got_b, 1), np.delete(clean_b, 1))
    chex.assert_trees_all_equal(state.input_norms["head"], clean.input_norms["head"])
    assert np.isnan(state.input_norm)
    assert np.isnan(state.output_norm)
    assert np.isnan(state.update_ratios["layers"]["kernel"][2])
    assert np.isposinf(state.update_ratios["layers"]["bias"][1])
    assert np.isnan(nox.layer_norms_dict(state.input_norms)["layers/kernel/2"])


def test_bfloat16_layers_far_outside_float32_squares_range() -> None:
    # bfloat16 values below 1e-19 or above 1.8e19 have squares outside
    # float32's range: those layers get the rescaled pass of the norms, so
    # each norm matches float64 and the global one equals nox.global_norm.
    rng = np.random.default_rng(0)
    scales = np.array([1e-25, 1.0, 1e25, 1e-30])[:, None, None]
    kernel = jnp.asarray(scales * rng.normal(size=(4, 3, 5)), jnp.bfloat16)
    head = jnp.asarray(1e-22 * rng.normal(size=(5, 2)), jnp.bfloat16)
    grads = {"layers": {"kernel": kernel}, "head": head}
    tx = nox.record_layer_norms(optax.identity(), stack_axes={"layers": 1, "head": 0})
    _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
    k64 = np.asarray(kernel, np.float64)
    want = {
        "layers/kernel": np.sqrt(np.sum(k64**2, axis=(1, 2))),
        "head": np.sqrt(np.sum(np.asarray(head, np.float64) ** 2)),
    }
    for field in ("input_norms", "param_norms"):
        got = _flat(getattr(state, field))
        assert set(got) == set(want)
        for name, value in want.items():
            assert np.all(value > 0)
            assert np.all(np.isfinite(value))
            np.testing.assert_allclose(got[name], value, rtol=1e-5)
    np.testing.assert_allclose(state.input_norm, nox.global_norm(grads), rtol=1e-6)
    # Tiny layers alone (the global sum of squares underflows too).
    tiny = jax.tree.map(lambda x: (x * 1e-20).astype(jnp.bfloat16), grads)
    tiny["layers"]["kernel"] = tiny["layers"]["kernel"].at[2].set(1e-20)
    _, state = tx.update(tiny, tx.init(tiny), tiny)
    total = float(state.input_norm)
    assert total > 0
    np.testing.assert_allclose(total, nox.global_norm(tiny), rtol=1e-6)


def test_update_ratio_rule() -> None:
    # Six layers of one row each: (output norm, param norm) =
    # (0, 0) -> 0, (1, 0) -> inf, (1, nan) -> nan, (nan, 1) -> nan,
    # (1, inf) -> nan, (2, 4) -> 0.5.
    updates = {"w": jnp.array([[0.0], [1.0], [1.0], [jnp.nan], [1.0], [2.0]])}
    params = {"w": jnp.array([[0.0], [0.0], [jnp.nan], [1.0], [jnp.inf], [4.0]])}
    tx = nox.record_layer_norms(optax.identity(), stack_axes=1)
    _, state = tx.update(updates, tx.init(params), params)
    got = np.asarray(state.update_ratios["w"])
    np.testing.assert_array_equal(got, [0.0, np.inf, np.nan, np.nan, np.nan, 0.5])
    assert got.dtype == np.float32


def test_inner_type_error_names_the_argument() -> None:
    with pytest.raises(TypeError, match="inner"):
        nox.record_layer_norms(optax.adam)


@pytest.mark.standard_promotion  # optax.contrib, as users run it
def test_extra_keyword_arguments_reach_inner() -> None:
    params = {"w": jnp.ones(3)}
    tx = nox.record_layer_norms(optax.contrib.reduce_on_plateau(patience=0))
    state = tx.init(params)
    for value in (1.0, 2.0, 3.0):  # a worse loss each step: the scale drops
        _, state = tx.update(params, state, params, value=jnp.float32(value))
    assert float(optax.tree.get(state, "scale")) < 1.0


@pytest.mark.standard_promotion  # optax's optimizers, as users run them
def test_scan_training_loop_in_a_chain_with_stateful_inner() -> None:
    """Inside ``optax.chain``, under jit and lax.scan: output bit for bit."""
    params = {k: v for k, v in _tree(1, 0.5).items() if k not in ("step", "frozen")}
    target = {k: v for k, v in _tree(2).items() if k not in ("step", "frozen")}

    def loss(p: Any) -> jax.Array:
        sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, target)
        return sum(jax.tree.leaves(sq), start=jnp.zeros(()))

    inner = optax.chain(nox.zclip(warmup_steps=2), optax.adamw(1e-2))
    recorded = optax.chain(
        nox.record_layer_norms(inner, stack_axes=STACK_FORMS["callable"]),
        optax.identity(),
    )

    def train(tx: optax.GradientTransformation) -> tuple[Any, Any]:
        def step(carry: Any, _: Any) -> tuple[Any, Any]:
            p, state = carry
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            norms = optax.tree.get(state, "input_norms", default=None)
            return (optax.apply_updates(p, updates), state), norms

        return jax.lax.scan(step, (params, tx.init(params)), length=4)

    (plain_params, _), _ = jax.jit(train, static_argnums=0)(inner)
    (got_params, state), history = jax.jit(train, static_argnums=0)(recorded)
    chex.assert_trees_all_equal(got_params, plain_params)
    assert history["layers"]["kernel"].shape == (4, 4)  # steps x layers
    assert optax.tree.get(state, "output_norms")["layers"]["bias"].shape == (4,)
    ratios = optax.tree.get(state, "update_ratios")
    assert all(bool(jnp.all((x > 0) & (x < 1))) for x in jax.tree.leaves(ratios))
    np.testing.assert_allclose(
        history["head"]["kernel"][0],
        np.linalg.norm(
            2
            * (
                np.asarray(params["head"]["kernel"])
                - np.asarray(target["head"]["kernel"])
            )
        ),
        rtol=1e-5,
    )


def test_layer_norms_dict_keys_and_values() -> None:
    tree = {
        "layers": {"kernel": jnp.array([0.5, jnp.nan]), "scale": None},
        "head": jnp.float32(2.0),
    }
    got = nox.layer_norms_dict(tree, prefix="stats/")
    assert list(got) == ["stats/head", "stats/layers/kernel/0", "stats/layers/kernel/1"]
    assert all(type(v) is float for v in got.values())
    assert got["stats/head"] == 2.0
    assert got["stats/layers/kernel/0"] == 0.5
    assert math.isnan(got["stats/layers/kernel/1"])
    assert nox.layer_norms_dict({"a": 1.0}) == {"a": 1.0}
    assert nox.layer_norms_dict({}, prefix="x") == {}


def test_heatmap_helper_draws_a_real_figure(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from norm_optax.plotting import layer_norms_heatmap, layer_rows

    history = {  # 6 steps; layer 1 of the stack turns NaN at step 5
        "embed": np.linspace(1.0, 2.0, 6),
        "layers": np.stack([np.full(3, 0.5 + t) for t in range(6)]),
    }
    history["layers"][4:, 1] = np.nan
    names, values = layer_rows(history)
    assert names == ["embed", "layers/0", "layers/1", "layers/2"]
    assert values.shape == (4, 6)
    image = layer_norms_heatmap(history, title="gradient norm")
    shown = image.get_array()
    assert shown is not None
    assert shown.shape == (4, 6)
    assert np.ma.getmaskarray(shown).sum() == 2  # the NaNs, drawn in red
    ax = image.axes
    assert ax.get_title() == "gradient norm"
    assert ax.get_xlabel() == "step"
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    path = tmp_path / "heatmap.png"
    figure = ax.get_figure(root=True)
    assert figure is not None
    figure.savefig(path, dpi=120)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="steps axis"):
        layer_rows({"a": np.float32(1.0)})


@pytest.mark.standard_promotion  # flax and optax, as users run them
def test_nnx_optimizer_with_stack_axes_from_partitions() -> None:
    from flax import nnx

    from tests.test_layouts import L, _stacked_nnx

    model = _stacked_nnx()  # L blocks by nnx.vmap (partition name "layers"), a head
    stack = nox.masks.stack_axes_from_partitions(nnx.state(model, nnx.Param))
    tx = nox.record_layer_norms(optax.sgd(0.1), stack_axes=stack)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((3, 4))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    norms = nox.layer_norms_dict(optax.tree.get(optimizer.opt_state, "input_norms"))
    assert {k for k in norms if k.startswith("blocks/linear/kernel")} == {
        f"blocks/linear/kernel/{i}" for i in range(L)
    }
    assert "head/kernel" in norms
    want = np.linalg.norm(np.asarray(grads["blocks"]["linear"]["kernel"][...][1]))
    assert norms["blocks/linear/kernel/1"] == pytest.approx(float(want), rel=1e-6)
