"""Norm geometry: the steepest-descent direction of each layer under its norm.

Steepest descent under a norm moves along the linear minimisation oracle
``d(u) = argmax_{‖t‖ <= 1} <u, t>`` of the norm's unit ball. Choosing the
norm per layer gives sign descent (the max norm), Muon (the spectral norm of
each matrix) and Scion (norm-constrained LMOs per layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from norm_optax import _layout, _norms, _polar
from norm_optax._domains import FINITE_POSITIVE, declare
from norm_optax._numerics import safe_ratio
from norm_optax._transform import Leaf, leafwise
from norm_optax._types import Axis, Mask, PyTree, StackAxes, accumulation_dtype

__all__ = ["scale_by_lmo"]

NORMS = ("spectral", "frobenius", "rms", "sign", "unit", "auto")
DIMS_SCALES = (None, "muon", "spectral", "rms")


def _is_norm_value(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _check_norm_name(name: Any, where: str = "") -> None:
    if name is not None and (not isinstance(name, str) or name not in NORMS):
        at = f" for the leaf at {where}" if where else ""
        raise ValueError(
            f"norm must be one of {', '.join(map(repr, NORMS))} or None, got "
            f"{name!r}{at}."
        )


def _is_radius_value(x: Any) -> bool:
    if isinstance(x, (bool, np.bool_, str)) or x is None:
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    return isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 0


def _check_radius(value: Any, where: str = "") -> None:
    name = f"radius at {where}" if where else "radius"
    arguments: dict[str, Any] = {name: (value, FINITE_POSITIVE)}
    declare(**arguments)


def _dims_scale(kind: str | None, fan_in: int, fan_out: int) -> float:
    if kind is None:
        return 1.0
    if kind == "muon":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if kind == "spectral":
        return math.sqrt(fan_out / fan_in)
    return 0.2 * math.sqrt(max(fan_in, fan_out))  # "rms"


def _direction(name: str, x: jax.Array, leaf: Leaf, polar: _polar.Polar) -> jax.Array:
    """``d(x)`` of one leaf (per stack index) in ``x``'s (wide) dtype."""
    layer = _layout.layer_axes(leaf.shape, leaf.stack)
    if name == "spectral":
        return _polar.orthogonalize_leaf(x, leaf.stack, leaf.axes, polar)
    if name == "sign":
        return jnp.sign(x)
    if name == "unit":
        norms = _norms.axes_norm(x, 2, leaf.axes, axis_name=None).astype(x.dtype)
        return safe_ratio(x, norms, 0)
    norm = _norms.axes_norm(x, 2, layer, axis_name=None).astype(x.dtype)
    d = safe_ratio(x, norm, 0)
    if name == "rms":
        n = math.prod(leaf.shape[a] for a in layer)
        d = d * math.sqrt(n)
    return d


