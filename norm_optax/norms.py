"""Norm primitives over pytrees: the foundation every transform is built on.

Three functions, all pure and ``jit``/``vmap``/``grad`` compatible:

* :func:`global_norm` -- the norm of all leaves of a tree taken as one vector;
* :func:`leaf_norms` -- one norm per leaf, same tree structure;
* :func:`unit_norms` -- the norm of each *unit* of one array (keepdims).

Numerics, shared by all three:

* **Leaves that take part** are inexact arrays (real or complex floats, and
  Python floats). ``None``, :class:`optax.MaskedNode` and integer, bool or
  ``float0`` leaves are skipped. An empty tree has norm ``0``.
* **Accumulation** happens in ``float32`` or wider: ``float16``/``bfloat16``
  leaves are converted inside the reduction (XLA fuses the conversion, no
  widened copy of the leaf is written), so fp16 values up to 65504 give a
  finite norm and tiny values do not underflow. The result is ``float32``,
  or ``float64`` when a leaf is ``float64``/``complex128``. Complex values
  use their modulus. The L2 norm is finite while the sum of squares fits the
  accumulation dtype (a norm below about ``1.8e19`` in ``float32``).
* **Gradients** are finite everywhere (a ``jax.custom_jvp``): at the zero
  vector the gradient is ``0``, a valid subgradient; for ``ord=inf`` the
  gradient is shared equally among the entries that attain the maximum.

``ord`` is ``1``, ``2`` or ``inf`` (``jnp.inf``, ``math.inf`` or the string
``"inf"``). It may also be a traced scalar (for instance when a transform is
wrapped in :func:`optax.inject_hyperparams`, which turns every numeric
argument into an array): then the norm is selected with ``lax.switch`` at run
time, and a traced value that is not 1, 2 or +inf gives a NaN norm.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from norm_optax import _sharding

__all__ = ["Ord", "global_norm", "leaf_norms", "unit_norms"]

Ord = Any  # 1, 2, math.inf, "inf", or a scalar array holding one of them.
"""Type of the ``ord`` argument: ``1``, ``2``, ``inf`` / ``"inf"``, or a scalar."""

_VALID_ORDS = (1, 2, math.inf)


# ---------------------------------------------------------------------------
# Argument handling.
# ---------------------------------------------------------------------------


def canonical_ord(ord: Ord, *, name: str = "ord") -> int | float | jax.Array:
    """Returns ``ord`` as the Python number ``1``, ``2`` or ``math.inf``.

    A traced scalar is returned as is (its value is checked at run time).

    Raises:
      ValueError: ``ord`` is a concrete value other than 1, 2 or inf.
      TypeError: ``ord`` is neither a number, a scalar array nor ``"inf"``.
    """
    if isinstance(ord, str):
        if ord.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
        raise ValueError(f"{name} must be 1, 2 or inf (or 'inf'), got {ord!r}.")
    if isinstance(ord, bool):
        raise ValueError(f"{name} must be 1, 2 or inf (or 'inf'), got {ord!r}.")
    if isinstance(ord, jax.core.Tracer):
        if ord.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {ord.shape}.")
        return ord
    try:
        value = np.asarray(ord)
    except Exception as error:  # a type numpy cannot read
        raise TypeError(f"{name} must be 1, 2 or inf, got {ord!r}.") from error
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"{name} must be 1, 2 or inf, got {ord!r}.")
    number = float(value)
    for valid in _VALID_ORDS:
        if number == valid:
            return valid
    raise ValueError(f"{name} must be 1, 2 or inf (or 'inf'), got {ord!r}.")


def is_inexact(leaf: Any) -> bool:
    """Whether ``leaf`` takes part in norms: a real or complex float."""
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
    """The real dtype norms of a ``dtype`` leaf are accumulated in (>= float32)."""
    real = np.dtype(jnp.finfo(dtype).dtype)  # complex64 -> float32 etc.
    if real.itemsize < 4:
        return np.dtype(np.float32)
    return real


def _as_array(leaf: Any) -> jax.Array:
    return leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)


def _inexact_leaves(tree: Any) -> list[jax.Array]:
    return [_as_array(x) for x in jax.tree.leaves(tree) if is_inexact(x)]


def _result_dtype(leaves: Sequence[jax.Array]) -> np.dtype:
    dtypes = [accumulation_dtype(x.dtype) for x in leaves]
    return max(dtypes, key=lambda d: d.itemsize, default=np.dtype(np.float32))


# ---------------------------------------------------------------------------
# Elementwise pieces, all in the accumulation dtype.
# ---------------------------------------------------------------------------


def _abs(x: jax.Array) -> jax.Array:
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.abs(x).astype(acc)
    return jnp.abs(x.astype(acc))


def _abs2(x: jax.Array) -> jax.Array:
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    return jnp.square(x.astype(acc))


def _real_inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Re(conj(a) * b)`` elementwise, in the accumulation dtype of ``a``."""
    acc = accumulation_dtype(a.dtype)
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
        ar, ai = jnp.real(a).astype(acc), jnp.imag(a).astype(acc)
        br, bi = jnp.real(b).astype(acc), jnp.imag(b).astype(acc)
        return ar * br + ai * bi
    return a.astype(acc) * b.astype(acc)


