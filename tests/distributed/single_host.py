"""Runs every 8-device check of ``tests/test_distributed.py`` in one process.

Started by the test module as ``python single_host.py OUT.json [SECTION,...]``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in its
environment (set by the parent, so importing this module elsewhere is
harmless). It writes one JSON object of measurements for the sections named
(all of :data:`SECTIONS` by default); the pytest functions assert on it.
Each case records its own exception text instead of stopping the run.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import norm_optax as nox

Tree = dict[str, Any]

# ---------------------------------------------------------------------------
# A small GPT: embedding (vocab, d), per-layer attention and MLP kernels,
# biases and layer-norm scales. Vocabulary 50 and context 10 divide neither 8
# nor 4, so those axes stay unsharded (the leaf is sharded on another axis or
# replicated).
# ---------------------------------------------------------------------------

VOCAB, CONTEXT, D, HIDDEN, LAYERS = 50, 10, 16, 64, 1

SHAPES: dict[str, tuple[int, ...]] = {"wte": (VOCAB, D), "wpe": (CONTEXT, D)}
for _i in range(LAYERS):
    SHAPES |= {
        f"h{_i}/ln1/scale": (D,),
        f"h{_i}/attn/qkv/kernel": (D, 3 * D),
        f"h{_i}/attn/qkv/bias": (3 * D,),
        f"h{_i}/attn/out/kernel": (D, D),
        f"h{_i}/attn/out/bias": (D,),
        f"h{_i}/ln2/scale": (D,),
        f"h{_i}/mlp/fc/kernel": (D, HIDDEN),
        f"h{_i}/mlp/fc/bias": (HIDDEN,),
        f"h{_i}/mlp/proj/kernel": (HIDDEN, D),
        f"h{_i}/mlp/proj/bias": (D,),
    }
SHAPES |= {"ln_f/scale": (D,), "head/bias": (VOCAB,)}


def fsdp_spec(name: str, shape: tuple[int, ...]) -> P:
    """1-D mesh ``fsdp`` (8): shard the first axis that 8 divides, if any."""
    if name.endswith("scale"):
        return P(*([None] * len(shape)))  # norm scales replicated
    for axis, size in enumerate(shape):
        if size % 8 == 0:
            return P(*([None] * axis), "fsdp", *([None] * (len(shape) - axis - 1)))
    return P(*([None] * len(shape)))  # head/bias (50,): replicated


def mesh2d_spec(name: str, shape: tuple[int, ...]) -> P:
    """2-D mesh ``data`` (4) x ``model`` (2): Megatron-style plus FSDP."""
    if name == "wte":  # (50, 16): vocab divides neither; d over both axes
        return P(None, ("data", "model"))
    if name == "wpe":  # (10, 16)
        return P(None, "data")
    if name.endswith(("qkv/kernel", "fc/kernel")):
        return P("data", "model")  # column-parallel
    if name.endswith(("out/kernel", "proj/kernel")):
        return P("model", "data")  # row-parallel
    if name.endswith(("qkv/bias", "fc/bias")):
        return P("model")
    if name.endswith("out/bias"):
        return P("data")
    if name == "head/bias":  # (50,): 4 does not divide it, 2 does
        return P("model")
    return P(None)  # layer-norm scales and the remaining biases: replicated


SPECS: dict[str, Callable[[str, tuple[int, ...]], P]] = {
    "fsdp": fsdp_spec,
    "2d": mesh2d_spec,
}


def make_mesh(kind: str, axis_type: jax.sharding.AxisType) -> Mesh:
    if kind == "fsdp":
        shape: tuple[int, ...] = (8,)
        names: tuple[str, ...] = ("fsdp",)
    else:
        shape, names = (4, 2), ("data", "model")
    devices = np.array(jax.devices()[:8]).reshape(shape)
    return Mesh(devices, names, axis_types=(axis_type,) * len(names))


def make_trees() -> tuple[Tree, Tree]:
    rng = np.random.default_rng(0)
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    params = {
        k: jnp.asarray(0.2 * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()
    }
    return grads, params


def shardings(mesh: Mesh, kind: str) -> Tree:
    spec = SPECS[kind]
    return {k: NamedSharding(mesh, spec(k, s)) for k, s in SHAPES.items()}


# ---------------------------------------------------------------------------
# Transforms of API.md section 2 (and 5, if present), with the arguments they
# are tested with. Only names found in ``nox.__all__`` are run.
# ---------------------------------------------------------------------------

TRANSFORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clip_by_value": lambda: nox.clip_by_value(0.5),
    "clip_by_norm": lambda: nox.clip_by_norm(1.0),
    "clip_by_global_norm": lambda: nox.clip_by_global_norm(1.0),
    "normalize_by_global_norm": lambda: nox.normalize_by_global_norm(1.0),
    "adaptive_clip": lambda: nox.adaptive_clip(0.05),
    "clip_weights": lambda: nox.clip_weights(0.1),
    "non_negative": lambda: nox.non_negative(),
    "max_norm": lambda: nox.max_norm(0.5),
    "unit_norm": lambda: nox.unit_norm(),
    "min_max_norm": lambda: nox.min_max_norm(0.8, 1.2),
    "project_l2_ball": lambda: nox.project_l2_ball(1.0),
    "project_l1_ball": lambda: nox.project_l1_ball(10.0),
    "project_linf_ball": lambda: nox.project_linf_ball(0.1),
    "add_l2_decay": lambda: nox.add_l2_decay(0.1),
    "add_l1_decay": lambda: nox.add_l1_decay(0.1),
    "prox_l1": lambda: nox.prox_l1(0.1, 0.5),
}
SECTION_2 = frozenset(TRANSFORMS)
AUTO_SUBSET = frozenset(
    {
        "clip_by_value",
        "clip_by_norm",
        "clip_by_global_norm",
        "normalize_by_global_norm",
        "adaptive_clip",
        "max_norm",
        "project_l2_ball",
        "project_l1_ball",
        "add_l2_decay",
        "prox_l1",
    }
)
TRANSFORMS |= {
    # Section 5, stateful: only the updates are compared.
    "record_norms": lambda: nox.record_norms(nox.clip_by_global_norm(1.0)),
    "autoclip": lambda: nox.autoclip(),
    "zclip": lambda: nox.zclip(),
    "skip_on_spike": lambda: nox.skip_on_spike(optax.identity()),
}
# Extra variants of the transforms that use a global norm.
VARIANTS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "clip_by_global_norm[inject]": (
        "clip_by_global_norm",
        lambda: optax.inject_hyperparams(nox.clip_by_global_norm)(max_norm=1.0),
    ),
}


def available() -> dict[str, Callable[[], optax.GradientTransformation]]:
    found = {n: f for n, f in TRANSFORMS.items() if n in nox.__all__}
    for name, (base, factory) in VARIANTS.items():
        if base in nox.__all__:
            found[name] = factory
    return found


def apply_once(tx: optax.GradientTransformation, updates: Tree) -> Tree:
    """``tx`` applied to ``updates`` from a fresh state, without params."""
    out, _ = tx.update(updates, tx.init(updates))
    return out


def update_fn(tx: optax.GradientTransformation) -> Callable[[Tree, Tree], Tree]:
    def step(grads: Tree, params: Tree) -> Tree:
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    return step


# ---------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------


def collectives(hlo: str) -> dict[str, int]:
    """Collective ops in compiled HLO text; a tuple all-reduce counts once."""
    ops = {
        "all_reduce": r"all-reduce(?:-start)?\(",
        "all_gather": r"all-gather(?:-start)?\(",
        "all_to_all": r"all-to-all\(",
        "reduce_scatter": r"reduce-scatter\(",
        "collective_permute": r"collective-permute(?:-start)?\(",
    }
    return {
        name: len(re.findall(rf"\s{pattern}", hlo)) for name, pattern in ops.items()
    }


RTOL = ATOL = 1e-6


def max_rel_err(out: Any, ref: Any) -> float:
    """``max |out - ref| / (ATOL + RTOL |ref|)``: at most 1 when all close."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            return float("inf")
        err = np.abs(a64 - b64) / (ATOL + RTOL * np.abs(b64))
        worst = max(worst, float(np.max(err, initial=0.0)))
    return worst if math.isfinite(worst) else float("inf")


