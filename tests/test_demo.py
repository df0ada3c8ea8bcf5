"""``python -m norm_optax.demo --quick``: tables, plots and the guarantees it shows."""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import sys
from typing import Any

import jax
import pytest

import norm_optax as nox
from norm_optax.demo import INSTALL_HINT, main
from norm_optax.demo.constraints import CNNConfig
from norm_optax.demo.exploding import RNNConfig
from norm_optax.demo.geometry import GeometryConfig

pytestmark = [
    pytest.mark.standard_promotion,  # the demo runs optax optimizers
    pytest.mark.xdist_group("demo"),  # one worker runs the module's demo once
]


# Session scope: xdist's loadgroup keeps the module on one worker but may
# interleave other modules' tests, which would tear a module fixture down and
# run the demo twice.
@pytest.fixture(scope="session")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pathlib.Path, list[dict[str, Any]], str, str]:
    out = tmp_path_factory.mktemp("demo_out")
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        jax.numpy_dtype_promotion("standard"),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        rows = main(["--quick", "--out", str(out)])
    return out, rows, stdout.getvalue(), stderr.getvalue()


def _rows(rows: list[dict[str, Any]], part: str) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in rows if r["part"] == part}


def test_writes_both_plots(quick_run: Any) -> None:
    out, _, stdout, _ = quick_run
    for name in ("demo_exploding.png", "demo_constraints.png"):
        path = out / name
        assert path.stat().st_size > 10_000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {path}" in stdout


def test_prints_both_tables(quick_run: Any) -> None:
    _, rows, stdout, stderr = quick_run
    assert "| run | final loss | max grad norm (pre-clip) |" in stdout
    assert "| run | test accuracy | exactly-zero weights |" in stdout
    for row in rows:  # every run has its line in a table
        assert f"| {row['run']} |" in stdout
    assert "100.0%" in stderr  # the progress bar finished


def test_runs_every_technique(quick_run: Any) -> None:
    _, rows, _, _ = quick_run
    assert list(_rows(rows, "exploding")) == [
        "none",
        "clip_by_value",
        "clip_by_norm",
        "clip_by_global_norm",
        "normalize_by_global_norm",
        "autoclip",
        "zclip",
    ]
    assert list(_rows(rows, "constraints")) == [
        "plain",
        "add_l2_decay",
        "decoupled_decay",
        "prox_l1",
        "prox_group_l1",
        "max_norm",
        "unit_norm",
        "clip_weights",
        "clip_spectral_norm",
    ]


def test_unclipped_run_is_worse(quick_run: Any) -> None:
    _, rows, _, _ = quick_run
    runs = _rows(rows, "exploding")
    none, clipped = runs["none"], runs["clip_by_global_norm"]
    assert clipped["nonfinite_steps"] == 0
    assert math.isfinite(clipped["final_loss"])
    assert clipped["final_loss"] < 1 / 6  # learns more than the mean
    # Unclipped: non-finite steps, or a clearly higher loss at the end.
    assert none["nonfinite_steps"] > 0 or none["final_loss"] > 2 * clipped["final_loss"]


def test_zclip_with_the_authors_defaults_trains(quick_run: Any) -> None:
    """``nox.zclip()`` (ceiling ``max_norm=1.0``) trains through the cliffs.

    The same bar as ``clip_by_global_norm``: no non-finite step, and a final
    loss below ``1/6``, the loss of predicting the mean.
    """
    _, rows, _, _ = quick_run
    zclip = _rows(rows, "exploding")["zclip"]
    assert zclip["nonfinite_steps"] == 0
    assert math.isfinite(zclip["final_loss"])
    assert zclip["final_loss"] < 1 / 6
    assert math.isfinite(zclip["max_grad_norm"])


def test_prox_l1_gives_exact_zeros(quick_run: Any) -> None:
    _, rows, stdout, _ = quick_run
    runs = _rows(rows, "constraints")
    assert runs["prox_l1"]["zero_fraction"] > 0.05
    assert runs["plain"]["zero_fraction"] == 0.0
    assert "check prox_l1:" in stdout
    assert "-> OK" in stdout.split("check prox_l1:")[1].splitlines()[0]


def test_group_lasso_zeroes_whole_units(quick_run: Any) -> None:
    _, rows, stdout, _ = quick_run
    runs = _rows(rows, "constraints")
    group = runs["prox_group_l1"]
    assert sum(z for z, _ in group["zero_units"].values()) > 0
    assert group["zero_units"]["head/kernel"][0] == 0  # the head is not pruned
    assert group["test_accuracy"] > 0.8
    assert runs["plain"]["zero_unit_fraction"] == 0.0
    assert "-> OK" in stdout.split("check prox_group_l1:")[1].splitlines()[0]


