"""Part 1: exploding gradients in a vanilla tanh RNN, and what clipping does.

The task is the adding problem (Hochreiter & Schmidhuber, 1997): a sequence
of ``seq_len`` pairs ``(value, marker)``, values uniform in ``[0, 1]``, two
markers set (one in each half); the target is the sum of the two marked
values. Predicting the mean (``1.0``) gives a mean squared error of ``1/6``.

A one-layer tanh RNN trained with SGD with momentum at a learning rate that
is too large for it hits the "cliffs" of Pascanu et al. (2013): the gradient
norm jumps by orders of magnitude and, unclipped, the weights blow up and
the loss becomes non-finite. Every run here starts from the same weights and
sees the same batches; only the clipping transform placed before the
optimizer changes. Each clipping transform is wrapped in
:func:`norm_optax.record_norms`, whose state holds the *pre-clip* norm of the
raw gradients (``input_norm``) and the norm after clipping (``output_norm``),
read with ``optax.tree.get``.

Only jax, optax and numpy are needed to train; :func:`plot` needs matplotlib.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import norm_optax as nox

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "RNNConfig",
    "RunResult",
    "adding_problem",
    "clip_table",
    "clippers",
    "format_table",
    "init_rnn",
    "optimizer",
    "plot",
    "plot_clip_factors",
    "rnn_loss",
    "run_all",
    "train",
]

Params = dict[str, jax.Array]

#: Name of the run without clipping.
BASELINE = "none"


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    """Sizes and hyper-parameters of part 1 (the defaults are the full demo)."""

    seq_len: int = 30
    hidden: int = 64
    batch: int = 64
    steps: int = 1500
    learning_rate: float = 0.07
    momentum: float = 0.9
    max_norm: float = 1.0  # clip_by_norm, clip_by_global_norm, normalize
    max_delta: float = 0.1  # clip_by_value
    chunk: int = 100  # steps per jitted call (one progress-bar tick)

    @classmethod
    def quick(cls) -> RNNConfig:
        """The ``--quick`` run: the same problem, fewer steps.

        Long enough for the unclipped run to blow up with most seeds (it
        does, between steps 200 and 400, for 7 of seeds 0-7).
        """
        return cls(steps=600, chunk=200)


@dataclasses.dataclass
class RunResult:
    """Per-step loss, pre-clip and post-clip gradient norm of one run."""

    name: str
    loss: np.ndarray
    grad_norm: np.ndarray
    clipped_norm: np.ndarray
    seconds: float

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose loss or gradient norm is NaN or infinite."""
        bad = ~np.isfinite(self.loss) | ~np.isfinite(self.grad_norm)
        return int(np.sum(bad))

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 5% of the steps (NaN if any is non-finite)."""
        tail = max(len(self.loss) // 20, 1)
        return float(np.mean(self.loss[-tail:]))

    @property
    def max_grad_norm(self) -> float:
        """Largest pre-clip gradient norm (``inf`` once it has overflowed)."""
        finite_or_inf = self.grad_norm[~np.isnan(self.grad_norm)]
        if finite_or_inf.size == 0:
            return float("nan")
        return float(np.max(finite_or_inf))

    def row(self) -> dict[str, Any]:
        """The table row of this run."""
        return {
            "part": "exploding",
            "run": self.name,
            "final_loss": self.final_loss,
            "max_grad_norm": self.max_grad_norm,
            "nonfinite_steps": self.nonfinite_steps,
            "seconds": self.seconds,
        }


def adding_problem(
    key: jax.Array, num_batches: int, batch: int, seq_len: int
) -> tuple[jax.Array, jax.Array]:
    """``num_batches`` batches of the adding problem.

    Returns:
      ``xs`` of shape ``(num_batches, batch, seq_len, 2)`` (value, marker) and
      targets ``ys`` of shape ``(num_batches, batch)``.
    """
    k_values, k_first, k_second = jax.random.split(key, 3)
    values = jax.random.uniform(k_values, (num_batches, batch, seq_len))
    first = jax.random.randint(k_first, (num_batches, batch), 0, seq_len // 2)
    second = jax.random.randint(k_second, (num_batches, batch), seq_len // 2, seq_len)
    markers = jax.nn.one_hot(first, seq_len) + jax.nn.one_hot(second, seq_len)
    xs = jnp.stack([values, markers], axis=-1)
    ys = jnp.sum(values * markers, axis=-1)
    return xs, ys


def init_rnn(key: jax.Array, hidden: int) -> Params:
    """A tanh RNN: orthogonal recurrence, readout starting near the mean target."""
    k_rec, k_in, k_out = jax.random.split(key, 3)
    return {
        "w_in": jax.random.normal(k_in, (2, hidden)),
        "w_rec": jax.nn.initializers.orthogonal()(k_rec, (hidden, hidden)),
        "b": jnp.zeros((hidden,)),
        "w_out": 0.1 * jax.random.normal(k_out, (hidden,)) / np.sqrt(hidden),
        "b_out": jnp.ones(()),
    }


def rnn_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the RNN's prediction after the last time step."""

    def cell(h: jax.Array, x_t: jax.Array) -> tuple[jax.Array, None]:
        h = jnp.tanh(x_t @ params["w_in"] + h @ params["w_rec"] + params["b"])
        return h, None

    h0 = jnp.zeros((x.shape[0], params["b"].shape[0]))
    h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
    prediction = h @ params["w_out"] + params["b_out"]
    return jnp.mean((prediction - y) ** 2)


