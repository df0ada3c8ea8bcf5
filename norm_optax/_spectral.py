r"""Spectral norm clipping: place it *last* in ``optax.chain``, after the learning rate.

:func:`clip_spectral_norm` rescales each weight matrix of ``p + u`` so that
its largest singular value, estimated by warm-started power iteration, is
at most ``max_value``. It is a ``"leaf"`` target of the projection builder
(``_transform``): the builder owns params, masks, ``axis`` and
``stack_axes``, widening, the landing in the parameter's dtype and the
per-leaf state; this module holds the power iteration.

How the products are written, so that layouts and shardings survive:

* the leaf is never transposed or reshaped. Its axes are given einsum
  letters: stack axes (batch), row axes (the axes a unit reduces over) and
  column axes (the units); :math:`Wv` and :math:`W^H u` are one ``einsum``
  each over the leaf as it lies, in ``float32`` or wider at
  ``Precision.HIGHEST``. Under GSPMD a contraction over a sharded axis is a
  local product plus one all-reduce of the (vector) result; nothing is
  gathered;
* on a mesh with ``Explicit`` axes (:func:`jax.make_mesh`'s default) the
  shardings are part of the types, and a contraction of two
  operands sharded on the contracted axis needs its output sharding spelled
  out: each product is given the leaf's own spec on the axes it keeps, and
  its vector is first resharded to the leaf's spec (a local slice);
* the loop is a ``fori_loop`` whose count may be traced (a while loop), run
  on ``stop_gradient(x)``; the last step runs on ``x`` outside the loop, so
  :math:`\hat\sigma` has spectral normalisation's gradient
  :math:`\hat u v^H`;
* the state keeps one vector per matrix, ``float32`` (``complex64`` for
  complex leaves); it is flattened over the units, so it reads
  ``(*stack, units)`` whatever the layout.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from norm_optax import _layout, _norms
from norm_optax._domains import NONNEGATIVE, POSITIVE_COUNT, declare
from norm_optax._layout import check_axis
from norm_optax._numerics import clip_scale, inner_bound, real_dtype
from norm_optax._transform import Leaf, Target, projection
from norm_optax._types import Axis, Mask, Scalar, StackAxes

__all__ = ["ClipSpectralNormState", "clip_spectral_norm"]

Values = dict[str, Any]

INIT_ITERS = 256
"""Power iterations that ``init`` runs on the params (once, from a fixed
pseudo-random start), so that the first updates start from good vectors."""

_HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class ClipSpectralNormState(NamedTuple):
    """State of :func:`clip_spectral_norm`: one power-iteration vector per matrix.

    Each field is a tree with the structure of the params, holding ``None``
    at the leaves the transform leaves alone (masked out, not inexact, or
    with fewer than two non-stack axes). Below, ``stack`` is the shape of a
    leaf's stack axes and its matrices are ``(fan_in, units)``. The fields
    are small (one vector per matrix), for logging with
    ``optax.tree.get(state, "sigma")``.
    """

    vectors: Any
    """``(*stack, units)`` float32 (complex64 for complex leaves): the unit
    estimate of each matrix's top right singular vector, the units in the
    row-major order of the leaf's non-reduced axes; the warm start of the
    next update."""
    sigma: Any
    """``(*stack,)`` float32: the estimate of each matrix's largest singular
    value for ``p + u`` of the last update, before the rescaling (the params
    at ``init``); the number to log. NaN where ``p + u`` was not finite."""


# ---------------------------------------------------------------------------
# A leaf read as matrices, and power iteration on them.
# ---------------------------------------------------------------------------


class _Matrices(NamedTuple):
    """One leaf as matrices: einsum subscripts and, on an Explicit mesh, specs.

    ``specs`` holds the leaf's partition spec entry of every stack, row and
    column axis when its mesh has ``Explicit`` axes (``None`` otherwise):
    each product is then told its output sharding (the leaf's own, on the
    axes it keeps), and its vector is resharded to the leaf's spec first, a
    local slice or nothing, so a contraction over a sharded axis is a local
    product plus one all-reduce of the result.
    """

    full: str
    stack: str
    rows: str
    cols: str
    stack_shape: tuple[int, ...]
    cols_shape: tuple[int, ...]
    specs: tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]] | None
    mesh: Any  # the leaf's (abstract) mesh when ``specs`` is given

    @property
    def row_axes(self) -> tuple[int, ...]:
        """The row axes of ``W v`` (shape ``(*stack, *rows)``)."""
        return tuple(range(len(self.stack), len(self.stack) + len(self.rows)))

    @property
    def col_axes(self) -> tuple[int, ...]:
        """The column axes of ``W^H u`` (shape ``(*stack, *cols)``)."""
        return tuple(range(len(self.stack), len(self.stack) + len(self.cols)))

    def sharding(self, *entries: Any) -> NamedSharding | None:
        """``NamedSharding(mesh, P(*entries))`` on an Explicit mesh, else ``None``."""
        if self.specs is None:
            return None
        return NamedSharding(self.mesh, PartitionSpec(*entries))

    def vector_sharding(self, *, rows: bool) -> NamedSharding | None:
        """The sharding of a ``(*stack, *rows)`` or ``(*stack, *cols)`` vector."""
        if self.specs is None:
            return None
        stack, row_specs, col_specs = self.specs
        return self.sharding(*stack, *(row_specs if rows else col_specs))


def _explicit_spec(x: jax.Array) -> tuple[Any, tuple[Any, ...]] | None:
    """``x``'s mesh and typed spec (one entry per axis) if a mesh axis is ``Explicit``.

    (On a mesh mixing ``Explicit`` and ``Auto`` axes the type names only the
    ``Explicit`` ones, which are the ones that need spelling out.)
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    if not any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
        return None
    spec = tuple(sharding.spec)
    return sharding.mesh, spec + (None,) * (x.ndim - len(spec))


