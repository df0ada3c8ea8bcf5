"""Names for the types every floor of the package uses, and the dtype rules.

The bottom floor (no package imports). The aliases say what an argument is
for; they are all ``Any`` underneath, since pytrees, tracers and Python
numbers mix freely in JAX code.

* :data:`PyTree` -- a tree of arrays (dict, ``FrozenDict``, ``nnx.State``,
  an Equinox ``Module``, ...).
* :data:`Scalar` -- a real number: a Python float/int or a 0-d array, traced
  under :func:`optax.inject_hyperparams`.
* :data:`Mask` -- a tree of bools matching the params (or a prefix of it),
  or a callable ``params -> that tree``.
* :data:`Axis` -- which axes a unit reduces over: ``None`` (Flax kernel
  convention), an int, a tuple of ints, ``"out_first"`` (PyTorch/Equinox),
  or a tree of those matching the params, or a callable returning one.
* :data:`StackAxes` -- how many leading axes index stacked layers: an int
  ``>= 0`` for every leaf, a tree of ints or bools matching the tree, or a
  callable returning one.

And the two dtype rules of the norms (the Norms page of the docs): which
leaves take part (:func:`is_inexact`) and what they accumulate in
(:func:`accumulation_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Axis",
    "LeafAxis",
    "Mask",
    "Ord",
    "PyTree",
    "Scalar",
    "Schedule",
    "StackAxes",
    "accumulation_dtype",
    "is_inexact",
]

PyTree: TypeAlias = Any
"""A pytree whose inexact leaves take part (others pass through)."""

Scalar: TypeAlias = Any
"""A real number: Python float/int, NumPy or JAX 0-d array, or a tracer."""

Schedule: TypeAlias = Callable[[Any], Any]
"""An optax schedule: step count -> value."""

Ord: TypeAlias = Any
"""``1``, ``2``, ``inf`` / ``"inf"``, or a traced scalar holding one of them."""

Mask: TypeAlias = Any
"""A tree of bools matching the params (or a prefix), or ``params -> tree``."""

LeafAxis: TypeAlias = int | Sequence[int] | str | None
"""The unit convention of one leaf: ``None``, an int, ints or ``"out_first"``."""

Axis: TypeAlias = Any
"""A :data:`LeafAxis` for every leaf, a tree of them, or ``params -> tree``."""

StackAxes: TypeAlias = Any
"""An int ``>= 0`` for every leaf, a tree of ints/bools, or ``tree -> tree``."""


def is_inexact(leaf: Any) -> bool:
    """Whether ``leaf`` takes part in norms and transforms: a real or complex float."""
    if isinstance(leaf, (float, complex)):
        return True
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:  # e.g. float0, structured numpy dtypes
        return False


def accumulation_dtype(dtype: Any) -> np.dtype:
    """The real dtype a ``dtype`` leaf is accumulated in: ``float32`` or wider."""
    real = np.dtype(jnp.finfo(dtype).dtype)  # complex64 -> float32 etc.
    if real.itemsize < 4:
        return np.dtype(np.float32)
    return real


def as_array(leaf: Any) -> jax.Array:
    """``leaf`` as a JAX array (a no-op for arrays and tracers)."""
    return leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