def clippers(
    config: RNNConfig, names: Sequence[str] | None = None
) -> dict[str, optax.GradientTransformation]:
    """The clipping transforms compared, by name (``"none"`` is the identity).

    ``autoclip`` and ``zclip`` (stateful, adaptive thresholds) use their
    defaults; for ``zclip`` those of its authors' code: ``z_threshold=2.5``,
    ``alpha=0.97``, ``warmup_steps=25`` and the hard ceiling
    ``max_norm=1.0`` on every step, below which the z-score rule cuts the
    spikes. The fixed thresholds come from ``config``.
    """
    table: dict[str, Callable[[], optax.GradientTransformation]] = {
        BASELINE: optax.identity,
        "clip_by_value": lambda: nox.clip_by_value(config.max_delta),
        "clip_by_norm": lambda: nox.clip_by_norm(config.max_norm),
        "clip_by_global_norm": lambda: nox.clip_by_global_norm(config.max_norm),
        "normalize_by_global_norm": lambda: nox.normalize_by_global_norm(
            config.max_norm
        ),
        "autoclip": lambda: nox.autoclip(),
        "zclip": lambda: nox.zclip(),
    }
    wanted = list(table) if names is None else list(names)
    unknown = [name for name in wanted if name not in table]
    if unknown:
        raise ValueError(f"Unknown runs {unknown}; choose from {list(table)}.")
    return {name: table[name]() for name in wanted}


def optimizer(
    clip: optax.GradientTransformation, config: RNNConfig
) -> optax.GradientTransformation:
    """``record_norms(clip)`` placed before SGD with momentum."""
    sgd = optax.sgd(config.learning_rate, momentum=config.momentum)
    return optax.chain(nox.record_norms(clip), sgd)


