"""Pictures of per-layer norm statistics (needs matplotlib, optional).

:func:`layer_norms_heatmap` draws a history of per-layer norms, such as the
``input_norms`` or ``update_ratios`` that :func:`norm_optax.record_layer_norms`
keeps, stacked over training steps: one row per layer, one column per step,
on a log colour scale, so that an exploding layer shows where and when it
starts. matplotlib is imported when the function is called (it is in the
``examples`` extra: ``pip install "norm-optax[examples]"``), never when
:mod:`norm_optax` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from norm_optax import _layout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

__all__ = ["layer_norms_heatmap", "layer_rows"]


def layer_rows(history: Any) -> tuple[list[str], np.ndarray]:
    """A history of per-layer norms as row names and a ``(layers, steps)`` array.

    ``history`` is a tree of arrays with a leading steps axis: each leaf is
    ``(steps,)`` for an unstacked leaf or ``(steps, *stack_shape)`` for a
    stacked one, as :func:`jax.lax.scan` stacks a state field step after
    step (or ``jax.tree.map(lambda *xs: np.stack(xs), *states)`` does on the
    host). Rows are named as :func:`norm_optax.layer_norms_dict` names its
    keys (``layers/kernel/3``), in the tree's leaf order; ``None`` leaves are
    left out.

    Example:
      >>> import numpy as np
      >>> from norm_optax.plotting import layer_rows
      >>> names, values = layer_rows({"head": np.ones(5), "layers": np.ones((5, 2))})
      >>> names, values.shape
      (['head', 'layers/0', 'layers/1'], (3, 5))
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(history))
    names: list[str] = []
    rows: list[np.ndarray] = []
    for path, leaf in flat:
        values = np.asarray(leaf, dtype=np.float64)
        if values.ndim == 0:
            raise ValueError(
                f"history needs a leading steps axis; the leaf at "
                f"{_layout.path_str(path) or '<root>'} is a scalar."
            )
        name = _layout.path_str(path)
        steps = values.shape[0]
        if values.ndim == 1:
            names.append(name)
            rows.append(values[None, :])
            continue
        for index in np.ndindex(values.shape[1:]):
            names.append(name + "".join(f"/{i}" for i in index))
        rows.append(values.reshape(steps, -1).T)
    if not rows:
        return [], np.zeros((0, 0))
    return names, np.concatenate(rows, axis=0)


def layer_norms_heatmap(
    history: Any,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    label: str = "L2 norm",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
) -> AxesImage:
    """Heatmap of per-layer norms over steps, log colour scale.

    One row per layer (named as :func:`layer_rows` names them), one column
    per step (numbered from 1). Values that are NaN or infinite are drawn in
    red and zeros (which a log scale cannot show) in white, so a non-finite
    layer stands out rather than disappearing.

    Args:
      history: a tree of arrays with a leading steps axis (see
        :func:`layer_rows`), e.g. the ``input_norms`` of every step of a
        ``jax.lax.scan`` training loop.
      ax: the matplotlib ``Axes`` to draw in (a new figure when ``None``).
      title: the axes title.
      label: the colour bar's label.
      vmin, vmax: the colour range (default: the finite positive values').
      cmap: a matplotlib colour map name.
      colorbar: whether to add a colour bar.

    Returns:
      The ``AxesImage`` drawn (``image.axes.figure`` is the figure).

    Raises:
      ImportError: matplotlib is not installed.
      ValueError: a leaf of ``history`` has no steps axis.

    Example:
      >>> import matplotlib
      >>> matplotlib.use("Agg")
      >>> import numpy as np
      >>> from norm_optax.plotting import layer_norms_heatmap
      >>> history = {"layers": np.logspace(0, 3, 40).reshape(10, 4)}  # 10 steps
      >>> image = layer_norms_heatmap(history, title="gradient norm")
      >>> image.get_array().shape
      (4, 10)
    """
    from matplotlib import colors
    from matplotlib.figure import Figure

    names, values = layer_rows(history)
    if ax is None:
        height = 1.5 + 0.18 * max(len(names), 4)
        ax = Figure(figsize=(7, height), layout="constrained").subplots()
    positive = values[np.isfinite(values) & (values > 0)]
    low = vmin if vmin is not None else (positive.min() if positive.size else 1e-8)
    high = vmax if vmax is not None else (positive.max() if positive.size else 1.0)
    high = max(high, low * 10)
    # NaN and inf (masked below) in red; zeros and anything below vmin white.
    palette = _colormap(cmap).with_extremes(bad="red", under="white")
    # (values above vmax take the top colour)
    shown = np.ma.masked_invalid(np.where(values == 0, low / 10, values))
    image = ax.imshow(
        shown,
        aspect="auto",
        interpolation="nearest",
        cmap=palette,
        norm=colors.LogNorm(vmin=low, vmax=high),
        extent=(0.5, values.shape[1] + 0.5, len(names) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    if title is not None:
        ax.set_title(title)
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, extend="both")
        bar.set_label(label + " (red: NaN/inf)")
    return image


def _colormap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]