def sharding_mismatches(out: Tree, arg: Tree, *, explicit: bool) -> list[str]:
    """Leaves whose output sharding differs from the input's."""
    bad = []
    for key in arg:
        a, o = arg[key], out[key]
        if o.dtype != a.dtype or o.shape != a.shape:
            bad.append(f"{key}: {o.dtype}{o.shape} != {a.dtype}{a.shape}")
        elif not o.sharding.is_equivalent_to(a.sharding, a.ndim):
            bad.append(f"{key}: {o.sharding} != {a.sharding}")
        elif explicit and jax.typeof(o).sharding.spec != jax.typeof(a).sharding.spec:
            bad.append(f"{key}: {jax.typeof(o)} != {jax.typeof(a)}")
    return bad


def traced_sharding_mismatches(
    step: Callable[[Tree, Tree], Tree], grads: Tree, params: Tree
) -> list[str]:
    """Inside ``jit``: ``jax.typeof(out).sharding == jax.typeof(in).sharding``."""
    bad: list[str] = []

    def check(g: Tree, p: Tree) -> Tree:
        out = step(g, p)
        for key in g:
            if jax.typeof(out[key]).sharding != jax.typeof(g[key]).sharding:
                bad.append(f"{key}: {jax.typeof(out[key])} != {jax.typeof(g[key])}")
        return out

    jax.jit(check).trace(grads, params)
    return bad


