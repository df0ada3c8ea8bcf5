"""Norm primitives over pytrees: the foundation every transform is built on.

Three functions, all pure and ``jit``/``vmap``/``grad`` compatible:

* :func:`global_norm` -- the norm of all leaves of a tree taken as one vector;
* :func:`leaf_norms` -- one norm per leaf, same tree structure;
* :func:`unit_norms` -- the norm of each *unit* of one array (keepdims).

Numerics, shared by all three:

* **Leaves that take part** are inexact arrays (real or complex floats, and
  Python floats). ``None``, :class:`optax.MaskedNode` and integer, bool or
  ``float0`` leaves are skipped. An empty tree has norm ``0``.
* **Accumulation** happens in ``float32`` or wider: ``float16``/``bfloat16``
  leaves are converted inside the reduction (XLA fuses the conversion, no
  widened copy of the leaf is written), so fp16 values up to 65504 give a
  finite norm and tiny values do not underflow. ``bfloat16`` has the
  exponent range of ``float32``, where squares underflow below about
  ``1e-19`` and overflow above about ``1.8e19``: the L2 norm is one pass in
  ``float32``, and only when that sum of squares is below ``2**-60`` (zero
  included) or infinite, a second pass with every element scaled by an exact
  power of two, chosen with :func:`jax.lax.cond` (a branch, also under
  ``vmap``). So ``bfloat16`` values from the smallest normal (``1.2e-38``)
  to the largest give their norm to float32 accuracy (infinite only if the
  norm itself exceeds ``float32``'s range). The result is ``float32``, or
  ``float64`` when a leaf is ``float64``/``complex128``. Complex values use
  their modulus. For ``float32`` and ``float64`` leaves the L2 norm is
  accurate while the sum of squares fits their own range (a norm from about
  ``1e-19`` to ``1.8e19`` in ``float32``).
* **Gradients** are finite everywhere (a ``jax.custom_jvp``): at the zero
  vector the gradient is ``0``, a valid subgradient; for ``ord=inf`` the
  gradient is shared equally among the entries that attain the maximum.

``ord`` is ``1``, ``2`` or ``inf`` (``jnp.inf``, ``math.inf`` or the string
``"inf"``). It may also be a traced scalar (for instance when a transform is
wrapped in :func:`optax.inject_hyperparams`, which turns every numeric
argument into an array): then the norm is selected with ``lax.switch`` at run
time, and a traced value that is not 1, 2 or +inf gives a NaN norm.
"""

from __future__ import annotations

from typing import Any

import jax

from norm_optax import _layout, _norms, _polar, _types

__all__ = ["global_norm", "leaf_norms", "orthogonalize", "unit_norms"]


def _inexact_leaves(tree: _types.PyTree) -> list[jax.Array]:
    return [_types.as_array(x) for x in jax.tree.leaves(tree) if _types.is_inexact(x)]


def global_norm(
    tree: _types.PyTree, ord: _types.Ord = 2, *, axis_name: Any = None
) -> jax.Array:
    r"""The ``ord``-norm of all inexact leaves of ``tree`` taken as one vector.

    .. math::
      \|g\|_2 = \sqrt{\textstyle\sum_\ell \sum_i |g_{\ell,i}|^2},\quad
      \|g\|_1 = \textstyle\sum_\ell \sum_i |g_{\ell,i}|,\quad
      \|g\|_\infty = \max_{\ell,i} |g_{\ell,i}|.

    Under ``jax.jit`` with sharded leaves (GSPMD) on a mesh with ``Explicit``
    axes (the default of ``jax.make_mesh``), the per-leaf partial sums are
    combined with a single all-reduce of one scalar, however the leaves are
    sharded or replicated, and no leaf is gathered. With ``Auto`` axes the
    shardings are unknown when the norm is traced, and XLA reduces each leaf
    over its own mesh axes: one all-reduce per distinct set of axes (one on a
    1-D FSDP mesh).

    **Inside** ``jax.shard_map``, where each device holds a slice of the
    tree, pass ``axis_name`` (a manual axis name or a tuple of names): the
    partial norms are combined across it with one all-reduce, and every
    device gets the norm of the whole tree. A leaf that is replicated over a
    named axis (``in_specs`` ``P()`` for it, or computed from replicated
    values) counts once, not once per device: JAX types every value inside
    ``shard_map`` with the manual axes it varies over (``jax.typeof(x).vma``),
    so a tensor-parallel tree mixing sharded and replicated leaves gets its
    true norm. This record is kept only with ``check_vma=True`` (the
    default). Under ``jax.pmap``, ``jax.shard_map(..., check_vma=False)`` and
    for a ``jax.vmap`` axis it is not, a replicated leaf cannot be told from
    a split one, and ``axis_name`` raises :class:`ValueError` instead of
    returning a norm that may count a leaf several times. A leaf that is
    *unreduced* over a named axis (a pending sum) also raises.

    Args:
      tree: a pytree of arrays. Integer, bool, ``float0``, ``None`` and
        :class:`optax.MaskedNode` leaves are skipped.
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).
      axis_name: manual axis name(s) of the enclosing ``jax.shard_map`` to
        combine the norm across, or ``None``.

    Returns:
      A scalar of dtype ``float32`` (``float64`` if a leaf is 64-bit).
      ``0`` for a tree without inexact leaves.

    Raises:
      ValueError: ``ord`` is unknown; or ``axis_name`` names an axis whose
        varying values JAX does not record (``jax.pmap``,
        ``shard_map(check_vma=False)``, ``jax.vmap``), or over which a leaf
        is unreduced.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> tree = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0]), "step": 7}
      >>> float(nox.global_norm(tree))
      5.0
      >>> float(nox.global_norm(tree, ord=1)), float(nox.global_norm(tree, "inf"))
      (7.0, 4.0)
    """
    ord = _norms.canonical_ord(ord, name="ord")
    return _norms.tree_norm(_inexact_leaves(tree), ord, axis_name=axis_name)


