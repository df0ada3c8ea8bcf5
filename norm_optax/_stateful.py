"""Stateful companions: norm logging, AutoClip and spike skipping.

(ZClip, a companion of its own, is in ``_zclip``.)

Unlike the rest of the package these transforms keep a state, a
:class:`~typing.NamedTuple` whose fields are documented (shape and dtype).
They follow the same rules as the stateless ones:

* every norm is the global L2 norm of :func:`norm_optax.global_norm`,
  accumulated in ``float32`` or wider; statistics kept in the state are
  ``float32`` scalars or vectors, counters ``int32``;
* every leaf keeps its dtype and shape (half precision is scaled in
  ``float32`` and cast once), leaves that are not inexact pass through;
* the state is made of plain replicated scalars and small vectors, never of
  arrays shaped like the updates, so it adds nothing to the update sharding;
* everything is ``jit``-safe, with no Python branching on traced values and
  no recompilation from one step to the next;
* a NaN or infinite norm never enters a statistic: one broken step cannot
  poison the history. What the step itself returns is given per transform.

Sizes (``history``, ``window``) fix the shape of the state and must be
Python ints; under :func:`optax.inject_hyperparams` pass them in
``static_args``. The other numeric arguments may be traced, and are then the
caller's responsibility.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from norm_optax._domains import (
    NONNEGATIVE,
    PERCENT,
    declare,
    poison,
    size,
)
from norm_optax._numerics import clip_scale, scale_leaf
from norm_optax._transform import map_inexact
from norm_optax._types import is_inexact
from norm_optax.norms import global_norm

__all__ = [
    "AutoClipState",
    "RecordNormsState",
    "SkipOnSpikeState",
    "autoclip",
    "record_norms",
    "skip_on_spike",
]

_F32 = jnp.float32
_I32 = jnp.int32
_INT32_MAX = 2**31 - 1


def _scaled(updates: optax.Updates, scale: jax.Array) -> optax.Updates:
    return map_inexact(lambda x: scale_leaf(x, scale), updates)


def _f32(value: Any) -> jax.Array:
    return jnp.asarray(value).astype(_F32)


def _increment(count: jax.Array, where: jax.Array) -> jax.Array:
    """``count + 1`` where ``where``, saturating at the int32 maximum."""
    return jnp.where(where & (count < _INT32_MAX), count + 1, count)


# ---------------------------------------------------------------------------
# record_norms.
# ---------------------------------------------------------------------------


class RecordNormsState(NamedTuple):
    """State of :func:`record_norms`."""

    inner_state: optax.OptState
    """The wrapped transform's state."""
    input_norm: jax.Array
    """``()`` float32: global L2 norm of the last updates passed in (0 at init)."""
    output_norm: jax.Array
    """``()`` float32: global L2 norm of the wrapped transform's last output."""


def _check_transform(inner: Any, transform: str) -> None:
    """Raises ``TypeError`` naming ``inner`` if it is not a transform."""
    if isinstance(inner, optax.GradientTransformation) or (
        callable(getattr(inner, "init", None))
        and callable(getattr(inner, "update", None))
    ):
        return
    hint = ""
    if callable(inner):
        name = getattr(inner, "__qualname__", None) or repr(inner)
        hint = (
            f" (the function {name}: call it, e.g. {transform}(optax.adam(1e-3)), "
            f"or pass a transform rather than a function of the gradients)"
        )
    raise TypeError(
        f"{transform}: inner must be an optax.GradientTransformation, with init "
        f"and update, got {inner!r}{hint}."
    )