def scale_by_lmo(
    norm: Any = "auto",
    radius: Any = 1.0,
    *,
    dims_scale: str | None = None,
    axis: Axis = None,
    stack_axes: StackAxes = None,
    mask: Mask = None,
    method: str = "newton_schulz",
    ns_steps: int = 5,
    ns_coeffs: Any = "standard",
) -> optax.GradientTransformationExtraArgs:
    r"""Steepest descent under a per-layer norm: ``u ← radius · k · d(u)``.

    Per selected leaf and per stack index (each layer of a stacked model on
    its own), the update ``u`` is replaced by ``radius · k · d(u)``, where
    :math:`d(u) = \operatorname{argmax}_{\|t\| \le 1} \langle u, t\rangle`
    is the linear minimisation oracle of the layer's norm (up to sign):

    =============  ================================  ==========================
    ``norm``       unit ball of one layer            ``d(u)``
    =============  ================================  ==========================
    ``spectral``   largest singular value ``<= 1``   polar factor ``U Vᵀ``
                                                     (:func:`orthogonalize`)
    ``frobenius``  ``‖t‖_2 <= 1``                    ``u / ‖u‖_2``
    ``rms``        ``‖t‖_2 / sqrt(n) <= 1``          ``sqrt(n) · u / ‖u‖_2``
    ``sign``       ``max |t_i| <= 1``                ``sign(u)``
    ``unit``       every unit's ``‖t_unit‖_2 <= 1``  each unit over its norm
    ``auto``       ``spectral`` on matrices,
                   ``rms`` on the other leaves
    =============  ================================  ==========================

    ``n`` is the number of elements of the layer; units follow the axis
    convention (the last axis for ``axis=None``). A leaf with at least two
    non-stack axes is a *matrix* ``(fan_in, fan_out)`` (``fan_out`` its
    units, ``fan_in`` the product of the other non-stack axes), as in
    :func:`orthogonalize`; a bias stored with size-1 broadcast axes
    (Equinox's conv bias ``(out, 1, 1)``: a leaf named ``bias`` whose axes
    after the first all have size 1) is the vector it broadcasts, as its
    Flax twin ``(out,)`` is.

    ``k`` (``dims_scale``) multiplies the direction of every norm on matrix
    leaves and is 1 on the others: ``None`` gives 1; ``"muon"`` gives
    ``sqrt(max(1, fan_out / fan_in))`` (optax's Muon shape scale);
    ``"spectral"`` gives ``sqrt(fan_out / fan_in)`` (the RMS-to-RMS operator
    norm of Scion's ``Spectral`` and modula's ``Linear``); ``"rms"`` gives
    ``0.2 · sqrt(max(fan_in, fan_out))`` (the update RMS of AdamW, optax's
    ``consistent_rms=0.2``, Moonlight).

    Sharded (GSPMD), the numbers are the unsharded ones and every leaf keeps
    its sharding; the spectral directions are computed on whole matrices
    without collectives inside the Newton--Schulz iterations (see
    :func:`orthogonalize`).

    Place it where a normalisation goes: after momentum, before the learning
    rate, e.g. ``optax.chain(optax.trace(0.95, nesterov=True),
    nox.scale_by_lmo("spectral"), optax.scale_by_learning_rate(lr))`` is Muon
    on the selected leaves.

    A zero layer (a zero unit for ``"unit"``) gives zeros, never NaN (so does
    a layer whose sum of squares underflows, entries below about ``1e-19`` in
    float32). A NaN or
    an infinity anywhere in a layer makes that whole layer's output NaN, for
    every norm, ``"sign"`` and ``"unit"`` included; the other layers are
    untouched. ``"frobenius"``, ``"rms"``, ``"unit"`` and Newton--Schulz
    ``"spectral"`` are differentiable (meta-gradients are finite, also at zero
    updates). The state is :class:`optax.EmptyState`; ``update`` accepts
    extra keyword arguments and ignores them. Each leaf keeps its dtype and
    shape; the direction is computed in ``float32`` (``float64`` for
    ``float64`` leaves) and cast back once.

    Args:
      norm: one of ``"spectral"``, ``"frobenius"``, ``"rms"``, ``"sign"``,
        ``"unit"``, ``"auto"``; a pytree of them (or ``None``: the leaf
        passes through) matching the updates; or a callable ``updates ->
        that pytree``.
      radius: the radius of each layer's ball, finite and ``> 0``: a number,
        a pytree of numbers matching the updates, or a callable ``updates ->
        number or pytree``. A traced value outside the domain gives NaN.
      dims_scale: ``None``, ``"muon"``, ``"spectral"`` or ``"rms"`` (above).
      axis: the unit convention (``None``, ``"out_first"``, an int or ints),
        per leaf, a tree or a callable; it decides ``fan_in`` and ``fan_out``.
      stack_axes: how many leading axes of each leaf index stacked layers: an
        int, a tree of ints (or bools) or a callable.
      mask: a tree of bools (or a callable returning one); masked-out leaves
        pass through.
      method: ``"newton_schulz"`` or ``"svd"``, for ``"spectral"``.
      ns_steps: Newton--Schulz iterations, an int ``>= 1``.
      ns_coeffs: ``"standard"``, ``"polar_express"``, ``(a, b, c)`` or a
        sequence of them.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: at construction, an unknown ``norm`` name, ``dims_scale``,
        ``method`` or ``ns_coeffs``; a concrete ``radius`` that is ``0``,
        negative, NaN or infinite; a concrete ``ns_steps`` below 1 or not an
        integer. At update, ``"spectral"`` on a leaf with fewer than two
        non-stack axes (naming its path and shape), a tree that does not
        match the updates.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.scale_by_lmo(radius=2.0)  # "auto": spectral / rms
      >>> u = {"w": jnp.array([[3.0, 0.0], [0.0, 0.5]]), "b": jnp.array([3.0, 4.0])}
      >>> out, _ = tx.update(u, tx.init(u))
      >>> out["b"]  # rms: 2 * sqrt(2) * u / ||u||
      Array([1.6970563, 2.2627418], dtype=float32)
      >>> sign = nox.scale_by_lmo("sign")
      >>> sign.update({"b": jnp.array([-0.1, 3.0])}, sign.init(None))[0]
      {'b': Array([-1.,  1.], dtype=float32)}

    References:
      Jordan et al., "Muon: an optimizer for hidden layers in neural
      networks", 2024 (blog post). Bernstein & Newhouse, "Old optimizer, new
      norm: an anthology", 2024. Pethick et al., "Training deep learning
      models with norm-constrained LMOs", 2025. Amsel et al., "The Polar
      Express", 2025 (``ns_coeffs="polar_express"``).
    """
    if _is_norm_value(norm):
        _check_norm_name(norm)
    if dims_scale not in DIMS_SCALES:
        raise ValueError(
            f"dims_scale must be None, 'muon', 'spectral' or 'rms', got {dims_scale!r}."
        )
    _layout.check_specs(mask=mask, axis=axis, stack_axes=stack_axes)
    polar = _polar.polar_options(method, ns_steps, ns_coeffs)
    one_radius = _is_radius_value(radius)
    if one_radius:
        hypers = declare(radius=(radius, FINITE_POSITIVE))
    else:
        hypers = declare()
        if not callable(radius) or _is_tree_of_radii(radius):
            for path, value in _radius_leaves(radius):
                _check_radius(value, path)

    def per_leaf(
        spec: Any, updates: PyTree, is_value: Callable[[Any], bool], name: str
    ) -> dict[str, Any]:
        values = _layout.resolve_spec(
            spec, updates, updates, name=name, is_value=is_value
        )
        flat = jax.tree_util.tree_flatten_with_path(updates)[0]
        out: dict[str, Any] = {}
        for (path, _), value in zip(flat, values, strict=True):
            key = _layout.path_str(path)
            if key in out and out[key] is not value:
                raise ValueError(
                    f"{name}: two leaves share the path {key!r}; give one value."
                )
            out[key] = value
        return out

    def update_fn(
        updates: optax.Updates,
        state: optax.EmptyState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del extra_args
        norms = per_leaf(norm, updates, _is_norm_value, "norm")
        for where, name in norms.items():
            _check_norm_name(name, where)
        if one_radius:
            radii = None
        else:
            spec = radius
            if callable(spec) and not _is_tree_of_radii(spec):
                spec = spec(updates)
                if _is_radius_value(spec):
                    _check_radius(spec)
                else:
                    for path, value in _radius_leaves(spec):
                        _check_radius(value, path)
            radii = per_leaf(spec, updates, _is_radius_value, "radius")

        def fn(u: jax.Array, p: Any, leaf: Leaf, values: dict[str, Any]) -> jax.Array:
            del p
            name = norms[leaf.path]
            if name is None:
                return u
            matrix = _layout.is_matrix(leaf.path, leaf.shape, leaf.stack)
            if name == "auto":
                name = "spectral" if matrix else "rms"
            if name == "spectral" and not matrix:
                bias = _layout.is_broadcast_bias(leaf.path, leaf.shape, leaf.stack)
                raise ValueError(
                    _polar.matrix_error(
                        leaf.path, leaf.shape, leaf.stack, "norm='spectral'", bias
                    )
                )
            x = u.astype(_wide(u.dtype))
            d = _direction(name, x, leaf, polar)
            if name != "spectral":  # (the polar factor is NaN per matrix already)
                layer = _layout.layer_axes(leaf.shape, leaf.stack)
                finite = jnp.all(jnp.isfinite(x), axis=layer, keepdims=True)
                d = jnp.where(finite, d, jnp.nan)
            scale = 1.0
            if matrix:
                fan_in, fan_out = _polar.fans(leaf.shape, leaf.stack, leaf.axes)
                scale = _dims_scale(dims_scale, fan_in, fan_out)
            r = values["radius"] if radii is None else radii[leaf.path]
            r_wide = jnp.asarray(r).astype(jnp.finfo(x.dtype).dtype)
            if radii is not None and isinstance(r, jax.core.Tracer):
                r_wide = jnp.where(FINITE_POSITIVE.holds(r_wide, jnp), r_wide, jnp.nan)
            return (d * (r_wide * scale).astype(x.dtype)).astype(u.dtype)

        inner = leafwise(
            "scale_by_lmo",
            fn,
            hypers,
            needs_params=False,
            mask=mask,
            axis=axis,
            stack_axes=stack_axes,
        )
        return inner.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def _wide(dtype: Any) -> Any:
    """The compute dtype of a leaf: float32 or wider, complex kept complex."""
    acc = accumulation_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return np.result_type(acc, np.complex64)
    return acc


def _is_tree_of_radii(tree: Any) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=_is_radius_value)
    return all(_is_radius_value(leaf) for leaf in leaves)


def _radius_leaves(tree: Any) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_radius_value)[0]
    out = []
    for path, value in flat:
        if not _is_radius_value(value):
            raise TypeError(
                f"radius must be a number, a tree of numbers or a callable "
                f"returning one, got {value!r} at {_layout.path_str(path) or '<root>'}."
            )
        out.append((_layout.path_str(path), value))
    return out