def leaf_norms(
    tree: _types.PyTree, ord: _types.Ord = 2, *, stack_axes: _types.StackAxes = None
) -> _types.PyTree:
    """The ``ord``-norm of each leaf of ``tree``, as a tree of norms.

    Inexact leaves map to a scalar of their accumulation dtype (``float32`` or
    wider). ``None`` and :class:`optax.MaskedNode` stay as they are; integer,
    bool and ``float0`` leaves, which have no norm, become ``None``.

    **Stacked layers.** With ``stack_axes`` (see :doc:`Layouts </layouts>`) the first
    ``s`` axes of a leaf index independent layers (``nnx.vmap``/``nnx.scan``,
    Linen ``nn.scan``, a ``lax.scan`` over a leading ``layers`` axis), and the
    leaf gets one norm per layer: a ``(L, in, out)`` kernel with ``s = 1``
    gives shape ``(L,)``, the per-layer gradient norms to log.

    Args:
      tree: a pytree of arrays.
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).
      stack_axes: ``None`` or an int ``>= 0`` for every leaf, a tree of ints
        (or bools, ``True`` = 1) matching ``tree``, or a callable
        ``tree -> that tree`` such as ``nox.masks.by_path("layers/")``.

    Returns:
      A pytree with the structure of ``tree`` holding, per inexact leaf, an
      array of shape ``leaf.shape[:s]`` (a scalar without stack axes).

    Raises:
      ValueError: ``ord`` is unknown, or ``s`` is larger than a leaf's ndim
        (the message names the leaf's path and shape).

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> nox.leaf_norms({"w": jnp.array([3.0, 4.0]), "b": jnp.array([-2.0])})
      {'b': Array(2., dtype=float32), 'w': Array(5., dtype=float32)}
      >>> stacked = jnp.array([[[3.0], [4.0]], [[0.0], [1.0]]])  # (layers=2, 2, 1)
      >>> nox.leaf_norms({"kernel": stacked}, stack_axes=1)
      {'kernel': Array([5., 1.], dtype=float32)}
    """
    ord = _norms.canonical_ord(ord, name="ord")
    stacks = _layout.resolve_spec(
        stack_axes, tree, tree, name="stack_axes", is_value=_layout.is_stack_value
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)

    def norm(path: Any, leaf: Any, s: Any) -> jax.Array | None:
        if not _types.is_inexact(leaf):
            return None
        x = _types.as_array(leaf)
        count = _layout.stack_count(s, _layout.path_str(path), x.shape)
        if count == 0:
            return _norms.tree_norm([x], ord, axis_name=None)
        axes = _layout.layer_axes(x.shape, count)
        return _norms.axes_norm(x, ord, axes, axis_name=None).reshape(x.shape[:count])

    out = [norm(path, leaf, s) for (path, leaf), s in zip(flat, stacks, strict=True)]
    return jax.tree.unflatten(treedef, out)


