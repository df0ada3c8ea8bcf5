"""norm_optax against optax and PyTorch, side by side, in one process.

Run from the repository root::

    python benchmarks/bench.py --quick   # a subset: 4.6 min on 2 cores, load 2-3
    python benchmarks/bench.py           # the full run: 15 min (25 at load 5)
    python benchmarks/bench.py --smoke   # tiny trees, 3 rounds: checks it runs

(The times above are of ``--groups core``, timed before the ``stacked`` and
``transforms`` groups were added; those two add a few GPT-2 compiles and
steps.)

It writes ``benchmarks/results/<machine>.md`` (``<machine>-quick.md`` with
``--quick``; ``--smoke`` writes ``<machine>-smoke.md`` to a new temporary
folder unless ``--out`` is given): the machine's facts, the measured memory
bandwidth, the targets, one table per operation and dtype, the compile
times, a section per extra group, and two plots (``-ratios.png``: time as a
ratio to the bandwidth bound, per tree; ``-compile.png``: compile time
against the number of leaves).

Group ``core`` (``_core.py``): on the parameter shapes of GPT-2 small,
ResNet-50, ViT-B/16 and 3,000 leaves of 64x64 (``_harness.TREES``;
``--quick``: GPT-2, ResNet-50 and 1,000 leaves in float32, GPT-2 in
bfloat16; ``--smoke``: 100 leaves), every peer jitted and compiled ahead of
time:

* ``norm``: the global L2 norm (``nox.global_norm``, ``optax.tree.norm``,
  ``torch.nn.utils.get_total_norm(foreach=True)``);
* ``clip (undonated)``: ``clip_by_global_norm(1.0)`` returning a new tree;
* ``clip``: the same with the gradients donated, each call clipping the
  previous output to a ``max_norm`` 1% lower (a run-time argument), so every
  call clips (torch: ``clip_grad_norm_(foreach=True)``, in place);
* ``clip (within limit)``: donated, on a tree already within ``max_norm``;
* ``step``: clip + AdamW + apply: ``optax.chain(clip, optax.adamw(1e-3))``
  and ``optax.apply_updates`` jitted with params and state donated, with
  ``nox.clip_by_global_norm`` or ``optax.clip_by_global_norm``; torch
  ``clip_grad_norm_(foreach=True)`` + ``AdamW(foreach=True)`` (float32, not
  with ``--quick``) and ``AdamW(fused=True)``.

The bound for an operation is the time its minimal memory traffic takes at
the bandwidth of a donated jitted triad (``_harness.Bandwidth``) that runs
inside every interleaved group of the run, so that it sees the same noise:
``norm`` reads g once (1 pass over the tree's bytes); ``clip`` reads g for
the norm, then reads and writes g (3 passes); ``clip (within limit)`` needs
only the norm (1 pass); ``step`` reads g for the norm, then reads g, p, mu,
nu and writes p, mu, nu (8 passes; mu and nu have the params' dtype).
Compile time is ``jax.jit(f).lower(...).compile()`` wall time, for clip and
for the step, on n leaves of 64x64 (the step up to ``--step-compile-limit``).

Group ``stacked`` (``_stacked.py``), on GPT-2 small float32 (``--smoke``: a
two-block GPT-2 of width 64): the same parameters as 148 leaves or with the
12 blocks stacked (16 leaves, ``(12, ...)`` for the blocks). Compile time
and step time, per layout, of ``optax.chain(nox.clip_by_global_norm(1.0),
optax.adamw(3e-4))`` and of the same chain with ``optax.clip_by_global_norm``
(bound: 8 passes), and of ``nox.max_norm(1.0)`` on the unstacked tree
against ``nox.max_norm(1.0, stack_axes=...)`` on the stacked one (bound: 3
passes).

Group ``transforms`` (``_transforms.py``), same tree: ``nox.prox_group_l1``,
``nox.prox_elastic_net`` (3 passes: read p, u, write u) and the update of
``nox.clip_spectral_norm(1.0)`` (3 passes over the matrices), as ratios to
their bound; and ``optax.chain(optax.adamw(3e-4),
nox.clip_spectral_norm(1.0))`` against ``optax.adamw(3e-4)`` (7 passes),
its extra time given in passes over the matrices (target: at most 2).

A transform or keyword that the package does not have (yet) is shown as an
"n/a" row with the reason in those two groups; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness
from _core import CompileTimes, Row, bench_tree, compile_sweep, torch
from _report import plot, write_report
from _stacked import bench_stacked, stacked_section
from _transforms import bench_transforms, transforms_section

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("core", "stacked", "transforms")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures and where it writes: the command line, resolved."""

    quick: bool
    smoke: bool
    compile_only: bool
    reps: int
    trees: tuple[str, ...]
    bf16_trees: tuple[str, ...]
    dtypes: tuple[str, ...]
    counts: tuple[int, ...]
    step_compile_limit: int
    compile_repeats: int
    groups: tuple[str, ...]
    gpt2: str  # the GPT-2 size of the stacked and transforms groups
    triad_elements: int
    out: Path  # the report (.md); the plots go beside it

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick, smoke = args.quick, args.smoke
        if smoke:
            default_trees = ["100x64x64"]
        elif quick:
            default_trees = ["gpt2-small", "resnet50", "1000x64x64"]
        else:
            default_trees = ["gpt2-small", "resnet50", "vit-b16", "3000x64x64"]
        trees = args.trees or default_trees
        bf16_trees = [t for t in trees if t == "gpt2-small"] if quick else trees
        counts = args.counts
        if counts is None:
            if smoke:
                counts = [50, 100]
            else:
                counts = [100, 300, 1000] if quick else [100, 1000, 3000, 10000]
        return cls(
            quick=quick,
            smoke=smoke,
            compile_only=args.compile_only,
            reps=args.reps or (3 if smoke else 10 if quick else 12),
            trees=tuple(trees),
            bf16_trees=tuple(bf16_trees),
            dtypes=tuple(args.dtypes),
            counts=tuple(counts),
            step_compile_limit=args.step_compile_limit,
            compile_repeats=args.compile_repeats,
            groups=tuple(args.groups),
            gpt2="gpt2-tiny" if smoke else "gpt2-small",
            triad_elements=1 << 22 if smoke else 1 << 26,
            out=args.out or _default_out(quick, smoke, args.compile_only),
        )

    @property
    def label(self) -> str:
        """What the report's title says of the run."""
        if self.smoke:
            return " (smoke run)"
        return " (quick run)" if self.quick else ""

    @property
    def torch_foreach(self) -> bool:
        """Time torch ``AdamW(foreach=True)`` in float32 (seconds per GPT-2 step)."""
        return not self.quick


