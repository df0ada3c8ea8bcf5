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

import re
from collections.abc import Callable
from typing import Any

import jax

from norm_optax import _common

__all__ = ["all_of", "by_path", "exclude_path", "matrices_only"]

MaskFn = Callable[[Any], Any]


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))


def matrices_only(params: Any) -> Any:
    """Marks the leaves with ``ndim >= 2`` (weight matrices, conv kernels).

    Biases, norm scales and scalars get ``False``. ``None`` leaves stay
    ``None``; non-array leaves (Python numbers) get ``False``.

    Args:
      params: a pytree of arrays (dict, ``FrozenDict``, ``nnx.State``, ...).

    Returns:
      A tree of Python bools with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> nox.masks.matrices_only({"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)})
      {'bias': False, 'kernel': True}
    """
    return jax.tree.map(lambda leaf: _ndim(leaf) >= 2, params)


def _path_mask(pattern: str | re.Pattern[str], keep: bool) -> MaskFn:
    regex = re.compile(pattern)

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: (regex.search(_common.path_str(path)) is not None) == keep,
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


def all_of(*masks: Any) -> MaskFn:
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

    def mask(params: Any) -> Any:
        trees = [_common.resolve_mask(m, params, params) for m in masks]
        if not trees:
            return jax.tree.map(lambda _: True, params)
        return jax.tree.map(lambda *bools: all(bools), *trees)

    return mask
