"""How per-leaf partial norms are combined into one scalar.

This is the only place that knows about devices. ``reduce_to_scalar`` turns
elementwise parts (``|x|^2``, ``|x|``, ...) of every leaf into one scalar:

* inside ``shard_map``/``pmap`` (``axis_name`` given) the local total is
  combined across the named axis with one ``psum``/``pmax``;
* under ``jax.jit`` with GSPMD shardings, XLA partitions each per-leaf
  reduction and inserts the collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["reduce_to_scalar"]


def _leaf_total(part: jax.Array, kind: str, dtype: np.dtype) -> jax.Array:
    if kind == "sum":
        return jnp.sum(part, dtype=dtype)
    return jnp.max(part, initial=0).astype(dtype)


def reduce_to_scalar(
    parts: Sequence[jax.Array], kind: str, dtype: np.dtype, axis_name: Any = None
) -> jax.Array:
    """Sum (``kind="sum"``) or max (``kind="max"``) of all elements of ``parts``.

    Args:
      parts: arrays of elementwise values, each already in an accumulation
        dtype (``float32`` or wider).
      kind: ``"sum"`` or ``"max"``; the max of nothing is ``0``.
      dtype: the dtype of the result.
      axis_name: a mapped axis name (or tuple of names) to combine across.

    Returns:
      A scalar of ``dtype``.
    """
    totals = [_leaf_total(p, kind, dtype) for p in parts]
    if not totals:
        total = jnp.zeros((), dtype)
    elif kind == "sum":
        total = sum(totals[1:], start=totals[0])
    else:
        total = jnp.max(jnp.stack(totals))
    if axis_name is None:
        return total
    if kind == "sum":
        return jax.lax.psum(total, axis_name)
    return jax.lax.pmax(total, axis_name)
