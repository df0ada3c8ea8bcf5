"""``python -m norm_optax.demo``: what each technique does, on two small problems.

Part 1 (:mod:`norm_optax.demo.exploding`) trains a tanh RNN on the adding
problem with and without gradient clipping; part 2
(:mod:`norm_optax.demo.constraints`) trains a small Flax NNX CNN on the 8x8
digits with L2/L1 decay, the L1 and group-lasso proximal steps and weight
constraints (per unit, per element, spectral); part 3
(:mod:`norm_optax.demo.geometry`) trains a small MLP on the same digits with
AdamW, Muon and Scion (unconstrained and constrained) and checks what each
promises; part 4 (:mod:`norm_optax.demo.telemetry`) records per-layer norms
of a 12-layer stacked residual MLP with
:func:`norm_optax.record_layer_norms`, unclipped (it diverges) and clipped.
Each part prints a table and writes a PNG to ``--out``. Needs the
``examples`` extra::

    pip install ".[examples]"            # in a clone (not on PyPI yet)
    python -m norm_optax.demo            # full run, about two minutes on 2 CPU cores
    python -m norm_optax.demo --quick    # a much smaller run, about a minute
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from norm_optax.demo._extras import INSTALL_HINT, require_extras

__all__ = ["INSTALL_HINT", "main"]

PARTS = ("exploding", "constraints", "geometry", "telemetry")
EXPLODING_PNG = "demo_exploding.png"
CONSTRAINTS_PNG = "demo_constraints.png"
GEOMETRY_PNG = "demo_geometry.png"
TELEMETRY_PNG = "demo_telemetry.png"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m norm_optax.demo",
        description=(
            "Trains small models with each norm_optax technique and writes a "
            "table and a plot per part."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="a much smaller run (about a minute)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("demo_out"),
        help="directory for the PNGs (default: ./demo_out)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="which parts to run (default: all)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not draw the progress bar"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the demo; returns the rows of the printed tables.

    Args:
      argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
      One dict per run (key ``"part"`` is ``"exploding"``,
      ``"constraints"`` or ``"geometry"``), holding the numbers printed in
      the tables.

    Raises:
      SystemExit: the ``examples`` extra is not installed.
    """
    args = _parser().parse_args(None if argv is None else list(argv))
    require_extras()

    import jax

    from norm_optax.demo import constraints, exploding, geometry, telemetry
    from norm_optax.demo._progress import Progress

    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rnn_config = exploding.RNNConfig.quick() if args.quick else exploding.RNNConfig()
    cnn_config = (
        constraints.CNNConfig.quick() if args.quick else constraints.CNNConfig()
    )
    geo_config = (
        geometry.GeometryConfig.quick() if args.quick else geometry.GeometryConfig()
    )
    tel_config = (
        telemetry.TelemetryConfig.quick() if args.quick else telemetry.TelemetryConfig()
    )
    total = 0
    if "exploding" in args.parts:
        total += rnn_config.steps * len(exploding.clippers(rnn_config))
    if "constraints" in args.parts:
        total += cnn_config.steps * len(constraints.transforms(cnn_config))
    if "geometry" in args.parts:
        total += geo_config.steps * len(geometry.optimizers(geo_config))
    if "telemetry" in args.parts:
        total += tel_config.steps * len(telemetry.transforms(tel_config))
    print(
        f"norm_optax demo ({'quick' if args.quick else 'full'} run, seed "
        f"{args.seed}) on {jax.default_backend()}: {jax.devices()}",
        flush=True,
    )
    progress = Progress(total, enabled=not args.no_progress)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    if "exploding" in args.parts:
        results = exploding.run_all(rnn_config, args.seed, on_chunk=progress.update)
        progress.close()
        rows += [r.row() for r in results]
        c = rnn_config
        print(
            f"\nPart 1: exploding gradients. Tanh RNN ({c.hidden} units) on the "
            f"adding problem (length {c.seq_len}), SGD lr {c.learning_rate} "
            f"momentum {c.momentum}, {c.steps} steps of batch {c.batch}; "
            f"predicting the mean scores {1 / 6:.4f}.\n"
        )
        print(exploding.format_table(results))
        path = out / EXPLODING_PNG
        exploding.plot(results).savefig(path, dpi=130)
        print(f"\nwrote {path}", flush=True)

    if "constraints" in args.parts:
        results_2 = constraints.run_all(cnn_config, args.seed, on_chunk=progress.update)
        progress.close()
        rows += [r.row() for r in results_2]
        c2 = cnn_config
        print(
            f"\nPart 2: regularisation and constraints. CNN (Flax NNX) on the 8x8 "
            f"digits, Adam lr {c2.learning_rate}, {c2.steps} steps of batch "
            f"{c2.batch}.\n"
        )
        print(constraints.format_table(results_2))
        print()
        for line in constraints.checks(results_2, cnn_config):
            print(line)
        path = out / CONSTRAINTS_PNG
        constraints.plot(results_2).savefig(path, dpi=130)
        print(f"\nwrote {path}", flush=True)

    if "geometry" in args.parts:
        results_3 = geometry.run_all(geo_config, args.seed, on_chunk=progress.update)
        progress.close()
        rows += [r.row() for r in results_3]
        c3 = geo_config
        print(
            f"\nPart 3: norm geometry. MLP (Flax NNX, hidden {c3.hidden}) on the "
            f"8x8 digits: AdamW lr {c3.adamw_lr}; Muon lr {c3.muon_lr} (AdamW "
            f"{c3.adam_lr} for the biases); Scion lr {c3.scion_lr} radius "
            f"{c3.scion_radius}; constrained Scion lr {c3.constrained_lr} radius "
            f"{c3.constrained_radius}; {c3.steps} steps of batch {c3.batch}.\n"
        )
        print(geometry.format_table(results_3))
        print()
        for line in geometry.checks(results_3, geo_config):
            print(line)
        path = out / GEOMETRY_PNG
        geometry.plot(results_3).savefig(path, dpi=90)
        print(f"\nwrote {path}", flush=True)

    if "telemetry" in args.parts:
        results_4 = telemetry.run_all(tel_config, args.seed, on_chunk=progress.update)
        progress.close()
        rows += [r.row() for r in results_4]
        c4 = tel_config
        print(
            f"\nPart 4: per-layer norms. Residual MLP, {c4.layers} stacked layers "
            f"of width {c4.width} (lax.scan), on the 8x8 digits, SGD lr "
            f"{c4.learning_rate} momentum {c4.momentum}, {c4.steps} steps of batch "
            f"{c4.batch}, recorded with nox.record_layer_norms.\n"
        )
        print(telemetry.format_table(results_4))
        path = out / TELEMETRY_PNG
        telemetry.plot(results_4).savefig(path, dpi=130)
        print(f"\nwrote {path}", flush=True)

    print(f"\ndone in {time.perf_counter() - started:.1f} s", flush=True)
    return rows
