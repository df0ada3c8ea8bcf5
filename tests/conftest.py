"""Strict test settings shared by every test module.

* Our own code runs under strict dtype promotion and rank promotion that
  raises (autouse fixture). optax's optimizers do not survive strict
  promotion (``1 - decay**count`` mixes a float and an int32), so a test
  that runs them is marked ``@pytest.mark.standard_promotion``: it runs with
  jax's default settings, as users do.
* Warnings are errors (``filterwarnings`` in ``pyproject.toml``).
* ``x64`` turns on 64-bit floats for one test; tolerances are per dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis.settings.register_profile(
    "default", deadline=None, max_examples=40, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile(
    "thorough", deadline=None, max_examples=500, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "standard_promotion: run with jax's default (not strict) promotion rules",
    )


@pytest.fixture(autouse=True)
def _strict_promotion(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("standard_promotion"):
        yield  # jax's defaults, as users run (optax, flax, README code)
        return
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def x64() -> Iterator[None]:
    """64-bit floats for the duration of one test."""
    with jax.enable_x64(True):
        yield


# Relative tolerances per dtype: a few units in the last place of each.
RTOL = {
    jnp.dtype(jnp.float16): 5e-3,
    jnp.dtype(jnp.bfloat16): 3e-2,
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.float64): 1e-12,
    jnp.dtype(jnp.complex64): 1e-5,
    jnp.dtype(jnp.complex128): 1e-12,
}


def rtol(dtype: Any) -> float:
    return RTOL[jnp.dtype(dtype)]


def to_f64(tree: object) -> object:
    """A tree of float64 (complex128) NumPy arrays, for references."""

    def convert(x: object) -> object:
        a = np.asarray(x)
        if np.iscomplexobj(a):
            return a.astype(np.complex128)
        if a.dtype == jnp.bfloat16 or np.issubdtype(a.dtype, np.floating):
            return a.astype(np.float64)
        return a

    return jax.tree.map(convert, tree)
