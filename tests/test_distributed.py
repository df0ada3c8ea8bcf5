"""Distributed use (API.md section 4) on emulated CPU devices.

The 8-device checks run in ONE subprocess (``tests/distributed/single_host.py``,
with ``--xla_force_host_platform_device_count=8``), which measures every case
and writes JSON; the tests here assert on it. Covered:

* GSPMD with a 1-D FSDP mesh (8) and a 2-D data (4) x model (2) mesh, both
  with ``Explicit`` axes (:func:`jax.make_mesh`'s default) and with ``Auto``
  axes (``jax.jit(in_shardings=...)``), on a small GPT whose leaves are
  sharded along different mesh axes or replicated: every transform gives the
  unsharded numbers (``rtol = atol = 1e-6``) and keeps each leaf's sharding;
  the compiled HLO of a global norm holds one all-reduce and no all-gather
  (Explicit axes);
* ``axis_name`` inside ``jax.shard_map``, gradients included, on a tree
  mixing a leaf split over the axis with a replicated one (counted once: JAX
  records which values vary over a manual axis) and with a tuple of axis
  names on a 2-D mesh; under ``jax.pmap`` and ``shard_map(check_vma=False)``,
  where that record is not kept, ``axis_name`` raises;
* stacked layers (API.md section 6): GPT blocks stacked ``(8, ...)`` on the
  FSDP mesh with the layer axis replicated and the model axes sharded, with
  the layer axis sharded (pipeline), and on the 2-D mesh (layers over
  ``data``, Megatron-style ``model``): per-layer ``leaf_norms`` and every
  stack-aware transform give the unsharded numbers and keep each leaf's
  sharding, and the compiled HLO holds no all-gather (pipeline: no
  collective at all, every layer's units live on one device);
* norm geometry (API.md 8.4): ``orthogonalize`` on stacked and unstacked
  sharded matrices (Auto and Explicit axes) gives the unsharded numbers,
  keeps the sharding, and compiles to two all-to-alls (a matrix axis
  sharded), none (the stack axis sharded) or one all-gather (unstacked);
  the same Newton-Schulz left to GSPMD communicates in every iteration
  (with the sharded telemetry of API.md section 9, a second subprocess in
  the slow step);
* two processes joined by ``jax.distributed`` over gloo (4 devices each).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import chex
import jax
import numpy as np
import pytest

HERE = Path(__file__).parent / "distributed"
TIMEOUT_S = 1500  # the single-host worker: a few minutes on 2 idle cores, ~9 under load


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


single_host = _load("single_host")
multi_process = _load("multi_process")

MESHES = ("fsdp", "2d")

# Under pytest-xdist one worker runs the whole module, so the 8-device
# subprocess behind the ``results`` fixture runs once.
pytestmark = pytest.mark.xdist_group("distributed")


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # LLVM optimisation level 0 only makes the CPU code compile faster (-25%);
    # the HLO passes that place the collectives run as usual (same counts).
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    return env


# The section of the worker the default run checks (stacked layers on both
# meshes); the others (every transform on Explicit and Auto axes, axis_name,
# norm geometry and telemetry) run in the slow step, in their own subprocess.
DEFAULT_SECTIONS = ("stacked",)
SLOW_SECTIONS = ("explicit", "auto", "axis_name", "telemetry", "geometry")


def _run_worker(tmp: Path, sections: tuple[str, ...]) -> dict[str, Any]:
    out = tmp / "single_host.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "single_host.py"), str(out), ",".join(sections)],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


# Session scope: xdist's loadgroup keeps the module on one worker but may
# interleave other modules' tests, which would tear a module fixture down and
# run the subprocess twice.
@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_worker(tmp_path_factory.mktemp("distributed"), DEFAULT_SECTIONS)


@pytest.fixture(scope="session")
def slow_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_worker(tmp_path_factory.mktemp("distributed_slow"), SLOW_SECTIONS)


def _section(request: pytest.FixtureRequest, section: str) -> dict[str, Any]:
    """The worker's results holding ``section`` (default or slow subprocess)."""
    fixture = "results" if section in DEFAULT_SECTIONS else "slow_results"
    results: dict[str, Any] = request.getfixturevalue(fixture)
    return results


