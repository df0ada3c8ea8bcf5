"""Shared pieces of the benchmarks: parameter trees, timing, machine facts.

Nothing here is part of ``norm_optax``. The rules every benchmark follows:

* peers run **in one process and one run**, interleaved round-robin (one call
  of each peer per round), so that noise from other processes hits all of
  them alike;
* every JAX call ends in :func:`jax.block_until_ready`; torch runs on
  ``torch.set_num_threads(os.cpu_count())``;
* a figure is the median of ``reps`` rounds after ``warmup`` calls, reported
  with its min and max;
* the memory-bandwidth bound is measured in the same run (a donated, jitted
  streaming triad), and times are quoted as ratios to the time the minimal
  traffic of the operation takes at that bandwidth.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple[int, ...]

# ---------------------------------------------------------------------------
# Parameter trees: (name, shape) lists with the shapes of real models.
# ---------------------------------------------------------------------------


def gpt2(
    d: int = 768, ff: int = 3072, vocab: int = 50257, ctx: int = 1024, layers: int = 12
) -> list[tuple[str, Shape]]:
    """A GPT-2 (tied embeddings), one leaf per block parameter: ``h{i}/...``."""
    leaves: list[tuple[str, Shape]] = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    for i in range(layers):
        leaves += [(f"h{i}/{name}", shape) for name, shape in _block(d, ff)]
    leaves += [("ln_f/w", (d,)), ("ln_f/b", (d,))]
    return leaves


def gpt2_stacked(
    d: int = 768, ff: int = 3072, vocab: int = 50257, ctx: int = 1024, layers: int = 12
) -> list[tuple[str, Shape]]:
    """The same GPT-2, its blocks stacked: ``h/...`` leaves of shape ``(layers, ...)``.

    The parameters and bytes of :func:`gpt2` with the same arguments, in
    ``4 + 12`` leaves instead of ``4 + 12 * layers`` (the layout of a model
    whose blocks run under ``jax.lax.scan``).
    """
    leaves: list[tuple[str, Shape]] = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    leaves += [(f"h/{name}", (layers, *shape)) for name, shape in _block(d, ff)]
    leaves += [("ln_f/w", (d,)), ("ln_f/b", (d,))]
    return leaves


def _block(d: int, ff: int) -> list[tuple[str, Shape]]:
    return [
        ("ln_1/w", (d,)),
        ("ln_1/b", (d,)),
        ("attn/c_attn/w", (d, 3 * d)),
        ("attn/c_attn/b", (3 * d,)),
        ("attn/c_proj/w", (d, d)),
        ("attn/c_proj/b", (d,)),
        ("ln_2/w", (d,)),
        ("ln_2/b", (d,)),
        ("mlp/c_fc/w", (d, ff)),
        ("mlp/c_fc/b", (ff,)),
        ("mlp/c_proj/w", (ff, d)),
        ("mlp/c_proj/b", (d,)),
    ]


def gpt2_small() -> list[tuple[str, Shape]]:
    """GPT-2 small (124 M parameters, 148 leaves), tied embeddings."""
    return gpt2()


# Keyword arguments of gpt2() and gpt2_stacked() per size; "gpt2-tiny" (two
# blocks of width 64, 0.2 M parameters) is the --smoke stand-in.
GPT2_SIZES: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "gpt2-small": MappingProxyType({}),
        "gpt2-tiny": MappingProxyType(
            {"d": 64, "ff": 256, "vocab": 1000, "ctx": 128, "layers": 2}
        ),
    }
)


def resnet50() -> list[tuple[str, Shape]]:
    """ResNet-50 (25.6 M parameters, 161 leaves): convs, batch-norm scale/bias, fc."""
    leaves: list[tuple[str, Shape]] = []

    def conv_bn(name: str, k: int, cin: int, cout: int) -> None:
        leaves.extend(
            [
                (f"{name}/conv", (k, k, cin, cout)),
                (f"{name}/bn/scale", (cout,)),
                (f"{name}/bn/bias", (cout,)),
            ]
        )

    conv_bn("stem", 7, 3, 64)
    cin = 64
    for stage, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512))):
        for b in range(blocks):
            name = f"stage{stage}/block{b}"
            conv_bn(f"{name}/conv1", 1, cin, width)
            conv_bn(f"{name}/conv2", 3, width, width)
            conv_bn(f"{name}/conv3", 1, width, 4 * width)
            if b == 0:
                conv_bn(f"{name}/downsample", 1, cin, 4 * width)
            cin = 4 * width
    leaves += [("fc/w", (2048, 1000)), ("fc/b", (1000,))]
    return leaves


def vit_b16() -> list[tuple[str, Shape]]:
    """ViT-B/16 at 224 px (86.6 M parameters, 152 leaves)."""
    d, ff = 768, 3072
    leaves: list[tuple[str, Shape]] = [
        ("patch/w", (16, 16, 3, d)),
        ("patch/b", (d,)),
        ("cls", (1, 1, d)),
        ("pos", (1, 197, d)),
    ]
    for i in range(12):
        blk = f"block{i}"
        leaves += [
            (f"{blk}/ln1/w", (d,)),
            (f"{blk}/ln1/b", (d,)),
            (f"{blk}/qkv/w", (d, 3 * d)),
            (f"{blk}/qkv/b", (3 * d,)),
            (f"{blk}/proj/w", (d, d)),
            (f"{blk}/proj/b", (d,)),
            (f"{blk}/ln2/w", (d,)),
            (f"{blk}/ln2/b", (d,)),
            (f"{blk}/fc1/w", (d, ff)),
            (f"{blk}/fc1/b", (ff,)),
            (f"{blk}/fc2/w", (ff, d)),
            (f"{blk}/fc2/b", (d,)),
        ]
    leaves += [
        ("ln/w", (d,)),
        ("ln/b", (d,)),
        ("head/w", (d, 1000)),
        ("head/b", (1000,)),
    ]
    return leaves


def many_leaves(n: int = 3000, shape: Shape = (64, 64)) -> list[tuple[str, Shape]]:
    """``n`` leaves of one small ``shape``: the per-leaf overhead case."""
    return [(f"w{i:05d}", shape) for i in range(n)]


TREES: Mapping[str, Callable[[], list[tuple[str, Shape]]]] = MappingProxyType(
    {
        "gpt2-small": gpt2_small,
        "resnet50": resnet50,
        "vit-b16": vit_b16,
        "3000x64x64": many_leaves,
        "1000x64x64": lambda: many_leaves(1000),  # the --quick stand-in
        "100x64x64": lambda: many_leaves(100),  # the --smoke stand-in
        "gpt2-tiny": lambda: gpt2(**GPT2_SIZES["gpt2-tiny"]),  # the --smoke stand-in
    }
)


def count_params(spec: Sequence[tuple[str, Shape]]) -> int:
    return sum(int(np.prod(shape)) for _, shape in spec)


def make_tree(
    spec: Sequence[tuple[str, Shape]], dtype: Any, seed: int, scale: float = 1.0
) -> dict[str, jax.Array]:
    """A flat dict of normal random leaves (``scale`` times standard normal)."""
    key = jax.random.key(seed)
    keys = jax.random.split(key, len(spec))
    normal = jax.jit(
        lambda k, shape: (scale * jax.random.normal(k, shape)).astype(dtype),
        static_argnums=1,
    )
    tree = {name: normal(k, shape) for k, (name, shape) in zip(keys, spec, strict=True)}
    return jax.block_until_ready(tree)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    """Wall-clock seconds of the timed rounds of one peer."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)


