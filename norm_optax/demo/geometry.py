"""Part 3: norm geometry. AdamW, Muon and Scion on the same small MLP (Flax NNX).

A three-layer MLP (``64 -> 128 -> 64 -> 10``, tanh) learns scikit-learn's
bundled 8x8 digits (the data of part 2, flattened). Every run starts from
the same weights and sees the same batches; only the optimizer changes:

* ``adamw``: ``optax.adamw(lr, weight_decay=wd)``, the baseline;
* ``muon``: ``nox.muon(lr, adam_learning_rate=adam_lr)``: each kernel's
  momentum orthogonalised (Newton-Schulz), the biases to AdamW;
* ``scion``: ``nox.scion(lr, radius)``: steepest descent under the spectral
  norm for the kernels and the RMS norm for the biases (``norm="auto"``);
* ``scion_constrained``: ``nox.scion(lr, radius, constrained=True,
  method="svd")``: the conditional-gradient (Frank-Wolfe) step
  ``p <- (1 - lr) p - lr radius k d(m)``, whose iterates stay in the
  radius-ball when they start there (the exact polar factor, so that the
  ball is exact; with Newton-Schulz its "unit" ball reaches 1.21).

Every number printed comes from the run: the per-layer spectral norms of the
weights (``numpy.linalg.svd``) over training; for Muon, the singular values
of every update of every kernel divided by ``lr * k``, which the contract
puts in ``[0.68, 1.21]`` (5 steps of the standard coefficients) on the
directions whose input singular value is at least 5% of the largest; for
constrained Scion, each kernel's largest singular value divided by
``radius * k`` and each bias' RMS divided by ``radius`` (at most 1).
Needs flax and scikit-learn; :func:`plot` needs matplotlib.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import norm_optax as nox
from norm_optax.demo.constraints import load_digits_split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MLP",
    "GeometryConfig",
    "GeometryResult",
    "checks",
    "format_table",
    "optimizers",
    "plot",
    "run_all",
]

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
LAYERS = ("dense1", "dense2", "head")
#: The Muon range of API section 8.1 (5 steps, the standard coefficients).
MUON_RANGE = (0.68, 1.21)
#: Directions whose input singular value is at least this fraction of the largest.
KEPT = 0.05


@dataclasses.dataclass(frozen=True)
class GeometryConfig:
    """Sizes and hyper-parameters of part 3 (the defaults are the full demo)."""

    steps: int = 400
    batch: int = 128
    hidden: tuple[int, int] = (128, 64)
    adamw_lr: float = 3e-3
    weight_decay: float = 0.01
    muon_lr: float = 0.02
    adam_lr: float = 3e-3  # Muon's AdamW leaves (the biases)
    scion_lr: float = 0.01
    scion_radius: float = 3.0
    constrained_lr: float = 0.05
    constrained_radius: float = 6.0
    eval_every: int = 10

    @classmethod
    def quick(cls) -> GeometryConfig:
        """The ``--quick`` run: the same problem, fewer steps."""
        return cls(steps=60)


class MLP(nnx.Module):
    """dense(128) -> tanh -> dense(64) -> tanh -> dense(10)."""

    def __init__(self, hidden: tuple[int, int], rngs: nnx.Rngs) -> None:
        self.dense1 = nnx.Linear(64, hidden[0], rngs=rngs)
        self.dense2 = nnx.Linear(hidden[0], hidden[1], rngs=rngs)
        self.head = nnx.Linear(hidden[1], 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.tanh(self.dense1(x.reshape(x.shape[0], -1)))
        x = jnp.tanh(self.dense2(x))
        return self.head(x)


def optimizers(
    config: GeometryConfig, names: Sequence[str] | None = None
) -> dict[str, optax.GradientTransformation]:
    """The optimizers compared, by name."""
    c = config
    table: dict[str, Callable[[], optax.GradientTransformation]] = {
        "adamw": lambda: optax.adamw(c.adamw_lr, weight_decay=c.weight_decay),
        "muon": lambda: nox.muon(c.muon_lr, adam_learning_rate=c.adam_lr),
        "scion": lambda: nox.scion(c.scion_lr, c.scion_radius),
        "scion_constrained": lambda: nox.scion(
            c.constrained_lr, c.constrained_radius, constrained=True, method="svd"
        ),
    }
    wanted = list(table) if names is None else list(names)
    unknown = [name for name in wanted if name not in table]
    if unknown:
        raise ValueError(f"Unknown runs {unknown}; choose from {list(table)}.")
    return {name: table[name]() for name in wanted}


def dims_scale(shape: tuple[int, ...], kind: str) -> float:
    """``k`` of a ``(fan_in, fan_out)`` kernel: Muon's or Scion's (spectral)."""
    fan_in, fan_out = shape
    if kind == "muon":
        return math.sqrt(max(1.0, fan_out / fan_in))
    return math.sqrt(fan_out / fan_in)


@dataclasses.dataclass
class GeometryResult:
    """Curves and trained weights of one run."""

    name: str
    losses: np.ndarray  # training loss of every step
    eval_steps: np.ndarray
    sigmas: dict[str, np.ndarray]  # layer -> largest singular value at eval_steps
    test_accuracy: float
    kernels: dict[str, np.ndarray]  # layer -> trained kernel (fan_in, fan_out)
    biases: dict[str, np.ndarray]
    update_range: tuple[float, float] | None  # Muon: (min kept, max) of sv / (lr k)
    seconds: float

    def row(self) -> dict[str, Any]:
        """The table row of this run."""
        return {
            "part": "geometry",
            "run": self.name,
            "final_loss": float(np.mean(self.losses[-10:])),
            "test_accuracy": self.test_accuracy,
            "sigmas": {k: float(v[-1]) for k, v in self.sigmas.items()},
            "update_range": self.update_range,
            "seconds": self.seconds,
        }


def _singular_values(matrix: jax.Array) -> jax.Array:
    return jnp.linalg.svd(matrix.astype(jnp.float32), compute_uv=False)


def train(
    name: str,
    tx: optax.GradientTransformation,
    data: Data,
    config: GeometryConfig,
    seed: int = 0,
    on_chunk: Callable[[int], None] | None = None,
) -> GeometryResult:
    """Trains one MLP with ``tx`` (functional loop over ``nnx.split``)."""
    x_train, y_train, x_test, y_test = data
    graphdef, state = nnx.split(MLP(config.hidden, nnx.Rngs(seed)), nnx.Param)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)
    is_muon = name == "muon"
    momentum = 0.95  # nox.muon's default

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, p)
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p: Any, s: Any, x: jax.Array, y: jax.Array) -> tuple[Any, ...]:
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        ranges = jnp.zeros((len(LAYERS), 2))
        if is_muon:  # sv of each kernel update / (lr k); inputs g + mu * m
            trace = optax.tree.get(s, "trace")
            rows = []
            for layer in LAYERS:
                kernel = updates[layer]["kernel"]
                k = dims_scale(kernel.shape, "muon")
                out = _singular_values(-kernel / (config.muon_lr * k))
                given = grads[layer]["kernel"] + momentum * trace[layer]["kernel"]
                inp = _singular_values(given)
                kept = inp >= KEPT * inp[0]
                low = jnp.min(jnp.where(kept, jnp.sort(out)[::-1], jnp.inf))
                rows.append(jnp.stack([low, out[0]]))
            ranges = jnp.stack(rows)
        return optax.apply_updates(p, updates), s, loss, ranges

    @jax.jit
    def accuracy(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(nnx.merge(graphdef, p)(x), axis=-1) == y)

    def sigmas_of(p: Any) -> dict[str, float]:
        return {
            layer: float(np.linalg.svd(np.asarray(p[layer]["kernel"]))[1][0])
            for layer in LAYERS
        }

    rng = np.random.default_rng(seed)
    epochs = -(-config.steps * config.batch // len(x_train)) + 1
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(epochs)])
    losses, eval_steps = [], [0]
    sigmas = {layer: [s] for layer, s in sigmas_of(params).items()}
    low, high = math.inf, 0.0
    start = time.perf_counter()
    for t in range(1, config.steps + 1):
        idx = order[(t - 1) * config.batch : t * config.batch]
        params, opt_state, loss, ranges = step(
            params, opt_state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
        )
        losses.append(loss)
        if is_muon:
            r = np.asarray(ranges)
            low, high = min(low, float(r[:, 0].min())), max(high, float(r[:, 1].max()))
        if t % config.eval_every == 0 or t == config.steps:
            eval_steps.append(t)
            for layer, s in sigmas_of(params).items():
                sigmas[layer].append(s)
            if on_chunk is not None:
                on_chunk(t - eval_steps[-2])
    seconds = time.perf_counter() - start
    acc = float(accuracy(params, jnp.asarray(x_test), jnp.asarray(y_test)))
    return GeometryResult(
        name=name,
        losses=np.asarray(jax.device_get(losses)),
        eval_steps=np.asarray(eval_steps),
        sigmas={k: np.asarray(v) for k, v in sigmas.items()},
        test_accuracy=acc,
        kernels={k: np.asarray(params[k]["kernel"]) for k in LAYERS},
        biases={k: np.asarray(params[k]["bias"]) for k in LAYERS},
        update_range=(low, high) if is_muon else None,
        seconds=seconds,
    )


def _flat_digits(seed: int) -> Data:
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    return (
        x_train.reshape(len(x_train), -1),
        y_train,
        x_test.reshape(len(x_test), -1),
        y_test,
    )


def run_all(
    config: GeometryConfig,
    seed: int = 0,
    names: Sequence[str] | None = None,
    on_chunk: Callable[[int, str], None] | None = None,
) -> list[GeometryResult]:
    """Trains one MLP per optimizer, same init and batches for all."""
    data = _flat_digits(seed)
    results = []
    for name, tx in optimizers(config, names).items():
        tick = None if on_chunk is None else _bind(on_chunk, name)
        results.append(train(name, tx, data, config, seed, tick))
    return results


def _bind(on_chunk: Callable[[int, str], None], name: str) -> Callable[[int], None]:
    return lambda steps: on_chunk(steps, f"part 3: {name}")


def format_table(results: Sequence[GeometryResult]) -> str:
    """A Markdown table: loss, accuracy, each layer's spectral norm."""
    lines = [
        "| run | final loss | test accuracy | "
        + " | ".join(f"sigma_max {layer}" for layer in LAYERS)
        + " | wall time (s) |",
        "|---|---:|---:|" + "---:|" * len(LAYERS) + "---:|",
    ]
    for r in results:
        sig = " | ".join(f"{r.sigmas[layer][-1]:.4g}" for layer in LAYERS)
        lines.append(
            f"| {r.name} | {np.mean(r.losses[-10:]):.4f} | {r.test_accuracy:.3f} | "
            f"{sig} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def constrained_ratios(
    result: GeometryResult, radius: float
) -> dict[str, tuple[float, float]]:
    """Per layer: ``sigma_max / (radius k)`` and ``rms(bias) / radius``."""
    out = {}
    for layer in LAYERS:
        kernel = result.kernels[layer]
        k = dims_scale(kernel.shape, "spectral")
        sigma = float(np.linalg.svd(kernel.astype(np.float64), compute_uv=False)[0])
        bias = result.biases[layer].astype(np.float64)
        out[layer] = (sigma / (radius * k), float(np.sqrt(np.mean(bias**2))) / radius)
    return out