def run_case(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception:
        return {"error": traceback.format_exc(limit=4)[-3000:]}


_REFERENCES: dict[str, Any] = {}


def reference(key: str, compute: Callable[[], Any]) -> Any:
    """The unsharded result for ``key``, computed once for all meshes."""
    if key not in _REFERENCES:
        _REFERENCES[key] = compute()
    return _REFERENCES[key]


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    out = run_case(fn)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def mesh_results(
    kind: str, axis_type: jax.sharding.AxisType, names: list[str]
) -> dict[str, Any]:
    """The GSPMD cases on one mesh (``fsdp`` or ``2d``) of one axis type."""
    grads, params = make_trees()
    explicit = axis_type == jax.sharding.AxisType.Explicit
    mesh = make_mesh(kind, axis_type)
    shard = shardings(mesh, kind)
    sgrads, sparams = jax.device_put(grads, shard), jax.device_put(params, shard)

    def compiled(f: Callable[..., Any], *args: Tree) -> Any:
        """``f`` compiled for sharded ``args`` (Explicit: from their types)."""
        in_shardings = None
        if not explicit:
            in_shardings = tuple(jax.tree.map(lambda x: x.sharding, a) for a in args)
        return jax.jit(f, in_shardings=in_shardings).lower(*args).compile()

    def norm_case(ord: Any) -> dict[str, Any]:
        def f(g: Tree) -> jax.Array:
            return nox.global_norm(g, ord)

        exe = compiled(f, sgrads)
        got = float(exe(sgrads))
        want = float(reference(f"global_norm[{ord}]", lambda: f(grads)))
        return {"rel_err": max_rel_err(got, want), **collectives(exe.as_text())}

    def grad_case() -> dict[str, Any]:
        f = jax.grad(nox.global_norm)
        exe = compiled(f, sgrads)
        got = exe(sgrads)
        zero = exe(jax.tree.map(jnp.zeros_like, sgrads))
        return {
            "rel_err": max_rel_err(got, reference("grad", lambda: f(grads))),
            "zero_at_zero": all(bool(jnp.all(z == 0)) for z in jax.tree.leaves(zero)),
            "sharding": sharding_mismatches(got, sgrads, explicit=explicit),
            **collectives(exe.as_text()),
        }

    def vmap_case() -> dict[str, Any]:
        batched = jax.tree.map(lambda x: jnp.stack([x, -2 * x]), grads)
        bshard = {k: NamedSharding(mesh, P(None, *s.spec)) for k, s in shard.items()}
        sbatched = jax.device_put(batched, bshard)
        f = jax.vmap(nox.global_norm)
        got = compiled(f, sbatched)(sbatched)
        return {"rel_err": max_rel_err(got, reference("vmap", lambda: f(batched)))}

    def per_example_case() -> dict[str, Any]:
        """Per-example norms (DP-SGD) with the examples sharded over devices.

        The batch axis is sharded on the first mesh axis; each example's
        leaves keep their other mesh axes.
        """
        batch_axis = mesh.axis_names[0]
        size = mesh.shape[batch_axis]

        def example_spec(spec: P) -> P:
            def drop(entry: Any) -> Any:
                names = entry if isinstance(entry, tuple) else (entry,)
                kept = tuple(n for n in names if n not in (None, batch_axis))
                return kept[0] if len(kept) == 1 else (kept or None)

            return P(batch_axis, *(drop(e) for e in spec))

        batched = jax.tree.map(
            lambda x: jnp.stack([(i + 1) * x for i in range(size)]), grads
        )
        bshard = {
            k: NamedSharding(mesh, example_spec(s.spec)) for k, s in shard.items()
        }
        sbatched = jax.device_put(batched, bshard)
        f = jax.vmap(nox.global_norm)
        exe = compiled(f, sbatched)
        want = reference(f"per_example{size}", lambda: f(batched))
        return {
            "rel_err": max_rel_err(exe(sbatched), want),
            **collectives(exe.as_text()),
        }

    def transform_case(name: str) -> dict[str, Any]:
        """One transform compiled alone: values, shardings, collectives."""
        step = update_fn(available()[name]())
        exe = compiled(step, sgrads, sparams)
        got = exe(sgrads, sparams)
        want = reference(name, lambda: jax.jit(step)(grads, params))
        out: dict[str, Any] = {
            "rel_err": max_rel_err(got, want),
            "sharding": sharding_mismatches(got, sgrads, explicit=explicit),
            **collectives(exe.as_text()),
        }
        if explicit:
            out["traced_sharding"] = traced_sharding_mismatches(step, sgrads, sparams)
        return out

    def batch_cases(batch: list[str]) -> dict[str, dict[str, Any]]:
        """Transforms compiled together (one compilation): values, shardings."""
        out: dict[str, dict[str, Any]] = {}
        steps = {}
        for name in batch:  # trace each alone first, so one failure stays local
            out[name] = {}
            try:
                step = update_fn(available()[name]())
                if explicit:
                    out[name]["traced_sharding"] = traced_sharding_mismatches(
                        step, sgrads, sparams
                    )
                else:
                    compiled_trace(step, sgrads, sparams)
                steps[name] = step
            except Exception:
                out[name]["error"] = traceback.format_exc(limit=4)[-3000:]

        def together(g: Tree, p: Tree) -> dict[str, Tree]:
            return {name: step(g, p) for name, step in steps.items()}

        key = "batch:" + ",".join(steps)
        want = reference(key, lambda: jax.jit(together)(grads, params))
        got = compiled(together, sgrads, sparams)(sgrads, sparams)
        for name in steps:
            out[name]["rel_err"] = max_rel_err(got[name], want[name])
            out[name]["sharding"] = sharding_mismatches(
                got[name], sgrads, explicit=explicit
            )
        return out

    def compiled_trace(f: Callable[..., Any], *args: Tree) -> None:
        in_shardings = tuple(jax.tree.map(lambda x: x.sharding, a) for a in args)
        jax.jit(f, in_shardings=in_shardings).trace(*args)

    results = {
        f"global_norm[ord={o}]": timed(functools.partial(norm_case, o)) for o in ORDS
    }
    results["grad(global_norm)"] = timed(grad_case)
    results["vmap(global_norm)"] = timed(vmap_case)
    results["per_example(global_norm)"] = timed(per_example_case)
    for name in names:
        if name in ALONE:
            results[name] = timed(functools.partial(transform_case, name))
    batch = [name for name in names if name not in ALONE]
    start = time.perf_counter()
    try:
        results |= batch_cases(batch)
    except Exception:
        error = traceback.format_exc(limit=4)[-3000:]
        results |= {name: {"error": error} for name in batch}
    results["batch_seconds"] = {"seconds": round(time.perf_counter() - start, 3)}
    return results


# Transforms whose HLO is inspected (they compute a global norm): compiled
# one by one. The others are compiled together, to save time.
ALONE = frozenset(
    {
        "clip_by_global_norm",
        "clip_by_global_norm[inject]",
        "normalize_by_global_norm",
        "project_l2_ball",
    }
)


ORDS: tuple[Any, ...] = (1, 2, "inf")


def gspmd_results(axis_type: jax.sharding.AxisType) -> dict[str, Any]:
    names = sorted(available())
    if axis_type != jax.sharding.AxisType.Explicit:
        # Auto: one transform of each kind (fewer compilations).
        names = [n for n in names if n in AUTO_SUBSET]
    results = {}
    for kind in SPECS:
        if kind == "2d" and axis_type == jax.sharding.AxisType.Explicit:
            # The usual Explicit-mode setup: a mesh context (``fsdp`` runs
            # without one: the shardings of the arguments are enough).
            with jax.set_mesh(make_mesh(kind, axis_type)):
                results[kind] = mesh_results(kind, axis_type, names)
        else:
            results[kind] = mesh_results(kind, axis_type, names)
    return results


# ---------------------------------------------------------------------------
# Stacked layers (API.md section 6): GPT blocks stacked (LAYERS_STACKED, ...),
# as nnx.scan / nn.scan / lax.scan leave them. Three layouts: on the FSDP
# mesh with the layer axis replicated and the model axes sharded ("fsdp"),
# with the layer axis sharded over the devices ("pipeline"), and on the 2-D
# mesh with the layers over ``data`` and the model axes Megatron-style over
# ``model`` ("pipeline_2d": per-layer norms only, to keep the run short).
# ---------------------------------------------------------------------------

LAYERS_STACKED = 8
STACKED_SHAPES: dict[str, tuple[int, ...]] = {
    "wte": (VOCAB, D),
    "blocks/ln1/scale": (LAYERS_STACKED, D),
    "blocks/attn/qkv/kernel": (LAYERS_STACKED, D, 3 * D),
    "blocks/attn/qkv/bias": (LAYERS_STACKED, 3 * D),
    "blocks/attn/out/kernel": (LAYERS_STACKED, D, D),
    "blocks/attn/out/bias": (LAYERS_STACKED, D),
    "blocks/mlp/fc/kernel": (LAYERS_STACKED, D, HIDDEN),
    "blocks/mlp/fc/bias": (LAYERS_STACKED, HIDDEN),
    "blocks/mlp/proj/kernel": (LAYERS_STACKED, HIDDEN, D),
    "blocks/mlp/proj/bias": (LAYERS_STACKED, D),
    "ln_f/scale": (D,),
}
STACK = nox.masks.by_path("^blocks/")  # one stack axis under blocks/, else 0


def stacked_fsdp_spec(name: str, shape: tuple[int, ...]) -> P:
    """Layer axis replicated; the first other axis that 8 divides sharded."""
    first = 1 if name.startswith("blocks/") else 0
    for axis in range(first, len(shape)):
        if shape[axis] % 8 == 0:
            return P(*([None] * axis), "fsdp", *([None] * (len(shape) - axis - 1)))
    return P(*([None] * len(shape)))


def stacked_pipeline_spec(name: str, shape: tuple[int, ...]) -> P:
    """The layer axis sharded over the 8 devices; the rest replicated."""
    if name.startswith("blocks/"):
        return P("fsdp", *([None] * (len(shape) - 1)))
    return P(*([None] * len(shape)))


def stacked_2d_spec(name: str, shape: tuple[int, ...]) -> P:
    """Layers over ``data`` (4), model axes over ``model`` (2)."""
    if not name.startswith("blocks/"):
        return P(None, "model") if name == "wte" else P(None)
    if name.endswith(("qkv/kernel", "fc/kernel")):
        return P("data", None, "model")  # column-parallel
    if name.endswith(("out/kernel", "proj/kernel")):
        return P("data", "model", None)  # row-parallel
    if name.endswith(("qkv/bias", "fc/bias")):
        return P("data", "model")
    return P("data", None)  # the other biases and the norm scales


# layout -> (mesh, spec, whether the transforms run on it too)
STACKED_LAYOUTS: dict[str, tuple[str, Callable[[str, tuple[int, ...]], P], bool]] = {
    "fsdp": ("fsdp", stacked_fsdp_spec, True),
    "pipeline": ("fsdp", stacked_pipeline_spec, True),
    "pipeline_2d": ("2d", stacked_2d_spec, False),
}

STACKED_TRANSFORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clip_by_norm": lambda: nox.clip_by_norm(1.0, stack_axes=STACK),
    "adaptive_clip": lambda: nox.adaptive_clip(0.05, stack_axes=STACK),
    "max_norm": lambda: nox.max_norm(0.5, stack_axes=STACK),
    "max_norm[out_first]": lambda: nox.max_norm(
        0.5, axis="out_first", stack_axes=STACK
    ),
    "unit_norm": lambda: nox.unit_norm(stack_axes=STACK),
    "min_max_norm": lambda: nox.min_max_norm(0.8, 1.2, stack_axes=STACK),
    "prox_group_l1": lambda: nox.prox_group_l1(0.1, 0.5, stack_axes=STACK),
    "clip_spectral_norm": lambda: nox.clip_spectral_norm(1.0, stack_axes=STACK),
}