def unit_norms(
    x: jax.Array,
    axis: _types.LeafAxis = None,
    ord: _types.Ord = 2,
    *,
    stack_axes: int | bool | None = None,
) -> jax.Array:
    """The ``ord``-norm of each *unit* of ``x``, with the reduced axes kept.

    ``axis`` names the axes reduced over:

    * ``None`` -- the Flax kernel convention: every axis but the last when
      ``x`` has at least two (non-stack) axes (a Dense kernel ``(in, out)``
      has one unit per output feature, a Conv kernel ``(H, W, I, O)`` one
      per output channel), the whole array otherwise;
    * ``"out_first"`` -- the PyTorch/Equinox convention, weights stored
      ``(out, in, *kernel)``: every axis but the first (non-stack) one;
    * an int or a tuple of ints -- those axes of ``x``.

    With ``stack_axes=s`` the first ``s`` axes index stacked layers and are
    never reduced: a stacked kernel ``(L, in, out)`` with ``s = 1`` reduces
    over ``in`` only (result ``(L, 1, out)``), one set of units per layer.

    **Biases.** A bias has no fan-in. Equinox stores a convolution's bias
    with size-1 broadcast axes, ``(out, 1, 1)``, where Flax stores
    ``(out,)``. The per-unit transforms (``max_norm``, ``unit_norm``,
    ``prox_group_l1``, ...) and ``masks.matrices_only`` see each leaf's key
    path, and read a leaf named ``bias`` whose axes after the first all have
    size 1 as that vector: one unit under ``None`` and ``"out_first"``,
    never a matrix, exactly as its Flax twin. This function sees a bare
    array, without its name, so size-1 axes are real axes here:
    ``"out_first"`` on ``(out, 1)`` gives ``out`` units of one element each
    (right for the weight of an Equinox ``Linear("scalar", out)``, whose Flax
    twin is the kernel ``(1, out)``); for a broadcast bias pass
    ``axis=tuple(range(x.ndim))``.

    Args:
      x: an inexact array.
      axis: ``None``, ``"out_first"``, an int or a tuple of ints (see above).
      ord: ``1``, ``2`` or ``inf`` (``"inf"``).
      stack_axes: how many leading axes index stacked layers (``None`` = 0).

    Returns:
      An array of ``x.ndim`` dimensions, broadcastable to ``x``, of dtype
      ``float32`` or wider.

    Raises:
      ValueError: an axis is out of range or names a stack axis, or
        ``stack_axes`` is larger than ``x.ndim`` (the message names the
        shape).
      TypeError: ``x`` is not an inexact array.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> kernel = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (in=2, out=2)
      >>> nox.unit_norms(kernel)
      Array([[5., 1.]], dtype=float32)
      >>> nox.unit_norms(kernel.T, axis="out_first")  # PyTorch layout (out, in)
      Array([[5.],
             [1.]], dtype=float32)
    """
    ord = _norms.canonical_ord(ord, name="ord")
    x = _types.as_array(x)
    if not _types.is_inexact(x):
        raise TypeError(f"unit_norms needs an inexact array, got dtype {x.dtype}.")
    _layout.check_axis(axis)
    stack = _layout.stack_count(stack_axes, "", x.shape)
    axes = _layout.unit_axes(axis, "", x.shape, stack)
    return _norms.axes_norm(x, ord, axes, axis_name=None)


