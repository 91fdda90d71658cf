"""Scalar (SkipInit) gains over training."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reports.figures.frames import ordered_values, seeds_text, sort_frame, with_derived
from reports.figures.style import (
    DIVERGED_MARK,
    fmt_value,
    label,
    palette_for,
    panel_figure,
    styled,
)
from sigprop.constants import GAIN_PREFIX
from sigprop.errors import UserError


@styled
def plot_gains(blocks: pd.DataFrame, runs: pd.DataFrame, col: str | None = None) -> Figure:
    """Scalar gains (SkipInit ``gain:skip_gain`` and any other 0-d block parameter) over
    training: the mean |gain| over a run's blocks, one line per run, coloured by the clipping
    setting, a panel per ``col`` (default: batch size); crosses mark diverged runs."""
    if blocks.empty or "stat" not in blocks:
        raise UserError("the blocks frame has no gain rows")
    rows = blocks[blocks["stat"].astype(str).str.startswith(GAIN_PREFIX)]
    if rows.empty:
        raise UserError("the blocks frame has no gain rows")
    frame = with_derived(runs)
    frame = frame[frame["run_id"].isin(rows["run_id"].unique())]
    if col is None:
        col = "batch_size" if "batch_size" in frame and frame["batch_size"].nunique() > 1 \
            else None
    panels = ordered_values(frame, col) if col else [None]
    hue = "clipping" if "clipping" in frame else None
    hues = ordered_values(frame, hue) if hue else [None]
    colours = palette_for(hues)
    per_run = (rows.assign(value=rows["value"].abs())
               .groupby(["run_id", "step"])["value"].mean().reset_index())
    fig, axes = panel_figure(1, len(panels), 4.2, 2.6, 3.8, sharey=True)
    for ax, panel in zip(axes[0], panels):
        members = frame if panel is None else frame[frame[col] == panel]
        for _, run in sort_frame(members, [hue] if hue else []).iterrows():
            series = per_run[per_run["run_id"] == run["run_id"]].sort_values("step")
            if series.empty:
                continue
            colour = colours[run[hue]] if hue else "black"
            ax.plot(series["step"], series["value"], color=colour, linewidth=1.3, alpha=0.8,
                    gid="gain-line")
            if run.get("status") == "diverged":
                ax.plot(series["step"].iloc[-1], series["value"].iloc[-1], DIVERGED_MARK,
                        color=colour, markersize=8)
        ax.set_xlabel(label("step"))
        ax.set_title(f"{label(col)} = {fmt_value(panel)}" if col else "all runs", fontsize=10.5)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("mean |gain| over blocks")
    if hue:
        handles = [Line2D([], [], color=colours[h], linewidth=2, label=fmt_value(h))
                   for h in hues]
        fig.legend(handles=handles, title=label(hue), loc="outside right center", frameon=False)
    seeds = seeds_text(frame)
    fig.suptitle("Scalar (SkipInit) gains over training, one line per run"
                 + (f" ({seeds} per setting)" if seeds else ""), fontsize=12)
    return fig
