"""Writes the notebooks in this folder from the cell sources below.

    python notebooks/build.py            # write the three notebooks, no outputs
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


INSTALL = """\
# On Colab (or anywhere norm_optax is not installed yet): install it with the
# "examples" extra (flax, matplotlib, scikit-learn). Skipped when importable.
import importlib.util

if importlib.util.find_spec("norm_optax") is None:
    %pip install -q "norm-optax[examples] @ git+https://github.com/norm-optax/norm_optax\""""

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

fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
ax_loss.plot(log["loss"])
ax_loss.set(yscale="log", xlabel="step", title="training loss")
ax_norm.plot(log["input_norm"], label="input_norm (pre-clip)")
ax_norm.plot(log["output_norm"], label="output_norm (post-clip)")
ax_norm.set(yscale="log", xlabel="step", title="global gradient norm")
ax_norm.legend()
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
from IPython.display import Markdown, display

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
percentile of the norms seen so far; `zclip` clips a norm whose z-score
against an EMA of past norms exceeds a threshold. The adaptive ones need no
threshold to tune, but they only cut norms that are large *relative to the
history*: when the norm grows steadily, their threshold grows with it. The
table counts the steps each one clipped; the plot shows the norm before
(faint) and after (bold) clipping and the factor applied at every step.""",
    ),
    (
        "code",
        """\
compared = ["none", "clip_by_global_norm", "autoclip", "zclip"]
subset = [r for r in results if r.name in compared]
display(Markdown(exploding.clip_table(subset)))
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
lines = ["| seed | " + " | ".join(compared) + " |", "|---" * (len(compared) + 1) + "|"]
for seed in seeds:
    runs = exploding.run_all(config, seed, names=compared)
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
* **`autoclip`** and **`zclip`** pick the threshold from the history of
  norms. Compare, in the per-seed table, how often each one rescues a run
  that blows up without clipping.

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
* **max_norm**: `optax.chain(optax.adam(lr), nox.max_norm(c, mask=m))`
* **unit_norm**: `optax.chain(optax.adam(lr), nox.unit_norm(mask=m))`
* **clip_weights**: `optax.chain(optax.adam(lr), nox.clip_weights(v))`

The mask `m = nox.masks.matrices_only` leaves the biases alone.""",
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
if SMALL:
    config = dataclasses.replace(config, steps=40, eval_every=20)
config""",
    ),
    (
        "markdown",
        "The mask: which parameters the decay and the norm constraints touch.",
    ),
    (
        "code",
        """\
model = constraints.CNN(nnx.Rngs(0))
params = nnx.state(model, nnx.Param)
mask = nox.masks.matrices_only(params)
for path, keep in jax.tree_util.tree_flatten_with_path(mask)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    print(f"{name.removesuffix('/value'):14s} {keep}")""",
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
loss does not need become exactly `0.0`. Black pixels below are exact zeros
of the dense head (128 inputs x 10 classes) and of the second conv layer
(one row per output channel).""",
    ),
    (
        "code",
        """\
by_name = {r.name: r for r in results}
kernels = by_name["prox_l1"].kernels
head, conv2 = kernels["head/kernel"], kernels["conv2/kernel"]
fig, (ax_head, ax_conv) = plt.subplots(1, 2, figsize=(10, 3), layout="constrained")
ax_head.imshow(head.T != 0, cmap="gray", aspect="auto", interpolation="nearest")
ax_head.set(title=f"head: {np.mean(head == 0):.0%} zeros", xlabel="input")
conv2_units = conv2.reshape(-1, conv2.shape[-1]).T  # one row per output channel
ax_conv.imshow(conv2_units != 0, cmap="gray", aspect="auto", interpolation="nearest")
ax_conv.set(title=f"conv2: {np.mean(conv2 == 0):.0%} zeros", xlabel="3x3x16 inputs")
plt.show()""",
    ),
    (
        "markdown",
        """\
## What to look for

* **`prox_l1`** is the only run with exactly-zero weights: the proximal step
  sets them to `0.0`; adding an L1 penalty to the loss would only make them
  small.
* **`max_norm`** caps every unit's norm at its bound (units below it are
  untouched); **`unit_norm`** puts every unit on the unit sphere.
* **Coupled vs decoupled decay**: coupled L2 goes through Adam's
  normalisation, so the same coefficient acts very differently from the
  decoupled (AdamW-style) one placed after `scale_by_adam`.
* **`clip_weights`** bounds each weight, which restricts the model more
  bluntly than the norm constraints.

Every number in the table comes from the trained weights:
`nox.unit_norms` per kernel, `nox.global_norm` over all parameters.""",
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_exploding_gradients.ipynb": EXPLODING,
    "03_weight_constraints.ipynb": CONSTRAINTS,
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
