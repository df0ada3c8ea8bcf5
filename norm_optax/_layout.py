"""Layouts: which axes of a leaf are layers, which are units, and per-leaf specs.

Private, on the floor below the norms and the transforms. Three arguments of
the public API are "a value for every leaf, a tree of values matching the
params, or a callable ``params -> tree``": ``mask``, ``axis`` and
``stack_axes``. :func:`resolve_spec` turns any of them into one value per
leaf of the updates, with one rule for telling a tree from a function: a
callable is called only if it is not itself a tree of valid values (an
Equinox ``Module`` or a Flax NNX ``State`` of bools is callable, and is a
tree). A spec tree may also be a *prefix* of the updates (as in
:func:`optax.masked`): a value at an inner node applies to the subtree.

:func:`unit_axes` turns a leaf's shape, its number of stack axes ``s`` and its
``axis`` value into the axes a unit reduces over (the conventions of the
Norms and :doc:`Layouts </layouts>` pages):

* the first ``s`` axes index independent layers and are never reduced;
* ``axis=None`` is the Flax convention on the other axes: every axis but the
  last when there are at least two, all of them otherwise;
* ``axis="out_first"`` is the PyTorch/Equinox convention: every axis but the
  first non-stack axis when there are at least two, all of them otherwise;
* an int or a tuple of ints names axes of the whole leaf (negative ones count
  from the end); naming a stack axis is an error.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from norm_optax._types import LeafAxis, PyTree

__all__ = [
    "OUT_FIRST",
    "check_axis",
    "is_axis_value",
    "is_mask_value",
    "is_stack_value",
    "layer_axes",
    "path_str",
    "resolve_spec",
    "stack_count",
    "unit_axes",
]

OUT_FIRST = "out_first"


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


def _where(path: str) -> str:
    return path or "<root>"


def _shape_of(path: str, shape: tuple[int, ...]) -> str:
    """``shape (5, 3) of the leaf at a/b`` (just the shape for a lone array)."""
    return f"shape {shape} of the leaf at {path}" if path else f"shape {shape}"


# ---------------------------------------------------------------------------
# Spec values.
# ---------------------------------------------------------------------------


def is_mask_value(x: Any) -> bool:
    """A mask entry: a Python or NumPy bool (``None`` marks a missing leaf)."""
    return x is None or isinstance(x, (bool, np.bool_))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_stack_value(x: Any) -> bool:
    """A ``stack_axes`` entry: an int, a bool (``True`` = 1) or ``None`` (0)."""
    return x is None or _is_int(x) or isinstance(x, (bool, np.bool_))


def is_axis_value(x: Any) -> bool:
    """An ``axis`` entry: ``None``, an int, ``"out_first"`` or a tuple of ints."""
    if x is None or _is_int(x) or isinstance(x, str):
        return True
    return isinstance(x, (tuple, list)) and all(_is_int(a) for a in x)


def _is_tree_of(spec: Any, is_value: Callable[[Any], bool]) -> bool:
    leaves = jax.tree.leaves(spec, is_leaf=is_value)
    return all(is_value(leaf) for leaf in leaves)


@dataclasses.dataclass(frozen=True)
class _Repeated:
    """One spec value for the ``count`` leaves of a subtree (a pytree leaf)."""

    value: Any
    count: int


def resolve_spec(
    spec: Any,
    updates: PyTree,
    params: PyTree,
    *,
    name: str,
    is_value: Callable[[Any], bool],
) -> list[Any]:
    """One value of ``spec`` per leaf of ``updates`` (in ``jax.tree.leaves`` order).

    ``spec`` is a single value (applied to every leaf), a tree of values with
    the structure of ``updates`` or a prefix of it, or a callable called on
    ``params`` that returns such a tree. ``None`` leaves of ``updates`` (no
    leaf) get nothing.

    Raises:
      ValueError: the tree does not match ``updates`` (naming both).
      TypeError: a callable returned something that is not such a tree.
    """
    if isinstance(spec, jax.core.Tracer):
        raise TypeError(
            f"{name} is structural and cannot be traced: under "
            f"optax.inject_hyperparams list it in static_args."
        )
    if is_value(spec):
        return [spec] * len(jax.tree.leaves(updates))
    if callable(spec) and not _is_tree_of(spec, is_value):
        spec = spec(params)
        if is_value(spec):
            return [spec] * len(jax.tree.leaves(updates))
    if not _is_tree_of(spec, is_value):
        raise TypeError(
            f"{name} must be a value for every leaf, a tree of such values "
            f"matching the params, or a callable returning one; got {spec!r}."
        )
    try:
        per_subtree = jax.tree.map(
            lambda value, sub: _Repeated(value, len(jax.tree.leaves(sub))),
            spec,
            updates,
            is_leaf=is_value,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"The structure of {name} does not match the updates (it is a tree "
            f"with the structure of the params, or a prefix of it).\n"
            f"  updates: {jax.tree.structure(updates)}\n"
            f"  {name}: {jax.tree.structure(spec, is_leaf=is_value)}"
        ) from error
    out: list[Any] = []
    for repeated in jax.tree.leaves(per_subtree):
        out.extend([repeated.value] * repeated.count)
    return out


# ---------------------------------------------------------------------------
# Per-leaf layouts.
# ---------------------------------------------------------------------------


def stack_count(value: Any, path: str, shape: tuple[int, ...]) -> int:
    """A ``stack_axes`` entry as a count, checked against the leaf's shape.

    Raises:
      ValueError: negative, or larger than the leaf's ndim (naming the leaf).
      TypeError: not an int or a bool.
    """
    if value is None:
        return 0
    if not is_stack_value(value):
        raise TypeError(
            f"stack_axes must be an int >= 0 or a bool, got {value!r} for the "
            f"leaf at {_where(path)}."
        )
    count = int(operator.index(value))
    if count < 0:
        raise ValueError(
            f"stack_axes must be >= 0, got {value!r} for {_shape_of(path, shape)}."
        )
    if count > len(shape):
        raise ValueError(
            f"stack_axes={count} is larger than the ndim of "
            f"{_shape_of(path, shape)} (ndim {len(shape)})."
        )
    return count


def check_axis(axis: Any) -> None:
    """Raises at construction for a single ``axis`` value that can never be valid.

    Trees and callables are checked per leaf at update time.
    """
    if isinstance(axis, str) and axis != OUT_FIRST:
        raise ValueError(
            f"axis must be None, an int, ints or 'out_first', got {axis!r}."
        )
    if isinstance(axis, (tuple, list)) and any(
        isinstance(a, (bool, np.bool_)) for a in axis
    ):
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")


def _explicit_axes(
    axis: int | Sequence[int], path: str, shape: tuple[int, ...], stack: int
) -> tuple[int, ...]:
    ndim = len(shape)
    axes = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    out = []
    for a in axes:
        if not _is_int(a):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {axis!r} is out of range for {_shape_of(path, shape)} "
                f"(ndim {ndim})."
            )
        a = int(a) % ndim
        if a < stack:
            raise ValueError(
                f"axis {axis!r} names stack axis {a} of {_shape_of(path, shape)} "
                f"(stack_axes={stack}): the stack axes index layers and are "
                f"never reduced."
            )
        out.append(a)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis of {_shape_of(path, shape)}.")
    return tuple(sorted(out))


def unit_axes(
    axis: LeafAxis, path: str, shape: tuple[int, ...], stack: int
) -> tuple[int, ...]:
    """The axes (sorted, absolute) a unit of this leaf reduces over.

    Raises:
      ValueError: an axis out of range, repeated, or naming a stack axis (the
        message names the leaf's path and shape), or an unknown string.
    """
    ndim = len(shape)
    core = tuple(range(stack, ndim))
    if axis is None:
        return core[:-1] if len(core) >= 2 else core
    if isinstance(axis, str):
        if axis != OUT_FIRST:
            raise ValueError(
                f"axis must be None, an int, ints or 'out_first', got {axis!r} "
                f"for the leaf at {_where(path)}."
            )
        return core[1:] if len(core) >= 2 else core
    return _explicit_axes(axis, path, shape, stack)


def layer_axes(shape: tuple[int, ...], stack: int) -> tuple[int, ...]:
    """The axes of one layer's slice: every axis after the ``stack`` first."""
    return tuple(range(stack, len(shape)))
