"""The core groups of ``bench.py``: norm, clip and step per tree, compile times.

One tree and one dtype at a time (:func:`bench_tree`): the global norm, clip
undonated, clip donated (clipping at every call, then within the limit) and
clip + AdamW + apply, each an interleaved group of norm_optax, optax and
torch with the triad; then the compile-time sweep over n leaves of 64x64
(:func:`compile_sweep`). Nothing here keeps state between calls: the
bandwidth triad and the settings are passed in, results are returned.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import statistics
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import _harness as harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import norm_optax as nox

torch: Any
try:
    torch = importlib.import_module("torch")
except ImportError:  # torch is optional: its columns are left empty
    torch = None

MAX_NORM = 1.0
LR = 1e-3
WEIGHT_DECAY = 1e-4
# Passes over the tree's bytes of each operation's minimal memory traffic.
PASSES: Mapping[str, int] = MappingProxyType(
    {
        "norm": 1,
        "clip (undonated)": 3,
        "clip": 3,
        "clip (within limit)": 1,
        "step": 8,
    }
)

Peers = dict[str, Callable[[], Any]]
CompileTimes = dict[tuple[str, str, int], float]  # (peer, op, leaves) -> seconds


@dataclasses.dataclass(frozen=True)
class Row:
    tree: str
    dtype: str
    op: str
    peer: str
    stats: harness.Stats
    traffic: int  # bytes of the op's minimal memory traffic
    gbps: float  # triad bandwidth at the median of this op's group

    @property
    def bound(self) -> float:
        """Seconds the minimal traffic takes at the bandwidth of its group."""
        return self.traffic / (self.gbps * 1e9)

    @property
    def ratio(self) -> float:
        return self.stats.median / self.bound


# ---------------------------------------------------------------------------
# The JAX peers.
# ---------------------------------------------------------------------------

CLIPS: Mapping[str, Callable[[float], optax.GradientTransformation]] = MappingProxyType(
    {"norm_optax": nox.clip_by_global_norm, "optax": optax.clip_by_global_norm}
)
NORMS: Mapping[str, Callable[[Any], jax.Array]] = MappingProxyType(
    {"norm_optax": nox.global_norm, "optax": optax.tree.norm}
)


def clip_fn(peer: str) -> Callable[[Any], Any]:
    tx = CLIPS[peer](MAX_NORM)

    def clip(g: Any) -> Any:
        return tx.update(g, tx.init(g))[0]

    return clip


def active_clip_fn(peer: str) -> Callable[[Any, Any], Any]:
    """Clips to a ``max_norm`` passed at run time (traced, no recompilation).

    A donated loop gives each call the previous output, whose norm is the
    previous ``max_norm``; lowering ``max_norm`` by 1% per call makes every
    call clip, with the traffic of the plain transform.
    """

    def active(g: Any, max_norm: Any) -> Any:
        tx = CLIPS[peer](max_norm)
        return tx.update(g, tx.init(g))[0]

    return active


def chain(peer: str) -> optax.GradientTransformation:
    return optax.chain(
        CLIPS[peer](MAX_NORM), optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    )


def step_fn(peer: str) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    return tx_step_fn(chain(peer))


def tx_step_fn(
    tx: optax.GradientTransformation,
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``(params, state, grads) -> (params, state)``: one update, applied."""

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def copy_tree(tree: Any) -> Any:
    return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


# ---------------------------------------------------------------------------
# The torch peers.
# ---------------------------------------------------------------------------


def to_torch(tree: dict[str, jax.Array]) -> list[Any]:
    assert torch is not None
    out = []
    for x in tree.values():
        host = np.asarray(x.astype(jnp.float32))
        out.append(torch.from_numpy(host.copy()).to(getattr(torch, str(x.dtype))))
    return out


def torch_adamw(params: list[Any], kind: str) -> Any:
    """``torch.optim.AdamW`` with ``foreach`` or ``fused``; ``None`` if unsupported."""
    assert torch is not None
    try:
        opt = torch.optim.AdamW(
            params,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            foreach=kind == "foreach",
            fused=kind == "fused",
        )
        opt.step()  # fused=True raises here on backends without a kernel
    except (RuntimeError, ValueError) as error:
        print(f"  torch AdamW({kind}=True) unavailable: {error}", flush=True)
        return None
    return opt


