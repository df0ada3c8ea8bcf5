"""Mask selectors (API.md 2.4, 5) on dicts, FrozenDict and nnx.State."""

from __future__ import annotations

import inspect
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict, freeze

import norm_optax as nox
from norm_optax import masks
from tests.cases import CASES, Case, make_tree


def _nested() -> dict[str, Any]:
    return {
        "encoder": {
            "layers": [
                {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
                {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
            ],
            "norm": {"scale": jnp.ones(3)},
        },
        "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
        "step": jnp.asarray(0, jnp.int32),
        "frozen": None,
    }


class _Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.encoder = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.norm(self.encoder(x))))


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(mask: Any) -> dict[str, bool]:
    """The mask as ``{"a/b/0/kernel": bool}``, the paths ``by_path`` matches."""
    leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
    paths = [[_key(k) for k in path] for path, _ in leaves]
    # ... without NNX's trailing ``value``.
    paths = [p[:-1] if p and p[-1] == "value" else p for p in paths]
    return {"/".join(p): leaf for p, (_, leaf) in zip(paths, leaves, strict=True)}


# --------------------------------------------------------------------------
# The selectors on a nested dict.
# --------------------------------------------------------------------------


def test_matrices_only_marks_ndim_at_least_two() -> None:
    params = _nested()
    mask = masks.matrices_only(params)
    chex.assert_trees_all_equal_structs(mask, params)
    assert _flat(mask) == {
        "encoder/layers/0/bias": False,
        "encoder/layers/0/kernel": True,
        "encoder/layers/1/bias": False,
        "encoder/layers/1/kernel": True,
        "encoder/norm/scale": False,
        "head/bias": False,
        "head/kernel": True,
        "step": False,
    }
    assert all(type(b) is bool for b in jax.tree.leaves(mask))  # usable by optax.masked


def test_by_path_searches_the_slash_joined_path() -> None:
    params = _nested()
    assert _flat(masks.by_path(r"layers/0/")(params)) == {
        k: k.startswith("encoder/layers/0/") for k in _flat(masks.matrices_only(params))
    }
    kernels = _flat(masks.by_path(r"kernel$")(params))
    assert {k for k, v in kernels.items() if v} == {
        "encoder/layers/0/kernel",
        "encoder/layers/1/kernel",
        "head/kernel",
    }
    # re.search, not re.match: an unanchored pattern matches anywhere.
    assert _flat(masks.by_path("norm")(params))["encoder/norm/scale"] is True
    assert not any(_flat(masks.by_path("^norm")(params)).values())


def test_exclude_path_is_the_negation() -> None:
    params = _nested()
    included = _flat(masks.by_path(r"^head/")(params))
    excluded = _flat(masks.exclude_path(r"^head/")(params))
    assert included.keys() == excluded.keys()
    assert all(excluded[k] == (not v) for k, v in included.items())


def test_all_of_combines_trees_callables_and_prefixes() -> None:
    params = _nested()
    prefix = {"encoder": True, "head": False, "step": True, "frozen": True}
    combined = masks.all_of(masks.matrices_only, masks.exclude_path("layers/1"), prefix)
    assert {k for k, v in _flat(combined(params)).items() if v} == {
        "encoder/layers/0/kernel"
    }
    assert all(jax.tree.leaves(masks.all_of()(params)))
    tree = masks.matrices_only(params)
    assert masks.all_of(tree)(params) == tree


def test_all_of_mismatched_mask_names_both_structures() -> None:
    with pytest.raises(ValueError, match=r"(?s)updates: PyTreeDef.*mask: PyTreeDef"):
        masks.all_of({"a": True, "b": False})(_nested())


def test_bad_pattern_raises() -> None:
    with pytest.raises(re.error):
        masks.by_path("(unclosed")


# --------------------------------------------------------------------------
# FrozenDict and nnx.State.
# --------------------------------------------------------------------------


