"""Writes the notebooks in this folder from the cell sources below.

    python notebooks/build.py            # write the notebooks, no outputs
    python notebooks/build.py --execute  # ...and run them (full size), save outputs
    python notebooks/build.py --execute 02_exploding_gradients.ipynb  # just one

This file is the source of truth of the notebooks' cells. The committed
notebooks carry the outputs of a full-size run, so a reader on GitHub sees
the tables and plots. The tests execute them with ``NORM_OPTAX_SMALL=1`` (a
few steps per run) and check the outputs, and
``tests/test_notebooks.py::test_committed_notebook_matches_build`` fails when
a committed ``.ipynb``'s cell sources differ from what this file builds
(outputs, execution counts and metadata are not compared).

To change a notebook:

1. edit its cells here (never the ``.ipynb`` by hand: the drift test fails);
2. run ``python notebooks/build.py --execute NAME.ipynb`` to regenerate it
   and save the outputs of a full-size run;
3. commit this file and the ``.ipynb`` together.

:func:`cells` and :func:`build_notebook` are pure (no execution, no file
written): the drift test compares their result with the committed files.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
REPO = "norm-optax/norm_optax"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}"
    return f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


# The release the committed notebooks were executed with: their install cell
# pins it (a git tag until norm-optax is on PyPI).
RELEASE_TAG = "v0.3.0"

# The install cell, in two parts: the decision (plain Python, which
# tests/test_install_cell.py executes) and the %pip line that acts on it.
INSTALL_LOGIC = f"""\
# On Colab (or anywhere norm_optax is not installed yet): install norm_optax
# {RELEASE_TAG}, the release this notebook was run with, and its "examples"
# extra (flax, matplotlib, scikit-learn). Skipped when importable. A jax that
# norm_optax supports is kept as it is (on a Colab TPU a new jaxlib breaks the
# TPU backend): pip gets the installed jax and jaxlib as pins.
import importlib.metadata
import importlib.util
import re
import shlex

PACKAGE = "norm-optax[examples] @ git+https://github.com/{REPO}@{RELEASE_TAG}"
JAX_MIN = (0, 9, 0)  # norm_optax's lowest supported jax


def installed(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements(importable, jax, jaxlib):
    \"\"\"What to pip-install; jax, jaxlib: installed versions or None.\"\"\"
    if importable:
        return []
    numbers = re.match(r"\\d+(?:\\.\\d+)*", jax or "")
    if numbers is None or tuple(map(int, numbers[0].split("."))) < JAX_MIN:
        if jax is not None:
            print(f"jax {{jax}} is older than norm_optax supports: pip upgrades it")
        return [PACKAGE]
    pins = [f"jax=={{jax}}"] + ([f"jaxlib=={{jaxlib}}"] if jaxlib else [])
    return [PACKAGE, *pins]
"""

INSTALL = (
    INSTALL_LOGIC
    + """

to_install = requirements(
    importlib.util.find_spec("norm_optax") is not None,
    installed("jax"),
    installed("jaxlib"),
)
if to_install:
    args = " ".join(map(shlex.quote, to_install))
    %pip install -q {args}"""
)

SMALL = """\
%matplotlib inline
plt.rcParams["figure.dpi"] = 80  # inline plots, kept small

# NORM_OPTAX_SMALL=1 (set by the tests) runs a much smaller version.
SMALL = os.environ.get("NORM_OPTAX_SMALL") == "1"
print("backend:", jax.default_backend())
print("devices:", jax.devices())"""


QUICKSTART = [
    (
        "markdown",
        f"""\
# norm_optax quickstart

{badge("01_quickstart.ipynb")}

Norm-based training techniques as Optax transforms: gradient clipping
(before the optimizer), weight projection (last in the chain) and L1/L2
decay, all built on three norm primitives. This notebook runs on CPU, GPU
or TPU: it uses whatever `jax.devices()` returns.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import norm_optax as nox

"""
        + SMALL,
    ),
    (
        "markdown",
        """\
## 1. Norm primitives

`global_norm` treats all leaves as one vector, `leaf_norms` gives one norm
per leaf, `unit_norms` one per *unit* (for a Dense kernel `(in, out)`: one
per output feature). Integer leaves are skipped; half precision is
accumulated in float32.""",
    ),
    (
        "code",
        """\
tree = {
    "w": jnp.array([[3.0, 0.0], [4.0, 1.0]]),
    "b": jnp.array([12.0, 0.0]),
    "step": jnp.array(7),  # an integer leaf: not part of any norm
}
print("global L2 norm:", nox.global_norm(tree))
print("global L1 norm:", nox.global_norm(tree, ord=1))
print("per-leaf norms:", nox.leaf_norms(tree))
print("unit norms of w (one per output column):", nox.unit_norms(tree["w"]))""",
    ),
    (
        "markdown",
        """\
## 2. Clipping, projection, decay

Clipping transforms rescale the gradient *before* the optimizer; projections
(`max_norm`, `unit_norm`, `clip_weights`, ...) and `prox_l1` go *last*, after
the learning rate, and need the params.""",
    ),
    (
        "code",
        """\
grads = {"w": jnp.array([[30.0, 0.0], [40.0, 10.0]]), "b": jnp.array([5.0, -5.0])}
clippers = {
    "clip_by_value(1.0)": nox.clip_by_value(1.0),
    "clip_by_norm(1.0)": nox.clip_by_norm(1.0),
    "clip_by_global_norm(1.0)": nox.clip_by_global_norm(1.0),
    "normalize_by_global_norm(1.0)": nox.normalize_by_global_norm(1.0),
}
for name, tx in clippers.items():
    clipped, _ = tx.update(grads, tx.init(grads))
    before, after = nox.global_norm(grads), nox.global_norm(clipped)
    print(f"{name:30s} global norm {before:8.3f} -> {after:.3f}")

# A projection: every unit (column) of w ends up with L2 norm <= 1.
params = {"w": jnp.array([[3.0, 0.1], [4.0, 0.1]])}
step = {"w": jnp.zeros((2, 2))}  # whatever the optimizer proposed
tx = nox.max_norm(1.0)
updates, _ = tx.update(step, tx.init(params), params)
new_params = optax.apply_updates(params, updates)
print("unit norms:", nox.unit_norms(params["w"]))
print("after max_norm(1.0):", nox.unit_norms(new_params["w"]))""",
    ),
    (
        "markdown",
        """\
## 3. Clipping + AdamW in a Flax NNX training loop

`optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(...))`: the clip
comes first, so AdamW sees gradients of global norm at most 1.""",
    ),
    (
        "code",
        """\
class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 64, rngs=rngs)
        self.out = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