def orthogonalize(
    tree: _types.PyTree,
    *,
    method: str = "newton_schulz",
    ns_steps: int = 5,
    ns_coeffs: Any = "standard",
    axis: _types.Axis = None,
    stack_axes: _types.StackAxes = None,
) -> _types.PyTree:
    r"""The polar factor of each layer's matrix: Muon's orthogonalisation.

    Each inexact leaf is replaced, per stack index, by the polar factor
    :math:`U V^\top` of its matrix :math:`M = U \Sigma V^\top`: the
    closest semi-orthogonal matrix, and the steepest-descent direction of
    :math:`M` under the spectral norm (Bernstein & Newhouse 2024).

    **The matrix of a leaf.** The first ``s`` axes (``stack_axes``) index
    stacked layers; on the others the leaf is read as the matrix
    ``(fan_in, fan_out)``: ``fan_out`` is its units (the last axis for
    ``axis=None``, the Flax convention; the first non-stack axis for
    ``"out_first"``, the PyTorch/Equinox convention; the axes not named by an
    explicit ``axis``) and ``fan_in`` the product of the other axes. A Conv
    kernel ``(H, W, I, O)`` is the matrix ``(H·W·I, O)``, a stacked kernel
    ``(L, in, out)`` with ``stack_axes=1`` is ``L`` matrices, never one. The
    result is put back in the leaf's shape and dtype.

    **Methods.**

    * ``"svd"``: the exact polar factor from the thin SVD; singular values at
      or below ``max(fan_in, fan_out) · eps · sigma_max`` count as zero (their
      directions get 0). The kept singular values of the result are 1 to
      within ``1e-5`` in float32.
    * ``"newton_schulz"``: :math:`X \leftarrow M / (\|M\|_F (1 + s) +
      10^{-7})`, transposed so that it has no more rows than columns, then
      ``ns_steps`` iterations :math:`A = X X^\top,\ X \leftarrow a X +
      (b A + c A^2) X`. ``ns_coeffs="standard"`` is Muon's quintic
      ``(3.4445, -4.7750, 2.0315)`` at every step with ``s = 0`` (the
      default of optax and PyTorch; on Gaussian matrices, the directions
      whose singular value is at least 5% of the largest come out with
      singular values in ``[0.68, 1.21]`` after 5 steps);
      ``"polar_express"`` is the five-step table of Polar Express (Amsel et
      al. 2025, as in modded-nanogpt) with safety ``s = 0.02`` (step ``i``
      uses entry ``min(i, 4)``; singular values in ``[0.85, 1.15]`` after 5
      steps); a tuple ``(a, b, c)`` is used at every step, a sequence of
      them at step ``i`` entry ``min(i, len - 1)``, both with ``s = 0``.

    Both compute in ``float32`` (``float64`` for ``float64`` leaves) and cast
    back once. A matrix holding a NaN or an infinity gives all NaN (that
    matrix only); a zero matrix gives zeros. Newton--Schulz is a polynomial,
    so it is differentiable (with a finite gradient at zero).

    **Sharded** (GSPMD: ``jax.jit`` over leaves with a ``NamedSharding``,
    ``Auto`` or ``Explicit`` mesh axes) the numbers are those of the
    unsharded computation and each result keeps its leaf's sharding. Every
    matrix is made whole on one device before the iterations, so none of
    them communicates: a stacked leaf sharded along its stack axis needs no
    collective; a stacked leaf with one matrix axis sharded over mesh axes
    whose size divides the (local) number of layers is moved onto the stack
    axis and back with two all-to-alls; otherwise each sharded matrix axis is
    gathered once.

    This is a primitive, not a transform: the per-layer steepest-descent
    transform built on it is :func:`norm_optax.scale_by_lmo` (its
    ``"spectral"`` norm), placed after momentum and before the learning rate.

    Args:
      tree: a pytree of arrays. ``None`` and non-inexact leaves pass through.
      method: ``"newton_schulz"`` or ``"svd"``.
      ns_steps: the number of Newton--Schulz iterations, an int ``>= 1``. It
        may be a traced integer (under :func:`optax.inject_hyperparams`); its
        value is then the caller's responsibility.
      ns_coeffs: ``"standard"``, ``"polar_express"``, ``(a, b, c)`` or a
        sequence of such tuples.
      axis: the unit convention, per leaf, a tree or a callable (``None``,
        ``"out_first"``, an int or ints: the axes reduced over, i.e. the
        fan-in axes).
      stack_axes: ``None`` or an int ``>= 0`` for every leaf, a tree of ints
        (or bools) matching ``tree``, or a callable ``tree -> that tree``.

    Returns:
      A pytree of the structure of ``tree``: each inexact leaf replaced by
      the polar factor of its matrices, in its shape and dtype.

    Raises:
      ValueError: an inexact leaf with fewer than two non-stack axes (the
        message names its path and shape); an unknown ``method`` or
        ``ns_coeffs``; a concrete ``ns_steps`` below 1 or not an integer;
        an ``axis`` or ``stack_axes`` that does not fit a leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> import norm_optax as nox
      >>> m = jnp.array([[3.0, 0.0], [0.0, 0.5]])
      >>> nox.orthogonalize(m, method="svd")
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
      >>> stacked = jnp.stack([m, -2.0 * m])  # (layers=2, in=2, out=2)
      >>> nox.orthogonalize({"kernel": stacked}, stack_axes=1)["kernel"].shape
      (2, 2, 2)

    References:
      Jordan et al., "Muon: an optimizer for hidden layers in neural
      networks", 2024 (blog post, https://kellerjordan.github.io/posts/muon/).
      Bernstein & Newhouse, "Old optimizer, new norm: an anthology", 2024.
      Pethick et al., "Training deep learning models with norm-constrained
      LMOs", 2025. Amsel et al., "The Polar Express: optimal matrix sign
      methods and their application to the Muon algorithm", 2025.
    """
    options = _polar.polar_options(method, ns_steps, ns_coeffs)
    _layout.check_axis(axis)
    stacks = _layout.resolve_spec(
        stack_axes, tree, tree, name="stack_axes", is_value=_layout.is_stack_value
    )
    axis_values = _layout.resolve_spec(
        axis, tree, tree, name="axis", is_value=_layout.is_axis_value
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for (path, leaf), s, a in zip(flat, stacks, axis_values, strict=True):
        if not _types.is_inexact(leaf):
            out.append(leaf)
            continue
        x = _types.as_array(leaf)
        where = _layout.path_str(path)
        count = _layout.stack_count(s, where, x.shape)
        if not _layout.is_matrix(where, x.shape, count):
            bias = _layout.is_broadcast_bias(where, x.shape, count)
            raise ValueError(
                _polar.matrix_error(where, x.shape, count, "orthogonalize", bias)
            )
        axes = _layout.unit_axes(a, where, x.shape, count)
        out.append(_polar.orthogonalize_leaf(x, count, axes, options))
    return jax.tree.unflatten(treedef, out)
