"""AGC clip fraction: the share of units AGC clips, per block, over training."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reports.figures.frames import (
    block_rows,
    run_title,
    selected_panels,
    with_derived,
)
from reports.figures.gradients import HEAD_NOTE
from reports.figures.style import (
    HEAD_LABEL,
    LINESTYLES,
    PALETTE,
    CompactPercent,
    block_name,
    divergence_handle,
    draw_divergence,
    fmt_value,
    gids_of,
    is_number,
    label,
    panel_figure,
    styled,
)
from sigprop.errors import UserError

# sigprop.train gives the probe the run's AGC threshold, and this one to runs without AGC
PROBE_DEFAULT_LAMBDA = 0.01
MAX_LINE_COLOURS = 10  # the colour-blind palette's size; more blocks are coloured by stage


def probe_lambda(run: pd.Series) -> float:
    """The λ the probe counted units above: the run's own AGC threshold, else the default."""
    threshold = run.get("clip.threshold")
    if run.get("clip.mode") == "agc" and is_number(threshold):
        return float(threshold)
    return PROBE_DEFAULT_LAMBDA


def unit_styles(units: pd.DataFrame, unit: str) -> tuple[dict, list[Line2D]]:
    """Colour and line style per unit, and the legend entries: one colour per block when
    there are few enough to tell apart, else one colour per stage."""
    units = units.drop_duplicates(unit).sort_values("index")
    names = list(units[unit])
    if len(names) <= MAX_LINE_COLOURS:
        colours = dict(zip(names, sns.color_palette(PALETTE, len(names))))
        styles = {n: (colours[n], "-") for n in names}
        handles = [Line2D([], [], color=colours[n], linewidth=2, label=block_name(n))
                   for n in names]
        return styles, handles
    stages = list(dict.fromkeys(units["stage"]))
    colours = dict(zip(stages, sns.color_palette(PALETTE, len(stages))))
    styles, seen = {}, {}
    for name, stage in zip(units[unit], units["stage"]):
        k = seen[stage] = seen.get(stage, -1) + 1
        styles[name] = (colours[stage], LINESTYLES[k % len(LINESTYLES)])
    handles = [Line2D([], [], color=colours[s], linewidth=2,
                      label=f"stage {s} ({seen[s] + 1} {unit}s)" if s >= 0 else "stem / head")
               for s in stages]
    return styles, handles


@styled
def plot_agc_clip_fraction(
    blocks: pd.DataFrame,
    runs: pd.DataFrame,
    run_ids: Sequence[str] | None = None,
    col: str | None = None,
    level: str = "block",
    max_panels: int = 4,
    row: str | None = None,
) -> Figure:
    """``agc_frac_above`` over steps: the fraction of units whose ‖G‖/‖W‖ exceeds the probe's
    λ (the run's AGC threshold, else 0.01), i.e. the units AGC at that λ clips. One line per
    block (``level="param"``: per parameter) in a categorical colour named in the legend,
    plus the mean over them dashed black; panels as in :func:`plot_gradient_heatmap`. Each
    panel's title gives the run's own clipping and, on its last line, the probe's λ."""
    if level not in ("block", "param"):
        raise UserError(f"level must be 'block' or 'param', got {level!r}")
    rows = block_rows(blocks, "agc_frac_above", level)
    if rows.empty:
        raise UserError("the blocks frame has no 'agc_frac_above' rows")
    grid = selected_panels(rows, runs, run_ids, col, row, max_panels)
    frame = with_derived(runs).set_index("run_id", drop=False)
    unit = "param" if level == "param" else "block"
    shown = rows[rows["run_id"].isin(grid.run_ids)]
    styles, handles = unit_styles(shown, unit if level == "param" else "block")

    n_rows, n_cols = len(grid.cells), len(grid.col_values)
    fig, axes = panel_figure(n_rows, n_cols, 3.8, 2.6, 4.0 * n_rows + 0.4, sharey=True)
    for _, ax, run_id in grid.panels(axes):
        part = shown[shown["run_id"] == run_id]
        for name, series in part.groupby(unit, sort=False):
            series = series.sort_values("step")
            colour, linestyle = styles[name]
            ax.plot(series["step"], series["value"], color=colour, linestyle=linestyle,
                    linewidth=1.3, alpha=0.85, gid="unit-line",
                    marker="o" if len(series) <= 2 else None, markersize=4)
        mean = part.groupby("step")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), color="black", linestyle="--", linewidth=2,
                gid="mean", marker="o" if len(mean) <= 2 else None, markersize=4)
        info = frame.loc[run_id] if run_id in frame.index else pd.Series(dtype=object)
        diverged_at = info.get("diverged_step")
        if info.get("status") == "diverged" and is_number(diverged_at):
            draw_divergence(ax, diverged_at)
        # a run that stopped early keeps a readable step axis, not one around a point
        end = max([float(mean.index.max()), *[float(v) for v in (
            diverged_at, info.get("steps_done")) if is_number(v)]])
        ax.set_xlim(min(0.0, float(mean.index.min())) - 0.02 * max(end, 1), end * 1.02 + 1)
        ax.yaxis.set_major_formatter(CompactPercent())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(label("step"))
        lam = probe_lambda(info) if len(info) else PROBE_DEFAULT_LAMBDA
        ax.set_title(f"{run_title(frame, run_id, grid)}\nprobe λ = {fmt_value(lam)}",
                     fontsize=10.5)
    grid.label_rows(axes, "units with ‖G‖/‖W‖ > probe λ (%)")
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=2,
                          label=f"mean over {unit}s"))
    if gids_of(fig, "diverged"):
        handles.append(divergence_handle())
    if any(HEAD_LABEL == block_name(n) for n in shown["block"].unique()):
        handles.append(Line2D([], [], linestyle="none", label=HEAD_NOTE.replace(": ", ":\n")))
    fig.legend(handles=handles, loc="outside right center", frameon=False,
               title="block" if level == "block" else "parameters by block")
    shared = grid.shared_settings(frame) if run_ids is None else ""
    fig.suptitle(f"AGC clip fraction per {'parameter' if level == 'param' else 'block'}: "
                 "units whose ‖G‖/‖W‖ exceeds the probe's λ\n(probe λ: the run's AGC "
                 f"threshold; {fmt_value(PROBE_DEFAULT_LAMBDA)} for runs without AGC, whatever "
                 "their own clipping)" + (f"\nevery panel: {shared}" if shared else ""),
                 fontsize=12)
    return fig