def _mode(mode: str) -> Any:
    """A ``mode`` parameter: Auto axes run in the slow step."""
    slow = mode not in DEFAULT_SECTIONS
    return pytest.param(mode, marks=pytest.mark.slow if slow else ())


def test_worker_sections_are_all_checked() -> None:
    assert sorted(DEFAULT_SECTIONS + SLOW_SECTIONS) == sorted(single_host.SECTIONS)


def _case(results: dict[str, Any], *path: str) -> dict[str, Any]:
    """One measured case; fails with the worker's traceback if it raised."""
    node: Any = results
    for key in path:
        assert "error" not in node, node["error"]
        node = node[key]
    assert "error" not in node, node["error"]
    return node


def _transform_params() -> list[Any]:
    params = []
    for mode in ("explicit", "auto"):
        for mesh in MESHES:
            names = sorted(single_host.TRANSFORMS) + sorted(single_host.VARIANTS)
            for name in names:
                if mode == "auto" and name not in single_host.AUTO_SUBSET:
                    continue
                marks = () if mode in DEFAULT_SECTIONS else pytest.mark.slow
                params.append(pytest.param(mode, mesh, name, marks=marks))
    return params


def test_eight_devices(results: dict[str, Any]) -> None:
    assert results["devices"] == 8


@pytest.mark.parametrize(("mode", "mesh", "name"), _transform_params())
def test_transform_matches_unsharded_and_keeps_sharding(
    request: pytest.FixtureRequest, mode: str, mesh: str, name: str
) -> None:
    results = _section(request, mode)
    assert name in results["transforms"], f"{name} is not in norm_optax.__all__"
    case = _case(results, mode, mesh, name)
    assert case["rel_err"] <= 1.0  # allclose(rtol=1e-6, atol=1e-6)
    assert case["sharding"] == []
    assert case.get("traced_sharding", []) == []


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("ord", ["1", "2", "inf"])
def test_global_norm_is_one_all_reduce(
    slow_results: dict[str, Any], mesh: str, ord: str
) -> None:
    case = _case(slow_results, "explicit", mesh, f"global_norm[ord={ord}]")
    assert case["rel_err"] <= 1.0
    assert case["all_reduce"] == 1
    assert case["all_gather"] == 0
    assert case["all_to_all"] == case["collective_permute"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize(
    "name", ["clip_by_global_norm", "normalize_by_global_norm", "project_l2_ball"]
)
def test_global_norm_transforms_are_one_all_reduce(
    slow_results: dict[str, Any], mesh: str, name: str
) -> None:
    assert name in slow_results["transforms"], f"{name} is not in norm_optax.__all__"
    case = _case(slow_results, "explicit", mesh, name)
    assert case["all_reduce"] == 1
    assert case["all_gather"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_traced_ord_runs_one_all_reduce_per_branch(
    slow_results: dict[str, Any], mesh: str
) -> None:
    # inject_hyperparams traces ``ord``: lax.switch over ord 1, 2, inf, each
    # branch with its own all-reduce; only the chosen one runs.
    case = _case(slow_results, "explicit", mesh, "clip_by_global_norm[inject]")
    assert case["rel_err"] <= 1.0
    assert case["all_reduce"] == 3
    assert case["all_gather"] == 0


@pytest.mark.parametrize("mode", [_mode("explicit"), _mode("auto")])
@pytest.mark.parametrize("mesh", MESHES)
def test_grad_and_vmap_of_global_norm(
    request: pytest.FixtureRequest, mode: str, mesh: str
) -> None:
    results = _section(request, mode)
    grad = _case(results, mode, mesh, "grad(global_norm)")
    assert grad["rel_err"] <= 1.0
    assert grad["zero_at_zero"]
    assert grad["sharding"] == []
    assert grad["all_gather"] == 0
    assert _case(results, mode, mesh, "vmap(global_norm)")["rel_err"] <= 1.0


# Reverse mode: the norm's tangent sums take the plain path (role="tangent"),
# so the backward pass does not transpose the shard_map into extra collectives;
# vmap over a sharded batch axis keeps the examples in place (role="primal").
@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_grad_of_global_norm_is_one_all_reduce(
    slow_results: dict[str, Any], mesh: str
) -> None:
    assert _case(slow_results, "explicit", mesh, "grad(global_norm)")["all_reduce"] == 1


@pytest.mark.parametrize("mode", [_mode("explicit"), _mode("auto")])
@pytest.mark.parametrize("mesh", MESHES)
def test_per_example_norms_with_sharded_examples(
    request: pytest.FixtureRequest, mode: str, mesh: str
) -> None:
    results = _section(request, mode)
    case = _case(results, mode, mesh, "per_example(global_norm)")
    assert case["rel_err"] <= 1.0
    assert case["all_gather"] == 0
    assert case["all_reduce"] <= 1


@pytest.mark.slow
def test_auto_axes_all_reduce_counts(slow_results: dict[str, Any]) -> None:
    results = slow_results
    # Auto axes: the shardings are unknown at trace time, XLA reduces each
    # leaf over its own mesh axes. One all-reduce on the FSDP mesh, several
    # on the 2-D mesh (where Explicit axes give one); never an all-gather.
    for name in ("global_norm[ord=2]", "clip_by_global_norm"):
        fsdp = _case(results, "auto", "fsdp", name)
        mesh2d = _case(results, "auto", "2d", name)
        assert fsdp["all_reduce"] == 1
        assert mesh2d["all_reduce"] > 1
        assert fsdp["all_gather"] == mesh2d["all_gather"] == 0


STACKED_LAYOUTS = tuple(single_host.STACKED_LAYOUTS)
STACKED_WITH_TRANSFORMS = tuple(
    layout
    for layout, (_, _, with_transforms) in single_host.STACKED_LAYOUTS.items()
    if with_transforms
)


@pytest.mark.parametrize("layout", STACKED_LAYOUTS)
def test_stacked_per_layer_norms_match_and_gather_nothing(
    results: dict[str, Any], layout: str
) -> None:
    case = _case(results, "stacked", layout, "leaf_norms")
    assert case["rel_err"] <= 1.0
    for name, shape in case["shapes"].items():
        stacked = name.startswith("blocks/")
        assert shape == ([single_host.LAYERS_STACKED] if stacked else []), name
    assert case["all_gather"] == 0
    assert case["all_to_all"] == case["collective_permute"] == 0
    # The per-layer partial sums of every leaf share one all-reduce; with the
    # layer axis sharded each layer's norm is computed where the layer lives.
    assert case["all_reduce"] == (0 if layout == "pipeline" else 1)


@pytest.mark.parametrize("name", sorted(single_host.STACKED_TRANSFORMS))
@pytest.mark.parametrize("layout", STACKED_WITH_TRANSFORMS)
def test_stacked_transform_matches_unsharded_and_keeps_sharding(
    results: dict[str, Any], layout: str, name: str
) -> None:
    assert name in results["stacked_transforms"], f"{name}: not in norm_optax"
    case = _case(results, "stacked", layout, "transforms", name)
    assert case["rel_err"] <= 1.0  # allclose(rtol=1e-6, atol=1e-6)
    assert case["sharding"] == []
    assert case["traced_sharding"] == []


@pytest.mark.parametrize("layout", STACKED_WITH_TRANSFORMS)
def test_stacked_transforms_gather_nothing(
    results: dict[str, Any], layout: str
) -> None:
    case = _case(results, "stacked", layout, "transforms", "together")
    assert case["all_gather"] == 0
    assert case["all_to_all"] == case["collective_permute"] == 0
    if layout == "pipeline":  # every unit of a layer on one device
        assert case["all_reduce"] == 0


def _geometry_params() -> list[Any]:
    return [
        pytest.param(mode, name)
        for mode in ("auto", "explicit")
        for name in sorted(single_host.GEOMETRY_CASES)
        if mode == "auto" or name in single_host.GEOMETRY_EXPLICIT
    ]


# The polar factor is a degree-243 polynomial of the input (5 quintic steps):
# a different float32 summation order (the local batch of each device) moves
# its entries (of size ~0.3) by a few 1e-7.
GEOMETRY_ATOL = 2e-6


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "name"), _geometry_params())
def test_orthogonalize_sharded_matches_keeps_sharding_and_collectives(
    slow_results: dict[str, Any], mode: str, name: str
) -> None:
    case = _case(slow_results, "geometry", mode, name)
    assert case["max_abs_err"] <= GEOMETRY_ATOL
    assert case["sharding"] == []
    moved = ("all_gather", "all_reduce", "all_to_all", "collective_permute")
    if name == "stack_sharded":  # every matrix whole on one device
        assert all(case[op] == 0 for op in moved)
    elif name.startswith("stack_"):  # onto the stack axis and back: all-to-all
        assert case["all_to_all"] == 2
        assert case["all_gather"] == case["all_reduce"] == 0
        assert case["collective_permute"] == 0
    elif name.startswith("unstacked_"):  # gathered once, nothing in the loop
        assert case["all_gather"] == 1
        assert case["all_reduce"] == case["all_to_all"] == 0
    else:  # two sharded matrix axes: numbers and sharding only (API.md 8.4)
        assert name == "two_matrix_axes"


