"""New transforms on GPT-2 small float32 shapes, against their bandwidth bound.

Each time is a ratio to the time the operation's minimal memory traffic
takes at the bandwidth of the triad in its interleaved group:

* ``nox.prox_group_l1(1e-4, 1e-3)`` and ``nox.prox_elastic_net(1e-4, 1e-4,
  1e-3)`` (one group): ``tx.update(u, state, params)``, updates donated;
  3 passes over the tree (read p and u, write u);
* ``nox.clip_spectral_norm(1.0)`` (stateful: ``init`` once, the update
  timed, updates and state donated): 3 passes over the matrices (the leaves
  of two or more axes): one read for the power-iteration step, one read and
  one write to scale;
* ``optax.adamw(3e-4)`` against ``optax.chain(optax.adamw(3e-4),
  nox.clip_spectral_norm(1.0))`` (one group), step + apply with params and
  state donated: 7 passes over the tree for AdamW (read g, p, mu, nu; write
  p, mu, nu); the chain's extra time is reported in passes over the
  matrices at the group's bandwidth, the target being at most 2.

A name the package lacks gives an "n/a" row with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import _harness as harness
import jax
import jax.numpy as jnp
import optax
from _peer import (
    Build,
    Timed,
    attempt,
    step_build,
    time_group,
    timing_text,
    update_build,
)
from _report import TargetTable

import norm_optax as nox

LR = 3e-4
MAX_EXTRA_PASSES = 2.0
ADAMW = "optax.adamw(3e-4)"
CHAIN = "optax.chain(optax.adamw(3e-4), nox.clip_spectral_norm(1.0))"


@dataclasses.dataclass(frozen=True)
class TransformRow:
    label: str
    traffic: str  # the minimal traffic, in words
    timed: Timed


@dataclasses.dataclass(frozen=True)
class TransformsResult:
    model: str
    matrix_bytes: int
    rows: list[TransformRow]

    def timed(self, label: str) -> Timed | None:
        return next((r.timed for r in self.rows if r.label == label), None)

    @property
    def extra_passes(self) -> float | None:
        """The chain's time beyond AdamW's, in passes over the matrices."""
        a, c = self.timed(ADAMW), self.timed(CHAIN)
        if a is None or c is None or a.stats is None or c.stats is None:
            return None
        assert c.gbps is not None
        one_pass = self.matrix_bytes / (c.gbps * 1e9)
        return (c.stats.median - a.stats.median) / one_pass


def _nox(name: str) -> Callable[..., optax.GradientTransformation]:
    """``nox.<name>``; a missing name raises ``AttributeError`` (an n/a row)."""
    factory: Callable[..., optax.GradientTransformation] = getattr(nox, name)
    return factory


def _update(name: str, *args: float) -> Callable[[], optax.GradientTransformation]:
    return lambda: _nox(name)(*args)


def _chain() -> optax.GradientTransformation:
    return optax.chain(optax.adamw(LR), _nox("clip_spectral_norm")(1.0))


def _group(
    builds: dict[str, tuple[Build, int, str]],
    bandwidth: harness.Bandwidth,
    reps: int,
) -> list[TransformRow]:
    """One interleaved group: ``label -> (build, traffic bytes, traffic text)``."""
    candidates = {}
    for label, (build, traffic, _) in builds.items():
        print(f"  {label}", flush=True)
        candidates[label] = attempt(build, traffic)
    timed = time_group(candidates, bandwidth, reps)
    return [TransformRow(k, text, timed[k]) for k, (_, _, text) in builds.items()]


def bench_transforms(
    model: str, bandwidth: harness.Bandwidth, reps: int
) -> TransformsResult:
    spec = harness.gpt2(**harness.GPT2_SIZES[model])
    print(f"{model} float32: new transforms", flush=True)
    grads = harness.make_tree(spec, jnp.float32, seed=0)
    params = harness.make_tree(spec, jnp.float32, seed=1, scale=0.02)
    tree = harness.tree_bytes(grads)
    matrices = harness.tree_bytes([x for x in jax.tree.leaves(grads) if x.ndim >= 2])

    def update(make: Callable[[], optax.GradientTransformation]) -> Build:
        return update_build(make, params, grads)

    def step(make: Callable[[], optax.GradientTransformation]) -> Build:
        return step_build(make, params, grads)

    proxes = {
        "nox.prox_group_l1(1e-4, 1e-3)": (
            update(_update("prox_group_l1", 1e-4, 1e-3)),
            3 * tree,
            "3 x tree (read p, u; write u)",
        ),
        "nox.prox_elastic_net(1e-4, 1e-4, 1e-3)": (
            update(_update("prox_elastic_net", 1e-4, 1e-4, 1e-3)),
            3 * tree,
            "3 x tree (read p, u; write u)",
        ),
    }
    spectral = {
        "nox.clip_spectral_norm(1.0)": (
            update(_update("clip_spectral_norm", 1.0)),
            3 * matrices,
            "3 x matrices (read for the power step; read, write to scale)",
        ),
    }
    steps = {
        ADAMW: (
            step(lambda: optax.adamw(LR)),
            7 * tree,
            "7 x tree (read g, p, mu, nu; write p, mu, nu)",
        ),
        CHAIN: (
            step(_chain),
            7 * tree + int(MAX_EXTRA_PASSES) * matrices,
            "7 x tree + 2 x matrices (the target)",
        ),
    }
    rows = []
    for builds in (proxes, spectral, steps):
        rows += _group(builds, bandwidth, reps)
    return TransformsResult(model, matrices, rows)


def _row_line(row: TransformRow) -> str:
    t = row.timed
    gbps = "—" if t.gbps is None else f"{t.gbps:.1f}"
    bound = "—" if t.bound is None else f"{t.bound * 1e3:.1f}"
    note = "" if t.reason is None else f"n/a: {t.reason}"
    cells = [row.label, row.traffic, gbps, bound, timing_text(t), note]
    return "| " + " | ".join(cells) + " |"


def transforms_section(result: TransformsResult) -> list[str]:
    extra = result.extra_passes
    target = TargetTable()
    target.add(
        "clip_spectral_norm after adamw: extra time in passes over the "
        f"matrices <= {MAX_EXTRA_PASSES:g}",
        extra,
        extra is not None and extra <= MAX_EXTRA_PASSES,
        "{:.2f}",
    )
    return [
        f"## float32 {result.model}: new transforms against the bandwidth bound",
        "",
        "Milliseconds as above; the bound is the minimal traffic of each "
        "transform at the triad bandwidth of its group (tree: all leaves; "
        f"matrices: the leaves of two or more axes, "
        f"{result.matrix_bytes / 1e6:.0f} MB). The prox steps and "
        "clip_spectral_norm time `tx.update` alone (updates and state donated, "
        "params read); the two AdamW rows a whole step with apply (params and "
        "state donated), in one group.",
        "",
        "| transform | minimal traffic | GB/s | bound ms | time | note |",
        "|---|---|---|---|---|---|",
        *[_row_line(row) for row in result.rows],
        "",
        *target.lines,
        "",
    ]
