"""How per-leaf partial norms are combined into one scalar.

This is the only place that knows about devices. ``reduce_to_scalar`` turns
elementwise parts (``|x|^2``, ``|x|``, ...) of every leaf into one scalar, with
at most one cross-device all-reduce of a scalar and no all-gather:

* inside ``shard_map`` (``axis_name`` given) the local total is combined
  across the named axes with one ``psum``/``pmax``. A leaf that does not
  vary over a named axis (JAX's type of a value inside ``shard_map`` records
  the manual axes it varies over: ``jax.typeof(x).vma``, spelled
  ``manual_axis_type.varying`` in newer JAX) is replicated there and is
  counted once: its partial total is kept on the device at index 0 of those
  axes only, so the one ``psum`` stays one. Where that record is not kept
  -- ``shard_map(check_vma=False)``, ``pmap`` (a ``shard_map`` without it),
  a ``vmap`` axis -- replication cannot be known and :class:`ValueError` is
  raised rather than a norm that may count a leaf once per device (see
  :func:`check_axis_name`);
* under ``jax.jit`` with leaves sharded on a mesh whose axes are
  ``Explicit`` (the default of :func:`jax.make_mesh`), the shardings are known
  at trace time. The per-device partial totals of all leaves are then added
  up inside a :func:`jax.shard_map` over that mesh, each replicated copy of a
  leaf counted once, and combined with a single ``psum``/``pmax`` over the
  mesh axes any leaf is sharded on. Without this, XLA reduces each leaf over
  its own mesh axes, which costs one all-reduce per distinct set of axes
  (e.g. two for leaves sharded on ``('data', 'model')`` and on ``'model'``);
* otherwise (no mesh, ``Auto`` mesh axes as with ``jax.sharding.Mesh`` plus
  ``jax.jit(in_shardings=...)``, leaves on different meshes, leaves that are
  all replicated) the per-leaf totals are added up as written and XLA's
  SPMD partitioner inserts the collectives it needs: one all-reduce when every
  sharded leaf is sharded on the same mesh axes, one per distinct set of axes
  otherwise.

Differentiation and ``vmap`` (see ``role`` in :func:`reduce_to_scalar`), when
the caller says which sums are which: the tangent sums of the norms'
``custom_jvp`` rule (``role="tangent"``) take the plain path, so the
backward pass needs no collective (the transpose of a sum is a broadcast);
the primal sums (``role="primal"``) get a ``vmap`` rule that reduces each
example in place, so per-example norms of examples sharded over devices
gather nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

__all__ = [
    "Role",
    "check_axis_name",
    "combine_across",
    "per_layer",
    "reduce_layers",
    "reduce_to_scalar",
]


def _leaf_total(part: jax.Array, kind: str, dtype: np.dtype) -> jax.Array:
    if kind == "sum":
        return jnp.sum(part, dtype=dtype)
    return jnp.max(part, initial=0).astype(dtype)


def _combine(totals: Sequence[jax.Array], kind: str, dtype: np.dtype) -> jax.Array:
    if not totals:
        return jnp.zeros((), dtype)
    if kind == "sum":
        return sum(totals[1:], start=totals[0])
    return jnp.max(jnp.stack(totals))


def _collective(total: jax.Array, kind: str, axis_name: Any) -> jax.Array:
    if kind == "sum":
        return jax.lax.psum(total, axis_name)
    return jax.lax.pmax(total, axis_name)


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """The mesh axes a partition spec shards over, in order of appearance."""
    axes: list[str] = []
    for entry in spec:
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        axes.extend(str(name) for name in names)
    return tuple(axes)


def _explicit_layout(
    parts: Sequence[jax.Array],
) -> tuple[AbstractMesh, list[PartitionSpec], tuple[str, ...]] | None:
    """The common Explicit mesh, each part's spec, and the axes any part uses.

    A part whose type carries no mesh (e.g. a constant made inside ``jit``)
    is replicated. ``None`` when the fast path does not apply: a part without
    a :class:`NamedSharding`, parts on different meshes, a mesh with an axis
    that is not ``Explicit`` (``Auto``, or ``Manual`` inside a ``shard_map``),
    ``reduced``/``unreduced`` specs, or no part sharded at all (then no
    collective is needed).
    """
    mesh: AbstractMesh | None = None
    specs: list[PartitionSpec] = []
    for part in parts:
        sharding = getattr(jax.typeof(part), "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return None
        spec = sharding.spec
        if spec.unreduced or spec.reduced:
            return None
        if sharding.mesh.empty:
            specs.append(PartitionSpec())
            continue
        abstract = sharding.mesh.abstract_mesh
        if mesh is None:
            mesh = abstract
        elif abstract != mesh:
            return None
        specs.append(spec)
    if mesh is None or any(t != AxisType.Explicit for t in mesh.axis_types):
        return None
    used = {axis for spec in specs for axis in _spec_axes(spec)}
    if not used:
        return None
    axes = tuple(name for name in mesh.axis_names if name in used)
    return mesh, specs, axes


def _owner_mask(skip_axes: Sequence[str]) -> jax.Array:
    """True on the devices at index 0 of every axis in ``skip_axes``."""
    mask = jnp.array(True)
    for axis in skip_axes:
        mask = mask & (jax.lax.axis_index(axis) == 0)
    return mask


def _local_partial(
    parts: Sequence[jax.Array],
    *,
    kind: str,
    dtype: np.dtype,
    skip: Sequence[tuple[str, ...]],
    axes: tuple[str, ...],
) -> jax.Array:
    """Per-device body of the fast path: local totals, one collective."""
    totals = []
    for part, skip_axes in zip(parts, skip, strict=True):
        total = _leaf_total(part, kind, dtype)
        if kind == "sum" and skip_axes:
            # The leaf is replicated over ``skip_axes``: count one copy.
            # (A max is idempotent, so copies do no harm there.)
            total = jnp.where(_owner_mask(skip_axes), total, jnp.zeros((), dtype))
        totals.append(total)
    return _collective(_combine(totals, kind, dtype), kind, axes)


@functools.partial(jax.jit, static_argnames=("kind", "dtype", "mesh", "specs", "axes"))
def _reduce_on_mesh(
    parts: list[jax.Array],
    *,
    kind: str,
    dtype: np.dtype,
    mesh: AbstractMesh,
    specs: tuple[PartitionSpec, ...],
    axes: tuple[str, ...],
) -> jax.Array:
    """One ``shard_map`` over ``mesh``: each device adds its local totals.

    Under ``jit`` (here always: an abstract mesh needs traced inputs), so it
    also works on concrete arrays and under eager ``grad``/``vmap``.
    """
    skip = [tuple(a for a in axes if a not in _spec_axes(spec)) for spec in specs]
    body = functools.partial(
        _local_partial, kind=kind, dtype=dtype, skip=skip, axes=axes
    )
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(list(specs),),
        out_specs=PartitionSpec(),
        axis_names=frozenset(axes),
    )
    return mapped(parts)


def _batched_plain(
    axis_size: int,
    in_batched: list[Any],
    parts: list[jax.Array],
    *,
    kind: str,
    dtype: np.dtype,
) -> tuple[jax.Array, bool]:
    """``vmap`` rule of the ``shard_map`` path: each example reduced in place.

    Under ``vmap``, ``shard_map`` would treat the mapped axis as replicated
    and all-gather a leaf whose batch axis is sharded (per-example clipping
    with the examples sharded over devices). Reducing every leaf over its
    non-batch axes lets XLA keep the batch axis sharded.
    """
    (batched,) = in_batched
    totals = []
    for part, is_batched in zip(parts, batched, strict=True):
        if not is_batched:
            part = jnp.broadcast_to(part, (axis_size, *part.shape))
        axes = tuple(range(1, part.ndim))
        if kind == "sum":
            totals.append(jnp.sum(part, axis=axes, dtype=dtype))
        else:
            totals.append(jnp.max(part, axis=axes, initial=0).astype(dtype))
    if kind == "sum":
        return sum(totals[1:], start=totals[0]), True
    return jnp.max(jnp.stack(totals), axis=0), True


Role = Literal["any", "primal", "tangent"]


# ---------------------------------------------------------------------------
# ``axis_name``: which manual axes each value varies over.
# ---------------------------------------------------------------------------


def _axis_names(axis_name: Any) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _manual_type(x: Any) -> tuple[frozenset[Any], frozenset[Any]] | None:
    """The manual axes ``x`` varies over, and those it is unreduced over.

    ``None`` where this JAX records neither (no ``vma`` on its types).
    """
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is not None:
        return frozenset(vma), frozenset()
    mat = getattr(aval, "manual_axis_type", None)
    if mat is None:
        return None
    return frozenset(mat.varying), frozenset(mat.unreduced)


def check_axis_name(axis_name: Any) -> tuple[Any, ...]:
    """The named axes, after checking that JAX tracks what varies over them.

    Inside ``jax.shard_map`` with ``check_vma=True`` (the default) JAX types
    every value with the manual axes it varies over, so a replicated leaf can
    be told from a sharded one. Elsewhere it cannot: the probe is
    ``lax.axis_index``, which varies over its axis wherever that is tracked
    (it compiles to nothing).

    Raises:
      ValueError: the axis is a ``vmap`` axis, a ``pmap`` axis, or an axis
        of a ``shard_map(check_vma=False)``.
    """
    names = _axis_names(axis_name)
    for name in names:
        probe = _manual_type(jax.lax.axis_index(name))
        if probe is None or name not in probe[0]:
            raise ValueError(
                f"axis_name={axis_name!r}: JAX does not record which values "
                f"vary over the axis {name!r} here (jax.pmap, "
                "jax.shard_map(check_vma=False) or a jax.vmap axis), so a "
                "leaf replicated over it cannot be told from a sharded one and "
                "would be counted once per device. Call it inside jax.shard_map "
                "with check_vma=True (the default), with in_specs P(...) naming "
                "the axis for leaves split across devices and P() for "
                "replicated ones."
            )
    return names


def _varying(part: jax.Array, names: tuple[Any, ...], axis_name: Any) -> set[Any]:
    """The named axes ``part`` varies over (raises if it is unreduced on one)."""
    found = _manual_type(part)
    assert found is not None  # check_axis_name has run
    varying, unreduced = found
    if unreduced & set(names):
        raise ValueError(
            f"axis_name={axis_name!r}: a leaf is unreduced over "
            f"{sorted(unreduced & set(names))} (a partial sum not yet added "
            "up across devices); its norm is not a sum of per-device norms. "
            "Reduce it (jax.lax.psum) first."
        )
    return set(varying) & set(names)


def _ordered(axes: set[Any], names: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(name for name in names if name in axes)


def _reduce_across(
    parts: Sequence[jax.Array], kind: str, dtype: np.dtype, axis_name: Any
) -> jax.Array:
    """Local totals combined across ``axis_name``, replicated leaves once."""
    names = check_axis_name(axis_name)
    varies = [_varying(part, names, axis_name) for part in parts]
    used = set().union(*varies)
    totals = []
    for part, axes in zip(parts, varies, strict=True):
        total = _leaf_total(part, kind, dtype)
        skip = _ordered(used - axes, names)
        if kind == "sum" and skip:
            # Replicated over ``skip``: one copy counts (a max needs no care).
            total = jnp.where(_owner_mask(skip), total, jnp.zeros((), dtype))
        totals.append(total)
    total = _combine(totals, kind, dtype)
    if not used:
        return total
    return _collective(total, kind, _ordered(used, names))


def combine_across(x: jax.Array, kind: str, axis_name: Any) -> jax.Array:
    """Per-unit totals ``x`` of one leaf combined across ``axis_name``.

    Only over the named axes the leaf varies over: over the others every
    device already holds the whole total (see :func:`check_axis_name`).
    """
    names = check_axis_name(axis_name)
    axes = _ordered(_varying(x, names, axis_name), names)
    return _collective(x, kind, axes) if axes else x


def reduce_to_scalar(
    parts: Sequence[jax.Array],
    kind: str,
    dtype: np.dtype,
    axis_name: Any = None,
    *,
    role: Role,
) -> jax.Array:
    """Sum (``kind="sum"``) or max (``kind="max"``) of all elements of ``parts``.

    With ``axis_name`` (inside ``shard_map``), the local totals are combined
    across the named axes with one ``psum``/``pmax``, each leaf replicated
    over a named axis counted once (see :func:`check_axis_name`). Without it, when
    the parts are sharded on one mesh whose axes are all ``Explicit``, the
    result costs a single all-reduce of one scalar over the mesh axes the
    parts are sharded on (see the module docstring); otherwise XLA inserts
    the collectives.

    Args:
      parts: arrays of elementwise values, each already in an accumulation
        dtype (``float32`` or wider).
      kind: ``"sum"`` or ``"max"``; the max of nothing is ``0``.
      dtype: the dtype of the result.
      axis_name: a manual axis name (or tuple of names) to combine across.
      role: how the result is differentiated, which decides how the fast
        (``shard_map``) path may be used. ``"tangent"``: the sum is the
        tangent of a ``custom_jvp`` rule, which reverse mode transposes; the
        plain path is taken, whose transpose is a broadcast without any
        collective (the transpose of the ``shard_map`` path's masking of
        replicated leaves would cost one more all-reduce per group of them).
        ``"primal"``: the result is never differentiated directly (it is the
        primal of a ``custom_jvp``); the fast path then also gets a ``vmap``
        rule (:func:`jax.custom_batching.custom_vmap`, which cannot be
        transposed) that keeps a sharded batch axis in place. ``"any"``: the
        fast path without that rule (under ``vmap`` over a sharded axis,
        ``shard_map`` all-gathers the leaves along it).

    Returns:
      A scalar of ``dtype``.
    """
    if axis_name is None and role != "tangent":
        layout = _explicit_layout(parts)
        if layout is not None:
            mesh, specs, axes = layout
            dtype = np.dtype(dtype)
            fast = functools.partial(
                _reduce_on_mesh,
                kind=kind,
                dtype=dtype,
                mesh=mesh,
                specs=tuple(specs),
                axes=axes,
            )
            if role != "primal":
                return fast(list(parts))
            batchable = jax.custom_batching.custom_vmap(fast)
            batchable.def_vmap(
                functools.partial(_batched_plain, kind=kind, dtype=dtype)
            )
            return batchable(list(parts))
    if axis_name is not None:
        return _reduce_across(parts, kind, np.dtype(dtype), axis_name)
    return _combine([_leaf_total(p, kind, dtype) for p in parts], kind, dtype)


# ---------------------------------------------------------------------------
# Per-layer totals of many leaves, one all-reduce (telemetry).
# ---------------------------------------------------------------------------


def _layer_sum(part: jax.Array, count: int, dtype: np.dtype) -> jax.Array:
    """Sum of ``part`` over every axis after its ``count`` first, in ``dtype``."""
    return jnp.sum(part, axis=tuple(range(count, part.ndim)), dtype=dtype)


def _shard_offset(entry: Any, mesh: AbstractMesh, local: int) -> jax.Array:
    """Where this device's slice of one array dimension starts, in the whole."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return jnp.zeros((), jnp.int32)
    names = entry if isinstance(entry, tuple) else (entry,)
    index = jnp.zeros((), jnp.int32)
    for name in names:  # major to minor
        index = index * mesh.shape[name] + jax.lax.axis_index(name)
    return index * local


