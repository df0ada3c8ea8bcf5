"""Mask selectors: which parameters a transform applies to.

Every transform that reads ``params`` takes ``mask``: a tree of bools with the
structure of the params (or a prefix of it), or a callable ``params -> tree``.
The selectors here build that tree from a params tree of any kind: nested
dicts, Flax Linen ``FrozenDict``, or the Flax NNX ``State`` that
``nnx.Optimizer`` passes to ``tx.update`` (the mask then has exactly that
structure). The bools are Python bools, so the masks also work with
:func:`optax.masked`.

* :func:`matrices_only` -- leaves with ``ndim >= 2`` (kernels, embeddings),
  the usual "no decay on biases and norm scales";
* :func:`by_path` / :func:`exclude_path` -- a regular expression searched in
  the ``/``-joined key path, such as ``encoder/layers/0/kernel``;
* :func:`all_of` -- the logical *and* of several masks.

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
from collections.abc import Callable
from typing import Any

import jax

from norm_optax import _layout
from norm_optax._types import Mask, PyTree, StackAxes

__all__ = ["all_of", "by_path", "exclude_path", "matrices_only"]

MaskFn = Callable[[Any], Any]


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))


def _per_leaf(params: PyTree, values: list[Any]) -> PyTree:
    """A tree with the structure of ``params`` holding one value per leaf."""
    return jax.tree.unflatten(jax.tree.structure(params), values)


def matrices_only(params: PyTree = None, *, stack_axes: StackAxes = None) -> Any:
    """Marks the leaves with ``ndim >= 2`` (weight matrices, conv kernels).

    Biases, norm scales and scalars get ``False``. ``None`` leaves stay
    ``None``; non-array leaves (Python numbers) get ``False``.

    **Stacked layers.** With ``stack_axes`` (API.md section 6) the first
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
      ValueError: ``stack_axes`` is larger than a leaf's ndim (naming the
        leaf's path and shape).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> nox.masks.matrices_only({"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)})
      {'bias': False, 'kernel': True}
      >>> stacked = {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((4, 3))}
      >>> nox.masks.matrices_only(stacked, stack_axes=1)
      {'bias': False, 'kernel': True}
    """
    if params is None:
        return functools.partial(matrices_only, stack_axes=stack_axes)
    stacks = _layout.resolve_spec(
        stack_axes, params, params, name="stack_axes", is_value=_layout.is_stack_value
    )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = [
        _ndim(leaf)
        - _layout.stack_count(
            s, _layout.path_str(path), tuple(getattr(leaf, "shape", ()))
        )
        >= 2
        for (path, leaf), s in zip(flat, stacks, strict=True)
    ]
    return _per_leaf(params, out)


def _path_mask(pattern: str | re.Pattern[str], keep: bool) -> MaskFn:
    regex = re.compile(pattern)

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: (regex.search(_layout.path_str(path)) is not None) == keep,
            params,
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
      A callable ``params -> tree of bools``, to pass as ``mask``.

    Raises:
      re.error: ``pattern`` is not a valid regular expression.

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
        per_mask = [
            _layout.resolve_spec(
                m, params, params, name="mask", is_value=_layout.is_mask_value
            )
            for m in masks
        ]
        n = len(jax.tree.leaves(params))
        return _per_leaf(params, [all(bool(v[i]) for v in per_mask) for i in range(n)])

    return mask
