"""norm_optax against optax and PyTorch, side by side, in one process.

Run from the repository root::

    python benchmarks/bench.py --quick   # a subset: 4.6 min on 2 cores, load 2-3
    python benchmarks/bench.py           # the full run: 15 min (25 at load 5)

It writes ``benchmarks/results/<machine>.md`` (``<machine>-quick.md`` with
``--quick``): the machine's facts, the measured memory bandwidth, the targets,
one table per operation and dtype, and two plots (``-ratios.png``: time as a
ratio to the bandwidth bound, per tree; ``-compile.png``: compile time against
the number of leaves).

What is timed, on the parameter shapes of GPT-2 small, ResNet-50, ViT-B/16
and 3,000 leaves of 64x64 (``_harness.TREES``; ``--quick``: GPT-2, ResNet-50
and 1,000 leaves in float32, GPT-2 in bfloat16), every peer jitted and
compiled ahead of time:

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
  ``clip_grad_norm_(foreach=True)`` + ``AdamW(foreach=True)`` (float32, full
  run only) and ``AdamW(fused=True)``.

The bound for an operation is the time its minimal memory traffic takes at
the bandwidth of a donated jitted triad (``_harness.Bandwidth``) that runs
inside every interleaved group of the run, so that it sees the same noise:
``norm`` reads g once (1 pass over the tree's bytes); ``clip`` reads g for
the norm, then reads and writes g (3 passes); ``clip (within limit)`` needs
only the norm (1 pass); ``step`` reads g for the norm, then reads g, p, mu,
nu and writes p, mu, nu (8 passes; mu and nu have the params' dtype).
Compile time is ``jax.jit(f).lower(...).compile()`` wall time, for clip and
for the step, on n leaves of 64x64 (the step up to ``--step-compile-limit``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import norm_optax as nox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness

torch: Any
try:
    torch = importlib.import_module("torch")
except ImportError:  # torch is optional: its columns are left empty
    torch = None

RESULTS = Path(__file__).resolve().parent / "results"
MAX_NORM = 1.0
LR = 1e-3
WEIGHT_DECAY = 1e-4
PASSES = {
    "norm": 1,
    "clip (undonated)": 3,
    "clip": 3,
    "clip (within limit)": 1,
    "step": 8,
}
COMPILE: dict[tuple[str, str, int], float] = {}  # (peer, op, leaves) -> seconds
BANDWIDTH = harness.Bandwidth()
QUICK = False  # set by --quick


@dataclasses.dataclass
class Row:
    tree: str
    dtype: str
    op: str
    peer: str
    stats: harness.Stats
    traffic: int  # bytes of the op's minimal memory traffic
    gbps: float  # triad bandwidth at the median of this op's group

    @property
    def bound(self) -> float:
        """Seconds the minimal traffic takes at the bandwidth of its group."""
        return self.traffic / (self.gbps * 1e9)

    @property
    def ratio(self) -> float:
        return self.stats.median / self.bound


# ---------------------------------------------------------------------------
# The JAX peers.
# ---------------------------------------------------------------------------

CLIPS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "norm_optax": nox.clip_by_global_norm,
    "optax": optax.clip_by_global_norm,
}
NORMS: dict[str, Callable[[Any], jax.Array]] = {
    "norm_optax": nox.global_norm,
    "optax": optax.tree.norm,
}


def clip_fn(peer: str) -> Callable[[Any], Any]:
    tx = CLIPS[peer](MAX_NORM)

    def clip(g: Any) -> Any:
        return tx.update(g, tx.init(g))[0]

    return clip


def active_clip_fn(peer: str) -> Callable[[Any, Any], Any]:
    """Clips to a ``max_norm`` passed at run time (traced, no recompilation).

    A donated loop gives each call the previous output, whose norm is the
    previous ``max_norm``; lowering ``max_norm`` by 1% per call makes every
    call clip, with the traffic of the plain transform.
    """

    def active(g: Any, max_norm: Any) -> Any:
        tx = CLIPS[peer](max_norm)
        return tx.update(g, tx.init(g))[0]

    return active


def chain(peer: str) -> optax.GradientTransformation:
    return optax.chain(
        CLIPS[peer](MAX_NORM), optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    )


def step_fn(peer: str) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    tx = chain(peer)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _copy(tree: Any) -> Any:
    return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


# ---------------------------------------------------------------------------
# The torch peers.
# ---------------------------------------------------------------------------

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def to_torch(tree: dict[str, jax.Array]) -> list[Any]:
    assert torch is not None
    out = []
    for x in tree.values():
        host = np.asarray(x.astype(jnp.float32))
        out.append(torch.from_numpy(host.copy()).to(getattr(torch, str(x.dtype))))
    return out


def torch_adamw(params: list[Any], kind: str) -> Any:
    """``torch.optim.AdamW`` with ``foreach`` or ``fused``; ``None`` if unsupported."""
    assert torch is not None
    try:
        opt = torch.optim.AdamW(
            params,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            foreach=kind == "foreach",
            fused=kind == "fused",
        )
        opt.step()  # fused=True raises here on backends without a kernel
    except (RuntimeError, ValueError) as error:
        print(f"  torch AdamW({kind}=True) unavailable: {error}", flush=True)
        return None
    return opt


# ---------------------------------------------------------------------------
# One tree, one dtype: all operations.
# ---------------------------------------------------------------------------


def bench_tree(tree: str, dtype: Any, reps: int) -> list[Row]:
    spec = harness.TREES[tree]()
    dname = jnp.dtype(dtype).name
    n_leaves = len(spec)
    print(
        f"{tree} {dname}: {n_leaves} leaves, {harness.count_params(spec) / 1e6:.1f} M",
        flush=True,
    )
    grads = harness.make_tree(spec, dtype, seed=0)
    params = harness.make_tree(spec, dtype, seed=1, scale=0.02)
    nbytes = harness.tree_bytes(grads)
    rows: list[Row] = []

    def add(op: str, peers: dict[str, Callable[[], Any]]) -> None:
        stats = harness.interleave({**peers, "triad": BANDWIDTH.run}, reps)
        triad = stats.pop("triad")
        BANDWIDTH.record(triad)
        gbps = BANDWIDTH.moved / triad.median / 1e9
        for peer, s in stats.items():
            rows.append(Row(tree, dname, op, peer, s, PASSES[op] * nbytes, gbps))
        bound = rows[-1].bound
        text = ", ".join(
            f"{p} {s.median * 1e3:.1f} ms ({s.median / bound:.2f}x)"
            for p, s in stats.items()
        )
        print(f"  {op}: {text}", flush=True)

    def timed_compile(peer: str, op: str, fn: Any, args: Any, donate: Any) -> Any:
        compiled, seconds = harness.compile_seconds(fn, args, donate)
        if tree.endswith("x64x64") and dname == "float32":  # reused by the sweep
            COMPILE[(peer, op, n_leaves)] = seconds
        return compiled

    t_params = t_grads = None
    if torch is not None:
        t_params = [torch.nn.Parameter(t) for t in to_torch(params)]
        t_grads = to_torch(grads)
        for p, g in zip(t_params, t_grads, strict=True):
            p.grad = g

    # -- norm --------------------------------------------------------------
    peers: dict[str, Callable[[], Any]] = {}
    for peer, norm in NORMS.items():
        compiled = timed_compile(peer, "norm", norm, (grads,), ())

        def run_norm(c: Any = compiled) -> None:
            jax.block_until_ready(c(grads))

        peers[peer] = run_norm
    if torch is not None:
        get_total_norm = torch.nn.utils.get_total_norm
        peers["torch"] = lambda: get_total_norm(t_grads, 2.0, foreach=True).item()
    add("norm", peers)

    # -- clip, undonated -----------------------------------------------------
    peers = {}
    for peer in CLIPS:
        compiled = timed_compile(peer, "clip (undonated)", clip_fn(peer), (grads,), ())

        def run_clip(c: Any = compiled) -> None:
            jax.block_until_ready(c(grads))  # the output is freed at once

        peers[peer] = run_clip
    add("clip (undonated)", peers)

    # -- clip, donated: clipping active, then within the limit ---------------
    # Each call gets the previous output, whose norm is the previous max_norm:
    # max_norm is lowered by 1% per call (an argument of the jitted function),
    # so every call clips; the plain function then runs on a tree already
    # within its limit.
    peers = {}
    boxes: dict[str, dict[str, Any]] = {}
    for peer in CLIPS:
        compiled = timed_compile(
            peer, "clip active", active_clip_fn(peer), (grads, 1.0), (0,)
        )
        boxes[peer] = {"g": _copy(grads), "max_norm": MAX_NORM}

        def run(c: Any = compiled, box: dict[str, Any] = boxes[peer]) -> None:
            box["max_norm"] *= 0.99
            box["g"] = jax.block_until_ready(c(box["g"], box["max_norm"]))

        peers[peer] = run
    if torch is not None:
        clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        torch_box = {"max_norm": MAX_NORM}

        def run_torch_clip() -> None:
            torch_box["max_norm"] *= 0.99
            clip_grad_norm_(t_params, torch_box["max_norm"], foreach=True).item()

        peers["torch foreach"] = run_torch_clip
    add("clip", peers)
    for peer in CLIPS:
        compiled = timed_compile(peer, "clip", clip_fn(peer), (grads,), (0,))

        def run_within(c: Any = compiled, box: dict[str, Any] = boxes[peer]) -> None:
            box["g"] = jax.block_until_ready(c(box["g"]))

        peers[peer] = run_within
    add("clip (within limit)", peers)
    del boxes, peers
    gc.collect()

    # -- clip + AdamW + apply, params and state donated ------------------------
    peers = {}
    steps: dict[str, dict[str, Any]] = {}
    for peer in CLIPS:
        tx = chain(peer)
        state = tx.init(params)
        compiled = timed_compile(
            peer, "step", step_fn(peer), (params, state, grads), (0, 1)
        )
        steps[peer] = {"p": _copy(params), "s": _copy(state)}

        def run_step(c: Any = compiled, box: dict[str, Any] = steps[peer]) -> None:
            box["p"], box["s"] = jax.block_until_ready(c(box["p"], box["s"], grads))

        peers[peer] = run_step
    if torch is not None:
        assert t_params is not None
        clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        # AdamW(foreach=True) on bfloat16 CPU tensors takes seconds per step
        # (it is an order of magnitude slower than fused=True): fp32 only.
        kinds = ("foreach", "fused") if dname == "float32" else ("fused",)
        if QUICK:  # AdamW(foreach=True) takes seconds per GPT-2 step here
            kinds = ("fused",)
        for kind in kinds:
            opt = torch_adamw(t_params, kind)
            if opt is None:
                continue

            def run_torch(opt: Any = opt) -> None:
                clip_grad_norm_(t_params, MAX_NORM, foreach=True)
                opt.step()

            peers[f"torch {kind}"] = run_torch
    add("step", peers)
    del steps, peers
    gc.collect()
    return rows


# ---------------------------------------------------------------------------
# Compile time against the number of leaves.
# ---------------------------------------------------------------------------


def compile_sweep(counts: list[int], step_limit: int, repeats: int) -> None:
    """Lower + compile wall time of clip and step, for ``n`` leaves of 64x64.

    Each peer is compiled ``repeats`` times from fresh closures (no cache
    hit), the peers' order rotating between repeats (the first compile in a
    process also warms JAX's caches of jnp helpers for the second); the
    median is kept. Leaf counts already timed by the tree benchmark are kept
    as they are when ``repeats`` is 1. The step (clip + AdamW) is compiled
    only up to ``step_limit`` leaves.
    """
    for n in counts:
        spec = harness.many_leaves(n)
        sds = {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in spec}
        ops = ["clip", "step"] if n <= step_limit else ["clip"]
        for op in ops:
            if repeats == 1 and all((p, op, n) in COMPILE for p in CLIPS):
                continue
            samples: dict[str, list[float]] = {peer: [] for peer in CLIPS}
            peers = list(CLIPS)
            for r in range(repeats):
                for peer in peers[r % 2 :] + peers[: r % 2]:
                    if op == "clip":
                        args: tuple[Any, ...] = (sds,)
                        fn: Callable[..., Any] = clip_fn(peer)
                        donate: tuple[int, ...] = (0,)
                    else:
                        state = jax.eval_shape(chain(peer).init, sds)
                        args, fn, donate = (sds, state, sds), step_fn(peer), (0, 1)
                    samples[peer].append(harness.compile_seconds(fn, args, donate)[1])
                    gc.collect()
            for peer, times in samples.items():
                COMPILE[(peer, op, n)] = statistics.median(times)
        text = ", ".join(
            f"{p} {op} {COMPILE[(p, op, n)]:.2f} s"
            for op in ("clip", "step")
            for p in CLIPS
            if (p, op, n) in COMPILE
        )
        print(f"compile, {n} leaves: {text}", flush=True)


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _cell(row: Row | None) -> str:
    if row is None:
        return "—"
    s = row.stats
    return (
        f"{s.median * 1e3:.1f} ({s.low * 1e3:.1f}-{s.high * 1e3:.1f}) "
        f"**{row.ratio:.2f}x**"
    )


def _find(rows: list[Row], tree: str, dtype: str, op: str, peer: str) -> Row | None:
    for r in rows:
        if (r.tree, r.dtype, r.op, r.peer) == (tree, dtype, op, peer):
            return r
    return None


def _targets(rows: list[Row]) -> list[str]:
    out = ["| target | measured | met |", "|---|---|---|"]

    def line(
        text: str, value: float | None, ok: bool | None, fmt: str, near: bool = False
    ) -> None:
        if value is None or ok is None:
            out.append(f"| {text} | not measured | - |")
            return
        verdict = "yes" if ok else "no"
        if not ok and near:
            verdict = "within 5% (noise)"
        out.append(f"| {text} | {fmt.format(value)} | {verdict} |")

    def med(tree: str, dtype: str, op: str, peer: str) -> float | None:
        r = _find(rows, tree, dtype, op, peer)
        return None if r is None else r.stats.median

    def ratio(tree: str, dtype: str, op: str, peer: str) -> float | None:
        r = _find(rows, tree, dtype, op, peer)
        return None if r is None else r.ratio

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    trees = list(dict.fromkeys(r.tree for r in rows))
    many = next((t for t in trees if t.endswith("x64x64")), "3000x64x64")
    n_many = int(many.split("x")[0])
    g = "gpt2-small"
    r = ratio(g, "float32", "step", "norm_optax")
    line("GPT-2 fp32 step <= 1.5x bound", r, r is not None and r <= 1.5, "{:.2f}x")
    r = div(med(g, "float32", "step", "optax"), med(g, "float32", "step", "norm_optax"))
    line(
        "GPT-2 fp32 step >= 2x faster than optax clip",
        r,
        r is not None and r >= 2,
        "{:.2f}x",
    )
    r = div(
        med(g, "float32", "step", "norm_optax"),
        med(g, "float32", "step", "torch fused"),
    )
    line(
        "GPT-2 fp32 step no slower than torch fused (time ratio)",
        r,
        r is not None and r <= 1,
        "{:.2f}",
    )
    r = ratio(g, "float32", "clip", "norm_optax")
    line(
        "GPT-2 fp32 clip donated <= 1.1x bound",
        r,
        r is not None and r <= 1.1,
        "{:.2f}x",
    )
    for tree in trees:
        for op in ("clip", "clip (undonated)", "clip (within limit)"):
            r = div(
                med(tree, "float32", op, "norm_optax"),
                med(tree, "float32", op, "optax"),
            )
            line(
                f"{tree} fp32 {op}: no slower than optax (time ratio)",
                r,
                r is not None and r <= 1.0,
                "{:.2f}",
                near=r is not None and r <= 1.05,
            )
        r = div(
            med(tree, "float32", "clip", "torch foreach"),
            med(tree, "float32", "clip", "norm_optax"),
        )
        line(
            f"{tree} fp32 clip: >= 1.3x faster than torch foreach",
            r,
            r is not None and r >= 1.3,
            "{:.2f}x",
        )
    for op in ("clip", "step"):
        r = ratio(many, "float32", op, "norm_optax")
        line(f"{many} fp32 {op} <= 3x bound", r, r is not None and r <= 3, "{:.2f}x")
    for op in ("clip", "step"):
        a = COMPILE.get(("norm_optax", op, n_many))
        b = COMPILE.get(("optax", op, n_many))
        r = div(a, b)
        line(
            f"compile {op} at {n_many:,} leaves <= 0.25x optax",
            r,
            r is not None and r <= 0.25,
            "{:.2f}",
        )
    for tree in trees:
        r = div(
            med(tree, "bfloat16", "step", "norm_optax"),
            med(tree, "bfloat16", "step", "optax"),
        )
        if r is not None:
            line(
                f"{tree} bf16 step within 5% of optax (time ratio)",
                r,
                r <= 1.05,
                "{:.2f}",
            )
    return out


def write_report(
    rows: list[Row],
    facts: dict[str, str],
    path: Path,
    quick: bool,
) -> None:
    bw = BANDWIDTH.gbps
    bw_low, bw_high = BANDWIDTH.gbps_range
    lines = [
        f"# norm_optax benchmarks: {facts['cpu']}, {facts['cores']} cores"
        + (" (quick run)" if quick else ""),
        "",
        "Written by `benchmarks/bench.py`; all peers ran in one process and "
        "one run, interleaved round-robin. Times are milliseconds: median "
        "(min-max) of the timed rounds after warm-up, and in **bold** the "
        "ratio of the median to the bandwidth bound of the operation's minimal "
        "traffic (norm: 1 pass over the tree's bytes; clip: 3; clip within the "
        "limit: 1; clip + AdamW + apply: 8 = read g for the norm, read g, p, mu, "
        "nu, write p, mu, nu). The bandwidth of each bound is the median of the "
        "donated triad that ran interleaved in the same group as the peers "
        "(column `GB/s`), so that load from other processes hits both alike.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        f"| bandwidth (donated triad, median of {len(BANDWIDTH.samples)} runs "
        f"interleaved with every group) | {bw:.1f} GB/s "
        f"(min-max {bw_low:.1f}-{bw_high:.1f}) |",
        "",
    ]
    lines += ["## Targets", "", *_targets(rows), ""]
    for dtype in ("float32", "bfloat16"):
        for op in PASSES:
            sub = [r for r in rows if r.dtype == dtype and r.op == op]
            if not sub:
                continue
            peers = list(dict.fromkeys(r.peer for r in sub))
            trees = list(dict.fromkeys(r.tree for r in sub))
            title = {
                "norm": "global norm",
                "clip (undonated)": "clip_by_global_norm, no donation",
                "clip": "clip_by_global_norm, gradients donated and clipped "
                "at every call (torch: in place)",
                "clip (within limit)": "clip_by_global_norm, gradients donated, "
                "norm already within max_norm (bound: 1 pass)",
                "step": "clip + AdamW + apply_updates, params and state donated",
            }[op]
            lines += [f"### {dtype}: {title}", ""]
            lines.append("| tree | GB/s | bound ms | " + " | ".join(peers) + " |")
            lines.append("|---|---|---|" + "---|" * len(peers))
            for tree in trees:
                first = next(r for r in sub if r.tree == tree)
                cells = [_cell(_find(sub, tree, dtype, op, p)) for p in peers]
                lines.append(
                    f"| {tree} | {first.gbps:.1f} | {first.bound * 1e3:.1f} | "
                    + " | ".join(cells)
                    + " |"
                )
            lines.append("")
    counts = sorted({n for (_, _, n) in COMPILE})
    if counts:
        lines += [
            "## Compile time (lower + compile, seconds), n leaves of 64x64 float32",
            "",
            "| leaves | nox clip | optax clip | ratio | nox clip+adamw "
            "| optax clip+adamw | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in counts:
            cells = []
            for op in ("clip", "step"):
                a = COMPILE.get(("norm_optax", op, n))
                b = COMPILE.get(("optax", op, n))
                cells += [
                    "—" if a is None else f"{a:.2f}",
                    "—" if b is None else f"{b:.2f}",
                    "—" if a is None or b is None else f"{a / b:.2f}",
                ]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    stem = path.stem
    lines += [
        "## Plots",
        "",
        f"![time / bound]({stem}-ratios.png)",
        "",
        f"![compile time]({stem}-compile.png)",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path}", flush=True)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(PASSES)
    dtypes = [d for d in ("float32", "bfloat16") if any(r.dtype == d for r in rows)]
    if dtypes:
        _plot_ratios(plt, rows, ops, dtypes, path)
    _plot_compile(plt, path)


def _plot_ratios(
    plt: Any, rows: list[Row], ops: list[str], dtypes: list[str], path: Path
) -> None:
    fig, axes = plt.subplots(
        len(dtypes),
        len(ops),
        figsize=(4.2 * len(ops), 3.6 * len(dtypes)),
        squeeze=False,
    )
    for i, dtype in enumerate(dtypes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            sub = [r for r in rows if r.dtype == dtype and r.op == op]
            trees = list(dict.fromkeys(r.tree for r in sub))
            peers = list(dict.fromkeys(r.peer for r in sub))
            width = 0.8 / max(len(peers), 1)
            for k, peer in enumerate(peers):
                xs, ys = [], []
                for t, tree in enumerate(trees):
                    r = _find(sub, tree, dtype, op, peer)
                    if r is not None:
                        xs.append(t + k * width)
                        ys.append(r.ratio)
                ax.bar(xs, ys, width, label=peer)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([t + 0.4 - width / 2 for t in range(len(trees))])
            ax.set_xticklabels(trees, rotation=20, fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"{dtype}: {op}", fontsize=9)
            ax.set_ylabel("time / bandwidth bound")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "-ratios.png"), dpi=110)
    plt.close(fig)


def _plot_compile(plt: Any, path: Path) -> None:
    counts = sorted({n for (_, _, n) in COMPILE})
    if not counts:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for peer in CLIPS:
        for op, label in (("clip", "clip"), ("step", "clip+adamw")):
            ns = [n for n in counts if (peer, op, n) in COMPILE]
            ax.plot(
                ns,
                [COMPILE[(peer, op, n)] for n in ns],
                marker="o",
                label=f"{peer} {label}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("leaves (64x64 float32)")
    ax.set_ylabel("lower + compile, s")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "-compile.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset, < 5 min")
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
    parser.add_argument("--out", type=Path, default=None, help="report path (.md)")
    args = parser.parse_args()

    global QUICK
    QUICK = args.quick
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    reps = args.reps or (10 if args.quick else 12)
    trees = args.trees or (
        ["gpt2-small", "resnet50", "1000x64x64"]
        if args.quick
        else ["gpt2-small", "resnet50", "vit-b16", "3000x64x64"]
    )
    bf16_trees = [t for t in trees if t == "gpt2-small"] if args.quick else trees
    counts = args.counts
    if counts is None:
        counts = [100, 300, 1000] if args.quick else [100, 1000, 3000, 10000]
    start = time.perf_counter()
    facts = harness.machine_facts()
    print(facts, flush=True)
    BANDWIDTH.measure()
    print(f"bandwidth {BANDWIDTH.gbps:.1f} GB/s", flush=True)

    rows: list[Row] = []
    for dtype in [] if args.compile_only else args.dtypes:
        for tree in trees if dtype != "bfloat16" else bf16_trees:
            rows += bench_tree(tree, jnp.dtype(dtype), reps)
            gc.collect()
    compile_sweep(counts, args.step_compile_limit, args.compile_repeats)
    print(f"bandwidth over the run {BANDWIDTH.gbps:.1f} GB/s", flush=True)
    facts["load average at the end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    facts["wall time of the run"] = f"{time.perf_counter() - start:.0f} s"

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = harness.machine_slug() + ("-quick" if args.quick else "")
    if args.compile_only:
        name = harness.machine_slug() + "-compile"
    path = args.out or RESULTS / f"{name}.md"
    write_report(rows, facts, path, args.quick)
    plot(rows, path)


if __name__ == "__main__":
    main()
