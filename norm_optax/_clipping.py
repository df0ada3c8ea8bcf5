"""Gradient clipping: place these *before* the optimizer in ``optax.chain``.

Every transform here is stateless (``optax.EmptyState``) and rescales, never
drops, a gradient. The scale is computed once, as a scalar (or one scalar per
unit), in ``float32`` or wider, and applied with a single multiply per
element, which XLA fuses into whatever consumes the clipped gradient. If the
norm a transform uses is NaN or infinite, every element it scales becomes NaN:
a broken step is never turned into zeros or into a plausible-looking update,
so :func:`optax.apply_if_finite` can still skip it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from norm_optax import _layout, _norms
from norm_optax._domains import FINITE_NONNEGATIVE, NONNEGATIVE, declare, poison
from norm_optax._numerics import as_real, clip_scale, safe_ratio, scale_leaf
from norm_optax._transform import Leaf, leafwise, map_inexact, stateless
from norm_optax._types import Axis, Mask, Ord, PyTree, Scalar, StackAxes
from norm_optax.norms import global_norm


@jax.custom_jvp
def _keep_or(within: jax.Array, x: jax.Array, scaled: jax.Array) -> jax.Array:
    """``x`` where ``within``, else ``scaled`` (a scalar ``within``).

    For 16-bit floats the choice is made on the bits (``uint16``): XLA:CPU has
    no ``bfloat16`` select and would widen both operands to ``float32`` and
    back, a full elementwise pass even within the limit, while an integer
    select over a donated input is skipped as a whole.
    """
    if jnp.dtype(x.dtype).itemsize != 2 or jnp.iscomplexobj(x):
        return jnp.where(within, x, scaled)
    bits = jnp.uint16
    keep = jax.lax.bitcast_convert_type(x, bits)
    other = jax.lax.bitcast_convert_type(scaled, bits)
    return jax.lax.bitcast_convert_type(jnp.where(within, keep, other), x.dtype)


@_keep_or.defjvp
def _keep_or_jvp(
    primals: tuple[jax.Array, jax.Array, jax.Array],
    tangents: tuple[Any, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    within, x, scaled = primals
    _, dx, dscaled = tangents
    return _keep_or(within, x, scaled), jnp.where(within, dx, dscaled)


__all__ = [
    "adaptive_clip",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "normalize_by_global_norm",
]


def clip_by_value(max_delta: Scalar) -> optax.GradientTransformationExtraArgs:
    r"""Truncates each element of the updates to ``[-max_delta, max_delta]``.

    .. math:: g_i \leftarrow \min(\max(g_i, -\delta), \delta)

    Elementwise truncation bounds every coordinate but changes the direction
    of the update; prefer :func:`clip_by_global_norm` when the direction
    matters. Complex leaves have their real and imaginary parts truncated
    separately. NaN stays NaN. The bound is applied in each leaf's dtype
    (``max_delta`` is rounded to it once).

    Place it before the optimizer:
    ``optax.chain(nox.clip_by_value(1.0), optax.sgd(1e-2))``.

    Args:
      max_delta: the bound, ``>= 0``.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` (extra
      keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``max_delta`` is negative or NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.clip_by_value(1.0)
      >>> updates, _ = tx.update({"w": jnp.array([-3.0, 0.5, 2.0])}, tx.init(None))
      >>> updates["w"]
      Array([-1. ,  0.5,  1. ], dtype=float32)

    References:
      Mikolov, `Statistical Language Models Based on Neural Networks
      <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012
    """
    hypers = declare(max_delta=(max_delta, NONNEGATIVE))

    def clip(x: jax.Array, bound: Scalar) -> jax.Array:
        if jnp.iscomplexobj(x):
            return jax.lax.complex(clip(x.real, bound), clip(x.imag, bound))
        b = jnp.asarray(bound).astype(x.dtype)
        return jnp.clip(x, -b, b)

    def leaf(u: jax.Array, p: None, leaf: Leaf, values: dict[str, Any]) -> jax.Array:
        del p, leaf
        return clip(u, values["max_delta"])

    return leafwise("clip_by_value", leaf, hypers, needs_params=False)


def clip_by_norm(
    max_norm: Scalar,
    ord: Ord = 2,
    axis_name: Any = None,
    *,
    stack_axes: StackAxes = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales each leaf so that its own ``ord``-norm is at most ``max_norm``.

    .. math:: g_\ell \leftarrow g_\ell \cdot \min\!\left(1,
       \frac{\tau}{\|g_\ell\|_p}\right)

    Each leaf (each parameter tensor) is clipped on its own, so the relative
    size of leaves changes; :func:`clip_by_global_norm` keeps it. With
    ``stack_axes`` (stacked layers, see :doc:`Layouts </layouts>`) each
    layer's slice of a leaf is clipped by its own norm: a ``(L, in, out)``
    kernel with ``stack_axes=1`` is ``L`` tensors, not one.

    Place it before the optimizer:
    ``optax.chain(nox.clip_by_norm(1.0), optax.adam(1e-3))``.

    Args:
      max_norm: the largest norm a leaf may have, ``>= 0``.
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over which
        leaves are split; each leaf's norm is combined across the named axes
        it varies over (a leaf replicated there keeps its local norm, which
        is its whole norm). Raises ``ValueError`` where JAX does not record
        what varies over the axis (``jax.pmap``, ``check_vma=False``,
        ``jax.vmap``); see :func:`norm_optax.global_norm`. ``None``
        otherwise.
      stack_axes: how many leading axes of each leaf index stacked layers:
        ``None`` (none), an int for every leaf, a tree of ints or bools
        matching the updates, or a callable ``updates -> that tree``. Under
        :func:`optax.inject_hyperparams` pass it in ``static_args``.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` (extra
      keyword arguments to ``update`` are accepted and ignored).

    Raises:
      ValueError: ``max_norm`` is negative or NaN, or ``ord`` is unknown (at
        construction); ``stack_axes`` is larger than a leaf's ndim (at
        update, naming the leaf's path and shape).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.clip_by_norm(1.0)
      >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> updates, _ = tx.update(g, tx.init(None))
      >>> updates["a"], updates["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013
    """
    hypers = declare(max_norm=(max_norm, NONNEGATIVE))
    ord = _norms.canonical_ord(ord, name="ord")

    def leaf(u: jax.Array, p: None, leaf: Leaf, values: dict[str, Any]) -> jax.Array:
        del p
        if leaf.stack == 0:
            norm = _norms.tree_norm([u], ord, axis_name=axis_name)
        else:
            axes = _layout.layer_axes(leaf.shape, leaf.stack)
            norm = _norms.axes_norm(u, ord, axes, axis_name=axis_name)
        return scale_leaf(u, clip_scale(norm, values["max_norm"]))

    return leafwise(
        "clip_by_norm", leaf, hypers, needs_params=False, stack_axes=stack_axes
    )


