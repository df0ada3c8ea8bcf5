"""Model layouts (API.md section 6): stacked layers and the ``out_first`` layout.

Three parts:

* **The core property**, over a registry of every primitive and transform
  that takes ``stack_axes``: on a stacked tree (a kernel ``(L, in, out)``, a
  bias ``(L, out)``, a conv kernel ``(L, H, W, I, O)``) the result equals the
  same operation applied to each layer's slice on its own (and to
  ``jax.vmap`` over the layers), and ``axis="out_first"`` on the transposed
  (PyTorch/Equinox) weights equals the Flax result; in float32, bfloat16 and
  float16, under ``jit`` and ``grad``, and under ``vmap`` over a batch of
  trees in float32 (batching does not depend on the dtype; the half
  precision trees also leave out the conv kernel, to keep the property part
  under a minute on one core). Plus trees and callables for ``axis`` and
  ``stack_axes`` in one mixed model, the errors of section 6, and a
  hypothesis property of ``unit_norms``/``leaf_norms`` against a float64
  NumPy reference for any shape, number of stack axes and ``axis``.
* **The partition-name helper** :func:`norm_optax.masks.stack_axes_from_partitions`
  on the trees Flax really produces (NNX ``nnx.state``, the bare arrays
  ``nnx.Optimizer`` hands to ``tx.update``, Linen ``nn.Partitioned`` boxes).
* **Three real models**, each trained a few steps with
  ``optax.chain(optax.adamw(mask=matrices_only(stack_axes=...)),
  nox.max_norm(1.0, ...))`` and compared layer by layer with the same model
  unstacked or in Flax layout: a stacked NNX model (``nnx.vmap`` +
  ``nnx.scan``, with and without ``nnx.PARTITION_NAME``), a Linen
  ``nn.scan`` model, an Equinox model. Each also shows that the 0.1.0 call
  (no ``stack_axes``) gives a different, wrong answer.

Run: ``python -m pytest -n 0 -q tests/test_layouts.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import chex
import equinox as eqx
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import norm_optax as nox
from tests.cases import normal_tree
from tests.conftest import rtol

Tree = dict[str, Any]
L = 2  # layers
SHAPES = {"kernel": (L, 4, 5), "bias": (L, 5), "conv": (L, 2, 2, 3, 4)}
# Half precision (bfloat16, float16) in the slow step.
DTYPES = [
    jnp.float32,
    pytest.param(jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param(jnp.float16, marks=pytest.mark.slow),
]


# ---------------------------------------------------------------------------
# Layouts: Flax (in, out) <-> out first (out, in), per layer.
# ---------------------------------------------------------------------------


def _perm(ndim: int, stack: int, *, to_out_first: bool) -> tuple[int, ...]:
    """Moves the last non-stack axis first (or back), the others in order."""
    core = list(range(stack, ndim))
    if len(core) < 2:
        return tuple(range(ndim))
    moved = [core[-1], *core[:-1]] if to_out_first else [*core[1:], core[0]]
    return (*range(stack), *moved)


def to_out_first(tree: Any, stack: int = 1) -> Any:
    return jax.tree.map(
        lambda x: jnp.transpose(x, _perm(x.ndim, stack, to_out_first=True)), tree
    )


def to_flax(tree: Any, stack: int = 1) -> Any:
    return jax.tree.map(
        lambda x: jnp.transpose(x, _perm(x.ndim, stack, to_out_first=False)), tree
    )


def test_layout_helpers_are_inverse() -> None:
    tree = normal_tree(0, SHAPES)
    assert to_out_first(tree)["conv"].shape == (L, 4, 2, 2, 3)  # (L, O, H, W, I)
    assert to_out_first(tree)["kernel"].shape == (L, 5, 4)  # (L, out, in)
    chex.assert_trees_all_equal(to_flax(to_out_first(tree)), tree)


# ---------------------------------------------------------------------------
# The registry: every primitive and transform that takes ``stack_axes``.
# ``run(updates, params, stack_axes, axis)`` returns a tree of arrays.
# ---------------------------------------------------------------------------


def _apply(
    make: Callable[..., optax.GradientTransformation],
) -> Callable[[Tree, Tree, Any, Any], Tree]:
    """``make(stack_axes=, axis=)``'s update from a fresh state, with params."""

    def run(u: Tree, p: Tree, stack: Any, axis: Any) -> Tree:
        tx = make(stack_axes=stack, axis=axis)
        return tx.update(u, tx.init(p), p)[0]

    return run


def _no_axis(
    make: Callable[..., optax.GradientTransformation],
) -> Callable[[Tree, Tree, Any, Any], Tree]:
    def run(u: Tree, p: Tree, stack: Any, axis: Any) -> Tree:
        del axis
        tx = make(stack_axes=stack)
        return tx.update(u, tx.init(p), p)[0]

    return run


def _leaf_norms(u: Tree, p: Tree, stack: Any, axis: Any) -> Tree:
    del p, axis
    return nox.leaf_norms(u, stack_axes=stack)


def _unit_norms(u: Tree, p: Tree, stack: Any, axis: Any) -> Tree:
    del p
    return {k: nox.unit_norms(x, axis, stack_axes=stack) for k, x in u.items()}


def _matrices_only(u: Tree, p: Tree, stack: Any, axis: Any) -> Tree:
    del u, axis
    return nox.masks.matrices_only(p, stack_axes=stack)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    run: Callable[[Tree, Tree, Any, Any], Tree]
    has_axis: bool = True  # takes ``axis`` (and so ``"out_first"``)
    structural: bool = False  # returns Python values: no jit, vmap or grad

    def __str__(self) -> str:
        return self.name


# clip_spectral_norm came with another change: its cases skip on a checkout
# without it.
CLIP_SPECTRAL_NORM: Any = getattr(nox, "clip_spectral_norm", None)


def _spectral(**kw: Any) -> optax.GradientTransformation:
    return CLIP_SPECTRAL_NORM(1.0, num_iters=30, **kw)


OPS = [
    Op("leaf_norms", _leaf_norms, has_axis=False),
    Op("unit_norms", _unit_norms),
    Op(
        "clip_by_norm",
        _no_axis(functools.partial(nox.clip_by_norm, 1.0)),
        has_axis=False,
    ),
    Op("adaptive_clip", _apply(functools.partial(nox.adaptive_clip, 0.05))),
    Op("max_norm", _apply(functools.partial(nox.max_norm, 1.0))),
    Op("unit_norm", _apply(nox.unit_norm)),
    Op("min_max_norm", _apply(functools.partial(nox.min_max_norm, 0.5, 1.0, 0.5))),
    Op("prox_group_l1", _apply(functools.partial(nox.prox_group_l1, 1.0, 0.5))),
    Op("clip_spectral_norm", _apply(_spectral)),
    Op("matrices_only", _matrices_only, has_axis=False, structural=True),
]
OP_NAMES = [op.name for op in OPS]


