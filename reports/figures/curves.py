"""Training curves: loss and test accuracy against step, one line per setting."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    NullFormatter,
)

from reports.figures import frames
from reports.figures.style import (
    FRACTION_COLUMNS,
    LINESTYLES,
    accuracy_limits,
    chance_handle,
    diverged_handle,
    draw_chance,
    fmt_value,
    is_number,
    label,
    mark_diverged,
    palette_for,
    panel_figure,
    set_value_axis,
    styled,
)
from sigprop.errors import UserError

SHORT_RUN = 10  # steps; shorter loss curves are drawn raw
IDENTICAL = (0, (4, 4))  # a curve equal to an earlier one: dashes, so both colours show


def smoothing_window(steps: float) -> int:
    """Loss points per rolling mean: a fifteenth of the run, at least 5 (raw for short runs).
    A fortieth of a 100-step run (2 points) is still raw batch noise."""
    return 1 if steps < SHORT_RUN else max(5, round(steps / 15))


def smoothed(values: pd.Series, window: int) -> pd.Series:
    """Centred rolling mean (no lag behind the raw curve); shorter at the ends."""
    if window <= 1:
        return values
    return values.rolling(window, min_periods=1, center=True).mean()


def seed_band(series: list[pd.Series]) -> pd.DataFrame:
    """Mean, min and max over runs of curves indexed by x (runs may miss some x)."""
    table = pd.concat(series, axis=1)
    return pd.DataFrame({"mean": table.mean(axis=1), "low": table.min(axis=1),
                         "high": table.max(axis=1)}).sort_index()


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
    """Training loss (top; centred rolling mean, log scale when it spans a decade) and test
    accuracy (bottom, from 0, chance dotted) against ``x``, panels by ``col`` (default: batch
    size, whose step counts differ).

    One line per setting (``hue``, default clipping, and ``style``, default model family):
    the mean over its completed seeds with a min-max band. Each diverged run is a thin line of
    its own, ending in a cross at its divergence step (one cross per setting, at its first
    divergence, counting its diverged runs).
    Curves that coincide with an earlier one are dashed so both colours show, and a note under
    the figure names them; it also gives the seeds, the smoothing window and, when columns
    cover different step ranges, those ranges. ``smooth``: loss points per rolling mean
    (default :func:`smoothing_window` of each column's length).
    """
    frames.require(metrics, ["run_id", x], "the training curves")
    frame = frames.with_derived(runs)
    join = [k for k in ("grid", "run_id") if k in metrics and k in frame]
    data = metrics.merge(frame.drop(columns=[c for c in metrics if c not in join and c in frame]),
                         on=join, how="inner")
    if data.empty:
        raise UserError("no metrics rows match the runs frame (join on grid, run_id)")
    run_frame = frame[frame["run_id"].isin(data["run_id"])].copy()
    settings = frames.setting_axes(run_frame)
    if col is None:
        col = ["batch_size"] if "batch_size" in settings and hue != "batch_size" else []
    cols = [col] if isinstance(col, str) else list(col)
    if hue is None:
        hue = next(iter(frames.dependent_on(run_frame, cols, settings)), None)
    if style is None:
        rest = frames.dependent_on(run_frame, [*cols, *filter(None, [hue])], settings)
        style = "model" if "model" in rest else None
    panels = frames.add_panel_column(run_frame, cols)
    run_frame = run_frame.set_index("run_id", drop=False)
    hues = frames.ordered_values(frame, hue) if hue else [None]
    styles = frames.ordered_values(frame, style) if style else [None]
    colours = palette_for(hues)
    rows = [m for m in ("loss", "test_acc") if m in data and data[m].notna().any()]
    if not rows:
        raise UserError("the metrics have neither loss nor test_acc values to draw")
    chance = frames.chance_level(run_frame)
    in_panel = data["run_id"].map(run_frame["_panel"])
    lengths = {panel: float(data.loc[in_panel == panel, x].max()) for panel in panels}
    if x == "step" and "steps_done" in run_frame:  # the runs' length, not the last logged step
        done = run_frame.groupby("_panel")["steps_done"].max()
        lengths = {p: max(v, float(done.get(p, v))) if is_number(done.get(p)) else v
                   for p, v in lengths.items()}
    windows = {panel: smooth or smoothing_window(data.loc[in_panel == panel, "step"].max())
               for panel in panels}

    # every run's curves: completed runs are averaged per setting, diverged ones drawn singly
    lines: dict[tuple, dict[str, list[pd.Series]]] = {}
    crosses: dict[tuple, tuple[float, int]] = {}
    for run_id, run in data.groupby("run_id", sort=False):
        info = run_frame.loc[run_id]
        setting = (info["_panel"], info[hue] if hue else None, info[style] if style else None)
        run = run.sort_values(x)
        diverged = info["status"] == "diverged"
        diverged_at = info.get("diverged_step")
        if diverged and not is_number(diverged_at):
            diverged_at = run["step"].max()
        for metric in rows:
            series = run[list(dict.fromkeys([x, "step", metric]))].dropna()
            if diverged:
                # the diverging step's loss is unbounded; it is shown as the cross instead
                series = series[series["step"] < diverged_at]
            series = series[np.isfinite(series[metric].astype(float))]
            if metric == "loss":
                curve = pd.Series(smoothed(series[metric], windows[info["_panel"]]).to_numpy(
                    dtype=float), index=series[x].to_numpy(dtype=float))
            else:
                points = series[[x, metric]]
                final, steps = info.get("final_acc"), info.get("steps_done")
                # the last evaluation runs after the last update, so it may have no metrics row
                if x == "step" and is_number(final) and is_number(steps) and (
                        points.empty or points[x].max() < steps):
                    points = pd.concat([points, pd.DataFrame({x: [steps], metric: [final]})])
                curve = pd.Series(points[metric].to_numpy(dtype=float),
                                  index=points[x].to_numpy(dtype=float))
            kind = "diverged" if diverged else "completed"
            lines.setdefault((*setting, metric), {"completed": [], "diverged": []})[kind].append(
                curve)
            if diverged:
                at = run.loc[run["step"] >= diverged_at, x]
                where = float(at.iloc[0]) if len(at) else float(diverged_at)
                # one cross per setting, at its first divergence, counting its diverged runs:
                # crosses a step apart would hide each other
                key = (info["_panel"], metric, setting[1], setting[2])
                first, count = crosses.get(key, (where, 0))
                crosses[key] = (min(first, where), count + 1)

    fig, axes = panel_figure(len(rows), len(panels), 4.4, 3.0, 2.9 * len(rows) + 0.9,
                             sharey="row", sharex="col")
    plotted_loss: list[np.ndarray] = []
    identical: list[str] = []
    means: dict[tuple, list[tuple[str, pd.Series]]] = {}  # per axes: the settings drawn so far
    n_bands = 0
    for (panel, hv, sv, metric), curves in sorted(
            lines.items(), key=lambda item: (panels.index(item[0][0]), hues.index(item[0][1]),
                                              styles.index(item[0][2]), item[0][3])):
        ax = axes[rows.index(metric)][panels.index(panel)]
        colour = colours.get(hv, "black") if hue else "black"
        linestyle = LINESTYLES[styles.index(sv) % 4] if style else "-"
        marker = {} if metric == "loss" else {"marker": ".", "markersize": 5}
        if curves["completed"]:
            band = seed_band(curves["completed"])
            earlier = means.setdefault((metric, panel), [])
            twin = next((name for name, drawn in earlier if drawn.index.equals(band.index)
                         and np.allclose(drawn.to_numpy(), band["mean"].to_numpy(), rtol=1e-6,
                                         atol=0, equal_nan=True)), None)
            name = ", ".join(fmt_value(v) for v in (hv, sv) if v is not None) or "all runs"
            if twin is not None:
                linestyle = IDENTICAL
                if metric == rows[0]:
                    identical.append(f"{name} = {twin}" + (f" ({short(panel)})" if panel else ""))
            ax.plot(band.index, band["mean"], color=colour, linestyle=linestyle, linewidth=1.8,
                    alpha=0.95, gid="curve", **marker)
            if len(curves["completed"]) > 1:
                ax.fill_between(band.index, band["low"], band["high"], color=colour, alpha=0.15,
                                linewidth=0, gid="band")
                n_bands += 1
            earlier.append((name, band["mean"]))
            if metric == "loss":
                plotted_loss.append(band["mean"].to_numpy(dtype=float))
        for curve in curves["diverged"]:
            ax.plot(curve.index, curve.to_numpy(), color=colour, linestyle=linestyle,
                    linewidth=1.0, alpha=0.7, gid="curve", **marker)
            if metric == "loss":
                plotted_loss.append(curve.to_numpy(dtype=float))
    for (panel, metric, hv, _), (where, count) in crosses.items():
        ax = axes[rows.index(metric)][panels.index(panel)]
        colour = colours.get(hv, "black") if hue else "black"
        mark_diverged(ax, where, count, colour, "top" if metric == "loss" else "bottom")

    shown = np.concatenate(plotted_loss) if plotted_loss else np.zeros(0)
    shown = shown[np.isfinite(shown)]
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
            if metric in FRACTION_COLUMNS:
                draw_chance(ax, chance)
                accuracy_limits(ax, data[metric].max())
    drawn = run_frame[run_frame["run_id"].isin(data["run_id"])]
    handles = [Line2D([], [], color=colours[h], linewidth=2.5, label=fmt_value(h))
               for h in hues if h is not None and (drawn[hue] == h).any()]
    if style:
        handles += [Line2D([], [], color="black", linestyle=LINESTYLES[i % 4], label=fmt_value(s))
                    for i, s in enumerate(styles) if (drawn[style] == s).any()]
    if n_bands:
        handles.append(Patch(facecolor="grey", alpha=0.3, label="min–max over seeds"))
    if crosses:
        handles.append(diverged_handle())
    if chance is not None and "test_acc" in rows:
        handles.append(chance_handle(chance))
    title = " / ".join(label(c) for c in (hue, style) if c) or None
    fig.legend(handles=handles, loc="outside right upper", title=title, frameon=False)
    seeds = frames.seeds_text(drawn)
    fig.suptitle("Training curves" + (f" (mean over {seeds} per setting)" if seeds else ""),
                 fontsize=12)
    fig.supxlabel("\n".join(curve_notes(panels, lengths, windows, identical, x)),
                  fontsize="small", ha="left", x=0.01, ma="left")
    return fig


def short(panel: str) -> str:
    """'batch size (examples) = 32' -> 'batch size 32': a panel named inside a sentence."""
    return re.sub(r"(?: \([^)]*\))? = ", " ", panel)


def curve_notes(panels: list[str], lengths: dict, windows: dict, identical: list[str],
                x: str) -> list[str]:
    """What a reader of the curves cannot see: smoothing, differing x ranges, hidden curves."""
    def per_panel(values: dict, unit: str) -> str:
        return ", ".join(f"{fmt_value(values[p])} {unit}" + (f" ({short(p)})" if p else "")
                         for p in panels)

    notes = ["Lines: the mean over each setting's completed seeds (band: min–max); each "
             "diverged run is drawn alone, up to its divergence (×)."]
    window_values = set(windows.values())
    if window_values != {1}:
        notes.append("Loss: centred rolling mean over " + (
            f"{window_values.pop()} steps." if len(window_values) == 1
            else per_panel(windows, "steps") + "."))
    if len(set(lengths.values())) > 1:
        notes.append(f"Columns cover different {label(x).split(' (')[0]} ranges: "
                     f"{per_panel(lengths, 'at most')}; compare shapes, not positions."
                     if x != "step" else
                     f"Columns cover different step ranges: {per_panel(lengths, 'steps')}; "
                     "compare shapes, not positions.")
    if identical:
        notes.append("Identical curves (dashed over each other): " + "; ".join(identical) + ".")
    return notes
