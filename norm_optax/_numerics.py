"""Shared numerics: the arithmetic that more than one technique needs.

Private, on the floor below the techniques (it imports only ``_types``):

* **widening** -- :func:`widen`, :func:`wide_sum`: half precision computed in
  ``float32`` (complex kept), so a projection or a scale is exact to the
  accumulation precision before it is cast back once;
* **scales** -- :func:`clip_scale` (``min(1, limit / norm)``, NaN for a
  non-finite norm: never "within the limit"), :func:`safe_ratio` (a ratio
  with a finite gradient where the denominator is 0), :func:`scale_leaf`
  (a leaf times a scale in the wider of its dtype and ``float32``, cast once);
* **soft thresholding** -- :func:`soft_threshold`, the prox of the L1 norm;
* **landing** -- :func:`land`: the update, in the *update's* dtype, that
  moves ``p`` onto a target computed in wide precision, so that what
  :func:`optax.apply_updates` computes (``p + u'`` in the promoted dtype,
  cast to ``p``'s: :func:`reach`) lies in the constraint set, for every pair
  of dtypes. For inequality constraints the new parameter is the target or
  lies just past it in the direction the projection moved (a bound holds
  after the rounding); equality constraints land to nearest (no bias).
  :func:`land_units` lands a unit norm constraint in half precision and
  mixed dtypes, where ``p + u'`` can only reach a coarse grid: to nearest,
  the unit's new norm checked and its target rescaled when it misses, so a
  unit lands as near its target norm as the grid allows (never zeroed);
* :func:`inner_bound`, :func:`outer_bound` -- a norm bound aimed a few ulps
  inside, so that the rounding of the norm itself cannot push a unit over.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from norm_optax._types import Scalar, accumulation_dtype

__all__ = [
    "Landing",
    "add_scaled",
    "applied_dtype",
    "clip_scale",
    "inner_bound",
    "land",
    "land_units",
    "needs_unit_check",
    "next_float",
    "outer_bound",
    "reach",
    "real_dtype",
    "round_to",
    "safe_ratio",
    "scale_leaf",
    "select",
    "soft_threshold",
    "toward_zero",
    "wide_sum",
    "widen",
]

_MARGIN_ULPS = 4  # how far inside a norm bound the targets are aimed


# ---------------------------------------------------------------------------
# Widening.
# ---------------------------------------------------------------------------


def real_dtype(x: jax.Array) -> np.dtype:
    """The real dtype of ``x`` (``complex64 -> float32``)."""
    return np.dtype(jnp.finfo(x.dtype).dtype)


def widen(x: jax.Array) -> jax.Array:
    """``x`` in its accumulation precision (``float32`` or wider; complex kept)."""
    if jnp.iscomplexobj(x):
        return x
    return x.astype(accumulation_dtype(x.dtype))


def wide_sum(p: jax.Array, u: jax.Array) -> jax.Array:
    """``p + u`` in the accumulation precision of both."""
    p, u = widen(p), widen(u)
    dtype = np.promote_types(p.dtype, u.dtype)
    return p.astype(dtype) + u.astype(dtype)


def as_real(value: Scalar, like: jax.Array) -> jax.Array:
    """A hyper-parameter as a real array of ``like``'s (real) dtype."""
    return jnp.asarray(value).astype(real_dtype(like))


# ---------------------------------------------------------------------------
# Scales.
# ---------------------------------------------------------------------------


def select(cond: jax.Array, a: Any, b: Any) -> jax.Array:
    """``jnp.where(cond, a, b)`` for ``a``, ``b`` of one dtype: one ``select`` op.

    (Without ``jnp.where``'s promotion and its nested call per use: fewer
    ops to trace and compile per leaf.) Operands of other shapes go through
    ``jnp.where``, which broadcasts them with their shardings.
    """
    cond, a, b = jnp.asarray(cond), jnp.asarray(a), jnp.asarray(b)
    if not cond.shape == a.shape == b.shape or a.dtype != b.dtype:
        # jnp.where broadcasts with the operands' shardings.
        dtype = a.dtype if a.ndim or not b.ndim else b.dtype
        return jnp.where(cond, a.astype(dtype), b.astype(dtype))
    return jax.lax.select(cond, a, b)