def test_the_registry_holds_every_stack_aware_name() -> None:
    public = [(nox, n) for n in nox.__all__] + [
        (nox.masks, n) for n in nox.masks.__all__
    ]
    stack_aware = {
        name
        for module, name in public
        if callable(obj := getattr(module, name))
        and not isinstance(obj, type)
        and "stack_axes" in inspect.signature(obj).parameters
    }
    covered = set(OP_NAMES) | set(COVERED_ELSEWHERE)
    assert stack_aware <= covered, sorted(stack_aware - covered)


# Stack-aware names whose per-layer behaviour is tested in their own module
# (their numerics need their own references and tolerances: Newton-Schulz in
# half precision, optimizers over several steps, statistics in a state).
COVERED_ELSEWHERE = {
    "orthogonalize": ("tests.test_geometry", "test_stacked_equals_per_layer"),
    "scale_by_lmo": (
        "tests.test_geometry",
        "test_auto_stacked_kernel_and_bias_per_layer",
    ),
    "muon": (
        "tests.test_alias",
        "test_nnx_stacked_model_trains_with_muon_as_unstacked",
    ),
    "scion": (
        "tests.test_alias",
        "test_nnx_stacked_model_trains_with_scion_as_unstacked",
    ),
    "record_layer_norms": (
        "tests.test_telemetry",
        "test_per_layer_norms_match_float64_reference",
    ),
}


@pytest.mark.parametrize("name", sorted(COVERED_ELSEWHERE))
def test_names_covered_elsewhere_have_their_stacked_test(name: str) -> None:
    module, test = COVERED_ELSEWHERE[name]
    assert callable(getattr(importlib.import_module(module), test, None)), (
        f"{name}: {module}.{test} is gone; move {name} into OPS or name its test"
    )


def _needs(op: Op) -> None:
    if op.name == "clip_spectral_norm" and CLIP_SPECTRAL_NORM is None:
        pytest.skip("nox.clip_spectral_norm is not there yet")


def _trees(dtype: Any, seed: int = 0) -> tuple[Tree, Tree]:
    """A stacked tree; in half precision without the conv kernel (time budget)."""
    shapes = SHAPES
    if jnp.dtype(dtype) != jnp.float32:
        shapes = {k: v for k, v in SHAPES.items() if k != "conv"}
    updates = normal_tree(seed, shapes, dtype, scale=0.5)
    params = normal_tree(seed + 1, shapes, dtype, scale=0.4)
    return updates, params


def _layer(tree: Tree, i: int) -> Tree:
    return jax.tree.map(lambda x: x[i], tree)


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def per_layer(op: Op, u: Tree, p: Tree, axis: Any) -> Tree:
    """The reference: ``op`` on each layer's slice on its own, restacked."""
    return _stack([op.run(_layer(u, i), _layer(p, i), 0, axis) for i in range(L)])


def _close(got: Any, want: Any, dtype: Any) -> None:
    tol = rtol(dtype)
    chex.assert_trees_all_equal_structs(got, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g64.shape == w64.shape
        scale = max(1.0, float(np.max(np.abs(w64), initial=0.0)))
        np.testing.assert_allclose(g64, w64, rtol=tol, atol=tol * scale)


def _cotangent(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), tree
    )