def _widen(x: jax.Array) -> jax.Array:
    """``x`` in its accumulation precision (complex stays complex)."""
    if jnp.iscomplexobj(x):
        return x
    return x.astype(accumulation_dtype(x.dtype))


def _unit_phase(x: jax.Array) -> jax.Array:
    """``x / |x|`` (``sign`` for reals), ``0`` at ``0``, in accumulation precision."""
    return jnp.sign(_widen(x))


# ---------------------------------------------------------------------------
# Reductions. ``axes=None`` reduces every leaf to one scalar (a global norm,
# with at most one cross-device all-reduce, see ``_sharding``); a tuple of
# axes reduces the single leaf over those axes with keepdims (unit norms).
# ---------------------------------------------------------------------------

Axes = tuple[int, ...] | None


def _reduce(
    parts: Sequence[jax.Array],
    axes: Axes,
    axis_name: Any,
    kind: str,
    dtype: np.dtype,
    role: _sharding.Role = "primal",
) -> jax.Array:
    if axes is None:
        return _sharding.reduce_to_scalar(parts, kind, dtype, axis_name, role=role)
    (part,) = parts
    if kind == "sum":
        return jnp.sum(part, axis=axes, keepdims=True, dtype=dtype)
    return jnp.max(part, axis=axes, keepdims=True, initial=0).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _pnorm(
    ord: int | float, axes: Axes, axis_name: Any, leaves: tuple[jax.Array, ...]
) -> jax.Array:
    dtype = _result_dtype(leaves)
    reduce = functools.partial(_reduce, axes=axes, axis_name=axis_name, dtype=dtype)
    if ord == 2:
        return jnp.sqrt(reduce([_abs2(x) for x in leaves], kind="sum"))
    if ord == 1:
        return reduce([_abs(x) for x in leaves], kind="sum")
    return reduce([_abs(x) for x in leaves], kind="max")


