"""L2 and L1 decay: transforms that add a multiple of the weights, and loss terms.

* :func:`add_l2_decay` and :func:`add_l1_decay` add the (sub)gradient of a
  penalty to the updates. Where they sit in ``optax.chain`` decides what they
  mean: before the optimizer they regularise the loss (coupled L2, the
  penalty's gradient goes through Adam's normalisation); after the
  optimizer's scaling and before the learning rate they are *decoupled*
  weight decay (AdamW).
* :func:`prox_l1` is the proximal step of an L1 penalty (soft thresholding),
  placed last: it produces exact zeros.
* :func:`l2_penalty` and :func:`l1_penalty` are the loss-side terms, plain
  functions to add to a loss.

The transforms are stateless, need ``params`` and take a ``mask``. Under
:func:`optax.inject_hyperparams`, pass a callable ``mask`` in ``static_args``
(a callable would otherwise be taken for a schedule).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from norm_optax import _common
from norm_optax._balls import soft_threshold
from norm_optax._projection import finish, wide_sum, widen
from norm_optax.norms import global_norm

__all__ = ["add_l1_decay", "add_l2_decay", "l1_penalty", "l2_penalty", "prox_l1"]


def _add_scaled(g: jax.Array, coeff: Any, d: jax.Array) -> jax.Array:
    """``g + coeff * d`` in the accumulation precision, cast once to ``g``'s dtype."""
    g_wide, d_wide = widen(g), widen(d)
    dtype = np.promote_types(g_wide.dtype, d_wide.dtype)
    c = jnp.asarray(coeff).astype(np.dtype(jnp.finfo(dtype).dtype)).astype(dtype)
    return (g_wide.astype(dtype) + c * d_wide.astype(dtype)).astype(g.dtype)


