"""L2 and L1 decay: transforms that add a multiple of the weights, and loss terms.

* :func:`add_l2_decay` and :func:`add_l1_decay` add the (sub)gradient of a
  penalty to the updates. Where they sit in ``optax.chain`` decides what they
  mean: before the optimizer they regularise the loss (coupled L2, the
  penalty's gradient goes through Adam's normalisation); after the
  optimizer's scaling and before the learning rate they are *decoupled*
  weight decay (AdamW).
* the proximal steps (:func:`norm_optax.prox_l1` and friends, placed last,
  which produce exact zeros) are in ``_prox``.
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
import optax

from norm_optax._domains import FINITE_NONNEGATIVE, declare
from norm_optax._numerics import add_scaled, widen
from norm_optax._transform import Leaf, leafwise
from norm_optax._types import Mask, PyTree, Scalar
from norm_optax.norms import global_norm

__all__ = ["add_l1_decay", "add_l2_decay", "l1_penalty", "l2_penalty"]


def add_l2_decay(
    coeff: Scalar, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
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
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``coeff`` is negative, NaN or infinite (at construction); ``params``
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
    hypers = declare(coeff=(coeff, FINITE_NONNEGATIVE))

    def decay(
        g: jax.Array, p: jax.Array, leaf: Leaf, values: dict[str, Any]
    ) -> jax.Array:
        del leaf
        return add_scaled(g, values["coeff"], p)

    return leafwise("add_l2_decay", decay, hypers, needs_params=True, mask=mask)


def add_l1_decay(
    coeff: Scalar, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
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
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``coeff`` is negative, NaN or infinite (at construction); ``params``
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
    hypers = declare(coeff=(coeff, FINITE_NONNEGATIVE))

    def decay(
        g: jax.Array, p: jax.Array, leaf: Leaf, values: dict[str, Any]
    ) -> jax.Array:
        del leaf
        return add_scaled(g, values["coeff"], jnp.sign(widen(p)))

    return leafwise("add_l1_decay", decay, hypers, needs_params=True, mask=mask)


def l2_penalty(tree: PyTree) -> jax.Array:
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


def l1_penalty(tree: PyTree) -> jax.Array:
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
