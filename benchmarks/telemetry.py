"""The cost of ``record_layer_norms``: step time and all-reduces, side by side.

Run from the repository root::

    python benchmarks/telemetry.py --quick   # GPT-2 small, 7 rounds
    python benchmarks/telemetry.py           # GPT-2 small, 21 rounds
    python benchmarks/telemetry.py --smoke   # a tiny GPT-2: checks it runs

Writes ``benchmarks/results/<machine>-telemetry[-quick].md``.

**Step time.** On the parameter shapes of GPT-2 small (float32), as 148
leaves (one per block parameter) and with the 12 blocks stacked (16 leaves,
``stack_axes`` 1 on the block leaves), one interleaved group per layout times,
with the bandwidth triad of ``_harness``:

* ``chain(clip_by_global_norm(1.0), adamw(3e-4))`` + apply (params and state
  donated);
* ``record_layer_norms`` of the same chain + apply.

The overhead is the difference of the medians, in passes over the params'
bytes at the group's measured bandwidth (target: at most 3, reading the
gradient, the update and the params once each).

**All-reduces.** In a subprocess with 8 emulated CPU devices
(``--xla_force_host_platform_device_count=8``), the compiled HLO of the
sharded update (a 4 x 2 ``data`` x ``model`` mesh with ``Explicit`` axes,
leaves sharded Megatron-style on different mesh axes or replicated) of the
two chains, on a narrow GPT-2 (width 64, 12 layers) as 148 and as 16 leaves:
the number of all-reduces and all-gathers (target: the telemetry adds the
same number, whatever the number of leaves).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import _harness as harness
import jax
import jax.numpy as jnp
import optax
from _peer import Timed, attempt, step_build, time_group, timing_text

import norm_optax as nox

HERE = pathlib.Path(__file__).resolve().parent
LR = 3e-4
LAYOUTS = ("unstacked", "stacked")


def _chain() -> optax.GradientTransformation:
    return optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(LR))


def _recorded(stack: dict[str, int] | None) -> optax.GradientTransformation:
    return nox.record_layer_norms(_chain(), stack_axes=stack)


def _stack_axes(spec: list[tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    return {name: int(name.startswith("h/")) for name, _ in spec}


def step_times(model: str, reps: int) -> tuple[list[str], dict[str, Any]]:
    size = harness.GPT2_SIZES[model]
    specs = {"unstacked": harness.gpt2(**size), "stacked": harness.gpt2_stacked(**size)}
    bandwidth = harness.Bandwidth()
    bandwidth.measure()
    lines, numbers = [], {}
    for layout in LAYOUTS:
        spec = specs[layout]
        grads = harness.make_tree(spec, jnp.float32, seed=0)
        params = harness.make_tree(spec, jnp.float32, seed=1, scale=0.02)
        nbytes = harness.tree_bytes(params)
        stack = _stack_axes(spec) if layout == "stacked" else None
        makes: dict[str, Callable[[], optax.GradientTransformation]] = {
            "chain": _chain,
            "recorded": functools.partial(_recorded, stack),
        }
        print(f"{model} {layout}: {len(spec)} leaves", flush=True)
        candidates = {
            k: attempt(step_build(make, params, grads), 8 * nbytes)
            for k, make in makes.items()
        }
        timed: dict[str, Timed] = time_group(candidates, bandwidth, reps)
        plain, recorded = timed["chain"], timed["recorded"]
        assert plain.stats is not None
        assert recorded.stats is not None
        assert plain.gbps is not None
        extra = recorded.stats.median - plain.stats.median
        pass_s = nbytes / (plain.gbps * 1e9)
        passes = extra / pass_s
        numbers[layout] = {
            "leaves": len(spec),
            "chain_ms": plain.stats.median * 1e3,
            "recorded_ms": recorded.stats.median * 1e3,
            "ratio": recorded.stats.median / plain.stats.median,
            "overhead_passes": passes,
            "gbps": plain.gbps,
            "compile_chain_s": plain.compile_s,
            "compile_recorded_s": recorded.compile_s,
        }
        lines.append(
            f"| {layout} | {len(spec)} | {plain.gbps:.1f} | {timing_text(plain)} | "
            f"{timing_text(recorded)} | {numbers[layout]['ratio']:.3f} | "
            f"{passes:+.2f} | {plain.compile_s:.2f} / {recorded.compile_s:.2f} |"
        )
    return lines, numbers


# ---------------------------------------------------------------------------
# All-reduces in the compiled sharded update (8 emulated devices).
# ---------------------------------------------------------------------------


def _spec2d(name: str, shape: tuple[int, ...]) -> Any:
    """Megatron-style on ``model``, FSDP-style on ``data``; the rest replicated."""
    from jax.sharding import PartitionSpec as P

    lead = (None,) * (len(shape) - (2 if len(shape) >= 2 else 1))
    if name in ("wte", "wpe"):
        return P(None, "data")
    if name.endswith(("attn/c_attn/w", "mlp/c_fc/w")):
        return P(*lead, "data", "model")
    if name.endswith(("attn/c_proj/w", "mlp/c_proj/w")):
        return P(*lead, "model", "data")
    if name.endswith(("attn/c_attn/b", "mlp/c_fc/b")):
        return P(*lead, "model")
    return P(*((None,) * len(shape)))


def collective_counts() -> dict[str, Any]:
    """Runs in the 8-device subprocess: counts per layout and transform."""
    from jax.sharding import NamedSharding

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    size = {"d": 64, "ff": 256, "vocab": 1000, "ctx": 128, "layers": 12}
    out: dict[str, Any] = {}
    for layout, spec in (
        ("unstacked", harness.gpt2(**size)),
        ("stacked", harness.gpt2_stacked(**size)),
    ):
        shard = {n: NamedSharding(mesh, _spec2d(n, s)) for n, s in spec}
        grads = jax.device_put(harness.make_tree(spec, jnp.float32, seed=0), shard)
        params = jax.device_put(harness.make_tree(spec, jnp.float32, seed=1), shard)
        stack = _stack_axes(spec) if layout == "stacked" else None
        txs = {
            "chain": _chain(),
            "recorded": nox.record_layer_norms(_chain(), stack_axes=stack),
        }
        row: dict[str, Any] = {"leaves": len(spec)}
        with jax.set_mesh(mesh):
            for name, tx in txs.items():
                state = tx.init(params)
                hlo = (
                    jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
                    .lower(grads, state, params)
                    .compile()
                    .as_text()
                ) or ""
                row[name] = {
                    "all_reduce": len(re.findall(r"\sall-reduce(?:-start)?\(", hlo)),
                    "all_gather": len(re.findall(r"\sall-gather(?:-start)?\(", hlo)),
                }
        out[layout] = row
    return out


def sharded_lines() -> tuple[list[str], dict[str, Any]]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__, "--collectives"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = []
    for layout in LAYOUTS:
        row = counts[layout]
        chain, recorded = row["chain"], row["recorded"]
        lines.append(
            f"| {layout} | {row['leaves']} | {chain['all_reduce']} | "
            f"{recorded['all_reduce']} | "
            f"{recorded['all_reduce'] - chain['all_reduce']} | "
            f"{chain['all_gather']} / {recorded['all_gather']} |"
        )
    return lines, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--collectives", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collectives:
        print(json.dumps(collective_counts()))
        return
    model = "gpt2-tiny" if args.smoke else "gpt2-small"
    reps = 3 if args.smoke else 7 if args.quick else 21
    facts = harness.machine_facts()
    step_lines, step_numbers = step_times(model, reps)
    ar_lines, counts = sharded_lines()
    facts["load average after (1, 5, 15 min)"] = ", ".join(
        f"{x:.2f}" for x in os.getloadavg()
    )
    suffix = "-smoke" if args.smoke else "-quick" if args.quick else ""
    path = HERE / "results" / f"{harness.machine_slug()}-telemetry{suffix}.md"
    text = [
        f"# record_layer_norms: cost on {model} ({reps} rounds)",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "",
        "## Step time",
        "",
        "`optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(3e-4))` + apply "
        "(`chain`) against `nox.record_layer_norms` of it + apply (`recorded`), "
        "params and state donated, one interleaved group per layout with the "
        "bandwidth triad. Times: median (min-max) ms and the ratio to the "
        "8-pass bound of the plain step. Overhead: (recorded - chain) medians "
        "in passes over the params' bytes at the group's bandwidth (target <= 3).",
        "",
        "| layout | leaves | GB/s | chain | recorded | ratio | overhead passes "
        "| compile s (chain / recorded) |",
        "|---|---|---|---|---|---|---|---|",
        *step_lines,
        "",
        "## All-reduces in the compiled sharded update (8 emulated devices)",
        "",
        "GPT-2 of width 64 with 12 layers on a 4 x 2 `data` x `model` mesh "
        "(`Explicit` axes), leaves sharded on different mesh axes or replicated. "
        "Target: the telemetry's all-reduces do not grow with the leaves.",
        "",
        "| layout | leaves | chain all-reduces | recorded all-reduces | added "
        "| all-gathers (chain / recorded) |",
        "|---|---|---|---|---|---|",
        *ar_lines,
        "",
    ]
    path.write_text("\n".join(text))
    print("\n".join(text))
    print(json.dumps({"steps": step_numbers, "collectives": counts}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
