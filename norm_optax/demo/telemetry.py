"""Part 3: which layer explodes, and when, seen with ``record_layer_norms``.

A residual MLP of 12 stacked layers (one ``(12, 64, 64)`` kernel and one
``(12, 64)`` bias, run with :func:`jax.lax.scan` over the layer axis, as
``nnx.scan`` or Linen ``nn.scan`` leave a model) learns scikit-learn's 8x8
digits with SGD and momentum at a learning rate too large for it. Two runs
from the same weights on the same batches:

* ``unclipped``: ``nox.record_layer_norms(optax.sgd(lr, momentum),
  stack_axes=nox.masks.by_path("^layers/"))``;
* ``clipped``: the same around ``optax.chain(nox.clip_by_global_norm(1.0),
  optax.sgd(lr, momentum))``.

The whole training loop is one ``jax.lax.scan``, which stacks the recorded
per-layer gradient norms (``input_norms``) and update-to-weight ratios
(``update_ratios``) of every step; :func:`plot` draws them as heatmaps
(layers x steps, log colour scale) with
:func:`norm_optax.plotting.layer_norms_heatmap`. Needs scikit-learn;
:func:`plot` needs matplotlib.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import norm_optax as nox
from norm_optax.demo.constraints import load_digits_split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "TelemetryConfig",
    "TelemetryResult",
    "format_table",
    "plot",
    "run_all",
    "transforms",
]

Params = dict[str, dict[str, jax.Array]]

#: The stacked leaves: one stack axis under ``layers/``, none elsewhere.
STACK = nox.masks.by_path("^layers/")


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """Sizes and hyper-parameters of part 3 (the defaults are the full demo)."""

    layers: int = 12
    width: int = 64
    steps: int = 300
    batch: int = 128
    learning_rate: float = 0.2  # the unclipped run diverges at about step 10
    momentum: float = 0.9
    max_norm: float = 1.0  # clip_by_global_norm
    init_scale: float = 0.3  # residual kernels ~ N(0, init_scale^2 / width)

    @classmethod
    def quick(cls) -> TelemetryConfig:
        """The ``--quick`` run: the same model, fewer steps."""
        return cls(steps=60)


@dataclasses.dataclass
class TelemetryResult:
    """One run: the loss and the recorded per-layer statistics of every step."""

    name: str
    loss: np.ndarray  # (steps,)
    grad_norms: dict[str, np.ndarray]  # kernel path -> (steps,) or (steps, L)
    update_ratios: dict[str, np.ndarray]  # the same shapes
    test_accuracy: float
    seconds: float

    def first_nonfinite(self) -> tuple[int | None, str | None]:
        """The first step (1-based) with a non-finite gradient norm, and where.

        Where: the layers whose norm is non-finite at that step, named as
        :func:`norm_optax.layer_norms_dict` names them (``"all"`` when every
        layer is).
        """
        names, rows = _rows(self.grad_norms)
        bad = ~np.isfinite(rows)
        steps = np.nonzero(bad.any(axis=0))[0]
        if not steps.size:
            return None, None
        step = int(steps[0])
        if bad[:, step].all():
            return step + 1, "all"
        return step + 1, ", ".join(
            n for n, b in zip(names, bad[:, step], strict=True) if b
        )

    def first_explosion(self, factor: float = 100.0) -> tuple[int | None, str | None]:
        """The first step at which a layer's gradient norm exceeds ``factor``
        times its value at step 1 (or turns non-finite), and the layer: the
        one with the largest growth at that step."""
        names, rows = _rows(self.grad_norms)
        with np.errstate(invalid="ignore", divide="ignore"):
            growth = rows / rows[:, :1]
        over = ~np.isfinite(growth) | (growth > factor)
        steps = np.nonzero(over.any(axis=0))[0]
        if not steps.size:
            return None, None
        step = int(steps[0])
        column = np.where(np.isfinite(growth[:, step]), growth[:, step], np.inf)
        return step + 1, names[int(np.argmax(column))]

    def row(self) -> dict[str, Any]:
        """The numbers of the printed table."""
        nonfinite_step, nonfinite_layer = self.first_nonfinite()
        explosion_step, explosion_layer = self.first_explosion()
        _, grads = _rows(self.grad_norms)
        _, ratios = _rows(self.update_ratios)
        finite = np.isfinite(self.loss)
        return {
            "part": "telemetry",
            "run": self.name,
            "final_loss": float(self.loss[-1]),
            "min_loss": float(np.min(self.loss[finite])) if finite.any() else np.nan,
            "first_nonfinite_step": nonfinite_step,
            "first_nonfinite_layer": nonfinite_layer,
            "first_explosion_step": explosion_step,
            "first_explosion_layer": explosion_layer,
            "max_grad_norm": _finite_max(grads),
            "median_update_ratio": float(
                np.nanmedian(np.where(np.isfinite(ratios), ratios, np.nan))
            ),
            "layers": grads.shape[0],
            "test_accuracy": self.test_accuracy,
            "seconds": self.seconds,
        }


def _finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else float("nan")


def _rows(history: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    from norm_optax.plotting import layer_rows

    return layer_rows(history)


def init_params(config: TelemetryConfig, seed: int) -> Params:
    """Embedding ``(64, width)``, ``layers`` stacked ``(L, width, width)``, readout."""
    k_embed, k_layers, k_readout = jax.random.split(jax.random.key(seed), 3)
    w, n = config.width, config.layers
    return {
        "embed": {
            "kernel": jax.random.normal(k_embed, (64, w)) / 8.0,
            "bias": jnp.zeros(w),
        },
        "layers": {
            "kernel": jax.random.normal(k_layers, (n, w, w))
            * (config.init_scale / np.sqrt(w)),
            "bias": jnp.zeros((n, w)),
        },
        "readout": {
            "kernel": jax.random.normal(k_readout, (w, 10)) / np.sqrt(w),
            "bias": jnp.zeros(10),
        },
    }


def forward(params: Params, x: jax.Array) -> jax.Array:
    """``h + relu(h W_l + b_l)`` for each stacked layer, by ``jax.lax.scan``."""
    h = x @ params["embed"]["kernel"] + params["embed"]["bias"]

    def layer(h: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        return h + jax.nn.relu(h @ p["kernel"] + p["bias"]), None

    h, _ = jax.lax.scan(layer, h, params["layers"])
    return h @ params["readout"]["kernel"] + params["readout"]["bias"]


def _loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def transforms(config: TelemetryConfig) -> dict[str, optax.GradientTransformation]:
    """The two recorded optimizers, by name."""
    sgd = optax.sgd(config.learning_rate, momentum=config.momentum)
    clipped = optax.chain(nox.clip_by_global_norm(config.max_norm), sgd)
    return {
        "unclipped": nox.record_layer_norms(sgd, stack_axes=STACK),
        "clipped": nox.record_layer_norms(clipped, stack_axes=STACK),
    }


def _kernels(tree: Params) -> dict[str, jax.Array]:
    return {name: leaves["kernel"] for name, leaves in tree.items()}


def run_one(
    name: str,
    tx: optax.GradientTransformation,
    config: TelemetryConfig,
    data: tuple[np.ndarray, ...],
    seed: int,
) -> TelemetryResult:
    """Trains one run in a single ``jax.lax.scan``; the state is recorded per step."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    index = np.stack(
        [
            rng.choice(len(x_train), config.batch, replace=False)
            for _ in range(config.steps)
        ]
    )
    xs, ys = jnp.asarray(x_train[index]), jnp.asarray(y_train[index])
    params = init_params(config, seed)

    def step(carry: Any, batch: tuple[jax.Array, jax.Array]) -> tuple[Any, Any]:
        params, state = carry
        loss, grads = jax.value_and_grad(_loss)(params, *batch)
        updates, state = tx.update(grads, state, params)
        grad_norms = _kernels(optax.tree.get(state, "input_norms"))
        ratios = _kernels(optax.tree.get(state, "update_ratios"))
        return (optax.apply_updates(params, updates), state), (loss, grad_norms, ratios)

    @jax.jit
    def train(params: Params) -> Any:
        return jax.lax.scan(step, (params, tx.init(params)), (xs, ys))

    start = time.perf_counter()
    (final, _), (loss, grad_norms, ratios) = jax.block_until_ready(train(params))
    seconds = time.perf_counter() - start
    logits = forward(final, jnp.asarray(x_test))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_test)))
    return TelemetryResult(
        name=name,
        loss=np.asarray(loss),
        grad_norms=jax.tree.map(np.asarray, grad_norms),
        update_ratios=jax.tree.map(np.asarray, ratios),
        test_accuracy=accuracy,
        seconds=seconds,
    )


