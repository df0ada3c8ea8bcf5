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
        chex.assert_trees_all_equal_structs(mask, params)
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
