"""Projections after AdamW: norm_optax against the plain jnp a user would write.

Each row is a whole training step, ``optax.chain(optax.adamw(3e-4), T)``
and ``optax.apply_updates``, jitted with params and state donated, timed in
one interleaved group with ``optax.adamw(3e-4)`` alone, so that the extra
time of ``T`` is the difference of two medians of the same group. Beside
each per-unit projection and the spectral clip runs the plain ``jnp``
version a user would write after AdamW (on the new parameters, Keras'
formulas), and, where torch is installed, torch's (``AdamW(foreach=True)``
then ``torch.renorm``, or one power step as in the ``spectral_norm``
parametrization). The extra time is given in passes over the parameters'
bytes (at the triad bandwidth of the group) and as a ratio to the plain
version's extra time.

Compile times: each GPT-2 step as built, and on a tree of 500 leaves of
64x64 (the step, and the transform's ``update`` alone against the plain
function alone).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import _harness as harness
import jax
import jax.numpy as jnp
import optax
from _core import torch, tx_step_fn
from _peer import Build, Timed, attempt, jitted_step_build, time_group, timing_text
from _report import TargetTable

import norm_optax as nox

LR = 3e-4
COEFF = 1e-4  # the prox coefficients (times LR as their learning rate)
MAX = 1.0
# ``--quick``: a narrower, shallower GPT-2 (14M parameters, 56 MB in float32).
QUICK_GPT2 = {"d": 384, "ff": 1536, "vocab": 8192, "ctx": 256, "layers": 6}
COMPILE_LEAVES = 500

ELEMENTWISE = {
    "clip_weights(0.1)": lambda: nox.clip_weights(0.1),
    "project_linf_ball(0.1)": lambda: nox.project_linf_ball(0.1),
    "non_negative()": lambda: nox.non_negative(),
    "prox_l1(1e-4, 3e-4)": lambda: nox.prox_l1(COEFF, LR),
    "prox_elastic_net(1e-4, 1e-4, 3e-4)": lambda: nox.prox_elastic_net(
        COEFF, COEFF, LR
    ),
}
# Whole-tree balls: a global norm of p + u, so p + u is written and read once
# more, as for the per-unit ones (the one-pass target is for the
# elementwise projections; these are reported without a target).
BALLS = {
    "project_l2_ball(10.0)": lambda: nox.project_l2_ball(10.0),
    "project_l1_ball(1e3)": lambda: nox.project_l1_ball(1e3),
}
PER_UNIT = {
    "max_norm(1.0)": lambda: nox.max_norm(MAX),
    "unit_norm()": lambda: nox.unit_norm(),
    "min_max_norm(0.5, 1.0)": lambda: nox.min_max_norm(0.5, MAX),
    "prox_group_l1(1e-4, 3e-4)": lambda: nox.prox_group_l1(COEFF, LR),
    "clip_spectral_norm(1.0, num_iters=1)": lambda: nox.clip_spectral_norm(
        MAX, num_iters=1
    ),
}


# ---------------------------------------------------------------------------
# The plain versions a user would write, on the new parameters.
# ---------------------------------------------------------------------------


def _unit_norm(w: jax.Array) -> jax.Array:
    axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else (0,)
    return jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))


def keras_max_norm(w: jax.Array) -> jax.Array:
    n = _unit_norm(w)
    return w * (jnp.clip(n, 0, MAX) / (1e-7 + n))


def keras_unit_norm(w: jax.Array) -> jax.Array:
    return w / (1e-7 + _unit_norm(w))


def keras_min_max_norm(w: jax.Array) -> jax.Array:
    n = _unit_norm(w)
    return w * (jnp.clip(n, 0.5, MAX) / (1e-7 + n))


def group_soft_threshold(w: jax.Array) -> jax.Array:
    n = _unit_norm(w)
    return w * jnp.maximum(0, 1 - COEFF * LR / jnp.maximum(n, 1e-30))


PLAIN = {
    "max_norm(1.0)": keras_max_norm,
    "unit_norm()": keras_unit_norm,
    "min_max_norm(0.5, 1.0)": keras_min_max_norm,
    "prox_group_l1(1e-4, 3e-4)": group_soft_threshold,
}


def plain_step(fn: Callable[[jax.Array], jax.Array]) -> Callable[..., Any]:
    tx = optax.adamw(LR)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(fn, optax.apply_updates(params, updates)), state

    return step


def plain_update_step(fn: Callable[[jax.Array], jax.Array]) -> Callable[..., Any]:
    """The same formula as a transform would write it: ``u' = fn(p + u) - p``.

    A ``GradientTransformation`` must return an update, which
    :func:`optax.apply_updates` adds back to ``p``: this is the plain ``jnp``
    version of that, for the per-unit ones.
    """
    tx = optax.adamw(LR)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        projected = jax.tree.map(lambda u, p: fn(p + u) - p, updates, params)
        return optax.apply_updates(params, projected), state

    return step


def _power_step(w: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One warm-started power step on ``w`` as ``(fan-in, units)``; the clipped w."""
    m = w.reshape(-1, w.shape[-1])
    left = m @ v
    left = left / (jnp.linalg.norm(left) + 1e-12)
    right = m.T @ left
    sigma = jnp.linalg.norm(right)
    v = right / (sigma + 1e-12)
    return (w * jnp.minimum(1, MAX / sigma)).astype(w.dtype), v


