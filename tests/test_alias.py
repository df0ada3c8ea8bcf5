"""``muon`` and ``scion`` (API.md 8.3): the recipes, their peers, real models.

* the signatures of the contract;
* ``muon(nesterov=False)`` follows ``optax.contrib.muon`` on a flat tree of
  2-D and 1-D leaves, step by step (weight decay, a separate Adam learning
  rate, a schedule);
* ``scion`` follows a float64 NumPy port of the authors' reference
  (``LIONS-EPFL/scion`` at commit ``f58a393e``: its ``Scion`` optimizer with
  the ``Spectral`` and ``BiasRMS`` norms, weights ``(out, in)``) in both
  modes, with ``axis="out_first"`` and on the transposed weights;
* schedules as learning rates; Muon's singular values in the stated range;
  constrained Scion inside its radius;
* stacked models (NNX ``nnx.vmap``/``nnx.scan``, Linen ``nn.scan``, Equinox
  ``(out, in)``) trained with both against their unstacked / Flax-layout
  twins, layer by layer, and the pitfall of ``optax.contrib.muon``'s default
  labelling on the stacked model, asserted.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import norm_optax as nox
from tests import test_layouts as lay
from tests.cases import normal_tree

# ---------------------------------------------------------------------------
# The contract's signatures.
# ---------------------------------------------------------------------------

MUON = {
    "learning_rate": inspect.Parameter.empty,
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "ns_coeffs": "standard",
    "weight_decay": 0.0,
    "dims_scale": "muon",
    "muon_mask": None,
    "axis": None,
    "stack_axes": None,
    "adam_learning_rate": None,
    "adam_b1": 0.9,
    "adam_b2": 0.999,
    "adam_eps": 1e-8,
    "adam_weight_decay": 0.0,
}
SCION = {
    "learning_rate": inspect.Parameter.empty,
    "radius": 1.0,
    "beta": 0.9,
    "norm": "auto",
    "dims_scale": "spectral",
    "constrained": False,
    "axis": None,
    "stack_axes": None,
    "method": "newton_schulz",
    "ns_steps": 5,
    "ns_coeffs": "standard",
}


@pytest.mark.parametrize(
    ("fn", "expected", "positional"),
    [(nox.muon, MUON, 2), (nox.scion, SCION, 2)],
    ids=["muon", "scion"],
)
def test_signature(fn: Any, expected: dict[str, Any], positional: int) -> None:
    params = inspect.signature(fn).parameters
    assert list(params) == list(expected)
    for i, (name, default) in enumerate(expected.items()):
        assert params[name].default == default, name
        kind = params[name].kind
        if i < positional:
            assert kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        else:
            assert kind is inspect.Parameter.KEYWORD_ONLY, name
    assert fn.__name__ in nox.__all__


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nox.muon(-1e-3), "learning_rate"),
        (lambda: nox.muon(float("nan")), "learning_rate"),
        (lambda: nox.muon(1e-3, momentum=1.5), "momentum"),
        (lambda: nox.muon(1e-3, weight_decay=-0.1), "weight_decay"),
        (lambda: nox.muon(1e-3, adam_learning_rate=float("inf")), "adam_learning_rate"),
        (lambda: nox.scion(-0.1), "learning_rate"),
        (lambda: nox.scion(0.1, beta=-0.5), "beta"),
    ],
)
def test_bad_values_raise_at_construction(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------
# muon against optax.contrib.muon.
# ---------------------------------------------------------------------------

FLAT = {"w1": (12, 24), "b1": (24,), "w2": (24, 6), "b2": (6,), "emb": (6, 6)}


def _grads(t: int, shapes: dict[str, Any], scale: float = 1.0) -> Any:
    return normal_tree(1000 + t, shapes, scale=scale)


def _run(tx: optax.GradientTransformation, params: Any, grads: list[Any]) -> Any:
    """The params after one update per gradient tree; the updates of each step."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates = []
    for g in grads:
        u, state = step(g, state, params)
        updates.append(u)
        params = optax.apply_updates(params, u)
    return params, updates