def test_frozendict_params() -> None:
    params = freeze({"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
    for selector in (
        masks.matrices_only,
        masks.by_path("kernel"),
        masks.exclude_path("bias"),
        masks.all_of(masks.matrices_only, masks.by_path("dense")),
    ):
        mask = selector(params)
        assert isinstance(mask, FrozenDict)
        chex.assert_trees_all_equal_structs(mask, params)
        assert _flat(mask) == {"dense/bias": False, "dense/kernel": True}
    tx = nox.add_l2_decay(1.0, mask=masks.by_path("kernel"))
    grads = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["dense"]["kernel"], 1.0)
    np.testing.assert_array_equal(out["dense"]["bias"], 0.0)


@pytest.mark.parametrize("pure", [False, True], ids=["state", "pure_state"])
def test_nnx_state_params(pure: bool) -> None:
    state = nnx.state(_Model(nnx.Rngs(0)), nnx.Param)
    params = nnx.as_pure(state) if pure else state
    expected = {
        "encoder/bias": False,
        "encoder/kernel": True,
        "head/bias": False,
        "head/kernel": True,
        "norm/bias": False,
        "norm/scale": False,
    }
    for selector, want in (
        (masks.matrices_only, expected),
        (
            masks.by_path(r"^encoder/kernel$"),
            {k: k == "encoder/kernel" for k in expected},
        ),
        (masks.exclude_path("^head"), {k: not k.startswith("head") for k in expected}),
        (
            masks.all_of(masks.matrices_only, masks.exclude_path("^head")),
            {k: k == "encoder/kernel" for k in expected},
        ),
    ):
        mask = selector(params)
        # Plain bools at the array leaves, boxed state or not (the params
        # nnx.Optimizer passes to tx.update are nnx.as_pure of the state).
        chex.assert_trees_all_equal_structs(mask, nnx.as_pure(state))
        assert all(type(m) is bool for m in jax.tree.leaves(mask))
        assert _flat(mask) == want  # no trailing "value" in the paths


@pytest.mark.standard_promotion
def test_nnx_optimizer_with_masked_decay() -> None:
    model = _Model(nnx.Rngs(0))
    decay = 1e-1
    tx = optax.chain(
        optax.adam(1e-2), nox.add_l2_decay(decay, mask=nox.masks.matrices_only)
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)

    def loss_fn(model: _Model) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    grads = nnx.grad(loss_fn)(model)
    updates = optimizer.update(model, grads)
    # The same step with plain optax on the pure arrays.
    pure_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
    adam_updates, _ = optax.adam(1e-2).update(
        pure_grads, optax.adam(1e-2).init(before), before
    )
    want = jax.tree.map(
        lambda u, p: u + decay * p if p.ndim >= 2 else u, adam_updates, before
    )
    chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-8)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    chex.assert_trees_all_close(
        after, optax.apply_updates(before, want), rtol=1e-6, atol=1e-8
    )


