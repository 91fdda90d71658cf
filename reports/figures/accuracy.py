"""Accuracy against batch size (or another setting), with a strip of diverged runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from reports.figures import frames
from reports.figures.style import (
    DIVERGED_MARK,
    LINESTYLES,
    MARKERS,
    chance_handles,
    diverged_handle,
    fmt_value,
    label,
    new_figure,
    palette_for,
    panel_width,
    positions,
    set_value_axis,
    set_x_axis,
    styled,
    value_limits,
)

# a strip row's height (inches) and where its name's top sits (in row units below the row's
# top): tall enough that an 8 pt name clears the 10 pt crosses at the row's centre
STRIP_ROW_INCHES = 0.5
STRIP_NAME_TOP = 0.02


@styled
def plot_accuracy_vs_batch(
    runs: pd.DataFrame,
    x: str = "batch_size",
    y: str = "final_acc",
    hue: str | None = None,
    style: str | None = None,
    col: str | Sequence[str] | None = None,
) -> Figure:
    """``y`` against ``x`` (log2 axis for spread positive numbers): one line per ``hue`` value
    (default: clipping) and ``style`` value (default: model family), the mean over completed
    seeds with a min-max band. Diverged runs get a strip under the plot: one row per line
    that has any, a cross at each x where runs diverged, labelled "k/n" (k of n finished)."""
    frame = frames.with_derived(runs)
    frames.require(frame, [x, y], "the accuracy plot")
    frame = frame[frame[x].notna()].copy()
    fixed = [col] if isinstance(col, str) else list(col or [])
    settings = [c for c in frames.setting_axes(frame, exclude=[x]) if c not in fixed]
    if hue is None:
        hue = next(iter(frames.dependent_on(frame, [x, *fixed], settings)), None)
    if style is None:
        rest = frames.dependent_on(frame, [x, *fixed, *filter(None, [hue])], settings)
        style = "model" if "model" in rest else (rest[0] if len(rest) > 1 else None)
    chosen = [c for c in (x, hue, style) if c]
    frames.require(frame, chosen, "the accuracy plot")
    if col is None:
        col = frames.dependent_on(frame, chosen, frames.setting_axes(frame, exclude=chosen))
    panels = frames.add_panel_column(frame, col)
    chance = frames.chance_level(frame)
    xs = frames.ordered_values(frame, x)
    to_pos, scale = positions(xs)
    hues = frames.ordered_values(frame, hue) if hue else [None]
    styles = frames.ordered_values(frame, style) if style else [None]
    colours = palette_for(hues)
    keys = ["_panel", *[c for c in (hue, style) if c], x]
    summary = frames.seed_summary(frame, keys, y)
    lines = [(h, s) for h in hues for s in styles]

    def select(part: pd.DataFrame, hv: Any, sv: Any) -> pd.DataFrame:
        if hue:
            part = part[part[hue] == hv]
        return part[part[style] == sv] if style else part

    strip_rows = [(h, s) for h, s in lines if select(summary, h, s)["n_diverged"].sum()]
    width = panel_width(len(panels), 5.2, 3.0)
    if strip_rows:
        # each strip row carries its name on a line of its own above the crosses, inside the
        # panel: as tick labels left of it, a long name pushed every panel right
        strip_height = STRIP_ROW_INCHES * len(strip_rows) + 0.3
        fig = Figure(figsize=(width, 4.4 + strip_height), layout="constrained")
        grid = fig.subplots(2, len(panels), squeeze=False, sharex="col", sharey="row",
                            gridspec_kw={"height_ratios": [4.4, strip_height]})
        axes, strips = grid[:1], grid[1]
    else:
        fig, axes = new_figure(1, len(panels), width, 4.6, sharey=True)
        strips = [None] * len(panels)
    for ax, strip, panel in zip(axes[0], strips, panels):
        part = summary[summary["_panel"] == panel]
        for h_index, hv in enumerate(hues):
            # nudge the hues apart on x so markers and bands do not hide each other
            shift = 0.04 * (h_index - (len(hues) - 1) / 2)
            for s_index, sv in enumerate(styles):
                line = select(part, hv, sv)
                if line.empty:
                    continue
                px = np.array([to_pos(v) for v in line[x]])
                px = px * 2**shift if scale == "log2" else px + shift
                colour = colours.get(hv, "black")
                ax.plot(px, line["mean"], color=colour, linestyle=LINESTYLES[s_index % 4],
                        marker=MARKERS[s_index % len(MARKERS)], linewidth=2, markersize=6,
                        gid="mean")
                ax.fill_between(px, line["low"], line["high"], color=colour, alpha=0.18,
                                linewidth=0, gid="band")
        set_value_axis(ax, y)
        value_limits(ax, y, chance, summary["high"].max(), margin=0.1)
        if panel:
            ax.set_title(panel)
        if ax is not axes[0][0]:
            ax.set_ylabel("")
        bottom = strip if strip is not None else ax
        if strip is not None:
            draw_diverged_strip(strip, part, strip_rows, select, x, to_pos, colours, styles)
            if strip is not strips[0]:
                strip.set_ylabel("")
        set_x_axis(bottom, xs, scale, x)
        if strip is not None:
            ax.tick_params(labelbottom=False)
    drawn = summary[summary["n_completed"] > 0]
    handles = [Line2D([], [], color=colours[h], linewidth=2.5, label=fmt_value(h))
               for h in hues if h is not None and (drawn[hue] == h).any()]
    if style:
        handles += [Line2D([], [], color="black", linestyle=LINESTYLES[i % 4],
                           marker=MARKERS[i % len(MARKERS)], label=fmt_value(s))
                    for i, s in enumerate(styles) if (drawn[style] == s).any()]
    if (summary["n_completed"] > 1).any():
        handles.append(Patch(facecolor="grey", alpha=0.3, label="min–max over seeds"))
    if strip_rows:
        handles.append(diverged_handle())
    handles += chance_handles(y, chance)
    title = " / ".join(label(c) for c in (hue, style) if c) or None
    fig.legend(handles=handles, loc="outside right upper", title=title, frameon=False)
    shown = [x, hue, style, *([col] if isinstance(col, str) else list(col or []))]
    fig.suptitle(f"{label(y).capitalize()} vs {label(x).split(' (')[0]}"
                 + _averaged_text(frame, summary, shown), fontsize=12)
    return fig


def _averaged_text(frame: pd.DataFrame, summary: pd.DataFrame, shown: list) -> str:
    """The title's second line: what each point averages. Seeds, unless the seed is itself
    on an axis; then the runs each point holds ("one run per point")."""
    if "seed" not in shown:
        seeds = frames.seeds_text(frame)
        return f"\n(mean over {seeds})" if seeds else ""
    counts = sorted({int(n) for n in summary["n_completed"] + summary["n_diverged"] if n > 0})
    if not counts or counts == [1]:
        return "\n(one run per point)" if counts else ""
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"\n(mean over {span} runs per point)"


def draw_diverged_strip(strip: Any, part: pd.DataFrame, rows: list[tuple], select: Callable,
                        x: str, to_pos: Callable, colours: dict, styles: list) -> None:
    """One row per line with divergences: a cross and "k/n" wherever runs diverged."""
    for r, (hv, sv) in enumerate(rows):
        line = select(part, hv, sv)
        for value, diverged, completed in zip(line[x], line["n_diverged"], line["n_completed"]):
            if not diverged:
                continue
            strip.plot([to_pos(value)], [r], marker=DIVERGED_MARK, markersize=10,
                       color=colours.get(hv, "black"), markeredgecolor="black",
                       markeredgewidth=0.6, linestyle="none", gid="diverged")
            strip.annotate(f"{int(diverged)}/{int(diverged + completed)}", (to_pos(value), r),
                           xytext=(8, 0), textcoords="offset points", va="center", fontsize=9,
                           gid="diverged-count")
    names = [", ".join(fmt_value(v) for v in (hv, sv) if v is not None) or "all"
             for hv, sv in rows]
    # a row spans 1 unit: its name in the top part, its crosses at the centre
    for r, name in enumerate(names):
        strip.text(0.005, r - 0.5 + STRIP_NAME_TOP, name, transform=strip.get_yaxis_transform(),
                   ha="left", va="top", fontsize=8, color="#333", gid="diverged-row-name")
    strip.set_yticks([])
    strip.set_ylim(len(rows) - 0.5 + 0.15, -0.5)
    strip.grid(False, axis="y")
    strip.set_ylabel("diverged", fontsize=10)
    strip.spines["left"].set_visible(False)
    strip.tick_params(axis="y", length=0)