def stacked_available() -> dict[str, Callable[[], optax.GradientTransformation]]:
    return {
        name: make
        for name, make in STACKED_TRANSFORMS.items()
        if name.split("[")[0] in nox.__all__
    }


def stacked_trees() -> tuple[Tree, Tree]:
    rng = np.random.default_rng(2)
    shapes = STACKED_SHAPES.items()
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes}
    params = {k: jnp.asarray(0.2 * rng.normal(size=s), jnp.float32) for k, s in shapes}
    return grads, params


def stacked_results() -> dict[str, Any]:
    """Per-layer norms and stack-aware transforms on sharded stacked trees."""
    grads, params = stacked_trees()
    names = sorted(stacked_available())
    steps = {name: update_fn(stacked_available()[name]()) for name in names}

    def per_layer_norms(g: Tree) -> Tree:
        return nox.leaf_norms(g, stack_axes=STACK)

    def together(g: Tree, p: Tree) -> dict[str, Tree]:
        return {name: step(g, p) for name, step in steps.items()}

    want_norms = jax.jit(per_layer_norms)(grads)
    want = jax.jit(together)(grads, params)
    results: dict[str, Any] = {}
    for layout, (kind, spec, with_transforms) in STACKED_LAYOUTS.items():
        mesh = make_mesh(kind, jax.sharding.AxisType.Explicit)
        shard = {k: NamedSharding(mesh, spec(k, s)) for k, s in STACKED_SHAPES.items()}
        sgrads = jax.device_put(grads, shard)
        sparams = jax.device_put(params, shard)

        def norms_case(sgrads: Tree = sgrads) -> dict[str, Any]:
            exe: Any = jax.jit(per_layer_norms).lower(sgrads).compile()
            got = exe(sgrads)
            return {
                "rel_err": max_rel_err(got, want_norms),
                "shapes": {k: list(v.shape) for k, v in got.items()},
                **collectives(exe.as_text()),
            }

        def transforms_case(
            sgrads: Tree = sgrads, sparams: Tree = sparams
        ) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, step in steps.items():
                out[name] = {
                    "traced_sharding": traced_sharding_mismatches(step, sgrads, sparams)
                }
            exe: Any = jax.jit(together).lower(sgrads, sparams).compile()
            got = exe(sgrads, sparams)
            for name in steps:
                out[name]["rel_err"] = max_rel_err(got[name], want[name])
                out[name]["sharding"] = sharding_mismatches(
                    got[name], sgrads, explicit=True
                )
            out["together"] = collectives(exe.as_text())
            return out

        with jax.set_mesh(mesh):
            results[layout] = {"leaf_norms": timed(norms_case)}
            if with_transforms:
                results[layout]["transforms"] = timed(transforms_case)
    return results


