"""Gradient propagation: block x step heatmap of gradient norms, one panel per run."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from reports.figures.frames import block_rows, run_title, selected_runs, with_derived
from reports.figures.style import (
    DIVERGED_LINE,
    GRADIENT_CMAP,
    MISSING_COLOUR,
    ZERO_COLOUR,
    gids_of,
    is_number,
    label,
    new_figure,
    panel_width,
    styled,
)
from sigprop.errors import UserError


def step_edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


@styled
def plot_gradient_heatmap(
    blocks: pd.DataFrame,
    runs: pd.DataFrame,
    run_ids: Sequence[str] | None = None,
    col: str | None = None,
    stat: str = "grad_norm",
    max_panels: int = 4,
) -> Figure:
    """Block (rows, input at the top) x recorded step (columns) of ``stat`` on a log colour
    scale, one panel per run: ``run_ids``, or one per value of ``col`` (default: clipping) at
    the largest batch size. A diverged run's divergence step is a dashed line."""
    rows = block_rows(blocks, stat)
    if rows.empty:
        raise UserError(f"the blocks frame has no {stat!r} rows")
    chosen = selected_runs(rows, runs, run_ids, col, max_panels)
    positive = rows.loc[rows["run_id"].isin(chosen) & (rows["value"] > 0), "value"]
    positive = positive[np.isfinite(positive)]
    if positive.empty:
        raise UserError(f"no positive finite {stat!r} values to draw on a log scale")
    norm = LogNorm(positive.min(), max(positive.max(), positive.min() * 1.01))
    # zeros (e.g. every gradient behind a zero-initialised classifier at step 0) have no place
    # on a log scale: they get the "under" colour, distinct from steps never recorded
    cmap = matplotlib.colormaps[GRADIENT_CMAP].with_extremes(under=ZERO_COLOUR)
    frame = with_derived(runs)
    has_zero = has_missing = False

    n_blocks = rows["block"].nunique()
    fig, axes = new_figure(1, len(chosen), panel_width(len(chosen), 3.6, 1.6),
                           max(3.6, 0.24 * n_blocks + 1.9))
    mesh = None
    previous_blocks = None
    for ax, run_id in zip(axes[0], chosen):
        part = rows[rows["run_id"] == run_id]
        table = part.pivot_table(index=["index", "block"], columns="step", values="value",
                                 aggfunc="mean").sort_index(level="index")
        steps = table.columns.to_numpy(dtype=float)
        values = table.to_numpy(dtype=float)
        zero = values <= 0
        has_zero |= bool(zero.any())
        has_missing |= bool(np.isnan(values).any())
        values = np.where(zero, norm.vmin / 10, values)
        mesh = ax.pcolormesh(step_edges(steps), np.arange(len(table) + 1) - 0.5,
                             np.ma.masked_invalid(values), norm=norm, cmap=cmap, shading="flat")
        ax.set_facecolor(MISSING_COLOUR)  # steps a block was not recorded at
        ax.grid(False)
        names = [str(b) for b in table.index.get_level_values("block")]
        # repeated block names on every panel are noise; different models keep their own
        ax.set_yticks(range(len(table)), names if names != previous_blocks else [],
                      fontsize=8 if len(table) > 12 else 9)
        previous_blocks = names
        ax.set_ylim(len(table) - 0.5, -0.5)
        if len(steps) <= 8:
            ax.set_xticks(steps, [f"{s:g}" for s in steps])
        ax.set_xlabel(label("step"))
        ax.set_title(run_title(frame, run_id), fontsize=10.5)
        info = frame.loc[frame["run_id"] == run_id]
        if len(info) and info.iloc[0]["status"] == "diverged" and is_number(
                info.iloc[0].get("diverged_step")):
            ax.axvline(info.iloc[0]["diverged_step"], color=DIVERGED_LINE, linestyle="--",
                       linewidth=2.5, gid="diverged")
    axes[0][0].set_ylabel("block (input → output)")
    colourbar = fig.colorbar(mesh, ax=list(axes[0]), shrink=0.9)
    colourbar.set_label(f"{label(stat)} (log scale)")
    keys = []
    if has_missing:
        keys.append(Patch(facecolor=MISSING_COLOUR, edgecolor="grey", label="not recorded"))
    if has_zero:
        keys.append(Patch(facecolor=ZERO_COLOUR, edgecolor="grey", label="exactly zero"))
    if gids_of(fig, "diverged"):
        keys.append(Line2D([], [], color=DIVERGED_LINE, linestyle="--", linewidth=2.5,
                           label="divergence step"))
    if keys:
        fig.legend(handles=keys, loc="outside lower center", ncols=len(keys), frameon=False)
    fig.suptitle(f"Gradient propagation during training: {stat.replace('_', ' ')} per block",
                 fontsize=12)
    return fig
