"""Small helpers every transform shares: argument checks, params and masks.

Nothing here is public. The rules (API.md section 3):

* concrete bad hyper-parameters raise at construction, naming the argument
  and the value; traced ones (under ``optax.inject_hyperparams``) cannot be
  checked and are the caller's responsibility;
* a missing ``params`` raises one shared message;
* a ``params``/``mask`` tree that does not match ``updates`` raises naming
  both structures;
* leaves that are not inexact arrays (``None``, :class:`optax.MaskedNode`,
  integer, bool, ``float0``) pass through every transform unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from norm_optax.norms import accumulation_dtype, is_inexact

__all__ = [
    "Mask",
    "check_nonnegative",
    "check_params",
    "check_range",
    "check_same_structure",
    "checked_masks",
    "concrete_value",
    "leaf_params",
    "map_inexact",
    "params_transform",
    "path_str",
    "resolve_mask",
    "scale_leaf",
]

Mask = Any  # a pytree of bools (or a prefix of params), or params -> that tree.
LeafFn = Callable[[str, jax.Array, jax.Array], jax.Array]  # (path, u, p) -> u'


def concrete_value(value: Any, name: str) -> float | None:
    """The float value of a concrete scalar, or ``None`` if it is traced.

    Raises:
      TypeError: ``value`` is not a real number or a scalar array.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, str)) or value is None:
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    try:
        array = np.asarray(value)
    except Exception as error:
        raise TypeError(f"{name} must be a real number, got {value!r}.") from error
    if array.ndim != 0 or not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(f"{name} must be a real scalar, got {value!r}.")
    return float(array)


def check_nonnegative(value: Any, name: str) -> None:
    """Raises ``ValueError`` if a concrete ``value`` is negative or NaN."""
    number = concrete_value(value, name)
    if number is not None and (math.isnan(number) or number < 0):
        raise ValueError(f"{name} must be >= 0 and not NaN, got {value!r}.")


def check_range(value: Any, name: str, low: float, high: float) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is in ``[low, high]``."""
    number = concrete_value(value, name)
    if number is not None and not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}.")


def check_params(params: Any, transform: str) -> None:
    """The one message for a transform that needs ``params`` and got none."""
    if params is None:
        raise ValueError(
            f"{transform} needs the current parameters: call "
            f"`update(updates, state, params)`. In optax.chain the params are "
            f"passed on to every transform; with flax.nnx.Optimizer they are "
            f"passed for you."
        )


def check_same_structure(updates: Any, other: Any, other_name: str) -> None:
    """Raises ``ValueError`` naming both structures if they differ."""
    # (PyTreeDef's stub declares no __eq__, hence the Any.)
    expected: Any = jax.tree.structure(updates)
    got: Any = jax.tree.structure(other)
    if expected != got:
        raise ValueError(
            f"The structure of {other_name} does not match the updates.\n"
            f"  updates: {expected}\n  {other_name}: {got}"
        )


def path_str(path: tuple[Any, ...]) -> str:
    """A key path as ``a/b/0/kernel`` (without NNX's trailing ``value``)."""
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(str(getattr(entry, attr)))
                break
        else:
            keys.append(str(entry))
    if keys and keys[-1] == "value":
        keys.pop()
    return "/".join(keys)


def resolve_mask(mask: Mask, updates: Any, params: Any) -> Any:
    """``mask`` as a tree of bools with exactly the structure of ``updates``.

    A callable mask is called on ``params``. A mask may be a *prefix* of the
    updates tree (as in :func:`optax.masked`): a bool at an inner node applies
    to the whole subtree below it.
    """
    if callable(mask):
        mask = mask(params)
    try:
        return jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: bool(m), sub),
            mask,
            updates,
            is_leaf=lambda x: x is None,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(
            "The structure of mask does not match the updates (a mask is a "
            "tree of bools with the structure of params, or a prefix of it).\n"
            f"  updates: {jax.tree.structure(updates)}\n"
            f"  mask: {jax.tree.structure(mask)}"
        ) from error


def map_inexact(
    fn: Callable[..., jax.Array],
    updates: Any,
    *rest: Any,
    mask: Any = None,
    with_path: bool = False,
) -> Any:
    """Applies ``fn(u, *r)`` to each inexact leaf of ``updates``.

    Other leaves pass through unchanged, as do leaves whose ``mask`` entry is
    ``False``. With ``with_path=True`` ``fn`` also gets the leaf's path string
    as its first argument (for error messages).
    """
    masks = mask if mask is not None else jax.tree.map(lambda _: True, updates)

    def apply(path: tuple[Any, ...], u: Any, m: bool, *r: Any) -> Any:
        if not m or not is_inexact(u):
            return u
        if with_path:
            return fn(path_str(path), u, *r)
        return fn(u, *r)

    return jax.tree_util.tree_map_with_path(apply, updates, masks, *rest)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` in the wider of ``x``'s dtype and float32, cast back once.

    ``scale`` is a real scalar or an array broadcastable to ``x``.
    """
    acc = accumulation_dtype(x.dtype)
    scale = jnp.asarray(scale).astype(acc)
    if jnp.finfo(x.dtype).bits < 32:  # half precision: scale in float32
        return (x.astype(acc) * scale).astype(x.dtype)
    return x * scale.astype(x.dtype)


def leaf_params(transform: str, path: str, u: jax.Array, p: Any) -> jax.Array | None:
    """``p`` as an array of ``u``'s shape, or ``None`` if it is not inexact."""
    if not is_inexact(p):
        return None
    p = jnp.asarray(p)
    if p.shape != u.shape:
        raise ValueError(
            f"{transform}: params at {path or '<root>'} have shape {p.shape}, "
            f"the updates {u.shape}."
        )
    return p


def checked_masks(transform: str, updates: Any, params: Any, mask: Mask) -> Any:
    """The update-time checks of a params-reading transform; the resolved mask.

    Raises if ``params`` is missing or does not match ``updates``; returns
    ``mask`` as a bool tree matching ``updates`` (all ``True`` if ``None``).
    """
    check_params(params, transform)
    check_same_structure(updates, params, "params")
    if mask is None:
        return jax.tree.map(lambda _: True, updates)
    return resolve_mask(mask, updates, params)


def params_transform(
    transform: str, leaf_fn: LeafFn, mask: Mask
) -> optax.GradientTransformation:
    """A stateless transform applying ``leaf_fn(path, u, p)`` to each leaf.

    Checks that ``params`` is given and matches the updates, resolves
    ``mask``; masked-out, non-inexact leaves and leaves whose params are not
    inexact pass through unchanged.
    """

    def apply(path: str, u: jax.Array, p: Any) -> jax.Array:
        p = leaf_params(transform, path, u, p)
        return u if p is None else leaf_fn(path, u, p)

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: Any = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        masks = checked_masks(transform, updates, params, mask)
        out = map_inexact(apply, updates, params, mask=masks, with_path=True)
        return out, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