def _loss(out: Any, cot: Any) -> jax.Array:
    terms = jax.tree.map(lambda o, c: jnp.sum(o.astype(jnp.float32) * c), out, cot)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def _compile_fast(f: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(f)`` compiled for ``args`` with LLVM's cheap pipeline.

    The HLO passes run as usual (the same numbers); only the machine code is
    less optimised, which makes these many small compilations faster.
    """
    lowered = jax.jit(f).lower(*args)
    return lowered.compile({"xla_backend_optimization_level": "0"})(*args)


def _check_modes(
    f: Callable[[Tree, Tree], Tree],
    reference: Callable[[Tree, Tree], Tree],
    u: Tree,
    p: Tree,
    dtype: Any,
    also: Callable[[Tree, Tree], Tree] | None = None,
) -> None:
    """``f`` equals ``reference`` under jit, vmap and grad (one compilation).

    ``also``, if given, is another way to compute ``f``. The vmap checks run
    in float32 only: batching does not depend on the dtype, and the half
    precision cases stay within the time budget.
    """
    batch = jnp.dtype(dtype) == jnp.float32
    # vmap over a batch of two trees.
    ub = _stack([u, jax.tree.map(lambda x: (-0.5 * x).astype(x.dtype), u)])
    pb = _stack([p, jax.tree.map(lambda x: (1.5 * x).astype(x.dtype), p)])

    def all_modes(u: Tree, p: Tree, ub: Tree, pb: Tree) -> dict[str, Any]:
        want = reference(u, p)
        cot = _cotangent(want)  # grad with respect to the updates
        return {
            "got": f(u, p),
            "want": want,
            "vmap": jax.vmap(f)(ub, pb) if batch else None,
            "vmap_want": jax.vmap(reference)(ub, pb) if batch else None,
            "grad": jax.grad(lambda x: _loss(f(x, p), cot))(u),
            "grad_want": jax.grad(lambda x: _loss(reference(x, p), cot))(u),
            "also": None if also is None else also(u, p),
        }

    out = _compile_fast(all_modes, u, p, ub, pb)
    _close(out["got"], out["want"], dtype)
    if batch:
        _close(out["vmap"], out["vmap_want"], dtype)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(out["grad"]))
    _close(out["grad"], out["grad_want"], dtype)
    if also is not None:
        _close(out["also"], out["got"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_stacked_equals_each_layer_alone(op: Op, dtype: Any) -> None:
    _needs(op)
    u, p = _trees(dtype)
    if op.structural:
        got = op.run(u, p, 1, None)
        for i in range(L):
            assert got == op.run(_layer(u, i), _layer(p, i), 0, None)
        return
    _check_modes(
        lambda u, p: op.run(u, p, 1, None),
        lambda u, p: per_layer(op, u, p, None),
        u,
        p,
        dtype,
        # vmap over the layer axis is the same thing (batching does not
        # depend on the dtype: float32 only, as the vmap checks below).
        also=jax.vmap(lambda u, p: op.run(u, p, 0, None))
        if jnp.dtype(dtype) == jnp.float32
        else None,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", [op for op in OPS if op.has_axis], ids=str)
def test_out_first_equals_flax_on_the_transposed_weights(op: Op, dtype: Any) -> None:
    _needs(op)
    u, p = _trees(dtype)

    def torch_layout(u: Tree, p: Tree) -> Tree:
        out = op.run(to_out_first(u), to_out_first(p), 1, "out_first")
        return to_flax(out)

    _check_modes(torch_layout, lambda u, p: op.run(u, p, 1, None), u, p, dtype)


@pytest.mark.parametrize(
    "op", [op for op in OPS if op.has_axis and op.name != "unit_norms"], ids=str
)
def test_axis_and_stack_axes_trees_and_callables(op: Op) -> None:
    """A mixed model: Flax and out-first halves, stacked layers and a head."""
    _needs(op)
    u, p = _trees(jnp.float32)
    head_u, head_p = _layer(u, 0), _layer(p, 1)
    mixed_u = {"flax": u, "torch": to_out_first(u), "head": head_u}
    mixed_p = {"flax": p, "torch": to_out_first(p), "head": head_p}
    axis_tree = {"flax": None, "torch": "out_first", "head": None}  # a prefix
    stack_tree = {"flax": 1, "torch": 1, "head": 0}
    stack_fn = nox.masks.by_path("^(flax|torch)/")  # bools: True = 1
    variants = [(axis_tree, stack_fn), (lambda params: axis_tree, stack_tree)]

    def run_all(mixed_u: Tree, mixed_p: Tree) -> dict[str, Any]:
        return {
            "want": op.run(mixed_u["flax"], mixed_p["flax"], 1, None),
            "want_head": op.run(mixed_u["head"], mixed_p["head"], 0, None),
            "got": [op.run(mixed_u, mixed_p, s, a) for a, s in variants],
        }

    out = _compile_fast(run_all, mixed_u, mixed_p)
    for got in out["got"]:
        _close(got["flax"], out["want"], jnp.float32)
        _close(to_flax(got["torch"]), out["want"], jnp.float32)
        _close(got["head"], out["want_head"], jnp.float32)


# ---------------------------------------------------------------------------
# Errors of section 6: the leaf's path and shape in the message.
# ---------------------------------------------------------------------------

ERROR_TREE = {"layers": {"kernel": (3, 4, 5), "bias": (3, 5)}}


@pytest.mark.parametrize("op", OPS, ids=str)
def test_stack_axes_beyond_a_leafs_ndim(op: Op) -> None:
    _needs(op)
    u = normal_tree(0, ERROR_TREE)
    p = normal_tree(1, ERROR_TREE)
    if op.name == "unit_norms":
        with pytest.raises(ValueError, match=r"stack_axes=3 .*shape \(3, 5\)"):
            nox.unit_norms(u["layers"]["bias"], stack_axes=3)
        return
    with pytest.raises(ValueError, match=r"stack_axes=3.*\(3, 5\) .*layers/bias"):
        op.run(u, p, 3, None)


@pytest.mark.parametrize("axis", [0, -3, (0, 1)])
@pytest.mark.parametrize("op", [op for op in OPS if op.has_axis], ids=str)
def test_an_axis_naming_a_stack_axis(op: Op, axis: Any) -> None:
    _needs(op)
    u = normal_tree(0, ERROR_TREE)
    p = normal_tree(1, ERROR_TREE)
    if op.name == "unit_norms":
        with pytest.raises(
            ValueError, match=r"names stack axis 0 of shape \(3, 4, 5\)"
        ):
            nox.unit_norms(u["layers"]["kernel"], axis, stack_axes=1)
        return
    kernel_only = {"layers": {"kernel": u["layers"]["kernel"]}}
    params = {"layers": {"kernel": p["layers"]["kernel"]}}
    with pytest.raises(
        ValueError,
        match=r"names stack axis 0 of shape \(3, 4, 5\) of the leaf at layers/kernel",
    ):
        op.run(kernel_only, params, 1, axis)


# ---------------------------------------------------------------------------
# Hypothesis: unit_norms and leaf_norms against a float64 NumPy reference
# computed slice by slice, for any shape, number of stack axes and axis.
# ---------------------------------------------------------------------------


def _numpy_unit_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    """The reduced axes of one layer's slice (no stack axes), NumPy side."""
    if axis is None:
        return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
    if axis == "out_first":
        return tuple(range(1, ndim)) if ndim >= 2 else tuple(range(ndim))
    return tuple(sorted(a % ndim for a in axis))


@st.composite
def _stacked_arrays(draw: st.DrawFn) -> tuple[np.ndarray, int, Any]:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=3))
    stack = draw(st.integers(0, len(shape)))
    core = len(shape) - stack
    options: list[Any] = [None, "out_first"]
    if core:
        subsets = st.lists(
            st.integers(0, core - 1), min_size=1, max_size=core, unique=True
        )
        options.append(draw(subsets))
    axis = draw(st.sampled_from(options))
    x = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-100, 100, width=32, allow_subnormal=False),
        )
    )
    return x, stack, axis


@given(_stacked_arrays(), st.sampled_from([1, 2, "inf"]))
def test_unit_and_leaf_norms_slice_by_slice(
    case: tuple[np.ndarray, int, Any], ord: Any
) -> None:
    x, stack, axis = case
    ord_np = np.inf if ord == "inf" else ord
    core = x.ndim - stack
    local = _numpy_unit_axes(core, axis)
    # The axis to pass: ints name axes of the whole (stacked) array.
    axis_arg = axis if axis in (None, "out_first") else tuple(a + stack for a in local)
    got_units = np.asarray(
        nox.unit_norms(jnp.asarray(x), axis_arg, ord, stack_axes=stack)
    )
    got_leaf = np.asarray(
        nox.leaf_norms({"x": jnp.asarray(x)}, ord, stack_axes=stack)["x"]
    )
    want_units = np.zeros(
        x.shape[:stack]
        + tuple(1 if i in local else n for i, n in enumerate(x.shape[stack:]))
    )
    want_leaf = np.zeros(x.shape[:stack])
    x64 = x.astype(np.float64)
    for index in np.ndindex(*x.shape[:stack]):
        layer = x64[index]
        if local:
            flat = np.moveaxis(layer, local, range(len(local))).reshape(
                math.prod(layer.shape[a] for a in local), -1
            )
            norms = (
                np.linalg.norm(flat, ord_np, axis=0)
                if flat.size
                else np.zeros(flat.shape[1:])
            )
            kept = [n for i, n in enumerate(layer.shape) if i not in local]
            want_units[index] = np.expand_dims(norms.reshape(kept), local)
        else:
            want_units[index] = np.abs(layer)
        want_leaf[index] = np.linalg.norm(layer.ravel(), ord_np) if layer.size else 0.0
    np.testing.assert_allclose(got_units, want_units, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-30)


