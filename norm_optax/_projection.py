"""Weight projection: place these *last* in ``optax.chain``, after the learning rate.

A projection reads the current ``params`` and returns the update

.. math:: u' = P(p + u) - p

so that ``optax.apply_updates(params, u')`` is the projection of the proposed
parameters ``p + u`` onto a constraint set (a box, a norm bound per unit;
the L2 and L1 balls over the whole tree are in ``_balls``, on the same
builder, ``_transform.projection``). Every transform here is stateless
(``optax.EmptyState``) and needs ``params``.

**Rounding.** ``optax.apply_updates`` adds ``u'`` to ``p`` in the promoted
dtype of the two and rounds the sum to the parameter's dtype. Elements a
projection leaves alone get ``u`` back unchanged. For the elements it moves,
the target ``P(p + u)`` is computed in ``float32`` or wider and ``u'`` is
chosen *in the update's dtype* (``float32`` params with ``bfloat16`` updates
included) so that what ``apply_updates`` computes keeps every bound
(``|w| <= c``, ``w >= 0``, ``||w_unit|| <= c``, the balls): the new parameter
is the target, or lies just past it in the direction the projection moved it
(never across zero), so an upper bound is never exceeded and a lower bound
never missed, in every pair of dtypes. ``p + u'`` can only reach the values
``p + v`` for ``v`` of the update's dtype; in ``float16``/``bfloat16`` a large
move (a unit shrunk many times) has a coarse grid. A unit norm constraint
then lands each unit as near its target norm as that grid allows: rounded to
nearest, the unit's new norm checked, and its target rescaled when it misses
(a unit is never zeroed unless its target is zero; a unit that starts within
twice its bound ends within ``[b(1 - 2eps), b]``, ``eps`` that of the
dtype). Norm bounds are aimed four units in the last place (of the
accumulation dtype) inside, so that the rounding of the norm itself cannot
push a unit over. A target of exactly ``0`` gives ``u' = -p`` rounded to the
update's dtype (exactly ``0`` when ``-p`` is representable there). The
equality constraint of :func:`unit_norm` is landed to nearest.

**Non-finite input.** Where ``p + u`` is NaN or infinite (a NaN or infinite
parameter or update), the new parameter is NaN: every projection and prox
(per element, or the whole unit, or the whole tree for the balls), never a
plausible finite value such as the bound, so that ``optax.apply_if_finite``
can skip the step.

Under :func:`optax.inject_hyperparams`, pass ``axis`` and a callable ``mask``
in ``static_args`` (a callable would otherwise be taken for a schedule).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from norm_optax._domains import NONNEGATIVE, UNIT_INTERVAL, Hypers, declare
from norm_optax._layout import check_axis
from norm_optax._numerics import (
    inner_bound,
    outer_bound,
    real_dtype,
    select,
    toward_zero,
)
from norm_optax._transform import Leaf, Target, projection
from norm_optax._types import Axis, Mask, Scalar, StackAxes

__all__ = [
    "clip_weights",
    "max_norm",
    "min_max_norm",
    "non_negative",
    "project_linf_ball",
    "unit_norm",
]

Values = dict[str, Any]


# ---------------------------------------------------------------------------
# Elementwise constraints.
# ---------------------------------------------------------------------------


def _box(
    transform: str, name: str, hypers: Hypers, mask: Mask
) -> optax.GradientTransformationExtraArgs:
    def box(x: jax.Array, leaf: Leaf, values: Values) -> tuple[jax.Array, Any]:
        m = jnp.asarray(values[name]).astype(real_dtype(x))
        # The bound in p's dtype, rounded toward zero: below it, rounding
        # ``p + u`` to nearest in p's dtype stays in the box. (Its value, with
        # the derivative of ``m``.)
        param_real = jnp.finfo(leaf.dtype).dtype
        fixed = jax.lax.stop_gradient(m)
        m = m + (toward_zero(fixed, param_real).astype(m.dtype) - fixed)
        if jnp.iscomplexobj(x):
            t = jax.lax.complex(jnp.clip(x.real, -m, m), jnp.clip(x.imag, -m, m))
            return t, False
        return jnp.clip(x, -m, m), False

    return projection(transform, Target("element", box), hypers, mask=mask)


def clip_weights(
    max_value: Any, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Weight clipping: keeps every parameter in ``[-max_value, max_value]``.

    .. math:: p \leftarrow \min(\max(p + u, -c), c), \qquad
       u' = \operatorname{clip}(p + u, -c, c) - p

    The box constraint of the WGAN critic. Elements already inside end where
    their update puts them. Complex parameters have their real and imaginary parts
    clipped separately. After ``optax.apply_updates`` every element is in the
    box, in every dtype (see :ref:`rounding` on the Weight projections page).

    Place it last, after the learning rate:
    ``optax.chain(optax.rmsprop(5e-5), nox.clip_weights(0.01))``.

    Args:
      max_value: the bound :math:`c`, ``>= 0``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``max_value`` is negative or NaN (at construction);
        ``params`` is missing or ``params``/``mask`` does not match the
        updates (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.clip_weights(1.0)
      >>> params = {"w": jnp.array([0.5, -0.5, 0.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.25])}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"]
      Array([ 1.  , -1.  ,  0.25], dtype=float32)

    References:
      Arjovsky et al., `Wasserstein Generative Adversarial Networks
      <https://arxiv.org/abs/1701.07875>`_, 2017
    """
    hypers = declare(max_value=(max_value, NONNEGATIVE))
    return _box("clip_weights", "max_value", hypers, mask)


