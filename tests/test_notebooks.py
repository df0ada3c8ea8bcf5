"""The notebooks run top to bottom (small size) and show their tables and plots."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"

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
        "**Final loss per seed**",
    ],
    "03_weight_constraints.ipynb": [
        "| run | test accuracy | exactly-zero weights |",
        "check prox_l1:",
        "check max_norm:",
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


@pytest.mark.parametrize("name", sorted(EXPECTED))
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
