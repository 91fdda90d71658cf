"""Training curves: loss and test accuracy against step, one line per run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    NullFormatter,
)

from reports.figures.frames import (
    add_panel_column,
    dependent_on,
    ordered_values,
    require,
    setting_axes,
    with_derived,
)
from reports.figures.style import (
    LINESTYLES,
    diverged_handle,
    fmt_value,
    gids_of,
    is_number,
    label,
    mark_diverged,
    new_figure,
    palette_for,
    panel_width,
    set_value_axis,
    styled,
)
from sigprop.errors import UserError


def smoothed(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean() if window > 1 else values


@styled
def plot_training_curves(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    hue: str | None = None,
    col: str | Sequence[str] | None = None,
    style: str | None = None,
    x: str = "step",
    smooth: int | None = None,
) -> Figure:
    """Training loss (top, log scale, rolling mean) and test accuracy (bottom) against ``x``,
    one line per run coloured by ``hue`` (default: clipping), panels by ``col`` (default: batch
    size, whose step counts differ). A diverged run ends in a cross at its divergence step."""
    require(metrics, ["run_id", x], "the training curves")
    frame = with_derived(runs)
    join = [k for k in ("grid", "run_id") if k in metrics and k in frame]
    data = metrics.merge(frame.drop(columns=[c for c in metrics if c not in join and c in frame]),
                         on=join, how="inner")
    if data.empty:
        raise UserError("no metrics rows match the runs frame (join on grid, run_id)")
    run_frame = frame[frame["run_id"].isin(data["run_id"])].copy()
    settings = setting_axes(run_frame)
    if col is None:
        col = ["batch_size"] if "batch_size" in settings and hue != "batch_size" else []
    cols = [col] if isinstance(col, str) else list(col)
    if hue is None:
        hue = next(iter(dependent_on(run_frame, cols, settings)), None)
    if style is None:
        rest = dependent_on(run_frame, [*cols, *filter(None, [hue])], settings)
        style = "model" if "model" in rest else None
    panels = add_panel_column(run_frame, cols)
    panel_of = dict(zip(run_frame["run_id"], run_frame["_panel"]))
    hues = ordered_values(frame, hue) if hue else [None]
    styles = ordered_values(frame, style) if style else [None]
    colours = palette_for(hues)
    rows = [m for m in ("loss", "test_acc") if m in data and data[m].notna().any()]
    if not rows:
        raise UserError("the metrics have neither loss nor test_acc values to draw")

    fig, axes = new_figure(len(rows), len(panels), panel_width(len(panels), 4.4, 3.0),
                           2.9 * len(rows) + 0.6, sharey="row", sharex="col")
    plotted_loss: list[np.ndarray] = []
    for run_id, run in data.groupby("run_id", sort=False):
        info = run_frame.loc[run_frame["run_id"] == run_id].iloc[0]
        column = panels.index(panel_of[run_id])
        colour = colours.get(info[hue], "black") if hue else "black"
        linestyle = LINESTYLES[styles.index(info[style]) % 4] if style else "-"
        run = run.sort_values(x)
        diverged_at = info.get("diverged_step")
        diverged = info["status"] == "diverged"
        if diverged and not is_number(diverged_at):
            diverged_at = run["step"].max()
        for r, metric in enumerate(rows):
            ax = axes[r][column]
            series = run[list(dict.fromkeys([x, "step", metric]))].dropna()
            if diverged:
                # the diverging step's loss is unbounded; it is shown as the cross instead
                series = series[series["step"] < diverged_at]
            series = series[np.isfinite(series[metric].astype(float))]
            if metric == "loss":
                window = smooth or max(1, len(run) // 40)
                plotted_loss.append(smoothed(series[metric], window).to_numpy(dtype=float))
                ax.plot(series[x], plotted_loss[-1], color=colour,
                        linestyle=linestyle, linewidth=1.6, alpha=0.9, gid="curve")
            else:
                points = series[[x, metric]]
                final = info.get("final_acc")
                steps = info.get("steps_done")
                # the last evaluation runs after the last update, so it may have no metrics row
                if x == "step" and is_number(final) and is_number(steps) and (
                        points.empty or points[x].max() < steps):
                    points = pd.concat([points, pd.DataFrame({x: [steps], metric: [final]})])
                ax.plot(points[x], points[metric], color=colour, linestyle=linestyle,
                        marker=".", markersize=5, linewidth=1.6, alpha=0.9, gid="curve")
            if diverged:
                at = run.loc[run["step"] >= diverged_at, x]
                where = at.iloc[0] if len(at) else diverged_at
                mark_diverged(ax, where, 1, colour, "top" if metric == "loss" else "bottom")
    shown = np.concatenate(plotted_loss) if plotted_loss else np.zeros(0)
    # a log axis only pays when the loss spans a decade (a blow-up before divergence)
    log_loss = bool(len(shown)) and shown.min() > 0 and shown.max() / shown.min() > 10
    for r, metric in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            if metric == "loss" and log_loss:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            if c == 0:
                set_value_axis(ax, metric)
                if metric == "loss":
                    ax.set_ylabel("training loss\n(rolling mean" + (", log scale)" if log_loss
                                                                   else ")"))
            if r == len(rows) - 1:
                ax.set_xlabel(label(x))
            if r == 0 and panel:
                ax.set_title(panel)
            if metric != "loss":
                ax.margins(y=0.12)
    drawn = run_frame[run_frame["run_id"].isin(data["run_id"])]
    handles = [Line2D([], [], color=colours[h], linewidth=2.5, label=fmt_value(h))
               for h in hues if h is not None and (drawn[hue] == h).any()]
    if style:
        handles += [Line2D([], [], color="black", linestyle=LINESTYLES[i % 4], label=fmt_value(s))
                    for i, s in enumerate(styles) if (drawn[style] == s).any()]
    if gids_of(fig, "diverged"):
        handles.append(diverged_handle())
    title = " / ".join(label(c) for c in (hue, style) if c) or None
    fig.legend(handles=handles, loc="outside right upper", title=title, frameon=False)
    fig.suptitle("Training curves (one line per run)", fontsize=12)
    return fig