def run_all(
    config: TelemetryConfig,
    seed: int = 0,
    on_chunk: Callable[[int, str], None] | None = None,
) -> list[TelemetryResult]:
    """Both runs, from the same weights on the same batches."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    data = (
        x_train.reshape(len(x_train), -1),
        y_train,
        x_test.reshape(len(x_test), -1),
        y_test,
    )
    results = []
    for name, tx in transforms(config).items():
        results.append(run_one(name, tx, config, data, seed))
        if on_chunk is not None:
            on_chunk(config.steps, name)
    return results


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def format_table(results: Sequence[TelemetryResult]) -> str:
    """A Markdown table: divergence, where it starts, and the step sizes."""
    lines = [
        "| run | final loss | first non-finite step (layer) | first 100x growth "
        "step (layer) | max grad norm | median update ratio | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = r.row()
        lines.append(
            f"| {row['run']} | {_fmt(row['final_loss'])} | "
            f"{_fmt(row['first_nonfinite_step'], 'd')} "
            f"({_fmt(row['first_nonfinite_layer'])}) | "
            f"{_fmt(row['first_explosion_step'], 'd')} "
            f"({_fmt(row['first_explosion_layer'])}) | "
            f"{_fmt(row['max_grad_norm'])} | {_fmt(row['median_update_ratio'])} | "
            f"{row['test_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[TelemetryResult], steps: int | None = None) -> Figure:
    """Per run: per-layer gradient norm and update-to-weight ratio over steps.

    Two heatmaps per run (rows: the embedding, the stacked layers 0..L-1 and
    the readout; columns: steps; log colour scale; red: NaN or inf), the runs
    one above the other on shared colour ranges. ``steps`` limits the
    columns drawn (all by default).
    """
    from matplotlib.figure import Figure

    from norm_optax.plotting import layer_norms_heatmap

    def limits(series: str) -> tuple[float, float]:
        values = np.concatenate([_rows(getattr(r, series))[1].ravel() for r in results])
        positive = values[np.isfinite(values) & (values > 0)]
        return float(positive.min()), float(positive.max())

    if steps is None:  # enough to see the divergence, and what clipping does
        firsts = [r.first_nonfinite()[0] for r in results]
        first = min((f for f in firsts if f is not None), default=None)
        total = len(results[0].loss)
        steps = total if first is None else min(total, max(40, 3 * first))
    fig = Figure(figsize=(13, 3.2 * len(results) + 0.6), layout="constrained")
    axes = fig.subplots(len(results), 2, squeeze=False)
    grad_range, ratio_range = limits("grad_norms"), limits("update_ratios")
    # Above 1e6 times the smallest value, one colour: the finite runs keep
    # their detail, an explosion shows as the top colour and then red.
    grad_range = (grad_range[0], min(grad_range[1], 1e6 * grad_range[0]))
    ratio_range = (ratio_range[0], min(ratio_range[1], 1e6 * ratio_range[0]))
    for (ax_grad, ax_ratio), r in zip(axes, results, strict=True):
        cut = slice(None, steps)
        grads = {k: v[cut] for k, v in r.grad_norms.items()}
        ratios = {k: v[cut] for k, v in r.update_ratios.items()}
        first, layer = r.first_nonfinite()
        note = f"non-finite from step {first} ({layer})" if first else "finite"
        layer_norms_heatmap(
            grads,
            ax=ax_grad,
            title=f"{r.name}: gradient norm per layer ({note})",
            label="gradient L2 norm",
            vmin=grad_range[0],
            vmax=grad_range[1],
            cmap="magma",
        )
        layer_norms_heatmap(
            ratios,
            ax=ax_ratio,
            title=f"{r.name}: update-to-weight ratio per layer",
            label="||update|| / ||weights||",
            vmin=ratio_range[0],
            vmax=ratio_range[1],
            cmap="viridis",
        )
    fig.suptitle(
        f"Residual MLP, 12 stacked layers, SGD + momentum at a too-large learning "
        f"rate, first {steps} steps: recorded with nox.record_layer_norms"
    )
    return fig