# ---------------------------------------------------------------------------
# masks.stack_axes_from_partitions on the trees Flax produces.
# ---------------------------------------------------------------------------

STACKED_STATE = {
    "blocks": {
        "linear": {"bias": 1, "kernel": 1},
        "norm": {"bias": 1, "scale": 1},
    },
    "head": {"bias": 0, "kernel": 0},
}


class NnxBlock(nnx.Module):
    """Dense 4 -> 4, LayerNorm, tanh: kernel (4, 4), bias and scale (4,)."""

    def __init__(self, rngs: nnx.Rngs, *, annotate: bool) -> None:
        def names(*axes: str | None) -> dict[str, Any]:
            return {"out_sharding": axes} if annotate else {}

        self.linear = nnx.Linear(
            4,
            4,
            kernel_init=nnx.initializers.normal(0.8),
            kernel_metadata=names(None, "model"),
            bias_init=nnx.initializers.normal(0.5),
            bias_metadata=names("model"),
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(
            4, scale_metadata=names("model"), bias_metadata=names("model"), rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.norm(self.linear(x)))


class NnxStacked(nnx.Module):
    """``L`` blocks made by ``nnx.vmap``, run by ``nnx.scan``, and a head."""

    def __init__(self, rngs: nnx.Rngs, *, partition_name: str | None) -> None:
        self.meta = {nnx.PARTITION_NAME: partition_name} if partition_name else {}

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=self.meta)
        def make(rngs: nnx.Rngs) -> NnxBlock:
            return NnxBlock(rngs, annotate=partition_name is not None)

        self.blocks = make(rngs)
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(
            in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=self.meta
        )
        def body(x: jax.Array, block: NnxBlock) -> jax.Array:
            return block(x)

        return self.head(body(x, self.blocks))


class NnxUnstacked(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([NnxBlock(rngs, annotate=False) for _ in range(L)])
        self.head = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _stacked_nnx(partition_name: str | None = "layers") -> NnxStacked:
    with nnx.use_eager_sharding(False):  # no mesh: the names are metadata only
        return NnxStacked(nnx.Rngs(0), partition_name=partition_name)


def test_helper_reads_nnx_state() -> None:
    model = _stacked_nnx()
    kernel = model.blocks.linear.kernel
    # Where Flax records it: the out_sharding metadata, layer axis first.
    assert kernel.get_metadata()["out_sharding"] == ("layers", None, "model")
    state = nnx.state(model, nnx.Param)
    stack = nox.masks.stack_axes_from_partitions(state)
    assert isinstance(stack, nnx.State)
    assert nnx.to_pure_dict(stack) == STACKED_STATE
    # The structure of the bare-array params nnx.Optimizer hands to tx.update.
    pure = nnx.as_pure(state)
    chex.assert_trees_all_equal_structs(stack, pure)
    # The unfiltered state works too; the module itself is refused.
    whole = nox.masks.stack_axes_from_partitions(nnx.state(model))
    assert nnx.to_pure_dict(whole)["blocks"] == STACKED_STATE["blocks"]
    with pytest.raises(TypeError, match=r"nnx.state\(model, nnx.Param\)"):
        nox.masks.stack_axes_from_partitions(model)


def test_helper_on_bare_arrays_or_unannotated_variables_raises() -> None:
    annotated = nnx.state(_stacked_nnx(), nnx.Param)
    plain = nnx.state(_stacked_nnx(partition_name=None), nnx.Param)
    for tree in (nnx.as_pure(annotated), plain, {"w": jnp.ones((2, 3))}):
        with pytest.raises(ValueError, match=r"No variable of this tree records"):
            nox.masks.stack_axes_from_partitions(tree)


@pytest.mark.standard_promotion
def test_helper_as_a_callable_under_nnx_optimizer_raises() -> None:
    # nnx.Optimizer passes bare arrays: the callable cannot read the names,
    # and says so instead of treating every leaf as unstacked.
    model = _stacked_nnx()
    tx = nox.max_norm(1.0, stack_axes=nox.masks.stack_axes_from_partitions())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=r"nnx.Optimizer passes bare arrays"):
        optimizer.update(model, grads)


def test_helper_reads_linen_boxes() -> None:
    boxed: dict[str, Any] = {
        "scan": {
            "kernel": nn.Partitioned(jnp.ones((3, 4, 5)), ("layers", None, "mlp")),
            "bias": nn.LogicallyPartitioned(jnp.ones((3, 5)), ("layers", "mlp")),
            "scale": nn.Partitioned(jnp.ones((3, 5)), ("layers", None)),
        },
        "head": nn.Partitioned(jnp.ones((5, 2)), ("mlp", None)),
        "free": jnp.ones((3, 5)),  # no annotation: counts as not stacked
        "frozen": None,
    }
    want = {
        "scan": {"kernel": 1, "bias": 1, "scale": 1},
        "head": 0,
        "free": 0,
        "frozen": None,
    }
    assert nox.masks.stack_axes_from_partitions(boxed) == want
    assert nox.masks.stack_axes_from_partitions()(boxed) == want
    # A prefix of the boxed tree and the structure of the unboxed one.
    unboxed = nn.unbox(boxed)
    chex.assert_trees_all_equal_structs(want, unboxed)
    stacked = nox.leaf_norms(boxed, stack_axes=nox.masks.stack_axes_from_partitions())
    assert stacked["scan"]["kernel"].value.shape == (3,)


def test_helper_counts_every_leading_name() -> None:
    boxed: dict[str, Any] = {
        "pipeline": nn.Partitioned(
            jnp.ones((2, 3, 4, 5)), ("stages", "layers", None, "mlp")
        ),
        "nested": nn.Partitioned(jnp.ones((2, 3, 5)), ("layers", "layers", "mlp")),
    }
    stack = nox.masks.stack_axes_from_partitions
    bad_name: Any = ("layers", 1)
    assert stack(boxed, partition_name=("stages", "layers")) == {
        "pipeline": 2,
        "nested": 2,
    }
    with pytest.raises(
        ValueError, match=r"'layers' is at axis 1 of the leaf at pipeline"
    ):
        stack(boxed)  # "stages" first, then "layers": not a leading axis
    with pytest.raises(TypeError, match="partition_name"):
        stack(boxed, partition_name=bad_name)


def test_helper_names_a_late_partition_name() -> None:
    boxed: dict[str, Any] = {
        "w": nn.Partitioned(jnp.ones((4, 3, 5)), (None, "layers", "mlp"))
    }
    with pytest.raises(
        ValueError,
        match=r"'layers' is at axis 1 of the leaf at w \(shape \(4, 3, 5\), "
        r"partition names \(None, 'layers', 'mlp'\)\)",
    ):
        nox.masks.stack_axes_from_partitions(boxed)


