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

**Broadcast biases.** A bias is added to a layer's output, never contracted
with its input: it has no fan-in. Equinox stores a convolution's bias with
size-1 *broadcast* axes, ``(out, 1, 1)`` for ``Conv2d`` (``(out, 1)`` for
``Conv1d``), where Flax and PyTorch store ``(out,)``. A leaf whose last key is
``bias`` and whose non-stack axes after the first all have size 1 is read as
the vector of its first axis (:func:`is_broadcast_bias`): it is not a matrix
(:func:`is_matrix`) and, under ``axis=None`` or ``"out_first"``, it is one
unit (reduced over all its non-stack axes), exactly as its Flax twin
``(out,)``. The name is what tells the two apart: an Equinox ``Linear`` with
one input (``Linear("scalar", out)``) stores its weight ``(out, 1)`` too, and
that *is* a matrix with fan-in 1, as is the Flax kernel ``(1, out)`` of the
same layer. Size-1 axes of any other leaf are real axes (a Flax ``Dense(1)``
head has the matrix kernel ``(in, 1)``).

**Bare numbers.** ``optax.inject_hyperparams`` calls every callable argument
not listed in its ``static_args`` with the step count (an int32 scalar), and
turns a number into an array. A structural argument (``mask``, ``axis``,
``stack_axes``) that arrives as such a number, and a selector of
``norm_optax.masks`` called with one, raise ``TypeError`` saying to list the
argument in ``static_args`` (:func:`check_not_number`): they never silently
select nothing.
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
    "MASK_TEXT",
    "OUT_FIRST",
    "check_axis",
    "check_not_number",
    "check_specs",
    "is_axis_value",
    "is_broadcast_bias",
    "is_mask_value",
    "is_matrix",
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


MASK_TEXT = (
    "True or False (or 1 or 0, also as a concrete 0-d bool or integer array, "
    "as optax.masked accepts)"
)
"""What a mask entry may be, for error messages."""

_WHAT = {
    "mask": MASK_TEXT,
    "stack_axes": "an int >= 0 or a bool (True = 1)",
    "axis": "None, an int, a tuple of ints or 'out_first'",
}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_scalar_array(x: Any) -> bool:
    """A 0-d JAX or NumPy array (a tracer included)."""
    return isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0


def is_mask_value(x: Any) -> bool:
    """A mask entry: a bool, or 0 or 1 (``None`` marks a missing leaf).

    As :func:`optax.masked` accepts: Python and NumPy bools and ints, and
    concrete 0-d bool or integer arrays (``jnp.array(True)``); only 0 and 1
    among the ints. A traced value is not an entry (a mask is structural).
    """
    if x is None or isinstance(x, (bool, np.bool_)):
        return True
    if _is_int(x):
        return int(x) in (0, 1)
    if _is_scalar_array(x) and not isinstance(x, jax.core.Tracer):
        dtype = np.dtype(x.dtype)
        if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
            return int(x) in (0, 1)
    return False


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


def _static_args_error(name: str, got: Any, also: str = "") -> TypeError:
    return TypeError(
        f"{name} is structural, not a number: got {got!r} where a tree (or a "
        f"callable returning one) belongs. optax.inject_hyperparams turns a "
        f"number into an array (traced under jit) and calls every callable "
        f"argument not "
        f"listed in its static_args with the step count, so a callable {name} "
        f"would select nothing: list {name!r}{also} in static_args, e.g. "
        f"optax.inject_hyperparams(tx, static_args=({name!r},))."
    )


def check_not_number(tree: Any, name: str = "mask", *, also: str = "") -> None:
    """Raises ``TypeError`` if ``tree`` is a bare integer, not a params tree.

    What :func:`optax.inject_hyperparams` passes to a callable argument not
    listed in ``static_args``: the step count, an int32 scalar (concrete in
    ``init``, traced in ``update`` under ``jit``). Parameters are never
    integers, so a selector given one is being used as a schedule.
    """
    if isinstance(tree, (bool, np.bool_)):
        return
    if _is_int(tree) or (
        _is_scalar_array(tree) and np.issubdtype(np.dtype(tree.dtype), np.integer)
    ):
        raise _static_args_error(name, tree, also)


def _describe(value: Any) -> str:
    if isinstance(value, jax.core.Tracer):
        return f"a traced {value.dtype} value"
    return f"{value!r} (of type {type(value).__name__})"