# ---------------------------------------------------------------------------
# axis_name inside shard_map and pmap: a gradient split over 4 devices.
# ---------------------------------------------------------------------------


def axis_name_results() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    grads = {
        "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    spec = P("x")
    results: dict[str, Any] = {}
    cotangent = jax.tree.map(
        lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), grads
    )

    def transforms(axis_name: Any) -> dict[str, Callable[[Tree], Any]]:
        found: dict[str, Callable[[Tree], Any]] = {
            "global_norm": lambda g: nox.global_norm(g, axis_name=axis_name),
            "global_norm[ord=1]": lambda g: nox.global_norm(g, 1, axis_name=axis_name),
            "global_norm[ord=inf]": lambda g: nox.global_norm(
                g, "inf", axis_name=axis_name
            ),
        }
        makers: dict[str, Callable[..., optax.GradientTransformation]] = {
            "clip_by_global_norm": lambda **kw: nox.clip_by_global_norm(1.0, **kw),
            "normalize_by_global_norm": lambda **kw: nox.normalize_by_global_norm(
                1.0, **kw
            ),
            "clip_by_norm": lambda **kw: nox.clip_by_norm(1.0, **kw),
        }
        for name, make in makers.items():
            try:
                tx = make(axis_name=axis_name)
            except TypeError:  # no axis_name argument
                continue
            found[name] = functools.partial(apply_once, tx)
        return found

    reference = transforms(None)
    sgrads = jax.device_put(grads, NamedSharding(mesh, spec))

    def shard_map_case(name: str, f: Callable[[Tree], Any]) -> dict[str, Any]:
        is_norm = name.startswith("global_norm")
        mapped = jax.jit(
            jax.shard_map(
                f, mesh=mesh, in_specs=(spec,), out_specs=P() if is_norm else spec
            )
        )
        got, want = mapped(sgrads), reference[name](grads)
        out: dict[str, Any] = {"rel_err": max_rel_err(got, want)}
        if not is_norm:
            out["norm"] = float(nox.global_norm(got))

            def loss(g: Tree, fn: Callable[[Tree], Any]) -> jax.Array:
                return (
                    nox.global_norm(jax.tree.map(jnp.multiply, fn(g), cotangent)) ** 2
                )

            got_grad = jax.jit(jax.grad(loss), static_argnums=1)(sgrads, mapped)
            want_grad = jax.grad(loss)(grads, reference[name])
            zero = jax.tree.map(jnp.zeros_like, sgrads)
            zero_grad = jax.jit(jax.grad(loss), static_argnums=1)(zero, mapped)
            out["grad_rel_err"] = max_rel_err(got_grad, want_grad)
            out["grad_finite_at_zero"] = all(
                bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(zero_grad)
            )
        return out

    def pmap_case(name: str, f: Callable[[Tree], Any]) -> dict[str, Any]:
        split = jax.tree.map(lambda x: x.reshape(4, -1, *x.shape[1:]), grads)
        got = jax.pmap(f, axis_name="x", devices=jax.devices()[:4])(split)
        want = reference[name](grads)
        if name.startswith("global_norm"):
            return {"rel_err": max_rel_err(np.asarray(got), np.full(4, want))}
        merged = jax.tree.map(lambda x, g: x.reshape(g.shape), got, grads)

        def loss(g: Tree) -> jax.Array:
            out = jax.pmap(f, axis_name="x", devices=jax.devices()[:4])(g)
            return jnp.sum(jax.tree.map(lambda a: jnp.sum(jnp.square(a)), out)["w"])

        grad = jax.grad(loss)(split)
        zero_grad = jax.grad(loss)(jax.tree.map(jnp.zeros_like, split))
        return {
            "rel_err": max_rel_err(merged, want),
            "norm": float(nox.global_norm(merged)),
            "grad_finite": all(
                bool(jnp.all(jnp.isfinite(x)))
                for x in jax.tree.leaves((grad, zero_grad))
            ),
        }

    for name, f in transforms("x").items():
        results[f"shard_map/{name}"] = run_case(
            functools.partial(shard_map_case, name, f)
        )
        results[f"pmap/{name}"] = raised(functools.partial(pmap_case, name, f))

    def optax_baseline() -> dict[str, Any]:
        tx = optax.clip_by_global_norm(1.0)
        mapped = jax.shard_map(
            lambda g: tx.update(g, tx.init(g))[0],
            mesh=mesh,
            in_specs=(spec,),
            out_specs=spec,
        )
        return {"norm": float(nox.global_norm(mapped(sgrads)))}

    results["shard_map/optax.clip_by_global_norm"] = run_case(optax_baseline)
    results |= mixed_replication_results(transforms)
    return results


def raised(fn: Callable[[], Any]) -> dict[str, Any]:
    """The ``ValueError`` text ``fn`` raises (``raised: None`` if it returns)."""
    try:
        fn()
    except ValueError as error:
        return {"raised": str(error)}
    return {"raised": None}


def _weighted_sum(tree: Tree, weights: Tree) -> jax.Array:
    parts = jax.tree.map(lambda a, b: jnp.sum(a * b), tree, weights)
    return jnp.sum(jnp.stack(jax.tree.leaves(parts)))