# ---------------------------------------------------------------------------
# One tree, one dtype: all operations.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeCase:
    """The arrays of one tree and dtype, and the compile times taken on it."""

    tree: str
    dname: str
    n_leaves: int
    grads: dict[str, jax.Array]
    params: dict[str, jax.Array]
    nbytes: int
    t_params: list[Any] | None  # torch parameters, their .grad set to t_grads
    t_grads: list[Any] | None
    # Filled on the n x 64x64 float32 trees: the sweep reuses them.
    compile_times: CompileTimes

    @classmethod
    def make(cls, tree: str, dtype: Any) -> TreeCase:
        spec = harness.TREES[tree]()
        dname = jnp.dtype(dtype).name
        millions = harness.count_params(spec) / 1e6
        print(f"{tree} {dname}: {len(spec)} leaves, {millions:.1f} M", flush=True)
        grads = harness.make_tree(spec, dtype, seed=0)
        params = harness.make_tree(spec, dtype, seed=1, scale=0.02)
        t_params = t_grads = None
        if torch is not None:
            t_params = [torch.nn.Parameter(t) for t in to_torch(params)]
            t_grads = to_torch(grads)
            for p, g in zip(t_params, t_grads, strict=True):
                p.grad = g
        return cls(
            tree,
            dname,
            len(spec),
            grads,
            params,
            harness.tree_bytes(grads),
            t_params,
            t_grads,
            {},
        )

    def compiled(
        self, peer: str, op: str, fn: Any, args: Any, donate: Any
    ) -> Callable[..., Any]:
        compiled, seconds = harness.compile_seconds(fn, args, donate)
        if self.tree.endswith("x64x64") and self.dname == "float32":
            self.compile_times[(peer, op, self.n_leaves)] = seconds
        return compiled


def measure(
    case: TreeCase,
    op: str,
    peers: Peers,
    bandwidth: harness.Bandwidth,
    reps: int,
) -> list[Row]:
    """One interleaved group (peers and triad): a row per peer."""
    stats, gbps = bandwidth.time_with(peers, reps)
    traffic = PASSES[op] * case.nbytes
    rows = [
        Row(case.tree, case.dname, op, peer, s, traffic, gbps)
        for peer, s in stats.items()
    ]
    bound = rows[-1].bound
    text = ", ".join(
        f"{p} {s.median * 1e3:.1f} ms ({s.median / bound:.2f}x)"
        for p, s in stats.items()
    )
    print(f"  {op}: {text}", flush=True)
    return rows


def norm_peers(case: TreeCase) -> Peers:
    grads = case.grads
    peers: Peers = {}
    for peer, norm in NORMS.items():
        compiled = case.compiled(peer, "norm", norm, (grads,), ())

        def run_norm(c: Any = compiled) -> None:
            jax.block_until_ready(c(grads))

        peers[peer] = run_norm
    if torch is not None:
        get_total_norm = torch.nn.utils.get_total_norm
        t_grads = case.t_grads
        peers["torch"] = lambda: get_total_norm(t_grads, 2.0, foreach=True).item()
    return peers


def undonated_clip_peers(case: TreeCase) -> Peers:
    grads = case.grads
    peers: Peers = {}
    for peer in CLIPS:
        compiled = case.compiled(peer, "clip (undonated)", clip_fn(peer), (grads,), ())

        def run_clip(c: Any = compiled) -> None:
            jax.block_until_ready(c(grads))  # the output is freed at once

        peers[peer] = run_clip
    return peers


def donated_clip_rows(
    case: TreeCase, bandwidth: harness.Bandwidth, reps: int
) -> list[Row]:
    """Clip with the gradients donated: clipping active, then within the limit.

    Each call gets the previous output, whose norm is the previous max_norm:
    max_norm is lowered by 1% per call (an argument of the jitted function),
    so every call clips; the plain function then runs on a tree already
    within its limit (torch goes on clipping in place, 1% lower each call).
    """
    grads = case.grads
    peers: Peers = {}
    boxes: dict[str, dict[str, Any]] = {}
    for peer in CLIPS:
        compiled = case.compiled(
            peer, "clip active", active_clip_fn(peer), (grads, 1.0), (0,)
        )
        boxes[peer] = {"g": copy_tree(grads), "max_norm": MAX_NORM}

        def run(c: Any = compiled, box: dict[str, Any] = boxes[peer]) -> None:
            box["max_norm"] *= 0.99
            box["g"] = jax.block_until_ready(c(box["g"], box["max_norm"]))

        peers[peer] = run
    if torch is not None:
        clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        t_params = case.t_params
        torch_box = {"max_norm": MAX_NORM}

        def run_torch_clip() -> None:
            torch_box["max_norm"] *= 0.99
            clip_grad_norm_(t_params, torch_box["max_norm"], foreach=True).item()

        peers["torch foreach"] = run_torch_clip
    rows = measure(case, "clip", peers, bandwidth, reps)
    for peer in CLIPS:
        compiled = case.compiled(peer, "clip", clip_fn(peer), (grads,), (0,))

        def run_within(c: Any = compiled, box: dict[str, Any] = boxes[peer]) -> None:
            box["g"] = jax.block_until_ready(c(box["g"]))

        peers[peer] = run_within
    return rows + measure(case, "clip (within limit)", peers, bandwidth, reps)