def safe_ratio(num: jax.Array, den: jax.Array, at_zero: Any) -> jax.Array:
    """``num / den``, ``at_zero`` where ``den == 0``, with a finite gradient there."""
    positive = den != 0
    ratio = num / select(positive, den, jnp.ones((), den.dtype))
    return select(positive, ratio, jnp.asarray(at_zero).astype(ratio.dtype))


def clip_scale(norm: jax.Array, limit: Any) -> jax.Array:
    """``min(1, limit / norm)`` in ``norm``'s dtype; NaN if ``norm`` is not finite.

    A NaN or infinite norm is never "within the limit", whatever the limit
    (an infinite one included), so the scaled elements become NaN. ``limit``
    is assumed to be in its domain (the caller's guard poisons it otherwise).
    """
    limit = jnp.asarray(limit).astype(norm.dtype)
    over = norm > limit
    # Divide by a safe value so the unselected branch has a finite gradient.
    scale = jnp.where(over, limit / jnp.where(over, norm, 1), 1)
    return jnp.where(jnp.isfinite(norm), scale, jnp.nan)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` in the wider of ``x``'s dtype and float32, cast back once.

    ``scale`` is a real scalar or an array broadcastable to ``x``.
    """
    acc = accumulation_dtype(x.dtype)
    scale = jnp.asarray(scale).astype(acc)
    if jnp.finfo(x.dtype).bits < 32:  # half precision: scale in float32
        return (x.astype(acc) * scale).astype(x.dtype)
    return x * scale.astype(x.dtype)


def add_scaled(g: jax.Array, coeff: Scalar, d: jax.Array) -> jax.Array:
    """``g + coeff * d`` in the accumulation precision, cast once to ``g``'s dtype."""
    g_wide, d_wide = widen(g), widen(d)
    dtype = np.promote_types(g_wide.dtype, d_wide.dtype)
    c = jnp.asarray(coeff).astype(np.dtype(jnp.finfo(dtype).dtype)).astype(dtype)
    return (g_wide.astype(dtype) + c * d_wide.astype(dtype)).astype(g.dtype)


def soft_threshold(x: jax.Array, theta: jax.Array) -> jax.Array:
    r"""Soft threshold :math:`\operatorname{sign}(x) \max(|x| - \theta, 0)`.

    Complex entries are shrunk in modulus (their phase kept).
    """
    mag = jnp.abs(x)
    shrunk = jnp.maximum(mag - jnp.asarray(theta).astype(mag.dtype), 0)
    if jnp.iscomplexobj(x):
        return x * safe_ratio(shrunk, mag, 0).astype(x.dtype)
    return jnp.sign(x) * shrunk


def inner_bound(value: Scalar, dtype: Any) -> jax.Array:
    """``value`` (an upper norm bound) in ``dtype``, aimed a few ulps inside."""
    eps = jnp.finfo(dtype).eps
    return jnp.asarray(value).astype(dtype) * (1 - _MARGIN_ULPS * eps)


def outer_bound(value: Scalar, dtype: Any) -> jax.Array:
    """``value`` (a lower norm bound) in ``dtype``, aimed a few ulps outside."""
    eps = jnp.finfo(dtype).eps
    return jnp.asarray(value).astype(dtype) * (1 + _MARGIN_ULPS * eps)


# ---------------------------------------------------------------------------
# Landing a target: the update, in the update's dtype, that optax.apply_updates
# turns into new parameters at (or just past) the target.
# ---------------------------------------------------------------------------

Landing = Literal["bound", "nearest"]

_CHECK_ULPS = 32  # a unit's landed norm is checked this far inside its bounds
_CHECK_ROUNDS = 8  # corrections of a unit's target scale before the fallback


def applied_dtype(p_dtype: Any, u_dtype: Any) -> np.dtype:
    """The dtype :func:`optax.apply_updates` adds ``p + u`` in (jax's promotion)."""
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.promote_types(p_dtype, u_dtype))


def round_to(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` rounded to nearest in ``dtype``, kept in ``x``'s (wider) dtype.

    ``lax.reduce_precision``, not a cast there and back: XLA may drop such a
    pair of casts (excess precision), never a ``reduce_precision``.
    """
    if not _narrower(dtype, x.dtype):
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, info.nexp, info.nmant)


def reach(p: jax.Array, v: jax.Array, wide: Any = None) -> jax.Array:
    """The new parameter :func:`optax.apply_updates` computes from ``p`` and ``v``.

    ``p + v`` in the promoted dtype of both, rounded to ``p``'s dtype: the
    exact arithmetic of optax, written without implicit promotion. With
    ``wide``, the result is in that (wider) dtype, each rounding emulated.
    """
    dtype = applied_dtype(p.dtype, v.dtype)
    if wide is None:
        return (p.astype(dtype) + v.astype(dtype)).astype(p.dtype)
    total = round_to(p.astype(wide) + v.astype(wide), dtype)
    return round_to(total, p.dtype)


def _narrower(a: Any, b: Any) -> bool:
    return bool(jnp.finfo(a).bits < jnp.finfo(b).bits)


def toward_zero(t: jax.Array, dtype: Any) -> jax.Array:
    """``t`` rounded to ``dtype`` toward zero (``|result| <= |t|``)."""
    if t.dtype == dtype:
        return t
    near = t.astype(dtype)
    over = jnp.abs(near.astype(t.dtype)) > jnp.abs(t)
    return jnp.where(over, jnp.nextafter(near, jnp.zeros_like(near)), near)


def _directed(t: jax.Array, dtype: Any, up: bool) -> jax.Array:
    """``t`` rounded to ``dtype`` down (``up=False``) or up, in ``t``'s dtype."""
    wide = round_to(t, dtype)
    wrong = wide < t if up else wide > t
    near = wide.astype(dtype)  # exact: representable
    return jnp.where(wrong, next_float(near, not up).astype(t.dtype), wide)