@pytest.mark.standard_promotion
@pytest.mark.parametrize(
    "settings",
    [
        {"learning_rate": 0.02, "momentum": 0.9},
        pytest.param(
            {
                "learning_rate": optax.cosine_decay_schedule(0.05, 6),
                "momentum": 0.8,
                "weight_decay": 0.1,
                "adam_learning_rate": 3e-3,
                "adam_weight_decay": 0.01,
                "adam_b2": 0.99,
            },
            marks=pytest.mark.slow,
        ),
    ],
    ids=["defaults", "schedule-decay-adam"],
)
def test_muon_follows_optax_contrib_muon(settings: dict[str, Any]) -> None:
    params = normal_tree(0, FLAT)
    grads = [_grads(t, FLAT) for t in range(6)]
    ours = nox.muon(**settings, nesterov=False)
    peer_settings = dict(settings)
    peer_settings["beta"] = peer_settings.pop("momentum")
    peer = optax.contrib.muon(**peer_settings, nesterov=False)
    got, got_updates = _run(ours, params, grads)
    want, want_updates = _run(peer, params, grads)
    chex.assert_trees_all_close(got_updates, want_updates, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    # Both orthogonalised the matrices and used Adam on the vectors.
    u = np.asarray(got_updates[-1]["w1"], np.float64)
    assert not np.allclose(u, 0.0)
    # The default (Nesterov) differs: it is not optax's recipe.
    nesterov, _ = _run(nox.muon(**settings), params, grads)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(nesterov["w1"], want["w1"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# scion against a float64 NumPy port of the authors' reference.
# ---------------------------------------------------------------------------

NS_STANDARD = (3.4445, -4.7750, 2.0315)


def _ref_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic Newton-Schulz iteration, as the reference runs it (float64)."""
    wide = g.shape[0] <= g.shape[1]
    x = g if wide else g.T
    x = x / (np.linalg.norm(x) + 1e-7)
    a, b, c = NS_STANDARD
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def _ref_direction(g: np.ndarray) -> np.ndarray:
    """The reference's Spectral norm for ``(out, in)`` weights, BiasRMS for biases."""
    if g.ndim == 2:
        d_out, d_in = g.shape
        return _ref_newton_schulz(g) * math.sqrt(d_out / d_in)
    rms = np.sqrt(np.mean(g**2, axis=0, keepdims=True))
    return g / (rms + 1e-8)


def _ref_scion(
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    *,
    lr: float,
    momentum: float,
    scale: float,
    unconstrained: bool,
) -> dict[str, np.ndarray]:
    """The reference's step: buffer from zeros, the LMO, the (Frank-Wolfe) update."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for g in grads:
        for k in p:
            buf[k] = (1 - momentum) * buf[k] + momentum * np.asarray(g[k], np.float64)
            update = scale * _ref_direction(buf[k])
            if not unconstrained:
                p[k] = p[k] * (1 - lr)
            p[k] = p[k] - lr * update
    return p


TORCH_LAYOUT = {"w1": (24, 12), "b1": (24,), "w2": (6, 24), "b2": (6,)}


def _transposed(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v.T if v.ndim == 2 else v for k, v in tree.items()}


@pytest.mark.parametrize(
    "constrained",
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["unconstrained", "fw"],
)
def test_scion_follows_the_reference(constrained: bool) -> None:
    params = normal_tree(0, TORCH_LAYOUT, scale=0.2)
    grads = [_grads(t, TORCH_LAYOUT) for t in range(5)]
    lr, momentum, radius = 0.05, 0.1, 3.0
    want = _ref_scion(
        jax.tree.map(np.asarray, params),
        [jax.tree.map(np.asarray, g) for g in grads],
        lr=lr,
        momentum=momentum,
        scale=radius,
        unconstrained=not constrained,
    )
    beta = 1 - momentum
    out_first, _ = _run(
        nox.scion(lr, radius, beta=beta, constrained=constrained, axis="out_first"),
        params,
        grads,
    )
    _assert_close(_f64(out_first), want, rtol=1e-5, atol=1e-5 * radius * lr)
    flax, _ = _run(
        nox.scion(lr, radius, beta=beta, constrained=constrained),
        _transposed(params),
        [_transposed(g) for g in grads],
    )
    _assert_close(_f64(_transposed(flax)), want, rtol=1e-5, atol=1e-5 * radius * lr)


def _f64(tree: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _assert_close(
    got: dict[str, Any], want: dict[str, np.ndarray], rtol: float, atol: float
) -> None:
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(
            got[key], want[key], rtol=rtol, atol=atol, err_msg=key
        )


@pytest.mark.slow
@pytest.mark.usefixtures("x64")
def test_scion_follows_the_reference_in_float64() -> None:
    params = normal_tree(0, TORCH_LAYOUT, dtype=jnp.float64, scale=0.2)
    grads = [_grads(t, TORCH_LAYOUT) for t in range(4)]
    grads = [jax.tree.map(lambda x: x.astype(jnp.float64), g) for g in grads]
    for constrained in (False, True):
        want = _ref_scion(
            jax.tree.map(np.asarray, params),
            [jax.tree.map(np.asarray, g) for g in grads],
            lr=0.1,
            momentum=0.5,
            scale=2.0,
            unconstrained=not constrained,
        )
        tx = nox.scion(0.1, 2.0, beta=0.5, constrained=constrained, axis="out_first")
        got, _ = _run(tx, params, grads)
        # The reference adds 1e-8 to the bias RMS (a relative 1e-8 / rms on
        # the bias steps); otherwise the same maths.
        _assert_close(_f64(got), want, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------
# Schedules, the singular values of Muon's updates, Scion's radius.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_schedules_scale_every_update_by_their_value() -> None:
    """Without decay every update is linear in the learning rate (Adam's too)."""
    params = normal_tree(0, FLAT)
    grads = [_grads(t, FLAT) for t in range(3)]
    schedule = optax.piecewise_constant_schedule(0.5, {1: 0.1, 2: 4.0})
    for make in (
        lambda lr: nox.muon(lr, stack_axes=0),
        lambda lr: nox.scion(lr, 2.0, norm="auto"),
    ):
        scheduled, one = make(schedule), make(1.0)
        s1, s2 = scheduled.init(params), one.init(params)
        for t, g in enumerate(grads):
            u1, s1 = scheduled.update(g, s1, params)
            u2, s2 = one.update(g, s2, params)
            factor = float(schedule(t))
            chex.assert_trees_all_close(
                u1, jax.tree.map(lambda x, f=factor: f * x, u2), rtol=1e-6, atol=1e-7
            )
    # The constrained step: -lr * (u + p), the same schedule value on both.
    fw, plain = nox.scion(schedule, constrained=True), nox.scion(schedule)
    s1, s2 = fw.init(params), plain.init(params)
    for t, g in enumerate(grads):
        u1, s1 = fw.update(g, s1, params)
        u2, s2 = plain.update(g, s2, params)
        factor = float(schedule(t))
        chex.assert_trees_all_close(
            u1,
            jax.tree.map(lambda a, p, f=factor: a - f * p, u2, params),
            rtol=1e-6,
            atol=1e-6,
        )


def _singular_values(matrix: Any) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


@pytest.mark.standard_promotion
@pytest.mark.parametrize(
    ("coeffs", "low", "high"),
    [
        ("standard", 0.68, 1.21),
        pytest.param("polar_express", 0.85, 1.15, marks=pytest.mark.slow),
    ],
)
def test_muon_updates_have_singular_values_in_range(
    coeffs: str, low: float, high: float
) -> None:
    """Each layer of a stacked kernel: singular values of ``-update / (lr k)``."""
    shapes = {"layers": {"kernel": (3, 64, 32), "bias": (3, 32)}}
    params = normal_tree(0, shapes)
    lr = 0.01
    tx = nox.muon(lr, momentum=0.0, ns_coeffs=coeffs, stack_axes=1)
    state = tx.init(params)
    updates, _ = tx.update(normal_tree(1, shapes), state, params)
    kernel = np.asarray(updates["layers"]["kernel"])
    k = math.sqrt(max(1.0, 32 / 64))
    for layer in range(3):
        sv = _singular_values(-kernel[layer] / (lr * k))
        assert low <= sv.min(), (layer, sv.min())
        assert sv.max() <= high, (layer, sv.max())
    # The biases went to Adam: its first step is lr * sign(g), elementwise.
    bias = np.asarray(updates["layers"]["bias"])
    np.testing.assert_allclose(np.abs(bias), lr, rtol=1e-4)


@pytest.mark.parametrize(
    "method", ["svd", pytest.param("newton_schulz", marks=pytest.mark.slow)]
)
def test_constrained_scion_stays_inside_its_radius(method: str) -> None:
    """Frank-Wolfe: a convex combination of the iterate and a point of the ball.

    The ball of a matrix leaf is ``sigma_max(W) <= radius * k`` with
    ``k = sqrt(fan_out / fan_in)``; of a bias, ``rms(b) <= radius``. With the
    Newton-Schulz LMO the "unit" ball is the range of its singular values
    (up to 1.21), with the SVD it is exact.
    """
    shapes = {"w": (16, 8), "b": (8,)}
    radius = 1.5
    k = math.sqrt(8 / 16)
    bound = 1.0 + 1e-5 if method == "svd" else 1.21
    params = jax.tree.map(lambda x: 0.1 * x, normal_tree(0, shapes))
    grads = [_grads(t, shapes, scale=1.0 + t) for t in range(12)]
    tx = nox.scion(0.3, radius, constrained=True, method=method)
    unconstrained = nox.scion(0.3, radius, method=method)
    for fw in (True, False):
        p, state = params, (tx if fw else unconstrained).init(params)
        sigma, rms = [], []
        for g in grads:
            u, state = (tx if fw else unconstrained).update(g, state, p)
            p = optax.apply_updates(p, u)
            sigma.append(_singular_values(p["w"]).max() / (radius * k))
            rms.append(float(np.sqrt(np.mean(np.asarray(p["b"]) ** 2))) / radius)
        if fw:
            assert max(sigma) <= bound, max(sigma)
            assert max(rms) <= 1.0 + 1e-5, max(rms)
            assert max(sigma) > 0.5  # it moved towards the boundary
        else:  # the same steps without the constraint leave the ball
            assert max(sigma) > bound
            assert max(rms) > 1.0 + 1e-5


# ---------------------------------------------------------------------------
# Stacked models against their twins, and optax.contrib.muon's pitfall.
# ---------------------------------------------------------------------------


def _muon(stack: Any = None, axis: Any = None) -> optax.GradientTransformation:
    return nox.muon(
        0.05, weight_decay=0.1, adam_weight_decay=0.1, axis=axis, stack_axes=stack
    )


def _scion(stack: Any = None, axis: Any = None) -> optax.GradientTransformation:
    return nox.scion(0.05, 2.0, constrained=True, axis=axis, stack_axes=stack)


MAKERS = {"muon": _muon, "scion": _scion}


def _nnx_twin_runs(name: str) -> tuple[Any, Any]:
    """(stacked run unstacked layer by layer, the unstacked model's run)."""
    make = MAKERS[name]
    model = lay._stacked_nnx("layers")
    stack = nox.masks.stack_axes_from_partitions(nnx.state(model, nnx.Param))
    init = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = lay._train_nnx(model, make(stack))
    unstacked = lay.NnxUnstacked(nnx.Rngs(1))
    state = nnx.state(unstacked, nnx.Param)
    nnx.replace_by_pure_dict(state, lay._unstack_nnx(init))
    nnx.update(unstacked, state)
    want = lay._train_nnx(unstacked, make())
    return lay._unstack_nnx(got), want


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_nnx_stacked_model_trains_with_muon_as_unstacked() -> None:
    got, want = _nnx_twin_runs("muon")
    chex.assert_trees_all_close(got, want, **lay.TOL)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_nnx_stacked_model_trains_with_scion_as_unstacked() -> None:
    got, want = _nnx_twin_runs("scion")
    chex.assert_trees_all_close(got, want, **lay.TOL)


@pytest.mark.standard_promotion
def test_optax_contrib_muon_default_labelling_on_a_stacked_model() -> None:
    """The pitfall: ``ndim == 2`` sends stacked kernels to Adam and
    orthogonalises the ``(L, out)`` bias and scale stacks as one matrix each.
    """
    model = lay._stacked_nnx("layers")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(
        lambda x: jnp.cos(3.0 * x + 1.0) + 0.1 * jnp.arange(x.size).reshape(x.shape),
        params,
    )
    lr = 0.05
    blocks = grads["blocks"]
    peer = optax.contrib.muon(lr, nesterov=False)
    peer_u, _ = peer.update(grads, peer.init(params), params)
    # The (L, 4, 4) kernel went to Adam: its first step is lr * sign(g).
    kernel = np.asarray(peer_u["blocks"]["linear"]["kernel"])
    np.testing.assert_allclose(
        kernel, -lr * np.sign(np.asarray(blocks["linear"]["kernel"])), rtol=1e-4
    )
    # The (L, 4) bias and LayerNorm stacks were orthogonalised as (L, 4)
    # matrices, mixing the layers: one polar factor over the whole stack.
    for path in (("linear", "bias"), ("norm", "scale"), ("norm", "bias")):
        leaf = np.asarray(peer_u["blocks"][path[0]][path[1]])
        g = np.asarray(blocks[path[0]][path[1]], np.float64)
        scale = math.sqrt(max(1.0, g.shape[1] / g.shape[0]))
        sv = _singular_values(-leaf / (lr * scale))
        assert sv.min() >= 0.68, (path, sv)
        assert sv.max() <= 1.21, (path, sv)
        # ... which is not what each layer's own direction would be.
        assert not np.allclose(np.abs(leaf), lr, rtol=1e-3), path

    # nox.muon with the recorded stack axes: each kernel layer orthogonalised
    # on its own, the biases and scales to Adam (lr * sign(g)).
    stack = nox.masks.stack_axes_from_partitions(nnx.state(model, nnx.Param))
    ours = nox.muon(lr, nesterov=False, stack_axes=nnx.to_pure_dict(stack))
    ours_u, _ = ours.update(grads, ours.init(params), params)
    kernel = np.asarray(ours_u["blocks"]["linear"]["kernel"])
    for layer in range(kernel.shape[0]):
        sv = _singular_values(-kernel[layer] / lr)
        assert sv.min() >= 0.68, (layer, sv)
        assert sv.max() <= 1.21, (layer, sv)
    for path in (("linear", "bias"), ("norm", "scale"), ("norm", "bias")):
        leaf = np.asarray(ours_u["blocks"][path[0]][path[1]])
        g = np.asarray(blocks[path[0]][path[1]])
        np.testing.assert_allclose(leaf, -lr * np.sign(g), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_optax_contrib_muon_trains_a_stacked_model_differently() -> None:
    """Trained a few steps, the stacked model with optax's labelling is not
    the unstacked model trained by ``optax.contrib.muon``."""
    lr = 0.05
    params = nnx.to_pure_dict(nnx.state(lay._stacked_nnx("layers"), nnx.Param))
    naive = lay._train_nnx(lay._stacked_nnx("layers"), optax.contrib.muon(lr))
    unstacked = lay.NnxUnstacked(nnx.Rngs(1))
    state = nnx.state(unstacked, nnx.Param)
    nnx.replace_by_pure_dict(state, lay._unstack_nnx(params))
    nnx.update(unstacked, state)
    want = lay._train_nnx(unstacked, optax.contrib.muon(lr))
    lay._assert_differs(lay._unstack_nnx(naive)["blocks"], want["blocks"])


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("name", ["muon", "scion"])
def test_linen_scan_model_trains_as_unrolled(name: str) -> None:
    make = MAKERS[name]
    boxed = lay.LinenScanned().init(jax.random.key(0), lay.X)["params"]
    got = lay._train_linen(
        lay.LinenScanned(), boxed, make(nox.masks.stack_axes_from_partitions())
    )
    want = lay._train_linen(lay.LinenUnrolled(), lay._unroll_linen(boxed), make())
    chex.assert_trees_all_close(lay._unroll_linen(got), want, **lay.TOL)
    naive = lay._train_linen(lay.LinenScanned(), boxed, make())
    lay._assert_differs(lay._unroll_linen(naive), want)


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("name", ["muon", "scion"])
def test_equinox_model_trains_as_flax_layout(name: str) -> None:
    make = MAKERS[name]
    stack = nox.masks.by_path("^layers/")
    model = lay._eqx_model()
    got = lay._train_eqx(model, make(stack, axis="out_first"))
    want = lay._train_flax_layout(lay._flax_layout(model), make())
    chex.assert_trees_all_close(lay._flax_layout(got), want, **lay.TOL)
    # Stacked but in the Flax convention: the (out, in) weights read wrongly.
    transposed = lay._train_eqx(lay._eqx_model(), make(stack))
    lay._assert_differs(lay._flax_layout(transposed)["blocks"], want["blocks"])


@pytest.mark.slow
def test_equinox_params_keep_none_leaves_and_modules() -> None:
    params = eqx.filter(lay._eqx_model(), eqx.is_inexact_array)
    tx = nox.scion(0.1, stack_axes=nox.masks.by_path("^layers/"), axis="out_first")
    updates, _ = tx.update(params, tx.init(params), params)
    assert updates.activation is None
    assert isinstance(updates, eqx.Module)