@pytest.mark.standard_promotion
def test_optax_masked_accepts_the_selectors() -> None:
    params = _nested()
    params.pop("frozen")
    tx = optax.masked(optax.set_to_zero(), masks.by_path("^head/"))
    out, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(out["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(out["encoder"]["layers"][0]["kernel"], 1.0)


# --------------------------------------------------------------------------
# Every transform that reads params leaves masked-out leaves unchanged.
# --------------------------------------------------------------------------

PARAM_CASES = [
    c
    for c in CASES
    if "mask" in inspect.signature(c.factory).parameters and "mask" not in c.kwargs
]


@pytest.mark.parametrize("case", PARAM_CASES, ids=str)
@pytest.mark.parametrize(
    "as_callable", [False, True], ids=["tree_mask", "callable_mask"]
)
def test_masked_out_leaves_pass_unchanged(case: Case, as_callable: bool) -> None:
    updates, params = make_tree(0), make_tree(100, scale=1.0)
    prefix = {
        "dense": False,
        "conv": True,
        "scale": False,
        "step": True,
        "frozen": True,
    }
    mask = (lambda p: prefix) if as_callable else prefix
    tx = case.make(mask=mask)
    out, _ = tx.update(updates, tx.init(params), params)
    assert out["dense"]["kernel"] is updates["dense"]["kernel"]
    assert out["dense"]["bias"] is updates["dense"]["bias"]
    assert out["scale"] is updates["scale"]
    # ... while the selected leaf changes, as without a mask.
    assert not np.allclose(out["conv"]["kernel"], updates["conv"]["kernel"])
    plain = case.make()
    unmasked, _ = plain.update(updates, plain.init(params), params)
    if case.factory not in (nox.project_l1_ball, nox.project_l2_ball):
        # Leafwise transforms: the selected leaf is as without a mask.
        chex.assert_trees_all_close(out["conv"], unmasked["conv"], rtol=1e-6)


# --------------------------------------------------------------------------
# Issue 17: a selector used as a schedule, boxed NNX states, mask values.
# --------------------------------------------------------------------------

_INJECTED = {
    "add_l2_decay_matrices_only": lambda: optax.inject_hyperparams(nox.add_l2_decay)(
        coeff=0.1, mask=masks.matrices_only
    ),
    "max_norm_by_path": lambda: optax.inject_hyperparams(nox.max_norm)(
        max_value=1.0, mask=masks.by_path("kernel")
    ),
    "max_norm_exclude_path": lambda: optax.inject_hyperparams(nox.max_norm)(
        max_value=1.0, mask=masks.exclude_path("bias")
    ),
    "max_norm_all_of": lambda: optax.inject_hyperparams(nox.max_norm)(
        max_value=1.0, mask=masks.all_of(masks.matrices_only)
    ),
    "max_norm_stack_axes_by_path": lambda: optax.inject_hyperparams(nox.max_norm)(
        max_value=1.0, stack_axes=masks.by_path("layers")
    ),
    "max_norm_stack_axes_from_partitions": lambda: optax.inject_hyperparams(
        nox.max_norm
    )(max_value=1.0, stack_axes=masks.stack_axes_from_partitions()),
}


@pytest.mark.parametrize("name", sorted(_INJECTED))
def test_callable_spec_not_in_static_args_raises_at_init(name: str) -> None:
    # inject_hyperparams calls it with the step count: it would select nothing.
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
    tx = _INJECTED[name]()
    argument = "stack_axes" if "stack_axes" in name else "mask"
    with pytest.raises(TypeError, match=rf"{argument}.*static_args") as info:
        tx.init(params)
    assert f"list {argument!r}" in str(info.value) or "'stack_axes'" in str(info.value)


@pytest.mark.standard_promotion
def test_callable_mask_in_static_args_decays_the_matrices() -> None:
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
    tx = optax.inject_hyperparams(nox.add_l2_decay, static_args=("mask",))(
        coeff=0.1, mask=masks.matrices_only
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(out["kernel"], 0.1)
    np.testing.assert_array_equal(out["bias"], 0.0)


@pytest.mark.parametrize(
    "count",
    [0, np.int32(3), jnp.asarray(5, jnp.int32)],
    ids=["int", "numpy", "jax"],
)
def test_selectors_given_a_step_count_raise(count: Any) -> None:
    for selector in (
        masks.matrices_only,
        masks.by_path("kernel"),
        masks.exclude_path("bias"),
        masks.all_of(masks.matrices_only),
        masks.matrices_only(stack_axes=1),
    ):
        with pytest.raises(TypeError, match=r"list 'mask'.*in static_args"):
            selector(count)
    with pytest.raises(TypeError, match=r"list 'stack_axes' in static_args"):
        masks.stack_axes_from_partitions(count)
    # Traced, as in update under jit.
    with pytest.raises(TypeError, match=r"static_args"):
        jax.jit(masks.matrices_only)(count)


@pytest.mark.parametrize("argument", ["mask", "axis", "stack_axes"])
def test_a_bare_array_spec_says_to_list_it_in_static_args(argument: str) -> None:
    # What inject_hyperparams makes of a number not in static_args.
    value = {"mask": jnp.asarray(0.5), "axis": jnp.asarray(0), "stack_axes": 1}
    tx = optax.inject_hyperparams(nox.max_norm)(
        max_value=1.0, **{argument: value[argument]}
    )
    params = {"kernel": jnp.ones((2, 2, 3))}
    with pytest.raises(TypeError, match=rf"{argument} is structural.*static_args"):
        tx.init(params)


def _boxed_model_state() -> tuple[_Model, Any]:
    model = _Model(nnx.Rngs(0))
    return model, nnx.state(model, nnx.Param)


@pytest.mark.standard_promotion
def test_mask_tree_from_a_boxed_state_works_inside_nnx_optimizer() -> None:
    model, state = _boxed_model_state()
    before = nnx.as_pure(state)
    mask = masks.matrices_only(state)  # a tree, computed once from the boxes
    assert all(type(m) is bool for m in jax.tree.leaves(mask))
    decay = 0.1
    tx = optax.chain(
        optax.adamw(1e-2, weight_decay=decay, mask=mask),
        nox.add_l2_decay(decay, mask=mask),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((3, 4), jnp.float32)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    updates = optimizer.update(model, grads)
    # The same step with plain optax on the pure arrays and a hand-made mask.
    want_mask = jax.tree.map(lambda p: p.ndim >= 2, before)
    plain = optax.adamw(1e-2, weight_decay=decay, mask=want_mask)
    pure_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
    adamw, _ = plain.update(pure_grads, plain.init(before), before)
    want = jax.tree.map(
        lambda u, p, m: u + decay * p if m else u, adamw, before, want_mask
    )
    chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-8)


def test_a_boxed_mask_tree_names_the_fix() -> None:
    model, state = _boxed_model_state()
    boxed = jax.tree.map(lambda p: p.ndim >= 2, state)  # Param(value=...) leaves
    optimizer = nnx.Optimizer(model, nox.add_l2_decay(0.1, mask=boxed), wrt=nnx.Param)
    grads = jax.tree.map(jnp.zeros_like, state)
    with pytest.raises(ValueError, match=r"Flax variable boxes.*norm_optax.masks"):
        optimizer.update(model, grads)


@pytest.mark.parametrize(
    "mask",
    [
        {"kernel": jnp.array(True), "bias": jnp.array(False)},
        {"kernel": 1, "bias": 0},
        {"kernel": np.int32(1), "bias": np.bool_(False)},
        {"kernel": jnp.array(1), "bias": jnp.array(0)},
    ],
    ids=["jax_bools", "ints", "numpy", "jax_ints"],
)
def test_mask_values_optax_accepts(mask: Any) -> None:
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    ours = nox.add_l2_decay(1.0, mask=mask)
    theirs = optax.add_decayed_weights(1.0, mask=mask)
    out, _ = ours.update(zeros, ours.init(params), params)
    want, _ = theirs.update(zeros, theirs.init(params), params)
    chex.assert_trees_all_equal(out, want)
    np.testing.assert_array_equal(out["kernel"], 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask": {"kernel": 2, "bias": 0}}, r"mask must be True or False.*got 2"),
        ({"mask": {"kernel": 0.5, "bias": 0}}, r"mask must be True or False.*0\.5"),
        ({"stack_axes": 1.0}, r"stack_axes must be an int >= 0.*got 1\.0"),
        ({"stack_axes": {"kernel": 1.5, "bias": 0}}, r"got 1\.5 .*at kernel"),
        ({"axis": 1.0}, r"axis must be None, an int.*got 1\.0"),
    ],
    ids=["int_2", "float_mask", "float_stack", "float_stack_leaf", "float_axis"],
)
def test_a_wrong_value_says_what_is_expected(kwargs: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        nox.max_norm(1.0, **kwargs)  # at construction