def plain_spectral_step() -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    """AdamW, then each matrix clipped by one warm-started power step."""
    tx = optax.adamw(LR)

    def init(params: Any) -> Any:
        vectors = {
            k: jnp.ones((w.shape[-1],), w.dtype) / w.shape[-1] ** 0.5
            for k, w in params.items()
            if w.ndim >= 2
        }
        return tx.init(params), vectors

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        inner, vectors = state
        updates, inner = tx.update(grads, inner, params)
        new = optax.apply_updates(params, updates)
        out, new_vectors = dict(new), {}
        for k, v in vectors.items():
            out[k], new_vectors[k] = _power_step(new[k], v)
        return out, (inner, new_vectors)

    return step, init


def hlo_bytes(compiled: Any) -> float | None:
    """The bytes XLA's cost analysis says the executable reads and writes."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # (older jax: one dict per computation)
        analysis = analysis[0] if analysis else {}
    value = (analysis or {}).get("bytes accessed")
    return None if value is None else float(value)


def temp_bytes(compiled: Any) -> float | None:
    """The executable's temporary buffers (XLA's memory analysis), in bytes."""
    try:
        return float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # (a backend without a memory analysis)
        return None


def custom_build(
    step: Callable[..., Any],
    init: Callable[[Any], Any],
    params: Any,
    grads: Any,
    hlo: dict[str, tuple[float | None, float | None]] | None = None,
    label: str = "",
) -> Build:
    """A jitted step ``(params, state, grads)``, params and state donated.

    With ``hlo``, the executable's bytes accessed and its temporary bytes
    are stored at ``label``.
    """

    def record(compiled: Any) -> None:
        if hlo is not None:
            hlo[label] = (hlo_bytes(compiled), temp_bytes(compiled))

    return jitted_step_build(step, init, params, grads, record)


# ---------------------------------------------------------------------------
# torch: AdamW(foreach=True), then torch.renorm or one power step.
# ---------------------------------------------------------------------------


def torch_build(params: Any, grads: Any, after: str) -> Build:
    def build() -> tuple[Callable[[], None], float]:
        if torch is None:
            raise ImportError("torch is not installed")
        ps = [torch.tensor(jax.device_get(x)) for x in params.values()]
        gs = [torch.tensor(jax.device_get(x)) for x in grads.values()]
        for p, g in zip(ps, gs, strict=True):
            p.grad = g
        opt = torch.optim.AdamW(ps, lr=LR, foreach=True)
        matrices = [p for p in ps if p.ndim >= 2]
        vs = [torch.ones(p.shape[-1]) / p.shape[-1] ** 0.5 for p in matrices]

        @torch.no_grad()
        def run() -> None:
            opt.step()
            if after == "renorm":
                for p in ps:  # a vector is one unit, as in the Flax convention
                    q = p if p.ndim > 1 else p[None]
                    q.copy_(torch.renorm(q, 2, q.ndim - 1 if p.ndim > 1 else 0, MAX))
            elif after == "power":
                for i, p in enumerate(matrices):
                    m = p.reshape(-1, p.shape[-1])
                    left = torch.nn.functional.normalize(torch.mv(m, vs[i]), dim=0)
                    right = torch.mv(m.t(), left)
                    sigma = torch.linalg.vector_norm(right)
                    vs[i] = right / (sigma + 1e-12)
                    p.mul_(torch.clamp(MAX / sigma, max=1.0))

        return run, 0.0

    return build


# ---------------------------------------------------------------------------
# The group.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectionsResult:
    model: str
    tree_bytes: int
    timed: dict[str, Timed]
    gbps: float
    compile_gpt2: dict[str, float]
    compile_tree: dict[str, float]
    hlo_bytes: dict[str, float | None]  # XLA's cost analysis, per jax step
    temp_bytes: dict[str, float | None]  # XLA's memory analysis, per jax step
    faults: dict[str, float]  # minor page faults per step (Linux), per peer


ADAMW = "adamw"
ADAMW_APART = "adamw (the L1 ball's group)"
TORCH_ADAMW = "torch AdamW(foreach)"


def _nox_label(name: str) -> str:
    return f"chain(adamw, nox.{name})"


def _plain_label(name: str) -> str:
    return f"adamw + plain {name}"


def _plain_update_label(name: str) -> str:
    return f"adamw + plain {name} as an update"


def bench_projections(
    model: str, bandwidth: harness.Bandwidth, reps: int
) -> ProjectionsResult:
    sizes = QUICK_GPT2 if model == "gpt2-quick" else harness.GPT2_SIZES[model]
    spec = harness.gpt2(**sizes)
    print(f"{model} float32: projections after AdamW", flush=True)
    grads = harness.make_tree(spec, jnp.float32, seed=0, scale=0.1)
    params = harness.make_tree(spec, jnp.float32, seed=1, scale=0.05)
    tree = harness.tree_bytes(params)

    hlo: dict[str, tuple[float | None, float | None]] = {}

    def step(label: str, make: Callable[[], optax.GradientTransformation]) -> Build:
        tx = optax.chain(optax.adamw(LR), make())
        return custom_build(tx_step_fn(tx), tx.init, params, grads, hlo, label)

    builds: dict[str, Build] = {ADAMW: step(ADAMW, optax.identity)}
    for name, make in {**ELEMENTWISE, **PER_UNIT, **BALLS}.items():
        builds[_nox_label(name)] = step(_nox_label(name), make)
    # The L1 ball is timed in a group of its own, with AdamW again as its
    # base: its 0.3 GB of temporary buffers, released after each of its
    # steps, slowed the rows that ran after it in the interleaved group.
    l1_ball = _nox_label("project_l1_ball(1e3)")
    apart = {
        ADAMW_APART: step(ADAMW_APART, optax.identity),
        l1_ball: builds.pop(l1_ball),
    }
    for name, fn in PLAIN.items():
        builds[_plain_label(name)] = custom_build(
            plain_step(fn), optax.adamw(LR).init, params, grads, hlo, _plain_label(name)
        )
    for name, fn in PLAIN.items():
        label = _plain_update_label(name)
        builds[label] = custom_build(
            plain_update_step(fn), optax.adamw(LR).init, params, grads, hlo, label
        )
    spectral, spectral_init = plain_spectral_step()
    label = _plain_label("clip_spectral_norm(1.0, num_iters=1)")
    builds[label] = custom_build(spectral, spectral_init, params, grads, hlo, label)
    builds[TORCH_ADAMW] = torch_build(params, grads, "none")
    builds["torch AdamW + torch.renorm"] = torch_build(params, grads, "renorm")
    builds["torch AdamW + power step"] = torch_build(params, grads, "power")
    candidates = {}
    for label, build in {**builds, **apart}.items():
        print(f"  {label}", flush=True)
        candidates[label] = attempt(build, tree)
    timed = time_group({k: candidates[k] for k in builds}, bandwidth, reps)
    timed |= time_group({k: candidates[k] for k in apart}, bandwidth, reps)
    gbps = next((t.gbps for t in timed.values() if t.gbps is not None), float("nan"))
    compile_gpt2 = {
        k: c.compile_s for k, c in candidates.items() if c.compile_s is not None
    }
    faults = {k: page_faults(c.run) for k, c in candidates.items() if c.run}
    return ProjectionsResult(
        model,
        tree,
        timed,
        gbps,
        compile_gpt2,
        compile_leaves(COMPILE_LEAVES),
        {k: v[0] for k, v in hlo.items()},
        {k: v[1] for k, v in hlo.items()},
        {k: v for k, v in faults.items() if v is not None},
    )


def page_faults(run: Callable[[], None], steps: int = 5) -> float | None:
    """Minor page faults per call of ``run`` (first touches of fresh memory).

    A step whose temporary buffers are larger than glibc's largest mmap
    threshold (32 MiB) gets them from a fresh ``mmap`` every call, and pays
    one fault per 4 KiB page it writes. ``None`` where ``resource`` is
    missing (not Unix).
    """
    try:
        import resource
    except ImportError:
        return None
    run()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def _seconds(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def compile_leaves(n: int) -> dict[str, float]:
    """Compile seconds on ``n`` leaves of 64x64: the update alone and the step."""
    print(f"compile times on {n} leaves", flush=True)
    spec = harness.many_leaves(n, (64, 64))
    params = harness.make_tree(spec, jnp.float32, seed=1, scale=0.05)
    grads = harness.make_tree(spec, jnp.float32, seed=0, scale=0.1)
    out: dict[str, float] = {}
    for name, fn in PLAIN.items():
        if name == "max_norm(1.0)":
            out[f"plain {name}"] = _seconds(
                lambda p, fn=fn: jax.tree.map(fn, p), params
            )
            out[f"plain {name} as an update"] = _seconds(
                lambda u, p, fn=fn: jax.tree.map(lambda a, b: fn(b + a) - b, u, p),
                grads,
                params,
            )
    for name in ("max_norm(1.0)",):
        tx = {**ELEMENTWISE, **BALLS, **PER_UNIT}[name]()
        out[f"nox.{name}"] = _seconds(
            lambda u, p, tx=tx: tx.update(u, tx.init(p), p)[0], grads, params
        )
    adamw = optax.adamw(LR)
    out["adamw step"] = _seconds(tx_step_fn(adamw), params, adamw.init(params), grads)
    out["adamw + plain max_norm step"] = _seconds(
        plain_step(keras_max_norm), params, adamw.init(params), grads
    )
    chain = optax.chain(adamw, nox.max_norm(MAX))
    out["chain(adamw, nox.max_norm(1.0)) step"] = _seconds(
        tx_step_fn(chain), params, chain.init(params), grads
    )
    for k, v in out.items():
        print(f"  {k}: {v:.2f} s", flush=True)
    return out


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------


def _base(label: str) -> str:
    """The row whose median a row's extra time is taken over."""
    if label.startswith("torch"):
        return TORCH_ADAMW
    return ADAMW_APART if "project_l1_ball" in label else ADAMW