_BITS = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}  # a float's bits, by itemsize


def _grid_step(v: jax.Array, down: Any) -> jax.Array:
    """``+1`` or ``-1``, in ``v``'s bits type: one step of ``v`` toward ``-inf``
    where ``down``, else ``+inf``, as an add to its bits (for ``v != 0``).

    A float's bits are sign and magnitude, so a step away from zero adds 1
    to them as an integer and a step toward zero subtracts 1.
    """
    lax = jax.lax  # (lax, not jnp: every leaf traces these, so fewer layers)
    negative = lax.lt(v, lax.full_like(v, 0))
    if isinstance(down, bool):
        away = negative if down else lax.bitwise_not(negative)
    else:
        away = lax.eq(negative, down)
    one = lax.full_like(v, 1, _BITS[v.dtype.itemsize])  # (with v's sharding)
    return lax.select(away, one, lax.neg(one))


def _add_to_bits(v: jax.Array, steps: jax.Array) -> jax.Array:
    """``v`` moved ``steps`` places on its grid (``steps`` in its bits type)."""
    lax = jax.lax
    bits = lax.bitcast_convert_type(v, _BITS[v.dtype.itemsize])
    return lax.bitcast_convert_type(lax.add(bits, steps), v.dtype)


def next_float(v: jax.Array, down: Any) -> jax.Array:
    """``v``'s neighbour on its grid toward ``-inf`` where ``down``, else ``+inf``.

    ``jnp.nextafter(v, -inf if down else inf)`` for finite ``v`` (NaN stays
    NaN), in a handful of integer ops on the bits instead of nextafter's
    general expansion (about 35 ops per element, which every leaf of a
    projection compiles): :func:`_grid_step` added to the bits; zero steps
    to the smallest subnormal of the sign.
    """
    lax = jax.lax
    tiny = lax.full_like(v, jnp.finfo(v.dtype).smallest_subnormal)
    if isinstance(down, bool):
        zero_step = lax.neg(tiny) if down else tiny
    else:
        zero_step = lax.select(down, lax.neg(tiny), tiny)
    stepped = _add_to_bits(v, _grid_step(v, down))
    return lax.select(lax.eq(v, lax.full_like(v, 0)), zero_step, stepped)


def _step(v: jax.Array, up: bool) -> jax.Array:
    return next_float(v, not up)


