"""Transform plumbing: the builders every technique is written on.

Private, on the floor above the norms and the shared numerics. A technique
module writes its maths and hands it to one of two builders, which own
everything else:

* :func:`leafwise` -- ``fn(u, p, leaf, values) -> u'`` for each selected
  leaf: gradient clipping per leaf or per unit, decay;
* :func:`projection` -- the one projection builder. Its :class:`Target` is the
  maths ``x -> P(x)`` of a projection or prox, for ``x = p + u`` in wide
  precision, per element, per unit (a scale from the unit norms), over the
  whole tree, or per leaf with a state; the builder returns
  ``u' = P(p + u) - p`` landed in the update's dtype so that
  :func:`optax.apply_updates` keeps the bound (see
  :func:`norm_optax._numerics.land`), ``u`` itself where the target leaves
  ``p + u`` alone.

Both own the update-time contract that every transform shares: ``params`` present
and matching ``updates`` (one message), ``mask``/``axis``/``stack_axes``
resolved per leaf (values, trees or callables, see ``_layout``), leaves that
are not inexact or are masked out passed through, hyper-parameters from their
declared domains (a traced value out of its domain gives NaN), optax
schedules evaluated at a step count kept in the state, every leaf's dtype and
shape kept. Every transform is an :class:`optax.GradientTransformationExtraArgs`
whose ``update`` accepts extra keyword arguments and ignores them (optax's
convention: :func:`optax.chain` passes them to every member).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from norm_optax import _layout, _norms
from norm_optax._domains import Hypers, poison
from norm_optax._numerics import (
    Landing,
    land,
    land_units,
    needs_unit_check,
    select,
    wide_sum,
    widen,
)
from norm_optax._types import Axis, Mask, PyTree, StackAxes, as_array, is_inexact

__all__ = [
    "Leaf",
    "ScheduleState",
    "Target",
    "check_params",
    "check_same_structure",
    "leafwise",
    "map_inexact",
    "projection",
    "resolve_mask",
    "stateless",
]

UpdateFn = Callable[..., tuple[optax.Updates, Any]]


class ScheduleState(NamedTuple):
    """State of a transform whose ``learning_rate`` is an optax schedule."""

    count: Any  # (``Any``: the name shadows ``tuple.count`` for type checkers)
    """``()`` int32: the number of updates so far (the schedule's argument)."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """What a target needs to know about one leaf."""

    path: str
    """The ``/``-joined key path, for error messages."""
    shape: tuple[int, ...]
    stack: int
    """How many leading axes index stacked layers."""
    axes: tuple[int, ...]
    """The axes one unit reduces over (sorted, absolute)."""
    dtype: Any
    """The parameter's dtype (the update's for transforms without params)."""
    update_dtype: Any = None
    """The update's dtype."""


# ---------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------


def check_params(params: Any, transform: str) -> None:
    """The one message for a transform that needs ``params`` and got none."""
    if params is None:
        raise ValueError(
            f"{transform} needs the current parameters: call "
            f"`update(updates, state, params)`. In optax.chain the params are "
            f"passed on to every transform; with flax.nnx.Optimizer they are "
            f"passed for you."
        )


def check_same_structure(updates: Any, other: Any, other_name: str) -> None:
    """Raises ``ValueError`` naming both structures if they differ."""
    # (PyTreeDef's stub declares no __eq__, hence the Any.)
    expected: Any = jax.tree.structure(updates)
    got: Any = jax.tree.structure(other)
    if expected != got:
        raise ValueError(
            f"The structure of {other_name} does not match the updates.\n"
            f"  updates: {expected}\n  {other_name}: {got}"
        )


def resolve_mask(mask: Mask, updates: PyTree, params: PyTree) -> list[bool]:
    """``mask`` as one bool per leaf of ``updates`` (all ``True`` for ``None``)."""
    if mask is None:
        return [True] * len(jax.tree.leaves(updates))
    values = _layout.resolve_spec(
        mask, updates, params, name="mask", is_value=_layout.is_mask_value
    )
    return [bool(m) for m in values]


def map_inexact(fn: Callable[[jax.Array], jax.Array], updates: PyTree) -> PyTree:
    """Applies ``fn`` to each inexact leaf of ``updates``; others pass through."""
    return jax.tree.map(lambda u: fn(u) if is_inexact(u) else u, updates)


def stateless(update: UpdateFn) -> optax.GradientTransformationExtraArgs:
    """A stateless transform from ``update(updates, params) -> updates``."""

    def update_fn(
        updates: optax.Updates,
        state: optax.EmptyState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del extra_args
        return update(updates, params), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------
# Selecting leaves.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Selected:
    index: int
    u: jax.Array
    p: jax.Array | None
    leaf: Leaf


def _select(
    transform: str,
    updates: PyTree,
    params: PyTree,
    *,
    needs_params: bool,
    mask: Mask,
    axis: Axis,
    stack_axes: StackAxes,
) -> tuple[list[Any], Any, list[_Selected]]:
    """The flat leaves, the treedef, and the leaves the transform acts on."""
    if needs_params:
        check_params(params, transform)
        check_same_structure(updates, params, "params")
    # A callable spec is called on the params, or on the updates without them.
    source = params if params is not None else updates
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    n = len(flat)
    masks = resolve_mask(mask, updates, source)
    stacks = _layout.resolve_spec(
        stack_axes, updates, source, name="stack_axes", is_value=_layout.is_stack_value
    )
    axis_values = _layout.resolve_spec(
        axis, updates, source, name="axis", is_value=_layout.is_axis_value
    )
    ps: list[Any] = jax.tree.leaves(params) if needs_params else [None] * n
    chosen = []
    for i, ((path, u), p, m, s, a) in enumerate(
        zip(flat, ps, masks, stacks, axis_values, strict=True)
    ):
        if not m or not is_inexact(u):
            continue
        where = _layout.path_str(path)
        u = as_array(u)
        if needs_params:
            if not is_inexact(p):
                continue
            p = as_array(p)
            if p.shape != u.shape:
                raise ValueError(
                    f"{transform}: params at {where or '<root>'} have shape "
                    f"{p.shape}, the updates {u.shape}."
                )
        stack = _layout.stack_count(s, where, u.shape)
        axes = _layout.unit_axes(a, where, u.shape, stack)
        leaf = Leaf(
            where, u.shape, stack, axes, u.dtype if p is None else p.dtype, u.dtype
        )
        chosen.append(_Selected(i, u, p, leaf))
    return [u for _, u in flat], treedef, chosen


def _init_count(params: Any) -> ScheduleState:
    del params
    return ScheduleState(jnp.zeros((), jnp.int32))


def _next(count: jax.Array) -> jax.Array:
    return optax.safe_increment(count)


# ---------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------


LeafFn = Callable[[jax.Array, Any, Leaf, dict[str, Any]], jax.Array]


def leafwise(
    transform: str,
    fn: LeafFn,
    hypers: Hypers,
    *,
    needs_params: bool,
    mask: Mask = None,
    axis: Axis = None,
    stack_axes: StackAxes = None,
) -> optax.GradientTransformationExtraArgs:
    """A transform applying ``fn(u, p, leaf, values)`` to each selected leaf.

    ``p`` is ``None`` without ``needs_params``; ``values`` are the
    hyper-parameters (schedules evaluated). A traced value outside its domain
    makes the leaf's output NaN.
    """
    _layout.check_specs(mask=mask, axis=axis, stack_axes=stack_axes)
    counting = hypers.has_schedule

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        out, treedef, chosen = _select(
            transform,
            updates,
            params,
            needs_params=needs_params,
            mask=mask,
            axis=axis,
            stack_axes=stack_axes,
        )
        values = hypers.at(state.count if counting else None)
        valid = hypers.valid(values)
        for c in chosen:
            out[c.index] = poison(fn(c.u, c.p, c.leaf, values), valid)
        new_state = ScheduleState(_next(state.count)) if counting else state
        return jax.tree.unflatten(treedef, out), new_state

    init = _init_count if counting else optax.init_empty_state
    return optax.GradientTransformationExtraArgs(init, update_fn)


Kind = Literal["element", "unit", "tree", "leaf"]


@dataclasses.dataclass(frozen=True)
class Target:
    """The maths of a projection or prox, handed to :func:`projection`.

    ``kind`` says what ``fn`` maps (``x`` is ``p + u`` in wide precision,
    ``values`` the hyper-parameters):

    * ``"element"``: ``fn(x, leaf, values) -> (P(x), keep)``, elementwise;
    * ``"unit"``: ``fn(norm, leaf, values) -> (num, den)``, from the L2 norm of
      each unit (keepdims), so ``P(x) = x * (num / den)``; ``den`` is never 0
      (the caller divides last, after its own guard, so that the per-unit
      scale is one small array that XLA computes once and the landing kernel
      reads, not a chain of selects it repeats for every element). A NaN or
      infinite unit norm makes the unit NaN.
      ``limits(norm, target_norm, leaf, values) -> (lo, hi)``, if given, are
      the bounds a unit's landed norm must keep (the target aimed a few ulps
      inside them): in half precision and mixed dtypes each unit is then
      landed as near its target norm as the grid allows within them
      (:func:`norm_optax._numerics.land_units`);
    * ``"tree"``: ``fn(xs, values) -> (targets, keep)`` over all selected
      leaves together, ``keep`` a scalar;
    * ``"leaf"``: ``fn(x, leaf, values, leaf_state) -> (P(x), keep,
      new_leaf_state)`` with a per-leaf state that ``init(x, leaf)`` makes
      from the params; the transform's state is ``state_type`` with one
      tree per field (the params' structure, ``None`` at other leaves).

    ``keep`` marks where ``p + u`` is left alone (the new parameter is the
    one ``u`` gives), as does a target equal to ``x``. A non-finite ``x`` (an
    infinite or NaN parameter or update) gives NaN, never a plausible finite
    parameter.
    ``landing`` is ``"bound"`` for inequality constraints (a bound holds
    after ``apply_updates``) and ``"nearest"`` for equalities.
    """

    kind: Kind
    fn: Callable[..., Any]
    landing: Landing = "bound"
    init: Callable[[jax.Array, Leaf], tuple[jax.Array, ...]] | None = None
    state_type: Any = None  # a NamedTuple class
    limits: Callable[..., tuple[Any, Any]] | None = None


def _land_leaf(
    c: _Selected, x: jax.Array, t: jax.Array, keep: Any, landing: Landing, valid: Any
) -> jax.Array:
    assert c.p is not None
    if keep is not False:
        t = select(keep, x, t)
    # A non-finite ``p + u`` never becomes a finite parameter.
    t = poison(select(jnp.isfinite(x), t, jnp.full((), jnp.nan, t.dtype)), valid)
    return land(c.p, c.u, x, t, landing)


def _land_unit(
    target: Target, c: _Selected, x: jax.Array, values: dict[str, Any], valid: Any
) -> jax.Array:
    assert c.p is not None
    norm = _norms.axes_norm(x, 2, c.leaf.axes, axis_name=None, widened_from=c.p.dtype)
    num, den = target.fn(norm, c.leaf, values)
    num = jax.lax.select(jnp.isfinite(norm), num, jax.lax.full_like(num, jnp.nan))
    scale = num / den  # (the division last: see ``Target``)
    t = poison(x * scale.astype(x.dtype), valid)
    if target.limits is None or not needs_unit_check(c.p.dtype, c.u.dtype):
        return land(c.p, c.u, x, t, target.landing)
    goal = norm * scale
    lo, hi = target.limits(norm, goal, c.leaf, values)
    lo, hi = jnp.asarray(lo), jnp.asarray(hi)
    return land_units(c.p, c.u, x, t, c.leaf.axes, goal, lo, hi, target.landing)


def _project(
    target: Target,
    chosen: Sequence[_Selected],
    values: dict[str, Any],
    valid: Any,
    leaf_states: list[Any],
) -> tuple[dict[int, jax.Array], list[Any]]:
    out: dict[int, jax.Array] = {}
    new_states: list[Any] = []
    if target.kind == "tree":
        if chosen:
            xs = [wide_sum(c.p, c.u) for c in chosen if c.p is not None]
            ts, keep = target.fn(xs, values)
            for c, x, t in zip(chosen, xs, ts, strict=True):
                out[c.index] = _land_leaf(c, x, t, keep, target.landing, valid)
        return out, new_states
    for k, c in enumerate(chosen):
        assert c.p is not None
        x = wide_sum(c.p, c.u)
        if target.kind == "unit":
            out[c.index] = _land_unit(target, c, x, values, valid)
            continue
        if target.kind == "element":
            t, keep = target.fn(x, c.leaf, values)
        else:
            t, keep, state = target.fn(x, c.leaf, values, leaf_states[k])
            new_states.append(state)
        out[c.index] = _land_leaf(c, x, t, keep, target.landing, valid)
    return out, new_states


def projection(
    transform: str,
    target: Target,
    hypers: Hypers,
    *,
    mask: Mask = None,
    axis: Axis = None,
    stack_axes: StackAxes = None,
) -> optax.GradientTransformationExtraArgs:
    """The projection builder: ``u' = P(p + u) - p`` for a :class:`Target`.

    Needs ``params``. The state is :class:`optax.EmptyState`, a
    :class:`ScheduleState` when a hyper-parameter is an optax schedule, or
    the target's ``state_type`` for a ``"leaf"`` target with an ``init``.
    """
    _layout.check_specs(mask=mask, axis=axis, stack_axes=stack_axes)
    counting = hypers.has_schedule
    stateful = target.init is not None
    if counting and stateful:
        raise NotImplementedError("a stateful target cannot also take a schedule")

    def choose(
        updates: PyTree, params: PyTree
    ) -> tuple[list[Any], Any, list[_Selected]]:
        return _select(
            transform,
            updates,
            params,
            needs_params=True,
            mask=mask,
            axis=axis,
            stack_axes=stack_axes,
        )

    def init_fn(params: optax.Params) -> Any:
        if counting:
            return _init_count(params)
        if not stateful:
            return optax.EmptyState()
        assert target.init is not None
        assert target.state_type is not None
        flat, treedef, chosen = choose(params, params)
        num_fields = len(target.state_type._fields)  # a NamedTuple class
        fields: list[list[Any]] = [[None] * len(flat) for _ in range(num_fields)]
        for c in chosen:
            assert c.p is not None
            for f, value in enumerate(target.init(widen(c.p), c.leaf)):
                fields[f][c.index] = value
        return target.state_type(*[jax.tree.unflatten(treedef, f) for f in fields])

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        out, treedef, chosen = choose(updates, params)
        values = hypers.at(state.count if counting else None)
        valid = hypers.valid(values)
        leaf_states: list[Any] = []
        if stateful:
            per_field = [treedef.flatten_up_to(field) for field in state]
            leaf_states = [tuple(f[c.index] for f in per_field) for c in chosen]
        landed, new_leaf_states = _project(target, chosen, values, valid, leaf_states)
        for index, value in landed.items():
            out[index] = value
        new_updates = jax.tree.unflatten(treedef, out)
        if counting:
            return new_updates, ScheduleState(_next(state.count))
        if not stateful:
            return new_updates, state
        per_field = [treedef.flatten_up_to(field) for field in state]
        for c, leaf_state in zip(chosen, new_leaf_states, strict=True):
            for f, value in enumerate(leaf_state):
                per_field[f][c.index] = value
        return new_updates, type(state)(
            *[jax.tree.unflatten(treedef, f) for f in per_field]
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
