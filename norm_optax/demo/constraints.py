"""Part 2: regularisation and weight constraints on a small CNN (Flax NNX).

A two-conv-layer CNN with max pooling and a dense head learns scikit-learn's
bundled 8x8 digits. Every run starts from the same weights and sees the same
batches; only the transform changes:

* ``plain``: ``optax.adam(lr)``;
* ``add_l2_decay``: L2 regularisation, coupled (the decay goes through Adam):
  ``optax.chain(nox.add_l2_decay(wd), optax.adam(lr))``;
* ``decoupled_decay``: AdamW-style decay, after Adam's scaling and before
  the learning rate: ``optax.chain(optax.scale_by_adam(),
  nox.add_l2_decay(wd), optax.scale(-lr))``;
* ``prox_l1``: the L1 proximal step, last: ``optax.chain(optax.adam(lr),
  nox.prox_l1(coeff, lr))``, which sets weights to exactly zero;
* ``max_norm``, ``unit_norm``, ``clip_weights``: projections, last in the
  chain, after the learning rate.

Decay and norm constraints apply to kernels only (``matrices_only``), not to
biases. Needs flax and scikit-learn; :func:`plot` needs matplotlib.
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
from flax import nnx

import norm_optax as nox

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CNN",
    "CNNConfig",
    "ConstraintResult",
    "checks",
    "format_table",
    "load_digits_split",
    "plot",
    "run_all",
    "transforms",
]

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Sizes and hyper-parameters of part 2 (the defaults are the full demo)."""

    steps: int = 600
    batch: int = 128
    learning_rate: float = 3e-3
    l2: float = 1e-3  # add_l2_decay, coupled
    weight_decay: float = 0.1  # decoupled decay
    l1: float = 0.3  # prox_l1
    max_norm: float = 1.5
    clip_value: float = 0.2
    eval_every: int = 25

    @classmethod
    def quick(cls) -> CNNConfig:
        """The ``--quick`` run: the same problem, fewer steps."""
        return cls(steps=150)


class CNN(nnx.Module):
    """conv(16) -> relu -> maxpool -> conv(32) -> relu -> maxpool -> dense(10)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(2 * 2 * 32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def load_digits_split(seed: int = 0) -> Data:
    """scikit-learn's 8x8 digits, scaled to ``[0, 1]``, 75% train / 25% test.

    Returns:
      ``(x_train, y_train, x_test, y_test)``, images of shape ``(n, 8, 8, 1)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=seed, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def transforms(
    config: CNNConfig, names: Sequence[str] | None = None
) -> dict[str, optax.GradientTransformation]:
    """The optimizers compared, by name."""
    lr = config.learning_rate
    mask = nox.masks.matrices_only
    table: dict[str, Callable[[], optax.GradientTransformation]] = {
        "plain": lambda: optax.adam(lr),
        "add_l2_decay": lambda: optax.chain(
            nox.add_l2_decay(config.l2, mask=mask), optax.adam(lr)
        ),
        "decoupled_decay": lambda: optax.chain(
            optax.scale_by_adam(),
            nox.add_l2_decay(config.weight_decay, mask=mask),
            optax.scale(-lr),
        ),
        "prox_l1": lambda: optax.chain(
            optax.adam(lr), nox.prox_l1(config.l1, lr, mask=mask)
        ),
        "max_norm": lambda: optax.chain(
            optax.adam(lr), nox.max_norm(config.max_norm, mask=mask)
        ),
        "unit_norm": lambda: optax.chain(optax.adam(lr), nox.unit_norm(mask=mask)),
        "clip_weights": lambda: optax.chain(
            optax.adam(lr), nox.clip_weights(config.clip_value)
        ),
    }
    wanted = list(table) if names is None else list(names)
    unknown = [name for name in wanted if name not in table]
    if unknown:
        raise ValueError(f"Unknown runs {unknown}; choose from {list(table)}.")
    return {name: table[name]() for name in wanted}


@dataclasses.dataclass
class ConstraintResult:
    """Accuracy curve and trained weights of one run."""

    name: str
    eval_steps: np.ndarray
    test_accuracy: np.ndarray
    kernels: dict[str, np.ndarray]  # path (conv1/kernel) -> trained kernel
    params: list[np.ndarray]  # every trained parameter
    seconds: float

    @property
    def zero_fraction(self) -> float:
        """Fraction of parameters that are exactly ``0.0``."""
        total = sum(p.size for p in self.params)
        zeros = sum(int(np.sum(p == 0)) for p in self.params)
        return zeros / total

    @property
    def unit_norms(self) -> np.ndarray:
        """L2 norm of every unit (output feature/channel) of every kernel."""
        return np.concatenate(
            [
                np.asarray(nox.unit_norms(jnp.asarray(k))).ravel()
                for k in self.kernels.values()
            ]
        )

    @property
    def max_unit_norm(self) -> float:
        """The largest of :attr:`unit_norms`."""
        return float(np.max(self.unit_norms))

    @property
    def weight_norm(self) -> float:
        """Global L2 norm of all parameters."""
        return float(nox.global_norm(self.params))

    def row(self) -> dict[str, Any]:
        """The table row of this run."""
        return {
            "part": "constraints",
            "run": self.name,
            "test_accuracy": float(self.test_accuracy[-1]),
            "zero_fraction": self.zero_fraction,
            "max_unit_norm": self.max_unit_norm,
            "weight_norm": self.weight_norm,
            "seconds": self.seconds,
        }