def checks(results: Sequence[GeometryResult], config: GeometryConfig) -> list[str]:
    """One line per promise, computed from the run.

    Muon: over every step and every kernel, the singular values of the
    update divided by ``lr * k`` are at most 1.21, and at least 0.68 on the
    directions whose input singular value is at least 5% of the largest.
    Constrained Scion (exact SVD LMO): every kernel's largest singular value
    is at most ``radius * k`` and every bias' RMS at most ``radius``, up to
    float32 rounding (relative ``1e-5``).
    """
    by_name = {r.name: r for r in results}
    lines = []
    if "muon" in by_name:
        r = by_name["muon"]
        assert r.update_range is not None
        low, high = r.update_range
        lo, hi = MUON_RANGE
        ok = lo <= low and high <= hi
        lines.append(
            f"check muon: over {len(r.losses)} steps x {len(LAYERS)} kernels, the "
            f"update's singular values / (lr k) span [{low:.4f}, {high:.4f}] "
            f"(kept directions) within [{lo}, {hi}] -> {'OK' if ok else 'FAILED'}"
        )
    if "scion_constrained" in by_name:
        ratios = constrained_ratios(
            by_name["scion_constrained"], config.constrained_radius
        )
        worst = max(max(v) for v in ratios.values())
        per_layer = ", ".join(
            f"{layer} {s:.5f}/{b:.5f}" for layer, (s, b) in ratios.items()
        )
        ok = worst <= 1.0 + 1e-5
        lines.append(
            f"check scion_constrained: sigma_max/(radius k) and rms(bias)/radius "
            f"per layer {per_layer} <= 1 -> {'OK' if ok else 'FAILED'}"
        )
    return lines


def plot(results: Sequence[GeometryResult]) -> Figure:
    """Training loss and each layer's spectral norm over training."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_sigma = fig.subplots(1, 2)
    styles = ("-", "--", ":")
    for r in results:
        steps = np.arange(1, len(r.losses) + 1)
        (line,) = ax_loss.plot(steps, r.losses, lw=1.2, label=r.name)
        for layer, style in zip(LAYERS, styles, strict=True):
            ax_sigma.plot(
                r.eval_steps,
                r.sigmas[layer],
                style,
                lw=1.4,
                color=line.get_color(),
            )
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="Loss")
    ax_sigma.set(
        xlabel="step",
        ylabel="largest singular value",
        title="Spectral norm per layer (- dense1, -- dense2, : head)",
    )
    fig.legend(loc="outside right center", fontsize=8)
    return fig
