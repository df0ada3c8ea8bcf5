"""Peers that may not exist yet: build, compile and time them, or say why not.

The stacked-tree and new-transform groups of ``bench.py`` time transforms
that the package is still gaining (``stack_axes``, new proximal steps,
spectral clipping). Each peer is built by a zero-argument function; if that
raises (a missing name is an ``AttributeError``, a missing keyword a
``TypeError``, a trace-time failure whatever it raises), the peer is kept as
"n/a" with the reason and the others of its group run as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import _harness as harness
import jax
import optax
from _core import copy_tree, tx_step_fn
from _report import timing_cell

Build = Callable[[], tuple[Callable[[], None], float]]  # -> (run, compile seconds)


@dataclasses.dataclass(frozen=True)
class Timed:
    """One peer of a group: compile seconds and timed rounds, or why not."""

    compile_s: float | None = None
    stats: harness.Stats | None = None
    bound: float | None = None  # seconds of its minimal traffic at the group's GB/s
    gbps: float | None = None
    reason: str | None = None  # why it did not run

    @property
    def ratio(self) -> float | None:
        if self.stats is None or self.bound is None:
            return None
        return self.stats.median / self.bound


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A peer ready to time (``run``), or the reason it could not be built."""

    traffic: int  # bytes of its minimal memory traffic
    run: Callable[[], None] | None = None
    compile_s: float | None = None
    reason: str | None = None


def reason_of(error: BaseException) -> str:
    """``Type: first line of the message``, short and safe in a Markdown cell."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
    if len(text) > 160:
        text = text[:157] + "..."
    return text.replace("|", "/")


def attempt(build: Build, traffic: int) -> Candidate:
    """Builds and compiles a peer and calls it once; any error makes it n/a."""
    try:
        run, seconds = build()
        run()  # a run-time failure also makes the peer n/a, not the benchmark
    except Exception as error:
        reason = reason_of(error)
        print(f"  n/a: {reason}", flush=True)
        return Candidate(traffic, reason=reason)
    return Candidate(traffic, run, seconds)


def time_group(
    candidates: Mapping[str, Candidate], bandwidth: harness.Bandwidth, reps: int
) -> dict[str, Timed]:
    """Times the peers that were built in one interleaved group with the triad."""
    runnable = {k: c.run for k, c in candidates.items() if c.run is not None}
    out = {k: Timed(reason=c.reason) for k, c in candidates.items() if c.run is None}
    if runnable:
        stats, gbps = bandwidth.time_with(runnable, reps)
        for k, s in stats.items():
            c = candidates[k]
            out[k] = Timed(c.compile_s, s, c.traffic / (gbps * 1e9), gbps)
        text = ", ".join(
            f"{k} {s.median * 1e3:.1f} ms ({out[k].ratio:.2f}x)"
            for k, s in stats.items()
        )
        print(f"  {text}", flush=True)
    return {k: out[k] for k in candidates}


def jitted_step_build(
    step: Callable[..., Any],
    init: Callable[[Any], Any],
    params: Any,
    grads: Any,
    on_compiled: Callable[[Any], None] | None = None,
) -> Build:
    """A jitted ``step(params, state, grads) -> (params, state)``, both donated.

    ``state`` is ``init(params)``; ``on_compiled``, if given, sees the
    executable (to read its HLO or cost analysis).
    """

    def build() -> tuple[Callable[[], None], float]:
        state = init(params)
        compiled, seconds = harness.compile_seconds(
            step, (params, state, grads), (0, 1)
        )
        if on_compiled is not None:
            on_compiled(compiled)
        box = {"p": copy_tree(params), "s": copy_tree(state)}

        def run() -> None:
            box["p"], box["s"] = jax.block_until_ready(
                compiled(box["p"], box["s"], grads)
            )

        return run, seconds

    return build


def step_build(
    make_tx: Callable[[], optax.GradientTransformation], params: Any, grads: Any
) -> Build:
    """A whole step (update + apply), params and state donated."""

    def build() -> tuple[Callable[[], None], float]:
        tx = make_tx()
        return jitted_step_build(tx_step_fn(tx), tx.init, params, grads)()

    return build


def update_build(
    make_tx: Callable[[], optax.GradientTransformation], params: Any, grads: Any
) -> Build:
    """``tx.update(u, state, params)`` alone (state from one ``init``).

    The updates and the state are donated and each call gets the previous
    output, so the update runs in place; ``params`` are only read.
    """

    def build() -> tuple[Callable[[], None], float]:
        tx = make_tx()
        state = tx.init(params)

        def update(u: Any, s: Any, p: Any) -> Any:
            return tx.update(u, s, p)

        compiled, seconds = harness.compile_seconds(
            update, (grads, state, params), (0, 1)
        )
        box = {"u": copy_tree(grads), "s": copy_tree(state)}

        def run() -> None:
            box["u"], box["s"] = jax.block_until_ready(
                compiled(box["u"], box["s"], params)
            )

        return run, seconds

    return build


def timing_text(t: Timed) -> str:
    """``median (min-max) **ratio x**`` in ms, or ``n/a``."""
    if t.stats is None or t.ratio is None:
        return "n/a"
    return timing_cell(t.stats, t.ratio)
