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
* :func:`layer_norms` -- the L2 norm of every layer of many
  (stacked) leaves at once, one all-reduce for all of them (telemetry).

Numerics: accumulation in ``float32`` or wider (conversion fused into the
reduction), complex values by modulus, an empty list has norm ``0``, the
gradient is finite everywhere and ``0`` at the zero vector (the JVP masks the
coefficients, not the tangent, so no ``0 * inf`` appears in the transpose).
``ord`` is canonicalised by :func:`canonical_ord`; a traced ``ord`` is
dispatched with ``lax.switch`` and an invalid traced value gives NaN.

**Range (L2 of ``bfloat16``).** ``bfloat16`` has ``float32``'s exponent
range, so a square in ``float32`` underflows below about ``1e-19`` and
overflows above about ``1.8e19``. The fast path is one pass: the sum of
squares in ``float32``. Only when that sum comes out below ``2**-60`` (a norm
below about ``1e-9``, where squares lost to underflow could matter; zero
included) or infinite -- one scalar compare per norm -- does a second,
rescaled pass run under :func:`jax.lax.cond` (a real branch under ``jit``):
every element is multiplied by ``2**63`` (sum too low) or ``2**-66`` (sum
infinite), exact powers of two, squared and summed, and the square root is
scaled back. ``float16`` needs no rescue (its squares fit ``float32``), nor
``float32``/``float64`` leaves (their documented range is that of their
squares; the rescue's extra reduction would add to every compile). A
projection widens ``bfloat16`` params to ``float32`` before its unit norms
and says so (``widened_from``), so it gets the rescue too. Under ``vmap``
the predicate is reduced over the batch (a ``custom_vmap`` rule), so the
branch stays a branch: the rescue runs for the whole batch only if one
example needs it.

**XLA:CPU and half precision.** When a half-precision leaf is both reduced
(the norm) and scaled (a clip) in one computation, XLA's CSE merges the two
``convert`` ops to ``float32`` and XLA:CPU then writes a ``float32`` copy of
the leaf for the reduction (a separate fusion feeding the YNNPACK reduce),
about four times the traffic of the norm. On CPU the norm's input is
therefore passed through :func:`jax.lax.optimization_barrier` (via
:func:`jax.lax.platform_dependent`: other backends are untouched), which
keeps the two converts apart; the barrier itself compiles to nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np

from norm_optax import _sharding
from norm_optax._types import Ord, accumulation_dtype

__all__ = [
    "axes_norm",
    "canonical_ord",
    "global_of_layers",
    "layer_norms",
    "needs_range_guard",
    "tree_norm",
    "tree_total",
]

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


def _is_half(dtype: Any) -> bool:
    """Whether a leaf of ``dtype`` is widened for accumulation (half precision)."""
    return np.dtype(jnp.finfo(dtype).dtype) != accumulation_dtype(dtype)


def _reduction_input(x: jax.Array) -> jax.Array:
    """``x`` as read by a norm's reduction (see the module note on XLA:CPU)."""
    if not _is_half(x.dtype):
        return x
    return jax.lax.platform_dependent(
        x, cpu=jax.lax.optimization_barrier, default=lambda v: v
    )


def _abs(x: jax.Array) -> jax.Array:
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.abs(x).astype(acc)
    return jnp.abs(_reduction_input(x).astype(acc))


def _abs2(x: jax.Array, factor: jax.Array | None = None) -> jax.Array:
    """``|x|^2`` in the accumulation dtype; ``|x * factor|^2`` with ``factor``."""
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        re, im = x.real.astype(acc), x.imag.astype(acc)
        if factor is not None:
            re, im = re * factor.astype(acc), im * factor.astype(acc)
        return jnp.square(re) + jnp.square(im)
    wide = _reduction_input(x).astype(acc)
    if factor is not None:
        wide = wide * factor.astype(acc)
    return jnp.square(wide)


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
    else:
        out = jnp.max(part, axis=axes, keepdims=True, initial=0).astype(dtype)
    return out if axis_name is None else _sharding.combine_across(out, kind, axis_name)


def needs_range_guard(dtype: Any) -> bool:
    """Whether squares of ``dtype`` values can leave the accumulation range.

    True for ``bfloat16`` (the range of ``float32``, accumulated in
    ``float32``); not for ``float16`` (its squares fit ``float32``), the
    float8 types, nor ``float32``/``float64`` (accumulated in themselves: the
    documented range of their norms is that of their squares).
    """
    if not _is_half(dtype):
        return False
    own, acc = jnp.finfo(dtype), jnp.finfo(accumulation_dtype(dtype))
    return float(own.max) ** 2 > float(acc.max)


@jax.custom_batching.custom_vmap
def _any_example(flag: jax.Array) -> jax.Array:
    """``flag`` (a bool scalar); under ``vmap``, whether it holds for any example.

    Keeps the rescue of :func:`_l2_norm` a real branch under ``vmap`` (a
    batched predicate would turn ``lax.cond`` into a select that always runs
    both branches).
    """
    return flag


@_any_example.def_vmap
def _any_example_vmap(
    axis_size: int, in_batched: list[bool], flag: jax.Array
) -> tuple[jax.Array, bool]:
    del axis_size
    (batched,) = in_batched
    return (jnp.any(flag) if batched else flag), False


# The rescue. A sum of squares below _LOW_SUM (or +inf) is recomputed with
# every element scaled by a power of two (exact): up by _UP when it is low,
# then every |x| < 2**-30 and the scaled squares neither overflow nor lose
# any normal float32 input; down by _DOWN when it overflowed, which cannot
# overflow again unless the norm itself exceeds float32's range. Squares that
# underflow in the fast pass are each below 2**-126, so together below
# n * 2**-126: under 2**-60 that is within float32's epsilon of the sum for n
# up to 2**43 elements.
_LOW_SUM = 2.0**-60
_UP = 2.0**63
_DOWN = 2.0**-66


def _rescue_factor(low: jax.Array, high: jax.Array, dtype: Any) -> jax.Array:
    """The rescue's power of two: ``_DOWN`` where ``high``, ``_UP`` where ``low``."""
    return jnp.where(high, _DOWN, jnp.where(low, _UP, 1.0)).astype(dtype)


def _l2_norm(
    leaves: tuple[jax.Array, ...],
    reduce: Callable[..., jax.Array],
    guard: bool,
) -> jax.Array:
    """The L2 norm: one pass, and a rescaled pass if squares may have left the range."""
    total = reduce([_abs2(x) for x in leaves], kind="sum")
    if not guard:
        return jnp.sqrt(total)
    low, high = total < _LOW_SUM, jnp.isposinf(total)

    def rescaled() -> jax.Array:
        factor = _rescue_factor(low, high, total.dtype)
        scaled = reduce([_abs2(x, factor) for x in leaves], kind="sum")
        return jnp.sqrt(scaled) / factor

    rescue = _any_example(jnp.any(low | high))
    return jax.lax.cond(rescue, rescaled, lambda: jnp.sqrt(total))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _pnorm(
    ord: int | float,
    axes: Axes,
    axis_name: Any,
    guard: bool,
    leaves: tuple[jax.Array, ...],
) -> jax.Array:
    dtype = _result_dtype(leaves)
    reduce = functools.partial(
        _reduce, axes=axes, axis_name=axis_name, dtype=dtype, role="primal"
    )
    if ord == 2:
        return _l2_norm(leaves, reduce, guard)
    if ord == 1:
        return reduce([_abs(x) for x in leaves], kind="sum")
    return reduce([_abs(x) for x in leaves], kind="max")


@_pnorm.defjvp
def _pnorm_jvp(
    ord: int | float,
    axes: Axes,
    axis_name: Any,
    guard: bool,
    primals: tuple[tuple[jax.Array, ...]],
    tangents: tuple[tuple[jax.Array, ...]],
) -> tuple[jax.Array, jax.Array]:
    (leaves,), (dleaves,) = primals, tangents
    norm = _pnorm(ord, axes, axis_name, guard, leaves)
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


# The norm under ``jax.jit``: traced once per (arguments, shapes, dtypes,
# shardings), not once per leaf, so a tree of many leaves of few shapes traces
# and lowers its norms once per shape (XLA inlines the calls).
_pnorm_cached = jax.jit(_pnorm, static_argnums=(0, 1, 2, 3))


def _norm(
    leaves: tuple[jax.Array, ...],
    ord: int | float | jax.Array,
    axes: Axes,
    axis_name: Any,
    widened_from: Any = None,
) -> jax.Array:
    """Norm of inexact ``leaves`` for a canonical ``ord`` (Python or traced).

    ``axes=None`` gives the global norm of all leaves (a scalar); a tuple of
    axes gives the unit norms of the single leaf (keepdims).
    """
    dtypes = [x.dtype for x in leaves]
    if widened_from is not None:
        dtypes.append(widened_from)
    guard = any(needs_range_guard(d) for d in dtypes)
    if not isinstance(ord, jax.Array):
        return _pnorm_cached(ord, axes, axis_name, guard, leaves)
    # Traced ``ord``: choose at run time; any other value gives NaN.
    branches: list[Callable[[tuple[jax.Array, ...]], jax.Array]] = [
        functools.partial(_pnorm, valid, axes, axis_name, guard)
        for valid in _VALID_ORDS
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
    manual axes to combine across inside ``shard_map``, or ``None`` (see
    :func:`norm_optax._sharding.check_axis_name` for what is rejected).
    """
    return _norm(tuple(leaves), ord, None, axis_name)


def axes_norm(
    x: jax.Array,
    ord: int | float | jax.Array,
    axes: tuple[int, ...],
    *,
    axis_name: Any,
    widened_from: Any = None,
) -> jax.Array:
    """The ``ord``-norm of ``x`` over ``axes`` (sorted, non-negative), keepdims.

    ``widened_from``: the dtype ``x`` was widened from, if any (a projection
    computes ``p + u`` in ``float32`` for ``bfloat16`` params); with
    ``bfloat16`` the L2 norm gets the range guard of ``bfloat16`` leaves
    (see the module note), which ``float32`` input alone does not.
    """
    return _norm((x,), ord, axes, axis_name, widened_from)


def tree_total(parts: Sequence[jax.Array], kind: str, dtype: Any) -> jax.Array:
    """Sum (``"sum"``) or max (``"max"``) of every element of ``parts``.

    Not differentiated (callers stop gradients); one all-reduce when sharded.
    """
    return _sharding.reduce_to_scalar(parts, kind, np.dtype(dtype), None, role="any")


def layer_norms(
    leaves: Sequence[jax.Array], counts: Sequence[int]
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per-layer L2 norms of many leaves, with one all-reduce for all.

    Leaf ``i`` gives an array of shape ``leaves[i].shape[:counts[i]]`` (its
    stack shape; ``()`` for ``counts[i] = 0``): the L2 norm of each layer's
    slice, in the accumulation dtype of the whole list (``float32``, or
    ``float64`` when a leaf is 64-bit), as :func:`axes_norm` gives it, with
    the range guard of ``bfloat16`` leaves (the module note): a rescaled
    pass over those leaves, under :func:`jax.lax.cond`, only when one of
    their layers' sums of squares is below ``2**-60`` or infinite. Also
    returned, per leaf, the sums of squares of the fast pass, which add up
    to the square of the global norm wherever that is in range (see
    :func:`global_of_layers`). NaN and infinities propagate. Not
    differentiated (callers stop gradients); sharded, one all-reduce of a
    vector with one entry per layer (see ``_sharding.reduce_layers``), and
    a second one only in the rescue.
    """
    dtype = _result_dtype(tuple(leaves))
    sums = _sharding.reduce_layers(leaves, counts, _abs2, dtype)
    norms = [jnp.sqrt(s) for s in sums]
    guarded = [i for i, x in enumerate(leaves) if needs_range_guard(x.dtype)]
    if not guarded:
        return norms, sums
    low = [sums[i] < _LOW_SUM for i in guarded]
    high = [jnp.isposinf(sums[i]) for i in guarded]
    flags = [jnp.any(lo | hi) for lo, hi in zip(low, high, strict=True)]
    rescue = _any_example(functools.reduce(jnp.logical_or, flags))

    def rescaled() -> list[jax.Array]:
        factors, scaled = [], []
        for i, lo, hi in zip(guarded, low, high, strict=True):
            factor = _rescue_factor(lo, hi, dtype)
            x = leaves[i]
            per_layer = factor.reshape(factor.shape + (1,) * (x.ndim - counts[i]))
            factors.append(factor)
            scaled.append(x.astype(dtype) * per_layer)
        again = _sharding.reduce_layers(
            scaled, [counts[i] for i in guarded], _abs2, dtype
        )
        return [jnp.sqrt(s) / f for s, f in zip(again, factors, strict=True)]

    fixed = jax.lax.cond(rescue, rescaled, lambda: [norms[i] for i in guarded])
    for i, n in zip(guarded, fixed, strict=True):
        norms[i] = n
    return norms, sums


def global_of_layers(
    norms: Sequence[jax.Array], sums: Sequence[jax.Array]
) -> jax.Array:
    """The global L2 norm of the layers of :func:`layer_norms`.

    ``sqrt(sum(sums))`` where that sum is in range; else (below ``2**-60`` or
    infinite) from the norms, scaled by the largest, so that it is the norm
    :func:`tree_norm` gives. NaN propagates.
    """
    if not norms:
        return jnp.zeros((), np.float32)
    total = functools.reduce(jnp.add, [jnp.sum(s) for s in sums])
    flat = jnp.concatenate([jnp.ravel(n) for n in norms])
    top = jnp.max(flat)
    usable = (top > 0) & jnp.isfinite(top)  # else 0, inf or NaN is the answer
    safe = jnp.where(usable, top, jnp.ones_like(top))
    rescued = jnp.where(usable, top * jnp.sqrt(jnp.sum(jnp.square(flat / safe))), top)
    return jnp.where((total < _LOW_SUM) | jnp.isposinf(total), rescued, jnp.sqrt(total))