def _local_layers(
    leaves: Sequence[jax.Array],
    *,
    counts: tuple[int, ...],
    shapes: tuple[tuple[int, ...], ...],
    elementwise: Callable[[jax.Array], jax.Array],
    dtype: np.dtype,
    mesh: AbstractMesh,
    specs: tuple[PartitionSpec, ...],
    axes: tuple[str, ...],
) -> jax.Array:
    """Per-device body: every leaf's local per-layer sums, placed in one vector.

    A leaf's slice of the stack axes (when they are sharded) is written at its
    offset in a zero array of the whole stack shape; copies of a leaf
    replicated over a mesh axis are counted once. The concatenation of all
    leaves is then summed over the devices with one ``psum``.
    """
    pieces = []
    for leaf, count, shape, spec in zip(leaves, counts, shapes, specs, strict=True):
        local = _layer_sum(elementwise(leaf), count, dtype)
        spec_axes = _spec_axes(spec)
        skip = tuple(a for a in axes if a not in spec_axes)
        if skip:
            local = jnp.where(_owner_mask(skip), local, jnp.zeros((), dtype))
        whole = shape[:count]
        if local.shape != whole:
            entries = tuple(spec) + (None,) * (count - len(spec))
            offsets = [
                _shard_offset(entries[d], mesh, local.shape[d]) for d in range(count)
            ]
            local = jax.lax.dynamic_update_slice(
                jnp.zeros(whole, dtype), local, offsets
            )
        pieces.append(local.reshape(-1))
    return jax.lax.psum(jnp.concatenate(pieces), axes)


