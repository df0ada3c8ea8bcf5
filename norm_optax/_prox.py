r"""Proximal steps: place these *last* in ``optax.chain``, after the learning rate.

A proximal step is the exact minimisation of a penalty after a gradient step
(forward-backward splitting): with :math:`x = p + u` the proposed parameters
and :math:`\eta` the learning rate of that step, the new parameters are

.. math:: p \leftarrow \operatorname{prox}_{\eta R}(x)
   = \operatorname*{arg\,min}_y \tfrac12 \|y - x\|_2^2 + \eta R(y).

Unlike a subgradient of the penalty (:func:`norm_optax.add_l1_decay`), which
oscillates around zero, a prox reaches exact zeros: single weights for the
L1 norm (:func:`prox_l1`, :func:`prox_elastic_net`), whole units -- neurons,
channels -- for the group lasso (:func:`prox_group_l1`).

Each is its target function handed to the projection builder (``_transform``),
so params, masks, stack axes, widening, the landing in the parameter's dtype
(exact zeros are exactly ``0`` after :func:`optax.apply_updates`) and
sharding are the same as for every projection. ``learning_rate`` may be the
optax schedule the optimizer uses: the transform then keeps a step count
(:class:`ScheduleState`, its only state) and evaluates the schedule at it,
exactly as :func:`optax.scale_by_learning_rate` does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from norm_optax._domains import FINITE_NONNEGATIVE, declare
from norm_optax._layout import check_axis
from norm_optax._numerics import real_dtype, soft_threshold
from norm_optax._transform import Leaf, Target, projection
from norm_optax._types import Axis, Mask, Scalar, Schedule, StackAxes

__all__ = ["prox_elastic_net", "prox_group_l1", "prox_l1"]

Values = dict[str, Any]


def _real(value: Any, like: jax.Array) -> jax.Array:
    return jnp.asarray(value).astype(real_dtype(like))


def prox_l1(
    coeff: Scalar, learning_rate: Scalar | Schedule, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
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
      coeff: :math:`\lambda`, the L1 coefficient, ``>= 0`` and finite.
      learning_rate: :math:`\eta`, the step size of the preceding step,
        ``>= 0`` and finite, or the optax schedule the optimizer uses (the
        transform then counts steps in a :class:`ScheduleState`, so the
        threshold follows the schedule exactly).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` that needs ``params``
      (extra keyword arguments to ``update`` are ignored); stateless
      (:class:`optax.EmptyState`) unless ``learning_rate`` is a schedule.

    Raises:
      ValueError: ``coeff`` or ``learning_rate`` is negative, NaN or
        infinite (at construction); ``params`` is missing or
        ``params``/``mask`` does not match the updates (at update).

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
    hypers = declare(
        coeff=(coeff, FINITE_NONNEGATIVE),
        learning_rate=(learning_rate, FINITE_NONNEGATIVE),
        schedules=("learning_rate",),
    )

    def shrink(x: jax.Array, leaf: Leaf, values: Values) -> tuple[jax.Array, Any]:
        del leaf
        tau = _real(values["coeff"], x) * _real(values["learning_rate"], x)
        return soft_threshold(x, tau), tau == 0

    return projection("prox_l1", Target("element", shrink), hypers, mask=mask)


def prox_group_l1(
    coeff: Scalar,
    learning_rate: Scalar | Schedule,
    axis: Axis = None,
    *,
    stack_axes: StackAxes = None,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Group lasso step (block soft thresholding): whole units become exactly zero.

    For every unit :math:`w` of :math:`x = p + u` (see
    :func:`norm_optax.unit_norms`) and :math:`\tau = \eta \lambda`
    (``learning_rate * coeff``),

    .. math:: w \leftarrow w \cdot \max\!\left(0,
       1 - \frac{\tau}{\|w\|_2}\right)

    the proximal operator of :math:`\tau \sum_w \|w\|_2`, the group lasso
    penalty (Yuan & Lin) used for structured sparsity (Wen et al.): a unit
    whose norm is at most :math:`\tau` becomes exactly ``0`` after
    ``optax.apply_updates`` -- a whole neuron (the incoming weights of an
    output feature of a Dense kernel ``(in, out)``) or a whole output channel
    of a Conv kernel, which can then be pruned -- and the others shrink
    toward zero by :math:`\tau` in norm, keeping their direction.

    Units follow the Flax kernel convention (``axis=None``), the
    PyTorch/Equinox one (``axis="out_first"``) or the axes given; with
    ``stack_axes`` each stacked layer has its own units (see :doc:`Layouts </layouts>`).
    Biases and norm scales are usually left out with ``mask``. A NaN or
    infinite unit norm makes the unit NaN.

    Place it last, after the learning rate, with the same learning rate:
    ``optax.chain(optax.sgd(lr), nox.prox_group_l1(1e-3, lr,
    mask=nox.masks.matrices_only))``.

    Args:
      coeff: :math:`\lambda`, the group lasso coefficient, ``>= 0`` and
        finite.
      learning_rate: :math:`\eta`, the step size of the preceding step,
        ``>= 0`` and finite, or the optax schedule the optimizer uses (then
        the state is a :class:`ScheduleState`).
      axis: which axes a unit reduces over: ``None`` (Flax), ``"out_first"``
        (PyTorch/Equinox), an int or ints, or a tree of those matching the
        params, or a callable ``params -> tree``. Under
        :func:`optax.inject_hyperparams` pass it in ``static_args``.
      stack_axes: how many leading axes index stacked layers: ``None``, an
        int for every leaf, a tree of ints/bools matching the params, or a
        callable ``params -> tree``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` that needs ``params``
      (extra keyword arguments to ``update`` are ignored); stateless unless
      ``learning_rate`` is a schedule.

    Raises:
      ValueError: ``coeff`` or ``learning_rate`` is negative, NaN or infinite
        (at construction); ``params`` is missing, ``params``/``mask`` does
        not match the updates, or an axis is out of range or names a stack
        axis (at update; the message names the leaf's path and shape).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.prox_group_l1(coeff=1.0, learning_rate=1.0)
      >>> params = {"kernel": jnp.array([[3.0, 0.3], [4.0, 0.4]])}  # norms 5, 0.5
      >>> u, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["kernel"]  # unit 1 shrinks, unit 2 -> 0
      Array([[2.4, 0. ],
             [3.2, 0. ]], dtype=float32)

    References:
      Yuan & Lin, `Model Selection and Estimation in Regression with Grouped
      Variables <https://doi.org/10.1111/j.1467-9868.2005.00532.x>`_, 2006;
      Wen et al., `Learning Structured Sparsity in Deep Neural Networks
      <https://arxiv.org/abs/1608.03665>`_, 2016
    """
    hypers = declare(
        coeff=(coeff, FINITE_NONNEGATIVE),
        learning_rate=(learning_rate, FINITE_NONNEGATIVE),
        schedules=("learning_rate",),
    )
    check_axis(axis)

    def shrink(norm: jax.Array, leaf: Leaf, values: Values) -> tuple[Any, Any]:
        del leaf
        tau = _real(values["coeff"], norm) * _real(values["learning_rate"], norm)
        # A unit whose norm is 0 (or underflows to 0 in its squares) is within
        # any positive threshold: it becomes exactly 0; at tau = 0 it is kept.
        at_zero = jnp.where(tau > 0, 0, 1).astype(norm.dtype)
        positive = norm > 0
        num = jnp.where(positive, jnp.maximum(0, norm - tau), at_zero)
        return num, jnp.where(positive, norm, 1).astype(norm.dtype)

    return projection(
        "prox_group_l1",
        Target("unit", shrink),
        hypers,
        mask=mask,
        axis=axis,
        stack_axes=stack_axes,
    )