def mixed_replication_results(
    transforms: Callable[[Any], dict[str, Callable[[Tree], Any]]],
) -> dict[str, Any]:
    """A tensor-parallel tree: one leaf split over ``x``, one replicated.

    Inside ``shard_map`` the replicated leaf must count once (JAX records
    that it does not vary over ``x``), not once per device; on a 2-D mesh a
    tuple ``axis_name`` with leaves varying over one axis, both or none.
    """
    rng = np.random.default_rng(2)
    grads = {
        "w": jnp.asarray(5 * rng.normal(size=(8, 6)), jnp.float32),
        "scale": jnp.asarray(5 * rng.normal(size=(6,)), jnp.float32),
    }
    specs = {"w": P("x"), "scale": P()}
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    sgrads = {
        k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()
    }
    true = float(
        np.sqrt(
            sum(np.sum(np.square(np.asarray(v, np.float64))) for v in grads.values())
        )
    )
    reference = transforms(None)
    results: dict[str, Any] = {"mixed/true_norm": true}

    def case(name: str, f: Callable[[Tree], Any]) -> dict[str, Any]:
        is_norm = name.startswith("global_norm")
        mapped = jax.jit(
            jax.shard_map(
                f, mesh=mesh, in_specs=(specs,), out_specs=P() if is_norm else specs
            )
        )
        got, want = mapped(sgrads), reference[name](grads)
        out: dict[str, Any] = {"rel_err": max_rel_err(got, want)}
        if is_norm:
            out["value"] = float(got)
            out["all_reduce"] = collectives(
                str(mapped.lower(sgrads).compile().as_text())
            )["all_reduce"]
            return out
        out["norm"] = float(nox.global_norm(got))
        out["leaf_norms"] = {k: float(v) for k, v in nox.leaf_norms(got).items()}

        def loss(g: Tree) -> jax.Array:
            weights = jax.tree.map(
                lambda x: jnp.cos(jnp.arange(x.size)).reshape(x.shape), g
            )
            return _weighted_sum(f_out(g), weights)

        def f_out(g: Tree) -> Tree:
            return jax.shard_map(f, mesh=mesh, in_specs=(specs,), out_specs=specs)(g)

        def ref_loss(g: Tree) -> jax.Array:
            weights = jax.tree.map(
                lambda x: jnp.cos(jnp.arange(x.size)).reshape(x.shape), g
            )
            return _weighted_sum(reference[name](g), weights)

        got_grad = jax.jit(jax.grad(loss))(sgrads)
        out["grad_rel_err"] = max_rel_err(got_grad, jax.grad(ref_loss)(grads))
        return out

    for name, f in transforms("x").items():
        results[f"mixed/{name}"] = run_case(functools.partial(case, name, f))

    def norm_grad() -> dict[str, Any]:
        def norm(g: Tree) -> jax.Array:
            return jax.shard_map(
                lambda t: nox.global_norm(t, axis_name="x"),
                mesh=mesh,
                in_specs=(specs,),
                out_specs=P(),
            )(g)

        got = jax.jit(jax.grad(norm))(sgrads)
        zero = jax.jit(jax.grad(norm))(jax.tree.map(jnp.zeros_like, sgrads))
        return {
            "rel_err": max_rel_err(got, jax.grad(nox.global_norm)(grads)),
            "zero_at_zero": all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(zero)),
        }

    results["mixed/grad(global_norm)"] = run_case(norm_grad)

    def unchecked() -> None:
        jax.jit(
            jax.shard_map(
                lambda t: nox.global_norm(t, axis_name="x"),
                mesh=mesh,
                in_specs=(specs,),
                out_specs=P(),
                check_vma=False,
            )
        )(sgrads)

    results["mixed/check_vma=False"] = raised(unchecked)

    # 2-D mesh (2 x 2), tuple axis_name: leaves varying over a, b, both, none.
    mesh2 = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    grads2 = {
        "ab": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "a": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "none": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    }
    specs2 = {"ab": P("a", "b"), "a": P("a"), "b": P(None, "b"), "none": P()}
    sgrads2 = {
        k: jax.device_put(v, NamedSharding(mesh2, specs2[k])) for k, v in grads2.items()
    }

    def tuple_case() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ord in (2, 1, "inf"):
            mapped = jax.jit(
                jax.shard_map(
                    lambda t, o=ord: nox.global_norm(t, o, axis_name=("a", "b")),
                    mesh=mesh2,
                    in_specs=(specs2,),
                    out_specs=P(),
                )
            )
            out[f"rel_err[ord={ord}]"] = max_rel_err(
                mapped(sgrads2), nox.global_norm(grads2, ord)
            )
            if ord == 2:
                hlo = str(mapped.lower(sgrads2).compile().as_text())
                out["all_reduce"] = collectives(hlo)["all_reduce"]
        tx = nox.clip_by_global_norm(1.0, axis_name=("a", "b"))
        clipped = jax.jit(
            jax.shard_map(
                lambda t: tx.update(t, tx.init(t))[0],
                mesh=mesh2,
                in_specs=(specs2,),
                out_specs=specs2,
            )
        )(sgrads2)
        out["clipped_norm"] = float(nox.global_norm(clipped))
        # Only "a" named: "b" is then the caller's (each b-slice its own norm).
        only_a = jax.jit(
            jax.shard_map(
                lambda t: nox.global_norm(
                    {"a": t["a"], "none": t["none"]}, axis_name="a"
                ),
                mesh=mesh2,
                in_specs=(specs2,),
                out_specs=P(),
            )
        )(sgrads2)
        out["rel_err[only_a]"] = max_rel_err(
            only_a, nox.global_norm({"a": grads2["a"], "none": grads2["none"]})
        )
        return out

    results["mixed/tuple_axis_name"] = run_case(tuple_case)
    return results


# ---------------------------------------------------------------------------
# Telemetry (API.md section 9): record_layer_norms on the sharded stacked
# trees (same numbers, no all-gather), and its all-reduce count on a GPT with
# its blocks stacked (16 leaves) and unstacked (40 leaves for 3 layers; the
# benchmark counts GPT-2's 148, which compiles too slowly for the test run).
# ---------------------------------------------------------------------------

GPT_LAYERS = 3


def gpt_shapes(stacked: bool, layers: int = GPT_LAYERS) -> dict[str, tuple[int, ...]]:
    """GPT-2's leaves at small widths: 16 stacked, ``4 + 12 * layers`` unstacked."""
    block = {
        "ln1/scale": (D,),
        "ln1/bias": (D,),
        "attn/qkv/kernel": (D, 3 * D),
        "attn/qkv/bias": (3 * D,),
        "attn/out/kernel": (D, D),
        "attn/out/bias": (D,),
        "ln2/scale": (D,),
        "ln2/bias": (D,),
        "mlp/fc/kernel": (D, HIDDEN),
        "mlp/fc/bias": (HIDDEN,),
        "mlp/proj/kernel": (HIDDEN, D),
        "mlp/proj/bias": (D,),
    }
    shapes: dict[str, tuple[int, ...]] = {"wte": (VOCAB, D), "wpe": (CONTEXT, D)}
    if stacked:
        shapes |= {f"blocks/{k}": (layers, *v) for k, v in block.items()}
    else:
        for i in range(layers):
            shapes |= {f"h{i}/{k}": v for k, v in block.items()}
    return shapes | {"ln_f/scale": (D,), "ln_f/bias": (D,)}