def train(
    tx: optax.GradientTransformation,
    params: Params,
    xs: jax.Array,
    ys: jax.Array,
    *,
    chunk: int,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trains on every batch in ``xs, ys``.

    ``tx`` must contain one :func:`norm_optax.record_norms` (as built by
    :func:`optimizer`). The steps run as a ``lax.scan`` inside one jitted
    call per ``chunk`` of steps (so a progress bar can advance between calls).

    Returns:
      Per-step loss, pre-clip gradient norm and post-clip gradient norm.
    """
    Logs = tuple[jax.Array, jax.Array, jax.Array]

    def step(
        carry: tuple[Params, optax.OptState], batch: tuple[jax.Array, jax.Array]
    ) -> tuple[tuple[Params, optax.OptState], Logs]:
        p, state = carry
        loss, grads = jax.value_and_grad(rnn_loss)(p, *batch)
        updates, state = tx.update(grads, state, p)
        logs = (
            loss,
            optax.tree.get(state, "input_norm"),  # pre-clip
            optax.tree.get(state, "output_norm"),  # post-clip
        )
        return (optax.apply_updates(p, updates), state), logs

    @jax.jit
    def run_chunk(
        carry: tuple[Params, optax.OptState], xs: jax.Array, ys: jax.Array
    ) -> tuple[tuple[Params, optax.OptState], Logs]:
        return jax.lax.scan(step, carry, (xs, ys))

    carry = (params, tx.init(params))
    chunks = []
    for start in range(0, xs.shape[0], chunk):
        carry, logs = run_chunk(
            carry, xs[start : start + chunk], ys[start : start + chunk]
        )
        chunks.append([np.asarray(x) for x in logs])
        if on_chunk is not None:
            on_chunk(int(logs[0].shape[0]))
    loss, raw, clipped = (np.concatenate([c[i] for c in chunks]) for i in range(3))
    return loss, raw, clipped


def run_all(
    config: RNNConfig,
    seed: int = 0,
    names: Sequence[str] | None = None,
    on_chunk: Callable[[int, str], None] | None = None,
    extra: Mapping[str, optax.GradientTransformation] | None = None,
) -> list[RunResult]:
    """Trains one run per clipping transform, same init and data for all.

    Args:
      config: sizes and hyper-parameters.
      seed: seeds the initial weights and the batches.
      names: which of :func:`clippers` to run (all when ``None``).
      on_chunk: called with the number of steps done and a label after each
        jitted chunk (a progress bar).
      extra: more runs, name -> clipping transform (``nox.zclip(max_norm=
        None)``, say), trained after the named ones.
    """
    key = jax.random.PRNGKey(seed)
    k_init, k_data = jax.random.split(key)
    params = init_rnn(k_init, config.hidden)
    xs, ys = adding_problem(k_data, config.steps, config.batch, config.seq_len)
    runs = clippers(config, names) | dict(extra or {})
    results = []
    for name, clip in runs.items():
        tick = None if on_chunk is None else _bind(on_chunk, name)
        start = time.perf_counter()
        loss, raw, clipped = train(
            optimizer(clip, config), params, xs, ys, chunk=config.chunk, on_chunk=tick
        )
        seconds = time.perf_counter() - start
        results.append(RunResult(name, loss, raw, clipped, seconds))
    return results


def _bind(on_chunk: Callable[[int, str], None], name: str) -> Callable[[int], None]:
    return lambda steps: on_chunk(steps, f"part 1: {name}")


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table: final loss, max grad norm, non-finite steps, time."""
    lines = [
        "| run | final loss | max grad norm (pre-clip) | non-finite steps | "
        "wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.final_loss:.4g} | {r.max_grad_norm:.3g} | "
            f"{r.nonfinite_steps} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; a non-finite value spoils the windows it is in."""
    if window <= 1 or len(x) < window:
        return x
    x = np.where(np.isfinite(x), x, np.nan)
    kernel = np.ones(window) / window
    smooth = np.convolve(x, kernel, mode="valid")
    return np.concatenate([np.full(window - 1, np.nan), smooth])


# Plot styles: the Okabe-Ito colours (distinct also to colour-blind
# readers), each with its own line style, and text large enough to read
# when the figure is shown at the width of a page.
_STYLES = [
    ("#0072B2", "-"),
    ("#D55E00", "--"),
    ("#009E73", "-."),
    ("#CC79A7", ":"),
    ("#E69F00", (0, (5, 1, 1, 1))),
]
_FONT: dict[Any, Any] = {
    "font.size": 11,
    "axes.titlesize": 11,
    "legend.fontsize": 10,
    "figure.dpi": 130,
}
# Which runs share a panel: the transforms that clip alike.
_GROUPS = {
    BASELINE: "no clipping",
    "clip_by_value": "per element / per leaf",
    "clip_by_norm": "per element / per leaf",
    "clip_by_global_norm": "global norm",
    "normalize_by_global_norm": "global norm",
}
_ADAPTIVE = "adaptive threshold"


def _groups(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(_GROUPS.get(r.name, _ADAPTIVE), []).append(r)
    return groups


def plot(
    results: Sequence[RunResult],
    window: int = 25,
    loss_top: float = 1e2,
    norm_top: float = 1e4,
) -> Figure:
    """Loss and pre-clip gradient norm per step (log scale), in small multiples.

    One column per kind of clip (no clipping, per element or leaf, global
    norm, adaptive threshold), at most a few runs per panel, each with its
    own colour and line style; the unclipped run is repeated in grey in every
    other column for reference. The y axes stop at ``loss_top`` and
    ``norm_top``; a cross on the top edge marks the first step at which a run
    leaves the plot (or turns non-finite).
    """
    import matplotlib
    from matplotlib.figure import Figure

    groups = _groups(results)
    baseline = next((r for r in results if r.name == BASELINE), None)
    with matplotlib.rc_context(_FONT):
        fig = Figure(figsize=(2.6 * len(groups) + 0.6, 6.0), layout="constrained")
        axes = fig.subplots(2, len(groups), sharex=True, sharey="row", squeeze=False)
        for column, (title, runs) in enumerate(groups.items()):
            for row, (top, series) in enumerate(
                ((loss_top, "loss"), (norm_top, "grad_norm"))
            ):
                ax = axes[row, column]
                if baseline is not None and baseline not in runs:
                    values = _moving_average(getattr(baseline, series), window)
                    ax.plot(values, color="0.75", lw=1.2, label="no clipping")
                for i, r in enumerate(runs):
                    colour, style = _STYLES[i % len(_STYLES)]
                    values = getattr(r, series)
                    steps = np.arange(1, len(values) + 1)
                    label = r.name if r.name != BASELINE else "no clipping"
                    ax.plot(
                        steps,
                        _moving_average(values, window),
                        color=colour,
                        ls=style,
                        lw=1.8,
                        label=label,
                    )
                    off = np.nonzero(~np.isfinite(values) | (values > top))[0]
                    if off.size:
                        ax.plot(
                            off[0] + 1,
                            top,
                            "x",
                            ms=11,
                            mew=3,
                            color=colour,
                            clip_on=False,
                        )
                ax.set_yscale("log")
                ax.set_ylim(None, top)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=10)
                if row == 0:
                    ax.axhline(1 / 6, color="black", ls=":", lw=1)
                    ax.set_title(title)
                    ax.legend(loc="upper right", handlelength=2.2)
                else:
                    ax.set_xlabel("step")
        axes[0, 0].set_ylabel("training loss (MSE)")
        axes[1, 0].set_ylabel("pre-clip gradient norm")
        fig.suptitle(
            f"{window}-step means; x = the run blew up; dotted: the loss of "
            "predicting the mean"
        )
    return fig


def clip_table(results: Sequence[RunResult]) -> str:
    """A Markdown table of how often, and how hard, each run clipped.

    The clip factor of a step is ``post-clip norm / pre-clip norm``; a step
    counts as clipped when the factor is below ``0.999``. Only steps with a
    finite, non-zero pre-clip norm count.
    """
    lines = [
        "| run | steps clipped | median clip factor | smallest clip factor | "
        "final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        factor = _clip_factor(r)
        valid = factor[np.isfinite(factor)]
        if valid.size == 0:
            lines.append(f"| {r.name} | - | - | - | {r.final_loss:.4g} |")
            continue
        lines.append(
            f"| {r.name} | {np.mean(valid < 0.999):.1%} | "
            f"{np.median(valid):.3g} | {np.min(valid):.3g} | {r.final_loss:.4g} |"
        )
    return "\n".join(lines)


def _clip_factor(r: RunResult) -> np.ndarray:
    ok = np.isfinite(r.grad_norm) & (r.grad_norm > 0) & np.isfinite(r.clipped_norm)
    safe = np.where(ok, r.grad_norm, 1.0)
    return np.where(ok, r.clipped_norm / safe, np.nan)


def plot_clip_factors(results: Sequence[RunResult], window: int = 25) -> Figure:
    """Per run, one row: pre- and post-clip gradient norm, and the clip factor."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_FONT):
        fig = Figure(figsize=(10, 2.3 * len(results) + 0.8), layout="constrained")
        axes = fig.subplots(len(results), 2, sharex=True, squeeze=False)
        for i, (r, (ax_norm, ax_factor)) in enumerate(zip(results, axes, strict=True)):
            colour, _ = _STYLES[i % len(_STYLES)]
            steps = np.arange(1, len(r.loss) + 1)
            ax_norm.plot(
                steps,
                _moving_average(r.grad_norm, window),
                color="0.55",
                lw=1.4,
                ls="--",
                label="before the clip",
            )
            ax_norm.plot(
                steps,
                _moving_average(r.clipped_norm, window),
                color=colour,
                lw=2.0,
                label="after the clip",
            )
            ax_factor.plot(steps, _clip_factor(r), ".", ms=3, color=colour)
            ax_norm.set(yscale="log", ylabel="gradient norm")
            ax_norm.set_title(r.name, loc="left", fontweight="bold")
            ax_factor.set(yscale="log", ylabel="after / before")
            for ax in (ax_norm, ax_factor):
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=10)
        axes[0, 0].legend(loc="upper right")
        axes[0, 1].set_title("clip factor per step (1 = not clipped)")
        axes[-1, 0].set_xlabel("step")
        axes[-1, 1].set_xlabel("step")
        fig.suptitle(f"Global gradient norm ({window}-step mean) and clip factor")
    return fig
