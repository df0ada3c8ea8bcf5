"""Per-layer norm statistics of training: which layer is exploding, and when.

:func:`record_layer_norms` wraps any transform and keeps, in its state, the
L2 norm of every layer of the incoming updates, of the wrapped transform's
output and of the params, the update-to-weight ratio per layer, and the two
global norms that :func:`norm_optax.record_norms` keeps.
:func:`layer_norms_dict` turns such a tree of per-layer norms into the flat
``{name: float}`` dict that every logger takes.

A *layer* is a leaf, or, for a leaf whose first ``s`` axes stack ``s``
dimensions of layers (``nnx.vmap``/``nnx.scan``, Linen ``nn.scan``, a
``jax.lax.scan`` over a leading ``layers`` axis), each index of those axes:
a scanned ``(24, 768, 3072)`` kernel gives 24 norms, not one.

All the per-layer sums of squares of one update (inputs, outputs and params,
every leaf and every layer) come from one reduction (``bfloat16`` layers
whose squares leave ``float32``'s range get a rescaled second pass, as the
norms of :mod:`norm_optax.norms` do); sharded on a mesh with
``Explicit`` axes they are combined with a single all-reduce of a short
vector, whatever the number of leaves, and no leaf is gathered.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from norm_optax import _layout, _norms, _types

__all__ = ["RecordLayerNormsState", "layer_norms_dict", "record_layer_norms"]

_F32 = jnp.float32


class RecordLayerNormsState(NamedTuple):
    """State of :func:`record_layer_norms`, as of the last update.

    Every field but ``inner_state`` is ``float32``. The four per-layer fields
    are pytrees with the structure of the updates: per inexact leaf an array
    of the leaf's stack shape (``()`` for an unstacked leaf, ``(L,)`` for a
    leaf with one stack axis of ``L`` layers), ``None`` where the leaf does
    not take part (``None``, :class:`optax.MaskedNode`, integer, bool leaves).
    All are zeros after ``init``; their shapes and dtypes never change.
    """

    inner_state: optax.OptState
    """The wrapped transform's state."""
    input_norms: optax.Updates
    """The L2 norm of the updates passed in, per layer."""
    output_norms: optax.Updates
    """The L2 norm of the wrapped transform's output, per layer."""
    param_norms: optax.Updates
    """The L2 norm of ``params``, per layer (NaN when ``update`` got none)."""
    update_ratios: optax.Updates
    """The ratio ``output_norms / param_norms``, per layer (0 where both are 0, ``inf``
    where only the param norm is 0, NaN where either is NaN or the param norm
    is infinite)."""
    input_norm: jax.Array
    """``()``: the global L2 norm of the updates passed in."""
    output_norm: jax.Array
    """``()``: the global L2 norm of the wrapped transform's output."""