key_x, key_w = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (512, 8))
y = jnp.sin(x) @ (10.0 * jax.random.normal(key_w, (8, 1)))  # large early gradients
steps = 30 if SMALL else 500


def make_optimizer(tx):
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


tx = optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(1e-2))
model, optimizer = make_optimizer(tx)
losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
print(f"loss after 1 step {losses[0]:.2f}, after {steps} steps {losses[-1]:.3f}")""",
    ),
    (
        "markdown",
        """\
## 4. Logging the pre-clip gradient norm

Wrap the clip in `nox.record_norms`: its state holds `input_norm` (the raw
gradient norm, the one worth logging) and `output_norm` (after clipping).
`optax.tree.get` finds them anywhere in the optimizer state.""",
    ),
    (
        "code",
        """\
tx = optax.chain(nox.record_norms(nox.clip_by_global_norm(1.0)), optax.adamw(1e-2))
model, optimizer = make_optimizer(tx)
log = {"loss": [], "input_norm": [], "output_norm": []}
for _ in range(steps):
    log["loss"].append(float(train_step(model, optimizer, x, y)))
    for name in ("input_norm", "output_norm"):
        log[name].append(float(optax.tree.get(optimizer.opt_state, name)))

with plt.rc_context({"font.size": 11, "figure.dpi": 130}):
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 3.6), layout="tight")
    ax_loss.plot(log["loss"], color="#0072B2", lw=2)
    ax_loss.set(yscale="log", xlabel="step", ylabel="MSE", title="Training loss")
    before, after = log["input_norm"], log["output_norm"]
    ax_norm.plot(before, color="#D55E00", lw=2, label="input_norm (before the clip)")
    ax_norm.plot(after, color="#009E73", lw=2, ls="--", label="output_norm (after it)")
    ax_norm.axhline(1.0, color="0.5", ls=":", lw=1)  # the clip threshold
    ax_norm.set(yscale="log", xlabel="step", ylabel="global gradient norm")
    ax_norm.set_title("Gradient norm")
    ax_norm.legend()
    for ax in (ax_loss, ax_norm):
        ax.grid(alpha=0.3)
    plt.show()""",
    ),
    (
        "markdown",
        """\
## 5. A sharded training step

The same `train_step` on a data-parallel mesh over all devices (one device
works too): the batch is split along `"data"`, the parameters and optimizer
state are replicated. `clip_by_global_norm` needs no change: under `jax.jit`
with sharded arrays it computes the norm of the whole gradient.""",
    ),
    (
        "code",
        """\
mesh = jax.make_mesh((len(jax.devices()),), ("data",))
replicated = NamedSharding(mesh, P())
by_batch = NamedSharding(mesh, P("data"))  # 512 rows split over the devices

tx = optax.chain(nox.record_norms(nox.clip_by_global_norm(1.0)), optax.adamw(1e-2))
model, optimizer = make_optimizer(tx)
nnx.update(model, jax.device_put(nnx.state(model), replicated))
nnx.update(optimizer, jax.device_put(nnx.state(optimizer), replicated))
x_sharded, y_sharded = jax.device_put(x, by_batch), jax.device_put(y, by_batch)

loss = train_step(model, optimizer, x_sharded, y_sharded)
norm = optax.tree.get(optimizer.opt_state, "input_norm")
print("mesh:", dict(mesh.shape))
print("batch sharding:", x_sharded.sharding.spec)
print("kernel sharding:", model.hidden.kernel[...].sharding.spec)
print(f"loss {float(loss):.3f}, pre-clip gradient norm {float(norm):.3f}")

# The same step without sharding gives the same parameters.
model_1, optimizer_1 = make_optimizer(tx)
train_step(model_1, optimizer_1, x, y)
sharded, unsharded = nnx.state(model, nnx.Param), nnx.state(model_1, nnx.Param)
gaps = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), sharded, unsharded)
gap = max(jax.tree.leaves(gaps))
print(f"largest parameter difference, sharded vs unsharded: {float(gap):.2e}")""",
    ),
]


EXPLODING = [
    (
        "markdown",
        f"""\
# Exploding gradients: what each clipping transform does

{badge("02_exploding_gradients.ipynb")}