def _default_out(quick: bool, smoke: bool, compile_only: bool) -> Path:
    slug = harness.machine_slug()
    if compile_only:
        name = f"{slug}-compile"
    elif smoke:
        name = f"{slug}-smoke"
    else:
        name = slug + ("-quick" if quick else "")
    folder = Path(tempfile.mkdtemp(prefix="norm_optax-bench-")) if smoke else RESULTS
    return folder / f"{name}.md"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset, < 5 min")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny trees and 3 rounds, to a temporary folder: checks the "
        "script runs and writes every table (its times mean nothing)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed rounds")
    parser.add_argument("--trees", nargs="*", default=None, help="subset of trees")
    parser.add_argument(
        "--counts",
        nargs="*",
        type=int,
        default=None,
        help="leaf counts of the compile-time sweep",
    )
    parser.add_argument(
        "--dtypes", nargs="*", default=["float32", "bfloat16"], help="dtypes"
    )
    parser.add_argument(
        "--step-compile-limit",
        type=int,
        default=3000,
        help="largest leaf count at which clip + AdamW compile time is taken "
        "(optax takes minutes at 10,000 leaves on 2 cores)",
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=1,
        help="compiles per peer and leaf count in the sweep (median kept)",
    )
    parser.add_argument(
        "--compile-only", action="store_true", help="only the compile-time sweep"
    )
    parser.add_argument(
        "--groups",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        help="groups to run (default: all; see the module docstring)",
    )
    parser.add_argument("--out", type=Path, default=None, help="report path (.md)")
    return parser.parse_args(argv)


def run_core(
    settings: Settings, bandwidth: harness.Bandwidth
) -> tuple[list[Row], CompileTimes]:
    """The per-tree tables (unless ``--compile-only``) and the compile sweep."""
    rows: list[Row] = []
    times: CompileTimes = {}
    if "core" not in settings.groups:
        return rows, times
    for dtype in () if settings.compile_only else settings.dtypes:
        trees = settings.trees if dtype != "bfloat16" else settings.bf16_trees
        for tree in trees:
            tree_rows, tree_times = bench_tree(
                tree, jnp.dtype(dtype), bandwidth, settings.reps, settings.torch_foreach
            )
            rows += tree_rows
            times.update(tree_times)
            gc.collect()
    times = compile_sweep(
        list(settings.counts),
        settings.step_compile_limit,
        settings.compile_repeats,
        times,
    )
    return rows, times


def run_extra(settings: Settings, bandwidth: harness.Bandwidth) -> list[list[str]]:
    """The report sections of the stacked and transforms groups."""
    sections: list[list[str]] = []
    if settings.compile_only:
        return sections
    if "stacked" in settings.groups:
        result = bench_stacked(settings.gpt2, bandwidth, settings.reps)
        sections.append(stacked_section(result))
        gc.collect()
    if "transforms" in settings.groups:
        transforms = bench_transforms(settings.gpt2, bandwidth, settings.reps)
        sections.append(transforms_section(transforms))
        gc.collect()
    return sections


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_args(parse_args(argv))
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    facts = harness.machine_facts()
    print(facts, flush=True)
    bandwidth = harness.Bandwidth(settings.triad_elements)
    bandwidth.measure()
    print(f"bandwidth {bandwidth.gbps:.1f} GB/s", flush=True)

    rows, times = run_core(settings, bandwidth)
    extra = run_extra(settings, bandwidth)
    print(f"bandwidth over the run {bandwidth.gbps:.1f} GB/s", flush=True)
    facts["load average at the end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    facts["wall time of the run"] = f"{time.perf_counter() - start:.0f} s"

    settings.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(settings.out, rows, times, facts, bandwidth, settings.label, extra)
    plot(rows, times, settings.out)


if __name__ == "__main__":
    main()
