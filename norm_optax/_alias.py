"""Muon and Scion: optimizers built from :func:`scale_by_lmo` and optax pieces.

One floor above the techniques, as optax keeps ``alias.py`` above
``transforms/``: each optimizer here is a recipe of ``optax.chain`` and
``optax.partition`` calls over :func:`norm_optax.scale_by_lmo`,
:func:`norm_optax.masks.matrices_only` and optax's own momentum, decay,
learning-rate and AdamW transforms. No maths of its own lives here: the
steepest-descent directions are :func:`scale_by_lmo`'s, the layouts (stack
axes, ``axis``) those of the masks and the norms.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from norm_optax import _domains, _layout, masks
from norm_optax._lmo import scale_by_lmo
from norm_optax._types import Axis, Mask, PyTree, Scalar, StackAxes, is_inexact

__all__ = ["muon", "scion"]

_MUON = "muon"
_ADAM = "adam"
_SCION = "scion"
_SKIP = "skip"  # integer, bool and float0 leaves: passed through unchanged


def _skip_labels(params: PyTree) -> PyTree:
    """``"scion"`` for the inexact leaves, ``"skip"`` for the others."""
    return jax.tree.map(lambda x: _SCION if is_inexact(x) else _SKIP, params)


def _labels(muon_mask: Mask, stack_axes: StackAxes) -> Any:
    """``params -> tree of labels`` from a mask tree or mask callable.

    Selected inexact leaves get ``"muon"``, the other inexact leaves
    ``"adam"``, and leaves that take no part (integers, bools) ``"skip"``.
    """
    chosen = (
        masks.matrices_only(stack_axes=stack_axes) if muon_mask is None else muon_mask
    )

    def labels(params: PyTree) -> PyTree:
        selected = _layout.resolve_spec(
            chosen, params, params, name="muon_mask", is_value=_layout.is_mask_value
        )
        names = [
            _SKIP if not is_inexact(leaf) else _MUON if bool(s) else _ADAM
            for leaf, s in zip(jax.tree.leaves(params), selected, strict=True)
        ]
        return jax.tree.unflatten(jax.tree.structure(params), names)

    return labels


def muon(
    learning_rate: Scalar | optax.Schedule,
    momentum: Scalar = 0.95,
    *,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: Any = "standard",
    weight_decay: Scalar = 0.0,
    dims_scale: str | None = "muon",
    muon_mask: Mask = None,
    axis: Axis = None,
    stack_axes: StackAxes = None,
    adam_learning_rate: Scalar | optax.Schedule | None = None,
    adam_b1: Scalar = 0.9,
    adam_b2: Scalar = 0.999,
    adam_eps: Scalar = 1e-8,
    adam_weight_decay: Scalar = 0.0,
) -> optax.GradientTransformation:
    r"""Muon: momentum orthogonalised per layer, AdamW for the other leaves.

    The leaves selected by ``muon_mask`` (by default the matrices, counted
    after the stack axes) get heavy-ball momentum, then steepest descent
    under the spectral norm of each layer's matrix, then decoupled weight
    decay and the learning rate:

    .. math::

        m_t = \mu\, m_{t-1} + g_t, \qquad
        u_t = \mathrm{polar}(g_t + \mu\, m_t)\ \text{(Nesterov) or }
              \mathrm{polar}(m_t), \qquad
        p_{t+1} = p_t - \eta\,\bigl(k\, u_t + \lambda\, p_t\bigr),

    where ``polar`` is the Newton-Schulz approximation of the polar factor
    :math:`U V^\top` of :math:`U \Sigma V^\top` (its singular values lie in
    about ``[0.68, 1.21]`` with the ``"standard"`` coefficients, ``[0.85,
    1.15]`` with ``"polar_express"``), ``k`` the ``dims_scale`` factor
    (``"muon"``: :math:`\sqrt{\max(1, \text{fan\_out}/\text{fan\_in})}`) and
    :math:`\lambda` the ``weight_decay``. That is::

        optax.chain(
            optax.trace(momentum, nesterov),
            nox.scale_by_lmo("spectral", dims_scale=dims_scale, ...),
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )

    The other leaves (biases, norm scales, and whatever the mask leaves out)
    get ``optax.adamw(adam_learning_rate or learning_rate, adam_b1, adam_b2,
    adam_eps, weight_decay=adam_weight_decay)``.

    **Stacked layers.** With ``stack_axes`` (an int, a tree, or a callable
    such as ``nox.masks.by_path("layers/")``) the first axes of a leaf index
    layers: a stacked kernel ``(L, in, out)`` is ``L`` matrices, each
    orthogonalised on its own, and a stacked bias or LayerNorm scale
    ``(L, out)`` is not a matrix and goes to AdamW, so every layer of a
    stacked model trains as the same model unstacked. ``axis="out_first"``
    reads PyTorch/Equinox ``(out, in)`` weights.

    **Against optax.contrib.muon.** With ``nesterov=False``, on a flat tree
    of 2-D and 1-D leaves, this follows ``optax.contrib.muon`` with the same
    settings (``beta=momentum``; its bias-corrected momentum only rescales
    the matrix that is orthogonalised). With ``nesterov=True`` (the default)
    it follows the recipe above, as ``torch.optim.Muon`` and the original
    Muon do; ``optax.contrib.muon`` additionally bias-corrects the momentum
    and uses NAdamW for the other leaves. Unlike ``optax.contrib.muon``,
    which calls a leaf a matrix when ``ndim == 2``, the default mask here
    counts the axes after ``stack_axes``.

    Place it as the whole optimizer (it ends with the learning rate); a
    gradient clip goes before it, a weight projection after it.

    Args:
      learning_rate: a number ``>= 0`` or an optax schedule.
      momentum: the momentum coefficient :math:`\mu`, in ``[0, 1]``.
      nesterov: Nesterov momentum (``g + mu * m``) instead of ``m``.
      ns_steps: Newton-Schulz iterations (an int ``>= 1``).
      ns_coeffs: ``"standard"``, ``"polar_express"``, one ``(a, b, c)`` or a
        sequence of them.
      weight_decay: decoupled weight decay of the Muon leaves (``>= 0``),
        multiplied by the learning rate.
      dims_scale: the shape factor ``k`` of :func:`scale_by_lmo`: ``"muon"``
        (default), ``"spectral"``, ``"rms"`` (``0.2 sqrt(max(fan_in,
        fan_out))``, matching AdamW's update RMS) or ``None``.
      muon_mask: which leaves Muon updates: a tree of bools matching the
        params, or a callable ``params -> that tree``. Default:
        ``nox.masks.matrices_only(stack_axes=stack_axes)``.
      axis: the axis convention of the matrices (``None``: Flax ``(in,
        out)``; ``"out_first"``: ``(out, in)``; explicit reduced axes; or a
        tree or callable of those).
      stack_axes: the leading axes that index layers (an int, a tree or a
        callable), used by the default mask and by the orthogonalisation.
      adam_learning_rate: learning rate (or schedule) of the AdamW leaves;
        ``None`` uses ``learning_rate``.
      adam_b1: AdamW's first-moment decay.
      adam_b2: AdamW's second-moment decay.
      adam_eps: AdamW's epsilon.
      adam_weight_decay: AdamW's decoupled weight decay.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``; integer
      and bool leaves pass through unchanged).

    Raises:
      ValueError: a concrete ``learning_rate``, ``weight_decay`` or
        ``adam_weight_decay`` that is negative, NaN or infinite, a
        ``momentum`` outside ``[0, 1]``; the errors of :func:`scale_by_lmo`
        for ``ns_steps`` and ``ns_coeffs``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> params = {"layers": {"kernel": jnp.ones((4, 8, 8)), "bias": jnp.ones((4, 8))}}
      >>> tx = nox.muon(1e-3, stack_axes=nox.masks.by_path("^layers/"))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> updates["layers"]["kernel"].shape
      (4, 8, 8)

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024

      Bernstein & Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024

      Liu et al., `Muon is Scalable for LLM Training
      <https://arxiv.org/abs/2502.16982>`_, 2025
    """
    _domains.declare(
        schedules=("learning_rate",),
        learning_rate=(learning_rate, _domains.FINITE_NONNEGATIVE),
        momentum=(momentum, _domains.UNIT_INTERVAL),
        weight_decay=(weight_decay, _domains.FINITE_NONNEGATIVE),
        adam_weight_decay=(adam_weight_decay, _domains.FINITE_NONNEGATIVE),
    )
    if adam_learning_rate is not None:
        _domains.declare(
            schedules=("adam_learning_rate",),
            adam_learning_rate=(adam_learning_rate, _domains.FINITE_NONNEGATIVE),
        )
    matrices = optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov),
        scale_by_lmo(
            "spectral",
            dims_scale=dims_scale,
            axis=axis,
            stack_axes=stack_axes,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    others = optax.adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=adam_eps,
        weight_decay=adam_weight_decay,
    )
    return optax.partition(
        {_MUON: matrices, _ADAM: others, _SKIP: optax.identity()},
        _labels(muon_mask, stack_axes),
    )


def scion(
    learning_rate: Scalar | optax.Schedule,
    radius: Any = 1.0,
    *,
    beta: Scalar = 0.9,
    norm: Any = "auto",
    dims_scale: str | None = "spectral",
    constrained: bool = False,
    axis: Axis = None,
    stack_axes: StackAxes = None,
    method: str = "newton_schulz",
    ns_steps: int = 5,
    ns_coeffs: Any = "standard",
) -> optax.GradientTransformation:
    r"""Scion: steepest descent under a norm chosen per layer (Pethick et al. 2025).

    An exponential moving average of the gradients, then the linear
    minimisation oracle of each layer's norm ball of radius ``radius``, then
    the learning rate:

    .. math::

        m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t, \quad m_0 = 0, \qquad
        p_{t+1} = p_t - \eta\, \rho\, k\, d(m_t)

    (unconstrained), or with ``constrained=True`` the conditional-gradient
    (Frank-Wolfe) step

    .. math::

        p_{t+1} = (1 - \eta)\, p_t - \eta\, \rho\, k\, d(m_t),

    a convex combination of :math:`p_t` and a point of the radius-``rho``
    ball for :math:`\eta \in [0, 1]`: iterates that start in the ball stay in
    it. :math:`d` and :math:`k` are those of :func:`scale_by_lmo` (by default
    ``norm="auto"``: the polar factor for matrices, scaled by
    :math:`\sqrt{\text{fan\_out}/\text{fan\_in}}` as Scion's ``Spectral``
    norm, and :math:`\sqrt{n}\, u / \|u\|_2` for biases and scales, Scion's
    ``BiasRMS``). That is::

        optax.chain(
            optax.ema(beta, debias=False),
            nox.scale_by_lmo(norm, radius, dims_scale=dims_scale, ...),
            optax.add_decayed_weights(1.0),  # only with constrained=True
            optax.scale_by_learning_rate(learning_rate),
        )

    where the decay with weight 1 before the learning rate turns
    :math:`-\eta (u + p)` into exactly the Frank-Wolfe step above, also for a
    schedule.

    **Against the authors' reference** (``LIONS-EPFL/scion`` at commit
    ``f58a393e``): ``beta`` is ``1 -`` its ``momentum`` argument, ``radius``
    its ``scale``, ``constrained`` is ``not unconstrained``; its momentum
    buffer starts at zeros, as here. Its weights are ``(out, in)``: pass
    ``axis="out_first"`` or transpose them. Weights are not re-initialised:
    Scion's ``init`` is the user's.

    Place it as the whole optimizer (it ends with the learning rate).

    Args:
      learning_rate: a number ``>= 0`` (``<= 1`` for the constrained mode to
        keep its promise) or an optax schedule.
      radius: the norm-ball radius :math:`\rho > 0`: a number, a tree of
        numbers matching the params, or a callable returning one.
      beta: the moving-average coefficient, in ``[0, 1]``.
      norm: the norm of each leaf (see :func:`scale_by_lmo`): ``"auto"``,
        ``"spectral"``, ``"frobenius"``, ``"rms"``, ``"sign"``, ``"unit"``,
        a tree of those (``None``: pass through) or a callable.
      dims_scale: the shape factor ``k``: ``"spectral"`` (default),
        ``"muon"``, ``"rms"`` or ``None``.
      constrained: the Frank-Wolfe step (weights stay in the ball).
      axis: the axis convention of the matrices (``None``: Flax ``(in,
        out)``; ``"out_first"``: ``(out, in)``; a tree or callable).
      stack_axes: the leading axes that index layers (an int, a tree or a
        callable).
      method: ``"newton_schulz"`` or ``"svd"`` for the spectral norm.
      ns_steps: Newton-Schulz iterations (an int ``>= 1``).
      ns_coeffs: ``"standard"``, ``"polar_express"`` or the user's own.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition`` that passes
      integer and bool leaves through); its state holds the moving average
      (an ``optax.EmaState``).

    Raises:
      ValueError: a concrete ``learning_rate`` that is negative, NaN or
        infinite, ``beta`` outside ``[0, 1]``; the errors of
        :func:`scale_by_lmo` (``radius``, ``norm``, ``ns_steps``, ...).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> params = {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}
      >>> tx = nox.scion(0.05, radius=2.0, constrained=True)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> updates["kernel"].shape
      (8, 4)

    References:
      Pethick et al., `Training Deep Learning Models with Norm-Constrained
      LMOs <https://arxiv.org/abs/2502.07529>`_, 2025

      Bernstein & Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024
    """
    _domains.declare(
        schedules=("learning_rate",),
        learning_rate=(learning_rate, _domains.FINITE_NONNEGATIVE),
        beta=(beta, _domains.UNIT_INTERVAL),
    )
    steps = optax.chain(
        optax.ema(beta, debias=False),
        scale_by_lmo(
            norm,
            radius,
            dims_scale=dims_scale,
            axis=axis,
            stack_axes=stack_axes,
            method=method,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
        ),
        optax.add_decayed_weights(1.0) if constrained else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
    return optax.partition({_SCION: steps, _SKIP: optax.identity()}, _skip_labels)