def _matrices(leaf: Leaf, x: jax.Array) -> _Matrices | None:
    """How ``leaf`` reads as matrices, or ``None`` if it has < 2 non-stack axes."""
    ndim = len(leaf.shape)
    if not _layout.is_matrix(leaf.path, leaf.shape, leaf.stack):
        return None
    if ndim > len(_LETTERS):
        raise ValueError(
            f"clip_spectral_norm: the leaf at {leaf.path or '<root>'} has "
            f"{ndim} axes, more than the {len(_LETTERS)} supported."
        )
    letters = _LETTERS[:ndim]
    stack = list(range(leaf.stack))
    rest = [a for a in range(leaf.stack, ndim) if a not in leaf.axes]
    explicit = _explicit_spec(x)
    specs, mesh = None, None
    if explicit is not None:
        mesh, spec = explicit
        specs = (
            tuple(spec[a] for a in stack),
            tuple(spec[a] for a in leaf.axes),
            tuple(spec[a] for a in rest),
        )
    return _Matrices(
        full=letters,
        stack=letters[: leaf.stack],
        rows="".join(letters[a] for a in leaf.axes),
        cols="".join(letters[a] for a in rest),
        stack_shape=leaf.shape[: leaf.stack],
        cols_shape=tuple(leaf.shape[a] for a in rest),
        specs=specs,
        mesh=mesh,
    )


def _product(
    m: _Matrices, spec: str, x: jax.Array, vector: jax.Array, *, rows_out: bool
) -> jax.Array:
    vector_sharding = m.vector_sharding(rows=not rows_out)
    if vector_sharding is not None:
        vector = jax.sharding.reshard(vector, vector_sharding)
    return jnp.einsum(
        spec,
        x,
        vector,
        precision=_HIGHEST,
        preferred_element_type=x.dtype,
        out_sharding=m.vector_sharding(rows=rows_out),
    )


def _times_vector(m: _Matrices, x: jax.Array, v: jax.Array) -> jax.Array:
    """``W v`` for every matrix: ``(*stack, *cols) -> (*stack, *rows)``."""
    spec = f"{m.full},{m.stack}{m.cols}->{m.stack}{m.rows}"
    return _product(m, spec, x, v, rows_out=True)


def _adjoint_times(m: _Matrices, x: jax.Array, u: jax.Array) -> jax.Array:
    """``W^H u`` for every matrix: ``(*stack, *rows) -> (*stack, *cols)``."""
    spec = f"{m.full},{m.stack}{m.rows}->{m.stack}{m.cols}"
    return _product(m, spec, jnp.conj(x), u, rows_out=False)


