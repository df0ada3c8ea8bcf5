"""GPT-2 with its blocks stacked (``(12, ...)`` leaves) against the unstacked tree.

The same parameters in two layouts: 148 leaves (one per block parameter),
or 16 (the twelve blocks' parameters stacked on a leading axis, as a model
whose blocks run under ``jax.lax.scan`` holds them). For each transform,
one interleaved group times both layouts with the triad:

* ``optax.chain(clip_by_global_norm(1.0), optax.adamw(3e-4))`` + apply,
  with norm_optax's clip and with optax's, params and state donated (bound:
  8 passes over the tree's bytes);
* ``nox.max_norm(1.0)`` on the unstacked tree against
  ``nox.max_norm(1.0, stack_axes=...)`` on the stacked one (1 on the stacked
  block leaves, 0 on the embeddings and the final layer norm, so that both
  constrain the same units), updates donated (bound: 3 passes, read p and u,
  write u).

Compile time is one ``lower().compile()`` per transform and layout. A
transform or keyword the package lacks gives an "n/a" cell with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import _harness as harness
import jax.numpy as jnp
import optax
from _peer import Timed, attempt, step_build, time_group, timing_text, update_build
from _report import div

import norm_optax as nox

LR = 3e-4
LAYOUTS = ("unstacked", "stacked")


@dataclasses.dataclass(frozen=True)
class StackedRow:
    label: str
    passes: int
    timed: dict[str, Timed]  # layout -> result


@dataclasses.dataclass(frozen=True)
class StackedResult:
    model: str
    layers: int
    leaves: dict[str, int]  # layout -> number of leaves
    params_m: float
    rows: list[StackedRow]


def _clip_adamw(
    clip: Callable[[float], optax.GradientTransformation],
) -> Callable[[], optax.GradientTransformation]:
    return lambda: optax.chain(clip(1.0), optax.adamw(LR))


def bench_stacked(model: str, bandwidth: harness.Bandwidth, reps: int) -> StackedResult:
    size = harness.GPT2_SIZES[model]
    specs = {"unstacked": harness.gpt2(**size), "stacked": harness.gpt2_stacked(**size)}
    layers = next(shape[0] for name, shape in specs["stacked"] if name[:2] == "h/")
    print(
        f"{model} stacked ({layers}, ...) against unstacked: "
        + ", ".join(f"{k} {len(v)} leaves" for k, v in specs.items()),
        flush=True,
    )
    grads = {k: harness.make_tree(v, jnp.float32, seed=0) for k, v in specs.items()}
    params = {
        k: harness.make_tree(v, jnp.float32, seed=1, scale=0.02)
        for k, v in specs.items()
    }
    nbytes = harness.tree_bytes(grads["unstacked"])
    stack_axes = {name: int(name.startswith("h/")) for name, _ in specs["stacked"]}
    steps = {
        "norm_optax clip + adamw": _clip_adamw(nox.clip_by_global_norm),
        "optax clip + adamw": _clip_adamw(optax.clip_by_global_norm),
    }
    rows = []
    for label, make_tx in steps.items():
        print(f"  {label}", flush=True)
        candidates = {
            k: attempt(step_build(make_tx, params[k], grads[k]), 8 * nbytes)
            for k in LAYOUTS
        }
        rows.append(StackedRow(label, 8, time_group(candidates, bandwidth, reps)))
    label = "norm_optax max_norm(1.0)"
    print(f"  {label}", flush=True)
    # Typed loosely on purpose: a package without the keyword raises
    # TypeError at the call, which makes the stacked cell n/a.
    max_norm: Callable[..., optax.GradientTransformation] = nox.max_norm
    max_norms = {
        "unstacked": lambda: max_norm(1.0),
        "stacked": lambda: max_norm(1.0, stack_axes=stack_axes),
    }
    candidates = {
        k: attempt(update_build(max_norms[k], params[k], grads[k]), 3 * nbytes)
        for k in LAYOUTS
    }
    rows.append(StackedRow(label, 3, time_group(candidates, bandwidth, reps)))
    millions = harness.count_params(specs["unstacked"]) / 1e6
    leaves = {k: len(v) for k, v in specs.items()}
    return StackedResult(model, layers, leaves, millions, rows)


def _seconds(t: Timed) -> str:
    return "n/a" if t.compile_s is None else f"{t.compile_s:.2f}"


def _ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _row_line(row: StackedRow) -> str:
    u, s = row.timed["unstacked"], row.timed["stacked"]
    any_run = next((t for t in (u, s) if t.gbps is not None), None)
    gbps = "—" if any_run is None else f"{any_run.gbps:.1f}"
    bound = "—"
    if any_run is not None and any_run.bound is not None:
        bound = f"{any_run.bound * 1e3:.1f}"
    compile_ratio = div(s.compile_s, u.compile_s)
    median_u = None if u.stats is None else u.stats.median
    median_s = None if s.stats is None else s.stats.median
    notes = "; ".join(
        f"{k}: n/a, {t.reason}" for k, t in row.timed.items() if t.reason is not None
    )
    cells = [
        row.label,
        _seconds(u),
        _seconds(s),
        _ratio_text(compile_ratio),
        gbps,
        bound,
        timing_text(u),
        timing_text(s),
        _ratio_text(div(median_s, median_u)),
        notes,
    ]
    return "| " + " | ".join(cells) + " |"


def stacked_section(result: StackedResult) -> list[str]:
    u, s = result.leaves["unstacked"], result.leaves["stacked"]
    return [
        f"## float32 {result.model}: {result.layers} blocks stacked against unstacked",
        "",
        f"The same {result.params_m:.1f} M parameters as {u} leaves (one per "
        f"block parameter) or {s} leaves (the blocks stacked, `({result.layers}, "
        "...)` leaves). Compile: `lower().compile()` seconds; step: milliseconds "
        "as above, bound 8 passes for clip + AdamW + apply (params and state "
        "donated), 3 for max_norm (read p, u, write u; updates donated). "
        "Stacked max_norm: `stack_axes` 1 on the block leaves, 0 on the others. "
        "Ratios: stacked / unstacked.",
        "",
        "| transform | compile unstacked s | compile stacked s | ratio | GB/s "
        "| bound ms | unstacked | stacked | ratio | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[_row_line(row) for row in result.rows],
        "",
    ]
