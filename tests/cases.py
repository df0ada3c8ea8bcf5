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

# Projection and decay transforms (API.md 2.2, 2.3) register here.
PROJECTION_AND_DECAY: list[Case] = []

CASES = CLIPPING + PROJECTION_AND_DECAY


def make_tree(
    seed: int, dtype: Any = jnp.float32, scale: float = 3.0
) -> dict[str, Any]:
    """A small model-like tree: Dense, Conv, a scalar, an int leaf and a None."""
    rng = np.random.default_rng(seed)

    def arr(*shape: int) -> jax.Array:
        return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)

    return {
        "dense": {"kernel": arr(5, 3), "bias": arr(3)},
        "conv": {"kernel": arr(3, 3, 2, 4)},
        "scale": arr(),
        "step": jnp.asarray(7, jnp.int32),
        "frozen": None,
    }