def telemetry_results() -> dict[str, Any]:
    if "record_layer_norms" not in nox.__all__:
        return {"error": "record_layer_norms is not in norm_optax.__all__"}
    fields = [
        "input_norms",
        "output_norms",
        "param_norms",
        "update_ratios",
        "input_norm",
        "output_norm",
    ]
    grads, params = stacked_trees()
    tx = nox.record_layer_norms(nox.clip_by_global_norm(1.0), stack_axes=STACK)

    def step(g: Tree, p: Tree) -> tuple[Tree, dict[str, Any]]:
        out, state = tx.update(g, tx.init(p), p)
        return out, {f: getattr(state, f) for f in fields}

    want = jax.jit(step)(grads, params)
    inner = nox.clip_by_global_norm(1.0)

    def inner_step(g: Tree, p: Tree) -> Tree:
        return inner.update(g, inner.init(p), p)[0]

    results: dict[str, Any] = {}
    for layout in ("fsdp", "pipeline_2d"):  # a stack axis sharded in the second
        kind, spec, _ = STACKED_LAYOUTS[layout]
        mesh = make_mesh(kind, jax.sharding.AxisType.Explicit)
        shard = {k: NamedSharding(mesh, spec(k, s)) for k, s in STACKED_SHAPES.items()}
        sgrads = jax.device_put(grads, shard)
        sparams = jax.device_put(params, shard)

        def case(sgrads: Tree = sgrads, sparams: Tree = sparams) -> dict[str, Any]:
            exe: Any = jax.jit(step).lower(sgrads, sparams).compile()
            out, stats = exe(sgrads, sparams)
            plain = jax.jit(inner_step)(sgrads, sparams)  # inner alone, sharded
            return {
                "rel_err": max_rel_err(stats, want[1]),
                "out_equal": all(
                    bool(np.array_equal(np.asarray(out[k]), np.asarray(plain[k])))
                    for k in out
                ),
                "sharding": sharding_mismatches(out, sgrads, explicit=True),
                "shapes": {k: list(v.shape) for k, v in stats["output_norms"].items()},
                **collectives(exe.as_text()),
            }

        with jax.set_mesh(mesh):
            results[layout] = timed(case)

    # bfloat16 layers whose squares leave float32's range (1e-25, 1e25): the
    # rescaled pass runs sharded too, with the same norms, no all-gather,
    # and one more all-reduce (in the rescue branch).
    mesh = make_mesh("2d", jax.sharding.AxisType.Explicit)
    rng = np.random.default_rng(4)
    scales = np.array([1e-25, 1.0, 1e25, 1e-30, 1.0, 1.0, 1.0, 1.0])[:, None, None]
    wide = {
        "blocks": jnp.asarray(scales * rng.normal(size=(8, 16, 8)), jnp.bfloat16),
        "head": jnp.asarray(1e-22 * rng.normal(size=(8, 4)), jnp.bfloat16),
    }
    range_tx = nox.record_layer_norms(
        optax.identity(), stack_axes={"blocks": 1, "head": 0}
    )

    def range_step(g: Tree) -> dict[str, Any]:
        state = range_tx.update(g, range_tx.init(g), g)[1]
        return {f: getattr(state, f) for f in ("input_norms", "input_norm")}

    range_want = jax.jit(range_step)(wide)

    def range_case() -> dict[str, Any]:
        specs = {"blocks": P("data", None, "model"), "head": P("data", None)}
        sharded = {
            k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in wide.items()
        }
        exe: Any = jax.jit(range_step).lower(sharded).compile()
        got = exe(sharded)
        rel = max(
            float(
                np.max(
                    np.abs(np.asarray(a, np.float64) / np.asarray(b, np.float64) - 1)
                )
            )
            for a, b in zip(
                jax.tree.leaves(got), jax.tree.leaves(range_want), strict=True
            )
        )
        smallest = min(float(np.min(np.asarray(a))) for a in jax.tree.leaves(got))
        return {"rel": rel, "smallest": smallest, **collectives(exe.as_text())}

    with jax.set_mesh(mesh):
        results["bf16_range"] = timed(range_case)

    # All-reduces of the compiled update against the number of leaves: the
    # inner transform (sgd) needs none, so every one is the telemetry's.
    rng = np.random.default_rng(3)
    for stacked in (True, False):
        shapes = gpt_shapes(stacked)

        def spec2d(name: str, shape: tuple[int, ...]) -> P:
            inner = mesh2d_spec(
                name.split("/", 1)[-1], shape[-2:] if "kernel" in name else shape[-1:]
            )
            lead = (None,) * (len(shape) - len(inner))
            return P(*lead, *inner)

        def count(
            shapes: dict[str, tuple[int, ...]] = shapes, stacked: bool = stacked
        ) -> dict[str, Any]:
            shard = {k: NamedSharding(mesh, spec2d(k, s)) for k, s in shapes.items()}
            tree = {
                k: jax.device_put(
                    jnp.asarray(rng.normal(size=s), jnp.float32), shard[k]
                )
                for k, s in shapes.items()
            }
            stack = nox.masks.by_path("^blocks/") if stacked else None
            tx = nox.record_layer_norms(optax.sgd(0.1), stack_axes=stack)
            exe: Any = (
                jax.jit(lambda g, p: tx.update(g, tx.init(p), p))
                .lower(tree, tree)
                .compile()
            )
            return {"leaves": len(shapes), **collectives(exe.as_text())}

        with jax.set_mesh(mesh):
            results["stacked_gpt" if stacked else "unstacked_gpt"] = timed(count)
    return results