Part 1 of `python -m norm_optax.demo`, step by step. A vanilla tanh RNN
learns the *adding problem* (sum the two marked numbers of a sequence) with
SGD + momentum at a learning rate that is too large for it. Every run starts
from the same weights and sees the same batches; only the clipping transform
placed before the optimizer changes. The training code is imported from
`norm_optax.demo.exploding` (read it there). Predicting the mean scores a
loss of 1/6.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import dataclasses
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import norm_optax as nox
from norm_optax.demo import exploding

"""
        + SMALL
        + """
config = exploding.RNNConfig()
if SMALL:
    config = dataclasses.replace(config, steps=100, chunk=100)
config""",
    ),
    (
        "markdown",
        """\
## One run per transform

Each transform is wrapped in `nox.record_norms`, so the *pre-clip* gradient
norm is logged (`input_norm`) along with the norm after clipping.""",
    ),
    (
        "code",
        """\
results = exploding.run_all(config, seed=0)
display(Markdown(exploding.format_table(results)))""",
    ),
    ("code", "display(exploding.plot(results))"),
    (
        "markdown",
        """\
## Fixed threshold, AutoClip and ZClip

`clip_by_global_norm(1.0)` uses a fixed threshold. `autoclip` clips to a
percentile of the norms seen so far. `nox.zclip()` is ZClip as its authors'
code runs it, with their defaults:

* **warm-up**: for the first `warmup_steps=25` steps it clips at the fixed
  `max_norm=1.0` and collects the mean and variance of the raw norms;
* **after warm-up** it keeps an EMA (`alpha=0.97`) of the norm and of its
  variance; a norm whose z-score exceeds `z_threshold=2.5` is a spike and
  is cut to `mean + z_threshold**2 * std / z` (`clip_option=
  "adaptive_scaling"`: the larger the spike, the harder the cut);
* **`max_norm=1.0` stays a hard ceiling** on every step, spike or not.

So `nox.zclip()` is never looser than `clip_by_global_norm(1.0)`; the
z-score rule cuts some spikes further. To see that rule on its own, the
last run here is `nox.zclip(max_norm=None)`, without the ceiling: its
threshold comes from the history of norms alone, so it grows when the norm
grows steadily.

The table counts the steps each one clipped; the line under it, the steps
where the z-score rule cut below the ceiling. The plot shows the norm
before (faint) and after (bold) clipping and the factor applied at every
step.""",
    ),
    (
        "code",
        """\
compared = ["none", "clip_by_global_norm", "autoclip", "zclip"]
no_ceiling = {"zclip, max_norm=None": nox.zclip(max_norm=None)}
subset = [r for r in results if r.name in compared]
subset += exploding.run_all(config, seed=0, names=[], extra=no_ceiling)
display(Markdown(exploding.clip_table(subset)))
for r, ceiling in ((subset[3], 1.0), (subset[4], np.inf)):
    seen = np.isfinite(r.grad_norm)
    cut = r.clipped_norm[seen] < 0.999 * np.minimum(r.grad_norm[seen], ceiling)
    print(f"{r.name}: the z-score rule cut {cut.sum()} of {seen.sum()} steps")
display(exploding.plot_clip_factors(subset[1:]))""",
    ),
    (
        "markdown",
        """\
## Across seeds

One seed can be lucky. The same comparison over a few seeds (new weights and
new batches for each seed; the final loss is NaN for a run that blew up):""",
    ),
    (
        "code",
        """\
seeds = [0] if SMALL else [0, 1, 2, 3]
names = compared + list(no_ceiling)
lines = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
for seed in seeds:
    runs = exploding.run_all(config, seed, names=compared, extra=no_ceiling)
    losses = " | ".join(f"{r.final_loss:.4g}" for r in runs)
    lines.append(f"| {seed} | {losses} |")
display(Markdown("**Final loss per seed**\\n\\n" + "\\n".join(lines)))""",
    ),
    (
        "markdown",
        """\
## What to look for

* **No clipping**: the gradient norm jumps by orders of magnitude within a
  few steps and the loss becomes non-finite; momentum carries the blow-up.
* **`clip_by_global_norm`** bounds every step while keeping the gradient's
  direction, so training goes on through the same cliffs.
* **`clip_by_value`** and **`clip_by_norm`** (per element, per leaf) also
  keep the run finite, but they change the update's direction.
* **`normalize_by_global_norm`** makes every step the same length: no
  blow-up, but also no small steps near a minimum.
* **`autoclip`** picks its threshold from the history of norms.
* **`zclip`** with its authors' defaults trains through the cliffs like
  `clip_by_global_norm(1.0)`: its ceiling `max_norm=1.0` is that same fixed
  threshold, and on top of it the z-score rule cuts the few spikes that
  stand out from the recent norms. **Without the ceiling**
  (`max_norm=None`) the z-score rule does all the work and cuts far more
  steps, yet its threshold follows the norm as it grows: the run stays
  finite but can end far above the 1/6 of predicting the mean. Compare, in
  the per-seed table, how far each run gets on each seed.

To log the pre-clip norm in your own loop, wrap the clip in
`nox.record_norms` and read `optax.tree.get(opt_state, "input_norm")`.""",
    ),
]


CONSTRAINTS = [
    (
        "markdown",
        f"""\
# Regularisation and weight constraints

{badge("03_weight_constraints.ipynb")}

Part 2 of `python -m norm_optax.demo`: a small CNN (Flax NNX) on
scikit-learn's 8x8 digits, trained with Adam and one regulariser or
constraint at a time. The training code is imported from
`norm_optax.demo.constraints`. The chains:

* **plain**: `optax.adam(lr)`
* **add_l2_decay**, coupled L2 (the decay goes through Adam):
  `optax.chain(nox.add_l2_decay(wd, mask=m), optax.adam(lr))`
* **decoupled_decay**, AdamW-style (after Adam's scaling, before the lr):
  `optax.chain(optax.scale_by_adam(), nox.add_l2_decay(wd, mask=m),
  optax.scale(-lr))`
* **prox_l1**, last in the chain (exact zeros):
  `optax.chain(optax.adam(lr), nox.prox_l1(coeff, lr, mask=m))`
* **prox_group_l1**, group lasso, last (whole units exactly zero):
  `optax.chain(optax.adam(lr), nox.prox_group_l1(coeff, lr, mask=convs))`
* **max_norm**: `optax.chain(optax.adam(lr), nox.max_norm(c, mask=m))`
* **unit_norm**: `optax.chain(optax.adam(lr), nox.unit_norm(mask=m))`
* **clip_weights**: `optax.chain(optax.adam(lr), nox.clip_weights(v))`
* **clip_spectral_norm**, last (each kernel's largest singular value
  `<= bound`): `optax.chain(optax.adam(lr), nox.clip_spectral_norm(bound))`

The mask `m = nox.masks.matrices_only` leaves the biases alone; the group
lasso prunes the conv channels only (`convs =
nox.masks.by_path(r"^conv\\d+/kernel")`), not the classes of the head.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import dataclasses
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Markdown, display

import norm_optax as nox
from norm_optax.demo import constraints

"""
        + SMALL
        + """
config = constraints.CNNConfig()
if SMALL:  # a stronger group penalty, so that units reach zero in 40 steps
    config = dataclasses.replace(config, steps=40, eval_every=20, group_l1=8.0)
config""",
    ),
    (
        "markdown",
        "The masks: which parameters the decay, the per-unit constraints and "
        "the group lasso touch.",
    ),
    (
        "code",
        """\
model = constraints.CNN(nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
masks = {
    "matrices_only": nox.masks.matrices_only(params),
    "convs": nox.masks.by_path(constraints.CONV_KERNELS)(params),
}
print(f"{'':14s} {'shape':14s} matrices_only convs")
flat = {name: jax.tree_util.tree_flatten_with_path(m)[0] for name, m in masks.items()}
shapes = jax.tree.leaves(jax.tree.map(lambda x: str(x.shape), params))
for (path, m), (_, c), shape in zip(*flat.values(), shapes, strict=True):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    print(f"{name.removesuffix('/value'):14s} {shape:14s} {m!s:13s} {c}")""",
    ),
    (
        "code",
        """\
results = constraints.run_all(config, seed=0)
display(Markdown(constraints.format_table(results)))
for line in constraints.checks(results, config):
    print(line)""",
    ),
    ("code", "display(constraints.plot(results))"),
    (
        "markdown",
        """\
## Where the zeros are

`prox_l1` soft-thresholds every weight after each step, so weights that the
loss does not need become exactly `0.0`, scattered over the kernel.
`prox_group_l1` shrinks each *unit* (all the weights of one output channel)
by its L2 norm, so a channel the loss does not need becomes zero as a
whole: structured sparsity, a channel that can be pruned from the layer.
Black pixels below are exact zeros: the dense head (128 inputs x 10
classes) and the second conv layer (one row per output channel).""",
    ),
    (
        "code",
        """\
by_name = {r.name: r for r in results}
l1, group = by_name["prox_l1"].kernels, by_name["prox_group_l1"].kernels
panels = [
    ("prox_l1: head", l1["head/kernel"]),
    ("prox_l1: conv2", l1["conv2/kernel"]),
    ("prox_group_l1: conv2", group["conv2/kernel"]),
]
with plt.rc_context({"font.size": 11, "figure.dpi": 130}):
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), layout="constrained")
    for ax, (title, kernel) in zip(axes, panels, strict=True):
        units = kernel.reshape(-1, kernel.shape[-1]).T  # one row per output unit
        dead = int(np.sum(np.all(units == 0, axis=1)))
        ax.imshow(units != 0, cmap="gray", aspect="auto", interpolation="nearest")
        ax.set_title(
            f"{title}: {np.mean(kernel == 0):.0%} of the weights zero, "
            f"{dead} of {len(units)} units zero",
            loc="left",
        )
        ax.set(xlabel="inputs of a unit", ylabel="unit")
    plt.show()
for name, (zeros, total) in by_name["prox_group_l1"].zero_units.items():
    print(f"prox_group_l1 {name:13s} {zeros:3d} of {total} units exactly zero")""",
    ),
    (
        "markdown",
        """\
## The spectral norm of each layer

`clip_spectral_norm(bound)` rescales each kernel, seen as a `(fan-in,
units)` matrix, so that its largest singular value stays at or below the
bound: a Lipschitz constraint on each layer's linear map (for a conv layer,
on the reshaped kernel, as spectral normalisation does it). It estimates
the singular value by one step of power iteration per update, warm-started
from its state, so the check below recomputes it exactly, with
`numpy.linalg.svd`, on the trained weights.""",
    ),
    (
        "code",
        """\
