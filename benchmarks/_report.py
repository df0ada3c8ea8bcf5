"""The Markdown report and the plots of ``bench.py``, one function per section.

Every function takes the results it shows and returns lines (or writes one
figure); :func:`write_report` puts the sections together in their order:
title and notes, machine, targets, one table per dtype and operation, the
compile-time table, the extra sections of the other groups, the plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _harness as harness
from _core import CLIPS, PASSES, CompileTimes, Row

DTYPES = ("float32", "bfloat16")
OP_TITLES = {
    "norm": "global norm",
    "clip (undonated)": "clip_by_global_norm, no donation",
    "clip": "clip_by_global_norm, gradients donated and clipped "
    "at every call (torch: in place)",
    "clip (within limit)": "clip_by_global_norm, gradients donated, "
    "norm already within max_norm (bound: 1 pass)",
    "step": "clip + AdamW + apply_updates, params and state donated",
}
INTRO = (
    "Written by `benchmarks/bench.py`; all peers ran in one process and "
    "one run, interleaved round-robin. Times are milliseconds: median "
    "(min-max) of the timed rounds after warm-up, and in **bold** the "
    "ratio of the median to the bandwidth bound of the operation's minimal "
    "traffic (norm: 1 pass over the tree's bytes; clip: 3; clip within the "
    "limit: 1; clip + AdamW + apply: 8 = read g for the norm, read g, p, mu, "
    "nu, write p, mu, nu). The bandwidth of each bound is the median of the "
    "donated triad that ran interleaved in the same group as the peers "
    "(column `GB/s`), so that load from other processes hits both alike."
)


def timing_cell(stats: harness.Stats, ratio: float) -> str:
    """``median (min-max) **ratio x**``, milliseconds."""
    return (
        f"{stats.median * 1e3:.1f} ({stats.low * 1e3:.1f}-{stats.high * 1e3:.1f}) "
        f"**{ratio:.2f}x**"
    )


def _cell(row: Row | None) -> str:
    return "—" if row is None else timing_cell(row.stats, row.ratio)


def _find(rows: list[Row], tree: str, dtype: str, op: str, peer: str) -> Row | None:
    for r in rows:
        if (r.tree, r.dtype, r.op, r.peer) == (tree, dtype, op, peer):
            return r
    return None


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------


class TargetTable:
    """The lines of a ``| target | measured | met |`` table."""

    def __init__(self) -> None:
        self.lines = ["| target | measured | met |", "|---|---|---|"]

    def add(
        self,
        text: str,
        value: float | None,
        ok: bool | None,
        fmt: str,
        near: bool = False,
    ) -> None:
        if value is None or ok is None:
            self.lines.append(f"| {text} | not measured | - |")
            return
        verdict = "yes" if ok else "no"
        if not ok and near:
            verdict = "within 5% (noise)"
        self.lines.append(f"| {text} | {fmt.format(value)} | {verdict} |")


def _median(rows: list[Row], tree: str, dtype: str, op: str, peer: str) -> float | None:
    r = _find(rows, tree, dtype, op, peer)
    return None if r is None else r.stats.median


def _ratio(rows: list[Row], tree: str, dtype: str, op: str, peer: str) -> float | None:
    r = _find(rows, tree, dtype, op, peer)
    return None if r is None else r.ratio


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _gpt2_targets(t: TargetTable, rows: list[Row]) -> None:
    g, f32 = "gpt2-small", "float32"
    r = _ratio(rows, g, f32, "step", "norm_optax")
    t.add("GPT-2 fp32 step <= 1.5x bound", r, r is not None and r <= 1.5, "{:.2f}x")
    r = div(
        _median(rows, g, f32, "step", "optax"),
        _median(rows, g, f32, "step", "norm_optax"),
    )
    t.add(
        "GPT-2 fp32 step >= 2x faster than optax clip",
        r,
        r is not None and r >= 2,
        "{:.2f}x",
    )
    r = div(
        _median(rows, g, f32, "step", "norm_optax"),
        _median(rows, g, f32, "step", "torch fused"),
    )
    t.add(
        "GPT-2 fp32 step no slower than torch fused (time ratio)",
        r,
        r is not None and r <= 1,
        "{:.2f}",
    )
    r = _ratio(rows, g, f32, "clip", "norm_optax")
    t.add(
        "GPT-2 fp32 clip donated <= 1.1x bound",
        r,
        r is not None and r <= 1.1,
        "{:.2f}x",
    )


def _per_tree_targets(t: TargetTable, rows: list[Row], trees: list[str]) -> None:
    for tree in trees:
        for op in ("clip", "clip (undonated)", "clip (within limit)"):
            r = div(
                _median(rows, tree, "float32", op, "norm_optax"),
                _median(rows, tree, "float32", op, "optax"),
            )
            t.add(
                f"{tree} fp32 {op}: no slower than optax (time ratio)",
                r,
                r is not None and r <= 1.0,
                "{:.2f}",
                near=r is not None and r <= 1.05,
            )
        r = div(
            _median(rows, tree, "float32", "clip", "torch foreach"),
            _median(rows, tree, "float32", "clip", "norm_optax"),
        )
        t.add(
            f"{tree} fp32 clip: >= 1.3x faster than torch foreach",
            r,
            r is not None and r >= 1.3,
            "{:.2f}x",
        )


def _many_leaves_targets(t: TargetTable, rows: list[Row], many: str) -> None:
    for op in ("clip", "step"):
        r = _ratio(rows, many, "float32", op, "norm_optax")
        t.add(f"{many} fp32 {op} <= 3x bound", r, r is not None and r <= 3, "{:.2f}x")


def _compile_targets(t: TargetTable, times: CompileTimes, n_many: int) -> None:
    for op in ("clip", "step"):
        r = div(times.get(("norm_optax", op, n_many)), times.get(("optax", op, n_many)))
        t.add(
            f"compile {op} at {n_many:,} leaves <= 0.25x optax",
            r,
            r is not None and r <= 0.25,
            "{:.2f}",
        )


def _bf16_targets(t: TargetTable, rows: list[Row], trees: list[str]) -> None:
    for tree in trees:
        r = div(
            _median(rows, tree, "bfloat16", "step", "norm_optax"),
            _median(rows, tree, "bfloat16", "step", "optax"),
        )
        if r is not None:
            t.add(
                f"{tree} bf16 step within 5% of optax (time ratio)",
                r,
                r <= 1.05,
                "{:.2f}",
            )


def targets_section(rows: list[Row], times: CompileTimes) -> list[str]:
    trees = list(dict.fromkeys(r.tree for r in rows))
    many = next((t for t in trees if t.endswith("x64x64")), "3000x64x64")
    table = TargetTable()
    _gpt2_targets(table, rows)
    _per_tree_targets(table, rows, trees)
    _many_leaves_targets(table, rows, many)
    _compile_targets(table, times, int(many.split("x")[0]))
    _bf16_targets(table, rows, trees)
    return ["## Targets", "", *table.lines, ""]


# ---------------------------------------------------------------------------
# The other sections.
# ---------------------------------------------------------------------------


def header_section(facts: dict[str, str], label: str) -> list[str]:
    """The title (``label``: `` (quick run)`` or empty) and the notes."""
    title = f"# norm_optax benchmarks: {facts['cpu']}, {facts['cores']} cores"
    return [title + label, "", INTRO, ""]


def machine_section(facts: dict[str, str], bandwidth: harness.Bandwidth) -> list[str]:
    bw_low, bw_high = bandwidth.gbps_range
    return [
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        f"| bandwidth (donated triad, median of {len(bandwidth.samples)} runs "
        f"interleaved with every group) | {bandwidth.gbps:.1f} GB/s "
        f"(min-max {bw_low:.1f}-{bw_high:.1f}) |",
        "",
    ]


def op_section(rows: list[Row], dtype: str, op: str) -> list[str]:
    """One table: a row per tree, a column per peer; empty if nothing ran."""
    sub = [r for r in rows if r.dtype == dtype and r.op == op]
    if not sub:
        return []
    peers = list(dict.fromkeys(r.peer for r in sub))
    trees = list(dict.fromkeys(r.tree for r in sub))
    lines = [f"### {dtype}: {OP_TITLES[op]}", ""]
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
    return lines


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def compile_section(times: CompileTimes) -> list[str]:
    counts = sorted({n for (_, _, n) in times})
    if not counts:
        return []
    lines = [
        "## Compile time (lower + compile, seconds), n leaves of 64x64 float32",
        "",
        "| leaves | nox clip | optax clip | ratio | nox clip+adamw "
        "| optax clip+adamw | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        cells = []
        for op in ("clip", "step"):
            a = times.get(("norm_optax", op, n))
            b = times.get(("optax", op, n))
            cells += [_seconds(a), _seconds(b), _seconds(div(a, b))]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plots_section(stem: str) -> list[str]:
    return [
        "## Plots",
        "",
        f"![time / bound]({stem}-ratios.png)",
        "",
        f"![compile time]({stem}-compile.png)",
        "",
    ]


def write_report(
    path: Path,
    rows: list[Row],
    times: CompileTimes,
    facts: dict[str, str],
    bandwidth: harness.Bandwidth,
    label: str,
    extra: Sequence[list[str]] = (),
) -> None:
    """Writes the report; ``extra``: sections of other groups, before the plots."""
    lines = header_section(facts, label) + machine_section(facts, bandwidth)
    lines += targets_section(rows, times)
    for dtype in DTYPES:
        for op in PASSES:
            lines += op_section(rows, dtype, op)
    lines += compile_section(times)
    for section in extra:
        lines += section
    lines += plots_section(path.stem)
    path.write_text("\n".join(lines))
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------


def plot(rows: list[Row], times: CompileTimes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(PASSES)
    dtypes = [d for d in DTYPES if any(r.dtype == d for r in rows)]
    if dtypes:
        _plot_ratios(plt, rows, ops, dtypes, path)
    _plot_compile(plt, times, path)


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
            _bars(axes[i][j], [r for r in rows if r.dtype == dtype and r.op == op])
            axes[i][j].set_title(f"{dtype}: {op}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "-ratios.png"), dpi=110)
    plt.close(fig)


def _bars(ax: Any, sub: list[Row]) -> None:
    """Time / bound per tree (x) and peer (bars) of one dtype and op."""
    trees = list(dict.fromkeys(r.tree for r in sub))
    peers = list(dict.fromkeys(r.peer for r in sub))
    width = 0.8 / max(len(peers), 1)
    for k, peer in enumerate(peers):
        xs, ys = [], []
        for t, tree in enumerate(trees):
            r = next((r for r in sub if (r.tree, r.peer) == (tree, peer)), None)
            if r is not None:
                xs.append(t + k * width)
                ys.append(r.ratio)
        ax.bar(xs, ys, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(trees))])
    ax.set_xticklabels(trees, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time / bandwidth bound")
    ax.legend(fontsize=7)


def _plot_compile(plt: Any, times: CompileTimes, path: Path) -> None:
    counts = sorted({n for (_, _, n) in times})
    if not counts:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for peer in CLIPS:
        for op, label in (("clip", "clip"), ("step", "clip+adamw")):
            ns = [n for n in counts if (peer, op, n) in times]
            ax.plot(
                ns,
                [times[(peer, op, n)] for n in ns],
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