def _normalized(
    y: jax.Array, axes: tuple[int, ...], fallback: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(y / ||y||, ||y||)``; ``fallback`` where ``||y||`` is 0 or not finite."""
    norm = _norms.axes_norm(y, 2, axes, axis_name=None)
    ok = jnp.isfinite(norm) & (norm > 0)
    unit = y / jnp.where(ok, norm, 1).astype(y.dtype)
    return jnp.where(ok, unit, fallback), norm


def _flat_spec(m: _Matrices) -> NamedSharding | None:
    """The sharding of a state vector ``(*stack, units)`` spanning > 1 axis."""
    if m.specs is None or len(m.cols) == 1:
        return None  # one column axis: the state vector has the leaf's spec
    return m.sharding(*m.specs[0], None)


def _unflatten(m: _Matrices, vectors: jax.Array) -> jax.Array:
    """A state vector ``(*stack, units)`` as ``(*stack, *cols)`` (leaf's spec)."""
    flat_spec = _flat_spec(m)
    if flat_spec is not None:  # replicated over the units before the split
        vectors = jax.sharding.reshard(vectors, flat_spec)
    v = vectors.reshape(m.stack_shape + m.cols_shape)
    cols_sharding = m.vector_sharding(rows=False)
    return v if cols_sharding is None else jax.sharding.reshard(v, cols_sharding)


def _flatten(m: _Matrices, v: jax.Array) -> jax.Array:
    """``(*stack, *cols)`` as a state vector ``(*stack, units)``."""
    flat_spec = _flat_spec(m)
    if flat_spec is None:
        return v.reshape(*m.stack_shape, -1)
    stack_entries = tuple(flat_spec.spec)[:-1]  # replicated over the units
    v = jax.sharding.reshard(v, m.sharding(*stack_entries, *[None] * len(m.cols)))
    return jax.sharding.reshard(v.reshape(*m.stack_shape, -1), flat_spec)


@functools.partial(jax.jit, static_argnames=("m",))
def _power_iteration(
    m: _Matrices, x: jax.Array, vectors: jax.Array, num_iters: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``num_iters`` steps from the state's ``vectors``: ``(sigma, new vectors)``.

    Compiled once per layout and shape (``num_iters`` is an int32 scalar,
    traced or not, so any count reuses the loop), also when called eagerly.

    ``sigma`` has the rank of ``x`` (size 1 but on the stack axes), so it
    broadcasts against it; it is differentiable in ``x`` (through the last
    step only, the vectors are constants: spectral normalisation's
    gradient), the new vectors are not. A matrix whose product vanishes or is
    not finite keeps its vector.
    """
    v0 = _unflatten(m, vectors.astype(x.dtype))
    fixed = jax.lax.stop_gradient(x)
    zero_rows = jnp.zeros((), x.dtype)

    def left(v: jax.Array) -> jax.Array:
        return _normalized(_times_vector(m, fixed, v), m.row_axes, zero_rows)[0]

    def step(i: Any, v: jax.Array) -> jax.Array:
        del i
        return _normalized(_adjoint_times(m, fixed, left(v)), m.col_axes, v)[0]

    v = jax.lax.fori_loop(0, num_iters - 1, step, jax.lax.stop_gradient(v0))
    z = _adjoint_times(m, x, left(v))  # the last step, with gradients
    new, sigma = _normalized(z, m.col_axes, v)
    state_dtype = jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32
    new = _flatten(m, jax.lax.stop_gradient(new)).astype(state_dtype)
    ones = (1,) * (len(m.full) - len(m.stack))
    return sigma.reshape(m.stack_shape + ones), new


def _start(m: _Matrices, dtype: Any) -> jax.Array:
    """The fixed pseudo-random unit start of ``init``, ``(*stack, units)``.

    The same for every stack index, so a stacked leaf gives, layer by
    layer, the numbers of the layers as separate leaves.
    """
    units = int(np.prod(m.cols_shape, dtype=np.int64))
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    start_dtype = jnp.complex64 if complex_ else jnp.float32
    start = jax.random.normal(jax.random.key(0), (units,), start_dtype)
    start = start / _norms.axes_norm(start, 2, (0,), axis_name=None).astype(start_dtype)
    return jnp.broadcast_to(start, (*m.stack_shape, units))


def _loop_count(value: Any) -> jax.Array:
    """``num_iters`` as an int32 scalar (a float holding an integer is cast)."""
    return jnp.asarray(value).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The transform.
# ---------------------------------------------------------------------------


def clip_spectral_norm(
    max_value: Scalar,
    num_iters: Scalar = 1,
    axis: Axis = None,
    *,
    stack_axes: StackAxes = None,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Spectral norm clipping: bounds the largest singular value of every matrix.

    **In short.** Place it last, after the learning rate. After each step,
    every weight matrix whose largest singular value is above ``max_value``
    is scaled down onto it (a Lipschitz bound on each layer); biases and
    norm scales pass through. One power-iteration step per update
    (``num_iters=1``), warm-started from one vector per matrix kept in the
    state, is enough on weights that move slowly; ``state.sigma`` holds the
    current estimates, to log::

        tx = optax.chain(optax.adam(1e-3), nox.clip_spectral_norm(2.0))

    Pass ``stack_axes`` for stacked layers and ``axis="out_first"`` for
    weights stored ``(out, in)`` (see :doc:`Layouts </layouts>`).

    .. rubric:: Reference details

    For every matrix :math:`W` of the proposed parameters :math:`x = p + u`,
    with :math:`\hat\sigma` the estimate of its largest singular value,

    .. math:: W \leftarrow W \cdot \min\!\left(1,
       \frac{c}{\hat\sigma}\right), \qquad u' = W_{\text{new}} - p

    a hard Lipschitz bound per layer (Gouk et al.). Unlike spectral
    normalisation (Miyato et al.), which divides the weights by
    :math:`\sigma` in the forward pass, this keeps the parameters themselves
    in the set; matrices already inside end where their update puts them.

    **Matrices.** Each leaf, per index of its stack axes, is a matrix
    ``(fan_in, units)`` by the unit convention of ``axis``: the axes a unit
    reduces over are the rows. A Dense kernel ``(in, out)`` is itself, a
    Conv kernel ``(H, W, I, O)`` is ``(H*W*I, O)``, and with
    ``axis="out_first"`` a PyTorch/Equinox weight ``(O, I, *kernel)`` is
    ``(I*prod(kernel), O)``. Leaves with fewer than two non-stack axes
    (biases, norm scales) pass through, with ``None`` in the state.

    **Estimate.** :math:`\hat\sigma` comes from ``num_iters`` steps of power
    iteration (:math:`\hat u = Wv / \|Wv\|`, :math:`z = W^H \hat u`,
    :math:`\hat\sigma = \|z\|`, :math:`v \leftarrow z / \|z\|`, two passes
    over the matrix per step), warm-started from the vector of the previous
    update kept in the state, one per matrix; ``init`` runs 256 steps on the
    params (once, from a fixed pseudo-random start), so the first updates
    start from good vectors. :math:`\hat\sigma \le \sigma` always, so the
    new params' true :math:`\sigma` exceeds ``max_value`` by at most the
    estimate's relative error, which falls geometrically on a fixed or
    slowly moving matrix: after 50 updates with ``num_iters=1`` on a 256x128
    Gaussian matrix it is within ``1e-3`` of ``max_value`` (or below it).
    The loop runs in ``float32`` or wider with ``Precision.HIGHEST``
    matmuls; the target is aimed a few ulps inside and landed in the
    update's dtype so that, after ``optax.apply_updates``, no element is
    larger in magnitude than its target (half precision computed in
    ``float32``). A zero matrix stays as it is (scale 1, finite gradients; its
    vector is kept); a NaN or infinite entry of ``p + u`` makes its matrix
    NaN (the vector is kept, so later steps are not poisoned).
    Meta-gradients flow through :math:`\hat\sigma` as in spectral
    normalisation: through the last step, the vectors held constant.

    **Sharding.** The leaf is used as it lies (no transpose, no reshape).
    Each matrix-vector product is one ``einsum``: sharded along a fan-in
    axis, :math:`W v` is a local product (each device takes its slice of
    :math:`v`) and :math:`W^H u` a local product plus one all-reduce of a
    ``units``-sized vector; sharded along the units axis, the other way
    round; sharded along a stack axis, both are local. The vector norms are
    all-reduces of one scalar per matrix, the rescaling is elementwise: no
    leaf is ever gathered, and every leaf keeps its sharding.

    Place it last, after the learning rate:
    ``optax.chain(optax.adam(1e-3), nox.clip_spectral_norm(1.0))``.

    Args:
      max_value: :math:`c`, the largest singular value allowed, ``>= 0``.
      num_iters: power-iteration steps per update, an integer ``>= 1``; may
        be traced (under :func:`optax.inject_hyperparams`, a loop count
        decided at run time).
      axis: which axes a unit reduces over (the rows of the matrix):
        ``None`` (Flax), ``"out_first"`` (PyTorch/Equinox), an int or ints,
        or a tree of those matching the params, or a callable
        ``params -> tree``. Under :func:`optax.inject_hyperparams` pass it in
        ``static_args``.
      stack_axes: how many leading axes index stacked layers (each index has
        its own matrix and vector): ``None``, an int for every leaf, a tree
        of ints/bools matching the params, or a callable ``params -> tree``.
      mask: a tree of bools matching the params (or a prefix of it), or a
        callable ``params -> tree``; leaves marked ``False`` pass unchanged.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` that needs ``params``
      (extra keyword arguments to ``update`` are ignored), whose state is a
      :class:`ClipSpectralNormState` (``init`` needs the params too).

    Raises:
      ValueError: ``max_value`` is negative or NaN, or ``num_iters`` is not
        an integer ``>= 1`` (at construction); ``params`` is missing,
        ``params``/``mask`` does not match the updates, or an axis is out of
        range or names a stack axis (at update and init; the message names
        the leaf's path and shape).
      TypeError: ``max_value`` or ``num_iters`` is not a real number.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import norm_optax as nox
      >>> tx = nox.clip_spectral_norm(2.0)
      >>> params = {"kernel": jnp.array([[4.0, 0.0], [0.0, 1.0]]), "bias": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> state.sigma["kernel"], state.sigma["bias"]
      (Array(4., dtype=float32), None)
      >>> zeros = jax.tree.map(jnp.zeros_like, params)
      >>> u, state = tx.update(zeros, state, params)
      >>> optax.apply_updates(params, u)["kernel"].round(4)  # divided by 4 / 2
      Array([[2. , 0. ],
             [0. , 0.5]], dtype=float32)

    References:
      Miyato et al., `Spectral Normalization for Generative Adversarial
      Networks <https://arxiv.org/abs/1802.05957>`_, 2018;
      Gouk et al., `Regularisation of Neural Networks by Enforcing Lipschitz
      Continuity <https://arxiv.org/abs/1804.04368>`_, 2021
    """
    hypers = declare(
        max_value=(max_value, NONNEGATIVE), num_iters=(num_iters, POSITIVE_COUNT)
    )
    check_axis(axis)

    def init(x: jax.Array, leaf: Leaf) -> tuple[Any, Any]:
        m = _matrices(leaf, x)
        if m is None:
            return None, None
        sigma, vectors = _power_iteration(
            m, x, _start(m, x.dtype), _loop_count(INIT_ITERS)
        )
        return vectors, sigma.reshape(m.stack_shape).astype(jnp.float32)

    def clip(
        x: jax.Array, leaf: Leaf, values: Values, state: tuple[Any, Any]
    ) -> tuple[jax.Array, Any, tuple[Any, Any]]:
        m = _matrices(leaf, x)
        if m is None:
            return x, True, state
        vectors, _ = state
        count = _loop_count(values["num_iters"])
        sigma, new_vectors = _power_iteration(m, x, vectors, count)
        limit = inner_bound(values["max_value"], real_dtype(x))
        scale = clip_scale(sigma, limit)
        target = x * scale.astype(x.dtype)
        new_sigma = sigma.reshape(m.stack_shape).astype(jnp.float32)
        return target, scale == 1, (new_vectors, new_sigma)

    return projection(
        "clip_spectral_norm",
        Target("leaf", clip, init=init, state_type=ClipSpectralNormState),
        hypers,
        mask=mask,
        axis=axis,
        stack_axes=stack_axes,
    )