def _bad_leaf(spec: Any, is_value: Callable[[Any], bool]) -> str:
    """Where the first entry of ``spec`` that is not a value is, and what it is."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_value)[0]:
        if not is_value(leaf):
            where = path_str(path)
            return f"{_describe(leaf)}" + (f" at {where}" if where else "")
    return repr(spec)


def _has_box(tree: Any) -> bool:
    """Whether ``tree`` holds a Flax variable box (``Param(value=...)``)."""
    found = []

    def visit(node: Any) -> bool:
        if callable(getattr(node, "get_metadata", None)):
            found.append(node)
            return True
        return False

    jax.tree.leaves(tree, is_leaf=visit)
    return bool(found)


def _check_tree(spec: Any, name: str, is_value: Callable[[Any], bool]) -> None:
    """Raises ``TypeError`` naming the first entry of ``spec`` that is no value."""
    if _is_tree_of(spec, is_value):
        return
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(spec))
    what = _WHAT.get(name, "a valid value")
    raise TypeError(
        f"{name} must be {what} for every leaf, a tree of such values matching "
        f"the params (or a prefix of it), or a callable params -> that tree; "
        f"got {_bad_leaf(spec, is_value)}."
        + (
            f" {name} is structural and cannot be traced: under "
            f"optax.inject_hyperparams list {name!r} in static_args."
            if traced
            else ""
        )
    )


def check_specs(*, mask: Any = None, axis: Any = None, stack_axes: Any = None) -> None:
    """Construction-time checks of ``mask``, ``axis`` and ``stack_axes``.

    A single value, or a tree of values, is checked now (a negative
    ``stack_axes``, a float where an int belongs, an unknown axis string);
    a callable is checked per leaf when called, at update time.

    Raises:
      ValueError: a value that can never be valid (``stack_axes=-1``).
      TypeError: a value of the wrong type (``stack_axes=1.0``), or a bare
        array (see :func:`resolve_spec`).
    """
    check_axis(axis)
    for name, spec, is_value in (
        ("mask", mask, is_mask_value),
        ("axis", axis, is_axis_value),
        ("stack_axes", stack_axes, is_stack_value),
    ):
        if spec is None or is_value(spec):
            pass
        elif _is_scalar_array(spec):
            raise _static_args_error(name, spec)
        elif callable(spec) and not _is_tree_of(spec, is_value):
            continue
        else:
            _check_tree(spec, name, is_value)
        if name == "stack_axes":
            for path, value in jax.tree_util.tree_flatten_with_path(
                spec, is_leaf=is_value
            )[0]:
                if _is_int(value) and value < 0:
                    where = path_str(path)
                    raise ValueError(
                        f"stack_axes must be >= 0, got {value!r}"
                        + (f" at {where}." if where else ".")
                    )


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
      TypeError: ``spec`` (or what a callable returned) is not such a tree; a
        bare array or a traced value (what ``optax.inject_hyperparams``
        passes for an argument not in ``static_args``) says to list ``name``
        in ``static_args``.
    """
    if is_value(spec):
        return [spec] * len(jax.tree.leaves(updates))
    if _is_scalar_array(spec):
        raise _static_args_error(name, spec)
    if callable(spec) and not _is_tree_of(spec, is_value):
        spec = spec(params)
        if is_value(spec):
            return [spec] * len(jax.tree.leaves(updates))
    _check_tree(spec, name, is_value)
    try:
        per_subtree = jax.tree.map(
            lambda value, sub: _Repeated(value, len(jax.tree.leaves(sub))),
            spec,
            updates,
            is_leaf=is_value,
        )
    except (ValueError, TypeError) as error:
        hint = ""
        if _has_box(spec) and not _has_box(updates):
            hint = (
                f"\n{name} holds Flax variable boxes (Param(value=...)), the "
                f"updates bare arrays (nnx.Optimizer passes nnx.as_pure of the "
                f"state to tx.update): build {name} with the selectors of "
                f"norm_optax.masks, which unbox, or unbox it with "
                f"nnx.as_pure(...)."
            )
        raise ValueError(
            f"The structure of {name} does not match the updates (it is a tree "
            f"with the structure of the params, or a prefix of it).\n"
            f"  updates: {jax.tree.structure(updates)}\n"
            f"  {name}: {jax.tree.structure(spec, is_leaf=is_value)}{hint}"
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
            f"stack_axes must be an int >= 0 or a bool (True = 1), got "
            f"{_describe(value)} for the leaf at {_where(path)}."
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


def is_broadcast_bias(path: str, shape: tuple[int, ...], stack: int) -> bool:
    """Whether the leaf is a bias with size-1 broadcast axes (Equinox's conv bias).

    Its last key is ``bias`` and its non-stack axes after the first all have
    size 1: ``(out, 1, 1)``, ``(layers, out, 1)`` with ``stack=1``. It is read
    as the vector of its first non-stack axis (see the module docstring).
    """
    core = shape[stack:]
    name = path.rsplit("/", 1)[-1]
    return name == "bias" and len(core) >= 2 and all(d == 1 for d in core[1:])


def is_matrix(path: str, shape: tuple[int, ...], stack: int) -> bool:
    """Whether one layer's slice of the leaf is a matrix (fan-in and units).

    At least two non-stack axes, and not a broadcast bias
    (:func:`is_broadcast_bias`): Equinox's ``Conv2d`` bias ``(out, 1, 1)`` is
    a vector, as its Flax twin ``(out,)`` is; a weight ``(out, 1)`` (an
    Equinox ``Linear`` with one input) is a matrix, as its Flax twin
    ``(1, out)`` is.
    """
    return len(shape) - stack >= 2 and not is_broadcast_bias(path, shape, stack)


def unit_axes(
    axis: LeafAxis, path: str, shape: tuple[int, ...], stack: int
) -> tuple[int, ...]:
    """The axes (sorted, absolute) a unit of this leaf reduces over.

    A broadcast bias (:func:`is_broadcast_bias`) is one unit under
    ``axis=None`` and ``"out_first"``, as its Flax twin ``(out,)`` is.

    Raises:
      ValueError: an axis out of range, repeated, or naming a stack axis (the
        message names the leaf's path and shape), or an unknown string.
    """
    ndim = len(shape)
    core = tuple(range(stack, ndim))
    if (axis is None or axis == OUT_FIRST) and is_broadcast_bias(path, shape, stack):
        return core
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