layers = list(by_name["plain"].sigmas)
lines = [
    "| run | " + " | ".join(layers) + " |",
    "|---" + "|---:" * len(layers) + "|",
]
for r in by_name.values():  # one row per run: clip_spectral_norm is in view
    sigmas = " | ".join(f"{r.sigmas[layer]:.4g}" for layer in layers)
    name = f"**{r.name}**" if r.name == "clip_spectral_norm" else r.name
    lines.append(f"| {name} | {sigmas} |")
title = f"**Largest singular value per layer (bound {config.spectral_norm:g})**"
display(Markdown(title + "\\n\\n" + "\\n".join(lines)))""",
    ),
    (
        "markdown",
        """\
## What to look for

* **`prox_l1`** gives exactly-zero weights: the proximal step sets them to
  `0.0`; adding an L1 penalty to the loss would only make them small.
* **`prox_group_l1`** gives exactly-zero *units*: whole conv channels,
  many more than the scattered zeros of `prox_l1` add up to, even where
  `prox_l1` zeroes more weights in all.
* **`max_norm`** caps every unit's norm at its bound (units below it are
  untouched); **`unit_norm`** puts every unit on the unit sphere.
* **`clip_spectral_norm`** caps each layer's largest singular value, a
  bound on how much the layer can stretch its input, and leaves the
  individual unit norms free below it.
* **Coupled vs decoupled decay**: coupled L2 goes through Adam's
  normalisation, so the same coefficient acts very differently from the
  decoupled (AdamW-style) one placed after `scale_by_adam`.
* **`clip_weights`** bounds each weight, which restricts the model more
  bluntly than the norm constraints.

Every number in the tables comes from the trained weights: exact zeros
counted with `== 0`, `nox.unit_norms` per kernel, `numpy.linalg.svd` for
the singular values, `nox.global_norm` over all parameters.""",
    ),
]

LARGE_MODELS = [
    (
        "markdown",
        f"""\
# Stacked layers: norms and constraints that follow the layers

{badge("04_large_models.ipynb")}

Large models stack their layers: `nnx.vmap` / `nnx.scan` (Linen `nn.scan`,
or `jax.lax.scan` over a leading axis) turn `L` copies of a block into one
block whose kernel is `(L, in, out)` and whose bias and LayerNorm scale are
`(L, out)`. A transform that does not know about the leading axis takes it
for part of the weight, silently. This notebook shows, with numbers, what
goes wrong then, and the fix: `stack_axes=`, on the norms, the per-unit
transforms and `nox.masks.matrices_only`. It runs on CPU, GPU or TPU: it
uses whatever `jax.devices()` returns.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display

import norm_optax as nox

"""
        + SMALL,
    ),
    (
        "markdown",
        """\
## A stacked block

A pre-LayerNorm residual MLP block (`dim -> hidden -> dim`), `LAYERS`
copies of it created at once by `nnx.vmap` over split `Rngs`, applied one
after the other by `nnx.scan`. Every parameter gets a leading layer axis.""",
    ),
    (
        "code",
        """\
