"""The notebooks match their source, run top to bottom (small size) and show
their tables and plots."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _load_build() -> ModuleType:
    """``notebooks/build.py``, imported from its path (not the ``build`` package)."""
    spec = importlib.util.spec_from_file_location(
        "norm_optax_notebooks_build", NOTEBOOKS / "build.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build()

# Text each notebook must show (in any output), besides at least one plot.
EXPECTED = {
    "01_quickstart.ipynb": [
        "backend:",
        "devices:",
        "global L2 norm:",
        "after max_norm(1.0):",
        "largest parameter difference, sharded vs unsharded",
    ],
    "02_exploding_gradients.ipynb": [
        "| run | final loss | max grad norm (pre-clip) |",
        "| run | steps clipped |",
        "| zclip, max_norm=None |",
        "zclip: the z-score rule cut",
        "**Final loss per seed**",
    ],
    "03_weight_constraints.ipynb": [
        "| run | test accuracy | exactly-zero weights | exactly-zero units |",
        "check prox_l1:",
        "check prox_group_l1:",
        "check max_norm:",
        "check clip_spectral_norm:",
        "**Largest singular value per layer",
    ],
    "04_large_models.ipynb": [
        "-> unit_norms (1, 1, 32)",
        "-> unit_norms(stack_axes=1) (4, 1, 32)",
        "adamw(mask=matrices_only(stack_axes=1)): LayerNorm scales move by 0.0e+00",
        "| layer | max unit norm | `max_norm(1.0)`",
        "**Gradient norm per layer",
        "check max_norm(1.0, stack_axes=1): largest per-layer unit norm",
        "-> OK",
        "'grad/layers/up/kernel/3':",  # record_layer_norms, layer_norms_dict
    ],
    "05_norm_geometry.ipynb": [
        "optax.contrib.muon: adam  nox.muon(stack_axes=1): muon",
        "| run | final loss | test accuracy | sigma_max dense1",
        "check muon:",
        "check scion_constrained:",
        "**Constrained Scion: inside its ball**",
        "-> OK",
    ],
}


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """All text of the code cells' outputs, and the number of PNG images."""
    texts, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                data = output.get("data", {})
                images += "image/png" in data
                texts.append(data.get("text/markdown", ""))
                texts.append(data.get("text/plain", ""))
    return "\n".join(texts), images


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    assert sorted(BUILD.NOTEBOOKS) == sorted(EXPECTED)


def _first_difference(
    committed: list[tuple[str, str]], built: list[tuple[str, str]]
) -> str | None:
    """Where two lists of ``(cell_type, source)`` first differ, in words."""
    for i, (have, want) in enumerate(zip(committed, built, strict=False)):
        if have == want:
            continue
        if have[0] != want[0]:
            return f"cell {i} is a {have[0]} cell, build.py makes a {want[0]} cell"
        have_lines, want_lines = have[1].splitlines(), want[1].splitlines()
        j = next(
            (
                k
                for k, pair in enumerate(zip(have_lines, want_lines, strict=False))
                if pair[0] != pair[1]
            ),
            min(len(have_lines), len(want_lines)),
        )
        if j == len(have_lines) == len(want_lines):
            return f"cell {i} ({have[0]}): the sources differ only in line endings"
        end = "<end of cell>"
        a = have_lines[j] if j < len(have_lines) else end
        b = want_lines[j] if j < len(want_lines) else end
        return (
            f"cell {i} ({have[0]}), line {j + 1}:\n"
            f"  committed: {a!r}\n  build.py:  {b!r}"
        )
    if len(committed) != len(built):
        return (
            f"the committed notebook has {len(committed)} cells, "
            f"build.py makes {len(built)}"
        )
    return None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_matches_build(name: str) -> None:
    """The committed cell sources are what ``notebooks/build.py`` makes.

    Outputs, execution counts and metadata are not compared: only each
    cell's type and source, in order.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    committed = [(cell.cell_type, cell.source) for cell in nb.cells]
    built = [(cell.cell_type, cell.source) for cell in BUILD.build_notebook(name).cells]
    assert built == BUILD.cells(name)
    difference = _first_difference(committed, built)
    assert difference is None, (
        f"notebooks/{name} has drifted from notebooks/build.py: {difference}\n"
        "Edit the cells in notebooks/build.py, then run "
        f"`python notebooks/build.py --execute {name}` and commit both files."
    )


# The quick start and the large-models notebook run in the default run; the
# others (whose techniques the demo's parts train too) in the slow step.
DEFAULT_RUN = ("01_quickstart.ipynb", "04_large_models.ipynb")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.slow)
        for n in sorted(EXPECTED)
    ],
)
def test_notebook_runs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORM_OPTAX_SMALL", "1")  # inherited by the kernel
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()  # raises CellExecutionError if a cell fails
    text, images = _outputs(nb)
    for expected in EXPECTED[name]:
        assert expected in text, expected
    assert images >= 1
    assert "FAILED" not in text
    assert "Traceback" not in text


def test_committed_notebooks_are_small_and_have_outputs() -> None:
    for name in EXPECTED:
        path = NOTEBOOKS / name
        assert path.stat().st_size < 1_000_000, name
        _, images = _outputs(nbformat.read(path, as_version=4))
        assert images >= 1, f"{name} is committed without its plots"