# ---------------------------------------------------------------------------
# Three real models, trained a few steps, compared layer by layer.
# ---------------------------------------------------------------------------

X = jax.random.normal(jax.random.key(1), (16, 4))
Y = jnp.sin(2.0 * X[:, :1])
STEPS = 3
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _chain(stack: Any = None, axis: Any = None) -> optax.GradientTransformation:
    """AdamW without decay on biases and norm scales, then max-norm."""
    return optax.chain(
        optax.adamw(
            1e-2, weight_decay=0.5, mask=nox.masks.matrices_only(stack_axes=stack)
        ),
        nox.max_norm(1.0, axis=axis, stack_axes=stack),
    )


def _unit_norms_per_layer(kernels: jax.Array, axis: Any = None) -> np.ndarray:
    """Each layer's unit norms, computed on the layer's slice alone."""
    return np.stack(
        [np.asarray(nox.unit_norms(kernels[i], axis)).ravel() for i in range(L)]
    )


def _vector_norms_per_layer(vectors: jax.Array) -> np.ndarray:
    return np.asarray([float(nox.global_norm(vectors[i])) for i in range(L)])


def _assert_differs(got: Any, want: Any) -> None:
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(got, want, **TOL)


def _train_nnx(model: nnx.Module, tx: optax.GradientTransformation) -> Any:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer) -> None:
        grads = nnx.grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(STEPS):
        step(model, optimizer)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _unstack_nnx(stacked: dict[str, Any]) -> dict[str, Any]:
    blocks = {i: _layer(stacked["blocks"], i) for i in range(L)}
    return {"blocks": blocks, "head": stacked["head"]}


@pytest.mark.slow  # training runs: the layouts are checked step by step above
@pytest.mark.standard_promotion
@pytest.mark.parametrize("partition_name", ["layers", None])
def test_nnx_stacked_model_trains_as_unstacked(partition_name: str | None) -> None:
    model = _stacked_nnx(partition_name)
    init = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert init["blocks"]["linear"]["kernel"].shape == (L, 4, 4)
    assert init["blocks"]["linear"]["bias"].shape == (L, 4)
    assert init["blocks"]["norm"]["scale"].shape == (L, 4)
    if partition_name:
        stack = nox.masks.stack_axes_from_partitions(nnx.state(model, nnx.Param))
    else:  # nothing recorded: name the stacked subtree
        with pytest.raises(ValueError, match="No variable of this tree records"):
            nox.masks.stack_axes_from_partitions(nnx.state(model, nnx.Param))
        stack = nox.masks.by_path("^blocks/")

    # Biases and norm scales are not decayed; the 0.1.0 call decays them.
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    mask = nnx.to_pure_dict(nox.masks.matrices_only(params, stack_axes=stack))
    assert mask["blocks"] == {
        "linear": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
    }
    assert mask["head"] == {"kernel": True, "bias": False}
    naive_mask = nnx.to_pure_dict(nox.masks.matrices_only(params))
    assert naive_mask["blocks"]["linear"]["bias"] is True  # wrong
    assert naive_mask["blocks"]["norm"]["scale"] is True  # wrong

    # The constraint is active: some units start above the limit.
    assert np.max(_unit_norms_per_layer(init["blocks"]["linear"]["kernel"])) > 1.0

    got = _train_nnx(model, _chain(stack))
    want, naive = _nnx_unstacked_and_naive_runs()
    chex.assert_trees_all_close(_unstack_nnx(got), want, **TOL)
    blocks = got["blocks"]
    assert np.max(_unit_norms_per_layer(blocks["linear"]["kernel"])) <= 1.0 + 1e-6
    for vectors in (blocks["linear"]["bias"], blocks["norm"]["scale"]):
        assert np.max(_vector_norms_per_layer(vectors)) <= 1.0 + 1e-6
    # The 0.1.0 behaviour (no stack_axes): a different, wrong model.
    _assert_differs(_unstack_nnx(naive)["blocks"], want["blocks"])


@functools.cache
def _nnx_unstacked_and_naive_runs() -> tuple[Any, Any]:
    """The reference (unstacked, same initial values) and the 0.1.0 call.

    Both parametrisations start from the same values (the metadata does not
    change them), so the two runs are shared.
    """
    init = nnx.to_pure_dict(nnx.state(_stacked_nnx(None), nnx.Param))
    unstacked = NnxUnstacked(nnx.Rngs(1))
    state = nnx.state(unstacked, nnx.Param)
    nnx.replace_by_pure_dict(state, _unstack_nnx(init))
    nnx.update(unstacked, state)
    want = _train_nnx(unstacked, _chain())
    naive = _train_nnx(_stacked_nnx(None), _chain())
    return want, naive


class LinenBlock(nn.Module):
    annotate: bool

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        def init(fn: Any, *names: str | None) -> Any:
            return nn.with_partitioning(fn, names) if self.annotate else fn

        x = nn.Dense(
            4,
            kernel_init=init(nn.initializers.normal(0.8), None, "model"),
            bias_init=init(nn.initializers.normal(0.5), "model"),
        )(x)
        x = nn.LayerNorm(
            scale_init=init(nn.initializers.ones, "model"),
            bias_init=init(nn.initializers.zeros, "model"),
        )(x)
        return jnp.tanh(x), None


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        blocks = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(annotate=True, name="blocks")(x, None)
        return nn.Dense(1, name="head")(x)


class LinenUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(L):
            x, _ = LinenBlock(annotate=False, name=f"block{i}")(x, None)
        return nn.Dense(1, name="head")(x)


def _train_linen(
    model: nn.Module, params: Any, tx: optax.GradientTransformation
) -> Any:
    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        def loss(p: Any) -> jax.Array:
            out = model.apply({"params": p}, X)
            assert isinstance(out, jax.Array)
            return jnp.mean((out - Y) ** 2)

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(STEPS):
        params, opt_state = step(params, opt_state)
    return params


def _unroll_linen(params: Any) -> dict[str, Any]:
    scanned = nn.unbox(params)
    out = {f"block{i}": _layer(scanned["blocks"], i) for i in range(L)}
    return {**out, "head": scanned["head"]}