# ---------------------------------------------------------------------------
# Norm geometry (API.md 8.4): the polar factor of sharded matrices.
# ---------------------------------------------------------------------------

# case -> (mesh, leaf shape, stack axes, spec). (8, 32, 16): 8 stacked
# layers; the 2-D mesh has 4 x 2 devices, so "model" (2) divides the 2 local
# layers of each "data" shard.
GEOMETRY_CASES: dict[str, tuple[str, tuple[int, ...], int, P]] = {
    "stack_sharded": ("fsdp", (8, 32, 16), 1, P("fsdp", None, None)),
    "stack_fsdp_rows": ("fsdp", (8, 32, 16), 1, P(None, "fsdp", None)),
    "stack_fsdp_cols": ("fsdp", (8, 32, 16), 1, P(None, None, "fsdp")),
    "stack_2d": ("2d", (8, 32, 16), 1, P("data", "model", None)),
    "unstacked_rows": ("fsdp", (32, 16), 0, P("fsdp", None)),
    "unstacked_cols": ("fsdp", (32, 16), 0, P(None, "fsdp")),
    "two_matrix_axes": ("2d", (8, 32, 16), 1, P(None, "data", "model")),
    # A conv kernel (H, W, I, O) is the matrix (H*W*I, O): I sharded.
    "unstacked_conv_fan_in": ("fsdp", (3, 3, 8, 16), 0, P(None, None, "fsdp", None)),
}
# Explicit axes run the layouts whose collectives differ (fewer compilations).
GEOMETRY_EXPLICIT = frozenset({"stack_fsdp_rows", "stack_2d", "unstacked_cols"})


def geometry_results() -> dict[str, Any]:
    """``orthogonalize``/``scale_by_lmo`` on sharded leaves: numbers, shardings, HLO."""
    from norm_optax import _polar  # the unpartitioned kernel, for the naive count

    rng = np.random.default_rng(3)
    results: dict[str, Any] = {}
    for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
        mode = "explicit" if axis_type == jax.sharding.AxisType.Explicit else "auto"
        out: dict[str, Any] = {}
        for name, (kind, shape, stack, spec) in GEOMETRY_CASES.items():
            if mode == "explicit" and name not in GEOMETRY_EXPLICIT:
                continue

            def case(
                kind: str = kind,
                shape: Any = shape,
                stack: int = stack,
                spec: P = spec,
                axis_type: Any = axis_type,
                mode: str = mode,
            ) -> dict[str, Any]:
                x = jnp.asarray(rng.normal(size=shape), jnp.float32)
                mesh = make_mesh(kind, axis_type)
                sx = jax.device_put(x, NamedSharding(mesh, spec))

                def f(x: jax.Array) -> jax.Array:
                    return nox.orthogonalize(x, stack_axes=stack)

                exe: Any = jax.jit(f, in_shardings=sx.sharding).lower(sx).compile()
                got = exe(sx)
                return {
                    "max_abs_err": float(np.max(np.abs(got - jax.jit(f)(x)))),
                    "sharding": sharding_mismatches(
                        {"x": got}, {"x": sx}, explicit=mode == "explicit"
                    ),
                    **collectives(exe.as_text()),
                }

            out[name] = timed(case)
        results[mode] = out

    def naive(spec: P) -> dict[str, Any]:
        """The same Newton-Schulz without the partitioning (what GSPMD does)."""
        options = _polar.polar_options("newton_schulz", 5, "standard")
        mesh = make_mesh("fsdp", jax.sharding.AxisType.Auto)
        x = jnp.asarray(rng.normal(size=(8, 32, 16)), jnp.float32)
        sx = jax.device_put(x, NamedSharding(mesh, spec))
        exe: Any = (
            jax.jit(lambda m: _polar.polar_factor(m, options), in_shardings=sx.sharding)
            .lower(sx)
            .compile()
        )
        return collectives(exe.as_text())

    def small_tree() -> dict[str, Any]:
        """``scale_by_lmo`` ("auto", Muon scale) on a stacked tree, FSDP, Auto."""
        shapes = {
            "blocks/kernel": ((8, 32, 16), P(None, "fsdp", None)),
            "blocks/bias": ((8, 16), P(None, "fsdp")),
            "wte": ((32, 16), P(None, "fsdp")),
        }
        grads = {
            k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, (s, _) in shapes.items()
        }
        tx = nox.scale_by_lmo(stack_axes=STACK, dims_scale="muon")
        mesh = make_mesh("fsdp", jax.sharding.AxisType.Auto)
        shard = {k: NamedSharding(mesh, spec) for k, (_, spec) in shapes.items()}
        sgrads = jax.device_put(grads, shard)
        got = jax.jit(lambda g: apply_once(tx, g), in_shardings=(shard,))(sgrads)
        want = jax.jit(lambda g: apply_once(tx, g))(grads)
        return {
            "max_abs_err": max(float(np.max(np.abs(got[k] - want[k]))) for k in shapes),
            "sharding": sharding_mismatches(got, sgrads, explicit=False),
        }

    results["naive_rows"] = run_case(lambda: naive(P(None, "fsdp", None)))
    results["naive_cols"] = run_case(lambda: naive(P(None, None, "fsdp")))
    results["tree"] = timed(small_tree)
    return results


SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "explicit": lambda: gspmd_results(jax.sharding.AxisType.Explicit),
    "auto": lambda: gspmd_results(jax.sharding.AxisType.Auto),
    "axis_name": axis_name_results,
    "stacked": stacked_results,
    "telemetry": telemetry_results,
    "geometry": geometry_results,
}


def main(path: str, sections: list[str]) -> None:
    results: dict[str, Any] = {
        "devices": len(jax.devices()),
        "transforms": sorted(available()),
        "stacked_transforms": sorted(stacked_available()),
    }
    seconds = {}
    for key in sections:
        start = time.perf_counter()
        results[key] = run_case(SECTIONS[key])
        seconds[key] = time.perf_counter() - start
    results["seconds"] = seconds
    with open(path, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else [*SECTIONS])
