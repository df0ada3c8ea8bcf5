"""One of two processes of the multi-process test in ``tests/test_distributed.py``.

Run as ``python multi_process.py PROCESS_ID PORT OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in its environment:
each process has 4 CPU devices, joined over gloo into one 8-device mesh. The
two processes build the same globally sharded gradient tree, take one step of
``optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(1e-3))`` and write
the (gathered) updates and the global norm to ``OUT.npz``.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import norm_optax as nox

SHAPES: dict[str, tuple[tuple[int, ...], P]] = {
    "embed": ((50, 16), P(None, "fsdp")),
    "kernel": ((16, 24), P("fsdp", None)),
    "bias": ((24,), P("fsdp")),
    "scale": ((16,), P()),
    "head_bias": ((50,), P()),
}


def global_trees() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The full gradient and params, the same in every process (and in the test)."""
    rng = np.random.default_rng(0)
    grads = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in SHAPES.items()}
    params = {
        k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, (s, _) in SHAPES.items()
    }
    return grads, params


def transform() -> optax.GradientTransformation:
    return optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(1e-3))


def main(process_id: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.device_count() == 8
    assert jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("fsdp",))

    def shard(tree: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        def put(key: str, value: np.ndarray) -> jax.Array:
            sharding = NamedSharding(mesh, SHAPES[key][1])
            return jax.make_array_from_callback(
                value.shape, sharding, lambda index: value[index]
            )

        return {k: put(k, v) for k, v in tree.items()}

    grads, params = global_trees()
    sgrads, sparams = shard(grads), shard(params)
    tx = transform()

    @jax.jit
    def step(g: Any, p: Any) -> tuple[Any, jax.Array]:
        updates, _ = tx.update(g, tx.init(p), p)
        return updates, nox.global_norm(g)

    updates, norm = step(sgrads, sparams)
    same_sharding = all(
        updates[k].sharding.is_equivalent_to(sgrads[k].sharding, sgrads[k].ndim)
        for k in updates
    )
    gathered = multihost_utils.process_allgather(updates, tiled=True)
    arrays: dict[str, Any] = {
        f"updates/{k}": np.asarray(v) for k, v in gathered.items()
    }
    arrays["norm"] = np.asarray(multihost_utils.process_allgather(norm, tiled=True))
    arrays["same_sharding"] = np.asarray(same_sharding)
    np.savez(out, **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
