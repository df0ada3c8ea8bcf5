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
* ``prox_group_l1``: the group-lasso proximal step, last:
  ``optax.chain(optax.adam(lr), nox.prox_group_l1(coeff, lr, mask=convs))``,
  which sets whole units (every weight of an output channel) to exactly
  zero. It is applied to the two conv kernels only (``convs`` is
  ``nox.masks.by_path(CONV_KERNELS)``): pruning channels, not the classes
  of the dense head;
* ``max_norm``, ``unit_norm``, ``clip_weights``: projections, last in the
  chain, after the learning rate;
* ``clip_spectral_norm``: the largest singular value of each kernel,
  reshaped to ``(fan-in, units)``, kept at or below a bound, last:
  ``optax.chain(optax.adam(lr), nox.clip_spectral_norm(bound))`` (biases
  have fewer than two axes and pass through).

Decay and the per-unit constraints apply to kernels only
(``matrices_only``), not to biases. Every number printed comes from the
trained weights: exact zeros counted with ``== 0``, unit norms with
:func:`norm_optax.unit_norms`, singular values with ``numpy.linalg.svd``.
Needs flax and scikit-learn; :func:`plot` needs matplotlib.
"""

from __future__ import annotations

import dataclasses
import re
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
    "CONV_KERNELS",
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

#: The kernels that ``prox_group_l1`` prunes (a ``by_path`` pattern).
CONV_KERNELS = r"^conv\d+/kernel"


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Sizes and hyper-parameters of part 2 (the defaults are the full demo)."""

    steps: int = 600
    batch: int = 128
    learning_rate: float = 3e-3
    l2: float = 1e-3  # add_l2_decay, coupled
    weight_decay: float = 0.1  # decoupled decay
    l1: float = 0.3  # prox_l1
    group_l1: float = 3.0  # prox_group_l1, on the conv kernels
    max_norm: float = 1.5
    spectral_norm: float = 2.0  # clip_spectral_norm: bound on each kernel's sigma
    clip_value: float = 0.2
    eval_every: int = 25

    @classmethod
    def quick(cls) -> CNNConfig:
        """The ``--quick`` run: the same problem, fewer steps.

        The group-lasso coefficient is larger, so that whole units reach
        zero within the shorter run (at ``3.0`` one conv channel of 48 does
        by step 150, and 22 by step 600).
        """
        return cls(steps=150, group_l1=4.0)


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
    convs = nox.masks.by_path(CONV_KERNELS)
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
        "prox_group_l1": lambda: optax.chain(
            optax.adam(lr), nox.prox_group_l1(config.group_l1, lr, mask=convs)
        ),
        "max_norm": lambda: optax.chain(
            optax.adam(lr), nox.max_norm(config.max_norm, mask=mask)
        ),
        "unit_norm": lambda: optax.chain(optax.adam(lr), nox.unit_norm(mask=mask)),
        "clip_weights": lambda: optax.chain(
            optax.adam(lr), nox.clip_weights(config.clip_value)
        ),
        "clip_spectral_norm": lambda: optax.chain(
            optax.adam(lr), nox.clip_spectral_norm(config.spectral_norm)
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
    def zero_units(self) -> dict[str, tuple[int, int]]:
        """Per kernel: how many units are exactly zero (every weight), of how many."""
        return {
            name: (int(np.sum(np.all(_as_matrix(k) == 0, axis=0))), k.shape[-1])
            for name, k in self.kernels.items()
        }

    @property
    def zero_unit_fraction(self) -> float:
        """Fraction of the kernels' units whose every weight is exactly ``0.0``."""
        counts = self.zero_units.values()
        return sum(z for z, _ in counts) / sum(n for _, n in counts)

    @property
    def sigmas(self) -> dict[str, float]:
        """Largest singular value of each kernel as a ``(fan-in, units)`` matrix."""
        return {
            name: float(np.linalg.svd(_as_matrix(k), compute_uv=False)[0])
            for name, k in self.kernels.items()
        }

    @property
    def max_sigma(self) -> float:
        """The largest of :attr:`sigmas`."""
        return max(self.sigmas.values())

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
            "zero_unit_fraction": self.zero_unit_fraction,
            "zero_units": self.zero_units,
            "max_unit_norm": self.max_unit_norm,
            "sigmas": self.sigmas,
            "max_sigma": self.max_sigma,
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


def _as_matrix(kernel: np.ndarray) -> np.ndarray:
    """A kernel as ``(fan-in, units)``: every axis but the last flattened."""
    return kernel.reshape(-1, kernel.shape[-1])


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
    """A Markdown table: accuracy, exact zeros, unit norms, singular values."""
    lines = [
        "| run | test accuracy | exactly-zero weights | exactly-zero units | "
        "max unit norm | max singular value | weight L2 norm | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.test_accuracy[-1]:.3f} | {r.zero_fraction:.1%} | "
            f"{r.zero_unit_fraction:.1%} | {r.max_unit_norm:.4g} | "
            f"{r.max_sigma:.4g} | {r.weight_norm:.4g} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def checks(results: Sequence[ConstraintResult], config: CNNConfig) -> list[str]:
    """One line per guarantee, computed from the trained weights.

    ``prox_l1`` must produce exact zeros and ``prox_group_l1`` whole units
    of exact zeros; ``max_norm`` must keep every unit norm at or below its
    bound (up to float32 rounding, relative ``1e-6``); ``clip_spectral_norm``
    every kernel's largest singular value (``numpy.linalg.svd``) at or below
    its bound, up to relative ``1e-3`` (the transform estimates sigma by
    power iteration, one step per update).
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
    if "prox_group_l1" in by_name:
        units = by_name["prox_group_l1"].zero_units
        pruned = {k: v for k, v in units.items() if re.search(CONV_KERNELS, k)}
        zeros = sum(z for z, _ in pruned.values())
        total = sum(n for _, n in pruned.values())
        per_layer = ", ".join(
            f"{k.removesuffix('/kernel')} {z}/{n}" for k, (z, n) in pruned.items()
        )
        verdict = "OK" if zeros > 0 else "FAILED"
        lines.append(
            f"check prox_group_l1: {zeros} of {total} conv units "
            f"({zeros / total:.1%}; {per_layer}) are exactly 0.0 in every "
            f"weight -> {verdict}"
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
    if "clip_spectral_norm" in by_name:
        sigmas = by_name["clip_spectral_norm"].sigmas
        bound = config.spectral_norm
        ok = all(s <= bound * (1 + 1e-3) for s in sigmas.values())
        per_layer = ", ".join(
            f"{k.removesuffix('/kernel')} {s:.6g}" for k, s in sigmas.items()
        )
        lines.append(
            f"check clip_spectral_norm: largest singular value (SVD) per layer "
            f"{per_layer} <= bound {bound:g} (rel. 1e-3) -> "
            f"{'OK' if ok else 'FAILED'}"
        )
    return lines


# Text large enough to read when the figure is shown at the width of a page.
_FONT: dict[Any, Any] = {
    "font.size": 11,
    "axes.titlesize": 11,
    "legend.fontsize": 10,
    "figure.dpi": 130,
}
_REFERENCE = "plain"


def plot(results: Sequence[ConstraintResult]) -> Figure:
    """Small multiples: the unit norms of the trained kernels, one panel per run.

    Each panel is a histogram of the L2 norm of every unit (output channel or
    feature) of the run's kernels, titled with its final test accuracy; the
    unconstrained run (``plain``) is drawn in grey in every other panel, so
    that what each technique did to the norms shows against the same
    reference.
    """
    import matplotlib
    from matplotlib.figure import Figure

    columns = 3
    rows = -(-len(results) // columns)
    all_norms = np.concatenate([r.unit_norms for r in results])
    bins = np.linspace(0.0, float(np.max(all_norms)) * 1.02 + 1e-6, 40)
    reference = next((r for r in results if r.name == _REFERENCE), None)
    with matplotlib.rc_context(_FONT):
        fig = Figure(figsize=(10, 2.3 * rows + 0.9), layout="constrained")
        axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
        for ax, r in zip(axes.flat, results, strict=False):
            if reference is not None and r is not reference:
                ax.hist(
                    reference.unit_norms,
                    bins=bins,
                    color="0.8",
                    label=f"{_REFERENCE} (no constraint)",
                )
            ax.hist(
                r.unit_norms,
                bins=bins,
                histtype="step",
                lw=2.0,
                color="#0072B2",
                label=r.name,
            )
            ax.set_title(
                f"{r.name}: accuracy {r.test_accuracy[-1]:.3f}",
                loc="left",
                fontsize=11,
            )
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=10)
        for ax in axes.flat[len(results) :]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("unit L2 norm")
        for ax in axes[:, 0]:
            ax.set_ylabel("units")
        grey = f"; grey: {_REFERENCE}, no constraint" if reference is not None else ""
        fig.suptitle(
            f"Unit L2 norms of the trained kernels, one per output channel or "
            f"feature{grey}",
            x=0.01,
            ha="left",
        )
    return fig