def record_norms(
    inner: optax.GradientTransformation, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a transform and records the global norm of what goes in and out.

    .. math:: \texttt{input\_norm} = \|g\|_2, \qquad
       \texttt{output\_norm} = \|\mathrm{inner}(g)\|_2

    The updates are returned exactly as ``inner`` returns them; the state
    carries ``inner``'s state and the two norms, ``float32`` scalars from
    ``init`` on (both 0 before the first update). Read them with
    ``optax.tree.get(state, "input_norm")``, wherever the wrapper sits in a
    chain. ``params`` and extra keyword arguments (for instance ``value``
    for :func:`optax.contrib.reduce_on_plateau`) are passed on to ``inner``.
    A non-finite norm is recorded as it is.

    Wrap the transform whose input you want to log, typically the whole
    optimizer, so that ``input_norm`` is the raw gradient norm before
    clipping: ``nox.record_norms(optax.chain(nox.clip_by_global_norm(1.0),
    optax.adamw(3e-4)))``.
    To see the gradient norm clipped by an adaptive rule, wrap just that
    rule: ``optax.chain(nox.record_norms(nox.zclip()), optax.adamw(3e-4))``
    (``output_norm`` is then the clipped norm). Around
    :func:`skip_on_spike` it records every step, skipped ones included
    (their ``output_norm`` is 0).

    Args:
      inner: any :class:`optax.GradientTransformation`.
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over
        which the updates are split; a leaf replicated over them counts once
        (see :func:`norm_optax.global_norm`; ``jax.pmap`` and
        ``check_vma=False`` raise ``ValueError``). ``None`` otherwise.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`RecordNormsState`.

    Raises:
      TypeError: ``inner`` is not a transform (a function such as
        ``optax.adam`` not yet called).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.record_norms(nox.clip_by_global_norm(1.0))
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> updates, state = tx.update(g, tx.init(g))
      >>> optax.tree.get(state, "input_norm"), optax.tree.get(state, "output_norm")
      (Array(5., dtype=float32), Array(1., dtype=float32))

      With two wrappers in one state, ``optax.tree.get`` raises ``KeyError``
      (the name is ambiguous): read every one, in chain order, with
      ``optax.tree.get_all_with_path``, or index the chain's state first.

      >>> tx = optax.chain(
      ...     nox.record_norms(nox.clip_by_global_norm(1.0)),  # the raw norm
      ...     nox.record_norms(optax.sgd(0.1)),  # the clipped norm
      ... )
      >>> updates, state = tx.update(g, tx.init(g))
      >>> [float(v) for _, v in optax.tree.get_all_with_path(state, "input_norm")]
      [5.0, 1.0]
      >>> optax.tree.get(state[1], "input_norm")
      Array(1., dtype=float32)
    """
    _check_transform(inner, "record_norms")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> RecordNormsState:
        zero = jnp.zeros((), _F32)
        return RecordNormsState(inner.init(params), zero, zero)

    def update_fn(
        updates: optax.Updates,
        state: RecordNormsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, RecordNormsState]:
        input_norm = _f32(global_norm(updates, axis_name=axis_name))
        out, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        output_norm = _f32(global_norm(out, axis_name=axis_name))
        return out, RecordNormsState(inner_state, input_norm, output_norm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# autoclip.
# ---------------------------------------------------------------------------


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`: a ring buffer of the last finite norms."""

    norms: jax.Array
    """``(history,)`` float32: the last ``history`` finite global norms, in
    ring order (slot ``i`` is valid for ``i < num_norms``; the rest are 0)."""
    num_norms: jax.Array
    """``()`` int32: number of valid norms in the buffer, at most ``history``."""
    next_slot: jax.Array
    """``()`` int32: the slot the next norm is written to, in ``[0, history)``."""


def _percentile(norms: jax.Array, count: jax.Array, q: jax.Array) -> jax.Array:
    """``numpy.percentile(norms[:count], q)`` (linear method), shape-static.

    Invalid slots are padded with ``+inf`` and sort last, so the ``count``
    valid values come first; ``count == 0`` gives ``+inf``.
    """
    valid = jnp.arange(norms.shape[0], dtype=_I32) < count
    ordered = jnp.sort(jnp.where(valid, norms, jnp.inf))
    last = jnp.maximum(count - 1, 0)
    # (n - 1) * q is exact for integer q, so exact indices stay exact.
    position = jnp.clip(last.astype(_F32) * q / 100, 0, last.astype(_F32))
    low = jnp.floor(position).astype(_I32)
    high = jnp.minimum(low + 1, last)
    frac = position - low.astype(_F32)
    below, above = ordered[low], ordered[high]
    return jnp.where(frac > 0, below + (above - below) * frac, below)


def autoclip(
    percentile: Any = 10.0, history: int = 1000, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""AutoClip: clips the global norm to a percentile of its own history.

    At step :math:`t`, with :math:`\|g_t\|` the global L2 norm of the
    updates and :math:`H_t` the (at most ``history``) last finite norms
    *including* :math:`\|g_t\|`:

    .. math:: \eta_t = \operatorname{percentile}(H_t, p), \qquad
       g_t \leftarrow g_t \cdot \min\!\left(1, \frac{\eta_t}{\|g_t\|}\right)

    where the percentile interpolates linearly between order statistics, as
    :func:`numpy.percentile`: with the :math:`n` values of :math:`H_t`
    sorted, :math:`\eta_t` is read at position :math:`(n-1)p/100`. Before
    the buffer is full only the norms seen so far count (the first step is
    never clipped: its percentile is its own norm). The buffer is a ring of
    fixed shape: no recompilation as it fills.

    A NaN or infinite norm makes every element of the step NaN (as in
    :func:`norm_optax.clip_by_global_norm`, so :func:`optax.apply_if_finite`
    can skip it) and does not enter the buffer: one broken step cannot
    poison the history.

    Place it first, before the optimizer:
    ``optax.chain(nox.autoclip(10.0), optax.adam(1e-3))``.

    Args:
      percentile: :math:`p \in (0, 100]`; 10 is the paper's choice.
      history: how many past norms the percentile is taken over, an int
        ``>= 1``. Algorithm 1 of the paper keeps every norm; a finite window
        follows recent training dynamics. Under
        :func:`optax.inject_hyperparams` list it in ``static_args``.
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over
        which the updates are split; a leaf replicated over them counts once
        (see :func:`norm_optax.global_norm`; ``jax.pmap`` and
        ``check_vma=False`` raise ``ValueError``). ``None`` otherwise.

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AutoClipState`.

    Raises:
      ValueError: ``percentile`` is outside ``(0, 100]`` or ``history < 1``.
      TypeError: ``history`` is not an int.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tx = nox.autoclip(percentile=50.0, history=3)
      >>> state = tx.init(None)
      >>> for scale in (1.0, 2.0, 9.0):  # the median of (1, 2, 9) is 2
      ...     updates, state = tx.update({"w": jnp.array([scale])}, state)
      >>> updates["w"], state.norms
      (Array([2.], dtype=float32), Array([1., 2., 9.], dtype=float32))

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
    """
    hypers = declare(percentile=(percentile, PERCENT))
    length = size(history, "history", 1)

    def init_fn(params: optax.Params) -> AutoClipState:
        del params
        zero = jnp.zeros((), _I32)
        return AutoClipState(jnp.zeros((length,), _F32), zero, zero)

    def update_fn(
        updates: optax.Updates,
        state: AutoClipState,
        params: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AutoClipState]:
        del params, extra_args
        values = hypers.at(None)
        norm = global_norm(updates, axis_name=axis_name)
        norm32 = _f32(norm)
        finite = jnp.isfinite(norm32)
        norms = jnp.where(
            finite, state.norms.at[state.next_slot].set(norm32), state.norms
        )
        count = jnp.where(
            finite, jnp.minimum(state.num_norms + 1, length), state.num_norms
        )
        index = jnp.where(finite, (state.next_slot + 1) % length, state.next_slot)
        threshold = _percentile(norms, count, _f32(values["percentile"]))
        scale = poison(clip_scale(norm, threshold), hypers.valid(values))
        return _scaled(updates, scale), AutoClipState(norms, count, index)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# skip_on_spike.
# ---------------------------------------------------------------------------


class SkipOnSpikeState(NamedTuple):
    """State of :func:`skip_on_spike`."""

    inner_state: optax.OptState
    """The wrapped transform's state (unchanged by a skipped step)."""
    norms: jax.Array
    """``(window,)`` float32: the last ``window`` ordinary (finite, not
    skipped) global norms, in ring order (slot ``i`` valid for ``i < num_norms``)."""
    num_norms: jax.Array
    """``()`` int32: number of valid norms in ``norms``, at most ``window``."""
    next_slot: jax.Array
    """``()`` int32: the slot the next ordinary norm is written to."""
    num_skipped: jax.Array
    """``()`` int32: number of steps skipped so far."""


def _zeros_like_output(updates: Any, shapes: Any) -> Any:
    """Zero updates shaped as ``inner``'s output; other leaves pass through."""

    def zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
        return jnp.zeros(s.shape, s.dtype)

    def zeros_like(u: Any, s: jax.ShapeDtypeStruct) -> Any:
        if not is_inexact(s):
            return u
        if getattr(u, "shape", None) == s.shape:
            # Built from the update leaf, the zeros keep its sharding.
            return jnp.zeros_like(u, dtype=s.dtype)
        return zeros(s)

    if len(jax.tree.leaves(updates)) == len(jax.tree.leaves(shapes)):
        try:
            return jax.tree.map(zeros_like, updates, shapes)
        except (TypeError, ValueError):
            pass
    return jax.tree.map(zeros, shapes)  # inner changed the tree structure


def skip_on_spike(
    inner: optax.GradientTransformation,
    window: int = 128,
    num_sigma: Any = 6.0,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose gradient norm is a spike: zero updates, state kept.

    With :math:`x_t = \|g_t\|_2` and :math:`m, s` the mean and population
    standard deviation (``numpy.std``) of the previous ``window`` *ordinary*
    norms, step :math:`t` is a spike once ``window`` ordinary norms have been
    seen and

    .. math:: x_t > m + k\,s \qquad (k = \texttt{num\_sigma}).

    A spike returns zero updates (each leaf's dtype kept) and leaves
    ``inner``'s state exactly as it was (a :func:`jax.lax.cond`: ``inner``
    is not run; under ``vmap`` it runs and its result is discarded), its
    norm does not enter the window, and
    ``num_skipped`` is incremented. Any other step runs ``inner`` as usual
    and its norm enters the window. There are no skips during warm-up
    (before ``window`` ordinary norms).
    Whatever ``inner`` keeps in its state (moments, step counts, norms
    recorded by :func:`record_norms`) stays as it was on a skipped step.

    A NaN or infinite norm counts as a spike once the window is full (it is
    skipped and counted); during warm-up it is passed to ``inner`` unchanged
    (wrap in :func:`optax.apply_if_finite` to handle it) and does not enter
    the window.

    Wrap the whole optimizer, so that a skipped step also leaves its moments
    and step count untouched:
    ``nox.skip_on_spike(optax.chain(nox.clip_by_global_norm(1.0),
    optax.adamw(3e-4)))``. Clipping inside the wrapper does not hide a
    spike: the norm is measured on the raw gradient.

    Args:
      inner: the transform to protect, any
        :class:`optax.GradientTransformation`; ``params`` and extra keyword
        arguments are passed on to it.
      window: number of past ordinary norms the statistics use, an int
        ``>= 2`` (a standard deviation needs two). Under
        :func:`optax.inject_hyperparams` list it in ``static_args``.
      num_sigma: :math:`k \ge 0`, how many standard deviations above the mean
        a spike starts.
      axis_name: inside ``jax.shard_map``, the manual axis name(s) over
        which the updates are split; a leaf replicated over them counts once
        (see :func:`norm_optax.global_norm`; ``jax.pmap`` and
        ``check_vma=False`` raise ``ValueError``). ``None`` otherwise.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`SkipOnSpikeState`.

    Raises:
      ValueError: ``window < 2``, or ``num_sigma`` is negative or NaN.
      TypeError: ``window`` is not an int, or ``inner`` is not a
        transform (a function such as ``optax.adam`` not yet called).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.skip_on_spike(optax.sgd(1.0), window=2, num_sigma=3.0)
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for scale in (1.0, 1.2, 100.0):  # 100 > 1.1 + 3 * 0.1
      ...     updates, state = tx.update({"w": jnp.array([scale])}, state)
      >>> updates["w"], state.num_skipped
      (Array([0.], dtype=float32), Array(1, dtype=int32))

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around
      loss spikes); Groeneveld et al., `OLMo: Accelerating the Science of
      Language Models <https://arxiv.org/abs/2402.00838>`_, 2024
    """
    _check_transform(inner, "skip_on_spike")
    length = size(window, "window", 2)
    hypers = declare(num_sigma=(num_sigma, NONNEGATIVE))
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipOnSpikeState:
        zero = jnp.zeros((), _I32)
        return SkipOnSpikeState(
            inner.init(params), jnp.zeros((length,), _F32), zero, zero, zero
        )

    def update_fn(
        updates: optax.Updates,
        state: SkipOnSpikeState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SkipOnSpikeState]:
        values = hypers.at(None)
        x = _f32(global_norm(updates, axis_name=axis_name))
        warm = state.num_norms >= length
        limit = jnp.mean(state.norms) + _f32(values["num_sigma"]) * jnp.std(state.norms)
        spike = warm & ~(x <= limit)  # NaN/inf norms are spikes once warm
        enters = ~spike & jnp.isfinite(x)

        run = functools.partial(inner.update, **extra_args)
        shapes = jax.eval_shape(run, updates, state.inner_state, params)

        def skip(
            updates: optax.Updates, inner_state: optax.OptState, params: Any
        ) -> tuple[optax.Updates, optax.OptState]:
            del params
            # Match the dtypes inner.update returns (e.g. weak types).
            kept = jax.tree.map(
                lambda x, s: jnp.asarray(x, s.dtype), inner_state, shapes[1]
            )
            return _zeros_like_output(updates, shapes[0]), kept

        out, inner_state = jax.lax.cond(
            spike, skip, run, updates, state.inner_state, params
        )
        # A traced num_sigma out of its domain makes the step NaN (not zeros).
        valid = hypers.valid(values)
        out = map_inexact(lambda x: poison(x, valid), out)
        new_state = SkipOnSpikeState(
            inner_state,
            jnp.where(enters, state.norms.at[state.next_slot].set(x), state.norms),
            jnp.where(
                enters, jnp.minimum(state.num_norms + 1, length), state.num_norms
            ),
            jnp.where(enters, (state.next_slot + 1) % length, state.next_slot),
            _increment(state.num_skipped, spike),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
