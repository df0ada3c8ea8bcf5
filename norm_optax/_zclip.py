"""ZClip: z-score clipping of the global norm, as the authors' code does it.

A port of ``zclip/zclip.py`` of the authors' repository
(https://github.com/bluorion-com/ZClip, commit
``584ce4f5a4aabab59e7df1dbaffc26a44df39dc1``), rule for rule, into a
``jit``-safe :class:`optax.GradientTransformation` with a small
:class:`ZClipState` of float32 and int32 scalars. Where the paper and the
code differ, the code is followed; where the code's handling of a NaN or
infinite norm differs from the package contract, the contract is followed.
Both are listed in the docstring of :func:`zclip`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# ---------------------------------------------------------------------------
# The package internals used here, all in this one section (so that a move
# of the helpers re-points one edit): the norm, two argument checks, and the
# scaling of every inexact leaf (half precision in float32, cast once).
# ---------------------------------------------------------------------------
from norm_optax._domains import (
    FINITE_POSITIVE,
    NONNEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    POSITIVE_COUNT,
    declare,
)
from norm_optax._numerics import scale_leaf
from norm_optax._transform import map_inexact
from norm_optax.norms import global_norm


def _scaled(updates: optax.Updates, scale: jax.Array) -> optax.Updates:
    """Every inexact leaf times ``scale``; other leaves pass through."""
    return map_inexact(lambda x: scale_leaf(x, scale), updates)


# ---------------------------------------------------------------------------

__all__ = ["ZClipState", "zclip"]

_F32 = jnp.float32
_I32 = jnp.int32
_INT32_MAX = 2**31 - 1

# The reference's ``eps`` (its default, in the z-score denominator) and the
# 1e-6 its clipping coefficient adds to the norm (hard-coded there, as in
# torch.nn.utils.clip_grad_norm_).
_EPS = 1e-6

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")

Predicate = Any  # value -> bool, on a Python float and a float32 scalar alike


class ZClipState(NamedTuple):
    """State of :func:`zclip`: the statistics of the global norm."""

    mean: jax.Array
    """``()`` float32: :math:`\\mu`. During warm-up the running mean of the
    finite norms seen so far; after it, the exponential moving average."""
    var: jax.Array
    """``()`` float32: :math:`\\sigma^2`. During warm-up the running
    population variance of the finite norms seen so far; after it, the
    exponential moving average."""
    num_finite: jax.Array
    """``()`` int32: number of steps whose norm was finite (saturates at
    ``2**31 - 1``). Warm-up lasts while it is below ``warmup_steps``."""
    num_spikes: jax.Array
    """``()`` int32: number of steps after warm-up flagged as spikes (given a
    clip value by the z-score rule; saturates at ``2**31 - 1``)."""


def _f32(value: Any) -> jax.Array:
    return jnp.asarray(value).astype(_F32)


def _increment(count: jax.Array, where: jax.Array) -> jax.Array:
    """``count + 1`` where ``where``, saturating at the int32 maximum."""
    return jnp.where(where & (count < _INT32_MAX), count + 1, count)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be {options}, got {value!r}.")
    return value


def _check_flag(value: Any, name: str) -> bool | jax.Array:
    if isinstance(value, bool):
        return value
    array = jnp.asarray(value) if hasattr(value, "dtype") else None
    if array is None or array.dtype != jnp.bool_ or array.ndim != 0:
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return array


def zclip(
    z_threshold: Any = 2.5,
    alpha: Any = 0.97,
    warmup_steps: Any = 25,
    *,
    max_norm: Any = 1.0,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: Any = 1.0,
    skip_stats_on_spike: Any = False,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: clips global-norm spikes found by a z-score against an EMA.

    **In short.** With its defaults, ``nox.zclip()`` clips the global norm of
    the gradient at ``max_norm=1.0`` on every step (as
    :func:`clip_by_global_norm` does) and, after a warm-up of
    ``warmup_steps=25`` steps, also cuts *spikes*: a norm whose z-score
    against an exponential moving average (``alpha=0.97``) of the recent
    norms is above ``z_threshold=2.5`` is cut to
    :math:`\mu + z_{\mathrm{thr}}^2\sigma / z` (the larger the spike, the
    harder the cut). ``max_norm=None`` removes the ceiling and leaves the
    z-score rule on its own. Place it first, before the optimizer::

        tx = optax.chain(nox.zclip(), optax.adamw(3e-4))

    Its state, :class:`ZClipState`, is four scalars (the mean and variance
    of the norm, the finite steps seen, the spikes found). Version 0.2
    changed its behaviour to that of its authors' code (see the Changelog).

    .. rubric:: Reference details

    This is ZClip as the authors' reference implementation behaves
    (``zclip/zclip.py`` of `bluorion-com/ZClip
    <https://github.com/bluorion-com/ZClip>`_ at commit
    ``584ce4f5a4aabab59e7df1dbaffc26a44df39dc1``): same defaults, same rules,
    same quirks. Fed the same trajectory of norms, it gives the same clipped
    norms to float32 rounding (the reference keeps its statistics in Python
    floats, this transform in float32).

    Let :math:`x_t = \|g_t\|_2` be the global norm of the updates at step
    :math:`t`, :math:`M` the ceiling ``max_norm`` (:math:`+\infty` for
    ``None``), :math:`\epsilon = 10^{-6}` and :math:`\mu, \sigma^2` the
    statistics in the state, from before the step.

    *Warm-up* (the first ``warmup_steps`` finite norms). The updates are
    clipped at the fixed ceiling, as ``torch.nn.utils.clip_grad_norm_`` does,
    and the raw norm (before that clip) joins the statistics:

    .. math::
       g_t \leftarrow g_t \cdot \min\!\left(1, \frac{M}{x_t + \epsilon}\right),
       \qquad \mu, \sigma^2 = \text{mean and population variance of }
       x_1, \dots, x_t.

    *After warm-up*, with :math:`\sigma = \sqrt{\sigma^2}`, a *clip value*
    :math:`c_t` is defined on a spike only:

    * ``mode="zscore"``: :math:`z_t = (x_t - \mu) / (\sigma + \epsilon)`;
      a spike is :math:`z_t > z_{\mathrm{thr}}`, and then

      - ``clip_option="adaptive_scaling"``:
        :math:`c_t = f \cdot \bigl(\mu + z_{\mathrm{thr}}\sigma / \eta_t\bigr)`
        with :math:`\eta_t = z_t / z_{\mathrm{thr}}` and :math:`f` =
        ``clip_factor`` (so :math:`c_t = f(\mu +
        z_{\mathrm{thr}}^2\sigma / z_t)`: the larger the outlier, the harder
        the clip);
      - ``clip_option="mean"``: :math:`c_t = \mu`;

    * ``mode="percentile"``: a spike is :math:`x_t > \mu +
      z_{\mathrm{thr}}\sigma`, and :math:`c_t = \mu + z_{\mathrm{thr}}\sigma`.

    The updates are then clipped at the clip value and the ceiling, and the
    EMA is updated, the mean first, the variance with the *new* mean:

    .. math::
       v_t &= c_t \text{ on a spike, } x_t \text{ otherwise}, \qquad
       \tau_t = \min(v_t, M), \qquad
       g_t \leftarrow g_t \cdot \frac{\tau_t}{x_t + \epsilon}
       \text{ if } x_t > \tau_t \\
       \mu &\leftarrow \alpha\,\mu + (1-\alpha)\,v_t, \qquad
       \sigma^2 \leftarrow \alpha\,\sigma^2 + (1-\alpha)\,(v_t - \mu)^2

    With ``skip_stats_on_spike=True`` a spike leaves :math:`\mu, \sigma^2`
    as they were (the step is still clipped).

    Rules of the reference code that this port keeps (details of the code
    that its docstring, its README or the paper's summary of the algorithm,
    Kumar et al. 2025, put differently or leave out; the code wins):

    * the EMA sees :math:`v_t`: the clip value on a spike, the *raw* norm
      otherwise; neither is the norm after the ceiling :math:`M`, and with
      ``clip_factor > 1`` the clip value may exceed :math:`x_t` (nothing is
      clipped, yet the EMA sees :math:`c_t`);
    * the warm-up statistics are those of the raw norms (the ceiling clips
      the warm-up updates, not the norms that seed the statistics); there is
      no z-score test during warm-up, the first is on the step after the
      ``warmup_steps``-th finite norm;
    * the adaptive threshold is :math:`\mu + z_{\mathrm{thr}}^2\sigma/z_t`
      (through :math:`\eta_t`), and ``clip_factor`` multiplies all of it,
      :math:`\mu` included (the code's docstring says only the
      :math:`z_{\mathrm{thr}}\sigma` term); ``clip_factor`` is not used by
      ``clip_option="mean"`` nor by ``mode="percentile"``;
    * :math:`\epsilon` is in the z-score denominator but not in the
      :math:`\sigma` of the thresholds, and ``mode="percentile"`` compares
      without it; with :math:`\sigma = 0` (for instance ``warmup_steps=1``)
      a norm more than :math:`z_{\mathrm{thr}}\epsilon` above :math:`\mu`
      is a spike;
    * the clipping coefficient is :math:`\tau/(x + \epsilon)`, so a clipped
      norm lands just below its threshold (by at most :math:`10^{-6}`), as
      with ``torch.nn.utils.clip_grad_norm_``; during warm-up a norm within
      :math:`\epsilon` below :math:`M` is scaled by that coefficient too;
    * ``eps`` is fixed at the reference's default :math:`10^{-6}`.

    A NaN or infinite norm makes every element of the step NaN (also during
    warm-up, so that :func:`optax.apply_if_finite` can skip it; a broken step
    never becomes zeros) and leaves the whole state unchanged: it does not
    count towards the warm-up and never enters the statistics. This is the
    package contract, not the reference's behaviour: there a NaN norm enters
    the buffer or the EMA and makes the statistics NaN for good, after which
    only the ceiling clips (in warm-up torch's clip turns that step to NaN;
    after warm-up, or with ``max_norm=None``, the step passes unchanged); an
    infinite norm during warm-up makes the statistics infinite or NaN, and
    after warm-up is a spike (clip value :math:`f\mu`, :math:`\mu`, or
    :math:`\mu + z_{\mathrm{thr}}\sigma`, which enters the EMA); either
    way the step is multiplied by 0 (zeros, NaN where an element was
    infinite). The norm is the float32 norm of
    :func:`norm_optax.global_norm` for every leaf dtype (torch computes it in
    the parameters' dtype), and the statistics are float32 (the reference's
    are float64).

    Place it first, before the optimizer:
    ``optax.chain(nox.zclip(), optax.adamw(3e-4))``. Wrap it in
    :func:`norm_optax.record_norms` to log the clipped norm.

    Args:
      z_threshold: :math:`z_{\mathrm{thr}} > 0`, the reference's
        ``z_thresh``: the z-score above which a norm is a spike (in
        ``"percentile"`` mode, the multiple of :math:`\sigma` clipped to).
      alpha: :math:`\alpha \in (0, 1)`, the EMA decay.
      warmup_steps: number of initial finite norms that seed the statistics
        (clipped at ``max_norm`` only), an integer ``>= 1``. It may be traced
        (it is compared with ``num_finite`` at run time).
      max_norm: the ceiling :math:`M \ge 0` applied on every step, or
        ``None`` for no ceiling (then warm-up does not clip at all). The
        reference's ``max_grad_norm``.
      mode: ``"zscore"`` or ``"percentile"`` (see above), in lower case
        (the reference also lower-cases other spellings).
      clip_option: ``"adaptive_scaling"`` or ``"mean"``; used by
        ``mode="zscore"`` only (still checked in ``"percentile"`` mode).
      clip_factor: :math:`f > 0`, finite: multiplies the
        ``"adaptive_scaling"`` threshold (0.5--0.9 clip more aggressively).
      skip_stats_on_spike: if ``True``, a spike does not update the
        statistics. The reference's ``skip_update_on_spike``.
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over
        which the updates are split; a leaf replicated over them counts once
        (see :func:`norm_optax.global_norm`; ``jax.pmap`` and
        ``check_vma=False`` raise ``ValueError``). ``None`` otherwise.

    Traced values of the numeric arguments (under
    :func:`optax.inject_hyperparams`) are the caller's responsibility; one
    outside the ranges above makes every step NaN and leaves the state
    unchanged. ``mode`` and ``clip_option`` are structural (Python strings).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`ZClipState` (extra keyword arguments to ``update`` are
      ignored).

    Raises:
      ValueError: ``z_threshold`` is not positive, ``alpha`` is outside
        ``(0, 1)``, ``warmup_steps`` is not an integer ``>= 1``,
        ``max_norm`` is negative or NaN, ``clip_factor`` is not positive and
        finite, or ``mode`` / ``clip_option`` is not one of the names above.
      TypeError: a numeric argument is not a real scalar, or
        ``skip_stats_on_spike`` is not a bool.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.zclip(z_threshold=2.0, warmup_steps=2, max_norm=None)
      >>> state = tx.init(None)
      >>> for norm in (1.0, 3.0):  # warm-up: mean 2, std 1
      ...     _, state = tx.update({"w": jnp.array([norm])}, state)
      >>> updates, state = tx.update({"w": jnp.array([10.0])}, state)
      >>> print(f"{float(updates['w'][0]):.4f}")  # z = 8: 2 + 2 * 1 / (8 / 2)
      2.5000
      >>> state.mean  # the EMA sees the clip value: 0.97 * 2 + 0.03 * 2.5
      Array(2.015, dtype=float32)

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025
    """
    # Structural arguments.
    _check_choice(mode, "mode", _MODES)
    _check_choice(clip_option, "clip_option", _CLIP_OPTIONS)
    skip = _check_flag(skip_stats_on_spike, "skip_stats_on_spike")

    # Numeric arguments: concrete ones are checked now, traced ones at run time.
    hypers = declare(
        z_threshold=(z_threshold, POSITIVE),
        alpha=(alpha, OPEN_UNIT),
        warmup_steps=(warmup_steps, POSITIVE_COUNT),
        clip_factor=(clip_factor, FINITE_POSITIVE),
        # ``None`` disables the ceiling; 0.0 only stands in for the check.
        max_norm=(0.0 if max_norm is None else max_norm, NONNEGATIVE),
    )

    def init_fn(params: optax.Params) -> ZClipState:
        del params
        zero_f, zero_i = jnp.zeros((), _F32), jnp.zeros((), _I32)
        return ZClipState(zero_f, zero_f, zero_i, zero_i)

    def update_fn(
        updates: optax.Updates,
        state: ZClipState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ZClipState]:
        del params, extra_args
        x = _f32(global_norm(updates, axis_name=axis_name))
        finite = jnp.isfinite(x)
        valid = jnp.asarray(hypers.valid(hypers.at(None)))
        mean, var, num_finite, num_spikes = state
        # The reference's `not self.initialized`.
        in_warmup = num_finite.astype(_F32) < _f32(warmup_steps)

        # _compute_clip_val, with the statistics from before this step.
        z_thr = _f32(z_threshold)
        std = jnp.sqrt(var)
        if mode == "percentile":
            clip_val = mean + z_thr * std
            spike = x > clip_val
        else:
            z = (x - mean) / (std + _EPS)
            spike = z > z_thr
            if clip_option == "adaptive_scaling":
                eta = jnp.where(spike, z / z_thr, 1)
                clip_val = (mean + (z_thr * std) / eta) * _f32(clip_factor)
            else:
                clip_val = mean
        spike = spike & ~in_warmup & finite & valid

        # _apply_clipping after warm-up; clip_grad_norm_(max_norm) during it.
        adaptive = jnp.where(spike, clip_val, x)
        if max_norm is None:
            effective = adaptive
            warm_scale = jnp.ones((), _F32)
        else:
            ceiling = _f32(max_norm)
            effective = jnp.minimum(adaptive, ceiling)
            # min(1, M / (x + eps)), with a safe division for the gradient.
            warm_over = x + _EPS > ceiling
            warm_scale = jnp.where(
                warm_over, ceiling / jnp.where(warm_over, x + _EPS, 1), 1
            )
        over = x > effective
        post_scale = jnp.where(over, effective / jnp.where(over, x + _EPS, 1), 1)
        scale = jnp.where(in_warmup, warm_scale, post_scale)
        scale = jnp.where(finite & valid, scale, jnp.nan)

        # Warm-up: running mean and population variance of the raw norms
        # (at the end, the reference's _initialize_ema of its buffer).
        n = (num_finite + 1).astype(_F32)
        delta = x - mean
        warm_mean = mean + delta / n
        warm_var = (var * num_finite.astype(_F32) + delta * (x - warm_mean)) / n
        # After: _update_ema(v), the mean first, the variance with the new mean.
        a = _f32(alpha)
        ema_mean = a * mean + (1 - a) * adaptive
        ema_var = a * var + (1 - a) * jnp.square(adaptive - ema_mean)

        enters = finite & valid & ~(spike & skip)
        new_state = ZClipState(
            jnp.where(enters, jnp.where(in_warmup, warm_mean, ema_mean), mean),
            jnp.where(enters, jnp.where(in_warmup, warm_var, ema_var), var),
            _increment(num_finite, finite & valid),
            _increment(num_spikes, spike),
        )
        return _scaled(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