def prox_elastic_net(
    l1: Scalar, l2: Scalar, learning_rate: Scalar | Schedule, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Elastic net step: soft thresholding and shrinkage, with exact zeros.

    With :math:`x = p + u` the proposed parameters and :math:`\eta` the
    learning rate,

    .. math:: p \leftarrow \frac{\operatorname{sign}(x)
       \max(|x| - \eta \lambda_1, 0)}{1 + \eta \lambda_2}

    the proximal operator of :math:`\eta\,(\lambda_1 \|\cdot\|_1 +
    \tfrac{\lambda_2}{2} \|\cdot\|_2^2)`, the elastic net penalty of Zou &
    Hastie: the L1 part gives exact zeros (entries with
    :math:`|x| \le \eta\lambda_1` become exactly ``0`` after
    ``optax.apply_updates``), the L2 part shrinks the rest and keeps groups
    of correlated weights together. At ``l2 = 0`` it is :func:`prox_l1`; at
    ``l1 = 0`` a multiplicative weight decay by :math:`1/(1 + \eta\lambda_2)`.
    Complex entries are shrunk in modulus.

    Place it last, after the learning rate, with the same learning rate:
    ``optax.chain(optax.sgd(lr), nox.prox_elastic_net(1e-4, 1e-3, lr))``.

    Args:
      l1: :math:`\lambda_1`, the L1 coefficient, ``>= 0`` and finite.
      l2: :math:`\lambda_2`, the L2 coefficient, ``>= 0`` and finite.
      learning_rate: :math:`\eta`, ``>= 0`` and finite, or the optax
        schedule the optimizer uses (then the state is a
        :class:`ScheduleState`).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` that needs ``params``
      (extra keyword arguments to ``update`` are ignored); stateless unless
      ``learning_rate`` is a schedule.

    Raises:
      ValueError: ``l1``, ``l2`` or ``learning_rate`` is negative, NaN or
        infinite (at construction); ``params`` is missing or
        ``params``/``mask`` does not match the updates (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.prox_elastic_net(l1=0.5, l2=1.0, learning_rate=1.0)
      >>> params = {"w": jnp.array([2.5, -0.25, 0.3])}
      >>> u, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"]  # (2.5 - 0.5) / 2, then zeros
      Array([1., 0., 0.], dtype=float32)

    References:
      Zou & Hastie, `Regularization and Variable Selection via the Elastic
      Net <https://doi.org/10.1111/j.1467-9868.2005.00503.x>`_, 2005
    """
    hypers = declare(
        l1=(l1, FINITE_NONNEGATIVE),
        l2=(l2, FINITE_NONNEGATIVE),
        learning_rate=(learning_rate, FINITE_NONNEGATIVE),
        schedules=("learning_rate",),
    )

    def shrink(x: jax.Array, leaf: Leaf, values: Values) -> tuple[jax.Array, Any]:
        del leaf
        lr = _real(values["learning_rate"], x)
        tau = _real(values["l1"], x) * lr
        decay = 1 + _real(values["l2"], x) * lr
        return soft_threshold(x, tau) / decay.astype(x.dtype), (tau == 0) & (decay == 1)

    return projection("prox_elastic_net", Target("element", shrink), hypers, mask=mask)
