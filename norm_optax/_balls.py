"""Projections onto balls over the whole tree: place these *last* in the chain.

``project_l2_ball`` and ``project_l1_ball`` project all selected leaves of
``p + u`` together onto ``{w : ||w|| <= r}``, and return ``u' = P(p + u) - p``
landed as every projection is (``_numerics.land``): the new parameters are
never larger in magnitude than the exact projection, also in half precision.
Their norms are global ones, so under GSPMD they cost one all-reduce of a
scalar (see ``_sharding``), and the L1 threshold is found without sorting, so
no leaf is ever gathered.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from norm_optax import _norms
from norm_optax._domains import NONNEGATIVE, declare
from norm_optax._numerics import clip_scale, inner_bound, soft_threshold
from norm_optax._transform import Target, projection
from norm_optax._types import Mask, Scalar

__all__ = ["project_l1_ball", "project_l2_ball"]

Values = dict[str, Any]


def project_l2_ball(
    radius: Scalar, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Euclidean projection of the whole parameter tree onto the L2 ball.

    .. math:: p \leftarrow (p + u) \cdot \min\!\left(1,
       \frac{r}{\|p + u\|_2}\right), \qquad \|\cdot\|_2 \text{ over all leaves}

    The global counterpart of :func:`max_norm`: one scale for the whole tree
    (the selected leaves, with ``mask``), so inside the ball the parameters
    end where the updates put them. A NaN or infinite norm makes every
    selected element NaN.

    Place it last, after the learning rate:
    ``optax.chain(optax.sgd(1e-2), nox.project_l2_ball(10.0))``.

    Args:
      radius: :math:`r`, ``>= 0``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` are left out of
        the norm and pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``radius`` is negative or NaN (at construction); ``params``
        is missing or ``params``/``mask`` does not match the updates (at
        update).

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.project_l2_ball(1.0)
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> updates = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> u, _ = tx.update(updates, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> np.asarray(new["a"]).round(4), np.asarray(new["b"]).round(4)
      (array([0.6, 0. ], dtype=float32), array([0.8], dtype=float32))
    """
    hypers = declare(radius=(radius, NONNEGATIVE))

    def project(xs: list[jax.Array], values: Values) -> tuple[list[jax.Array], Any]:
        norm = _norms.tree_norm(xs, 2, axis_name=None)
        r = values["radius"]
        scale = clip_scale(norm, inner_bound(r, norm.dtype))
        keep = (norm <= jnp.asarray(r).astype(norm.dtype)) & jnp.isfinite(norm)
        scale = jnp.where(keep, 1, scale)
        return [x * scale.astype(x.dtype) for x in xs], keep

    return projection("project_l2_ball", Target("tree", project), hypers, mask=mask)