def _extra(result: ProjectionsResult, label: str, base: str = ADAMW) -> float | None:
    t, b = result.timed.get(label), result.timed.get(base)
    if t is None or b is None or t.stats is None or b.stats is None:
        return None
    return t.stats.median - b.stats.median


def _passes(result: ProjectionsResult, extra: float | None) -> float | None:
    if extra is None:
        return None
    return extra / (result.tree_bytes / (result.gbps * 1e9))


def _hlo_passes(result: ProjectionsResult, label: str) -> float | None:
    """Extra bytes accessed over AdamW's (XLA's cost analysis), in passes."""
    a, b = result.hlo_bytes.get(label), result.hlo_bytes.get(ADAMW)
    if a is None or b is None:
        return None
    return (a - b) / result.tree_bytes


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _fmt(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def targets(result: ProjectionsResult) -> TargetTable:
    table = TargetTable()
    for name in PER_UNIT:
        plain = _extra(result, _plain_label(name))
        ratio = _ratio(_extra(result, _nox_label(name)), plain)
        limit = 1.2 if name.startswith("clip_spectral") else 1.0
        table.add(
            f"nox.{name}: extra time over AdamW <= {limit:g}x the plain version's",
            ratio,
            None if ratio is None else ratio <= limit,
            "{:.2f}x",
            near=ratio is not None and ratio <= limit * 1.05,
        )
    for name in ELEMENTWISE:
        passes = _passes(result, _extra(result, _nox_label(name)))
        table.add(
            f"nox.{name}: extra time over AdamW <= 1 pass over the params",
            passes,
            None if passes is None else passes <= 1.0,
            "{:.2f} passes",
        )
    c = result.compile_tree
    for nox_key, plain_key, what in (
        ("nox.max_norm(1.0)", "plain max_norm(1.0)", "update alone"),
        (
            "nox.max_norm(1.0)",
            "plain max_norm(1.0) as an update",
            "update alone (for the record)",
        ),
        (
            "chain(adamw, nox.max_norm(1.0)) step",
            "adamw + plain max_norm step",
            "step",
        ),
    ):
        ratio = _ratio(c.get(nox_key), c.get(plain_key))
        table.add(
            f"compile, {COMPILE_LEAVES} leaves, {what}: {nox_key} <= 2x {plain_key}",
            ratio,
            None if ratio is None else ratio <= 2.0,
            "{:.2f}x",
        )
    for name in PLAIN:
        ratio = _ratio(
            result.compile_gpt2.get(_nox_label(name)),
            result.compile_gpt2.get(_plain_label(name)),
        )
        table.add(
            f"compile, {result.model} step: nox.{name} <= 2x the plain version",
            ratio,
            None if ratio is None else ratio <= 2.0,
            "{:.2f}x",
        )
    return table


def projections_section(result: ProjectionsResult) -> list[str]:
    lines = [
        f"## float32 {result.model}: projections after AdamW",
        "",
        f"One interleaved group, params and state donated, step + apply; "
        f"{result.tree_bytes / 1e6:.0f} MB of parameters, one pass "
        f"{result.tree_bytes / (result.gbps * 1e9) * 1e3:.1f} ms at the group's "
        f"{result.gbps:.1f} GB/s (the L1 ball: a second group with AdamW, last "
        "two rows). Extra: the median beyond AdamW alone's (torch "
        "rows: beyond torch's AdamW); ratio: to the plain version's extra (the "
        'plain version assigns the new params; "as an update" is the same '
        "formula returned as an update, u' = fn(p + u) - p, as a transform must, "
        "then applied). HLO "
        "extra passes: the bytes the optimized executable reads and writes "
        "(XLA's cost analysis) beyond AdamW's, over the parameters' bytes: the "
        "memory traffic, free of the timing noise. Temp MB: the executable's "
        "temporary buffers (XLA's memory analysis); faults: minor page faults "
        "per step, counted after the timing (each is a 4 KiB page written for "
        "the first time: a temporary buffer that the C allocator maps afresh "
        "at every step).",
        "",
        "| step | compile s | time ms | extra ms | extra passes | ratio to plain "
        "| ratio to plain update | HLO extra passes | temp MB | faults | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, t in result.timed.items():
        torch_row = label.startswith("torch")
        extra = None
        if label not in (ADAMW, TORCH_ADAMW, ADAMW_APART):
            extra = _extra(result, label, _base(label))
        ratio = ratio_update = None
        for name in PLAIN | {"clip_spectral_norm(1.0, num_iters=1)": None}:
            if label == _nox_label(name):
                ratio = _ratio(extra, _extra(result, _plain_label(name)))
                ratio_update = _ratio(extra, _extra(result, _plain_update_label(name)))
        note = "" if t.reason is None else f"n/a: {t.reason}"
        cells = [
            label,
            _fmt(t.compile_s, "{:.2f}") if not torch_row else "—",
            timing_text(t).split(" **")[0] if t.stats is not None else "n/a",
            _fmt(None if extra is None else extra * 1e3, "{:.1f}"),
            _fmt(_passes(result, extra), "{:.2f}"),
            _fmt(ratio, "{:.2f}x"),
            _fmt(ratio_update, "{:.2f}x"),
            _fmt(None if torch_row else _hlo_passes(result, label), "{:.2f}"),
            _fmt(_mb(result.temp_bytes.get(label)), "{:.1f}"),
            _fmt(result.faults.get(label), "{:.0f}"),
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Compile seconds on {COMPILE_LEAVES} leaves of 64x64:",
        "",
        "| what | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in result.compile_tree.items()],
        "",
        "Targets:",
        "",
        *targets(result).lines,
        "",
    ]
    return lines


def plot_projections(result: ProjectionsResult, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for label in result.timed:
        if label in (ADAMW, TORCH_ADAMW, ADAMW_APART):
            continue
        torch_row = label.startswith("torch")
        passes = _passes(result, _extra(result, label, _base(label)))
        if passes is None:
            continue
        labels.append(label)
        values.append(passes)
        colors.append(
            "tab:orange"
            if torch_row
            else "tab:gray"
            if "plain" in label
            else "tab:blue"
        )
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("extra time over AdamW, in passes over the params' bytes")
    ax.set_title(f"{result.model} float32: projections after AdamW", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
