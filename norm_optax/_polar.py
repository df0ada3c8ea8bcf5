"""Polar factors: the matrix of a leaf and its orthogonalisation.

Private, on the floor of the numerics (it imports only floor 0), so the
public :func:`norm_optax.norms.orthogonalize` and the norm-geometry
transforms share one kernel. Two parts:

* **The matrix of a leaf.** Per stack index, a leaf with at least two
  non-stack axes is read as the matrix ``(fan_in, fan_out)``: ``fan_in`` is
  the product of the axes one unit reduces over (the ``axes`` the layout
  rules of ``_layout.unit_axes`` give), ``fan_out`` the product of the other
  non-stack axes (the units). :func:`to_matrices` gives the
  ``(layers, fan_in, fan_out)`` batch, :func:`from_matrices` puts a batch
  back in the leaf's shape.
* **The polar factor** ``U Vᵀ`` of each matrix ``M = U Σ Vᵀ`` of a batch, by
  SVD (exact, with a rank cut-off) or by Newton--Schulz iterations
  ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ`` after the normalisation
  ``X = M / (‖M‖_F (1 + s) + 1e-7)``, on the orientation with no more rows
  than columns. Computed in ``float32`` (``float64`` for ``float64`` leaves)
  and cast back once. A matrix holding a NaN or an infinity gives all NaN,
  that matrix only; a zero matrix gives zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from norm_optax._sharding import per_layer
from norm_optax._types import accumulation_dtype

__all__ = [
    "METHODS",
    "NS_COEFFS",
    "Polar",
    "fans",
    "from_matrices",
    "matrix_error",
    "newton_schulz",
    "orthogonalize_leaf",
    "polar_factor",
    "polar_options",
    "svd_polar",
    "to_matrices",
]

METHODS = ("newton_schulz", "svd")

Coeffs = tuple[float, float, float]

# Muon (Jordan et al. 2024): one quintic at every step, no safety factor.
_STANDARD: tuple[Coeffs, ...] = ((3.4445, -4.7750, 2.0315),)
# Polar Express (Amsel et al. 2025), modded-nanogpt's table, safety 0.02.
_POLAR_EXPRESS: tuple[Coeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_COEFFS: dict[str, tuple[tuple[Coeffs, ...], float]] = {
    "standard": (_STANDARD, 0.0),
    "polar_express": (_POLAR_EXPRESS, 0.02),
}
_NS_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class Polar:
    """How to take a polar factor: checked options of ``orthogonalize``."""

    method: str
    ns_steps: Any
    """A Python int ``>= 1``, or a traced integer (the caller's responsibility)."""
    coeffs: tuple[Coeffs, ...]
    """Step ``i`` uses entry ``min(i, len - 1)``."""
    safety: float


def _coeff_triple(value: Any, name: str) -> Coeffs:
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 3
    ):
        raise ValueError(f"{name} must be a tuple (a, b, c) of three numbers.")
    out = []
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(
            v, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"{name} must hold real numbers, got {value!r}.")
        number = float(v)
        if not math.isfinite(number):
            raise ValueError(f"{name} must hold finite numbers, got {value!r}.")
        out.append(number)
    return (out[0], out[1], out[2])


def _coeff_table(ns_coeffs: Any) -> tuple[tuple[Coeffs, ...], float]:
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in NS_COEFFS:
            raise ValueError(
                f"ns_coeffs must be 'standard', 'polar_express', a tuple (a, b, c) "
                f"or a sequence of them, got {ns_coeffs!r}."
            )
        return NS_COEFFS[ns_coeffs]
    if not isinstance(ns_coeffs, Sequence) or len(ns_coeffs) == 0:
        raise ValueError(
            f"ns_coeffs must be 'standard', 'polar_express', a tuple (a, b, c) "
            f"or a sequence of them, got {ns_coeffs!r}."
        )
    if all(isinstance(c, Sequence) and not isinstance(c, str) for c in ns_coeffs):
        table = tuple(
            _coeff_triple(c, f"ns_coeffs[{i}]") for i, c in enumerate(ns_coeffs)
        )
        return table, 0.0
    return (_coeff_triple(ns_coeffs, "ns_coeffs"),), 0.0


