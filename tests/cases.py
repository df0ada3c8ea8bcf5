"""The registry of stateless transforms that ``test_battery.py`` runs over.

Every public stateless transform of API.md section 2 has one ``Case`` here
(``test_battery.test_every_public_transform_is_registered`` fails otherwise).
A case says how to build the transform, which of its arguments are numeric
hyper-parameters (traced under ``optax.inject_hyperparams`` and
differentiated in the meta-gradient test), and whether it reads ``params``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        return self.factory(**{**self.kwargs, **overrides})

    def __str__(self) -> str:
        return self.name


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
]

# Projection and decay transforms (API.md 2.2, 2.3) register here. A callable
# ``mask`` would be taken for a schedule by ``optax.inject_hyperparams`` (it
# belongs in ``static_args``), so masks and most ``axis`` variants are tested in
# test_projection.py, test_decay.py and test_masks.py instead.
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
    Case("unit_norm", nox.unit_norm, {}, (), True),
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
]

CASES = CLIPPING + PROJECTION_AND_DECAY


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