def train(
    name: str,
    tx: optax.GradientTransformation,
    data: Data,
    config: CNNConfig,
    seed: int = 0,
    on_chunk: Callable[[int], None] | None = None,
) -> ConstraintResult:
    """Trains one CNN with ``tx`` (``nnx.Optimizer``, ``nnx.jit``)."""
    x_train, y_train, x_test, y_test = data
    model = CNN(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(
        model: CNN, opt: nnx.Optimizer, x: jax.Array, y: jax.Array
    ) -> jax.Array:
        def loss_fn(model: CNN) -> jax.Array:
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(model(x), axis=-1) == y)

    # The same batches for every run: a permutation stream seeded by `seed`.
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(len(x_train)) for _ in range(_epochs(config, len(x_train)))]
    )
    x_test_j, y_test_j = jnp.asarray(x_test), jnp.asarray(y_test)
    eval_steps, accs = [], []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        idx = order[(step - 1) * config.batch : step * config.batch]
        train_step(model, opt, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
        if step % config.eval_every == 0 or step == config.steps:
            eval_steps.append(step)
            accs.append(float(accuracy(model, x_test_j, y_test_j)))
            if on_chunk is not None:
                on_chunk(step - (eval_steps[-2] if len(eval_steps) > 1 else 0))
    seconds = time.perf_counter() - start

    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    params = [np.asarray(leaf) for _, leaf in leaves]
    kernels = {
        _path_name(path): np.asarray(leaf)
        for path, leaf in leaves
        if np.ndim(leaf) >= 2
    }
    return ConstraintResult(
        name, np.array(eval_steps), np.array(accs), kernels, params, seconds
    )


def _path_name(path: Any) -> str:
    """``conv1/kernel`` for a key path into an NNX ``State``."""
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return name.removesuffix("/value")


def _epochs(config: CNNConfig, n: int) -> int:
    return -(-config.steps * config.batch // n) + 1


def run_all(
    config: CNNConfig,
    seed: int = 0,
    names: Sequence[str] | None = None,
    on_chunk: Callable[[int, str], None] | None = None,
) -> list[ConstraintResult]:
    """Trains one CNN per transform, same init and batches for all."""
    data = load_digits_split(seed)
    results = []
    for name, tx in transforms(config, names).items():
        tick = None if on_chunk is None else _bind(on_chunk, name)
        results.append(train(name, tx, data, config, seed, tick))
    return results


def _bind(on_chunk: Callable[[int, str], None], name: str) -> Callable[[int], None]:
    return lambda steps: on_chunk(steps, f"part 2: {name}")


def format_table(results: Sequence[ConstraintResult]) -> str:
    """A Markdown table: accuracy, zero fraction, max unit norm, weight norm."""
    lines = [
        "| run | test accuracy | exactly-zero weights | max unit norm | "
        "weight L2 norm | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.test_accuracy[-1]:.3f} | {r.zero_fraction:.1%} | "
            f"{r.max_unit_norm:.4g} | {r.weight_norm:.4g} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def checks(results: Sequence[ConstraintResult], config: CNNConfig) -> list[str]:
    """One line per guarantee, computed from the trained weights.

    ``prox_l1`` must produce exact zeros; ``max_norm`` must keep every unit
    norm at or below its bound (up to float32 rounding, relative ``1e-6``).
    """
    by_name = {r.name: r for r in results}
    lines = []
    if "prox_l1" in by_name:
        r = by_name["prox_l1"]
        total = sum(p.size for p in r.params)
        zeros = sum(int(np.sum(p == 0)) for p in r.params)
        verdict = "OK" if zeros > 0 else "FAILED"
        lines.append(
            f"check prox_l1: {zeros} of {total} weights ({zeros / total:.1%}) "
            f"are exactly 0.0 -> {verdict}"
        )
    if "max_norm" in by_name:
        r = by_name["max_norm"]
        largest = r.max_unit_norm
        ok = largest <= config.max_norm * (1 + 1e-6)
        lines.append(
            f"check max_norm: largest of {r.unit_norms.size} unit norms is "
            f"{largest:.7g} <= bound {config.max_norm:g} -> "
            f"{'OK' if ok else 'FAILED'}"
        )
    return lines


def plot(results: Sequence[ConstraintResult]) -> Figure:
    """Test-accuracy curves and histograms of the kernels' unit norms."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_acc, ax_hist = fig.subplots(1, 2)
    all_norms = np.concatenate([r.unit_norms for r in results])
    bins = np.linspace(0.0, float(np.max(all_norms)) * 1.02 + 1e-6, 40)
    for r in results:
        (line,) = ax_acc.plot(r.eval_steps, r.test_accuracy, lw=1.4, label=r.name)
        ax_hist.hist(
            r.unit_norms, bins=bins, histtype="step", lw=1.4, color=line.get_color()
        )
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="Test accuracy")
    fig.legend(loc="outside right center", fontsize=8)
    ax_hist.set(
        xlabel="unit L2 norm (per output channel / feature)",
        ylabel="number of units",
        title="Unit norms of the trained kernels",
    )
    return fig