def _layout_of(
    tree: optax.Updates, stack_axes: _types.StackAxes, params: optax.Params
) -> tuple[list[tuple[Any, Any, int]], Any]:
    """``(path, leaf, stack count)`` of every leaf of ``tree``, and its treedef."""
    stacks = _layout.resolve_spec(
        stack_axes, tree, params, name="stack_axes", is_value=_layout.is_stack_value
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for (path, leaf), s in zip(flat, stacks, strict=True):
        count = 0
        if _types.is_inexact(leaf):
            shape = tuple(np.shape(leaf))
            count = _layout.stack_count(s, _layout.path_str(path), shape)
        out.append((path, leaf, count))
    return out, treedef


def _ratio(output: jax.Array, param: jax.Array) -> jax.Array:
    """``output / param`` with the rule of :class:`RecordLayerNormsState`."""
    zero = param == 0
    ratio = output / jnp.where(zero, 1, param)
    ratio = jnp.where(zero, jnp.where(output == 0, 0, jnp.inf), ratio)
    bad = jnp.isnan(output) | jnp.isnan(param) | jnp.isinf(param)
    return jnp.where(bad, jnp.nan, ratio).astype(_F32)


def record_layer_norms(
    inner: optax.GradientTransformation, *, stack_axes: _types.StackAxes = None
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a transform and records per-layer norms of what goes in and out.

    For every layer :math:`\ell` (a leaf, or one index of a stacked leaf's
    stack axes), with :math:`g` the updates passed in, :math:`u =
    \mathrm{inner}(g)` and :math:`w` the params:

    .. math:: \texttt{input\_norms}_\ell = \|g_\ell\|_2, \quad
       \texttt{output\_norms}_\ell = \|u_\ell\|_2, \quad
       \texttt{param\_norms}_\ell = \|w_\ell\|_2, \quad
       \texttt{update\_ratios}_\ell = \|u_\ell\|_2 / \|w_\ell\|_2,

    and the global norms ``input_norm`` = :math:`\|g\|_2`, ``output_norm`` =
    :math:`\|u\|_2` that :func:`record_norms` keeps. The updates are returned
    exactly as ``inner`` returns them (bit for bit); ``params`` and extra
    keyword arguments are passed on to ``inner``. The state is a
    :class:`RecordLayerNormsState` (zeros after ``init``), every field
    readable with ``optax.tree.get(state, "output_norms")`` wherever the
    wrapper sits in a chain; :func:`layer_norms_dict` flattens a field for a
    logger.

    * **NaN is shown, never hidden.** A NaN or infinity in one layer gives a
      NaN or infinite norm for that layer (and the global norm), and leaves
      every other layer's norm as it is.
    * **Update ratios.** ``output_norms / param_norms``: 0 where both norms
      are 0, ``inf`` where only the param norm is 0, NaN where either norm is
      NaN or the param norm is infinite. Without ``params`` the param norms
      and ratios are NaN. Wrapped around a whole optimizer (learning rate
      included), the ratio is the relative size of each layer's step; for
      Adam-style training a healthy value is around ``1e-3``.
    * **Cost.** All norms of a step come from one fused reduction over the
      updates, the output and the params (accumulated in ``float32`` or
      wider). Under ``jax.jit`` with leaves sharded on a mesh with
      ``Explicit`` axes, they are combined with a single all-reduce of a
      vector with one entry per layer, however many leaves there are; no
      leaf is gathered. The state is small and replicated. On XLA:CPU, in
      a jitted step that donates the params and the optimizer state, XLA
      copies every donated param before reading it for the norms, which
      makes such a step several times slower (as the output norm of
      :func:`record_norms` does); record every ``n`` steps there.

    Wrap the whole optimizer to see the raw gradient (``input_norms``) and
    the step actually taken (``output_norms``, ``update_ratios``):
    ``nox.record_layer_norms(optax.chain(nox.clip_by_global_norm(1.0),
    optax.adamw(3e-4)))``. Wrap one transform to see just its effect:
    ``optax.chain(nox.record_layer_norms(nox.zclip()), optax.adamw(3e-4))``.

    Args:
      inner: any :class:`optax.GradientTransformation`.
      stack_axes: how many leading axes of each leaf index stacked layers:
        ``None`` (no stack axes), an int ``>= 0`` for every leaf, a tree of
        ints (or bools, ``True`` = 1) matching the params, or a callable
        ``params -> that tree`` such as ``nox.masks.by_path("layers/")`` or
        ``nox.masks.stack_axes_from_partitions`` for Flax models. It is
        structural: under :func:`optax.inject_hyperparams` list it in
        ``static_args``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`RecordLayerNormsState`.

    Raises:
      TypeError: ``inner`` is not an :class:`optax.GradientTransformation`.
      ValueError: (at ``init``/``update``) a stack axis count is larger than
        a leaf's ndim, naming the leaf's path and shape.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.record_layer_norms(optax.sgd(0.1), stack_axes={"w": 1, "b": 0})
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> grads = {"w": jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]), "b": jnp.ones(3)}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> optax.tree.get(state, "input_norms")
      {'b': Array(1.7320508, dtype=float32), 'w': Array([5., 1.], dtype=float32)}
      >>> ratios = optax.tree.get(state, "update_ratios")  # b: params all 0
      >>> ratios["b"], ratios["w"]
      (Array(inf, dtype=float32), Array([0.28867513, 0.05773503], dtype=float32))
      >>> nox.layer_norms_dict(optax.tree.get(state, "input_norms"), prefix="grad/")
      {'grad/b': 1.7320507764816284, 'grad/w/0': 5.0, 'grad/w/1': 1.0}
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation, got {inner!r} "
            f"(of type {type(inner).__name__})."
        )
    _layout.check_specs(stack_axes=stack_axes)
    inner = optax.with_extra_args_support(inner)

    def zeros_like_layers(tree: optax.Params, fill: float) -> optax.Updates:
        flat, treedef = _layout_of(tree, stack_axes, tree)
        return jax.tree.unflatten(
            treedef,
            [
                jnp.full(np.shape(leaf)[:count], fill, _F32)
                if _types.is_inexact(leaf)
                else None
                for _, leaf, count in flat
            ],
        )

    def init_fn(params: optax.Params) -> RecordLayerNormsState:
        zeros = zeros_like_layers(params, 0.0)
        zero = jnp.zeros((), _F32)
        return RecordLayerNormsState(
            inner.init(params), zeros, zeros, zeros, zeros, zero, zero
        )

    def update_fn(
        updates: optax.Updates,
        state: RecordLayerNormsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, RecordLayerNormsState]:
        out, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        spec_params = updates if params is None else params
        trees = [updates, out] if params is None else [updates, out, params]
        layouts = [_layout_of(t, stack_axes, spec_params) for t in trees]
        # One reduction (one all-reduce when sharded) for every layer of
        # every leaf of the three trees.
        leaves: list[jax.Array] = []
        counts: list[int] = []
        for flat, _ in layouts:
            for _, leaf, count in flat:
                if _types.is_inexact(leaf):
                    leaves.append(jax.lax.stop_gradient(_types.as_array(leaf)))
                    counts.append(count)
        all_norms, all_sums = _norms.layer_norms(leaves, counts)
        pairs = iter(zip(all_norms, all_sums, strict=True))

        def per_layer(flat: list[tuple[Any, Any, int]], treedef: Any) -> Any:
            taken = [next(pairs) if _types.is_inexact(x) else None for _, x, _ in flat]
            present = [pair for pair in taken if pair is not None]
            total = _norms.global_of_layers(
                [n for n, _ in present], [s for _, s in present]
            )
            norms = [None if pair is None else pair[0].astype(_F32) for pair in taken]
            return jax.tree.unflatten(treedef, norms), total.astype(_F32)

        input_norms, input_norm = per_layer(*layouts[0])
        output_norms, output_norm = per_layer(*layouts[1])
        if params is None:
            param_norms = zeros_like_layers(updates, float("nan"))
        else:
            param_norms, _ = per_layer(*layouts[2])
        update_ratios = jax.tree.map(_ratio, output_norms, param_norms)
        new_state = RecordLayerNormsState(
            inner_state,
            input_norms,
            output_norms,
            param_norms,
            update_ratios,
            input_norm,
            output_norm,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layer_norms_dict(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flattens a tree of per-layer norms into ``{name: float}`` for a logger.

    Host side (it reads the values): call it outside ``jit``, on a state
    field such as ``optax.tree.get(state, "output_norms")`` or on a stack of
    them. Each key is ``prefix + path`` (plain concatenation, so
    ``prefix="grad/"`` gives ``grad/layers/kernel/0``), where the path joins
    the leaf's keys with ``/`` (``encoder/layers/0/kernel``, without NNX's
    trailing ``value``). A leaf of shape ``()`` gives one entry; a stacked
    leaf of shape ``(L,)`` gives ``L`` entries with ``/i`` appended, one of
    shape ``(L, M)`` gives ``/i/j``. ``None`` leaves are left out; NaN and
    infinities are kept as they are.

    Args:
      tree: a pytree of arrays (or Python numbers).
      prefix: prepended to every key as it is.

    Returns:
      A ``dict`` from key to Python ``float``, in the tree's leaf order.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> norms = {"layers": {"kernel": jnp.array([0.5, 2.0])}, "head": jnp.array(1.0)}
      >>> nox.layer_norms_dict(norms, prefix="stats/")
      {'stats/head': 1.0, 'stats/layers/kernel/0': 0.5, 'stats/layers/kernel/1': 2.0}
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    out: dict[str, float] = {}
    for path, leaf in flat:
        name = prefix + _layout.path_str(path)
        values = np.asarray(leaf, dtype=np.float64)
        if values.ndim == 0:
            out[name] = float(values)
            continue
        for index in np.ndindex(values.shape):
            out[name + "".join(f"/{i}" for i in index)] = float(values[index])
    return out
