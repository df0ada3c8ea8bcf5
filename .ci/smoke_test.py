"""A smoke test of an installed norm_optax, run by .ci/run in a fresh venv.

Run it from outside the checkout, with the venv's python, after installing
the wheel: it fails if ``norm_optax`` is imported from anywhere but that
venv's site-packages.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import norm_optax as nox


def main() -> None:
    package = pathlib.Path(nox.__file__).resolve().parent
    prefix = pathlib.Path(sys.prefix).resolve()
    assert prefix in package.parents, f"imported from {package}, not from {prefix}"
    assert "site-packages" in package.parts, package
    assert (package / "py.typed").is_file(), "py.typed is not installed"
    assert importlib.metadata.version("norm-optax") == nox.__version__

    for name in nox.__all__:
        assert hasattr(nox, name), f"norm_optax.{name} is in __all__ but missing"
    for name in nox.masks.__all__:
        assert hasattr(nox.masks, name), f"norm_optax.masks.{name} is missing"

    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = optax.chain(
        nox.clip_by_global_norm(1.0),
        optax.adamw(1e-2, mask=nox.masks.matrices_only),
        nox.max_norm(1.5),
    )

    @jax.jit
    def step(params: dict, state: optax.OptState) -> tuple[dict, optax.OptState]:
        grads = jax.grad(lambda p: jnp.sum((p["w"] + p["b"] - 3.0) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert float(jnp.max(nox.unit_norms(params["w"]))) <= 1.5 + 1e-6
    grads = {"w": jnp.full((4,), 60000.0, jnp.float16)}
    assert float(nox.global_norm(grads)) == 120000.0  # accumulated in float32
    print(f"smoke test: norm_optax {nox.__version__} from {package} works")


if __name__ == "__main__":
    main()