def _steps(ns_steps: Any) -> Any:
    if isinstance(ns_steps, jax.core.Tracer):
        if ns_steps.ndim != 0:
            raise ValueError(f"ns_steps must be a scalar, got shape {ns_steps.shape}.")
        return ns_steps
    if isinstance(ns_steps, (bool, np.bool_)):
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}.")
    try:
        value = np.asarray(ns_steps)
    except Exception as error:
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}.") from error
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        # ``inject_hyperparams`` hands back an int as an integer array; a
        # float, even a whole one, is not a step count.
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}.")
    steps = operator.index(value.item())
    if steps < 1:
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}.")
    return steps


def polar_options(method: Any, ns_steps: Any, ns_coeffs: Any) -> Polar:
    """The checked options of a polar factor.

    Raises:
      ValueError: an unknown ``method`` or ``ns_coeffs``, a concrete
        ``ns_steps`` below 1 or not an integer.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be 'newton_schulz' or 'svd', got {method!r}.")
    table, safety = _coeff_table(ns_coeffs)
    return Polar(method, _steps(ns_steps), table, safety)


# ---------------------------------------------------------------------------
# The matrix of a leaf.
# ---------------------------------------------------------------------------


def matrix_error(
    path: str,
    shape: tuple[int, ...],
    stack: int,
    what: str,
    broadcast_bias: bool = False,
) -> str:
    """The message for a leaf that has no matrix.

    ``broadcast_bias``: the leaf has two or more non-stack axes but is a bias
    whose axes after the first are all 1 (Equinox's conv bias), a vector.
    """
    where = f"the leaf at {path}" if path else "the array"
    why = (
        "a bias whose axes after the first all have size 1 (a broadcast bias, "
        "read as the vector of its first axis)"
        if broadcast_bias
        else "fewer than two non-stack axes"
    )
    return (
        f"{what} needs a matrix: {where} has shape {shape} with stack_axes={stack}, "
        f"{why}."
    )


def _out_axes(
    shape: tuple[int, ...], stack: int, axes: tuple[int, ...]
) -> tuple[int, ...]:
    return tuple(a for a in range(stack, len(shape)) if a not in axes)


def fans(shape: tuple[int, ...], stack: int, axes: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of each matrix of a leaf."""
    fan_in = math.prod(shape[a] for a in axes)
    fan_out = math.prod(shape[a] for a in _out_axes(shape, stack, axes))
    return fan_in, fan_out


def _order(shape: tuple[int, ...], stack: int, axes: tuple[int, ...]) -> list[int]:
    return [*range(stack), *axes, *_out_axes(shape, stack, axes)]


def to_matrices(x: jax.Array, stack: int, axes: tuple[int, ...]) -> jax.Array:
    """The ``(layers, fan_in, fan_out)`` batch of the matrices of ``x``."""
    shape = tuple(x.shape)
    order = _order(shape, stack, axes)
    fan_in, fan_out = fans(shape, stack, axes)
    layers = math.prod(shape[:stack])
    moved = x if order == list(range(len(shape))) else jnp.transpose(x, order)
    return moved.reshape(layers, fan_in, fan_out)


def from_matrices(
    m: jax.Array, shape: tuple[int, ...], stack: int, axes: tuple[int, ...]
) -> jax.Array:
    """The inverse of :func:`to_matrices`: the batch in the leaf's shape."""
    order = _order(shape, stack, axes)
    moved = m.reshape([shape[a] for a in order])
    if order == list(range(len(shape))):
        return moved
    return jnp.transpose(moved, [int(i) for i in np.argsort(order)])


# ---------------------------------------------------------------------------
# Polar factors of a batch of matrices (in the compute dtype).
# ---------------------------------------------------------------------------


def _adjoint(x: jax.Array) -> jax.Array:
    """The conjugate transpose of each matrix of a batch."""
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def _frobenius(m: jax.Array) -> jax.Array:
    """``‖M‖_F`` per matrix (keepdims), with a finite gradient (0) at zero."""
    sq = jnp.sum(jnp.real(m * jnp.conj(m)), axis=(-2, -1), keepdims=True)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def newton_schulz(m: jax.Array, options: Polar) -> jax.Array:
    """Newton--Schulz polar factor of each matrix of a ``(..., r, c)`` batch."""
    wide = m.shape[-2] > m.shape[-1]
    x = _adjoint(m) if wide else m
    x = x / (_frobenius(x) * (1 + options.safety) + _NS_EPS).astype(x.dtype)
    table = np.asarray(options.coeffs, dtype=np.dtype(jnp.finfo(x.dtype).dtype))
    last = len(options.coeffs) - 1

    def step(i: Any, x: jax.Array) -> jax.Array:
        a: Any
        b: Any
        c: Any
        if isinstance(i, int):
            a, b, c = (float(v) for v in table[min(i, last)])
        else:
            coeffs = jnp.asarray(table).astype(x.dtype)[jnp.minimum(i, last)]
            a, b, c = coeffs[0], coeffs[1], coeffs[2]
        a_mat = x @ _adjoint(x)
        poly = b * a_mat + c * (a_mat @ a_mat)
        return a * x + poly @ x

    if isinstance(options.ns_steps, int):
        for i in range(options.ns_steps):
            x = step(i, x)
    else:  # a traced step count: a loop decided at run time
        x = jax.lax.fori_loop(0, jnp.asarray(options.ns_steps, jnp.int32), step, x)
    return _adjoint(x) if wide else x


def svd_polar(m: jax.Array) -> jax.Array:
    """Exact polar factor ``U Vᵀ`` of each matrix of a ``(..., r, c)`` batch.

    Singular values at or below ``max(r, c) · eps · sigma_max`` count as zero.
    """
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    eps = jnp.finfo(s.dtype).eps
    cutoff = max(m.shape[-2], m.shape[-1]) * eps * s[..., :1]
    keep = (s > cutoff).astype(u.dtype)
    return (u * keep[..., None, :]) @ vh


def _solve(m: jax.Array, options: Polar) -> jax.Array:
    """The polar factors of a batch in its (compute) dtype, NaN per matrix."""
    finite = jnp.all(jnp.isfinite(m), axis=(-2, -1), keepdims=True)
    clean = jnp.where(finite, m, 0)
    if options.method == "svd":
        return jnp.where(finite, svd_polar(clean), jnp.nan)
    return jnp.where(finite, newton_schulz(clean, options), jnp.nan)


def polar_factor(m: jax.Array, options: Polar) -> jax.Array:
    """The polar factor of each matrix of a ``(L, r, c)`` batch.

    Computed in ``float32`` (``float64``/``complex128`` for 64-bit input),
    returned in that compute dtype. A matrix holding a NaN or an infinity
    gives all NaN; a zero matrix gives zeros.
    """
    acc = accumulation_dtype(m.dtype)
    dtype = np.result_type(acc, np.complex64) if jnp.iscomplexobj(m) else acc
    return _solve(m.astype(dtype), options)


def _leaf_polar(
    x: jax.Array, stack: int, axes: tuple[int, ...], options: Polar
) -> jax.Array:
    shape = tuple(x.shape)
    out = polar_factor(to_matrices(x, stack, axes), options)
    return from_matrices(out, shape, stack, axes).astype(x.dtype)


@functools.cache
def _kernel(
    options: Polar, stack: int, axes: tuple[int, ...]
) -> Callable[[jax.Array], jax.Array]:
    """One stable function per layout and options (it keys the sharding cache)."""

    def solve(x: jax.Array) -> jax.Array:
        return _leaf_polar(x, stack, axes, options)

    return solve


def orthogonalize_leaf(
    x: jax.Array, stack: int, axes: tuple[int, ...], options: Polar
) -> jax.Array:
    """The polar factor of each matrix of a leaf, in the leaf's shape and dtype.

    Sharded (GSPMD), each layer is made whole on one device first (see
    ``_sharding.per_layer``), so the iterations need no collective and the
    result keeps ``x``'s sharding.
    """
    if not isinstance(options.ns_steps, int):  # traced: not a cache key
        return _leaf_polar(x, stack, axes, options)
    return per_layer(_kernel(options, stack, tuple(axes)), x, stack)