def reduce_layers(
    leaves: Sequence[jax.Array],
    counts: Sequence[int],
    elementwise: Callable[[jax.Array], jax.Array],
    dtype: np.dtype,
) -> list[jax.Array]:
    """Per-layer sums of ``elementwise(leaf)`` for many leaves at once.

    For each leaf, the sum of ``elementwise(leaf)`` over every axis after its
    ``counts[i]`` first (the stack axes), an array of shape
    ``leaf.shape[:counts[i]]`` and dtype ``dtype``. Not differentiated
    (callers stop gradients).

    Under ``jax.jit`` with the leaves sharded on one mesh whose axes are all
    ``Explicit``, the per-device partial sums of every leaf are concatenated
    into one short vector (one entry per layer of every leaf) and combined
    with a single all-reduce over the mesh axes the leaves are sharded on,
    however many leaves there are and whichever of their axes (stack axes
    included) are sharded; no leaf is gathered. Otherwise each leaf is
    reduced as written and XLA inserts the collectives it needs.
    """
    counts = tuple(int(c) for c in counts)
    dtype = np.dtype(dtype)
    layout = _explicit_layout(list(leaves))
    if layout is None:
        return [
            _layer_sum(elementwise(x), c, dtype)
            for x, c in zip(leaves, counts, strict=True)
        ]
    mesh, specs, axes = layout
    shapes = tuple(tuple(x.shape) for x in leaves)
    body = functools.partial(
        _local_layers,
        counts=counts,
        shapes=shapes,
        elementwise=elementwise,
        dtype=dtype,
        mesh=mesh,
        specs=tuple(specs),
        axes=axes,
    )
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(list(specs),),
        out_specs=PartitionSpec(),
        axis_names=frozenset(axes),
    )
    flat = jax.jit(mapped)(list(leaves))  # an abstract mesh needs traced inputs
    out, start = [], 0
    for shape, count in zip(shapes, counts, strict=True):
        size = int(np.prod(shape[:count], dtype=np.int64))
        out.append(flat[start : start + size].reshape(shape[:count]))
        start += size
    return out