@pytest.mark.slow
def test_naive_newton_schulz_communicates_in_every_iteration(
    slow_results: dict[str, Any],
) -> None:
    # What GSPMD does with the same maths when nothing moves the matrices:
    # collectives inside the iterations (the pitfall 8.4 fixes).
    rows = _case(slow_results, "geometry", "naive_rows")
    cols = _case(slow_results, "geometry", "naive_cols")
    assert rows["all_reduce"] >= 5
    assert cols["all_gather"] >= 10


@pytest.mark.slow
def test_scale_by_lmo_sharded_tree(slow_results: dict[str, Any]) -> None:
    case = _case(slow_results, "geometry", "tree")
    assert case["max_abs_err"] <= GEOMETRY_ATOL
    assert case["sharding"] == []


AXIS_NAME_CASES = [
    "global_norm",
    "global_norm[ord=1]",
    "global_norm[ord=inf]",
    "clip_by_global_norm",
    "normalize_by_global_norm",
    "clip_by_norm",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", AXIS_NAME_CASES)
def test_axis_name(slow_results: dict[str, Any], name: str) -> None:
    key = f"shard_map/{name}"
    if key not in _case(slow_results, "axis_name"):
        pytest.skip(f"{name} takes no axis_name")
    case = _case(slow_results, "axis_name", key)
    assert case["rel_err"] <= 1.0  # equal to the unsplit gradient's result
    if name.startswith(("clip_by_global_norm", "normalize")):
        np.testing.assert_allclose(case["norm"], 1.0, rtol=1e-6)
    if "grad_rel_err" in case:
        assert case["grad_rel_err"] <= 1.0
        assert case["grad_finite_at_zero"]


UNKNOWN_REPLICATION = "cannot be told from a sharded one"


@pytest.mark.slow
@pytest.mark.parametrize("name", AXIS_NAME_CASES)
def test_axis_name_under_pmap_raises(slow_results: dict[str, Any], name: str) -> None:
    # pmap does not record which values vary over its axis (an in_axes=None
    # leaf would count once per device): raise rather than guess.
    key = f"pmap/{name}"
    if key not in _case(slow_results, "axis_name"):
        pytest.skip(f"{name} takes no axis_name")
    message = _case(slow_results, "axis_name", key)["raised"]
    assert message is not None
    assert UNKNOWN_REPLICATION in message
    assert "check_vma=True" in message


MIXED_NORMS = ["global_norm", "global_norm[ord=1]", "global_norm[ord=inf]"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MIXED_NORMS)
def test_mixed_replication_counts_a_replicated_leaf_once(
    slow_results: dict[str, Any], name: str
) -> None:
    # {"w": P("x"), "scale": P()} on 4 devices: the true norm of the tree,
    # with one all-reduce of a scalar.
    case = _case(slow_results, "axis_name", f"mixed/{name}")
    assert case["rel_err"] <= 1.0
    assert case["all_reduce"] == 1
    if name == "global_norm":
        true = _case(slow_results, "axis_name")["mixed/true_norm"]
        np.testing.assert_allclose(case["value"], true, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["clip_by_global_norm", "normalize_by_global_norm", "clip_by_norm"]
)
def test_mixed_replication_transforms_and_gradients(
    slow_results: dict[str, Any], name: str
) -> None:
    key = f"mixed/{name}"
    if key not in _case(slow_results, "axis_name"):
        pytest.skip(f"{name} takes no axis_name")
    case = _case(slow_results, "axis_name", key)
    assert case["rel_err"] <= 1.0
    assert case["grad_rel_err"] <= 1.0
    if name == "clip_by_norm":  # each leaf on its own
        for leaf, norm in case["leaf_norms"].items():
            np.testing.assert_allclose(norm, 1.0, rtol=1e-6, err_msg=leaf)
    else:  # the clipped tree has norm exactly max_norm (one rounding)
        np.testing.assert_allclose(case["norm"], 1.0, rtol=1e-6)


@pytest.mark.slow
def test_mixed_replication_gradient_of_global_norm(
    slow_results: dict[str, Any],
) -> None:
    case = _case(slow_results, "axis_name", "mixed/grad(global_norm)")
    assert case["rel_err"] <= 1.0
    assert case["zero_at_zero"]


@pytest.mark.slow
def test_tuple_axis_name_on_a_2d_mesh(slow_results: dict[str, Any]) -> None:
    # Leaves varying over ("a", "b"), "a" only, "b" only, and neither.
    case = _case(slow_results, "axis_name", "mixed/tuple_axis_name")
    for ord in ("2", "1", "inf"):
        assert case[f"rel_err[ord={ord}]"] <= 1.0, ord
    assert case["all_reduce"] == 1
    np.testing.assert_allclose(case["clipped_norm"], 1.0, rtol=1e-6)
    assert case["rel_err[only_a]"] <= 1.0


@pytest.mark.slow
def test_shard_map_without_vma_checking_raises(slow_results: dict[str, Any]) -> None:
    message = _case(slow_results, "axis_name", "mixed/check_vma=False")["raised"]
    assert message is not None
    assert UNKNOWN_REPLICATION in message


@pytest.mark.slow
def test_optax_without_axis_name_clips_each_shard(slow_results: dict[str, Any]) -> None:
    # The baseline the axis_name fixes: 4 shards each clipped to norm 1.
    case = _case(slow_results, "axis_name", "shard_map/optax.clip_by_global_norm")
    np.testing.assert_allclose(case["norm"], 2.0, rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.standard_promotion
def test_two_processes_match_one(tmp_path: Path) -> None:
    port = _free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "multi_process.py"),
                str(i),
                str(port),
                str(out),
            ],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-5000:]

    grads, params = multi_process.global_trees()
    tx = multi_process.transform()
    want, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for out in outs:
        got = np.load(out)
        assert bool(got["same_sharding"])
        updates = {k: got[f"updates/{k}"] for k in want}
        chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=1e-7)
        norm = np.sqrt(
            sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())
        )
        np.testing.assert_allclose(got["norm"], norm, rtol=1e-6)