def _l1_ball_threshold(xs: list[jax.Array], radius: Any) -> jax.Array:
    r"""The soft threshold :math:`\theta` of the projection onto the L1 ball.

    :math:`\theta \ge 0` solves :math:`f(\theta) = \sum_i \max(|x_i| - \theta, 0)
    - r = 0`, a convex, decreasing, piecewise-linear equation. Newton's method
    from :math:`\theta = 0`, :math:`\theta \leftarrow \theta + f(\theta) /
    \#\{i : |x_i| > \theta\}` (Michelot's algorithm), never overshoots and
    ends on the exact root once the support stops shrinking: the same
    threshold as the sort-based algorithm of Duchi et al. 2008, found without
    sorting or gathering the leaves, with a few passes over them that each
    reduce to two scalars (a typical tree needs a handful). ``0`` inside the
    ball, NaN if a magnitude is NaN or infinite.
    """
    mags = [jnp.abs(x) for x in xs]
    dtype = max((m.dtype for m in mags), key=lambda d: d.itemsize)
    r = jnp.asarray(radius).astype(dtype)

    def excess_and_support(
        theta: jax.Array, mags: list[jax.Array], r: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """``f(theta)``, summed from the small differences, and the support size."""
        above = [m - theta.astype(m.dtype) for m in mags]
        excess = _norms.tree_total([jnp.maximum(d, 0) for d in above], "sum", dtype)
        support = _norms.tree_total(
            [(d > 0).astype(dtype) for d in above], "sum", dtype
        )
        return excess - r, support

    # The iteration runs on constants; the derivative comes from the last,
    # differentiable Newton step below (implicit differentiation of f = 0).
    fixed_mags = [jax.lax.stop_gradient(m) for m in mags]
    fixed_r = jax.lax.stop_gradient(r)

    def newton(state: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        theta, support, _ = state
        excess, new_support = excess_and_support(theta, fixed_mags, fixed_r)
        go = (excess > 0) & (new_support < support)
        step = excess / jnp.maximum(new_support, 1)
        return jnp.where(go, theta + step, theta), new_support, go

    start = (jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype), jnp.asarray(True))
    theta, _, _ = jax.lax.while_loop(lambda state: state[2], newton, start)
    excess, support = excess_and_support(theta, mags, r)
    theta = theta + excess / jnp.maximum(support, 1)
    # One ulp up if rounding left the sum over ``r``.
    fixed = jax.lax.stop_gradient(theta)
    ulp = jnp.nextafter(fixed, jnp.full_like(fixed, jnp.inf)) - fixed
    over = excess_and_support(fixed, fixed_mags, fixed_r)[0] > 0
    theta = theta + jnp.where(over, ulp, 0)
    total = _norms.tree_norm(mags, 1, axis_name=None).astype(dtype)
    theta = jnp.where(total <= r, 0, jnp.maximum(theta, 0))
    return jnp.where(jnp.isfinite(total) & (r >= 0), theta, jnp.nan)


def project_l1_ball(
    radius: Scalar, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Exact Euclidean projection of the whole parameter tree onto the L1 ball.

    .. math:: P(x) = \operatorname*{arg\,min}_{\|y\|_1 \le r} \|y - x\|_2
       = \operatorname{sign}(x) \max(|x| - \theta, 0)

    for :math:`x = p + u` over all selected leaves as one vector, where the
    threshold :math:`\theta \ge 0` is the one of Duchi et al. 2008, found
    without sorting: Newton's method on :math:`\sum_i \max(|x_i| - \theta, 0)
    = r` (Michelot's algorithm), exact once the support stops shrinking, a
    few passes over the leaves that each reduce to two scalars (so sharded
    leaves are never gathered). One threshold for the whole tree, then every
    leaf is soft-thresholded. Inside the ball the updates pass unchanged;
    outside, small entries become exactly ``0`` (a sparse projection). A NaN
    or infinite entry makes every selected element NaN.

    Place it last, after the learning rate:
    ``optax.chain(optax.sgd(1e-2), nox.project_l1_ball(1.0))``.

    Args:
      radius: :math:`r`, ``>= 0``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` are left out and
        pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``radius`` is negative or NaN (at construction); ``params``
        is missing or ``params``/``mask`` does not match the updates (at
        update).

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.project_l1_ball(1.0)
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> updates = {"a": jnp.array([2.0, -0.25]), "b": jnp.array([1.5])}
      >>> u, _ = tx.update(updates, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> np.asarray(new["a"]).round(4), np.asarray(new["b"]).round(4)
      (array([0.75, 0.  ], dtype=float32), array([0.25], dtype=float32))

    References:
      Duchi et al., `Efficient Projections onto the l1-Ball for Learning in
      High Dimensions <https://dl.acm.org/doi/10.1145/1390156.1390191>`_, 2008
    """
    hypers = declare(radius=(radius, NONNEGATIVE))

    def project(xs: list[jax.Array], values: Values) -> tuple[list[jax.Array], Any]:
        r = values["radius"]
        total = _norms.tree_norm(xs, 1, axis_name=None)
        keep = (total <= jnp.asarray(r).astype(total.dtype)) & jnp.isfinite(total)
        theta = _l1_ball_threshold(xs, inner_bound(r, total.dtype))
        return [soft_threshold(x, theta) for x in xs], keep

    return projection("project_l1_ball", Target("tree", project), hypers, mask=mask)