# ---------------------------------------------------------------------------
# Per-layer maths on sharded leaves (norm geometry).
# ---------------------------------------------------------------------------

LayerFn = Callable[[jax.Array], jax.Array]


def _names(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _local_layer_fn(
    fn: LayerFn,
    spec: tuple[tuple[str, ...], ...],
    sizes: dict[str, int],
    shape: tuple[int, ...],
    stack: int,
) -> LayerFn:
    """The per-device code of ``fn`` on a leaf sharded by ``spec`` (mesh axes
    per leaf axis); ``fn`` maps each layer (index of the ``stack`` first axes)
    on its own, so only the other axes must be whole on a device:

    * none of them sharded: ``fn`` on the local layers, no collective;
    * one sharded, over mesh axes whose size divides the local size of a
      stack axis: one all-to-all moves the sharding onto that stack axis,
      ``fn`` runs on whole layers, one all-to-all moves it back;
    * otherwise each sharded layer axis is all-gathered once, ``fn`` runs on
      whole layers, and each device keeps its own block (a slice).
    """
    sharded = [a for a in range(stack, len(shape)) if spec[a]]
    if not sharded:
        return fn

    def size(names: tuple[str, ...]) -> int:
        return int(np.prod([sizes[n] for n in names], dtype=np.int64))

    if len(sharded) == 1:
        axis = sharded[0]
        moved = spec[axis]
        for target in range(stack):
            if (shape[target] // size(spec[target])) % size(moved) == 0:

                def swapped(x: jax.Array, target: int = target) -> jax.Array:
                    whole = jax.lax.all_to_all(x, moved, target, axis, tiled=True)
                    out = fn(whole)
                    return jax.lax.all_to_all(out, moved, axis, target, tiled=True)

                return swapped

    def gathered(x: jax.Array) -> jax.Array:
        whole = x
        for axis in sharded:
            whole = jax.lax.all_gather(whole, spec[axis], axis=axis, tiled=True)
        out = fn(whole)
        for axis in sharded:
            block = x.shape[axis]
            start = jax.lax.axis_index(spec[axis]) * block
            out = jax.lax.dynamic_slice_in_dim(out, start, block, axis=axis)
        return out

    return gathered


def _leaf_spec(sharding: NamedSharding, ndim: int) -> tuple[tuple[str, ...], ...]:
    spec = (*sharding.spec, *([None] * (ndim - len(sharding.spec))))
    return tuple(_names(e) for e in spec)


def _plain(sharding: Any, ndim: int) -> bool:
    return (
        isinstance(sharding, NamedSharding)
        and not sharding.mesh.empty
        and not (sharding.spec.unreduced or sharding.spec.reduced)
        and len(sharding.spec) <= ndim
    )


@functools.cache
def _partitioned(fn: LayerFn, stack: int, ndim: int) -> LayerFn:
    """``fn`` as a ``custom_partitioning`` op: its partitioning sees the shardings."""
    from jax.experimental.custom_partitioning import custom_partitioning

    op = custom_partitioning(fn)

    def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
        del result_shape
        (arg,) = arg_shapes
        sharding = arg.sharding
        if not _plain(sharding, ndim):
            sharding = NamedSharding(mesh, PartitionSpec())
        spec = _leaf_spec(sharding, ndim)
        lower = _local_layer_fn(fn, spec, dict(mesh.shape), tuple(arg.shape), stack)
        return mesh, lower, sharding, (sharding,)

    def infer(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
        del mesh, result_shape
        return arg_shapes[0].sharding

    letters = " ".join(f"a{i}" for i in range(ndim))
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=f"{letters} -> {letters}",
    )
    # custom_partitioning has no batching rule: a vmapped batch joins the
    # first stack axis (or becomes one), each layer still mapped alone.
    batchable = jax.custom_batching.custom_vmap(op)

    @batchable.def_vmap
    def _batched(
        axis_size: int, in_batched: list[Any], x: jax.Array
    ) -> tuple[jax.Array, bool]:
        (batched,) = in_batched
        if not batched:
            return batchable(x), False
        if stack == 0:
            return jax.vmap(fn)(x), True
        merged = x.reshape(axis_size * x.shape[1], *x.shape[2:])
        return batchable(merged).reshape(x.shape), True

    @jax.custom_jvp
    def apply(x: jax.Array) -> jax.Array:
        return batchable(x)

    @apply.defjvp
    def apply_jvp(
        primals: tuple[jax.Array], tangents: tuple[jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        return jax.jvp(fn, primals, tangents)

    return apply


def per_layer(fn: LayerFn, x: jax.Array, stack: int) -> jax.Array:
    """``fn(x)`` for a ``fn`` that maps each layer (stack index) of ``x`` alone.

    Unsharded, ``fn(x)``. Under GSPMD with ``x`` on a mesh (its sharding is
    known at trace time for ``Explicit`` axes, at partitioning time for
    ``Auto`` ones, through ``custom_partitioning``), ``fn`` runs on whole
    layers and the result keeps ``x``'s sharding: a sharded stack axis needs
    no collective; one sharded layer axis is moved onto a stack axis and back
    with two all-to-alls when its mesh size divides that stack axis's local
    size; otherwise each sharded layer axis is gathered once (nothing inside
    ``fn``). ``fn`` must be hashable and stable (it keys a cache).
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not _plain(sharding, x.ndim):
        return fn(x)
    assert isinstance(sharding, NamedSharding)
    types = set(sharding.mesh.axis_types)
    if types == {AxisType.Explicit}:
        spec = _leaf_spec(sharding, x.ndim)
        if not any(spec[stack:]):
            return fn(x)
        lower = _local_layer_fn(fn, spec, dict(sharding.mesh.shape), x.shape, stack)
        mapped = jax.shard_map(
            lower,
            mesh=sharding.mesh,
            in_specs=sharding.spec,
            out_specs=sharding.spec,
            axis_names=frozenset(a for names in spec for a in names),
        )
        return mapped(x)
    if AxisType.Manual in types:
        return fn(x)
    return _partitioned(fn, stack, x.ndim)(x)