@_pnorm.defjvp
def _pnorm_jvp(
    ord: int | float,
    axes: Axes,
    axis_name: Any,
    primals: tuple[tuple[jax.Array, ...]],
    tangents: tuple[tuple[jax.Array, ...]],
) -> tuple[jax.Array, jax.Array]:
    (leaves,), (dleaves,) = primals, tangents
    norm = _pnorm(ord, axes, axis_name, leaves)
    dtype = norm.dtype
    total = functools.partial(
        _reduce, axes=axes, axis_name=axis_name, kind="sum", dtype=dtype
    )
    ok = jnp.isfinite(norm) & (norm > 0)
    # The tangent is <c(x), dx> for a coefficient c per element. Masking c
    # (rather than the tangent) keeps the transpose free of 0 * inf.
    if ord == 2:  # d||x|| = <x / ||x||, dx>
        safe_norm = jnp.where(ok, norm, 1)

        def coefficient(x: jax.Array) -> jax.Array:
            wide = _widen(x)
            return wide / safe_norm.astype(wide.dtype)

    elif ord == 1:  # d||x||_1 = <sign(x), dx>
        coefficient = _unit_phase
    else:  # max |x_i|: sign(x_i), shared equally among the maxima

        def at_max(x: jax.Array) -> jax.Array:
            return (_abs(x) == norm.astype(accumulation_dtype(x.dtype))) & (x != 0)

        count = jnp.maximum(total([at_max(x).astype(dtype) for x in leaves]), 1)

        def coefficient(x: jax.Array) -> jax.Array:
            phase = _unit_phase(x)
            return jnp.where(at_max(x), phase, 0) / count.astype(phase.dtype)

    tangent = total(
        role="tangent",
        parts=[
            _real_inner(jnp.where(ok, coefficient(x), 0), dx)
            for x, dx in zip(leaves, dleaves, strict=True)
        ],
    )
    return norm, tangent.astype(dtype)


def norm_of_leaves(
    leaves: tuple[jax.Array, ...],
    ord: int | float | jax.Array,
    axes: Axes = None,
    axis_name: Any = None,
) -> jax.Array:
    """Norm of inexact ``leaves`` for a canonical ``ord`` (Python or traced).

    ``axes=None`` gives the global norm of all leaves (a scalar); a tuple of
    axes gives the unit norms of the single leaf (keepdims).
    """
    if not isinstance(ord, jax.Array):
        return _pnorm(ord, axes, axis_name, leaves)
    # Traced ``ord``: choose at run time; any other value gives NaN.
    branches: list[Callable[[tuple[jax.Array, ...]], jax.Array]] = [
        functools.partial(_pnorm, valid, axes, axis_name) for valid in _VALID_ORDS
    ]
    reference = jax.eval_shape(branches[1], leaves)

    def invalid(xs: tuple[jax.Array, ...]) -> jax.Array:
        del xs
        return jnp.full(reference.shape, jnp.nan, reference.dtype)

    index = jnp.select([ord == 1, ord == 2, jnp.isposinf(ord)], [0, 1, 2], default=3)
    return jax.lax.switch(index, [*branches, invalid], leaves)


# ---------------------------------------------------------------------------
# Public primitives.
# ---------------------------------------------------------------------------


def global_norm(tree: Any, ord: Ord = 2, *, axis_name: Any = None) -> jax.Array:
    r"""The ``ord``-norm of all inexact leaves of ``tree`` taken as one vector.

    .. math::
      \|g\|_2 = \sqrt{\textstyle\sum_\ell \sum_i |g_{\ell,i}|^2},\quad
      \|g\|_1 = \textstyle\sum_\ell \sum_i |g_{\ell,i}|,\quad
      \|g\|_\infty = \max_{\ell,i} |g_{\ell,i}|.

    Under ``jax.jit`` with sharded leaves (GSPMD) on a mesh with ``Explicit``
    axes (the default of ``jax.make_mesh``), the per-leaf partial sums are
    combined with a single all-reduce of one scalar, however the leaves are
    sharded or replicated, and no leaf is gathered. With ``Auto`` axes the
    shardings are unknown when the norm is traced, and XLA reduces each leaf
    over its own mesh axes: one all-reduce per distinct set of axes (one on a
    1-D FSDP mesh). Inside ``jax.shard_map`` or ``jax.pmap``, where each device holds
    a slice of the tree, pass the mapped ``axis_name`` (a name or a tuple of
    names): the partial norms are then combined across it, and every device
    gets the norm of the whole tree.

    Args:
      tree: a pytree of arrays. Integer, bool, ``float0``, ``None`` and
        :class:`optax.MaskedNode` leaves are skipped.
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).
      axis_name: mapped axis name(s) to combine the norm across, or ``None``.

    Returns:
      A scalar of dtype ``float32`` (``float64`` if a leaf is 64-bit).
      ``0`` for a tree without inexact leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tree = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0]), "step": 7}
      >>> float(nox.global_norm(tree))
      5.0
      >>> float(nox.global_norm(tree, ord=1)), float(nox.global_norm(tree, "inf"))
      (7.0, 4.0)
    """
    ord = canonical_ord(ord)
    return norm_of_leaves(tuple(_inexact_leaves(tree)), ord, axis_name=axis_name)