def add_l2_decay(coeff: Any, mask: _common.Mask = None) -> optax.GradientTransformation:
    r"""Adds ``coeff`` times the parameters to the updates: L2 decay.

    .. math:: g \leftarrow g + \lambda\, p

    Where it sits in ``optax.chain`` decides what it is:

    * **Coupled L2 regularisation** -- first, before the optimizer:
      ``optax.chain(nox.add_l2_decay(1e-4), optax.adam(1e-3))`` is the same
      as adding :func:`l2_penalty` times ``coeff`` to the loss (its gradient
      is :math:`\lambda p`). With adaptive optimizers the decay is then
      divided by Adam's second-moment estimate, which weakens it for weights
      with large gradients.
    * **Decoupled weight decay** (AdamW, Loshchilov & Hutter) -- after the
      optimizer's scaling and before the learning rate:
      ``optax.chain(optax.scale_by_adam(), nox.add_l2_decay(1e-4),
      optax.scale(-lr))`` equals ``optax.adamw(lr, weight_decay=1e-4)``: every
      weight shrinks by ``lr * coeff * p`` per step, whatever its gradient.

    Half-precision leaves are computed in ``float32`` and cast once. The usual
    choice is to decay matrices only:
    ``mask=norm_optax.masks.matrices_only``.

    Args:
      coeff: :math:`\lambda`, ``>= 0``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformation` that needs ``params``.

    Raises:
      ValueError: ``coeff`` is negative or NaN (at construction); ``params``
        is missing or ``params``/``mask`` does not match the updates (at
        update).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.add_l2_decay(0.5)
      >>> params = {"w": jnp.array([2.0, -4.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)
      >>> u["w"]
      Array([ 2., -1.], dtype=float32)

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    _common.check_nonnegative(coeff, "coeff")

    def leaf(path: str, g: jax.Array, p: jax.Array) -> jax.Array:
        del path
        return _add_scaled(g, coeff, p)

    return _common.params_transform("add_l2_decay", leaf, mask)


def add_l1_decay(coeff: Any, mask: _common.Mask = None) -> optax.GradientTransformation:
    r"""Adds ``coeff`` times the sign of the parameters to the updates: L1 decay.

    .. math:: g \leftarrow g + \lambda \operatorname{sign}(p)

    :math:`\lambda \operatorname{sign}(p)` is a subgradient of
    :math:`\lambda \|p\|_1` (:func:`l1_penalty`), ``0`` at ``p = 0``; complex
    parameters use :math:`p / |p|`. As with :func:`add_l2_decay`, place it
    before the optimizer for a coupled penalty, or after the optimizer's
    scaling and before the learning rate for decoupled decay. A subgradient
    step oscillates around zero rather than reaching it: for exact zeros use
    :func:`prox_l1`.

    Args:
      coeff: :math:`\lambda`, ``>= 0``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformation` that needs ``params``.

    Raises:
      ValueError: ``coeff`` is negative or NaN (at construction); ``params``
        is missing or ``params``/``mask`` does not match the updates (at
        update).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.add_l1_decay(0.5)
      >>> params = {"w": jnp.array([2.0, -4.0, 0.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0, 1.0, 1.0])}, tx.init(params), params)
      >>> u["w"]
      Array([1.5, 0.5, 1. ], dtype=float32)

    References:
      Tibshirani, `Regression Shrinkage and Selection via the Lasso
      <https://doi.org/10.1111/j.2517-6161.1996.tb02080.x>`_, 1996
    """
    _common.check_nonnegative(coeff, "coeff")

    def leaf(path: str, g: jax.Array, p: jax.Array) -> jax.Array:
        del path
        return _add_scaled(g, coeff, jnp.sign(widen(p)))

    return _common.params_transform("add_l1_decay", leaf, mask)


def prox_l1(
    coeff: Any, learning_rate: Any, mask: _common.Mask = None
) -> optax.GradientTransformation:
    r"""Proximal L1 step (soft thresholding): decay that reaches exact zeros.

    With :math:`x = p + u` the proposed parameters and
    :math:`\tau = \eta \lambda` (``learning_rate * coeff``),

    .. math:: p \leftarrow \operatorname{sign}(x) \max(|x| - \tau, 0),
       \qquad u' = \operatorname{sign}(x) \max(|x| - \tau, 0) - p

    the proximal operator of :math:`\tau \|\cdot\|_1` (FOBOS, Duchi & Singer):
    a gradient step on the loss followed by the exact minimisation of the L1
    term. Entries with :math:`|x| \le \tau` become exactly ``0`` after
    ``optax.apply_updates`` (``u' = -p`` there), which a subgradient
    (:func:`add_l1_decay`) never achieves. The others move toward zero by
    :math:`\tau`, up to one rounding of the parameter dtype. Complex entries
    are shrunk in modulus. A NaN in ``params`` or ``updates`` gives NaN.

    Place it last, after the learning rate, and pass it the same learning
    rate: ``optax.chain(optax.sgd(lr), nox.prox_l1(1e-4, lr))``.

    Args:
      coeff: :math:`\lambda`, the L1 coefficient, ``>= 0``.
      learning_rate: :math:`\eta`, the step size of the preceding step,
        ``>= 0`` (a schedule can be applied with
        :func:`optax.inject_hyperparams`).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformation` that needs ``params``.

    Raises:
      ValueError: ``coeff`` or ``learning_rate`` is negative or NaN (at
        construction); ``params`` is missing or ``params``/``mask`` does not
        match the updates (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.prox_l1(coeff=0.5, learning_rate=1.0)
      >>> params = {"w": jnp.array([2.0, -0.25, 0.3])}
      >>> u, _ = tx.update({"w": jnp.array([0.0, 0.5, -0.5])}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"]
      Array([1.5, 0. , 0. ], dtype=float32)

    References:
      Duchi & Singer, `Efficient Online and Batch Learning Using Forward
      Backward Splitting <https://jmlr.org/papers/v10/duchi09a.html>`_, 2009
    """
    _common.check_nonnegative(coeff, "coeff")
    _common.check_nonnegative(learning_rate, "learning_rate")

    def leaf(path: str, u: jax.Array, p: jax.Array) -> jax.Array:
        del path
        x = wide_sum(p, u)
        real = np.dtype(jnp.finfo(x.dtype).dtype)
        tau = jnp.asarray(coeff).astype(real) * jnp.asarray(learning_rate).astype(real)
        target = jnp.where(tau >= 0, soft_threshold(x, tau), jnp.nan)
        return finish(u, p, target, tau == 0)

    return _common.params_transform("prox_l1", leaf, mask)


def l2_penalty(tree: Any) -> jax.Array:
    r"""The L2 penalty :math:`\tfrac12 \|p\|_2^2` of a tree, to add to a loss.

    Its gradient is the tree itself, so
    ``loss + coeff * nox.l2_penalty(params)`` trains like
    ``optax.chain(nox.add_l2_decay(coeff), optimizer)``. Accumulated in
    ``float32`` or wider; integer and ``None`` leaves are skipped.

    Args:
      tree: a pytree of arrays (typically params, or a masked selection).

    Returns:
      A scalar of dtype ``float32`` (``float64`` if a leaf is 64-bit).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> float(nox.l2_penalty({"w": jnp.array([3.0, 4.0])}))
      12.5
    """
    return 0.5 * jnp.square(global_norm(tree))


def l1_penalty(tree: Any) -> jax.Array:
    r"""The L1 penalty :math:`\|p\|_1` of a tree, to add to a loss.

    Its gradient is ``sign(p)`` (``0`` at ``0``), the step of
    :func:`add_l1_decay`. Accumulated in ``float32`` or wider; integer and
    ``None`` leaves are skipped.

    Args:
      tree: a pytree of arrays.

    Returns:
      A scalar of dtype ``float32`` (``float64`` if a leaf is 64-bit).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> float(nox.l1_penalty({"w": jnp.array([3.0, -4.0]), "b": jnp.array([0.5])}))
      7.5
    """
    return global_norm(tree, ord=1)
