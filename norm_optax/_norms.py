"""The norm kernel: one ``custom_jvp`` reduction behind every norm in the package.

Private. The public primitives (:mod:`norm_optax.norms`) and the transforms
call it through three named entry points, each with every argument explicit
(no defaults here that could differ from a caller's):

* :func:`tree_norm` -- the norm of a list of leaves taken as one vector, with
  at most one cross-device all-reduce of a scalar (see ``_sharding``);
* :func:`axes_norm` -- the norm of one array over some of its axes
  (keepdims): unit norms, per-layer norms of stacked leaves;
* :func:`tree_total` -- a plain sum or max of elementwise parts over many
  leaves (the L1-ball threshold search), one all-reduce like a norm;
* :func:`layer_squares` -- the squared L2 norm of every layer of many
  (stacked) leaves at once, one all-reduce for all of them (telemetry).

Numerics: accumulation in ``float32`` or wider (conversion fused into the
reduction), complex values by modulus, an empty list has norm ``0``, the
gradient is finite everywhere and ``0`` at the zero vector (the JVP masks the
coefficients, not the tangent, so no ``0 * inf`` appears in the transpose).
``ord`` is canonicalised by :func:`canonical_ord`; a traced ``ord`` is
dispatched with ``lax.switch`` and an invalid traced value gives NaN.
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
from norm_optax._types import Ord, accumulation_dtype

__all__ = ["axes_norm", "canonical_ord", "layer_squares", "tree_norm", "tree_total"]

_VALID_ORDS = (1, 2, math.inf)
Axes = tuple[int, ...] | None


def canonical_ord(ord: Ord, *, name: str) -> int | float | jax.Array:
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


def _reduce(
    parts: Sequence[jax.Array],
    axes: Axes,
    axis_name: Any,
    kind: str,
    dtype: np.dtype,
    role: _sharding.Role,
) -> jax.Array:
    if axes is None:
        return _sharding.reduce_to_scalar(parts, kind, dtype, axis_name, role=role)
    (part,) = parts
    if kind == "sum":
        out = jnp.sum(part, axis=axes, keepdims=True, dtype=dtype)
        return out if axis_name is None else jax.lax.psum(out, axis_name)
    out = jnp.max(part, axis=axes, keepdims=True, initial=0).astype(dtype)
    return out if axis_name is None else jax.lax.pmax(out, axis_name)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _pnorm(
    ord: int | float, axes: Axes, axis_name: Any, leaves: tuple[jax.Array, ...]
) -> jax.Array:
    dtype = _result_dtype(leaves)
    reduce = functools.partial(
        _reduce, axes=axes, axis_name=axis_name, dtype=dtype, role="primal"
    )
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

        count = jnp.maximum(
            total([at_max(x).astype(dtype) for x in leaves], role="primal"), 1
        )

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


def _norm(
    leaves: tuple[jax.Array, ...],
    ord: int | float | jax.Array,
    axes: Axes,
    axis_name: Any,
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


def tree_norm(
    leaves: Sequence[jax.Array], ord: int | float | jax.Array, *, axis_name: Any
) -> jax.Array:
    """The ``ord``-norm of inexact ``leaves`` taken as one vector (a scalar).

    ``ord`` is canonical (see :func:`canonical_ord`); ``axis_name`` names the
    mapped axes to combine across inside ``shard_map``/``pmap``, or ``None``.
    """
    return _norm(tuple(leaves), ord, None, axis_name)


def axes_norm(
    x: jax.Array,
    ord: int | float | jax.Array,
    axes: tuple[int, ...],
    *,
    axis_name: Any,
) -> jax.Array:
    """The ``ord``-norm of ``x`` over ``axes`` (sorted, non-negative), keepdims."""
    return _norm((x,), ord, axes, axis_name)


def tree_total(parts: Sequence[jax.Array], kind: str, dtype: Any) -> jax.Array:
    """Sum (``"sum"``) or max (``"max"``) of every element of ``parts``.

    Not differentiated (callers stop gradients); one all-reduce when sharded.
    """
    return _sharding.reduce_to_scalar(parts, kind, np.dtype(dtype), None, role="any")


def layer_squares(
    leaves: Sequence[jax.Array], counts: Sequence[int]
) -> list[jax.Array]:
    """Per-layer sums of ``|x|^2`` of many leaves, with one all-reduce for all.

    Leaf ``i`` gives an array of shape ``leaves[i].shape[:counts[i]]`` (its
    stack shape; ``()`` for ``counts[i] = 0``): the sum of ``|x|^2`` over each
    layer's slice, in the accumulation dtype of the whole list (``float32``,
    or ``float64`` when a leaf is 64-bit). Its square root is the per-layer
    L2 norm of :func:`axes_norm`; the sum of all of them, the square of the
    global norm of :func:`tree_norm`. NaN and infinities propagate. Not
    differentiated (callers stop gradients); sharded, one all-reduce of a
    vector with one entry per layer (see ``_sharding.reduce_layers``).
    """
    return _sharding.reduce_layers(leaves, counts, _abs2, _result_dtype(tuple(leaves)))