# API.md section 9: record_layer_norms sharded.
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "pipeline_2d"])
def test_record_layer_norms_sharded_matches_and_gathers_nothing(
    slow_results: dict[str, Any], layout: str
) -> None:
    case = _case(slow_results, "telemetry", layout)
    assert case["rel_err"] <= 1.0  # allclose(rtol=1e-6, atol=1e-6)
    assert case["out_equal"]  # inner's sharded output, bit for bit
    assert case["sharding"] == []
    for name, shape in case["shapes"].items():
        stacked = name.startswith("blocks/")
        assert shape == ([single_host.LAYERS_STACKED] if stacked else []), name
    assert case["all_gather"] == 0
    # One all-reduce for the inner clip's global norm, one for every
    # per-layer norm of the three trees.
    assert case["all_reduce"] == 2


@pytest.mark.slow
def test_record_layer_norms_sharded_bfloat16_out_of_squares_range(
    slow_results: dict[str, Any],
) -> None:
    # Layers of 1e-25 and 1e25 in bfloat16: the rescaled pass, sharded.
    case = _case(slow_results, "telemetry", "bf16_range")
    assert case["rel"] < 1e-5  # relative to the unsharded norms
    assert case["smallest"] > 0  # no layer's norm lost to underflow
    assert case["all_gather"] == 0
    assert case["all_reduce"] == 2  # the fast pass, and the rescue's


@pytest.mark.slow
def test_record_layer_norms_all_reduces_do_not_grow_with_leaves(
    slow_results: dict[str, Any],
) -> None:
    stacked = _case(slow_results, "telemetry", "stacked_gpt")
    unstacked = _case(slow_results, "telemetry", "unstacked_gpt")
    assert (stacked["leaves"], unstacked["leaves"]) == (16, 40)
    for case in (stacked, unstacked):
        assert case["all_reduce"] == 1, case
        assert case["all_gather"] == 0, case
