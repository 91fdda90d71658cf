"""Block x step heatmaps on a log colour scale, as the gradient heatmap (``gradients``) and the
divergence timeline (``forensics``) draw them: the colour scale, a panel's mesh, the colour bar
and the key of exact zeros. Input at the top, the head last; zeros, which a log scale has no
place for, in the colour map's "under" colour; values not recorded or not finite left on the
grey face of the panel."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.collections import QuadMesh
from matplotlib.colors import Colormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from reports.figures.style import (
    GRADIENT_CMAP,
    MISSING_COLOUR,
    ZERO_COLOUR,
    fmt_tick,
    log_ticks,
)
from sigprop.errors import UserError


def log_scale(values: pd.Series, stat: str) -> tuple[LogNorm, Colormap]:
    """The colour scale of ``values`` (of the statistic ``stat``): a log norm over the positive
    finite ones, and the colour map with exact zeros as its "under" colour."""
    values = pd.to_numeric(values, errors="coerce")
    positive = values[(values > 0) & np.isfinite(values)]
    if positive.empty:
        raise UserError(f"no positive finite {stat!r} values to draw on a log scale")
    norm = LogNorm(positive.min(), max(positive.max(), positive.min() * 1.01))
    # zeros (e.g. every gradient behind a zero-initialised classifier at step 0) have no place
    # on a log scale: they get the "under" colour, distinct from steps never recorded
    return norm, matplotlib.colormaps[GRADIENT_CMAP].with_extremes(under=ZERO_COLOUR)


def draw_blocks(ax: Any, table: pd.DataFrame, x_edges: np.ndarray, norm: LogNorm,
                cmap: Colormap, labels: list[str]) -> QuadMesh:
    """One panel: ``table`` (a row per block in order, a column per step) as a mesh between
    ``x_edges``, the blocks named by ``labels`` down the left, the input at the top."""
    values = table.to_numpy(dtype=float)
    values = np.where(values <= 0, norm.vmin / 10, values)
    mesh = ax.pcolormesh(x_edges, np.arange(len(table) + 1) - 0.5, np.ma.masked_invalid(values),
                         norm=norm, cmap=cmap, shading="flat")
    ax.set_facecolor(MISSING_COLOUR)  # steps a block was not recorded at, or not finite
    ax.grid(False)
    ax.set_yticks(range(len(table)), labels, fontsize=8 if len(table) > 12 else 9)
    ax.set_ylim(len(table) - 0.5, -0.5)
    return mesh


def log_colourbar(fig: Figure, axes: np.ndarray, mesh: QuadMesh, norm: LogNorm,
                  text: str) -> None:
    """The colour bar of every panel in ``axes``, labelled ``text``, with readable log ticks."""
    colourbar = fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.9)
    colourbar.set_label(text)
    ticks = log_ticks(norm.vmin, norm.vmax)
    colourbar.set_ticks(ticks, labels=[fmt_tick(t) for t in ticks])
    colourbar.ax.yaxis.set_minor_locator(NullLocator())


def zero_handle() -> Patch:
    return Patch(facecolor=ZERO_COLOUR, edgecolor="grey", label="exactly zero")