def project_linf_ball(
    radius: Any, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    r"""Euclidean projection onto the :math:`\ell_\infty` ball of radius ``radius``.

    .. math:: \{p : \|p\|_\infty \le r\} \text{ is the box } [-r, r]^n, \qquad
       u' = \operatorname{clip}(p + u, -r, r) - p

    The same map as :func:`clip_weights` (the ball over the whole tree is the
    elementwise box), named for use next to :func:`project_l1_ball` and
    :func:`project_l2_ball`.

    Place it last, after the learning rate:
    ``optax.chain(optax.sgd(1e-2), nox.project_linf_ball(1.0))``.

    Args:
      radius: :math:`r`, ``>= 0``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``radius`` is negative or NaN (at construction); ``params``
        is missing or ``params``/``mask`` does not match the updates (at
        update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.project_linf_ball(2.0)
      >>> params = {"w": jnp.zeros(3)}
      >>> u, _ = tx.update({"w": jnp.array([3.0, -1.0, -5.0])}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"]
      Array([ 2., -1., -2.], dtype=float32)
    """
    hypers = declare(radius=(radius, NONNEGATIVE))
    return _box("project_linf_ball", "radius", hypers, mask)


def non_negative(mask: Mask = None) -> optax.GradientTransformationExtraArgs:
    r"""Keeps every parameter ``>= 0`` (projection onto the non-negative orthant).

    .. math:: p \leftarrow \max(p + u, 0), \qquad u' = \max(p + u, 0) - p

    Elements that would become negative are set to exactly ``0`` (``u' = -p``);
    the others end where their update puts them. As in non-negative matrix
    factorisation or Keras' ``NonNeg`` constraint.

    Place it last, after the learning rate:
    ``optax.chain(optax.adam(1e-3), nox.non_negative())``.

    Args:
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``params`` is missing or ``params``/``mask`` does not match
        the updates (at update).
      TypeError: a constrained leaf is complex (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.non_negative()
      >>> params = {"w": jnp.array([0.5, 0.5, 2.0])}
      >>> updates = {"w": jnp.array([-1.0, 0.25, -1.0])}
      >>> u, _ = tx.update(updates, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"]
      Array([0.  , 0.75, 1.  ], dtype=float32)

    References:
      Keras, `NonNeg constraint
      <https://keras.io/api/layers/constraints/#nonneg-class>`_
    """

    def orthant(x: jax.Array, leaf: Leaf, values: Values) -> tuple[jax.Array, Any]:
        del values
        if jnp.iscomplexobj(x):
            raise TypeError(
                f"non_negative: the leaf at {leaf.path or '<root>'} is complex "
                f"({leaf.dtype}); complex numbers have no sign."
            )
        return jnp.maximum(x, 0), False

    return projection("non_negative", Target("element", orthant), declare(), mask=mask)


# ---------------------------------------------------------------------------
# Unit-wise norm constraints: a scale per unit from its norm.
# ---------------------------------------------------------------------------


def _unitwise(
    transform: str,
    desired: Any,
    hypers: Hypers,
    *,
    landing: Any = "bound",
    limits: Any = None,
    axis: Axis,
    stack_axes: StackAxes,
    mask: Mask,
) -> optax.GradientTransformationExtraArgs:
    """Scales each unit of ``p + u`` to the norm ``desired(norm, values)``.

    A zero unit stays zero; a NaN or infinite unit norm gives NaN.
    """
    check_axis(axis)

    def scale(norm: jax.Array, leaf: Leaf, values: Values) -> tuple[Any, Any]:
        del leaf
        positive = norm != 0  # a zero unit is kept (scale 1)
        one = jnp.ones_like(norm)
        return select(positive, desired(norm, values), one), select(positive, norm, one)

    return projection(
        transform,
        Target("unit", scale, landing=landing, limits=limits),
        hypers,
        mask=mask,
        axis=axis,
        stack_axes=stack_axes,
    )


def max_norm(
    max_value: Scalar,
    axis: Axis = None,
    mask: Mask = None,
    *,
    stack_axes: StackAxes = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Max-norm constraint: rescales every unit whose L2 norm exceeds ``max_value``.

    For every unit :math:`w` of :math:`p + u` (see :func:`norm_optax.unit_norms`),

    .. math:: w \leftarrow w \cdot \min\!\left(1, \frac{c}{\|w\|_2}\right)

    Units follow the Flax kernel convention unless ``axis`` names the axes to
    reduce over: one unit per output feature of a Dense kernel ``(in, out)``
    (the incoming weights of a neuron, as in Srivastava et al.), one per
    output channel of a Conv kernel, the whole array for biases and scalars
    (use ``mask`` to leave those free). Units under the limit end where
    their update puts them; units over it are scaled onto it (aimed a few
    ulps inside, see :ref:`rounding`). A NaN or infinite unit norm makes the
    unit NaN.

    Place it last, after the learning rate:
    ``optax.chain(optax.sgd(0.1, momentum=0.9), nox.max_norm(3.0))``.

    Args:
      max_value: :math:`c`, the largest unit norm, ``>= 0``.
      axis: the axes a unit reduces over: ``None`` (the Flax convention),
        ``"out_first"`` (PyTorch/Equinox weights ``(out, in, *kernel)``), an
        int or a tuple of ints, or a tree of those matching the params, or a
        callable ``params -> tree``. Under :func:`optax.inject_hyperparams`
        pass it in ``static_args`` (or as a tuple).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree`` such as
        :func:`norm_optax.masks.matrices_only`; leaves marked ``False`` pass
        unchanged.
      stack_axes: how many leading axes index stacked layers (see
        :doc:`Layouts </layouts>`), each with its own units: ``None`` (none), an int for
        every leaf, a tree of ints or bools matching the params, or a
        callable ``params -> tree`` such as ``nox.masks.by_path("layers/")``.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``max_value`` is negative or NaN (at construction);
        ``params`` is missing, ``params``/``mask`` does not match the updates,
        or ``axis`` is out of range for a leaf (at update; the message names
        the leaf's path and shape).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.max_norm(1.0)
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> updates = {"kernel": jnp.array([[3.0, 0.5], [4.0, 0.0]])}
      >>> u, _ = tx.update(updates, tx.init(params), params)
      >>> nox.unit_norms(optax.apply_updates(params, u)["kernel"]).round(4)
      Array([[1. , 0.5]], dtype=float32)

    References:
      Srivastava et al., `Dropout: A Simple Way to Prevent Neural Networks from
      Overfitting <https://jmlr.org/papers/v15/srivastava14a.html>`_, 2014
    """
    hypers = declare(max_value=(max_value, NONNEGATIVE))

    def desired(norm: jax.Array, values: Values) -> jax.Array:
        return jnp.minimum(norm, inner_bound(values["max_value"], norm.dtype))

    def limits(norm: jax.Array, target: jax.Array, leaf: Leaf, values: Values) -> Any:
        del target, leaf
        return 0, jnp.asarray(values["max_value"]).astype(norm.dtype)

    return _unitwise(
        "max_norm",
        desired,
        hypers,
        limits=limits,
        axis=axis,
        stack_axes=stack_axes,
        mask=mask,
    )


def unit_norm(
    axis: Axis = None, mask: Mask = None, *, stack_axes: StackAxes = None
) -> optax.GradientTransformationExtraArgs:
    r"""Unit-norm constraint: rescales every unit to an L2 norm of exactly ``1``.

    .. math:: w \leftarrow \frac{w}{\|w\|_2}, \qquad 0 \mapsto 0

    for every unit :math:`w` of :math:`p + u` (Flax kernel convention unless
    ``axis`` is given, see :func:`max_norm`). A zero unit stays zero (it has
    no direction). After ``optax.apply_updates`` the norm is ``1`` up to a
    few roundings of the parameter dtype (for a unit that moves far, of the
    parameter dtype at the old values' magnitude), on either side: the new
    parameters are landed to nearest, so the norms are not biased. A NaN or
    infinite unit norm makes the unit NaN.

    Place it last, after the learning rate:
    ``optax.chain(optax.adam(1e-3), nox.unit_norm(mask=nox.masks.matrices_only))``.

    Args:
      axis: the axes a unit reduces over: ``None`` (the Flax convention),
        ``"out_first"`` (PyTorch/Equinox weights ``(out, in, *kernel)``), an
        int or a tuple of ints, or a tree of those matching the params, or a
        callable ``params -> tree``. Under :func:`optax.inject_hyperparams`
        pass it in ``static_args`` (or as a tuple).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.
      stack_axes: how many leading axes index stacked layers (see
        :doc:`Layouts </layouts>`), each with its own units: ``None`` (none), an int for
        every leaf, a tree of ints or bools matching the params, or a
        callable ``params -> tree`` such as ``nox.masks.by_path("layers/")``.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``params`` is missing, ``params``/``mask`` does not match the
        updates, or ``axis`` is out of range for a leaf (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.unit_norm()
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> updates = {"kernel": jnp.array([[3.0, 0.0], [4.0, 0.0]])}
      >>> u, _ = tx.update(updates, tx.init(params), params)
      >>> optax.apply_updates(params, u)["kernel"]
      Array([[0.6, 0. ],
             [0.8, 0. ]], dtype=float32)

    References:
      Keras, `UnitNorm constraint
      <https://keras.io/api/layers/constraints/#unitnorm-class>`_
    """

    def desired(norm: jax.Array, values: Values) -> jax.Array:
        del values
        return jnp.ones_like(norm)

    def limits(norm: jax.Array, target: jax.Array, leaf: Leaf, values: Values) -> Any:
        del values
        narrow = min(leaf.dtype, leaf.update_dtype, key=lambda d: jnp.finfo(d).bits)
        eps = jnp.asarray(jnp.finfo(narrow).eps, norm.dtype)
        # A zero unit stays zero.
        return jnp.where(target > 0, 1 - eps, 0), 1 + eps

    return _unitwise(
        "unit_norm",
        desired,
        declare(),
        landing="nearest",
        limits=limits,
        axis=axis,
        stack_axes=stack_axes,
        mask=mask,
    )


def min_max_norm(
    min_value: Scalar,
    max_value: Scalar,
    rate: Scalar = 1.0,
    axis: Axis = None,
    mask: Mask = None,
    *,
    stack_axes: StackAxes = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Moves every unit's L2 norm ``rate`` of the way into ``[min_value, max_value]``.

    For every unit :math:`w` of :math:`p + u` with norm :math:`n = \|w\|_2`
    (Flax kernel convention unless ``axis`` is given, see :func:`max_norm`),

    .. math:: w \leftarrow w \cdot \frac{\rho \operatorname{clip}(n, a, b)
       + (1 - \rho)\, n}{n}, \qquad 0 \mapsto 0

    the semantics of Keras' ``MinMaxNorm``: ``rate=1`` enforces the bounds
    strictly, a smaller rate moves the norms gradually. Units already inside
    end where their update puts them. A zero unit stays zero (it has no
    direction to grow along). A NaN or infinite unit norm makes the unit NaN.

    Place it last, after the learning rate:
    ``optax.chain(optax.adam(1e-3), nox.min_max_norm(0.5, 2.0))``.

    Args:
      min_value: :math:`a`, the smallest unit norm, ``>= 0``.
      max_value: :math:`b`, the largest unit norm, ``>= min_value``.
      rate: :math:`\rho \in [0, 1]`.
      axis: the axes a unit reduces over: ``None`` (the Flax convention),
        ``"out_first"`` (PyTorch/Equinox weights ``(out, in, *kernel)``), an
        int or a tuple of ints, or a tree of those matching the params, or a
        callable ``params -> tree``. Under :func:`optax.inject_hyperparams`
        pass it in ``static_args`` (or as a tuple).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.
      stack_axes: how many leading axes index stacked layers (see
        :doc:`Layouts </layouts>`), each with its own units: ``None`` (none), an int for
        every leaf, a tree of ints or bools matching the params, or a
        callable ``params -> tree`` such as ``nox.masks.by_path("layers/")``.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``min_value`` or ``max_value`` is negative or NaN,
        ``min_value > max_value``, or ``rate`` is outside ``[0, 1]`` (at
        construction); ``params`` is missing, ``params``/``mask`` does not
        match the updates, or ``axis`` is out of range for a leaf (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.min_max_norm(1.0, 2.0, rate=0.5)
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> updates = {"kernel": jnp.array([[0.0, 6.0], [0.5, 8.0]])}  # norms 0.5, 10
      >>> u, _ = tx.update(updates, tx.init(params), params)
      >>> nox.unit_norms(optax.apply_updates(params, u)["kernel"]).round(4)
      Array([[0.75, 6.  ]], dtype=float32)

    References:
      Keras, `MinMaxNorm constraint
      <https://keras.io/api/layers/constraints/#minmaxnorm-class>`_
    """
    hypers = declare(
        min_value=(min_value, NONNEGATIVE),
        max_value=(max_value, NONNEGATIVE),
        rate=(rate, UNIT_INTERVAL),
    ).require(
        "min_value must be <= max_value",
        lambda a, b: a <= b,
        "min_value",
        "max_value",
    )

    def desired(norm: jax.Array, values: Values) -> jax.Array:
        a = outer_bound(values["min_value"], norm.dtype)
        r = jnp.asarray(values["rate"]).astype(norm.dtype)
        high = inner_bound(values["max_value"], norm.dtype)
        clipped = jnp.minimum(jnp.maximum(norm, a), high)
        return norm + r * (clipped - norm)  # exactly ``norm`` inside the bounds

    def limits(norm: jax.Array, target: jax.Array, leaf: Leaf, values: Values) -> Any:
        del leaf
        a = jnp.asarray(values["min_value"]).astype(norm.dtype)
        b = jnp.asarray(values["max_value"]).astype(norm.dtype)
        # With ``rate < 1`` a unit moves only part of the way: not past its target.
        low = jnp.where(target > 0, jnp.minimum(a, target), 0)
        return low, jnp.maximum(b, target)

    return _unitwise(
        "min_max_norm",
        desired,
        hypers,
        limits=limits,
        axis=axis,
        stack_axes=stack_axes,
        mask=mask,
    )