def step_peers(case: TreeCase, torch_foreach: bool) -> Peers:
    """Clip + AdamW + apply, params and state donated (torch: in place).

    ``torch_foreach``: also time ``AdamW(foreach=True)`` in float32 (on
    bfloat16 CPU tensors it takes seconds per step, an order of magnitude
    slower than ``fused=True``).
    """
    params, grads = case.params, case.grads
    peers: Peers = {}
    for peer in CLIPS:
        state = chain(peer).init(params)
        compiled = case.compiled(
            peer, "step", step_fn(peer), (params, state, grads), (0, 1)
        )
        box = {"p": copy_tree(params), "s": copy_tree(state)}

        def run_step(c: Any = compiled, box: dict[str, Any] = box) -> None:
            box["p"], box["s"] = jax.block_until_ready(c(box["p"], box["s"], grads))

        peers[peer] = run_step
    if torch is not None:
        clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        t_params = case.t_params
        assert t_params is not None
        foreach = torch_foreach and case.dname == "float32"
        for kind in ("foreach", "fused") if foreach else ("fused",):
            opt = torch_adamw(t_params, kind)
            if opt is None:
                continue

            def run_torch(opt: Any = opt) -> None:
                clip_grad_norm_(t_params, MAX_NORM, foreach=True)
                opt.step()

            peers[f"torch {kind}"] = run_torch
    return peers


def bench_tree(
    tree: str,
    dtype: Any,
    bandwidth: harness.Bandwidth,
    reps: int,
    torch_foreach: bool,
) -> tuple[list[Row], CompileTimes]:
    """All operations on one tree and dtype: the rows and the compile times."""
    case = TreeCase.make(tree, dtype)
    rows = measure(case, "norm", norm_peers(case), bandwidth, reps)
    rows += measure(
        case, "clip (undonated)", undonated_clip_peers(case), bandwidth, reps
    )
    rows += donated_clip_rows(case, bandwidth, reps)
    gc.collect()
    rows += measure(case, "step", step_peers(case, torch_foreach), bandwidth, reps)
    gc.collect()
    return rows, case.compile_times


# ---------------------------------------------------------------------------
# Compile time against the number of leaves.
# ---------------------------------------------------------------------------


def compile_sweep(
    counts: list[int], step_limit: int, repeats: int, known: CompileTimes
) -> CompileTimes:
    """Lower + compile wall time of clip and step, for ``n`` leaves of 64x64.

    Each peer is compiled ``repeats`` times from fresh closures (no cache
    hit), the peers' order rotating between repeats (the first compile in a
    process also warms JAX's caches of jnp helpers for the second); the
    median is kept. Leaf counts already timed by the tree benchmark
    (``known``) are kept as they are when ``repeats`` is 1. The step (clip +
    AdamW) is compiled only up to ``step_limit`` leaves. Returns ``known``
    with the new times added (a new dict).
    """
    times = dict(known)
    for n in counts:
        spec = harness.many_leaves(n)
        sds = {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in spec}
        ops = ["clip", "step"] if n <= step_limit else ["clip"]
        for op in ops:
            if repeats == 1 and all((p, op, n) in times for p in CLIPS):
                continue
            samples = _compile_samples(op, sds, repeats)
            for peer, seconds in samples.items():
                times[(peer, op, n)] = statistics.median(seconds)
        text = ", ".join(
            f"{p} {op} {times[(p, op, n)]:.2f} s"
            for op in ("clip", "step")
            for p in CLIPS
            if (p, op, n) in times
        )
        print(f"compile, {n} leaves: {text}", flush=True)
    return times


def _compile_samples(op: str, sds: Any, repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {peer: [] for peer in CLIPS}
    peers = list(CLIPS)
    for r in range(repeats):
        for peer in peers[r % 2 :] + peers[: r % 2]:
            if op == "clip":
                args: tuple[Any, ...] = (sds,)
                fn: Callable[..., Any] = clip_fn(peer)
                donate: tuple[int, ...] = (0,)
            else:
                state = jax.eval_shape(chain(peer).init, sds)
                args, fn, donate = (sds, state, sds), step_fn(peer), (0, 1)
            samples[peer].append(harness.compile_seconds(fn, args, donate)[1])
            gc.collect()
    return samples
