"""Every ```python block of README.md runs, as written, in a fresh namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_two_commands_first() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first_block is not None
    commands = [
        line
        for line in first_block.group(1).splitlines()
        if line and not line.startswith("#")
    ]
    assert commands[0].endswith("python -m norm_optax.demo")
    assert commands[1].endswith("python -m pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci  # CI runs exactly the README's test command


@pytest.mark.standard_promotion
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int) -> None:
    nnx = pytest.importorskip("flax.nnx")
    if "nnx.as_pure" in BLOCKS[index] and not hasattr(nnx, "as_pure"):
        # The lowest-versions step of .ci/run (Flax 0.12.2); the README says so.
        pytest.skip("uses nnx.as_pure: needs Flax >= 0.12.7")
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