DIM, HIDDEN, LAYERS = 16, 32, 4


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(rngs)

        self.layers = make_blocks(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def apply_block(x, block):
            return block(x)

        return apply_block(x, self.layers)


def named(tree):
    \"\"\"``{"layers/up/kernel": leaf, ...}`` for a params tree.\"\"\"
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        out[name.removesuffix("/value")] = leaf
    return out


model = Stack(nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
for name, leaf in named(params).items():
    print(f"{name:20s} {leaf.shape}")""",
    ),
    (
        "markdown",
        """\
## The pitfall: the layer axis taken for part of the weight

**1. `matrices_only` marks stacked biases and scales as matrices.** It
counts `ndim >= 2`, and a stacked bias `(L, out)` has two axes. With the
usual "no weight decay on biases and norm scales" mask, `adamw` decays them
anyway. Below: one `adamw` step with zero gradients, so the only thing that
moves a parameter is the decay (the biases start at zero, so only the
LayerNorm scales show it).""",
    ),
    (
        "code",
        """\
plain_mask = nox.masks.matrices_only(params)
stacked_mask = nox.masks.matrices_only(params, stack_axes=1)
print(f"{'':20s} {'matrices_only':>14s} {'stack_axes=1':>13s}")
for name, a in named(plain_mask).items():
    print(f"{name:20s} {a!s:>14s} {named(stacked_mask)[name]!s:>13s}")

zero_grads = jax.tree.map(jnp.zeros_like, params)
for label, mask in (
    ("matrices_only", nox.masks.matrices_only),
    ("matrices_only(stack_axes=1)", nox.masks.matrices_only(stack_axes=1)),
):
    tx = optax.adamw(1e-3, weight_decay=0.1, mask=mask)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    change = named(updates)["layers/norm/scale"]
    print(
        f"adamw(mask={label}): LayerNorm scales move by "
        f"{float(jnp.max(jnp.abs(change))):.1e} per step"
    )""",
    ),
    (
        "markdown",
        """\
**2. `unit_norms` of an `(L, in, out)` kernel mixes the layers.** The Flax
convention reduces over every axis but the last, the layer axis included:
one norm per output unit *across all layers*, shape `(1, 1, out)` instead
of one per unit and layer, `(L, 1, out)`.""",
    ),
    (
        "code",
        """\
kernel = params["layers"]["up"]["kernel"][...]
mixed = nox.unit_norms(kernel)
per_layer = nox.unit_norms(kernel, stack_axes=1)
print("kernel", kernel.shape, "-> unit_norms", mixed.shape)
print("kernel", kernel.shape, "-> unit_norms(stack_axes=1)", per_layer.shape)
print("unit 0, layer by layer:", np.round(np.asarray(per_layer[:, 0, 0]), 4))
print(f"unit 0, mixed over the layers: {float(mixed[0, 0, 0]):.4f}")
root = float(jnp.sqrt(jnp.sum(per_layer[:, 0, 0] ** 2)))
print(f"(the root of the sum of squares of the {LAYERS} above: {root:.4f})")""",
    ),
    (
        "markdown",
        """\
**3. So `max_norm` constrains the wrong units.** Without `stack_axes`, a
unit is the same output feature in all `L` layers together: where their
joint norm exceeds the bound, all of them shrink, also in a layer whose own
unit was well inside it. Below, the layers of the kernel are given
different sizes, then projected with `max_norm(1.0)`, without and with
`stack_axes=1`: the largest unit norm and the number of units changed, per
layer.""",
    ),
    (
        "code",
        """\
sizes = jnp.linspace(0.4, 2.0, LAYERS)[:, None, None]
tree = {"kernel": kernel * sizes}
no_step = {"kernel": jnp.zeros_like(tree["kernel"])}
before = nox.unit_norms(tree["kernel"], stack_axes=1)
lines = [
    "| layer | max unit norm | `max_norm(1.0)`: max, units changed | "
    "`max_norm(1.0, stack_axes=1)`: max, units changed |",
    "|---:|---:|---:|---:|",
]
after = {}
for label, tx in (
    ("plain", nox.max_norm(1.0)),
    ("stacked", nox.max_norm(1.0, stack_axes=1)),
):
    updates, _ = tx.update(no_step, tx.init(tree), tree)
    new = optax.apply_updates(tree, updates)["kernel"]
    norms = nox.unit_norms(new, stack_axes=1)
    changed = jnp.sum(jnp.abs(norms - before) > 1e-6, axis=(1, 2))
    after[label] = (jnp.max(norms, axis=(1, 2)), changed)
for layer in range(LAYERS):
    cells = [f"{float(jnp.max(before[layer])):.3f}"]
    for top, changed in after.values():
        cells.append(f"{float(top[layer]):.3f}, {int(changed[layer])} of {HIDDEN}")
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
display(Markdown("\\n".join(lines)))""",
    ),
    (
        "markdown",
        """\
## The fix: `stack_axes`

`stack_axes=s` says that the first `s` axes of a leaf index independent
layers; every per-leaf or per-unit quantity is then computed per layer:
`unit_norms` gives `(L, 1, out)`, `leaf_norms` one norm per layer `(L,)`,
`matrices_only` counts `ndim - s`, and `max_norm`, `unit_norm`,
`min_max_norm`, `clip_by_norm`, `adaptive_clip`, `prox_group_l1` and
`clip_spectral_norm` constrain each layer's units on their own.

`stack_axes=1` fits a tree in which *every* leaf is stacked. A real model
mixes stacked and unstacked leaves (embeddings, a head), and `stack_axes=1`
on an unstacked `(in, out)` head would take its rows for layers. There,
give a tree of ints or bools (`True` = 1) matching the params, or a
callable that builds one, such as `nox.masks.by_path("^trunk/")`; a
stacked model built with partition names (`nnx.PARTITION_NAME`) can have
it read by `nox.masks.stack_axes_from_partitions`. The same model with an
unstacked head:""",
    ),
    (
        "code",
        """\
class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.trunk = Stack(rngs)
        self.head = nnx.Linear(DIM, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.trunk(x))


mixed_params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
stack = nox.masks.by_path("^trunk/")  # True (one stack axis) under trunk/
stacks = named(stack(mixed_params))
decay = named(nox.masks.matrices_only(mixed_params, stack_axes=stack))
layer_norms = named(nox.leaf_norms(mixed_params, stack_axes=stack))
print(f"{'':26s} {'shape':12s} stacked decay  leaf_norms  unit_norms")
for name, leaf in named(mixed_params).items():
    units = nox.unit_norms(leaf, stack_axes=int(stacks[name]))
    print(
        f"{name:26s} {leaf.shape!s:12s} {stacks[name]!s:7s} "
        f"{decay[name]!s:6s} {layer_norms[name].shape!s:11s} {units.shape}"
    )
head = mixed_params["head"]["kernel"][...]
wrong = nox.unit_norms(head, stack_axes=1).shape
print(f"stack_axes=1 on the head kernel {head.shape}: unit_norms {wrong}, wrong")""",
    ),
    (
        "markdown",
        """\
## Training with per-layer constraints and per-layer gradient norms

A student stack learns to copy a teacher stack (same architecture, other
weights) on Gaussian inputs. The chain decays only the stacked kernels and
keeps every unit of every layer within norm 1:

```python
mask = nox.masks.matrices_only(stack_axes=1)
optax.chain(optax.adamw(1e-3, mask=mask), nox.max_norm(1.0, stack_axes=1, mask=mask))
```

(`max_norm` takes the same mask, so the LayerNorm scales, `1.0` each at the
start, are not projected.) The training step also returns
`nox.leaf_norms(grads, stack_axes=1)`: the gradient norm of every
parameter *per layer*, what to log to see which layer a spike comes from.
For comparison, the same training without `stack_axes`, the pitfall above:
`matrices_only` decays the scales and biases, `max_norm` bounds units
across layers.""",
    ),
    (
        "code",
        """\
steps = 30 if SMALL else 2000
x = jax.random.normal(jax.random.key(1), (1024, DIM))
y = Stack(nnx.Rngs(1))(x)  # the teacher


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, nox.leaf_norms(grads, stack_axes=1)


stacked = nox.masks.matrices_only(stack_axes=1)
chains = {
    "stack_axes=1": optax.chain(
        optax.adamw(1e-3, mask=stacked),
        nox.max_norm(1.0, stack_axes=1, mask=stacked),
    ),
    "no stack_axes": optax.chain(
        optax.adamw(1e-3, mask=nox.masks.matrices_only),
        nox.max_norm(1.0, mask=nox.masks.matrices_only),
    ),
}
runs = {}
for label, tx in chains.items():
    student = Stack(nnx.Rngs(0))
    optimizer = nnx.Optimizer(student, tx, wrt=nnx.Param)
    losses, grad_norms = [], []
    for _ in range(steps):
        loss, norms = train_step(student, optimizer, x, y)
        losses.append(float(loss))
        grad_norms.append({k: np.asarray(v) for k, v in named(norms).items()})
    runs[label] = (student, np.array(losses), grad_norms)
    print(f"{label}: loss {losses[0]:.4f} at step 1, {losses[-1]:.4f} at {steps}")""",
    ),
    (
        "code",
        """\
losses, grad_norms = runs["stack_axes=1"][1:]
up = np.stack([g["layers/up/kernel"] for g in grad_norms])  # (steps, LAYERS)
fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
for label, (_, run_losses, _) in runs.items():
    ax_loss.plot(run_losses, label=label)
ax_loss.set(yscale="log", xlabel="step", title="training loss")
ax_loss.legend()
for layer in range(LAYERS):
    ax_norm.plot(up[:, layer], label=f"layer {layer}")
ax_norm.set(
    yscale="log", xlabel="step", title="gradient norm of layers/up/kernel, per layer"
)
ax_norm.legend()
plt.show()

lines = ["| parameter | " + " | ".join(f"layer {i}" for i in range(LAYERS)) + " |"]
lines.append("|---" + "|---:" * LAYERS + "|")
for name in grad_norms[0]:
    first, last = grad_norms[0][name], grad_norms[-1][name]
    cells = " | ".join(f"{a:.3g} -> {b:.3g}" for a, b in zip(first, last, strict=True))
    lines.append(f"| {name} | {cells} |")
title = f"**Gradient norm per layer, step 1 -> step {steps}**"
display(Markdown(title + "\\n\\n" + "\\n".join(lines)))""",
    ),
    (
        "markdown",
        """\
## The check: every unit of every layer within its bound

The largest unit norm of each kernel, layer by layer, computed from the
trained weights with `nox.unit_norms(kernel, stack_axes=1)`. With
`stack_axes=1` every layer may use the whole bound; without it, the layers
share it.""",
    ),
    (
        "code",
        """\
kernels = ["layers/up/kernel", "layers/down/kernel"]
lines = ["| run | kernel | " + " | ".join(f"layer {i}" for i in range(LAYERS)) + " |"]
lines.append("|---|---" + "|---:" * LAYERS + "|")
largest = {}
for label, (student, _, _) in runs.items():
    trained = named(nnx.state(student, nnx.Param))
    for name in kernels:
        top = np.max(np.asarray(nox.unit_norms(trained[name], stack_axes=1)), (1, 2))
        largest[label, name] = top
        cells = " | ".join(f"{t:.4f}" for t in top)
        lines.append(f"| {label} | {name} | {cells} |")
display(Markdown("\\n".join(lines)))

worst = max(float(np.max(largest["stack_axes=1", name])) for name in kernels)
ok = worst <= 1.0 * (1 + 1e-6)
print(
    f"check max_norm(1.0, stack_axes=1): largest per-layer unit norm {worst:.7g} "
    f"<= 1 -> {'OK' if ok else 'FAILED'}"
)""",
    ),
    (
        "markdown",
        """\
## Per-layer norms in the optimizer state: `record_layer_norms`

Returning `leaf_norms(grads)` from the step works, but every training loop
has to do it by hand. `nox.record_layer_norms(inner, stack_axes=...)` wraps
the optimizer and keeps, in its state, the norm of every layer of the
gradient (`input_norms`), of the step taken (`output_norms`), of the
weights (`param_norms`) and their ratio (`update_ratios`), with the same
`stack_axes`. The updates are `inner`'s, bit for bit. Below, the
`stack_axes=1` chain above, wrapped, at a learning rate 30 times larger;
`nox.layer_norms_dict` flattens a field for a logger, and
`norm_optax.plotting.layer_norms_heatmap` draws the history, one row per
layer, one column per step.""",
    ),
    (
        "code",
        """\
from norm_optax.plotting import layer_norms_heatmap

tele_steps = 30 if SMALL else 300
tx = nox.record_layer_norms(
    optax.chain(
        optax.adamw(3e-2, mask=stacked), nox.max_norm(1.0, stack_axes=1, mask=stacked)
    ),
    stack_axes=1,
)
student = Stack(nnx.Rngs(0))
optimizer = nnx.Optimizer(student, tx, wrt=nnx.Param)
history = []
for _ in range(tele_steps):
    train_step(student, optimizer, x, y)
    state = optimizer.opt_state
    history.append(
        {
            "grad": named(optax.tree.get(state, "input_norms")),
            "ratio": named(optax.tree.get(state, "update_ratios")),
        }
    )
print(nox.layer_norms_dict(optax.tree.get(state, "input_norms"), prefix="grad/"))
history = jax.tree.map(lambda *xs: np.stack(xs), *history)  # leaves: (steps, LAYERS)

fig, (ax_grad, ax_ratio) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
layer_norms_heatmap(history["grad"], ax=ax_grad, title="gradient norm per layer")
layer_norms_heatmap(
    history["ratio"],
    ax=ax_ratio,
    title="update-to-weight ratio per layer",
    label="||update|| / ||weights||",
)
plt.show()""",
    ),
]

GEOMETRY = [
    (
        "markdown",
        f"""\
# Norm geometry: AdamW, Muon and Scion

{badge("05_norm_geometry.ipynb")}

Steepest descent under a per-layer norm moves each layer along the linear
minimisation oracle of its norm ball: the polar factor $U V^\\top$ of the
momentum for a weight matrix under the spectral norm (Muon), the same with
a radius and an optional Frank-Wolfe step that keeps the weights inside the
ball (Scion). This notebook trains the same small MLP on the 8x8 digits with
AdamW, `nox.muon` and `nox.scion` (unconstrained and constrained), plots the
loss and the spectral norm of every layer over training, and checks on the
run what each promises.""",
    ),
    ("code", INSTALL),
    (
        "code",
        """\
import dataclasses
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import norm_optax as nox
from norm_optax.demo import geometry

"""
        + SMALL
        + """
config = geometry.GeometryConfig()
if SMALL:
    config = dataclasses.replace(config, steps=20, eval_every=10)
config""",
    ),
    (
        "markdown",
        """\
## Which leaves are matrices

Muon orthogonalises matrices and hands the other leaves to AdamW. On a
stacked model (layers scanned with `nnx.scan` or `nn.scan`) a kernel is
`(L, in, out)` and a bias `(L, out)`. `optax.contrib.muon` decides by
`ndim == 2`, which is backwards there; `nox.muon(stack_axes=1)` counts the
axes after the stack axis.""",
    ),
    (
        "code",
        """\
stacked = {
    "kernel": jnp.ones((4, 32, 32)),
    "bias": jnp.ones((4, 32)),
    "scale": jnp.ones((4, 32)),
}
optax_rule = jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", stacked)
ours = jax.tree.map(
    lambda m: "muon" if m else "adam",
    nox.masks.matrices_only(stacked, stack_axes=1),
)
for name in stacked:
    print(
        f"{name:6s} {stacked[name].shape!s:13s} optax.contrib.muon: "
        f"{optax_rule[name]:4s}  nox.muon(stack_axes=1): {ours[name]}"
    )""",
    ),
    (
        "code",
        """\
results = geometry.run_all(config, seed=0)
display(Markdown(geometry.format_table(results)))
for line in geometry.checks(results, config):
    print(line)""",
    ),
    ("code", "display(geometry.plot(results))"),
    (
        "markdown",
        """\
## What each promises, from the run

Muon's update for a kernel is `-lr * k * polar(g + mu * m)`. Five
Newton-Schulz steps with the standard coefficients give singular values in
`[0.68, 1.21]` on the directions whose input singular value is at least 5%
of the largest (not exactly 1: the iteration trades accuracy for speed).
Constrained Scion's step `p <- (1 - lr) p - lr * radius * k * d(m)` is a
convex combination of the weights and a point of the radius-ball, so
weights that start in the ball stay there: the largest singular value of
each kernel is at most `radius * k` with `k = sqrt(fan_out / fan_in)`.""",
    ),
    (
        "code",
        """\
by_name = {r.name: r for r in results}
low, high = by_name["muon"].update_range
print(f"muon: update singular values / (lr k) over the run in [{low:.4f}, {high:.4f}]")
ratios = geometry.constrained_ratios(
    by_name["scion_constrained"], config.constrained_radius
)
lines = ["| layer | sigma_max / (radius k) | rms(bias) / radius |", "|---|---:|---:|"]
for layer, (sigma, rms) in ratios.items():
    lines.append(f"| {layer} | {sigma:.5f} | {rms:.5f} |")
title = "**Constrained Scion: inside its ball**"
display(Markdown(title + "\\n\\n" + "\\n".join(lines)))""",
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_exploding_gradients.ipynb": EXPLODING,
    "03_weight_constraints.ipynb": CONSTRAINTS,
    "04_large_models.ipynb": LARGE_MODELS,
    "05_norm_geometry.ipynb": GEOMETRY,
}


def cells(name: str) -> list[tuple[str, str]]:
    """The ``(cell_type, source)`` pairs of notebook ``name``, in order."""
    return list(NOTEBOOKS[name])


def build_notebook(name: str) -> nbformat.NotebookNode:
    """Notebook ``name`` with its cells and metadata, not executed."""
    nb = nbformat.v4.new_notebook()
    for kind, source in cells(name):
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source))
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--execute", action="store_true", help="run and save outputs")
    parser.add_argument("names", nargs="*", help="notebooks to build (default: all)")
    args = parser.parse_args()
    for name in args.names or NOTEBOOKS:
        nb = build_notebook(name)
        if args.execute:
            os.environ.pop("NORM_OPTAX_SMALL", None)
            start = time.perf_counter()
            NotebookClient(
                nb,
                timeout=900,
                kernel_name="python3",
                resources={"metadata": {"path": str(HERE)}},
            ).execute()
            print(f"executed {name} in {time.perf_counter() - start:.0f} s")
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name} ({(HERE / name).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