@pytest.mark.slow  # training runs: the layouts are checked step by step above
@pytest.mark.standard_promotion
def test_linen_scan_model_trains_as_unrolled() -> None:
    boxed = LinenScanned().init(jax.random.key(0), X)["params"]
    kernel = boxed["blocks"]["Dense_0"]["kernel"]
    # Where Flax records it: the names of the nn.Partitioned box.
    assert isinstance(kernel, nn.Partitioned)
    assert kernel.names == ("layers", None, "model")
    assert kernel.value.shape == (L, 4, 4)
    stack = nox.masks.stack_axes_from_partitions(boxed)
    assert stack["blocks"] == {
        "Dense_0": {"kernel": 1, "bias": 1},
        "LayerNorm_0": {"scale": 1, "bias": 1},
    }
    assert stack["head"] == {"kernel": 0, "bias": 0}

    # Trained boxed, with the callable form read at update time.
    from_boxes = nox.masks.stack_axes_from_partitions()
    got = _train_linen(LinenScanned(), boxed, _chain(from_boxes))
    assert isinstance(got["blocks"]["Dense_0"]["kernel"], nn.Partitioned)
    want = _train_linen(LinenUnrolled(), _unroll_linen(boxed), _chain())
    chex.assert_trees_all_close(_unroll_linen(got), want, **TOL)
    unboxed = nn.unbox(got)["blocks"]
    assert np.max(_unit_norms_per_layer(unboxed["Dense_0"]["kernel"])) <= 1.0 + 1e-6
    assert np.max(_vector_norms_per_layer(unboxed["Dense_0"]["bias"])) <= 1.0 + 1e-6
    # Trained unboxed, with the tree read once from the boxes: the same.
    got_unboxed = _train_linen(LinenScanned(), nn.unbox(boxed), _chain(stack))
    chex.assert_trees_all_close(got_unboxed, nn.unbox(got), **TOL)

    naive = _train_linen(LinenScanned(), boxed, _chain())
    _assert_differs(_unroll_linen(naive), want)


class EqxBlock(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.norm(self.linear(x)))


class EqxModel(eqx.Module):
    layers: EqxBlock  # stacked: every array has a leading layer axis
    head: eqx.nn.Linear
    activation: Callable[[jax.Array], jax.Array]  # not an array: None in params

    def __call__(self, x: jax.Array) -> jax.Array:
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def body(x: jax.Array, layer: Any) -> tuple[jax.Array, None]:
            return eqx.combine(layer, static)(x), None

        x, _ = jax.lax.scan(body, x, dynamic)
        return self.head(self.activation(x))


def _eqx_model() -> EqxModel:
    def block(key: jax.Array) -> EqxBlock:
        k1, k2, k3 = jax.random.split(key, 3)
        linear = eqx.nn.Linear(4, 4, key=k1)
        weight = 0.8 * jax.random.normal(k2, (4, 4))  # (out, in)
        bias = 0.5 * jax.random.normal(k3, (4,))
        linear = eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, bias))
        return EqxBlock(linear, eqx.nn.LayerNorm(4))

    keys = jax.random.split(jax.random.key(0), L + 1)
    layers = eqx.filter_vmap(block)(keys[:L])
    return EqxModel(layers, eqx.nn.Linear(4, 1, key=keys[L]), jnp.negative)


def _train_eqx(model: EqxModel, tx: optax.GradientTransformation) -> EqxModel:
    @eqx.filter_jit
    def step(model: EqxModel, opt_state: Any) -> tuple[EqxModel, Any]:
        def loss(m: EqxModel) -> jax.Array:
            return jnp.mean((jax.vmap(m)(X) - Y) ** 2)

        grads = eqx.filter_grad(loss)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state

    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    for _ in range(STEPS):
        model, opt_state = step(model, opt_state)
    return model


def _flax_layout(model: EqxModel) -> dict[str, Any]:
    """The same weights as unstacked Flax-layout layers: kernels (in, out)."""
    lin, norm = model.layers.linear, model.layers.norm
    assert norm.weight is not None
    assert norm.bias is not None
    assert lin.bias is not None
    assert model.head.bias is not None
    blocks = [
        {
            "kernel": lin.weight[i].T,
            "bias": lin.bias[i],
            "scale": norm.weight[i],
            "ln_bias": norm.bias[i],
        }
        for i in range(L)
    ]
    return {
        "blocks": blocks,
        "head": {"kernel": model.head.weight.T, "bias": model.head.bias},
    }