def clip_by_global_norm(
    max_norm: Scalar, ord: Ord = 2, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Scales the whole update tree so that its global norm is at most ``max_norm``.

    .. math:: g \leftarrow g \cdot \min\!\left(1, \frac{\tau}{\|g\|_p}\right),
       \qquad \|g\|_p \text{ over all leaves as one vector}

    The direction of the update is kept. The norm is accumulated in
    ``float32`` or wider (half-precision gradients do not overflow), and the
    scale is applied as one multiply per element, which XLA fuses into the
    optimizer that consumes the clipped gradients. A NaN or infinite norm
    makes every element NaN. Under GSPMD sharding the norm costs one
    all-reduce of a scalar; inside ``jax.shard_map`` pass ``axis_name`` so
    that every device uses the norm of the whole gradient, replicated leaves
    counted once (``jax.pmap`` cannot tell them apart and is refused).

    Place it first, before the optimizer:
    ``optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(3e-4))``.

    Args:
      max_norm: the largest global norm, ``>= 0``.
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over
        which the gradient is split; a leaf replicated over them counts once
        (see :func:`norm_optax.global_norm`). Raises ``ValueError`` where JAX
        does not record what varies over the axis (``jax.pmap``,
        ``check_vma=False``, ``jax.vmap``). ``None`` otherwise.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` (extra
      keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``max_norm`` is negative or NaN, or ``ord`` is unknown.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.clip_by_global_norm(1.0)
      >>> g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> updates, _ = tx.update(g, tx.init(None))
      >>> updates["a"], updates["b"]
      (Array([0.6, 0. ], dtype=float32), Array([0.8], dtype=float32))

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013
    """
    hypers = declare(max_norm=(max_norm, NONNEGATIVE))
    ord = _norms.canonical_ord(ord, name="ord")

    def update(updates: PyTree, params: Any) -> PyTree:
        del params
        values = hypers.at(None)
        norm = global_norm(updates, ord, axis_name=axis_name)
        limit = values["max_norm"]
        scale = poison(clip_scale(norm, limit), hypers.valid(values))
        # Within the limit the leaf is selected as it is, not multiplied by 1:
        # when the output is the donated input buffer, XLA:CPU's kernel then
        # branches over the whole leaf (no load, no store), so a call that
        # needs no clipping costs only the norm (for 16-bit floats only if
        # the select is on the bits, see ``_keep_or``). ``within`` is False
        # for a NaN or infinite norm, whatever the limit (an infinite one
        # included), and wherever ``scale`` is NaN.
        within = jnp.isfinite(scale) & (norm <= as_real(limit, norm))
        return map_inexact(lambda x: _keep_or(within, x, scale_leaf(x, scale)), updates)

    return stateless(update)


def normalize_by_global_norm(
    norm: Scalar = 1.0, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Scales the whole update tree to a global L2 norm of exactly ``norm``.

    .. math:: g \leftarrow g \cdot \frac{\nu}{\|g\|_2}, \qquad 0 \mapsto 0

    Gradient normalisation keeps only the direction of the gradient; the step
    size is then set by the learning rate alone. A zero gradient stays zero
    (its scale is 1, and the gradient through it is finite). A NaN or
    infinite norm makes every element NaN.

    Place it before the optimizer (typically SGD):
    ``optax.chain(nox.normalize_by_global_norm(), optax.sgd(1e-2))``.

    Args:
      norm: the target global norm, ``>= 0``.
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over
        which the gradient is split; a leaf replicated over them counts once
        (see :func:`norm_optax.global_norm`). Raises ``ValueError`` where JAX
        does not record what varies over the axis (``jax.pmap``,
        ``check_vma=False``, ``jax.vmap``). ``None`` otherwise.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` (extra
      keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``norm`` is negative, NaN or infinite.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.normalize_by_global_norm(10.0)
      >>> updates, _ = tx.update({"w": jnp.array([0.3, 0.4])}, tx.init(None))
      >>> updates["w"]
      Array([6., 8.], dtype=float32)

    References:
      Hazan et al., `Beyond Convexity: Stochastic Quasi-Convex Optimization
      <https://arxiv.org/abs/1507.02030>`_, 2015
    """
    hypers = declare(norm=(norm, FINITE_NONNEGATIVE))

    def update(updates: PyTree, params: Any) -> PyTree:
        del params
        values = hypers.at(None)
        g_norm = global_norm(updates, axis_name=axis_name)
        scale = safe_ratio(as_real(values["norm"], g_norm), g_norm, 1)
        scale = jnp.where(jnp.isfinite(g_norm), scale, jnp.nan)
        scale = poison(scale, hypers.valid(values))
        return map_inexact(lambda x: scale_leaf(x, scale), updates)

    return stateless(update)


def adaptive_clip(
    clipping: Scalar,
    eps: Scalar = 1e-3,
    axis: Axis = None,
    mask: Mask = None,
    *,
    stack_axes: StackAxes = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive gradient clipping (AGC): clips each unit relative to its weights.

    For every unit :math:`u` (see :func:`norm_optax.unit_norms`),

    .. math:: g_u \leftarrow g_u \cdot \min\!\left(1,
       \frac{\lambda \max(\|p_u\|_2, \epsilon)}{\|g_u\|_2}\right)

    so a unit's gradient is never larger than ``clipping`` times its weights
    (``eps`` keeps zero-initialised units, such as biases, trainable). Units
    follow the Flax kernel convention unless ``axis`` names the axes to reduce
    over: one unit per output feature (all axes but the last), the whole
    array for scalars and vectors. This matches
    :func:`optax.adaptive_grad_clip`. A NaN or infinite norm makes the unit's
    elements NaN.

    Place it before the optimizer, with the params passed to ``update``:
    ``optax.chain(nox.adaptive_clip(0.01), optax.sgd(0.1, momentum=0.9))``.
    Brock et al. leave the final classifier layer unclipped: use ``mask``.

    Args:
      clipping: :math:`\lambda`, the largest ratio of gradient to weight norm
        per unit, ``>= 0``.
      eps: :math:`\epsilon`, the smallest weight norm used, ``>= 0``.
      axis: the axes a unit reduces over: ``None`` (the Flax convention),
        ``"out_first"`` (PyTorch/Equinox weights ``(out, in, *kernel)``), an
        int or a tuple of ints, or a tree of those matching the params, or a
        callable ``params -> tree``. Under :func:`optax.inject_hyperparams`
        pass it in ``static_args`` (or as a tuple).
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.
        Under :func:`optax.inject_hyperparams` a callable mask must be listed
        in ``static_args``.
      stack_axes: how many leading axes index stacked layers (see
        :doc:`Layouts </layouts>`), each with its own units: ``None`` (none), an int for
        every leaf, a tree of ints or bools matching the params, or a
        callable ``params -> tree`` such as ``nox.masks.by_path("layers/")``.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` that needs
      ``params`` (extra keyword arguments to ``update`` are ignored).

    Raises:
      ValueError: ``clipping`` or ``eps`` is negative or NaN (at
        construction); ``params`` is missing, ``params`` or ``mask`` does not
        match the updates, or ``axis`` is out of range for a leaf (at update).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.adaptive_clip(0.1)
      >>> params = {"w": jnp.array([[3.0], [4.0]])}  # one unit of norm 5
      >>> grads = {"w": jnp.array([[6.0], [8.0]])}  # norm 10 > 0.1 * 5
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"].ravel()
      Array([0.3, 0.4], dtype=float32)

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
    """
    hypers = declare(clipping=(clipping, NONNEGATIVE), eps=(eps, NONNEGATIVE))
    _layout.check_axis(axis)

    def clip(
        g: jax.Array, p: jax.Array, leaf: Leaf, values: dict[str, Any]
    ) -> jax.Array:
        g_norm = _norms.axes_norm(g, 2, leaf.axes, axis_name=None)
        p_norm = _norms.axes_norm(p, 2, leaf.axes, axis_name=None).astype(g_norm.dtype)
        floor = as_real(values["eps"], g_norm)
        ratio = as_real(values["clipping"], g_norm)
        scale = clip_scale(g_norm, ratio * jnp.maximum(p_norm, floor))
        # A NaN weight norm must not pass silently.
        scale = jnp.where(jnp.isnan(p_norm), jnp.nan, scale)
        return scale_leaf(g, scale)

    return leafwise(
        "adaptive_clip",
        clip,
        hypers,
        needs_params=True,
        mask=mask,
        axis=axis,
        stack_axes=stack_axes,
    )
