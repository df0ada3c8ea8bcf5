"""The registry of every public transform, in one place: the battery runs each.

Every public transform of API.md sections 2, 5 and 7 has at least one
``Case`` here (``test_battery.test_every_public_transform_is_registered``
fails otherwise). A case says how to build the transform, which of its
arguments are numeric hyper-parameters (traced under
``optax.inject_hyperparams`` and differentiated in the meta-gradient test),
which must be static under ``inject_hyperparams`` (sizes, callables,
structural arguments), whether it reads ``params``, and how many update
steps the battery runs (state threaded), so that stateful companions get
past their warm-up and the battery checks their statistics, not their
first step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import norm_optax as nox


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    hyper: tuple[str, ...]  # numeric, injectable, differentiable arguments
    needs_params: bool = False
    steps: int = 1  # updates the battery runs, the state threaded through
    static: tuple[str, ...] = ()  # static_args under optax.inject_hyperparams
    stateless: bool = True  # state is optax.EmptyState()
    # A variant of a transform that another case already covers: run by the
    # slow step of .ci/run, so that the README's default run stays short.
    variant: bool = False
    # Builds on optax optimizers (AdamW), which do not survive strict dtype
    # promotion: the battery runs it under jax's default promotion, as users do.
    standard_promotion: bool = False

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        return self.factory(**{**self.kwargs, **overrides})

    def __str__(self) -> str:
        return self.name


# ``stack_axes`` as a callable of the tree: the conv kernel (3, 3, 2, 4) is a
# stack of 3 layers, the other leaves are not stacked.
STACK_CONV = nox.masks.by_path("^conv/")


CLIPPING = [
    Case("clip_by_value", nox.clip_by_value, {"max_delta": 0.5}, ("max_delta",)),
    Case("clip_by_norm", nox.clip_by_norm, {"max_norm": 1.0}, ("max_norm",)),
    Case(
        "clip_by_norm_l1", nox.clip_by_norm, {"max_norm": 2.0, "ord": 1}, ("max_norm",)
    ),
    Case(
        "clip_by_norm_inf",
        nox.clip_by_norm,
        {"max_norm": 0.5, "ord": "inf"},
        ("max_norm",),
    ),
    Case(
        "clip_by_norm_stacked",
        nox.clip_by_norm,
        {"max_norm": 1.0, "stack_axes": STACK_CONV},
        ("max_norm",),
        static=("stack_axes",),
    ),
    Case(
        "clip_by_global_norm", nox.clip_by_global_norm, {"max_norm": 1.0}, ("max_norm",)
    ),
    Case(
        "clip_by_global_norm_l1",
        nox.clip_by_global_norm,
        {"max_norm": 3.0, "ord": 1},
        ("max_norm",),
    ),
    Case(
        "clip_by_global_norm_inf",
        nox.clip_by_global_norm,
        {"max_norm": 0.5, "ord": jnp.inf},
        ("max_norm",),
    ),
    Case(
        "normalize_by_global_norm",
        nox.normalize_by_global_norm,
        {"norm": 2.0},
        ("norm",),
    ),
    Case(
        "adaptive_clip",
        nox.adaptive_clip,
        {"clipping": 0.05},
        ("clipping", "eps"),
        needs_params=True,
    ),
    Case(
        "adaptive_clip_stacked_out_first",
        nox.adaptive_clip,
        {"clipping": 0.05, "axis": "out_first", "stack_axes": STACK_CONV},
        ("clipping", "eps"),
        needs_params=True,
        static=("stack_axes",),
    ),
]

# Projections, decay and prox (API.md 2.2, 2.3, 7). A callable ``mask`` or
# ``stack_axes`` would be taken for a schedule by ``optax.inject_hyperparams``,
# so those cases list it in ``static``.
PROJECTION_AND_DECAY: list[Case] = [
    Case("clip_weights", nox.clip_weights, {"max_value": 1.0}, ("max_value",), True),
    Case("non_negative", nox.non_negative, {}, (), True),
    Case("max_norm", nox.max_norm, {"max_value": 1.0}, ("max_value",), True),
    # ``axis=()``: every element is its own unit (valid for every leaf rank).
    Case(
        "max_norm_axis_empty",
        nox.max_norm,
        {"max_value": 1.0, "axis": ()},
        ("max_value",),
        True,
    ),
    Case(
        "max_norm_stacked_masked",
        nox.max_norm,
        {
            "max_value": 1.0,
            "stack_axes": STACK_CONV,
            "mask": nox.masks.matrices_only(stack_axes=STACK_CONV),
        },
        ("max_value",),
        True,
        static=("stack_axes", "mask"),
    ),
    Case("unit_norm", nox.unit_norm, {}, (), True),
    Case(
        "unit_norm_out_first",
        nox.unit_norm,
        {"axis": "out_first", "stack_axes": STACK_CONV},
        (),
        True,
        static=("stack_axes",),
    ),
    Case(
        "min_max_norm",
        nox.min_max_norm,
        {"min_value": 0.5, "max_value": 2.0},
        ("min_value", "max_value"),
        True,
    ),
    Case(
        "min_max_norm_rate",
        nox.min_max_norm,
        {"min_value": 0.5, "max_value": 2.0, "rate": 0.5},
        ("min_value", "max_value", "rate"),
        True,
    ),
    Case("project_l2_ball", nox.project_l2_ball, {"radius": 2.0}, ("radius",), True),
    Case("project_l1_ball", nox.project_l1_ball, {"radius": 5.0}, ("radius",), True),
    Case(
        "project_linf_ball", nox.project_linf_ball, {"radius": 1.0}, ("radius",), True
    ),
    Case("add_l2_decay", nox.add_l2_decay, {"coeff": 0.1}, ("coeff",), True),
    Case("add_l1_decay", nox.add_l1_decay, {"coeff": 0.1}, ("coeff",), True),
    Case(
        "prox_l1",
        nox.prox_l1,
        {"coeff": 0.5, "learning_rate": 1.0},
        ("coeff", "learning_rate"),
        True,
    ),
    Case(
        "prox_l1_schedule",
        nox.prox_l1,
        {"coeff": 0.5, "learning_rate": optax.linear_schedule(1.0, 0.5, 4)},
        ("coeff",),
        True,
        steps=3,
        stateless=False,
    ),
    Case(
        "prox_group_l1",
        nox.prox_group_l1,
        {"coeff": 1.0, "learning_rate": 1.0},
        ("coeff", "learning_rate"),
        True,
    ),
    Case(
        "prox_group_l1_stacked_schedule",
        nox.prox_group_l1,
        {
            "coeff": 1.0,
            "learning_rate": optax.exponential_decay(1.0, 1, 0.5),
            "stack_axes": STACK_CONV,
        },
        ("coeff",),
        True,
        steps=3,
        static=("stack_axes",),
        stateless=False,
    ),
    Case(
        "prox_elastic_net",
        nox.prox_elastic_net,
        {"l1": 0.5, "l2": 0.5, "learning_rate": 1.0},
        ("l1", "l2", "learning_rate"),
        True,
    ),
]

# Stateful companions (API.md 5, 7): several steps, the state threaded.
STATEFUL: list[Case] = [
    Case(
        "record_norms",
        nox.record_norms,
        {"inner": nox.clip_by_global_norm(1.0)},
        (),
        steps=2,
        stateless=False,
    ),
    Case(
        "record_layer_norms",
        nox.record_layer_norms,
        {"inner": nox.clip_by_global_norm(1.0), "stack_axes": STACK_CONV},
        (),
        steps=2,
        static=("stack_axes",),
        stateless=False,
    ),
    Case(
        "autoclip",
        nox.autoclip,
        {"percentile": 10.0, "history": 4},
        ("percentile",),
        steps=3,
        static=("history",),
        stateless=False,
    ),
    Case("zclip", nox.zclip, {}, (), steps=3, stateless=False),
    Case(
        "zclip_after_warmup",
        nox.zclip,
        {"warmup_steps": 2, "max_norm": None, "z_threshold": 1.0},
        ("z_threshold", "alpha"),
        steps=4,
        stateless=False,
    ),
    Case(
        "skip_on_spike",
        nox.skip_on_spike,
        {"inner": nox.max_norm(1.0), "window": 2},
        ("num_sigma",),
        needs_params=True,
        steps=4,
        static=("window",),
        stateless=False,
    ),
]

# One case covers every layout at once: the dense kernel (5, 3) as one
# (out, in) matrix and the conv kernel (3, 3, 2, 4) as 3 stacked (3, 8)
# matrices, in the PyTorch layout; the plain Flax layout is checked against SVD in
# test_spectral.py (the power iteration compiles slowly: one case here).
STATEFUL.append(
    Case(
        "clip_spectral_norm_stacked_out_first",
        nox.clip_spectral_norm,
        {
            "max_value": 1.0,
            "num_iters": 2,
            "axis": "out_first",
            "stack_axes": STACK_CONV,
        },
        ("max_value",),
        needs_params=True,
        steps=2,
        static=("stack_axes",),
        stateless=False,
    )
)

# Optimizers built from scale_by_lmo (API.md 8.3): several steps, the
# momentum state threaded; the stacked cases read the conv kernel as 3
# layers of (out, in) = (3, 8) matrices.
OPTIMIZERS: list[Case] = [
    Case(
        "muon",
        nox.muon,
        {"learning_rate": 1e-2},
        ("learning_rate", "momentum"),
        needs_params=True,
        steps=2,
        stateless=False,
        standard_promotion=True,
    ),
    Case(
        "muon_stacked_out_first_schedule",
        nox.muon,
        {
            "learning_rate": optax.linear_schedule(1e-2, 1e-3, 4),
            "nesterov": False,
            "ns_coeffs": "polar_express",
            "weight_decay": 0.1,
            "axis": "out_first",
            "stack_axes": STACK_CONV,
        },
        ("momentum", "weight_decay"),
        needs_params=True,
        steps=2,
        static=("stack_axes",),
        stateless=False,
        standard_promotion=True,
    ),
    Case(
        "scion",
        nox.scion,
        {"learning_rate": 0.1, "radius": 2.0},
        ("learning_rate", "beta"),
        needs_params=True,
        steps=2,
        stateless=False,
    ),
    Case(
        "scion_constrained_stacked_schedule",
        nox.scion,
        {
            "learning_rate": optax.linear_schedule(0.1, 0.01, 4),
            "constrained": True,
            "axis": "out_first",
            "stack_axes": STACK_CONV,
        },
        ("beta",),
        needs_params=True,
        steps=2,
        static=("stack_axes",),
        stateless=False,
    ),
]

# Variants whose transform another case covers with its defaults (ord, axis,
# rate, warm-up): the battery runs them in the slow step of .ci/run. The
# stack_axes, out_first and schedule variants stay in the default run, but
# for the optimizers, whose stacked cases are the slowest to compile.
VARIANTS = {
    "clip_by_norm_l1",
    "clip_by_norm_inf",
    "clip_by_global_norm_l1",
    "clip_by_global_norm_inf",
    "max_norm_axis_empty",
    "min_max_norm_rate",
    "zclip",
    # muon and scion with their defaults stay in the default run; the stacked,
    # out_first, scheduled ones (slow to compile) run in the slow step.
    "muon_stacked_out_first_schedule",
    "scion_constrained_stacked_schedule",
}
CASES = [
    dataclasses.replace(c, variant=c.name in VARIANTS)
    for c in CLIPPING + PROJECTION_AND_DECAY + STATEFUL + OPTIMIZERS
]

# Norm geometry (API.md 8.2). The battery tree's dense kernel (5, 3) and conv
# kernel (3, 3, 2, 4) are matrices, its bias and scalar are not ("auto" gives
# them "rms"). ``norm`` as a callable of the updates: one norm per leaf.
GEOMETRY_NORMS = {"kernel']": "spectral", "bias']": "sign"}


def geometry_norms(tree: Any) -> Any:
    """Per leaf: spectral dense kernel, sign bias, unit conv, frobenius scalar."""

    def name(path: Any, leaf: Any) -> str:
        del leaf
        key = jax.tree_util.keystr(path)
        if key.startswith("['conv']"):
            return "unit"
        return next(
            (v for k, v in GEOMETRY_NORMS.items() if key.endswith(k)), "frobenius"
        )

    return jax.tree_util.tree_map_with_path(name, tree)


CASES += [
    # (the defaults, "auto": in the slow step; the norm tree covers more.)
    Case("scale_by_lmo", nox.scale_by_lmo, {"radius": 2.0}, ("radius",), variant=True),
    Case(
        "scale_by_lmo_norm_tree",
        nox.scale_by_lmo,
        {"norm": geometry_norms, "dims_scale": "muon"},
        ("radius",),
        static=("norm",),
    ),
    Case(
        "scale_by_lmo_stacked_out_first",
        nox.scale_by_lmo,
        {
            "radius": 0.5,
            "dims_scale": "spectral",
            "axis": "out_first",
            "stack_axes": STACK_CONV,
        },
        ("radius",),
        static=("stack_axes",),
        variant=True,
    ),
]


def step_updates(updates: Any, step: int) -> Any:
    """The updates of step ``step`` of a run: the same tree, growing norms."""
    factor = 1.0 + 0.5 * step

    def scale(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
            return (x * factor).astype(x.dtype)
        return x

    return jax.tree.map(scale, updates)


def normal_tree(
    seed: int, shapes: dict[str, Any], dtype: Any = jnp.float32, scale: float = 1.0
) -> dict[str, Any]:
    """Seeded N(0, scale^2) arrays with the nested-dict structure of ``shapes``.

    Values are drawn in the dicts' insertion order, so a seed always gives the
    same arrays for the same ``shapes``.
    """
    rng = np.random.default_rng(seed)

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: build(value) for key, value in node.items()}
        return jnp.asarray(scale * rng.standard_normal(node), dtype=dtype)

    return build(shapes)


def make_tree(
    seed: int, dtype: Any = jnp.float32, scale: float = 3.0
) -> dict[str, Any]:
    """A small model-like tree: Dense, Conv, a scalar, an int leaf and a None."""
    shapes = {
        "dense": {"kernel": (5, 3), "bias": (3,)},
        "conv": {"kernel": (3, 3, 2, 4)},
        "scale": (),
    }
    tree = normal_tree(seed, shapes, dtype, scale)
    return {**tree, "step": jnp.asarray(7, jnp.int32), "frozen": None}
