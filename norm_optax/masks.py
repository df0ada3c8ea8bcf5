"""Mask selectors: which parameters a transform applies to.

Every transform that reads ``params`` takes ``mask``: a tree of bools with the
structure of the params (or a prefix of it), or a callable ``params -> tree``.
The selectors here build that tree from a params tree of any kind: nested
dicts, Flax Linen ``FrozenDict``, or the Flax NNX ``State`` that
``nnx.Optimizer`` passes to ``tx.update`` (the mask then has exactly that
structure). The bools are Python bools, so the masks also work with
:func:`optax.masked`; given an NNX ``State`` of variable boxes
(``nnx.state(model, nnx.Param)``) they return plain bools in place of the
boxes, the structure of the bare arrays ``nnx.Optimizer`` passes to
``tx.update``. A selector called with a bare integer (what
:func:`optax.inject_hyperparams` passes to a callable argument not listed in
its ``static_args``: the step count) raises ``TypeError`` saying to list the
argument there, instead of selecting nothing.

* :func:`matrices_only` -- leaves with ``ndim >= 2`` (kernels, embeddings),
  the usual "no decay on biases and norm scales";
* :func:`by_path` / :func:`exclude_path` -- a regular expression searched in
  the ``/``-joined key path, such as ``encoder/layers/0/kernel``;
* :func:`all_of` -- the logical *and* of several masks;
* :func:`stack_axes_from_partitions` -- the ``stack_axes`` of a stacked
  Flax model, read from the partition names Flax records on its variables.

Example:
  >>> import jax.numpy as jnp
  >>> import optax
  >>> import norm_optax as nox
  >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
  ...           "head": {"kernel": jnp.ones((3, 1))}}
  >>> mask = nox.masks.all_of(nox.masks.matrices_only, nox.masks.exclude_path("^head/"))
  >>> mask(params)
  {'dense': {'bias': False, 'kernel': True}, 'head': {'kernel': False}}
  >>> tx = optax.chain(optax.adam(1e-3), nox.add_l2_decay(1e-4, mask=mask))
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

import jax

from norm_optax import _layout
from norm_optax._types import Mask, PyTree, StackAxes

__all__ = [
    "all_of",
    "by_path",
    "exclude_path",
    "matrices_only",
    "stack_axes_from_partitions",
]

MaskFn = Callable[[Any], Any]

_OR_STACK_AXES = " (or 'stack_axes' or 'axis', the argument it was given as)"


def _is_variable(node: Any) -> bool:
    """A Flax NNX variable box (``Param(value=...)``)."""
    return callable(getattr(node, "get_metadata", None))


def _unboxed(params: PyTree) -> PyTree:
    """``params`` with each NNX variable box replaced by its array.

    ``nnx.Optimizer`` inits its transform on ``nnx.state(model, wrt)`` (boxes)
    and updates it with ``nnx.as_pure`` of it (bare arrays): a mask built from
    either is the tree of bare leaves, which is the params of ``tx.update``
    and a prefix of the boxed state.
    """
    return jax.tree.map(
        lambda node: _box_value(node) if _is_variable(node) else node,
        params,
        is_leaf=_is_variable,
    )


def _box_value(node: Any) -> Any:
    get_value = getattr(node, "get_value", None)
    return get_value() if callable(get_value) else node.value


def _per_leaf(params: PyTree, values: list[Any]) -> PyTree:
    """A tree with the structure of ``params`` holding one value per leaf."""
    return jax.tree.unflatten(jax.tree.structure(params), values)


def matrices_only(params: PyTree = None, *, stack_axes: StackAxes = None) -> Any:
    """Marks the leaves with ``ndim >= 2`` (weight matrices, conv kernels).

    Biases, norm scales and scalars get ``False``. ``None`` leaves stay
    ``None``; non-array leaves (Python numbers) get ``False``. Given an NNX
    ``State`` of variable boxes (``nnx.state(model, nnx.Param)``), the result
    holds plain bools in place of the boxes, so it works as a mask inside
    ``nnx.Optimizer`` (which passes bare arrays to ``tx.update``).

    **Broadcast biases.** A bias has no fan-in: it is added to the output.
    Equinox stores a convolution's bias with size-1 broadcast axes,
    ``(out, 1, 1)`` for ``Conv2d`` and ``(out, 1)`` for ``Conv1d``; a leaf
    whose last key is ``bias`` and whose axes after the first all have size 1
    is not a matrix, exactly as its Flax twin ``(out,)``. Size-1 axes of
    other leaves are real axes: an Equinox ``Linear("scalar", out)`` weight
    ``(out, 1)``, a Flax ``Dense`` kernel ``(1, out)`` or ``(in, 1)`` is a
    matrix. (The per-unit transforms read units the same way.)

    **Stacked layers.** With ``stack_axes`` (see :doc:`Layouts </layouts>`) the first
    ``s`` axes of a leaf index layers and do not count: a leaf is a matrix
    when ``ndim - s >= 2``, so a stacked bias or LayerNorm scale
    ``(layers, features)`` is not decayed while a stacked kernel
    ``(layers, in, out)`` is. Called without ``params`` it returns the mask
    function, to pass as ``mask``:
    ``optax.adamw(1e-3, mask=nox.masks.matrices_only(stack_axes=1))``.

    Args:
      params: a pytree of arrays (dict, ``FrozenDict``, ``nnx.State``, an
        Equinox module filtered with ``eqx.is_inexact_array``, ...), or
        ``None`` for the mask function.
      stack_axes: ``None`` or an int ``>= 0`` for every leaf, a tree of ints
        (or bools) matching ``params``, or a callable ``params -> that tree``
        such as ``nox.masks.by_path("layers/")``.

    Returns:
      A tree of Python bools with the structure of ``params`` (or, without
      ``params``, a callable ``params -> that tree``).

    Raises:
      ValueError: ``stack_axes`` is negative (when given) or larger than a
        leaf's ndim (naming the leaf's path and shape).
      TypeError: ``params`` is a bare integer: ``optax.inject_hyperparams``
        called the selector with its step count, because ``mask`` is not
        listed in its ``static_args`` (the message says so).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> nox.masks.matrices_only({"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)})
      {'bias': False, 'kernel': True}
      >>> eqx_conv = {"weight": jnp.ones((4, 2, 3, 3)), "bias": jnp.ones((4, 1, 1))}
      >>> nox.masks.matrices_only(eqx_conv)
      {'bias': False, 'weight': True}
      >>> stacked = {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((4, 3))}
      >>> nox.masks.matrices_only(stacked, stack_axes=1)
      {'bias': False, 'kernel': True}
    """
    if params is None:
        _layout.check_specs(stack_axes=stack_axes)
        return functools.partial(matrices_only, stack_axes=stack_axes)
    _layout.check_not_number(params, "mask")
    params = _unboxed(params)
    stacks = _layout.resolve_spec(
        stack_axes, params, params, name="stack_axes", is_value=_layout.is_stack_value
    )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for (path, leaf), s in zip(flat, stacks, strict=True):
        where, shape = _layout.path_str(path), tuple(getattr(leaf, "shape", ()))
        stack = _layout.stack_count(s, where, shape)
        out.append(_layout.is_matrix(where, shape, stack))
    return _per_leaf(params, out)


def _path_mask(pattern: str | re.Pattern[str], keep: bool) -> MaskFn:
    regex = re.compile(pattern)

    def mask(params: Any) -> Any:
        _layout.check_not_number(params, "mask", also=_OR_STACK_AXES)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: (regex.search(_layout.path_str(path)) is not None) == keep,
            _unboxed(params),
        )

    return mask


def by_path(pattern: str | re.Pattern[str]) -> MaskFn:
    """Marks the leaves whose key path matches ``pattern`` (``re.search``).

    The path joins the keys with ``/``: ``encoder/layers/0/kernel`` for
    ``params["encoder"]["layers"][0]["kernel"]``, and likewise for a
    ``FrozenDict`` or an ``nnx.State`` (without NNX's trailing ``value``).
    Anchor the pattern (``^``, ``$``) to match whole keys.

    Args:
      pattern: a regular expression (string or compiled).

    Returns:
      A callable ``params -> tree of bools``, to pass as ``mask`` (or as
      ``stack_axes``: ``True`` = 1), with plain bools in place of NNX
      variable boxes.

    Raises:
      re.error: ``pattern`` is not a valid regular expression.
      TypeError: (when called) on a bare integer, which is what
        ``optax.inject_hyperparams`` passes to a callable not listed in its
        ``static_args`` (the message says to list it).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> params = {"encoder": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> nox.masks.by_path(r"/kernel$")(params)
      {'encoder': {'bias': False, 'kernel': True}}
    """
    return _path_mask(pattern, keep=True)


def exclude_path(pattern: str | re.Pattern[str]) -> MaskFn:
    """Marks the leaves whose key path does *not* match ``pattern``.

    The negation of :func:`by_path`, e.g. ``exclude_path(r"(bias|scale)$")``
    or ``exclude_path(r"^embed/")``.

    Args:
      pattern: a regular expression (string or compiled).

    Returns:
      A callable ``params -> tree of bools``, to pass as ``mask``.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> params = {"embed": jnp.ones((4, 2)), "kernel": jnp.ones((2, 2))}
      >>> nox.masks.exclude_path("^embed")(params)
      {'embed': False, 'kernel': True}
    """
    return _path_mask(pattern, keep=False)


def all_of(*masks: Mask) -> MaskFn:
    """The logical *and* of several masks.

    Args:
      *masks: each a tree of bools matching the params (or a prefix of it),
        or a callable ``params -> tree``. With none, every leaf is selected.

    Returns:
      A callable ``params -> tree of bools``, to pass as ``mask``.

    Raises:
      ValueError: (when called) a mask tree does not match the params; the
        message names both structures.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones(2)}}
      >>> mask = nox.masks.all_of(nox.masks.matrices_only, {"a": True, "b": False})
      >>> mask(params)
      {'a': {'kernel': True}, 'b': {'kernel': False}}
    """

    def mask(params: PyTree) -> PyTree:
        _layout.check_not_number(params, "mask", also=_OR_STACK_AXES)
        params = _unboxed(params)
        per_mask = [
            _layout.resolve_spec(
                m, params, params, name="mask", is_value=_layout.is_mask_value
            )
            for m in masks
        ]
        n = len(jax.tree.leaves(params))
        return _per_leaf(params, [all(bool(v[i]) for v in per_mask) for i in range(n)])

    return mask


# ---------------------------------------------------------------------------
# Stack axes from Flax partition metadata.
# ---------------------------------------------------------------------------

_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")
"""Where an NNX Variable keeps its axis names (flax 0.12; older releases)."""


def _is_box(node: Any) -> bool:
    """A Flax variable box: an NNX ``Variable`` or a Linen ``Partitioned``."""
    if callable(getattr(node, "get_metadata", None)):
        return True  # nnx.Variable (nnx.VariableState in older flax)
    names = getattr(node, "names", None)
    return isinstance(names, tuple) and callable(getattr(node, "unbox", None))


def _recorded_names(node: Any) -> tuple[Any, ...] | None:
    """The axis names Flax recorded for ``node``, ``None`` where it has none."""
    if not _is_box(node):
        return None
    if not callable(getattr(node, "get_metadata", None)):
        return tuple(node.names)  # nn.Partitioned, nn.LogicallyPartitioned
    metadata = node.get_metadata()
    for key in _SHARDING_KEYS:
        names = metadata.get(key)
        if names is not None:
            spec = getattr(names, "spec", names)  # a NamedSharding
            return tuple(spec) if isinstance(spec, (tuple, list)) else None
    return None


def _box_shape(node: Any) -> tuple[int, ...]:
    get_value = getattr(node, "get_value", None)
    value = get_value() if callable(get_value) else getattr(node, "value", None)
    return tuple(getattr(value, "shape", ()))


def _partition_names(partition_name: str | tuple[str, ...]) -> frozenset[str]:
    names = (partition_name,) if isinstance(partition_name, str) else partition_name
    if (
        not isinstance(names, (tuple, list))
        or not names
        or not all(isinstance(n, str) for n in names)
    ):
        raise TypeError(
            f"partition_name must be a string or a non-empty tuple of strings, "
            f"got {partition_name!r}."
        )
    return frozenset(names)


def stack_axes_from_partitions(
    tree: PyTree = None, *, partition_name: str | tuple[str, ...] = "layers"
) -> Any:
    """The ``stack_axes`` of a stacked Flax model, read from its partition names.

    A stacked layer built with ``nnx.vmap``/``nnx.scan`` and
    ``transform_metadata={nnx.PARTITION_NAME: "layers"}``, or with Linen's
    ``nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})``, has its
    layer axis named ``"layers"`` in each variable's partition names. This
    reads them, so the number of stack axes (see :doc:`Layouts </layouts>`) need not be
    repeated: each leaf gets the number of its *leading* axes named
    ``partition_name``.

    **Where Flax records the name.** Only on variables that carry a
    partition annotation: the ``out_sharding`` metadata of an NNX
    ``Variable`` (``nnx.with_partitioning``, or ``kernel_metadata=
    {"out_sharding": ...}`` and the like on NNX layers), and the
    ``names`` of a Linen ``nn.Partitioned`` (or ``nn.LogicallyPartitioned``)
    box (``nn.with_partitioning``). A stacked variable without an annotation
    records nothing: annotate every stacked variable (a bias and a norm
    scale too), or give ``stack_axes`` by hand. A variable without names
    that sits next to stacked ones (under a common module path) with their
    stack axes in front raises rather than silently count as not stacked;
    one that is not stacked but happens to have such a shape is annotated
    with names that do not start with ``partition_name``.

    **Which tree to read.** Flax keeps the metadata on its variable boxes,
    not on the arrays:

    * NNX: ``nnx.Optimizer`` passes bare arrays to ``tx.update``, so read the
      tree once from the model, ``stack = stack_axes_from_partitions(
      nnx.state(model, nnx.Param))`` (an ``nnx.State`` of ints with the
      structure of the params ``tx.update`` sees), and pass ``stack_axes=
      stack`` to the transforms and to :func:`matrices_only`.
    * Linen: the boxed variables of ``model.init``. Trained boxed (optax and
      the gradients keep the boxes), the callable form works at update time:
      ``stack_axes=stack_axes_from_partitions()``. Trained unboxed
      (``nn.unbox``), read the tree once from the boxed variables, as for NNX.

    Called on a tree in which no variable records partition names (bare
    arrays, unannotated variables) it raises rather than answer 0 for
    every leaf.

    Args:
      tree: an ``nnx.State`` of Variables (``nnx.state(model, nnx.Param)``),
        a Linen variables tree with ``nn.Partitioned`` boxes, or ``None`` for
        the callable form.
      partition_name: the name given to ``nnx.PARTITION_NAME`` /
        ``nn.PARTITION_NAME``, or a tuple of names (stages and layers of a
        pipeline, say): every leading axis named by one of them counts.

    Returns:
      A tree of Python ints, one per variable, with the structure of ``tree``
      where each box is replaced by its int (so it matches the unboxed
      params, and is a prefix of the boxed ones); 0 for variables without
      partition names. Without ``tree``, a callable ``tree -> that tree``.

    Raises:
      ValueError: no variable of ``tree`` records partition names; a
        variable has ``partition_name`` at an axis after one that is not a
        stack axis (the message names its path, shape and names, and, where
        the axes before it are named, says to list their names too:
        ``partition_name=("stages", "layers")`` for stages around layers); or
        a variable records no names but looks stacked: it shares a module
        path with a stacked variable and has the same stack axes in front
        (an unannotated ``nnx.Linear`` in the same ``nnx.vmap`` block; the
        message names both).
      TypeError: ``partition_name`` is not a string or a tuple of strings,
        or ``tree`` is an NNX module (pass its ``nnx.state``).

    Example:
      >>> import flax.linen as nn
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> params = {  # boxes as nn.scan(metadata_params=...) leaves them
      ...     "kernel": nn.Partitioned(jnp.ones((3, 4, 4)), ("layers", None, "mlp")),
      ...     "bias": nn.Partitioned(jnp.zeros((3, 4)), ("layers", "mlp")),
      ...     "head": jnp.ones((4, 2)),  # not scanned, not annotated
      ... }
      >>> stack = nox.masks.stack_axes_from_partitions(params)
      >>> stack
      {'bias': 1, 'head': 0, 'kernel': 1}
      >>> nox.masks.matrices_only(nn.unbox(params), stack_axes=stack)
      {'bias': False, 'head': True, 'kernel': True}
      >>> tx = optax.chain(
      ...     optax.adamw(1e-3, mask=nox.masks.matrices_only(stack_axes=stack)),
      ...     nox.max_norm(1.0, stack_axes=stack),
      ... )
    """
    names = _partition_names(partition_name)
    if tree is None:
        return functools.partial(
            stack_axes_from_partitions, partition_name=partition_name
        )
    nnx = sys.modules.get("flax.nnx")  # (flax is not a dependency)
    if nnx is not None and isinstance(tree, nnx.Module):
        raise TypeError(
            "stack_axes_from_partitions reads a state, not a module: pass "
            "nnx.state(model, nnx.Param), whose structure is that of the "
            "params tx.update sees."
        )
    _layout.check_not_number(tree, "stack_axes")
    recorded = []
    unnamed: list[tuple[str, tuple[int, ...]]] = []
    stacked: list[tuple[str, tuple[int, ...], int]] = []

    def count(path: Any, node: Any) -> int:
        where = _layout.path_str(path)
        spec = _recorded_names(node)
        shape = _box_shape(node) if _is_box(node) else tuple(getattr(node, "shape", ()))
        if spec is None:
            unnamed.append((where, shape))
            return 0
        recorded.append(path)
        lead = 0
        while lead < len(spec) and isinstance(spec[lead], str) and spec[lead] in names:
            lead += 1
        late = [
            i
            for i, e in enumerate(spec[lead:], lead)
            if isinstance(e, str) and e in names
        ]
        if late:
            before = tuple(spec[: late[0]])
            if all(isinstance(e, str) for e in before):
                fix = (
                    f"if the axes before it, named {before}, are stack axes too "
                    f"(nested nnx.vmap/nnx.scan or nn.scan, stages around "
                    f"layers, say), name them all: partition_name="
                    f"{tuple(dict.fromkeys((*before, *sorted(names))))!r}"
                )
            else:
                fix = (
                    "stack axes come first (nnx.vmap/nnx.scan with out_axes=0, "
                    "nn.scan with variable_axes={'params': 0})"
                )
            raise ValueError(
                f"The partition name {spec[late[0]]!r} is at axis {late[0]} of the "
                f"leaf at {where or '<root>'} (shape {shape}, partition names "
                f"{spec}), after an axis that is not a stack axis: {fix}."
            )
        if lead:
            stacked.append((where, shape[:lead], lead))
        return lead

    out = jax.tree_util.tree_map_with_path(count, tree, is_leaf=_is_box)
    if not recorded:
        raise ValueError(
            "No variable of this tree records partition names, so the stack "
            "axes cannot be read from it. Flax records the layer axis "
            f"({sorted(names)}) only on annotated variables (nnx.with_partitioning"
            " or kernel_metadata for NNX, nn.with_partitioning for Linen), and "
            "keeps it on the variable boxes, not on the arrays: nnx.Optimizer "
            "passes bare arrays to tx.update, so read it once from "
            "nnx.state(model, nnx.Param) and pass the tree as stack_axes."
        )
    _check_unannotated(unnamed, stacked, names)
    return out


def _check_unannotated(
    unnamed: list[tuple[str, tuple[int, ...]]],
    stacked: list[tuple[str, tuple[int, ...], int]],
    names: frozenset[str],
) -> None:
    """Raises for a variable that records no names but looks stacked.

    It shares a module path with a stacked variable whose stack axes it also
    has in front (an unannotated ``nnx.Linear`` inside the same ``nnx.vmap``
    block): counting it as not stacked would decay its stacked bias as a
    matrix and mix its layers, with no warning.
    """
    for where, shape in unnamed:
        keys = where.split("/")
        best, best_common = None, 0
        for other, sizes, lead in stacked:
            if len(shape) < lead or shape[:lead] != sizes:
                continue
            common = 0
            for a, b in zip(keys[:-1], other.split("/")[:-1], strict=False):
                if a != b:
                    break
                common += 1
            if common > best_common:
                best, best_common = (other, sizes, lead), common
        if best is not None:
            other, sizes, lead = best
            raise ValueError(
                f"The variable at {where} (shape {shape}) records no partition "
                f"names, but it sits in the same subtree as the stacked variable "
                f"at {other} and has its {lead} stack "
                f"ax{'i' if lead == 1 else 'e'}s of size {sizes} in front: it "
                f"looks stacked, and reading it as not stacked would treat its "
                f"layers as one tensor (a stacked bias as a matrix). Annotate it "
                f"(nnx.with_partitioning, or bias_metadata/scale_metadata "
                f"{{'out_sharding': ...}} on NNX layers; nn.with_partitioning for "
                f"Linen) with {sorted(names)} first if it is stacked, or with "
                f"names that do not start with it (None, ...) if it is not; or "
                f"give stack_axes by hand."
            )