def interleave(
    peers: dict[str, Callable[[], Any]], reps: int, warmup: int = 2
) -> dict[str, Stats]:
    """Times each peer ``reps`` times, one call of each peer per round.

    Each peer is a zero-argument callable that runs the operation once and
    blocks until it is done (it carries donated buffers over between calls).
    The order of the peers is rotated every round.
    """
    names = list(peers)
    for _ in range(warmup):
        for name in names:
            peers[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            peers[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Stats(s) for name, s in samples.items()}


def compile_seconds(
    fn: Callable[..., Any], args: Sequence[Any], donate: Sequence[int] = ()
) -> tuple[Any, float]:
    """``jax.jit(fn).lower(*args).compile()``: the executable and its wall time."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=tuple(donate)).lower(*args).compile()
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------------------
# Memory bandwidth: a donated streaming triad ``a <- b + s * c``.
# ---------------------------------------------------------------------------


class Bandwidth:
    """A donated jitted streaming triad ``a <- a + s * b`` over float32 arrays.

    It reads ``a`` and ``b`` and writes ``a`` in place (3 passes of 4 bytes
    per element). :meth:`run` is a peer like any other: put it in every
    :func:`interleave` group so that the bound sees the same noise as the
    operations it bounds; :meth:`record` keeps its samples, and :attr:`gbps`
    is the bandwidth (bytes read and written per second) at the median of all
    samples of the run.
    """

    def __init__(self, elements: int = 1 << 26) -> None:
        self.elements = elements
        self.moved = 3 * elements * 4  # read a and b, write a
        self._triad = jax.jit(lambda a, b: a + jnp.float32(0.5) * b, donate_argnums=0)
        self._a = jnp.zeros((elements,), jnp.float32)
        self._b = jnp.ones((elements,), jnp.float32)
        self.samples: list[float] = []  # seconds

    def run(self) -> None:
        self._a = jax.block_until_ready(self._triad(self._a, self._b))

    def record(self, stats: Stats) -> None:
        self.samples.extend(stats.samples)

    def measure(self, reps: int = 15) -> None:
        self.record(interleave({"triad": self.run}, reps=reps, warmup=3)["triad"])

    def time_with(
        self, peers: dict[str, Callable[[], Any]], reps: int
    ) -> tuple[dict[str, Stats], float]:
        """Times ``peers`` with the triad among them (one :func:`interleave` group).

        Keeps the triad's samples and returns the peers' stats and the
        bandwidth (GB/s) at the triad's median in this group: the bound of
        the group's operations.
        """
        stats = interleave({**peers, "triad": self.run}, reps)
        triad = stats.pop("triad")
        self.record(triad)
        return stats, self.moved / triad.median / 1e9

    @property
    def gbps(self) -> float:
        return self.moved / statistics.median(self.samples) / 1e9

    @property
    def gbps_range(self) -> tuple[float, float]:
        return self.moved / max(self.samples) / 1e9, self.moved / min(
            self.samples
        ) / 1e9


# ---------------------------------------------------------------------------
# Machine facts.
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def machine_facts() -> dict[str, str]:
    load = os.getloadavg()
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_memory_gib():.1f} GiB",
        "load average (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in load),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "numpy": np.__version__,
        "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def machine_slug() -> str:
    """A file name for this machine: CPU model and core count."""
    model = _cpu_model().lower()
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", " ", model)
    slug = re.sub(r"[^a-z0-9]+", "-", model).strip("-")
    return f"{slug}-{os.cpu_count()}core"