def _flax_forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
    for block in params["blocks"]:
        x = x @ block["kernel"] + block["bias"]
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.var(x, axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * block["scale"] + block["ln_bias"]
        x = jnp.tanh(x)
    return -x @ params["head"]["kernel"] + params["head"]["bias"]


def _train_flax_layout(params: Any, tx: optax.GradientTransformation) -> Any:
    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: jnp.mean((_flax_forward(p, X) - Y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(STEPS):
        params, opt_state = step(params, opt_state)
    return params


@pytest.mark.slow  # training runs: the layouts are checked step by step above
@pytest.mark.standard_promotion
def test_equinox_model_trains_as_flax_layout() -> None:
    model = _eqx_model()
    params = eqx.filter(model, eqx.is_inexact_array)
    assert params.activation is None  # a None leaf
    assert callable(params)  # a callable Module node: a tree, not a function
    assert params.layers.linear.weight.shape == (L, 4, 4)  # (layers, out, in)
    stack = nox.masks.by_path("^layers/")
    mask = nox.masks.matrices_only(params, stack_axes=stack)
    assert mask.layers.linear.weight is True
    assert mask.layers.linear.bias is False
    assert mask.layers.norm.weight is False
    assert mask.head.weight is True
    assert nox.masks.matrices_only(params).layers.linear.bias is True  # 0.1.0: wrong
    init = _flax_layout(model)
    # The constraint is active: some units start above the limit.
    assert max(float(jnp.max(nox.unit_norms(b["kernel"]))) for b in init["blocks"]) > 1

    got = _train_eqx(model, _chain(stack, axis="out_first"))
    want = _train_flax_layout(init, _chain())
    chex.assert_trees_all_close(_flax_layout(got), want, **TOL)
    weights = got.layers.linear.weight
    assert np.max(_unit_norms_per_layer(weights, "out_first")) <= 1.0 + 1e-6

    # 0.1.0: no stack_axes and the Flax convention on (out, in) weights.
    naive = _train_eqx(_eqx_model(), _chain())
    _assert_differs(_flax_layout(naive)["blocks"], want["blocks"])
    # Stacked but in the Flax convention: still wrong (units are the rows).
    transposed = _train_eqx(_eqx_model(), _chain(stack))
    _assert_differs(_flax_layout(transposed)["blocks"], want["blocks"])


@pytest.mark.standard_promotion
def test_traced_stack_axes_says_to_list_it_in_static_args() -> None:
    params = {"w": jnp.ones((2, 3, 3))}
    tx = optax.inject_hyperparams(nox.max_norm)(max_value=1.0, stack_axes=1)
    with pytest.raises(TypeError, match=r"stack_axes is structural.*static_args"):
        jax.jit(tx.update)(params, tx.init(params), params)
    fixed = optax.inject_hyperparams(nox.max_norm, static_args=("stack_axes",))(
        max_value=1.0, stack_axes=1
    )
    out, _ = jax.jit(fixed.update)(params, fixed.init(params), params)
    chex.assert_shape(out["w"], (2, 3, 3))


# ---------------------------------------------------------------------------
# Every Equinox layer with a bias against its Flax-layout twin (issue 17.1):
# Equinox's conv bias (out, 1, 1) is a vector, as the Flax bias (out,) is.
# ---------------------------------------------------------------------------


def _eqx_layers() -> dict[str, Any]:
    keys = iter(jax.random.split(jax.random.key(3), 16))
    layers = {
        "linear": eqx.nn.Linear(3, 4, key=next(keys)),
        "linear_in1": eqx.nn.Linear("scalar", 4, key=next(keys)),  # weight (4, 1)
        "linear_out1": eqx.nn.Linear(3, "scalar", key=next(keys)),  # weight (1, 3)
        "conv1d": eqx.nn.Conv1d(2, 4, 3, key=next(keys)),  # bias (4, 1)
        "conv2d": eqx.nn.Conv2d(2, 4, 3, key=next(keys)),  # bias (4, 1, 1)
        "conv3d": eqx.nn.Conv3d(2, 4, 2, key=next(keys)),  # bias (4, 1, 1, 1)
        "conv2d_1x1_in1": eqx.nn.Conv2d(1, 4, 1, key=next(keys)),  # weight (4,1,1,1)
        "conv_transpose2d": eqx.nn.ConvTranspose2d(2, 4, 3, key=next(keys)),
        "attention": eqx.nn.MultiheadAttention(
            2,
            4,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=next(keys),
        ),
        "layer_norm": eqx.nn.LayerNorm(5),
        "embedding": eqx.nn.Embedding(6, 3, key=next(keys)),
    }
    params = eqx.filter(layers, eqx.is_inexact_array)
    # Values of every size, so that many units exceed the max-norm limit.
    leaves, treedef = jax.tree.flatten(params)
    scaled = [
        2.0 * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(jax.random.split(next(keys), len(leaves)), leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, scaled)


def _to_flax(tree: Any, like: Any = None) -> dict[str, Any]:
    """The Flax layout: kernels (*kernel, in, out), biases (out,), LayerNorm scale.

    ``tree`` has the structure of the Equinox params ``like`` (itself by
    default); its leaves are moved as the params' are (masks just renamed).
    """
    out: dict[str, Any] = {}
    flat = jax.tree_util.tree_flatten_with_path(tree if like is None else like)[0]
    for (path, ref), x in zip(flat, jax.tree.leaves(tree), strict=True):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        layer, name = "/".join(keys[:-1]), keys[-1]
        move = jnp.ndim(x) == ref.ndim
        if name == "bias":
            x = x.reshape(ref.shape[:1]) if move else x
        elif name == "weight" and ref.ndim >= 2 and layer != "embedding":
            x = x.transpose(*range(2, ref.ndim), 1, 0) if move else x
            name = "kernel"
        elif name == "weight":
            name = "embedding" if ref.ndim == 2 else "scale"
        out.setdefault(layer, {})[name] = x
    return out


@pytest.mark.standard_promotion
def test_equinox_layers_equal_their_flax_layout_twins() -> None:
    eqx_params = _eqx_layers()
    flax_params = _to_flax(eqx_params)
    grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), eqx_params)
    flax_grads = _to_flax(grads)
    # What a matrix is: the same leaves in both layouts (biases never).
    want_mask = nox.masks.matrices_only(flax_params)
    assert _to_flax(nox.masks.matrices_only(eqx_params), eqx_params) == want_mask
    assert not any(
        want_mask[layer]["bias"] for layer in want_mask if "bias" in want_mask[layer]
    )
    assert want_mask["linear_in1"]["kernel"]
    assert want_mask["conv2d_1x1_in1"]["kernel"]
    assert want_mask["embedding"]["embedding"]

    def run(axis: Any, params: Any, g: Any) -> list[Any]:
        embedding = nox.masks.exclude_path("^embedding/")  # its units are rows
        txs = [
            optax.chain(optax.sgd(0.1), nox.max_norm(1.0, axis, mask=embedding)),
            optax.adamw(0.1, weight_decay=0.5, mask=nox.masks.matrices_only),
            nox.unit_norm(axis, mask=embedding),
            nox.prox_group_l1(2.0, 0.5, axis, mask=embedding),
        ]
        return [
            optax.apply_updates(params, tx.update(g, tx.init(params), params)[0])
            for tx in txs
        ]

    got = jax.jit(functools.partial(run, "out_first"))(eqx_params, grads)
    want = jax.jit(functools.partial(run, None))(flax_params, flax_grads)
    for g, w in zip(got, want, strict=True):
        chex.assert_trees_all_close(_to_flax(g), w, rtol=1e-5, atol=1e-6)
    # The conv biases are one unit each: max_norm scales the whole vector.
    for layer in ("conv1d", "conv2d", "conv3d", "conv_transpose2d"):
        assert float(jnp.linalg.norm(want[0][layer]["bias"])) == pytest.approx(
            1.0, rel=1e-5
        )


# ---------------------------------------------------------------------------
# stack_axes_from_partitions: unannotated stacked variables, nested stacks
# (issue 17.5 and 17.8).
# ---------------------------------------------------------------------------


class NnxMixedBlock(nnx.Module):
    """An annotated Linear and, in the same block, an unannotated one."""

    def __init__(self, rngs: nnx.Rngs, *, annotate_mlp: bool = False) -> None:
        def names(*axes: str | None) -> dict[str, Any]:
            return {"out_sharding": axes}

        self.attn = nnx.Linear(
            4,
            4,
            kernel_metadata=names(None, "model"),
            bias_metadata=names("model"),
            rngs=rngs,
        )
        mlp = names if annotate_mlp else lambda *axes: {}
        self.mlp = nnx.Linear(
            4,
            4,
            kernel_metadata=mlp(None, "model"),
            bias_metadata=mlp("model"),
            rngs=rngs,
        )


def _mixed_stack(*, annotate_mlp: bool) -> Any:
    @nnx.split_rngs(splits=L)
    @nnx.vmap(
        in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
    )
    def make(rngs: nnx.Rngs) -> NnxMixedBlock:
        return NnxMixedBlock(rngs, annotate_mlp=annotate_mlp)

    with nnx.use_eager_sharding(False):
        rngs = nnx.Rngs(0)
        return {"blocks": nnx.state(make(rngs), nnx.Param)}


def test_helper_refuses_an_unannotated_variable_in_a_stacked_block() -> None:
    state = _mixed_stack(annotate_mlp=False)
    assert state["blocks"]["mlp"]["bias"].shape == (L, 4)  # stacked, no names
    with pytest.raises(
        ValueError,
        match=rf"blocks/mlp/\w+ \(shape \({L}, 4.*records no partition names.*"
        "stacked variable at blocks/attn/",
    ):
        nox.masks.stack_axes_from_partitions(state)
    annotated = nox.masks.stack_axes_from_partitions(_mixed_stack(annotate_mlp=True))
    assert jax.tree.leaves(annotated) == [1, 1, 1, 1]


def test_helper_unannotated_neighbour_escape_and_unrelated_leaves() -> None:
    stacked: Any = nn.Partitioned(jnp.ones((3, 4, 5)), ("layers", None, "mlp"))
    # Not stacked, but its first axis happens to be 3: names say so.
    named: Any = nn.Partitioned(jnp.ones((3, 5)), (None, "mlp"))
    assert nox.masks.stack_axes_from_partitions(
        {"block": {"kernel": stacked, "table": named}, "head": jnp.ones((3, 2))}
    ) == {"block": {"kernel": 1, "table": 0}, "head": 0}
    with pytest.raises(ValueError, match=r"block/table .*looks stacked"):
        nox.masks.stack_axes_from_partitions(
            {"block": {"kernel": stacked, "table": jnp.ones((3, 5))}}
        )


def test_helper_says_to_name_every_stack_of_nested_stacks() -> None:
    # vmap("stages") around vmap("layers"): the names are (stages, layers, ...).
    boxed: dict[str, Any] = {
        "stages": {
            "kernel": nn.Partitioned(
                jnp.ones((2, 3, 4, 5)), ("stages", "layers", None, "mlp")
            )
        }
    }
    with pytest.raises(
        ValueError, match=re.escape("partition_name=('stages', 'layers')")
    ):
        nox.masks.stack_axes_from_partitions(boxed)
    assert nox.masks.stack_axes_from_partitions(
        boxed, partition_name=("stages", "layers")
    ) == {"stages": {"kernel": 2}}


@pytest.mark.slow
def test_helper_on_nested_nnx_vmaps() -> None:
    @nnx.split_rngs(splits=2)
    @nnx.vmap(
        in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "stages"}
    )
    def stage(rngs: nnx.Rngs) -> NnxMixedBlock:
        @nnx.split_rngs(splits=L)
        @nnx.vmap(
            in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def make(rngs: nnx.Rngs) -> NnxMixedBlock:
            return NnxMixedBlock(rngs, annotate_mlp=True)

        return make(rngs)

    with nnx.use_eager_sharding(False):
        state = nnx.state(stage(nnx.Rngs(0)), nnx.Param)
    kernel: Any = state["attn"]["kernel"]
    assert kernel.get_metadata()["out_sharding"] == (
        "stages",
        "layers",
        None,
        "model",
    )
    with pytest.raises(
        ValueError, match=re.escape("partition_name=('stages', 'layers')")
    ):
        nox.masks.stack_axes_from_partitions(state)
    stack = nox.masks.stack_axes_from_partitions(
        state, partition_name=("stages", "layers")
    )
    assert jax.tree.leaves(stack) == [2, 2, 2, 2]


# ---------------------------------------------------------------------------
# stack_axes checked at construction (issue 17.11).
# ---------------------------------------------------------------------------

CONSTRUCT: dict[str, Callable[[Any], Any]] = {
    "clip_by_norm": lambda s: nox.clip_by_norm(1.0, stack_axes=s),
    "adaptive_clip": lambda s: nox.adaptive_clip(0.05, stack_axes=s),
    "max_norm": lambda s: nox.max_norm(1.0, stack_axes=s),
    "unit_norm": lambda s: nox.unit_norm(stack_axes=s),
    "min_max_norm": lambda s: nox.min_max_norm(0.5, 1.0, stack_axes=s),
    "prox_group_l1": lambda s: nox.prox_group_l1(1.0, 0.5, stack_axes=s),
    "clip_spectral_norm": lambda s: _spectral(stack_axes=s),
    "matrices_only": lambda s: nox.masks.matrices_only(stack_axes=s),
    "scale_by_lmo": lambda s: nox.scale_by_lmo(stack_axes=s),
    "muon": lambda s: nox.muon(0.1, stack_axes=s),
    "scion": lambda s: nox.scion(0.1, stack_axes=s),
    "record_layer_norms": lambda s: nox.record_layer_norms(
        optax.sgd(0.1), stack_axes=s
    ),
}
"""Every public constructor with ``stack_axes`` (the norms compute at once)."""


def test_every_constructor_with_stack_axes_is_checked() -> None:
    public = [(nox, n) for n in nox.__all__] + [
        (nox.masks, n) for n in nox.masks.__all__
    ]
    stack_aware = {
        name
        for module, name in public
        if callable(obj := getattr(module, name))
        and not isinstance(obj, type)
        and "stack_axes" in inspect.signature(obj).parameters
    }
    computations = {"leaf_norms", "unit_norms", "orthogonalize"}  # raise when called
    assert set(CONSTRUCT) == stack_aware - computations


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (-1, ValueError, r"stack_axes must be >= 0, got -1"),
        ({"kernel": 1, "bias": -2}, ValueError, r"got -2 at bias"),
        (1.0, TypeError, r"stack_axes must be an int >= 0 .*got 1\.0"),
    ],
    ids=["negative", "negative_leaf", "float"],
)
@pytest.mark.parametrize("name", sorted(CONSTRUCT))
def test_bad_stack_axes_raise_at_construction(
    name: str, bad: Any, error: type[Exception], match: str
) -> None:
    if name == "clip_spectral_norm":
        _needs(next(op for op in OPS if op.name == name))
    with pytest.raises(error, match=match):
        CONSTRUCT[name](bad)


def test_norm_geometry_reads_an_equinox_conv_bias_as_its_flax_twin() -> None:
    # scale_by_lmo's norm="auto" and orthogonalize ask what a matrix is too.
    bias = jax.random.normal(jax.random.key(4), (4,), jnp.float32)
    eqx_bias = {"conv": {"bias": bias.reshape(4, 1, 1)}}
    flax_bias = {"conv": {"bias": bias}}
    tx = nox.scale_by_lmo(axis="out_first")
    got = tx.update(eqx_bias, tx.init(eqx_bias))[0]["conv"]["bias"]
    want = nox.scale_by_lmo().update(flax_bias, optax.EmptyState())[0]["conv"]["bias"]
    np.testing.assert_allclose(got.reshape(4), want, rtol=1e-6)
    for tree in (eqx_bias, flax_bias):
        with pytest.raises(ValueError, match=r"orthogonalize needs a matrix"):
            nox.orthogonalize(tree)