def test_spectral_norm_bounds_every_layer(quick_run: Any) -> None:
    """Each kernel's largest singular value (SVD) is within its bound."""
    _, rows, stdout, _ = quick_run
    runs = _rows(rows, "constraints")
    bound = CNNConfig().spectral_norm
    sigmas = runs["clip_spectral_norm"]["sigmas"]
    assert set(sigmas) == {"conv1/kernel", "conv2/kernel", "head/kernel"}
    for name, sigma in sigmas.items():
        assert sigma <= bound * (1 + 1e-3), name
    assert runs["plain"]["max_sigma"] > bound  # the constraint is active
    assert "-> OK" in stdout.split("check clip_spectral_norm:")[1].splitlines()[0]


def test_max_norm_bounds_every_unit(quick_run: Any) -> None:
    _, rows, stdout, _ = quick_run
    runs = _rows(rows, "constraints")
    bound = CNNConfig().max_norm
    assert runs["max_norm"]["max_unit_norm"] <= bound * (1 + 1e-6)
    assert runs["plain"]["max_unit_norm"] > bound  # the constraint is active
    assert runs["unit_norm"]["max_unit_norm"] == pytest.approx(1.0, rel=1e-5)
    assert "-> OK" in stdout.split("check max_norm:")[1].splitlines()[0]
    assert "FAILED" not in stdout


def test_learns_digits(quick_run: Any) -> None:
    _, rows, _, _ = quick_run
    assert _rows(rows, "constraints")["plain"]["test_accuracy"] > 0.9


def test_quick_is_smaller_than_full() -> None:
    assert RNNConfig.quick().steps < RNNConfig().steps
    assert CNNConfig.quick().steps < CNNConfig().steps
    assert GeometryConfig.quick().steps < GeometryConfig().steps


def test_geometry_part_trains_every_optimizer(quick_run: Any) -> None:
    out, rows, stdout, _ = quick_run
    runs = _rows(rows, "geometry")
    assert list(runs) == ["adamw", "muon", "scion", "scion_constrained"]
    for row in runs.values():
        assert math.isfinite(row["final_loss"])
        assert row["test_accuracy"] > 0.7, row["run"]
        assert set(row["sigmas"]) == {"dense1", "dense2", "head"}
        assert f"| {row['run']} |" in stdout
    path = out / "demo_geometry.png"
    assert path.stat().st_size > 10_000
    assert f"wrote {path}" in stdout


def test_geometry_part_checks_what_each_promises(quick_run: Any) -> None:
    """Muon's update singular values in range; constrained Scion in its ball."""
    _, rows, stdout, _ = quick_run
    runs = _rows(rows, "geometry")
    low, high = runs["muon"]["update_range"]
    assert 0.68 <= low <= high <= 1.21
    assert runs["adamw"]["update_range"] is None
    assert "-> OK" in stdout.split("check muon:")[1].splitlines()[0]
    line = stdout.split("check scion_constrained:")[1].splitlines()[0]
    assert "-> OK" in line
    # The unconstrained run's spectral norms are not held to the radius:
    # the constrained run's largest layer stays below radius * k.
    config = GeometryConfig.quick()
    sigma = runs["scion_constrained"]["sigmas"]["dense1"]
    assert sigma <= config.constrained_radius * math.sqrt(config.hidden[0] / 64) * (
        1 + 1e-5
    )


def test_missing_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn fails
    with pytest.raises(SystemExit) as info:
        main(["--quick", "--out", str(tmp_path)])
    message = str(info.value.code)
    assert "scikit-learn" in message
    assert INSTALL_HINT in message
    # Not on PyPI yet: the hint installs this release from its git tag.
    tag_url = f"git+https://github.com/norm-optax/norm_optax@v{nox.__version__}"
    assert f'pip install "norm-optax[examples] @ {tag_url}"' == INSTALL_HINT
    assert not list(tmp_path.iterdir())  # nothing ran


# Part 3: per-layer norms with record_layer_norms.
def test_telemetry_shows_where_and_when_the_unclipped_run_diverges(
    quick_run: Any,
) -> None:
    out, rows, stdout, _ = quick_run
    runs = _rows(rows, "telemetry")
    assert list(runs) == ["unclipped", "clipped"]
    unclipped, clipped = runs["unclipped"], runs["clipped"]
    assert unclipped["layers"] == clipped["layers"] == 14  # embed, 12 stacked, readout
    # Unclipped: a layer's gradient norm grows 100x, later the norms turn
    # non-finite; the recorded history says when and where.
    assert unclipped["first_explosion_step"] is not None
    assert unclipped["first_nonfinite_step"] is not None
    assert unclipped["first_explosion_step"] <= unclipped["first_nonfinite_step"]
    assert unclipped["first_explosion_layer"].startswith(
        ("embed", "layers/", "readout")
    )
    assert not math.isfinite(unclipped["final_loss"])
    # Clipped: every recorded norm finite, and it learns.
    assert clipped["first_nonfinite_step"] is None
    assert math.isfinite(clipped["max_grad_norm"])
    assert clipped["test_accuracy"] > 0.8
    assert "| unclipped |" in stdout
    path = out / "demo_telemetry.png"
    assert path.stat().st_size > 10_000
    assert f"wrote {path}" in stdout