def _land_bound(p: jax.Array, u: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """Elementwise: the update that lands ``p`` at ``t`` or just past it.

    "Past" is in the direction ``x`` moved to reach ``t``, never across zero
    when ``t`` is not zero: an element moved down lands in ``[0, t]`` (or
    below ``t`` if ``t <= 0``), one moved up in ``[t, 0]`` (or above ``t`` if
    ``t >= 0``). Whatever a projection moves is then inside its set after
    :func:`optax.apply_updates`: boxes, the orthant, and (every element no
    larger than its target) norm bounds. The nearest update is tried first;
    if the new parameter misses that interval, the update's neighbour on the
    other side of ``t - p`` does not (one step of the update's grid crosses
    the exact difference, and ``p + v`` rounds monotonically in ``v``).
    """
    wide = t.dtype
    up = t > x
    inf = jnp.asarray(jnp.inf, wide)
    zero = jnp.zeros((), wide)
    lo = jnp.where(up, t, jnp.where(t > 0, zero, -inf))
    hi = jnp.where(up, jnp.where(t < 0, zero, inf), t)
    if _narrower(p.dtype, wide):  # the interval's ends in the parameter's grid
        lo, hi = _directed(lo, p.dtype, up=True), _directed(hi, p.dtype, up=False)
        t = jnp.where(up, lo, hi)  # the target's end: ``p + v`` rounds onto it
    v = round_to(t - p.astype(wide), u.dtype).astype(u.dtype)
    new = reach(p, v, wide)
    return jnp.where(new > hi, _step(v, False), jnp.where(new < lo, _step(v, True), v))


def _land_same(p: jax.Array, x: jax.Array, t: jax.Array, landing: Landing) -> jax.Array:
    """:func:`land` where params, updates and targets share one dtype.

    float32 and float64: ``v = t - p`` and ``p + v`` round once each on the
    grid of ``t``, so one step of ``v`` corrects the new parameter. A moved
    element with ``"bound"`` is corrected onto the side of ``t`` the move
    came from (``p + v`` for ``v`` near ``-p`` is exact, so the grid contains
    ``0`` and one step never crosses it); where ``t == x`` it is corrected
    toward ``t``, so the new parameter is exactly ``fl(p + u)``, what
    :func:`optax.apply_updates` gives from ``u`` itself. Other elements with
    ``"nearest"`` keep ``fl(t - p)``: rounded to nearest, no bias.
    (If ``fl(t - p)`` misses, the float on the other side of ``t - p`` lies
    between it and ``u``, and ``p + v`` rounds monotonically in ``v``.)

    Only ``p`` and ``x`` are read, never ``u``: the last fusion of a step
    reads the parameters and ``p + u`` and nothing else. The correction is
    written for the vector units of a CPU, where this fusion runs from cache
    and its op count is its cost: one integer add of -1, 0 or +1 on the bits
    of ``v`` (``v`` is never 0 where it is corrected: ``t - p`` is 0 only for
    ``t == p``, and then ``p + v == t``).
    """
    lax = jax.lax
    v = lax.sub(t, p)
    new = lax.add(p, v)
    above, below = lax.gt(new, t), lax.lt(new, t)
    if landing == "bound":  # kept: toward t; moved: onto the side it came from
        wrong = lax.bitwise_or(
            lax.bitwise_and(above, lax.le(t, x)), lax.bitwise_and(below, lax.ge(t, x))
        )
    else:  # to nearest: corrected only where t is p + u itself
        wrong = lax.bitwise_and(lax.eq(t, x), lax.bitwise_or(above, below))
    # One step toward t on v's grid where wrong (down where above), else none.
    step = _grid_step(v, above)
    return _add_to_bits(v, lax.select(wrong, step, lax.full_like(step, 0)))


def _land_nearest(p: jax.Array, t: jax.Array, dtype: Any) -> jax.Array:
    return round_to(t - p.astype(t.dtype), dtype).astype(dtype)


def _land_real(
    p: jax.Array, u: jax.Array, x: jax.Array, t: jax.Array, landing: Landing
) -> jax.Array:
    if p.dtype == u.dtype == t.dtype:  # float32, float64: one rounding each way
        return _land_same(p, x, t, landing)
    v = (
        _land_nearest(p, t, u.dtype)
        if landing == "nearest"
        else _land_bound(p, u, x, t)
    )
    return jnp.where(t == x, u, v)


def _make_land(landing: Landing) -> Any:
    @jax.custom_jvp
    def landed(p: jax.Array, u: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
        p, u = jnp.asarray(p), jnp.asarray(u)  # (Python float primals under jax.grad)
        if jnp.iscomplexobj(p):
            return jax.lax.complex(
                _land_real(p.real, u.real, x.real, t.real, landing),
                _land_real(p.imag, u.imag, x.imag, t.imag, landing),
            )
        return _land_real(p, u, x, jnp.real(t), landing)

    @landed.defjvp
    def _jvp(primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]) -> Any:
        p, u, x, t = primals
        dp, _, _, dt = tangents
        if not jnp.iscomplexobj(p):
            dt = jnp.real(dt)
        return landed(p, u, x, t), (dt - dp.astype(dt.dtype)).astype(u.dtype)

    return landed


# Under ``jax.jit``: traced and lowered once per shape, dtype and sharding, not
# once per leaf (XLA inlines the calls).
_LANDED = {
    "bound": jax.jit(_make_land("bound")),
    "nearest": jax.jit(_make_land("nearest")),
}


def land(
    p: jax.Array, u: jax.Array, x: jax.Array, t: jax.Array, landing: Landing
) -> jax.Array:
    """The update, in ``u``'s dtype, that moves ``p`` onto the target ``t``.

    ``x`` is ``p + u`` and ``t`` the projection of it, both in the
    accumulation precision. Where ``t == x`` the new parameter is the one
    ``u`` itself gives: for params and updates of one dtype, float32 or
    float64, the update is ``t - p`` corrected so that ``fl(p + u') ==
    fl(p + u)`` (it reads ``x``, never ``u``: after an optimizer, one pass
    over the parameters fewer); in the other dtypes it is ``u``. Elsewhere,
    with ``"bound"``, the new parameter that :func:`optax.apply_updates`
    computes, ``fl(p + u')``, is ``t`` or lies just past it in the direction
    the projection moved ``x`` (never across zero): bounds hold after the
    rounding, in every pair of dtypes. With ``"nearest"`` it is ``t - p``
    rounded once to ``u``'s dtype (for equality constraints, no bias). A NaN
    target gives NaN. The derivative is that of ``t - p``.
    """
    return _LANDED[landing](p, u, x, t)


def needs_unit_check(p_dtype: Any, u_dtype: Any) -> bool:
    """Whether a unit's landed norm must be checked (see :func:`land_units`).

    Elementwise landing is exact enough only where the update has the
    parameter's dtype and that is its own accumulation precision (float32,
    float64, complex): then ``t - p`` and ``p + u'`` round at most once each
    on the grid of the target.
    """
    if jnp.issubdtype(p_dtype, jnp.complexfloating):
        return False
    same = np.dtype(p_dtype) == np.dtype(u_dtype)
    return not (same and accumulation_dtype(p_dtype) == np.dtype(p_dtype))


def land_units(
    p: jax.Array,
    u: jax.Array,
    x: jax.Array,
    t: jax.Array,
    axes: tuple[int, ...],
    goal: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    landing: Landing = "bound",
) -> jax.Array:
    """Per unit: the update whose landed norm is near ``goal``, within ``[lo, hi]``.

    For half precision and mixed dtypes, where ``p + u'`` can only reach a
    coarse grid. ``t`` is the target (``x`` scaled per unit), ``goal`` its
    unit norms (keepdims), ``[lo, hi]`` the bounds a unit must keep. Each unit
    is landed to nearest and its new norm (from the values
    :func:`optax.apply_updates` stores, in the accumulation precision)
    checked; a unit outside its window (within one rounding ``eps`` of the
    update's grid of ``goal`` for a unit the target moves, and a few ulps
    inside ``[lo, hi]``) has its target rescaled by the ratio it missed by
    and is landed again, a few times at most. A unit still outside
    ``[lo, hi]`` then falls back to the elementwise landing of :func:`land`
    (every element at most its target: the bound holds). A unit is never
    zeroed unless its target is. With ``"nearest"`` (an equality such as a
    unit norm) ``[lo, hi]`` is only the window aimed at: a unit the grid
    cannot land inside it keeps its nearest try. The derivative is that of
    ``t - p``.
    """
    return _land_units(axes, landing, p, u, x, t, goal, lo, hi)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _land_units(
    axes: tuple[int, ...],
    landing: Landing,
    p: jax.Array,
    u: jax.Array,
    x: jax.Array,
    t: jax.Array,
    goal: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
) -> jax.Array:
    wide = t.dtype
    grid = p.dtype if _narrower(p.dtype, u.dtype) else u.dtype
    eps = jnp.asarray(jnp.finfo(grid).eps, wide)
    margin = _CHECK_ULPS * jnp.finfo(wide).eps
    lo, hi, goal = lo.astype(wide), hi.astype(wide), goal.astype(wide)
    lo_c, hi_c = lo * (1 + margin), hi * (1 - margin)
    same = t == x
    moved = ~jnp.all(same, axis=axes, keepdims=True)
    aim = jnp.clip(goal, lo_c, hi_c)
    win_lo = jnp.where(moved, jnp.maximum(lo_c, aim * (1 - eps)), lo_c)
    win_hi = jnp.where(moved, jnp.minimum(hi_c, aim * (1 + eps)), hi_c)
    pw = p.astype(wide)

    def landed(f: jax.Array) -> jax.Array:
        v = round_to(t * f - pw, u.dtype).astype(u.dtype)
        return jnp.where(same & (f == 1), u, v)

    def norm(v: jax.Array) -> jax.Array:
        new = reach(p, v, wide)
        return jnp.sqrt(jnp.sum(new * new, axis=axes, keepdims=True))

    def bad(n: jax.Array) -> jax.Array:
        return (n > win_hi) | (n < win_lo)

    def cond(state: tuple[Any, ...]) -> jax.Array:
        k, _, _, n, _, _ = state
        return (k < _CHECK_ROUNDS) & jnp.any(bad(n))

    def keep_best(
        v: jax.Array, n: jax.Array, best: jax.Array, n_best: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        # The best try so far within the bounds themselves (the margin only
        # guards the rounding of the norm), nearest the aimed norm; a zero
        # unit only if its target is zero.
        inside = (n > 0) | (goal == 0)
        if landing == "bound":
            inside &= (n <= hi) & (n >= lo)
        better = inside & (jnp.abs(n - aim) < jnp.abs(n_best - aim))
        return jnp.where(better, v, best), jnp.where(better, n, n_best)

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        k, f, v, n, best, n_best = state
        miss = bad(n)
        centre = (win_lo + win_hi) / 2
        ratio = jnp.where(n > 0, centre / jnp.where(n > 0, n, 1), 2)
        f = jnp.where(miss, f * ratio, f)
        v_new = landed(f)
        n_new = norm(v_new)
        v, n = jnp.where(miss, v_new, v), jnp.where(miss, n_new, n)
        best, n_best = keep_best(v, n, best, n_best)
        return k + 1, f, v, n, best, n_best

    v0 = landed(jnp.ones((), wide))
    n0 = norm(v0)  # one entry per unit, with the units' sharding
    f0 = jnp.ones_like(n0)
    best, n_best = keep_best(v0, n0, v0, jnp.full_like(n0, jnp.inf))
    state = (jnp.zeros((), jnp.int32), f0, v0, n0, best, n_best)
    _, f, _, _, best, n_best = jax.lax.while_loop(cond, body, state)
    fallback = _land_bound(p, u, x, jnp.where(same, t * f, t))
    fallback = jnp.where(same & (f == 1), u, fallback)
    return jnp.where(jnp.isfinite(n_best), best, fallback)


@_land_units.defjvp
def _land_units_jvp(
    axes: tuple[int, ...],
    landing: Landing,
    primals: tuple[jax.Array, ...],
    tangents: tuple[jax.Array, ...],
) -> Any:
    p, u, x, t, goal, lo, hi = primals
    dp, _, _, dt, _, _, _ = tangents
    out = _land_units(axes, landing, p, u, x, t, goal, lo, hi)
    return out, (dt - dp.astype(dt.dtype)).astype(u.dtype)