def leaf_norms(tree: Any, ord: Ord = 2) -> Any:
    """The ``ord``-norm of each leaf of ``tree``, as a tree of scalars.

    Inexact leaves map to a scalar of their accumulation dtype (``float32`` or
    wider). ``None`` and :class:`optax.MaskedNode` stay as they are; integer,
    bool and ``float0`` leaves, which have no norm, become ``None``.

    Args:
      tree: a pytree of arrays.
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).

    Returns:
      A pytree with the structure of ``tree`` holding one scalar per leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> nox.leaf_norms({"w": jnp.array([3.0, 4.0]), "b": jnp.array([-2.0])})
      {'b': Array(2., dtype=float32), 'w': Array(5., dtype=float32)}
    """
    ord = canonical_ord(ord)

    def norm(leaf: Any) -> jax.Array | None:
        if not is_inexact(leaf):
            return None
        return norm_of_leaves((_as_array(leaf),), ord)

    return jax.tree.map(norm, tree)


def default_unit_axes(ndim: int) -> tuple[int, ...]:
    """The Flax kernel convention: all axes but the last, or all for ndim <= 1."""
    if ndim <= 1:
        return tuple(range(ndim))
    return tuple(range(ndim - 1))


def canonical_axes(
    axis: int | Sequence[int] | None, shape: tuple[int, ...], *, where: str = ""
) -> tuple[int, ...]:
    """``axis`` as sorted non-negative ints; ``None`` is the Flax convention.

    Raises:
      ValueError: an axis is out of range for ``shape`` (the message names the
        shape, and ``where``, e.g. the leaf's path).
    """
    ndim = len(shape)
    if axis is None:
        return default_unit_axes(ndim)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            at = f" of the leaf at {where}" if where else ""
            raise ValueError(
                f"axis {axis!r} is out of range for shape {shape}{at} (ndim {ndim})."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis (shape {shape}).")
    return tuple(sorted(out))


def unit_norms(
    x: jax.Array, axis: int | Sequence[int] | None = None, ord: Ord = 2
) -> jax.Array:
    """The ``ord``-norm of each *unit* of ``x``, with the reduced axes kept.

    ``axis`` names the axes reduced over. ``axis=None`` is the Flax kernel
    convention: every axis but the last when ``x.ndim >= 2`` (a Dense kernel of
    shape ``(in, out)`` has one unit per output feature, a Conv kernel
    ``(H, W, I, O)`` one per output channel), the whole array when
    ``x.ndim <= 1``.

    Args:
      x: an inexact array.
      axis: an int, a tuple of ints, or ``None`` (see above).
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).

    Returns:
      An array of ``x.ndim`` dimensions, broadcastable to ``x``, of dtype
      ``float32`` or wider.

    Raises:
      ValueError: an axis is out of range (the message names the shape).
      TypeError: ``x`` is not an inexact array.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> kernel = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (in=2, out=2)
      >>> nox.unit_norms(kernel)
      Array([[5., 1.]], dtype=float32)
    """
    ord = canonical_ord(ord)
    x = _as_array(x)
    if not is_inexact(x):
        raise TypeError(f"unit_norms needs an inexact array, got dtype {x.dtype}.")
    axes = canonical_axes(axis, x.shape)
    return norm_of_leaves((x,), ord, axes)
