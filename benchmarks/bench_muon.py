"""Muon on GPT-2 shapes: nox.muon against optax.contrib.muon and raw matmul.

Run from the repository root::

    python benchmarks/bench_muon.py --quick  # GPT-2 small's 12 layers at width 256
    python benchmarks/bench_muon.py          # GPT-2 small (124 M): slow on 2 cores

It writes ``benchmarks/results/<machine>-muon.md`` (``-muon-quick.md`` with
``--quick``) and a plot beside it (``-muon.png``): the machine's facts, the
targets, and the tables. Everything is float32 and measured in one process,
interleaved round by round (``_harness.interleave``), so the ratios see the
same noise:

* **Raw matmul** (the roof): for every matrix shape of the block (``c_attn``
  ``(d, 3d)``, ``attn.c_proj`` ``(d, d)``, ``c_fc`` ``(d, ff)``,
  ``mlp.c_proj`` ``(ff, d)``), stacked over the layers, the three products
  of one Newton-Schulz step (``X Xᵀ``, ``A A``, ``B X``, ``X`` the matrix
  transposed to have no more rows than columns), jitted on their own; FLOP/s
  = ``2 m n k`` per product over their time.
* **Newton-Schulz**: ``nox.orthogonalize`` (5 steps, standard coefficients)
  of the same stacked leaves; its FLOP/s counts the same products
  (``5 (4 m^2 n + 2 m^3)`` per matrix). Target: at least 0.8x the raw
  matmul FLOP/s.
* **One step** (update + apply, params and state donated): ``nox.muon`` and
  ``optax.contrib.muon`` with the same settings (``nesterov=False``, the
  momentum ``0.95``, AdamW for every leaf that is not a block matrix, the
  embeddings included) on the unstacked tree (one leaf per block parameter;
  optax decides by ``ndim == 2``, so the embeddings are excluded from its
  Muon leaves by a dimension-numbers tree), and ``nox.muon(stack_axes=...)``
  on the same parameters with the 12 blocks stacked (``(12, ...)`` leaves),
  which optax's ``ndim == 2`` rule cannot train. Targets: nox unstacked <=
  optax; nox stacked <= nox unstacked; compile time of nox (stacked) <= 0.5x
  optax's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness

import norm_optax as nox

RESULTS = Path(__file__).resolve().parent / "results"
LR = 0.02
MOMENTUM = 0.95
NS_STEPS = 5
SIZES = {
    "full": {"d": 768, "ff": 3072, "vocab": 50257, "ctx": 1024, "layers": 12},
    "quick": {"d": 256, "ff": 1024, "vocab": 8192, "ctx": 256, "layers": 12},
    "smoke": {"d": 64, "ff": 256, "vocab": 512, "ctx": 64, "layers": 2},
}
MATRICES = ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w")


def _is_block_matrix(name: str) -> bool:
    return any(name.endswith(m) for m in MATRICES)


def _ns_flops(shape: tuple[int, ...]) -> float:
    """FLOPs of the matrix products of 5 Newton-Schulz steps (stack included)."""
    *stack, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    count = 1
    for s in stack:
        count *= s
    return count * NS_STEPS * (4.0 * m * m * n + 2.0 * m**3)


def _products(x: jax.Array) -> jax.Array:
    """The three products of one Newton-Schulz step, on stacked matrices."""
    if x.shape[-2] > x.shape[-1]:
        x = jnp.swapaxes(x, -1, -2)
    a = jnp.matmul(x, jnp.swapaxes(x, -1, -2))
    b = jnp.matmul(a, a)
    return jnp.matmul(b, x)


def _timed_compile(
    fn: Callable[..., Any], args: Sequence[Any], donate: Sequence[int] = ()
) -> tuple[Any, float]:
    return harness.compile_seconds(fn, args, donate)


def _step_fn(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


class Stepper:
    """A compiled donated step, re-run on its own outputs (one call = one step)."""

    def __init__(
        self, tx: optax.GradientTransformation, params: Any, grads: Any
    ) -> None:
        state = tx.init(params)
        self.compiled, self.compile_s = _timed_compile(
            _step_fn(tx), (params, state, grads), donate=(0, 1)
        )
        self.params = jax.tree.map(jnp.copy, params)
        self.state = jax.tree.map(jnp.copy, state)
        self.grads = grads

    def __call__(self) -> None:
        self.params, self.state = jax.block_until_ready(
            self.compiled(self.params, self.state, self.grads)
        )


def run(size: str, reps: int) -> dict[str, Any]:
    cfg = SIZES[size]
    layers = cfg["layers"]
    unstacked_spec = harness.gpt2(**cfg)
    stacked_spec = harness.gpt2_stacked(**cfg)
    grads_u = harness.make_tree(unstacked_spec, jnp.float32, seed=0)
    params_u = harness.make_tree(unstacked_spec, jnp.float32, seed=1, scale=0.02)
    grads_s = harness.make_tree(stacked_spec, jnp.float32, seed=0)
    params_s = harness.make_tree(stacked_spec, jnp.float32, seed=1, scale=0.02)

    # Which leaves are Muon's: the block matrices (embeddings and vectors: AdamW).
    mask_u = {name: _is_block_matrix(name) for name in params_u}
    mask_s = {name: _is_block_matrix(name) for name in params_s}
    stack_axes = {name: int(name.startswith("h/")) for name in params_s}
    dims = {
        name: optax.contrib.MuonDimensionNumbers() if mask_u[name] else None
        for name in params_u
    }
    txs = {
        "optax.contrib.muon (unstacked)": (
            optax.contrib.muon(
                LR, beta=MOMENTUM, muon_weight_dimension_numbers=dims, nesterov=False
            ),
            params_u,
            grads_u,
        ),
        "nox.muon (unstacked)": (
            nox.muon(LR, MOMENTUM, muon_mask=mask_u, nesterov=False),
            params_u,
            grads_u,
        ),
        "nox.muon (stacked)": (
            nox.muon(
                LR, MOMENTUM, muon_mask=mask_s, stack_axes=stack_axes, nesterov=False
            ),
            params_s,
            grads_s,
        ),
    }
    steppers = {}
    for label, (tx, p, g) in txs.items():
        print(f"compiling {label}", flush=True)
        steppers[label] = Stepper(tx, p, g)
        print(f"  {steppers[label].compile_s:.1f} s", flush=True)

    # Newton-Schulz against the raw products, on the stacked block matrices.
    matrices = {name: grads_s[name] for name in grads_s if mask_s[name]}
    flops = sum(_ns_flops(x.shape) for x in matrices.values())
    product_flops = flops / NS_STEPS  # one step's products
    ortho, ortho_compile = _timed_compile(
        lambda t: nox.orthogonalize(t, stack_axes=1, ns_steps=NS_STEPS), (matrices,)
    )
    raw, raw_compile = _timed_compile(lambda t: jax.tree.map(_products, t), (matrices,))

    def run_ortho() -> None:
        jax.block_until_ready(ortho(matrices))

    def run_raw() -> None:
        jax.block_until_ready(raw(matrices))

    print("timing", flush=True)
    ns_stats = harness.interleave({"ns": run_ortho, "raw": run_raw}, reps)
    step_stats = harness.interleave(dict(steppers), reps)
    return {
        "size": size,
        "config": cfg,
        "layers": layers,
        "leaves": {"unstacked": len(params_u), "stacked": len(params_s)},
        "params_m": harness.count_params(unstacked_spec) / 1e6,
        "ns_gflops": flops / ns_stats["ns"].median / 1e9,
        "raw_gflops": product_flops / ns_stats["raw"].median / 1e9,
        "ns_stats": ns_stats["ns"],
        "raw_stats": ns_stats["raw"],
        "ns_compile": ortho_compile,
        "raw_compile": raw_compile,
        "ns_tflop": flops / 1e12,
        "steps": {k: (s, steppers[k].compile_s) for k, s in step_stats.items()},
    }


def _ms(stats: harness.Stats) -> str:
    return f"{stats.median * 1e3:.1f} ({stats.low * 1e3:.1f}-{stats.high * 1e3:.1f})"


def report(result: dict[str, Any], facts: dict[str, str], out: Path) -> None:
    steps = result["steps"]
    optax_s, optax_c = steps["optax.contrib.muon (unstacked)"]
    unst_s, unst_c = steps["nox.muon (unstacked)"]
    stk_s, stk_c = steps["nox.muon (stacked)"]
    ns_ratio = result["ns_gflops"] / result["raw_gflops"]
    targets = [
        (
            "Newton-Schulz FLOP/s / raw matmul FLOP/s",
            ns_ratio,
            ">= 0.8",
            ns_ratio >= 0.8,
        ),
        (
            "nox.muon step / optax.contrib.muon step (unstacked)",
            unst_s.median / optax_s.median,
            "<= 1",
            unst_s.median <= optax_s.median,
        ),
        (
            "nox.muon step stacked / unstacked",
            stk_s.median / unst_s.median,
            "<= 1",
            stk_s.median <= unst_s.median,
        ),
        (
            "nox.muon compile (stacked) / optax compile",
            stk_c / optax_c,
            "<= 0.5",
            stk_c <= 0.5 * optax_c,
        ),
        (
            "nox.muon compile (unstacked) / optax compile",
            unst_c / optax_c,
            "(for reference)",
            True,
        ),
    ]
    cfg = result["config"]
    lines = [
        f"# Muon on GPT-2 shapes ({result['size']} run)",
        "",
        f"GPT-2 with width {cfg['d']}, MLP {cfg['ff']}, vocabulary {cfg['vocab']}, "
        f"context {cfg['ctx']}, {result['layers']} blocks: "
        f"{result['params_m']:.1f} M parameters, {result['leaves']['unstacked']} "
        f"leaves unstacked or {result['leaves']['stacked']} stacked. float32. "
        f"Muon on the 4 block matrices of each layer (nesterov=False, momentum "
        f"{MOMENTUM}, {NS_STEPS} Newton-Schulz steps), AdamW on every other leaf. "
        f"Times: median (min-max) of {len(unst_s.samples)} interleaved rounds.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "",
        "## Targets",
        "",
        "| target | measured | wanted | met |",
        "|---|---:|---|---|",
        *[
            f"| {name} | {value:.2f} | {want} | {'yes' if ok else 'NO'} |"
            for name, value, want, ok in targets
        ],
        "",
        "## Newton-Schulz against raw matmul (the stacked block matrices)",
        "",
        "| | ms | GFLOP/s | compile s |",
        "|---|---:|---:|---:|",
        f"| `nox.orthogonalize(stack_axes=1)`, {result['ns_tflop'] * 1e3:.1f} GFLOP "
        f"| {_ms(result['ns_stats'])} | {result['ns_gflops']:.1f} "
        f"| {result['ns_compile']:.2f} |",
        f"| raw `jnp.matmul`: one step's 3 products per matrix "
        f"| {_ms(result['raw_stats'])} | {result['raw_gflops']:.1f} "
        f"| {result['raw_compile']:.2f} |",
        "",
        "## One training step (update + apply, donated)",
        "",
        "| optimizer | step ms | compile s |",
        "|---|---:|---:|",
        *[f"| {k} | {_ms(s)} | {c:.2f} |" for k, (s, c) in steps.items()],
        "",
        f"![step and compile times]({out.stem}.png)",
        "",
    ]
    out.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), layout="constrained")
    ax_step, ax_compile, ax_flops = fig.subplots(1, 3)
    labels = list(result["steps"])
    short = [label.replace(" (", "\n(") for label in labels]
    ax_step.bar(short, [result["steps"][k][0].median * 1e3 for k in labels])
    ax_step.set(ylabel="ms", title="step time (median)")
    ax_compile.bar(short, [result["steps"][k][1] for k in labels])
    ax_compile.set(ylabel="s", title="compile time")
    ax_flops.bar(
        ["Newton-Schulz", "raw matmul"], [result["ns_gflops"], result["raw_gflops"]]
    )
    ax_flops.set(ylabel="GFLOP/s", title="throughput")
    for ax in (ax_step, ax_compile):
        ax.tick_params(axis="x", labelsize=7)
    fig.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 256, 12 layers")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks it runs")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds")
    parser.add_argument("--out", type=Path, default=None, help="report path (.md)")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    reps = args.reps or (3 if args.smoke else 7)
    start = time.perf_counter()
    facts = harness.machine_facts()
    result = run(size, reps)
    facts["load average at the end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    facts["wall time of the run"] = f"{time.perf_counter() - start:.0f} s"
    suffix = {"full": "-muon", "quick": "-muon-quick", "smoke": "-muon-smoke"}[size]
    out = args.out or RESULTS / f"{harness.machine_slug()}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    report(result, facts, out)
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
