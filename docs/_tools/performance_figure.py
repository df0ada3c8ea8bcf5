"""The Performance page's summary figure, drawn from a committed report.

    python docs/_tools/performance_figure.py benchmarks/results/NAME.md

reads the timing tables of a report written by ``benchmarks/bench.py`` and
writes ``docs/images/performance-NAME.png``: for each operation, how long
optax and PyTorch take relative to norm_optax in the same run (right of 1:
norm_optax is faster). Run it after committing a new report, and point
``docs/performance.md`` at the new figure.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DONATED = "clip_by_global_norm, gradients donated"
OPS = {  # report heading (after "dtype: ") -> label
    "global norm": "global norm",
    "clip_by_global_norm, no donation": "clip, not donated",
    f"{DONATED} and clipped at every call": "clip, donated",
    f"{DONATED}, norm already within max_norm": "clip, within the limit",
    "clip + AdamW + apply_updates, params and state donated": "clip + AdamW + apply",
}
TREES = {
    "gpt2-small": "GPT-2 small: 148 leaves, 124 M parameters",
    "1000x64x64": "1,000 leaves of 64x64: per-kernel overhead",
}
PEERS = {"optax": ("#E69F00", ""), "torch": ("#0072B2", "//")}


def parse(report: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """(dtype, op label, tree) -> {peer: median ms}."""
    found: dict[tuple[str, str, str], dict[str, float]] = {}
    for section in re.split(r"^### ", report, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        dtype, _, op = heading.partition(": ")
        op = re.sub(r" \(.*\)$", "", op.strip())
        if op not in OPS:
            continue
        table = body.strip().split("\n\n")[0]  # the first table only
        rows = [r for r in table.splitlines() if r.startswith("|")]
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        for row in rows[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            times = {}
            for name, cell in zip(header[3:], cells[3:], strict=True):
                peer = name.split()[0]
                times[peer] = float(cell.split()[0])
            found[(dtype, OPS[op], cells[0])] = times
    return found


def draw(report_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    data = parse(report_path.read_text())
    plt.rcParams.update({"font.size": 11})
    panels = [
        (tree, [(k, v) for k, v in data.items() if k[2] == tree]) for tree in TREES
    ]
    heights = [max(len(rows), 1) for _, rows in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(8, 0.42 * sum(heights) + 1.6),
        height_ratios=heights,
        layout="constrained",
    )
    for ax, (tree, rows) in zip(axes, panels, strict=True):
        labels = [f"{dtype}: {op}" for (dtype, op, _), _ in rows]
        for i, ((_, _, _), times) in enumerate(rows):
            for j, peer in enumerate(PEERS):
                if peer not in times:
                    continue
                colour, hatch = PEERS[peer]
                ratio = times[peer] / times["norm_optax"]
                ax.barh(
                    i + (j - 0.5) * 0.38,
                    ratio - 1,
                    left=1,
                    height=0.36,
                    color=colour,
                    hatch=hatch,
                    edgecolor="black" if hatch else colour,
                    linewidth=0.5,
                    label=peer
                    if i == 0 or peer not in ax.get_legend_handles_labels()[1]
                    else None,
                )
                ax.text(
                    max(ratio, 1) * 1.03,
                    i + (j - 0.5) * 0.38,
                    f"{ratio:.2f}",
                    va="center",
                    fontsize=9,
                )
        ax.axvline(1, color="black", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(0.2, 5)
        ax.xaxis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 4]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_title(TREES[tree], loc="left", fontsize=11)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[-1].set_xlabel(
        "peer time / norm_optax time (right of 1: norm_optax is faster)"
    )
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="outside upper right", ncols=2)
    fig.savefig(out, dpi=130)


if __name__ == "__main__":
    report = Path(sys.argv[1])
    target = (
        Path(__file__).resolve().parents[1]
        / "images"
        / f"performance-{report.stem}.png"
    )
    draw(report, target)
    print("wrote", target)
