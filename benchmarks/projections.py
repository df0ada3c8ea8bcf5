"""The "projections after AdamW" group on its own (see ``_projections.py``).

Run from the repository root::

    python benchmarks/projections.py --quick   # GPT-2 narrowed to 14M params
    python benchmarks/projections.py           # GPT-2 small (124M): slow on 2 cores
    python benchmarks/projections.py --smoke   # tiny GPT-2, 3 rounds: checks it runs

On CPU the per-unit rows (any transform that returns ``P(p + u) - p``)
keep ``p + u`` in a temporary buffer beside ``p``. XLA:CPU's default
scheduler computes every leaf's ``p + u`` before the first is used, so that
buffer is the size of the whole model, and glibc maps a buffer over 32 MiB
afresh at every step: one page fault per 4 KiB written. Two runs show the
steps without that cost, one leaf's buffer at a time or freed memory kept::

    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
        python benchmarks/projections.py --quick --out OUT-scheduler.md
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/projections.py --quick --out OUT-malloc.md

It writes ``benchmarks/results/<machine>-projections[-quick].md`` and a plot
beside it (``--smoke``: to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness
from _core import torch
from _projections import bench_projections, plot_projections, projections_section

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    model = "gpt2-tiny" if args.smoke else "gpt2-quick" if args.quick else "gpt2-small"
    reps = args.reps or (3 if args.smoke else 10)
    slug = harness.machine_slug() + "-projections"
    if args.smoke:
        out = (
            args.out
            or Path(tempfile.mkdtemp(prefix="norm_optax-bench-")) / f"{slug}.md"
        )
    else:
        out = args.out or RESULTS / f"{slug}{'-quick' if args.quick else ''}.md"
    start = time.perf_counter()
    facts = harness.machine_facts()
    tunables = sorted(
        f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")
    )
    facts["glibc malloc tunables"] = " ".join(tunables) or "none (the defaults)"
    facts["XLA_FLAGS"] = os.environ.get("XLA_FLAGS") or "none"
    print(facts, flush=True)
    bandwidth = harness.Bandwidth(1 << 22 if args.smoke else 1 << 26)
    bandwidth.measure()
    result = bench_projections(model, bandwidth, reps)
    facts["load average at the end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    facts["wall time of the run"] = f"{time.perf_counter() - start:.0f} s"
    lines = [
        f"# norm_optax projections after AdamW on {facts['cpu']}",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "",
        *projections_section(result),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    plot_projections(result, out.with_suffix(".png"))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
