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
* **landing** -- :func:`land`: the update, in the parameter's dtype, that
  moves ``p`` onto a target computed in wide precision, so that what
  :func:`optax.apply_updates` computes lies in the constraint set. Rounded
  toward zero for inequality constraints (a bound holds after the rounding),
  to nearest for equality constraints (no bias);
* :func:`inner_bound` -- a norm bound aimed a few ulps inside, so that the
  rounding of the norm itself cannot push a unit over.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from norm_optax._types import Scalar, accumulation_dtype

__all__ = [
    "Landing",
    "add_scaled",
    "clip_scale",
    "inner_bound",
    "land",
    "real_dtype",
    "safe_ratio",
    "scale_leaf",
    "soft_threshold",
    "toward_zero",
    "wide_sum",
    "widen",
]

Landing = Literal["toward_zero", "nearest"]

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


def safe_ratio(num: jax.Array, den: jax.Array, at_zero: Any) -> jax.Array:
    """``num / den``, ``at_zero`` where ``den == 0``, with a finite gradient there."""
    positive = den != 0
    return jnp.where(positive, num / jnp.where(positive, den, 1), at_zero)


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
    """``value`` (a norm bound) in ``dtype``, aimed a few ulps inside."""
    eps = jnp.finfo(dtype).eps
    return jnp.asarray(value).astype(dtype) * (1 - _MARGIN_ULPS * eps)


# ---------------------------------------------------------------------------
# Landing a target in the parameter's dtype.
# ---------------------------------------------------------------------------


def toward_zero(t: jax.Array, dtype: Any) -> jax.Array:
    """``t`` rounded to ``dtype`` toward zero (``|result| <= |t|``)."""
    if t.dtype == dtype:
        return t
    near = t.astype(dtype)
    over = jnp.abs(near.astype(t.dtype)) > jnp.abs(t)
    return jnp.where(over, jnp.nextafter(near, jnp.zeros_like(near)), near)


def _neighbours(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    down = jnp.nextafter(u, jnp.full_like(u, -jnp.inf))
    up = jnp.nextafter(u, jnp.full_like(u, jnp.inf))
    return down, up


def _land_toward_zero(p: jax.Array, t: jax.Array) -> jax.Array:
    dtype = p.dtype
    target = toward_zero(t, dtype)
    u = (target.astype(t.dtype) - p.astype(t.dtype)).astype(dtype)
    new = p + u  # exactly what optax.apply_updates computes
    zero = jnp.zeros((), dtype)
    high, low = jnp.maximum(target, zero), jnp.minimum(target, zero)
    # ``u`` is ``target - p`` rounded to nearest: if ``p + u`` overshoots, the
    # neighbour of ``u`` on the other side of ``target - p`` does not.
    down, up = _neighbours(u)
    return jnp.where(new > high, down, jnp.where(new < low, up, u))


def _land_nearest(p: jax.Array, t: jax.Array) -> jax.Array:
    dtype = p.dtype
    u = (t - p.astype(t.dtype)).astype(dtype)
    down, up = _neighbours(u)

    def error(v: jax.Array) -> jax.Array:
        return jnp.abs((p + v).astype(t.dtype) - t)

    # ``p + u`` rounds twice; one of the neighbours of ``u`` may land closer.
    best = jnp.where(error(down) < error(u), down, u)
    best = jnp.where(error(up) < error(best), up, best)
    exact_zero = t == 0
    return jnp.where(exact_zero, -p, best)


def _land_real(p: jax.Array, t: jax.Array, landing: Landing) -> jax.Array:
    t = jnp.real(t)
    if landing == "nearest":
        return _land_nearest(p, t)
    return _land_toward_zero(p, t)


def _make_land(landing: Landing) -> Any:
    @jax.custom_jvp
    def landed(p: jax.Array, t: jax.Array) -> jax.Array:
        p = jnp.asarray(p)  # (a Python float primal under jax.grad)
        if jnp.iscomplexobj(p):
            return jax.lax.complex(
                _land_real(p.real, t.real, landing),
                _land_real(p.imag, t.imag, landing),
            )
        return _land_real(p, t, landing)

    @landed.defjvp
    def _jvp(
        primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        p, t = primals
        dp, dt = tangents
        if not jnp.iscomplexobj(p):
            dt = jnp.real(dt)
        return landed(p, t), (dt - dp.astype(dt.dtype)).astype(p.dtype)

    return landed


_LANDED = {"toward_zero": _make_land("toward_zero"), "nearest": _make_land("nearest")}


def land(p: jax.Array, t: jax.Array, landing: Landing) -> jax.Array:
    """The update, in ``p``'s dtype, that moves ``p`` onto the target ``t``.

    ``t`` is in ``p``'s accumulation precision. With ``"toward_zero"``,
    ``fl(p + land(p, t))`` lies between ``0`` and ``t`` rounded toward zero
    (never larger in magnitude than the exact target: bounds hold); with
    ``"nearest"`` it is the representable value nearest to ``t`` that
    ``p + u`` can reach (no bias, for equality constraints). It is exactly
    ``0`` where ``t`` is ``0``. The derivative is that of ``t - p``.
    """
    return _LANDED[landing](p, t)
