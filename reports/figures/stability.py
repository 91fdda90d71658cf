"""Stability heatmap: clipping threshold x batch size, coloured by accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from reports.figures import frames
from reports.figures.style import (
    DIVERGED_GREY,
    FRACTION_COLUMNS,
    SEQUENTIAL,
    CompactPercent,
    fmt_value,
    label,
    panel_figure,
    styled,
)
from sigprop.constants import THRESHOLD_MODES
from sigprop.errors import UserError


@styled
def plot_stability_heatmap(
    runs: pd.DataFrame,
    x: str = "batch_size",
    y: str = "clip.threshold",
    value: str = "final_acc",
    col: str | Sequence[str] | None = None,
) -> Figure:
    """Threshold x batch size, coloured by ``value`` averaged over completed seeds; in the
    final accuracy a diverged run counts at chance (``DIVERGED_RULE``).

    Cells whose runs all diverged are hatched (coloured at chance where ``value`` is the final
    accuracy, grey otherwise); any diverged runs are counted in the cell ("×2/3"). The best y
    per x column is boxed: the fewest diverged runs, then the highest mean.
    Runs not finished yet leave their cell empty, labelled with their state. With the default
    y (``clip.threshold``) unclipped runs are left out, each clipping mode gets its own panel
    (global-norm and AGC thresholds are different scales) and, when some mode sweeps two or
    more thresholds, modes with a single one are left out.
    """
    frame = frames.with_derived(runs)
    frames.require(frame, [x, y, value], "the stability heatmap")
    by_mode = y == "clip.threshold" and "clip.mode" in frame
    if by_mode:
        frame = frame[frame["clip.mode"].isin(THRESHOLD_MODES)].copy()
        spread = frame.groupby("clip.mode")[y].nunique()
        if (spread >= 2).any():  # a single threshold is no sweep; the accuracy plot shows it
            frame = frame[frame["clip.mode"].isin(spread.index[spread >= 2])].copy()
    frame = frame[frame[x].notna() & frame[y].notna()].copy()
    if frame.empty:
        raise UserError(f"no runs with both {x} and {y} to draw the stability heatmap")
    if col is None:
        col = frames.dependent_on(frame, [x, y], frames.setting_axes(frame, exclude=[x, y]))
        if by_mode and frame["clip.mode"].nunique() > 1 and "clip.mode" not in col:
            col = ["clip.mode", *col]  # thresholds of different modes are different scales
    panels = frames.add_panel_column(frame, col)
    xs, ys = frames.ordered_values(frame, x), frames.ordered_values(frame, y)
    summary = frames.seed_summary(frame, ["_panel", x, y], value)
    finite = summary["mean"].dropna()
    norm = Normalize(finite.min() if len(finite) else 0.0, finite.max() if len(finite) else 1.0)
    if norm.vmin == norm.vmax:
        norm = Normalize(norm.vmin - 0.01, norm.vmax + 0.01)
    cmap = matplotlib.colormaps[SEQUENTIAL]

    cell = 0.95 if len(xs) <= 5 else 0.75
    fig, axes = panel_figure(1, len(panels), cell * len(xs) + 1.3, 1.6,
                             max(3.4, 0.55 * len(ys) + 2.2))
    image = None
    for ax, panel in zip(axes[0], panels):
        part = summary[summary["_panel"] == panel]
        lookup = {(r[x], r[y]): r for _, r in part.iterrows()}
        grid = np.full((len(ys), len(xs)), np.nan)
        for (xv, yv), row in lookup.items():
            grid[ys.index(yv), xs.index(xv)] = row["mean"]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower",
                          aspect="auto")
        ax.set_facecolor("white")
        ax.grid(False)
        for j, xv in enumerate(xs):
            best = None
            for i, yv in enumerate(ys):
                row = lookup.get((xv, yv))
                if row is None:
                    continue
                annotate_cell(ax, i, j, row, norm, cmap, value)
                if np.isfinite(row["mean"]):
                    rank = (row["n_diverged"], -row["mean"])
                    if best is None or rank < best[0]:
                        best = (rank, i)
            if best is not None:
                ax.add_patch(Rectangle((j - 0.5, best[1] - 0.5), 1, 1, fill=False,
                                       edgecolor="black", linewidth=3, gid="best", zorder=4))
        ax.set_xticks(range(len(xs)), [fmt_value(v) for v in xs])
        ax.set_yticks(range(len(ys)), [fmt_value(v) for v in ys])
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y))
        for spine in ax.spines.values():
            spine.set_visible(False)
        n_div = int(part["n_diverged"].sum())
        n_done = int((part["n_completed"] + part["n_diverged"]).sum())
        ax.set_title((f"{panel}\n" if panel else "") + f"diverged: {n_div} of {n_done} runs")
    colourbar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9)
    seeds = frames.seeds_text(frame)
    colourbar.set_label(f"{label(value)}, mean over {seeds or 'seeds'}"
                        + (" (%)" if value in FRACTION_COLUMNS else ""))
    if value in FRACTION_COLUMNS:
        colourbar.formatter = CompactPercent()
        colourbar.update_ticks()
        chance = frames.chance_level(frame)
        if chance is not None and norm.vmin <= chance <= norm.vmax:
            colourbar.ax.axhline(chance, color="black", linestyle=":", linewidth=1.5,
                                 gid="chance")
            colourbar.set_label(f"{colourbar.ax.get_ylabel()}; dotted: chance")
    fig.suptitle(f"Stability: {label(value)} by {label(y).split(' (')[0]} and "
                 f"{label(x).split(' (')[0]}\n□ best per column   ×k/n: k of n runs diverged"
                 + (", counted at chance" if summary["n_at_chance"].any() else "")
                 + " (hatched: all)", fontsize=11.5)
    return fig


def annotate_cell(ax: Any, i: int, j: int, row: pd.Series, norm: Normalize, cmap: Any,
                  value: str) -> None:
    done = int(row["n_completed"] + row["n_diverged"])
    diverged = int(row["n_diverged"])
    if np.isfinite(row["mean"]):
        text = f"{row['mean']:.1%}" if value in FRACTION_COLUMNS else f"{row['mean']:.3g}"
        if diverged:
            text += f"\n×{diverged}/{done}"
        every = diverged and not row["n_completed"]
        if every:  # every seed diverged: its colour is chance, the hatching says why
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#636363",
                                   hatch="xx", linewidth=0, gid="diverged-cell"))
            text += " diverged"
        r, g, b, _ = cmap(norm(row["mean"]))
        light = every or 0.299 * r + 0.587 * g + 0.114 * b > 0.5  # a boxed label is on white
        ax.text(j, i, text, ha="center", va="center", fontsize=10,
                color="black" if light else "white",
                gid="diverged-count" if diverged else "value",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5, "alpha": 0.85}
                if every else None)
    elif diverged:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=DIVERGED_GREY,
                               edgecolor="#636363", hatch="xx", linewidth=0, gid="diverged-cell"))
        ax.text(j, i, f"×{diverged}/{done}\ndiverged", ha="center", va="center", fontsize=10,
                color="black", gid="diverged-count",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5, "alpha": 0.85})
    else:
        states = []
        for key, name in (("n_failed", "failed"), ("n_pending", "not run")):
            if row[key]:
                states.append(f"{int(row[key])} {name}")
        ax.text(j, i, "\n".join(states) or "no result", ha="center", va="center", fontsize=9,
                color="#525252", gid="missing")
